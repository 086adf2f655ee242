"""LlamaGen GPT ``.pt`` -> adsa_jax checkpoint directory (strict key and shape matching)."""
from __future__ import annotations

import re

import ml_dtypes
import numpy as np

from adsa_jax.config import NAMED_SIZES, ConfigError, GPTConfig, config_from_arg, is_config_file
from adsa_jax.model import param_shapes

from .torch_pickle import CheckpointError, check_finite, check_keys, extract_state_dict, load_pt

_DTYPES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16,
           "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16}


def expected_torch_shapes(cfg: GPTConfig) -> dict[str, tuple]:
    """LlamaGen state-dict names and shapes for cfg."""
    E, H, D, F, V = cfg.dim, cfg.n_head, cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size
    out = {"tok_embeddings.weight": (V, E), "norm.weight": (E,), "output.weight": (V, E)}
    if cfg.model_type == "c2i":
        out["cls_embedding.embedding_table.weight"] = (cfg.num_class_rows, E)
    else:
        out["cls_embedding.cap_proj.fc1.weight"] = (E, cfg.caption_dim)
        out["cls_embedding.cap_proj.fc2.weight"] = (E, E)
        out["cls_embedding.uncond_embedding"] = (cfg.cls_token_num, cfg.caption_dim)
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        out[p + "attention.wqkv.weight"] = (3 * H * D, E)
        out[p + "attention.wo.weight"] = (E, H * D)
        out[p + "feed_forward.w1.weight"] = (F, E)
        out[p + "feed_forward.w3.weight"] = (F, E)
        out[p + "feed_forward.w2.weight"] = (E, F)
        out[p + "attention_norm.weight"] = (E,)
        out[p + "ffn_norm.weight"] = (E,)
    return out


def _hint(cfg: GPTConfig, sd: dict) -> str:
    """Guess what the checkpoint really is, to say which --model to use."""
    hints = []
    if "tok_embeddings.weight" in sd:
        V, E = sd["tok_embeddings.weight"].shape
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
        hints.append(f"the checkpoint has dim {E}, {len(layers)} layers, vocab {V}")
    if "cls_embedding.uncond_embedding" in sd and cfg.model_type == "c2i":
        hints.append("it is a t2i checkpoint (pass --type t2i)")
    if "cls_embedding.embedding_table.weight" in sd and cfg.model_type == "t2i":
        hints.append("it is a c2i checkpoint (pass --type c2i)")
    hints.append(f"the config asks for dim {cfg.dim}, {cfg.n_layer} layers, vocab {cfg.vocab_size}")
    return "; ".join(hints) + ". Is --model the size this checkpoint was trained as?"


