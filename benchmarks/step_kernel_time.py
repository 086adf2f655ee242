"""Time the one-kernel adsa-evict / window decode step alone (GPU): `python3 benchmarks/step_kernel_time.py`.

Writes $OUT/step_kernel_time.json and prints the fastest tiling. GPT-XL 384 px batch 64 shapes with
CFG (128 rows, 20 heads of 64, a full budget-0.5 cache of P 24 + K 216 + M 48 slots), per layer step:
``kernels.evict_step`` (write, pool move, running sum, attention, next victim) over (slots a block x
warps) tilings, its window form (keep = 0), and ``kernels.decode_attention`` with and without the
score terms. ``TILES=32x1,64x2`` times only those tilings. Kernel time only (a profiler trace), so
copies XLA adds around a non-donated aliased call do not count.
"""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gpu_trace import kernel_us_per_call  # noqa: E402

from adsa_jax import kernels  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")


def kernel_us(f, args, n=20):
    # the kernel, not XLA's copies around it
    return sum(v for k, v in kernel_us_per_call(f, args, n).items() if "adsa" in k)


def main():
    b, h, d, c, P, K, M = 128, 20, 64, 1, 24, 216, 48
    s = c + P + K + M
    ks = jax.random.split(jax.random.key(0), 8)
    q, kn, vn = (jax.random.normal(ks[i], (b, h, d), jnp.bfloat16) for i in range(3))
    k = jax.random.normal(ks[3], (b, h, s, d), jnp.bfloat16)
    v = jax.random.normal(ks[4], (b, h, s, d), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, h, s))
    cond_ok = jnp.ones((b, s), bool)
    vsum = jax.random.normal(ks[5], (b, h, d), jnp.float32)
    victim = jnp.full((b, h), c + P + 3, jnp.int32)
    vnorm = jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=-1))  # (B, H, S)
    t = 400  # a full pool: o moves, a victim leaves
    ring0 = c + P + K
    sc = (ring0 + (t - P) % M, ring0 + (t - P) % M, 1, 1, K - 1, ring0 + (t + 1 - P) % M, c + t)
    res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": []}
    bytes_kv = 2 * b * h * s * d * 2
    tiles = [tuple(int(x) for x in t.split("x")) for t in os.environ.get("TILES", "").split(",") if t]
    for bk, w in tiles or [(32, 1), (32, 2), (64, 1), (64, 2), (64, 4), (128, 2), (128, 4), (128, 8), (256, 8)]:
        for keep in (K, 0):
            f = jax.jit(lambda *a, keep=keep, bk=bk, w=w: kernels.evict_step(
                *a[:8], c=c, prefix=P, keep=keep, vsum=a[8] if keep else None, victim=a[9] if keep else None,
                vnorm=a[10] if keep else None, block_k=bk, num_warps=w))
            try:
                us = kernel_us(f, (q, kn, vn, k, v, pos, cond_ok, sc, vsum, victim, vnorm))
                row = {"case": "evict_step" if keep else "evict_step window", "block_k": bk, "warps": w, "us": us,
                       "tb_per_s": bytes_kv / us / 1e6}
            except Exception as e:  # noqa: BLE001 - a tiling that does not compile is a row, not the end
                row = {"case": "evict_step", "block_k": bk, "warps": w, "keep": keep, "error": str(e)[:300]}
            res["rows"].append(row)
            print(row, flush=True)
    mask = jnp.ones((b, h, s), bool)
    for score in (True, False):
        f = jax.jit(lambda q, k, v, m, tv, score=score: kernels.decode_attention(
            q, k, v, m, s, score_vec=tv if score else None))
        us = kernel_us(f, (q, k, v, mask, vsum))
        row = {"case": "decode_attention" + (" + score" if score else ""), "us": us, "tb_per_s": bytes_kv / us / 1e6}
        res["rows"].append(row)
        print(row, flush=True)
    json.dump(res, open(f"{OUT}/step_kernel_time.json", "w"), indent=1)
    best = min((r for r in res["rows"] if r.get("case") == "evict_step" and "us" in r), key=lambda r: r["us"])
    print("best", best)


if __name__ == "__main__":
    main()
