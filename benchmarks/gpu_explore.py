"""GPU sweep driver: a JSON plan of configurations, compiled in parallel per model, timed one by one.

    python3 benchmarks/gpu_explore.py benchmarks/plans/h100_kernel.json   (or the plan as a JSON string)

(run by the device tool; results in $OUT/$TAG.json)

Plan items: {"model": "GPT-XL", "size": 256, "batch": 64, "policy": "dense", "budget": null,
"attn": "pallas"|"xla", "seg": 4, "iters": 3, "profile": false, "compile_only": false}.
Env: OUT, TAG, WORKERS (parallel compiles, default 4), CHECK=1 (first compare the Pallas kernel
with the XLA path on GPT-B in float32: logits and greedy tokens), EVICT_ONE_KERNEL=1|0 and
DENSE_ONE_KERNEL=1|0, ROPE_IN_KERNEL=1|0 (set those switches of ``adsa_jax.kernels`` for the whole process),
GEMM_CUBLAS_MIN_ROWS=N|none (``adsa_jax.generate.GEMM_CUBLAS_MIN_ROWS``), STACK_FFN=1|0
(``adsa_jax.generate.STACK_FFN``), GEMV_TILES (JSON, ``adsa_jax.kernels.GEMV_TILES``), KERNELS
(comma-separated NAME=INT settings of ``adsa_jax.kernels``, e.g. ``GEMV_NUM_WARPS=2,GEMV_BLOCK_K=64``). Plan items
may also say "gemm": "xla"|"pallas"|"auto".
"""
import collections
import gzip
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gpu_trace import gpu_kernel_times  # noqa: E402

from adsa_jax.bench import compiled_in_order, error_row, format_rows, measure_device, time_one  # noqa: E402
from adsa_jax.config import named_config  # noqa: E402
from adsa_jax.generate import Model, generate, score  # noqa: E402
from adsa_jax.model import init_params  # noqa: E402
from adsa_jax.cache import make_policy  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
TAG = os.environ.get("TAG", "explore")
WORKERS = int(os.environ.get("WORKERS", "4"))


def check_kernel():
    """float32 GPT-B 256: the kernel's logits and greedy tokens against the XLA path, per policy."""
    cfg = named_config("GPT-B", image_size=256)
    m = Model(cfg, init_params(cfg, jax.random.key(0), jnp.float32))
    labels = np.arange(24, dtype=np.int32)  # 48 rows x 12 heads: adsa-evict and window run as one kernel
    toks = np.asarray(generate(m, labels, jax.random.key(0), attention="xla"))
    out = {}
    jax.config.update("jax_default_matmul_precision", "highest")  # XLA's f32 dots would use TF32
    for name, budget in (("dense", None), ("adsa-evict", 0.5), ("window", 0.5)):
        pol = make_policy(cfg, name, budget=budget)
        a = np.asarray(score(m, labels, toks, cfg_scale=4.0, raw_rows=True, policy=pol, attention="xla"))
        b = np.asarray(score(m, labels, toks, cfg_scale=4.0, raw_rows=True, policy=pol, attention="pallas"))
        ga = np.asarray(generate(m, labels, jax.random.key(1), top_k=1, cfg_scale=1.0, policy=pol, attention="xla"))
        gb = np.asarray(generate(m, labels, jax.random.key(1), top_k=1, cfg_scale=1.0, policy=pol, attention="pallas"))
        out[f"{name} {budget}"] = {"max_abs_logit_diff": float(np.abs(a - b).max()),
                                   "logit_scale": float(np.abs(a).max()),
                                   "greedy_tokens_equal": float((ga == gb).mean())}
        print("check", name, budget, out[f"{name} {budget}"], flush=True)
    # The cuBLAS program (generate_program at 128+ rows) against the default one: greedy tokens.
    gen = importlib.import_module("adsa_jax.generate")  # the module, not the function

    labels = np.arange(64, dtype=np.int32)
    saved = gen.GEMM_CUBLAS_MIN_ROWS
    toks = {}
    for rows in (None, 128):
        gen.GEMM_CUBLAS_MIN_ROWS = rows
        toks[rows] = np.asarray(generate(m, labels, jax.random.key(1), top_k=1, cfg_scale=4.0))
    gen.GEMM_CUBLAS_MIN_ROWS = saved
    out["cublas vs triton gemm"] = {"greedy_tokens_equal": float((toks[None] == toks[128]).mean())}
    print("check cublas", out["cublas vs triton gemm"], flush=True)
    jax.config.update("jax_default_matmul_precision", None)
    return out


def profile(m, prepared, tag):
    labels, mask, ids, scalars = prepared["args"]
    comp = prepared["compiled"]
    with gzip.open(f"{OUT}/hlo_{tag}.txt.gz", "wt") as f:  # maps the profile's fusion names to ops
        f.write(comp.as_text())
    comp(m.params, labels, mask, jax.random.key(0), ids, scalars).block_until_ready()
    agg, cnt, span = gpu_kernel_times(
        lambda: comp(m.params, labels, mask, jax.random.key(0), ids, scalars).block_until_ready())
    if not agg:
        return
    # span = first kernel start to last kernel end: busy / span is how full the GPU was kept.
    json.dump({"agg": agg, "cnt": cnt, "span_us": span}, open(f"{OUT}/prof_{tag}.json", "w"))
    print(f"profile {tag}: device busy {sum(agg.values()) / 1e3:.1f} ms over {sum(cnt.values())} kernels, "
          f"span {span / 1e3:.1f} ms", flush=True)
    for n, t in agg.most_common(15):
        print(f"  {t / 1e3:9.2f} ms {cnt[n]:7d}x  {n}", flush=True)


