"""kth_largest: the k-th largest logit of each row (top-k's threshold) without a sort."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .common import pl, plgpu


# A radix search with 2 or 4 key bits per counting pass (4 or 16 thresholds counted in one reduction,
# 16 or 8 passes) was measured and removed: H200, benchmarks/topk_time.py at commit 6a65392, 16 warps,
# 1 / 64 / 256 rows of 16384: 1 bit 15.1 / 17.4 / 32.2 us, 2 bits 24.3 / 25.9 / 49.6, 4 bits 40.9 /
# 42.3 / 79.0. Counting digit 0 too (it always qualifies) made the 1-bit form twice as slow: each
# pass counts one threshold.
def _kth_kernel(k_ref, x_ref, o_ref, *, n):
    # One program = one row: the k-th largest of x (Vp,) by a bitwise binary search over an
    # order-preserving int32 key of each float (32 counting passes over the row in registers,
    # no sort). r is built from the top bit down as an offset from INT32_MIN: the largest
    # threshold T with count(key >= T) >= k is the k-th largest key itself.
    imin = jnp.int32(-(2 ** 31))
    u = jax.lax.bitcast_convert_type(x_ref[...], jnp.int32)
    key = jnp.where(u < 0, u ^ jnp.int32(0x7FFFFFFF), u)  # float order as signed int order (-0.0 < +0.0)
    vp = key.shape[0]
    if n < vp:  # padding lanes never count: every threshold tried is > INT32_MIN
        key = jnp.where(jnp.arange(vp) < n, key, imin)
    k = k_ref[()]

    def body(i, r):
        cand = r | (jnp.int32(1) << (31 - i))
        return jnp.where(jnp.sum((key >= (cand ^ imin)).astype(jnp.int32)) >= k, cand, r)

    kth = jax.lax.fori_loop(0, 32, body, jnp.int32(0)) ^ imin
    o_ref[...] = jax.lax.bitcast_convert_type(jnp.where(kth < 0, kth ^ jnp.int32(0x7FFFFFFF), kth), jnp.float32)


def kth_largest(x, k, *, num_warps: int | None = None, interpret: bool = False):
    """The k-th largest value of each row, counting ties (``sort(x)[::-1][k - 1]``), without a sort.

    x (B, V) float32; k: int scalar (traced is fine) in [1, V]. Returns (B,) float32. For
    top-k sampling, which only needs this threshold (keep every logit >= it): one program per
    row instead of XLA's segmented sort of the whole (B, V) array. num_warps: default 32 up to
    128 rows, 4 above (H200, benchmarks/topk_time.py, at 1 / 64 rows of 16384: 32 warps
    14.3 / 16.0 us, 16 warps 15.1 / 17.4, 4 warps 20.2 / 21.8; at 256 rows 4 warps 30.6, 32 warps
    30.8; XLA's sort 56 / 122 / 320 us).
    """
    b, n = x.shape
    num_warps = num_warps or (32 if b <= 128 else 4)
    vp = 1 << max(n - 1, 1).bit_length()  # Triton blocks are powers of two
    x = x.astype(jnp.float32)
    if vp != n:
        x = jnp.pad(x, ((0, 0), (0, vp - n)))
    return pl.pallas_call(
        functools.partial(_kth_kernel, n=n), grid=(b,),
        in_specs=[pl.BlockSpec((), lambda i: ()), pl.BlockSpec((None, vp), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((None,), lambda i: (i,)), out_shape=jax.ShapeDtypeStruct((b,), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="adsa_kth_largest",
    )(jnp.asarray(k, jnp.int32), x)
