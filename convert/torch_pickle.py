"""Read PyTorch ``.pt`` checkpoints without torch, without running pickled code, and without
trusting a single number in the file.

A ``.pt`` file (torch >= 1.6) is a zip archive: ``<name>/data.pkl`` is a pickle of the object
tree whose tensors point, through pickle "persistent ids", at raw storages in
``<name>/data/<key>``. The pickle is not given to :mod:`pickle`: :class:`_Machine` below is a
small pickle interpreter of its own that

- calls nothing from the file: the torch rebuild functions and ``collections.OrderedDict``
  map to local code; any other global (``argparse.Namespace`` in LlamaGen's ``args``,
  optimizer classes, ...) becomes an inert :class:`Opaque` placeholder, so real training
  checkpoints still load;
- has limits (:class:`Limits`) on the pickle's size, the number of opcodes, the memo, the
  stack, the nesting depth and the size of every object counted with its shared parts
  expanded, so a few hundred bytes of nested tuples (which make :mod:`pickle` hash or print an
  object of 2**100 parts) fail at once;
- validates every tensor record when it is read, before any view exists: a known storage
  dtype, a storage whose byte size in the archive is exactly what the record says, a
  non-negative offset and strides, at most as many elements as the storage holds, and the
  last element inside the storage. A record cannot make NumPy read outside its bytes.

Every failure is a :class:`CheckpointError` (a ``ValueError``) naming the file and what is
wrong. torch is not needed.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
import reprlib
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

try:
    from adsa_jax.config import ConfigError as _Base
except ImportError:  # the reader stands alone too
    _Base = ValueError


class CheckpointError(_Base):
    """A checkpoint file that cannot be used, with a message saying why and what to do."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on what a checkpoint's pickle may ask for (real checkpoints are far below them:
    LlamaGen's GPT-XL pickle has ~2,000 opcodes, nesting depth 5)."""

    pickle_bytes: int = 256 << 20  # data.pkl
    opcodes: int = 20_000_000
    memo: int = 5_000_000  # memo entries
    stack: int = 1_000_000  # stack + mark stack entries
    depth: int = 100  # nesting of containers
    expanded: int = 10_000_000  # parts of one object, shared parts counted each time they occur
    ndim: int = 64  # tensor dimensions (torch's own limit)
    text: int = 1 << 16  # characters of a text-protocol number


DEFAULT_LIMITS = Limits()

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
# torch >= 2 may record a dtype instead of a storage class.
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_,
}

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel, _short.maxtuple, _short.maxlist, _short.maxdict = 3, 6, 6, 6


def describe(x) -> str:
    """A bounded repr of an object from an untrusted file (for messages)."""
    return _short.repr(x)


class _StorageType:
    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)


class Opaque:
    """Stands in for any non-allow-listed object in the pickle. Holds nothing executable and
    keeps none of the file's arguments."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"<opaque {self.name}>"


class _Storage:
    """A storage's bytes, read from the archive only when a tensor uses them; kept while other
    records of the same storage still have to be read (views share storages)."""

    def __init__(self, archive: "_Archive", key: str, dtype, numel: int):
        self.archive, self.key, self.dtype, self.numel = archive, key, np.dtype(dtype), numel
        self.users = 0
        self._array = None

    def acquire(self) -> np.ndarray:
        if self._array is None:
            raw = self.archive.read_storage(self.key, self.numel * self.dtype.itemsize)
            self._array = np.frombuffer(raw, dtype=self.dtype)
        return self._array

    def release(self):
        self.users -= 1
        if self.users <= 0:
            self._array = None


class LazyTensor:
    """A validated tensor record: shape and dtype are known without reading its data."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.dtype = storage.dtype
        storage.users += 1

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def numpy(self) -> np.ndarray:
        """The tensor's values, copied out of its storage (C-contiguous)."""
        base = self.storage.acquire()
        try:
            if self.size == 0:
                return np.zeros(self.shape, self.dtype)
            # The record was checked against the storage's size when it was read; check the
            # bytes actually read as well before NumPy is given strides.
            last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
            if base.size != self.storage.numel or last >= base.size:
                raise CheckpointError(f"{self.storage.archive.path}: storage {self.storage.key} is shorter than "
                                      "its tensor records; the file is corrupt")
            item = base.itemsize
            view = np.lib.stride_tricks.as_strided(base[self.offset:], shape=self.shape,
                                                   strides=tuple(s * item for s in self.stride), writeable=False)
            return np.array(view, order="C")
        finally:
            self.storage.release()

    def __repr__(self):
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def _index(x, what: str, path, low: int = 0, high: int = 1 << 62) -> int:
    """An int of the record in [low, high], else a CheckpointError."""
    if isinstance(x, bool) or not isinstance(x, int) or not low <= x <= high:
        raise CheckpointError(f"{path}: invalid tensor record ({what} {describe(x)}); the file is corrupt or crafted")
    return x


