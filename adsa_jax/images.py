"""Decoder output -> uint8 pixels -> PNG files, PNG grids and evaluator ``.npz`` files."""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np

from .checks import check_output_file
from .config import ConfigError


def to_uint8(images) -> np.ndarray:
    """Float images nominally in [-1, 1] -> uint8, ``uint8(clip(127.5 * x + 128, 0, 255))``.

    This is the convention of LlamaGen's evaluation scripts (``sample_c2i_ddp.py`` and the
    gradio app, inherited from DiT): the cast **truncates**, so x = 0 maps to 128 and x = -1 to
    0.5 -> 0. LlamaGen's demo PNGs (``sample_c2i.py``) go through torchvision's
    ``save_image(normalize=True, value_range=(-1, 1))`` instead, which clamps to [-1, 1], maps
    to [0, 1] and rounds ``x * 255 + 0.5``; the two differ by at most one grey level. We pick
    the evaluator's convention because the reported FIDs were computed on ``.npz`` files made
    this way, and a systematic one-level shift is enough to move FID in the second decimal.

    Works for any shape (the last axis is usually RGB); computes in float32 on the host.
    """
    x = np.asarray(images, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ConfigError("images contain NaN or inf; the decoder (or the codes fed to it) is broken")
    return np.clip(127.5 * x + 128.0, 0.0, 255.0).astype(np.uint8)


def _check_uint8(images, what="images") -> np.ndarray:
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ConfigError(f"{what} must be uint8 (N, H, W, 3); got dtype {arr.dtype}: convert with to_uint8() first")
    if arr.ndim == 3:
        arr = arr[None]  # a single image: (1, H, W, 3)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ConfigError(f"{what} must have shape (N, H, W, 3), got {arr.shape}")
    return arr


def _writable_file(path) -> Path:
    """Check, before any work is done, that ``path`` can be created; clear errors otherwise."""
    check_output_file(path)
    return Path(path)


def _save_png(arr: np.ndarray, path: Path):
    from PIL import Image

    try:
        Image.fromarray(arr).save(path, format="PNG")
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None


def make_grid(images_uint8, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 into one (rows*(H+p)+p, nrow*(W+p)+p, 3) image, torchvision
    ``make_grid`` layout (row-major, ``padding`` pixels of ``pad_value`` around every tile).
    nrow: images per row; default a near-square grid, ceil(sqrt(N))."""
    arr = _check_uint8(images_uint8)
    n, h, w, _ = arr.shape
    if n == 0:
        raise ConfigError("no images to put in a grid")
    ncol = math.ceil(math.sqrt(n)) if nrow is None else int(nrow)
    if ncol <= 0:
        raise ConfigError(f"nrow must be positive, got {nrow}")
    ncol = min(ncol, n)
    nrows = math.ceil(n / ncol)
    p = padding
    grid = np.full((nrows * (h + p) + p, ncol * (w + p) + p, 3), pad_value, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[p + r * (h + p): p + r * (h + p) + h, p + c * (w + p): p + c * (w + p) + w] = arr[i]
    return grid


def save_png_grid(images_uint8, path, nrow: int | None = None, padding: int = 2) -> Path:
    """Write the images as one PNG grid (see :func:`make_grid`). Returns the path."""
    path = _writable_file(path)
    grid = make_grid(images_uint8, nrow=nrow, padding=padding)
    _save_png(grid, path)
    return path


def save_pngs(images_uint8, out_dir, names) -> list[Path]:
    """Write one PNG per image into ``out_dir`` (created if missing, like LlamaGen's sample
    folders). names: one file name per image ('.png' appended when there is no suffix)."""
    arr = _check_uint8(images_uint8)
    names = [str(n) for n in names]
    if len(names) != arr.shape[0]:
        raise ConfigError(f"{len(names)} names for {arr.shape[0]} images")
    if len(set(names)) != len(names):
        raise ConfigError("image names must be unique (a later image would overwrite an earlier one)")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output directory {out_dir}: {e.strerror or e}") from None
    paths = []
    for img, name in zip(arr, names):
        if Path(name).name != name:
            raise ConfigError(f"image name {name!r} must be a plain file name, without directories")
        p = _writable_file(out_dir / (name if Path(name).suffix else name + ".png"))
        _save_png(img, p)
        paths.append(p)
    return paths


def save_npz(images_uint8, path, labels=None) -> Path:
    """Write the evaluator's sample file: ``arr_0`` (N, H, W, 3) uint8 (what the OpenAI
    guided-diffusion evaluator reads), and ``arr_1`` (N,) int64 labels when given.

    Written to a temporary file and renamed, so an interrupted run never leaves a truncated
    ``.npz`` that looks complete."""
    arr = _check_uint8(images_uint8)
    path = _writable_file(path)
    data = {"arr_0": arr}
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (arr.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
            raise ConfigError(f"labels must be {arr.shape[0]} integers (one per image), got shape {lab.shape} "
                              f"dtype {lab.dtype}")
        data["arr_1"] = lab.astype(np.int64)
    atomic_savez(path, **data)
    return path


def atomic_savez(path, **arrays):
    """np.savez to a temporary file renamed into place: an interrupted write never leaves a partial file."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a bare name
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
