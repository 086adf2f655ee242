"""The GPT converter: containers, prefixes, dtypes, strictness, untrusted files."""
import pickle
import zipfile

import numpy as np
import pytest
import torch

import adsa_jax
from adsa_jax.cli import main
from convert.torch_pickle import CheckpointError, load_pt


@pytest.fixture(scope="module")
def state_dict(fixtures_dir):
    return torch.load(fixtures_dir / "gpt_c2i_small.pt", weights_only=True)["model"]


def _convert(tmp_path, obj, config_files, *extra, name="ck"):
    src = tmp_path / f"{name}.pt"
    torch.save(obj, src)
    out = tmp_path / f"{name}_out"
    rc = main(["convert", "gpt", str(src), "--model", str(config_files["gpt_c2i_small"]), "--out", str(out), *extra])
    return rc, out


def test_reader_matches_torch_load(fixtures_dir, state_dict):
    ours = load_pt(fixtures_dir / "gpt_c2i_small.pt")["model"]
    assert set(ours) == set(state_dict)
    for k, t in state_dict.items():
        np.testing.assert_array_equal(ours[k].numpy(), t.numpy())


@pytest.mark.parametrize("wrap", ["model", "module", "state_dict", "bare"])
def test_containers_and_prefixes(tmp_path, state_dict, config_files, c2i, c2i_ref, wrap):
    sd = {("module." if wrap == "module" else "_orig_mod." if wrap == "state_dict" else "") + k: v
          for k, v in state_dict.items()}
    sd["freqs_cis"] = torch.zeros(3)  # stale buffers from older LlamaGen versions are not weights
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2)
    obj = sd if wrap == "bare" else {wrap: sd, "steps": 7, "args": {"lr": 1e-4}}
    rc, out = _convert(tmp_path, obj, config_files, name=wrap)
    assert rc == 0
    m = adsa_jax.load(out, dtype="float32")
    np.testing.assert_array_equal(np.asarray(m.params["output"]), np.asarray(c2i.params["output"]))


def test_ema_only_when_asked(tmp_path, state_dict, config_files, capsys):
    ema = {k: v * 0 + 1 for k, v in state_dict.items()}
    rc, out = _convert(tmp_path, {"model": state_dict, "ema": ema}, config_files, name="e1")
    assert rc == 0 and not np.all(np.asarray(adsa_jax.load(out, dtype=None).params["output"]) == 1)
    rc, out = _convert(tmp_path, {"model": state_dict, "ema": ema}, config_files, "--ema", name="e2")
    assert rc == 0 and np.all(np.asarray(adsa_jax.load(out, dtype=None).params["output"]) == 1)
    rc, _ = _convert(tmp_path, {"model": state_dict}, config_files, "--ema", name="e3")
    assert rc == 2 and "no 'ema'" in capsys.readouterr().err


