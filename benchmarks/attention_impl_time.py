"""Time decode attention alone, Pallas against XLA and cuDNN (GPU): `python3 benchmarks/attention_impl_time.py`.

Writes $OUT/attention_impl_time.json: kernel time per call of our Pallas kernel, the XLA reference
and cuDNN's fused attention (``jax.nn.dot_product_attention(implementation='cudnn')``). One query
per (row, head) over a cache of S slots of which the first n are filled (GPT-XL: 20 heads of 64).
Pallas and XLA read the cache in our (B, H, S, D) layout; cuDNN wants (B, S, H, D), measured in that
layout (what adopting it would need), with ``key_value_seq_lengths = n``. Kernel time (all GPU
kernels of the call) from a profiler trace.
"""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gpu_trace import kernel_us_per_call  # noqa: E402

from adsa_jax.cache import attend  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")


def kernel_us(f, args, n=20):
    per = kernel_us_per_call(f, args, n)
    return sum(per.values()), per


def main():
    res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": []}
    h, d = 20, 64
    for b, s, n in ((2, 257, 129), (128, 257, 129), (128, 577, 289), (512, 257, 129)):
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (b, h, d), jnp.bfloat16)
        k = jax.random.normal(ks[1], (b, h, s, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, h, s, d), jnp.bfloat16)
        mask = (jnp.arange(s) < n)[None, None, :]
        nv = jnp.int32(n)
        cases = {
            "pallas": (jax.jit(lambda q, k, v, nv: attend(q, k, v, jnp.arange(s)[None, None] < nv, "pallas", nv)),
                       (q, k, v, nv)),
            "xla_full": (jax.jit(lambda q, k, v: attend(q, k, v, mask, "xla")), (q, k, v)),
            "xla_filled": (jax.jit(lambda q, k, v: attend(q, k[:, :, :n], v[:, :, :n], mask[..., :n], "xla")),
                           (q, k, v)),
        }
        kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # (B, S, H, D)
        lens = jnp.full((b,), n, jnp.int32)
        cases["cudnn_BSHD"] = (jax.jit(lambda q, k, v, lens: jax.nn.dot_product_attention(
            q[:, None], k, v, key_value_seq_lengths=lens, implementation="cudnn")[:, 0]), (q, kt, vt, lens))
        # Our (B, H, S, D) cache seen as (B, S, H, D): does XLA hand cuDNN the strides or copy?
        cases["cudnn_BHSD_view"] = (jax.jit(lambda q, k, v, lens: jax.nn.dot_product_attention(
            q[:, None], jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), key_value_seq_lengths=lens,
            implementation="cudnn")[:, 0]), (q, k, v, lens))
        ref = cases["xla_filled"][0](q, k, v).astype(jnp.float32)
        for name, (f, args) in cases.items():
            row = {"rows": b, "slots": s, "filled": n, "impl": name}
            try:
                out = f(*args).astype(jnp.float32)
                row["max_abs_diff_vs_xla"] = float(jnp.max(jnp.abs(out - ref)))
                row["us"], row["kernels"] = kernel_us(f, args)
                row["TBps_filled"] = 2 * b * h * n * d * 2 / row["us"] / 1e6
            except Exception as e:  # noqa: BLE001 - cuDNN may refuse a shape: record why
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            res["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "kernels" or name.startswith("cudnn")}), flush=True)
    json.dump(res, open(f"{OUT}/attention_impl_time.json", "w"), indent=1)


if __name__ == "__main__":
    main()
