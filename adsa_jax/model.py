"""The LlamaGen GPT as pure functions over a params pytree.

Params (Flax-style kernels, ``(in, out)``; E = dim, H = heads, D = head_dim, F = FFN hidden):

    tok_embeddings (V, E)          output (E, V)          norm (E,)
    cls_embedding (classes+1, E)                           # c2i; last row = null class
    caption: fc1 (C, E), fc2 (E, E), uncond (120, C)       # t2i; uncond = stored null caption
    layers: list of {attention_norm (E,), wqkv (E, 3, H, D), wo (H, D, E),
                     ffn_norm (E,), w1 (E, F), w3 (E, F), w2 (F, E)}

No biases anywhere. Storage dtype = compute dtype (bf16 or fp32); norm statistics, RoPE,
attention logits and softmax run in float32; logits come out in float32.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import NEG_INF, GPTConfig
from .rope import apply_rope, rope_table

@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: static config plus a params pytree (a registered pytree)."""

    config: GPTConfig
    params: dict

    @property
    def dtype(self):
        return self.params["tok_embeddings"].dtype


jax.tree_util.register_dataclass(Model, data_fields=["params"], meta_fields=["config"])


def param_shapes(cfg: GPTConfig) -> dict:
    """The params pytree as shapes (tuples); the single source of every weight's shape."""
    E, H, D, F, V = cfg.dim, cfg.n_head, cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size
    layer = {"attention_norm": (E,), "wqkv": (E, 3, H, D), "wo": (H, D, E),
             "ffn_norm": (E,), "w1": (E, F), "w3": (E, F), "w2": (F, E)}
    shapes = {"tok_embeddings": (V, E), "layers": [dict(layer) for _ in range(cfg.n_layer)],
              "norm": (E,), "output": (E, V)}
    if cfg.model_type == "c2i":
        shapes["cls_embedding"] = (cfg.num_class_rows, E)
    else:
        shapes["caption"] = {"fc1": (cfg.caption_dim, E), "fc2": (E, E), "uncond": (cfg.cls_token_num, cfg.caption_dim)}
    return shapes


def _is_shape(x):
    return isinstance(x, tuple)


def abstract_params(cfg: GPTConfig, dtype=jnp.bfloat16) -> dict:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), param_shapes(cfg), is_leaf=_is_shape)


def count_params(cfg: GPTConfig, *, include_buffers: bool = False) -> int:
    """Parameter count as LlamaGen reports it (the t2i null caption is a buffer, not a parameter)."""
    shapes = param_shapes(cfg)
    if not include_buffers and "caption" in shapes:
        shapes = dict(shapes, caption={k: v for k, v in shapes["caption"].items() if k != "uncond"})
    return sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=_is_shape))


def init_params(cfg: GPTConfig, key, dtype=jnp.bfloat16, std: float = 0.02) -> dict:
    """Random weights (normal(0, std), norms at 1) for benchmarks and tests."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, s, p in zip(keys, leaves, paths):
        if "norm" in p:
            out.append(jnp.ones(s, dtype))
        else:
            out.append((std * jax.random.normal(k, s, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x, weight, eps):
    # LlamaGen/Meta order: normalise in float32, cast back to x's dtype, then scale.
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight


def project(matmul, x, w, k_axes: int = 1):
    """x (B, *in) @ w (*in, *out) -> (B, *out) as ``matmul`` over 2-D views (free reshapes):
    (B, prod(in)) @ (prod(in), prod(out)); for a decode step's GEMMs on a small-row kernel."""
    kdim = math.prod(w.shape[:k_axes])
    y = matmul(x.reshape(x.shape[0], kdim), w.reshape(kdim, -1))  # (B, prod(out))
    return y.reshape((x.shape[0],) + w.shape[k_axes:])  # (B, *out)