def _rebuild_tensor(machine: "_Machine", args):
    """torch._utils._rebuild_tensor(_v2)(storage, offset, size, stride, ...), validated."""
    path = machine.archive.path
    if len(args) < 4:
        raise CheckpointError(f"{path}: a tensor record with {len(args)} fields; the file is corrupt")
    storage, offset, size, stride = args[:4]
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"{path}: a tensor record without a storage ({describe(storage)}); the file is corrupt")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise CheckpointError(f"{path}: a tensor record's size and stride must be tuples, got "
                              f"{describe(size)} and {describe(stride)}")
    if len(size) != len(stride) or len(size) > machine.limits.ndim:
        raise CheckpointError(f"{path}: a tensor record with size {describe(size)} and stride {describe(stride)}; "
                              "the file is corrupt")
    shape = tuple(_index(n, "size", path) for n in size)
    strides = tuple(_index(s, "stride", path) for s in stride)
    offset = _index(offset, "storage offset", path, 0, storage.numel)
    numel = math.prod(shape)
    if numel > storage.numel:
        raise CheckpointError(f"{path}: a tensor of shape {shape} has more elements than its storage "
                              f"{storage.key} ({storage.numel}); the file is corrupt or crafted")
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if last >= storage.numel:
            raise CheckpointError(f"{path}: a tensor (shape {shape}, stride {strides}, offset {offset}) reaches "
                                  f"element {last} of storage {storage.key}, which holds {storage.numel}; the file "
                                  "is corrupt or crafted")
    return LazyTensor(storage, offset, shape, strides)


def _rebuild_parameter(machine, args):
    if not args:
        raise CheckpointError(f"{machine.archive.path}: an empty parameter record; the file is corrupt")
    return args[0]


def _rebuild_from_type(machine, args):
    """torch._tensor._rebuild_from_type_v2(func, new_type, args, state): func(*args), type dropped."""
    if len(args) < 3 or not isinstance(args[2], tuple):
        raise CheckpointError(f"{machine.archive.path}: a malformed tensor-subclass record; the file is corrupt")
    return machine.call(args[0], args[2])


def _ordered_dict(machine, args):
    d = collections.OrderedDict()
    if args:
        items = args[0]
        if len(args) > 1 or not isinstance(items, (list, tuple)) or not all(
                isinstance(kv, tuple) and len(kv) == 2 for kv in items):
            raise CheckpointError(f"{machine.archive.path}: a malformed OrderedDict record; the file is corrupt")
        for k, v in items:
            d[machine.key(k)] = v
    return d


