"""Fuzzing the checkpoint reader and converters with mutated copies of the fixture checkpoints.

A seeded mutator makes ``FUZZ_CASES`` files (1,000 per CI run; more with ADSA_FUZZ_CASES=N,
another seed with ADSA_FUZZ_SEED=S) from tests/data/gpt_c2i_small.pt (float32) and
tests/data/vq_small.pt (float16), and runs each through the converter's parse-and-map stage
(``load_pt`` -> ``extract_state_dict`` -> ``convert_state_dict``: everything but the Orbax
write; no JAX compile). Mutations:

- raw bytes (the zip's CRC-32 left as it is): bit flips, truncations, runs of random or zero
  bytes, half of them aimed at the zip headers, the central directory and the pickle;
- edited records (the archive rewritten with correct CRCs, as a crafted file would be): bit
  flips, byte edits, truncations and spliced segments of data.pkl; integers of the tensor
  records (offsets, sizes, strides, storage sizes) set to edge values; strings (names, storage
  keys) replaced; storages truncated, extended, swapped, recompressed; entries dropped or
  doubled; the byte order changed.

Each case must, within ``CASE_SECONDS``: convert to exactly the fixture's result, or fail with
one ``ConfigError`` line naming the file. A raw mutation may do nothing else (the CRC catches
changed bytes). An edited record may also describe another valid tensor of the same file: then
every value must be one of the values the file's storages hold (nothing read outside the
file). The cases run in a child process, so a crash is reported with the case that caused it.
"""
from __future__ import annotations

import io
import json
import os
import pickletools
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
FUZZ_CASES = int(os.environ.get("ADSA_FUZZ_CASES", "1000"))
FUZZ_SEED = int(os.environ.get("ADSA_FUZZ_SEED", "27"))
CASE_SECONDS = 2.0
TARGETS = (("gpt_c2i_small", 0.6), ("vq_small", 0.4))  # fixture, share of the cases
EDGE_INTS = (0, 1, -1, 2, 3, 255, 256, 65535, 65536, 2**31 - 1, -2**31, 2**32, 2**62, -2**62, 2**63 - 1)


# ----------------------------------------------------------------------------- the mutator


class Fixture:
    def __init__(self, name: str):
        self.name = name
        self.path = DATA / f"{name}.pt"
        self.raw = self.path.read_bytes()
        with zipfile.ZipFile(io.BytesIO(self.raw)) as z:
            self.infos = z.infolist()
            self.members = {i.filename: z.read(i.filename) for i in self.infos}
            # byte ranges of the zip's own structure: local headers, the pickle, the central directory
            self.structure = []
            for i in self.infos:
                start = i.header_offset
                data = start + 30 + len(i.filename.encode()) + len(i.extra)
                self.structure.append((start, data + (i.compress_size if i.filename.endswith("data.pkl") else 0)))
            eocd = self.raw.rfind(b"PK\x05\x06")  # the end record names where the central directory starts
            cd = struct.unpack("<I", self.raw[eocd + 16:eocd + 20])[0]
            self.structure.append((cd if cd < eocd else eocd, len(self.raw)))
        for data in self.members.values():
            _CRC[id(data)] = zlib.crc32(data)
        self.pkl_name = next(n for n in self.members if n.endswith("data.pkl"))
        self.pkl = self.members[self.pkl_name]
        self.ops = list(pickletools.genops(self.pkl))
        ends = [pos for _, _, pos in self.ops[1:]] + [len(self.pkl)]
        self.ints = [(pos, end, arg) for (op, arg, pos), end in zip(self.ops, ends)
                     if op.name in ("BININT", "BININT1", "BININT2", "LONG1")]
        self.strings = [(pos, end, arg) for (op, arg, pos), end in zip(self.ops, ends)
                        if op.name in ("BINUNICODE", "SHORT_BINUNICODE")]
        self.storages = [n for n in self.members if "/data/" in n]

    def position(self, rng) -> int:
        if rng.random() < 0.5:
            return int(rng.integers(len(self.raw)))
        a, b = self.structure[int(rng.integers(len(self.structure)))]
        return int(rng.integers(a, max(a + 1, b)))


