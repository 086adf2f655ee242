"""Time evict_step with its per-block reductions as tensor-core dots (kernels.EVICT_DOTS) against
the elementwise float32 form, kernel time only, on GPT-XL shapes (GPU):

    python3 benchmarks/evict_dots_time.py     (writes $OUT/evict_dots_time.json)

Cases: adsa-evict 0.5 and window at 384 px batch 64 (2560 programs, 64 slots / 2 warps), dense at
256 px batch 64, 8 and 1 (2560 / 320 / 40 programs: the three evict_tiling settings), each with
EVICT_DOTS in '', 's', 'l', 'p', 'lp', 'slp'.
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
H, D = 20, 64


def case(batch, slots, keep, c=1, P=24, M=48):
    """evict_step's arguments for GPT-XL at `batch` images with CFG over `slots` cache slots:
    keep > 0 adsa-evict (a full pool, a token moving in), keep = 0 with pos window, pos None dense."""
    b = 2 * batch
    ks = jax.random.split(jax.random.key(0), 6)
    q, kn, vn = (jax.random.normal(ks[i], (b, H, D), jnp.bfloat16) for i in range(3))
    k, v = (jax.random.normal(ks[3 + i], (b, H, slots, D), jnp.bfloat16) for i in range(2))
    cond_ok = jnp.ones((b, slots), bool)
    if keep is None:  # dense: the new token at slot 200 (slots up to it are read)
        return (q, kn, vn, k, v, None, cond_ok, (200, 0, 0, 0, 0, 0, 200)), dict(c=c, prefix=0, keep=0)
    pos = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (b, H, slots))
    t, ring0 = 400, c + P + keep
    sc = (ring0 + (t - P) % M, ring0 + (t - P) % M, 1, 1, max(keep - 1, 0), ring0 + (t + 1 - P) % M, c + t)
    kw = dict(c=c, prefix=P, keep=keep)
    if keep:
        kw.update(vsum=jax.random.normal(ks[5], (b, H, D), jnp.float32), victim=jnp.full((b, H), c + P + 3, jnp.int32),
                  vnorm=jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=-1)))
    return (q, kn, vn, k, v, pos, cond_ok, sc), kw


def main():
    res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": []}
    cases = {"adsa-evict XL-384 b64": case(64, 289, 216), "window XL-384 b64": case(64, 289, 0),
             "dense XL-256 b64": case(64, 257, None), "dense XL-256 b8": case(8, 257, None),
             "dense XL-256 b1": case(1, 257, None)}
    for name, (args, kw) in cases.items():
        for dots in ("", "s", "l", "p", "lp", "slp"):
            if "s" in dots and not kw["keep"]:
                continue
            kernels.EVICT_DOTS = dots
            f = jax.jit(lambda *a, kw=kw: kernels.evict_step(*a, **kw))
            try:
                row = {"case": name, "dots": dots, "us": sum(v for n, v in kernel_us_per_call(f, args).items() if "adsa" in n)}
            except Exception as e:  # noqa: BLE001
                row = {"case": name, "dots": dots, "error": str(e)[:300]}
            res["rows"].append(row)
            print(row, flush=True)
    kernels.EVICT_DOTS = ""
    json.dump(res, open(f"{OUT}/evict_dots_time.json", "w"), indent=1)


if __name__ == "__main__":
    main()
