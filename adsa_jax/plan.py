"""Ahead-of-time memory planning: which batch of which model fits one device of a slice.

:func:`memory` lowers and compiles the generate program (:func:`adsa_jax.generate.generate_program`,
on a ``('data', 'model')`` mesh) for abstract inputs (``jax.ShapeDtypeStruct`` with shardings: no
weight is allocated) and reads the compiled program's per-device memory analysis: arguments (the
weights, the conditions and the key), temporaries (the KV caches, which the program creates, and
the work buffers of a step) and outputs (the tokens). :func:`largest_batch` searches the largest
batch per device whose total fits a device's memory.

On a machine without accelerators the mesh is made of fake CPU devices
(``jax_num_cpu_devices``), and the kernels resolve as on a TPU: XLA attention, XLA eviction, a
sort for top-k (:func:`adsa_jax.options.kernel_config`). XLA:CPU computes bfloat16 dots in
float32 and keeps float32 copies of bfloat16 weights and caches, which a TPU or GPU does not;
so on a CPU the float32 program is compiled and its weights and KV-cache entries are counted at
the requested dtype: ``total = compiled(float32) - (weights + model-dtype cache entries) x
(4 - itemsize)``. Work buffers stay at their float32 size (an overestimate for bfloat16).

What a CPU compile cannot show: a TPU's own buffer assignment and fusion, and the TPU's tiled
layouts (the two minor dimensions of an array padded to tiles of (8, 128) words; a cache whose
minor dimension is head_dim 64 would take twice its bytes if the compiler kept that layout).
Compile on the target (``adsa-jax plan`` on a TPU VM runs there) before buying a slice.

Compiling every layer of a large model on a CPU takes seconds to minutes per batch size;
``layers=2`` compiles the model with 1 and 2 layers and extrapolates linearly in the layer count
(every layer holds the same weights, caches and work buffers), which tests/test_plan.py checks
against a full compile.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from .config import ConfigError, GPTConfig
from .options import SamplingConfig

#: Memory per device of common accelerators (GiB).
HBM_GIB = {"v5e": 16.0, "v4": 32.0, "v5p": 95.0, "h200": 141.0}
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Spec:
    """What to plan: a model config, a cache policy (an object from
    :func:`adsa_jax.make_policy`; None: dense), a mesh shape (data x model), the weights' dtype
    and the sampling (guidance doubles the batch rows; top-p adds a sort of the logits)."""

    config: GPTConfig
    policy: object = None
    data: int = 1
    model: int = 1
    dtype: str = "bfloat16"
    sampling: SamplingConfig = SamplingConfig()

    def __post_init__(self):
        for name in ("data", "model"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"mesh axis {name} must be an integer >= 1, got {v!r}")
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ConfigError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if not isinstance(self.sampling, SamplingConfig):
            raise ConfigError(f"sampling must be an adsa_jax.SamplingConfig, got {type(self.sampling).__name__}")
        c = self.config
        if self.model > 1 and (c.n_head % self.model or c.ffn_hidden % self.model):
            raise ConfigError(f"a model axis of {self.model} must divide the {c.n_head} heads and the FFN hidden "
                              f"size {c.ffn_hidden}")
        if self.policy is None:
            from .cache import make_policy

            object.__setattr__(self, "policy", make_policy(c, "dense"))

    @property
    def devices(self) -> int:
        return self.data * self.model

    @property
    def rows_per_image(self) -> int:
        return 2 if self.sampling.guided else 1

    def describe(self) -> str:
        c, p = self.config, self.policy
        kept = "" if p.name == "dense" else f" ({p.slots} of {c.cls_token_num + c.num_image_tokens - 1} cache slots)"
        return (f"{c.n_layer} layers x {c.dim}, {c.n_head} heads, grid {c.grid}x{c.grid}, {self.dtype}, policy "
                f"{p.name}{kept}; mesh {self.data} x {self.model} (data x model)")


def ensure_devices(n: int):
    """Make ``n`` devices visible: on a CPU host not yet started, ``n`` fake CPU devices (call it
    before anything touches a device); otherwise check that ``n`` are there."""
    try:
        if n > 1:
            jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError:  # the backend is already up: use what it has
        pass
    have = jax.device_count()
    if have < n:
        raise ConfigError(f"the mesh needs {n} devices and {have} are visible: plan in a fresh process "
                          f"(`adsa-jax plan` sets up {n} CPU devices itself) or start Python with "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")


def _per_device_bytes(shape, dtype, sharding) -> int:
    return math.prod(sharding.shard_shape(tuple(shape))) * jnp.dtype(dtype).itemsize


def declared_bytes(spec: Spec, batch: int, mesh, dtype=None, cfg: GPTConfig | None = None) -> dict:
    """Per-device bytes of what the program declares: the weights (sharded as
    :func:`adsa_jax.sharding.param_shardings`) and every layer's cache (as
    :func:`adsa_jax.sharding.cache_specs`); ``batch`` is images per device. ``kv_model_dtype``:
    the cache entries stored in the weights' dtype (K and V), the rest are int32/float32."""
    from jax.sharding import NamedSharding

    from . import sharding as S
    from .model import abstract_params

    cfg = spec.config if cfg is None else cfg
    dtype = jnp.dtype(spec.dtype if dtype is None else dtype)
    shards = S.param_shardings(cfg, mesh)
    weights = sum(_per_device_bytes(a.shape, a.dtype, s)
                  for a, s in zip(jax.tree.leaves(abstract_params(cfg, dtype)), jax.tree.leaves(shards)))
    rows = batch * spec.devices * spec.rows_per_image
    pol = spec.policy
    cache = jax.eval_shape(lambda: pol.init(rows, cfg.n_head, cfg.head_dim, dtype))
    specs = S.cache_specs(cache, mesh, pol)
    per = {k: _per_device_bytes(v.shape, v.dtype, NamedSharding(mesh, specs[k])) for k, v in cache.items()}
    model_dtype = sum(b for k, b in per.items() if cache[k].dtype == dtype)
    return {"weights": weights, "kv_cache": cfg.n_layer * sum(per.values()),
            "kv_model_dtype": cfg.n_layer * model_dtype}


