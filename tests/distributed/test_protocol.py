"""Wire codec: round trips of every message type and dtype, and every rejection rule."""

from __future__ import annotations

import dataclasses
import math
import pickle
import warnings
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chronos.core.errors import ConfigError, ProtocolError
from chronos.distributed.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Checkout,
    CheckoutReply,
    Commit,
    CommitReply,
    Deregister,
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    LeaseCancelled,
    Message,
    Register,
    Registered,
    ShutdownNotice,
)
from chronos.distributed.protocol import (
    DTYPES,
    DecodeError,
    DecodeLimits,
    EncodeError,
    decode,
    encode,
    encoded_size,
    error_reply,
)

# -- helpers --------------------------------------------------------------------------------------


def assert_same(a: Message, b: Message) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == a.tensor_field:
            assert set(x) == set(y)
            for k in x:
                assert y[k].dtype == x[k].dtype, k
                assert y[k].shape == x[k].shape, k
                assert torch.equal(y[k], x[k].detach().cpu()), k
        else:
            assert x == y, f.name
            assert type(x) is type(y), f.name


def roundtrip(msg: Message) -> Message:
    return decode([bytes(f) for f in encode(msg)])


def header_of(msg: Message) -> tuple[dict[str, Any], list[bytes]]:
    frames = [bytes(f) for f in encode(msg)]
    return msgpack.unpackb(frames[0]), frames[1:]


def pack(header: dict[str, Any], *tensor_frames: bytes) -> list[bytes]:
    return [msgpack.packb(header), *tensor_frames]


def expect(code: str, frames: list[Any], limits: DecodeLimits | None = None) -> DecodeError:
    with pytest.raises(DecodeError) as ei:
        decode(frames, limits) if limits is not None else decode(frames)
    assert ei.value.code == code, str(ei.value)
    assert isinstance(ei.value, ProtocolError)
    return ei.value


def sample_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


def all_messages() -> list[Message]:
    t = {"wd": torch.arange(6, dtype=torch.float32).reshape(2, 3), "lr": torch.tensor(0.01)}
    return [
        Register(request_id=1, worker_id="w0", info={"pid": 7, "host": "h", "x": 1.5, "ok": True}),
        Register(request_id=1, worker_id="w0"),
        Checkout(request_id=2, worker_id="w0", have_version=-1),
        Commit(
            request_id=3,
            worker_id="w0",
            version=4,
            commit_id="w0-3",
            hypergradient=t,
            metrics={"inner_loss": 0.5, "b": 1.0},
        ),
        Commit(request_id=3, worker_id="w0", version=4, commit_id="c", hypergradient={}),
        Heartbeat(request_id=4, worker_id="w0"),
        Deregister(request_id=5, worker_id="w0"),
        Registered(request_id=1, worker_id="w0", version=0, config={"hb": 0.5, "none": None}),
        CheckoutReply(request_id=2, status="granted", version=3, outer_params=t),
        CheckoutReply(request_id=2, status="not_modified", version=3),
        CheckoutReply(request_id=2, status="deferred", version=3, reason="window full"),
        CommitReply(
            request_id=3,
            commit_id="w0-3",
            status="accepted",
            staleness=1,
            weight=0.5,
            version=5,
        ),
        HeartbeatAck(request_id=4, version=5),
        ErrorReply(request_id=-1, code="malformed", message="bad"),
        ShutdownNotice(request_id=0, reason="done"),
        ShutdownNotice(request_id=0),
        LeaseCancelled(request_id=2, version=3, current_version=8, reason="too stale"),
        # codecs and delta checkouts (appended: tests above index into this list)
        Commit(
            request_id=3,
            worker_id="w0",
            version=4,
            commit_id="c8",
            hypergradient={
                "wd/indices": torch.tensor([0, 4], dtype=torch.int32),
                "wd/values": torch.tensor([1, -2], dtype=torch.int8),
                "wd/scale": torch.tensor(0.5),
            },
            codec="topk:0.3+int8",
            updates=3,
        ),
        Register(request_id=1, worker_id="w1", codec="int8:stochastic"),
        Checkout(request_id=2, worker_id="w0", have_version=-1, resync=True),
        CheckoutReply(
            request_id=2,
            status="granted",
            version=5,
            outer_params={"wd/values": torch.zeros(6, dtype=torch.int8), "wd/scale": t["lr"]},
            kind="delta",
            base_version=3,
            checksum=2**32 - 1,
        ),
    ]


