"""decode_attention: softmax attention of one query per (row, head) over a cache, for every policy.

XLA computes decode attention as a logits reduction, a softmax and a PV reduction over the cache
slice a static shape allows, so a dense cache is read up to its static length and the logits go
through memory. This kernel reads K and V once, only up to ``n_valid`` (a traced length), with
the softmax online in float32 (flash-decoding with a split over the slots when there are too few
rows and heads to fill the GPU), on the cache's own ``(B, H, S, D)`` layout. Optionally it also
returns ADSA's score terms from the same read of V.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ..config import NEG_INF
from ..options import KernelConfig
from .common import pl, plgpu, widen


def _kernel(nv_ref, q_ref, k_ref, v_ref, m_in_ref, *rest, block_k, split_len, scale, with_score, by_bits=False):
    # One program = one (row, head, split); refs: q (D,), k/v (S, D), mask (S,) int8, n_valid (),
    # with_score: score vector (D,) in, then per-slot dots and squared norms (S,) out.
    if with_score:
        t_ref, o_ref, m_ref, l_ref, dots_ref, sq_ref = rest
        tvec = t_ref[...]
    else:
        o_ref, m_ref, l_ref = rest
    s = pl.program_id(2)
    lo = s * split_len
    hi = jnp.minimum(lo + split_len, nv_ref[()])
    q = q_ref[...].astype(jnp.float32) * scale  # (D,)
    d = q.shape[0]
    lanes = jnp.arange(block_k)

    def body(j, carry):
        acc, m, l = carry
        start = lo + j * block_k
        idx = start + lanes
        inb = idx < hi
        k = widen(plgpu.load(k_ref.at[pl.ds(start, block_k), :], mask=inb[:, None], other=0.0), by_bits)
        ok = inb & (plgpu.load(m_in_ref.at[pl.ds(start, block_k)], mask=inb, other=0) != 0)
        logit = jnp.where(ok, jnp.sum(k * q[None, :], axis=1), NEG_INF)  # (block_k,)
        m_new = jnp.maximum(m, jnp.max(logit))
        corr = jnp.exp(m - m_new)
        p = jnp.where(ok, jnp.exp(logit - m_new), 0.0)
        v = widen(plgpu.load(v_ref.at[pl.ds(start, block_k), :], mask=inb[:, None], other=0.0), by_bits)
        if with_score:  # ADSA's score terms from the V block already loaded: no second read of the cache
            plgpu.store(dots_ref.at[pl.ds(start, block_k)], jnp.sum(v * tvec[None, :], axis=1), mask=inb)
            plgpu.store(sq_ref.at[pl.ds(start, block_k)], jnp.sum(v * v, axis=1), mask=inb)
        acc = acc * corr + jnp.sum(p[:, None] * v, axis=0)
        return acc, m_new, l * corr + jnp.sum(p)

    n_blocks = jnp.maximum(hi - lo + block_k - 1, 0) // block_k
    init = (jnp.zeros((d,), jnp.float32), jnp.float32(NEG_INF), jnp.float32(0.0))
    acc, m, l = jax.lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _splits(rows: int, slots: int, block_k: int) -> int:
    # Enough programs to fill ~4 waves of a 132-SM GPU; never a split shorter than one block.
    want = max(1, -(-528 // rows))
    return int(min(2 ** math.ceil(math.log2(want)), max(1, -(-slots // block_k))))


def decode_attention(q, k, v, mask, n_valid, *, score_vec=None, config: KernelConfig = KernelConfig(),
                     block_k: int | None = None, splits: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, interpret: bool = False):
    """Softmax attention of one query per (row, head) over the first ``n_valid`` cache slots.

    q (B, H, D); k, v (B, H, S, D); mask (B, G, S) bool with G = 1 or H (False = not attended);
    n_valid: int scalar (traced is fine), slots >= n_valid are neither read nor attended.
    Returns (B, H, D) in v's dtype. Every (row, head) must attend at least one slot.

    score_vec (B, H, D) float32: also return, from the same read of V, ``dots = v_i . score_vec``
    and ``sq = v_i . v_i`` (B, H, S) float32 for every slot i < n_valid (0 elsewhere): the
    terms of ADSA's similarity score, each slot's by one and the same reduction, so identical
    V vectors get identical values. Tiling: ``config``'s block_k, num_warps and num_stages, unless
    given here; splits over the slots by default fill ~4 waves of a 132-SM GPU.
    """
    b, h, d = q.shape
    s = k.shape[2]
    if d & (d - 1) or d < 16:
        raise ValueError(f"the Pallas decode kernel needs a power-of-two head_dim >= 16, got {d}; use attention='xla'")
    g = mask.shape[1]
    with_score = score_vec is not None
    block_k = block_k or config.block_k
    splits = splits or _splits(b * h, s, block_k)
    split_len = -(-(-(-s // splits)) // block_k) * block_k  # ceil(S / splits), rounded up to whole blocks
    kern = functools.partial(_kernel, block_k=block_k, split_len=split_len, scale=1.0 / math.sqrt(d),
                             with_score=with_score, by_bits=config.widen_by_bits)
    per_head = lambda i, j, t: (i, j, 0)  # noqa: E731 - one (row, head) block whatever the split
    in_specs = [
        pl.BlockSpec((), lambda i, j, t: ()),
        pl.BlockSpec((None, None, d), per_head),
        pl.BlockSpec((None, None, s, d), lambda i, j, t: (i, j, 0, 0)),
        pl.BlockSpec((None, None, s, d), lambda i, j, t: (i, j, 0, 0)),
        pl.BlockSpec((None, None, s), per_head if g > 1 else (lambda i, j, t: (i, 0, 0))),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, d), lambda i, j, t: (i, j, t, 0)),
        pl.BlockSpec((None, None, None), lambda i, j, t: (i, j, t)),
        pl.BlockSpec((None, None, None), lambda i, j, t: (i, j, t)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, h, splits, d), jnp.float32),
        jax.ShapeDtypeStruct((b, h, splits), jnp.float32),
        jax.ShapeDtypeStruct((b, h, splits), jnp.float32),
    ]
    args = [jnp.asarray(n_valid, jnp.int32), q, k, v, mask.astype(jnp.int8)]
    if with_score:
        in_specs.append(pl.BlockSpec((None, None, d), per_head))
        args.append(score_vec.astype(jnp.float32))
        # Every split writes its own slot range of the (row, head)'s score block.
        out_specs += [pl.BlockSpec((None, None, s), per_head)] * 2
        out_shape += [jax.ShapeDtypeStruct((b, h, s), jnp.float32)] * 2
    res = pl.pallas_call(
        kern, grid=(b, h, splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or config.num_warps,
                                             num_stages=num_stages or config.num_stages),
        interpret=interpret, name="adsa_decode_attention",
    )(*args)
    o, m, l = res[:3]
    # Combine the splits (flash-decoding): weights exp(m_s - max m), empty splits weigh 0.
    w = jnp.exp(m - jnp.max(m, axis=-1, keepdims=True)) * (l > 0)  # (B, H, splits)
    out = (jnp.einsum("BHs,BHsD->BHD", w, o) / jnp.sum(w * l, axis=-1)[..., None]).astype(v.dtype)
    if with_score:
        if isinstance(n_valid, int) and n_valid >= s:  # every slot was read (adsa-evict): nothing to clear
            return out, res[3], res[4]
        valid = jnp.arange(s) < n_valid  # slots the kernel never read hold garbage: zero them
        return out, jnp.where(valid, res[3], 0.0), jnp.where(valid, res[4], 0.0)
    return out
