"""LlamaGen's sampling: CFG combine, temperature, top-k (ties kept), top-p, categorical draw.

Everything in float32, with the filter parameters as traced scalars (no recompiles). top-k
and top-p are applied as thresholds, so there is no scatter: top-k keeps every logit >= the
k-th largest; top-p keeps the shortest sorted prefix whose cumulative probability crosses
``top_p`` (the crossing token kept, the top token always).

Two static choices, neither of which changes a result: ``top_p_on`` (top-p needs one descending
sort of each row; off, ``top_p`` must be 1) and ``kth`` (``KernelConfig.kth``), where the k-th
largest comes from when nothing else needs the sort: 'sort', or 'pallas' (GPU) /
'pallas-interpret' (tests), :func:`adsa_jax.kernels.kth_largest`, which finds the same value by
a bitwise search, no sort.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import NEG_INF
from .kernels import kth_largest
from .options import KTH_IMPLS


def cfg_combine(cond_logits, uncond_logits, scale):
    return uncond_logits + (cond_logits - uncond_logits) * scale


def filter_logits(logits, temperature, top_k, top_p, *, kth: str = "sort", top_p_on: bool = True):
    """logits (..., V) float32 -> logits with filtered entries at NEG_INF (LlamaGen order).

    top_p_on=False skips top-p (and its sort): only valid with top_p = 1. kth: see module doc."""
    if kth not in KTH_IMPLS:
        raise ValueError(f"kth must be one of {KTH_IMPLS}, got {kth!r}")
    logits = logits.astype(jnp.float32) / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-5)
    v = logits.shape[-1]
    top_k = jnp.asarray(top_k, jnp.int32)
    k = jnp.where(top_k > 0, jnp.clip(top_k, 1, v), v)
    if top_p_on or kth == "sort":
        srt = -jnp.sort(-logits, axis=-1)  # (..., V) descending
        kth_v = jnp.take_along_axis(srt, jnp.broadcast_to(k - 1, srt.shape[:-1])[..., None], axis=-1)  # (..., 1)
    else:
        rows = logits.reshape(-1, v)  # (R, V)
        kth_v = kth_largest(rows, k, interpret=kth == "pallas-interpret").reshape(logits.shape[:-1] + (1,))
    logits = jnp.where(logits >= kth_v, logits, NEG_INF)
    if not top_p_on:
        return logits
    srt = jnp.where(srt >= kth_v, srt, NEG_INF)
    top_p = jnp.asarray(top_p, jnp.float32)
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    # Sorted position i survives iff i == 0 or cum[i-1] <= top_p.
    n_keep = 1 + jnp.sum(cum[..., :-1] <= top_p, axis=-1, keepdims=True)
    pth = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
    return jnp.where((top_p < 1.0) & (logits < pth), NEG_INF, logits)


def probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """LlamaGen's ``logits_to_probs``: softmax of the filtered logits."""
    return jax.nn.softmax(filter_logits(logits, temperature, top_k, top_p), axis=-1)


def sample(keys, logits, temperature, top_k, top_p, *, kth: str = "sort", top_p_on: bool = True):
    """One token per row: keys (B,) typed keys, logits (B, V) -> (B,) int32."""
    f = filter_logits(logits, temperature, top_k, top_p, kth=kth, top_p_on=top_p_on)
    return jax.vmap(lambda kk, row: jax.random.categorical(kk, row))(keys, f).astype(jnp.int32)


# The one validator of the sampling scalars (the Python API, SamplingConfig and the CLI use it).
from .checks import check_sampling_args  # noqa: E402,F401
