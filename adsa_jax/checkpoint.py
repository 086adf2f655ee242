"""Checkpoint directories: Orbax params + ``adsa_config.json`` (model config, image size, kind,
checksums) + a marker file.

Layout of DIR::

    DIR/adsa_config.json      {"kind": "gpt", "config": {...LlamaGen ModelArgs...}, "image_size": 384,
                               "dtype": ..., "source": ..., "checksums": {"config": ..., "arrays": {...}}}
    DIR/params/               Orbax StandardCheckpointer tree
    DIR/adsa_jax_marker.txt   says adsa_jax wrote DIR (``convert --force`` replaces nothing else)

``checksums.arrays`` holds every weight's shape, dtype and a 64-bit checksum of its bytes;
``checksums.config`` a checksum of the kind, the image size and each config field. Loading checks the
config's checksum, the shapes the config implies against the recorded ones (before anything is
read), then every restored array's checksum and finiteness (on the device, shard by shard, so a
sharded restore stays sharded). A directory written before checksums existed still loads, with
a warning that its weights cannot be verified (only their finiteness is checked).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .config import ConfigError, GPTConfig

CONFIG_FILE = "adsa_config.json"
MARKER = "adsa_jax_marker.txt"
# What adsa_jax (and examples/train_demo.py) write in a checkpoint directory: --force replaces a
# directory only if it holds the marker and nothing but these.
PROJECT_ENTRIES = frozenset({MARKER, CONFIG_FILE, "params", "train_log.json", "golden_tokens.npy"})
_MARKER_TEXT = ("This directory was written by adsa_jax ({config}, params/). `adsa-jax convert --force` may delete "
                "and rewrite it; it never deletes a directory that holds other files.\n").format(config=CONFIG_FILE)


def _dtype(name):
    if name is None:
        return None
    try:
        return jnp.dtype({"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(name, name))
    except TypeError:
        raise ConfigError(f"unknown dtype {name!r}; use bfloat16, float16 or float32") from None


# ----------------------------------------------------------------------------- checksums

_GOLDEN = np.uint32(0x9E3779B1)  # 2**32 / golden ratio: spreads the index bits
_CHUNK = 1 << 22


def _words(x: np.ndarray) -> np.ndarray:
    """An array's bytes as uint32 words: one per element of 1, 2 or 4 bytes, two per 8-byte one."""
    x = np.ascontiguousarray(x).reshape(-1)
    size = x.dtype.itemsize
    if size == 8:
        return x.view(np.uint32)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[size]).astype(np.uint32)


def _sums(w: np.ndarray, start: int) -> tuple[int, int]:
    """s1 = sum w_i * (2i + 1), s2 = sum (w_i ^ h_i) * (h_i | 1), h_i = i * golden, all mod 2**32.

    Any change of one word changes s1 (an odd factor is invertible mod 2**32); the sums do not
    depend on how the words are split, so a sharded device computes the same value."""
    i = np.arange(start, start + w.size, dtype=np.uint64).astype(np.uint32)
    h = i * _GOLDEN
    s1 = np.sum(w * (i * np.uint32(2) + np.uint32(1)), dtype=np.uint32)
    s2 = np.sum((w ^ h) * (h | np.uint32(1)), dtype=np.uint32)
    return int(s1), int(s2)


def array_checksum(x) -> str:
    """16 hex digits: the checksum of a host array's bytes (see :func:`_sums`)."""
    w = _words(np.asarray(x))
    s1 = s2 = 0
    for start in range(0, w.size, _CHUNK):
        a, b = _sums(w[start:start + _CHUNK], start)
        s1, s2 = (s1 + a) & 0xFFFFFFFF, (s2 + b) & 0xFFFFFFFF
    return f"{s1:08x}{s2:08x}"


