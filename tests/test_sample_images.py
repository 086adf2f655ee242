"""`adsa-jax sample` end to end with images: fixture GPT (vocab 512, 8x8) + fixture VQ (512 codes) -> 128 px."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import adsa_jax
from adsa_jax.checkpoint import save_gpt
from adsa_jax.cli import main
from adsa_jax.config import GPTConfig
from adsa_jax.model import init_params


@pytest.fixture(scope="module")
def vq_dir(fixtures_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vq") / "vq"
    assert main(["convert", "vq", str(fixtures_dir / "vq_small.pt"), "--ch", "32", "--z-channels", "32",
                 "--codebook-size", "512", "--out", str(out)]) == 0
    return out


def test_sample_png_grid_and_npz(c2i_dir, vq_dir, tmp_path, capsys):
    png, npz, toks = tmp_path / "grid.png", tmp_path / "s.npz", tmp_path / "t.npy"
    assert main(["sample", "--gpt", str(c2i_dir), "--vq", str(vq_dir), "--classes", "1,2,3", "--dtype", "float32",
                 "--out", str(png), "--tokens-out", str(toks)]) == 0
    err = capsys.readouterr().err
    assert "compiling" in err and "decoded" in err and "images/s" in err
    img = Image.open(png)
    assert img.mode == "RGB" and min(img.size) >= 128
    # The grid holds exactly the decoded tokens, converted with the evaluator's uint8 rule.
    tokens = np.load(toks)
    vq = adsa_jax.load_vq(vq_dir)
    ref = np.asarray(adsa_jax.decode_codes(vq, tokens))
    assert ref.shape == (3, 128, 128, 3)
    from adsa_jax.images import to_uint8
    u8 = to_uint8(ref)
    grid = np.asarray(img)
    assert (grid[2:130, 2:130] == u8[0]).mean() > 0.999
    # --npz: class-balanced labels, arr_0 N x H x W x 3 uint8 as the FID evaluator reads.
    assert main(["sample", "--gpt", str(c2i_dir), "--vq", str(vq_dir), "--num-samples", "4", "--batch-size", "2",
                 "--dtype", "float32", "--npz", str(npz)]) == 0
    with np.load(npz) as z:
        assert z["arr_0"].shape == (4, 128, 128, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == [0, 1, 2, 3]
        assert z["arr_0"].min() >= 0 and z["arr_0"].max() <= 255 and z["arr_0"].std() > 0


def test_out_dir_pngs(c2i_dir, vq_dir, tmp_path):
    d = tmp_path / "pngs"
    assert main(["sample", "--gpt", str(c2i_dir), "--vq", str(vq_dir), "--classes", "4,5", "--out-dir", str(d)]) == 0
    files = sorted(d.glob("*.png"))
    assert len(files) == 2 and Image.open(files[0]).size == (128, 128)


def test_image_output_errors(c2i_dir, vq_dir, tmp_path, capsys):
    assert main(["sample", "--gpt", str(c2i_dir), "--vq", str(vq_dir), "--out", str(tmp_path / "no" / "g.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", "--gpt", str(c2i_dir), "--out", str(tmp_path / "g.png")]) == 2
    assert "--vq" in capsys.readouterr().err
    # A GPT whose vocabulary is not the VQ codebook.
    cfg = GPTConfig(dim=64, n_layer=1, n_head=1, vocab_size=64, num_classes=3, block_size=16)
    gdir = tmp_path / "tiny"
    save_gpt(gdir, init_params(cfg, jax.random.key(0), jnp.float32), cfg)
    assert main(["sample", "--gpt", str(gdir), "--vq", str(vq_dir), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "vocabulary (64)" in err and "codebook (512)" in err


def test_decode_rejects_codes_outside_codebook(vq_dir):
    vq = adsa_jax.load_vq(vq_dir)
    with pytest.raises(ValueError, match="codebook|code"):
        adsa_jax.decode_codes(vq, np.full((1, 16), 512, np.int32))
