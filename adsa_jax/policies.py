"""KV-cache policies: how each layer stores image-token K/V and which entries a query reads.

Every policy is a frozen, hashable dataclass (a static argument of ``jit``) with three
functions over one layer's cache, a dict pytree:

    init(batch, dtype)                        -> cache       (fixed shapes for the whole call)
    prefill(cache, k, v)                      -> cache       (k, v: (B, c, H, D) condition K/V)
    decode(cache, q, k, v, t, cond_mask, ...) -> cache, out  (q, k, v: (B, H, D) of image token t)

A policy whose class sets ``takes_qkv = True`` is also passed ``qkv=`` (B, 3, H, D), the same
q, k, v in one array but before RoPE, and ``rope=`` (D/2, 2), the position's RoPE row, which
its Pallas step kernel reads in place (no copies).

Cache arrays use the layout ``k, v: (B, H, S, D)``. Keys are cached after RoPE, so a slot's
position travels with it and slot order never matters. Policies (spec/adsa.md):

- ``dense``        LlamaGen's full cache (c + N - 1 slots).
- ``adsa-select``  full cache; attends to condition + prefix P + the K lowest-score tokens of
                   the previous region + the local M (a gather, so it reads only the budget).
- ``adsa-evict``   ``C = c + P + K + M`` slots [cond | prefix | pool | ring]; a token leaving the
                   ring enters the pool, and when the pool is full the highest-score candidate
                   of pool + newcomer is evicted.
- ``window``       sinks + recent window: [cond | prefix | ring of K + M], FIFO (no pool).
- ``random``       the evict layout, the evicted candidate drawn uniformly.

Score (per layer, row and head, or per layer and row with ``granularity='layer'``):
``v̂_i · Σ_j v̂_j`` over the region, with a running sum ``vsum`` of normalised V kept in the
cache so that a step costs O(K·d).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from .config import ConfigError, GPTConfig

NEG_INF = -1e30
EPS = 1e-6
BIG = 1e30


ATTENTION_IMPLS = ("xla", "pallas", "pallas-interpret")


def attend(q, k, v, mask, impl: str = "xla", n_valid=None, score_vec=None):
    """q (B,H,D), k/v (B,H,S,D), mask broadcastable to (B,H,S) -> (B,H,D); f32 logits/softmax.

    impl 'xla' is the reference; 'pallas' is the GPU kernel of :mod:`adsa_jax.kernels`, which
    also skips slots >= n_valid (default: all S), 'pallas-interpret' the same kernel run by
    the Pallas interpreter (any backend; tests). With ``score_vec`` (kernel only) it returns
    ``(out, dots, sq)``, ADSA's score terms from the same read of V (``decode_attention``)."""
    if impl != "xla":
        from .kernels import decode_attention

        b, h, s = k.shape[:3]
        m = jnp.broadcast_to(mask, (b, mask.shape[1] if mask.ndim == 3 else 1, s))  # (B, 1|G, S)
        return decode_attention(q, k, v, m, s if n_valid is None else n_valid, score_vec=score_vec,
                                interpret=impl == "pallas-interpret")
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("BHD,BHSD->BHS", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("BHS,BHSD->BHD", probs, v)


def normalized_v(v, granularity: str):
    """v (B,H,S,D) -> v̂ (B,G,S,X) in f32: G=H, X=D per head; G=1, X=H*D per layer."""
    vf = v.astype(jnp.float32)
    if granularity == "layer":
        b, h, s, d = vf.shape
        vf = vf.transpose(0, 2, 1, 3).reshape(b, 1, s, h * d)  # (B, 1, S, H*D)
    n = jnp.sqrt(jnp.sum(vf * vf, axis=-1, keepdims=True))
    return vf / jnp.maximum(n, EPS)


def _write(x, val, slot):
    """Write val (B,H,D) into slot (traced scalar) of x (B,H,S,D)."""
    return jax.lax.dynamic_update_slice_in_dim(x, val[:, :, None, :].astype(x.dtype), slot, axis=2)


def _cond_slot_mask(cond_mask, total: int):
    """(B, 1, total) bool: condition slots follow the caption mask, later slots are allowed."""
    b, c = cond_mask.shape
    return jnp.concatenate([cond_mask, jnp.ones((b, total - c), bool)], axis=1)[:, None, :]


@dataclasses.dataclass(frozen=True)
class Dense:
    """LlamaGen's cache: slot c + t holds image token t."""

    takes_qkv = True  # decode(..., qkv=) (not a field)
    c: int
    n: int
    name: str = "dense"
    attention: str = "xla"  # decode attention: 'xla' (reference) or 'pallas' (GPU kernel), see attend()

    @property
    def slots(self) -> int:
        return self.c + self.n - 1  # the last image token is never fed back

    def attended(self, t: int) -> int:
        return self.c + t + 1

    def init(self, batch, heads, head_dim, dtype):
        z = jnp.zeros((batch, heads, self.slots, head_dim), dtype)
        return {"k": z, "v": z}

    def prefill(self, cache, k, v):
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, H, c, D)
        return {**cache, "k": cache["k"].at[:, :, : self.c].set(kt.astype(cache["k"].dtype)),
                "v": cache["v"].at[:, :, : self.c].set(vt.astype(cache["v"].dtype))}

    def one_kernel(self, rows: int, heads: int) -> bool:
        """Whether a decode step (cache write + attention) runs as one Pallas kernel
        (:func:`adsa_jax.kernels.evict_step` on the dense cache): the kernel path
        (``kernels.DENSE_ONE_KERNEL``, on by default) where its one program per (row, head) is not
        too little work spread too thin (:func:`adsa_jax.kernels.one_kernel_fits`)."""
        if self.attention == "xla":
            return False
        from . import kernels

        return kernels.DENSE_ONE_KERNEL and kernels.one_kernel_fits(rows, heads, self.slots)

    def decode(self, cache, q, k, v, t, cond_mask, *, layer_index=0, row_keys=None, span=None, qkv=None, rope=None):
        slot = self.c + t
        if self.one_kernel(*q.shape[:2]):
            from .kernels import evict_step

            zero = jnp.int32(0)
            out, kc, vc = evict_step(q, k, v, cache["k"], cache["v"], None, _cond_slot_mask(cond_mask, self.slots)[:, 0],
                                     (slot, zero, zero, zero, zero, zero, slot), c=self.c, prefix=0, keep=0, qkv=qkv, rope=rope,
                                     interpret=self.attention == "pallas-interpret")
            return {**cache, "k": kc, "v": vc}, out
        kc, vc = _write(cache["k"], k, slot), _write(cache["v"], v, slot)
        if self.attention != "xla":  # the kernel reads slots < slot + 1 only, whatever the span
            out = attend(q, kc, vc, _cond_slot_mask(cond_mask, self.slots), self.attention, slot + 1)
            return {**cache, "k": kc, "v": vc}, out
        span = self.slots if span is None else min(span, self.slots)
        # Only the first `span` slots can be filled during this scan segment: read just those.
        mask = (jnp.arange(span) <= slot)[None, None] & _cond_slot_mask(cond_mask, span)
        out = attend(q, kc[:, :, :span], vc[:, :, :span], mask)
        return {**cache, "k": kc, "v": vc}, out