def ffn(layer, x, matmul=None):
    """The SwiGLU FFN of x (B, T, E). Decode (T = 1) with ``matmul`` (see decode_step)."""
    if matmul is not None:  # one token per row (decode): x (B, 1, E)
        return matmul(ffn_gate(layer, x[:, 0], matmul), layer["w2"])[:, None]  # (B, 1, E)
    if "w13" in layer:  # w1 and w3 stacked (E, 2, F) by stack_ffn: one GEMM for both
        h = jnp.einsum("BTE,EKF->BTKF", x, layer["w13"])  # (B, T, 2, F)
        h1, h3 = h[:, :, 0], h[:, :, 1]
    else:
        h1 = jnp.einsum("BTE,EF->BTF", x, layer["w1"])
        h3 = jnp.einsum("BTE,EF->BTF", x, layer["w3"])
    return jnp.einsum("BTF,FE->BTE", jax.nn.silu(h1) * h3, layer["w2"])


def ffn_gate(layer, x, matmul):
    """silu(x @ w1) * (x @ w3) for x (B, E) -> (B, F): the FFN before w2, on ``matmul``."""
    if "w13" in layer:
        h = project(matmul, x, layer["w13"])  # (B, 2, F)
        h1, h3 = h[:, 0], h[:, 1]
    else:
        h1, h3 = matmul(x, layer["w1"]), matmul(x, layer["w3"])
    return jax.nn.silu(h1) * h3


def stack_ffn(params):
    """params whose layers also hold ``w13`` (E, 2, F), w1 and w3 stacked, which :func:`ffn` then
    uses: one GEMM instead of two, without asking XLA to merge them (its dot merger concatenates
    the weights, and where the GEMM cannot read the concatenation in place it copies it every
    step). Done once per call, outside the decode loop; costs one more copy of w1 and w3."""
    return {**params, "layers": [{**layer, "w13": jnp.stack([layer["w1"], layer["w3"]], axis=1)}
                                 for layer in params["layers"]]}


def qkv_proj(layer, x):
    qkv = jnp.einsum("BTE,EKHD->BTKHD", x, layer["wqkv"])  # K = 3 (q, k, v); GEMM output order, no transpose
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def out_proj(layer, o):
    return jnp.einsum("BTHD,HDE->BTE", o, layer["wo"])


