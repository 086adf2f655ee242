"""``adsa-select``: the full cache; a step attends to condition + prefix P + the K lowest-score
tokens of the previous region + the local M (a gather, so it reads only the budget)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..options import XLA_KERNELS, KernelConfig
from .layout import BIG, attend, cond_slot_mask, empty_kv, normalized_v, prefill_kv, write_slot


@dataclasses.dataclass(frozen=True)
class Select:
    """adsa-select: full cache, attention over cond + prefix + top-K of the previous region + local."""

    full_cache = True  # slot c + t holds token t, as in dense: a scan segment reads the slots it filled
    c: int
    n: int
    prefix: int = 0
    keep: int = 0
    local: int = 1
    granularity: str = "head"
    name: str = "adsa-select"
    # Kernel choices and tiling (the attention over the gathered slots), set by generate / score.
    kernels: KernelConfig = dataclasses.field(default=XLA_KERNELS, repr=False)

    @property
    def attention(self) -> str:
        """The decode attention: 'xla', 'pallas' or 'pallas-interpret' (``kernels.attention``)."""
        return self.kernels.attention

    @property
    def slots(self) -> int:
        return self.c + self.n - 1  # the full cache, as dense

    def attended(self, t: int) -> int:
        return self.c + min(t + 1, self.prefix + self.keep + self.local)

    def init(self, batch, heads, head_dim, dtype):
        g, x = (heads, head_dim) if self.granularity == "head" else (1, heads * head_dim)
        # sel: image indices attended from the previous region at the last step (-1 = none);
        # kept for inspection and tests, it is K int32 per row and head.
        return {**empty_kv(batch, heads, self.slots, head_dim, dtype), "vsum": jnp.zeros((batch, g, x), jnp.float32),
                "sel": jnp.full((batch, g, self.keep), -1, jnp.int32)}

    def prefill(self, cache, k, v):
        return prefill_kv(cache, k, v, self.c)

    def one_kernel(self, rows: int, heads: int) -> bool:
        return False  # its gather of the kept slots runs in XLA

    def decode(self, cache, q, k, v, t, cond_mask, *, layer_index=0, row_keys=None, span=None, qkv=None, rope=None):
        c, P, K, M = self.c, self.prefix, self.keep, self.local
        slot = c + t
        kc, vc = write_slot(cache["k"], k, slot), write_slot(cache["v"], v, slot)
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
        head_ok = (head_tok <= t)[None, None] & cond_slot_mask(cond_mask, c + P)
        keys = jnp.concatenate([kc[:, :, : c + P], k_sel, k_loc], axis=2)
        vals = jnp.concatenate([vc[:, :, : c + P], v_sel, v_loc], axis=2)
        mask = jnp.concatenate([jnp.broadcast_to(head_ok, (b, h, c + P)), sel_ok,
                                jnp.broadcast_to(loc_ok, (b, h, M))], axis=2)
        out = attend(q, keys, vals, mask, self.attention, config=self.kernels)
        g = cache["sel"].shape[1]
        sel_idx = jnp.pad(jnp.broadcast_to(sel_idx, (b, g, kk)), ((0, 0), (0, 0), (0, K - kk)), constant_values=-1)
        return {**cache, "k": kc, "v": vc, "vsum": vsum, "sel": sel_idx}, out
