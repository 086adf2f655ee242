"""Time the Pallas decode-attention kernel alone over block sizes, warps and stages (GPU).

    python3 benchmarks/kernel_tune.py        (writes $OUT/kernel_tune.json, prints the best)

Shapes: GPT-XL 256 px batch 64 with CFG (128 rows, 20 heads, 257 slots, head_dim 64) at the
average fill (129 slots) for dense, and the adsa-evict 0.5 cache at 384 px (290 slots, per-head
mask, score outputs). Also the XLA attention on the same dense shape, for reference, and
``jax.nn.dot_product_attention(implementation='cudnn')`` (issue 5 asks to try it): cuDNN takes
(B, T, N, H) = (rows, slots, heads, head_dim), so it is timed both on a cache already in that
layout and with the transpose our (B, H, S, D) cache would need every layer and step.
"""
import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from adsa_jax.kernels import decode_attention  # noqa: E402
from adsa_jax.cache import attend  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")


def timeit(f, *args, n=50):
    jax.block_until_ready(f(*args))  # compile and warm up
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            r = f(*args)
        jax.block_until_ready(r)
        ts.append((time.perf_counter() - t0) / n)
    return statistics.median(ts)


def main():
    key = jax.random.key(0)
    b, h, d = 128, 20, 64
    res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": []}
    for case, s, nv, g, score in (("dense_xl256_b64", 257, 129, 1, False), ("evict_xl384_b64", 290, 290, 20, True)):
        ks = jax.random.split(key, 4)
        q = jax.random.normal(ks[0], (b, h, d), jnp.bfloat16)
        k = jax.random.normal(ks[1], (b, h, s, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, h, s, d), jnp.bfloat16)
        mask = jnp.ones((b, g, s), bool)
        tv = jax.random.normal(ks[3], (b, h, d), jnp.float32)
        bytes_read = 2 * b * h * nv * d * 2
        if not score:
            kt, vt = k[:, :, :nv].transpose(0, 2, 1, 3), v[:, :, :nv].transpose(0, 2, 1, 3)  # (B, S, H, D)
            cudnn_native = jax.jit(lambda q, kt, vt: jax.nn.dot_product_attention(
                q[:, None], kt, vt, implementation="cudnn"))
            cudnn_transposed = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                q[:, None], k[:, :, :nv].transpose(0, 2, 1, 3), v[:, :, :nv].transpose(0, 2, 1, 3),
                implementation="cudnn"))
            for impl, f, a in (("cudnn (B,S,H,D) cache", cudnn_native, (q, kt, vt)),
                               ("cudnn + transpose", cudnn_transposed, (q, k, v))):
                try:
                    t = timeit(f, *a)
                    res["rows"].append({"case": case, "impl": impl, "us": t * 1e6, "TBps": bytes_read / t / 1e12})
                except Exception as e:  # noqa: BLE001 - cuDNN may refuse a query length of 1
                    res["rows"].append({"case": case, "impl": impl, "error": repr(e)[:300]})
                print(res["rows"][-1], flush=True)
            xla = jax.jit(lambda q, k, v, m: attend(q, k[:, :, :nv], v[:, :, :nv], m[:, :, :nv]))
            t = timeit(xla, q, k, v, mask)
            res["rows"].append({"case": case, "impl": "xla", "us": t * 1e6, "TBps": bytes_read / t / 1e12})
            print(res["rows"][-1], flush=True)
        for bk, nw, st in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3)):
            f = jax.jit(lambda q, k, v, m, tv, bk=bk, nw=nw, st=st: decode_attention(
                q, k, v, m, nv, score_vec=tv if score else None, block_k=bk, num_warps=nw, num_stages=st))
            try:
                t = timeit(f, q, k, v, mask, tv)
                row = {"case": case, "block_k": bk, "warps": nw, "stages": st, "us": t * 1e6,
                       "TBps": bytes_read / t / 1e12}
            except Exception as e:  # noqa: BLE001
                row = {"case": case, "block_k": bk, "warps": nw, "stages": st, "error": repr(e)[:200]}
            res["rows"].append(row)
            print(row, flush=True)
    json.dump(res, open(f"{OUT}/kernel_tune.json", "w"), indent=1)
    for case in ("dense_xl256_b64", "evict_xl384_b64"):
        ok = [r for r in res["rows"] if r["case"] == case and "us" in r and "block_k" in r]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["us"])
        print("best", best, flush=True)


if __name__ == "__main__":
    main()
