"""Pallas (Triton) decode kernels for GPUs: one query per row and head over a cache, and the
small-batch weight GEMMs.

- :func:`decode_attention`: attention (optionally with ADSA's score terms) for every policy.
- :func:`evict_step`: a whole ``dense`` / ``window`` / ``adsa-evict`` layer step (cache write,
  pool move, running sum, attention, next victim) in one kernel, the cache updated in place; the
  default for those policies except at batch 1-6 with a long cache (:func:`one_kernel_fits`).
- :func:`kth_largest`: the k-th largest logit of each row (top-k's threshold) without a sort.
- :func:`small_matmul`: a split-K GEMV for a decode step's weight GEMMs at 1-16 rows.

Why: XLA computes decode attention as a logits reduction, a softmax and a PV reduction over
the cache slice a static shape allows, so a dense cache is read up to its static length (the
length buckets of ``generate(num_segments=)`` only round that down) and the intermediate
logits go through memory. This kernel reads K and V once, only up to ``n_valid`` (a traced
length), with the softmax online in float32 (flash-decoding with a split over the slots when
there are too few rows and heads to fill the GPU), on the cache's own ``(B, H, S, D)`` layout.

The XLA path (:func:`adsa_jax.policies.attend`) stays the reference: ``interpret=True`` runs
this kernel on any backend for the tests.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from .config import NEG_INF
# Tuning defaults (measured on an H100 by benchmarks/kernel_tune.py; BENCHMARKS.md).
BLOCK_K = 128
NUM_WARPS = 2
NUM_STAGES = 1
# evict_step's blocks (slots) and warps by grid size (programs = row-heads), measured on an H200
# (BENCHMARKS.md, sessions 11-12, GPT-XL unless named):
# - the largest grids, from EVICT_HIGH_ROW_HEADS: 32 / 1 (EVICT_BLOCK_K / EVICT_NUM_WARPS). The kernel
#   is compute-bound there (likely why one warp a block wins: no reduction crosses warps). Session 12:
#   256 px batch 64 dense 0.547 s against 0.575 at 64 / 2 (the earlier default), batch 256 1.372
#   against 1.409, batch 32 (1280 row-heads) 0.478 against 0.490; 384 px batch 64 dense 1.761 against
#   1.844, adsa-evict 0.5 2.067 against 2.219 (64 / 1: 2.130); the kernel alone at adsa-evict 384 px
#   batch 64 71.5 us per layer step against 77.5 (16 / 1: 82.4, 32 / 2: 81.2, 64 / 1: 75.6).
# - below it, from EVICT_MID_ROW_HEADS: 64 / 2. Batch 16 (640 row-heads) 0.387 s against 0.402 at
#   32 / 1 and 0.392 at 128 / 4. Between 640 and 1280 row-heads nothing is measured.
# - below that, from ONE_KERNEL_MIN_ROW_HEADS: 128 / 4. Batch 8 (320) 0.316 s against 0.326 at 64 / 2,
#   0.330 at 256 / 8 and 0.342 at 32 / 1; 384 px 0.804 against 0.857 and 0.844.
# - the smallest grids, where each program's loop over the cache is the step's latency: 256 / 8.
#   Batch 1 (40 row-heads) 0.278 s against 0.303 at 64 / 2 (128 / 4: 0.286, 256 / 4: 0.284, 128 / 8:
#   0.284); GPT-B batch 8 (192) 0.089 against 0.095 (128 / 4: 0.090).
# Triton pipeline stages (2, 3) change nothing (benchmarks/evict_kernel_time.py, 64 / 2).
EVICT_BLOCK_K = 32
EVICT_NUM_WARPS = 1
EVICT_HIGH_ROW_HEADS = 1024
EVICT_HIGH_BLOCK_K = 64
EVICT_HIGH_NUM_WARPS = 2
EVICT_MID_ROW_HEADS = 512
EVICT_MID_BLOCK_K = 128
EVICT_MID_NUM_WARPS = 4
EVICT_SMALL_BLOCK_K = 256
EVICT_SMALL_NUM_WARPS = 8
# adsa-evict / window (EVICT_ONE_KERNEL) and dense (DENSE_ONE_KERNEL) decode steps as one kernel
# per layer step (evict_step) where one_kernel_fits; False keeps the attention kernel with the
# cache writes and pool bookkeeping in XLA. Measured on an H200 (BENCHMARKS.md, sessions 5 and 7),
# GPT-XL batch 64: adsa-evict 0.935 s vs 1.191 s at 256 px and 2.715 vs 2.970 s at 384 px; dense
# 0.730 vs 0.864 s at 256 px and 2.184 vs 2.752 s at 384 px. At small batches too (one program per
# (row, head), no split over slots): dense 256 px batch 1 0.343 s vs 0.360 (XLA attention), batch
# 8 0.353 vs 0.378 (split kernel); adsa-evict 384 px batch 8 0.964 vs 1.247; dense 384 px batch 1
# the exception, 0.873 vs 0.857 (one_kernel_fits). Read when a generate call is traced.
EVICT_ONE_KERNEL = True
DENSE_ONE_KERNEL = True
# One program per (row, head) reads the cache's blocks one after another: with few programs and a
# long cache that loop is the step's latency, where the other path splits the slots over programs.
# Measured on an H200 (BENCHMARKS.md, session 7), one kernel against the other path: faster at 40
# row-heads x 257 slots (GPT-XL 256 px batch 1), 320 x 257, 320 x 577 and adsa-evict 320 x 289;
# level at GPT-B's 24 x 257; 2% slower at 40 x 577 (GPT-XL 384 px batch 1), all with 64-slot blocks
# over 2 warps.
# Session 11, with EVICT_SMALL_BLOCK_K / EVICT_SMALL_NUM_WARPS (256 slots a block over 8 warps): one
# kernel is faster at batch 1 over every cache measured, dense GPT-XL 384 px (577 slots) 0.653 s
# against 0.808, 512 px (1025) 1.232 against 1.473, t2i 512 px (1144) 1.286 against 1.541.
ONE_KERNEL_MIN_ROW_HEADS = 256
ONE_KERNEL_MAX_SLOTS = 1200  # below ONE_KERNEL_MIN_ROW_HEADS; longer caches are not measured
# evict_step applies RoPE to q and k itself (from the projection's output), instead of an XLA
# fusion writing the rotated q/k/v array before each call. Measured on an H200 (BENCHMARKS.md,
# session 7), GPT-XL: dense 256 px batch 64 0.600 vs 0.642 s, batch 256 1.422 vs 1.507 s;
# adsa-evict 384 px batch 64 2.280 vs 2.369 s. False: XLA rotates (kept for A/B runs).
ROPE_IN_KERNEL = True


def _kernel(nv_ref, q_ref, k_ref, v_ref, m_in_ref, *rest, block_k, split_len, scale, with_score):
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
        k = plgpu.load(k_ref.at[pl.ds(start, block_k), :], mask=inb[:, None], other=0.0).astype(jnp.float32)
        ok = inb & (plgpu.load(m_in_ref.at[pl.ds(start, block_k)], mask=inb, other=0) != 0)
        logit = jnp.where(ok, jnp.sum(k * q[None, :], axis=1), NEG_INF)  # (block_k,)
        m_new = jnp.maximum(m, jnp.max(logit))
        corr = jnp.exp(m - m_new)
        p = jnp.where(ok, jnp.exp(logit - m_new), 0.0)
        v = plgpu.load(v_ref.at[pl.ds(start, block_k), :], mask=inb[:, None], other=0.0).astype(jnp.float32)
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


def decode_attention(q, k, v, mask, n_valid, *, score_vec=None, block_k: int | None = None,
                     splits: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                     interpret: bool = False):
    """Softmax attention of one query per (row, head) over the first ``n_valid`` cache slots.

    q (B, H, D); k, v (B, H, S, D); mask (B, G, S) bool with G = 1 or H (False = not attended);
    n_valid: int scalar (traced is fine), slots >= n_valid are neither read nor attended.
    Returns (B, H, D) in v's dtype. Every (row, head) must attend at least one slot.

    score_vec (B, H, D) float32: also return, from the same read of V, ``dots = v_i . score_vec``
    and ``sq = v_i . v_i`` (B, H, S) float32 for every slot i < n_valid (0 elsewhere): the
    terms of ADSA's similarity score, each slot's by one and the same reduction, so identical
    V vectors get identical values.
    """
    b, h, d = q.shape
    s = k.shape[2]
    if d & (d - 1) or d < 16:
        raise ValueError(f"the Pallas decode kernel needs a power-of-two head_dim >= 16, got {d}; use attention='xla'")
    g = mask.shape[1]
    with_score = score_vec is not None
    block_k = block_k or BLOCK_K
    splits = splits or _splits(b * h, s, block_k)
    split_len = -(-(-(-s // splits)) // block_k) * block_k  # ceil(S / splits), rounded up to whole blocks
    kern = functools.partial(_kernel, block_k=block_k, split_len=split_len, scale=1.0 / math.sqrt(d),
                             with_score=with_score)
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
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES),
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


# Its per-block reductions (logits K . q, the victim score V . total, the PV sum) are elementwise
# float32 products reduced in registers. As tensor-core dots (the float32 operand split into three
# bf16 parts) each was slower or level on an H200: the score in session 7 (88.5 against 78.9 us per
# layer step at adsa-evict 384 px batch 64), all three in session 12 (commit a49be2e: score 88.4,
# all three 105.2 against 78.6; dense 256 px batch 64 59.6 against 46.4 with logits and PV, batch 1
# 3.9 against 3.3). The layout conversions into the dot's operands cost more than the products.
def _evict_kernel(ws_ref, ring_ref, mv_ref, full_ref, free_ref, rn_ref, np_ref, q_ref, kn_ref, vn_ref, k_ref, v_ref,
                  pos_ref, cok_ref, *rest, block_k, slots, c, P, K, scale, eps, rope):
    # One program = one (row, head): the whole adsa-evict (or window, K = 0) step of a layer.
    # Scalars: ws = slot of the new token, ring = ring slot of the token o leaving the window,
    # mv = o moves to the pool this step, full = the pool is full, free = the lowest free pool
    # position, rn = next step's ring slot, np = the new token's position; vic = this step's
    # victim slot, found by last step's program while it read V (the first maximum of
    # v_i . total / |v_i| over the pool slots in order, then the ring slot), so no pass over the
    # scores precedes the attention. |v_i| (max(|v_i|, eps)) is cached per slot when the token is
    # written, so the search costs one reduction per block (v . total), not two. Every store comes
    # after the attention loop, whose cross-warp reductions order it after every load: the cache is
    # updated in place (aliased).
    # pos_ref None: the dense cache, whose filled slots are exactly those <= ws.
    # rope: q and k_new come before RoPE, and rope_ref holds this position's (cos, sin) pairs (D,).
    dense = pos_ref is None
    if K:
        vs_ref, vic_ref, nm_ref, *rest = rest
    if rope:
        rope_ref, *rest = rest
    if K:
        o_ref, ko_ref, vo_ref, po_ref, vso_ref, vico_ref, nmo_ref = rest
    elif dense:
        o_ref, ko_ref, vo_ref = rest
    else:
        o_ref, ko_ref, vo_ref, po_ref = rest
    ws, ring, new_pos = ws_ref[()], ring_ref[()], np_ref[()]

    cdt = k_ref.dtype

    def rotated(ref):  # as rope.apply_rope: pairs (2i, 2i + 1) rotated in f32, back to the cache dtype
        lanes_d = jnp.arange(ref.shape[-1])
        x = ref[...].astype(jnp.float32)
        xs = plgpu.load(ref.at[lanes_d ^ 1]).astype(jnp.float32)  # the pair's other element
        cos = plgpu.load(rope_ref.at[(lanes_d // 2) * 2])
        sin = plgpu.load(rope_ref.at[(lanes_d // 2) * 2 + 1])
        return jnp.where(lanes_d % 2 == 0, x * cos - xs * sin, x * cos + xs * sin).astype(cdt)

    q = (rotated(q_ref) if rope else q_ref[...]).astype(jnp.float32) * scale  # (D,)
    k_new, v_new = (rotated(kn_ref) if rope else kn_ref[...]), vn_ref[...]  # (D,) in the cache dtype
    lanes = jnp.arange(block_k)
    n_blocks = ws // block_k + 1 if dense else -(-slots // block_k)  # dense: up to the new token only

    def row(ref, slot):  # one cache row (D,) at a traced slot
        return jnp.sum(plgpu.load(ref.at[pl.ds(slot, 1), :]), axis=0)

    def norm(x):  # max(|v|, eps) in f32, as policies.normalized_v
        x = x.astype(jnp.float32)
        return jnp.maximum(jnp.sqrt(jnp.sum(x * x)), eps)

    def unit(x):
        return x.astype(jnp.float32) / norm(x)

    if K:
        moving, full = mv_ref[()] != 0, full_ref[()] != 0
        k_o, v_o = row(k_ref, ring), row(v_ref, ring)
        p_o = jnp.sum(plgpu.load(pos_ref.at[pl.ds(ring, 1)]))
        n_o, n_new = jnp.sum(plgpu.load(nm_ref.at[pl.ds(ring, 1)])), norm(v_new)  # cached |v_o|; the new token's
        at = vic_ref[()]
        victim = jnp.where(at == ring, K, at - (c + P))  # 0..K-1 a pool position, K = o itself
        vn_o = v_o.astype(jnp.float32) / n_o  # the cached |v|: as unit(v_o), without its reduction
        ev = c + P + jnp.minimum(victim, K - 1)
        vn_ev = jnp.where(victim == K, vn_o, row(v_ref, ev).astype(jnp.float32) / jnp.sum(plgpu.load(nm_ref.at[pl.ds(ev, 1)])))
        total = vs_ref[...] + vn_o
        vsum = jnp.where(moving, jnp.where(full, total - vn_ev, total), vs_ref[...])
        target = jnp.where(full, victim, free_ref[()])
        apply = moving & (target < K)
        dest = jnp.where(apply, c + P + target, -1)  # -1: o is dropped or nothing moves
        rn = rn_ref[()]  # next step's candidates: the pool slots and this ring slot
        v_next = jnp.where(rn == ws, v_new, row(v_ref, rn))
        tvec = vsum + unit(v_next)  # next step's total: its candidates are this cache's pool + ring
        new_is_cand = slots - (c + P + K) == 1  # a ring of one slot: next step's candidate is the new token
    else:
        dest = jnp.int32(-1)

    # This step's writes (the new token at ws, o at its pool slot dest) are not patched into the
    # loaded K and V blocks (selects on every element): both slots are masked in the attention,
    # and the two tokens start the online softmax instead. The victim search scores o in slot ws,
    # where the loaded block still holds it, by the same reduction as every other slot (equal V,
    # equal score: the first-maximum tie rule needs that), and counts it as slot dest.
    f32 = jnp.float32
    lg_new = jnp.sum(k_new.astype(f32) * q)
    if K:
        lg_o = jnp.sum(k_o.astype(f32) * q)
        m0 = jnp.where(apply, jnp.maximum(lg_new, lg_o), lg_new)
        w_new, w_o = jnp.exp(lg_new - m0), jnp.where(apply, jnp.exp(lg_o - m0), 0.0)
        acc0, l0 = w_new * v_new.astype(f32) + w_o * v_o.astype(f32), w_new + w_o
    else:
        m0, acc0, l0 = lg_new, v_new.astype(f32), f32(1.0)

    def body(j, carry):
        acc, m, l, best, at = carry
        start = j * block_k
        idx = start + lanes
        inb = (idx <= ws) if dense else (idx < slots)
        k = plgpu.load(k_ref.at[pl.ds(start, block_k), :], mask=inb[:, None], other=0.0).astype(f32)
        v_raw = plgpu.load(v_ref.at[pl.ds(start, block_k), :], mask=inb[:, None], other=0.0)  # cache dtype
        v = v_raw.astype(f32)
        ok = inb & (idx != ws) & (idx != dest) & (plgpu.load(cok_ref.at[pl.ds(start, block_k)], mask=inb, other=0) != 0)
        if not dense:
            ok = ok & (plgpu.load(pos_ref.at[pl.ds(start, block_k)], mask=inb, other=-1) >= 0)
        logit = jnp.where(ok, jnp.sum(k * q[None, :], axis=1), NEG_INF)
        m_new = jnp.maximum(m, jnp.max(logit))
        corr = jnp.exp(m - m_new)
        pr = jnp.where(ok, jnp.exp(logit - m_new), 0.0)
        if K:  # next step's victim: a running first maximum per lane (no cross-warp reduction
            # per block); lane l holds the best of slots l, l + block_k, ... (lowest slot on ties)
            nrm = plgpu.load(nm_ref.at[pl.ds(start, block_k)], mask=inb, other=1.0)
            cand = inb & (idx >= c + P) & ((idx < c + P + K) | (idx == rn))
            if new_is_cand:  # slot ws holds o (moving to dest) and is next step's candidate (the new
                # token) at once: patch both into V
                v_raw = jnp.where((idx == dest)[:, None], v_o[None, :], jnp.where((idx == ws)[:, None], v_new[None, :], v_raw))
                v = v_raw.astype(f32)
                nrm = jnp.where(idx == dest, n_o, jnp.where(idx == ws, n_new, nrm))
                eff = idx
            else:  # o's V and |v| are still in slot ws of the loaded block: score it there, as the
                # candidate at slot dest (the victim's old V there is no candidate)
                cand = (cand & (idx != dest)) | ((idx == ws) & apply)
                eff = jnp.where(idx == ws, dest, idx)
            vt = jnp.sum(v * tvec[None, :], axis=1)
            sc = jnp.where(cand, vt / nrm, -2e30)
            better = (sc > best) | ((sc == best) & (eff < at))  # ties: the lowest slot
            best, at = jnp.where(better, sc, best), jnp.where(better, eff, at)
        acc = acc * corr + jnp.sum(pr[:, None] * v, axis=0)
        return acc, m_new, l * corr + jnp.sum(pr), best, at

    init = (acc0, m0, l0, jnp.full((block_k,), -3e38, f32), jnp.full((block_k,), slots, jnp.int32))
    acc, m, l, best, at = jax.lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    plgpu.store(ko_ref.at[pl.ds(ws, 1), :], k_new[None, :])
    plgpu.store(vo_ref.at[pl.ds(ws, 1), :], v_new[None, :])
    if not dense:
        plgpu.store(po_ref.at[pl.ds(ws, 1)], jnp.full((1,), new_pos, jnp.int32))
    if K:
        ok_move = (jnp.arange(1) == 0) & apply
        dslot = jnp.maximum(dest, 0)
        plgpu.store(ko_ref.at[pl.ds(dslot, 1), :], k_o[None, :], mask=ok_move[:, None])
        plgpu.store(vo_ref.at[pl.ds(dslot, 1), :], v_o[None, :], mask=ok_move[:, None])
        plgpu.store(po_ref.at[pl.ds(dslot, 1)], jnp.full((1,), p_o, jnp.int32), mask=ok_move)
        plgpu.store(nmo_ref.at[pl.ds(ws, 1)], jnp.full((1,), n_new, jnp.float32))
        plgpu.store(nmo_ref.at[pl.ds(dslot, 1)], jnp.full((1,), n_o, jnp.float32), mask=ok_move)
        vso_ref[...] = vsum
        # The first maximum over all slots: the lowest slot among the lanes holding the maximum.
        vico_ref[...] = jnp.min(jnp.where(best == jnp.max(best), at, slots))


def _dense_kernel(*refs, **kw):
    # evict_step's kernel on a dense cache: no pos ref (12 inputs before cond_ok).
    return _evict_kernel(*refs[:12], None, *refs[12:], **kw)


def evict_tiling(row_heads: int) -> tuple[int, int]:
    """(slots a block, warps) of :func:`evict_step` for a grid of ``row_heads`` programs."""
    if row_heads < ONE_KERNEL_MIN_ROW_HEADS:
        return EVICT_SMALL_BLOCK_K, EVICT_SMALL_NUM_WARPS
    if row_heads < EVICT_MID_ROW_HEADS:
        return EVICT_MID_BLOCK_K, EVICT_MID_NUM_WARPS
    if row_heads < EVICT_HIGH_ROW_HEADS:
        return EVICT_HIGH_BLOCK_K, EVICT_HIGH_NUM_WARPS
    return EVICT_BLOCK_K, EVICT_NUM_WARPS


def one_kernel_fits(rows: int, heads: int, slots: int) -> bool:
    """Whether :func:`evict_step` (one program per (row, head)) is the faster path for a step of
    ``rows`` batch rows (CFG included) x ``heads`` over a cache of ``slots``: enough programs, or a
    short cache."""
    return rows * heads >= ONE_KERNEL_MIN_ROW_HEADS or slots <= ONE_KERNEL_MAX_SLOTS


def evict_step(q, k_new, v_new, k, v, pos, cond_ok, scalars, *, c: int, prefix: int, keep: int, vsum=None,
               victim=None, vnorm=None, qkv=None, rope=None, eps: float = 1e-6, block_k: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None, interpret: bool = False):
    """One adsa-evict (``keep`` > 0, head granularity) or window (``keep`` = 0) decode step of a
    layer in one kernel: write the new token, move the token leaving the window into the pool
    (evicting the highest-score candidate), update the running sum, attend, and compute next
    step's victim from the same read of V. The cache is updated in place.

    q, k_new, v_new (B, H, D); k, v (B, H, S, D); pos (B, H, S) int32 (-1 = empty), or None for
    the dense cache (``keep`` = 0, slots <= ws are the filled ones, only they are read);
    cond_ok (B, S) bool (condition slots of padded captions off); scalars: int32
    (ws, ring, moving, full, free, ring_next, new_pos), see :meth:`adsa_jax.policies.Evict.decode`;
    keep > 0: vsum (B, H, D) f32, victim (B, H) int32, this step's victim slot (from the
    last step; any value before the pool is full), and vnorm (B, H, S) f32, max(|v_i|, eps) of
    every filled slot (written by this kernel with each token, like k and v).
    qkv (B, 3, H, D): q, k_new and v_new stacked as the projection lays them out (pass None for
    the three): the kernel reads its (row, head)'s three vectors in place, so XLA does not copy
    q, k and v into arrays of their own before the call. With ``rope`` (D/2, 2) float32, this
    position's (cos, sin) table row, q and k in qkv are before RoPE: the kernel applies it when
    ROPE_IN_KERNEL is set, otherwise one XLA fusion does before the call.
    Returns (out (B, H, D), k, v, pos) (no pos when pos is None) and, with keep > 0, (vsum, next
    step's victim, vnorm) after them.
    """
    if qkv is not None:
        b, _, h, d = qkv.shape
    else:
        b, h, d = q.shape
    if rope is not None and qkv is None:
        raise ValueError("evict_step: rope= goes with qkv= (q and k before RoPE)")
    if rope is not None and not ROPE_IN_KERNEL:
        from .rope import apply_rope

        rot2 = jnp.broadcast_to(rope, (2,) + rope.shape)  # (2, D/2, 2): one position for q and k
        qkv = jnp.concatenate([apply_rope(qkv[:, :2], rot2), qkv[:, 2:]], axis=1)  # (B, 3, H, D), q and k rotated
        rope = None
    s = k.shape[2]
    tiling = evict_tiling(b * h)
    block_k, num_warps = block_k or tiling[0], num_warps or tiling[1]
    K = keep
    dense = pos is None
    if dense and K:
        raise ValueError("evict_step on a dense cache (pos=None) takes keep=0")
    kern = functools.partial(_dense_kernel if dense else _evict_kernel, block_k=block_k, slots=s, c=c, P=prefix,
                             K=K, scale=1.0 / math.sqrt(d), eps=eps, rope=rope is not None)
    sc = pl.BlockSpec((), lambda i, j: ())
    vec = pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0))
    cache = pl.BlockSpec((None, None, s, d), lambda i, j: (i, j, 0, 0))
    per_slot = pl.BlockSpec((None, None, s), lambda i, j: (i, j, 0))
    if qkv is None:
        vecs, new = [vec] * 3, [q, k_new.astype(k.dtype), v_new.astype(v.dtype)]
    else:  # the same (B, 3, H, D) buffer three times, each spec picking q, k or v of (row, head)
        vecs = [pl.BlockSpec((None, None, None, d), lambda i, j, w=w: (i, w, j, 0)) for w in range(3)]
        new = [qkv.astype(k.dtype)] * 3
    in_specs = [sc] * 7 + vecs + [cache, cache] + ([] if dense else [per_slot])
    in_specs.append(pl.BlockSpec((None, s), lambda i, j: (i, 0)))
    args = [jnp.asarray(x, jnp.int32) for x in scalars] + new + [k, v]
    args += ([] if dense else [pos]) + [cond_ok.astype(jnp.int8)]
    out_specs = [vec, cache, cache] + ([] if dense else [per_slot])
    out_shape = [jax.ShapeDtypeStruct((b, h, d), v.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)] + ([] if dense else [jax.ShapeDtypeStruct(pos.shape, jnp.int32)])
    aliases = {10: 1, 11: 2} if dense else {10: 1, 11: 2, 12: 3}  # k, v (, pos) are updated in place
    if K:
        one = pl.BlockSpec((None, None), lambda i, j: (i, j))
        in_specs += [vec, one, per_slot]
        args += [vsum.astype(jnp.float32), victim.astype(jnp.int32), vnorm.astype(jnp.float32)]
        out_specs += [vec, one, per_slot]
        out_shape += [jax.ShapeDtypeStruct((b, h, d), jnp.float32), jax.ShapeDtypeStruct((b, h), jnp.int32),
                      jax.ShapeDtypeStruct((b, h, s), jnp.float32)]
        aliases.update({14: 4, 15: 5, 16: 6})  # vsum, victim, vnorm
    if rope is not None:  # (D,) = (cos_0, sin_0, cos_1, sin_1, ...), the same for every program
        in_specs.append(pl.BlockSpec((d,), lambda i, j: (0,)))
        args.append(rope.astype(jnp.float32).reshape(d))
    return pl.pallas_call(
        kern, grid=(b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                             num_stages=num_stages or NUM_STAGES),
        interpret=interpret, name="adsa_evict_step",
    )(*args)


# A radix search with 2 or 4 key bits per counting pass (4 or 16 thresholds counted in one reduction,
# 16 or 8 passes) was measured and removed: H200, benchmarks/topk_time.py at commit 6a65392, 16 warps,
# 1 / 64 / 256 rows of 16384: 1 bit 15.1 / 17.4 / 32.2 us, 2 bits 24.3 / 25.9 / 49.6, 4 bits 40.9 /
# 42.3 / 79.0 (BENCHMARKS.md, sessions 11-12). Counting digit 0 too (it always qualifies) made the
# 1-bit form twice as slow in session 11: each pass counts one threshold.
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
    128 rows, 4 above (H200, benchmarks/topk_time.py, session 12, at 1 / 64 rows of 16384: 32 warps
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


# Small-row GEMMs (decode at batch 1-8: 2-16 rows with CFG). XLA's GEMMs there read weights at
# ~1.5 TB/s on an H200 (session 7 profile: 25.5 us per GPT-XL layer and step at 2 rows, the bulk of
# a batch-1 step). small_matmul splits the columns and the contraction over enough programs to fill
# the GPU and streams each weight tile once; XLA sums the float32 partials in the consumer's fusion.
# Measured on an H200 (BENCHMARKS.md, session 8): GEMMs 20.0 vs 25.3 us per layer and step, GPT-XL
# 256 px batch 1 0.313 vs 0.343 s, batch 8 0.335 vs 0.354. Session 9 swept warps (2/4/8), stages
# (2/3/4), programs (256/512/1024), K block (32/64/128/256) and column block (32/64/128) one at a
# time: only the K block moved, 64 over 128 (batch 1 0.308 vs 0.314 s, XL-384 0.820 vs 0.832).
# Also measured in session 9 and removed: the step kernel summing the qkv partials (no faster), the
# RMSNorm inside the GEMV (18% slower: each program recomputes the row statistics over all of K)
# and the SwiGLU inside the w2 GEMV (1.7x slower: w2's GEMV went from 5.0 to 29.5 us). Session 12
# removed the same kernel as a GEMM for 17-128 rows (a power-of-two row tile, 32-64 column blocks):
# slower than cuBLAS end to end, GPT-XL 256 px batch 64 0.637-0.682 s against 0.575, batch 32 0.522
# against 0.490, batch 16 0.456 against 0.387 (commit a52fa36).
GEMV_BLOCK_N = 64
GEMV_BLOCK_K = 64
GEMV_PROGRAMS = 512  # aim: about this many (column block, K split) programs per call
GEMV_NUM_WARPS = 4
GEMV_NUM_STAGES = 3
GEMV_ROWS = 16  # rows load as a tile of this many (the tensor-core dot's least M), the rest masked
# Per weight shape (K, N): (block_n, block_k, splits), or None for XLA's GEMM; shapes not listed
# follow gemv_tiling's rule. Empty: a table from session 8's sweep was no faster end to end.
GEMV_TILES: dict = {}


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


def gemv_tiling(k: int, n: int, *, block_n: int | None = None, block_k: int | None = None,
                splits: int | None = None):
    """(block_n, block_k, splits) for small_matmul over a (k, n) weight, or None where the shape does
    not tile (then the caller keeps XLA's GEMM): the most K splits (dividing k's blocks) that keep
    the program count at most GEMV_PROGRAMS."""
    bn, bk = block_n or GEMV_BLOCK_N, block_k or GEMV_BLOCK_K
    if n % bn or k % bk:
        return None
    blocks = k // bk
    if splits is None:
        splits = max([d for d in range(1, blocks + 1) if blocks % d == 0 and (n // bn) * d <= GEMV_PROGRAMS] or [1])
    elif blocks % splits:
        return None
    return bn, bk, splits


def gemv_partials(x, w, *, block_n: int | None = None, block_k: int | None = None,
                  splits: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                  interpret: bool = False):
    """x (M, K) @ w (K, N) as (splits, M, N) float32 partial products over K splits (their sum is the
    product), for M <= GEMV_ROWS rows; None where the kernel does not apply (gemv_tiling)."""
    m, kdim = x.shape
    n = w.shape[1]
    tuned = GEMV_TILES.get((kdim, n), ()) if block_n is block_k is splits is None else ()
    tiling = tuned if tuned != () else gemv_tiling(kdim, n, block_n=block_n, block_k=block_k, splits=splits)
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
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or GEMV_NUM_WARPS,
                                             num_stages=num_stages or GEMV_NUM_STAGES),
        interpret=interpret, name="adsa_small_matmul",
    )(x.astype(w.dtype), w)  # (splits, M, N) float32


def small_matmul(x, w, *, interpret: bool = False, **tiles):
    """x (M, K) @ w (K, N) -> (M, N) in x's dtype with float32 accumulation, for M <= GEMV_ROWS
    rows (decode GEMMs at small batches). Shapes that do not tile (gemv_tiling) use jnp.dot.
    tiles: gemv_partials' block_n, block_k, splits, num_warps, num_stages."""
    part = gemv_partials(x, w, interpret=interpret, **tiles)
    if part is None:
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.sum(part, axis=0).astype(x.dtype)  # summed in the consumer's fusion


# Batch 1 (session 9 profile): after the wo and w2 GEMVs, XLA runs two small kernels each time, the
# partial sum + residual add and the next RMSNorm (~1.3 + 1.75 us, launch-bound). add_rms_norm does
# both in one kernel, one program per row. GEMV_ADD_NORM (read at trace time): whether a decode
# step on the GEMV uses it. Session 10 (H200, GPT-XL 256 px batch 1): chunks of 8 partials over 8
# warps took 3.2 / 2.8 us (wo's 20 partials / w2's 14), no faster than XLA's two kernels (0.313 vs
# 0.309 s); 16 partials per load over 16 warps: 0.301 vs 0.310 s (32 over 16: 0.303; over 32: 0.310;
# 16 over 8 or 32 warps, 8 or 4 over 16: 0.306-0.313).
GEMV_ADD_NORM = 1
ADD_NORM_CHUNK = 16  # partials summed per load: a (chunk, row) tile
ADD_NORM_NUM_WARPS = 16


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _add_norm_kernel(p_ref, x_ref, w_ref, xo_ref, h_ref, *, n_parts, chunk, eps):
    # One program = one row r: x' = x + sum_s p[s, r] (the sum rounded to x's dtype first, as
    # x + small_matmul(...) is), h = rms_norm(x', w) in model.rms_norm's order. Rows of n columns
    # load as power-of-two tiles, the columns past n masked.
    r = pl.program_id(0)
    z = r * 0  # a traced 0: tiles reach past the arrays' ends (masked), which static starts may not
    n = x_ref.shape[-1]
    cols = _pow2(n)
    col_ok = jnp.arange(cols) < n
    acc = jnp.zeros((cols,), jnp.float32)
    for s0 in range(0, n_parts, chunk):  # unrolled: the loads are independent, issued together
        ok = ((s0 + jnp.arange(chunk)) < n_parts)[:, None] & col_ok[None, :]
        acc = acc + jnp.sum(plgpu.load(p_ref.at[pl.ds(z + s0, chunk), r, pl.ds(z, cols)], mask=ok, other=0.0), axis=0)
    dt = x_ref.dtype
    x = plgpu.load(x_ref.at[r, pl.ds(z, cols)], mask=col_ok, other=0.0)  # (cols,)
    xn = (x.astype(jnp.float32) + acc.astype(dt).astype(jnp.float32)).astype(dt)
    xf = xn.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.sum(xf * xf) / n + eps)).astype(dt)
    w = plgpu.load(w_ref.at[pl.ds(z, cols)], mask=col_ok, other=0.0)
    plgpu.store(xo_ref.at[r, pl.ds(z, cols)], xn, mask=col_ok)
    plgpu.store(h_ref.at[r, pl.ds(z, cols)], (y.astype(jnp.float32) * w.astype(jnp.float32)).astype(dt), mask=col_ok)


