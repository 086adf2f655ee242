"""The LlamaGen VQ tokenizer (``tokenizer/tokenizer_image/vq_model.py``) as pure functions.

Activations are NHWC. The params pytree mirrors LlamaGen's state-dict names, so the converter
is a rename (``weight`` -> ``kernel`` / ``scale``) plus OIHW -> HWIO for conv kernels::

    encoder: conv_in, conv_blocks[l] {res[j], attn[j] (last level only), downsample.conv (not last)},
             mid [ResnetBlock, AttnBlock, ResnetBlock], norm_out, conv_out
    quant_conv (1x1, z -> D)      quantize.embedding (N, D)      post_quant_conv (1x1, D -> z)
    decoder: conv_in, mid [...], conv_blocks[b] {res[j], attn[j] (b = 0 only), upsample.conv
             (not last)}, norm_out, conv_out          # decoder blocks in reversed level order

    conv: {kernel (kh, kw, in, out), bias (out,)}     norm: {scale (C,), bias (C,)}
    ResnetBlock: norm1, conv1, norm2, conv2 [, nin_shortcut]    AttnBlock: norm, q, k, v, proj_out

Numerics follow the PyTorch reference: GroupNorm (32 groups, eps 1e-6) and the attention
softmax run in float32 whatever the compute dtype; convolutions and einsums use
``Precision.HIGHEST`` so float32 matches PyTorch's CPU float32 to ~1e-5; codebook lookup and
nearest-code search always run in float32; outputs are float32 and are **not clamped**.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .config import ConfigError

HIGHEST = jax.lax.Precision.HIGHEST
GROUPS = 32  # LlamaGen's Normalize(): GroupNorm(32, C, eps=1e-6, affine=True)
NORM_EPS = 1e-6
L2_EPS = 1e-12  # F.normalize's eps


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """LlamaGen ``VQModel`` architecture (frozen, hashable: usable as a jit static argument).

    ``ch`` (base channels) is an Encoder/Decoder default in LlamaGen, not a ModelArgs field;
    dropout is irrelevant at inference and not kept. The codebook is always l2-normalised
    (every released LlamaGen tokenizer sets ``codebook_l2_norm=True``).
    """

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        for name in ("codebook_size", "codebook_embed_dim", "ch", "z_channels", "num_res_blocks"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"VQ config field {name} must be a positive integer, got {v!r}")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ConfigError(f"VQ ch_mult must be a non-empty list of positive integers, got {self.ch_mult}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % GROUPS]
        if bad:
            raise ConfigError(f"VQ channel widths {bad} (ch {self.ch} x ch_mult) are not divisible by the "
                              f"{GROUPS} GroupNorm groups; --ch must be a multiple of {GROUPS}")

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample(self) -> int:
        """Pixels per code along each side (16 for VQ-16, 8 for VQ-8)."""
        return 2 ** (self.num_levels - 1)

    def replace(self, **kw) -> "VQConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VQConfig":
        """Our field names, plus LlamaGen's ModelArgs names (``encoder_ch_mult`` /
        ``decoder_ch_mult``) and its training-only fields, which are ignored."""
        d = dict(d)
        enc, dec = d.pop("encoder_ch_mult", None), d.pop("decoder_ch_mult", None)
        if enc is not None and dec is not None and list(enc) != list(dec):
            raise ConfigError(f"encoder_ch_mult {list(enc)} != decoder_ch_mult {list(dec)}: asymmetric "
                              "tokenizers are not supported (no released LlamaGen tokenizer is one)")
        if (enc or dec) is not None:
            d.setdefault("ch_mult", enc if enc is not None else dec)
        if d.pop("codebook_l2_norm", True) is not True:
            raise ConfigError("codebook_l2_norm=False is not supported: every LlamaGen tokenizer uses an "
                              "l2-normalised codebook")
        ignored = {"image_size", "dropout", "dropout_p", "codebook_show_usage", "commit_loss_beta",
                   "entropy_loss_ratio", "downsample_size"}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields - ignored
        if unknown:
            raise ConfigError(f"unknown VQ config fields: {sorted(unknown)}; expected {sorted(fields)}")
        return cls(**{k: v for k, v in d.items() if k in fields})


VQ16 = VQConfig()  # vq_ds16_c2i.pt / vq_ds16_t2i.pt: 256 px -> 16x16 codes
VQ8 = VQConfig(ch_mult=(1, 2, 2, 4))  # vq_ds8_c2i.pt: 256 px -> 32x32 codes
PRESETS = {"VQ-16": VQ16, "VQ-8": VQ8}


def preset(name: str) -> VQConfig:
    key = str(name).upper().replace("_", "-")
    key = key if key.startswith("VQ") else f"VQ-{key}"
    key = key if "-" in key else f"VQ-{key[2:]}"
    if key not in PRESETS:
        raise ConfigError(f"unknown VQ preset {name!r}; choose VQ-16 or VQ-8")
    return PRESETS[key]


# ----------------------------------------------------------------------------- parameter shapes


def _conv_shape(k, cin, cout):
    return {"kernel": (k, k, cin, cout), "bias": (cout,)}


def _norm_shape(c):
    return {"scale": (c,), "bias": (c,)}


def _res_shape(cin, cout):
    p = {"norm1": _norm_shape(cin), "conv1": _conv_shape(3, cin, cout),
         "norm2": _norm_shape(cout), "conv2": _conv_shape(3, cout, cout)}
    if cin != cout:
        p["nin_shortcut"] = _conv_shape(1, cin, cout)
    return p


def _attn_shape(c):
    return {"norm": _norm_shape(c), **{n: _conv_shape(1, c, c) for n in ("q", "k", "v", "proj_out")}}


def _mid_shape(c):
    return [_res_shape(c, c), _attn_shape(c), _res_shape(c, c)]


def vq_param_shapes(cfg: VQConfig) -> dict:
    """The params pytree as shape tuples: the single source of every weight's name and shape."""
    ch, mult, L, R = cfg.ch, cfg.ch_mult, cfg.num_levels, cfg.num_res_blocks
    # Encoder: level l maps ch*in_mult[l] -> ch*mult[l]; attention only at the last level.
    in_mult = (1,) + mult
    enc_blocks = []
    for lvl in range(L):
        cin, cout = ch * in_mult[lvl], ch * mult[lvl]
        blk = {"res": [_res_shape(cin if j == 0 else cout, cout) for j in range(R)]}
        if lvl == L - 1:
            blk["attn"] = [_attn_shape(cout) for _ in range(R)]
        else:
            blk["downsample"] = {"conv": _conv_shape(3, cout, cout)}
        enc_blocks.append(blk)
    top = ch * mult[-1]
    encoder = {"conv_in": _conv_shape(3, 3, ch), "conv_blocks": enc_blocks, "mid": _mid_shape(top),
               "norm_out": _norm_shape(top), "conv_out": _conv_shape(3, top, cfg.z_channels)}
    # Decoder: block b runs at level L-1-b (reversed storage order), R+1 ResnetBlocks each.
    dec_blocks, cin = [], top
    for b in range(L):
        cout = ch * mult[L - 1 - b]
        blk = {"res": [_res_shape(cin if j == 0 else cout, cout) for j in range(R + 1)]}
        if b == 0:
            blk["attn"] = [_attn_shape(cout) for _ in range(R + 1)]
        if b != L - 1:
            blk["upsample"] = {"conv": _conv_shape(3, cout, cout)}
        dec_blocks.append(blk)
        cin = cout
    decoder = {"conv_in": _conv_shape(3, cfg.z_channels, top), "mid": _mid_shape(top), "conv_blocks": dec_blocks,
               "norm_out": _norm_shape(cin), "conv_out": _conv_shape(3, cin, 3)}
    D = cfg.codebook_embed_dim
    return {"encoder": encoder, "quant_conv": _conv_shape(1, cfg.z_channels, D),
            "quantize": {"embedding": (cfg.codebook_size, D)},
            "post_quant_conv": _conv_shape(1, D, cfg.z_channels), "decoder": decoder}