@jax.jit
def _device_stats(x):
    """(s1, s2, all finite) of a device array, the same sums as :func:`array_checksum`."""
    if x.dtype.itemsize == 1 or x.dtype == jnp.bool_:
        w = x.astype(jnp.uint8).astype(jnp.uint32)
    elif x.dtype.itemsize == 2:
        w = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
        w = jax.lax.bitcast_convert_type(x, jnp.uint32)
    w = w.reshape(-1)  # (n,) in C order
    i = jax.lax.iota(jnp.uint32, w.size)
    h = i * jnp.uint32(0x9E3779B1)
    s1 = jnp.sum(w * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    s2 = jnp.sum((w ^ h) * (h | jnp.uint32(1)), dtype=jnp.uint32)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.bool_(True)
    return s1, s2, finite


def _is_float(dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))  # NumPy's own test misses bfloat16


def leaf_name(path) -> str:
    """A params-tree path as 'layers/0/wqkv'."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_stats(params) -> dict[str, tuple[str, bool]]:
    """{leaf name: (checksum, all finite)} of a params tree (device arrays on their devices,
    host arrays on the host)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    pending = {}
    out = {}
    for path, x in flat:
        name = leaf_name(path)
        if isinstance(x, jax.Array) and x.dtype.itemsize <= 4:
            pending[name] = _device_stats(x)
        else:
            a = np.asarray(x)
            out[name] = (array_checksum(a), bool(np.isfinite(a).all()) if _is_float(a.dtype) else True)
    for name, (s1, s2, fin) in jax.device_get(pending).items():
        out[name] = (f"{int(s1):08x}{int(s2):08x}", bool(fin))
    return out


def fingerprint(params) -> str:
    """One 16-hex-digit fingerprint of a whole params tree (names, shapes, dtypes and bytes)."""
    stats = tree_stats(params)
    flat = {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    h = hashlib.sha256()
    for name in sorted(stats):
        x = flat[name]
        h.update(f"{name}|{tuple(np.shape(x))}|{getattr(x, 'dtype', type(x).__name__)}|"
                 f"{stats[name][0]}\n".encode())
    return h.hexdigest()[:16]


def config_checksums(meta: dict) -> dict[str, str]:
    """A checksum of each field that decides how the weights are read: the kind, the image size
    and every config field (per field, so that an edit can be named)."""
    fields = {"kind": meta.get("kind"), "image_size": meta.get("image_size")}
    config = meta.get("config")
    fields.update({f"config.{k}": v for k, v in (config.items() if isinstance(config, dict) else ())})
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:8] for k, v in fields.items()}