def add_rms_norm(parts, x, weight, eps: float, *, interpret: bool = False):
    """parts (S, M, N) float32, x (M, N), weight (N,) -> (x + sum_s parts[s], its RMSNorm times
    weight), both (M, N) in x's dtype, in one kernel; as model.rms_norm(x + sum.astype(x.dtype))."""
    sp, m, n = parts.shape
    return tuple(pl.pallas_call(
        functools.partial(_add_norm_kernel, n_parts=sp, chunk=min(ADD_NORM_CHUNK, _pow2(sp)), eps=eps),
        grid=(m,),
        in_specs=[pl.BlockSpec((sp, m, n), lambda r: (0, 0, 0)), pl.BlockSpec((m, n), lambda r: (0, 0)),
                  pl.BlockSpec((n,), lambda r: (0,))],
        out_specs=[pl.BlockSpec((m, n), lambda r: (0, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((m, n), x.dtype)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=ADD_NORM_NUM_WARPS, num_stages=1),
        interpret=interpret, name="adsa_add_norm",
    )(parts, x, weight.astype(x.dtype)))


def matmul_add_norm(h, w, x, norm_weight, *, eps: float, interpret: bool = False):
    """(x + h @ w, RMSNorm of that times norm_weight) for h (M, K), w (K, N), x (M, N): the GEMV's
    partials summed in add_rms_norm. Where the GEMV does not tile, XLA's dot gives one partial."""
    parts = gemv_partials(h, w, interpret=interpret)
    if parts is None:
        parts = jnp.dot(h, w, preferred_element_type=jnp.float32)[None]  # (1, M, N)
    return add_rms_norm(parts, x, norm_weight, eps, interpret=interpret)


try:  # Pallas is part of jax; an older jax without these Triton APIs keeps attention='xla'
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    pl = plgpu = None


def available() -> bool:
    """Whether this jax has the Pallas Triton API the kernel is written against (jax 0.10/0.11)."""
    return plgpu is not None and all(hasattr(plgpu, n) for n in ("load", "store", "CompilerParams"))
