"""The evict family, one fixed [cond | prefix P | pool K | ring] cache: ``adsa-evict`` (a token
leaving the ring enters the pool; when the pool is full the highest-score candidate of pool +
newcomer is evicted), ``adsa-evict-all`` (the same with P = 0 and a ring of 1: every cached image
token but the current one can be evicted), ``window`` (sinks + recent window, FIFO: no pool),
``line`` (a window of whole grid rows), ``random`` (the evicted candidate drawn uniformly) and
``random-uniform`` (the pool a uniform sample of the whole previous region: reservoir sampling).

Eviction period ``s`` (spec/adsa.md, ``period``): the ring has M + s - 1 slots and every s steps
the s oldest ring tokens leave together; the K + s candidates (pool slots in slot order, then the
s leaving tokens, oldest first) are scored over that candidate set and the s highest dropped with
one ``lax.top_k``. The spec writes "a ring of M + s slots" but also "s = 1 is exactly the rule
above", whose ring has M slots; both hold when the ring counts the newcomer's slot, which the
oldest leaving token hands over: M + s - 1 slots, s - 1 more than at s = 1. Every step still
attends to at least the M most recent tokens (M to M + s - 1 of them in the ring)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ..kernels import evict_step, layer_choice, top_indices
from ..options import XLA_KERNELS, KernelConfig
from ..config import ConfigError
from .layout import BIG, EPS, attend, cond_slot_mask, normalized_v, write_slot


@dataclasses.dataclass(frozen=True)
class Evict:
    """adsa-evict / adsa-evict-all / window / line / random / random-uniform: a fixed
    [cond | prefix P | pool K | ring M + period - 1] cache.

    ``chooser``: 'similarity' (ADSA: evict the highest score), 'random' (a random victim).
    ``draw`` (chooser 'random'): 'candidates' (``random``: the victim uniform over the K + 1
    candidates, pool + the token leaving the ring) or 'reservoir' (``random-uniform``: Vitter's
    Algorithm R. When the n-th token o to leave the ring (n from 1) finds the pool full, draw r
    uniform in 0..n-1: o replaces pool slot r if r < K, else o is dropped. After every step each
    of the n tokens of the previous region P..t-M is in the pool with probability K/n, whatever
    its age; under 'candidates' a token survives each later step with probability K/(K+1), so the
    pool holds mostly recent tokens).
    ``period`` s: the eviction period (module docstring); chooser 'similarity' or draw 'candidates'.
    ``window`` is this class with K = 0 and a ring of the window's K + M; ``line`` the same with
    a ring of whole grid rows; ``adsa-evict-all`` this class with P = 0 and M = 1.
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
    # Kernel choices and tiling, set by generate / score from their options (kernel_config).
    kernels: KernelConfig = dataclasses.field(default=XLA_KERNELS, repr=False)
    period: int = 1
    draw: str = "candidates"

    @property
    def ring(self) -> int:
        """Ring slots: M + period - 1 (the module docstring says why not M + period)."""
        return self.local + self.period - 1

    @property
    def attention(self) -> str:
        """The decode attention: 'xla', 'pallas' or 'pallas-interpret' (``kernels.attention``)."""
        return self.kernels.attention

    @property
    def slots(self) -> int:
        return self.c + self.prefix + self.keep + self.ring

    def attended(self, t: int) -> int:
        P, K, s = self.prefix, self.keep, self.period
        if s == 1:
            return self.c + min(t + 1, P + K + self.local)
        j = t - P  # ring index of token t; tokens leave the ring s at a time from j = ring on
        moved = s * ((j - self.ring) // s + 1) if j >= self.ring else 0
        return self.c + t + 1 - max(0, moved - K)

    @property
    def fused_score(self) -> bool:
        """With the Pallas kernel, step t's attention pass also computes step t+1's score terms
        (V is read once per step, not twice); the XLA path scores in a separate pass. Period 1
        only: at s > 1 the candidates are scored every s steps, in XLA."""
        return self.attention != "xla" and self.chooser == "similarity" and self.keep > 0 and self.period == 1

    @property
    def fused_leave_score(self) -> bool:
        """Period s > 1 on the kernel path with the static leave schedule
        (``kernels.period_blocks``): the step before a leaving step (``decode(..., before_leave=True)``)
        computes the leaving step's score terms in its kernel, from its own read of V, so the leaving
        step reads no V to score (``kernels.leave_score_in_kernel``)."""
        return (self.period > 1 and self.chooser == "similarity" and self.keep > 0 and self.attention != "xla"
                and self.kernels.period_blocks and self.kernels.leave_score_in_kernel)

    def init(self, batch, heads, head_dim, dtype):
        g, x = (heads, head_dim) if self.granularity == "head" else (1, heads * head_dim)
        z = jnp.zeros((batch, heads, self.slots, head_dim), dtype)
        cache = {"k": z, "v": z, "pos": jnp.full((batch, g, self.slots), -1, jnp.int32),
                 "vsum": jnp.zeros((batch, g, x), jnp.float32)}
        if self.keep and self.one_kernel(batch, heads):  # the kernel's: next step's victim slot, and
            cache["victim"] = jnp.zeros((batch, heads), jnp.int32)  # max(|v_i|, eps) of every slot
            cache["vnorm"] = jnp.ones((batch, heads, self.slots), jnp.float32)
        elif self.fused_score or (self.fused_leave_score and self.window_kernel(batch, heads)):
            # v_i . total and v_i . v_i of every slot (the kernel's output): next step's score terms
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
        the kernel path, per-head scores (or none: window), ``kernels.evict_one_kernel`` (on by
        default) and :meth:`adsa_jax.options.KernelConfig.one_kernel_fits`. Otherwise the bookkeeping runs in
        XLA around the attention kernel."""
        # The kernel scores and moves at period 1 only; at s > 1 the moves (an s-token top_k every s
        # steps) run in XLA and the step itself is the kernel's window form (window_kernel).
        if self.attention == "xla" or self.granularity != "head" or self.chooser != "similarity" or self.period != 1:
            return False
        return self.kernels.evict_one_kernel and self.kernels.one_kernel_fits(rows, heads, self.slots)

    def decode(self, cache, q, k, v, t, cond_mask, *, layer_index=0, row_keys=None, span=None, qkv=None, rope=None,
               planned=False, before_leave=False, leave=None):
        """One layer's step t. ``planned``: :meth:`begin_step` already moved this step's leaving
        tokens (period s > 1; the model does that for all layers at once). ``before_leave`` (static):
        step t + 1 is a leaving step whose :meth:`begin_step` gets ``leave=True``; with
        :attr:`fused_leave_score` this step's kernel computes that step's score terms. ``leave``
        (static, period 1 with :meth:`first_choice`): t is before it (False) or at or after it
        (True), and the step kernel is compiled with only the loop that step needs; None: the
        kernel decides per step."""
        c, P, K, M = self.c, self.prefix, self.keep, self.local
        # begin_step's choice for this step (step_keys) never goes back into the cache
        choice = {key: cache[key] for key in self.step_keys if key in cache}
        cache = {key: x for key, x in cache.items() if key not in choice}
        kc, vc, pos, vsum = cache["k"], cache["v"], cache["pos"], cache["vsum"]
        # init() chose the path for the whole call (a device of a mesh sees fewer rows than init).
        # leave at period 1 comes only from a caller that split the call at first_choice
        scoring = leave if self.period == 1 and self.kernels.first_choice_scan else None
        if ("victim" in cache) if K else self.one_kernel(*q.shape[:2]):
            return self._decode_one_kernel(cache, q, k, v, t, cond_mask, qkv, rope, scoring)
        if self.period > 1:
            return self._decode_period(cache, q, k, v, t, cond_mask, layer_index, row_keys, qkv, rope, planned,
                                       before_leave)
        if K > 0 and self.layer_kernel(*q.shape[:2]):
            return self._decode_layer_kernel(cache, q, k, v, t, cond_mask, qkv, rope,
                                             (layer_index, choice) if planned and choice else None, scoring)
        ring0 = c + P + K
        ring = ring0 + jnp.mod(t - P, M)
        if K > 0:
            with jax.named_scope("evict"):
                terms = (cache["dots"], cache["sq"]) if self.fused_score else None
                kc, vc, pos, vsum = self._to_pool(kc, vc, pos, vsum, t, ring, layer_index, row_keys, terms)
        slot = jnp.where(t < P, c + t, ring)
        if self.fused_score and self.window_kernel(*q.shape[:2]):
            return self._decode_scored_window({**cache, "k": kc, "v": vc, "pos": pos, "vsum": vsum}, q, k, v, t, slot,
                                              cond_mask, qkv, rope)
        kc, vc = write_slot(kc, k, slot), write_slot(vc, v, slot)
        pos = jax.lax.dynamic_update_slice_in_dim(
            pos, jnp.full(pos.shape[:2] + (1,), c + t, jnp.int32), slot, axis=2)
        mask = (pos >= 0) & cond_slot_mask(cond_mask, self.slots)  # (B, G, C)
        new = {**cache, "k": kc, "v": vc, "pos": pos, "vsum": vsum}
        if not self.fused_score:
            return new, attend(q, kc, vc, mask, self.attention, config=self.kernels)
        # Next step's candidates are this cache's pool + ring (nothing changes them before then),
        # scored against next step's total = vsum + v̂ of the token the ring will then hand over.
        ring_next = ring0 + jnp.mod(t + 1 - P, M)
        v_next = jax.lax.dynamic_slice_in_dim(vc, ring_next, 1, axis=2)  # (B, H, 1, D)
        total = vsum + normalized_v(v_next, self.granularity)[:, :, 0]  # (B, G, X)
        b, h, _, d = vc.shape
        out, dots, sq = attend(q, kc, vc, mask, self.attention, config=self.kernels,
                               score_vec=total.reshape(b, h, d))  # 'layer': the vector split into heads
        return {**new, "dots": dots, "sq": sq}, out

    def window_kernel(self, rows: int, heads: int) -> bool:
        """Whether a step whose moves run in XLA (period s > 1, or layer granularity) then writes and
        attends as evict_step's window form over the filled slots (at layer granularity also
        returning next step's score terms): the kernel path, ``kernels.evict_one_kernel`` and
        :meth:`adsa_jax.options.KernelConfig.one_kernel_fits`."""
        return (self.attention != "xla" and self.kernels.evict_one_kernel
                and self.kernels.one_kernel_fits(rows, heads, self.slots))

    def layer_kernel(self, rows: int, heads: int) -> bool:
        """Whether a layer-granularity step at period 1 moves o and updates the running sum in
        evict_step (``kernels.layer_move_in_kernel``), XLA choosing the victim from the score terms
        the last step's kernel returned (:meth:`_decode_layer_kernel`)."""
        return (self.granularity == "layer" and self.fused_score and self.kernels.layer_move_in_kernel
                and self.window_kernel(rows, heads))

    def kernel_step(self, rows: int, heads: int) -> bool:
        """Whether the step's write and attention run inside evict_step (:meth:`one_kernel`, or the
        window form after the XLA moves), not as XLA around the attention kernel."""
        return self.one_kernel(rows, heads) or ((self.period > 1 or self.fused_score)
                                                and self.window_kernel(rows, heads))

    def filled(self, t):
        """(a, lo, hi): after step t's writes every slot that holds a token is in [0, a) or [lo, hi),
        the ring's slots (int32 scalars; the kernels read only those). The cache fills in slot order:
        the condition and prefix first, then the ring, and only tokens that left the ring enter
        the pool, its lowest free slot first (period s: the free slots score +BIG, lowest first);
        by step t at most t + 1 - P - M have left it (j + 1 - M at j = t - P, with equality at a
        leaving step of period s, whose ring is M + s - 1)."""
        c, P, K = self.c, self.prefix, self.keep
        pool = jnp.clip(t + 1 - P - self.local, 0, K)
        ring = jnp.clip(t + 1 - P, 0, self.ring)
        return c + jnp.minimum(t + 1, P) + pool, jnp.int32(c + P + K), c + P + K + ring

    def _window_step(self, cache, q, k, v, t, slot, cond_mask, qkv, rope, score_vec=None):
        """evict_step's window form over the filled slots (:meth:`filled`), after the XLA moves: write the new token at
        ``slot``, attend over the filled slots (pool included); with ``score_vec`` also next step's
        score terms ``dots`` and ``sq`` from the same read of V. 'layer' keeps one row of positions:
        every head gets it, and writes the same position at the same slot."""
        zero = jnp.int32(0)
        res = evict_step(q, k, v, cache["k"], cache["v"], cache["pos"],
                         cond_slot_mask(cond_mask, self.slots)[:, 0], (slot, zero, zero, zero, zero, zero, self.c + t),
                         c=self.c, prefix=self.prefix, keep=0, qkv=qkv, rope=rope, score_vec=score_vec,
                         terms=None if score_vec is None else (cache["dots"], cache["sq"]), filled=self.filled(t),
                         next_new=self.local == 1,
                         eps=EPS, config=self.kernels, interpret=self.attention == "pallas-interpret")
        new = {**cache, "k": res[1], "v": res[2], "pos": res[3]}
        if score_vec is not None:
            new.update(dots=res[4], sq=res[5])
        return new, res[0]

    def _decode_scored_window(self, cache, q, k, v, t, slot, cond_mask, qkv, rope):
        """A period-1 step of the XLA bookkeeping (layer granularity) after its move into the pool:
        :meth:`_window_step` with the score vector of next step's candidates (as the attention
        kernel's fused_score computes them)."""
        c, P, M = self.c, self.prefix, self.local
        vc = cache["v"]
        b, h, _, d = vc.shape
        # next step's total: v̂ of the token the ring hands over then (the new token itself when the
        # ring has one slot), as the XLA path reads it after the write
        ring_next = c + P + self.keep + jnp.mod(t + 1 - P, M)
        v_next = jnp.where(ring_next == slot, v[:, :, None].astype(vc.dtype),
                           jax.lax.dynamic_slice_in_dim(vc, ring_next, 1, axis=2))  # (B, H, 1, D)
        total = cache["vsum"] + normalized_v(v_next, self.granularity)[:, :, 0]  # (B, G, X)
        return self._window_step(cache, q, k, v, t, slot, cond_mask, qkv, rope, score_vec=total.reshape(b, h, d))

    def _step_scalars(self, t):
        """evict_step's scalars at step t (period 1): (ws, ring, moving, full, free, ring_next, new_pos)."""
        c, P, K, M = self.c, self.prefix, self.keep, self.local
        ring0 = c + P + K
        ring = ring0 + jnp.mod(t - P, M)
        n_moved = t - P - M  # tokens that moved to the pool before the one leaving the window now
        return (jnp.where(t < P, c + t, ring), ring, t - P >= M, n_moved >= K, jnp.clip(n_moved, 0, max(K - 1, 0)),
                ring0 + jnp.mod(t + 1 - P, M), c + t)

    def _first_max(self, score, ring):
        """The first maximum of score (B, G, K+M) over the candidates, the pool and o's ring slot
        ``ring``: (B, G), 0..K-1 a pool position, K or more o itself."""
        c, P, K, M = self.c, self.prefix, self.keep, self.local
        cand = (jnp.arange(K + M) < K) | (jnp.arange(K + M) == ring - (c + P))
        return jnp.argmax(jnp.where(cand, score, -BIG), axis=-1)

    def _decode_layer_kernel(self, cache, q, k, v, t, cond_mask, qkv, rope, chosen=None, scoring=None):
        """A layer-granularity step at period 1 (:meth:`layer_kernel`): XLA chooses each row's victim
        as :meth:`_to_pool` does, from the terms the last step's kernel returned (then the first
        maximum over the pool and o), and the layer-vector norms of o, the victim and next step's
        leaving token (:meth:`_layer_choice`); one evict_step then moves o, updates the running sum,
        writes, attends and returns next step's terms. ``chosen``: (this layer's row, the choice
        :meth:`begin_step` made for every layer: ``victims`` and ``victims_sq``), which the kernel
        reads in place: no per-layer slice. ``scoring`` (static): evict_step's."""
        c, P, K, M = self.c, self.prefix, self.keep, self.local
        vc = cache["v"]
        b, h, _, d = vc.shape
        at, choice = chosen or (0, {})
        if "victims_sq" in choice:
            first, sq = choice["victims"], choice["victims_sq"]
        else:
            with jax.named_scope("evict"):
                first, sq = self._layer_choice([cache], t, v, choice["victims"][at] if choice else None)
            at = 0
        res = evict_step(q, k, v, cache["k"], vc, cache["pos"], cond_slot_mask(cond_mask, self.slots)[:, 0],
                         self._step_scalars(t), c=c, prefix=P, keep=K, vsum=cache["vsum"].reshape(b, h, d),
                         victim=first[..., 0], qkv=qkv, rope=rope,
                         terms=(cache["dots"], cache["sq"]), filled=self.filled(t), layer_sq=sq, layer_index=at,
                         next_new=M == 1, scoring=scoring, eps=EPS,
                         config=self.kernels, interpret=self.attention == "pallas-interpret")
        new = {**cache, "k": res[1], "v": res[2], "pos": res[3], "vsum": res[4].reshape(b, 1, h * d),
               "dots": res[5], "sq": res[6]}
        return new, res[0]

    def _layer_choice(self, caches, t, v_new=None, first=None, choose=True):
        """Step t's choice for every layer ``caches`` at layer granularity, period 1: (first (L, B, 1),
        sq (L, B, 4)). first: the first maximum (:meth:`_first_max`) of the score terms in each
        cache (given: one layer's (B, 1), not recomputed). sq: |v|^2 of the layer vectors of o (the
        token leaving the ring), the victim, next step's leaving token and o again (the kernel's
        4-lane load; it takes max(|v|, eps) as normalized_v does), read from the terms' per-head
        |v|^2 (the kernel writes a slot's with its token): no V is read here. With a ring of one
        slot next step's leaving token is the new token, whose V (B, H, D) is ``v_new`` (one
        layer); without it sq is None. With ``kernels.layer_choice_in_kernel`` on the kernel path
        one :func:`adsa_jax.kernels.layer_choice` for all L layers; otherwise stacked over layers,
        each an XLA reduction for all L layers, not one kernel per layer. ``choose`` False (before
        the first choice): first is a placeholder (zeros), the dots are not read, and sq's lanes of
        o and of next step's leaving token are still exact (o's move and the running sum read them)."""
        c, P, K, M = self.c, self.prefix, self.keep, self.local
        _, ring, _, _, _, ring_next, _ = self._step_scalars(t)
        if first is None and self.attention != "xla" and self.kernels.layer_choice_in_kernel:
            if M == 1 and v_new is None and not choose:  # nothing to read: a placeholder victim, no lanes
                return jnp.zeros((len(caches), caches[0]["sq"].shape[0], 1), jnp.int32), None
            first, lanes = layer_choice([cache["sq"] for cache in caches],
                                        [cache["dots"] for cache in caches] if choose else None, ring, ring_next,
                                        start=c + P, keep=K, local=M, eps=EPS, big=BIG,
                                        interpret=self.attention == "pallas-interpret")
            return self._new_token_lane(first, lanes, t, v_new, caches[0]["v"].dtype)
        # Stacked, then summed over heads: one reduction for all L layers (summed first, each layer's
        # would be a kernel of its own; copied into one array first, it measured slower on the H200).
        sq_h = jnp.stack([cache["sq"] for cache in caches])  # (L, B, H, S): per head
        n, b, h, s = sq_h.shape
        if first is not None:
            first = first[None]
        elif choose:
            dots = jnp.sum(jnp.stack([cache["dots"] for cache in caches]), axis=2)  # (L, B, S)
            terms = (dots.reshape(n * b, 1, s), jnp.sum(sq_h, axis=2).reshape(n * b, 1, s))  # heads summed
            first = self._first_max(self._pool_ring_scores(None, None, terms), ring).reshape(n, b, 1)
        else:  # no move evicts yet: a placeholder victim, the norms of o and next step's token still read
            first = jnp.zeros((n, b, 1), jnp.int32)
        if M == 1 and v_new is None:
            return first, None
        at = jnp.concatenate([jnp.full_like(first, ring), c + P + jnp.minimum(first, K - 1),
                              jnp.full_like(first, ring_next), jnp.full_like(first, ring)], axis=-1)  # (L, B, 4)
        # the four slots' |v|^2 summed over heads (gathered first: no sum over every slot)
        lanes = jnp.sum(jnp.take_along_axis(sq_h, jnp.broadcast_to(at[:, :, None], (n, b, h, 4)), axis=-1), axis=2)
        return self._new_token_lane(first, lanes, t, v_new, caches[0]["v"].dtype)

    def _new_token_lane(self, first, lanes, t, v_new, dtype):
        """(first, lanes) of :meth:`_layer_choice`. With a ring of one slot, lane 2 (next step's
        leaving token) is the new token's |v|^2 from ``v_new`` (B, H, D), or lanes are None without
        v_new; with a longer ring they are returned as they are."""
        c, P, M = self.c, self.prefix, self.local
        if M > 1:
            return first, lanes
        if v_new is None:
            return first, None
        _, ring, _, _, _, ring_next, _ = self._step_scalars(t)
        # ring_next == slot once the prefix is full: next step's leaving token is the new one
        vn = v_new.astype(dtype).astype(jnp.float32)  # as the cache stores it
        new_sq = jnp.sum(vn * vn, axis=(1, 2))  # (B,)
        return first, lanes.at[:, :, 2].set(jnp.where(ring_next == jnp.where(t < P, c + t, ring), new_sq,
                                                      lanes[:, :, 2]))

    @property
    def step_keys(self) -> tuple:
        """The entries :meth:`begin_step` adds to every layer's cache dict for that step's decode,
        which drops them (:attr:`layer_choice`)."""
        if not self.layer_choice:
            return ()
        return ("victims", "victims_sq") if self.local > 1 else ("victims",)

    @property
    def layer_choice(self) -> bool:
        """Whether :meth:`begin_step` at period 1 makes every layer's choice (:meth:`_layer_choice`)
        for :meth:`_decode_layer_kernel`: layer granularity on the kernel path as configured (each
        layer's step still checks :meth:`layer_kernel` for its rows; an unused choice is dead code).
        The choice travels in each layer's cache dict (``victims`` (L, B, 1), with a ring of more
        than one slot ``victims_sq`` (L, B, 4), the same arrays for every layer) from begin_step to
        the layer's decode, which drops it."""
        return (self.period == 1 and self.fused_score and self.granularity == "layer"
                and self.kernels.layer_move_in_kernel and self.kernels.evict_one_kernel)

    def _decode_one_kernel(self, cache, q, k, v, t, cond_mask, qkv=None, rope=None, scoring=None):
        c, P, K = self.c, self.prefix, self.keep
        cond_ok = cond_slot_mask(cond_mask, self.slots)[:, 0]  # (B, C)
        res = evict_step(q, k, v, cache["k"], cache["v"], cache["pos"], cond_ok, self._step_scalars(t), c=c, prefix=P,
                         keep=K, vsum=cache["vsum"] if K else None, victim=cache.get("victim"), vnorm=cache.get("vnorm"),
                         qkv=qkv, rope=rope, filled=self.filled(t), scoring=scoring, eps=EPS, config=self.kernels,
                         interpret=self.attention == "pallas-interpret")
        new = {**cache, "k": res[1], "v": res[2], "pos": res[3]}
        if K:
            new.update(vsum=res[4], victim=res[5], vnorm=res[6])
        return new, res[0]

    def _pool_ring_scores(self, vc, total, terms=None):
        """v_i . total / |v_i| (B, G, K + ring) for every pool and ring slot, from V as it lies.

        Every slot is scored and the pool and ring sliced from the scores: a slice of V itself
        would be materialised (XLA:CPU copies it, a pool of temporaries per step). ``terms``: the
        (dots, sq) last step's attention kernel computed (fused_score) instead."""
        start = self.c + self.prefix
        if terms is not None:
            dots, sq = terms[0][:, :, start:], terms[1][:, :, start:]  # (B, H, K+R)
        else:
            b, h = vc.shape[:2]
            vf = vc.astype(jnp.float32)  # (B, H, C, D)
            tot = total.reshape(b, h, 1, -1)  # (B, H, 1, D); 'layer': the vector split into heads
            dots = jnp.sum(vf * tot, axis=-1)[:, :, start:]  # (B, H, K+R)
            sq = jnp.sum(vf * vf, axis=-1)[:, :, start:]
        if self.granularity == "layer":
            dots, sq = jnp.sum(dots, axis=1)[:, None], jnp.sum(sq, axis=1)[:, None]  # (B, 1, K+R)
        return dots / jnp.maximum(jnp.sqrt(sq), EPS)

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
            victim = jnp.minimum(self._first_max(self._pool_ring_scores(vc, total, terms), ring), K)  # (B, G)
        elif self.chooser == "random" and self.draw == "reservoir":
            # Algorithm R: o is the (n_moved + 1)-th token to leave the ring; r < K replaces pool slot r.
            keys = jax.vmap(lambda kk: jax.random.fold_in(kk, layer_index))(row_keys)
            r = jax.vmap(lambda kk: jax.random.randint(kk, (vsum.shape[1],), 0, jnp.maximum(n_moved + 1, 1)))(keys)
            victim = jnp.minimum(r, K)  # (B, G); K: o is dropped
        elif self.chooser == "random":
            keys = jax.vmap(lambda kk: jax.random.fold_in(kk, layer_index))(row_keys)
            victim = jax.vmap(lambda kk: jax.random.randint(kk, (vsum.shape[1],), 0, K + 1))(keys)
        else:
            raise ConfigError(f"unknown chooser {self.chooser!r}")
        # v̂ of the evicted candidate (o itself when victim == K), to take out of the running sum.
        # victim (B, G) -> (B, H, 1, 1): 'layer' (G = 1) evicts the same slot in every head.
        ev_slot = jnp.broadcast_to(jnp.minimum(victim, K - 1)[:, :, None, None], (b, h, 1, 1))
        v_ev = jnp.take_along_axis(v_pool, ev_slot, axis=2)  # (B, H, 1, D)
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
        # The moved V carries a data dependence (+ 0 x the new running sum, finite) on every other read
        # of the old V (o's and the victim's v̂, which XLA may recompute inside later fusions): they are
        # then ordered before the scatter, and XLA updates V in place instead of copying the whole V
        # cache each step (XLA:CPU did: adsa_jax.plan measured it). The value is v_o (-0 becomes +0).
        v_moved = v_o[:, :, 0] + 0.0 * vsum.reshape(b, h, -1)  # (B, H, D)
        vc = vc.at[bi, hi, dest_h].set(v_moved.astype(vc.dtype), unique_indices=True)
        pos = pos.at[bi[:, :1] if pos.shape[1] == 1 else bi, jnp.arange(pos.shape[1])[None, :], dest].set(
            p_o, unique_indices=True)
        return kc, vc, pos, vsum

    # ------------------------------------------------------------------------- period s > 1

    @property
    def leave_schedule(self):
        """(the first step t whose begin_step moves tokens, the period s), or None at period 1: the
        s oldest ring tokens leave at t = P + R, P + R + s, ... A caller that knows t statically
        passes ``leave=`` to :meth:`begin_step` and needs no branch."""
        return None if self.period == 1 else (self.prefix + self.ring, self.period)

    def first_choice(self, rows: int, heads: int):
        """With ``kernels.first_choice_scan`` at period 1 on the kernel path (:attr:`layer_choice`,
        or for ``rows`` x ``heads`` head granularity's one kernel, :meth:`one_kernel`, as
        :meth:`init` decides it): the first step that chooses, P + M + K - 1, the step
        before the pool fills, whose kernel scores next step's candidates (the first eviction is
        at P + M + K); otherwise None. A caller that knows t statically passes ``leave=False``
        before it and ``leave=True`` from it to :meth:`begin_step` (False: it skips the layers'
        choice) and to :meth:`decode` (the step kernel is compiled with one loop, without the score
        or with it: head 96 or 149 registers a thread for the H200, against 149 with both; layer
        119 or 156)."""
        # layer_kernel (period 1, the kernel path) implies layer_choice; one_kernel is head's
        on = (self.keep > 0 and self.kernels.first_choice_scan
              and (self.layer_kernel(rows, heads) or self.one_kernel(rows, heads)))
        return self.prefix + self.local + self.keep - 1 if on else None

    def begin_step(self, caches, t, row_keys=None, first_layer: int = 0, leave: bool | None = None):
        """Before step t's layers run: every layer's move of the s oldest ring tokens (period s > 1),
        planned for all layers ``caches`` (a list, layer ``first_layer`` first) under one
        ``lax.cond``. At period 1 only layer granularity on the kernel path does work here: every
        layer's victim (:attr:`layer_choice`). The model calls it once per step, then each layer's
        ``decode(..., planned=True)``.

        The s tokens leave at j = R, R + s, R + 2s, ... (j = t - P): a real branch, so the other
        s - 1 steps of a period skip the scoring. XLA:GPU runs a conditional by copying its
        predicate to the host and waiting for the stream to drain, so one branch per layer and step
        (36 for GPT-XL) would stall the GPU 36 times a step; one per step for every layer does not.
        Only the plans (where each leaving token goes, the new running sums) come out of the
        branch: the caches stay outside it, read-only inside, so no compiler copies them in or out.

        ``leave`` (static; from :attr:`leave_schedule`): None branches on t as above; False: t is
        not a leaving step, nothing to do; True: plan without a branch, then keep the plan only if
        t is a leaving step (a select: any step is still correct, only slower). At period 1,
        ``leave=False`` says t is before :meth:`first_choice`: the victims are a placeholder."""
        if self.period == 1:
            if not (self.layer_choice and caches):
                return caches
            # before first_choice (leave False) no move evicts; at it (P + M + K - 1) the choice is
            # made from terms no kernel scored yet and unused: the pool fills only at the next step
            with jax.named_scope("evict"):
                first, sq = self._layer_choice(caches, t, choose=leave is not False)
            # Rows first_layer + i: decode's layer_index indexes them.
            pad = [(first_layer, 0)] + [(0, 0)] * (first.ndim - 1)
            choice = dict(zip(self.step_keys, (jnp.pad(first, pad), None if sq is None else jnp.pad(sq, pad))))
            return [{**cache, **choice} for cache in caches]
        if leave is False:
            return caches
        static_leave = leave
        P, R, s = self.prefix, self.ring, self.period
        j = t - P  # ring index of token t (negative while it goes to the prefix)
        leave_now = (j >= R) & (jnp.mod(j - R, s) == 0)
        leave = self._leave_slots(t)
        p_ls = [jnp.take(cache["pos"], leave, axis=2) for cache in caches]  # (B, G, s) per layer
        ops = [(cache["v"], cache["pos"], cache["vsum"]) for cache in caches]
        # The score terms the step before computed (fused_leave_score), on the static schedule only
        # (a branch does not know whether the last step had a leaving step after it), and only where
        # that step ran the window's kernel (its rows here: a device of a mesh sees fewer than init).
        terms = [(cache["dots"], cache["sq"]) if static_leave and "dots" in cache
                 and self.window_kernel(*cache["v"].shape[:2]) else None for cache in caches]

        def plan(ops):
            return self._leave_plans(ops, leave, p_ls, first_layer, row_keys, terms)

        def stay(ops):  # each token written back into its own slot
            return [(jnp.broadcast_to(leave, p_l.shape), p_l, vsum) for (_, _, vsum), p_l in zip(ops, p_ls)]

        with jax.named_scope("evict"):
            if static_leave:
                plans = [jax.tree.map(functools.partial(jnp.where, leave_now), a, b)
                         for a, b in zip(plan(ops), stay(ops))]
            else:
                plans = jax.lax.cond(leave_now, plan, stay, ops)
            return [self._move(cache, leave, leave_now, p_l, *pl) for cache, p_l, pl in zip(caches, p_ls, plans)]

    def _move(self, cache, leave, leave_now, p_l, dest, p_new, vsum):
        """Move the s leaving tokens to their plan's slots (every step: outside a leaving step the
        plan writes each back into its own slot, a no-op costing s slots per row and head)."""
        # Every read of the old cache (the scores, the dropped tokens' V in the running sum) is made
        # an input of the writes below, so XLA can update the cache in place without copying it first
        # (it copied all of K and V at every leaving step before). At 'layer' (G = 1) the leaving
        # tokens' positions go through the barrier too: XLA fused their read into the positions'
        # scatter and copied the positions first; at 'head' it fuses them without a copy.
        g, s = cache["pos"].shape[1], self.period
        if g == 1:
            kc, vc, pos, p_l, dest, p_new, vsum = jax.lax.optimization_barrier(
                (cache["k"], cache["v"], cache["pos"], p_l, dest, p_new, vsum))
        else:
            kc, vc, pos, dest, p_new, vsum = jax.lax.optimization_barrier(
                (cache["k"], cache["v"], cache["pos"], dest, p_new, vsum))
        b, h = kc.shape[:2]
        dest_h = jnp.broadcast_to(dest, (b, h, s))  # 'layer' (G = 1): the same slots in every head
        bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
        kc = kc.at[bi, hi, dest_h].set(jnp.take(kc, leave, axis=2), unique_indices=True)
        vc = vc.at[bi, hi, dest_h].set(jnp.take(vc, leave, axis=2), unique_indices=True)
        # The s ring slots are free until tokens j .. j + s - 1 fill them.
        pos = pos.at[:, :, leave].set(jnp.where(leave_now, -1, p_l))
        pos = pos.at[bi, jnp.arange(g)[None, :, None], dest].set(p_new, unique_indices=True)
        return {**cache, "k": kc, "v": vc, "pos": pos, "vsum": vsum}

    def _decode_period(self, cache, q, k, v, t, cond_mask, layer_index, row_keys, qkv=None, rope=None,
                       planned=False, before_leave=False):
        """A decode step at period s > 1: the moves (:meth:`begin_step`, here unless ``planned``),
        then the write and the attention in XLA, the attention kernel, or (:meth:`window_kernel`)
        one evict_step kernel."""
        if not planned:
            cache = self.begin_step([cache], t, row_keys, first_layer=layer_index)[0]
        c, P, K = self.c, self.prefix, self.keep
        kc, vc, pos, vsum = cache["k"], cache["v"], cache["pos"], cache["vsum"]
        ring = c + P + K + jnp.mod(t - P, self.ring)
        slot = jnp.where(t < P, c + t, ring)
        if self.window_kernel(*q.shape[:2]):  # between leaving steps nothing is scored: the window's kernel
            if before_leave and "dots" in cache:  # ... but the step before one scores its candidates
                return self._window_step(cache, q, k, v, t, slot, cond_mask, qkv, rope,
                                         score_vec=self._leaving_total(cache, v, t + 1, slot))
            return self._window_step(cache, q, k, v, t, slot, cond_mask, qkv, rope)
        kc, vc = write_slot(kc, k, slot), write_slot(vc, v, slot)
        pos = jax.lax.dynamic_update_slice_in_dim(
            pos, jnp.full(pos.shape[:2] + (1,), c + t, jnp.int32), slot, axis=2)
        mask = (pos >= 0) & cond_slot_mask(cond_mask, self.slots)  # (B, G, C)
        out = attend(q, kc, vc, mask, self.attention, config=self.kernels)
        return {**cache, "k": kc, "v": vc, "pos": pos, "vsum": vsum}, out

    def _leave_slots(self, t):
        """(s,) the ring slots of the s tokens that leave at step t, oldest first."""
        return self.c + self.prefix + self.keep + jnp.mod(t - self.prefix + jnp.arange(self.period), self.ring)

    def _with_leaving(self, vsum, v_l):
        """The running sum with the leaving tokens' v̂ (v_l (B, H, s, D)): (B, G, X)."""
        return vsum + jnp.sum(normalized_v(v_l, self.granularity), axis=2)

    def _leaving_total(self, cache, v_new, t_leave, slot):
        """The score vector of leaving step ``t_leave``'s candidates, as :meth:`begin_step` computes it
        then (running sum + v̂ of the s leaving tokens), on the step before, whose new token ``v_new``
        goes to ``slot`` (a leaving slot only with a ring of s slots). (B, H, D); 'layer': split into heads."""
        vc = cache["v"]
        b, h, _, d = vc.shape
        leave = self._leave_slots(t_leave)
        v_l = jnp.take(vc, leave, axis=2)  # (B, H, s, D)
        v_l = jnp.where((leave == slot)[:, None], v_new[:, :, None].astype(vc.dtype), v_l)
        return self._with_leaving(cache["vsum"], v_l).reshape(b, h, d)

    def _leave_plans(self, layers, leave, p_ls, first_layer, row_keys, terms):
        """Where the s oldest ring tokens (slots ``leave``, oldest first) go when they leave the ring,
        for every layer of ``layers`` ((v, pos, vsum) each).

        Candidates: the K pool slots in slot order, then the s leaving tokens oldest first. An
        empty pool slot scores +BIG, so ``lax.top_k`` "drops" the free slots first (lowest first)
        and then the highest-score tokens, s in all: the leaving tokens that survive fill the
        dropped pool slots, ascending, oldest first; the others are dropped. Scores are over the
        valid candidates (the filled pool slots and the s leaving tokens), as at s = 1. The scores
        and running sums read each layer's V; the choice in between works on small arrays, so it
        runs once for all layers stacked (a few kernels a step, not a few per layer).

        Returns per layer (dest (B, G, s): each leaving token's new slot, its own slot if dropped;
        its new position there, -1 if dropped; the new running sum (B, G, X))."""
        c, P, K, s = self.c, self.prefix, self.keep, self.period
        cands = [self._leave_candidates(vc, pos, vsum, leave, first_layer + i, row_keys, tm)
                 for i, ((vc, pos, vsum), tm) in enumerate(zip(layers, terms))]
        cand_ok = jnp.stack([x[0] for x in cands])  # (L, B, G, K+s)
        score = jnp.stack([x[1] for x in cands])
        ranked = jnp.where(cand_ok, score, BIG)
        if self.attention == "xla" or not self.kernels.leave_top_in_kernel:
            _, drop = jax.lax.top_k(ranked, s)  # (L, B, G, s); ties: lower index first
        else:  # the same indices without XLA's sort of every (layer, row, head)'s candidates
            drop = top_indices(ranked, s, interpret=self.attention == "pallas-interpret")
        dropped = jnp.any(drop[..., None] == jnp.arange(K + s), axis=-2)  # (L, B, G, K+s)
        drop_sorted = jnp.sort(drop, axis=-1)  # (L, B, G, s)
        slot = jnp.where(drop_sorted < K, c + P + drop_sorted, leave[jnp.clip(drop_sorted - K, 0, s - 1)])
        ok_drop = jnp.take_along_axis(cand_ok, drop_sorted, axis=-1)  # (L, B, G, s)
        stay = ~dropped[..., K:]  # (L, B, G, s) leaving tokens that move to the pool
        rank = jnp.cumsum(stay, axis=-1) - 1  # their order, oldest first
        freed = jnp.sort(jnp.where(drop < K, drop, K), axis=-1)  # (L, B, G, s) dropped pool slots, ascending
        dest_pool = jnp.take_along_axis(freed, jnp.clip(rank, 0, s - 1), axis=-1)
        dest = jnp.where(stay, c + P + dest_pool, leave)  # a dropped token is written back to its own slot
        out = []
        for i, ((vc, _, _), (_, _, total), p_l) in enumerate(zip(layers, cands, p_ls)):
            # v̂ of the s dropped candidates, in candidate order (a free pool slot adds 0): gathered,
            # not normalised over the whole pool
            b, h = vc.shape[:2]
            v_drop = jnp.take_along_axis(vc, jnp.broadcast_to(slot[i], (b, h, s))[..., None], axis=2)  # (B, H, s, D)
            vn_drop = jnp.where(ok_drop[i][..., None], normalized_v(v_drop, self.granularity), 0.0)  # (B, G, s, X)
            out.append((dest[i], jnp.where(stay[i], p_l, -1), total - jnp.sum(vn_drop, axis=2)))
        return out

    def _leave_candidates(self, vc, pos, vsum, leave, layer_index, row_keys, terms=None):
        """One layer's candidates at a leaving step: (valid (B, G, K+s), score (B, G, K+s), the
        running sum with the leaving tokens (B, G, X))."""
        c, P, K, s = self.c, self.prefix, self.keep, self.period
        b = vc.shape[0]
        g = pos.shape[1]
        v_l = jnp.take(vc, leave, axis=2)  # (B, H, s, D)
        cand_ok = jnp.concatenate([pos[:, :, c + P: c + P + K] >= 0, jnp.ones((b, g, s), bool)], axis=2)  # (B, G, K+s)
        total = self._with_leaving(vsum, v_l)  # (B, G, X): pool + leaving
        if self.chooser == "similarity":
            # v_i . total / |v_i| for every pool and ring slot in one multiply-and-sum over the cache
            # as it lies (identical V vectors get identical scores; no copy of the pool), the
            # leaving tokens' scores then taken from the ring's.
            every = self._pool_ring_scores(vc, total, terms)  # (B, G, K+R)
            score = jnp.concatenate([every[:, :, :K], jnp.take(every, leave - (c + P), axis=-1)], axis=-1)  # (B, G, K+s)
        elif self.chooser == "random" and self.draw == "candidates":
            keys = jax.vmap(lambda kk: jax.random.fold_in(kk, layer_index))(row_keys)
            score = jax.vmap(lambda kk: jax.random.uniform(kk, (g, K + s)))(keys)  # (B, G, K+s)
        else:
            raise ConfigError(f"period {s} > 1 needs chooser 'similarity' or draw 'candidates', got "
                              f"{self.chooser!r} / {self.draw!r}")
        return cand_ok, score, total
