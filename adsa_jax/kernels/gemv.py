"""small_matmul: a split-K GEMV for a decode step's weight GEMMs at 1-16 rows (batch 1-8 with CFG)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..options import GEMV_ROWS, KernelConfig
from .common import pl, plgpu


# Small-row GEMMs (decode at batch 1-8: 2-16 rows with CFG). XLA's GEMMs there read weights at
# ~1.5 TB/s on an H200 (a profile: 25.5 us per GPT-XL layer and step at 2 rows, the bulk of a
# batch-1 step). small_matmul splits the columns and the contraction over enough programs to fill
# the GPU and streams each weight tile once; XLA sums the float32 partials in the consumer's fusion.
# Measured on an H200 (BENCHMARKS.md): GEMMs 20.0 vs 25.3 us per layer and step, GPT-XL 256 px
# batch 1 0.313 vs 0.343 s, batch 8 0.335 vs 0.354. A sweep of warps (2/4/8), stages (2/3/4),
# programs (256/512/1024), K block (32/64/128/256) and column block (32/64/128), one at a time: only
# the K block moved, 64 over 128 (batch 1 0.308 vs 0.314 s, XL-384 0.820 vs 0.832).
# Measured and removed: the step kernel summing the qkv partials (no faster), the RMSNorm inside
# the GEMV (18% slower: each program recomputes the row statistics over all of K), the SwiGLU
# inside the w2 GEMV (1.7x slower: w2's GEMV went from 5.0 to 29.5 us), and the same kernel as a
# GEMM for 17-128 rows (a power-of-two row tile, 32-64 column blocks):
# slower than cuBLAS end to end, GPT-XL 256 px batch 64 0.637-0.682 s against 0.575, batch 32 0.522
# against 0.490, batch 16 0.456 against 0.387 (commit a52fa36).


def _gemv_kernel(x_ref, w_ref, o_ref, *, block_k, k_split, precision):
    # One program = one (column block, K split): x (M, K), w (K, bn) -> partial (M, bn) in f32. The
    # M < GEMV_ROWS rows load as a (GEMV_ROWS, bk) tile, the missing rows masked to 0, so no padded
    # copy of x is made in memory (it cost an XLA kernel per GEMM).
    s = pl.program_id(1)
    m = x_ref.shape[0]
    row0 = pl.program_id(0) * 0  # a traced 0: the tile reaches past x's rows (masked)
    rows_ok = (jnp.arange(GEMV_ROWS) < m)[:, None]

    def body(j, acc):
        start = pl.multiple_of(s * k_split + j * block_k, block_k)
        xb = plgpu.load(x_ref.at[pl.ds(row0, GEMV_ROWS), pl.ds(start, block_k)], mask=rows_ok, other=0.0)  # (Mp, bk)
        wb = w_ref[pl.ds(start, block_k), :]  # (bk, bn)
        return acc + jnp.dot(xb, wb, preferred_element_type=jnp.float32, precision=precision)

    acc = jax.lax.fori_loop(0, k_split // block_k, body, jnp.zeros((GEMV_ROWS, o_ref.shape[-1]), jnp.float32))
    plgpu.store(o_ref.at[pl.ds(row0, GEMV_ROWS), :], acc, mask=rows_ok)


def gemv_tiling(k: int, n: int, *, config: KernelConfig = KernelConfig(), block_n: int | None = None,
                block_k: int | None = None, splits: int | None = None):
    """(block_n, block_k, splits) for small_matmul over a (k, n) weight, or None where the shape does
    not tile (then the caller keeps XLA's GEMM): the most K splits (dividing k's blocks) that keep
    the program count at most ``config.gemv_programs``."""
    bn, bk = block_n or config.gemv_block_n, block_k or config.gemv_block_k
    if n % bn or k % bk:
        return None
    blocks = k // bk
    if splits is None:
        splits = max([d for d in range(1, blocks + 1) if blocks % d == 0 and (n // bn) * d <= config.gemv_programs] or [1])
    elif blocks % splits:
        return None
    return bn, bk, splits


def gemv_partials(x, w, *, config: KernelConfig = KernelConfig(), block_n: int | None = None,
                  block_k: int | None = None, splits: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, interpret: bool = False):
    """x (M, K) @ w (K, N) as (splits, M, N) float32 partial products over K splits (their sum is the
    product), for M <= GEMV_ROWS rows; None where the kernel does not apply (gemv_tiling)."""
    m, kdim = x.shape
    n = w.shape[1]
    tuned = config.gemv_tile(kdim, n) if block_n is block_k is splits is None else ()
    tiling = tuned if tuned != () else gemv_tiling(kdim, n, config=config, block_n=block_n, block_k=block_k,
                                                   splits=splits)
    if tiling is None or m > GEMV_ROWS:
        return None
    bn, bk, sp = tiling
    return pl.pallas_call(
        functools.partial(_gemv_kernel, block_k=bk, k_split=kdim // sp,
                          precision=jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None),
        grid=(n // bn, sp),
        in_specs=[pl.BlockSpec((m, kdim), lambda i, s: (0, 0)),
                  pl.BlockSpec((kdim, bn), lambda i, s: (0, i))],
        out_specs=pl.BlockSpec((None, m, bn), lambda i, s: (s, 0, i)),
        out_shape=jax.ShapeDtypeStruct((sp, m, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or config.gemv_num_warps,
                                             num_stages=num_stages or config.gemv_num_stages),
        interpret=interpret, name="adsa_small_matmul",
    )(x.astype(w.dtype), w)  # (splits, M, N) float32


def small_matmul(x, w, *, config: KernelConfig = KernelConfig(), interpret: bool = False, **tiles):
    """x (M, K) @ w (K, N) -> (M, N) in x's dtype with float32 accumulation, for M <= GEMV_ROWS
    rows (decode GEMMs at small batches). Shapes that do not tile (gemv_tiling) use jnp.dot.
    tiles: gemv_partials' block_n, block_k, splits, num_warps, num_stages."""
    part = gemv_partials(x, w, config=config, interpret=interpret, **tiles)
    if part is None:
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.sum(part, axis=0).astype(x.dtype)  # summed in the consumer's fusion
