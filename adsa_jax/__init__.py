"""adsa_jax: LlamaGen autoregressive image generation in JAX, with ADSA sparse KV caches."""
from .config import ConfigError, GPTConfig, named_config
from .generate import Model, forward, generate, score
from .checkpoint import load
from .cache import make_policy, POLICY_NAMES
from .options import KernelConfig, SamplingConfig, kernel_config
from . import sharding  # meshes and shardings: adsa_jax.sharding.make_mesh(...)
from .vq import VQModel, decode_codes, encode_images, load_vq
from .text import encode_prompts  # needs the optional `t5` extra only when called

__all__ = ["ConfigError", "GPTConfig", "named_config", "Model", "forward", "generate", "score", "load",
           "make_policy", "POLICY_NAMES", "SamplingConfig", "KernelConfig", "kernel_config", "sharding", "VQModel",
           "decode_codes", "encode_images", "load_vq", "encode_prompts"]
