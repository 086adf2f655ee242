"""VQ tokenizer, its converter and image output, against the PyTorch LlamaGen fixtures."""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from adsa_jax.config import ConfigError
from adsa_jax.images import save_npz, save_png_grid, save_pngs, to_uint8
from adsa_jax.vq import VQ8, VQ16, VQConfig, count_vq_params, decode_codes, encode_images, load_vq
from convert.torch_pickle import CheckpointError
from convert.vq import convert_vq, vq_arg_config

FIXTURES = Path(__file__).resolve().parent / "data"
PT = FIXTURES / "vq_small.pt"


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)  # fixture NCHW -> (B, H, W, C)


@pytest.fixture(scope="module")
def small_cfg():
    return json.loads((FIXTURES / "configs.json").read_text())["vq_small"]


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "vq_small_ref.npz"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, small_cfg):
    """Convert the fixture as a user would (config from configs.json, stored dtype kept)."""
    out = tmp_path_factory.mktemp("vq") / "vq_small"
    params = convert_vq(PT, out, cfg=small_cfg)
    return out, params


@pytest.fixture(scope="module")
def vq(converted):
    return load_vq(converted[0])  # float32, as LlamaGen runs its VQ


def test_presets_match_llamagen_param_counts():
    # Spec 6.1 [verified]: VQ-16 71,883,403 and VQ-8 70,109,835 parameters.
    assert count_vq_params(VQ16) == 71_883_403
    assert count_vq_params(VQ8) == 70_109_835
    assert VQ16.downsample == 16 and VQ8.downsample == 8
    assert hash(VQ16) == hash(VQConfig())
    cfg = vq_arg_config(ch=32, ch_mult="1,1,2,2,4", z_channels=32, codebook_size=512)
    assert (cfg.ch, cfg.z_channels, cfg.codebook_size, cfg.ch_mult) == (32, 32, 512, (1, 1, 2, 2, 4))
    assert vq_arg_config(preset="VQ-8") == VQ8