_CRC: dict[int, int] = {}  # id(bytes of a fixture member) -> CRC-32 (the fixtures keep them alive)


def _zip(members: dict, order=None, compress=()) -> bytes:
    """A zip archive of members (stored, or raw-deflated for names in compress), written here
    rather than with zipfile: only changed members are checksummed again."""
    parts, central, offset = [], [], 0
    for name in (order or list(members)):
        data, enc = members[name], name.encode()
        crc = _CRC.get(id(data))
        if crc is None or name in compress:
            crc = zlib.crc32(data)
        method, body = 0, data
        if name in compress:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            method, body = 8, c.compress(data) + c.flush()
        head = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(body), len(data), len(enc), 0)
        central.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(body), len(data),
                                   len(enc), 0, 0, 0, 0, 0, offset) + enc)
        parts += [head, enc, body]
        offset += len(head) + len(enc) + len(body)
    cd = b"".join(central)
    n = len(central)
    return b"".join(parts) + cd + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(cd), offset, 0)


def _pack_int(v: int) -> bytes:
    if -2**31 <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    return b"\x8a\x08" + v.to_bytes(8, "little", signed=True)


def mutate(fx: Fixture, rng) -> tuple[str, str, bytes]:
    """(family, kind, bytes): family 'raw' keeps the zip's CRCs, 'edit' rewrites them."""
    kind = str(rng.choice(["flip", "truncate", "garbage", "zero", "pkl-flip", "pkl-byte", "pkl-truncate",
                           "pkl-splice", "record", "record", "record", "string", "storage-size", "storage-swap",
                           "compress", "drop-entry", "dup-entry", "byteorder"]))
    raw = bytearray(fx.raw)
    if kind == "flip":
        for _ in range(int(rng.integers(1, 4))):
            p = fx.position(rng)
            raw[p] ^= 1 << int(rng.integers(8))
        return "raw", kind, bytes(raw)
    if kind == "truncate":
        n = fx.position(rng) if rng.random() < 0.5 else int(rng.integers(len(raw)))
        return "raw", kind, bytes(raw[:n])
    if kind in ("garbage", "zero"):
        p, n = fx.position(rng), int(rng.integers(1, 65))
        raw[p:p + n] = bytes(n) if kind == "zero" else rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        return "raw", kind, bytes(raw[:len(fx.raw)])
    members = dict(fx.members)
    pkl = bytearray(fx.pkl)
    order, compress = None, ()
    if kind == "pkl-flip":
        for _ in range(int(rng.integers(1, 4))):
            p = int(rng.integers(len(pkl)))
            pkl[p] ^= 1 << int(rng.integers(8))
    elif kind == "pkl-byte":
        p = int(rng.integers(len(pkl)))
        pkl[p] = int(rng.choice(list(b"().0123NIJKMQRXcdeghjlqrstu}]\x80\x85\x86\x87\x88\x89\x8a\x8c\x94\x95")))
    elif kind == "pkl-truncate":
        pkl = pkl[:int(rng.integers(len(pkl)))]
    elif kind == "pkl-splice":
        p, n = int(rng.integers(len(pkl))), int(rng.integers(1, 51))
        pkl = pkl[:p] + pkl[p + n:] if rng.random() < 0.5 else pkl[:p] + pkl[p:p + n] + pkl[p:]
    elif kind == "record":
        picks = sorted({int(i) for i in rng.integers(len(fx.ints), size=int(rng.integers(1, 3)))}, reverse=True)
        for i in picks:  # from the end, so that an edit does not move the next one's position
            start, end, old = fx.ints[i]
            v = int(rng.choice(EDGE_INTS)) if rng.random() < 0.6 else int(old) + int(rng.choice([-2, -1, 1, 2, 64]))
            pkl = pkl[:start] + _pack_int(v) + pkl[end:]
    elif kind == "string":
        start, end, _ = fx.strings[int(rng.integers(len(fx.strings)))]
        other = fx.strings[int(rng.integers(len(fx.strings)))][2]
        new = str(rng.choice([other, "", "x" * 300, "../../etc/passwd", "model", "0"]))
        enc = new.encode()
        pkl = pkl[:start] + b"X" + struct.pack("<I", len(enc)) + enc + pkl[end:]
    elif kind == "storage-size":
        name = fx.storages[int(rng.integers(len(fx.storages)))]
        data = members[name]
        cut = int(rng.integers(len(data) + 1))
        members[name] = data[:cut] if rng.random() < 0.5 else data + bytes(int(rng.integers(1, 9)))
    elif kind == "storage-swap":
        a, b = rng.choice(len(fx.storages), 2, replace=False)
        na, nb = fx.storages[int(a)], fx.storages[int(b)]
        members[na], members[nb] = members[nb], members[na]
    elif kind == "compress":
        compress = {fx.storages[int(rng.integers(len(fx.storages)))]}
    elif kind == "drop-entry":
        del members[list(members)[int(rng.integers(len(members)))]]
    elif kind == "dup-entry":
        order = list(members) + [list(members)[int(rng.integers(len(members)))]]
    elif kind == "byteorder":
        members[next(n for n in members if n.endswith("byteorder"))] = b"big"
    if pkl != fx.pkl:
        members[fx.pkl_name] = bytes(pkl)
    return "edit", kind, _zip(members, order, compress)


