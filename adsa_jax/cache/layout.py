"""The cache layout every policy shares: ``k, v: (B, H, S, D)`` per layer, keys after RoPE.

Helpers for one layer's slots (write, prefill, condition mask), the decode attention over a
cache (:func:`attend`, XLA or the Pallas kernel) and ADSA's normalised V.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..config import NEG_INF
from ..kernels import decode_attention
from ..options import IMPLS, XLA_KERNELS, KernelConfig

EPS = 1e-6  # floor of a V norm before dividing by it
BIG = 1e30  # a score no candidate reaches (finite, like NEG_INF)

ATTENTION_IMPLS = IMPLS  # decode attention: the reference, the GPU kernel, its interpreter

__all__ = ["NEG_INF", "EPS", "BIG", "ATTENTION_IMPLS", "attend", "normalized_v", "write_slot", "cond_slot_mask",
           "empty_kv", "prefill_kv"]


def attend(q, k, v, mask, impl: str = "xla", n_valid=None, score_vec=None, config: KernelConfig = XLA_KERNELS):
    """q (B,H,D), k/v (B,H,S,D), mask broadcastable to (B,H,S) -> (B,H,D); f32 logits/softmax.

    impl 'xla' is the reference; 'pallas' is the GPU kernel of :mod:`adsa_jax.kernels`, which
    also skips slots >= n_valid (default: all S), 'pallas-interpret' the same kernel run by
    the Pallas interpreter (any backend; tests). With ``score_vec`` (kernel only) it returns
    ``(out, dots, sq)``, ADSA's score terms from the same read of V (``decode_attention``).
    config: the kernel's tiling (:class:`adsa_jax.options.KernelConfig`)."""
    if impl != "xla":
        b, h, s = k.shape[:3]
        m = jnp.broadcast_to(mask, (b, mask.shape[1] if mask.ndim == 3 else 1, s))  # (B, 1|G, S)
        return decode_attention(q, k, v, m, s if n_valid is None else n_valid, score_vec=score_vec, config=config,
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


def write_slot(x, val, slot):
    """Write val (B,H,D) into slot (traced scalar) of x (B,H,S,D)."""
    return jax.lax.dynamic_update_slice_in_dim(x, val[:, :, None, :].astype(x.dtype), slot, axis=2)


def cond_slot_mask(cond_mask, total: int):
    """(B, 1, total) bool: condition slots follow the caption mask, later slots are allowed."""
    b, c = cond_mask.shape
    return jnp.concatenate([cond_mask, jnp.ones((b, total - c), bool)], axis=1)[:, None, :]


def empty_kv(batch: int, heads: int, slots: int, head_dim: int, dtype) -> dict:
    """A layer's zero K and V, (B, H, S, D) each."""
    z = jnp.zeros((batch, heads, slots, head_dim), dtype)
    return {"k": z, "v": z}


def prefill_kv(cache: dict, k, v, c: int) -> dict:
    """Write the c condition positions' k, v (B, c, H, D) into slots 0..c-1."""
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, H, c, D)
    return {**cache, "k": cache["k"].at[:, :, :c].set(kt.astype(cache["k"].dtype)),
            "v": cache["v"].at[:, :, :c].set(vt.astype(cache["v"].dtype))}