def array_manifest(params) -> dict:
    """{leaf name: {"shape", "dtype", "checksum"}} of a host params tree; refuses NaN / Inf."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = leaf_name(path)
        a = np.asarray(x)
        if _is_float(a.dtype):
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            if bad:
                raise ConfigError(f"weight {name} holds {bad} NaN or infinite values; refusing to save it")
        out[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "checksum": array_checksum(a)}
    return out


# ----------------------------------------------------------------------------- writing


def check_output_dir(directory, *, overwrite: bool = False, source=None):
    """Refuse, before any work, an output directory that cannot or must not be written.

    A new or empty directory is fine. A non-empty one is replaced only with ``overwrite``, and
    only if adsa_jax wrote it (it holds :data:`MARKER` and nothing but :data:`PROJECT_ENTRIES`);
    never one that holds ``source`` (the file being converted)."""
    from .checks import check_output_dir as writable

    d = Path(directory)
    if source is not None and Path(source).exists():
        src, out = Path(source).resolve(), d.resolve()
        if src == out or out in src.parents:
            raise ConfigError(f"the output directory {directory} holds the source {source}; choose another --out")
    if d.is_symlink():
        raise ConfigError(f"the output directory {directory} is a symbolic link; give the real directory")
    if d.exists() and not d.is_dir():
        raise ConfigError(f"the output {directory} is a file, not a directory; choose another --out")
    if d.is_dir() and any(d.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {directory} exists and is not empty; pick a new --out, or pass --force "
                              "to replace a directory adsa_jax wrote")
        if not (d / MARKER).is_file():
            raise ConfigError(f"--force replaces only a directory adsa_jax wrote (it holds {MARKER}); {directory} "
                              "does not: move its files away or pick another --out")
        other = sorted(e.name for e in d.iterdir() if e.name not in PROJECT_ENTRIES)
        if other:
            raise ConfigError(f"{directory} holds files adsa_jax did not write ({', '.join(other[:4])}"
                              f"{', ...' if len(other) > 4 else ''}); --force will not delete them: move them away "
                              "or pick another --out")
    writable(d)
    if d.is_dir() and any(d.iterdir()) and not os.access(d.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot replace {directory}: its parent directory is not writable")


def save_tree(directory, params, meta: dict, *, overwrite: bool = False, source=None):
    """Write ``params`` (host arrays) and ``meta`` (+ checksums) to ``directory``.

    The new directory is written beside it and renamed into place, so a failure leaves the old
    one (if any) untouched. See :func:`check_output_dir` for what ``overwrite`` may replace."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    check_output_dir(directory, overwrite=overwrite, source=source)
    meta = dict(meta)
    meta["checksums"] = {"config": config_checksums(meta), "arrays": array_manifest(params)}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / "params", params)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        (tmp / MARKER).write_text(_MARKER_TEXT)
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
            os.replace(directory, old / "d")
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except OSError as e:
        raise ConfigError(f"cannot write {directory}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_gpt(directory, params, cfg: GPTConfig, *, image_size: int | None = None, overwrite=False, source=None):
    dtype = str(jax.tree.leaves(params)[0].dtype)
    meta = {"kind": "gpt", "config": cfg.to_dict(), "image_size": image_size, "dtype": dtype, "source": source}
    save_tree(directory, params, meta, overwrite=overwrite, source=source)


# ----------------------------------------------------------------------------- reading


def read_meta(directory) -> dict:
    """``DIR/adsa_config.json``, checked: readable JSON with a config, whose checksum (when the
    directory has checksums) matches the one written with the weights."""
    directory = Path(directory)
    f = directory / CONFIG_FILE
    if not f.is_file():
        raise ConfigError(f"{directory} is not an adsa_jax checkpoint directory (no {CONFIG_FILE}); "
                          "convert a LlamaGen .pt with `adsa-jax convert gpt SRC.pt --model ... --image-size ... --out DIR`")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read {f} ({type(e).__name__}: {e}); the checkpoint directory is damaged: "
                          "convert the checkpoint again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config", {}), dict):
        raise ConfigError(f"{f} has no valid model config (a 'config' object); the checkpoint directory is damaged: "
                          "convert the checkpoint again")
    checks = meta.get("checksums")
    if checks is not None:
        if not (isinstance(checks, dict) and isinstance(checks.get("config"), dict)
                and isinstance(checks.get("arrays"), dict)):
            raise ConfigError(f"{f}: malformed 'checksums'; the checkpoint directory is damaged: convert it again")
        now, then = config_checksums(meta), checks["config"]
        edited = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        if edited:
            raise ConfigError(f"{f}: {', '.join(edited[:4])} {'differs' if len(edited) == 1 else 'differ'} from the values the weights were converted with "
                              "(the file was edited); convert the checkpoint again with the right --model / "
                              "--image-size instead of editing the file")
    return meta


def config_from_meta(meta: dict, directory) -> GPTConfig:
    if not isinstance(meta.get("config"), dict):
        raise ConfigError(f"{Path(directory) / CONFIG_FILE} has no model config (a 'config' object); convert the "
                          "checkpoint again")
    try:
        return GPTConfig.from_dict(meta["config"])
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"{Path(directory) / CONFIG_FILE}: invalid model config ({e})") from None


