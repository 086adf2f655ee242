"""Checkpoint directories: Orbax params + ``adsa_config.json`` (model config, image size, kind).

Layout of DIR::

    DIR/adsa_config.json   {"kind": "gpt", "config": {...LlamaGen ModelArgs...}, "image_size": 384, "dtype": ...}
    DIR/params/            Orbax StandardCheckpointer tree
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .config import ConfigError, GPTConfig

CONFIG_FILE = "adsa_config.json"


def _dtype(name):
    if name is None:
        return None
    try:
        return jnp.dtype({"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(name, name))
    except TypeError:
        raise ConfigError(f"unknown dtype {name!r}; use bfloat16, float16 or float32") from None


def save_tree(directory, params, meta: dict, *, overwrite: bool = False):
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {directory} exists and is not empty; pick a new --out or pass --force")
        import shutil
        shutil.rmtree(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output directory {directory}: {e}") from None
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "params", params)
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1))


def read_meta(directory) -> dict:
    directory = Path(directory)
    f = directory / CONFIG_FILE
    if not f.is_file():
        raise ConfigError(f"{directory} is not an adsa_jax checkpoint directory (no {CONFIG_FILE}); "
                          "convert a LlamaGen .pt with `adsa-jax convert gpt SRC.pt --model ... --image-size ... --out DIR`")
    return json.loads(f.read_text())


def restore_tree(directory, abstract):
    """Restore into an abstract tree of ShapeDtypeStructs (their shardings, if set, are honoured:
    each device reads only its shard; nothing is materialised whole on one device first)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(Path(directory).absolute() / "params", abstract)


def save_gpt(directory, params, cfg: GPTConfig, *, image_size: int | None = None, overwrite=False, source=None):
    dtype = str(jax.tree.leaves(params)[0].dtype)
    meta = {"kind": "gpt", "config": cfg.to_dict(), "image_size": image_size, "dtype": dtype, "source": source}
    save_tree(directory, params, meta, overwrite=overwrite)


def load(directory, dtype: str | None = "bfloat16", shardings=None, *, mesh=None, tensor_parallel: bool | None = None):
    """Load a converted GPT directory as a :class:`adsa_jax.Model`.

    dtype: compute/storage dtype ('bfloat16' default for speed, 'float32' for parity, or None
    to keep what is stored). shardings: optional pytree of ``jax.sharding.Sharding`` matching
    the params (see :mod:`adsa_jax.sharding`) to restore straight onto a mesh. mesh: a
    ``('data', 'model')`` mesh to restore onto with :func:`adsa_jax.sharding.param_shardings`
    (tensor parallel over heads and FFN hidden when ``tensor_parallel``, default: when the
    mesh's model axis is > 1; replicated otherwise). Each device reads only its shard.
    """
    from .generate import Model
    from .model import abstract_params

    meta = read_meta(directory)
    if meta.get("kind") != "gpt":
        raise ConfigError(f"{directory} holds a {meta.get('kind')!r} checkpoint, not a GPT; pass it to --vq instead")
    cfg = GPTConfig.from_dict(meta["config"])
    stored = _dtype(meta["dtype"])
    target = _dtype(dtype) or stored
    abstract = abstract_params(cfg, stored)
    if mesh is not None and shardings is None:
        from .sharding import param_shardings
        shardings = param_shardings(cfg, mesh, tensor_parallel)
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = restore_tree(directory, abstract)
    if target != stored:
        params = jax.tree.map(lambda x: x.astype(target), params)
    return Model(cfg, params)


def as_numpy_tree(params):
    return jax.tree.map(np.asarray, params)
