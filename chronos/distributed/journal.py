"""A durable coordinator state: an append-only commit log plus periodic atomic snapshots.

:class:`Journal` keeps a state directory ``state_dir``::

    LOCK                      an fcntl.flock lock (holds the owner's pid): one Journal per dir
    snapshot-<V>.chs          the state at version V, a chronos.core.safeio tensor file
    log-<V>.chl               the records appended after snapshot V (a "segment")
    log-000000000000.chl      the records appended before any snapshot

``<V>`` is the version written with 12 digits (``snapshot-000000000042.chs``). Nothing is ever
unpickled: records and snapshots are JSON plus raw little-endian tensor bytes, parsed and
checked before anything is allocated.

**Record encoding** (every integer little-endian, ``u32`` = unsigned 32-bit)::

    magic        4 bytes   b"CHR1"
    payload_len  u32       P, at most MAX_PAYLOAD_BYTES (2 GiB)
    crc32        u32       zlib.crc32 of the payload
    payload      P bytes   [u32 json_len J (<= MAX_JSON_BYTES, 64 MiB)]
                           [J bytes UTF-8 JSON {"kind": str, "meta": {...},
                                                "tensors": [[name, dtype, shape], ...]}]
                           [each tensor's raw bytes, in that order, back to back]

A dtype is a name of :data:`chronos.core.safeio.DTYPES` (``bfloat16`` is stored as its 2-byte
pattern); a shape is a list of non-negative ints. A record is valid only if the magic is right,
the length is within its cap and inside the file, the CRC matches, the JSON parses (no NaN, no
repeated key) into exactly those fields, every dtype and shape is allowed, the tensors' byte
counts add up to exactly ``P - 4 - J`` and bool tensors hold only 0 and 1. Decoded tensors are
fresh, writable, contiguous CPU tensors.

**Writing.** :meth:`Journal.append` encodes a record at once (later in-place changes to its
tensors do not reach the log) and buffers it; :meth:`Journal.flush` writes the buffer to the
current segment and ``fsync`` s it according to ``sync``: ``"always"`` after every record,
``"batch"`` once per flush (group commit), ``"none"`` never (the OS cache only; a power loss can
lose recent records, a process crash cannot). Acknowledge a commit only after the flush that
wrote it. A record fully written but whose flush then failed may still be replayed: the replay
must accept records whose acknowledgement was never sent.

**Snapshots.** :meth:`Journal.snapshot` flushes, ``fsync`` s the current segment (whatever
``sync`` is: the snapshot chain depends on it), writes ``snapshot-<V>.chs`` atomically with
:func:`~chronos.core.safeio.save_tensors` (the tree's tensors as tensors, the JSON tree from
:func:`flatten_tree` in the metadata), creates an empty ``log-<V>.chl`` (``fsync`` of the file
and of the directory), then deletes the snapshots and segments older than the newest
``keep_snapshots`` snapshots (until there are that many, the initial state counts as one: its
``log-000000000000.chl`` is kept). ``V`` must exceed the current segment's version; it may equal it
only while that segment is empty (e.g. a snapshot of the initial state at version 0).

**Restoring.** :meth:`Journal.restore` returns the newest snapshot that loads cleanly and the
records written after it. The state of snapshot ``V2`` equals the state of the snapshot ``V1``
before it plus the records of ``log-V1``; so when the newest snapshot is corrupt, the journal
falls back to the previous one and replays *every* segment from it onwards, in order
(``log-V1`` then ``log-V2``), and nothing acknowledged is lost. In general it replays all
segments whose version is at least the version of the snapshot used (``0`` without one). A
corrupt snapshot is renamed ``snapshot-<V>.chs.corrupt`` (kept for inspection, never read
again). With ``keep_snapshots >= 2`` the segment a fallback needs still exists; with ``1`` a
corrupt newest snapshot is fatal (:class:`~chronos.core.errors.CorruptFileError`).

Only the last segment of the replay can have a torn tail (a crash during a write): the first
invalid record and everything after it are truncated from the file, with a warning giving the
byte offset and the number of bytes dropped. An invalid record in an earlier segment of the
chain (only reachable after a fallback) means records the later segments build on are gone:
restore raises :class:`~chronos.core.errors.CorruptFileError` and changes nothing. ``restore()``
returns ``None`` as the tree when no snapshot exists (or when it fell back past the oldest
one): the records then apply to the initial state, which the caller builds. Stray temporary
files of an interrupted snapshot write are removed.

A Journal is meant for a single thread (the coordinator's); it is not thread-safe.

Example:
    >>> import tempfile, torch
    >>> from chronos.distributed.journal import Journal, Record
    >>> state_dir = tempfile.mkdtemp()
    >>> with Journal(state_dir) as j:
    ...     j.restore()
    ...     j.append(Record("commit", {"worker": "w3", "version": 0}, {"g": torch.ones(2)}))
    ...     j.flush()
    (None, [])
    1
    >>> with Journal(state_dir) as j:
    ...     tree, records = j.restore()
    ...     j.snapshot({"w": records[0].tensors["g"] * 2, "lr": 0.1}, version=1)
    >>> [(r.kind, r.meta) for r in records]
    [('commit', {'worker': 'w3', 'version': 0})]
    >>> with Journal(state_dir) as j:
    ...     j.restore()
    ({'w': tensor([2., 2.]), 'lr': 0.1}, [])
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import re
import struct
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import torch
from torch import Tensor

from chronos.core.errors import (
    ChronosError,
    ChronosTypeError,
    ConfigError,
    CorruptFileError,
    VersionError,
)
from chronos.core.safeio import (
    _NAMES,
    DTYPES,
    _check_json,
    _fsync_dir,
    _le_bytes,
    _no_constant,
    _prepare,
    _unique_pairs,
    load_tensors,
    save_tensors,
    tensor_spec_problem,
    unstorable,
)

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_PAYLOAD_BYTES",
    "RECORD_MAGIC",
    "Journal",
    "Record",
    "SyncPolicy",
    "flatten_tree",
    "unflatten_tree",
]

log = logging.getLogger("chronos.journal")

RECORD_MAGIC = b"CHR1"
"""The first 4 bytes of every record."""
MAX_PAYLOAD_BYTES = 2**31
"""Cap on a record's payload (a crafted length cannot make the reader allocate more)."""
MAX_JSON_BYTES = 64 * 2**20
"""Cap on a record's JSON part."""

