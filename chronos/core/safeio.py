"""A safe on-disk format for named tensors plus JSON metadata: :func:`save_tensors`,
:func:`load_tensors`.

Nothing here unpickles: a file is bytes that are parsed, checked and copied into fresh tensors,
so loading a file cannot execute code. Layout (all integers little-endian)::

    offset 0    magic       8 bytes   b"\\x89CHRTNS\\n"
    offset 8    version     uint32    FORMAT_VERSION (1)
    offset 12   header_len  uint64    H  (at most ``max_header_bytes``, 64 MiB by default)
    offset 20   header      H bytes   UTF-8 JSON: {"tensors": [...], "metadata": {...}}
    offset 20+H data        Σ nbytes  each tensor's raw little-endian bytes, back to back
    end - 4     crc32       uint32    zlib.crc32 of every byte before it

Each entry of ``header["tensors"]`` is ``{"name", "dtype", "shape", "offset", "nbytes"}``
with ``offset`` counted from the start of the data section. The reader checks, before
allocating anything, the magic, the version, the header length against its cap and the file
size, that every dtype is in :data:`DTYPES`, that ``nbytes = numel(shape) · itemsize``, that
the tensors tile the data section exactly (``offset_i = Σ_{j<i} nbytes_j``) and that the file
size is ``20 + H + Σ nbytes + 4``; then it reads the tensors and compares the CRC-32. Any
failure raises :class:`~chronos.core.errors.CorruptFileError` naming the file and the problem.

Writes are atomic: a temporary file in the destination's directory is written, flushed and
``fsync``-ed, renamed over the destination with :func:`os.replace`, and the directory is
``fsync``-ed where the platform allows, so a crash leaves either the old file or the new one.
The file gets owner-only permissions (``0o600``, as :func:`tempfile.mkstemp` creates it).

Metadata is JSON: ``dict`` (``str`` keys), ``list``/``tuple`` (read back as lists), ``str``,
``int``, finite ``float``, ``bool`` and ``None``. Tensors are saved detached, on the CPU and
contiguous; they load as fresh CPU tensors with their dtype and shape.

Example:
    >>> import os, tempfile, torch
    >>> from chronos.core.safeio import load_tensors, save_tensors
    >>> path = os.path.join(tempfile.mkdtemp(), "state.chronos")
    >>> save_tensors(path, {"w": torch.arange(6.0).reshape(2, 3)}, metadata={"step": 7})
    >>> tensors, meta = load_tensors(path)
    >>> tensors["w"].shape, meta
    (torch.Size([2, 3]), {'step': 7})
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import torch
from torch import Tensor

from chronos.core.errors import ChronosTypeError, ConfigError, CorruptFileError

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "load_tensors",
    "save_tensors",
]

MAGIC = b"\x89CHRTNS\n"
"""The first 8 bytes of every file (a non-ASCII first byte and a newline catch text-mode
transfers, as in PNG)."""

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 2**20
"""Default cap on the JSON header (a crafted length cannot make the reader allocate more)."""

_PREFIX = struct.Struct("<8sIQ")
_CRC = struct.Struct("<I")
_MAX_DIMS = 64

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
"""The dtypes a file (and a wire frame, :mod:`chronos.distributed.protocol`) may hold, by the
name written in its header: no complex, quantized or sparse tensors."""

_NAMES = {v: k for k, v in DTYPES.items()}
PathLike = str | os.PathLike[str]


def _check_json(value: object, where: str) -> None:
    """Raise unless ``value`` survives a JSON round trip unchanged (up to tuple → list)."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where} is {value}; JSON metadata must be finite (use None)")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ChronosTypeError(
                    f"{where} has a key {k!r} of type {type(k).__name__}; JSON keys must be str"
                )
            _check_json(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
        return
    hint = "; save tensors as tensors, not metadata" if isinstance(value, Tensor) else ""
    raise ChronosTypeError(
        f"{where} is a {type(value).__name__}; metadata may hold dict, list, str, int, float, "
        f"bool and None{hint}"
    )


def _le_bytes(t: Tensor) -> Tensor:
    """The tensor's bytes in little-endian order, as a flat uint8 tensor."""
    b = t.reshape(-1).view(torch.uint8)
    size = t.element_size()
    if sys.byteorder != "little" and size > 1:  # pragma: no cover - big-endian hosts
        b = b.reshape(-1, size).flip(1).reshape(-1)
    return b


def unstorable(t: Tensor) -> str | None:
    """Why ``t`` cannot be stored (a sparse layout, a dtype outside :data:`DTYPES`), or
    ``None``."""
    if t.layout != torch.strided:
        return f"has layout {t.layout}; convert it with .to_dense() first"
    if t.dtype not in _NAMES:
        return f"has dtype {t.dtype}; allowed: {', '.join(DTYPES)} (cast it first)"
    return None


def _prepare(tensors: object) -> list[tuple[str, Tensor]]:
    if not isinstance(tensors, Mapping):
        raise ChronosTypeError(
            f"tensors must be a dict[str, Tensor], got {type(tensors).__name__}"
        )
    out = []
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise ChronosTypeError(f"tensor names must be str, got {type(name).__name__}")
        if not isinstance(t, Tensor):
            raise ChronosTypeError(f"tensors[{name!r}] is a {type(t).__name__}, not a Tensor")
        problem = unstorable(t)
        if problem is not None:
            raise ChronosTypeError(f"tensors[{name!r}] {problem}")
        out.append((name, t.detach().to("cpu").contiguous()))
    return out


def save_tensors(
    path: PathLike,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``tensors`` and JSON ``metadata`` to ``path`` atomically (see the module doc).

    Raises :class:`~chronos.core.errors.ChronosTypeError` for a tensor of a dtype outside
    :data:`DTYPES` or metadata that is not JSON, and ``OSError`` when the directory is not
    writable. ``path`` is replaced only once the new file is complete and on disk.
    """
    items = _prepare(tensors)
    meta = {} if metadata is None else metadata
    if not isinstance(meta, Mapping):
        raise ChronosTypeError(f"metadata must be a dict, got {type(meta).__name__}")
    _check_json(meta, "metadata")
    entries, offset = [], 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        entries.append(
            {"name": name, "dtype": _NAMES[t.dtype], "shape": list(t.shape),
             "offset": offset, "nbytes": nbytes}
        )
        offset += nbytes
    header = json.dumps({"tensors": entries, "metadata": dict(meta)}, allow_nan=False)
    hbytes = header.encode("utf-8")
    if len(hbytes) > MAX_HEADER_BYTES:
        raise ConfigError(
            f"the header of {os.fspath(path)!r} would be {len(hbytes)} bytes, over the "
            f"{MAX_HEADER_BYTES}-byte cap: store large arrays as tensors, not metadata"
        )
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(hbytes))
            crc = _write(f, prefix, 0)
            crc = _write(f, hbytes, crc)
            for _, t in items:
                if t.numel():
                    crc = _write(f, _le_bytes(t).numpy().data, crc)
            f.write(_CRC.pack(crc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _write(f: BinaryIO, data: bytes | memoryview, crc: int) -> int:
    f.write(data)
    return zlib.crc32(data, crc)


def _fsync_dir(directory: str) -> None:
    """Make the rename durable where directories can be opened (POSIX); a no-op elsewhere."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


def _no_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name} in the header")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a JSON object repeats a key")
    return out


