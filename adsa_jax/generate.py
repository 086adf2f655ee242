"""Generation: prefill + ``lax.scan`` decode in one jit-compiled call (on one device or a mesh),
and the scoring paths.

Batch rows: with CFG every image has two rows, interleaved ``[cond_0, uncond_0, cond_1, ...]``
so a data-parallel split never separates a pair. Randomness: the key of image i is
``fold_in(key, example_ids[i])`` and the key of its step s is ``fold_in(that, s)``, so no key
depends on the batch size, the image's position in the batch, or the device count. The arithmetic
may (XLA picks kernels and fusions by shape; in bf16 a changed rounding flips tokens), unless
``KernelConfig.batch_invariant``: then every image is decoded in a group of fixed size by the same
program (:func:`_invariant_impl`; docs/reliability.md says what holds in which mode).

On a mesh (:mod:`adsa_jax.sharding` builds it and its specs) the program is the same with
sharding constraints on the caches and rows, and each policy step inside ``shard_map``
(:class:`ShardedPolicy`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from . import model as M
from . import sharding as S
from .config import ConfigError, GPTConfig
from .kernels import matmul_add_norm, small_matmul
from .cache import make_policy
from .model import Model
from .options import KernelConfig, SamplingConfig, kernel_config
from .sampling import cfg_combine, sample

__all__ = ["Model", "generate", "score", "forward", "SamplingConfig", "KernelConfig"]


def as_model(model) -> Model:
    """``model``, or the :class:`Model` of an object with ``to_model()`` (an ``adsa_jax.nn.GPT``)."""
    return model.to_model() if hasattr(model, "to_model") else model


# ----------------------------------------------------------------------------- conditions


def prepare_condition(cfg: GPTConfig, cond, cond_mask=None):
    """Validate and normalise the condition; returns (cond array, (B, c) bool mask)."""
    if cfg.model_type == "c2i":
        if cond_mask is not None:
            raise ConfigError("class-conditional models take no caption mask")
        ids = np.asarray(cond) if not isinstance(cond, jax.core.Tracer) else None
        if ids is not None:
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise ConfigError(f"c2i condition must be a 1-D array of integer class ids, got shape {ids.shape} dtype {ids.dtype}")
            if ids.size and (ids.min() < 0 or ids.max() >= cfg.num_classes):
                raise ConfigError(f"class ids must be in [0, {cfg.num_classes - 1}], got {ids.min()}..{ids.max()}")
        cond = jnp.asarray(cond, jnp.int32)
        return cond, jnp.ones((cond.shape[0], 1), bool)
    c, C = cfg.cls_token_num, cfg.caption_dim
    shape = tuple(np.shape(cond))
    if len(shape) != 3 or shape[1:] != (c, C):
        raise ConfigError(f"t2i condition must be caption features of shape (B, {c}, {C}), got {shape}")
    if cond_mask is None:
        raise ConfigError("t2i models need the caption mask (B, 120), 1 for valid tokens (left-padded)")
    if tuple(np.shape(cond_mask)) != shape[:2]:
        raise ConfigError(f"caption mask shape {tuple(np.shape(cond_mask))} does not match features {shape[:2]}")
    mask = jnp.asarray(cond_mask).astype(bool)
    return jnp.asarray(cond, jnp.float32), mask


def _embed_rows(params, cfg, cond, cond_mask, use_cfg):
    """Condition embeddings for all rows: (B2, c, E) and mask (B2, c)."""
    if cfg.model_type == "c2i":
        ids = jnp.stack([cond, jnp.full_like(cond, cfg.null_class)], axis=1).reshape(-1) if use_cfg else cond
        return M.embed_condition(params, cfg, ids, None), (jnp.repeat(cond_mask, 2, axis=0) if use_cfg else cond_mask)
    feats = cond * cond_mask[..., None]
    if use_cfg:
        null = jnp.broadcast_to(params["caption"]["uncond"].astype(jnp.float32), feats.shape)
        feats = jnp.stack([feats, null], axis=1).reshape((-1,) + feats.shape[1:])  # (2B, c, C) interleaved
        cond_mask = jnp.repeat(cond_mask, 2, axis=0)  # the null caption uses the prompt's mask
    return M.embed_condition(params, cfg, feats, cond_mask), cond_mask


# ----------------------------------------------------------------------------- the decode loop


def _segments(n_steps: int, c: int, num: int):
    """Split decode steps 0..n_steps-1 into `num` static segments (start, stop, span).

    span = cache slots that can be filled by the segment's end, so dense attention reads
    only those instead of the whole cache (length-aware decoding with static shapes).
    """
    num = max(1, min(num, n_steps))
    bounds = np.linspace(0, n_steps, num + 1).round().astype(int)
    segs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            span = c + int(b)  # last step b-1 writes slot c + b - 1
            segs.append((int(a), int(b), span))
    return segs


def _run(params, cfg, policy, cond_emb, cond_mask, ex_keys, scalars, *, use_cfg, forced, segments, kernels,
         raw=False, shard=None, top_p_on=True):
    """Shared body of generate and score. forced: (B, N) tokens to feed, or None to sample.

    Returns (tokens (B, N) int32, logits (B, N, V) float32 or None); with raw=True the logits
    are those of every batch row before guidance (B2, N, V). shard: None, or a function applied
    to the caches (``with_sharding_constraint`` when generating on a mesh). kernels: the resolved
    :class:`~adsa_jax.options.KernelConfig` (static). top_p_on (static): whether top-p runs
    (False only with top_p = 1: no sort of the logits).
    """
    if kernels.stack_ffn and shard is None:  # one device: w1 and w3 stacked once, outside the loop
        params = M.stack_ffn(params)
    shard = shard or (lambda cs: cs)
    interpret = kernels.gemm == "pallas-interpret"
    matmul = None if kernels.gemm == "xla" else functools.partial(small_matmul, config=kernels, interpret=interpret)
    add_norm = (functools.partial(matmul_add_norm, eps=cfg.norm_eps, config=kernels, interpret=interpret)
                if matmul is not None and kernels.add_norm else None)
    cfg_scale, cfg_interval, temperature, top_k, top_p = scalars
    rows = cond_emb.shape[0]
    caches = shard([policy.init(rows, cfg.n_head, cfg.head_dim, params["tok_embeddings"].dtype)
                    for _ in range(cfg.n_layer)])

    def guide(logits, guided):
        if not use_cfg:
            return logits
        pair = logits.reshape(-1, 2, logits.shape[-1])  # (B, 2, V): cond, uncond
        return jnp.where(guided, cfg_combine(pair[:, 0], pair[:, 1], cfg_scale), pair[:, 0])

    needs_keys = getattr(policy, "chooser", None) == "random"

    def row_keys(step):
        ks = jax.vmap(lambda kk: jax.random.fold_in(kk, step))(ex_keys)
        if use_cfg:
            ks = jax.vmap(lambda kk: jnp.stack([jax.random.fold_in(kk, 0), jax.random.fold_in(kk, 1)]))(ks).reshape(-1)
        return ks

    def pick(step, logits, guided, forced_tok):
        g = guide(logits, guided)
        if forced is not None:
            return forced_tok, (logits if raw else g)
        keys = jax.vmap(lambda kk: jax.random.fold_in(kk, step))(ex_keys)
        return sample(keys, g, temperature, top_k, top_p, kth=kernels.kth, top_p_on=top_p_on), None

    with jax.named_scope("prefill"):
        logits0, caches = M.prefill(params, cfg, policy, caches, cond_emb, cond_mask)
        caches = shard(caches)
    tok0, out0 = pick(0, logits0, True, forced[:, 0] if forced is not None else None)

    def body(carry, i, span, leave=None, before_leave=False):
        tok, caches = carry
        fed = jnp.repeat(tok, 2, axis=0) if use_cfg else tok
        keys = row_keys(i + 1) if needs_keys else None  # only the random policy draws per step
        logits, caches = M.decode_step(params, cfg, policy, caches, fed, i, cond_mask, keys, span, matmul=matmul,
                                       add_norm=add_norm, leave=leave, before_leave=before_leave)
        caches = shard(caches)
        guided = (cfg_interval < 0) | (i <= cfg_interval)  # LlamaGen: off for good once i > cfg_interval
        nxt = forced[:, i + 1] if forced is not None else None
        with jax.named_scope("sample"):
            tok, out = pick(i + 1, logits, guided, nxt)
        return (tok, caches), (tok, out)

    def steps(carry, x, n, span, pre, leave=None):
        """n steps from step x (traced or not), none leaving: one scan; with ``pre`` (static) the
        step after them leaves, so the last runs apart, preparing its scores (before_leave).
        ``leave`` (static): at period 1, False for steps before the policy's first_choice, True from
        it (None: the policy decides per step). Returns (carry,
        per-step outputs)."""
        plain = functools.partial(body, span=span, leave=False if sched else leave)
        if not pre:
            return jax.lax.scan(plain, carry, x + jnp.arange(n))
        parts = []
        if n > 1:
            carry, ys = jax.lax.scan(plain, carry, x + jnp.arange(n - 1))
            parts.append(ys)
        carry, y1 = body(carry, x + n - 1, span, leave=False, before_leave=True)
        parts.append(jax.tree.map(lambda a: a[None], y1))
        return carry, jax.tree.map(lambda *a: jnp.concatenate(a), *parts)

    def blocks(carry, x, n, inner, span):
        """n blocks of 1 + inner steps from step x, each block's first step a leaving one: one scan
        over the blocks, a scan of the inner steps in each (a full block's last step prepares the
        next block's scores). Returns (carry, per-step outputs)."""
        pre = prepares and inner == sched[1] - 1  # a full block: the step after it leaves
        def block(carry, i):
            carry, y0 = body(carry, i, span, leave=True)
            if not inner:
                return carry, jax.tree.map(lambda a: a[None], y0)
            carry, ys = steps(carry, i + 1, inner, span, pre)
            return carry, jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), y0, ys)
        if n == 1:
            return block(carry, jnp.int32(x))
        carry, ys = jax.lax.scan(block, carry, x + (1 + inner) * jnp.arange(n))
        return carry, jax.tree.map(lambda a: a.reshape((n * (1 + inner),) + a.shape[2:]), ys)  # (n*(1+inner), ...)

    sched = getattr(policy, "leave_schedule", None) if kernels.period_blocks else None
    # whether a step's scores may be prepared on the step before (else before_leave would only add
    # a traced step variant, and compile time, for nothing)
    prepares = sched is not None and getattr(policy, "fused_leave_score", False)
    # At period 1, the steps before the policy's first choice (adsa-evict on the kernel path: the
    # step before the pool fills) run as a scan of their own, told statically that no step chooses
    # (leave False), and the steps from it as another, told that every step does (leave True).
    first = policy.first_choice(rows, cfg.n_head) if sched is None and hasattr(policy, "first_choice") else None
    carry = (tok0, caches)
    toks, outs = [tok0[:, None]], [out0[:, None]] if forced is not None else []
    for a, b, span in segments:
        if sched is not None:
            pieces = _period_pieces(a, b, *sched)
        elif first is not None:  # ("plain", x, y, leave): leave False before the first choice, True from it
            pieces = ([("plain", a, min(b, first), False)] if a < first else []) + (
                [("plain", max(a, first), b, True)] if first < b else [])
        else:
            pieces = [("plain", a, b)]
        for piece in pieces:
            if piece[0] == "plain":
                x, y = piece[1:3]
                pre = prepares and y >= sched[0] and (y - sched[0]) % sched[1] == 0  # step y leaves
                carry, (t_seg, o_seg) = steps(carry, jnp.int32(x), y - x, span, pre, *piece[3:])
            else:
                carry, (t_seg, o_seg) = blocks(carry, *piece[1:], span)
            toks.append(t_seg.T)
            if forced is not None:
                outs.append(o_seg.transpose(1, 0, 2))
    tokens = jnp.concatenate(toks, axis=1)
    return tokens, (jnp.concatenate(outs, axis=1) if forced is not None else None)


