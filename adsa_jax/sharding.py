"""Sharding for batch sampling across devices and hosts (JAX's SPMD partitioner, GSPMD style).

Everything is declared once, here, by **logical axis names** mapped to mesh axes in
:data:`RULES`; weights, caches, inputs and outputs name their axes and get their
``NamedSharding`` through :func:`logical_spec`. The mesh has two axes:

- ``data``:  batch rows (images). CFG rows are interleaved ``[cond_0, uncond_0, ...]``, so with
  an even number of rows per shard an image's two rows, their KV caches and their ADSA
  selections live on one device; the slot axis of every cache is never sharded, so ADSA's
  ``lax.top_k`` over slots runs locally inside each batch shard.
- ``model``: tensor parallelism (heads and FFN hidden, Megatron style: ``wqkv``/``w1``/``w3``
  split by output, ``wo``/``w2`` by input, one all-reduce after each). KV caches follow the heads.

Meshes use ``AxisType.Auto`` axes: shardings are hints for the partitioner (inputs placed,
caches and outputs constrained with ``with_sharding_constraint``), the model code has no
sharding logic of its own. Without a mesh nothing here runs (the single-device path is unchanged).

Batch sizes that the data axis does not divide are **padded and trimmed**: the batch is padded
up to the next multiple of the data-axis size by repeating the last image's condition, and the
padding is cut from the result. Per-image keys come from the global image index, so the
padding changes no sample; the trimmed result cannot be evenly sharded and comes back
replicated (``P()``) over the mesh. Pick a multiple of the data axis to keep outputs sharded.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .config import ConfigError, GPTConfig

DATA, MODEL = "data", "model"

#: Logical axis -> mesh axis (None = replicated). The one place that decides what is split.
RULES = {
    "batch": DATA,        # images / CFG rows
    "heads": MODEL,       # attention heads: wqkv, wo, the KV cache
    "ffn": MODEL,         # FFN hidden: w1, w3, w2
    "embed": None,        # model width (activations between blocks are replicated over `model`)
    "vocab": None,
    "head_dim": None,
    "qkv": None,          # the (q, k, v) axis of wqkv
    "classes": None,
    "caption": None,      # caption feature width (t2i)
    "cond_tokens": None,  # the 120 caption positions (t2i)
    "slots": None,        # KV-cache slots: never split (ADSA top-k runs over the whole slot axis)
    "groups": MODEL,      # ADSA score groups: = heads at granularity 'head', 1 at 'layer' (then replicated)
    "features": None,     # ADSA running-sum width
    "keep": None,         # ADSA selected indices
    "lanes": None,        # adsa-evict at 'layer': |v|^2 of o, the victim and the next leaving token
    "layers": None,
    "tokens": None,       # image-token positions of the output
    "image_h": None, "image_w": None, "rgb": None,
}

#: Logical axes of each weight, by leaf name (shapes come from :func:`adsa_jax.model.param_shapes`).
PARAM_AXES = {
    "tok_embeddings": ("vocab", "embed"),
    "output": ("embed", "vocab"),
    "norm": ("embed",),
    "cls_embedding": ("classes", "embed"),
    "fc1": ("caption", "embed"),
    "fc2": ("embed", "embed"),
    "uncond": ("cond_tokens", "caption"),
    "attention_norm": ("embed",),
    "wqkv": ("embed", "qkv", "heads", "head_dim"),
    "wo": ("heads", "head_dim", "embed"),
    "ffn_norm": ("embed",),
    "w1": ("embed", "ffn"),
    "w3": ("embed", "ffn"),
    "w2": ("ffn", "embed"),
}

#: Logical axes of each KV-cache entry (see :mod:`adsa_jax.cache`).
CACHE_AXES = {
    "k": ("batch", "heads", "slots", "head_dim"),
    "v": ("batch", "heads", "slots", "head_dim"),
    "pos": ("batch", "groups", "slots"),
    "vsum": ("batch", "groups", "features"),
    "sel": ("batch", "groups", "keep"),
    "dots": ("batch", "heads", "slots"),  # ADSA score terms from the Pallas kernel (adsa-evict)
    "sq": ("batch", "heads", "slots"),
    "victim": ("batch", "heads"),  # next step's victim slot (adsa-evict as one kernel)
    "vnorm": ("batch", "heads", "slots"),  # max(|v_i|, eps) per slot (adsa-evict as one kernel)
    # adsa-evict at 'layer': every layer's victim, chosen before the layers, and |v|^2 of its layer
    # vectors (in one step's cache dicts only: Evict.begin_step to Evict.decode)
    "victims": ("layers", "batch", "groups"),
    "victims_sq": ("layers", "batch", "lanes"),
    "acc": ("batch", "heads", "slots"),  # h2o: attention accumulated per slot
}

TOKENS_AXES = ("batch", "tokens")


# ----------------------------------------------------------------------------- meshes and specs


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ``('data', 'model')`` mesh with Auto axes. Default: every visible device (all hosts
    after ``jax.distributed.initialize()``) on the data axis; ``model`` > 1 for tensor parallelism."""
    devices = list(jax.devices() if devices is None else devices)
    model = int(model)
    if model < 1:
        raise ConfigError(f"the model (tensor-parallel) axis must be >= 1, got {model}")
    if data is None:
        if len(devices) % model:
            raise ConfigError(f"{len(devices)} devices cannot be split into a model axis of {model}")
        data = len(devices) // model
    data = int(data)
    if data < 1:
        raise ConfigError(f"the data axis must be >= 1, got {data}")
    if data * model > len(devices):
        raise ConfigError(f"a {data} x {model} (data x model) mesh needs {data * model} devices; "
                          f"{len(devices)} are visible")
    devices = devices[: data * model]
    auto = (jax.sharding.AxisType.Auto,) * 2
    try:
        return jax.make_mesh((data, model), (DATA, MODEL), axis_types=auto, devices=devices)
    except Exception:  # a device subset the topology-aware builder refuses: plain row-major order
        return jax.sharding.Mesh(np.asarray(devices, dtype=object).reshape(data, model), (DATA, MODEL),
                                 axis_types=auto)