# ----------------------------------------------------------------------------- the child


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _convert(fx_name, source, cfg):
    from convert import gpt, vq
    from convert.torch_pickle import extract_state_dict, load_pt

    sd = extract_state_dict(load_pt(source), source.name)
    mod = gpt if fx_name.startswith("gpt") else vq
    return sd, mod.convert_state_dict(sd, cfg, None, path=source.name)


def _flat(tree) -> dict:
    import jax
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and a[k].tobytes() == b[k].tobytes() for k in a)


def _from_file(sd, data: bytes) -> bool:
    """Every value of every tensor record occurs in the file's storages (read as its dtype)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        blobs = [z.read(n) for n in z.namelist() if "/data/" in n]
    allowed = {}
    for t in sd.values():
        dt = np.dtype(t.dtype)
        word = np.dtype(f"u{dt.itemsize}")
        if dt not in allowed:
            words = np.concatenate([np.frombuffer(b[:len(b) // dt.itemsize * dt.itemsize], word) for b in blobs]
                                   + [np.zeros(1, word)])
            if dt.itemsize <= 2:  # a table of every possible word
                table = np.zeros(1 << (8 * dt.itemsize), bool)
                table[words] = True
                allowed[dt] = table
            else:
                allowed[dt] = np.sort(words)
        vals = t.numpy().reshape(-1).view(word)
        if dt.itemsize <= 2:
            if not allowed[dt][vals].all():
                return False
        else:
            where = np.minimum(np.searchsorted(allowed[dt], vals), allowed[dt].size - 1)
            if not (allowed[dt][where] == vals).all():
                return False
    return True


def run_cases(n_cases: int, seed: int, progress: Path) -> dict:
    from adsa_jax.config import ConfigError
    from convert.vq import resolve_config as vq_config
    from adsa_jax.config import GPTConfig

    configs = json.loads((DATA / "configs.json").read_text())
    cfgs = {"gpt_c2i_small": GPTConfig.from_dict(configs["gpt_c2i_small"]),
            "vq_small": vq_config(configs["vq_small"])}
    fixtures = {name: Fixture(name) for name, _ in TARGETS}
    base = {}
    for name, fx in fixtures.items():
        src = io.BytesIO(fx.raw)
        src.name = f"{name}.pt"
        base[name] = _flat(_convert(name, src, cfgs[name])[1])
    rng = np.random.default_rng(seed)
    counts, failures, slowest = {}, [], (0.0, "")
    signal.signal(signal.SIGALRM, _alarm)
    with open(progress, "w") as prog:
        for case in range(n_cases):
            name = TARGETS[0][0] if rng.random() < TARGETS[0][1] else TARGETS[1][0]
            fx = fixtures[name]
            family, kind, data = mutate(fx, rng)
            prog.write(f"{case} {name} {kind}\n")
            prog.flush()
            src = io.BytesIO(data)
            src.name = f"case{case}-{kind}.pt"
            t0 = time.perf_counter()
            outcome = None
            try:
                signal.setitimer(signal.ITIMER_REAL, 5 * CASE_SECONDS)  # turns a hang into _Timeout
                try:
                    sd, params = _convert(name, src, cfgs[name])
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    dt = time.perf_counter() - t0
                outcome = "same" if _same(_flat(params), base[name]) else "other"
                if outcome == "other":
                    if family == "raw":
                        failures.append(f"case {case} ({name}, {kind}): a raw mutation converted to another result")
                    elif not _from_file(sd, data):
                        failures.append(f"case {case} ({name}, {kind}): values that are not in the file")
            except ConfigError as e:
                outcome = "refused"
                msg = str(e)
                if "\n" in msg or src.name not in msg:
                    failures.append(f"case {case} ({name}, {kind}): unclear error {msg!r}")
            except _Timeout:
                outcome = "hang"
                failures.append(f"case {case} ({name}, {kind}): still running after {5 * CASE_SECONDS} s")
            except Exception as e:  # noqa: BLE001 (the point: anything else is a failure)
                outcome = "crash"
                failures.append(f"case {case} ({name}, {kind}): {type(e).__name__}: {e}")
            if dt > CASE_SECONDS:
                failures.append(f"case {case} ({name}, {kind}): took {dt:.2f} s")
            slowest = max(slowest, (dt, f"case {case} ({name}, {kind})"))
            counts[f"{family}:{outcome}"] = counts.get(f"{family}:{outcome}", 0) + 1
    return {"cases": n_cases, "seed": seed, "counts": counts, "failures": failures[:20],
            "n_failures": len(failures), "slowest": slowest}


# ----------------------------------------------------------------------------- the test


def test_mutated_checkpoints_convert_identically_or_fail_clearly(tmp_path):
    report, progress = tmp_path / "report.json", tmp_path / "progress.txt"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, str(FUZZ_CASES), str(FUZZ_SEED), str(report), str(progress)],
                       env=env, capture_output=True, text=True, timeout=max(120, FUZZ_CASES * CASE_SECONDS))
    last = progress.read_text().strip().splitlines()[-1:] if progress.is_file() else []
    assert r.returncode == 0 and report.is_file(), (
        f"the fuzz child died (rc {r.returncode}) during case {last}:\n{r.stderr[-3000:]}")
    rep = json.loads(report.read_text())
    print(f"{rep['cases']} cases in {time.perf_counter() - t0:.1f} s: {rep['counts']}, slowest {rep['slowest']}")
    assert rep["cases"] == FUZZ_CASES >= 1 and sum(rep["counts"].values()) == FUZZ_CASES
    assert rep["n_failures"] == 0, "\n".join(rep["failures"])
    # the mutator reaches every outcome it should: untouched results, refusals of both families
    assert rep["counts"].get("raw:refused", 0) > 0 and rep["counts"].get("edit:refused", 0) > 0
    assert rep["counts"].get("raw:same", 0) + rep["counts"].get("edit:same", 0) > 0


if __name__ == "__main__":
    n, seed, out, prog = sys.argv[1:5]
    Path(out).write_text(json.dumps(run_cases(int(n), int(seed), Path(prog))))