class _Function:
    """An allow-listed global: called with the machine and the (already built) arguments."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __repr__(self):
        return f"<{self.name}>"


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): _ordered_dict,
}


class _Archive:
    def __init__(self, path: Path, zf: zipfile.ZipFile, prefix: str, file_size: int):
        self.path, self.zf, self.prefix, self.file_size = path, zf, prefix, file_size
        self.claimed = 0  # archive bytes the storages read so far occupy

    def info(self, key: str, nbytes: int) -> zipfile.ZipInfo:
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: missing storage {name}; the file is truncated or corrupt") from None
        if info.file_size != nbytes:
            raise CheckpointError(f"{self.path}: storage {name} holds {info.file_size} bytes, its record says "
                                  f"{nbytes}; the file is truncated or corrupt")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise CheckpointError(f"{self.path}: storage {name} has inconsistent sizes; the file is corrupt")
        elif info.compress_type != zipfile.ZIP_DEFLATED or info.file_size > 1100 * info.compress_size + 1024:
            # deflate expands at most ~1032:1; anything else is a zip bomb or not torch.save's output
            raise CheckpointError(f"{self.path}: storage {name} is compressed (method {info.compress_type}, "
                                  f"{info.compress_size} -> {info.file_size} bytes); torch.save writes storages "
                                  "uncompressed")
        # Storages of one archive do not overlap: together they fit in the file.
        self.claimed += info.compress_size
        if self.claimed > self.file_size:
            raise CheckpointError(f"{self.path}: the storages claim more bytes than the file holds; the file is "
                                  "corrupt or crafted")
        return info

    def read_storage(self, key: str, nbytes: int) -> bytes:
        name = f"{self.prefix}data/{key}"
        try:
            raw = self.zf.read(name)  # checks the CRC-32 of the data
        except Exception as e:  # noqa: BLE001 (zipfile raises many types for damaged archives)
            raise CheckpointError(f"{self.path}: cannot read {name} ({type(e).__name__}: {e}); the file is "
                                  "truncated or corrupt") from None
        if len(raw) != nbytes:
            raise CheckpointError(f"{self.path}: storage {name} holds {len(raw)} bytes, its record says {nbytes}; "
                                  "the file is truncated or corrupt")
        return raw


class _Mark:
    """The MARK opcode's stack entry."""


_MARK = _Mark()
_HASHABLE_SCALARS = (str, bytes, int, float, bool, type(None), complex)


