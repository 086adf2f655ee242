"""``dense``: LlamaGen's full cache, slot c + t holds image token t."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ..kernels import evict_step
from ..options import XLA_KERNELS, KernelConfig
from .layout import attend, cond_slot_mask, empty_kv, prefill_kv, write_slot


@dataclasses.dataclass(frozen=True)
class Dense:
    """LlamaGen's cache: slot c + t holds image token t."""

    takes_qkv = True  # decode(..., qkv=) (not a field)
    full_cache = True  # slot c + t holds token t: a scan segment need read only the slots it filled
    c: int
    n: int
    name: str = "dense"
    # Kernel choices and tiling, set by generate / score from their options (kernel_config).
    kernels: KernelConfig = dataclasses.field(default=XLA_KERNELS, repr=False)

    @property
    def slots(self) -> int:
        return self.c + self.n - 1  # the last image token is never fed back

    @property
    def attention(self) -> str:
        """The decode attention: 'xla', 'pallas' or 'pallas-interpret' (``kernels.attention``)."""
        return self.kernels.attention

    def attended(self, t: int) -> int:
        return self.c + t + 1

    def init(self, batch, heads, head_dim, dtype):
        return empty_kv(batch, heads, self.slots, head_dim, dtype)

    def prefill(self, cache, k, v):
        return prefill_kv(cache, k, v, self.c)

    def one_kernel(self, rows: int, heads: int) -> bool:
        """Whether a decode step (cache write + attention) runs as one Pallas kernel
        (:func:`adsa_jax.kernels.evict_step` on the dense cache): the kernel path
        (``kernels.dense_one_kernel``, on by default) where its one program per (row, head) is not
        too little work spread too thin (:meth:`adsa_jax.options.KernelConfig.one_kernel_fits`)."""
        if self.attention == "xla":
            return False
        return self.kernels.dense_one_kernel and self.kernels.one_kernel_fits(rows, heads, self.slots)

    def decode(self, cache, q, k, v, t, cond_mask, *, layer_index=0, row_keys=None, span=None, qkv=None, rope=None):
        slot = self.c + t
        if self.one_kernel(*q.shape[:2]):
            zero = jnp.int32(0)
            out, kc, vc = evict_step(q, k, v, cache["k"], cache["v"], None, cond_slot_mask(cond_mask, self.slots)[:, 0],
                                             (slot, zero, zero, zero, zero, zero, slot), c=self.c, prefix=0, keep=0,
                                             qkv=qkv, rope=rope, config=self.kernels,
                                      interpret=self.attention == "pallas-interpret")
            return {**cache, "k": kc, "v": vc}, out
        kc, vc = write_slot(cache["k"], k, slot), write_slot(cache["v"], v, slot)
        if self.attention != "xla":  # the kernel reads slots < slot + 1 only, whatever the span
            out = attend(q, kc, vc, cond_slot_mask(cond_mask, self.slots), self.attention, slot + 1,
                         config=self.kernels)
            return {**cache, "k": kc, "v": vc}, out
        span = self.slots if span is None else min(span, self.slots)
        # Only the first `span` slots can be filled during this scan segment: read just those.
        mask = (jnp.arange(span) <= slot)[None, None] & cond_slot_mask(cond_mask, span)
        out = attend(q, kc[:, :, :span], vc[:, :, :span], mask)
        return {**cache, "k": kc, "v": vc}, out