# -- round trips ----------------------------------------------------------------------------------


def test_every_op_is_covered() -> None:
    assert {type(m).op for m in all_messages()} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", all_messages(), ids=lambda m: type(m).__name__)
def test_round_trip_every_message(msg: Message) -> None:
    assert_same(msg, roundtrip(msg))


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4), (3, 0, 2)], ids=str)
def test_round_trip_every_dtype_and_shape(dname: str, shape: tuple[int, ...]) -> None:
    x = sample_tensor(DTYPES[dname], shape)
    msg = CheckoutReply(request_id=9, status="granted", version=1, outer_params={"x": x})
    frames = encode(msg)
    assert len(frames) == 2
    assert encoded_size(frames) == len(bytes(frames[0])) + x.numel() * x.element_size()
    header = msgpack.unpackb(bytes(frames[0]))
    assert header["tensors"] == [["x", dname, list(shape)]]
    assert_same(msg, decode(frames))


def test_header_has_version_op_first_and_sorted_keys() -> None:
    msg = all_messages()[3]
    header, _ = header_of(msg)
    assert header["pv"] == PROTOCOL_VERSION and header["op"] == "commit"
    assert list(header) == ["op", *sorted(k for k in header if k != "op")]
    assert [t[0] for t in header["tensors"]] == ["lr", "wd"]  # sorted tensor order
    assert [bytes(f) for f in encode(msg)] == [bytes(f) for f in encode(msg)]  # stable


def test_encode_is_zero_copy_for_cpu_contiguous_tensors() -> None:
    x = torch.zeros(1000)
    frames = encode(Commit(0, "w", 0, "c", {"x": x}))
    x[0] = 7.0  # the frame aliases the tensor (documented: do not mutate before sending)
    assert torch.frombuffer(bytearray(frames[1]), dtype=torch.float32)[0] == 7.0


def test_encode_handles_noncontiguous_and_grad_tensors() -> None:
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    w = torch.ones(3, requires_grad=True) * 2
    p = torch.nn.Parameter(torch.ones(2, 2))
    msg = Commit(0, "w", 0, "c", {"t": base.t(), "g": w, "s": base[:, 1], "r": base[1], "p": p})
    out = roundtrip(msg)
    assert isinstance(out, Commit)
    assert torch.equal(out.hypergradient["r"], base[1])  # contiguous view with an offset
    assert type(out.hypergradient["p"]) is torch.Tensor
    assert torch.equal(out.hypergradient["t"], base.t())
    assert torch.equal(out.hypergradient["s"], base[:, 1])
    assert not out.hypergradient["g"].requires_grad


def test_int_is_accepted_for_float_fields() -> None:
    header, _ = header_of(all_messages()[11])  # CommitReply
    header["weight"] = 1
    out = decode(pack(header))
    assert isinstance(out, CommitReply) and type(out.weight) is float and out.weight == 1.0


def test_decoded_tensors_are_writable_without_warnings() -> None:
    x = torch.randn(20_000)  # above the small-tensor path
    msg = Commit(0, "w", 0, "c", {"x": x, "s": torch.tensor(1.5)})
    frames = encode(msg)
    ro = [bytes(f) for f in frames]  # read-only buffers: copied once
    rw: list[Any] = [bytes(frames[0]), *(bytearray(f) for f in frames[1:])]  # writable: zero-copy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = decode(ro)
        b = decode(rw)
    assert isinstance(a, Commit) and isinstance(b, Commit)
    a.hypergradient["x"].add_(1.0)
    assert torch.equal(a.hypergradient["x"], x + 1)
    assert bytes(ro[1]) == bytes(frames[1])  # the immutable bytes were not touched
    rw[1][:4] = bytes(4)  # zero-copy: the tensor "s" (sorted first) sees the buffer
    assert b.hypergradient["s"].item() == 0.0