class _Machine:
    """A pickle interpreter (protocols 0-5, no out-of-band buffers, no extension registry) that
    builds only dicts, lists, tuples, sets, scalars, validated tensor records and inert
    placeholders, within :class:`Limits`."""

    def __init__(self, data: bytes, archive: _Archive, limits: Limits):
        self.data, self.archive, self.limits = data, archive, limits
        self.pos = 0
        self.stack: list = []
        self.marks: list[list] = []
        self.memo: dict = {}
        self.storages: dict[str, _Storage] = {}
        # Expanded size and depth of each tuple / frozenset (immutable, so known when built);
        # the objects are kept alive so that their ids are not reused.
        self.sizes: dict[int, tuple[int, int]] = {}
        self.keep: list = []

    # -- helpers ---------------------------------------------------------------------------
    def fail(self, what: str):
        raise CheckpointError(f"{self.archive.path}: {what} (pickle byte {self.pos}); the file is corrupt or crafted")

    def read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            self.fail("the pickle ends early")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def readline(self) -> bytes:
        end = self.data.find(b"\n", self.pos, self.pos + self.limits.text)
        if end < 0:
            self.fail("a text field without an end of line")
        b = self.data[self.pos:end]
        self.pos = end + 1
        return b

    def push(self, x):
        self.stack.append(x)  # the stack's size is checked in run()

    def pop(self):
        if not self.stack:
            self.fail("the pickle stack is empty")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.marks:
            self.fail("no MARK on the pickle stack")
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def measure(self, items) -> tuple[int, int]:
        """(expanded size, depth) of a new immutable container of items."""
        size, depth = 1, 1
        for x in items:
            s, d = self.sizes.get(id(x), (1, 1)) if isinstance(x, (tuple, frozenset)) else (1, 1)
            size += s
            depth = max(depth, d + 1)
        if size > self.limits.expanded:
            self.fail(f"an object of more than {self.limits.expanded} parts (nested shared tuples)")
        if depth > self.limits.depth:
            self.fail(f"objects nested more than {self.limits.depth} deep")
        return size, depth

    def immutable(self, x, items):
        if items:
            self.sizes[id(x)] = self.measure(items)
            self.keep.append(x)
        return x

    def key(self, k):
        """k as a dict key / set item: hashable, and cheap to hash (sizes bounded)."""
        if isinstance(k, (Opaque, LazyTensor, _StorageType)):
            return k  # hashed by identity
        if isinstance(k, _HASHABLE_SCALARS) or isinstance(k, (tuple, frozenset)):
            try:
                hash(k)  # bounded: the parts of a tuple were counted when it was built
                return k
            except TypeError:
                pass
        self.fail(f"an unhashable or unsupported dict key {describe(k)}")

    def call(self, fn, args):
        if not isinstance(args, tuple):
            self.fail(f"call arguments are not a tuple ({describe(args)})")
        if isinstance(fn, _Function):
            return fn.fn(self, args)
        if isinstance(fn, Opaque):
            return Opaque(fn.name)
        self.fail(f"a call of {describe(fn)}")

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str) or len(module) + len(name) > 512:
            self.fail("a malformed global name")
        if (module, name) in _ALLOWED:
            return _Function(f"{module}.{name}", _ALLOWED[(module, name)])
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _StorageType(name, _TORCH_DTYPES[name])
        return Opaque(f"{module}.{name}")

    def persistent_load(self, pid):
        path = self.archive.path
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{path}: unsupported persistent id {describe(pid)} in the pickle")
        _, stype, key, _location, numel = pid[:5]
        if not isinstance(stype, _StorageType):
            raise CheckpointError(f"{path}: unsupported storage type {describe(stype)}")
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", key) or ".." in key:
            raise CheckpointError(f"{path}: invalid storage key {describe(key)}")
        numel = _index(numel, "storage size", path)
        old = self.storages.get(key)
        if old is not None:
            if old.dtype != stype.dtype or old.numel != numel:
                raise CheckpointError(f"{path}: storage {key} is recorded twice with different types or sizes")
            return old
        self.archive.info(key, numel * stype.dtype.itemsize)
        st = self.storages[key] = _Storage(self.archive, key, stype.dtype, numel)
        return st

    # -- the interpreter -------------------------------------------------------------------
    def run(self):
        ops, data, limit = _OPS, self.data, self.limits.stack
        try:
            for count in range(self.limits.opcodes):
                if self.pos >= len(data):
                    self.fail("the pickle ends without STOP")
                code = data[self.pos]
                self.pos += 1
                op = ops.get(code)
                if op is None:
                    self.fail(f"unsupported pickle opcode {bytes([code])!r}")
                if op is _stop:
                    if len(self.stack) != 1 or self.marks:
                        self.fail("the pickle stops with a malformed stack")
                    return self.stack[0]
                op(self)
                # an opcode adds at most one entry: checking every 256th keeps the bound
                if not count & 255 and len(self.stack) + len(self.marks) > limit:
                    self.fail(f"the pickle stack exceeds {limit} entries")
        except (IndexError, struct.error):  # an argument read past the end of the pickle
            self.fail("the pickle ends early")
        self.fail(f"more than {self.limits.opcodes} pickle opcodes")


# -- opcodes (pickle's own names) -----------------------------------------------------------------
def _stop(m):
    pass


def _proto(m):
    if m.read(1)[0] > 5:
        m.fail("an unknown pickle protocol")


def _frame(m):
    m.read(8)


def _int_text(m, line: bytes):
    try:
        return int(line)
    except ValueError:
        m.fail("a malformed number")


def _op_int(m):
    line = m.readline()
    m.push(True if line == b"01" else False if line == b"00" else _int_text(m, line))


def _op_long(m):
    line = m.readline()
    m.push(_int_text(m, line[:-1] if line.endswith(b"L") else line))


