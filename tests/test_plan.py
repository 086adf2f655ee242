"""adsa_jax.plan (``adsa-jax plan``): the generate program compiled ahead of time for abstract
inputs, its per-device memory, the layer extrapolation and the largest-batch search, on a tiny
config (a few compiles of a few seconds each)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from adsa_jax.cache import kv_bytes
from adsa_jax.config import GPTConfig
from adsa_jax.plan import GIB, Spec, largest_batch, memory
from xdist_once import run_once

TINY = dict(dim=64, n_layer=4, n_head=4, vocab_size=512, num_classes=10, block_size=64, multiple_of=32)


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """The largest batch under a size that admits about 6 images, every layer compiled (once for
    all xdist workers)."""
    spec = Spec(GPTConfig(**TINY), dtype="float32")

    def find():
        one, two = memory(spec, 1), memory(spec, 2)
        cap = one["total"] + 5.5 * (two["total"] - one["total"])
        found = largest_batch(spec, cap)
        return {"cap": cap, "largest": found["largest"][cap], "rows": found["rows"]}

    res = run_once(tmp_path_factory, "plan_search", find)
    return spec, res["cap"], {"largest": {res["cap"]: res["largest"]}, "rows": {int(b): r for b, r in res["rows"].items()}}


def test_memory_is_weights_caches_and_work_buffers(search):
    spec, _, found = search
    cfg = spec.config
    for b, row in found["rows"].items():
        assert row["compiled_dtype"] == "float32" and row["total"] == (row["arguments"] + row["temporaries"]
                                                                       + row["outputs"] - row["aliased"])
        # arguments: the weights plus the conditions, ids, key and sampling scalars (a few bytes each)
        assert 0 < row["arguments"] - row["weights"] < 64 + 16 * b, (b, row)
        assert row["weights"] == 4 * sum(math.prod(s) for s in _shapes(cfg))
        # the dense cache: exactly K and V of every layer and row (CFG doubles the rows), in the temporaries
        assert row["kv_cache"] == kv_bytes(spec.policy, cfg, 2 * b, jnp.float32)
        assert row["kv_cache"] <= row["temporaries"] < row["kv_cache"] + 2**20 + 2**16 * b
        assert row["outputs"] == 4 * b * cfg.num_image_tokens  # the int32 tokens


def test_largest_batch_is_the_boundary(search):
    _, cap, found = search
    b = found["largest"][cap]
    rows = found["rows"]
    assert 4 <= b <= 7 and rows[b]["total"] <= cap < rows[b + 1]["total"]
    assert len(rows) <= 6  # a line fits the totals: few compiles


def test_two_layers_extrapolate_and_bfloat16_counts_two_bytes(search):
    spec, _, found = search
    full = found["rows"][2]  # float32, every layer compiled
    ex = memory(Spec(spec.config, dtype="bfloat16"), 2, layers=2)  # compiles 1 and 2 layers of the 4
    # XLA:CPU would keep float32 copies of bfloat16 weights and caches: the float32 program is compiled ...
    assert ex["compiled_dtype"] == "float32"
    for k in ("arguments", "temporaries", "outputs"):
        assert abs(ex[k] - full[k]) <= 0.001 * full[k] + 256, (k, ex[k], full[k])
    # ... and its weights and K/V counted at 2 bytes
    assert 2 * ex["weights"] == full["weights"] and 2 * ex["kv_cache"] == full["kv_cache"]
    want = full["total"] - ex["weights"] - ex["kv_cache"]
    assert abs(ex["total"] - want) <= 0.001 * want + 256, (ex["total"], want)


def _shapes(cfg):
    import jax

    from adsa_jax.model import param_shapes

    return jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def test_cli_plans_a_2x2_mesh_on_fake_devices(tmp_path):
    """In a fresh process the command sets up the 4 CPU devices itself (no XLA_FLAGS)."""
    cfg_file, out = tmp_path / "tiny.json", tmp_path / "plan.json"
    cfg_file.write_text(json.dumps(TINY))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-c", "import sys; from adsa_jax.cli import main; sys.exit(main())", "plan", "--model", str(cfg_file), "--mesh", "2x2",
                        "--batch", "3", "--full-depth", "--dtype", "float32", "--hbm", "v5e,0.001", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 4 fake CPU devices" in r.stderr
    assert "v5e 16 GiB: fits" in r.stdout and "0.001 GiB: does not fit" in r.stdout
    row = json.loads(out.read_text())["memory"]
    cfg = GPTConfig(**TINY)
    E, F, H, D = cfg.dim, cfg.ffn_hidden, cfg.n_head, cfg.head_dim
    split = cfg.n_layer * (E * 3 * H * D + H * D * E + 3 * E * F)  # wqkv, wo, w1, w3, w2: halved on the model axis
    whole = sum(math.prod(s) for s in _shapes(cfg))
    assert row["weights"] == 4 * (whole - split // 2)
    # 3 images per device: 12 in all, 6 per data shard, 2 of the 4 heads per device
    assert row["kv_cache"] == kv_bytes(Spec(cfg).policy, cfg, 2 * 6, jnp.float32) // 2
    assert row["outputs"] == 4 * 6 * cfg.num_image_tokens and row["total"] < 0.01 * GIB


def test_cli_errors_name_the_flag(tmp_path, capsys):
    from adsa_jax.cli import main

    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(TINY))
    for argv, msg in ((["--mesh", "4by2", "--batch", "1"], "--mesh must be DATAxMODEL"),
                      (["--mesh", "1x1", "--hbm", "v9", "--batch", "1"], "--hbm takes GiB numbers or names"),
                      (["--mesh", "1x1", "--hbm", "v5e,32,16", "--batch", "1"],
                       "--hbm lists 16 GiB more than once ('16'): give each size once"),
                      (["--mesh", "1x1"], "give --batch N"),
                      (["--mesh", "1x3", "--batch", "1"], "a model axis of 3 must divide the 4 heads")):
        assert main(["plan", "--model", str(cfg_file), *argv]) == 2
        assert msg in capsys.readouterr().err, argv


def test_plan_table_md_is_written_from_its_json():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("plan_table", root / "plan_table.py")
    pt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pt)
    res = json.loads((root / "results" / "plan_table.json").read_text())
    assert (root / "plan_table.md").read_text() == pt.markdown(res), \
        "benchmarks/plan_table.md is stale: python benchmarks/plan_table.py --json benchmarks/results/plan_table.json " \
        "--markdown benchmarks/plan_table.md"
    # BENCHMARKS.md points to it
    assert "(benchmarks/plan_table.md)" in (root.parent / "BENCHMARKS.md").read_text()
    cells = [c for c in res["cells"].values() if "error" not in c]
    assert len(cells) == 3 * 2 * 3 * 4 - 6  # GPT-XL's 20 heads do not split 8 ways: 1 x 8 is n/a for it
    for c in cells:  # more memory, a larger batch
        b = [c["largest"][f"{h:g}"] for h in pt.HBM]
        assert b == sorted(b) and b[0] >= 1
