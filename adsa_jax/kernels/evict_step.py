"""evict_step: a whole ``dense`` / ``window`` / ``adsa-evict`` layer step in one kernel (cache write,
pool move, running sum, attention, next step's victim), the cache updated in place; the default
for those policies where :meth:`adsa_jax.options.KernelConfig.one_kernel_fits`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ..config import NEG_INF
from ..options import KernelConfig
from ..rope import apply_rope
from .common import pl, plgpu, widen


# Its per-block reductions (logits K . q, the victim score V . total, the PV sum) are elementwise
# float32 products reduced in registers. As tensor-core dots (the float32 operand split into three
# bf16 parts) each was slower or level on an H200: the score alone (88.5 against 78.9 us per
# layer step at adsa-evict 384 px batch 64), all three (commit a49be2e: score 88.4,
# all three 105.2 against 78.6; dense 256 px batch 64 59.6 against 46.4 with logits and PV, batch 1
# 3.9 against 3.3). The layout conversions into the dot's operands cost more than the products.
# Measured and removed (commit 14427b1): scoring only the blocks that can hold a candidate (the
# pool's, slot ws's, slot rn's), by a branch per block or by the loop cut in three, skips up to 2 of 5
# blocks' scores at 384 px, 0.25, but takes 153-158 registers against 149: H100, 384 px batch 64,
# head, 0.25 1.597 and 1.593 s a call against 1.592; 0.5 2.024 against 2.018 (2026-12-05).
def _evict_kernel(ws_ref, ring_ref, mv_ref, full_ref, free_ref, rn_ref, np_ref, a_ref, blo_ref, bhi_ref, q_ref, kn_ref,
                  vn_ref, k_ref, v_ref, pos_ref, cok_ref, *rest, block_k, slots, c, P, K, scale, eps, rope, score=False,
                  layer=False, next_new=False, scoring=None, by_bits=False, apart=False):
    # One program = one (row, head): the whole adsa-evict (or window, K = 0) step of a layer.
    # Scalars: ws = slot of the new token, ring = ring slot of the token o leaving the window,
    # mv = o moves to the pool this step, full = the pool is full, free = the lowest free pool
    # position, rn = next step's ring slot, np = the new token's position; a, blo, bhi: the slots
    # that can hold a token, [0, a) and [blo, bhi) (the cache fills its prefix, pool and ring in
    # slot order): only those are read, as the roofline floor counts (the dense cache: [0, ws]).
    # Every filled slot and this step's writes lie in them. vic = this step's
    # victim slot, found by last step's program while it read V (the first maximum of
    # v_i . total / |v_i| over the pool slots in order, then the ring slot), so no pass over the
    # scores precedes the attention. |v_i| (max(|v_i|, eps)) is cached per slot when the token is
    # written, so the search costs one reduction per block (v . total), not two. Every store comes
    # after the attention loop, whose cross-warp reductions order it after every load: the cache is
    # updated in place (aliased).
    # pos_ref None: the dense cache, whose filled slots are exactly those <= ws.
    # rope: q and k_new come before RoPE, and rope_ref holds this position's (cos, sin) pairs (D,).
    # score (window form, K = 0): sv_ref (D,) a score vector in; dots_ref, sq_ref (S,) out (aliased to
    # the two inputs after sv_ref), v_i . sv and v_i . v_i of every slot read, after this step's write
    # (the XLA bookkeeping's score terms for next step, from this step's read of V); a slot not read
    # keeps its input terms.
    # layer (K > 0, layer granularity): the row's victim (vic: 0..K-1 a pool position, K or more o
    # itself) and the layer vector's |v|^2 of o, of the victim and of next step's leaving token (nm,
    # 4 lanes, the last unused; the kernel takes max(|v|, eps)) come from XLA, which chose the victim
    # from the score terms; vs is this head's slice of the row's running sum. The step moves o,
    # updates vs and returns next step's score terms
    # (dots, sq as the window form's, against vs + v_next / |v_next|) instead of searching a victim;
    # a slot's sq (|v|^2) is written with its token (the new one at ws, o's own at dest), not
    # recomputed every step: one reduction per slot fewer.
    # next_new (score or layer): the new token is one of next step's candidates (a ring of one
    # slot; at period s, a ring of s slots before a leaving step).
    dense = pos_ref is None
    if K:
        vs_ref, vic_ref, nm_ref, *rest = rest
    if rope:
        rope_ref, *rest = rest
    if score:
        sv_ref, _, _, *rest = rest  # then the old terms, only aliased
    if layer:
        _, sq_in, *rest = rest  # the old terms (aliased); o's |v|^2 is read from them
        o_ref, ko_ref, vo_ref, po_ref, vso_ref, dots_ref, sq_ref = rest
    elif K:
        o_ref, ko_ref, vo_ref, po_ref, vso_ref, vico_ref, nmo_ref = rest
    elif dense:
        o_ref, ko_ref, vo_ref = rest
    elif score:
        o_ref, ko_ref, vo_ref, po_ref, dots_ref, sq_ref = rest
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
    # One condition slot (c2i's class token) is read on its own, before the loop: a sparse cache of
    # 1 + 32m slots (c2i at 0.5: 129, 289, 513 slots) then loops over whole blocks of image slots once full,
    # not over one more block holding a single slot. Loop iterations per call, GPT-XL at 32-slot
    # blocks: 256 px 0.5 -16 %, 0.25 -31 %; 384 px 0.5 -7 %; 512 px 0.25 -11 % (timed only together with
    # reading filled slots: 384 px batch 64 0.5, adsa-evict 2.07 -> 1.75 s, window 1.80 -> 1.54 s).
    first = 1 if c == 1 and not dense else 0
    if dense:  # up to the new token only
        n_a, a_end, b_lo, b_hi = ws // block_k + 1, ws + 1, 0, 0
    else:
        a_end, b_lo, b_hi = a_ref[()], blo_ref[()], bhi_ref[()]
        # A gap under one block between the two ranges: read one range across it (its empty slots are
        # masked as before), not two partial blocks.
        one = b_lo - a_end < block_k
        a_end, b_hi = jnp.where(one, jnp.maximum(b_hi, a_end), a_end), jnp.where(one, b_lo, b_hi)
        n_a = (a_end - first + block_k - 1) // block_k
    n_blocks = n_a + (b_hi - b_lo + block_k - 1) // block_k

    def row(ref, slot):  # one cache row (D,) at a traced slot
        return jnp.sum(plgpu.load(ref.at[pl.ds(slot, 1), :]), axis=0)

    def norm(x):  # max(|v|, eps) in f32, as cache.layout.normalized_v
        x = x.astype(jnp.float32)
        return jnp.maximum(jnp.sqrt(jnp.sum(x * x)), eps)

    def unit(x):
        return x.astype(jnp.float32) / norm(x)

    if K:
        moving, full = mv_ref[()] != 0, full_ref[()] != 0
        k_o, v_o = row(k_ref, ring), row(v_ref, ring)
        p_o = jnp.sum(plgpu.load(pos_ref.at[pl.ds(ring, 1)]))
        if layer:
            victim = jnp.minimum(vic_ref[()], K)
            sq_o = jnp.sum(plgpu.load(sq_in.at[pl.ds(ring, 1)]))  # o's |v|^2, moving with it
        else:
            at = vic_ref[()]
            victim = jnp.where(at == ring, K, at - (c + P))  # 0..K-1 a pool position, K = o itself
        ev = c + P + jnp.minimum(victim, K - 1)
        if layer:
            # max(|v|, eps) here: as an XLA epilogue the sqrt cost a kernel launch per layer
            norms = jnp.maximum(jnp.sqrt(plgpu.load(nm_ref.at[pl.ds(0, 4)])), eps)  # (4,)
            n_o, n_ev, n_next = (jnp.sum(jnp.where(jnp.arange(4) == i, norms, 0.0)) for i in range(3))
        else:  # the cached |v| of o and of the victim; the new token's
            n_o, n_new = jnp.sum(plgpu.load(nm_ref.at[pl.ds(ring, 1)])), norm(v_new)
            n_ev = jnp.sum(plgpu.load(nm_ref.at[pl.ds(ev, 1)]))
        vn_o = v_o.astype(jnp.float32) / n_o  # the cached |v|: as unit(v_o), without its reduction
        vn_ev = jnp.where(victim == K, vn_o, row(v_ref, ev).astype(jnp.float32) / n_ev)
        total = vs_ref[...] + vn_o
        vsum = jnp.where(moving, jnp.where(full, total - vn_ev, total), vs_ref[...])
        target = jnp.where(full, victim, free_ref[()])
        apply = moving & (target < K)
        dest = jnp.where(apply, c + P + target, -1)  # -1: o is dropped or nothing moves
        rn = rn_ref[()]  # next step's candidates: the pool slots and this ring slot
        v_next = jnp.where(rn == ws, v_new, row(v_ref, rn))
        # next step's total: its candidates are this cache's pool + ring
        tvec = vsum + (v_next.astype(jnp.float32) / n_next if layer else unit(v_next))
        new_is_cand = slots - (c + P + K) == 1  # a ring of one slot: next step's candidate is the new token
    else:
        dest = jnp.int32(-1)

    # This step's writes (the new token at ws, o at its pool slot dest) are not patched into the
    # loaded K and V blocks (selects on every element): both slots are masked in the attention,
    # and the two tokens start the online softmax instead. The victim search scores o in slot ws,
    # where the loaded block still holds it, by the same reduction as every other slot (equal V,
    # equal score: the first-maximum tie rule needs that), and counts it as slot dest.
    f32 = jnp.float32
    if score or layer:
        svec = tvec if layer else sv_ref[...]
    lg_new = jnp.sum(k_new.astype(f32) * q)
    if K:
        lg_o = jnp.sum(k_o.astype(f32) * q)
        m0 = jnp.where(apply, jnp.maximum(lg_new, lg_o), lg_new)
        w_new, w_o = jnp.exp(lg_new - m0), jnp.where(apply, jnp.exp(lg_o - m0), 0.0)
        acc0, l0 = w_new * v_new.astype(f32) + w_o * v_o.astype(f32), w_new + w_o
    else:
        m0, acc0, l0 = lg_new, v_new.astype(f32), f32(1.0)
    if first:  # the condition slot joins the online softmax (it is never written, moved or scored)
        ok_c = (jnp.sum(plgpu.load(cok_ref.at[pl.ds(0, 1)])) != 0) & (jnp.sum(plgpu.load(pos_ref.at[pl.ds(0, 1)])) >= 0)
        lg_c = jnp.where(ok_c, jnp.sum(row(k_ref, 0).astype(f32) * q), NEG_INF)
        m_c = jnp.maximum(m0, lg_c)
        w_c, corr_c = jnp.where(ok_c, jnp.exp(lg_c - m_c), 0.0), jnp.exp(m0 - m_c)
        acc0, l0, m0 = acc0 * corr_c + w_c * row(v_ref, 0).astype(f32), l0 * corr_c + w_c, m_c

    def body(j, carry, scoring=True):
        acc, m, l, best, at = carry
        in_b = j >= n_a  # a block of the second range
        start = jnp.where(in_b, b_lo + (j - n_a) * block_k, first + j * block_k)
        idx = start + lanes
        inb = idx < jnp.where(in_b, b_hi, a_end)
        k = widen(plgpu.load(k_ref.at[pl.ds(start, block_k), :], mask=inb[:, None], other=0.0), by_bits)
        v_raw = plgpu.load(v_ref.at[pl.ds(start, block_k), :], mask=inb[:, None], other=0.0)  # cache dtype
        v = widen(v_raw, by_bits)
        ok = inb & (idx != ws) & (idx != dest) & (plgpu.load(cok_ref.at[pl.ds(start, block_k)], mask=inb, other=0) != 0)
        if not dense:
            ok = ok & (plgpu.load(pos_ref.at[pl.ds(start, block_k)], mask=inb, other=-1) >= 0)
        logit = jnp.where(ok, jnp.sum(k * q[None, :], axis=1), NEG_INF)
        m_new = jnp.maximum(m, jnp.max(logit))
        corr = jnp.exp(m - m_new)
        pr = jnp.where(ok, jnp.exp(logit - m_new), 0.0)
        if K and not layer and scoring:  # next step's victim: a running first maximum per lane (no cross-warp reduction
            # per block); lane l holds the best of slots l, l + block_k, ... (lowest slot on ties)
            nrm = plgpu.load(nm_ref.at[pl.ds(start, block_k)], mask=inb, other=1.0)
            cand = inb & (idx >= c + P) & ((idx < c + P + K) | (idx == rn))
            if new_is_cand:  # slot ws holds o (moving to dest) and is next step's candidate (the new
                # token) at once: patch both into V
                v_raw = jnp.where((idx == dest)[:, None], v_o[None, :], jnp.where((idx == ws)[:, None], v_new[None, :], v_raw))
                v = widen(v_raw, by_bits)
                nrm = jnp.where(idx == dest, n_o, jnp.where(idx == ws, n_new, nrm))
                eff = idx
            else:  # o's V and |v| are still in slot ws of the loaded block: score it there, as the
                # candidate at slot dest (the victim's old V there is no candidate)
                cand = (cand & (idx != dest)) | ((idx == ws) & apply)
                eff = jnp.where(idx == ws, dest, idx)
            # apart: V widened again, the other way, so bf16 V, not float32 V, lives until the attention's use
            vt = jnp.sum((widen(v_raw, not by_bits) if apart else v) * tvec[None, :], axis=1)
            sc = jnp.where(cand, vt / nrm, -2e30)
            better = (sc > best) | ((sc == best) & (eff < at))  # ties: the lowest slot
            best, at = jnp.where(better, sc, best), jnp.where(better, eff, at)
        if (score or layer) and scoring:  # every slot's terms after this step's writes, by one reduction (equal V,
            # equal terms: the first-maximum tie rule): o's V patched in at dest (layer), and with
            # next_new the new token's at ws (next step's candidate); otherwise slot ws still
            # holds the overwritten token, and the new token's terms follow the loop
            vt = v
            if layer:
                vt = jnp.where((idx == dest)[:, None], v_o.astype(f32)[None, :], vt)
            if next_new:
                vt = jnp.where((idx == ws)[:, None], v_new.astype(f32)[None, :], vt)
            keep = inb if next_new else inb & (idx != ws)
            plgpu.store(dots_ref.at[pl.ds(start, block_k)], jnp.sum(vt * svec[None, :], axis=1), mask=keep)
            if not layer:  # layer: a slot's |v|^2 is written with its token (below), never recomputed
                plgpu.store(sq_ref.at[pl.ds(start, block_k)], jnp.sum(vt * vt, axis=1), mask=keep)
        acc = acc * corr + jnp.sum(pr[:, None] * v, axis=0)
        return acc, m_new, l * corr + jnp.sum(pr), best, at

    init = (acc0, m0, l0, jnp.full((block_k,), -3e38, f32), jnp.full((block_k,), slots, jnp.int32))
    if K:
        # o's move to its pool slot dest and the new running sum are stored before the loop, not
        # after it: what the loop reads at dest is masked out of the attention and of the
        # candidates (or patched with o's), so the order does not matter, even across warps, and
        # o's K, V and norms need no registers through the loop.
        ok_move = (jnp.arange(1) == 0) & apply
        dslot = jnp.maximum(dest, 0)
        plgpu.store(ko_ref.at[pl.ds(dslot, 1), :], k_o[None, :], mask=ok_move[:, None])
        plgpu.store(vo_ref.at[pl.ds(dslot, 1), :], v_o[None, :], mask=ok_move[:, None])
        plgpu.store(po_ref.at[pl.ds(dslot, 1)], jnp.full((1,), p_o, jnp.int32), mask=ok_move)
        vso_ref[...] = vsum
        if layer:
            plgpu.store(sq_ref.at[pl.ds(dslot, 1)], jnp.full((1,), sq_o, f32), mask=ok_move)
        else:
            plgpu.store(nmo_ref.at[pl.ds(dslot, 1)], jnp.full((1,), n_o, jnp.float32), mask=ok_move)
        # Next step's victim (head) or score terms (layer) are read only if the pool is full then:
        # n_moved >= K - 1 now, i.e. o moves and the free position is K - 1 (free is clipped there).
        # Until then the loop skips the score: half of a call's steps, a third of its scored slots.
        # The victim then is `slots` and the terms keep their old values, which no step reads.
        # scoring (static): the caller knows which (False: every step of this program is before the
        # step before the pool fills; True: every one is at or after it), and only that loop is
        # compiled (head: 96 registers without the score, against 149 with both loops).
        if scoring is None:
            n_sc = jnp.where(moving & (free_ref[()] == K - 1), n_blocks, 0)
            carry = jax.lax.fori_loop(0, n_blocks - n_sc, functools.partial(body, scoring=False), init)
            acc, m, l, best, at = jax.lax.fori_loop(n_blocks - n_sc, n_blocks, body, carry)
        else:
            acc, m, l, best, at = jax.lax.fori_loop(0, n_blocks, functools.partial(body, scoring=scoring), init)
    else:
        acc, m, l, best, at = jax.lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    plgpu.store(ko_ref.at[pl.ds(ws, 1), :], k_new[None, :])
    plgpu.store(vo_ref.at[pl.ds(ws, 1), :], v_new[None, :])
    if not dense:
        plgpu.store(po_ref.at[pl.ds(ws, 1)], jnp.full((1,), new_pos, jnp.int32))
    v_w = v_new.astype(f32)
    if (score or layer) and not next_new:
        plgpu.store(dots_ref.at[pl.ds(ws, 1)], jnp.full((1,), jnp.sum(v_w * svec), f32))
    if (score and not next_new) or layer:
        plgpu.store(sq_ref.at[pl.ds(ws, 1)], jnp.full((1,), jnp.sum(v_w * v_w), f32))
    if K and not layer:
        plgpu.store(nmo_ref.at[pl.ds(ws, 1)], jnp.full((1,), n_new, jnp.float32))
        # The first maximum over all slots: the lowest slot among the lanes holding the maximum.
        vico_ref[...] = jnp.min(jnp.where(best == jnp.max(best), at, slots))


def _dense_kernel(*refs, **kw):
    # evict_step's kernel on a dense cache: no pos ref (15 inputs before cond_ok).
    return _evict_kernel(*refs[:15], None, *refs[15:], **kw)


def evict_step(q, k_new, v_new, k, v, pos, cond_ok, scalars, *, c: int, prefix: int, keep: int, vsum=None,
               victim=None, vnorm=None, qkv=None, rope=None, score_vec=None, terms=None, filled=None,
               layer_sq=None, layer_index: int = 0, next_new: bool = False, scoring: bool | None = None,
               eps: float = 1e-6, config: KernelConfig = KernelConfig(),
               block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
               interpret: bool = False):
    """One adsa-evict (``keep`` > 0, head granularity) or window (``keep`` = 0) decode step of a
    layer in one kernel: write the new token, move the token leaving the window into the pool
    (evicting the highest-score candidate), update the running sum, attend, and compute next
    step's victim from the same read of V. The cache is updated in place.

    q, k_new, v_new (B, H, D); k, v (B, H, S, D); pos (B, H, S) int32 (-1 = empty), (B, 1, S) for
    positions every head shares (``keep`` = 0: layer granularity's window form), or None for
    the dense cache (``keep`` = 0, slots <= ws are the filled ones, only they are read);
    cond_ok (B, S) bool (condition slots of padded captions off); scalars: int32
    (ws, ring, moving, full, free, ring_next, new_pos), see :meth:`adsa_jax.cache.evict.Evict.decode`;
    filled: int32 (a, lo, hi), the slots that can hold a token after this step's writes are in
    [0, a) and [lo, hi), and only they are read (:meth:`adsa_jax.cache.evict.Evict.filled`; default
    every slot; the dense cache reads [0, ws]);
    keep > 0: vsum (B, H, D) f32, victim (B, H) int32, this step's victim slot (from the
    last step; any value before the pool is full), and vnorm (B, H, S) f32, max(|v_i|, eps) of
    every filled slot (written by this kernel with each token, like k and v).
    qkv (B, 3, H, D): q, k_new and v_new stacked as the projection lays them out (pass None for
    the three): the kernel reads its (row, head)'s three vectors in place, so XLA does not copy
    q, k and v into arrays of their own before the call. With ``rope`` (D/2, 2) float32, this
    position's (cos, sin) table row, q and k in qkv are before RoPE: the kernel applies it when
    ``config.rope_in_kernel`` is set, otherwise one XLA fusion does before the call. Block and warps:
    ``config.evict_tile(B * H)`` (``config.score_tile`` where set, with scoring=True and keep > 0)
    unless given here.
    score_vec (B, H, D) float32 (keep = 0 with pos only): also return ``dots = v_i . score_vec`` and
    ``sq = v_i . v_i`` (B, H, S) float32 of every slot after this step's write, from the same read
    of V (the terms :meth:`adsa_jax.cache.evict.Evict.decode` scores next step's candidates with at
    layer granularity; as :func:`adsa_jax.kernels.decode_attention`'s). terms: the (dots, sq) to
    update in place (a slot not read keeps its terms; default zeros).
    layer_sq (B, 4) float32 (keep > 0, layer granularity: pos (B, 1, S)): each row's
    layer-vector |v|^2 of o (the token leaving the ring), of this step's victim and of next
    step's leaving token, then an unused lane. The victim (B,) comes from XLA (0..K-1 a pool
    position, K or more the token o itself). Or both stacked over layers, (L, B) and (L, B, 4),
    read at row ``layer_index`` (static) in place: one XLA choice for every layer, no slices.
    vsum (B, H, D) is the row's (B, 1, H * D) running sum split into heads, vnorm is not used,
    and ``terms`` (dots, sq) are required: the step returns next step's score terms (as with
    score_vec, against vsum + v_next / |v_next|) instead of a victim. next_new (with score_vec or
    layer_sq): the new token is one of next step's candidates (a ring of one slot, or of s
    slots before a leaving step of period s): its terms are computed with every other slot's,
    as the tie rule needs equal terms for equal V.
    Returns (out (B, H, D), k, v, pos) (no pos when pos is None) and, with keep > 0, (vsum, next
    step's victim, vnorm) after them (layer_sq: (vsum, dots, sq)); with score_vec, (dots, sq)
    after them. With keep > 0 next step's victim (or the layer form's dots) is computed only if
    the pool is full then (moving with free = K - 1): before, the victim is S and the dots keep
    their input values, which no step reads. ``scoring`` (static, keep > 0): None decides that per
    step; False or True says it for every step of the call (a caller that knows), and the kernel
    compiles only that loop.
    """
    if qkv is not None:
        b, _, h, d = qkv.shape
    else:
        b, h, d = q.shape
    if rope is not None and qkv is None:
        raise ValueError("evict_step: rope= goes with qkv= (q and k before RoPE)")
    if rope is not None and not config.rope_in_kernel:
        rot2 = jnp.broadcast_to(rope, (2,) + rope.shape)  # (2, D/2, 2): one position for q and k
        qkv = jnp.concatenate([apply_rope(qkv[:, :2], rot2), qkv[:, 2:]], axis=1)  # (B, 3, H, D), q and k rotated
        rope = None
    s = k.shape[2]
    tiling = config.score_tile if scoring is True and keep and config.score_tile else config.evict_tile(b * h)
    block_k, num_warps = block_k or tiling[0], num_warps or tiling[1]
    K = keep
    dense = pos is None
    if dense and K:
        raise ValueError("evict_step on a dense cache (pos=None) takes keep=0")
    score = score_vec is not None
    if score and (dense or K):
        raise ValueError("evict_step: score_vec= goes with the window form (keep=0, pos given)")
    layer = layer_sq is not None
    if layer and (not K or terms is None or pos.shape[1] != 1):
        raise ValueError("evict_step: layer_sq= goes with keep > 0, one row of positions and terms=")
    kern = functools.partial(_dense_kernel if dense else _evict_kernel, block_k=block_k, slots=s, c=c, P=prefix,
                             K=K, scale=1.0 / math.sqrt(d), eps=eps, rope=rope is not None, score=score, layer=layer,
                             next_new=next_new and (score or layer), scoring=scoring if K else None,
                             by_bits=config.widen_by_bits, apart=config.score_widens_apart)
    sc = pl.BlockSpec((), lambda i, j: ())
    vec = pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0))
    cache = pl.BlockSpec((None, None, s, d), lambda i, j: (i, j, 0, 0))
    per_slot = pl.BlockSpec((None, None, s), lambda i, j: (i, j, 0))
    # pos (B, 1, S) (layer granularity): every head's program reads and writes the row's one copy;
    # they write the same positions to the same slots (the new token's, and o's at the row's dest),
    # and no program reads those slots.
    shared_pos = not dense and pos.shape[1] == 1 and h > 1
    if shared_pos and K and not layer:
        raise ValueError("evict_step: one row of positions for all heads goes with the window form (keep=0) "
                         "or layer_sq=")
    pos_spec = pl.BlockSpec((None, None, s), lambda i, j: (i, 0, 0)) if shared_pos else per_slot
    if qkv is None:
        vecs, new = [vec] * 3, [q, k_new.astype(k.dtype), v_new.astype(v.dtype)]
    else:  # the same (B, 3, H, D) buffer three times, each spec picking q, k or v of (row, head)
        vecs = [pl.BlockSpec((None, None, None, d), lambda i, j, w=w: (i, w, j, 0)) for w in range(3)]
        new = [qkv.astype(k.dtype)] * 3
    if len(scalars) != 7:
        raise ValueError(f"evict_step: scalars are (ws, ring, moving, full, free, ring_next, new_pos), got {len(scalars)}")
    filled = (s, s, s) if filled is None else filled  # [0, S) and nothing more: every slot
    in_specs = [sc] * 10 + vecs + [cache, cache] + ([] if dense else [pos_spec])
    in_specs.append(pl.BlockSpec((None, s), lambda i, j: (i, 0)))
    args = [jnp.asarray(x, jnp.int32) for x in (*scalars, *filled)] + new + [k, v]
    args += ([] if dense else [pos]) + [cond_ok.astype(jnp.int8)]
    out_specs = [vec, cache, cache] + ([] if dense else [pos_spec])
    out_shape = [jax.ShapeDtypeStruct((b, h, d), v.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)] + ([] if dense else [jax.ShapeDtypeStruct(pos.shape, jnp.int32)])
    aliases = {13: 1, 14: 2} if dense else {13: 1, 14: 2, 15: 3}  # k, v (, pos) are updated in place
    one = pl.BlockSpec((None, None), lambda i, j: (i, j))
    if layer:
        if victim.ndim == 1:  # one layer's choice, not a stack of them
            victim, layer_sq, layer_index = victim[None], layer_sq[None], 0
        in_specs += [vec, pl.BlockSpec((None, None), lambda i, j: (layer_index, i)),
                     pl.BlockSpec((None, None, 4), lambda i, j: (layer_index, i, 0))]
        args += [vsum.astype(jnp.float32), victim.astype(jnp.int32), layer_sq.astype(jnp.float32)]
        out_specs.append(vec)
        out_shape.append(jax.ShapeDtypeStruct((b, h, d), jnp.float32))
        aliases[17] = 4  # vsum
    elif K:
        in_specs += [vec, one, per_slot]
        args += [vsum.astype(jnp.float32), victim.astype(jnp.int32), vnorm.astype(jnp.float32)]
        out_specs += [vec, one, per_slot]
        out_shape += [jax.ShapeDtypeStruct((b, h, d), jnp.float32), jax.ShapeDtypeStruct((b, h), jnp.int32),
                      jax.ShapeDtypeStruct((b, h, s), jnp.float32)]
        aliases.update({17: 4, 18: 5, 19: 6})  # vsum, victim, vnorm
    if rope is not None:  # (D,) = (cos_0, sin_0, cos_1, sin_1, ...), the same for every program
        in_specs.append(pl.BlockSpec((d,), lambda i, j: (0,)))
        args.append(rope.astype(jnp.float32).reshape(d))
    if score or layer:
        dots, sq = (jnp.zeros((b, h, s), jnp.float32),) * 2 if terms is None else terms
        in_specs += ([vec] if score else []) + [per_slot, per_slot]
        args += ([score_vec.astype(jnp.float32)] if score else []) + [dots.astype(jnp.float32), sq.astype(jnp.float32)]
        aliases.update({len(args) - 2: len(out_specs), len(args) - 1: len(out_specs) + 1})
        out_specs += [per_slot, per_slot]
        out_shape += [jax.ShapeDtypeStruct((b, h, s), jnp.float32)] * 2
    return pl.pallas_call(
        kern, grid=(b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                             num_stages=num_stages or config.num_stages),
        interpret=interpret, name="adsa_evict_step",
    )(*args)