SyncPolicy = Literal["always", "batch", "none"]
_POLICIES = ("always", "batch", "none")

_FRAME = struct.Struct("<4sII")
_U32 = struct.Struct("<I")
_SNAPSHOT_FORMAT = 1
_MAX_VERSION = 10**12 - 1
_SNAP_RE = re.compile(r"snapshot-(\d{12})\.chs")
_SEG_RE = re.compile(r"log-(\d{12})\.chl")
_TMP_RE = re.compile(r"\.snapshot-\d{12}\.chs\..+\.tmp")  # save_tensors' temporary files

_TENSOR, _ITEMS, _TUPLE = "__tensor__", "__items__", "__tuple__"
_MARKERS = frozenset((_TENSOR, _ITEMS, _TUPLE))


# --------------------------------------------------------------------------------------------
# Trees


def _is_scalar(x: Any, where: str) -> bool:
    """Whether ``x`` is a JSON scalar of a tree (``None``, bool, int, str, finite float)."""
    if x is None or type(x) in (bool, int, str):
        return True
    if type(x) is float:
        if not math.isfinite(x):
            raise ChronosTypeError(f"{where} is {x}; a tree holds finite floats only")
        return True
    return False


def flatten_tree(obj: Any) -> tuple[Any, dict[str, Tensor]]:
    """Split a nested structure into a JSON-able tree and its tensors, by name.

    Accepted: dicts (keys all ``str``, or ``str`` and ``int``), lists, tuples, tensors (dtypes
    of :data:`~chronos.core.safeio.DTYPES`, strided) and the JSON scalars ``None``, ``bool``,
    ``int``, finite ``float`` and ``str`` (exactly those types, no subclasses). In the tree a
    tensor becomes ``{"__tensor__": "t0"}`` (``t0``, ``t1``, … in depth-first order), a dict
    with a non-``str`` key ``{"__items__": [[k, v], ...]}`` and a tuple ``{"__tuple__": [...]}``.
    :func:`unflatten_tree` is the exact inverse, up to: dict subclasses (``OrderedDict``) come
    back as ``dict``, list subclasses as ``list``, tensors as plain CPU tensors without
    ``requires_grad``, and a tensor that appears twice as two separate tensors.

    The returned tensors are the caller's own (not copies). Anything else (a set, an object, a
    namedtuple, NaN or ±Inf, a ``bool``/``float``/``None`` key, a ``str`` key equal to one of
    the three markers, a cycle) raises :class:`~chronos.core.errors.ChronosTypeError`.

    Example:
        >>> import torch
        >>> tree, tensors = flatten_tree({"lr": 0.1, "state": {0: torch.zeros(2)}, "b": (1, 2)})
        >>> tree["state"], tree["b"]
        ({'__items__': [[0, {'__tensor__': 't0'}]]}, {'__tuple__': [1, 2]})
        >>> tensors
        {'t0': tensor([0., 0.])}
        >>> unflatten_tree(tree, tensors)
        {'lr': 0.1, 'state': {0: tensor([0., 0.])}, 'b': (1, 2)}
    """
    tensors: dict[str, Tensor] = {}
    active: set[int] = set()

    def walk(x: Any, where: str) -> Any:
        if _is_scalar(x, where):
            return x
        if isinstance(x, Tensor):
            problem = unstorable(x)
            if problem is not None:
                raise ChronosTypeError(f"{where} {problem}")
            name = f"t{len(tensors)}"
            tensors[name] = x
            return {_TENSOR: name}
        if not isinstance(x, (dict, list)) and type(x) is not tuple:
            hint = " (a namedtuple? pass a tuple or a dict)" if isinstance(x, tuple) else ""
            raise ChronosTypeError(
                f"{where} is a {type(x).__name__}{hint}; a tree may hold dict, list, tuple, "
                "Tensor, str, int, finite float, bool and None"
            )
        if id(x) in active:
            raise ChronosTypeError(f"{where} contains itself; a tree cannot have cycles")
        active.add(id(x))
        try:
            if isinstance(x, list):
                return [walk(v, f"{where}[{i}]") for i, v in enumerate(x)]
            if isinstance(x, tuple):
                return {_TUPLE: [walk(v, f"{where}[{i}]") for i, v in enumerate(x)]}
            for k in x:
                if type(k) not in (str, int):
                    raise ChronosTypeError(
                        f"{where} has a key {k!r} of type {type(k).__name__}; tree dict keys "
                        "must be str or int"
                    )
                if k in _MARKERS:
                    raise ChronosTypeError(
                        f"{where} has the key {k!r}, which is reserved in trees "
                        f"({', '.join(sorted(_MARKERS))})"
                    )
            if all(type(k) is str for k in x):
                return {k: walk(v, f"{where}[{k!r}]") for k, v in x.items()}
            return {_ITEMS: [[k, walk(v, f"{where}[{k!r}]")] for k, v in x.items()]}
        finally:
            active.discard(id(x))

    try:
        return walk(obj, "tree"), tensors
    except RecursionError:
        raise ChronosTypeError("the tree is nested too deeply to be saved") from None


