"""top_indices: the indices of each row's s largest values, as ``lax.top_k`` orders them, without a sort."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from .common import pl, plgpu

_IMIN = -(2 ** 31)


def _top_kernel(x_ref, o_ref, *, n, s):
    # One program = a block of rows held in registers. s rounds, each taking the largest remaining
    # value of every row (its lowest index on ties) and striking it out: lax.top_k's indices, in
    # its order (descending, ties by lower index), from 2s row reductions instead of a sort of
    # the row. Floats are compared as order-preserving int32 keys (lax.top_k's total order:
    # -0.0 < +0.0, NaN above +inf); padding lanes and struck lanes hold INT32_MIN, which no float's key is.
    u = jax.lax.bitcast_convert_type(x_ref[...], jnp.int32)  # (R, NP)
    key = jnp.where(u < 0, u ^ jnp.int32(0x7FFFFFFF), u)
    lanes = jnp.arange(key.shape[1])[None, :]
    key = jnp.where(lanes < n, key, jnp.int32(_IMIN))
    cols = jnp.arange(o_ref.shape[1])[None, :]

    def body(r, carry):
        key, out = carry
        m = jnp.max(key, axis=1)  # (R,)
        idx = jnp.min(jnp.where(key == m[:, None], lanes, key.shape[1]), axis=1)  # the first maximum
        out = jnp.where(cols == r, idx[:, None], out)
        return jnp.where(lanes == idx[:, None], jnp.int32(_IMIN), key), out

    _, out = jax.lax.fori_loop(0, s, body, (key, jnp.zeros(o_ref.shape, jnp.int32)))
    o_ref[...] = out


def top_indices(x, s: int, *, rows_per_program: int | None = None, num_warps: int = 4, interpret: bool = False):
    """The indices of the ``s`` largest values of each row of x (..., n), in ``lax.top_k``'s order
    (descending, equal values by lower index): ``lax.top_k(x, s)[1]`` without its sort of every
    row. x float32; s a static int in [1, n]. For adsa-evict's leaving step (period s > 1),
    where the rows are many and short (every layer, row and head; the pool and the s leaving
    tokens) and s is small: each program strikes out s maxima in registers. rows_per_program:
    default 16, fewer for rows over 256 wide (about 4,096 values a program, 32 a thread over 4
    warps: GPT-XL 384 px at budget 0.5 compiles to 96 registers a thread, no spills)."""
    *lead, n = x.shape
    if not 1 <= s <= n:
        raise ValueError(f"top_indices: s must be in [1, {n}], got {s}")
    rows = math.prod(lead)
    np_, sp = 1 << max(n - 1, 1).bit_length(), 1 << max(s - 1, 1).bit_length()  # Triton blocks: powers of two
    r = rows_per_program or max(1, min(16, 4096 // np_))
    rows_p = -(-rows // r) * r
    flat = jnp.pad(x.astype(jnp.float32).reshape(rows, n), ((0, rows_p - rows), (0, np_ - n)))  # (rows_p, NP)
    out = pl.pallas_call(
        functools.partial(_top_kernel, n=n, s=s), grid=(rows_p // r,),
        in_specs=[pl.BlockSpec((r, np_), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((r, sp), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((rows_p, sp), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="adsa_top_indices",
    )(flat)
    return out[:rows, :s].reshape(tuple(lead) + (s,))