def main():
    arg = sys.argv[1]
    plan = json.load(open(arg)) if arg.endswith(".json") else json.loads(arg)
    t_start = time.time()
    result = {"jax": jax.__version__, "device_kind": jax.devices()[0].device_kind, "workers": WORKERS}
    from adsa_jax import kernels

    if os.environ.get("EVICT_ONE_KERNEL"):  # read at trace time, so one setting per process
        kernels.EVICT_ONE_KERNEL = os.environ["EVICT_ONE_KERNEL"] == "1"
        result["evict_one_kernel"] = kernels.EVICT_ONE_KERNEL
    if os.environ.get("DENSE_ONE_KERNEL"):
        kernels.DENSE_ONE_KERNEL = os.environ["DENSE_ONE_KERNEL"] == "1"
        result["dense_one_kernel"] = kernels.DENSE_ONE_KERNEL
    if os.environ.get("ROPE_IN_KERNEL"):
        kernels.ROPE_IN_KERNEL = os.environ["ROPE_IN_KERNEL"] == "1"
        result["rope_in_kernel"] = kernels.ROPE_IN_KERNEL
    if os.environ.get("GEMM_CUBLAS_MIN_ROWS"):  # generate.GEMM_CUBLAS_MIN_ROWS: a row count, or "none"
        gen = importlib.import_module("adsa_jax.generate")  # the module, not the function

        v = os.environ["GEMM_CUBLAS_MIN_ROWS"]
        gen.GEMM_CUBLAS_MIN_ROWS = None if v == "none" else int(v)
        result["gemm_cublas_min_rows"] = gen.GEMM_CUBLAS_MIN_ROWS
    if os.environ.get("STACK_FFN"):  # generate.STACK_FFN: w1 and w3 stacked once per call
        gen = importlib.import_module("adsa_jax.generate")
        gen.STACK_FFN = os.environ["STACK_FFN"] == "1"
        result["stack_ffn"] = gen.STACK_FFN
    for pair in filter(None, os.environ.get("KERNELS", "").split(",")):  # e.g. KERNELS=GEMV_NUM_WARPS=2,GEMV_BLOCK_K=64
        name, value = pair.split("=")
        if not hasattr(kernels, name):
            raise SystemExit(f"KERNELS: adsa_jax.kernels has no {name}")
        setattr(kernels, name, type(getattr(kernels, name))(int(value)))
        result.setdefault("kernels", {})[name] = getattr(kernels, name)
    if os.environ.get("GEMV_TILES"):  # kernels.GEMV_TILES as JSON {"K,N": [block_n, block_k, splits] | null}
        kernels.GEMV_TILES = {tuple(int(v) for v in k.split(",")): (tuple(t) if t else None)
                              for k, t in json.loads(os.environ["GEMV_TILES"]).items()}
        result["gemv_tiles"] = os.environ["GEMV_TILES"]
    if os.environ.get("CHECK"):
        result["check"] = check_kernel()

    # Tuning files: use the fastest setting they measured (kernel_tune.json for the attention
    # kernel's dense case, evict_kernel_time.json for evict_step).
    for env, wanted, names in (("TUNED", lambda c: c.startswith("dense"), ("BLOCK_K", "NUM_WARPS", "NUM_STAGES")),
                               ("EVICT_TUNED", lambda c: c == "evict_step", ("EVICT_BLOCK_K", "EVICT_NUM_WARPS"))):
        path = os.environ.get(env)
        if path and os.path.exists(path):
            best = min((r for r in json.load(open(path))["rows"]
                        if wanted(r.get("case", "")) and "block_k" in r and "us" in r),
                       key=lambda r: r["us"])
            for name, key in zip(names, ("block_k", "warps", "stages")):
                setattr(kernels, name, best[key])
            result[f"{env.lower()}_params"] = best
            print(env, "kernel params", best, flush=True)
    dev = measure_device()
    result["device"] = dev
    print("device", dev, "jax", jax.__version__, flush=True)
    rows = result["rows"] = []
    groups = collections.OrderedDict()
    for item in plan:
        groups.setdefault((item["model"], item["size"]), []).append(item)
    for (name, size), items in groups.items():
        cfg = named_config(name, image_size=size)
        m = Model(cfg, init_params(cfg, jax.random.key(0), jnp.bfloat16))
        items = [dict(item, policy=make_policy(cfg, item["policy"], budget=item.get("budget")),
                      segments=item.get("seg", 1), attention=item.get("attn", "auto")) for item in items]
        for item, prepared in compiled_in_order(m, items, WORKERS):
            try:
                if isinstance(prepared, Exception):
                    raise prepared
                if item.get("compile_only"):
                    r = dict(prepared["row"], s_per_call=float("nan"), images_per_s=float("nan"),
                             ms_per_step=float("nan"), times=[])
                else:
                    r = time_one(m, prepared, iters=item.get("iters", 3), device=dev)
                if item.get("profile"):
                    profile(m, prepared, f"{TAG}_{item['policy'].name}_{item['attention']}_{name}_{size}_{item['batch']}")
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at one size
                r = error_row(e, m, item)
            prepared = None
            r.update(name=name, image_size=size, budget=item.get("budget"))
            rows.append(r)
            print(format_rows([r]).splitlines()[-1], f"  [{time.time() - t_start:.0f}s]", flush=True)
            json.dump(result, open(f"{OUT}/{TAG}.json", "w"), indent=1)
        del m
    print(format_rows(rows))


if __name__ == "__main__":
    main()
