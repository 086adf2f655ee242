"""KV-cache policies: how each layer stores image-token K/V and which entries a query reads.

Every policy is a frozen, hashable dataclass (a static argument of ``jit``) with three
functions over one layer's cache, a dict pytree:

    init(batch, heads, head_dim, dtype)       -> cache       (fixed shapes for the whole call)
    prefill(cache, k, v)                      -> cache       (k, v: (B, c, H, D) condition K/V)
    decode(cache, q, k, v, t, cond_mask, ...) -> cache, out  (q, k, v: (B, H, D) of image token t)

A policy whose class sets ``takes_qkv = True`` is also passed ``qkv=`` (B, 3, H, D), the same
q, k, v in one array but before RoPE, and ``rope=`` (D/2, 2), the position's RoPE row, which
its Pallas step kernel reads in place (no copies). A class with ``full_cache = True`` keeps
image token t in slot c + t, so a decode scan segment need read only the slots it can have filled.

Cache arrays use the layout ``k, v: (B, H, S, D)`` (:mod:`.layout`). Keys are cached after
RoPE, so a slot's position travels with it and slot order never matters. Policies
(spec/adsa.md), one module each:

- ``dense``        (:mod:`.dense`) LlamaGen's full cache (c + N - 1 slots).
- ``adsa-select``  (:mod:`.select`) full cache; attends to condition + prefix P + the K
                   lowest-score tokens of the previous region + the local M.
- ``adsa-evict``   (:mod:`.evict`) ``C = c + P + K + M`` slots [cond | prefix | pool | ring].
- ``window``       sinks + recent window: [cond | prefix | ring of K + M], FIFO (no pool).
- ``random``       the evict layout, the evicted candidate drawn uniformly.

Score (per layer, row and head, or per layer and row with ``granularity='layer'``):
``v̂_i · Σ_j v̂_j`` over the region, with a running sum ``vsum`` of normalised V kept in the
cache so that a step costs O(K·d).
"""
from __future__ import annotations

import jax.numpy as jnp

from ..config import ConfigError, GPTConfig
from .dense import Dense
from .evict import Evict
from .layout import ATTENTION_IMPLS, attend, normalized_v
from .select import Select

__all__ = ["POLICY_NAMES", "ATTENTION_IMPLS", "Dense", "Select", "Evict", "attend", "normalized_v", "default_sizes",
           "make_policy", "kv_bytes"]

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
