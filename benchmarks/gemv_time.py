"""Time GPT-XL's decode GEMMs at few rows: XLA's einsum against kernels.small_matmul (split-K
Pallas GEMV) over its tile settings (GPU).

    python3 benchmarks/gemv_time.py     (writes $OUT/gemv_time.json; env GEMV_ROWS=2,16)

Each timing is one jitted loop over enough distinct weight copies (> 150 MB) that L2 never holds
them, every GEMM's output read by one small fusion per pass (as a decode step's next kernel
would), so launch gaps count as they do inside generate's scan. Median of 5 calls after warm-up.
"""
import itertools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.getcwd())
from adsa_jax import kernels  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
E, F, V = 1280, 3584, 16384
SHAPES = {"wqkv": (E, 3 * E), "wo": (E, E), "w13": (E, 2 * F), "w2": (F, E), "head": (E, V)}
MS = tuple(int(x) for x in os.environ.get("GEMV_ROWS", "2,16").split(","))
PASSES = 10
# block_n, block_k, programs aimed at, warps, stages
GRID = list(itertools.product((32, 64, 128), (64, 128, 256), (256, 1024), (4,), (3,)))


def time_loop(mm, x, ws):
    def run(x, ws):
        def body(i, acc):
            ys = [mm(x, w) for w in ws]
            return acc + sum(y[:, :8].astype(jnp.float32) for y in ys)
        return jax.lax.fori_loop(0, PASSES, body, jnp.zeros((x.shape[0], 8), jnp.float32))
    f = jax.jit(run)
    jax.block_until_ready(f(x, ws))
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, ws))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / (PASSES * len(ws)) * 1e6  # µs per GEMM


def main():
    res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": []}
    for m in MS:
        for name, (k, n) in SHAPES.items():
            copies = max(2, -(-150 * 2**20 // (k * n * 2)))
            ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(copies)]
            x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
            mb = k * n * 2 / 1e6
            us = time_loop(lambda x, w: jnp.einsum("BE,EF->BF", x, w), x, ws)
            res["rows"].append({"rows": m, "gemm": name, "impl": "xla", "us": us, "tb_per_s": mb / us})
            print(f"M={m:3d} {name:5s} xla {us:7.2f} us {mb / us:.2f} TB/s", flush=True)
            best = None
            for bn, bk, progs, nw, ns in GRID:
                kernels.GEMV_PROGRAMS = progs
                tiling = kernels.gemv_tiling(k, n, block_n=bn, block_k=bk)
                if tiling is None:
                    continue
                mm = lambda x, w: kernels.small_matmul(x, w, block_n=bn, block_k=bk, splits=tiling[2],  # noqa: E731
                                                       num_warps=nw, num_stages=ns)
                try:
                    us = time_loop(mm, x, ws)
                except Exception as e:  # a tile Triton cannot compile: recorded, not fatal
                    print(f"M={m:3d} {name:5s} {bn},{bk},{tiling[2]} failed: {str(e)[:120]}", flush=True)
                    continue
                row = {"rows": m, "gemm": name, "impl": "pallas", "block_n": bn, "block_k": bk, "splits": tiling[2],
                       "warps": nw, "stages": ns, "us": us, "tb_per_s": mb / us}
                res["rows"].append(row)
                if best is None or us < best["us"]:
                    best = row
            print(f"M={m:3d} {name:5s} best pallas {best}", flush=True)
            del ws
    json.dump(res, open(f"{OUT}/gemv_time.json", "w"), indent=1)


if __name__ == "__main__":
    main()
