"""Read PyTorch ``.pt`` checkpoints without torch and without running pickled code.

A ``.pt`` file (torch >= 1.6) is a zip archive: ``<name>/data.pkl`` is a pickle of the
object tree whose tensors point, through pickle "persistent ids", at raw storages in
``<name>/data/<key>``. We unpickle with an allow-list: the handful of torch rebuild
functions, storage types and ``collections.OrderedDict`` map to local NumPy code; any
other global (``argparse.Namespace`` in LlamaGen's ``args``, optimizer classes, ...)
becomes an inert placeholder that is never called with the file's arguments. So a
malicious file cannot execute code, and real training checkpoints (which carry such
objects beside the weights) still load. torch is not needed.
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with a message saying why and what to do."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class Opaque:
    """Stands in for any non-allow-listed object in the pickle. Holds nothing executable."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        return Opaque(self.name)

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<opaque {self.name}>"


class _LazyStorage:
    """A storage's bytes, read from the archive only when a tensor uses them."""

    def __init__(self, archive: "_Archive", key: str, dtype, numel: int):
        self.archive, self.key, self.dtype, self.numel = archive, key, dtype, numel

    def array(self) -> np.ndarray:
        raw = self.archive.read(self.key)
        arr = np.frombuffer(raw, dtype=self.dtype)
        if arr.size < self.numel:
            raise CheckpointError(
                f"{self.archive.path}: storage {self.key} holds {arr.size} values, the pickle "
                f"says {self.numel}; the file is truncated or corrupt"
            )
        return arr


def _rebuild_tensor(storage, offset, size, stride, *unused):
    if not isinstance(storage, _LazyStorage):
        raise CheckpointError("malformed tensor record in checkpoint pickle")
    return LazyTensor(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class LazyTensor:
    """A tensor record: shape and dtype are known without reading its data."""

    def __init__(self, storage: _LazyStorage, offset: int, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.dtype = np.dtype(storage.dtype)

    def numpy(self) -> np.ndarray:
        base = self.storage.array()
        if not self.shape:
            return base[self.offset].copy()
        end = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n > 0)
        if end > base.size:
            raise CheckpointError("tensor extends past its storage; the checkpoint is corrupt")
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.shape, strides=tuple(s * item for s in self.stride)
        )
        return np.ascontiguousarray(view)

    def __repr__(self):
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def _rebuild_parameter(data, *unused):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Archive:
    def __init__(self, path: Path, zf: zipfile.ZipFile, prefix: str):
        self.path, self.zf, self.prefix = path, zf, prefix

    def read(self, key: str) -> bytes:
        name = f"{self.prefix}data/{key}"
        try:
            return self.zf.read(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: missing storage {name}; the file is corrupt") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{self.path}: cannot read {name} ({e}); the file is truncated or corrupt") from None


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, archive: _Archive):
        super().__init__(f)
        self.archive = archive

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        return Opaque(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self.archive.path}: unsupported persistent id in pickle")
        _, storage_type, key, _location, numel = pid[:5]
        if isinstance(storage_type, _StorageType):
            dtype = storage_type.dtype
        else:  # torch >= 2.x may record a dtype object; it arrives as an Opaque 'torch.<dtype>'
            name = getattr(storage_type, "name", str(storage_type))
            dtype = {
                "torch.float32": np.float32, "torch.float16": np.float16,
                "torch.bfloat16": ml_dtypes.bfloat16, "torch.int64": np.int64,
                "torch.float64": np.float64,
            }.get(name)
            if dtype is None:
                raise CheckpointError(f"{self.archive.path}: unsupported storage type {name}")
        return _LazyStorage(self.archive, str(key), dtype, int(numel))


def load_pt(path) -> object:
    """Unpickle a ``.pt`` file into dicts / lists / :class:`LazyTensor` (no torch needed)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the .pt file (for FSDP folders, consolidated.pth)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (expected the zip format torch.save writes since "
            "torch 1.6); it may be truncated, a different file type, or a legacy checkpoint "
            "(re-save it with a current torch: torch.save(torch.load(f), f2))"
        )
    try:
        zf = zipfile.ZipFile(path)
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise CheckpointError(f"{path}: a zip file without data.pkl is not a PyTorch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        archive = _Archive(path, zf, prefix)
        with zf.open(pkl[0]) as f:
            return _Unpickler(f, archive).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); "
                              "the file is truncated or corrupt") from None


_NOT_WEIGHTS = ("kv_cache", "freqs_cis", "causal_mask", "k_cache", "v_cache")


def extract_state_dict(obj, path, *, prefer_ema: bool = False) -> dict[str, LazyTensor]:
    """Find the weights in a checkpoint container and clean their names.

    Containers: ``{"model": sd}``, ``{"module": sd}``, ``{"state_dict": sd}``, ``{"ema": sd}``
    (used only when ``prefer_ema``) or a bare state dict. Prefixes ``module.`` and
    ``_orig_mod.`` are stripped; buffers that are not weights (KV caches, RoPE tables,
    masks) are dropped.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    order = ("ema", "model", "module", "state_dict") if prefer_ema else ("model", "module", "state_dict")
    if prefer_ema and "ema" not in obj:
        raise CheckpointError(f"{path}: --ema was asked for but the checkpoint has no 'ema' entry "
                              f"(top-level keys: {sorted(map(str, obj))[:8]})")
    sd = None
    for key in order:
        if key in obj and isinstance(obj[key], dict):
            sd = obj[key]
            break
    if sd is None:
        sd = obj  # bare state dict (LlamaGen's FSDP consolidated.pth)
    out = {}
    for name, value in sd.items():
        name = str(name)
        for prefix in ("_orig_mod.", "module."):
            while name.startswith(prefix):
                name = name[len(prefix):]
        name = name.replace("._orig_mod.", ".")
        if name.split(".")[-1] in _NOT_WEIGHTS:
            continue
        if not isinstance(value, LazyTensor):
            continue  # non-tensor entries (step counters and the like) are not weights
        out[name] = value
    if not out:
        raise CheckpointError(
            f"{path}: no tensors found (top-level keys: {sorted(map(str, obj))[:8]}); expected a state "
            "dict, bare or under 'model', 'module', 'state_dict' or 'ema'"
        )
    return out


def check_keys(sd: dict, want: dict, path, what: str, hint: str):
    """Strict key matching: raise one error naming missing and unexpected weights and the likely cause."""
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        msg = []
        if missing:
            msg.append(f"{len(missing)} missing weights (e.g. {', '.join(missing[:4])})")
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected weights (e.g. {', '.join(unexpected[:4])})")
        raise CheckpointError(f"{path}: does not match the {what}: {'; '.join(msg)}. {hint}")