def convert_state_dict(sd: dict, cfg: GPTConfig, dtype=None, path="checkpoint") -> dict:
    """Map a LlamaGen GPT state dict onto the adsa_jax params tree (NumPy arrays).

    dtype None keeps the stored dtype (all tensors must share it)."""
    want = expected_torch_shapes(cfg)
    check_keys(sd, want, path, "config", _hint(cfg, sd))
    bad = [f"{k} {tuple(sd[k].shape)} != {s}" for k, s in want.items() if tuple(sd[k].shape) != s]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch: {'; '.join(bad[:4])}. {_hint(cfg, sd)}")
    if dtype is None:
        dts = {str(t.dtype) for t in sd.values()}
        if len(dts) > 1:
            raise CheckpointError(f"{path}: tensors have mixed dtypes {sorted(dts)}; pass --dtype")
        np_dtype = next(iter(sd.values())).dtype
    else:
        if str(dtype) not in _DTYPES:
            raise CheckpointError(f"unknown --dtype {dtype!r}; use float32, float16 or bfloat16")
        np_dtype = _DTYPES[str(dtype)]

    def get(name):
        x = sd[name].numpy()
        check_finite(name, x, path)
        # fp16/bf16 -> another dtype goes through float32 (exact for widening).
        return x if x.dtype == np_dtype else x.astype(np.float32).astype(np_dtype)

    E, H, D = cfg.dim, cfg.n_head, cfg.head_dim
    params = {"tok_embeddings": get("tok_embeddings.weight"), "norm": get("norm.weight"),
              "output": np.ascontiguousarray(get("output.weight").T)}
    if cfg.model_type == "c2i":
        params["cls_embedding"] = get("cls_embedding.embedding_table.weight")
    else:
        params["caption"] = {"fc1": np.ascontiguousarray(get("cls_embedding.cap_proj.fc1.weight").T),
                             "fc2": np.ascontiguousarray(get("cls_embedding.cap_proj.fc2.weight").T),
                             "uncond": get("cls_embedding.uncond_embedding")}
    layers = []
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        wqkv = get(p + "attention.wqkv.weight")  # (3*H*D, E): rows q | k | v, head-major inside
        layers.append({
            "attention_norm": get(p + "attention_norm.weight"),
            "wqkv": np.ascontiguousarray(wqkv.reshape(3, H, D, E).transpose(3, 0, 1, 2)),  # (E, 3, H, D)
            "wo": np.ascontiguousarray(get(p + "attention.wo.weight").T.reshape(H, D, E)),  # (H, D, E)
            "ffn_norm": get(p + "ffn_norm.weight"),
            "w1": np.ascontiguousarray(get(p + "feed_forward.w1.weight").T),
            "w3": np.ascontiguousarray(get(p + "feed_forward.w3.weight").T),
            "w2": np.ascontiguousarray(get(p + "feed_forward.w2.weight").T),
        })
    params["layers"] = layers
    # Belt and braces: the tree must match the model's own shape table.
    import jax
    shapes = jax.tree.map(np.shape, params)
    assert jax.tree.structure(shapes, is_leaf=lambda x: isinstance(x, tuple)) == \
        jax.tree.structure(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return params


def resolve_config(model: str, *, image_size: int | None, model_type: str | None = None) -> GPTConfig:
    """``convert gpt``'s ``--model`` / ``--image-size`` / ``--type``: a named size (its name is
    checked first, then the image size) or a JSON file of LlamaGen ``ModelArgs`` fields.
    model_type None: the JSON file's own, else 'c2i'; a ``--type`` that contradicts the file is
    an error (it used to be ignored)."""
    if model_type not in (None, "c2i", "t2i"):
        raise ConfigError(f"--type must be c2i or t2i, got {model_type!r}")
    if is_config_file(model):
        import json
        from pathlib import Path

        p = Path(model)
        if p.is_file():
            try:
                declared = json.loads(p.read_text()).get("model_type")
            except (ValueError, AttributeError, OSError):
                declared = None  # config_from_arg names the file and the JSON error
            if model_type is not None and declared is not None and declared != model_type:
                raise ConfigError(f"--type {model_type} contradicts {p}, which says model_type {declared!r}; "
                                  "leave --type out or fix the file")
        return config_from_arg(model, image_size=image_size, model_type=model_type or "c2i")
    key = "GPT-" + (model[4:] if model.upper().startswith("GPT-") else model).upper()
    if key not in NAMED_SIZES:
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(NAMED_SIZES)} or a JSON file of "
                          "LlamaGen ModelArgs fields")
    return config_from_arg(model, image_size=image_size, model_type=model_type or "c2i")


def convert_gpt(src, cfg: GPTConfig, out, *, image_size=None, dtype=None, prefer_ema=False, overwrite=False):
    """Read ``src`` (.pt), check it against ``cfg``, write an adsa_jax directory to ``out``.

    ``out`` is checked first (before the .pt is read): it must be new or empty, or, with
    ``overwrite``, a directory adsa_jax wrote (see :func:`adsa_jax.checkpoint.check_output_dir`)."""
    from adsa_jax.checkpoint import check_output_dir, save_gpt

    check_output_dir(out, overwrite=overwrite, source=src)
    obj = load_pt(src)
    sd = extract_state_dict(obj, src, prefer_ema=prefer_ema)
    params = convert_state_dict(sd, cfg, dtype, path=src)
    save_gpt(out, params, cfg, image_size=image_size, overwrite=overwrite, source=str(src))
    return params
