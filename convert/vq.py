"""LlamaGen VQ tokenizer ``.pt`` -> adsa_jax VQ directory (strict key and shape matching).

The adsa_jax params tree mirrors the state-dict names (see :mod:`adsa_jax.vq`), so the map is
generic: ``kernel`` <- ``weight`` (OIHW -> HWIO), norm ``scale`` <- ``weight``, ``bias`` <-
``bias``, ``quantize.embedding`` <- ``quantize.embedding.weight``. The tokenizer's width is not
in any file name: the defaults are the released VQ-16 (ch 128, z 256, codebook 16384 x 8);
a mismatch is reported with the sizes read off the checkpoint.
"""
from __future__ import annotations

import re
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from adsa_jax.config import ConfigError
from adsa_jax.vq import VQ16, VQConfig, config_from_json, preset, vq_param_shapes

from .torch_pickle import CheckpointError, check_finite, check_keys, extract_state_dict, load_pt

_DTYPES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16,
           "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16}
# Buffers in LlamaGen's VQModel state dict that are not weights (codebook usage statistics).
_BUFFERS = ("quantize.codebook_used",)


def _torch_name(path) -> str:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    last = keys[-1]
    if last in ("kernel", "scale"):
        keys[-1] = "weight"
    elif last == "embedding":
        keys.append("weight")
    return ".".join(keys)


def _torch_shape(path, shape) -> tuple:
    last = getattr(path[-1], "key", None)
    if last == "kernel":  # HWIO -> OIHW
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    return tuple(shape)