@dataclasses.dataclass(frozen=True)
class Select(Dense):
    """adsa-select: full cache, attention over cond + prefix + top-K of the previous region + local."""

    prefix: int = 0
    keep: int = 0
    local: int = 1
    granularity: str = "head"
    name: str = "adsa-select"

    def attended(self, t: int) -> int:
        return self.c + min(t + 1, self.prefix + self.keep + self.local)

    def init(self, batch, heads, head_dim, dtype):
        g, x = (heads, head_dim) if self.granularity == "head" else (1, heads * head_dim)
        # sel: image indices attended from the previous region at the last step (-1 = none);
        # kept for inspection and tests, it is K int32 per row and head.
        return {**super().init(batch, heads, head_dim, dtype), "vsum": jnp.zeros((batch, g, x), jnp.float32),
                "sel": jnp.full((batch, g, self.keep), -1, jnp.int32)}

    def one_kernel(self, rows: int, heads: int) -> bool:
        return False  # its gather of the kept slots runs in XLA

    def decode(self, cache, q, k, v, t, cond_mask, *, layer_index=0, row_keys=None, span=None, qkv=None, rope=None):
        c, P, K, M = self.c, self.prefix, self.keep, self.local
        slot = c + t
        kc, vc = _write(cache["k"], k, slot), _write(cache["v"], v, slot)
        # Image token t - M leaves the local window and joins the previous region.
        e = t - M
        ve = jax.lax.dynamic_slice_in_dim(vc, c + jnp.maximum(e, 0), 1, axis=2)  # (B, H, 1, D)
        vsum = cache["vsum"] + jnp.where(e >= P, normalized_v(ve, self.granularity)[:, :, 0], 0.0)
        # Candidates: image slots c + P .. c + span - 1 (static), scored with the running sum.
        span = self.slots if span is None else min(span, self.slots)
        lo = c + P
        hi = max(span, lo + 1)
        b, h = q.shape[:2]
        kk = min(K, hi - lo)
        with jax.named_scope("select_topk"):
            if kk > 0:
                vn = normalized_v(vc[:, :, lo:hi], self.granularity)  # (B, G, S', X)
                score = jnp.sum(vn * vsum[:, :, None, :], axis=-1)  # multiply-and-sum: equal V, equal score
                idx_tok = jnp.arange(lo, hi) - c  # image index of each candidate slot
                in_region = idx_tok <= e  # (S',); >= P holds by construction
                _, sel = jax.lax.top_k(jnp.where(in_region, -score, -BIG), kk)  # (B, G, kk) lowest scores
                sel_ok = jnp.take(in_region, sel)  # fewer than K in the region: drop the padding
            else:
                sel = jnp.zeros((b, 1, 0), jnp.int32)
                sel_ok = jnp.zeros((b, 1, 0), bool)
            sel_idx = jnp.where(sel_ok, sel + lo - c, -1)  # (B, G, kk) image indices
            sel = jnp.broadcast_to(sel, (b, h, kk)) + lo  # (B, H, kk) slots
            sel_ok = jnp.broadcast_to(sel_ok, sel.shape)
            k_sel = jnp.take_along_axis(kc, sel[..., None], axis=2)  # (B, H, kk, D)
            v_sel = jnp.take_along_axis(vc, sel[..., None], axis=2)
        # Local window: M slots ending at slot (clamped at the start of the cache).
        start = jnp.clip(slot - M + 1, 0, self.slots - M)
        k_loc = jax.lax.dynamic_slice_in_dim(kc, start, M, axis=2)
        v_loc = jax.lax.dynamic_slice_in_dim(vc, start, M, axis=2)
        loc_tok = start + jnp.arange(M) - c
        loc_ok = (loc_tok >= P) & (loc_tok <= t) & (loc_tok > e)
        # Condition + prefix: static leading slots.
        head_tok = jnp.arange(c + P) - c
        head_ok = (head_tok <= t)[None, None] & _cond_slot_mask(cond_mask, c + P)
        keys = jnp.concatenate([kc[:, :, : c + P], k_sel, k_loc], axis=2)
        vals = jnp.concatenate([vc[:, :, : c + P], v_sel, v_loc], axis=2)
        mask = jnp.concatenate([jnp.broadcast_to(head_ok, (b, h, c + P)), sel_ok,
                                jnp.broadcast_to(loc_ok, (b, h, M))], axis=2)
        out = attend(q, keys, vals, mask, self.attention)
        g = cache["sel"].shape[1]
        sel_idx = jnp.pad(jnp.broadcast_to(sel_idx, (b, g, kk)), ((0, 0), (0, 0), (0, K - kk)), constant_values=-1)
        return {**cache, "k": kc, "v": vc, "vsum": vsum, "sel": sel_idx}, out