def _op_float(m):
    try:
        m.push(float(m.readline()))
    except ValueError:
        m.fail("a malformed float")


def _long_n(m, n):
    if n > 1024:
        m.fail("an integer of more than 1024 bytes")
    m.push(int.from_bytes(m.read(n), "little", signed=True))


def _text(m, raw: bytes, encoding="utf-8"):
    try:
        return raw.decode(encoding, "surrogatepass")
    except UnicodeDecodeError:
        m.fail("a malformed string")


def _string_text(m):
    line = m.readline()
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
        m.fail("a malformed string")
    try:
        m.push(line[1:-1].decode("unicode_escape").encode("latin-1").decode("ascii"))
    except (UnicodeDecodeError, UnicodeEncodeError):
        m.fail("a malformed string")


def _u(fmt):
    size = struct.calcsize(fmt)
    return lambda m: struct.unpack(fmt, m.read(size))[0]


_u1, _u2, _u4, _i4, _u8 = _u("<B"), _u("<H"), _u("<I"), _u("<i"), _u("<Q")


def _sized(reader, make):
    def op(m):
        n = reader(m)
        if n < 0:
            m.fail("a negative length")
        m.push(make(m, m.read(n)))
    return op


def _tuple_n(n):
    def op(m):
        if len(m.stack) < n:
            m.fail("the pickle stack is too short")
        items = tuple(m.stack[len(m.stack) - n:]) if n else ()
        del m.stack[len(m.stack) - n:]
        m.push(m.immutable(items, items))
    return op


def _op_tuple(m):
    items = tuple(m.pop_mark())
    m.push(m.immutable(items, items))


def _op_list(m):
    m.push(m.pop_mark())


def _op_dict(m):
    items = m.pop_mark()
    if len(items) % 2:
        m.fail("an odd number of dict items")
    d = {}
    for i in range(0, len(items), 2):
        d[m.key(items[i])] = items[i + 1]
    m.push(d)


def _op_frozenset(m):
    items = [m.key(x) for x in m.pop_mark()]
    m.measure(items)
    fs = frozenset(items)
    m.push(m.immutable(fs, items))


def _container(m, kind):
    if not m.stack:
        m.fail("the pickle stack is empty")
    c = m.stack[-1]
    if not isinstance(c, kind):
        if isinstance(c, Opaque):  # e.g. APPENDS into a placeholder: the items are dropped
            return None
        m.fail(f"items added to a {type(c).__name__}")
    return c


def _op_append(m):
    x = m.pop()
    c = _container(m, list)
    if c is not None:
        c.append(x)


def _op_appends(m):
    items = m.pop_mark()
    c = _container(m, list)
    if c is not None:
        c.extend(items)


def _op_setitem(m):
    v, k = m.pop(), m.pop()
    d = _container(m, dict)
    if d is not None:
        d[m.key(k)] = v


def _op_setitems(m):
    items = m.pop_mark()
    if len(items) % 2:
        m.fail("an odd number of dict items")
    d = _container(m, dict)
    if d is not None:
        for i in range(0, len(items), 2):
            d[m.key(items[i])] = items[i + 1]


def _op_additems(m):
    items = m.pop_mark()
    s = _container(m, set)
    if s is not None:
        for x in items:
            s.add(m.key(x))


def _memo_put(m, idx):
    if idx not in m.memo and len(m.memo) >= m.limits.memo:
        m.fail(f"the pickle memo exceeds {m.limits.memo} entries")
    if not m.stack:
        m.fail("the pickle stack is empty")
    m.memo[idx] = m.stack[-1]


def _memo_get(m, idx):
    if idx not in m.memo:
        m.fail(f"memo entry {idx} is used before it is set")
    m.push(m.memo[idx])


def _op_put(m):
    _memo_put(m, _int_text(m, m.readline()))


def _op_get(m):
    _memo_get(m, _int_text(m, m.readline()))


def _op_memoize(m):
    _memo_put(m, len(m.memo))


