"""safeio: exact round trips, atomic writes, and a clear CorruptFileError for every damaged,
truncated, crafted or foreign file (never an unpickle)."""

import json
import os
import pickle
import struct
import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chronos.core import safeio
from chronos.core.errors import ChronosError, ChronosTypeError, ConfigError, CorruptFileError
from chronos.core.safeio import MAGIC, load_tensors, save_tensors

pytestmark = pytest.mark.timeout(60)


def _sample():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f64": torch.randn(5, dtype=torch.float64, generator=g),
        "f16": torch.randn(2, 2, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "i16": torch.tensor([-3, 300], dtype=torch.int16),
        "i32": torch.tensor([[1, -2**31]], dtype=torch.int32),
        "i64": torch.tensor(2**62, dtype=torch.int64),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "strided": torch.arange(12.0).reshape(3, 4).T,  # not contiguous
    }


def _write(path, header, data=b"", version=1, hlen=None, crc=True):
    """A file with a hand-made header; the CRC is correct unless crc=False."""
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    body = struct.pack("<8sIQ", MAGIC, version, len(raw) if hlen is None else hlen) + raw + data
    tail = struct.pack("<I", zlib.crc32(body) if crc else (zlib.crc32(body) ^ 1))
    path.write_bytes(body + tail)
    return path


def test_round_trip_every_dtype_and_metadata(tmp_path):
    tensors = _sample()
    meta = {"step": 3, "lr": 0.5, "name": "run-1", "ok": True, "none": None,
            "nested": {"list": [1, 2.5, "x", [False]], "tuple": (1, 2)}}
    path = tmp_path / "a.chronos"
    save_tensors(path, tensors, meta)
    loaded, got = load_tensors(path)
    assert list(loaded) == list(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name
        assert loaded[name].is_contiguous()
    assert got == {**meta, "nested": {"list": [1, 2.5, "x", [False]], "tuple": [1, 2]}}


def test_round_trip_empty_and_autograd_tensors(tmp_path):
    save_tensors(tmp_path / "e", {})
    assert load_tensors(tmp_path / "e") == ({}, {})
    w = torch.ones(3, requires_grad=True) * 2
    save_tensors(str(tmp_path / "g"), {"w": w})
    loaded, _ = load_tensors(str(tmp_path / "g"))
    assert not loaded["w"].requires_grad and torch.equal(loaded["w"], w.detach())


@given(
    shape=st.lists(st.integers(0, 4), max_size=3),
    dtype=st.sampled_from(list(safeio.DTYPES.values())),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(tmp_path_factory, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 2, shape, generator=g) if dtype == torch.bool else (
        torch.randn(shape, generator=g, dtype=torch.float64) * 100
    )
    t = t.to(dtype)
    path = tmp_path_factory.mktemp("p") / "t"
    save_tensors(path, {"t": t}, {"seed": seed})
    loaded, meta = load_tensors(path)
    assert torch.equal(loaded["t"], t) and loaded["t"].dtype == dtype and meta == {"seed": seed}


def test_overwrite_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "state"
    save_tensors(path, {"v": torch.tensor([1.0])})
    save_tensors(path, {"v": torch.tensor([2.0])})
    assert torch.equal(load_tensors(path)[0]["v"], torch.tensor([2.0]))
    assert sorted(os.listdir(tmp_path)) == ["state"]
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)

    def crash(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(safeio.os, "replace", crash)
    with pytest.raises(OSError, match="disk on fire"):
        save_tensors(path, {"v": torch.tensor([3.0])})
    assert torch.equal(load_tensors(path)[0]["v"], torch.tensor([2.0]))  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["state"]  # temporary removed


@pytest.mark.parametrize("tensors, match", [
    ({"c": torch.zeros(2, dtype=torch.complex64)}, "dtype"),
    ({"s": torch.eye(2).to_sparse()}, "to_dense"),
    ({"x": [1.0]}, "not a Tensor"),
    ({1: torch.zeros(1)}, "names must be str"),
])
def test_save_refuses_what_it_cannot_store(tmp_path, tensors, match):
    with pytest.raises(ChronosTypeError, match=match):
        save_tensors(tmp_path / "x", tensors)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("meta, err, match", [
    ({"t": torch.zeros(1)}, ChronosTypeError, "save tensors as tensors"),
    ({"x": float("nan")}, ConfigError, "finite"),
    ({"d": {1: "a"}}, ChronosTypeError, "keys must be str"),
    ({"s": {1, 2}}, ChronosTypeError, "set"),
])
def test_save_refuses_metadata_that_is_not_json(tmp_path, meta, err, match):
    with pytest.raises(err, match=match):
        save_tensors(tmp_path / "x", {}, meta)
    assert not os.listdir(tmp_path)


def test_every_truncation_is_refused(tmp_path):
    path = tmp_path / "f"
    save_tensors(path, {"a": torch.arange(5.0), "b": torch.tensor([True])}, {"k": 1})
    data = path.read_bytes()
    cut = tmp_path / "cut"
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        with pytest.raises(CorruptFileError, match="not a valid Chronos tensor file"):
            load_tensors(cut)


def test_every_bit_flip_is_refused(tmp_path):
    path = tmp_path / "f"
    save_tensors(path, {"a": torch.arange(4.0), "i": torch.tensor([7], dtype=torch.int16)})
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad"
    for pos in range(len(data)):
        for bit in (0, 5):
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            bad.write_bytes(bytes(flipped))
            with pytest.raises(CorruptFileError) as info:
                load_tensors(bad)
            assert str(bad) in str(info.value)


def test_checksum_mismatch_is_named(tmp_path):
    path = tmp_path / "f"
    save_tensors(path, {"a": torch.zeros(8)})
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor bytes: only the CRC can tell
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        load_tensors(path)


def test_pickle_and_torch_save_files_are_refused_without_unpickling(tmp_path):
    ran = []

    class Payload:
        def __reduce__(self):
            return (ran.append, ("executed",))

    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CorruptFileError, match=r"wrong magic bytes.*never reads pickle"):
        load_tensors(p)
    t = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, t)
    with pytest.raises(CorruptFileError, match="wrong magic"):
        load_tensors(t)
    assert ran == []
    # a pickle smuggled into the data section is only ever bytes of a uint8 tensor
    blob = pickle.dumps(Payload())
    header = {"tensors": [{"name": "x", "dtype": "uint8", "shape": [len(blob)], "offset": 0,
                           "nbytes": len(blob)}], "metadata": {}}
    loaded, _ = load_tensors(_write(tmp_path / "smuggled", header, blob))
    assert bytes(loaded["x"].tolist()) == blob and ran == []