def _abstract_inputs(spec: Spec, cfg: GPTConfig, batch: int, mesh, dtype):
    from . import sharding as S
    from .generate import _scalars
    from .model import abstract_params

    b = batch * spec.devices  # global batch: a multiple of the data axis
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(cfg, dtype), S.param_shardings(cfg, mesh))
    rep = S.replicated(mesh)
    if cfg.model_type == "t2i":
        cond = jax.ShapeDtypeStruct((b, cfg.cls_token_num, cfg.caption_dim), jnp.float32,
                                    sharding=S.batch_sharding(mesh, 3))
        mask = jax.ShapeDtypeStruct((b, cfg.cls_token_num), jnp.bool_, sharding=S.batch_sharding(mesh, 2))
    else:
        cond = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=S.batch_sharding(mesh, 1))
        mask = jax.ShapeDtypeStruct((b, 1), jnp.bool_, sharding=S.batch_sharding(mesh, 2))
    ids = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=S.batch_sharding(mesh, 1))
    k = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=rep)
    scalars = tuple(jax.ShapeDtypeStruct((), x.dtype, sharding=rep) for x in _scalars(spec.sampling))
    return params, cond, mask, key, ids, scalars


def _compile_one(spec: Spec, batch: int, n_layer: int, dtype) -> dict:
    """Compiled memory analysis (per device) of the program with ``n_layer`` layers."""
    from . import sharding as S
    from .generate import generate_program, with_kernels
    from .options import kernel_config

    cfg = spec.config.replace(n_layer=n_layer)
    mesh = S.make_mesh(data=spec.data, model=spec.model, devices=jax.devices()[:spec.devices])
    sampling = spec.sampling
    rows = batch * spec.devices * spec.rows_per_image
    pol = spec.policy
    kc = kernel_config(cfg, pol, rows, dtype, mesh=mesh)
    pol = with_kernels(pol, kc)
    args = _abstract_inputs(spec, cfg, batch, mesh, dtype)
    t0 = time.perf_counter()
    compiled = generate_program(kc).trace(*args, cfg=cfg, policy=pol, use_cfg=sampling.guided, kernels=kc,
                                          top_p_on=sampling.top_p_on, mesh=mesh).lower().compile()
    m = compiled.memory_analysis()
    if m is None:
        raise ConfigError(f"this backend ({jax.default_backend()}) reports no memory analysis of compiled programs")
    return {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes,
            "compile_s": time.perf_counter() - t0, "mesh": mesh}