def _period_pieces(a: int, b: int, first: int, s: int):
    """Decode steps [a, b) for a policy whose tokens leave at steps first, first + s, ...: a list of
    ("plain", x, y) (steps x..y-1, none leaving) and ("blocks", x, n, inner) (n blocks of 1 + inner
    steps from x, each led by a leaving step), in order. Static, so the scan needs no branch."""
    out, x = [], a
    nxt = first if x <= first else first + -(-(x - first) // s) * s  # the first leaving step >= x
    if nxt > x:
        out.append(("plain", x, min(b, nxt)))
        x = min(b, nxt)
    if x < b and (b - x) // s:
        n = (b - x) // s
        out.append(("blocks", x, n, s - 1))
        x += n * s
    if x < b:
        out.append(("blocks", x, 1, b - x - 1))
    return out


def _in_groups(fn, group: int, *xs):
    """``fn`` over consecutive groups of ``group`` rows of ``xs`` (their row count a multiple of it),
    one group after another (``lax.map``): each group is the same program, whatever the count."""
    n = xs[0].shape[0]
    split = tuple(x.reshape((n // group, group) + x.shape[1:]) for x in xs)  # (G, g, ...)
    out = jax.lax.map(lambda a: fn(*a), split)
    return jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:]), out)  # (G * rows a group, ...)


def _invariant_impl(params, cond, cond_mask, key, example_ids, scalars, *, cfg, policy, use_cfg, kernels, top_p_on,
                    mesh):
    """generate with ``kernels.batch_invariant``: each device's rows (a multiple of
    ``kernels.invariant_group`` images) decoded in groups of that many, by the one-device program
    (on a data-parallel mesh inside ``shard_map``, so no op sees another device or group)."""
    segs = _segments(cfg.num_image_tokens - 1, cfg.cls_token_num, kernels.segments)
    inner = dataclasses.replace(kernels, stack_ffn=False)  # stacked once per call below, not per group

    def local(params, cond, cond_mask, key, ids, scalars):  # one device's rows
        if kernels.stack_ffn:
            params = M.stack_ffn(params)

        def group(cond, cond_mask, ids):
            ex_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
            emb, mask = _embed_rows(params, cfg, cond, cond_mask, use_cfg)
            return _run(params, cfg, policy, emb, mask, ex_keys, scalars, use_cfg=use_cfg, forced=None,
                        segments=segs, kernels=inner, top_p_on=top_p_on)[0]

        return _in_groups(group, kernels.invariant_group, cond, cond_mask, ids)

    args = (params, cond, cond_mask, key, example_ids, scalars)
    if mesh is None:
        return local(*args)
    rows, rep = P(S.DATA), P()
    return jax.shard_map(local, mesh=mesh, in_specs=(rep, rows, rows, rep, rows, rep), out_specs=rows,
                         check_vma=False)(*args)


def _generate_impl(params, cond, cond_mask, key, example_ids, scalars, *, cfg, policy, use_cfg, kernels,
                   top_p_on=True, mesh=None):
    if kernels.batch_invariant:
        return _invariant_impl(params, cond, cond_mask, key, example_ids, scalars, cfg=cfg, policy=policy,
                               use_cfg=use_cfg, kernels=kernels, top_p_on=top_p_on, mesh=mesh)
    ex_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids)
    emb, mask = _embed_rows(params, cfg, cond, cond_mask, use_cfg)
    segs = _segments(cfg.num_image_tokens - 1, cfg.cls_token_num, kernels.segments)
    shard = None
    if mesh is not None:  # rows on data, heads on model (adsa_jax.sharding); no mesh, no constraints
        shard = functools.partial(constrain_caches, mesh=mesh, policy=policy)
        policy = ShardedPolicy(policy, mesh)  # each device decodes its own rows and heads
        emb, mask = constrain_batch(emb, mesh), constrain_batch(mask, mesh)
    tokens, _ = _run(params, cfg, policy, emb, mask, ex_keys, scalars, use_cfg=use_cfg, forced=None, segments=segs,
                     shard=shard, kernels=kernels, top_p_on=top_p_on)
    return tokens if mesh is None else constrain_batch(tokens, mesh)