@dataclasses.dataclass(frozen=True)
class Evict:
    """adsa-evict / window / random: a fixed [cond | prefix P | pool K | ring M] cache.

    ``chooser``: 'similarity' (ADSA: evict the highest score), 'random' (uniform).
    ``window`` is this class with K = 0 and a ring of the window's K + M.
    """

    takes_qkv = True  # decode(..., qkv=) (not a field)
    c: int
    n: int
    prefix: int = 0
    keep: int = 0
    local: int = 1
    granularity: str = "head"
    chooser: str = "similarity"
    name: str = "adsa-evict"
    attention: str = "xla"

    @property
    def slots(self) -> int:
        return self.c + self.prefix + self.keep + self.local

    def attended(self, t: int) -> int:
        return self.c + min(t + 1, self.prefix + self.keep + self.local)

    @property
    def fused_score(self) -> bool:
        """With the Pallas kernel, step t's attention pass also computes step t+1's score terms
        (V is read once per step, not twice); the XLA path scores in a separate pass."""
        return self.attention != "xla" and self.chooser == "similarity" and self.keep > 0

    def init(self, batch, heads, head_dim, dtype):
        g, x = (heads, head_dim) if self.granularity == "head" else (1, heads * head_dim)
        z = jnp.zeros((batch, heads, self.slots, head_dim), dtype)
        cache = {"k": z, "v": z, "pos": jnp.full((batch, g, self.slots), -1, jnp.int32),
                 "vsum": jnp.zeros((batch, g, x), jnp.float32)}
        if self.keep and self.one_kernel(batch, heads):  # the kernel's: next step's victim slot, and
            cache["victim"] = jnp.zeros((batch, heads), jnp.int32)  # max(|v_i|, eps) of every slot
            cache["vnorm"] = jnp.ones((batch, heads, self.slots), jnp.float32)
        elif self.fused_score:  # v_i . total and v_i . v_i of every slot (the kernel's output), next step's
            zs = jnp.zeros((batch, heads, self.slots), jnp.float32)
            cache.update(dots=zs, sq=zs)
        return cache

    def prefill(self, cache, k, v):
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, H, c, D)
        return {**cache, "k": cache["k"].at[:, :, : self.c].set(kt.astype(cache["k"].dtype)),
                "v": cache["v"].at[:, :, : self.c].set(vt.astype(cache["v"].dtype)),
                "pos": cache["pos"].at[:, :, : self.c].set(jnp.arange(self.c, dtype=jnp.int32))}

    def one_kernel(self, rows: int, heads: int) -> bool:
        """Whether a decode step runs as one Pallas kernel (:func:`adsa_jax.kernels.evict_step`):
        the kernel path, per-head scores (or none: window), ``kernels.EVICT_ONE_KERNEL`` (on by
        default) and :func:`adsa_jax.kernels.one_kernel_fits`. Otherwise the bookkeeping runs in
        XLA around the attention kernel."""
        if self.attention == "xla" or self.granularity != "head" or self.chooser != "similarity":
            return False
        from . import kernels

        return kernels.EVICT_ONE_KERNEL and kernels.one_kernel_fits(rows, heads, self.slots)

    def decode(self, cache, q, k, v, t, cond_mask, *, layer_index=0, row_keys=None, span=None, qkv=None, rope=None):
        c, P, K, M = self.c, self.prefix, self.keep, self.local
        kc, vc, pos, vsum = cache["k"], cache["v"], cache["pos"], cache["vsum"]
        # init() chose the path for the whole call (a device of a mesh sees fewer rows than init).
        if ("victim" in cache) if K else self.one_kernel(*q.shape[:2]):
            return self._decode_one_kernel(cache, q, k, v, t, cond_mask, qkv, rope)
        ring0 = c + P + K
        ring = ring0 + jnp.mod(t - P, M)
        if K > 0:
            with jax.named_scope("evict"):
                terms = (cache["dots"], cache["sq"]) if self.fused_score else None
                kc, vc, pos, vsum = self._to_pool(kc, vc, pos, vsum, t, ring, layer_index, row_keys, terms)
        slot = jnp.where(t < P, c + t, ring)
        kc, vc = _write(kc, k, slot), _write(vc, v, slot)
        pos = jax.lax.dynamic_update_slice_in_dim(
            pos, jnp.full(pos.shape[:2] + (1,), c + t, jnp.int32), slot, axis=2)
        mask = (pos >= 0) & _cond_slot_mask(cond_mask, self.slots)  # (B, G, C)
        new = {**cache, "k": kc, "v": vc, "pos": pos, "vsum": vsum}
        if not self.fused_score:
            return new, attend(q, kc, vc, mask, self.attention)
        # Next step's candidates are this cache's pool + ring (nothing changes them before then),
        # scored against next step's total = vsum + v̂ of the token the ring will then hand over.
        ring_next = ring0 + jnp.mod(t + 1 - P, M)
        v_next = jax.lax.dynamic_slice_in_dim(vc, ring_next, 1, axis=2)  # (B, H, 1, D)
        total = vsum + normalized_v(v_next, self.granularity)[:, :, 0]  # (B, G, X)
        b, h, _, d = vc.shape
        out, dots, sq = attend(q, kc, vc, mask, self.attention,
                               score_vec=total.reshape(b, h, d))  # 'layer': the vector split into heads
        return {**new, "dots": dots, "sq": sq}, out

    def _decode_one_kernel(self, cache, q, k, v, t, cond_mask, qkv=None, rope=None):
        from .kernels import evict_step

        c, P, K, M = self.c, self.prefix, self.keep, self.local
        ring0 = c + P + K
        ring = ring0 + jnp.mod(t - P, M)
        n_moved = t - P - M  # tokens that moved to the pool before the one leaving the window now
        scalars = (jnp.where(t < P, c + t, ring), ring, t - P >= M, n_moved >= K, jnp.clip(n_moved, 0, max(K - 1, 0)),
                   ring0 + jnp.mod(t + 1 - P, M), c + t)
        cond_ok = _cond_slot_mask(cond_mask, self.slots)[:, 0]  # (B, C)
        res = evict_step(q, k, v, cache["k"], cache["v"], cache["pos"], cond_ok, scalars, c=c, prefix=P, keep=K,
                         vsum=cache["vsum"] if K else None, victim=cache.get("victim"), vnorm=cache.get("vnorm"),
                         qkv=qkv, rope=rope, eps=EPS,
                         interpret=self.attention == "pallas-interpret")
        new = {**cache, "k": res[1], "v": res[2], "pos": res[3]}
        if K:
            new.update(vsum=res[4], victim=res[5], vnorm=res[6])
        return new, res[0]

    def _to_pool(self, kc, vc, pos, vsum, t, ring, layer_index, row_keys, terms=None):
        """Move the token about to be overwritten in the ring into the pool (or drop it).

        Scores are read straight from the bf16 pool (no f32 copy of it), and the move is one
        scattered slot per (row, head): a step costs O(K*d) reads and O(d) writes."""
        c, P, K, M = self.c, self.prefix, self.keep, self.local
        b, h = kc.shape[:2]
        moving = t - P >= M  # the ring slot holds an older token o
        n_moved = t - P - M  # tokens that moved to the pool before o
        k_o = jax.lax.dynamic_slice_in_dim(kc, ring, 1, axis=2)[:, :, 0]  # (B, H, D)
        v_o = jax.lax.dynamic_slice_in_dim(vc, ring, 1, axis=2)  # (B, H, 1, D)
        p_o = jax.lax.dynamic_slice_in_dim(pos, ring, 1, axis=2)[:, :, 0]  # (B, G)
        vn_o = normalized_v(v_o, self.granularity)[:, :, 0]  # (B, G, X)
        total = vsum + vn_o
        full = n_moved >= K
        v_pool = vc[:, :, c + P: c + P + K]  # (B, H, K, D)
        if self.chooser == "similarity":
            # Candidates in order: K pool slots, then o; each scored v̂_i . sum_j v̂_j over the K + 1.
            # Score the contiguous slots [pool | ring] in place (o sits in the ring, after the pool,
            # so first-max order is pool then o) with one multiply-and-sum: identical V vectors get
            # bit-identical scores (tie rule), and nothing is concatenated or copied.
            if terms is not None:  # computed by last step's attention kernel (fused_score)
                dots, sq = terms[0][:, :, c + P:], terms[1][:, :, c + P:]  # (B, H, K+M)
            else:
                vf = vc[:, :, c + P:].astype(jnp.float32)  # (B, H, K+M, D)
                tot = total.reshape(b, h, 1, -1)  # (B, H, 1, D); 'layer': the vector split into heads
                dots = jnp.sum(vf * tot, axis=-1)  # (B, H, K+M)
                sq = jnp.sum(vf * vf, axis=-1)
            if self.granularity == "layer":
                dots, sq = jnp.sum(dots, axis=1)[:, None], jnp.sum(sq, axis=1)[:, None]  # (B, 1, K+M)
            score = dots / jnp.maximum(jnp.sqrt(sq), EPS)
            cand = (jnp.arange(K + M) < K) | (jnp.arange(K + M) == ring - (c + P))
            victim = jnp.argmax(jnp.where(cand, score, -BIG), axis=-1)  # (B, G) first max
            victim = jnp.minimum(victim, K)  # o's ring position -> K
        elif self.chooser == "random":
            keys = jax.vmap(lambda kk: jax.random.fold_in(kk, layer_index))(row_keys)
            victim = jax.vmap(lambda kk: jax.random.randint(kk, (vsum.shape[1],), 0, K + 1))(keys)
        else:
            raise ConfigError(f"unknown chooser {self.chooser!r}")
        # v̂ of the evicted candidate (o itself when victim == K), to take out of the running sum.
        v_ev = jnp.take_along_axis(v_pool, jnp.broadcast_to(jnp.minimum(victim, K - 1)[:, :, None, None],
                                                            (b, h, 1, 1)) if self.granularity == "head" else
                                   jnp.broadcast_to(jnp.minimum(victim, K - 1)[:, :, None, None], (b, h, 1, 1)),
                                   axis=2)  # (B, H, 1, D)
        vn_ev = jnp.where((victim == K)[..., None], vn_o, normalized_v(v_ev, self.granularity)[:, :, 0])
        vsum = jnp.where(moving, jnp.where(full, total - vn_ev, total), vsum)
        # Destination slot: the lowest free pool slot, the victim's slot, or nowhere (o dropped or
        # nothing moving): then "write o back into its own ring slot", a no-op.
        target = jnp.where(full, victim, jnp.clip(n_moved, 0, K - 1))  # (B, G)
        apply = moving & (target < K)
        dest = jnp.where(apply, c + P + target, ring)  # (B, G)
        dest_h = jnp.broadcast_to(dest, (b, h)) if dest.shape[1] == 1 else dest  # (B, H)
        bi, hi = jnp.arange(b)[:, None], jnp.arange(h)[None, :]
        kc = kc.at[bi, hi, dest_h].set(k_o, unique_indices=True)
        vc = vc.at[bi, hi, dest_h].set(v_o[:, :, 0], unique_indices=True)
        pos = pos.at[bi[:, :1] if pos.shape[1] == 1 else bi, jnp.arange(pos.shape[1])[None, :], dest].set(
            p_o, unique_indices=True)
        return kc, vc, pos, vsum


