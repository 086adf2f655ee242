"""Argument checks at the door: every bad value gets one :class:`ConfigError` line naming the
argument (and its command-line flag) and the allowed range, before anything is compiled.

The Python API and the command line share these functions, so a value is refused the same way
on both paths. Non-finite floats are refused everywhere: ``inf`` passes ``x >= 0`` and then
samples noise.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

from .config import ConfigError

# Python argument name -> command-line flag, for the messages.
FLAGS = {
    "cfg_scale": "--cfg-scale", "cfg_interval": "--cfg-interval", "temperature": "--temperature",
    "top_k": "--top-k", "top_p": "--top-p", "num_samples": "--num-samples", "batch_size": "--batch-size",
    "seed": "--seed", "budget": "--budget", "prefix": "--prefix", "keep": "--keep", "local": "--local",
    "max_batches": "--max-batches", "num_segments": "--segments", "classes": "--classes",
    "data_parallel": "--data-parallel", "tensor_parallel": "--tensor-parallel",
    "batches": "--batch", "iters": "--iters", "compile_workers": "--compile-workers",
    "granularity": "--granularity", "period": "--period",
}

# jax.random.key keeps the low 32 bits of a seed when 64-bit mode is off (the default): seed 2**32
# would silently draw the same images as seed 0, so larger seeds are refused.
SEED_LIMIT = 2 ** 32
# Counts go to int32 arrays on the device.
INT32_LIMIT = 2 ** 31


def _label(name: str) -> str:
    flag = FLAGS.get(name)
    return f"{name} ({flag})" if flag else name


def check_real(value, name: str) -> float:
    """value as a finite float, or a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        try:  # NumPy / JAX scalars and 0-d arrays
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{_label(name)} must be a number, got {value!r}") from None
    x = float(value)
    if not math.isfinite(x):
        raise ConfigError(f"{_label(name)} must be a finite number, got {value!r}")
    return x


def _integer(value, name: str, expect: str = "an integer") -> int:
    """value as an int, or a ConfigError '<name> must be <expect>'."""
    if isinstance(value, bool):
        raise ConfigError(f"{_label(name)} must be {expect}, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    try:
        import numpy as np
        a = np.asarray(value)
        if a.shape == () and np.issubdtype(a.dtype, np.integer):
            return int(a)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{_label(name)} must be {expect}, got {value!r}")


def check_sampling_args(temperature, top_k, top_p, cfg_scale=1.0, cfg_interval=-1):
    """The sampling scalars (traced inside jit, so they are checked here, on the host)."""
    t = check_real(temperature, "temperature")
    if t < 0:
        raise ConfigError(f"{_label('temperature')} must be >= 0 (0 samples greedily), got {temperature!r}")
    expect = f"an integer in [0, {INT32_LIMIT - 1}] (0 turns it off)"
    k = _integer(top_k, "top_k", expect)
    if not 0 <= k < INT32_LIMIT:
        raise ConfigError(f"{_label('top_k')} must be {expect}, got {top_k!r}")
    p = check_real(top_p, "top_p")
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"{_label('top_p')} must be in (0, 1] (1 turns it off), got {top_p!r}")
    s = check_real(cfg_scale, "cfg_scale")
    if s < 0:
        raise ConfigError(f"{_label('cfg_scale')} must be a finite number >= 0 (<= 1 turns guidance off), "
                          f"got {cfg_scale!r}")
    i = check_real(cfg_interval, "cfg_interval")
    if i < 0 and i != -1:
        raise ConfigError(f"{_label('cfg_interval')} must be -1 (guide every token) or >= 0, got {cfg_interval!r}")


def check_count(value, name: str, minimum: int = 1, maximum: int = INT32_LIMIT - 1) -> int:
    """An integer count (number of samples, batch size, ...) in [minimum, maximum]."""
    expect = f"an integer in [{minimum}, {maximum}]"
    n = _integer(value, name, expect)
    if not minimum <= n <= maximum:
        raise ConfigError(f"{_label(name)} must be {expect}, got {value!r}")
    return n


def check_seed(seed) -> int:
    expect = "an integer in [0, 2**32 - 1] (jax keeps 32 bits of a seed: larger ones repeat smaller ones)"
    s = _integer(seed, "seed", expect)
    if not 0 <= s < SEED_LIMIT:
        raise ConfigError(f"{_label('seed')} must be {expect}, got {seed!r}")
    return s


def check_class_ids(ids, num_classes: int):
    """Integer class ids in [0, num_classes - 1] (a sequence or 1-D array)."""
    import numpy as np

    a = np.asarray(ids)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise ConfigError(f"{_label('classes')} must be integer class ids, got {ids!r}")
    if a.size == 0:
        raise ConfigError(f"{_label('classes')} must name at least one class id")
    bad = sorted({int(x) for x in a[(a < 0) | (a >= num_classes)]})
    if bad:
        raise ConfigError(f"{_label('classes')} must be in [0, {num_classes - 1}] for this model, got {bad[:8]}")
    return a.astype(np.int32)


