"""Untrusted files, interrupted runs, bad arguments: each bad input that was tried, and what it gets.

Crafted ``.pt`` files (each once crashed, leaked memory or hung the old reader), checkpoints
with NaN weights, converted directories with flipped bytes or edited configs, ``--force`` on
directories adsa_jax did not write, resumed runs with other weights, corrupt / foreign / wrong
parts, a run killed with SIGKILL, and out-of-range sampling arguments.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

import adsa_jax
from adsa_jax.config import ConfigError

HERE = Path(__file__).resolve()

# ----------------------------------------------------------------------------- crafted .pt files


def _crafted(path: Path, obj, storages: dict, *, pickle_bytes: bytes | None = None, compress=(), byteorder="little"):
    """A torch.save-layout zip whose data.pkl is ``obj`` pickled with torch's record layout
    (tensors as ``Record`` objects), or the given raw pickle bytes."""
    class _P(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, Storage):
                return ("storage", o.stype, o.key, "cpu", o.numel)
            return None

    if pickle_bytes is None:
        buf = io.BytesIO()
        _P(buf, protocol=2).dump(obj)
        pickle_bytes = buf.getvalue()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", byteorder)
        for key, a in storages.items():
            z.writestr(f"archive/data/{key}", np.ascontiguousarray(a).tobytes(),
                       compress_type=zipfile.ZIP_LZMA if key in compress else zipfile.ZIP_STORED)


class Storage:
    def __init__(self, key, numel):
        import torch
        self.key, self.numel, self.stype = key, numel, torch.FloatStorage


class Record:
    """A tensor record as torch pickles it: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def __reduce__(self):
        import torch._utils
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


def _bomb(levels: int) -> bytes:
    """{'model': {t: 1}} with t = ((...), (...)) nested ``levels`` deep through DUP: a few hundred
    bytes that :mod:`pickle` turns into a key whose hash (or str) visits 2**levels tuples."""
    b = bytearray(b"\x80\x02}q\x00X\x05\x00\x00\x00modelq\x01}q\x02)")
    b += b"2\x86" * levels
    return bytes(b + b"K\x01ss.")