POLICY_NAMES = ("dense", "adsa-select", "adsa-evict", "window", "random")


def default_sizes(cfg: GPTConfig, budget: float) -> tuple[int, int, int]:
    w = cfg.grid
    total = round(budget * cfg.num_image_tokens)
    P, M = w, 2 * w
    K = total - P - M
    if K < 0:
        raise ConfigError(
            f"budget {budget} keeps {total} image tokens, fewer than the default prefix ({P}, one row) + "
            f"local ({M}, two rows); give explicit sizes (prefix=, keep=, local=) or a larger budget"
        )
    return P, K, M


def make_policy(cfg: GPTConfig, name: str = "dense", *, budget: float | None = None, prefix: int | None = None,
                keep: int | None = None, local: int | None = None, granularity: str = "head"):
    """Build a policy for cfg. ``budget`` is a fraction of the N image tokens (default sizes
    P = one grid row, M = two rows, K = the rest) and explicit ``prefix``/``keep``/``local``
    override the defaults. Budget 1.0 (P + K + M = N) makes every ADSA policy equal dense."""
    c, N = cfg.cls_token_num, cfg.num_image_tokens
    if name not in POLICY_NAMES:
        raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    if granularity not in ("head", "layer"):
        raise ConfigError(f"granularity must be 'head' or 'layer', got {granularity!r}")
    if name == "dense":
        if any(x is not None for x in (budget, prefix, keep, local)):
            raise ConfigError("the dense policy keeps every token: it takes no budget or sizes")
        return Dense(c, N)
    if budget is not None and not (0 < budget <= 1):
        raise ConfigError(f"budget must be a fraction in (0, 1] of the {N} image tokens, got {budget}")
    if budget is None and None in (prefix, keep, local):
        if all(x is None for x in (prefix, keep, local)):
            budget = 0.5
        else:
            raise ConfigError("give a budget fraction, or all three of prefix, keep and local")
    if budget is not None:
        total = round(budget * N)
        w = cfg.grid
        P = w if prefix is None else prefix
        M = 2 * w if local is None else local
        K = total - P - M if keep is None else keep
        if keep is None and K < 0:
            if prefix is None and local is None:
                default_sizes(cfg, budget)  # raises the defaults message
            raise ConfigError(f"prefix {P} + local {M} exceed the budget of {total} image tokens ({budget} of {N})")
        if keep is not None and P + K + M != total and (prefix is None or local is None):
            raise ConfigError(f"prefix {P} + keep {K} + local {M} != budget {total}; give sizes or a budget, not both")
    else:
        P, K, M = prefix, keep, local
    for nm, val in (("prefix", P), ("keep", K), ("local", M)):
        if val < 0:
            raise ConfigError(f"{nm} must be >= 0, got {val}")
    if M < 1:
        raise ConfigError("local must be >= 1: the current token is always attended")
    if P + K + M > N:
        raise ConfigError(f"prefix {P} + keep {K} + local {M} = {P + K + M} exceeds the {N} image tokens of the sequence")
    if name == "adsa-select":
        return Select(c, N, prefix=P, keep=K, local=M, granularity=granularity)
    if name == "window":
        return Evict(c, N, prefix=P, keep=0, local=K + M, granularity=granularity, chooser="similarity", name="window")
    chooser = "random" if name == "random" else "similarity"
    return Evict(c, N, prefix=P, keep=K, local=M, granularity=granularity, chooser=chooser, name=name)


def kv_bytes(policy, cfg: GPTConfig, rows: int, dtype) -> int:
    """Exact bytes of K and V over all layers for `rows` batch rows (rows = 2 per image with CFG)."""
    return 2 * cfg.n_layer * rows * cfg.n_head * policy.slots * cfg.head_dim * jnp.dtype(dtype).itemsize
