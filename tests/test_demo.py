"""The bundled demo model (sklearn digits): checkpoint, golden tokens, held-out NLL, CLI default."""
import numpy as np
import pytest

from adsa_jax import demo


def test_quantiser_round_trips_exactly():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, demo.LEVELS, (6, demo.SIDE * demo.SIDE)).astype(np.int32)
    tokens[0] = np.arange(256) % demo.LEVELS  # every level
    images = demo.decode(tokens)
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    np.testing.assert_array_equal(demo.encode(images), tokens)  # decode -> encode is the identity
    np.testing.assert_array_equal(demo.quantise(demo.tokens_to_unit(tokens)), tokens)
    x = rng.random((3, 16, 16))  # quantising is idempotent
    q = demo.quantise(x)
    np.testing.assert_array_equal(demo.quantise(demo.tokens_to_unit(q)), q)
    assert np.abs(demo.tokens_to_unit(q) - x).max() <= 0.5 / (demo.LEVELS - 1) + 1e-9


@pytest.fixture(scope="module")
def model():
    return demo.load_demo_model(dtype="float32")


def test_bundled_checkpoint(model):
    cfg = model.config
    assert (cfg.model_type, cfg.vocab_size, cfg.grid, cfg.num_classes) == ("c2i", demo.LEVELS, demo.SIDE, 10)
    size = sum(f.stat().st_size for f in demo.DEMO_DIR.rglob("*") if f.is_file())
    assert size < 20 * 2**20


def test_golden_tokens(model):
    gold = np.load(demo.DEMO_DIR / demo.GOLDEN_TOKENS)
    tokens = demo.golden_tokens(model)
    assert tokens.shape == (len(demo.GOLDEN["classes"]), 256)
    np.testing.assert_array_equal(tokens, gold)


def test_dense_heldout_nll_matches_training_log(model):
    pytest.importorskip("sklearn")
    final = demo.read_train_log()["final"]
    n = final["nll_subset_size"]
    data = demo.load_data()
    assert len(data["heldout_labels"]) == 360 and len(data["train_labels"]) == 1437
    nll = demo.dense_nll(model, data["heldout_labels"][:n], data["heldout_tokens"][:n])
    assert abs(nll - final[f"heldout_first{n}_nll_per_token"]) < 1e-3


def test_sample_without_arguments_writes_a_grid(tmp_path, monkeypatch):
    from PIL import Image

    from adsa_jax.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sample"]) == 0
    with Image.open(tmp_path / "samples.png") as im:
        im.verify()
    with Image.open(tmp_path / "samples.png") as im:
        z = demo.DISPLAY_ZOOM * 16
        assert im.format == "PNG" and im.size == (10 * (z + 2) + 2, 4 * (z + 2) + 2)
        assert np.asarray(im).std() > 10  # not blank


def test_sample_side_by_side(tmp_path):
    from PIL import Image

    from adsa_jax.cli import main

    out = tmp_path / "sbs.png"
    assert main(["sample", "--classes", "1,7", "--policy", "adsa-evict", "--budget", "0.5", "--side-by-side",
                 "--dtype", "float32", "--out", str(out), "--tokens-out", str(tmp_path / "t.npy")]) == 0
    with Image.open(out) as im:
        assert im.size[0] > 2 * 2 * demo.DISPLAY_ZOOM * 16
    assert np.load(tmp_path / "t.npy").shape == (2, 256)
    assert main(["sample", "--side-by-side", "--out", str(out)]) == 2  # dense beside dense: refused
    assert main(["sample", "--vq", str(tmp_path), "--out", str(out)]) == 2  # demo has its own tokenizer