_GENERATE_STATIC = ("cfg", "policy", "use_cfg", "kernels", "top_p_on", "mesh")
_generate_jit = jax.jit(_generate_impl, static_argnames=_GENERATE_STATIC)
# The same program with the weight GEMMs on cuBLAS instead of XLA's Triton GEMMs, and XLA's dot
# merger off (it fuses x @ w1 and x @ w3 into one dot over a concatenation of the two weights,
# which the Triton GEMM reads in place but cuBLAS needs copied: 18 MB per GPT-XL layer and step).
# Chosen by KernelConfig.cublas (kernel_config: one GPU from gemm_cublas_min_rows rows). cuBLASLt
# (XLA's default) or plain cuBLAS pick the same kernels at 128 and 512 rows (H100, 2026-12-06,
# benchmarks/gemm_time.json): wo 4.9 us (0.67 TB/s) and w2 8.1 us (1.13 TB/s) at 128 rows either way.
CUBLAS_OPTIONS = {"xla_gpu_enable_triton_gemm": False, "xla_disable_hlo_passes": "dot-merger"}
_generate_jit_cublas = jax.jit(_generate_impl, static_argnames=_GENERATE_STATIC, compiler_options=CUBLAS_OPTIONS)
# With KernelConfig.batch_invariant each total batch is another compile of the same group program.
# XLA:GPU's autotuner times candidate GEMM kernels in every compile and may pick another one (another
# rounding) for the same shape, so it is off, and XLA's deterministic GPU ops on (no effect on CPU).
INVARIANT_OPTIONS = {"xla_gpu_autotune_level": 0, "xla_gpu_deterministic_ops": True}
_generate_jit_invariant = jax.jit(_generate_impl, static_argnames=_GENERATE_STATIC, compiler_options=INVARIANT_OPTIONS)
_generate_jit_invariant_cublas = jax.jit(_generate_impl, static_argnames=_GENERATE_STATIC,
                                         compiler_options={**CUBLAS_OPTIONS, **INVARIANT_OPTIONS})


