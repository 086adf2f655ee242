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


def test_sample_honours_attention_and_gemm(tmp_path, capsys):
    """The demo sampler passes --attention / --gemm on (forcing a GPU kernel on this CPU is refused,
    not silently ignored), and the reference choices give the default's tokens here."""
    from adsa_jax.cli import main

    t1, t2 = tmp_path / "a.npy", tmp_path / "b.npy"
    assert main(["sample", "--classes", "3", "--tokens-out", str(t1), "--out", str(tmp_path / "a.png")]) == 0
    assert main(["sample", "--classes", "3", "--attention", "xla", "--gemm", "xla", "--tokens-out", str(t2),
                 "--out", str(tmp_path / "b.png")]) == 0
    np.testing.assert_array_equal(np.load(t1), np.load(t2))
    capsys.readouterr()
    for flag in ("--gemm", "--attention"):
        assert main(["sample", "--classes", "3", flag, "pallas", "--out", str(tmp_path / "c.png")]) == 2
        assert f"{flag[2:]}='pallas' compiles for a GPU" in capsys.readouterr().err


def test_data_file_round_trips_and_is_checked(tmp_path):
    pytest.importorskip("sklearn")
    from adsa_jax.config import ConfigError

    path = demo.save_data(tmp_path / "digits.npz")
    ref, got = demo.load_data(), demo.load_data(path)
    for k in demo.DATA_KEYS:
        np.testing.assert_array_equal(got[k], ref[k])
    np.savez(tmp_path / "bad.npz", train_tokens=ref["train_tokens"])
    with pytest.raises(ConfigError, match="missing"):
        demo.load_data(tmp_path / "bad.npz")
    np.savez(tmp_path / "range.npz", **dict(ref, heldout_tokens=ref["heldout_tokens"] + demo.LEVELS))
    with pytest.raises(ConfigError, match="out of range"):
        demo.load_data(tmp_path / "range.npz")


def _train_demo_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_demo.py"
    spec = importlib.util.spec_from_file_location("train_demo", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_demo_shift_and_validation_split():
    import jax

    td = _train_demo_module()
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, demo.LEVELS, (64, 256)).astype(np.int32)
    out = np.asarray(td.shift_tokens(jax.numpy.asarray(tokens), jax.random.key(3), 2))
    seen = set()
    for t, o in zip(tokens.reshape(-1, 16, 16), out.reshape(-1, 16, 16)):
        # find the shift: the one reference translation (zero fill) that reproduces the output
        hits = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = np.zeros_like(t)
                ref[max(dy, 0):16 + min(dy, 0), max(dx, 0):16 + min(dx, 0)] = \
                    t[max(-dy, 0):16 + min(-dy, 0), max(-dx, 0):16 + min(-dx, 0)]
                if np.array_equal(ref, o):
                    hits.append((dy, dx))
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 10  # the shifts vary over the batch
    np.testing.assert_array_equal(np.asarray(td.shift_tokens(jax.numpy.asarray(tokens), jax.random.key(3), 0)), tokens)

    labels = np.repeat(np.arange(10), [50, 51, 49, 50, 52, 48, 50, 50, 50, 50])
    tr, va = td.validation_split(labels, 0.1)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)
    np.testing.assert_array_equal(np.bincount(labels[va], minlength=10), [5] * 10)  # stratified
    np.testing.assert_array_equal(td.validation_split(labels, 0.1)[1], va)  # fixed seed
    assert len(td.validation_split(labels, 0.0)[1]) == 0


def test_train_demo_defaults_are_the_bundled_recipe():
    """`python examples/train_demo.py` with no arguments retrains the bundled checkpoint's recipe."""
    td = _train_demo_module()
    defaults = vars(td.parse([]))
    recorded = demo.read_train_log()["training"]["args"]
    for k in ("steps", "batch", "lr", "warmup", "weight_decay", "dim", "layers", "heads", "seed", "shift",
              "val_fraction", "eval_every"):
        assert defaults[k] == recorded[k], k


def test_eval_demo_classify_later_equals_one_step(tmp_path):
    """--no-classify --samples, then --rescore: the same table as one run with the classifier."""
    pytest.importorskip("sklearn")
    import json

    import jax
    import jax.numpy as jnp

    from adsa_jax import model as M
    from adsa_jax.checkpoint import save_gpt
    from adsa_jax.cli import main

    cfg = demo.demo_config(dim=32, n_layer=1, n_head=1)
    save_gpt(tmp_path / "tiny", M.init_params(cfg, jax.random.key(0), jnp.float32, std=0.3), cfg, image_size=256)
    data = demo.save_data(tmp_path / "digits.npz")
    common = ["eval-demo", "--gpt", str(tmp_path / "tiny"), "--policies", "dense,window", "--budgets", "0.5",
              "--seeds", "0,1", "--per-seed", "10", "--heldout", "4", "--data", str(data)]
    assert main(common + ["--json", str(tmp_path / "one.json")]) == 0
    assert main(common + ["--no-classify", "--json", str(tmp_path / "a.json")]) == 2  # samples would be lost
    assert main(common + ["--no-classify", "--samples", str(tmp_path / "s.npz"), "--json", str(tmp_path / "a.json")]) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["ceiling"] is None and all(r["class_accuracy_mean"] is None for r in first["rows"])
    with np.load(tmp_path / "s.npz") as z:
        assert sorted(z.files) == ["dense_1.00_seed0", "dense_1.00_seed1", "window_0.50_seed0", "window_0.50_seed1"]
        assert z["window_0.50_seed1"].shape == (10, 256)
    assert main(["eval-demo", "--rescore", str(tmp_path / "a.json"), "--samples", str(tmp_path / "s.npz"),
                 "--json", str(tmp_path / "b.json")]) == 0
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "b.json"))
    for r1, r2 in zip(one["rows"], two["rows"]):
        assert r1["class_accuracy_per_seed"] == r2["class_accuracy_per_seed"]
        assert r1["heldout_nll"] == pytest.approx(r2["heldout_nll"], abs=1e-6)
    assert one["ceiling"] == two["ceiling"]
    assert main(["eval-demo", "--rescore", str(tmp_path / "a.json"), "--json", ""]) == 2  # no --samples