def expected_torch_shapes(cfg: VQConfig) -> dict[str, tuple]:
    """LlamaGen VQModel state-dict names and shapes for cfg (buffers excluded)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(vq_param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return {_torch_name(p): _torch_shape(p, s) for p, s in flat}


def infer_config(sd: dict) -> dict:
    """Read the architecture off a LlamaGen VQ state dict (for error messages)."""
    out = {}
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        out["ch"] = ch
        levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))})
        mult = []
        for lvl in levels:
            w = sd.get(f"encoder.conv_blocks.{lvl}.res.0.conv1.weight")
            mult.append(w.shape[0] // ch if w is not None else None)
        out["ch_mult"] = mult
        out["z_channels"] = sd["encoder.conv_out.weight"].shape[0]
        out["codebook_size"], out["codebook_embed_dim"] = sd["quantize.embedding.weight"].shape
    except (KeyError, AttributeError, ValueError, ZeroDivisionError):
        pass
    return out


def _hint(cfg: VQConfig, sd: dict) -> str:
    got = infer_config(sd)
    if not got:
        return "It does not look like a LlamaGen VQModel state dict (is it a GPT checkpoint?)."
    parts, flags = [], []
    if "ch_mult" in got:
        layout = {5: "VQ-16 layout", 4: "VQ-8 layout"}.get(len(got["ch_mult"]), f"{len(got['ch_mult'])} levels")
        parts.append(f"ch_mult {tuple(got['ch_mult'])} ({layout})")
    layout_fix = None
    if "ch_mult" in got and tuple(got["ch_mult"]) != cfg.ch_mult:
        named = {(1, 1, 2, 2, 4): "VQ-16", (1, 2, 2, 4): "VQ-8"}.get(tuple(got["ch_mult"]))
        layout_fix = (f"--preset {named}" if named else f"--ch-mult {','.join(map(str, got['ch_mult']))}")
    for key, flag in (("ch", "--ch"), ("z_channels", "--z-channels"), ("codebook_size", "--codebook-size"),
                      ("codebook_embed_dim", "--codebook-dim")):
        if key in got:
            parts.append(f"{key} {got[key]}")
            if got[key] != getattr(cfg, key):
                flags.append(f"{flag} {got[key]}")
    want = (f"ch_mult {cfg.ch_mult}, ch {cfg.ch}, z_channels {cfg.z_channels}, "
            f"codebook_size {cfg.codebook_size}, codebook_embed_dim {cfg.codebook_embed_dim}")
    msg = f"The checkpoint has {', '.join(parts)}; the config asks for {want}."
    flags = ([layout_fix] if layout_fix else []) + flags  # the `adsa-jax convert vq` flags that fix it
    if flags:
        msg += f" To convert it, pass {' '.join(flags)}."
    return msg


def convert_state_dict(sd: dict, cfg: VQConfig, dtype=None, path="checkpoint") -> dict:
    """Map a LlamaGen VQ state dict onto the adsa_jax params tree (NumPy arrays).

    dtype None keeps the stored dtype; if tensors are stored in mixed dtypes they are widened
    to float32 (lossless)."""
    sd = {k: v for k, v in sd.items() if k not in _BUFFERS}
    want = expected_torch_shapes(cfg)
    check_keys(sd, want, path, "VQ config", _hint(cfg, sd))
    # The weights that pin down the widths come first in the message.
    first = ("encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight")
    order = [k for k in first if k in want] + [k for k in want if k not in first]
    bad = [f"{k} {tuple(sd[k].shape)} != expected {want[k]}" for k in order if tuple(sd[k].shape) != want[k]]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weights have the wrong shape (e.g. {'; '.join(bad[:3])}). "
                              f"{_hint(cfg, sd)}")
    if dtype is None:
        dts = {np.dtype(t.dtype) for t in sd.values()}
        np_dtype = dts.pop() if len(dts) == 1 else np.dtype(np.float32)
    else:
        if str(dtype) not in _DTYPES:
            raise CheckpointError(f"unknown --dtype {dtype!r}; use float32, float16 or bfloat16")
        np_dtype = np.dtype(_DTYPES[str(dtype)])

    def leaf(p, shape):
        x = sd[_torch_name(p)].numpy()
        check_finite(_torch_name(p), x, path)
        if getattr(p[-1], "key", None) == "kernel":
            x = np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # OIHW -> HWIO
        # fp16/bf16 -> another dtype goes through float32 (exact for widening).
        x = x if x.dtype == np_dtype else x.astype(np.float32).astype(np_dtype)
        assert x.shape == shape, (p, x.shape, shape)
        return x

    return jax.tree_util.tree_map_with_path(leaf, vq_param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def resolve_config(cfg) -> VQConfig:
    """None (VQ-16), a VQConfig, a dict of fields, a JSON file path, or a preset name."""
    if cfg is None:
        return VQ16
    if isinstance(cfg, VQConfig):
        return cfg
    if isinstance(cfg, dict):
        return VQConfig.from_dict(cfg)
    if isinstance(cfg, (str, Path)):
        s = str(cfg)
        if s.endswith(".json") or Path(s).is_file():
            return config_from_json(s)
        return preset(s)
    raise ConfigError(f"VQ config must be a VQConfig, dict, JSON path or preset name, got {type(cfg).__name__}")


def _parse_mult(ch_mult) -> tuple:
    if isinstance(ch_mult, str):
        try:
            return tuple(int(m) for m in ch_mult.replace(" ", "").split(",") if m)
        except ValueError:
            raise ConfigError(f"--ch-mult must be comma-separated integers like 1,1,2,2,4, got {ch_mult!r}") from None
    return tuple(int(m) for m in ch_mult)


def vq_arg_config(ch=None, ch_mult=None, z_channels=None, codebook_size=None, codebook_embed_dim=None,
                  preset: str = "VQ-16") -> VQConfig:
    """Build a VQConfig from CLI flags: a preset ('VQ-16' / 'VQ-8'), then any given overrides."""
    from adsa_jax.vq import preset as get_preset

    cfg = get_preset(preset)
    kw = {k: v for k, v in dict(ch=ch, z_channels=z_channels, codebook_size=codebook_size,
                                 codebook_embed_dim=codebook_embed_dim).items() if v is not None}
    if ch_mult is not None:
        kw["ch_mult"] = _parse_mult(ch_mult)
    return cfg.replace(**kw) if kw else cfg


def convert_vq(src, out, *, cfg=None, dtype=None, prefer_ema=False, overwrite=False) -> dict:
    """Read a LlamaGen VQ ``.pt`` (``{"model": sd}`` or bare), check it against cfg (default
    VQ-16), write an adsa_jax VQ directory to ``out``. dtype None keeps the stored dtype."""
    from adsa_jax.checkpoint import check_output_dir
    from adsa_jax.vq import save_vq

    cfg = resolve_config(cfg)
    check_output_dir(out, overwrite=overwrite, source=src)
    obj = load_pt(src)
    sd = extract_state_dict(obj, src, prefer_ema=prefer_ema)
    params = convert_state_dict(sd, cfg, dtype, path=src)
    save_vq(out, params, cfg, overwrite=overwrite, source=src)
    return params