def test_converted_params_keep_stored_float16(converted, vq):
    out, params = converted
    import jax

    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"float16"}
    assert json.loads((out / "adsa_config.json").read_text())["dtype"] == "float16"
    assert load_vq(out, dtype=None).dtype == jnp.float16
    assert vq.dtype == jnp.float32
    # OIHW (32, 3, 3, 3) conv_in became HWIO.
    assert params["encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 32)


def test_decode_matches_pytorch(vq, ref):
    out = np.asarray(decode_codes(vq, ref["codes"]))
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.float32
    err = np.abs(out - nhwc(ref["decoded"])).max()
    assert err < 1e-4, err


def test_encode_matches_pytorch(vq, ref):
    codes = np.asarray(encode_images(vq, nhwc(ref["images"])))
    assert codes.dtype == np.int32 and codes.shape == (2, 16)
    np.testing.assert_array_equal(codes, ref["encoded_codes"])


def test_round_trip_matches_pytorch_forward(vq, ref):
    codes = encode_images(vq, nhwc(ref["images"]))
    rec = np.asarray(decode_codes(vq, codes))
    err = np.abs(rec - nhwc(ref["reconstructed"])).max()
    assert err < 1e-4, err


def test_bf16_decode_is_close(vq, ref):
    out = np.asarray(decode_codes(vq, ref["codes"], dtype="bf16"))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    diff = np.abs(out - nhwc(ref["decoded"]))
    # Random-weight tokenizer with random GroupNorm affines: bf16 activations drift ~1e-2.
    assert diff.mean() < 0.05 and diff.max() < 0.5, (diff.mean(), diff.max())


def test_codes_outside_codebook_rejected(vq, ref):
    bad = ref["codes"].copy()
    bad[0, 3] = 512
    with pytest.raises(ConfigError, match=r"\[0, 511\]"):
        decode_codes(vq, bad)
    with pytest.raises(ConfigError, match=r"\[0, 511\]"):
        decode_codes(vq, -ref["codes"] - 1)
    with pytest.raises(ConfigError, match="square"):
        decode_codes(vq, ref["codes"][:, :15])
    with pytest.raises(ConfigError, match="grid"):
        decode_codes(vq, ref["codes"], grid=(3, 5))
    with pytest.raises(ConfigError, match="integers"):
        decode_codes(vq, ref["codes"].astype(np.float32))


def test_bad_images_rejected(vq, ref):
    with pytest.raises(ConfigError, match="NCHW"):
        encode_images(vq, ref["images"])
    with pytest.raises(ConfigError, match="multiple"):
        encode_images(vq, np.zeros((1, 40, 64, 3), np.float32))
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        encode_images(vq, np.full((1, 64, 64, 3), 200.0, np.float32))


def test_truncated_checkpoint(tmp_path):
    data = PT.read_bytes()
    half = tmp_path / "half.pt"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        convert_vq(half, tmp_path / "out", cfg=VQConfig(ch=32, z_channels=32, codebook_size=512))


def test_wrong_config_names_the_mismatch(tmp_path):
    # The default (released VQ-16 widths) against the small fixture: same keys, wrong shapes.
    with pytest.raises(CheckpointError) as e:
        convert_vq(PT, tmp_path / "out")
    msg = str(e.value)
    assert "wrong shape" in msg and "--ch 32" in msg and "--z-channels 32" in msg and "--codebook-size 512" in msg
    # VQ-8 layout against a VQ-16 layout checkpoint: missing / unexpected keys.
    with pytest.raises(CheckpointError) as e:
        convert_vq(PT, tmp_path / "out", cfg=VQ8.replace(ch=32, z_channels=32, codebook_size=512))
    msg = str(e.value)
    assert "unexpected weights" in msg and "VQ-16 layout" in msg and "--preset VQ-16" in msg
    assert not (tmp_path / "out").exists()


def test_load_vq_rejects_non_vq_dir(tmp_path):
    with pytest.raises(ConfigError, match="not an adsa_jax checkpoint"):
        load_vq(tmp_path)
    (tmp_path / "adsa_config.json").write_text(json.dumps({"kind": "gpt"}))
    with pytest.raises(ConfigError, match="not a VQ"):
        load_vq(tmp_path)


def test_to_uint8_uses_evaluator_truncation():
    x = np.array([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 64, 128, 255, 255, 255])
    with pytest.raises(ConfigError, match="NaN"):
        to_uint8(np.array([np.nan]))


def test_png_grid_pngs_and_npz(tmp_path, vq, ref):
    imgs = to_uint8(decode_codes(vq, np.concatenate([ref["codes"], ref["encoded_codes"], ref["codes"][:1]])))
    assert imgs.shape == (5, 64, 64, 3) and imgs.dtype == np.uint8
    grid = save_png_grid(imgs, tmp_path / "grid.png", nrow=3)
    with Image.open(grid) as im:
        g = np.asarray(im)
    assert g.shape == (2 * 66 + 2, 3 * 66 + 2, 3) and g.dtype == np.uint8
    np.testing.assert_array_equal(g[2:66, 2:66], imgs[0])
    np.testing.assert_array_equal(g[68:132, 2:66], imgs[3])

    paths = save_pngs(imgs, tmp_path / "samples", [f"{i:06d}" for i in range(5)])
    assert [p.name for p in paths] == [f"{i:06d}.png" for i in range(5)]
    with Image.open(paths[4]) as im:
        np.testing.assert_array_equal(np.asarray(im), imgs[4])

    npz = save_npz(imgs, tmp_path / "samples.npz", labels=[1, 2, 3, 4, 5])
    with np.load(npz) as f:
        assert f["arr_0"].shape == (5, 64, 64, 3) and f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["arr_0"], imgs)
        np.testing.assert_array_equal(f["arr_1"], [1, 2, 3, 4, 5])
        assert 0 <= f["arr_0"].min() and f["arr_0"].max() <= 255
    with np.load(save_npz(imgs, tmp_path / "nolabels.npz")) as f:
        assert list(f.keys()) == ["arr_0"]
    with pytest.raises(ConfigError, match="uint8"):
        save_npz(np.zeros((1, 8, 8, 3), np.float32), tmp_path / "x.npz")


def test_unwritable_output_paths(tmp_path):
    imgs = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ConfigError, match="does not exist"):
        save_png_grid(imgs, tmp_path / "missing" / "grid.png")
    with pytest.raises(ConfigError, match="does not exist"):
        save_npz(imgs, tmp_path / "missing" / "s.npz")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        save_npz(imgs, blocker / "s.npz")
    with pytest.raises(ConfigError, match="cannot create output directory"):
        save_pngs(imgs, blocker / "samples", ["a", "b"])
    with pytest.raises(ConfigError, match="is a directory"):
        save_png_grid(imgs, tmp_path)