def axis_size(mesh, name: str) -> int:
    return int(dict(mesh.shape).get(name, 1))


def logical_spec(axes, rules=None, shape=None, mesh=None) -> P:
    """PartitionSpec for a tuple of logical axis names. With ``shape`` and ``mesh``, an axis whose
    size the mesh axis does not divide stays replicated (used for size-1 ADSA groups)."""
    rules = RULES if rules is None else rules
    out, used = [], set()
    for i, a in enumerate(axes):
        if a not in rules:
            raise KeyError(f"logical axis {a!r} has no rule in adsa_jax.sharding.RULES")
        m = rules[a]
        if m is not None and (m in used or (mesh is not None and m not in mesh.axis_names)):
            m = None
        if m is not None and shape is not None and mesh is not None and shape[i] % axis_size(mesh, m):
            m = None
        if m is not None:
            used.add(m)
        out.append(m)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def named(mesh, axes, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, shape=shape, mesh=mesh))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int = 1) -> NamedSharding:
    """Rows on the data axis, everything else replicated (inputs, per-image keys, tokens)."""
    return named(mesh, ("batch",) + ("tokens",) * (ndim - 1))


def tokens_sharding(mesh) -> NamedSharding:
    """The declared sharding of ``generate``'s (B, N) tokens on a mesh (B divisible by the data axis)."""
    return named(mesh, TOKENS_AXES)


# ----------------------------------------------------------------------------- weights


def _is_shape(x):
    return isinstance(x, tuple)


def param_axes(cfg: GPTConfig) -> dict:
    """The params pytree with a tuple of logical axis names per leaf (from ``param_shapes``)."""
    from .model import param_shapes

    def axes(path, shape):
        name = getattr(path[-1], "key", None)
        ax = PARAM_AXES.get(name)
        if ax is None or len(ax) != len(shape):
            raise KeyError(f"no logical axes for weight {jax.tree_util.keystr(path)} of shape {shape}; "
                           "add it to adsa_jax.sharding.PARAM_AXES")
        return ax

    return jax.tree_util.tree_map_with_path(axes, param_shapes(cfg), is_leaf=_is_shape)


def _tp_rules(tensor_parallel: bool) -> dict:
    return RULES if tensor_parallel else {**RULES, "heads": None, "ffn": None}