def _op_global(m):
    module = _text(m, m.readline(), "ascii")
    name = _text(m, m.readline(), "ascii")
    m.push(m.find_class(module, name))


def _op_stack_global(m):
    name, module = m.pop(), m.pop()
    m.push(m.find_class(module, name))


def _op_reduce(m):
    args, fn = m.pop(), m.pop()
    m.push(m.call(fn, args))


def _op_build(m):
    m.pop()  # the state: placeholders keep none, and no built object takes one
    if not m.stack:
        m.fail("the pickle stack is empty")


def _op_newobj(m):
    args, cls = m.pop(), m.pop()
    if not isinstance(args, tuple):
        m.fail("NEWOBJ arguments are not a tuple")
    m.push(_new(m, cls))


def _op_newobj_ex(m):
    kwargs, args, cls = m.pop(), m.pop(), m.pop()
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        m.fail("NEWOBJ_EX arguments are malformed")
    m.push(_new(m, cls))


def _new(m, cls):
    if isinstance(cls, Opaque):
        return Opaque(cls.name)
    if isinstance(cls, _Function) and cls.fn is _ordered_dict:
        return collections.OrderedDict()
    m.fail(f"an instance of {describe(cls)}")


def _op_inst(m):
    module = _text(m, m.readline(), "ascii")
    name = _text(m, m.readline(), "ascii")
    m.pop_mark()
    m.push(Opaque(f"{module}.{name}"))


def _op_obj(m):
    items = m.pop_mark()
    if not items:
        m.fail("OBJ without a class")
    m.push(_new(m, items[0]))


def _op_persid(m):
    m.push(m.persistent_load(_text(m, m.readline(), "ascii")))


def _op_binpersid(m):
    m.push(m.persistent_load(m.pop()))


def _op_pop(m):
    m.pop()


def _op_pop_mark(m):
    m.pop_mark()


def _op_dup(m):
    if not m.stack:
        m.fail("the pickle stack is empty")
    m.push(m.stack[-1])


def _op_mark(m):
    m.marks.append(m.stack)
    m.stack = []


def _arg(m, n: int) -> bytes:
    """The next n bytes (IndexError past the end: run() reports it)."""
    p = m.pos
    b = m.data[p:p + n]
    if len(b) != n:
        raise IndexError
    m.pos = p + n
    return b


def _op_binint1(m):
    m.stack.append(m.data[m.pos])
    m.pos += 1


def _op_binint2(m):
    m.stack.append(int.from_bytes(_arg(m, 2), "little"))


def _op_binint(m):
    m.stack.append(int.from_bytes(_arg(m, 4), "little", signed=True))


def _op_binput(m):
    idx = m.data[m.pos]
    m.pos += 1
    _memo_put(m, idx)


def _op_binget(m):
    idx = m.data[m.pos]
    m.pos += 1
    _memo_get(m, idx)


def _op_binunicode(m):
    n = int.from_bytes(_arg(m, 4), "little")
    m.stack.append(_text(m, _arg(m, n)))


