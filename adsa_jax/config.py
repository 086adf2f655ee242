"""Frozen, hashable model configs: LlamaGen's ``ModelArgs`` fields, the named sizes, the grid."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path


# The finite mask value of every masked logit (attention, kernels, sampling): a fully masked row
# never turns into NaN. Defined here, the package's leaf module, so the kernels below the cache
# policies share it.
NEG_INF = -1e30


class ConfigError(ValueError):
    """A model or generation setting that cannot work, with the fix in the message."""


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """LlamaGen ``ModelArgs`` (same names and defaults) minus the training-only fields.

    ``block_size`` (= grid_h * grid_w image tokens) is not stored in any weight: it sets the
    2D RoPE grid and must match the image size the checkpoint was trained at.
    """

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256

    def __post_init__(self):
        if self.model_type not in ("c2i", "t2i"):
            raise ConfigError(f"model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        # Types and ranges first: a JSON config is untrusted, and n_head = 0 would divide by zero below.
        for name in ("dim", "n_layer", "n_head", "multiple_of", "vocab_size", "cls_token_num", "block_size",
                     "caption_dim", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ConfigError(f"model config field {name} must be an integer >= 1, got {v!r}")

        def finite(v):
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("norm_eps", "rope_base", "ffn_dim_multiplier"):
            v = getattr(self, name)
            if not (v is None and name == "ffn_dim_multiplier") and not (finite(v) and v > 0):
                raise ConfigError(f"model config field {name} must be a finite number > 0, got {v!r}")
        if not (finite(self.class_dropout_prob) and 0 <= self.class_dropout_prob <= 1):
            raise ConfigError(f"model config field class_dropout_prob must be in [0, 1], got {self.class_dropout_prob!r}")
        if self.dim % self.n_head:
            raise ConfigError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.n_kv_head not in (None, self.n_head):
            raise ConfigError(
                f"n_kv_head={self.n_kv_head} (grouped-query attention) is not supported: no released "
                "LlamaGen model uses it (LlamaGen's own KV cache assumes n_kv_head == n_head)"
            )
        g = math.isqrt(self.block_size)
        if g * g != self.block_size:
            raise ConfigError(f"block_size {self.block_size} must be a perfect square (grid_h * grid_w)")
        if self.model_type == "t2i" and self.cls_token_num != 120:
            raise ConfigError("t2i models need cls_token_num=120 (LlamaGen's caption length is fixed)")
        if self.head_dim % 4:
            raise ConfigError(f"head_dim {self.head_dim} must be divisible by 4 for 2D RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def num_image_tokens(self) -> int:
        return self.block_size

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def num_class_rows(self) -> int:
        # LlamaGen adds the null-class row iff class_dropout_prob > 0.
        return self.num_classes + int(self.class_dropout_prob > 0)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def replace(self, **kw) -> "GPTConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        # LlamaGen ModelArgs also has training/unused fields: accept and ignore those.
        ignored = {"initializer_range", "token_dropout_p", "attn_dropout_p", "resid_dropout_p",
                   "ffn_dropout_p", "drop_path_rate", "max_batch_size", "max_seq_len"}
        unknown = set(d) - fields - ignored
        if unknown:
            raise ConfigError(f"unknown model config fields: {sorted(unknown)}; use LlamaGen ModelArgs names")
        return cls(**{k: v for k, v in d.items() if k in fields})


# name -> (n_layer, n_head, dim), from LlamaGen's gpt.py.
NAMED_SIZES = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-1B": (22, 32, 2048),
    "GPT-3B": (24, 32, 3200),
    "GPT-7B": (32, 32, 4096),
}


def grid_for_image_size(image_size: int, downsample: int = 16) -> int:
    if image_size <= 0 or image_size % downsample:
        raise ConfigError(f"image size {image_size} is not a positive multiple of the VQ downsample {downsample}")
    return image_size // downsample


def named_config(name: str, *, image_size: int = 256, model_type: str = "c2i", downsample: int = 16,
                 **overrides) -> GPTConfig:
    """A named LlamaGen size (GPT-B ... GPT-7B) at an image size (sets the RoPE grid)."""
    key = name if name.upper().startswith("GPT-") else f"GPT-{name}"
    key = "GPT-" + key[4:].upper()
    if key not in NAMED_SIZES:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(NAMED_SIZES)} or a JSON file")
    n_layer, n_head, dim = NAMED_SIZES[key]
    g = grid_for_image_size(image_size, downsample)
    kw = dict(n_layer=n_layer, n_head=n_head, dim=dim, model_type=model_type, block_size=g * g,
              cls_token_num=120 if model_type == "t2i" else 1)
    kw.update(overrides)
    return GPTConfig(**kw)


def is_config_file(model: str) -> bool:
    """Whether a ``--model`` value names a JSON config file (existing or not) rather than a size."""
    return str(model).endswith(".json") or Path(model).is_file()


def config_from_arg(model: str, *, image_size: int | None, model_type: str = "c2i") -> GPTConfig:
    """``--model`` value: a named size or a JSON file of LlamaGen ``ModelArgs`` fields."""
    p = Path(model)
    if is_config_file(model):
        if not p.is_file():
            raise ConfigError(f"model config file not found: {p}")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None
        if image_size is not None:
            d["block_size"] = grid_for_image_size(image_size) ** 2
        d.setdefault("model_type", model_type)
        return GPTConfig.from_dict(d)
    if image_size is None:
        raise ConfigError("--image-size is required with a named model: it sets the RoPE grid "
                          "(256 -> 16x16, 384 -> 24x24, 512 -> 32x32)")
    return named_config(model, image_size=image_size, model_type=model_type)
