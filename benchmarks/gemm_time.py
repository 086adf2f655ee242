"""Time GPT-XL's four decode weight GEMMs alone (GPU): `XLA_FLAGS=... python3 benchmarks/gemm_time.py TAG`.

Writes $OUT/gemm_TAG.json, at the rows of batch 1, 64 and 256 with CFG (env GEMM_ROWS=2,128,512).
benchmarks/gemm_time.json holds two such runs (cuBLASLt, XLA's default, and plain cuBLAS) with the
dense call's time under each flag set.
Why: the weight GEMMs are about half of a dense decode step at batch 64 (profiles), so the XLA flags
that pick their kernels (Triton tiling search, cuBLAS) are compared here, one process per flag set.
Device time per GEMM comes from a profiler trace (kernel durations only, no launch gaps), over
enough distinct weight copies (> 150 MB) that L2 never holds them, as in a real step.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_trace import gpu_kernel_times  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
E, F = 1280, 3584
MS = tuple(int(x) for x in os.environ.get("GEMM_ROWS", "2,128,512").split(","))
SHAPES = {"wqkv": (E, 3 * E), "wo": (E, E), "w13": (E, 2 * F), "w2": (F, E)}


def main(tag):
    res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "rows": []}
    mm = jax.jit(lambda x, w: jnp.einsum("BE,EF->BF", x, w))
    for m in MS:
        for name, (k, n) in SHAPES.items():
            copies = max(2, -(-150 * 2**20 // (k * n * 2)))
            ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(copies)]
            x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
            jax.block_until_ready([mm(x, w) for w in ws])  # compile + warm up
            calls = 4 * copies
            kern, _, _ = gpu_kernel_times(lambda: jax.block_until_ready([mm(x, ws[i % copies]) for i in range(calls)]))
            us = sum(kern.values()) / calls
            row = {"rows": m, "gemm": name, "k": k, "n": n, "us": us, "tb_per_s": k * n * 2 / us / 1e6 if us else float("nan"),
                   "kernels": dict(kern.most_common(3))}
            res["rows"].append(row)
            print(f"{tag:10s} M={m:4d} {name:5s} {us:7.2f} us  {row['tb_per_s']:.2f} TB/s  {list(kern)[:2]}", flush=True)
    json.dump(res, open(f"{OUT}/gemm_{tag}.json", "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