def _crafted_files(d: Path) -> dict[str, str]:
    """name -> what it did to the reader before it validated records and had limits."""
    four = {"0": np.arange(4, dtype=np.float32)}
    st = Storage("0", 4)
    cases = {
        "negative_stride_segfault": (Record(st, 0, (4,), (-(1 << 40),)), "SIGSEGV"),
        "negative_stride_reads_memory": (Record(st, 3, (1_000_000,), (-100,)), "read 4 MB before the storage"),
        "negative_offset_reads_memory": (Record(st, -4, (4,), (2,)), "read past the storage"),
        "stride_past_storage": (Record(st, 0, (4,), (1000,)), "error only when read"),
        "zero_stride_expansion": (Record(st, 0, (1 << 20, 1 << 20), (0, 0)), "allocation of 4 TiB"),
        "offset_past_storage": (Record(st, 10, (0,), (1,)), "accepted"),
        "non_integer_size": (Record(st, 0, (2.5,), (1,)), "TypeError"),
    }
    out = {}
    for name, (rec, before) in cases.items():
        _crafted(d / f"{name}.pt", {"model": {"w": rec}}, four)
        out[name] = before
    _crafted(d / "storage_size_lie.pt", {"model": {"w": Record(Storage("0", 1 << 30), 0, (4,), (1,))}}, four)
    out["storage_size_lie"] = "accepted (size taken from the pickle)"
    _crafted(d / "nested_tuple_bomb.pt", None, {}, pickle_bytes=_bomb(120))
    out["nested_tuple_bomb"] = "hang (hashing 2**120 tuples)"
    deep = b"\x80\x02}X\x05\x00\x00\x00model)" + b"\x85" * 200_000 + b"s."
    _crafted(d / "deep_nesting.pt", None, {}, pickle_bytes=deep)
    out["deep_nesting"] = "RecursionError or a C stack overflow on use"
    cycle = b"\x80\x02}X\x05\x00\x00\x00model]q\x00h\x00as."  # a list that contains itself
    _crafted(d / "reference_cycle.pt", None, {}, pickle_bytes=cycle)
    out["reference_cycle"] = "accepted"
    _crafted(d / "lzma_storage.pt", {"model": {"w": Record(st, 0, (4,), (1,))}}, four, compress={"0"})
    out["lzma_storage"] = "decompressed whatever size it claims"
    _crafted(d / "big_endian.pt", {"model": {"w": Record(st, 0, (4,), (1,))}}, four, byteorder="big")
    out["big_endian"] = "byte-swapped weights"
    with zipfile.ZipFile(d / "duplicate_entry.pt", "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z.writestr("archive/data.pkl", pickle.dumps({"model": {}}))
        z.writestr("archive/data.pkl", pickle.dumps({"model": {}}))
    out["duplicate_entry"] = "one of the two read silently"
    return out


def _reader_child(directory: str, report: str):
    """Load every crafted file; a crash kills only this process (the test names the file)."""
    from convert.torch_pickle import load_pt
    from convert.torch_pickle import LazyTensor

    results = {}
    progress = Path(report + ".progress")
    for path in sorted(Path(directory).glob("*.pt")):
        progress.write_text(path.stem)
        t0 = time.perf_counter()
        try:
            obj = load_pt(path)
            for t in (obj.get("model", {}) or {}).values():
                if isinstance(t, LazyTensor):
                    t.numpy()
            outcome = "loaded"
        except ConfigError as e:
            outcome = f"refused: {e}"
        except Exception as e:  # noqa: BLE001
            outcome = f"{type(e).__name__}: {e}"
        results[path.stem] = {"outcome": outcome, "seconds": time.perf_counter() - t0}
    Path(report).write_text(json.dumps(results))


def test_crafted_checkpoints_are_refused_fast_without_crash(tmp_path):
    crafted = _crafted_files(tmp_path)
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(HERE), "reader", str(tmp_path), str(report)], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    progress = Path(str(report) + ".progress")
    assert r.returncode == 0, (f"the reader died (rc {r.returncode}) on "
                               f"{progress.read_text() if progress.is_file() else '?'}:\n{r.stderr[-2000:]}")
    results = json.loads(report.read_text())
    assert set(results) == set(crafted)
    for name, res in results.items():
        assert res["outcome"].startswith("refused: "), (name, crafted[name], res)
        msg = res["outcome"][len("refused: "):]
        assert f"{name}.pt" in msg and "\n" not in msg, (name, msg)
        assert res["seconds"] < 1.0, (name, res)


def test_reader_limits(tmp_path):
    """Each limit of the pickle interpreter, with small limits so that the floods stay small."""
    from convert.torch_pickle import Limits, load_pt

    floods = {
        "stack": (b"\x80\x02" + b"]" * 5000 + b".", Limits(stack=1000), "stack exceeds 1000"),
        "memo": (b"\x80\x02]" + b"".join(b"r" + i.to_bytes(4, "little") for i in range(3000)) + b".",
                 Limits(memo=1000), "memo exceeds 1000"),
        "opcodes": (b"\x80\x02" + b"N0" * 5000 + b"N.", Limits(opcodes=1000), "more than 1000 pickle opcodes"),
        "pickle_bytes": (b"\x80\x02N" + b"N0" * 3000 + b".", Limits(pickle_bytes=4096), "limit of 4096"),
        "depth": (b"\x80\x02N" + b"\x85" * 200 + b".", Limits(depth=100), "nested more than 100 deep"),
    }
    for name, (pkl, limits, match) in floods.items():
        _crafted(tmp_path / f"{name}.pt", None, {}, pickle_bytes=pkl)
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=match):
            load_pt(tmp_path / f"{name}.pt", limits=limits)
        assert time.perf_counter() - t0 < 1.0, name


