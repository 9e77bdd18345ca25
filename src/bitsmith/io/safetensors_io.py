"""Our own validating safetensors reader and writers (the standard format: ``safe_open`` reads
what we write, and we read what it writes).

Layout: an 8-byte little-endian header length ``N``; ``N`` bytes of UTF-8 JSON (an object mapping
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional
``"__metadata__"`` object of strings), padded with spaces so the data starts 8-byte aligned; then
the data section, every byte of it covered by exactly one tensor (no holes, no overlaps, nothing
after the last tensor — the same rule as the reference implementation, so a file we accept is one
``safe_open`` accepts).

Reading (:class:`SafetensorsFile`) trusts nothing in the header: every violation is a
:class:`~bitsmith.errors.CheckpointError` naming the file, the tensor and what was expected, never
another exception type. Opening costs O(header); a tensor's bytes are touched only when it is
read.

How a tensor is read — the choice and why:

* Tensors of at least :data:`MMAP_MIN_BYTES` are **mapped**, each in its own private
  (copy-on-write) mapping of the file (``torch.UntypedStorage.from_file(..., shared=False)``).
  The tensor is zero-copy and lazy, *writable* (writes go to private pages, never to the file;
  no read-only-buffer warning to suppress and no segfault if someone writes), independent of any
  other tensor read from the same file (two reads never alias), and unmapped when the tensor is
  freed, so streaming through a large shard keeps only the live tensors resident. (The mapping
  covers the file from offset 0 to the tensor's end, so it counts toward the kernel's commit
  charge though only the tensor's pages are ever touched; where the OS refuses it, e.g. under
  ``vm.overcommit_memory=2``, the tensor is copied instead.) The mapping is
  made through ``/proc/self/fd`` of the descriptor we validated, so a file replaced on disk after
  :meth:`SafetensorsFile.open` is never read in its place. One mapping does not hold a file
  descriptor (Python's ``mmap`` would hold a ``dup`` per mapping). Not chosen: one ``mmap`` of
  the whole file with ``torch.frombuffer`` views — every page read stays mapped until the file is
  closed (RSS climbs to the shard size while streaming through it), two reads of one tensor alias,
  and a read-only mapping gives tensors that segfault when written.
* Smaller tensors (and every tensor where ``/proc/self/fd`` does not exist, or whose offset is not
  aligned to its element size) are **copied** with ``pread`` into a fresh tensor: for a few KiB a
  copy is cheaper than a mapping, and it keeps the number of mappings (``vm.max_map_count``) low.

Tensors stay valid after :meth:`SafetensorsFile.close`. A mapped file must not be truncated in
place by another program while its tensors are alive (the OS would raise SIGBUS); our writers
always write a new file and ``os.replace`` it, which is safe.

Writing: :func:`write_safetensors` writes a dict of tensors atomically (temporary name in the same
folder, ``os.replace`` at the end, the temporary removed on any error). :class:`ShardWriter`
streams: each tensor's bytes are appended to a temporary data file as it arrives, and
:meth:`ShardWriter.close` writes the header, now known, to the final file followed by a kernel-side
(or chunked) copy of the data file, so a shard never has more than one tensor in memory.
"""
from __future__ import annotations

