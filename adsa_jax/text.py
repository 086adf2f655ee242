"""Text conditioning for t2i models: prompts -> T5 caption features, as LlamaGen's sampler builds them.

The encoder is the ``transformers`` T5 encoder (flan-t5-xl for the released models) loaded from a
local Hugging Face model directory; ``transformers`` and ``torch`` are the optional extra ``t5``
(``pip install "adsa-jax[t5]"``). Nothing is downloaded: the tokenizer and weights are read from
that directory only (``local_files_only=True``).

What :func:`encode_prompts` reproduces (LlamaGen ``T5Embedder.get_text_embeddings`` followed by
``sample_t2i.py``):

- tokenizer from the same folder, ``max_length=120``, ``padding='max_length'``, ``truncation=True``,
  ``add_special_tokens=True`` (the EOS ``</s>`` is appended, and kept when a prompt is truncated);
- the encoder is called with the attention mask; the features are ``last_hidden_state``;
- left padding (default): with ``n`` valid tokens the rows are rotated so the valid ones come last
  (``emb[n:]`` then ``emb[:n]``), the mask is reversed, and the features are multiplied by the mask,
  so padded rows are exact zeros.

Decisions:

- **Long prompts** (more than 120 tokens with the EOS): truncated to 119 tokens + EOS, as LlamaGen
  does, with a ``UserWarning`` naming the prompts and their token counts (LlamaGen truncates
  silently). ``on_long="error"`` raises instead.
- **No text cleaning.** LlamaGen runs the DeepFloyd-IF / PixArt caption-cleaning routine (twice) on
  every prompt; training captions were cleaned the same way (lower-cased; URLs, HTML, @handles,
  CJK text, IPs, file names, long digit runs removed; quotes and dashes normalised; whitespace
  collapsed). We do not copy that routine and apply no normalisation: prompts are tokenised
  exactly as given. For plain, lower-case English prompts this makes no difference; text with
  capitals, URLs, HTML or unusual punctuation is encoded differently from what the model saw in
  training (it still runs, the features are just slightly out of distribution). Clean or
  lower-case prompts yourself if you want to be closer to LlamaGen.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .config import ConfigError

MAX_LENGTH = 120
INSTALL_HINT = ('text prompts need the optional T5 extra (transformers and torch): '
                'pip install "adsa-jax[t5]"  (or: pip install "transformers>=4.40" torch); '
                'precomputed features (--caption-embs FILE.npz) work without it')
_DTYPES = ("float32", "bfloat16", "float16")


class T5NotInstalledError(ImportError):
    """transformers / torch are missing; the message says what to install."""


def resolve_t5_path(t5_path) -> Path:
    """The T5 model directory: ``t5_path`` itself, or ``t5_path/flan-t5-xl`` (LlamaGen's ``--t5-path``
    layout). It must hold ``config.json``; a missing or invalid path is a ConfigError."""
    if t5_path is None or str(t5_path) == "":
        raise ConfigError("text prompts need the T5 encoder: pass --t5 PATH (a local Hugging Face model "
                          "directory such as flan-t5-xl, with config.json, tokenizer and weights)")
    p = Path(t5_path).expanduser()
    if not p.exists():
        raise ConfigError(f"T5 encoder directory not found: {p} (expected a local Hugging Face model "
                          "directory such as flan-t5-xl, with config.json, tokenizer and weights)")
    if not p.is_dir():
        raise ConfigError(f"T5 path {p} is not a directory; give the Hugging Face model directory "
                          "(with config.json, tokenizer and weights), not a single file")
    if (p / "config.json").is_file():
        return p
    if (p / "flan-t5-xl" / "config.json").is_file():
        return p / "flan-t5-xl"
    raise ConfigError(f"{p} is not a Hugging Face T5 model directory: no config.json in it "
                      "(nor in a flan-t5-xl subfolder)")


def t5_config(t5_path) -> dict:
    """``config.json`` of the T5 directory (cheap: no torch / transformers import)."""
    p = resolve_t5_path(t5_path)
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {p / 'config.json'}: {e}") from None
    if not isinstance(cfg, dict) or "d_model" not in cfg:
        raise ConfigError(f"{p / 'config.json'} is not a T5 config (no d_model)")
    return cfg


def t5_width(t5_path) -> int:
    """Feature width (``d_model``) the encoder produces: 2048 for flan-t5-xl."""
    return int(t5_config(t5_path)["d_model"])


def _import_t5():
    try:
        import torch
        import transformers
        from transformers import AutoTokenizer, T5EncoderModel
    except ImportError as e:
        raise T5NotInstalledError(f"{INSTALL_HINT} (import failed: {e})") from e
    return torch, transformers, AutoTokenizer, T5EncoderModel


_CACHE: dict = {}


def load_t5(t5_path, dtype="bfloat16", device=None):
    """(tokenizer, encoder, device) from the local directory; cached per (path, dtype, device)."""
    if dtype not in _DTYPES:
        raise ConfigError(f"T5 dtype must be one of {_DTYPES}, got {dtype!r}")
    path = resolve_t5_path(t5_path)
    torch, transformers, AutoTokenizer, T5EncoderModel = _import_t5()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    key = (str(path.resolve()), dtype, str(device))
    if key in _CACHE:
        return _CACHE[key]
    tdtype = getattr(torch, dtype)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = {"dtype": tdtype} if (major, minor) >= (4, 56) else {"torch_dtype": tdtype}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        encoder = T5EncoderModel.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=True,
                                                 **dtype_kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the T5 tokenizer and encoder from {path}: {e}") from None
    encoder = encoder.to(device).eval()
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"the tokenizer in {path} has no pad token; padding='max_length' needs one")
    _CACHE.clear()  # keep at most one encoder (flan-t5-xl is ~5 GB in bf16)
    _CACHE[key] = (tokenizer, encoder, device)
    return _CACHE[key]


def release_t5():
    """Drop the cached encoder (and free its GPU memory) once the prompts are encoded."""
    had = bool(_CACHE)
    _CACHE.clear()
    if had:
        import gc
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def left_pad(embeddings, masks):
    """LlamaGen's left padding: valid rows moved to the end, mask reversed, features * mask.

    embeddings (B, L, C), masks (B, L) right-padded (1 for the first n tokens). Returns float32
    features and int32 masks."""
    emb = np.asarray(embeddings, np.float32)
    m = np.asarray(masks).astype(np.int32)
    out = np.empty_like(emb)
    for i in range(emb.shape[0]):
        n = int(m[i].sum())
        out[i] = np.concatenate([emb[i, n:], emb[i, :n]])
    new_m = m[:, ::-1].copy()
    return out * new_m[..., None].astype(np.float32), new_m


def encode_prompts(prompts, t5_path, *, max_length: int = MAX_LENGTH, left_padding: bool = True,
                   dtype: str = "bfloat16", device=None, batch_size: int = 32, on_long: str = "warn"):
    """Prompts -> (features float32 (B, max_length, d_model), masks int32 (B, max_length)).

    LlamaGen's T5 embedding followed by its sampler's left padding (see the module docstring):
    pass the result straight to ``generate(model, features, key, cond_mask=masks)``.
    dtype: the encoder's precision (LlamaGen runs it in the sampler's precision, bf16 by default).
    device: torch device (default cuda if available, else cpu). on_long: "warn" (truncate to
    max_length tokens with a warning, LlamaGen's behaviour) or "error". No text cleaning is applied.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("no prompts given")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ConfigError(f"prompts must be strings; entries {bad} are not")
    if on_long not in ("warn", "error"):
        raise ConfigError(f"on_long must be 'warn' or 'error', got {on_long!r}")
    tokenizer, encoder, device = load_t5(t5_path, dtype=dtype, device=device)
    torch = _import_t5()[0]

    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True, truncation=False)["input_ids"]]
    long = [(i, n) for i, n in enumerate(lengths) if n > max_length]
    if long:
        desc = ", ".join(f"#{i} ({n} tokens: {prompts[i][:40]!r}...)" for i, n in long[:5])
        if len(long) > 5:
            desc += f" and {len(long) - 5} more"
        msg = f"{len(long)} prompt(s) longer than {max_length} T5 tokens (EOS included): {desc}"
        if on_long == "error":
            raise ConfigError(msg)
        warnings.warn(msg + f"; truncated to the first {max_length - 1} tokens + EOS, as LlamaGen does",
                      UserWarning, stacklevel=2)

    feats, masks = [], []
    for s in range(0, len(prompts), batch_size):
        tok = tokenizer(prompts[s:s + batch_size], max_length=max_length, padding="max_length", truncation=True,
                        return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        with torch.no_grad():
            out = encoder(input_ids=tok["input_ids"].to(device),
                          attention_mask=tok["attention_mask"].to(device))["last_hidden_state"]
        feats.append(out.float().cpu().numpy())
        masks.append(tok["attention_mask"].cpu().numpy().astype(np.int32))
    feats, masks = np.concatenate(feats), np.concatenate(masks)
    if left_padding:
        return left_pad(feats, masks)
    return feats.astype(np.float32), masks


def save_caption_embs(path, embeddings, masks):
    """Write the ``.npz`` that ``adsa-jax sample --caption-embs`` reads: ``caption_embs`` float32
    (B, 120, C) (left-padded, padded rows zero) and ``emb_masks`` int32 (B, 120)."""
    emb = np.asarray(embeddings, np.float32)
    m = np.asarray(masks).astype(np.int32)
    if emb.ndim != 3 or m.shape != emb.shape[:2]:
        raise ConfigError(f"caption embeddings (B, L, C) and masks (B, L) expected, got {emb.shape} and {m.shape}")
    path = Path(path)
    with open(path, "wb") as f:  # np.savez would append .npz to a name without it
        np.savez(f, caption_embs=emb, emb_masks=m)
    return path