def _parse_header(
    raw: bytes, fail: Callable[[str], CorruptFileError]
) -> tuple[list[tuple[str, torch.dtype, list[int]]], dict[str, Any]]:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant,
                            object_pairs_hook=_unique_pairs)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise fail(f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or set(header) != {"tensors", "metadata"}:
        raise fail("its header must be an object with exactly 'tensors' and 'metadata'")
    meta, entries = header["metadata"], header["tensors"]
    if not isinstance(meta, dict) or not isinstance(entries, list):
        raise fail("header 'metadata' must be an object and 'tensors' a list")
    out, offset = [], 0
    names: set[str] = set()
    fields = {"name", "dtype", "shape", "offset", "nbytes"}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != fields:
            raise fail(f"tensor entry {i} must have exactly the fields {sorted(fields)}")
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        problem = tensor_spec_problem(name, dtype, shape, names)
        if problem is not None:
            raise fail(f"tensor entry {i}: {problem}")
        numel = math.prod(shape)
        nbytes = numel * DTYPES[dtype].itemsize
        if type(entry["nbytes"]) is not int or entry["nbytes"] != nbytes:
            raise fail(
                f"tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes} bytes, "
                f"the header says {entry['nbytes']!r}"
            )
        if type(entry["offset"]) is not int or entry["offset"] != offset:
            raise fail(f"tensor {name!r} starts at {entry['offset']!r}, expected offset {offset}")
        offset += nbytes
        out.append((name, DTYPES[dtype], shape))
    return out, meta


def tensor_spec_problem(name: object, dtype: object, shape: object,
                        names: set[str]) -> str | None:
    """What is wrong with one tensor's ``name`` / ``dtype`` name / ``shape`` as read from a
    file (``None``: nothing; then ``name`` is added to ``names``, the names seen so far)."""
    if not isinstance(name, str) or name in names:
        return f"a missing or repeated name {name!r}"
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return f"tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(DTYPES)}"
    if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
            or not all(type(x) is int and x >= 0 for x in shape)):
        return f"tensor {name!r} has an invalid shape {shape!r}"
    names.add(name)
    return None