@settings(max_examples=60, deadline=None)
@given(
    dname=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    n=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
    rid=st.integers(-(2**63), 2**63 - 1),
)
def test_property_encode_decode_identity(
    dname: str, shape: list[int], n: int, seed: int, rid: int
) -> None:
    tensors = {f"p{i}.w": sample_tensor(DTYPES[dname], tuple(shape), seed + i) for i in range(n)}
    msg = Commit(rid, "w", 3, "id", tensors, {"loss": 0.25})
    assert_same(msg, roundtrip(msg))


# -- rejections -----------------------------------------------------------------------------------

_side_effects: list[str] = []


def _evil() -> None:  # what a pickle payload would run if it were ever unpickled
    _side_effects.append("executed")


class _Evil:
    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_evil, ())


def test_pickle_payload_is_refused_and_never_executed() -> None:
    payload = pickle.dumps(_Evil())
    for frames in ([payload], [payload, payload], [pickle.dumps({"op": "heartbeat"})]):
        expect("malformed", frames)
    assert _side_effects == []


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",
        b"\x92\x01",
        b"\x81\xa1a",
        msgpack.packb({"op": "heartbeat"}) + b"\x00",
        b"\x91" * 100_000 + b"\xc0",
    ],
    ids=["empty", "never-used-byte", "truncated-array", "truncated-map", "trailing", "deep"],
)
def test_non_msgpack_header_is_malformed(frame: bytes) -> None:
    expect("malformed", [frame])


@pytest.mark.parametrize("value", [[1, 2], "heartbeat", 3, None])
def test_header_must_be_a_map(value: object) -> None:
    expect("malformed", [msgpack.packb(value)])


def test_ext_types_and_non_str_keys_are_malformed() -> None:
    header, _ = header_of(Heartbeat(1, "w"))
    header["worker_id"] = msgpack.ExtType(5, b"x")
    expect("malformed", pack(header))
    header, _ = header_of(Register(1, "w"))
    header["info"] = {b"k": 1}
    expect("malformed", pack(header))
    expect("malformed", [msgpack.packb({1: 2})])  # int map key: strict_map_key


def test_empty_message_is_malformed() -> None:
    expect("malformed", [])


def test_unknown_op_carries_request_id() -> None:
    header, _ = header_of(Heartbeat(42, "w"))
    header["op"] = "exec"
    err = expect("unknown_op", pack(header))
    assert err.request_id == 42 and "heartbeat" in str(err)
    header["op"] = 5
    expect("unknown_op", pack(header))


@pytest.mark.parametrize("pv", [PROTOCOL_VERSION + 1, 0, "1", True, None])
def test_wrong_protocol_version(pv: object) -> None:
    header, _ = header_of(Heartbeat(3, "w"))
    header["pv"] = pv
    err = expect("protocol_version", pack(header))
    assert err.request_id == 3


def test_missing_pv_is_protocol_version() -> None:
    header, _ = header_of(Heartbeat(3, "w"))
    del header["pv"]
    expect("protocol_version", pack(header))


def test_missing_and_extra_fields() -> None:
    header, _ = header_of(Heartbeat(3, "w"))
    del header["worker_id"]
    err = expect("malformed", pack(header))
    assert "worker_id" in str(err) and err.request_id == 3 and err.op == "heartbeat"
    header, _ = header_of(Heartbeat(3, "w"))
    header["__class__"] = "x"
    assert "__class__" in str(expect("malformed", pack(header)))
    header, _ = header_of(Heartbeat(3, "w"))
    del header["tensors"]
    expect("malformed", pack(header))