import errno
import functools
import json
import math
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..errors import CheckpointError
from ..formats.dtypes import DTYPE_BY_ST, ST_BY_DTYPE

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Largest JSON header we accept (the reference implementation's limit too)."""
MAX_RANK = 64
MAX_DIM = 2**62
MMAP_MIN_BYTES = 64 * 1024
"""Tensors at least this large are mapped; smaller ones are copied (see the module docstring)."""
_COPY_CHUNK = 16 * 1024 * 1024
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_PROC_FD = Path("/proc/self/fd")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry, validated. ``begin``/``end`` are offsets in the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def st_dtype(self) -> str:
        return ST_BY_DTYPE[self.dtype]


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_strict(text: str | bytes) -> object:
    """``json.loads`` that rejects duplicate keys and NaN/Infinity. Raises ``ValueError`` (and
    ``RecursionError`` for absurd nesting); callers turn both into a CheckpointError."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # UnicodeDecodeError is a ValueError
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def _is_int(v: object) -> bool:
    return type(v) is int


class SafetensorsFile:
    """A validated, lazily read safetensors file. Use :meth:`open` (also a context manager)."""

    def __init__(self, path: Path, fd: int, file_size: int, data_start: int,
                 entries: dict[str, TensorEntry], metadata: dict[str, str]):
        self.path = path
        self.file_size = file_size
        self.data_start = data_start  # absolute offset of the data section (8 + header length)
        self._fd: int | None = fd
        self._entries = entries  # in file (data offset) order
        self._metadata = metadata
        self._lock = threading.Lock()  # only for platforms without os.preadv
        #: ``"tensor"``: each read maps (or copies) just that tensor, so streaming through a shard
        #: keeps only live tensors resident. ``"file"``: the first read maps the whole file once
        #: (private, copy-on-write) and every tensor is a view of it -- cheapest when all tensors
        #: stay alive anyway (loading a model), but the mapping lives as long as any view does.
        self.mapping = "tensor"
        self._whole: torch.UntypedStorage | None = None

    # --- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "SafetensorsFile":
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise CheckpointError(f"cannot open: {e.strerror or e}", file=str(path)) from None
        try:
            size = os.fstat(fd).st_size
            head = _pread_exact(fd, min(8, size), 0)
            data_start, entries, metadata = _parse_header(str(path), fd, size, head)
        except CheckpointError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise CheckpointError(f"cannot read: {e.strerror or e}", file=str(path)) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size, data_start, entries, metadata)

    # --- what users call ------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` object (a copy; empty when the file has none)."""
        return dict(self._metadata)

    def keys(self) -> list[str]:
        """Tensor names in file order (by data offset)."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def data_nbytes(self) -> int:
        return self.file_size - self.data_start

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise CheckpointError(
                f"no tensor named {name!r} (the file holds {len(self._entries)} tensors)",
                file=str(self.path),
            ) from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``: mapped (zero-copy, copy-on-write) or copied, see the module
        docstring. Always a writable CPU tensor of the header's dtype and shape."""
        e = self.entry(name)
        fd = self._fd
        if fd is None:
            raise CheckpointError("file is closed", file=str(self.path), tensor=name)
        itemsize = e.dtype.itemsize
        start = self.data_start + e.begin
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        try:
            if self.mapping == "file" and start % itemsize == 0 and _have_proc_fd():
                try:
                    return self._view(fd, e, start, itemsize)
                except (OSError, RuntimeError):
                    pass  # the OS refused the mapping: per-tensor reads below
            if e.nbytes >= MMAP_MIN_BYTES and start % itemsize == 0 and _have_proc_fd():
                try:
                    return self._map(fd, e, start, itemsize)
                except (OSError, RuntimeError):
                    pass  # the OS refused the mapping (e.g. strict overcommit): copy instead
            return self._copy(fd, e, start)
        except CheckpointError:
            raise
        except (OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"cannot read tensor bytes: {err}", file=str(self.path), tensor=name) from None

    def _map(self, fd: int, e: TensorEntry, start: int, itemsize: int) -> torch.Tensor:
        end = start + e.nbytes
        if os.fstat(fd).st_size < end:
            raise CheckpointError(
                f"file shrank to {os.fstat(fd).st_size} bytes since it was opened, the tensor ends at {end}",
                file=str(self.path), tensor=e.name,
            )
        storage = torch.UntypedStorage.from_file(f"{_PROC_FD}/{fd}", shared=False, nbytes=end)
        return torch.empty(0, dtype=e.dtype).set_(storage, start // itemsize, e.shape)

    def _view(self, fd: int, e: TensorEntry, start: int, itemsize: int) -> torch.Tensor:
        if self._whole is None:
            if os.fstat(fd).st_size < self.file_size:
                raise CheckpointError(f"file shrank to {os.fstat(fd).st_size} bytes since it was opened",
                                      file=str(self.path), tensor=e.name)
            self._whole = torch.UntypedStorage.from_file(f"{_PROC_FD}/{fd}", shared=False, nbytes=self.file_size)
        return torch.empty(0, dtype=e.dtype).set_(self._whole, start // itemsize, e.shape)

    def _copy(self, fd: int, e: TensorEntry, start: int) -> torch.Tensor:
        out = torch.empty(e.shape, dtype=e.dtype)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < e.nbytes:
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [buf[done:]], start + done)
            else:  # pragma: no cover - Windows
                with self._lock:
                    os.lseek(fd, start + done, os.SEEK_SET)
                    n = os.readv(fd, [buf[done:]])
            if n <= 0:
                raise CheckpointError(
                    f"file ended after {start + done} bytes, the tensor ends at {start + e.nbytes} "
                    "(truncated since it was opened?)",
                    file=str(self.path), tensor=e.name,
                )
            done += n
        return out

    def close(self) -> None:
        """Release the file. Tensors already read stay valid."""
        self._whole = None  # views keep the mapping alive as long as they live
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._entries)} tensors)"