def load_tensors(
    path: PathLike, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`: ``(tensors, metadata)``.

    Every check of the module doc runs before data is trusted; a failure raises
    :class:`~chronos.core.errors.CorruptFileError` (a missing file raises
    ``FileNotFoundError``). ``max_header_bytes`` caps the JSON header the reader will parse.
    """
    where = os.fspath(path)

    def fail(problem: str) -> CorruptFileError:
        return CorruptFileError(
            f"{where!r} is not a valid Chronos tensor file: {problem}. Restore it from a "
            "backup or re-create it with chronos.core.safeio.save_tensors()"
        )

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise fail(f"it is {size} bytes long, shorter than the {_PREFIX.size}-byte prefix")
        magic, version, hlen = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise fail(
                f"wrong magic bytes {magic!r} (expected {MAGIC!r}); Chronos never reads "
                "pickle or torch.save files"
            )
        if version != FORMAT_VERSION:
            raise fail(
                f"format version {version}, this Chronos reads version {FORMAT_VERSION} "
                "(a newer Chronos wrote it? upgrade)"
            )
        if hlen > max_header_bytes:
            raise fail(f"header length {hlen} exceeds the cap of {max_header_bytes} bytes")
        if _PREFIX.size + hlen + _CRC.size > size:
            raise fail(f"truncated: a {hlen}-byte header does not fit in {size} bytes")
        raw = f.read(hlen)
        crc = zlib.crc32(raw, zlib.crc32(prefix))
        specs, meta = _parse_header(raw, fail)
        dtypes = {n: d for n, d, _ in specs}
        data = sum(math.prod(s) * d.itemsize for _, d, s in specs)
        expected = _PREFIX.size + hlen + data + _CRC.size
        if size != expected:
            kind = "truncated" if size < expected else "has trailing bytes"
            raise fail(f"{kind}: it is {size} bytes, its header describes {expected}")
        tensors: dict[str, Tensor] = {}
        for name, dtype, shape in specs:
            t = torch.empty(math.prod(shape), dtype=dtype)
            if t.numel():
                buf = t.view(torch.uint8).numpy().data
                if f.readinto(buf) != buf.nbytes:
                    raise fail("truncated while reading (was it modified during the read?)")
                crc = zlib.crc32(buf, crc)
                if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover
                    t = _le_bytes(t).view(dtype)
            tensors[name] = t.reshape(shape)
        stored = f.read(_CRC.size)
    if len(stored) != _CRC.size or _CRC.unpack(stored)[0] != crc:
        got = _CRC.unpack(stored)[0] if len(stored) == _CRC.size else None
        raise fail(f"checksum mismatch (stored {got}, computed {crc}): the file is corrupt")
    for name, t in tensors.items():
        if dtypes[name] == torch.bool and bool((t.view(torch.uint8) > 1).any()):
            raise fail(f"bool tensor {name!r} holds bytes other than 0 and 1")
    return tensors, meta