@pytest.mark.parametrize(
    ("msg", "field", "value"),
    [
        (Heartbeat(3, "w"), "request_id", True),
        (Heartbeat(3, "w"), "request_id", "3"),
        (Heartbeat(3, "w"), "request_id", 3.0),
        (Heartbeat(3, "w"), "worker_id", 7),
        (Heartbeat(3, "w"), "worker_id", b"w"),
        (Checkout(3, "w"), "have_version", False),
        (CommitReply(3, "c", "accepted", 0, 1.0, 1), "weight", "1.0"),
        (CommitReply(3, "c", "accepted", 0, 1.0, 1), "weight", True),
        (CommitReply(3, "c", "accepted", 0, 1.0, 1), "status", "maybe"),
        (CommitReply(3, "c", "accepted", 0, 1.0, 1), "status", 1),
        (CheckoutReply(3, "granted", 1), "status", "GRANTED"),
        (ErrorReply(3, "malformed", "m"), "code", "no_such_code"),
        (Register(3, "w"), "info", [1]),
        (Register(3, "w"), "info", {"a": [1]}),
        (Register(3, "w"), "info", {"a": {"b": 1}}),
        (Commit(3, "w", 1, "c", {}), "metrics", {"loss": "low"}),
        (Commit(3, "w", 1, "c", {}), "metrics", {"loss": None}),
    ],
)
def test_wrong_field_types_are_malformed(msg: Message, field: str, value: object) -> None:
    header, frames = header_of(msg)
    header[field] = value
    err = expect("malformed", pack(header, *frames))
    assert field in str(err)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_float_fields(value: float) -> None:
    header, _ = header_of(Commit(3, "w", 1, "c", {}, {"loss": 1.0}))
    header["metrics"] = {"loss": value}
    err = expect("non_finite", pack(header))
    assert err.request_id == 3 and "loss" in str(err)
    header, _ = header_of(CommitReply(3, "c", "accepted", 0, 1.0, 1))
    header["weight"] = value
    expect("non_finite", pack(header))


def test_free_form_scalar_maps_accept_inf() -> None:
    out = roundtrip(Registered(1, "w", 0, {"lease": math.inf}))
    assert isinstance(out, Registered) and out.config == {"lease": math.inf}


def _tensor_msg(x: torch.Tensor) -> tuple[dict[str, Any], list[bytes]]:
    return header_of(Commit(8, "w", 1, "c", {"x": x}))


@pytest.mark.parametrize(
    "meta",
    [
        ["x", "complex64", [2]],
        ["x", "float", [2]],
        ["x", "float32", [-2]],
        ["x", "float32", [2.0]],
        ["x", "float32", [True, 2]],
        ["x", "float32", "2"],
        ["x", "float32"],
        [1, "float32", [2]],
        "x",
    ],
    ids=str,
)
def test_bad_tensor_metadata(meta: object) -> None:
    header, frames = _tensor_msg(torch.zeros(2))
    header["tensors"] = [meta]
    assert expect("bad_tensor", pack(header, *frames)).request_id == 8


def test_tensors_list_must_be_a_list() -> None:
    header, frames = _tensor_msg(torch.zeros(2))
    header["tensors"] = {"x": 1}
    expect("malformed", pack(header, *frames))


def test_shape_bytes_mismatch() -> None:
    header, frames = _tensor_msg(torch.zeros(4))
    header["tensors"][0][2] = [5]
    expect("bad_tensor", pack(header, *frames))
    header["tensors"][0] = ["x", "float64", [4]]
    expect("bad_tensor", pack(header, *frames))
    header, frames = _tensor_msg(torch.zeros(4))
    expect("bad_tensor", pack(header, frames[0][:-1]))


def test_wrong_frame_count() -> None:
    header, frames = _tensor_msg(torch.zeros(4))
    expect("malformed", pack(header))  # tensor frame missing
    expect("malformed", pack(header, *frames, b"extra"))


def test_duplicate_tensor_names_and_tensors_on_a_tensorless_op() -> None:
    header, frames = _tensor_msg(torch.zeros(2))
    header["tensors"] = [header["tensors"][0], header["tensors"][0]]
    expect("bad_tensor", pack(header, frames[0], frames[0]))
    header, _ = header_of(Heartbeat(3, "w"))
    header["tensors"] = [["x", "float32", [1]]]
    expect("bad_tensor", pack(header, bytes(4)))


