"""``h2o``: Heavy-Hitter Oracle (Zhang et al. 2023, spec/kv-baselines.md) in the evict layout.

Cache ``[cond | prefix P | heavy-hitter pool K | ring M]`` (default P = 0: H2O protects no
prefix; the condition is always kept, outside the budget, as in every policy). Every cached slot
carries ``acc``, the attention probability its token has received, summed over every query so
far (per layer, row and head). When the ring hands over its oldest token o, o enters the pool;
if the pool is full the candidate (pool slots in slot order, then o) with the **lowest** ``acc``
is evicted (first minimum in that order), with granularity 'head' per head, with 'layer' on the
sum over heads (one decision per layer and row). A token's ``acc`` travels with it.

Differences from the paper's description: the eviction of step t uses the sums up to step t - 1
and happens before step t's attention (the layout moves o when token t is written), so a step
attends to P + K + M image tokens, never one more; the recent window is the ring of M.

The decision needs the attention probabilities of every step, so this policy always uses the
XLA attention (the class has no ``kernels`` field: :func:`adsa_jax.generate.with_kernels` keeps
XLA's attention for ``attention='auto'`` and refuses the Pallas kernels). A step costs one extra
(B, H, S) float32 add over the cache, never an O(N^2) array.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ..config import NEG_INF
from .layout import BIG, cond_slot_mask, empty_kv, prefill_kv, write_slot


@dataclasses.dataclass(frozen=True)
class H2O:
    """h2o: evict the pool candidate with the lowest accumulated attention (module docstring)."""

    c: int
    n: int
    prefix: int = 0
    keep: int = 0
    local: int = 1
    granularity: str = "head"
    name: str = "h2o"

    @property
    def slots(self) -> int:
        return self.c + self.prefix + self.keep + self.local

    def attended(self, t: int) -> int:
        return self.c + min(t + 1, self.prefix + self.keep + self.local)

    def init(self, batch, heads, head_dim, dtype):
        g = heads if self.granularity == "head" else 1
        return {**empty_kv(batch, heads, self.slots, head_dim, dtype),
                "pos": jnp.full((batch, g, self.slots), -1, jnp.int32),
                "acc": jnp.zeros((batch, heads, self.slots), jnp.float32)}

    def prefill(self, cache, k, v):
        cache = prefill_kv(cache, k, v, self.c)
        return {**cache, "pos": cache["pos"].at[:, :, : self.c].set(jnp.arange(self.c, dtype=jnp.int32))}

    def decode(self, cache, q, k, v, t, cond_mask, *, layer_index=0, row_keys=None, span=None, qkv=None, rope=None):
        c, P, K, M = self.c, self.prefix, self.keep, self.local
        kc, vc, pos, acc = cache["k"], cache["v"], cache["pos"], cache["acc"]
        b, h = kc.shape[:2]
        ring = c + P + K + jnp.mod(t - P, M)
        if K > 0:
            with jax.named_scope("evict"):
                kc, vc, pos, acc = self._to_pool(kc, vc, pos, acc, t, ring)
        slot = jnp.where(t < P, c + t, ring)
        kc, vc = write_slot(kc, k, slot), write_slot(vc, v, slot)
        pos = jax.lax.dynamic_update_slice_in_dim(
            pos, jnp.full(pos.shape[:2] + (1,), c + t, jnp.int32), slot, axis=2)
        acc = jax.lax.dynamic_update_slice_in_dim(acc, jnp.zeros((b, h, 1), jnp.float32), slot, axis=2)
        mask = (pos >= 0) & cond_slot_mask(cond_mask, self.slots)  # (B, G, S)
        # The XLA attention of layout.attend, keeping the probabilities.
        scale = 1.0 / math.sqrt(q.shape[-1])
        logits = jnp.einsum("BHD,BHSD->BHS", q, kc, preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1)  # (B, H, S) f32
        out = jnp.einsum("BHS,BHSD->BHD", probs.astype(vc.dtype), vc)
        return {**cache, "k": kc, "v": vc, "pos": pos, "acc": acc + probs}, out

    def _to_pool(self, kc, vc, pos, acc, t, ring):
        """Move the ring's oldest token o into the pool: the lowest free pool slot, else the slot
        of the lowest-acc candidate (or o is dropped when it is the lowest)."""
        c, P, K, M = self.c, self.prefix, self.keep, self.local
        b, h = kc.shape[:2]
        moving = t - P >= M
        n_moved = t - P - M
        k_o = jax.lax.dynamic_slice_in_dim(kc, ring, 1, axis=2)[:, :, 0]  # (B, H, D)
        v_o = jax.lax.dynamic_slice_in_dim(vc, ring, 1, axis=2)[:, :, 0]
        p_o = jax.lax.dynamic_slice_in_dim(pos, ring, 1, axis=2)[:, :, 0]  # (B, G)
        a_o = jax.lax.dynamic_slice_in_dim(acc, ring, 1, axis=2)[:, :, 0]  # (B, H)
        # Candidates: the contiguous [pool | ring] slots, of which the pool and o's ring slot count;
        # o sits after the pool, so the first minimum prefers pool slots, in slot order.
        score = acc[:, :, c + P:]  # (B, H, K+M)
        if self.granularity == "layer":
            score = jnp.sum(score, axis=1, keepdims=True)  # (B, 1, K+M)
        cand = (jnp.arange(K + M) < K) | (jnp.arange(K + M) == ring - (c + P))
        victim = jnp.minimum(jnp.argmin(jnp.where(cand, score, BIG), axis=-1), K)  # (B, G); K: o
        target = jnp.where(n_moved >= K, victim, jnp.clip(n_moved, 0, K - 1))
        dest = jnp.where(moving & (target < K), c + P + target, ring)  # (B, G); ring: a no-op write
        dest_h = jnp.broadcast_to(dest, (b, h))
        bi, hi = jnp.arange(b)[:, None], jnp.arange(h)[None, :]
        kc = kc.at[bi, hi, dest_h].set(k_o, unique_indices=True)
        vc = vc.at[bi, hi, dest_h].set(v_o, unique_indices=True)
        acc = acc.at[bi, hi, dest_h].set(a_o, unique_indices=True)
        pos = pos.at[bi, jnp.arange(pos.shape[1])[None, :], dest].set(p_o, unique_indices=True)
        return kc, vc, pos, acc