@pytest.mark.parametrize("tdtype,name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_half_precision_checkpoints(tmp_path, state_dict, config_files, tdtype, name):
    sd = {k: v.to(tdtype) for k, v in state_dict.items()}
    rc, out = _convert(tmp_path, {"model": sd}, config_files, name=name)
    assert rc == 0
    m = adsa_jax.load(out, dtype=None)  # stored dtype kept
    assert str(m.params["output"].dtype) == name
    np.testing.assert_array_equal(np.asarray(m.params["output"], np.float32),
                                  sd["output.weight"].float().numpy().T)
    rc, out = _convert(tmp_path, {"model": sd}, config_files, "--dtype", "float32", name=name + "_32")
    assert rc == 0 and str(adsa_jax.load(out, dtype=None).params["output"].dtype) == "float32"


def test_strict_keys_and_shapes(tmp_path, state_dict, config_files, capsys):
    sd = dict(state_dict)
    del sd["layers.1.feed_forward.w2.weight"]
    sd["layers.9.extra.weight"] = torch.zeros(2)
    rc, _ = _convert(tmp_path, {"model": sd}, config_files, name="missing")
    err = capsys.readouterr().err
    assert rc == 2 and "layers.1.feed_forward.w2.weight" in err and "layers.9.extra.weight" in err
    sd = dict(state_dict)
    sd["output.weight"] = torch.zeros(511, 192)
    rc, _ = _convert(tmp_path, {"model": sd}, config_files, name="shape")
    err = capsys.readouterr().err
    assert rc == 2 and "output.weight" in err and "shape mismatch" in err


def test_checkpoint_for_another_size(fixtures_dir, tmp_path, capsys):
    rc = main(["convert", "gpt", str(fixtures_dir / "gpt_c2i_small.pt"), "--model", "GPT-B", "--image-size", "256",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "dim 192, 3 layers" in err and "--model" in err
    rc = main(["convert", "gpt", str(fixtures_dir / "gpt_t2i_small.pt"), "--model", "GPT-B", "--image-size", "256",
               "--out", str(tmp_path / "o2")])
    assert rc == 2 and "t2i checkpoint" in capsys.readouterr().err


def test_truncated_missing_and_foreign_files(fixtures_dir, tmp_path, capsys, config_files):
    data = (fixtures_dir / "gpt_c2i_small.pt").read_bytes()
    bad = {"truncated.pt": data[: len(data) // 2], "text.pt": b"hello, not a checkpoint\n"}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="truncated|not a PyTorch checkpoint"):
            load_pt(tmp_path / name)
        rc = main(["convert", "gpt", str(tmp_path / name), "--model", str(config_files["gpt_c2i_small"]),
                   "--out", str(tmp_path / (name + "_out"))])
        assert rc == 2 and "error:" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not found"):
        load_pt(tmp_path / "nope.pt")


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/adsa_jax_pwned",))


def test_untrusted_pickle_does_not_run_code(tmp_path):
    import os
    marker = "/tmp/adsa_jax_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"model": {"w": _Evil()}}, protocol=2))
    obj = load_pt(path)  # the os.system global becomes an inert placeholder
    assert not os.path.exists(marker)
    from convert.torch_pickle import extract_state_dict
    with pytest.raises(CheckpointError, match="no tensors"):
        extract_state_dict(obj, path)


def test_image_size_and_model_arguments(fixtures_dir, tmp_path, capsys):
    rc = main(["convert", "gpt", str(fixtures_dir / "gpt_c2i_small.pt"), "--model", "GPT-XL", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--image-size is required" in capsys.readouterr().err
    rc = main(["convert", "gpt", str(fixtures_dir / "gpt_c2i_small.pt"), "--model", "GPT-Q", "--image-size", "256",
               "--out", str(tmp_path / "y")])
    assert rc == 2 and "unknown model" in capsys.readouterr().err


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="not an adsa_jax checkpoint"):
        adsa_jax.load(tmp_path)


def test_type_flag_contradicting_the_config_file(tmp_path, fixtures_dir, config_files, capsys):
    rc = main(["convert", "gpt", str(fixtures_dir / "gpt_c2i_small.pt"), "--type", "t2i", "--model",
               str(config_files["gpt_c2i_small"]), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--type t2i contradicts" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # without --type a JSON file's own model_type is used
    rc = main(["convert", "gpt", str(fixtures_dir / "gpt_t2i_small.pt"), "--model", str(config_files["gpt_t2i_small"]),
               "--out", str(tmp_path / "t2i")])
    assert rc == 0 and adsa_jax.load(tmp_path / "t2i").config.model_type == "t2i"


def test_unknown_model_name_before_image_size(fixtures_dir, tmp_path, capsys):
    rc = main(["convert", "gpt", str(fixtures_dir / "gpt_c2i_small.pt"), "--model", "GPT-Q", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown model 'GPT-Q'" in err and "--image-size" not in err.split("unknown model")[0]


def test_force_on_a_directory_adsa_jax_did_not_write(fixtures_dir, tmp_path, config_files, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep")
    for extra in ([], ["--force"]):
        rc = main(["convert", "gpt", str(fixtures_dir / "gpt_c2i_small.pt"), "--model",
                   str(config_files["gpt_c2i_small"]), "--out", str(out), *extra])
        assert rc == 2 and "error:" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "keep"
    src = out / "ck.pt"  # the source inside --out: never deleted
    src.write_bytes((fixtures_dir / "gpt_c2i_small.pt").read_bytes())
    rc = main(["convert", "gpt", str(src), "--model", str(config_files["gpt_c2i_small"]), "--out", str(out), "--force"])
    assert rc == 2 and "holds the source" in capsys.readouterr().err and src.is_file()