def check_policy_sizes(budget=None, prefix=None, keep=None, local=None, tokens: int | None = None):
    """The cache sizes' own types and ranges, as (budget float, prefix, keep, local ints), None kept
    (the policy checks the sums against the model's sequence; ``tokens``, its length, for the message).
    A budget of True or '0.5' is refused: no fraction, or a typo for one."""
    of = f"of the {tokens} image tokens" if tokens is not None else "of the image tokens"
    if budget is not None:
        if isinstance(budget, (bool, str, bytes)):
            raise ConfigError(f"{_label('budget')} must be a number, a fraction in (0, 1] {of}, got {budget!r}")
        b = check_real(budget, "budget")
        if not 0 < b <= 1:
            raise ConfigError(f"{_label('budget')} must be a fraction in (0, 1] {of}, got {budget!r}")
        budget = b
    prefix, keep, local = (v if v is None else check_count(v, name, minimum=1 if name == "local" else 0)
                           for name, v in (("prefix", prefix), ("keep", keep), ("local", local)))
    return budget, prefix, keep, local


def check_granularity(granularity) -> str:
    """'head' or 'layer' (a cache policy's scoring granularity), or a ConfigError naming it."""
    if granularity not in ("head", "layer"):
        raise ConfigError(f"{_label('granularity')} must be 'head' or 'layer', got {granularity!r}")
    return granularity


def check_period(period) -> int:
    """An eviction period s: an integer >= 1 (bool and float refused), or a ConfigError naming it."""
    if isinstance(period, bool) or not isinstance(period, numbers.Integral) or period < 1:
        raise ConfigError(f"{_label('period')} must be an integer >= 1 (steps between evictions), got {period!r}")
    return int(period)


def check_output_file(path, *, create_dirs: bool = False, flag: str | None = None) -> None:
    """Fail now, not after a long run, if ``path`` (a file to write) cannot be written.

    create_dirs: missing parent directories will be made (the nearest existing one must be a
    writable directory). flag: the command-line flag, for the message."""
    if path is None:
        return
    what = f"{flag} {path}" if flag else str(path)
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"cannot write {what}: it is a directory; give a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(f"cannot write {what}: the file is not writable")
    _check_parent(what, p.absolute().parent, create_dirs)


def check_output_dir(path, *, create: bool = True, flag: str | None = None) -> None:
    """Fail now if ``path`` (a directory to write files into) cannot be made or written."""
    if path is None:
        return
    what = f"{flag} {path}" if flag else str(path)
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"cannot write into {what}: it is a file, not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write into {what}: the directory is not writable")
        return
    _check_parent(what, p.absolute().parent, create)


def _check_parent(what: str, parent: Path, create: bool):
    if create:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise ConfigError(f"cannot write {what}: {parent} {why}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {what}: directory {parent} is not writable")


def check_sample_args(*, num_samples=None, batch_size=None, max_batches=None, num_segments=None,
                      data_parallel=None, tensor_parallel=None, seed=0, temperature=1.0, top_k=0, top_p=1.0,
                      cfg_scale=1.0, cfg_interval=-1, budget=None, prefix=None, keep=None, local=None,
                      out=None, tokens_out=None, out_dir=None, npz=None) -> None:
    """Every number and output path of a sampling run (``adsa-jax sample``), before a checkpoint
    is read or anything is compiled: a long run never fails at its end.

    None means "not given" (the command chooses it later) and is not checked; a sampling scalar
    left None is checked as its neutral value. out / tokens_out / npz: files to write (npz's
    directories are made: its work directory goes next to it); out_dir: a directory to write into.
    """
    for name, v in (("num_samples", num_samples), ("batch_size", batch_size), ("max_batches", max_batches),
                    ("num_segments", num_segments), ("data_parallel", data_parallel),
                    ("tensor_parallel", tensor_parallel)):
        if v is not None:
            check_count(v, name)
    check_seed(0 if seed is None else seed)
    check_sampling_args(1.0 if temperature is None else temperature, 0 if top_k is None else top_k,
                        1.0 if top_p is None else top_p, 1.0 if cfg_scale is None else cfg_scale,
                        -1 if cfg_interval is None else cfg_interval)
    check_policy_sizes(budget, prefix, keep, local)
    check_output_file(out, flag="--out")
    check_output_file(tokens_out, flag="--tokens-out")
    check_output_dir(out_dir, flag="--out-dir")
    check_output_file(npz, create_dirs=True, flag="--npz")