def test_reader_accepts_what_torch_writes(tmp_path, fixtures_dir):
    """Views (offsets, strides, shared storages), every dtype torch stores, pickle protocols 2-5,
    Parameters and training-checkpoint objects: the same values as torch.load."""
    import torch

    from convert.torch_pickle import Opaque, load_pt

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"view_t": base.t(), "view_slice": base[1:, 2:5], "view_row": base[2], "scalar": torch.tensor(3.5),
          "param": torch.nn.Parameter(torch.ones(3)), "empty": torch.zeros(0, 5),
          **{str(dt): torch.arange(6).to(dt) for dt in (torch.float16, torch.bfloat16, torch.int64, torch.int32,
                                                         torch.int8, torch.uint8, torch.bool, torch.float64)}}
    import argparse
    for proto in (2, 4, 5):
        path = tmp_path / f"p{proto}.pt"
        torch.save({"model": sd, "args": argparse.Namespace(lr=1e-4), "steps": 7, "hist": [1.5, (2, "x")]}, path,
                   pickle_protocol=proto)
        got = load_pt(path)
        assert isinstance(got["args"], Opaque) and got["steps"] == 7 and got["hist"] == [1.5, (2, "x")]
        for k, t in sd.items():
            a = got["model"][k].numpy()
            want = t.detach()
            if want.dtype == torch.bfloat16:
                np.testing.assert_array_equal(a.astype(np.float32), want.float().numpy(), err_msg=k)
            else:
                np.testing.assert_array_equal(a, want.numpy(), err_msg=k)


# ----------------------------------------------------------------------------- NaN weights


def test_non_finite_weights_refused_at_conversion(tmp_path, fixtures_dir, config_files, capsys):
    import torch

    from adsa_jax.cli import main

    sd = torch.load(fixtures_dir / "gpt_c2i_small.pt", weights_only=True)["model"]
    for bad in (float("nan"), float("inf")):
        sd2 = dict(sd)
        w = sd2["layers.1.feed_forward.w2.weight"].clone()
        w[3, 7] = bad
        sd2["layers.1.feed_forward.w2.weight"] = w
        torch.save({"model": sd2}, tmp_path / "nan.pt")
        rc = main(["convert", "gpt", str(tmp_path / "nan.pt"), "--model", str(config_files["gpt_c2i_small"]),
                   "--out", str(tmp_path / f"out{bad}")])
        err = capsys.readouterr().err
        assert rc == 2 and "layers.1.feed_forward.w2.weight" in err and "NaN or infinite" in err, err
        assert not (tmp_path / f"out{bad}").exists()


def test_non_finite_weights_refused_at_load(tmp_path, c2i_dir):
    import jax
    import orbax.checkpoint as ocp

    from adsa_jax.checkpoint import CONFIG_FILE, save_tree

    m = adsa_jax.load(c2i_dir, dtype=None)
    params = jax.tree.map(np.array, m.params)
    params["layers"][2]["w3"][0, 0] = np.nan
    with pytest.raises(ConfigError, match="layers/2/w3 holds 1 NaN"):  # nothing writes it
        save_tree(tmp_path / "x", params, {"kind": "gpt", "config": m.config.to_dict(), "dtype": "float32"})
    # as an older converter (no checksums) would have written it
    d = tmp_path / "old"
    d.mkdir()
    with ocp.StandardCheckpointer() as c:
        c.save(d / "params", params)
    meta = json.loads((c2i_dir / CONFIG_FILE).read_text())
    del meta["checksums"]
    (d / CONFIG_FILE).write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="weight layers/2/w3 holds NaN"):
            adsa_jax.load(d)