def generate_program(kernels: KernelConfig):
    """The jitted generate program for a resolved KernelConfig: compiled with CUBLAS_OPTIONS when
    ``kernels.cublas``, with the default XLA options otherwise (both give the same tokens up to float
    rounding of the GEMMs); with INVARIANT_OPTIONS as well when ``kernels.batch_invariant``."""
    if kernels.batch_invariant:
        return _generate_jit_invariant_cublas if kernels.cublas else _generate_jit_invariant
    return _generate_jit_cublas if kernels.cublas else _generate_jit


def _score_impl(params, cond, cond_mask, tokens, key, scalars, *, cfg, policy, use_cfg, raw, kernels):
    segs = _segments(cfg.num_image_tokens - 1, cfg.cls_token_num, 1)
    inner = kernels
    if kernels.batch_invariant and kernels.stack_ffn:  # stacked once here, not once per group
        params, inner = M.stack_ffn(params), dataclasses.replace(kernels, stack_ffn=False)

    def rows(cond, cond_mask, tokens, ids):
        emb, mask = _embed_rows(params, cfg, cond, cond_mask, use_cfg)
        ex_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
        _, logits = _run(params, cfg, policy, emb, mask, ex_keys, scalars, use_cfg=use_cfg, forced=tokens,
                         segments=segs, raw=raw, kernels=inner)
        return logits

    ids = jnp.arange(tokens.shape[0])
    if kernels.batch_invariant:  # raw rows come back [cond_0, uncond_0, ...] in each group, so in all
        return _in_groups(rows, kernels.invariant_group, cond, cond_mask, tokens, ids)
    return rows(cond, cond_mask, tokens, ids)


_SCORE_STATIC = ("cfg", "policy", "use_cfg", "raw", "kernels")
_score_jit = jax.jit(_score_impl, static_argnames=_SCORE_STATIC)
_score_jit_invariant = jax.jit(_score_impl, static_argnames=_SCORE_STATIC, compiler_options=INVARIANT_OPTIONS)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward_jit(params, cond, cond_mask, tokens, *, cfg):
    emb, mask = _embed_rows(params, cfg, cond, cond_mask, False)
    return M.forward_full(params, cfg, emb, mask, tokens)