def test_oversized_header_is_refused_before_reading_it(tmp_path):
    path = _write(tmp_path / "big", b"{}", hlen=2**40)
    with pytest.raises(CorruptFileError, match="exceeds the cap"):
        load_tensors(path)
    path = _write(tmp_path / "long", b"{}", hlen=10_000)
    with pytest.raises(CorruptFileError, match="truncated"):
        load_tensors(path)
    save_tensors(tmp_path / "ok", {}, {"pad": "x" * 500})
    with pytest.raises(CorruptFileError, match="exceeds the cap of 100 bytes"):
        load_tensors(tmp_path / "ok", max_header_bytes=100)


def _entry(**over):
    e = {"name": "x", "dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8}
    e.update(over)
    return e


@pytest.mark.parametrize("header, data, match", [
    ({"tensors": [_entry(dtype="object")], "metadata": {}}, bytes(8), "dtype 'object'"),
    ({"tensors": [_entry(dtype="complex64")], "metadata": {}}, bytes(8), "allowed"),
    ({"tensors": [_entry(nbytes=4)], "metadata": {}}, bytes(4), "needs 8 bytes"),
    ({"tensors": [_entry(shape=[-1])], "metadata": {}}, bytes(8), "invalid shape"),
    ({"tensors": [_entry(shape=[2.0])], "metadata": {}}, bytes(8), "invalid shape"),
    ({"tensors": [_entry(offset=4)], "metadata": {}}, bytes(12), "expected offset 0"),
    ({"tensors": [_entry(), _entry(name="y", offset=0)], "metadata": {}}, bytes(16),
     "expected offset 8"),
    ({"tensors": [_entry(), _entry(offset=8)], "metadata": {}}, bytes(16), "repeated name"),
    ({"tensors": [_entry()], "metadata": {}}, bytes(12), "trailing bytes"),
    ({"tensors": [_entry(shape=[2**40])], "metadata": {}}, bytes(8), "needs"),
    ({"tensors": [_entry(shape=[2**30], nbytes=2**32)], "metadata": {}}, bytes(8), "truncated"),
    ({"tensors": [_entry(extra=1)], "metadata": {}}, bytes(8), "exactly the fields"),
    ({"tensors": [], "metadata": [], }, b"", "'metadata' must be an object"),
    ({"tensors": []}, b"", "exactly 'tensors' and 'metadata'"),
    (b'{"tensors": [], "metadata": {"x": NaN}}', b"", "non-finite"),
    (b'{"tensors": [], "metadata": {}, "metadata": {}}', b"", "repeats a key"),
    (b"[" * 100_000 + b"]" * 100_000, b"", "not valid JSON"),
    (b"\xff\xfe", b"", "not valid JSON"),
    ({"tensors": [_entry(dtype="bool", shape=[2], nbytes=2)], "metadata": {}}, b"\x01\x02",
     "other than 0 and 1"),
])
def test_crafted_headers_with_valid_checksums_are_refused(tmp_path, header, data, match):
    with pytest.raises(CorruptFileError, match=match):
        load_tensors(_write(tmp_path / "crafted", header, data))


def test_wrong_version_and_short_file(tmp_path):
    header = {"tensors": [], "metadata": {}}
    with pytest.raises(CorruptFileError, match=r"format version 2.*upgrade"):
        load_tensors(_write(tmp_path / "v2", header, version=2))
    with pytest.raises(CorruptFileError, match="checksum"):
        load_tensors(_write(tmp_path / "crc", header, crc=False))
    (tmp_path / "short").write_bytes(MAGIC)
    with pytest.raises(CorruptFileError, match="shorter than"):
        load_tensors(tmp_path / "short")
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "missing")
    assert issubclass(CorruptFileError, ChronosError) and issubclass(CorruptFileError, ValueError)