@functools.lru_cache(maxsize=1)
def _have_proc_fd() -> bool:
    """Whether /proc/self/fd exists (Linux): checked once, not per tensor."""
    return _PROC_FD.is_dir()


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    chunks = []
    while n > 0:
        b = os.pread(fd, n, offset)
        if not b:
            break
        chunks.append(b)
        n -= len(b)
        offset += len(b)
    return b"".join(chunks)


def _parse_header(file: str, fd: int, size: int, head: bytes
                  ) -> tuple[int, dict[str, TensorEntry], dict[str, str]]:
    def fail(msg: str, tensor: str | None = None) -> CheckpointError:
        return CheckpointError(msg, file=file, tensor=tensor)

    if size < 8 or len(head) < 8:
        raise fail(f"file is {size} bytes, too short for a safetensors file (8-byte header length first)")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise fail(f"header length {n} exceeds the {size - 8} bytes after the length field (truncated or not safetensors)")
    if n > MAX_HEADER_BYTES:
        raise fail(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n < 2:
        raise fail(f"header length {n} is too short for a JSON object")
    raw = _pread_exact(fd, n, 8)
    if len(raw) != n:
        raise fail(f"file ended inside the {n}-byte header")
    try:
        header = parse_json_strict(raw)
    except RecursionError:
        raise fail("header JSON is nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise fail(f"header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise fail(f"header must be a JSON object, got {type(header).__name__}")

    metadata: dict[str, str] = {}
    if "__metadata__" in header:
        meta = header.pop("__metadata__")
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise fail("__metadata__ must be an object of string values")
        metadata = meta

    data_size = size - 8 - n
    entries: list[TensorEntry] = []
    for name, info in header.items():
        if not name:
            raise fail("tensor name is empty")
        if not isinstance(info, dict):
            raise fail(f"header entry must be an object, got {type(info).__name__}", name)
        if set(info) != _ENTRY_KEYS:
            raise fail(f"header entry must have exactly the fields {sorted(_ENTRY_KEYS)}, got {sorted(info)}", name)
        st = info["dtype"]
        if not isinstance(st, str) or st not in DTYPE_BY_ST:
            raise fail(f"unsupported dtype {st!r}; valid: {', '.join(DTYPE_BY_ST)}", name)
        dtype = DTYPE_BY_ST[st]
        shape = info["shape"]
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(_is_int(s) and 0 <= s <= MAX_DIM for s in shape)):
            raise fail(f"shape must be a list of at most {MAX_RANK} non-negative integers, got {_short(shape)}", name)
        offs = info["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise fail(f"data_offsets must be [begin, end] integers, got {_short(offs)}", name)
        begin, end = offs
        if not 0 <= begin <= end <= data_size:
            raise fail(
                f"data_offsets [{begin}, {end}] must satisfy 0 <= begin <= end <= {data_size} "
                "(the data section's size; file truncated?)", name)
        itemsize = dtype.itemsize
        need = math.prod(shape) * itemsize
        if end - begin != need:
            raise fail(
                f"data_offsets [{begin}, {end}] span {end - begin} bytes, but {st}{shape} needs {need}", name)
        entries.append(TensorEntry(name, dtype, tuple(shape), begin, end))

    ordered = sorted(entries, key=lambda e: (e.begin, e.end))
    pos, prev = 0, None
    for e in ordered:
        if e.begin < pos:
            raise fail(f"data_offsets [{e.begin}, {e.end}] overlap tensor {prev!r} (which ends at {pos})", e.name)
        if e.begin > pos:
            raise fail(f"data_offsets [{e.begin}, {e.end}] leave a hole of {e.begin - pos} bytes before this tensor", e.name)
        pos, prev = e.end, e.name
    if pos != data_size:
        raise fail(f"the data section has {data_size} bytes but the tensors cover {pos} (holes are not allowed)")
    return 8 + n, {e.name: e for e in ordered}, metadata


def _short(v: object, limit: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _temp_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{secrets.token_hex(4)}")


def check_storable(name: str, t: object, file: str) -> None:
    """Raise CheckpointError unless ``t`` is a dense tensor with data of a storable dtype."""
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"expected a torch.Tensor, got {type(t).__name__}", file=file, tensor=name)
    if t.layout != torch.strided or t.device.type == "meta":
        raise CheckpointError(f"cannot store a {t.layout} tensor on {t.device}; pass a dense tensor with data",
                              file=file, tensor=name)
    if t.dtype not in ST_BY_DTYPE:
        raise CheckpointError(
            f"dtype {t.dtype} cannot be stored; supported: {', '.join(str(d) for d in ST_BY_DTYPE)}",
            file=file, tensor=name)


def _tensor_bytes(name: str, t: torch.Tensor, file: str) -> tuple[torch.Tensor, memoryview]:
    """A contiguous CPU copy-if-needed of ``t`` and a byte view of it (no copy when possible)."""
    check_storable(name, t, file)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    u8 = t.reshape(-1).view(torch.uint8)
    return t, memoryview(u8.numpy()).cast("B")


def _check_name(name: object, file: str) -> str:
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise CheckpointError(f"tensor names must be non-empty strings other than __metadata__, got {name!r}", file=file)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"tensor name {name!r} is not valid UTF-8", file=file) from None
    return name


def _check_metadata(metadata: Mapping[str, str] | None, file: str) -> dict[str, str]:
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise CheckpointError(f"metadata must map strings to strings, got {k!r}: {type(v).__name__}", file=file)
    return meta


def build_header(entries: list[TensorEntry], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length + JSON header, padded with spaces so the data starts 8-byte aligned."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for e in entries:
        header[e.name] = {"dtype": e.st_dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    try:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise CheckpointError(f"header is not encodable as UTF-8: {err}") from None
    text += b" " * ((-len(text)) % 8)
    if len(text) > MAX_HEADER_BYTES:
        raise CheckpointError(f"header would be {len(text)} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    return len(text).to_bytes(8, "little") + text


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (in the given order) and ``metadata`` as one safetensors file,
    atomically: a temporary name in the same folder, ``os.replace`` at the end."""
    path = Path(path)
    file = str(path)
    meta = _check_metadata(metadata, file)
    entries, pos = [], 0
    for name, t in tensors.items():
        _check_name(name, file)
        check_storable(name, t, file)
        nbytes = t.numel() * t.element_size()
        entries.append(TensorEntry(name, t.dtype, tuple(t.shape), pos, pos + nbytes))
        pos += nbytes
    head = _with_file(build_header, entries, meta, file=file)
    tmp = _temp_sibling(path, "tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(head)
            for name, t in tensors.items():
                _keep, view = _tensor_bytes(name, t, file)
                f.write(view)
                del _keep, view
        os.replace(tmp, path)
    except BaseException as err:
        _unlink_quiet(tmp)
        if isinstance(err, OSError):
            raise CheckpointError(f"cannot write: {err.strerror or err}", file=file) from None
        raise
    return path


class _WriterContext:
    """``with`` support for the writers: ``close()`` on success, ``abort()`` on an exception."""

    _closed: bool

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()  # type: ignore[attr-defined]
        elif not self._closed:
            self.close()  # type: ignore[attr-defined]


def _discard(f, path: Path) -> None:
    try:
        f.close()
    except OSError:  # pragma: no cover
        pass
    _unlink_quiet(path)


class PlannedFileWriter(_WriterContext):
    """A safetensors file whose tensor names, dtypes and shapes are known before any data (e.g.
    dequantizing a checkpoint): the header is written first and each tensor's bytes go straight
    to their place, so unlike :class:`ShardWriter` nothing is written twice. Tensors must arrive
    in plan order with the planned dtype and shape. Written under a temporary name and
    ``os.replace``-d on ``close()``; ``abort()`` (or an exception in a ``with`` block) leaves
    nothing behind."""

    def __init__(self, path: str | os.PathLike, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        file = str(self.path)
        meta = _check_metadata(metadata, file)
        self._entries: list[TensorEntry] = []
        pos = 0
        for name, dtype, shape in plan:
            _check_name(name, file)
            if dtype not in ST_BY_DTYPE:
                raise CheckpointError(f"dtype {dtype} cannot be stored", file=file, tensor=name)
            nbytes = math.prod(shape) * dtype.itemsize
            self._entries.append(TensorEntry(name, dtype, tuple(shape), pos, pos + nbytes))
            pos += nbytes
        head = _with_file(build_header, self._entries, meta, file=file)
        self._tmp = _temp_sibling(self.path, "tmp")
        try:
            self._f = open(self._tmp, "xb")
            self._f.write(head)
        except OSError as e:
            _unlink_quiet(self._tmp)
            raise CheckpointError(f"cannot write: {e.strerror or e}", file=file) from None
        self._next = 0
        self._closed = False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        file = str(self.path)
        if self._closed or self._next >= len(self._entries):
            raise CheckpointError("no more tensors are planned for this file", file=file, tensor=name)
        e = self._entries[self._next]
        if name != e.name or tensor.dtype != e.dtype or tuple(tensor.shape) != e.shape:
            raise CheckpointError(
                f"expected tensor {e.name!r} {e.dtype}{list(e.shape)} next, got {name!r} {tensor.dtype}{list(tensor.shape)}",
                file=file, tensor=name)
        _keep, view = _tensor_bytes(name, tensor, file)
        try:
            self._f.write(view)
        except OSError as err:
            self.abort()
            raise CheckpointError(f"cannot write: {err.strerror or err}", file=file, tensor=name) from None
        self._next += 1

    def close(self) -> Path:
        if self._closed:
            raise CheckpointError("file writer is already closed", file=str(self.path))
        if self._next != len(self._entries):
            missing = [e.name for e in self._entries[self._next:]]
            self.abort()
            raise CheckpointError(f"{len(missing)} planned tensors were never written: {missing[:5]}", file=str(self.path))
        try:
            self._f.close()
            os.replace(self._tmp, self.path)
        except OSError as err:
            self.abort()
            raise CheckpointError(f"cannot write: {err.strerror or err}", file=str(self.path)) from None
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Discard everything written; leaves no file behind. Safe to call twice."""
        self._closed = True
        _discard(self._f, self._tmp)


def _with_file(fn, *args, file: str, tensor: str | None = None):
    try:
        return fn(*args)
    except CheckpointError as e:
        raise e.at(file=file, tensor=tensor) from None


def _unlink_quiet(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
    except OSError:  # pragma: no cover - best effort cleanup
        pass


def _copy_range(src_fd: int, dst_fd: int, count: int) -> None:
    """Copy ``count`` bytes from the current offsets: kernel-side where possible, else chunked."""
    left = count
    if hasattr(os, "copy_file_range"):
        try:
            while left > 0:
                n = os.copy_file_range(src_fd, dst_fd, min(left, 1 << 30))
                if n == 0:
                    break
                left -= n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
    if left <= 0:
        return
    buf = bytearray(min(_COPY_CHUNK, left))
    view = memoryview(buf)
    while left > 0:
        n = os.readv(src_fd, [view[: min(left, len(buf))]])
        if n == 0:
            raise OSError(f"data file ended {left} bytes early")
        written = 0
        while written < n:
            written += os.write(dst_fd, view[written:n])
        left -= n


class ShardWriter(_WriterContext):
    """Stream tensors into one safetensors file without holding them in memory.

    ``add()`` appends a tensor's bytes to a temporary data file beside ``path``; ``close()``
    writes the header (known only then: names, offsets, ``metadata``) to a temporary final file,
    copies the data file after it (``copy_file_range`` or 16 MiB chunks), ``os.replace``-s it to
    ``path`` and removes the temporaries. ``abort()`` (or an exception in a ``with`` block)
    removes everything. ``metadata`` may be changed until ``close()``.
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.metadata: dict[str, str] = dict(metadata or {})
        self._entries: list[TensorEntry] = []
        self._names: set[str] = set()
        self._pos = 0
        self._data_path = _temp_sibling(self.path, "data")
        try:
            self._data = open(self._data_path, "xb")
        except OSError as e:
            raise CheckpointError(f"cannot create a temporary data file: {e.strerror or e}", file=str(self.path)) from None
        self._closed = False

    @property
    def nbytes(self) -> int:
        """Data bytes written so far."""
        return self._pos

    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, name: str, tensor: torch.Tensor) -> TensorEntry:
        file = str(self.path)
        if self._closed:
            raise CheckpointError("shard writer is closed", file=file, tensor=name)
        _check_name(name, file)
        if name in self._names:
            raise CheckpointError("duplicate tensor name", file=file, tensor=name)
        t, view = _tensor_bytes(name, tensor, file)
        entry = TensorEntry(name, t.dtype, tuple(t.shape), self._pos, self._pos + len(view))
        try:
            self._data.write(view)
        except BaseException as e:  # a partly written tensor would shift every later offset
            self.abort()
            if isinstance(e, OSError):
                raise CheckpointError(f"cannot write: {e.strerror or e}", file=file, tensor=name) from None
            raise
        self._pos = entry.end
        self._entries.append(entry)
        self._names.add(name)
        return entry

    def close(self) -> Path:
        """Write the final file and remove the temporaries; returns ``path``."""
        if self._closed:
            raise CheckpointError("shard writer is already closed", file=str(self.path))
        file = str(self.path)
        tmp = _temp_sibling(self.path, "tmp")
        try:
            meta = _check_metadata(self.metadata, file)
            head = _with_file(build_header, self._entries, meta, file=file)
            self._data.flush()
            self._data.close()
            with open(self._data_path, "rb") as src, open(tmp, "xb") as dst:
                dst.write(head)
                dst.flush()
                _copy_range(src.fileno(), dst.fileno(), self._pos)
            if os.path.getsize(tmp) != len(head) + self._pos:
                raise OSError(f"wrote {os.path.getsize(tmp)} bytes, expected {len(head) + self._pos}")
            os.replace(tmp, self.path)
        except BaseException as err:
            _unlink_quiet(tmp)
            self.abort()
            if isinstance(err, OSError):
                raise CheckpointError(f"cannot write: {err.strerror or err}", file=file) from None
            raise
        self._closed = True
        _unlink_quiet(self._data_path)
        return self.path

    def abort(self) -> None:
        """Discard everything written; leaves no file behind. Safe to call twice."""
        self._closed = True
        _discard(self._data, self._data_path)


__all__ = [
    "PlannedFileWriter",
    "MAX_HEADER_BYTES",
    "MMAP_MIN_BYTES",
    "SafetensorsFile",
    "ShardWriter",
    "TensorEntry",
    "build_header",
    "check_storable",
    "parse_json_strict",
    "write_safetensors",
]