def _stored_arrays(directory: Path) -> dict[str, tuple[tuple, str]]:
    """{leaf name: (shape, dtype)} as Orbax recorded them (read without reading the arrays)."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckpt:
            md = ckpt.metadata(directory / "params")
        tree = getattr(md, "item_metadata", md)
        return {leaf_name(p): (tuple(x.shape), str(x.dtype)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    except Exception as e:  # noqa: BLE001 (Orbax and TensorStore raise many types for damaged files)
        raise ConfigError(f"cannot read the weights in {directory / 'params'} ({_first_line(e)}); the checkpoint "
                          "directory is damaged or incomplete: convert the checkpoint again") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _check_shapes(directory: Path, abstract, stored: dict, where: str):
    """The shapes and dtypes the config implies against the stored ones, before reading: Orbax
    would silently reshape a weight of the same size (n_head edited, head_dim changed)."""
    want = {leaf_name(p): (tuple(x.shape), str(x.dtype)) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    bad = []
    for name in sorted(set(want) | set(stored)):
        if name not in stored:
            bad.append(f"{name} is missing from {where}")
        elif name not in want:
            bad.append(f"{name} is in {where} but not in the config's model")
        elif tuple(stored[name][0]) != want[name][0]:
            bad.append(f"{name} is {tuple(stored[name][0])} in {where}, the config needs {want[name][0]}")
        elif str(stored[name][1]) != want[name][1]:
            bad.append(f"{name} is {stored[name][1]} in {where}, {CONFIG_FILE} says {want[name][1]}")
    if bad:
        raise ConfigError(f"{directory / CONFIG_FILE}: the config does not match the weights ({'; '.join(bad[:3])}"
                          f"{'; ...' if len(bad) > 3 else ''}); convert the checkpoint again")


def restore_tree(directory, abstract):
    """Restore into an abstract tree of ShapeDtypeStructs (their shardings, if set, are honoured:
    each device reads only its shard; nothing is materialised whole on one device first), then
    verify every array's checksum (when recorded) and that it is finite."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    meta = read_meta(directory)
    recorded = (meta.get("checksums") or {}).get("arrays")
    _check_shapes(directory, abstract, _stored_arrays(directory), "the stored weights")
    if recorded is not None:
        _check_shapes(directory, abstract, {k: (v.get("shape"), v.get("dtype")) if isinstance(v, dict) else ((), "")
                                            for k, v in recorded.items()}, "its checksums")
    else:
        warnings.warn(f"{directory} has no checksums (written by an older adsa_jax): its weights cannot be verified; "
                      "convert it again to add them", stacklevel=3)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(directory / "params", abstract)
    except Exception as e:  # noqa: BLE001 (Orbax and TensorStore raise many types for damaged files)
        raise ConfigError(f"cannot read the weights in {directory / 'params'} ({_first_line(e)}); the checkpoint "
                          "directory is damaged or incomplete: convert the checkpoint again") from None
    verify(params, recorded, directory)
    return params


def verify(params, recorded: dict | None, directory):
    """Every array finite, and equal to its recorded checksum (when there is one)."""
    stats = tree_stats(params)
    for name in sorted(stats):
        checksum, finite = stats[name]
        if recorded is not None and recorded.get(name, {}).get("checksum") not in (None, checksum):
            raise ConfigError(f"{directory}: weight {name} does not match its checksum (the files under params/ "
                              "are corrupt: flipped bytes or a partial copy); convert the checkpoint again")
        if not finite:
            raise ConfigError(f"{directory}: weight {name} holds NaN or infinite values; the checkpoint is corrupt "
                              "and would sample garbage")


def load(directory, dtype: str | None = "bfloat16", shardings=None, *, mesh=None, tensor_parallel: bool | None = None):
    """Load a converted GPT directory as a :class:`adsa_jax.Model`.

    dtype: compute/storage dtype ('bfloat16' default for speed, 'float32' for parity, or None
    to keep what is stored). shardings: optional pytree of ``jax.sharding.Sharding`` matching
    the params (see :mod:`adsa_jax.sharding`) to restore straight onto a mesh. mesh: a
    ``('data', 'model')`` mesh to restore onto with :func:`adsa_jax.sharding.param_shardings`
    (tensor parallel over heads and FFN hidden when ``tensor_parallel``, default: when the
    mesh's model axis is > 1; replicated otherwise). Each device reads only its shard.
    Corrupt, edited or non-finite checkpoints are refused (see the module doc).
    """
    from .generate import Model
    from .model import abstract_params

    meta = read_meta(directory)
    if meta.get("kind") != "gpt":
        raise ConfigError(f"{directory} holds a {meta.get('kind')!r} checkpoint, not a GPT; pass it to --vq instead")
    cfg = config_from_meta(meta, directory)
    stored = _dtype(meta.get("dtype"))
    if stored is None:
        raise ConfigError(f"{Path(directory) / CONFIG_FILE} does not say the stored dtype; convert the checkpoint again")
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
