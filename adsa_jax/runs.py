"""Large sampling runs (``adsa-jax sample --num-samples 50000 --npz OUT.npz``): batches -> part
files -> one ``.npz``; resumable, and multi-host.

Layout, next to the output ``OUT.npz``::

    OUT.parts/run.json                 settings of the run (a resume must match them)
    OUT.parts/part-00000.npz           batch 0: ids (global image indices), tokens, labels, [images]
    OUT.parts/part-00001.p003.npz      batch 1 as written by process 3 of a multi-host run (its rows)

- The run is a fixed list of batches ``[k * batch_size, (k + 1) * batch_size)``. Each finished
  batch is written to a temporary file and renamed, so a part that exists is complete. On
  restart the batches whose parts exist and check out are skipped: what is written stays
  written. A process killed at any point (``kill -9``) resumes to the same output.
- ``run.json`` records everything that decides the pixels: the key, the settings, a
  fingerprint of the GPT's and the tokenizer's weights, the dtype, the platform, device count
  and mesh, and the jax version. A resume that differs in any of them is refused, naming it,
  so one output never mixes two runs.
- Every part carries the run's id and a SHA-256 of its arrays; its image ids must be exactly
  its batch's. On resume a part that fails (corrupt, foreign, wrong ids) is named and sampled
  again; the merge refuses it, naming the file.
- Image i always uses the key ``fold_in(key(seed), i)``, so its key does not depend on the
  batch size, the device count, the host count or where the run was resumed.
- When every batch is done the parts are merged into ``OUT.npz`` (``arr_0``: uint8 images
  (N, H, W, 3) with a tokenizer, else int32 tokens (N, h*w); ``arr_1``: int64 labels for c2i).
  The parts are kept (delete ``OUT.parts`` once ``OUT.npz`` is there).
- Several hosts (``jax.process_count() > 1``): every batch is one global SPMD batch over all
  hosts' devices; each host writes the rows its devices hold to its own parts
  (``.pNNN.npz``); a batch is skipped only when every host has its part. Process 0 merges when
  it can see every part (shared file system); otherwise copy all ``OUT.parts`` directories
  into one and run ``adsa-jax merge OUT.npz``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .config import ConfigError

MANIFEST = "run.json"


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def parts_dir(out) -> Path:
    """``OUT.npz`` -> ``OUT.parts`` (the work directory next to the output)."""
    out = Path(out)
    return out.with_suffix(".parts") if out.suffix == ".npz" else out.with_name(out.name + ".parts")


def part_path(work: Path, batch: int, process_index: int = 0, process_count: int = 1) -> Path:
    suffix = "" if process_count == 1 else f".p{process_index:03d}"
    return Path(work) / f"part-{batch:05d}{suffix}.npz"


def digest(x) -> str:
    """A short fingerprint of the conditions (class ids, or a sample of caption features)."""
    a = np.ascontiguousarray(np.asarray(x))
    h = hashlib.sha256(str((a.shape, a.dtype.str)).encode())
    if a.nbytes <= 1 << 28:
        h.update(a.tobytes())
    else:  # huge caption arrays: first, middle and last rows
        for i in (0, a.shape[0] // 2, a.shape[0] - 1):
            h.update(np.ascontiguousarray(a[i]).tobytes())
    return h.hexdigest()[:16]


from .images import atomic_savez as _atomic_savez  # noqa: E402  (one atomic writer)

_PART_ARRAYS = ("ids", "tokens", "labels", "images")


def run_id(settings: dict) -> str:
    """The id every part of a run carries: a hash of its ``run.json`` settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def part_checksum(arrays: dict) -> str:
    """SHA-256 of a part's arrays (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name in _PART_ARRAYS:
        if name in arrays:
            a = np.ascontiguousarray(arrays[name])
            h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def write_part(path: Path, run: str, **arrays):
    """A part file: its arrays, the run's id and their checksum (written atomically)."""
    _atomic_savez(path, run=np.asarray(run), checksum=np.asarray(part_checksum(arrays)), **arrays)