def _is_shape(x):
    return isinstance(x, tuple)


def abstract_vq_params(cfg: VQConfig, dtype=jnp.float32) -> dict:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), vq_param_shapes(cfg), is_leaf=_is_shape)


def count_vq_params(cfg: VQConfig) -> int:
    """Parameter count (the ``codebook_used`` buffer excluded): 71,883,403 for VQ-16."""
    return sum(math.prod(s) for s in jax.tree.leaves(vq_param_shapes(cfg), is_leaf=_is_shape))


def init_vq_params(cfg: VQConfig, key, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random weights (normal(0, std), norms at 1 / 0) for benchmarks and tests."""
    shapes = vq_param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    keys = jax.random.split(key, len(flat))
    out = []
    for k, (path, s) in zip(keys, flat):
        last = path[-1].key
        if last == "scale":
            out.append(jnp.ones(s, dtype))
        elif last == "bias":
            out.append(jnp.zeros(s, dtype))
        else:
            out.append((std * jax.random.normal(k, s, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- building blocks


def group_norm(p, x):
    """GroupNorm(32, eps 1e-6), statistics and affine in float32, result in x's dtype."""
    B, H, W, C = x.shape
    xg = x.astype(jnp.float32).reshape(B, H, W, GROUPS, C // GROUPS)  # (B, H, W, G, C/G)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)  # biased, as torch
    y = ((xg - mean) * jax.lax.rsqrt(var + NORM_EPS)).reshape(B, H, W, C)  # (B, H, W, C)
    y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def swish(x):
    return x * jax.nn.sigmoid(x)


def conv(p, x, *, stride: int = 1, padding="SAME_TORCH"):
    """Conv2d with bias. Default padding is PyTorch's ``padding=k//2`` (stride 1, odd k)."""
    kh, kw = p["kernel"].shape[:2]
    if (kh, kw) == (1, 1) and stride == 1:
        # A 1x1 conv is a per-pixel matmul; the einsum keeps it off the conv path.
        y = jnp.einsum("bhwi,io->bhwo", x, p["kernel"][0, 0], precision=HIGHEST)
        return y + p["bias"]
    if padding == "SAME_TORCH":
        padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    y = jax.lax.conv_general_dilated(x, p["kernel"], window_strides=(stride, stride), padding=padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    return y + p["bias"]


def resnet_block(p, x):
    h = conv(p["conv1"], swish(group_norm(p["norm1"], x)))
    h = conv(p["conv2"], swish(group_norm(p["norm2"], h)))  # dropout is identity at inference
    shortcut = conv(p["nin_shortcut"], x) if "nin_shortcut" in p else x
    return shortcut + h


def attn_block(p, x):
    """Single-head self-attention over all h*w positions, scale C**-0.5, softmax in float32."""
    B, H, W, C = x.shape
    hn = group_norm(p["norm"], x)
    q, k, v = (conv(p[n], hn).reshape(B, H * W, C) for n in ("q", "k", "v"))  # (B, HW, C) each
    logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=HIGHEST,
                        preferred_element_type=jnp.float32) * (C ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    out = jnp.einsum("bqk,bkc->bqc", probs, v, precision=HIGHEST).reshape(B, H, W, C)  # (B, H, W, C)
    return x + conv(p["proj_out"], out)


def downsample(p, x):
    # LlamaGen pads right and bottom only (F.pad(x, (0, 1, 0, 1))), then a VALID stride-2 conv:
    # symmetric padding would shift every encoder feature by half a pixel.
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(p["conv"], x, stride=2, padding="VALID")


def upsample(p, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2: (B, 2H, 2W, C)
    return conv(p["conv"], x)


def _mid(ps, x):
    x = resnet_block(ps[0], x)
    x = attn_block(ps[1], x)
    return resnet_block(ps[2], x)


def encoder(p, x):
    """(B, H, W, 3) -> (B, H/ds, W/ds, z_channels)."""
    h = conv(p["conv_in"], x)
    for blk in p["conv_blocks"]:
        for j, rp in enumerate(blk["res"]):
            h = resnet_block(rp, h)
            if "attn" in blk:
                h = attn_block(blk["attn"][j], h)
        if "downsample" in blk:
            h = downsample(blk["downsample"], h)
    h = _mid(p["mid"], h)
    return conv(p["conv_out"], swish(group_norm(p["norm_out"], h)))


def decoder(p, z):
    """(B, h, w, z_channels) -> (B, h*ds, w*ds, 3). Blocks run in stored order (coarse first)."""
    h = conv(p["conv_in"], z)
    h = _mid(p["mid"], h)
    for blk in p["conv_blocks"]:
        for j, rp in enumerate(blk["res"]):
            h = resnet_block(rp, h)
            if "attn" in blk:
                h = attn_block(blk["attn"][j], h)
        if "upsample" in blk:
            h = upsample(blk["upsample"], h)
    return conv(p["conv_out"], swish(group_norm(p["norm_out"], h)))


def l2_normalize(x):
    """F.normalize(x, dim=-1): x / max(||x||, 1e-12), in float32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, L2_EPS)


def codebook_lookup(params, codes):
    """(...,) int codes -> (..., D) l2-normalised code vectors, float32."""
    return jnp.take(l2_normalize(params["quantize"]["embedding"]), codes, axis=0)


def nearest_codes(params, z):
    """(B, h, w, D) -> (B, h, w) int32: argmin distance between l2-normalised z and codebook.

    Same formula as LlamaGen (|z|^2 + |e|^2 - 2 z.e, float32) so near-ties break the same way.
    """
    zn = l2_normalize(z)
    e = l2_normalize(params["quantize"]["embedding"])  # (N, D)
    dots = jnp.einsum("bhwd,nd->bhwn", zn, e, precision=HIGHEST)
    dist = jnp.sum(jnp.square(zn), -1, keepdims=True) + jnp.sum(jnp.square(e), -1) - 2 * dots
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def _cast(params, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), params)


def decode_latents(params, zq, dtype=jnp.float32):
    """Quantised latents (B, h, w, D) -> images (B, H, W, 3) float32 (post_quant_conv + decoder)."""
    p = _cast(params, dtype)
    z = conv(p["post_quant_conv"], zq.astype(dtype))
    return decoder(p["decoder"], z).astype(jnp.float32)


def encode_latents(params, images, dtype=jnp.float32):
    """Images (B, H, W, 3) -> pre-quantisation latents (B, h, w, D) float32 (encoder + quant_conv)."""
    p = _cast(params, dtype)
    z = encoder(p["encoder"], images.astype(dtype))
    return conv(p["quant_conv"], z).astype(jnp.float32)


# ----------------------------------------------------------------------------- model and public API


@dataclasses.dataclass(frozen=True)
class VQModel:
    """A loaded tokenizer: static config plus a params pytree (a registered pytree)."""

    config: VQConfig
    params: dict

    @property
    def dtype(self):
        return self.params["quantize"]["embedding"].dtype

    @property
    def downsample(self) -> int:
        return self.config.downsample


jax.tree_util.register_dataclass(VQModel, data_fields=["params"], meta_fields=["config"])


def _compute_dtype(vq: VQModel, dtype) -> str:
    if dtype is None:
        # float16 storage (as the converter keeps it) computes in float32, as LlamaGen's VQ does.
        return "bfloat16" if vq.dtype == jnp.bfloat16 else "float32"
    if isinstance(dtype, str):
        dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype)
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in ("bfloat16", "float32"):
        raise ConfigError(f"VQ compute dtype must be float32 or bfloat16, got {dtype!r}")
    return name


@functools.partial(jax.jit, static_argnames=("grid", "dtype"))
def _decode_jit(vq: VQModel, codes, *, grid, dtype):
    B = codes.shape[0]
    zq = codebook_lookup(vq.params, codes).reshape(B, grid[0], grid[1], -1)  # (B, h, w, D), row-major
    return decode_latents(vq.params, zq, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _encode_jit(vq: VQModel, images, *, dtype):
    z = encode_latents(vq.params, images, jnp.dtype(dtype))
    codes = nearest_codes(vq.params, z)  # (B, h, w)
    return codes.reshape(codes.shape[0], -1)  # (B, h*w), row-major as LlamaGen flattens


def _check_model(vq):
    if not isinstance(vq, VQModel):
        raise ConfigError(f"expected a VQModel (from load_vq), got {type(vq).__name__}")


def decode_codes(vq: VQModel, codes, *, grid=None, dtype=None):
    """Codes (B, h*w) int -> images (B, h*ds, w*ds, 3) float32, nominally [-1, 1], not clamped.

    grid: (h, w); default a square grid. dtype: 'float32' or 'bfloat16' compute (default:
    float32 unless the params are bfloat16). Compiled once per (shape, grid, dtype).
    """
    _check_model(vq)
    cfg = vq.config
    shape = tuple(np.shape(codes))
    if len(shape) != 2:
        raise ConfigError(f"codes must have shape (batch, h*w), got {shape}")
    n = shape[1]
    if grid is None:
        g = math.isqrt(n)
        if g * g != n:
            raise ConfigError(f"{n} codes per image is not a square grid; pass grid=(h, w) "
                              "(256 px with VQ-16 -> 256 codes = 16x16)")
        grid = (g, g)
    grid = tuple(int(s) for s in grid)
    if len(grid) != 2 or grid[0] * grid[1] != n or min(grid) <= 0:
        raise ConfigError(f"grid {grid} does not hold {n} codes per image")
    if not isinstance(codes, jax.core.Tracer):
        arr = np.asarray(codes)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"codes must be integers, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= cfg.codebook_size):
            raise ConfigError(f"codes must be in [0, {cfg.codebook_size - 1}] (codebook size {cfg.codebook_size}), "
                              f"got {arr.min()}..{arr.max()}; were they sampled by a GPT with a different vocab?")
    elif not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ConfigError(f"codes must be integers, got dtype {codes.dtype}")
    return _decode_jit(vq, jnp.asarray(codes, jnp.int32), grid=grid, dtype=_compute_dtype(vq, dtype))


def encode_images(vq: VQModel, images, *, dtype=None):
    """Images (B, H, W, 3) RGB in [-1, 1] -> codes (B, (H/ds)*(W/ds)) int32, row-major.

    H and W must be multiples of the downsample factor (16 for VQ-16). dtype as in decode_codes.
    """
    _check_model(vq)
    ds = vq.config.downsample
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (that looks like NCHW; transpose to NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ConfigError(f"images must have shape (batch, H, W, 3), got {shape}{hint}")
    if shape[1] % ds or shape[2] % ds or min(shape[1:3]) == 0:
        raise ConfigError(f"image size {shape[1]}x{shape[2]} is not a positive multiple of the tokenizer's "
                          f"downsample factor {ds}")
    if not isinstance(images, jax.core.Tracer):
        arr = np.asarray(images)
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != jnp.bfloat16:
            raise ConfigError(f"images must be floats in [-1, 1], got dtype {arr.dtype} "
                              "(convert uint8 with x / 127.5 - 1)")
        if arr.size and (float(arr.min()) < -1.5 or float(arr.max()) > 1.5):
            raise ConfigError(f"images must be in [-1, 1], got values {float(arr.min()):.3g}..{float(arr.max()):.3g} "
                              "(convert [0, 255] with x / 127.5 - 1, [0, 1] with 2x - 1)")
    return _encode_jit(vq, jnp.asarray(images, jnp.float32), dtype=_compute_dtype(vq, dtype))


# ----------------------------------------------------------------------------- saving / loading


def save_vq(directory, params, cfg: VQConfig, *, overwrite: bool = False, source=None):
    """Write an adsa_jax VQ directory (Orbax params + ``adsa_config.json`` with kind 'vq')."""
    from .checkpoint import save_tree

    dtype = str(np.dtype(jax.tree.leaves(params)[0].dtype))
    meta = {"kind": "vq", "config": cfg.to_dict(), "dtype": dtype, "source": None if source is None else str(source)}
    save_tree(directory, params, meta, overwrite=overwrite)


def load_vq(directory, dtype: str | None = "float32") -> VQModel:
    """Load a directory written by :func:`save_vq` / ``convert_vq``.

    dtype: storage dtype of the loaded params ('float32' default, as LlamaGen runs its VQ;
    'bfloat16'; or None to keep what is stored, e.g. float16).
    """
    from .checkpoint import _dtype, read_meta, restore_tree

    meta = read_meta(directory)
    if meta.get("kind") != "vq":
        raise ConfigError(f"{directory} holds a {meta.get('kind')!r} checkpoint, not a VQ tokenizer; "
                          "convert one with `adsa-jax convert vq vq_ds16_c2i.pt --out DIR`")
    cfg = VQConfig.from_dict(meta["config"])
    stored = _dtype(meta["dtype"])
    target = _dtype(dtype) or stored
    params = restore_tree(directory, abstract_vq_params(cfg, stored))
    if target != stored:
        params = jax.tree.map(lambda x: x.astype(target), params)
    return VQModel(cfg, params)


def config_from_json(path) -> VQConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"VQ config file not found: {p}")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p} must hold a JSON object of VQ config fields")
    return VQConfig.from_dict(d)