def unflatten_tree(tree: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The inverse of :func:`flatten_tree`: rebuild the structure from the JSON tree and the
    tensors by name (placed as given, not copied).

    A malformed tree (an unknown tensor name, a marker dict with other keys, an ``__items__``
    entry that is not a ``[str | int, value]`` pair or repeats a key, a non-JSON value) raises
    :class:`~chronos.core.errors.ChronosTypeError`.

    Example:
        >>> import torch
        >>> unflatten_tree({"__items__": [[3, {"__tuple__": [1, "a"]}]]}, {})
        {3: (1, 'a')}
    """

    def walk(x: Any, where: str) -> Any:
        if _is_scalar(x, where):
            return x
        if type(x) is list:
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if type(x) is not dict:
            raise ChronosTypeError(f"{where} is a {type(x).__name__}, not part of a JSON tree")
        marked = _MARKERS.intersection(x)
        if not marked:
            for k in x:
                if type(k) is not str:
                    raise ChronosTypeError(f"{where} has a non-str key {k!r}")
            return {k: walk(v, f"{where}[{k!r}]") for k, v in x.items()}
        if len(x) != 1:
            raise ChronosTypeError(
                f"{where} mixes the marker {sorted(marked)[0]!r} with other keys {sorted(x)}"
            )
        ((mark, value),) = x.items()
        if mark == _TENSOR:
            if type(value) is not str or value not in tensors:
                raise ChronosTypeError(f"{where} refers to a tensor {value!r} that is not given")
            t = tensors[value]
            if not isinstance(t, Tensor):
                raise ChronosTypeError(f"tensors[{value!r}] is a {type(t).__name__}")
            return t
        if type(value) is not list:
            raise ChronosTypeError(f"{where}[{mark!r}] must be a list")
        if mark == _TUPLE:
            return tuple(walk(v, f"{where}[{i}]") for i, v in enumerate(value))
        out: dict[Any, Any] = {}
        for pair in value:
            if type(pair) is not list or len(pair) != 2 or type(pair[0]) not in (str, int):
                raise ChronosTypeError(f"{where} has an item {pair!r} that is not a [key, value]")
            if pair[0] in out:
                raise ChronosTypeError(f"{where} repeats the key {pair[0]!r}")
            out[pair[0]] = walk(pair[1], f"{where}[{pair[0]!r}]")
        return out

    try:
        return walk(tree, "tree")
    except RecursionError:
        raise ChronosTypeError("the tree is nested too deeply") from None


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Record:
    """One log entry: a ``kind`` (e.g. ``"commit"``, ``"step"``, ``"lease"``, ``"bind"``,
    ``"discard"``), JSON ``meta`` (dict with str keys of dict, list, str, int, finite float,
    bool, None; tuples read back as lists) and named CPU ``tensors`` (dtypes of
    :data:`~chronos.core.safeio.DTYPES`).

    Equality compares kind, meta and the tensors' names, dtypes, shapes and bits (NaN equals
    NaN, ``-0.0`` differs from ``0.0``); records are not hashable.
    """

    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ChronosTypeError(f"Record.kind must be a non-empty str, got {self.kind!r}")
        if not isinstance(self.meta, dict):
            raise ChronosTypeError(f"Record.meta must be a dict, got {type(self.meta).__name__}")
        if not isinstance(self.tensors, dict):
            raise ChronosTypeError(
                f"Record.tensors must be a dict[str, Tensor], got {type(self.tensors).__name__}"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        if self.kind != other.kind or self.meta != other.meta:
            return False
        if list(self.tensors) != list(other.tensors):
            return False
        for name, a in self.tensors.items():
            b = other.tensors[name]
            if a.dtype != b.dtype or a.shape != b.shape:
                return False
            if not torch.equal(_bits(a), _bits(b)):
                return False
        return True


def _bits(t: Tensor) -> Tensor:
    return _le_bytes(t.detach().to("cpu").contiguous())


def _encode(record: Record) -> bytes:
    """One framed record (see the module doc); raises on a record that cannot be logged."""
    if not isinstance(record, Record):
        raise ChronosTypeError(f"append() takes a Record, got {type(record).__name__}")
    _check_json(record.meta, "Record.meta")
    items = _prepare(record.tensors)
    specs = [[name, _NAMES[t.dtype], list(t.shape)] for name, t in items]
    text = json.dumps(
        {"kind": record.kind, "meta": record.meta, "tensors": specs},
        allow_nan=False, separators=(",", ":"),
    ).encode("utf-8")
    if len(text) > MAX_JSON_BYTES:
        raise ConfigError(
            f"a {record.kind!r} record's JSON is {len(text)} bytes, over the {MAX_JSON_BYTES}"
            "-byte cap: put large arrays in tensors, not meta"
        )
    parts = [_U32.pack(len(text)), text]
    parts += [_le_bytes(t).numpy().tobytes() for _, t in items if t.numel()]
    payload = b"".join(parts)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ConfigError(
            f"a {record.kind!r} record is {len(payload)} bytes, over the {MAX_PAYLOAD_BYTES}"
            "-byte cap of one record"
        )
    return _FRAME.pack(RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload


class _Invalid(Exception):
    """A record that fails a check (internal: becomes a truncation or a CorruptFileError)."""


def _decode_payload(payload: bytearray) -> Record:
    if len(payload) < _U32.size:
        raise _Invalid(f"a {len(payload)}-byte payload is too short")
    (jlen,) = _U32.unpack_from(payload, 0)
    if jlen > MAX_JSON_BYTES or _U32.size + jlen > len(payload):
        raise _Invalid(f"JSON length {jlen} does not fit in a {len(payload)}-byte payload")
    try:
        obj = json.loads(bytes(payload[_U32.size:_U32.size + jlen]).decode("utf-8"),
                         parse_constant=_no_constant, object_pairs_hook=_unique_pairs)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _Invalid(f"its JSON is invalid ({e})") from None
    if not isinstance(obj, dict) or set(obj) != {"kind", "meta", "tensors"}:
        raise _Invalid("its JSON must be an object with exactly 'kind', 'meta' and 'tensors'")
    kind, meta, entries = obj["kind"], obj["meta"], obj["tensors"]
    if not isinstance(kind, str) or not kind or not isinstance(meta, dict):
        raise _Invalid("its 'kind' must be a non-empty string and 'meta' an object")
    if not isinstance(entries, list):
        raise _Invalid("its 'tensors' must be a list")
    specs: list[tuple[str, torch.dtype, list[int]]] = []
    names: set[str] = set()
    total = 0
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 3:
            raise _Invalid(f"tensor entry {entry!r} is not [name, dtype, shape]")
        name, dtype, shape = entry
        problem = tensor_spec_problem(name, dtype, shape, names)
        if problem is not None:
            raise _Invalid(problem)
        total += math.prod(shape) * DTYPES[dtype].itemsize
        specs.append((name, DTYPES[dtype], shape))
    offset = _U32.size + jlen
    if offset + total != len(payload):
        raise _Invalid(
            f"its tensors need {total} bytes, the payload holds {len(payload) - offset}"
        )
    view = memoryview(payload)
    tensors: dict[str, Tensor] = {}
    for name, dt, shape in specs:
        t = torch.empty(math.prod(shape), dtype=dt)
        nbytes = t.numel() * t.element_size()
        if nbytes:
            t.view(torch.uint8).numpy().data[:] = view[offset:offset + nbytes]
            offset += nbytes
            if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover
                t = _le_bytes(t).view(dt)
            if dt == torch.bool and bool((t.view(torch.uint8) > 1).any()):
                raise _Invalid(f"bool tensor {name!r} holds bytes other than 0 and 1")
        tensors[name] = t.reshape(shape)
    return Record(kind, meta, tensors)


@dataclass
class _Scan:
    records: list[Record]
    good_end: int  # byte offset just past the last valid record
    size: int
    problem: str | None  # why reading stopped before the end of the file


def _scan_segment(path: str) -> _Scan:
    records: list[Record] = []
    problem: str | None = None
    pos = 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while pos < size:
            head = f.read(_FRAME.size)
            if len(head) < _FRAME.size:
                problem = f"a partial record header ({len(head)} of {_FRAME.size} bytes)"
                break
            magic, plen, crc = _FRAME.unpack(head)
            left = size - pos - _FRAME.size
            if magic != RECORD_MAGIC:
                problem = f"bad magic {magic!r} (expected {RECORD_MAGIC!r})"
                break
            if plen < _U32.size or plen > MAX_PAYLOAD_BYTES:
                problem = f"a bad payload length {plen}"
                break
            if plen > left:
                problem = f"a partial record (a {plen}-byte payload, {left} bytes left)"
                break
            payload = bytearray(plen)
            if f.readinto(payload) != plen:
                problem = "a short read (was the file modified during restore?)"
                break
            if zlib.crc32(payload) != crc:
                problem = f"a CRC mismatch (stored {crc}, computed {zlib.crc32(payload)})"
                break
            try:
                records.append(_decode_payload(payload))
            except _Invalid as e:
                problem = f"an invalid record: {e}"
                break
            pos += _FRAME.size + plen
    return _Scan(records, pos, size, problem)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --------------------------------------------------------------------------------------------
# Journal


class Journal:
    """The commit log and snapshots of one coordinator in ``state_dir`` (see the module doc).

    Args:
        state_dir: the directory (created with mode ``0o700`` if missing). It is locked
            (``fcntl.flock`` on ``state_dir/LOCK``) until :meth:`close`; a second Journal on it
            raises :class:`~chronos.core.errors.ConfigError`.
        sync: when :meth:`flush` calls ``fsync``: ``"always"`` (after every record),
            ``"batch"`` (once per flush) or ``"none"``.
        keep_snapshots: snapshots kept (>= 1; >= 2 to survive a corrupt newest snapshot).

    Attributes:
        path: the absolute path of ``state_dir``.
        stats: ``records_written`` and ``bytes_written`` (by flushes), ``fsyncs`` (every
            ``fsync`` the journal makes on segments and the directory; not the two inside
            ``save_tensors``), ``snapshots`` (taken) and ``truncated_bytes`` (dropped by
            :meth:`restore`).

    Use: ``restore()`` once, then ``append``/``flush``/``snapshot`` any number of times, then
    ``close()`` (or use it as a context manager). After a failed write (``OSError``) the
    journal refuses further writes; restart and restore.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        sync: SyncPolicy = "batch",
        keep_snapshots: int = 2,
    ) -> None:
        if sync not in _POLICIES:
            raise ConfigError(f"sync must be one of {', '.join(_POLICIES)}, got {sync!r}")
        if type(keep_snapshots) is not int or keep_snapshots < 1:
            raise ConfigError(f"keep_snapshots must be an int >= 1, got {keep_snapshots!r}")
        self.path = os.path.abspath(os.fspath(state_dir))
        self.sync: SyncPolicy = sync
        self.keep_snapshots = keep_snapshots
        self.stats: dict[str, int] = {
            "records_written": 0, "bytes_written": 0, "fsyncs": 0, "snapshots": 0,
            "truncated_bytes": 0,
        }
        self._buffer: list[bytes] = []
        self._fd: int | None = None  # the current segment, open for appending
        self._base = 0  # the current segment's version
        self._seg_size = 0
        self._dirty = False  # bytes written to the current segment since its last fsync
        self._restored = False
        self._closed = False
        self._failed: BaseException | None = None
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"state_dir {self.path!r} exists and is not a directory") from None
        self._lock_fd = self._lock()

    def _lock(self) -> int:
        fd = os.open(os.path.join(self.path, "LOCK"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"state_dir {self.path!r} is in use: another Journal (process {holder}) "
                    "holds its LOCK; stop that coordinator or choose another state_dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return fd

    # -- file names ---------------------------------------------------------------------------

    def _snap_path(self, version: int) -> str:
        return os.path.join(self.path, f"snapshot-{version:012d}.chs")

    def _seg_path(self, version: int) -> str:
        return os.path.join(self.path, f"log-{version:012d}.chl")

    def _listing(self) -> tuple[list[int], list[int]]:
        snaps, segs = [], []
        for name in os.listdir(self.path):
            if m := _SNAP_RE.fullmatch(name):
                snaps.append(int(m.group(1)))
            elif m := _SEG_RE.fullmatch(name):
                segs.append(int(m.group(1)))
        return sorted(snaps), sorted(segs)

    # -- state checks -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ChronosError("this Journal was closed; open a new Journal on the directory")

    def _check_ready(self) -> int:
        self._check_open()
        if not self._restored or self._fd is None:
            raise ChronosError("call Journal.restore() once before appending or snapshotting")
        if self._failed is not None:
            raise ChronosError(
                f"an earlier write to {self.path!r} failed ({self._failed}); the journal takes "
                "no more writes: restart and restore() (a partial record is truncated then)"
            )
        return self._fd

    def _fsync(self, fd: int) -> None:
        os.fsync(fd)
        self.stats["fsyncs"] += 1

    def _sync_dir(self) -> None:
        _fsync_dir(self.path)
        self.stats["fsyncs"] += 1

    # -- restore ------------------------------------------------------------------------------

    def _load_snapshot(self, version: int) -> Any:
        path = self._snap_path(version)
        tensors, meta = load_tensors(path)
        info = meta.get("journal")
        if (set(meta) != {"journal", "tree"} or not isinstance(info, dict)
                or info.get("format") != _SNAPSHOT_FORMAT or info.get("version") != version):
            raise CorruptFileError(
                f"{path!r} is a tensor file but not a journal snapshot of version {version}"
            )
        return unflatten_tree(meta["tree"], tensors)

    def restore(self) -> tuple[Any | None, list[Record]]:
        """Load the newest valid snapshot and the records logged after it (see the module doc).

        Returns ``(tree, records)``: the snapshot's tree rebuilt by :func:`unflatten_tree`
        (``None`` without a usable snapshot) and the records in the order they were appended.
        Truncates a torn or corrupt tail of the last segment and opens it for appending. Call it
        exactly once, before :meth:`append`. Raises
        :class:`~chronos.core.errors.CorruptFileError` when the records a fallback needs are
        gone (then nothing is changed on disk).
        """
        self._check_open()
        if self._restored:
            raise ChronosError("Journal.restore() was already called")
        for name in os.listdir(self.path):
            if _TMP_RE.fullmatch(name):  # an interrupted snapshot write: never renamed in
                log.info("removing %s, left by an interrupted snapshot", name)
                os.unlink(os.path.join(self.path, name))
        snaps, segs = self._listing()
        tree: Any = None
        start: int | None = None
        bad: list[int] = []
        for version in reversed(snaps):
            try:
                tree = self._load_snapshot(version)
            except (CorruptFileError, ChronosTypeError) as e:
                log.warning("snapshot %d is unusable, falling back to an older one: %s",
                            version, e)
                bad.append(version)
                continue
            start = version
            break
        base = 0 if start is None else start
        chain = [v for v in segs if v >= base]
        if (chain and chain[0] != base) or (bad and not chain):
            where = "the initial state" if start is None else f"snapshot {base}"
            raise CorruptFileError(
                f"cannot restore {self.path!r}: snapshot(s) {sorted(bad)} are unusable and the "
                f"log segment {os.path.basename(self._seg_path(base))} that follows {where} is "
                f"missing (segments present: {segs}); keep_snapshots >= 2 keeps it"
            )
        records: list[Record] = []
        tail: _Scan | None = None
        for i, version in enumerate(chain):
            scan = _scan_segment(self._seg_path(version))
            records.extend(scan.records)
            if scan.problem is not None and i < len(chain) - 1:
                raise CorruptFileError(
                    f"{self._seg_path(version)!r} has {scan.problem} at byte {scan.good_end}, "
                    f"but the later segments {chain[i + 1:]} build on the records after it "
                    "(restoring from an older snapshot needs all of them)"
                )
            tail = scan
        last = chain[-1] if chain else base
        path = self._seg_path(last)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if tail is None:  # a fresh directory, or a crash before the segment was created
                self._fsync(fd)
                self._sync_dir()
            elif tail.problem is not None:
                dropped = tail.size - tail.good_end
                log.warning(
                    "%s: %s at byte offset %d; truncating the torn or corrupt tail (%d bytes "
                    "dropped, %d records kept from this segment)",
                    path, tail.problem, tail.good_end, dropped, len(tail.records),
                )
                os.ftruncate(fd, tail.good_end)
                self._fsync(fd)
                self.stats["truncated_bytes"] += dropped
            for version in bad:
                target = self._snap_path(version) + ".corrupt"
                os.replace(self._snap_path(version), target)
                log.warning("renamed the unusable snapshot to %s", target)
            if bad:
                self._sync_dir()
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._base, self._restored = fd, last, True
        self._seg_size = 0 if tail is None else tail.good_end
        return tree, records

    # -- writing ------------------------------------------------------------------------------

    def append(self, record: Record) -> None:
        """Encode ``record`` now and buffer it until the next :meth:`flush` (nothing is durable
        before that). Raises :class:`~chronos.core.errors.ChronosTypeError` or
        :class:`~chronos.core.errors.ConfigError` for a record that cannot be logged."""
        self._check_ready()
        self._buffer.append(_encode(record))

    def flush(self) -> int:
        """Write the buffered records, ``fsync`` per the ``sync`` policy; returns how many were
        written (no ``fsync`` when there were none)."""
        fd = self._check_ready()
        if not self._buffer:
            return 0
        frames, self._buffer = self._buffer, []
        try:
            for frame in frames:
                _write_all(fd, frame)
                self._dirty = True
                self._seg_size += len(frame)
                self.stats["records_written"] += 1
                self.stats["bytes_written"] += len(frame)
                if self.sync == "always":
                    self._fsync(fd)
                    self._dirty = False
            if self.sync == "batch":
                self._fsync(fd)
                self._dirty = False
        except OSError as e:
            self._failed = e
            raise
        return len(frames)

    def snapshot(self, tree: Any, version: int) -> None:
        """Flush, then save ``tree`` as ``snapshot-<version>.chs``, start ``log-<version>.chl``
        and delete what is older than the newest ``keep_snapshots`` snapshots.

        ``version`` (0 to 10**12 - 1) must exceed the current segment's version, or equal it
        while nothing was logged in that segment; otherwise
        :class:`~chronos.core.errors.VersionError`. A tree :func:`flatten_tree` refuses raises
        before anything is written.
        """
        fd = self._check_ready()
        if type(version) is not int or not 0 <= version <= _MAX_VERSION:
            raise ConfigError(f"version must be an int in [0, {_MAX_VERSION}], got {version!r}")
        if version < self._base or (version == self._base and (self._seg_size or self._buffer)):
            raise VersionError(
                f"snapshot version {version} must be greater than {self._base}, the version of "
                "the current log segment (or equal to it while that segment is empty)"
            )
        flat, tensors = flatten_tree(tree)
        self.flush()
        try:
            if self._dirty:  # seal the segment: an older snapshot's replay may depend on it
                self._fsync(fd)
                self._dirty = False
            save_tensors(
                self._snap_path(version), tensors,
                {"journal": {"format": _SNAPSHOT_FORMAT, "version": version}, "tree": flat},
            )
            if version != self._base:
                new = os.open(self._seg_path(version),
                              os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
                self._fd, self._base, self._seg_size = new, version, 0
                os.close(fd)
                self._fsync(new)
                self._sync_dir()
            self.stats["snapshots"] += 1
            self._rotate()
        except OSError as e:
            self._failed = e
            raise

    def _rotate(self) -> None:
        # The initial state counts as a restore point (log-0 replays onto it) until there are
        # keep_snapshots snapshots; then everything older than the oldest kept one goes.
        snaps, segs = self._listing()
        if len(snaps) < self.keep_snapshots:
            return
        cutoff = snaps[-self.keep_snapshots]
        doomed = [self._snap_path(v) for v in snaps if v < cutoff]
        doomed += [self._seg_path(v) for v in segs if v < cutoff]
        for path in doomed:
            try:
                os.unlink(path)
            except FileNotFoundError:  # pragma: no cover - removed by hand meanwhile
                pass
        if doomed:
            self._sync_dir()

    def close(self) -> None:
        """Flush (unless a write failed earlier), close the segment and release the lock.
        Idempotent."""
        if self._closed:
            return
        try:
            if self._restored and self._failed is None:
                self.flush()
        finally:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._restored else "not restored")
        return f"Journal({self.path!r}, sync={self.sync!r}, segment={self._base}, {state})"