def _batch_of(path: Path):
    """part-00012.npz / part-00012.p003.npz -> 12, or None for another name."""
    stem = path.name[len("part-"):-len(".npz")] if path.name.startswith("part-") and path.name.endswith(".npz") else ""
    head = stem.split(".")[0]
    return int(head) if head.isdigit() else None


def check_part(path: Path, settings: dict, batch: int | None = None) -> str | None:
    """Why ``path`` is not a good part of the run ``settings`` (None when it is): unreadable,
    another run's, its checksum wrong, or image ids other than its batch's."""
    batch = _batch_of(path) if batch is None else batch
    if batch is None:
        return "its name is not part-NNNNN[.pNNN].npz"
    n, bs = int(settings["num_samples"]), int(settings["batch_size"])
    s, e = batch * bs, min(n, (batch + 1) * bs)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except Exception as ex:  # noqa: BLE001 (a damaged npz raises many types)
        return f"it cannot be read ({type(ex).__name__}: {str(ex).splitlines()[0][:120] if str(ex) else ''})"
    for key in ("run", "checksum", "ids", "tokens"):
        if key not in arrays:
            return f"it has no '{key}' entry (not a part of this version's runs)"
    if str(arrays["run"]) != run_id(settings):
        return "it belongs to another run (its run id differs from run.json's)"
    if str(arrays["checksum"]) != part_checksum(arrays):
        return "its checksum does not match its arrays (the file is corrupt)"
    ids = arrays["ids"]
    if s >= e or ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        return f"batch {batch} is not in this run, or its ids are malformed"
    if len(np.unique(ids)) != len(ids) or (len(ids) and (ids.min() < s or ids.max() >= e)):
        return f"its image ids are not those of batch {batch} ({s}..{e - 1})"
    if int(settings.get("processes", 1)) == 1 and not np.array_equal(ids, np.arange(s, e)):
        return f"its image ids are not those of batch {batch} ({s}..{e - 1})"
    if arrays["tokens"].shape[:1] != ids.shape or (settings.get("images") and (
            "images" not in arrays or arrays["images"].shape[:1] != ids.shape)):
        return "its arrays do not match its ids"
    return None


def check_manifest(work: Path, settings: dict, write: bool = True):
    """Write ``run.json`` (when ``write``), or check that an existing one matches ``settings``."""
    f = work / MANIFEST
    settings = json.loads(json.dumps(settings))  # normalise (tuples -> lists)
    if f.is_file():
        old = read_manifest(work)
        diff = [f"{k}: {_short(old.get(k))} (before) != {_short(settings.get(k))} (now)"
                for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diff:
            raise ConfigError(f"{work} holds parts of a run with other settings ({'; '.join(diff[:4])}); "
                              "rerun with the same settings to resume, or delete that directory / choose another output")
        return
    if not write:
        return
    tmp = f.with_name(f.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, f)


def _short(x) -> str:
    text = json.dumps(x, sort_keys=True)
    return text if len(text) <= 160 else text[:150] + "...}"


def read_manifest(work: Path) -> dict:
    f = Path(work) / MANIFEST
    if not f.is_file():
        raise ConfigError(f"{work} is not a sampling work directory (no {MANIFEST})")
    try:
        settings = json.loads(f.read_text())
        int(settings["num_samples"]), int(settings["batch_size"])
        return settings
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read {f} ({type(e).__name__}: {e}); delete {work} and start the run again") from None


def run_settings(model, key, *, vq=None, mesh=None, gen_kw=None) -> dict:
    """What decides the pixels besides the conditions and the batching: the key, the generate
    arguments, fingerprints of the weights, the dtype, the platform, device count and mesh (bf16
    reductions may change with them), the jax version."""
    import jax

    from .checkpoint import fingerprint

    def plain(v):
        return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)

    dev = jax.devices()[0]
    return {
        "key": np.asarray(jax.random.key_data(key)).tolist() if jax.dtypes.issubdtype(
            getattr(key, "dtype", None), jax.dtypes.prng_key) else np.asarray(key).tolist(),
        "generate": {k: plain(v) for k, v in sorted((gen_kw or {}).items())},
        "weights": {"gpt": fingerprint(model.params), "vq": None if vq is None else fingerprint(vq.params)},
        "model_dtype": str(getattr(model, "dtype", None)),
        "devices": {"platform": jax.default_backend(), "kind": dev.device_kind, "count": jax.device_count(),
                    "processes": jax.process_count(), "mesh": None if mesh is None else
                    {str(k): int(v) for k, v in dict(mesh.shape).items()}},
        "jax": jax.__version__,
    }