_OPS = {
    ord("."): _stop, 0x80: _proto, 0x95: _frame, ord("("): _op_mark, ord("0"): _op_pop, ord("1"): _op_pop_mark,
    ord("2"): _op_dup, ord("N"): lambda m: m.push(None), 0x88: lambda m: m.push(True), 0x89: lambda m: m.push(False),
    ord("I"): _op_int, ord("L"): _op_long, ord("J"): _op_binint, ord("K"): _op_binint1,
    ord("M"): _op_binint2, 0x8A: lambda m: _long_n(m, _u1(m)), 0x8B: lambda m: _long_n(m, _i4(m)),
    ord("F"): _op_float, ord("G"): lambda m: m.push(struct.unpack(">d", m.read(8))[0]),
    ord("S"): _string_text, ord("V"): lambda m: m.push(_text(m, m.readline(), "raw_unicode_escape")),
    ord("T"): _sized(_i4, lambda m, b: _text(m, b, "latin-1")), ord("U"): _sized(_u1, lambda m, b: _text(m, b, "latin-1")),
    ord("X"): _op_binunicode, 0x8C: _sized(_u1, _text), 0x8D: _sized(_u8, _text),
    ord("B"): _sized(_u4, lambda m, b: bytes(b)), ord("C"): _sized(_u1, lambda m, b: bytes(b)),
    0x8E: _sized(_u8, lambda m, b: bytes(b)), 0x96: _sized(_u8, lambda m, b: bytes(b)),
    ord("}"): lambda m: m.push({}), ord("]"): lambda m: m.push([]), ord(")"): lambda m: m.push(()),
    0x8F: lambda m: m.push(set()), ord("t"): _op_tuple, 0x85: _tuple_n(1), 0x86: _tuple_n(2), 0x87: _tuple_n(3),
    ord("l"): _op_list, ord("d"): _op_dict, 0x91: _op_frozenset, ord("a"): _op_append, ord("e"): _op_appends,
    ord("s"): _op_setitem, ord("u"): _op_setitems, 0x90: _op_additems,
    ord("p"): _op_put, ord("q"): _op_binput, ord("r"): lambda m: _memo_put(m, _u4(m)),
    0x94: _op_memoize, ord("g"): _op_get, ord("h"): _op_binget,
    ord("j"): lambda m: _memo_get(m, _u4(m)), ord("c"): _op_global, 0x93: _op_stack_global, ord("R"): _op_reduce,
    ord("b"): _op_build, 0x81: _op_newobj, 0x92: _op_newobj_ex, ord("i"): _op_inst, ord("o"): _op_obj,
    ord("P"): _op_persid, ord("Q"): _op_binpersid,
}


def _check_tree(root, path, limits: Limits):
    """The finished object: no cycles, depth and expanded size within limits (mutable containers
    may have been filled after they were nested, so this walks the whole result once)."""
    done: dict[int, tuple[int, int]] = {}
    active: set[int] = set()
    stack = [(root, False)]
    while stack:
        obj, closing = stack.pop()
        if isinstance(obj, dict):
            kids = list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            kids = list(obj)
        else:
            continue
        i = id(obj)
        if closing:
            active.discard(i)
            size, depth = 1, 1
            for k in kids:
                s, d = done.get(id(k), (1, 1))
                size += s
                depth = max(depth, d + 1)
            if size > limits.expanded or depth > limits.depth:
                raise CheckpointError(f"{path}: the checkpoint's object tree is too large or too deeply nested "
                                      f"(more than {limits.expanded} parts or {limits.depth} levels); the file is "
                                      "corrupt or crafted")
            done[i] = (size, depth)
            continue
        if i in done:
            continue
        if i in active:
            raise CheckpointError(f"{path}: the checkpoint's object tree contains itself (a reference cycle); "
                                  "the file is corrupt or crafted")
        active.add(i)
        stack.append((obj, True))
        stack.extend((k, False) for k in kids if isinstance(k, (dict, list, tuple, set, frozenset)))