def test_rank_limit() -> None:
    header, _ = _tensor_msg(torch.zeros(()))
    header["tensors"][0][2] = [1] * 17
    expect("bad_tensor", pack(header, bytes(4)))
    ok = decode(pack(header, bytes(4)), DecodeLimits(max_rank=17))
    assert isinstance(ok, Commit) and ok.hypergradient["x"].dim() == 17


def test_oversize_limits() -> None:
    header, frames = _tensor_msg(torch.zeros(100))  # 400 bytes
    f = pack(header, *frames)
    expect("oversize", f, DecodeLimits(max_tensor_bytes=399))
    expect("oversize", f, DecodeLimits(max_total_bytes=399))
    expect("oversize", f, DecodeLimits(max_header_bytes=len(f[0]) - 1))
    expect("oversize", f, DecodeLimits(max_frames=1))
    assert isinstance(decode(f, DecodeLimits(max_tensor_bytes=400)), Commit)
    # a huge declared shape is refused from the metadata alone, before any frame is read
    header["tensors"][0][2] = [2**40, 2**40]
    expect("oversize", pack(header, *frames))


@pytest.mark.parametrize("dname", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("n", [1, 7, 50_000], ids=["one", "small", "large"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_tensors(dname: str, n: int, bad: float) -> None:
    x = torch.ones(n, dtype=DTYPES[dname])
    x[n // 2] = bad
    err = expect("non_finite", [bytes(f) for f in encode(Commit(5, "w", 1, "c", {"x": x}))])
    assert err.request_id == 5 and "'x'" in str(err)


def test_large_finite_values_whose_sum_overflows_are_accepted() -> None:
    x = torch.full((1000,), 3e38, dtype=torch.float32)  # the sum overflows; values are finite
    y = torch.full((1000,), 60000.0, dtype=torch.float16)
    out = roundtrip(Commit(5, "w", 1, "c", {"x": x, "y": y}))
    assert isinstance(out, Commit) and torch.equal(out.hypergradient["x"], x)


def test_bool_tensor_bytes_must_be_0_or_1() -> None:
    header, _ = _tensor_msg(torch.zeros(3, dtype=torch.bool))
    expect("bad_tensor", pack(header, b"\x00\x02\x01"))


@pytest.mark.parametrize("n", [1, 50_000], ids=["small", "large"])
def test_check_finite_false_leaves_values_to_the_receiver_but_checks_the_rest(n: int) -> None:
    x = torch.ones(n)
    x[n // 2] = math.nan
    frames = [bytes(f) for f in encode(Commit(5, "w", 1, "c", {"x": x}))]
    expect("non_finite", frames)  # the default
    out = decode(frames, check_finite=False)
    assert isinstance(out, Commit)
    assert torch.isnan(out.hypergradient["x"][n // 2]) and out.hypergradient["x"].sum().isnan()
    header, _ = _tensor_msg(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(DecodeError) as e:  # every other rule still holds
        decode(pack(header, b"\x00\x02\x01"), check_finite=False)
    assert e.value.code == "bad_tensor"


@pytest.mark.parametrize("msg", all_messages(), ids=lambda m: type(m).__name__)
def test_decoded_messages_are_ordinary_frozen_instances(msg: Message) -> None:
    out = roundtrip(msg)
    assert type(out) is type(msg) and vars(out).keys() == vars(msg).keys()
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.request_id = 1  # type: ignore[misc]
    if msg.tensor_field is None:
        assert out == msg


def test_decode_accepts_memoryview_and_bytearray_frames() -> None:
    msg = all_messages()[3]
    frames = encode(msg)
    assert_same(msg, decode([memoryview(bytes(f)) for f in frames]))
    assert_same(msg, decode([bytearray(f) for f in frames]))
    expect("malformed", [object()])  # not a buffer


def test_error_reply_round_trips() -> None:
    header, _ = header_of(Heartbeat(77, "w"))
    header["op"] = "nope"
    err = expect("unknown_op", pack(header))
    reply = error_reply(err)
    assert reply == ErrorReply(request_id=77, code="unknown_op", message=str(err))
    assert roundtrip(reply) == reply
    long = error_reply(DecodeError("malformed", "x" * 10_000))
    assert len(long.message) <= 500 and long.request_id == -1


# -- encode errors --------------------------------------------------------------------------------


def test_encode_rejects_bad_tensors_and_fields() -> None:
    with pytest.raises(EncodeError) as ei:
        encode(Commit(0, "w", 0, "c", {"x": torch.zeros(2, dtype=torch.complex64)}))
    assert ei.value.code == "bad_tensor" and "float32" in str(ei.value)
    with pytest.raises(EncodeError):
        encode(Commit(0, "w", 0, "c", {"x": [1.0]}))  # type: ignore[dict-item]
    with pytest.raises(EncodeError):
        encode(Commit(0, "w", 0, "c", {1: torch.zeros(1)}))  # type: ignore[dict-item]
    with pytest.raises(EncodeError):
        encode(Commit(0, "w", 0, "c", {"x": torch.zeros(2).to_sparse()}))
    with pytest.raises(EncodeError) as ei:
        encode(Commit(0, "w", 0, "c", {}, {"loss": torch.tensor(1.0)}))  # type: ignore[dict-item]
    assert ei.value.code == "malformed"
    with pytest.raises(EncodeError):
        encode(Message(request_id=0))


def test_decode_limits_validate() -> None:
    with pytest.raises(ConfigError):
        DecodeLimits(max_frames=0)
    with pytest.raises(ConfigError):
        DecodeLimits(max_total_bytes=1.5)  # type: ignore[arg-type]


# -- op peeking and checksums (byte accounting, delta checkouts) --------------------------------


@pytest.mark.parametrize("msg", all_messages(), ids=lambda m: type(m).__name__)
def test_peek_op_reads_the_op_of_every_message(msg: Message) -> None:
    from chronos.distributed.protocol import peek_op

    frames = encode(msg)
    assert peek_op(frames[0]) == type(msg).op
    assert peek_op(bytes(frames[0])) == type(msg).op
    assert peek_op(memoryview(bytes(frames[0]))) == type(msg).op


@pytest.mark.parametrize(
    "frame",
    [b"", b"\x80", b"\x81\xa2op", b"\x81\xa2op\xa3xyz", b"\x81\xa2pv\x01", b"\x92\x01\x02",
     msgpack.packb({"pv": 1, "op": "commit"}), msgpack.packb({"op": "x" * 40}), b"\xde"],
)
def test_peek_op_never_raises_and_bounds_names(frame: bytes) -> None:
    from chronos.distributed.protocol import INVALID_OP, peek_op

    assert peek_op(frame) == INVALID_OP


def test_checksum_and_apply_delta() -> None:
    from chronos.distributed.protocol import apply_delta, checksum

    a = {"x": torch.arange(4, dtype=torch.float32), "b": torch.tensor(1.5, dtype=torch.bfloat16)}
    d = {"x": torch.full((4,), 0.25, dtype=torch.float64), "b": torch.tensor(0.5)}
    out = apply_delta(a, d)
    assert out["x"].dtype == torch.float32 and out["b"].dtype == torch.bfloat16
    assert out["x"].tolist() == [0.25, 1.25, 2.25, 3.25] and float(out["b"]) == 2.0
    assert a["x"].tolist() == [0.0, 1.0, 2.0, 3.0]  # not modified
    assert checksum(out) == checksum({k: v.clone() for k, v in out.items()})
    changed = dict(out, x=out["x"].clone())
    changed["x"][2] = torch.nextafter(changed["x"][2], torch.tensor(9.0))  # one ulp
    assert checksum(changed) != checksum(out)
    assert checksum({"y": out["x"]}) != checksum({"x": out["x"]})  # names count
    with pytest.raises(ProtocolError):
        apply_delta(a, {"x": d["x"]})
    with pytest.raises(ProtocolError):
        apply_delta({"x": a["x"]}, {"x": torch.zeros(1)})  # would broadcast: refused
