"""Time GPT-XL's decode projections alone: XLA (the einsums with their norms, SwiGLU and residual
adds, as model.decode_step runs them) against the fused kernel of benchmarks/fused_linear.py over its
tile settings (GPU).

    python3 benchmarks/linear_time.py     (writes $OUT/linear_time.json; env LINEAR_ROWS=2,16,128)

Kernel time per call from a profiler trace (every kernel of the call, so XLA's separate norm and
elementwise kernels count), over enough distinct weight copies (> 150 MB) that L2 never holds them.
"""
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_trace import gpu_kernel_times  # noqa: E402

import fused_linear as kernels  # noqa: E402 - the experiment's kernel
from adsa_jax.model import rms_norm  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
E, F, V = 1280, 3584, 16384
MS = tuple(int(x) for x in os.environ.get("LINEAR_ROWS", "2,16,128").split(","))
TUNE_MS = tuple(int(x) for x in os.environ.get("LINEAR_TUNE_ROWS", "2,128").split(","))
# block_n, block_k, warps, stages (env LINEAR_GRID="16,32;128,256;4;2,4")
GRID = [tuple(int(v) for v in part.split(",")) for part in os.environ.get("LINEAR_GRID", "16,32,64,128;128,256;4;2,4").split(";")]
# name: (K, N, norm, swiglu, residual), the five projections of a decode step
OPS = {"qkv": (E, 3 * E, True, False, False), "wo": (E, E, False, False, True), "w13": (E, F, True, True, False),
       "w2": (F, E, False, False, True), "head": (E, V, True, False, False)}


def xla_op(norm, swiglu, residual):
    def f(x, nw, w, w3, r):
        h = rms_norm(x, nw, 1e-5) if norm else x
        y = jnp.einsum("BE,EF->BF", h, w)
        if swiglu:
            y = jax.nn.silu(y) * jnp.einsum("BE,EF->BF", h, w3)
        return r + y if residual else y
    return jax.jit(f)


def fused_op(norm, swiglu, residual, tag, **tiles):
    return jax.jit(lambda x, nw, w, w3, r: kernels.fused_linear(
        x, w, norm_weight=nw if norm else None, w3=w3 if swiglu else None, residual=r if residual else None,
        name=tag, **tiles))


def time_all(fs, x, nw, ws, r):
    """µs per call of each function in fs {tag: f}, all timed in one profiler trace: every fused
    kernel carries its tag as its name; the XLA function's kernels are what is left."""
    copies = len(ws)
    for f in fs.values():
        jax.block_until_ready([f(x, nw, w, w3, r) for w, w3 in ws])  # compile + warm up
    calls = 3 * copies

    def run():
        for f in fs.values():
            jax.block_until_ready([f(x, nw, *ws[i % copies], r) for i in range(calls)])
    agg, _, _ = gpu_kernel_times(run)
    out = {tag: sum(v for kk, v in agg.items() if kk.startswith(tag)) / calls for tag in fs if tag != "xla"}
    out["xla"] = sum(v for kk, v in agg.items() if not kk.startswith("lin_")) / calls
    return out


def main():
    res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": []}
    for name, (k, n, norm, swiglu, residual) in OPS.items():
        wbytes = k * n * 2 * (2 if swiglu else 1)
        copies = max(2, -(-150 * 2**20 // wbytes))
        key = jax.random.key(len(name))
        ws = [tuple(0.02 * jax.random.normal(jax.random.fold_in(key, 2 * i + j), (k, n), jnp.bfloat16) for j in (0, 1))
              for i in range(copies)]
        nw = jnp.ones((k,), jnp.bfloat16)
        for m in MS:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            r = jax.random.normal(jax.random.key(m + 1), (m, n), jnp.bfloat16)
            grid = (itertools.product(*GRID) if m in TUNE_MS else [(None, None, None, None)])
            fs, tiles_of = {"xla": xla_op(norm, swiglu, residual)}, {"xla": {}}
            for bn, bk, w, st in grid:
                tag = f"lin_{bn}_{bk}_{w}_{st}"
                tiles_of[tag] = {"block_n": bn, "block_k": bk, "num_warps": w, "num_stages": st}
                fs[tag] = fused_op(norm, swiglu, residual, tag, **tiles_of[tag])
            try:
                times = time_all(fs, x, nw, ws, r)
            except Exception as e:  # noqa: BLE001 - a tile setting that does not compile: time them one by one
                print("together failed:", str(e)[:300], flush=True)
                times = {}
                for tag, f in fs.items():
                    try:
                        times.update({kk: v for kk, v in time_all({tag: f}, x, nw, ws, r).items() if kk == tag})
                    except Exception as e2:  # noqa: BLE001
                        res["rows"].append({"op": name, "m": m, "tag": tag, "error": str(e2)[:200]})
            for tag, us in times.items():
                res["rows"].append({"op": name, "m": m, "impl": "xla" if tag == "xla" else "fused", **tiles_of[tag],
                                    "us": us, "tb_per_s": wbytes / us / 1e6 if us else float("nan")})
            ok = [x for x in res["rows"] if x["op"] == name and x["m"] == m and "us" in x]
            best = min((x for x in ok if x.get("impl") == "fused"), key=lambda x: x["us"], default=None)
            xla = next((x for x in ok if x.get("impl") == "xla"), None)
            print(f"{name:5s} M={m:4d} xla {xla and xla['us']:.2f} us  best fused {best}", flush=True)
            json.dump(res, open(f"{OUT}/linear_time.json", "w"), indent=1)
    # One setting for all five projections (what kernels.LINEAR_* hold): the least total time per M.
    for m in TUNE_MS:
        tot = {}
        for x in res["rows"]:
            if x["m"] == m and x.get("impl") == "fused" and "us" in x:
                key = (x["block_n"], x["block_k"], x["num_warps"], x["num_stages"])
                tot.setdefault(key, {})[x["op"]] = x["us"]
        full = {kk: sum(v.values()) for kk, v in tot.items() if len(v) == len(OPS)}
        xla = sum(x["us"] for x in res["rows"] if x["m"] == m and x.get("impl") == "xla" and "us" in x)
        if full:
            best = min(full, key=full.get)
            res.setdefault("best", {})[str(m)] = {"block_n": best[0], "block_k": best[1], "num_warps": best[2],
                                                   "num_stages": best[3], "us_total": full[best], "xla_us_total": xla}
            print("best for M =", m, res["best"][str(m)], flush=True)
    json.dump(res, open(f"{OUT}/linear_time.json", "w"), indent=1)


if __name__ == "__main__":
    main()
