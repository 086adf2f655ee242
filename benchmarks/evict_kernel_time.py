"""Time adsa-evict's decode kernels alone on GPT-XL 384 px batch 64 shapes (GPU), kernel time only.

    python3 benchmarks/evict_kernel_time.py     (writes $OUT/evict_kernel_time.json, prints the best)

Compares, per layer and step: the one-kernel step (`evict_step`: write, pool move, running sum,
attention, next victim) over block sizes and warps, its window form (keep = 0), and the attention
kernel with score terms that the unfused path runs (`decode_attention(score_vec=)`), whose
bookkeeping then costs ~10 more small XLA kernels. Kernel durations come from a profiler trace,
so copies XLA adds around a non-donated aliased call do not count.
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


def kernel_us(f, args, n=20, everything=False):
    # the kernel, not XLA's copies around it (everything: all kernels, e.g. an XLA RoPE fusion)
    return sum(v for k, v in kernel_us_per_call(f, args, n).items() if everything or "adsa" in k)


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
    # TILES="32x1,64x1": these (block_k x warps) only, and none of the sections after the sweep
    tiles = [tuple(int(x) for x in t.split("x")) for t in os.environ.get("TILES", "").split(",") if t]
    for bk, w in tiles or [(32, 1), (32, 2), (64, 1), (64, 2), (64, 4), (128, 2), (128, 4), (128, 8)]:
        for keep in (K, 0):
            f = jax.jit(lambda *a, keep=keep, bk=bk, w=w: kernels.evict_step(
                *a[:8], c=c, prefix=P, keep=keep, vsum=a[8] if keep else None, victim=a[9] if keep else None,
                vnorm=a[10] if keep else None, block_k=bk, num_warps=w))
            try:
                us = kernel_us(f, (q, kn, vn, k, v, pos, cond_ok, sc, vsum, victim, vnorm))
                row = {"case": "evict_step" if keep else "evict_step window", "block_k": bk, "warps": w, "us": us,
                       "tb_per_s": bytes_kv / us / 1e6}
            except Exception as e:  # noqa: BLE001
                row = {"case": "evict_step", "block_k": bk, "warps": w, "keep": keep, "error": str(e)[:300]}
            res["rows"].append(row)
            print(row, flush=True)
    if tiles:
        json.dump(res, open(f"{OUT}/evict_kernel_time.json", "w"), indent=1)
        return
    # Software-pipelined loads (Triton's num_stages) at 64 / 2 (session 12: no change at 2 or 3).
    for st in (2, 3):
        for keep in (K, 0):
            f = jax.jit(lambda *a, keep=keep, st=st: kernels.evict_step(
                *a[:8], c=c, prefix=P, keep=keep, vsum=a[8] if keep else None, victim=a[9] if keep else None,
                vnorm=a[10] if keep else None, block_k=64, num_warps=2, num_stages=st))
            try:
                us = kernel_us(f, (q, kn, vn, k, v, pos, cond_ok, sc, vsum, victim, vnorm))
                row = {"case": "evict_step" if keep else "evict_step window", "block_k": 64, "warps": 2, "stages": st,
                       "us": us, "tb_per_s": bytes_kv / us / 1e6}
            except Exception as e:  # noqa: BLE001
                row = {"case": "evict_step", "stages": st, "keep": keep, "error": str(e)[:300]}
            res["rows"].append(row)
            print(row, flush=True)
    # kernels.ROPE_IN_KERNEL on the q/k/v-in-one-array input, blocks of 64, 2 warps; "all_us" counts
    # XLA's RoPE fusion too (what ROPE_IN_KERNEL removes).
    from adsa_jax.rope import rope_table

    qkv = jnp.stack([q, kn, vn], axis=1)  # (B, 3, H, D), before RoPE
    rot = jnp.asarray(rope_table(24, d, 10000.0, c)[c + 100])  # (D/2, 2)
    for rope_in in (False, True):
        kernels.ROPE_IN_KERNEL = rope_in
        for keep in (K, 0):
            f = jax.jit(lambda *a, keep=keep: kernels.evict_step(
                None, None, None, *a[:5], c=c, prefix=P, keep=keep, vsum=a[5] if keep else None,
                victim=a[6] if keep else None, vnorm=a[7] if keep else None, qkv=a[8], rope=a[9], block_k=64,
                num_warps=2))
            args = (k, v, pos, cond_ok, sc, vsum, victim, vnorm, qkv, rot)
            row = {"case": ("evict_step" if keep else "evict_step window") + " qkv",
                   "rope_in_kernel": rope_in, "us": kernel_us(f, args), "all_us": kernel_us(f, args, everything=True)}
            res["rows"].append(row)
            print(row, flush=True)
    kernels.ROPE_IN_KERNEL = True
    mask = jnp.ones((b, h, s), bool)
    for score in (True, False):
        f = jax.jit(lambda q, k, v, m, tv, score=score: kernels.decode_attention(
            q, k, v, m, s, score_vec=tv if score else None))
        us = kernel_us(f, (q, k, v, mask, vsum))
        row = {"case": "decode_attention" + (" + score" if score else ""), "us": us, "tb_per_s": bytes_kv / us / 1e6}
        res["rows"].append(row)
        print(row, flush=True)
    json.dump(res, open(f"{OUT}/evict_kernel_time.json", "w"), indent=1)
    best = min((r for r in res["rows"] if r.get("case") == "evict_step" and "us" in r), key=lambda r: r["us"])
    print("best", best)


if __name__ == "__main__":
    main()