# ----------------------------------------------------------------------------- on a mesh


def constrain_caches(caches, mesh, policy=None):
    """``with_sharding_constraint`` on every layer's cache (:func:`adsa_jax.sharding.cache_specs`)."""
    def one(cache):
        specs = S.cache_specs(cache, mesh, policy)
        return {k: jax.lax.with_sharding_constraint(v, NamedSharding(mesh, specs[k])) for k, v in cache.items()}

    return [one(c) for c in caches]


@dataclasses.dataclass(frozen=True)
class ShardedPolicy:
    """A KV-cache policy whose per-step ``decode`` runs inside ``shard_map`` over the mesh.

    A policy's decode is independent per (row, head) (per row at granularity 'layer'), so each
    device runs it on its own rows and heads: ADSA's ``lax.top_k`` and argmax over the
    (replicated) slot axis, the pool scatter and the attention are local, with no gathers.
    Left to the SPMD partitioner, the top-k and the scatter would gather the whole batch's
    scores and caches onto every device at every step. Used inside ``_generate_jit`` only.
    """

    inner: object
    mesh: object

    def __getattr__(self, name):  # slots, name, attended, ... of the wrapped policy
        if name in ("inner", "mesh"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def init(self, *a, **kw):
        return self.inner.init(*a, **kw)

    def prefill(self, cache, k, v):
        return self.inner.prefill(cache, k, v)

    @property
    def begin_step(self):
        """The inner policy's ``begin_step`` on each device's rows and heads, like ``decode``; absent
        (``hasattr`` False) when the inner policy has none."""
        if not hasattr(self.inner, "begin_step"):
            raise AttributeError("begin_step")
        return self._begin_step

    def _begin_step(self, caches, t, row_keys=None, first_layer=0, leave=None):
        inner, mesh = self.inner, self.mesh
        if leave is False and inner.period > 1:  # not a leaving step: nothing to do
            return caches
        specs = [S.cache_specs(cache, mesh, inner) for cache in caches]
        out_specs = [S.cache_specs(cache, mesh, inner, extra=getattr(inner, "step_keys", ())) for cache in caches]
        keys = () if row_keys is None else (row_keys,)

        def f(caches, t, *keys):
            return inner.begin_step(caches, t, *keys, first_layer=first_layer, leave=leave)
        return jax.shard_map(f, mesh=mesh, in_specs=(specs, P()) + (P(S.DATA),) * len(keys), out_specs=out_specs,
                             check_vma=False)(caches, t, *keys)

    def decode(self, cache, q, k, v, t, cond_mask, *, layer_index=0, row_keys=None, span=None, qkv=None, rope=None,
               planned=False, before_leave=False, leave=None):
        mesh = self.mesh
        split = S.heads_split(cache, self.inner)
        cspec = S.cache_specs(cache, mesh, self.inner)
        heads = S.MODEL if split and q.shape[1] % S.axis_size(mesh, S.MODEL) == 0 else None
        hspec = P(S.DATA, heads)
        rows = P(S.DATA)
        inner = self.inner
        # Optional inputs travel only when given: (arg, spec, keyword) triples.
        extra = [(x, sp, name) for x, sp, name in ((row_keys, rows, "row_keys"), (qkv, P(S.DATA, None, heads), "qkv"),
                                                   (rope, P(), "rope"))
                 if x is not None]

        def f(cache, q, k, v, t, cond_mask, *opt):
            kw = ({name: x for x, (_, _, name) in zip(opt, extra)} | ({"planned": True} if planned else {})
                  | ({"before_leave": True} if before_leave else {}) | ({} if leave is None else {"leave": leave}))
            return inner.decode(cache, q, k, v, t, cond_mask, layer_index=layer_index, span=span, **kw)

        args = (cache, q, k, v, t, cond_mask) + tuple(x for x, _, _ in extra)
        specs = (cspec, hspec, hspec, hspec, P(), rows) + tuple(sp for _, sp, _ in extra)
        out = {k: sp for k, sp in cspec.items() if k not in getattr(inner, "step_keys", ())}  # decode drops them
        return jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=(out, hspec), check_vma=False)(*args)


def constrain_batch(x, mesh):
    """Rows of x on the data axis (inside the jitted program)."""
    return jax.lax.with_sharding_constraint(x, S.named(mesh, ("batch",) + ("tokens",) * (x.ndim - 1), x.shape))


def padded_size(batch: int, mesh) -> int:
    d = S.axis_size(mesh, S.DATA)
    return -(-batch // d) * d


def _pad_rows(x, n: int):
    x = np.asarray(x)
    if n == x.shape[0]:
        return x
    return np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)], axis=0)