# ----------------------------------------------------------------------------- converted checkpoints


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_flipped_bytes_in_a_converted_checkpoint(tmp_path, c2i_dir):
    d = _copy(c2i_dir, tmp_path / "c")
    big = max((f for f in (d / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0x20
    big.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="does not match its checksum|cannot read the weights"):
        adsa_jax.load(d)


@pytest.mark.parametrize("field,value", [("n_head", 6), ("n_kv_head", 3), ("vocab_size", 256), ("block_size", 16),
                                         ("rope_base", 100.0)])
def test_edited_config_refused(tmp_path, c2i_dir, field, value):
    from adsa_jax.checkpoint import CONFIG_FILE

    d = _copy(c2i_dir, tmp_path / "c")
    meta = json.loads((d / CONFIG_FILE).read_text())
    meta["config"][field] = value
    (d / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=f"config.{field} differs"):
        adsa_jax.load(d)


@pytest.mark.parametrize("field,value,msg", [
    ("n_head", 0, "n_head must be an integer >= 1, got 0"), ("dim", "1280", "dim must be an integer >= 1"),
    ("block_size", 0, "block_size must be an integer >= 1"), ("n_layer", 2.5, "n_layer must be an integer"),
    ("vocab_size", True, "vocab_size must be an integer"), ("norm_eps", 0, "norm_eps must be a finite number > 0"),
    ("rope_base", float("inf"), "rope_base must be a finite number > 0"),
    ("ffn_dim_multiplier", -1.0, "ffn_dim_multiplier must be a finite number > 0"),
    ("class_dropout_prob", 1.5, "class_dropout_prob must be in [0, 1]")])
def test_model_config_fields_are_checked(tmp_path, capsys, field, value, msg):
    """A JSON model config is untrusted: a field of the wrong type or range is named, in the API and
    the CLI, before anything is built (n_head = 0 divided by zero)."""
    from adsa_jax.cli import main

    good = dict(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=5, block_size=16)
    with pytest.raises(ConfigError, match=f"model config field {msg}".replace("[", "\\[").replace("(", "\\(")):
        adsa_jax.GPTConfig.from_dict({**good, field: value})
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({**good, field: value}))
    assert main(["bench", "--model", str(path), "--no-roofline"]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err


def test_checkpoint_without_checksums(tmp_path, c2i_dir):
    """Written before checksums: loads with a warning; an n_head edit (weights of the same
    sizes, which Orbax would reshape) is caught by the stored shapes."""
    from adsa_jax.checkpoint import CONFIG_FILE

    d = _copy(c2i_dir, tmp_path / "c")
    meta = json.loads((d / CONFIG_FILE).read_text())
    del meta["checksums"]
    (d / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no checksums"):
        m = adsa_jax.load(d, dtype=None)
    np.testing.assert_array_equal(np.asarray(m.params["output"]),
                                  np.asarray(adsa_jax.load(c2i_dir, dtype=None).params["output"]))
    meta["config"]["n_head"] = 6  # dim 192: head_dim 64 -> 32, same number of values per weight
    (d / CONFIG_FILE).write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match=r"layers/0/wo is \(3, 64, 192\) in the stored weights, the config "
                                              r"needs \(6, 32, 192\)"):
            adsa_jax.load(d)


def test_unreadable_config_file_is_named(tmp_path, c2i_dir):
    from adsa_jax.checkpoint import CONFIG_FILE

    d = _copy(c2i_dir, tmp_path / "c")
    for text in ('{"kind": "gpt", ', "\xff\xfe", "[1, 2]"):
        (d / CONFIG_FILE).write_text(text, encoding="latin-1")
        with pytest.raises(ConfigError, match=str(d / CONFIG_FILE)):
            adsa_jax.load(d)


def test_bundled_demo_checkpoint_has_checksums_and_loads_quietly():
    from adsa_jax import demo
    from adsa_jax.checkpoint import CONFIG_FILE, MARKER

    meta = json.loads((demo.DEMO_DIR / CONFIG_FILE).read_text())
    assert len(meta["checksums"]["arrays"]) == 46 and (demo.DEMO_DIR / MARKER).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        demo.load_demo_model(demo.DEMO_DIR, dtype="float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int32", "int8", "bool"])
def test_device_checksum_equals_host_checksum(dtype):
    """Load verifies on the device what conversion computed on the host."""
    import jax
    import jax.numpy as jnp

    from adsa_jax.checkpoint import array_checksum, tree_stats

    x = np.random.default_rng(0).normal(size=(37, 5, 3)) * 100
    a = np.asarray(jnp.asarray(x).astype(dtype))
    assert tree_stats({"a": jnp.asarray(a)})["a"][0] == array_checksum(a)
    b = a.copy().reshape(-1)
    b[17] = ~b[17] if dtype == "bool" else b[17] + 1  # one element changed
    assert array_checksum(b.reshape(a.shape)) != array_checksum(a)
    assert jax.device_count() >= 1


# ----------------------------------------------------------------------------- --force, --type, --model


def test_force_replaces_only_what_adsa_jax_wrote(tmp_path, fixtures_dir, config_files, c2i_dir):
    from convert.gpt import convert_gpt, resolve_config

    cfg = resolve_config(str(config_files["gpt_c2i_small"]), image_size=None)
    src = tmp_path / "src" / "ck.pt"
    src.parent.mkdir()
    shutil.copy(fixtures_dir / "gpt_c2i_small.pt", src)
    # a directory of the user's: never deleted, --force or not
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(ConfigError, match="--force replaces only|not empty"):
            convert_gpt(src, cfg, mine, overwrite=force)
    assert (mine / "notes.txt").read_text() == "keep me"
    # the directory holding the source
    with pytest.raises(ConfigError, match="holds the source"):
        convert_gpt(src, cfg, src.parent, overwrite=True)
    assert src.read_bytes() == (fixtures_dir / "gpt_c2i_small.pt").read_bytes()
    # a converted directory with a file of the user's added
    ours = _copy(c2i_dir, tmp_path / "ours")
    (ours / "results.csv").write_text("1,2")
    with pytest.raises(ConfigError, match="did not write.*results.csv"):
        convert_gpt(src, cfg, ours, overwrite=True)
    assert (ours / "results.csv").is_file()
    (ours / "results.csv").unlink()
    # a directory adsa_jax wrote: replaced with --force only
    with pytest.raises(ConfigError, match="not empty"):
        convert_gpt(src, cfg, ours, overwrite=False)
    convert_gpt(src, cfg, ours, overwrite=True)
    assert sorted(p.name for p in ours.iterdir()) == ["adsa_config.json", "adsa_jax_marker.txt", "params"]
    adsa_jax.load(ours)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left
    # a file where the directory should go
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        convert_gpt(src, cfg, tmp_path / "afile", overwrite=True)


def test_type_and_model_arguments(tmp_path, config_files):
    from convert.gpt import resolve_config

    with pytest.raises(ConfigError, match="--type t2i contradicts"):
        resolve_config(str(config_files["gpt_c2i_small"]), image_size=None, model_type="t2i")
    assert resolve_config(str(config_files["gpt_t2i_small"]), image_size=None).model_type == "t2i"
    assert resolve_config(str(config_files["gpt_c2i_small"]), image_size=None, model_type="c2i").model_type == "c2i"
    # an unknown name is reported as such, before the missing image size
    with pytest.raises(ConfigError, match="unknown model 'GPT-Q'"):
        resolve_config("GPT-Q", image_size=None)
    with pytest.raises(ConfigError, match="--image-size is required"):
        resolve_config("GPT-B", image_size=None)
    assert resolve_config("gpt-b", image_size=256, model_type="t2i").model_type == "t2i"


# ----------------------------------------------------------------------------- arguments at the door


@pytest.mark.parametrize("kw,flag", [
    (dict(cfg_scale=float("inf")), "--cfg-scale"), (dict(cfg_scale=float("nan")), "--cfg-scale"),
    (dict(cfg_scale=-1.0), "--cfg-scale"), (dict(temperature=float("inf")), "--temperature"),
    (dict(temperature=-0.5), "--temperature"), (dict(top_k=-1), "--top-k"), (dict(top_k=2.5), "--top-k"),
    (dict(top_k=2**40), "--top-k"), (dict(top_p=0.0), "--top-p"), (dict(top_p=float("nan")), "--top-p"),
    (dict(top_p=1.5), "--top-p"), (dict(cfg_interval=-3), "--cfg-interval"),
    (dict(cfg_interval=float("inf")), "--cfg-interval"),
])
def test_sampling_arguments_refused_before_compiling(kw, flag):
    """One ConfigError line naming the flag, from the Python API, before anything compiles."""
    from adsa_jax.sampling import check_sampling_args

    args = dict(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0, cfg_interval=-1)
    args.update(kw)
    with pytest.raises(ConfigError, match=flag) as e:
        check_sampling_args(**args)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=flag):  # the API's SamplingConfig, built before generate runs
        adsa_jax.SamplingConfig(**args)