def memory(spec: Spec, batch: int, *, layers: int | None = None) -> dict:
    """Per-device memory (bytes) of generating ``batch`` images per device (``batch x devices``
    in all) under ``spec``.

    layers: None compiles every layer; 2 compiles 1 and 2 layers and extrapolates (the module
    docstring). Returns the compiled analysis (``arguments``, ``temporaries``, ``outputs``,
    ``aliased``, of the float32 program on a CPU), what the program declares (``weights``,
    ``kv_cache``, both at ``spec.dtype``), ``total`` (at ``spec.dtype``), ``compiled_dtype`` and
    ``compile_s``."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ConfigError(f"batch (images per device) must be an integer >= 1, got {batch!r}")
    if layers not in (None, 2):
        raise ConfigError(f"layers must be None (compile every layer) or 2 (extrapolate from 1 and 2), got {layers!r}")
    ensure_devices(spec.devices)
    on_cpu = jax.default_backend() == "cpu"
    cdt = jnp.dtype(jnp.float32 if on_cpu else spec.dtype)
    L = spec.config.n_layer
    keys = ("arguments", "temporaries", "outputs", "aliased")
    if layers is None or L <= 2:
        one = _compile_one(spec, int(batch), L, cdt)
        got = {k: one[k] for k in keys}
        secs, mesh = one["compile_s"], one["mesh"]
    else:
        m1, m2 = (_compile_one(spec, int(batch), n, cdt) for n in (1, 2))
        got = {k: m1[k] + (L - 1) * (m2[k] - m1[k]) for k in keys}
        secs, mesh = m1["compile_s"] + m2["compile_s"], m2["mesh"]
    want = declared_bytes(spec, int(batch), mesh)
    total = got["arguments"] + got["temporaries"] + got["outputs"] - got["aliased"]
    if cdt != jnp.dtype(spec.dtype):  # weights and K/V at the requested dtype's size
        comp = declared_bytes(spec, int(batch), mesh, dtype=cdt)
        total -= (comp["weights"] - want["weights"]) + (comp["kv_model_dtype"] - want["kv_model_dtype"])
    return {**got, "weights": want["weights"], "kv_cache": want["kv_cache"], "total": int(total),
            "compiled_dtype": str(cdt), "compile_s": secs, "batch": int(batch)}


def largest_batch(spec: Spec, hbm_bytes, *, layers: int | None = None, limit: int = 1 << 16, log=None) -> dict:
    """The largest batch per device whose :func:`memory` total fits each of ``hbm_bytes`` (a
    number or a list of numbers; 0 where not even one image fits, ``limit`` at most), searched by
    :class:`adsa_jax.bench.BatchSearch` (doubling, then where the line through the measured
    totals meets the size, then interpolation and halving; memory grows by a nearly constant
    amount per image, so typically batches 1, 2, the prediction and its neighbour). The sizes
    share the measured batches. Returns {"largest": {hbm: batch}, "rows": {batch: memory row}}."""
    from .bench import BatchSearch

    sizes = [float(h) for h in (hbm_bytes if isinstance(hbm_bytes, (list, tuple)) else [hbm_bytes])]
    rows, known = {}, {}
    out = {}
    for h in sizes:
        search = BatchSearch(int(h), start=1, max_batch=int(limit))
        while want := search.candidates(known):
            for b in want:
                rows[b] = memory(spec, b, layers=layers)
                known[b] = rows[b]["total"]
                if log:
                    log(f"  batch {b} per device: {known[b] / GIB:.3f} GiB (compiled in {rows[b]['compile_s']:.1f} s)")
        out[h] = search.bracket(known)[0]
    return {"largest": out, "rows": rows}


def format_memory(spec: Spec, row: dict, hbm_gib=None) -> str:
    """A few lines: the per-device breakdown and whether it fits each memory size."""
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    lines = [f"{spec.describe()}; {row['batch']} images per device ({row['batch'] * spec.devices} in all)",
             f"  compiled ({row['compiled_dtype']}): arguments {g(row['arguments'])}, temporaries "
             f"{g(row['temporaries'])}, outputs {g(row['outputs'])}",
             f"  declared ({spec.dtype}): weights {g(row['weights'])}, KV cache {g(row['kv_cache'])}",
             f"  total per device ({spec.dtype}): {g(row['total'])}"]
    for name, h in _hbm_items(hbm_gib):
        lines.append(f"  {name:>10}: {'fits' if row['total'] <= h * GIB else 'does not fit'}")
    return "\n".join(lines)


def _hbm_items(hbm_gib):
    if hbm_gib is None:
        return [(f"{k} {v:g} GiB", v) for k, v in HBM_GIB.items()]
    names = {v: k for k, v in HBM_GIB.items()}
    return [(f"{names[h]} {h:g} GiB" if h in names else f"{h:g} GiB", h) for h in hbm_gib]


def parse_hbm(text: str) -> list[float]:
    """'16,32' or 'v5e,v4' or a mix -> GiB values."""
    out = []
    for part in str(text).split(","):
        p = part.strip().lower()
        if not p:
            continue
        if p in HBM_GIB:
            v = HBM_GIB[p]
        else:
            try:
                v = float(p)
            except ValueError:
                raise ConfigError(f"--hbm takes GiB numbers or names ({', '.join(HBM_GIB)}), got {part!r}") from None
            if not math.isfinite(v) or v <= 0:
                raise ConfigError(f"--hbm sizes must be positive GiB, got {part!r}")
        if v in out:  # a name and its number, or one size twice: the same row (and search) twice
            raise ConfigError(f"--hbm lists {v:g} GiB more than once ({part.strip()!r}): give each size once")
        out.append(v)
    if not out:
        raise ConfigError("--hbm needs at least one size")
    return out


def parse_mesh(text: str) -> tuple[int, int]:
    """'4x2' -> (4, 2) (data x model)."""
    try:
        d, m = (int(x) for x in str(text).lower().split("x"))
    except ValueError:
        raise ConfigError(f"--mesh must be DATAxMODEL, e.g. 4x2, got {text!r}") from None
    if d < 1 or m < 1:
        raise ConfigError(f"--mesh axes must be >= 1, got {text!r}")
    return d, m