def generate_on_mesh(model, cond, mask, key, example_ids, scalars, *, policy, use_cfg, mesh, kernels,
                     top_p_on=True):
    """Body of ``generate(..., mesh=...)`` (inputs already validated): place, run, trim.

    A batch the data axis does not divide is padded up to a multiple of it with copies of the last
    image (per-image keys come from the global index, so no sample changes) and trimmed after: the
    trimmed result cannot be evenly sharded and comes back replicated."""
    cfg = model.config
    if not isinstance(mesh, jax.sharding.Mesh) or set(mesh.axis_names) != {S.DATA, S.MODEL}:
        raise ConfigError("mesh must be a jax.sharding.Mesh with axes ('data', 'model'): build it with "
                          "adsa_jax.sharding.make_mesh(data=..., model=...)")
    S.check_tensor_parallel(cfg, mesh)
    params = S.shard_params(model.params, cfg, mesh)
    b = int(np.shape(cond)[0])
    if b == 0:
        raise ConfigError("empty batch")
    bp = padded_size(b, mesh)
    ids = np.asarray(example_ids)
    if bp != b:  # pad with copies of the last image; trimmed below (its key index is unique anyway)
        ids = np.concatenate([ids, ids[-1] + 1 + np.arange(bp - b, dtype=ids.dtype)])
    cond = S.put(_pad_rows(cond, bp), S.batch_sharding(mesh, np.ndim(cond)))
    mask = S.put(_pad_rows(mask, bp), S.batch_sharding(mesh, 2))
    ids = S.put(ids.astype(np.int32), S.batch_sharding(mesh, 1))
    rep = S.replicated(mesh)
    key = S.put(key, rep)
    scalars = tuple(S.put(np.asarray(s), rep) for s in scalars)
    tokens = _generate_jit(params, cond, mask, key, ids, scalars, cfg=cfg, policy=policy, use_cfg=use_cfg,
                           mesh=mesh, kernels=kernels, top_p_on=top_p_on)
    return tokens if bp == b else tokens[:b]


def generate_invariant(model, cond, mask, key, example_ids, scalars, *, policy, use_cfg, mesh, options,
                       top_p_on=True):
    """Body of ``generate`` with ``options.batch_invariant`` (inputs already validated): the kernels
    resolved for one group on one device, the batch padded to whole groups on every device (copies
    of the last image, trimmed after), run, trimmed."""
    cfg = model.config
    g = options.invariant_group
    kc = kernel_config(cfg, policy, g * (2 if use_cfg else 1), model.dtype, base=options)
    policy = with_kernels(policy, kc, options)
    params, d = model.params, 1
    if mesh is not None:
        if not isinstance(mesh, jax.sharding.Mesh) or set(mesh.axis_names) != {S.DATA, S.MODEL}:
            raise ConfigError("mesh must be a jax.sharding.Mesh with axes ('data', 'model'): build it with "
                              "adsa_jax.sharding.make_mesh(data=..., model=...)")
        if S.axis_size(mesh, S.MODEL) > 1:
            raise ConfigError(f"batch_invariant runs each device's rows as one device would, so it needs a "
                              f"data-parallel mesh; this mesh's model axis is {S.axis_size(mesh, S.MODEL)} (tensor "
                              "parallelism splits the reductions over devices): use a model axis of 1 "
                              "(--tensor-parallel 1) or leave batch_invariant off")
        params = S.shard_params(params, cfg, mesh)
        d = S.axis_size(mesh, S.DATA)
    b = int(np.shape(cond)[0])
    if b == 0:
        raise ConfigError("empty batch")
    bp = -(-b // (d * g)) * (d * g)  # whole groups on every device
    cond, mask, ids = (_pad_rows(x, bp) for x in (cond, mask, np.asarray(example_ids, np.int32)))
    if mesh is not None:
        rep = S.replicated(mesh)
        cond, mask, ids = (S.put(x, S.batch_sharding(mesh, x.ndim)) for x in (cond, mask, ids))
        key = S.put(key, rep)
        scalars = tuple(S.put(np.asarray(s), rep) for s in scalars)
    tokens = generate_program(kc)(params, cond, mask, key, ids, scalars, cfg=cfg, policy=policy, use_cfg=use_cfg,
                                  kernels=kc, top_p_on=top_p_on, mesh=mesh)
    return tokens if bp == b else tokens[:b]


# ----------------------------------------------------------------------------- public API


def check_policy(policy, cfg: GPTConfig):
    """The policy object of a call (None: dense, built for the model by the caller). A policy that
    records its condition slots and image tokens (``c``, ``n``: the library's) must have been built
    for this model's, or its sizes (budget, prefix, ring) mean another sequence."""
    if isinstance(policy, str):
        raise ConfigError(f"policy must be a policy object, got the name {policy!r}: build it with "
                          f"adsa_jax.make_policy(model.config, {policy!r}, budget=...)")
    if not all(callable(getattr(policy, m, None)) for m in ("init", "prefill", "decode")):
        raise ConfigError(f"policy must have init, prefill and decode (adsa_jax.make_policy builds one), got "
                          f"{type(policy).__name__}")
    got = (getattr(policy, "c", None), getattr(policy, "n", None))
    if all(isinstance(x, int) for x in got) and got != (cfg.cls_token_num, cfg.num_image_tokens):
        raise ConfigError(f"policy {getattr(policy, 'name', type(policy).__name__)!r} was built for {got[1]} image "
                          f"tokens after {got[0]} condition slots, but this model has {cfg.num_image_tokens} after "
                          f"{cfg.cls_token_num}: build it with adsa_jax.make_policy(model.config, ...)")
    return policy


def _check_key(key):
    """A PRNG key: a typed one (jax.random.key) or a raw uint32 pair (jax.random.PRNGKey)."""
    dtype = key.dtype if hasattr(key, "dtype") else np.asarray(key).dtype  # a traced key has no value to read
    if not jnp.issubdtype(dtype, jax.dtypes.prng_key) and (np.shape(key) != (2,) or dtype != np.uint32):
        raise ConfigError(f"key must be a JAX PRNG key, e.g. jax.random.key(seed), got {type(key).__name__} "
                          f"of shape {np.shape(key)}")
    return key


def with_kernels(policy, kernels: KernelConfig, requested: KernelConfig | None = None):
    """The policy with its ``kernels`` field set to the resolved config. A policy without that
    field (one defined outside the library, or one that needs XLA's attention) keeps XLA's
    attention; asking it for a kernel explicitly is an error."""
    has_field = dataclasses.is_dataclass(policy) and any(f.name == "kernels" for f in dataclasses.fields(policy))
    if has_field:
        return dataclasses.replace(policy, kernels=kernels)
    if requested is not None and requested.attention not in ("auto", "xla"):
        raise ConfigError(f"policy {type(policy).__name__} has no 'kernels' field: it cannot use "
                          f"attention={requested.attention!r}; use attention='auto' or 'xla'")
    return policy


def _check_sampling(sampling) -> SamplingConfig:
    if not isinstance(sampling, SamplingConfig):
        raise ConfigError(f"sampling must be an adsa_jax.SamplingConfig, got {type(sampling).__name__}")
    return sampling


def _scalars(sampling: SamplingConfig):
    """The sampling values as traced scalars: changing them never recompiles."""
    return (jnp.float32(sampling.cfg_scale), jnp.float32(sampling.cfg_interval), jnp.float32(sampling.temperature),
            jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))


