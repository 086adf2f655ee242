"""The benchmark harness (adsa_jax.bench) and ``adsa-jax bench``, on the fixture models."""
import importlib.util
import json
import math
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adsa_jax
from adsa_jax import bench
from adsa_jax.cli import main
from adsa_jax.config import ConfigError
from adsa_jax.cache import kv_bytes, make_policy
from adsa_jax.options import KernelConfig

from conftest import fixture_config

# Made-up device rates: the roofline is arithmetic on them.
DEVICE = {"bandwidth": 1e11, "matmul_flops": 1e12, "device": "test"}
XLA = KernelConfig(attention="xla")  # the reference attention: every device measures the same thing


def benchmark_script(name: str):
    """benchmarks/NAME.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixture_cfg():
    return adsa_jax.GPTConfig.from_dict(fixture_config("gpt_c2i_small"))


# ----------------------------------------------------------------------------- roofline


@pytest.mark.parametrize("dtype,isz", [("bfloat16", 2), ("float32", 4)])
def test_roofline_dense_closed_form(dtype, isz):
    cfg = fixture_cfg()
    # The fixture's sizes, written out: E=192, 3 layers of 3 heads of 64, vocab 512, 8x8 grid,
    # one class token; LlamaGen's FFN hidden: 2 * 4 * 192 / 3 = 512, already a multiple of 256.
    E, L, H, D, V, F, N, c = 192, 3, 3, 64, 512, 512, 64, 1
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.vocab_size, cfg.ffn_hidden,
            cfg.num_image_tokens, cfg.cls_token_num) == (E, L, H, D, V, F, N, c)
    batch, rows = 3, 6  # CFG: two rows per image
    weights = (L * (3 * E * E + E * E + 3 * E * F) + E * V) * isz  # read once per step (N steps)
    attended = (N - 1) * c + (N - 1) * N // 2  # sum over decode steps t = 0..N-2 of (c + t + 1)
    kv = rows * 2 * L * H * D * isz * attended
    rf = bench.roofline(cfg, make_policy(cfg, "dense"), rows, batch, dtype, DEVICE)
    assert rf["bytes_per_call"] == N * weights + kv
    flops = N * 2 * rows * (L * (4 * E * E + 3 * E * F) + E * V) + 4 * rows * E * attended * L
    assert rf["flops_per_call"] == pytest.approx(flops, rel=1e-12)
    assert rf["floor_mem_s"] == pytest.approx((N * weights + kv) / DEVICE["bandwidth"], rel=1e-12)
    assert rf["floor_flop_s"] == pytest.approx(flops / DEVICE["matmul_flops"], rel=1e-12)
    assert rf["floor_s"] == max(rf["floor_mem_s"], rf["floor_flop_s"])

    fast = bench.roofline(cfg, make_policy(cfg, "dense"), rows, batch, dtype, dict(DEVICE, bandwidth=2e11))
    assert fast["floor_mem_s"] == pytest.approx(rf["floor_mem_s"] / 2, rel=1e-12)
    assert fast["floor_flop_s"] == rf["floor_flop_s"] and fast["bytes_per_call"] == rf["bytes_per_call"]


@pytest.mark.parametrize("rows", [6, 64])
def test_roofline_kernel_floor_adds_the_gemms_and_the_attention(rows):
    """The kernel floor takes the larger of bytes and FLOPs for the weight GEMMs (each step) and the
    attention on their own. DEVICE's ridge is 10 FLOPs a byte; a bf16 weight GEMM does about `rows`
    FLOPs a byte, the attention about 1. At 6 rows both are bound by bandwidth and the kernel floor
    is the bytes' floor; at 64 the GEMMs are bound by the matmul rate and it exceeds both sums."""
    cfg = fixture_cfg()
    E, L, H, D, V, F, N, c = 192, 3, 3, 64, 512, 512, 64, 1
    params = L * (4 * E * E + 3 * E * F) + E * V
    attended = (N - 1) * c + (N - 1) * N // 2
    bw, mm = DEVICE["bandwidth"], DEVICE["matmul_flops"]
    rf = bench.roofline(cfg, make_policy(cfg, "dense"), rows, rows // 2, "bfloat16", DEVICE)
    gemms = max(params * 2 / bw, 2 * rows * params / mm)
    attention = max(rows * 2 * L * H * D * 2 * attended / bw, 4 * rows * E * attended * L / mm)
    assert rf["floor_kernel_s"] == pytest.approx(N * gemms + attention, rel=1e-12)
    if rows == 6:
        assert rf["floor_kernel_s"] == pytest.approx(rf["floor_mem_s"], rel=1e-12)
        assert rf["floor_s"] == rf["floor_mem_s"]
    else:
        assert rf["floor_kernel_s"] > 1.05 * max(rf["floor_mem_s"], rf["floor_flop_s"])


def test_roofline_window_reads_fewer_kv_bytes():
    cfg = fixture_cfg()
    rows, N, c = 2, 64, 1
    dense = bench.roofline(cfg, make_policy(cfg, "dense"), rows, 1, "bfloat16", DEVICE)
    window = bench.roofline(cfg, make_policy(cfg, "window", budget=0.5), rows, 1, "bfloat16", DEVICE)
    assert window["bytes_per_call"] < dense["bytes_per_call"]
    assert window["flops_per_call"] < dense["flops_per_call"]
    # Budget 0.5 keeps W = 32 image tokens: step t reads c + min(t + 1, W) slots.
    W = 32
    attended_dense = (N - 1) * c + (N - 1) * N // 2
    attended_window = (N - 1) * c + W * (W + 1) // 2 + (N - 1 - W) * W
    kv_entry = 2 * cfg.n_layer * cfg.n_head * cfg.head_dim * 2  # bf16
    assert dense["bytes_per_call"] - window["bytes_per_call"] == rows * kv_entry * (attended_dense - attended_window)


# ----------------------------------------------------------------------------- timing


@pytest.fixture(scope="module")
def timed(c2i):
    """bench_one rows of the fixture model (float32) for dense and adsa-evict at budget 0.5."""
    cfg = c2i.config
    kw = dict(iters=2, warmup=1, device=DEVICE, options=XLA)
    return {name: bench.bench_one(c2i, 2, make_policy(cfg, name, **({} if name == "dense" else {"budget": 0.5})), **kw)
            for name in ("dense", "adsa-evict")}


@pytest.mark.parametrize("name", ["dense", "adsa-evict"])
def test_bench_one_row(timed, c2i, name):
    r = timed[name]
    cfg = c2i.config
    assert r["policy"] == name and r["batch"] == 2 and r["cfg"] is True and r["type"] == "c2i"
    assert r["dtype"] == "float32" and r["grid"] == 8 and r["layers"] == 3 and r["attention"] == "xla"
    assert len(r["times"]) == 2 and all(t > 0 for t in r["times"])
    assert r["s_per_call"] == statistics.median(r["times"])
    assert r["images_per_s"] == pytest.approx(2 / r["s_per_call"], rel=1e-12)
    assert r["ms_per_step"] == pytest.approx(1e3 * r["s_per_call"] / cfg.num_image_tokens, rel=1e-12)
    policy = make_policy(cfg, name, **({} if name == "dense" else {"budget": 0.5}))
    assert r["kv_bytes"] == kv_bytes(policy, cfg, 4, jnp.float32)  # batch 2 with CFG: 4 rows
    rf = bench.roofline(cfg, policy, 4, 2, jnp.float32, DEVICE)
    assert r["floor_s"] == rf["floor_s"] and r["bytes_per_call"] == rf["bytes_per_call"]
    assert r["achieved_fraction"] == pytest.approx(r["floor_s"] / r["s_per_call"], rel=1e-12)
    assert r["floor_kernel_s"] == rf["floor_kernel_s"]
    assert r["achieved_fraction_kernel"] == pytest.approx(r["floor_kernel_s"] / r["s_per_call"], rel=1e-12)
    assert r["compile_s"] > 0
    assert r["peak_bytes_compiled"] is None or r["peak_bytes_compiled"] > r["kv_bytes"]


def test_evict_holds_fewer_kv_bytes(timed):
    dense, evict = timed["dense"], timed["adsa-evict"]
    assert evict["kv_bytes"] < dense["kv_bytes"]
    # [cond | prefix | pool | ring] = 1 + 32 slots of dense's 1 + 63
    assert evict["kv_bytes"] * 64 == dense["kv_bytes"] * 33
    assert (evict["prefix"], evict["keep"], evict["local"]) == (8, 8, 16)
    assert dense["keep"] is None


def test_time_one_without_device_and_compile_only(c2i):
    prep = bench.compile_one(c2i, 1, make_policy(c2i.config, "window", budget=0.5),
                             sampling=adsa_jax.SamplingConfig(cfg_scale=1.0), options=XLA)
    assert prep["rows"] == 1 and prep["row"]["cfg"] is False
    r = bench.time_one(c2i, prep, iters=1, warmup=0)
    assert len(r["times"]) == 1 and r["s_per_call"] == r["times"][0]
    assert "floor_s" not in r and "achieved_fraction" not in r and "floor_kernel_s" not in r
    only = bench.bench_one(c2i, 1, make_policy(c2i.config, "dense"), run=False, options=XLA)
    assert only["times"] == [] and math.isnan(only["s_per_call"]) and only["compile_s"] > 0


@pytest.mark.parametrize("workers", [1, 2])
def test_nothing_compiles_while_a_configuration_is_timed(workers):
    """compiled_in_order compiles `workers` configurations at a time and never while the caller
    holds (times) one: every compile it yields has ended, and the next group starts only after."""
    import threading
    import time

    events, running = [], []
    lock = threading.Lock()

    def fake_compile(model, batch, policy, **kw):
        with lock:
            running.append(batch)
        time.sleep(0.05)  # long enough for a background compile to overlap the caller's timing
        with lock:
            running.remove(batch)
            events.append(("compiled", batch))
        return {"batch": batch}

    items = [{"batch": b, "policy": None} for b in range(5)]
    for item, prepared in bench.compiled_in_order(None, items, workers, compile=fake_compile):
        assert prepared == {"batch": item["batch"]} and ("compiled", item["batch"]) in events
        time.sleep(0.1)  # "timing": no compile may start or run meanwhile
        with lock:
            assert running == [] and len(events) == min(len(items), (item["batch"] // workers + 1) * workers)


def test_bench_t2i_zero_captions(t2i):
    cfg = t2i.config
    r = bench.bench_one(t2i, 1, make_policy(cfg, "dense"), iters=1, warmup=0, options=XLA)
    assert r["type"] == "t2i" and r["s_per_call"] > 0
    assert r["kv_bytes"] == kv_bytes(make_policy(cfg, "dense"), cfg, 2, jnp.float32)  # 120 caption slots + 63


def test_measure_device_small():
    d = bench.measure_device(size_mb=8, n=128, reps=2, trials=3)
    for k in ("bandwidth", "copy_bandwidth", "read_bandwidth", "matmul_flops", "matmul_flops_median"):
        assert np.isfinite(d[k]) and d[k] > 0, k
    assert d["matmul_flops"] >= d["matmul_flops_median"]  # the best call's rate, beside the median's
    assert d["bandwidth"] == max(d["copy_bandwidth"], d["read_bandwidth"])
    assert isinstance(d["device"], str)


# ----------------------------------------------------------------------------- which models


def test_bench_models_named_unchanged():
    (b,) = bench.bench_models()
    assert (b.name, b.image_size, b.source, b.checkpoint) == ("GPT-B", 256, None, False)
    assert b.config == adsa_jax.named_config("GPT-B", image_size=256)
    specs = bench.bench_models(["GPT-B", "GPT-XL"], [256, 384])
    assert [(s.name, s.image_size, s.config.grid, s.config.n_layer) for s in specs] == [
        ("GPT-B", 256, 16, 12), ("GPT-B", 384, 24, 12), ("GPT-XL", 256, 16, 36), ("GPT-XL", 384, 24, 36)]
    (t,) = bench.bench_models(["GPT-B"], model_type="t2i")
    assert t.config.model_type == "t2i" and t.config.cls_token_num == 120


def test_bench_models_json(config_files):
    path = config_files["gpt_c2i_small"]
    (own,) = bench.bench_models([str(path)])
    assert (own.name, own.image_size, own.source) == ("gpt_c2i_small", None, str(path))
    assert own.config == fixture_cfg()  # its own block_size: 8x8
    resized = bench.bench_models([str(path)], [256])[0]
    assert resized.config == fixture_cfg().replace(block_size=256) and resized.image_size == 256
    with pytest.raises(ConfigError, match="c2i model config"):
        bench.bench_models([str(path)], model_type="t2i")


def test_bench_models_checkpoint(c2i_dir, c2i):
    (ck,) = bench.bench_models(checkpoint=c2i_dir)
    assert (ck.name, ck.checkpoint, ck.source, ck.config) == ("c2i", True, str(c2i_dir), c2i.config)
    assert ck.image_size is None  # converted from a JSON config without --image-size
    assert bench.bench_models(None, [128], checkpoint=c2i_dir)[0].image_size == 128  # its own 8x8 grid
    loaded = ck.build("float32")  # the checkpoint's weights, not random ones
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(c2i.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ConfigError, match="not both"):
        bench.bench_models(["GPT-B"], checkpoint=c2i_dir)
    with pytest.raises(ConfigError, match=r"8x8 token grid.*image size 256"):
        bench.bench_models(None, [256], checkpoint=c2i_dir)
    with pytest.raises(ConfigError, match="c2i model"):
        bench.bench_models(checkpoint=c2i_dir, model_type="t2i")


# ----------------------------------------------------------------------------- CLI


def test_cli_bench_checkpoint(c2i_dir, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--checkpoint", str(c2i_dir), "--batch", "1,2", "--policies", "dense,window",
                 "--budgets", "0.5", "--iters", "1", "--no-roofline", "--dtype", "float32",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["device"] == {"device": jax.devices()[0].device_kind}  # its name only: no roofline
    rows = doc["rows"]
    assert [(r["policy"], r["budget"], r["batch"]) for r in rows] == [
        ("dense", None, 1), ("dense", None, 2), ("window", 0.5, 1), ("window", 0.5, 2)]
    for r in rows:
        assert "error" not in r, r
        assert r["name"] == "c2i" and r["source"] == str(c2i_dir) and r["grid"] == 8 and r["dtype"] == "float32"
        assert r["s_per_call"] > 0 and len(r["times"]) == 1
    table = capsys.readouterr().out
    assert table.count("window") == 2 and "c2i" in table


def test_selection_shares_pairs_evict_with_its_window():
    """Each adsa-evict row pairs with the window row of the same configuration only (not another
    batch, budget or model, not an error row); share = (evict - window) / evict."""
    base = dict(name="m", source="s", grid=8, dtype="float32", attention="xla", gemm="xla-default", segments=1,
                cfg=True, image_size=None)
    rows = [dict(base, policy="adsa-evict", batch=1, budget=0.5, s_per_call=2.0),
            dict(base, policy="window", batch=1, budget=0.5, s_per_call=1.5),
            dict(base, policy="adsa-evict", batch=2, budget=0.5, s_per_call=3.0),  # its window failed
            dict(base, policy="window", batch=2, budget=0.5, error="OOM"),
            dict(base, policy="adsa-evict", batch=1, budget=0.25, s_per_call=1.0),  # no window at 0.25
            dict(base, policy="window", batch=1, budget=0.5, s_per_call=9.0, name="other"),
            dict(base, policy="dense", batch=1, budget=None, s_per_call=1.0)]
    (got,) = bench.selection_shares(rows)
    assert (got["batch"], got["budget"], got["adsa_evict_s"], got["window_s"]) == (1, 0.5, 2.0, 1.5)
    assert got["share"] == 0.25
    assert "25.0%" in bench.format_shares([got]) and "8x8 tokens" in bench.format_shares([got])


def test_cli_bench_prints_selection_share(c2i_dir, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--checkpoint", str(c2i_dir), "--batch", "1", "--policies", "adsa-evict,window",
                 "--budgets", "0.5", "--iters", "1", "--no-roofline", "--dtype", "float32", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    evict, window = doc["rows"]
    (share,) = doc["selection_shares"]
    assert share["share"] == pytest.approx(1 - window["s_per_call"] / evict["s_per_call"])
    assert "selection share, c2i 8x8 tokens batch 1 budget 0.5:" in capsys.readouterr().out


def test_cli_bench_json_config(config_files, tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "--model", str(config_files["gpt_c2i_small"]), "--batch", "1", "--cfg-scale", "1",
                 "--segments", "1", "--iters", "1", "--no-roofline", "--dtype", "float32", "--gemm", "xla",
                 "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["rows"]
    assert r["name"] == "gpt_c2i_small" and r["grid"] == 8 and r["layers"] == 3 and r["cfg"] is False
    assert r["gemm"] == "xla-default"
    assert r["s_per_call"] > 0


def test_cli_bench_errors(c2i_dir, tmp_path, capsys):
    missing = tmp_path / "some" / "missing.json"
    assert main(["bench", "--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adsa-jax bench: error:") and str(missing) in err and err.count("\n") == 1
    assert main(["bench", "--checkpoint", str(tmp_path / "nockpt")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint directory not found" in err and "nockpt" in err
    assert main(["bench", "--checkpoint", str(tmp_path)]) == 2  # a directory, but not a converted one
    assert "not an adsa_jax checkpoint" in capsys.readouterr().err
    assert main(["bench", "--checkpoint", str(c2i_dir), "--model", "GPT-B"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["bench", "--checkpoint", str(c2i_dir), "--image-size", "256"]) == 2
    assert "8x8 token grid" in capsys.readouterr().err
    assert main(["bench", "--model", "GPT-Q"]) == 2
    assert "unknown model 'GPT-Q'" in capsys.readouterr().err
    assert main(["bench", "--checkpoint", str(c2i_dir), "--policies", "dense,lru"]) == 2  # before any timing
    assert "unknown policy 'lru'" in capsys.readouterr().err
    assert main(["bench", "--checkpoint", str(c2i_dir), "--granularity", "head,row"]) == 2
    assert "granularity (--granularity) must be 'head' or 'layer', got 'row'" in capsys.readouterr().err
    assert main(["bench", "--checkpoint", str(c2i_dir), "--period", "1,0"]) == 2
    assert "period (--period) must be an integer >= 1" in capsys.readouterr().err
    assert main(["bench", "--checkpoint", str(c2i_dir), "--period", "x"]) == 2
    assert "--period" in capsys.readouterr().err
    assert main(["bench", "--checkpoint", str(c2i_dir), "--peak-hints", str(missing)]) == 2
    assert "--peak-hints goes with --memory-cap" in capsys.readouterr().err
    assert main(["bench", "--checkpoint", str(c2i_dir), "--memory-cap", "1", "--peak-hints", str(missing)]) == 2
    err = capsys.readouterr().err  # before any compile or timing
    assert "--peak-hints" in err and "cannot read it" in err and err.count("\n") == 1


def test_policy_items_sweeps_granularity_and_period_where_they_apply():
    """Granularity multiplies the scored policies only, the period only those that take one; each
    item's policy object is what make_policy builds for it."""
    cfg = fixture_cfg()
    items = bench.policy_items(cfg, ["dense", "adsa-evict", "window", "h2o", "random"], [0.5], ("head", "layer"), (1, 2))
    got = [(it["policy"].name, it["budget"], it["granularity"], it["period"]) for it in items]
    assert got == [("dense", None, None, 1),
                   ("adsa-evict", 0.5, "head", 1), ("adsa-evict", 0.5, "head", 2),
                   ("adsa-evict", 0.5, "layer", 1), ("adsa-evict", 0.5, "layer", 2),
                   ("window", 0.5, None, 1), ("h2o", 0.5, "head", 1), ("h2o", 0.5, "layer", 1),
                   ("random", 0.5, None, 1), ("random", 0.5, None, 2)]
    for it in items[1:5]:
        assert it["policy"] == make_policy(cfg, "adsa-evict", budget=0.5, granularity=it["granularity"],
                                           period=it["period"])
    rows = [{"policy": "adsa-evict", "granularity": "layer", "period": 8, "keep": 4, "budget": 0.5, "grid": 8,
             "batch": 1, "attention": "xla", "gemm": "xla", "segments": 1, "compile_s": 1.0, "s_per_call": 1.0,
             "images_per_s": 1.0, "ms_per_step": 1.0, "peak_bytes_compiled": None, "kv_bytes": 0}]
    assert "adsa-evict/layer s=8" in bench.format_rows(rows)


# ----------------------------------------------------------------------------- memory cap


def _brute_force(peak, cap, align, max_batch):
    return max([b for b in range(align, max_batch // align * align + 1, align) if peak(b) <= cap], default=0)


@pytest.mark.parametrize("align,max_batch", [(1, 4096), (8, 4096), (1, 100), (3, 50)])
def test_batch_search_finds_the_largest_fitting_batch(align, max_batch):
    """Against brute force, on affine, convex and stepped monotone peaks and caps from below the
    smallest batch to above the largest: the answer is the largest fitting multiple of ``align``,
    every batch it compiled is known, and an affine peak takes few compiles."""
    rng = np.random.default_rng(align * 1000 + max_batch)
    for trial in range(60):
        a, c = rng.uniform(1e6, 1e9), rng.uniform(1e5, 1e8)
        q = 0.0 if trial % 3 == 0 else rng.uniform(0, 1e4)
        step = trial % 2  # batches that pad to the next 7: a stepped peak
        table = np.maximum.accumulate([a + c * b + q * b * b + step * (-b % 7) * c for b in range(max_batch + 1)])
        peak = lambda b: float(table[b])  # noqa: E731
        cap = int(rng.uniform(a, a + c * 1.2 * max_batch))
        s = bench.BatchSearch(cap, start=int(rng.choice([1, 8, 16])), align=align, max_batch=max_batch)
        known, rounds = {}, 0
        while cand := s.candidates(known):
            assert all(b % align == 0 and align <= b <= max_batch and b not in known for b in cand)
            known.update({b: peak(b) for b in cand})
            rounds += 1
            assert rounds <= 20
        lo, hi = s.bracket(known)
        assert lo == _brute_force(peak, cap, align, max_batch), (trial, sorted(known))
        assert s.summary(known)["largest_fitting"] == lo
        if q == 0 and not step:
            assert len(known) <= 6, sorted(known)


def test_batch_search_bad_bounds():
    with pytest.raises(ConfigError, match=r"align \(--batch-step\) must be an integer >= 1"):
        bench.BatchSearch(10, align=0)
    with pytest.raises(ConfigError, match="max batch 4 is below the batch step 8"):
        bench.BatchSearch(10, align=8, max_batch=4)


def test_resolve_memory_caps():
    assert bench.resolve_memory_caps([40, "0.5"]) == [(40.0, 40 * 2**30), (0.5, 2**29)]
    for bad in ("-1", "nan", "lots", 0):
        with pytest.raises(ConfigError, match="memory cap must be"):
            bench.resolve_memory_caps([bad])
    if bench.device_memory_limit() is None:  # CPU: no allocator limit to take
        with pytest.raises(ConfigError, match="reports no memory limit.*give the cap in GiB"):
            bench.resolve_memory_caps(["device"])


@pytest.fixture(scope="module")
def compiled_window(c2i):
    """compile_one of the fixture model (window 0.5, float32, XLA attention) by batch, each batch
    compiled once for every cap search below; ``runs`` lists the batches whose executable ran."""
    cache, runs, fail = {}, [], set()

    def compile_(model, batch, policy, **kw):
        if batch not in cache:
            cache[batch] = bench.compile_one(model, batch, policy, **kw)
        prep = cache[batch]

        def compiled(*args):
            runs.append(batch)
            if batch in fail:  # what the GPU runtime raises when the allocator runs dry
                raise RuntimeError(f"RESOURCE_EXHAUSTED: Out of memory while trying to allocate (batch {batch})")
            return prep["compiled"](*args)

        return dict(prep, compiled=compiled)

    policy = make_policy(c2i.config, "window", budget=0.5)
    peak = lambda b: compile_(c2i, b, policy, options=XLA)["row"]["peak_bytes_compiled"]  # noqa: E731
    return {"compile": compile_, "peak": peak, "runs": runs, "fail": fail,
            "item": {"policy": policy, "options": XLA}}


def _search(c2i, w, cap, **kw):
    w["runs"].clear()
    out = list(bench.cap_search(c2i, [w["item"]], [(cap / 2**30, cap)], iters=1, warmup=0, compile=w["compile"],
                                log=lambda s: None, **kw))
    assert len(out) == 1 and out[0][0] == 0
    return out[0][2]


def test_cap_search_on_the_fixture_model(c2i, compiled_window):
    """A cap that admits batch 4 but not 8 gives 4 at a batch step of 4, from the compiled
    memory analysis; at a step of 1, a cap between batch 4's and 5's peak gives 4. Only the chosen
    batch runs (a batch over the cap is compiled, never run), and the row is timed."""
    w = compiled_window
    p4, p5, p8 = w["peak"](4), w["peak"](5), w["peak"](8)
    assert p4 < p5 < p8
    r = _search(c2i, w, (p4 + p8) // 2, align=4, start=1)
    assert r["batch"] == 4 and r["peak_bytes_compiled"] == p4 and r["s_per_call"] > 0
    assert (r["search"]["largest_fitting"], r["search"]["smallest_over"]) == (4, 8)
    assert r["memory_cap_gib"] == pytest.approx((p4 + p8) // 2 / 2**30) and r["cap_bytes"] == (p4 + p8) // 2
    assert set(w["runs"]) == {4}
    r = _search(c2i, w, (p4 + p5) // 2, align=1, start=4)
    assert r["batch"] == 4 and (r["search"]["largest_fitting"], r["search"]["smallest_over"]) == (4, 5)
    assert set(w["runs"]) == {4}
    assert all(p is None or (p <= (p4 + p5) // 2) == (int(b) <= 4) for b, p in r["search"]["compiled"].items())


def test_cap_search_out_of_memory_when_run_searches_below(c2i, compiled_window):
    """A chosen batch that runs out of device memory counts as not fitting: the search goes on
    below it and the next largest batch is timed."""
    w = compiled_window
    p4, p5 = w["peak"](4), w["peak"](5)
    w["fail"].add(4)
    try:
        r = _search(c2i, w, (p4 + p5) // 2, align=1, start=4)
    finally:
        w["fail"].clear()
    assert r["batch"] == 3 and r["search"]["smallest_over"] == 4 and r["search"]["compiled"]["4"] is None
    assert w["runs"] == [4, 3]


def test_cap_search_from_peak_hints(c2i, compiled_window):
    """Hints (peaks compiled earlier for the device) start the search: right ones bracket the cap, so
    only the chosen batch is compiled, to be run, and the batch above stays hinted; a wrong one (a
    batch said to fit that does not) is replaced by its compiled peak and the search goes on below."""
    w = compiled_window
    p2, p4, p5, p8 = w["peak"](2), w["peak"](4), w["peak"](5), w["peak"](8)
    cap, compiled = (p4 + p5) // 2, []

    def counting(model, batch, policy, **kw):
        compiled.append(batch)
        return w["compile"](model, batch, policy, **kw)
    w2 = dict(w, compile=counting)
    r = _search(c2i, w2, cap, align=1, start=1, hints=[{4: p4, 5: p5, 8: p8}])
    assert r["batch"] == 4 and compiled == [4] and set(w["runs"]) == {4}
    assert r["search"]["hinted"] == [5, 8] and (r["search"]["largest_fitting"], r["search"]["smallest_over"]) == (4, 5)
    compiled.clear()
    r = _search(c2i, w2, cap, align=1, start=1, hints=[{2: p2, 5: p4, 8: p8}])  # batch 5 does not fit
    assert r["batch"] == 4 and {4, 5} <= set(compiled) and r["search"]["compiled"]["5"] == p5
    assert r["search"]["hinted"] == [2, 8] and set(w["runs"]) == {4}


def test_load_peak_hints(tmp_path, c2i):
    from adsa_jax.bench import load_peak_hints, peak_hint_key, policy_items

    item = policy_items(c2i.config, ["adsa-evict"], [0.5])[0]
    key = peak_hint_key("GPT-XL", 384, item)
    assert key == "GPT-XL:384:adsa-evict:0.5:head:1"
    f = tmp_path / "peaks.json"
    f.write_text(json.dumps({"peaks": {key: {"369": 42939229689, "370": 43073799426}}}))
    assert load_peak_hints(f) == {key: {369: 42939229689, 370: 43073799426}}
    for text, msg in (("{", "not JSON"), ("[]", "expected an object with 'peaks'"),
                      (json.dumps({"peaks": {key: {"x": 1}}}), "must map batches to bytes"),
                      (json.dumps({"peaks": {key: {"0": 1}}}), "batch below 1")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            load_peak_hints(f)
    with pytest.raises(ConfigError, match="cannot read it"):
        load_peak_hints(tmp_path / "missing.json")


def test_cap_search_yields_each_answer_as_soon_as_it_is_timed(c2i, compiled_window):
    """Two caps: the smaller one's answer comes out once its batch has run, before the larger batch
    runs, so a run cut short (a timeout) keeps the rows already measured."""
    w = compiled_window
    p2, p3, p4, p5 = (w["peak"](b) for b in (2, 3, 4, 5))
    assert p2 < p3 < p4 < p5
    caps = [((p4 + p5) // 2 / 2**30, (p4 + p5) // 2), ((p2 + p3) // 2 / 2**30, (p2 + p3) // 2)]
    w["runs"].clear()
    logs = []
    gen = bench.cap_search(c2i, [w["item"]], caps, iters=1, warmup=0, compile=w["compile"], log=logs.append,
                           align=1, start=2)
    i, cap, row = next(gen)
    assert (i, cap, row["batch"]) == (0, caps[1], 2) and set(w["runs"]) == {2}
    assert logs[-1] == "  window batch 2: timing 0 warm-up and 1 timed call(s) ..."
    rest = list(gen)
    assert [(c, r["batch"]) for _, c, r in rest] == [(caps[0], 4)] and set(w["runs"]) == {2, 4}


def test_cap_search_nothing_fits(c2i, compiled_window):
    w = compiled_window
    r = _search(c2i, w, w["peak"](1) - 1, align=1, start=1)
    assert r["batch"] is None and r["error"].startswith("no batch fits") and "batch 1 needs" in r["error"]
    assert w["runs"] == []


def test_cli_bench_memory_cap(c2i_dir, tmp_path, capsys):
    """--memory-cap through the CLI: a cap far above the fixture model's needs stops at --max-batch;
    the JSON rows carry the cap and become results rows (make_tables --add)."""
    make_tables = benchmark_script("make_tables")

    out = tmp_path / "cap.json"
    assert main(["bench", "--checkpoint", str(c2i_dir), "--image-size", "128", "--policies", "window",
                 "--budgets", "0.5", "--memory-cap", "1", "--max-batch", "2", "--iters", "1", "--no-roofline",
                 "--attention", "xla", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    (r,) = doc["rows"]
    assert doc["device"] == {"device": jax.devices()[0].device_kind}
    assert (r["policy"], r["budget"], r["batch"], r["memory_cap_gib"], r["cap_bytes"]) == ("window", 0.5, 2, 1.0, 2**30)
    assert r["search"]["max_batch_reached"] and r["peak_bytes_compiled"] < 2**30 and r["s_per_call"] > 0
    assert "(max batch)" in capsys.readouterr().out
    (row,) = make_tables.rows_from_bench(doc, None, "cpu")
    assert (row["memory_cap_gib"], row["batch"], row["framework"], row["image_size"]) == (1.0, 2, "adsa_jax", 128)
    assert row["date"] == doc["date"]  # the run's date, not the day the rows are added
    for cap, msg in (("device", "reports no memory limit"), ("-3", "positive number of GiB")):
        if cap == "device" and bench.device_memory_limit() is not None:
            continue
        assert main(["bench", "--checkpoint", str(c2i_dir), "--memory-cap", cap, "--no-roofline"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("adsa-jax bench: error:") and msg in err and err.count("\n") == 1
    assert main(["bench", "--checkpoint", str(c2i_dir), "--memory-cap", "1", "--batch-step", "0"]) == 2
    assert "--batch-step" in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [
    (["--batch", "0"], "batches (--batch) must be an integer in [1, 2147483647], got 0"),
    (["--batch", "2,-3"], "got -3"),
    (["--iters", "0"], "iters (--iters) must be an integer in [1, 2147483647], got 0"),
    (["--compile-workers", "0"], "(--compile-workers) must be an integer in [1, "),
    (["--json", "{tmp}/missing/x.json"], "cannot write --json {tmp}/missing/x.json: {tmp}/missing does not exist"),
    (["--json", "{tmp}"], "cannot write --json {tmp}: it is a directory; give a file name"),
    (["--memory-cap", "1", "--iters", "0"], "iters (--iters)"),
    (["--memory-cap", "1", "--json", "{tmp}/missing/x.json"], "does not exist"),
    # a sweep's axis given a value twice would repeat its work
    (["--batch", "2,1,2"], "--batch lists 2 more than once: give each value once"),
    (["--policies", "dense,window,dense"], "--policies lists 'dense' more than once"),
    (["--budgets", "0.5,0.50"], "--budgets lists 0.5 more than once"),
    (["--memory-cap", "1,1"], "--memory-cap lists '1' more than once"),
    (["--memory-cap", "1,1.0"], "memory caps '1' and '1.0' are the same cap (1 GiB): give each cap once"),
])
def test_cli_bench_bad_counts_and_paths_fail_before_any_work(c2i_dir, tmp_path, capsys, args, msg):
    """Checked before the device is measured or anything compiles (no --no-roofline here: the
    measurement would come first otherwise); one line naming the flag."""
    args, msg = [a.replace("{tmp}", str(tmp_path)) for a in args], msg.replace("{tmp}", str(tmp_path))
    assert main(["bench", "--checkpoint", str(c2i_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adsa-jax bench: error:") and msg in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_throughput_at_equal_memory_script(config_files, tmp_path, capsys):
    """benchmarks/throughput_at_equal_memory.py on the fixture config: one row per policy and cap,
    in the JSON that make_tables --add reads; bad arguments fail in one line before any work."""
    script = benchmark_script("throughput_at_equal_memory")
    out = tmp_path / "eq.json"
    tiny = f"{config_files['gpt_c2i_small']}:128"
    assert script.main(["--configs", tiny, "--policies", "window:0.5", "--caps", "1", "--max-batch", "2", "--start",
                        "2", "--batch-step", "1", "--dtype", "float32", "--attention", "xla", "--no-roofline",
                        "--iters", "1", "--warmup", "0", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["rows"]
    assert (r["name"], r["image_size"], r["policy"], r["budget"], r["batch"], r["memory_cap_gib"]) == (
        "gpt_c2i_small", 128, "window", 0.5, 2, 1.0)
    capsys.readouterr()
    for args, msg in ((["--policies", "window:half"], "is not POLICY[:BUDGET]"),
                      (["--configs", "GPT-XL"], "MODEL:IMAGE"),
                      (["--caps", "0"], "positive number of GiB"), (["--policies", "lru"], "unknown policy 'lru'"),
                      (["--policies", "adsa-evict:0.25"], "budget 0.25 keeps 16 image tokens"),
                      (["--part", "2"], "--part 2 sets the configs, caps and policies: leave out --configs, "
                                        "--policies")):
        assert script.main(["--no-roofline", "--configs", tiny, "--policies", "window:0.5"] + args) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    # the parts cover the grid once: 3 configs x 2 caps x 4 policies
    cells = set()
    for part in script.PARTS.values():
        a = {"configs": script.CONFIGS, "caps": script.CAPS, "policies": script.POLICIES, **part}
        for c in script.parse_configs(a["configs"]):
            for cap in a["caps"].split(","):
                for pol in script.parse_pairs(a["policies"]):
                    assert (c, cap, pol) not in cells
                    cells.add((c, cap, pol))
    assert len(cells) == 3 * 2 * 4


def test_kernel_switch_time_reads_its_cases():
    """benchmarks/kernel_switch_time.py: a case is MODEL:PX:BATCH:POLICY:BUDGET:GRAN:PERIOD:SWITCH or,
    for dense (no budget), MODEL:PX:BATCH:dense:SWITCH; a switch is a True/False field or FIELD=VALUE;
    anything else stops the script with its reason before a compile."""
    kst = benchmark_script("kernel_switch_time")
    assert kst.parse("GPT-XL:256:64:dense:stack_ffn") == ("GPT-XL", 256, 64, "dense", None, None, None, "stack_ffn")
    assert kst.parse("GPT-XL:384:64:adsa-evict:0.5:layer:8:score_tile=(16,1)") == (
        "GPT-XL", 384, 64, "adsa-evict", 0.5, "layer", 8, "score_tile=(16,1)")
    assert kst.settings("stack_ffn") == ({"stack_ffn": True}, {"stack_ffn": False})
    assert kst.settings("score_tile=(16,1)") == ({"score_tile": (16, 1)}, {})
    for bad in ("GPT-XL:384:64:window:0.5:stack_ffn", "GPT-XL:384:64:window:stack_ffn"):  # only dense omits them
        with pytest.raises(SystemExit, match="MODEL:PX:BATCH:dense:SWITCH"):
            kst.parse(bad)
    for bad, reason in (("block_k", "not a KernelConfig switch"), ("nope=1", "not a KernelConfig field"),
                        ("score_tile=(16,", "not a Python literal")):
        with pytest.raises(SystemExit, match=reason):
            kst.settings(bad)


def test_xla_flag_time_reads_its_group():
    """benchmarks/xla_flag_time.py: each group's settings start from XLA's default (no flags); the fma
    group adds only LLVM's contraction option; a missing or unknown group stops the script with the
    groups it knows, before any bench process starts."""
    xft = benchmark_script("xla_flag_time")
    settings, specs, only_1 = xft.group("fma")
    assert settings == {"default": "", "fma": "--xla_backend_extra_options=-nvptx-fma-level=1"}
    assert "GPT-XL:384:64:adsa-evict:0.5" in specs and not only_1
    settings, _, only_1 = xft.group("command-buffer")
    assert settings["default"] == "" and only_1 <= set(settings)
    for argv, msg in (([], "usage: .*GROUP one of command-buffer, fma"), (["graphs"], "got 'graphs'")):
        with pytest.raises(SystemExit, match=msg):
            xft.main(argv)


@pytest.mark.parametrize("args, msg", [
    (["6", "GPT-XL:384", "dense,foo"], "got 'dense,foo' for part 6"),
    (["5", "GPT-XL:384", "dense,"], "got 'dense,' for part 5"),
    (["4", "GPT-XL:384", "dense"], "(parts 5 and 6 only)"),
    (["6", "GPT-B:256"], "MODEL:PX must be"),
    (["17"], "PART 1 to 16"),
])
def test_run_perf_grid_refuses_bad_arguments_before_any_work(tmp_path, args, msg):
    """The device script checks its part, model and policies first: one line, exit 2, nothing run."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_perf_grid.sh"
    p = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env={"OUT": str(tmp_path / "o"),
                       "PATH": "/usr/bin:/bin"}, timeout=30)
    assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1 and p.stdout == ""
