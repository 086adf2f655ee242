"""The evict family, one fixed [cond | prefix P | pool K | ring M] cache: ``adsa-evict`` (a token
leaving the ring enters the pool; when the pool is full the highest-score candidate of pool +
newcomer is evicted), ``window`` (sinks + recent window, FIFO: no pool) and ``random`` (the
evicted candidate drawn uniformly)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .. import kernels
from ..config import ConfigError
from .layout import BIG, EPS, attend, cond_slot_mask, normalized_v, write_slot


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
        kc, vc = write_slot(kc, k, slot), write_slot(vc, v, slot)
        pos = jax.lax.dynamic_update_slice_in_dim(
            pos, jnp.full(pos.shape[:2] + (1,), c + t, jnp.int32), slot, axis=2)
        mask = (pos >= 0) & cond_slot_mask(cond_mask, self.slots)  # (B, G, C)
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
        c, P, K, M = self.c, self.prefix, self.keep, self.local
        ring0 = c + P + K
        ring = ring0 + jnp.mod(t - P, M)
        n_moved = t - P - M  # tokens that moved to the pool before the one leaving the window now
        scalars = (jnp.where(t < P, c + t, ring), ring, t - P >= M, n_moved >= K, jnp.clip(n_moved, 0, max(K - 1, 0)),
                   ring0 + jnp.mod(t + 1 - P, M), c + t)
        cond_ok = cond_slot_mask(cond_mask, self.slots)[:, 0]  # (B, C)
        res = kernels.evict_step(q, k, v, cache["k"], cache["v"], cache["pos"], cond_ok, scalars, c=c, prefix=P, keep=K,
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
        vc = vc.at[bi, hi, dest_h].set(v_o[:, :, 0], unique_indices=True)
        pos = pos.at[bi[:, :1] if pos.shape[1] == 1 else bi, jnp.arange(pos.shape[1])[None, :], dest].set(
            p_o, unique_indices=True)
        return kc, vc, pos, vsum