def generate(model: Model, cond, key, *, sampling: SamplingConfig = SamplingConfig(), policy=None, mesh=None,
             options: KernelConfig | None = None, cond_mask=None, example_ids=None):
    """Sample image tokens (B, N) int32.

    model: a :class:`Model` (``adsa_jax.load``) or an ``adsa_jax.nn.GPT``. cond: class ids (B,)
    for c2i; caption features (B, 120, C) plus ``cond_mask`` (B, 120) for t2i (left-padded,
    1 = valid). key: ``jax.random.key(seed)``.
    sampling: a :class:`~adsa_jax.options.SamplingConfig` (default LlamaGen's: cfg 4.0, top-k 2000).
    policy: a KV-cache policy from :func:`adsa_jax.make_policy` (default None: dense).
    mesh: a ``('data', 'model')`` mesh (:func:`adsa_jax.sharding.make_mesh`) to split the batch
    over its data axis and heads / FFN over its model axis (default on a single host with several
    devices: all of them on 'data'); params not yet on the mesh are placed there each call (do it
    once: ``load(..., mesh=)`` or ``sharding.shard_model``). A batch the data axis does not divide
    is padded and trimmed (the trimmed result is replicated); otherwise the tokens come back
    sharded ``P('data')`` (``sharding.tokens_sharding``).
    options: a :class:`~adsa_jax.options.KernelConfig` (kernel choices and tuning; default
    ``KernelConfig()``, every 'auto' resolved for this device and shape by
    :func:`adsa_jax.options.kernel_config`). With ``batch_invariant=True`` an image's tokens do not
    depend on the batch, its position in it or the data-parallel device count: the batch is padded
    to whole groups of ``invariant_group`` images per device and decoded group by group (a mesh's
    model axis must then be 1).
    example_ids: (B,) global image indices for the per-image keys (default 0..B-1).
    """
    model = as_model(model)
    cfg = model.config
    sampling = _check_sampling(sampling)
    cond, mask = prepare_condition(cfg, cond, cond_mask)
    pol = make_policy(cfg, "dense") if policy is None else check_policy(policy, cfg)
    _check_key(key)
    b = cond.shape[0]
    use_cfg = sampling.guided
    rows = b * (2 if use_cfg else 1)  # batch rows, CFG's included
    example_ids = jnp.arange(b, dtype=jnp.int32) if example_ids is None else jnp.asarray(example_ids, jnp.int32)
    if example_ids.shape != (b,):
        raise ConfigError(f"example_ids must have shape ({b},), got {example_ids.shape}")
    if mesh is None and jax.device_count() > 1 and jax.process_count() == 1:
        mesh = S.make_mesh()  # default: data parallel over every visible device (pass mesh= to choose)
        if isinstance(options, KernelConfig) and options.gemm not in ("auto", "xla"):
            raise ConfigError(f"gemm={options.gemm!r} runs on one device, and with no mesh given generate "
                              f"spreads the batch over all {jax.device_count()} devices: make one visible "
                              "(CUDA_VISIBLE_DEVICES=0) or use gemm='auto'")
    scalars = _scalars(sampling)
    if isinstance(options, KernelConfig) and options.batch_invariant:
        return generate_invariant(model, cond, mask, key, example_ids, scalars, policy=pol, use_cfg=use_cfg, mesh=mesh,
                                  options=options, top_p_on=sampling.top_p_on)
    kc = kernel_config(cfg, pol, rows, model.dtype, mesh=mesh, base=options)
    pol = with_kernels(pol, kc, options)
    if mesh is not None:
        return generate_on_mesh(model, cond, mask, key, example_ids, scalars, policy=pol, use_cfg=use_cfg, mesh=mesh,
                                kernels=kc, top_p_on=sampling.top_p_on)
    return generate_program(kc)(model.params, cond, mask, key, example_ids, scalars, cfg=cfg, policy=pol,
                                use_cfg=use_cfg, kernels=kc, top_p_on=sampling.top_p_on)