def load_pt(source, *, limits: Limits = DEFAULT_LIMITS) -> object:
    """Unpickle a ``.pt`` file into dicts / lists / :class:`LazyTensor` (no torch needed).

    source: a path, or a binary file object (read in place; tensors read from it later)."""
    if hasattr(source, "read"):
        path = Path(str(getattr(source, "name", "<checkpoint>")))
        fileobj = source
    else:
        path = fileobj = Path(source)
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if path.is_dir():
            raise CheckpointError(f"{path} is a directory; pass the .pt file (for FSDP folders, consolidated.pth)")
    legacy = ("it may be truncated, a different file type, or a legacy checkpoint (re-save it with a current torch: "
              "torch.save(torch.load(f), f2))")
    try:
        if not zipfile.is_zipfile(fileobj):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (expected the zip format torch.save writes "
                                  f"since torch 1.6); {legacy}")
        if isinstance(fileobj, Path):
            file_size = fileobj.stat().st_size
        else:
            file_size = fileobj.seek(0, 2)
            fileobj.seek(0)
        zf = zipfile.ZipFile(fileobj)
        names = zf.namelist()
        if len(set(names)) != len(names):
            raise CheckpointError(f"{path}: the zip archive names an entry twice; the file is corrupt or crafted")
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: a zip file with {len(pkl)} <name>/data.pkl entries is not a PyTorch "
                                  f"checkpoint; {legacy}")
        prefix = pkl[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in names and (zf.getinfo(order).file_size > 16 or zf.read(order).strip() not in (b"little", b"")):
            raise CheckpointError(f"{path}: the checkpoint was written on a big-endian machine; re-save it on a "
                                  "little-endian one")
        info = zf.getinfo(pkl[0])
        if info.file_size > limits.pickle_bytes:
            raise CheckpointError(f"{path}: data.pkl is {info.file_size} bytes, more than the limit of "
                                  f"{limits.pickle_bytes}")
        with zf.open(info) as f:
            data = f.read(limits.pickle_bytes + 1)  # bounded even if the size field lies
        if len(data) > limits.pickle_bytes:
            raise CheckpointError(f"{path}: data.pkl is larger than the limit of {limits.pickle_bytes} bytes")
        archive = _Archive(path, zf, prefix, file_size)
        obj = _Machine(data, archive, limits).run()
        _check_tree(obj, path, limits)
        return obj
    except CheckpointError:
        raise
    except MemoryError:
        raise CheckpointError(f"{path}: the checkpoint asks for more memory than is available; the file is "
                              "corrupt or crafted") from None
    except Exception as e:  # noqa: BLE001 (zipfile and struct raise many types for damaged files)
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); the file is "
                              "truncated or corrupt") from None


_NOT_WEIGHTS = ("kv_cache", "freqs_cis", "causal_mask", "k_cache", "v_cache")


def _keys(obj) -> str:
    return describe(sorted((k for k in obj if isinstance(k, str)))[:8])


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
                              f"(top-level keys: {_keys(obj)})")
    sd = None
    for key in order:
        if key in obj and isinstance(obj[key], dict):
            sd = obj[key]
            break
    if sd is None:
        sd = obj  # bare state dict (LlamaGen's FSDP consolidated.pth)
    out = {}
    for name, value in sd.items():
        if not isinstance(value, LazyTensor):
            continue  # non-tensor entries (step counters and the like) are not weights
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: a tensor is stored under the key {describe(name)}, not a weight name")
        for prefix in ("_orig_mod.", "module."):
            while name.startswith(prefix):
                name = name[len(prefix):]
        name = name.replace("._orig_mod.", ".")
        if name.split(".")[-1] in _NOT_WEIGHTS:
            continue
        if name in out:
            raise CheckpointError(f"{path}: the weight {name} is stored twice (with and without a prefix)")
        out[name] = value
    if not out:
        raise CheckpointError(
            f"{path}: no tensors found (top-level keys: {_keys(obj)}); expected a state "
            "dict, bare or under 'model', 'module', 'state_dict' or 'ema'"
        )
    return out


def check_finite(name: str, x: np.ndarray, path):
    """Refuse NaN / Inf weights, naming the tensor (they would sample garbage silently)."""
    if np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16:
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise CheckpointError(f"{path}: weight {name} holds {bad} NaN or infinite values; the checkpoint is "
                                  "corrupt (or its training diverged) and cannot be converted")


def check_keys(sd: dict, want: dict, path, what: str, hint: str):
    """Strict key matching: raise one error naming missing and unexpected weights and the likely cause."""
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        msg = []
        if missing:
            msg.append(f"{len(missing)} missing weights (e.g. {', '.join(missing[:4])})")
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected weights (e.g. {', '.join(describe(u) for u in unexpected[:4])})")
        raise CheckpointError(f"{path}: does not match the {what}: {'; '.join(msg)}. {hint}")
