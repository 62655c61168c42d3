"""journal: exact record round trips, torn and corrupt tails truncated at the last good record,
snapshots with rotation and fallback (nothing acknowledged lost), the directory lock, fsync
policies, and trees that carry optimizer state bit-exactly (never an unpickle)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import struct
import tempfile
import zlib
from collections import OrderedDict, namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from chronos.core.errors import (
    ChronosError,
    ChronosTypeError,
    ConfigError,
    CorruptFileError,
    VersionError,
)
from chronos.distributed.journal import (
    MAX_PAYLOAD_BYTES,
    RECORD_MAGIC,
    Journal,
    Record,
    flatten_tree,
    unflatten_tree,
)

pytestmark = pytest.mark.timeout(30)

KINDS = ("commit", "step", "lease", "bind", "discard")
SEG0 = "log-000000000000.chl"


def seg(v: int) -> str:
    return f"log-{v:012d}.chl"


def snap(v: int) -> str:
    return f"snapshot-{v:012d}.chs"


def make_record(i: int) -> Record:
    """Deterministic records cycling through kinds, dtypes, shapes and empty tensor dicts."""
    g = torch.Generator().manual_seed(i)
    kind = KINDS[i % len(KINDS)]
    tensors: dict[str, Tensor] = {}
    if i % 4 == 1:
        tensors = {
            "g32": torch.randn(3, 2, generator=g),
            "g64": torch.randn(4, dtype=torch.float64, generator=g),
            "idx": torch.randint(-(2**40), 2**40, (5,), dtype=torch.int64, generator=g),
            "bf": torch.randn(2, 3, generator=g).bfloat16(),
        }
    elif i % 4 == 2:
        tensors = {
            "scalar": torch.tensor(float(i)),
            "empty": torch.zeros(0, 3),
            "mask": torch.tensor([True, False, i % 2 == 0]),
            "u8": torch.arange(7, dtype=torch.uint8),
        }
    elif i % 4 == 3:
        tensors = {"t": torch.randn(4, 3, generator=g).T}  # not contiguous
    meta = {"i": i, "worker": f"w{i % 3}", "weight": 0.5**i, "ok": i % 2 == 0, "x": None,
            "nested": {"l": [1, 2.5, "s", [True]]}}
    return Record(kind, meta, tensors)


def apply_all(journal: Journal, records: list[Record], batch: int = 3) -> list[int]:
    """Append and flush ``records`` in groups; returns the segment size after each record."""
    ends = []
    for k in range(0, len(records), batch):
        for r in records[k:k + batch]:
            journal.append(r)
        journal.flush()
        ends.append(journal.stats["bytes_written"])
    return ends


def reopen(path: str | Path, **kw: Any) -> tuple[Any, list[Record], Journal]:
    j = Journal(path, **kw)
    tree, records = j.restore()
    return tree, records, j


def written_one_by_one(path: Path, records: list[Record]) -> list[int]:
    """Write each record with its own flush; return the byte offset where each one starts."""
    with Journal(path) as j:
        j.restore()
        starts = []
        for r in records:
            starts.append(j.stats["bytes_written"])
            j.append(r)
            j.flush()
    return starts


def same_tree(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# ------------------------------------------------------------------------------- records


def test_round_trip_every_kind_and_dtype(tmp_path: Path) -> None:
    records = [make_record(i) for i in range(40)]
    with Journal(tmp_path) as j:
        assert j.restore() == (None, [])
        apply_all(j, records)
    tree, got, j = reopen(tmp_path)
    j.close()
    assert tree is None
    assert got == records
    assert {r.kind for r in got} == set(KINDS)
    assert any(r.tensors == {} for r in got)
    for r in got:
        for t in r.tensors.values():
            assert t.device.type == "cpu" and t.is_contiguous()
    # fresh, writable, unshared tensors
    t = got[1].tensors["g32"]
    t.add_(1.0)
    assert not torch.equal(t, records[1].tensors["g32"])
    assert got[1].tensors["bf"].dtype == torch.bfloat16


def test_append_encodes_immediately_and_reports_files(tmp_path: Path) -> None:
    t = torch.zeros(3)
    with Journal(tmp_path) as j:
        j.restore()
        j.append(Record("commit", {}, {"g": t}))
        t.add_(5.0)  # after append: must not reach the log
        assert j.flush() == 1
        assert j.flush() == 0
        assert j.path == str(tmp_path)
    _, got, j = reopen(tmp_path)
    j.close()
    assert torch.equal(got[0].tensors["g"], torch.zeros(3))
    assert stat.S_IMODE(os.stat(tmp_path / SEG0).st_mode) == 0o600


def test_new_state_dir_is_private(tmp_path: Path) -> None:
    d = tmp_path / "a" / "state"
    with Journal(d) as j:
        j.restore()
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    with pytest.raises(ConfigError, match="not a directory"):
        Journal(d / SEG0)


def test_record_equality_is_bitwise() -> None:
    nan = torch.tensor([float("nan"), 0.0])
    assert Record("step", {}, {"x": nan}) == Record("step", {}, {"x": nan.clone()})
    assert Record("step", {}, {"x": torch.tensor([-0.0])}) != Record(
        "step", {}, {"x": torch.tensor([0.0])})
    assert Record("step", {}, {"x": torch.ones(2)}) != Record(
        "step", {}, {"x": torch.ones(2, dtype=torch.float64)})
    assert Record("step", {"a": 1}) != Record("lease", {"a": 1})
    assert Record("step") != "step"


@pytest.mark.parametrize(
    ("record", "error"),
    [
        (lambda: Record("", {}), ChronosTypeError),
        (lambda: Record(3, {}), ChronosTypeError),  # type: ignore[arg-type]
        (lambda: Record("x", [1]), ChronosTypeError),  # type: ignore[arg-type]
        (lambda: Record("x", {}, [torch.ones(1)]), ChronosTypeError),  # type: ignore[arg-type]
    ],
)
def test_bad_records_refused_at_construction(record: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        record()


@pytest.mark.parametrize(
    ("record", "error"),
    [
        (Record("x", {"s": {1, 2}}), ChronosTypeError),
        (Record("x", {1: "int key"}), ChronosTypeError),  # type: ignore[dict-item]
        (Record("x", {"f": float("nan")}), ConfigError),
        (Record("x", {}, {"c": torch.ones(2, dtype=torch.complex64)}), ChronosTypeError),
        (Record("x", {}, {"n": 3}), ChronosTypeError),  # type: ignore[dict-item]
    ],
)
def test_unloggable_records_refused_by_append(tmp_path: Path, record: Record,
                                              error: type[Exception]) -> None:
    with Journal(tmp_path) as j:
        j.restore()
        with pytest.raises(error):
            j.append(record)
        j.append(make_record(1))
        assert j.flush() == 1


# ------------------------------------------------------------------------- tails


def test_torn_tail_at_every_offset_of_the_last_record(tmp_path: Path) -> None:
    records = [make_record(i) for i in range(5)]
    records[-1] = Record("commit", {"i": 4}, {"g": torch.arange(3.0)})
    starts = written_one_by_one(tmp_path, records)
    path = tmp_path / SEG0
    full = path.read_bytes()
    start, extra = starts[-1], Record("step", {"after": True}, {"x": torch.ones(1)})
    assert len(full) - start > 50
    for off in range(start, len(full)):
        path.write_bytes(full[:off])
        _, got, j = reopen(tmp_path, sync="none")
        assert got == records[:-1], off
        assert os.path.getsize(path) == start
        assert j.stats["truncated_bytes"] == off - start
        j.append(extra)
        j.close()
        _, got, j = reopen(tmp_path, sync="none")
        j.close()
        assert got == [*records[:-1], extra], off


def test_flipped_byte_in_middle_record_drops_it_and_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [Record(KINDS[i], {"i": i}, {"g": torch.full((2,), float(i))}) for i in range(5)]
    starts = written_one_by_one(tmp_path, records)
    path = tmp_path / SEG0
    full = path.read_bytes()
    lo, hi = starts[2], starts[3]
    for off in range(lo, hi):
        damaged = bytearray(full)
        damaged[off] ^= 0xFF
        path.write_bytes(bytes(damaged))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="chronos.journal"):
            _, got, j = reopen(tmp_path)
        j.close()
        assert got == records[:2], off
        assert os.path.getsize(path) == lo
        msgs = [r.getMessage() for r in caplog.records]
        assert any(f"byte offset {lo}" in m and f"{len(full) - lo} bytes dropped" in m
                   for m in msgs), msgs
        if off >= lo + 12:  # inside the payload: the CRC is what catches it
            assert any("CRC mismatch" in m for m in msgs), msgs


def _frame(payload: bytes) -> bytes:
    return struct.pack("<4sII", RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _payload(header: Any, data: bytes = b"", raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<I", len(text)) + text + data


@pytest.mark.parametrize(
    "crafted",
    [
        _frame(_payload({"kind": "x", "meta": {}, "tensors": [["a", "complex64", [1]]]}, b"0" * 8)),
        _frame(_payload({"kind": "x", "meta": {}, "tensors": [["a", "float32", [-1]]]})),
        _frame(_payload({"kind": "x", "meta": {}, "tensors": [["a", "float32", [2]]]}, b"1234")),
        _frame(_payload({"kind": "x", "meta": {}, "tensors": [["a", "float32", [2**40, 2**40]]]})),
        _frame(_payload({"kind": "x", "meta": {}, "tensors": [["a", "int8", [1]],
                                                             ["a", "int8", [1]]]}, b"12")),
        _frame(_payload({"kind": "x", "meta": {}, "tensors": [["a", "bool", [2]]]}, b"\x01\x02")),
        _frame(_payload({"kind": "x", "meta": {}, "tensors": [], "extra": 1})),
        _frame(_payload({"kind": "", "meta": {}, "tensors": []})),
        _frame(_payload({"kind": "x", "meta": [], "tensors": []})),
        _frame(_payload(None, raw=b'{"kind": "x", "meta": {"a": NaN}, "tensors": []}')),
        _frame(_payload(None, raw=b'{"kind": "x", "kind": "y", "meta": {}, "tensors": []}')),
        _frame(_payload(None, raw=b"\xff\xfe")),
        _frame(struct.pack("<I", 1000) + b"{}"),
        _frame(b"ab"),
        struct.pack("<4sII", RECORD_MAGIC, MAX_PAYLOAD_BYTES + 1, 0) + b"x" * 64,
        struct.pack("<4sII", b"CHR2", 4, zlib.crc32(b"\0" * 4)) + b"\0" * 4,
        b"CHR",
    ],
)
def test_crafted_records_are_a_corrupt_tail(tmp_path: Path, crafted: bytes) -> None:
    good = [make_record(1), make_record(2)]
    written_one_by_one(tmp_path, good)
    size = os.path.getsize(tmp_path / SEG0)
    with open(tmp_path / SEG0, "ab") as f:
        f.write(crafted + _frame(_payload({"kind": "x", "meta": {}, "tensors": []})))
    _, got, j = reopen(tmp_path)
    j.close()
    assert got == good
    assert os.path.getsize(tmp_path / SEG0) == size


def test_handmade_valid_record_decodes(tmp_path: Path) -> None:
    data = np.array([1.5, -2.0], dtype="<f4").tobytes()
    header = {"kind": "commit", "meta": {"w": "a"}, "tensors": [["g", "float32", [2]]]}
    (tmp_path / SEG0).write_bytes(_frame(_payload(header, data)))
    _, got, j = reopen(tmp_path)
    j.close()
    assert got == [Record("commit", {"w": "a"}, {"g": torch.tensor([1.5, -2.0])})]


# --------------------------------------------------------------------------- snapshots


def state_of(values: list[int]) -> dict[str, Any]:
    return {"values": list(values), "total": torch.tensor(float(sum(values))),
            "by_id": {v: (v, str(v)) for v in values}}


def value_record(v: int) -> Record:
    return Record("commit", {"v": v}, {"g": torch.tensor([float(v)])})


def replay(tree: Any, records: list[Record]) -> list[int]:
    values = [] if tree is None else list(tree["values"])
    return values + [r.meta["v"] for r in records]


def test_snapshot_skips_earlier_records_and_rotates(tmp_path: Path) -> None:
    values: list[int] = []
    with Journal(tmp_path, keep_snapshots=2) as j:
        j.restore()
        for version in (3, 6, 9, 12):
            for _ in range(3):
                values.append(len(values))
                j.append(value_record(values[-1]))
            j.snapshot(state_of(values), version)
        for _ in range(2):
            values.append(len(values))
            j.append(value_record(values[-1]))
        assert j.stats["snapshots"] == 4
    names = sorted(os.listdir(tmp_path))
    assert names == ["LOCK", seg(9), seg(12), snap(9), snap(12)]
    tree, records, j = reopen(tmp_path)
    j.close()
    assert same_tree(tree, state_of(values[:12]))
    assert [r.meta["v"] for r in records] == [12, 13]


def test_snapshot_version_rules(tmp_path: Path) -> None:
    with Journal(tmp_path) as j:
        j.restore()
        j.snapshot({"init": True}, 0)  # the initial state, nothing logged yet: allowed
        j.append(value_record(0))
        with pytest.raises(VersionError):
            j.snapshot({}, 0)
        j.snapshot({"v": 5}, 5)
        j.snapshot({"v": 5, "again": True}, 5)  # same version, empty segment: allowed
        j.append(value_record(1))
        for bad in (5, 4):
            with pytest.raises(VersionError):
                j.snapshot({}, bad)
        wrong: list[Any] = [-1, 10**12, 2.0, True]
        for bad in wrong:
            with pytest.raises(ConfigError):
                j.snapshot({}, bad)
        with pytest.raises(ChronosTypeError):
            j.snapshot({"s": {1}}, 9)
        assert sorted(os.listdir(tmp_path)) == ["LOCK", seg(0), seg(5), snap(0), snap(5)]
    tree, records, j = reopen(tmp_path)
    j.close()
    assert tree == {"v": 5, "again": True}
    assert records == [value_record(1)]


def corrupt_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))


def test_corrupt_newest_snapshot_falls_back_without_losing_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Journal(tmp_path, keep_snapshots=2) as j:
        j.restore()
        for v in range(2):
            j.append(value_record(v))
        j.snapshot(state_of([0, 1]), 2)
        for v in range(2, 4):
            j.append(value_record(v))
        j.snapshot(state_of([0, 1, 2, 3]), 4)
        j.append(value_record(4))
    assert sorted(os.listdir(tmp_path)) == ["LOCK", seg(2), seg(4), snap(2), snap(4)]
    corrupt_middle(tmp_path / snap(4))
    with caplog.at_level(logging.WARNING, logger="chronos.journal"):
        tree, records, j = reopen(tmp_path)
    assert any("snapshot 4 is unusable" in r.getMessage() for r in caplog.records)
    # snapshot 2 + log-2 (records 2, 3) + log-4 (record 4): everything acknowledged
    assert same_tree(tree, state_of([0, 1]))
    assert replay(tree, records) == [0, 1, 2, 3, 4]
    assert (tmp_path / (snap(4) + ".corrupt")).exists()
    j.append(value_record(5))  # goes to log-4, the last segment of the chain
    j.close()
    tree, records, j = reopen(tmp_path)
    assert replay(tree, records) == [0, 1, 2, 3, 4, 5]
    j.snapshot(state_of(list(range(6))), 6)
    j.append(value_record(6))
    j.snapshot(state_of(list(range(7))), 7)
    j.close()
    assert sorted(os.listdir(tmp_path)) == [
        "LOCK", seg(6), seg(7), snap(4) + ".corrupt", snap(6), snap(7)]
    tree, records, j = reopen(tmp_path)
    j.close()
    assert replay(tree, records) == list(range(7)) and records == []


def test_corrupt_snapshot_without_an_older_one_replays_from_the_start(tmp_path: Path) -> None:
    with Journal(tmp_path) as j:
        j.restore()
        j.append(value_record(0))
        j.snapshot(state_of([0]), 1)
        j.append(value_record(1))
    corrupt_middle(tmp_path / snap(1))
    tree, records, j = reopen(tmp_path)
    j.close()
    assert tree is None and replay(tree, records) == [0, 1]


def test_fallback_impossible_with_keep_one_changes_nothing(tmp_path: Path) -> None:
    with Journal(tmp_path, keep_snapshots=1) as j:
        j.restore()
        for version in (1, 2):
            j.append(value_record(version))
            j.snapshot(state_of([version]), version)
    assert sorted(os.listdir(tmp_path)) == ["LOCK", seg(2), snap(2)]
    corrupt_middle(tmp_path / snap(2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "LOCK"}
    j = Journal(tmp_path, keep_snapshots=1)
    with pytest.raises(CorruptFileError, match="missing"):
        j.restore()
    j.close()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "LOCK"} == before


def test_corrupt_earlier_segment_of_a_fallback_chain_is_fatal(tmp_path: Path) -> None:
    with Journal(tmp_path) as j:
        j.restore()
        j.snapshot(state_of([]), 1)
        j.append(value_record(0))
        j.append(value_record(1))
        j.snapshot(state_of([0, 1]), 3)
        j.append(value_record(2))
    corrupt_middle(tmp_path / snap(3))
    corrupt_middle(tmp_path / seg(1))
    j = Journal(tmp_path)
    with pytest.raises(CorruptFileError, match="later segments"):
        j.restore()
    j.close()
    assert (tmp_path / snap(3)).exists()


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.95)),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_snapshot_of_optimizer_state_resumes_bit_identically(tmp_path: Path, name: str) -> None:
    # (the first optimizer step of a process imports torch._dynamo: about 2 s, once)
    make = OPTIMIZERS[name]
    torch.manual_seed(0)
    x = torch.randn(16, 5)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = make(model.parameters())

    def step(m: torch.nn.Module, o: torch.optim.Optimizer) -> None:
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    state = {"params": [p.detach() for p in model.parameters()], "opt": opt.state_dict()}
    with Journal(tmp_path) as j:
        j.restore()
        j.snapshot(state, 3)
    tree, _, j = reopen(tmp_path)
    j.close()
    if isinstance(opt, torch.optim.Adam):
        assert isinstance(tree["opt"]["param_groups"][0]["betas"], tuple)
        assert isinstance(tree["opt"]["state"][0]["step"], Tensor)
    assert list(tree["opt"]["state"]) == list(opt.state_dict()["state"])
    clone = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    with torch.no_grad():
        for p, saved in zip(clone.parameters(), tree["params"], strict=True):
            p.copy_(saved)
    opt2 = make(clone.parameters())
    opt2.load_state_dict(tree["opt"])
    for _ in range(4):
        step(model, opt)
        step(clone, opt2)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_stray_temp_file_of_an_interrupted_snapshot_is_ignored(tmp_path: Path) -> None:
    with Journal(tmp_path) as j:
        j.restore()
        j.append(value_record(0))
        j.snapshot(state_of([0]), 1)
        j.append(value_record(1))
    stray = tmp_path / f".{snap(2)}.k3j9x.tmp"
    stray.write_bytes(b"\x89CHRTNS\n half a snapshot")
    tree, records, j = reopen(tmp_path)
    j.close()
    assert replay(tree, records) == [0, 1]
    assert not stray.exists()


def test_crash_between_snapshot_and_new_segment(tmp_path: Path) -> None:
    with Journal(tmp_path) as j:
        j.restore()
        j.append(value_record(0))
        j.snapshot(state_of([0]), 1)
    os.unlink(tmp_path / seg(1))  # as if the process died right after the rename
    tree, records, j = reopen(tmp_path)
    assert replay(tree, records) == [0] and records == []
    j.append(value_record(1))
    j.close()
    tree, records, j = reopen(tmp_path)
    j.close()
    assert replay(tree, records) == [0, 1]


def test_segments_without_their_start_are_refused(tmp_path: Path) -> None:
    with Journal(tmp_path, keep_snapshots=1) as j:
        j.restore()
        j.append(value_record(0))
        j.snapshot(state_of([0]), 4)  # log-0 is deleted (keep_snapshots=1)
        j.append(value_record(1))
    os.unlink(tmp_path / snap(4))  # log-4 alone cannot be replayed onto the initial state
    j = Journal(tmp_path)
    with pytest.raises(CorruptFileError):
        j.restore()
    j.close()


# ----------------------------------------------------------------- lock, usage, fsyncs


def test_lock_refuses_a_second_journal_until_closed(tmp_path: Path) -> None:
    first = Journal(tmp_path)
    with pytest.raises(ConfigError, match="in use") as info:
        Journal(tmp_path)
    assert str(tmp_path) in str(info.value) and str(os.getpid()) in str(info.value)
    first.close()
    first.close()  # idempotent
    with Journal(tmp_path) as second:
        second.restore()


def test_usage_errors(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    for call in (lambda: j.append(make_record(0)), j.flush, lambda: j.snapshot({}, 1)):
        with pytest.raises(ChronosError, match="restore"):
            call()
    j.restore()
    with pytest.raises(ChronosError, match="already"):
        j.restore()
    with pytest.raises(ChronosTypeError):
        j.append("not a record")  # type: ignore[arg-type]
    j.close()
    with pytest.raises(ChronosError, match="closed"):
        j.append(make_record(0))
    with pytest.raises(ChronosError, match="closed"):
        j.restore()
    for bad in ({"sync": "sometimes"}, {"keep_snapshots": 0}, {"keep_snapshots": 1.5}):
        with pytest.raises(ConfigError):
            Journal(tmp_path, **bad)


def test_failed_write_stops_the_journal_and_restore_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chronos.distributed import journal as journal_mod

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    j = Journal(tmp_path)
    j.restore()
    j.append(value_record(0))
    j.flush()
    with monkeypatch.context() as m:
        m.setattr(journal_mod, "_write_all", disk_full)
        j.append(value_record(1))
        with pytest.raises(OSError):
            j.flush()
    with pytest.raises(ChronosError, match="earlier write"):
        j.append(value_record(2))
    j.close()
    j = Journal(tmp_path)
    assert j.restore() == (None, [value_record(0)])
    j.append(value_record(1))
    with monkeypatch.context() as m:
        m.setattr(journal_mod, "save_tensors", disk_full)
        with pytest.raises(OSError):
            j.snapshot(state_of([0, 1]), 2)
    with pytest.raises(ChronosError, match="earlier write"):
        j.flush()
    j.close()
    tree, records, j = reopen(tmp_path)  # the flush inside snapshot() made record 1 durable
    j.close()
    assert tree is None and replay(tree, records) == [0, 1]


@pytest.mark.parametrize(("sync", "expected"), [("always", 5), ("batch", 2), ("none", 0)])
def test_fsyncs_per_policy(tmp_path: Path, sync: Any, expected: int) -> None:
    j = Journal(tmp_path, sync=sync)
    j.restore()
    before = j.stats["fsyncs"]
    for _ in range(3):
        j.append(make_record(1))
    assert j.flush() == 3
    for _ in range(2):
        j.append(make_record(2))
    assert j.flush() == 2
    assert j.flush() == 0
    assert j.stats["fsyncs"] - before == expected
    assert j.stats["records_written"] == 5
    assert j.stats["bytes_written"] == os.path.getsize(tmp_path / SEG0)
    # a snapshot seals the segment whatever the policy: one more fsync only under "none"
    j.append(make_record(3))
    j.flush()
    mid = j.stats["fsyncs"]
    j.snapshot({"a": 1}, 1)
    sealed = {"always": 0, "batch": 0, "none": 1}[sync]
    assert j.stats["fsyncs"] - mid == sealed + 2  # + the new segment and the directory
    j.close()


# --------------------------------------------------------------------------------- trees


def test_flatten_round_trip_and_format() -> None:
    t = torch.arange(4, dtype=torch.int64)
    obj = {"a": [1, 2.5, None, True, "s", (t, {"k": ()})], 7: {-1: "neg", "x": []},
           "od": OrderedDict(b=1), "big": 2**70, "empty": {}}
    tree, tensors = flatten_tree(obj)
    json.dumps(tree, allow_nan=False)  # JSON-able
    assert tree["__items__"][0][0] == "a" and tree["__items__"][1][0] == 7
    assert list(tensors) == ["t0"] and tensors["t0"] is t
    back = unflatten_tree(json.loads(json.dumps(tree)), tensors)
    assert same_tree(back, {**obj, "od": {"b": 1}})
    assert unflatten_tree(*flatten_tree([])) == []


@pytest.mark.parametrize(
    "bad",
    [
        {1, 2},
        object(),
        float("nan"),
        [1.0, float("inf")],
        {1.5: 1},
        {None: 1},
        {True: 1},
        {(1, 2): 1},
        {"__tensor__": "t0"},
        {"__tuple__": [], "a": 1},
        {1: 2, "__items__": 3},
        namedtuple("P", "x")(1),  # type: ignore[arg-type]
        np.float64(1.0),
        torch.ones(2, dtype=torch.complex64),
        torch.eye(2).to_sparse(),
        b"bytes",
    ],
)
def test_flatten_refuses_what_it_cannot_invert(bad: Any) -> None:
    with pytest.raises(ChronosTypeError):
        flatten_tree({"x": [bad]})


def test_flatten_refuses_cycles() -> None:
    cyc: list[Any] = [1]
    cyc.append(cyc)
    with pytest.raises(ChronosTypeError, match="itself"):
        flatten_tree(cyc)
    shared = [1]
    assert flatten_tree([shared, shared])[0] == [[1], [1]]  # sharing is not a cycle


@pytest.mark.parametrize(
    "bad",
    [
        {"__tensor__": "t9"},
        {"__tensor__": 0},
        {"__tensor__": "t0", "x": 1},
        {"__items__": [[1.5, 2]]},
        {"__items__": [[1, 2], [1, 3]]},
        {"__items__": [[1, 2, 3]]},
        {"__tuple__": 3},
        {1: 2},
        (1, 2),
        float("nan"),
        {"a": {1, 2}},
    ],
)
def test_unflatten_refuses_malformed_trees(bad: Any) -> None:
    with pytest.raises(ChronosTypeError):
        unflatten_tree(bad, {"t0": torch.ones(1)})


# ----------------------------------------------------------------------------- property

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 50)),
        st.tuples(st.just("flush"), st.just(0)),
        st.tuples(st.just("snapshot"), st.integers(0, 2)),
        st.tuples(st.just("reopen"), st.just(0)),
        st.tuples(st.just("crash"), st.just(0)),
    ),
    max_size=20,
)


@settings(max_examples=25)
@given(ops=OPS, sync=st.sampled_from(["always", "batch", "none"]), keep=st.integers(1, 3))
def test_property_restore_gives_what_was_appended_since_the_snapshot(
    ops: list[tuple[str, int]], sync: Any, keep: int
) -> None:
    with tempfile.TemporaryDirectory() as root:
        n_dirs = 0

        def fresh() -> str:
            nonlocal n_dirs
            n_dirs += 1
            return os.path.join(root, f"s{n_dirs}")

        path = fresh()
        j = Journal(path, sync=sync, keep_snapshots=keep)
        assert j.restore() == (None, [])
        tree: Any = None
        durable: list[Record] = []  # flushed since the last snapshot
        pending: list[Record] = []  # appended, not flushed
        version = 0
        try:
            for op, arg in ops:
                if op == "append":
                    r = make_record(arg)
                    j.append(r)
                    pending.append(r)
                elif op == "flush":
                    assert j.flush() == len(pending)
                    durable, pending = durable + pending, []
                elif op == "snapshot":
                    # equal to the last version only while nothing was logged since it
                    version += arg + (arg == 0 and (durable != [] or pending != []))
                    tree = {"version": version, "w": torch.full((2,), float(version)),
                            "opt": {0: {"step": torch.tensor(1.0)}, "betas": (0.9, 0.99)}}
                    j.snapshot(tree, version)
                    durable, pending = [], []
                elif op == "reopen":
                    j.close()
                    got_tree, got, j = reopen(path, sync=sync, keep_snapshots=keep)
                    assert same_tree(got_tree, tree)
                    assert got == durable + pending
                    durable, pending = got, []
                else:  # crash: the files as they are now, unflushed records lost
                    copy = fresh()
                    shutil.copytree(path, copy, ignore=shutil.ignore_patterns("LOCK"))
                    j.close()
                    path = copy
                    got_tree, got, j = reopen(path, sync=sync, keep_snapshots=keep)
                    assert same_tree(got_tree, tree)
                    assert got == durable
                    pending = []
                snaps = [n for n in os.listdir(path) if n.startswith("snapshot-")]
                assert len(snaps) <= keep
        finally:
            j.close()
        got_tree, got, j = reopen(path)
        j.close()
        assert same_tree(got_tree, tree)
        assert got == durable + pending