def check_tensor_parallel(cfg: GPTConfig, mesh):
    m = axis_size(mesh, MODEL)
    if m > 1 and (cfg.n_head % m or cfg.ffn_hidden % m):
        raise ConfigError(f"a model (tensor-parallel) axis of {m} must divide the {cfg.n_head} heads and the "
                          f"FFN hidden size {cfg.ffn_hidden}; use a model axis of "
                          f"{[d for d in range(1, m + 1) if cfg.n_head % d == 0 and cfg.ffn_hidden % d == 0]}")


def param_shardings(cfg: GPTConfig, mesh, tensor_parallel: bool | None = None) -> dict:
    """``NamedSharding`` per weight: heads and FFN hidden on the model axis when tensor parallel
    (default: when the mesh's model axis is > 1), everything else replicated."""
    tp = axis_size(mesh, MODEL) > 1 if tensor_parallel is None else bool(tensor_parallel)
    if tp:
        check_tensor_parallel(cfg, mesh)
    rules = _tp_rules(tp)
    return jax.tree.map(lambda ax: NamedSharding(mesh, logical_spec(ax, rules, mesh=mesh)), param_axes(cfg),
                        is_leaf=_is_shape)


def on_mesh(tree, mesh) -> bool:
    """True when every leaf is a jax.Array with a NamedSharding over exactly this mesh."""
    return all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
               for x in jax.tree.leaves(tree))


def put(x, sharding):
    """Place a host value (the same global value on every host) with ``sharding``: each process
    builds only its addressable shards (works multi-host; nothing goes through one device)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(put(np.asarray(jax.random.key_data(x)), sharding), impl=impl)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    arr = np.asarray(x)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def shard_params(params, cfg: GPTConfig, mesh, tensor_parallel: bool | None = None):
    """Params on the mesh; returned unchanged when they already are (any sharding over this mesh)."""
    if on_mesh(params, mesh):
        return params
    return jax.tree.map(put, params, param_shardings(cfg, mesh, tensor_parallel))


def shard_model(model, mesh, tensor_parallel: bool | None = None):
    """A :class:`adsa_jax.Model` with its params on ``mesh`` (do it once, not per ``generate`` call)."""
    from .model import Model

    return Model(model.config, shard_params(model.params, model.config, mesh, tensor_parallel))


# ----------------------------------------------------------------------------- caches


def heads_split(cache, policy=None) -> bool:
    """Whether a cache can follow the heads onto the model axis: yes unless the policy decides
    per layer and row (ADSA granularity 'layer': groups of 1 over several heads), or draws one
    random number per head (``random``: the draw for head h must not depend on how many heads
    a device holds); those keep every head of a row on one device (caches replicated over model)."""
    if getattr(policy, "chooser", None) == "random":
        return False
    g = cache.get("pos", cache.get("vsum"))
    return g is None or g.shape[1] == cache["k"].shape[1]


def cache_specs(cache, mesh, policy=None, extra=()) -> dict:
    """PartitionSpec per cache entry: rows on data, heads (and ADSA groups when they are the
    heads) on model, slots replicated. ``extra``: entries not yet in ``cache`` (the policy's
    ``step_keys``, which its begin_step adds)."""
    rules = RULES if heads_split(cache, policy) else {**RULES, "heads": None, "groups": None}
    return ({k: logical_spec(CACHE_AXES[k], rules, shape=v.shape, mesh=mesh) for k, v in cache.items()}
            | {k: logical_spec(CACHE_AXES[k], rules, mesh=mesh) for k in extra if k not in cache})


def local_rows(x):
    """(row indices, values) of the rows of a global batch-sharded array that this process holds
    (each row once: replicas over the model axis are skipped). One process: all rows."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.arange(x.shape[0]), np.asarray(x)
    idx, vals = [], []
    for sh in x.addressable_shards:
        if sh.replica_id != 0:
            continue
        rows = sh.index[0] if sh.index else slice(None)
        start, stop, _ = rows.indices(x.shape[0])
        idx.append(np.arange(start, stop))
        vals.append(np.asarray(sh.data))
    if not idx:
        return np.zeros((0,), np.int64), np.zeros((0,) + x.shape[1:], x.dtype)
    order = np.argsort(np.concatenate(idx), kind="stable")
    return np.concatenate(idx)[order], np.concatenate(vals)[order]


def to_host(x) -> np.ndarray:
    """The whole of ``x`` as a NumPy array on every process. An array with rows on other hosts'
    devices is gathered (``process_allgather``): a collective, so every process must call it."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