def _check_tokens(cfg, tokens, batch):
    t = np.asarray(tokens) if not isinstance(tokens, jax.core.Tracer) else None
    shape = tuple(np.shape(tokens))
    n = cfg.num_image_tokens
    if len(shape) != 2 or shape[0] != batch or shape[1] not in (n, n - 1):
        raise ConfigError(f"tokens must have shape ({batch}, {n}) or ({batch}, {n - 1}), got {shape}")
    dtype = tokens.dtype if hasattr(tokens, "dtype") else t.dtype
    if not jnp.issubdtype(dtype, jnp.integer):  # as class ids: a float would be cut to an id without a word
        raise ConfigError(f"image tokens must be integer token ids, got dtype {dtype}")
    if t is not None and t.size and (t.min() < 0 or t.max() >= cfg.vocab_size):
        raise ConfigError(f"image tokens must be in [0, {cfg.vocab_size - 1}], got {t.min()}..{t.max()}")


def forward(model: Model, cond, tokens, *, cond_mask=None):
    """Teacher-forced next-token logits (B, N, V) float32 from one full causal pass (dense).

    tokens (B, N) or (B, N-1): row j of the result predicts image token j."""
    model = as_model(model)
    cfg = model.config
    cond, mask = prepare_condition(cfg, cond, cond_mask)
    _check_tokens(cfg, tokens, cond.shape[0])
    tokens = jnp.asarray(tokens, jnp.int32)[:, : cfg.num_image_tokens - 1]
    return _forward_jit(model.params, cond, mask, tokens, cfg=cfg)


def score(model: Model, cond, tokens, *, sampling: SamplingConfig | None = None, policy=None,
          options: KernelConfig | None = None, cond_mask=None, key=None, raw_rows: bool = False):
    """Teacher-forced logits (B, N, V) float32 through a policy's cache (prefill + scan decode).

    tokens (B, N) or (B, N-1). sampling: only its guidance is read (cfg_scale, cfg_interval);
    default None, no guidance. With cfg_scale > 1 the logits are the guided ones LlamaGen samples
    from; ``raw_rows=True`` returns every batch row's own logits instead, (2B, N, V) with rows
    [cond_0, uncond_0, ...]. policy: as in :func:`generate` (None: dense). key seeds the
    ``random`` policies (default key 0). options: as in :func:`generate`, except that 'auto' keeps
    XLA's weight GEMMs and default compiler options (teacher forcing is for fidelity); with
    ``batch_invariant`` a row's logits do not depend on the batch size (groups as in generate; the
    random policies' keys still come from the row's index in the call)."""
    model = as_model(model)
    cfg = model.config
    sampling = SamplingConfig(cfg_scale=1.0) if sampling is None else _check_sampling(sampling)
    cond, mask = prepare_condition(cfg, cond, cond_mask)
    _check_tokens(cfg, tokens, cond.shape[0])
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape[1] == cfg.num_image_tokens - 1:
        tokens = jnp.pad(tokens, ((0, 0), (0, 1)))
    pol = make_policy(cfg, "dense") if policy is None else check_policy(policy, cfg)
    base = KernelConfig() if options is None else options
    base = dataclasses.replace(base, gemm="xla" if base.gemm == "auto" else base.gemm,
                               cublas=False if base.cublas is None else base.cublas, kth="sort", segments=1)
    use_cfg = sampling.guided
    b = tokens.shape[0]
    rows = (base.invariant_group if base.batch_invariant else b) * (2 if use_cfg else 1)  # one group's, or all
    kc = kernel_config(cfg, pol, rows, model.dtype, base=base)
    pol = with_kernels(pol, kc, options)
    key = jax.random.key(0) if key is None else key
    guidance = dataclasses.replace(sampling, temperature=1.0, top_k=0, top_p=1.0)  # no filter: logits only
    if kc.batch_invariant:  # whole groups: copies of the last image, trimmed below
        g = kc.invariant_group
        cond, mask, tokens = (_pad_rows(x, -(-b // g) * g) for x in (cond, mask, tokens))
    program = _score_jit_invariant if kc.batch_invariant else _score_jit
    out = program(model.params, cond, mask, tokens, key, _scalars(guidance), cfg=cfg, policy=pol, use_cfg=use_cfg,
                  raw=bool(raw_rows), kernels=kc)
    n_out = b * (2 if raw_rows and use_cfg else 1)
    return out if out.shape[0] == n_out else out[:n_out]
