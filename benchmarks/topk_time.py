"""Time the sampler's top-k filter alone, sort against kth_largest (GPU): `python3 benchmarks/topk_time.py`.

Writes $OUT/topk_time.json: kernel time per call of top-k 2000 over 16384 logits by XLA's sort (what
runs with top-p on) against the k-th largest from ``kernels.kth_largest`` (top-p off), over its
warps, at 1, 64 and 256 rows. Also checks that both give the same filtered logits on these inputs.
"""
import functools
import json
import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gpu_trace import kernel_us_per_call  # noqa: E402

from adsa_jax import kernels  # noqa: E402
from adsa_jax.sampling import filter_logits  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")


def kernel_us(f, args, n=20):
    return sum(kernel_us_per_call(f, args, n).values())


def main():
    res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": []}
    for rows in (1, 64, 256):  # images after the CFG combine: batch 1, 64, 256
        x = 3.0 * jax.random.normal(jax.random.key(rows), (rows, 16384), jnp.float32)
        ref = jax.jit(functools.partial(filter_logits, temperature=1.0, top_k=2000, top_p=1.0))
        r = {"rows": rows, "sort_top_p_on_us": kernel_us(ref, (x,))}
        srt = jax.jit(functools.partial(filter_logits, temperature=1.0, top_k=2000, top_p=1.0, top_p_on=False))
        r["sort_top_p_off_us"] = kernel_us(srt, (x,))
        want = np.asarray(ref(x))
        for w in (4, 8, 16, 32):
            kernels_kth = functools.partial(kernels.kth_largest, num_warps=w)
            f = jax.jit(lambda a, kk=kernels_kth: jnp.where(a >= kk(a, 2000)[:, None], a, -1e30))
            r[f"kth_warps{w}_us"] = kernel_us(f, (x,))
            r[f"kth_warps{w}_equal"] = bool((np.asarray(f(x)) == want).all())
        print(r, flush=True)
        res["rows"].append(r)
    json.dump(res, open(f"{OUT}/topk_time.json", "w"), indent=1)


if __name__ == "__main__":
    main()