def attention_dense(q, k, v, mask):
    """q (B,T,H,D), k/v (B,S,H,D), mask (B|1, T, S) bool -> (B,T,H,D). Logits/softmax in f32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("BTHD,BSHD->BHTS", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("BHTS,BSHD->BTHD", probs, v)


def causal_cond_mask(cond_mask, total: int):
    """(B, total, total) bool: causal, condition columns of padded captions hidden, diagonal on."""
    c = cond_mask.shape[1]
    i = jnp.arange(total)[:, None]
    j = jnp.arange(total)[None, :]
    col_ok = jnp.concatenate([cond_mask, jnp.ones((cond_mask.shape[0], total - c), bool)], axis=1)  # (B, total)
    return ((j <= i)[None] & col_ok[:, None, :]) | (i == j)[None]


# ----------------------------------------------------------------------------- embeddings


def embed_condition(params, cfg: GPTConfig, cond, cond_mask):
    """c2i: cond = class ids (B,); t2i: caption features (B, 120, C) (padded rows already zero).

    Returns (B, c, E) in the params dtype.
    """
    if cfg.model_type == "c2i":
        return params["cls_embedding"][cond][:, None, :]  # (B, 1, E)
    cap = params["caption"]
    x = cond.astype(cap["fc1"].dtype)
    h = jax.nn.gelu(jnp.einsum("BTC,CE->BTE", x, cap["fc1"]), approximate=True)
    return jnp.einsum("BTE,EF->BTF", h, cap["fc2"])[:, : cfg.cls_token_num]


def head(params, cfg, x, matmul=None):
    h = rms_norm(x, params["norm"], cfg.norm_eps)
    if matmul is not None:  # one token per row (decode): x (B, 1, E)
        return matmul(h[:, 0], params["output"])[:, None].astype(jnp.float32)
    return jnp.einsum("BTE,EV->BTV", h, params["output"]).astype(jnp.float32)


@functools.lru_cache(maxsize=32)
def _rope_np(cfg: GPTConfig):
    return rope_table(cfg.grid, cfg.head_dim, cfg.rope_base, cfg.cls_token_num)


def rope_rows(cfg: GPTConfig, positions):
    return jnp.asarray(_rope_np(cfg))[positions]


# ----------------------------------------------------------------------------- forward passes


def forward_full(params, cfg: GPTConfig, cond_emb, cond_mask, tokens):
    """Teacher-forced, cache-free pass over [condition ; tokens] with full causal attention.

    cond_emb (B, c, E), cond_mask (B, c) bool, tokens (B, n) int32 with n <= N-1.
    Returns float32 logits (B, n + 1, V): row j predicts image token j.
    """
    c = cfg.cls_token_num
    x = jnp.concatenate([cond_emb, params["tok_embeddings"][tokens]], axis=1)  # (B, c + n, E)
    total = x.shape[1]
    rot = rope_rows(cfg, jnp.arange(total))
    mask = causal_cond_mask(cond_mask, total)
    for layer in params["layers"]:
        h = rms_norm(x, layer["attention_norm"], cfg.norm_eps)
        q, k, v = qkv_proj(layer, h)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        x = x + out_proj(layer, attention_dense(q, k, v, mask))
        x = x + ffn(layer, rms_norm(x, layer["ffn_norm"], cfg.norm_eps))
    return head(params, cfg, x[:, c - 1:])


def prefill(params, cfg: GPTConfig, policy, caches, cond_emb, cond_mask):
    """Run the c condition positions, write their K/V through the policy.

    Returns (logits of the last condition position (B, V) float32, caches).
    """
    c = cfg.cls_token_num
    x = cond_emb
    rot = rope_rows(cfg, jnp.arange(c))
    mask = causal_cond_mask(cond_mask, c)
    new = []
    for layer, cache in zip(params["layers"], caches):
        with jax.named_scope("attention"):
            h = rms_norm(x, layer["attention_norm"], cfg.norm_eps)
            q, k, v = qkv_proj(layer, h)
            q, k = apply_rope(q, rot), apply_rope(k, rot)
            new.append(policy.prefill(cache, k, v))
            x = x + out_proj(layer, attention_dense(q, k, v, mask))
        with jax.named_scope("ffn"):
            x = x + ffn(layer, rms_norm(x, layer["ffn_norm"], cfg.norm_eps))
    return head(params, cfg, x[:, -1:])[:, 0], new


def decode_step(params, cfg: GPTConfig, policy, caches, tokens, t, cond_mask, row_keys, span, matmul=None,
                add_norm=None, leave=None, before_leave=False):
    """One image token per row through every layer.

    tokens (B,) int32 = image token t; t is a traced scalar (0-based image index);
    span (static) bounds the cache slots a dense-layout policy needs to read this segment.
    Returns (logits (B, V) float32 predicting token t+1, caches).

    A policy with ``takes_qkv = True`` also gets ``qkv=`` (B, 3, H, D), the projection's q, k, v
    before RoPE in one array, and ``rope=`` (D/2, 2), this position's RoPE row, which a Pallas
    step kernel reads in place (XLA drops the rotated q and k then, unless the policy uses them).
    matmul (static): None for XLA's einsums, or a function (M, K) @ (K, N) -> (M, N) for every
    weight GEMM of the step (:func:`adsa_jax.kernels.small_matmul` at small batches).
    add_norm (static, with matmul): None, or a function (h (M, K), w (K, N), x (M, N), norm weight)
    -> (x + h @ w, the RMSNorm of that) for the two GEMMs a residual add and a norm follow, wo and
    w2 (:func:`adsa_jax.kernels.matmul_add_norm`); the same arithmetic as without it, the float32
    partials summed in another order.
    leave (static): for a policy with ``leave_schedule``, whether step t is one whose tokens leave
    (None: the policy branches on t itself); for one with ``first_choice`` (period 1), whether t is
    at or after it (False: before; None: the policy decides per step); it goes to the policy's
    begin_step and decode. before_leave (static): whether step t + 1 is one whose tokens leave
    (given with leave=False), so this step may prepare its scores.
    """
    x = params["tok_embeddings"][tokens][:, None, :]  # (B, 1, E)
    rot = rope_rows(cfg, cfg.cls_token_num + t)  # (D/2, 2)
    rot2 = jnp.broadcast_to(rot, (2,) + rot.shape)  # (2, D/2, 2): the same position for q and k
    takes_qkv = getattr(policy, "takes_qkv", False)
    layers = params["layers"]
    # A policy with ``begin_step`` does the step's work that spans layers first (adsa-evict's period:
    # one branch for every layer's moves), then each layer's decode(..., planned=True).
    planned = hasattr(policy, "begin_step")
    if planned:
        caches = policy.begin_step(list(caches), t, row_keys, **({} if leave is None else {"leave": leave}))

    def residual_norm(x, y, w, k_axes, norm_w):  # (x + y @ w, its RMSNorm by norm_w), both (B, 1, E)
        kdim = math.prod(w.shape[:k_axes])
        xn, h = add_norm(y.reshape(y.shape[0], kdim), w.reshape(kdim, -1), x[:, 0], norm_w)  # (B, E) each
        return xn[:, None], h[:, None]

    h = rms_norm(x, layers[0]["attention_norm"], cfg.norm_eps) if add_norm is not None else None
    new = []
    for li, (layer, cache) in enumerate(zip(layers, caches)):
        with jax.named_scope("attention"):
            if add_norm is None:
                h = rms_norm(x, layer["attention_norm"], cfg.norm_eps)
            if matmul is None:
                qkv = jnp.einsum("BTE,EKHD->BTKHD", h, layer["wqkv"])[:, 0]  # (B, 3, H, D)
            else:
                qkv = project(matmul, h[:, 0], layer["wqkv"])  # (B, 3, H, D)
            qk = apply_rope(qkv[:, :2], rot2)  # (B, 2, H, D)
            q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]
            kw = (({"qkv": qkv, "rope": rot} if takes_qkv else {}) | ({"planned": True} if planned else {})
                  | ({"before_leave": True} if planned and before_leave else {})
                  | ({"leave": leave} if planned and leave is not None else {}))
            cache, o = policy.decode(cache, q, k, v, t, cond_mask, layer_index=li, row_keys=row_keys, span=span,
                                     **kw)
            new.append(cache)
            if add_norm is not None:
                x, h = residual_norm(x, o, layer["wo"], 2, layer["ffn_norm"])
            else:
                x = x + (out_proj(layer, o[:, None]) if matmul is None else project(matmul, o, layer["wo"], 2)[:, None])
        with jax.named_scope("ffn"):
            if add_norm is not None:  # the next layer's attention norm, or the head's after the last layer
                nxt = layers[li + 1]["attention_norm"] if li + 1 < len(layers) else params["norm"]
                x, h = residual_norm(x, ffn_gate(layer, h[:, 0], matmul), layer["w2"], 1, nxt)
            else:
                x = x + ffn(layer, rms_norm(x, layer["ffn_norm"], cfg.norm_eps), matmul)
    if add_norm is not None:  # h: the final norm of x
        return matmul(h[:, 0], params["output"]).astype(jnp.float32), new
    return head(params, cfg, x, matmul)[:, 0], new


def check_params(params, cfg: GPTConfig):
    """Raise a clear error when a params tree does not fit cfg (names the first mismatches)."""
    want = param_shapes(cfg)
    got_paths = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    want_paths = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(want, is_leaf=_is_shape)[0]}
    bad = [f"{k}: {got_paths.get(k)} != {s}" for k, s in want_paths.items() if got_paths.get(k) != s]
    extra = sorted(set(got_paths) - set(want_paths))
    if bad or extra:
        raise ValueError("params do not match the config: " + "; ".join((bad + [f"unexpected {e}" for e in extra])[:6]))