def _fmt_time(s):
    if not np.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """One line per batch on stderr: images done, images/s (after the first, compiling, batch), ETA."""

    def __init__(self, total, done, log=_log, enabled=True):
        self.total, self.done, self.log, self.enabled = total, done, log, enabled
        self.t0 = time.perf_counter()
        self.t_first = None
        self.n_first = 0
        self.n_this_run = 0

    def update(self, n_images, note=""):
        now = time.perf_counter()
        self.done += n_images
        self.n_this_run += n_images
        if self.t_first is None:  # the first batch includes compilation: measure from its end
            self.t_first, self.n_first = now, self.n_this_run
            rate = self.n_this_run / max(now - self.t0, 1e-9)
        else:
            rate = (self.n_this_run - self.n_first) / max(now - self.t_first, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        if self.enabled:
            self.log(f"[{self.done}/{self.total}] {100 * self.done / self.total:5.1f}%  {rate:.2f} images/s  "
                     f"ETA {_fmt_time(eta)}{'  ' + note if note else ''}")


class _LocalDecoder:
    """VQ decoding of a host's token rows on its own devices, always ``per_device`` images per
    device per call (the last chunk padded). Decoder numerics can depend on the batch shape
    (a pixel's uint8 truncation may move by one level), so a fixed per-device shape keeps the
    pixels of an image independent of the batch size, the device count and the resume point."""

    def __init__(self, vq, per_device: int = 4):
        import jax

        self.vq, self.mesh, self.rows = vq, None, None
        devices = jax.local_devices()
        if len(devices) > 1:
            from jax.sharding import NamedSharding, PartitionSpec as P

            from .sharding import make_mesh
            from .vq import VQModel

            self.mesh = make_mesh(devices=devices)
            self.vq = VQModel(vq.config, jax.device_put(vq.params, NamedSharding(self.mesh, P())))
            self.rows = NamedSharding(self.mesh, P("data"))
        self.chunk = int(per_device) * len(devices)

    def __call__(self, tokens):
        import jax

        from .images import to_uint8
        from .vq import decode_codes

        out = []
        for s in range(0, tokens.shape[0], self.chunk):
            part = tokens[s:s + self.chunk]
            x = np.concatenate([part, np.repeat(part[-1:], self.chunk - len(part), axis=0)])
            x = x if self.rows is None else jax.device_put(x, self.rows)
            out.append(to_uint8(np.asarray(decode_codes(self.vq, x)))[:len(part)])
        return np.concatenate(out)


def sample_to_npz(model, cond, key, out, *, batch_size: int, cond_mask=None, labels=None, vq=None, mesh=None,
                  max_batches: int | None = None, settings: dict | None = None, merge_when_done: bool = True,
                  vq_batch: int = 4, log=_log, **gen_kw):
    """Sample ``len(cond)`` images in batches into ``OUT.parts``, resuming, then merge into ``out``.

    cond: (N,) class ids or (N, 120, C) caption features (with cond_mask); key: the run's key
    (image i uses fold_in(key, i)); labels: (N,) ints stored as ``arr_1``; vq: a VQModel to
    store images (else tokens); mesh: split every batch over it (``None``: one device);
    max_batches: stop after this many new batches (an interruption, for tests and time-boxed
    jobs); vq_batch: images per device per VQ decode call (fixed, so pixels do not depend on
    the batch size or device count); settings: JSON-able description of the run that a resume
    must match; gen_kw: the other ``generate`` keyword arguments (``sampling``, ``policy``,
    ``options``). Returns the merged path, or None when the run stopped early (max_batches) or
    on processes other than 0; raises :class:`MissingParts` (a ConfigError) when process 0
    cannot see every host's parts.
    """
    import jax

    from .generate import generate

    out = Path(out)
    n = int(np.shape(cond)[0])
    bs = int(batch_size)
    if n < 1 or bs < 1:
        raise ConfigError(f"need at least one image and a batch size >= 1, got {n} images, batch size {bs}")
    nb = -(-n // bs)
    pi, pc = jax.process_index(), jax.process_count()
    work = parts_dir(out)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the work directory {work}: {e.strerror or e}") from None
    settings = dict(settings or {})
    settings.update(num_samples=n, batch_size=bs, cond=digest(cond), images=vq is not None,
                    vq_batch=int(vq_batch) if vq is not None else None, processes=pc,
                    cond_mask=None if cond_mask is None else digest(cond_mask),
                    labels=None if labels is None else digest(labels))
    settings.update(run_settings(model, key, vq=vq, mesh=mesh, gen_kw=gen_kw))
    settings = json.loads(json.dumps(settings))  # as run.json holds it
    check_manifest(work, settings, write=pi == 0)  # one writer per path: the other hosts only check it
    run = run_id(settings)
    if pc == 1:  # leftovers of a process killed while writing (never a finished part's name)
        for stale in work.glob("*.tmp*"):
            stale.unlink(missing_ok=True)

    done = np.zeros(nb, bool)
    for k in range(nb):
        p = part_path(work, k, pi, pc)
        if p.is_file():
            why = check_part(p, settings, k)
            done[k] = why is None
            if why is not None:
                log(f"{p}: {why}; sampling that batch again")
    if pc > 1:  # every host runs every batch (one SPMD program): skip only what all hosts have
        from jax.experimental import multihost_utils
        done = np.asarray(multihost_utils.process_allgather(done)).reshape(pc, nb).all(axis=0)
    sizes = np.minimum(bs, n - bs * np.arange(nb))
    todo = [k for k in range(nb) if not done[k]]
    loud = pi == 0
    if loud:
        log(f"{n} images in {nb} batches of {bs} -> {out} (work directory {work}); "
            f"{int(sizes[done].sum())} images already there, {len(todo)} batches to go")
    decoder = _LocalDecoder(vq, vq_batch) if vq is not None else None
    prog = Progress(n, int(sizes[done].sum()), log, loud)
    labels = None if labels is None else np.asarray(labels)
    for j, k in enumerate(todo):
        if max_batches is not None and j >= max_batches:
            if loud:
                log(f"stopped after {j} batches (--max-batches); run the same command again to resume")
            return None
        s, e = k * bs, min(n, (k + 1) * bs)
        # A short last batch is padded to the batch size (one compiled shape for the whole run);
        # the padding rows (ids >= e) are dropped below.
        take = np.minimum(np.arange(s, s + bs), e - 1)
        tok = generate(model, cond[take], key, cond_mask=None if cond_mask is None else cond_mask[take],
                       example_ids=np.arange(s, s + bs), mesh=mesh, **gen_kw)
        if mesh is None:
            rows, vals = np.arange(bs), np.asarray(tok)
        else:
            from .sharding import local_rows
            rows, vals = local_rows(tok)
        keep = rows < e - s
        rows, vals = rows[keep], vals[keep]
        ids = (s + rows).astype(np.int64)
        data = {"ids": ids, "tokens": vals.astype(np.int32)}
        if labels is not None:
            data["labels"] = labels[ids].astype(np.int64)
        if decoder is not None and len(ids):
            data["images"] = decoder(data["tokens"])
        write_part(part_path(work, k, pi, pc), run, **data)
        prog.update(e - s, f"batch {k + 1}/{nb}")
    if pc > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("adsa_jax: all parts written")
    if not merge_when_done or pi != 0:
        return None
    if pc == 1:
        return merge(out, log=log)  # every part was checked or written above: a failure here is an error
    try:
        return merge(out, log=log)
    except MissingParts as e:  # incomplete here: an error (a non-zero exit), with what to do
        raise MissingParts(f"{e}. Every host wrote its own parts: gather all hosts' {work.name}/ files into one "
                           f"directory and run `adsa-jax merge {out}`") from None


class MissingParts(ConfigError):
    pass


def merge(out, work=None, *, log=_log):
    """Merge ``OUT.parts/part-*.npz`` (all hosts) into ``out``; returns its path.

    ``arr_0`` = images if the run had a tokenizer, else tokens; ``arr_1`` = labels (c2i).
    Every part is checked first (:func:`check_part`): a bad one is refused, naming the file.
    Every image index 0..N-1 must be present (duplicates from re-run batches are identical
    and dropped); otherwise :class:`MissingParts` (a ConfigError: a non-zero exit)."""
    from .images import save_npz

    out = Path(out)
    work = parts_dir(out) if work is None else Path(work)
    settings = read_manifest(work)
    n = int(settings["num_samples"])
    files = sorted(work.glob("part-*.npz"))
    index = []
    for p in files:
        why = check_part(p, settings)
        if why is not None:
            raise ConfigError(f"{p}: {why}; delete it and rerun the sample command, which samples that batch again")
        with np.load(p) as z:
            index.append((p, np.asarray(z["ids"])))
    have = np.zeros(n, bool)
    for _, ids in index:
        have[ids] = True
    if not have.all():
        miss = np.nonzero(~have)[0]
        raise MissingParts(f"{work}: {len(miss)} of {n} images are missing (first: {miss[:5].tolist()}); "
                           "finish the run (rerun the sample command) or copy the other hosts' parts here")
    key = "images" if settings.get("images") else "tokens"
    arr, labs = _collect(index, n, key)
    if key == "images":
        save_npz(arr, out, labels=labs)
    else:
        data = {"arr_0": arr}
        if labs is not None:
            data["arr_1"] = labs
        _atomic_savez(out, **data)
    log(f"merged {len(files)} parts -> {out}: arr_0 {key} {arr.shape} {arr.dtype}"
        + ("" if labs is None else f", arr_1 labels ({n},)"))
    return out


def _collect(index, n, key):
    """Fill (N, ...) from [(part path, ids)]; first occurrence of each id wins."""
    arr = labs = None
    filled = np.zeros(n, bool)
    for p, ids in index:
        new = ~filled[ids]
        if not new.any():
            continue
        with np.load(p) as z:
            vals = np.asarray(z[key])
            if arr is None:
                arr = np.zeros((n,) + vals.shape[1:], vals.dtype)
                labs = np.zeros(n, np.int64) if "labels" in z else None
            arr[ids[new]] = vals[new]
            if labs is not None:
                labs[ids[new]] = np.asarray(z["labels"])[new]
        filled[ids] = True
    return arr, labs


def read_parts(out, key="tokens"):
    """(N, ...) array of one entry ('tokens', 'images') of a finished run's parts, by image index."""
    work = parts_dir(out)
    settings = read_manifest(work)
    index = []
    for p in sorted(work.glob("part-*.npz")):
        why = check_part(p, settings)
        if why is not None:
            raise ConfigError(f"{p}: {why}")
        with np.load(p) as z:
            index.append((p, np.asarray(z["ids"])))
    return _collect(index, int(settings["num_samples"]), key)[0]


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
    """``jax.distributed.initialize`` (arguments auto-detected on TPU pods, SLURM and Open MPI;
    give all three elsewhere). Must run before anything touches a device."""
    import jax

    kw = {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                process_id=process_id).items() if v is not None}
    if jax.distributed.is_initialized():  # a second command in the same process (tests, notebooks)
        have = dict(num_processes=jax.process_count(), process_id=jax.process_index())
        bad = [f"{k} {kw[k]} (initialized with {have[k]})" for k in have if k in kw and kw[k] != have[k]]
        if bad:
            raise ConfigError(f"jax.distributed is already initialized differently: {', '.join(bad)}")
        return
    jax.distributed.initialize(**kw)
    _log(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local devices, "
         f"{jax.device_count()} in all")


def mesh_from_args(data=None, model=1):
    """The CLI's mesh: None (plain single-device path) when one device is visible and no axis was
    asked for; otherwise ``make_mesh(data, model)`` over all visible devices."""
    import jax

    from .sharding import make_mesh

    if jax.device_count() == 1 and data in (None, 1) and model in (None, 1):
        return None
    return make_mesh(data=data, model=model or 1)
