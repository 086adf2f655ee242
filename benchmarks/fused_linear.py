"""Experiment (not part of the library): decode projections with RMSNorm, SwiGLU and the residual
add fused into one Pallas (Triton) GEMM kernel per projection, for few rows.

Measured on an H200 (BENCHMARKS.md, session 5; benchmarks/linear_time.py): per projection it is
no faster than XLA's GEMM plus its separate small kernels (53.9 vs 44.6 µs for the five
projections of a GPT-XL step at 2 rows, 84 vs 49 µs at 128 rows), and GPT-XL 256 px batch 1
took 0.458 s with it against 0.372 s without, so the library keeps XLA's einsums. Kept here so the
measurement can be repeated.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Tiles (the best single setting for 2 rows in linear_time.py's sweep on the H200).
LINEAR_BLOCK_K = 256
LINEAR_BLOCK_N = 32
LINEAR_NUM_WARPS = 4
LINEAR_NUM_STAGES = 4


def _linear_kernel(*refs, rows, mp, bk, n_k, norm, swiglu, residual, eps):
    # One program = one block of output columns for every row. refs: x (M, K), [norm weight (K,)],
    # w (K, bn), [w3 (K, bn)], [residual (M, bn)], out (M, bn). Fewer than 16 rows are assembled
    # into a (16, bk) tile in registers (tensor-core dots need 16), so no padded copy of x exists.
    it = iter(refs)
    x_ref = next(it)
    nw_ref = next(it) if norm else None
    w_ref = next(it)
    w3_ref = next(it) if swiglu else None
    r_ref = next(it) if residual else None
    o_ref = next(it)
    ridx = jnp.arange(mp)

    def x_tile(k0):  # (mp, bk) in x's dtype; rows >= M are zero
        if rows == mp:
            return x_ref[:, pl.ds(k0, bk)]
        t = jnp.zeros((mp, bk), x_ref.dtype)
        for r in range(rows):
            t = jnp.where(ridx[:, None] == r, x_ref[r, pl.ds(k0, bk)][None, :], t)
        return t

    if norm:  # RMSNorm statistics over the whole row first (x is small and stays in L2); unrolled,
        # so the loads of x are independent and in flight together
        ss = sum(jnp.sum(jnp.square(x_tile(i * bk).astype(jnp.float32)), axis=1) for i in range(n_k))
        inv = jax.lax.rsqrt(ss / (n_k * bk) + eps)

    def body(i, acc):
        k0 = i * bk
        xs = x_tile(k0)
        if norm:  # as model.rms_norm: normalise in f32, cast back, then scale by the weight
            xs = (xs.astype(jnp.float32) * inv[:, None]).astype(x_ref.dtype) * nw_ref[pl.ds(k0, bk)][None, :]
        a1 = acc[0] + jnp.dot(xs, w_ref[pl.ds(k0, bk), :], preferred_element_type=jnp.float32)
        if swiglu:
            return a1, acc[1] + jnp.dot(xs, w3_ref[pl.ds(k0, bk), :], preferred_element_type=jnp.float32)
        return (a1,)

    bn = o_ref.shape[-1]
    init = tuple(jnp.zeros((mp, bn), jnp.float32) for _ in range(2 if swiglu else 1))
    acc = jax.lax.fori_loop(0, n_k, body, init)
    out = acc[0].astype(o_ref.dtype)
    if swiglu:  # as model.ffn: silu(x w1) * (x w3), each product rounded to the storage dtype first
        h1 = out.astype(jnp.float32)
        out = ((h1 * jax.nn.sigmoid(h1)).astype(o_ref.dtype) * acc[1].astype(o_ref.dtype))
    if rows == mp:
        o_ref[...] = (r_ref[...] + out) if residual else out
        return
    for r in range(rows):  # row r of the tile: a masked sum over the 16 rows
        row = jnp.sum(jnp.where(ridx[:, None] == r, out.astype(jnp.float32), 0.0), axis=0).astype(o_ref.dtype)
        o_ref[r, :] = (r_ref[r, :] + row) if residual else row


def _pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def linear_fusable(rows: int, k: int, n: int, dtype) -> bool:
    """Whether :func:`fused_linear` takes these shapes: 16-bit weights, up to 8 rows or a power
    of two from 16 to 128 (one tile of rows), and K, N with power-of-two divisors >= 16."""
    return (jnp.dtype(dtype).itemsize == 2 and (rows <= 8 or rows in (16, 32, 64, 128))
            and _pow2_divisor(k, LINEAR_BLOCK_K) >= 16
            and _pow2_divisor(n, LINEAR_BLOCK_N) >= 16)


def fused_linear(x, w, *, norm_weight=None, eps: float = 1e-5, w3=None, residual=None, block_n: int | None = None,
                 block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                 interpret: bool = False, name: str = "adsa_fused_linear"):
    """A decode projection with what XLA runs around it fused in, for few rows.

    x (M, K) -> (M, N) in x's dtype: ``rms_norm(x, norm_weight) @ w`` (without ``norm_weight``:
    ``x @ w``), accumulated in float32, then ``silu(.) * (. @ w3)`` when ``w3`` is given (SwiGLU)
    and ``residual + .`` when ``residual`` (M, N) is given. Each program reads one block of
    columns of the weights over all of K, so the weights are read once whatever M (M <= 128).
    Roundings follow :mod:`adsa_jax.model` (products rounded to x's dtype before SwiGLU and the
    residual add).
    """
    m, k = x.shape
    n = w.shape[1]
    if not linear_fusable(m, k, n, w.dtype):
        raise ValueError(f"fused_linear takes 16-bit weights, <= 128 rows and K, N divisible by 16; got x {x.shape}, "
                         f"w {w.shape} {w.dtype}")
    bk = _pow2_divisor(k, block_k or LINEAR_BLOCK_K)
    bn = _pow2_divisor(n, block_n or LINEAR_BLOCK_N)
    mp = max(16, 1 << (m - 1).bit_length())
    if m != mp and m > 8:
        raise ValueError(f"fused_linear takes up to 8 rows or a power of two >= 16, got {m}")
    kern = functools.partial(_linear_kernel, rows=m, mp=mp, bk=bk, n_k=k // bk, norm=norm_weight is not None,
                             swiglu=w3 is not None, residual=residual is not None, eps=eps)
    cols = pl.BlockSpec((k, bn), lambda j: (0, j))
    out_cols = pl.BlockSpec((m, bn), lambda j: (0, j))
    in_specs, args = [pl.BlockSpec((m, k), lambda j: (0, 0))], [x.astype(w.dtype)]
    if norm_weight is not None:
        in_specs.append(pl.BlockSpec((k,), lambda j: (0,)))
        args.append(norm_weight.astype(w.dtype))
    in_specs.append(cols)
    args.append(w)
    if w3 is not None:
        in_specs.append(cols)
        args.append(w3)
    if residual is not None:
        in_specs.append(out_cols)
        args.append(residual.astype(w.dtype))
    return pl.pallas_call(
        kern, grid=(n // bn,), in_specs=in_specs, out_specs=out_cols, out_shape=jax.ShapeDtypeStruct((m, n), w.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or LINEAR_NUM_WARPS,
                                             num_stages=num_stages or LINEAR_NUM_STAGES),
        interpret=interpret, name=name,
    )(*args)