def test_counts_seeds_classes_and_sizes():
    from adsa_jax.checks import check_class_ids, check_count, check_policy_sizes, check_seed

    for v in (0, -3, 2.5, True, 2**40):
        with pytest.raises(ConfigError, match=r"num_samples \(--num-samples\) must be an integer in \[1, "):
            check_count(v, "num_samples")
    assert check_count(np.int64(5), "batch_size") == 5
    for s in (-1, 2**32, 2**63, 2**100, 1.5):
        with pytest.raises(ConfigError, match=r"seed \(--seed\) must be an integer in \[0, 2\*\*32 - 1\]"):
            check_seed(s)
    assert check_seed(2**32 - 1) == 2**32 - 1
    with pytest.raises(ConfigError, match=r"--classes\) must be in \[0, 9\].*\[10, 12\]"):
        check_class_ids([1, 10, 12], 10)
    with pytest.raises(ConfigError, match="--budget"):
        check_policy_sizes(budget=float("inf"))
    with pytest.raises(ConfigError, match="--local"):
        check_policy_sizes(prefix=1, keep=2, local=0)


def test_output_paths_checked(tmp_path):
    from adsa_jax.checks import check_output_dir, check_output_file

    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="it is a directory"):
        check_output_file(tmp_path)
    with pytest.raises(ConfigError, match="is not a directory"):
        check_output_file(tmp_path / "f" / "tokens.npy")
    with pytest.raises(ConfigError, match="does not exist"):
        check_output_file(tmp_path / "missing" / "tokens.npy")
    check_output_file(tmp_path / "missing" / "tokens.npy", create_dirs=True)
    with pytest.raises(ConfigError, match="is a file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_output_dir(tmp_path / "f" / "pngs")
    check_output_dir(tmp_path / "new" / "pngs")


def test_sample_args_checked_by_keyword(tmp_path):
    """The command's checks as a library call: keywords, no argparse object; None is "not given"."""
    from adsa_jax.checks import check_sample_args

    check_sample_args()
    check_sample_args(num_samples=8, batch_size=4, temperature=None, top_k=None, npz=tmp_path / "new" / "r.npz")
    for kw, flag in ((dict(num_segments=0), "--segments"), (dict(tensor_parallel=0), "--tensor-parallel"),
                     (dict(top_k=-1), "--top-k"), (dict(keep=-1), "--keep"), (dict(seed=None, budget=2.0), "--budget"),
                     (dict(out_dir=tmp_path / "f"), "--out-dir"), (dict(npz=tmp_path), "--npz")):
        (tmp_path / "f").write_text("x")
        with pytest.raises(ConfigError, match=flag):
            check_sample_args(**kw)


# ----------------------------------------------------------------------------- resumable runs

LABELS = np.arange(6) % 10
RUN = dict(batch_size=2, sampling=adsa_jax.SamplingConfig(top_k=50))


def _run(model, out, seed=3, **kw):
    import jax

    from adsa_jax.runs import sample_to_npz

    logs = []
    path = sample_to_npz(model, LABELS, jax.random.key(seed), out, labels=LABELS, log=logs.append,
                         **dict(RUN, **kw))
    return path, logs


@pytest.fixture(scope="module")
def reference(c2i, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    path, _ = _run(c2i, out)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _same_as(reference, path):
    with np.load(path) as z:
        assert z.files == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(z["arr_0"], reference["arr_0"])
        np.testing.assert_array_equal(z["arr_1"], reference["arr_1"])


def test_resume_with_other_weights_or_devices_is_refused(c2i, tmp_path):
    import jax

    from adsa_jax.sharding import make_mesh

    out = tmp_path / "r.npz"
    assert _run(c2i, out, max_batches=1)[0] is None
    other = adsa_jax.Model(c2i.config, jax.tree.map(lambda x: x * 1.001, c2i.params))  # same architecture
    with pytest.raises(ConfigError, match="weights"):
        _run(other, out)
    with pytest.raises(ConfigError, match="devices"):
        _run(c2i, out, mesh=make_mesh(data=1))
    with pytest.raises(ConfigError, match="generate"):
        _run(c2i, out, sampling=adsa_jax.SamplingConfig(top_k=51))
    with pytest.raises(ConfigError, match="key"):
        _run(c2i, out, seed=4)


def test_bad_parts_are_named_refused_by_merge_and_resampled(c2i, reference, tmp_path):
    from adsa_jax.runs import MissingParts, merge, parts_dir, read_manifest, run_id, write_part

    out = tmp_path / "r.npz"
    _run(c2i, out)
    work = parts_dir(out)
    part = work / "part-00001.npz"
    good = part.read_bytes()
    # another run's part (another seed), a flipped byte, ids of another batch (valid checksum)
    other_out = tmp_path / "o.npz"
    _run(c2i, other_out, seed=9)
    foreign = (parts_dir(other_out) / "part-00001.npz").read_bytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x01
    settings = read_manifest(work)
    with np.load(part) as z:
        tokens, labels = z["tokens"], z["labels"]
    wrong = tmp_path / "wrong.npz"
    write_part(wrong, run_id(settings), ids=np.array([4, 5]), tokens=tokens, labels=labels)
    cases = {"foreign": (foreign, "another run"), "flipped": (bytes(flipped), "cannot be read|checksum"),
             "wrong ids": (wrong.read_bytes(), "image ids are not those of batch 1")}
    for name, (data, why) in cases.items():
        part.write_bytes(data)
        out.unlink()
        with pytest.raises(ConfigError, match=f"part-00001.npz: .*({why})"):
            merge(out)
        assert not out.exists()
        path, logs = _run(c2i, out)  # the resume names it and samples batch 1 again
        assert any("part-00001.npz" in m and "sampling that batch again" in m for m in logs), (name, logs)
        _same_as(reference, path)
    (work / "part-00002.npz").unlink()
    out.unlink()
    with pytest.raises(MissingParts, match="2 of 6 images are missing"):
        merge(out)


def test_states_a_kill_leaves_resume_to_the_same_output(c2i, reference, tmp_path):
    """What SIGKILL leaves at each point, and the resume from it: before any part (run.json
    only, or its temporary file), while a part is written (its temporary file), after the
    last part before the merge, while the merge writes."""
    from adsa_jax.runs import parts_dir

    out = tmp_path / "r.npz"
    _run(c2i, out)
    work = parts_dir(out)
    full = {p.name: p.read_bytes() for p in work.iterdir()}
    states = {
        "before any part": lambda: [p.unlink() for p in work.glob("part-*")],
        "while writing run.json": lambda: (shutil.rmtree(work), work.mkdir(),
                                           (work / "run.json.tmp123").write_text('{"num_sa')),
        "while writing a part": lambda: ((work / "part-00002.npz").unlink(),
                                         (work / "part-00002.npz.tmp4321").write_bytes(full["part-00002.npz"][:900])),
        "before the merge": lambda: None,
        "while the merge writes": lambda: out.with_name(out.name + ".tmp999").write_bytes(b"PK\x03\x04partial"),
    }
    for name, make in states.items():
        shutil.rmtree(work)
        work.mkdir()
        for n, data in full.items():
            (work / n).write_bytes(data)
        out.unlink(missing_ok=True)
        make()
        kept = {p.name: p.stat().st_mtime_ns for p in work.glob("part-*.npz")}
        path, _ = _run(c2i, out)
        _same_as(reference, path)
        assert all((work / n).stat().st_mtime_ns == t for n, t in kept.items()), name  # not sampled again
        assert not list(work.glob("*.tmp*")), name


def _killed_child(ckpt: str, out: str):
    """Sample, and SIGKILL this process right after the second part is renamed into place."""
    import jax

    from adsa_jax.runs import sample_to_npz

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
        if "batch 2/3" in msg:
            os.kill(os.getpid(), signal.SIGKILL)

    model = adsa_jax.load(ckpt, dtype="float32")
    sample_to_npz(model, LABELS, jax.random.key(3), out, labels=LABELS, log=log, **RUN)


def test_run_killed_with_sigkill_resumes_to_the_same_output(c2i, c2i_dir, reference, tmp_path):
    from adsa_jax.runs import parts_dir

    out = tmp_path / "k.npz"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, str(HERE), "killed", str(c2i_dir), str(out)], capture_output=True, text=True,
                       timeout=600, env=dict(env, JAX_PLATFORMS="cpu"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    work = parts_dir(out)
    assert sorted(p.name for p in work.glob("part-*")) == ["part-00000.npz", "part-00001.npz"] and not out.exists()
    kept = {p.name: p.stat().st_mtime_ns for p in work.glob("part-*")}
    path, logs = _run(c2i, out)
    assert any("4 images already there, 1 batches to go" in m for m in logs), logs
    assert all((work / n).stat().st_mtime_ns == t for n, t in kept.items())
    _same_as(reference, path)



# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("args,flag", [
    (["--num-samples", "0"], "--num-samples"), (["--num-samples", "-5"], "--num-samples"),
    (["--batch-size", "0"], "--batch-size"), (["--seed", str(2**64)], "--seed"), (["--seed", "-1"], "--seed"),
    (["--cfg-scale", "inf"], "--cfg-scale"), (["--temperature", "inf"], "--temperature"),
    (["--top-p", "nan"], "--top-p"), (["--top-k", "-1"], "--top-k"), (["--max-batches", "0"], "--max-batches"),
    (["--tokens-out", "/nonexistent_dir/t.npy"], "--tokens-out"), (["--out-dir", str(HERE)], "--out-dir"),
    (["--out", "/nonexistent_dir/grid.png"], "--out"),
])
def test_sample_flags_refused_before_the_checkpoint_is_read(tmp_path, capsys, args, flag):
    """The checkpoint does not exist: the flag's error comes first (before any load or compile),
    for the demo model too."""
    from adsa_jax.cli import main

    for gpt in (["--gpt", str(tmp_path / "no_such_checkpoint")], []):
        t0 = time.perf_counter()
        assert main(["sample", *gpt, *args]) == 2
        err = capsys.readouterr().err
        assert flag in err and "no_such_checkpoint" not in err and err.count("\n") == 1, err
        assert time.perf_counter() - t0 < 5


def test_merge_of_an_incomplete_run_exits_non_zero(c2i, tmp_path, capsys):
    from adsa_jax.cli import main

    out = tmp_path / "r.npz"
    assert _run(c2i, out, max_batches=2)[0] is None
    for _ in range(2):  # the same answer each time, never a loop
        assert main(["merge", str(out)]) == 2
        assert "2 of 6 images are missing" in capsys.readouterr().err and not out.exists()
    _run(c2i, out)
    assert out.is_file()
    out.unlink()
    assert main(["merge", str(out)]) == 0 and out.is_file()


if __name__ == "__main__":
    if sys.argv[1] == "reader":
        _reader_child(*sys.argv[2:4])
    elif sys.argv[1] == "killed":
        _killed_child(*sys.argv[2:4])
