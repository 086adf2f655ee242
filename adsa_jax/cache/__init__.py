"""KV-cache policies: how each layer stores image-token K/V and which entries a query reads.

Every policy is a frozen, hashable dataclass (a static argument of ``jit``) with three
functions over one layer's cache, a dict pytree:

    init(batch, heads, head_dim, dtype)       -> cache       (fixed shapes for the whole call)
    prefill(cache, k, v)                      -> cache       (k, v: (B, c, H, D) condition K/V)
    decode(cache, q, k, v, t, cond_mask, ...) -> cache, out  (q, k, v: (B, H, D) of image token t)

A policy whose class sets ``takes_qkv = True`` is also passed ``qkv=`` (B, 3, H, D), the same
q, k, v in one array but before RoPE, and ``rope=`` (D/2, 2), the position's RoPE row, which
its Pallas step kernel reads in place (no copies). A policy with ``begin_step(caches, t, row_keys)
-> caches`` gets every layer's cache once per step before the layers run, then ``decode(...,
planned=True)``: work that can share one branch or one kernel across layers (adsa-evict's period
s > 1; at layer granularity on the kernel path, every layer's victim). What it adds to the dicts
for that step (the policy's ``step_keys``) the step's decode drops. With
a static schedule (``leave_schedule``) the step before a leaving one is ``decode(...,
before_leave=True)``, so it may prepare that step's work. A class with ``full_cache = True`` keeps
image token t in slot c + t, so a decode scan segment need read only the slots it can have filled.

Cache arrays use the layout ``k, v: (B, H, S, D)`` (:mod:`.layout`). Keys are cached after
RoPE, so a slot's position travels with it and slot order never matters. Policies
(spec/adsa.md), one module each:

- ``dense``        (:mod:`.dense`) LlamaGen's full cache (c + N - 1 slots).
- ``adsa-select``  (:mod:`.select`) full cache; attends to condition + prefix P + the K
                   lowest-score tokens of the previous region + the local M.
- ``adsa-evict``   (:mod:`.evict`) ``C = c + P + K + M`` slots [cond | prefix | pool | ring];
                   option ``period`` s: s tokens leave the ring together every s steps.
- ``adsa-evict-all`` adsa-evict with P = 0 and M = 1: any cached image token but the current
                   one can be evicted (the whole-cache reading).
- ``window``       sinks + recent window: [cond | prefix | ring of K + M], FIFO (no pool).
- ``line``         LineAR-style: condition + anchors (one grid row) + the last whole grid rows, FIFO.
- ``random``       the evict layout, the evicted candidate drawn uniformly from pool + newcomer.
- ``random-uniform`` the evict layout, the pool a uniform random sample of the whole previous
                   region (reservoir sampling).
- ``h2o``          (:mod:`.h2o`) heavy hitters: evict the lowest accumulated attention.

Score (per layer, row and head, or per layer and row with ``granularity='layer'``):
``v̂_i · Σ_j v̂_j`` over the region, with a running sum ``vsum`` of normalised V kept in the
cache so that a step costs O(K·d).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ..checks import check_granularity, check_period, check_policy_sizes
from ..config import ConfigError, GPTConfig
from .dense import Dense
from .evict import Evict
from .h2o import H2O
from .layout import ATTENTION_IMPLS, attend, normalized_v
from .select import Select

__all__ = ["POLICY_NAMES", "PERIOD_POLICIES", "ATTENTION_IMPLS", "Dense", "Select", "Evict", "H2O", "attend",
           "normalized_v", "default_sizes", "make_policy", "kv_bytes"]

POLICY_NAMES = ("dense", "adsa-select", "adsa-evict", "adsa-evict-all", "window", "line", "random", "random-uniform",
                "h2o")
PERIOD_POLICIES = ("adsa-evict", "adsa-evict-all", "random")  # those that take an eviction period s > 1


def default_sizes(cfg: GPTConfig, budget: float) -> tuple[int, int, int]:
    return default_sizes_of(cfg.num_image_tokens, cfg.grid, budget)


def default_sizes_of(N: int, w: int, budget: float) -> tuple[int, int, int]:
    total = round(budget * N)
    P, M = w, 2 * w
    K = total - P - M
    if K < 0:
        raise ConfigError(
            f"budget {budget} keeps {total} image tokens, fewer than the default prefix ({P}, one row) + "
            f"local ({M}, two rows); give explicit sizes (prefix=, keep=, local=) or a larger budget"
        )
    return P, K, M


def _check_period(name: str, period) -> int:
    period = check_period(period)
    if period != 1 and name not in PERIOD_POLICIES:
        raise ConfigError(f"period applies to {', '.join(PERIOD_POLICIES)}; policy {name!r} takes period=1 only")
    return period


def make_policy(cfg: GPTConfig, name: str = "dense", *, budget: float | None = None, prefix: int | None = None,
                keep: int | None = None, local: int | None = None, granularity: str = "head", period: int = 1):
    """Build a policy for cfg. ``budget`` is a fraction of the N image tokens, T = round(budget * N)
    of them kept per layer (default 0.5), or give the sizes ``prefix``/``keep``/``local`` (P, K, M).
    Budget 1.0 makes every policy equal dense. Per policy (spec/adsa.md, spec/kv-baselines.md):

    - ``adsa-evict``, ``random``: P = one grid row, M = two rows, K = T - P - M (explicit sizes
      override); ``period`` s >= 1, the eviction period (s tokens leave the ring together every s
      steps; the ring grows by s - 1 slots).
    - ``adsa-select``: the same sizes, no period.
    - ``adsa-evict-all``: the whole cache is evictable: P = 0, M = 1 (the current token), K = T - 1;
      give ``budget`` or ``keep`` (then keep + 1 tokens), never prefix or local; ``period`` as above.
    - ``random-uniform``: the ``random`` layout and sizes, the pool a uniform (reservoir) sample of
      the whole previous region (:class:`Evict`, ``draw``); period 1.
    - ``window``: condition + P + the last K + M tokens, FIFO.
    - ``line``: condition + P anchors (default one grid row) + the last r whole grid rows, FIFO,
      r = floor((T - P) / w): ``window`` with its recent part rounded down to whole rows (equal to
      window when T - P is a multiple of w; at a 24x24 grid's budgets 0.25, 0.5, 0.75 it is).
      Give ``budget`` (and optionally ``prefix``), or ``prefix`` and ``local`` (a multiple of w).
    - ``h2o``: P = 0, recent M = two rows, heavy hitters K = T - M (explicit sizes override).

    ``granularity`` ('head' or 'layer') applies to the scored policies (adsa-*, h2o); the random
    policies draw per head with 'head' and once per layer and row with 'layer'.
    """
    c, N, w = cfg.cls_token_num, cfg.num_image_tokens, cfg.grid
    if name not in POLICY_NAMES:
        raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    check_granularity(granularity)
    period = _check_period(name, period)
    if name == "dense":
        if any(x is not None for x in (budget, prefix, keep, local)):
            raise ConfigError("the dense policy keeps every token: it takes no budget or sizes")
        return Dense(c, N)
    # types and ranges (a float size like 16.0 becomes 16); their sums are checked below
    budget, prefix, keep, local = check_policy_sizes(budget, prefix, keep, local, tokens=N)
    if name == "adsa-evict-all":
        P, K, M = _evict_all_sizes(N, budget, prefix, keep, local)
    elif name == "line":
        P, K, M = _line_sizes(N, w, budget, prefix, keep, local)
    else:
        P, K, M = _sizes(name, N, w, budget, prefix, keep, local)
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
    if name == "line":
        return Evict(c, N, prefix=P, keep=0, local=M, granularity=granularity, chooser="similarity", name="line")
    if name == "h2o":
        return H2O(c, N, prefix=P, keep=K, local=M, granularity=granularity)
    chooser = "random" if name in ("random", "random-uniform") else "similarity"
    draw = "reservoir" if name == "random-uniform" else "candidates"
    pol = Evict(c, N, prefix=P, keep=K, local=M, granularity=granularity, chooser=chooser, name=name,
                period=period, draw=draw)
    return _check_period_evicts(pol)


def _check_period_evicts(pol):
    """Refuse a period whose ring (local + period - 1 slots) holds every token the sizes would evict
    at period 1: the policy would then never evict (a cache larger than dense's, silently dense).
    At budget 1 nothing is evicted at any period (every policy equals dense): that stays allowed."""
    def evicts(s):  # whether the last decode step attends fewer tokens than dense's
        return pol.n >= 2 and dataclasses.replace(pol, period=s).attended(pol.n - 2) < pol.c + pol.n - 1

    if pol.period > 1 and evicts(1) and not evicts(pol.period):
        largest = max(s for s in range(1, pol.period) if evicts(s))
        raise ConfigError(f"period {pol.period}: the ring (local {pol.local} + period - 1 slots) would hold every token "
                          f"this budget evicts from the {pol.n} image tokens, so none would ever be evicted; use "
                          f"period <= {largest}")
    return pol


def _sizes(name, N, w, budget, prefix, keep, local):
    """P, K, M of the policies sized as adsa-evict (h2o: default prefix 0)."""
    if budget is None and None in (prefix, keep, local):
        if all(x is None for x in (prefix, keep, local)):
            budget = 0.5
        else:
            raise ConfigError("give a budget fraction, or all three of prefix, keep and local")
    if budget is None:
        return prefix, keep, local
    total = round(budget * N)
    P = (0 if name == "h2o" else w) if prefix is None else prefix
    M = 2 * w if local is None else local
    K = total - P - M if keep is None else keep
    if keep is None and K < 0:
        if prefix is None and local is None:
            if name == "h2o":
                raise ConfigError(f"budget {budget} keeps {total} image tokens, fewer than h2o's default recent "
                                  f"window ({M}, two rows); give explicit sizes (prefix=, keep=, local=) or a "
                                  "larger budget")
            default_sizes_of(N, w, budget)  # raises the defaults message
        raise ConfigError(f"prefix {P} + local {M} exceed the budget of {total} image tokens ({budget} of {N})")
    if keep is not None and P + K + M != total and (prefix is None or local is None):
        raise ConfigError(f"prefix {P} + keep {K} + local {M} != budget {total}; give sizes or a budget, not both")
    return P, K, M


def _evict_all_sizes(N, budget, prefix, keep, local):
    """adsa-evict-all: P = 0, M = 1 (only the current token is protected), K = T - 1."""
    if prefix not in (None, 0) or local not in (None, 1):
        raise ConfigError("adsa-evict-all protects no prefix or local window (prefix 0, local 1): give budget= "
                          "or keep= only (use adsa-evict for a protected prefix and local window)")
    if budget is not None and keep is not None:
        raise ConfigError("adsa-evict-all: give budget= or keep=, not both")
    if keep is None:
        total = round((0.5 if budget is None else budget) * N)
        if total < 1:
            raise ConfigError(f"budget {budget} keeps no image token of {N}: give a larger budget")
        keep = total - 1
    return 0, keep, 1


def _line_sizes(N, w, budget, prefix, keep, local):
    """line: P anchors (default one grid row) + a ring of r whole grid rows, r = floor((T - P) / w)."""
    if keep not in (None, 0):
        raise ConfigError("line keeps anchors and whole recent rows, no pool: give budget= (and prefix=), or "
                          "prefix= and local=, not keep=")
    if budget is not None and local is not None:
        raise ConfigError("line: give budget= or local=, not both")
    P = w if prefix is None else prefix
    if local is None:
        total = round((0.5 if budget is None else budget) * N)
        rows = (total - P) // w
        if rows < 1:
            raise ConfigError(f"budget {budget} keeps {total} image tokens, fewer than the line policy's anchors ({P}) "
                              f"+ one grid row ({w}); give a larger budget or fewer anchors (prefix=)")
        return P, 0, rows * w
    if prefix is None:
        raise ConfigError("line: with local= give prefix= too (the anchors)")
    if local % w:
        raise ConfigError(f"line's local window is whole grid rows: local must be a multiple of {w}, got {local}")
    return P, 0, local


def kv_bytes(policy, cfg: GPTConfig, rows: int, dtype) -> int:
    """Exact bytes of K and V over all layers for `rows` batch rows (rows = 2 per image with CFG)."""
    return 2 * cfg.n_layer * rows * cfg.n_head * policy.slots * cfg.head_dim * jnp.dtype(dtype).itemsize
