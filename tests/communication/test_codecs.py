import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chronos.communication import (
    WIRE_DTYPES,
    Cast,
    CodecError,
    ErrorFeedbackCompressor,
    Identity,
    Int8,
    TopK,
    compress,
    decode_dict,
    encode_dict,
    parse_codec,
    wire_bytes,
)
from chronos.communication.codecs import _index_dtype
from chronos.core.errors import (
    ChronosError,
    ChronosTypeError,
    ConfigError,
    NonFiniteError,
    ProtocolError,
    ShapeMismatchError,
)

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
ALL_SPECS = [
    "identity",
    "fp16",
    "bf16",
    "int8",
    "int8:stochastic",
    "topk:0.1",
    "topk:0.5+int8",
    "topk:0.1+fp16",
    "topk:0.3+bf16",
    "topk:0.25+int8:stochastic",
    "topk:1.0",
]

values = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=0, max_size=40)


def roundtrip(codec, x, generator=None):
    return codec.decode(codec.encode(x, generator=generator), x.shape, x.dtype)


# --- identity / casts ------------------------------------------------------------------------


@given(
    xs=values, dtype=st.sampled_from([*FLOATS, torch.int8, torch.uint8, torch.int32, torch.int64])
)
def test_identity_roundtrip_is_exact(xs, dtype):
    x = torch.tensor(xs, dtype=torch.float64).clamp(0, 100).to(dtype).reshape(-1, 1)
    y = roundtrip(Identity(), x)
    assert y.dtype == dtype and y.shape == x.shape and torch.equal(y, x)


def test_parts_do_not_alias_the_input():
    x = torch.ones(5)
    for spec in ALL_SPECS:
        parts = parse_codec(spec).encode(x)
        for p in parts.values():
            p.zero_()
        assert torch.equal(x, torch.ones(5)), spec


@given(xs=values, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fp16_bf16_error_bounds(xs, dtype):
    x = torch.tensor(xs, dtype=dtype)
    for wire, rel, tiny in [(torch.float16, 2**-11, 2**-25), (torch.bfloat16, 2**-8, 2**-134)]:
        y = roundtrip(Cast(wire), x)
        assert y.dtype == dtype
        assert bool((y - x).abs().le(torch.clamp(rel * x.abs(), min=tiny)).all())


def test_casts_saturate_instead_of_overflowing():
    x = torch.tensor([1e6, -1e6, 3.0])
    assert roundtrip(Cast(torch.float16), x).tolist() == [65504.0, -65504.0, 3.0]
    # bf16 rounds 65504 up to 65536, which is inf in float16: saturate below instead
    y = roundtrip(Cast(torch.bfloat16), torch.tensor([65504.0], dtype=torch.float16))
    assert bool(torch.isfinite(y).all()) and float(y) == 65280.0
    out = compress("fp16", {"w": x.double()})
    assert out.residual["w"].tolist() == [1e6 - 65504.0, -(1e6 - 65504.0), 0.0]


# --- int8 -----------------------------------------------------------------------------------


@given(xs=values, dtype=st.sampled_from(FLOATS))
def test_int8_nearest_error_at_most_half_a_step(xs, dtype):
    x = torch.tensor(xs, dtype=torch.float32).to(dtype)
    parts = Int8().encode(x)
    assert parts["scale"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert parts["values"].dtype == torch.int8
    assert bool((parts["values"].abs() <= 127).all())
    s = float(parts["scale"])
    y = Int8().decode(parts, x.shape, dtype)
    assert y.dtype == dtype
    if x.numel():
        assert s == pytest.approx(float(x.double().abs().max()) / 127, rel=1e-6)
    err = (y.double() - x.double()).abs()
    out_ulp = {torch.float16: 2**-11, torch.bfloat16: 2**-8}.get(dtype, 1e-6)
    assert bool((err <= s / 2 * (1 + 1e-5) + out_ulp * x.double().abs() + 1e-30).all())


def test_int8_zero_and_empty_tensors():
    assert roundtrip(Int8(), torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    assert roundtrip(Int8(), torch.zeros(0)).shape == (0,)
    assert roundtrip(Int8(), torch.tensor(2.5)).shape == ()
    assert float(roundtrip(Int8(), torch.tensor(2.5))) == pytest.approx(2.5)


def test_int8_stochastic_is_unbiased_and_reproducible():
    x = torch.tensor([1.0, 0.3, -0.003, 0.123, -0.77, 0.0])
    codec, n = Int8(stochastic=True), 20_000
    s = float(x.abs().max()) / 127
    # one encode of n copies = n independent roundings (the scale is that of x)
    g = torch.Generator().manual_seed(1)
    draws = codec.decode(codec.encode(x.repeat(n), generator=g), (n, 6), x.dtype).double()
    assert bool(((draws - x.double()).abs() < s * (1 + 1e-6)).all())
    # Var ≤ s²/4 per draw, so the mean is within 5·s/(2√n) with overwhelming probability
    assert bool(((draws.mean(0) - x.double()).abs() <= 5 * s / (2 * math.sqrt(n))).all())
    # nearest rounding is biased on the same entry: -0.003 → 0
    assert float(roundtrip(Int8(), x)[2]) == 0.0
    # and across seeds, one tensor at a time
    means = (
        torch.stack(
            [roundtrip(codec, x, torch.Generator().manual_seed(seed)) for seed in range(400)]
        )
        .double()
        .mean(0)
    )
    assert bool(((means - x.double()).abs() <= 5 * s / (2 * math.sqrt(400))).all())
    a = codec.encode(x, generator=torch.Generator().manual_seed(7))
    b = codec.encode(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a["values"], b["values"])


# --- top-k ----------------------------------------------------------------------------------


@given(
    xs=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=60),
    fraction=st.sampled_from([0.01, 0.1, 0.25, 0.5, 0.7, 1.0]),
)
def test_topk_keeps_exactly_the_k_largest_magnitudes(xs, fraction):
    x = torch.tensor(xs)
    codec = TopK(fraction)
    parts = codec.encode(x)
    k = codec.k(x.numel())
    assert k == min(x.numel(), max(1, math.ceil(Fraction(round(fraction * 100), 100) * x.numel())))
    idx = parts["indices"]
    assert idx.dtype == torch.int32 and idx.shape == (k,)
    assert bool((idx[1:] > idx[:-1]).all())
    y = codec.decode(parts, x.shape, x.dtype)
    kept = torch.zeros(x.numel(), dtype=torch.bool)
    kept[idx.long()] = True
    assert torch.equal(y[kept], x[kept]) and bool((y[~kept] == 0).all())
    if k < x.numel():
        assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())


def test_topk_k_uses_the_decimal_fraction():
    assert TopK(0.7).k(10) == 7  # 0.7 * 10 = 7.000000000000001 in binary floats
    assert TopK(0.1).k(2000) == 200
    assert TopK(0.001).k(10) == 1 and TopK(1.0).k(0) == 0
    assert _index_dtype(2**31 - 1) == torch.int32 and _index_dtype(2**31) == torch.int64


@pytest.mark.parametrize("inner", ["fp16", "bf16", "int8", "int8:stochastic"])
def test_composed_topk_codes_the_kept_values(inner):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, generator=g, dtype=torch.float64)
    codec = parse_codec(f"topk:0.1+{inner}")
    parts = codec.encode(x, generator=g)
    assert set(parts) == {"indices"} | parse_codec(inner).part_names
    idx = parts["indices"].long()
    y = codec.decode(parts, x.shape, x.dtype).reshape(-1)
    flat = x.reshape(-1)
    if inner != "int8:stochastic":  # the kept values are coded exactly as on their own
        assert torch.equal(y[idx], roundtrip(parse_codec(inner), flat[idx]))
    off = torch.ones_like(flat, dtype=torch.bool)
    off[idx] = False
    assert bool((y[off] == 0).all())
    top = float(flat[idx].abs().max())
    tol = {"fp16": 2**-11 * top, "bf16": 2**-8 * top}.get(inner, top / 127)
    assert bool(((y[idx] - flat[idx]).abs() <= tol * (1 + 1e-6)).all())
    assert set(idx.tolist()) == set(flat.abs().topk(15).indices.tolist())


# --- error feedback -------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    spec=st.sampled_from(ALL_SPECS),
    steps=st.lists(
        st.lists(st.floats(-10, 10, allow_nan=False), min_size=6, max_size=6),
        min_size=1,
        max_size=12,
    ),
    seed=st.integers(0, 2**16),
)
def test_error_feedback_invariant(spec, steps, seed):
    codec, g = parse_codec(spec), torch.Generator().manual_seed(seed)
    f64 = torch.float64
    total = {"a/w": torch.zeros(2, 3, dtype=f64), "b": torch.zeros(2, dtype=f64)}
    sent = {k: torch.zeros_like(v) for k, v in total.items()}
    residual = None
    for xs in steps:
        u = {
            "a/w": torch.tensor(xs, dtype=torch.float64).reshape(2, 3),
            "b": torch.tensor(xs[:2], dtype=torch.float64) * -3,
        }
        out = compress(codec, u, residual, generator=g)
        residual = out.residual
        for k in total:
            total[k] += u[k]
            sent[k] += out.decoded[k]
            assert torch.allclose(sent[k] + residual[k], total[k], rtol=0, atol=1e-9)
        assert set(out.parts) == {f"{n}/{p}" for n in u for p in codec.part_names}


def test_compressor_object_tracks_residual_bytes_and_requeue():
    ef = ErrorFeedbackCompressor("topk:0.5+int8", seed=3)
    u = {"w": torch.tensor([4.0, -1.0, 0.5, 2.0])}
    out = ef.compress(u)
    assert ef.residual is not None
    assert torch.allclose(out.decoded["w"] + ef.residual["w"], u["w"])
    assert ef.bytes_sent == out.nbytes == 2 * 4 + 2 + 4 and ef.dense_bytes == 16
    ef.requeue(out.decoded)  # the commit was rejected: everything is owed again
    assert torch.allclose(ef.residual["w"], u["w"])
    ef.reset()
    assert ef.residual is None
    a = ErrorFeedbackCompressor("int8:stochastic", seed=5).compress(u).parts
    b = ErrorFeedbackCompressor("int8:stochastic", seed=5).compress(u).parts
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compress_rejects_a_mismatched_residual():
    u = {"w": torch.ones(3)}
    with pytest.raises(ShapeMismatchError, match="reset the residual"):
        compress("int8", u, {"w": torch.ones(4)})
    with pytest.raises(ShapeMismatchError, match="float64"):
        compress("int8", u, {"w": torch.ones(3, dtype=torch.float64)})
    with pytest.raises(ShapeMismatchError):
        compress("int8", u, {"v": torch.ones(3)})


def test_compress_detaches_autograd_inputs():
    w = torch.ones(4, requires_grad=True)
    out = compress("topk:0.5+fp16", {"w": w * 2})
    assert not out.decoded["w"].requires_grad and not out.residual["w"].requires_grad


# --- malformed parts (they come from the network) -------------------------------------------


def good(spec="topk:0.5+int8", n=10):
    return parse_codec(spec), parse_codec(spec).encode(torch.linspace(-1, 1, n))


def test_decoders_reject_missing_and_extra_parts():
    codec, parts = good()
    with pytest.raises(CodecError, match=r"missing \['scale'\]"):
        codec.decode({k: v for k, v in parts.items() if k != "scale"}, (10,), torch.float32)
    with pytest.raises(CodecError, match=r"unexpected \['junk'\]"):
        codec.decode({**parts, "junk": torch.zeros(1)}, (10,), torch.float32)
    with pytest.raises(CodecError, match="must be a dict"):
        codec.decode([1, 2], (10,), torch.float32)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="not a Tensor"):
        codec.decode({**parts, "scale": 1.0}, (10,), torch.float32)


def test_decoders_reject_wrong_dtypes_and_shapes():
    codec, parts = good()
    with pytest.raises(CodecError, match="'indices' must be int32, got int64"):
        codec.decode({**parts, "indices": parts["indices"].long()}, (10,), torch.float32)
    with pytest.raises(CodecError, match="'values' must be int8"):
        codec.decode({**parts, "values": parts["values"].float()}, (10,), torch.float32)
    with pytest.raises(CodecError, match="'scale' must be float32"):
        codec.decode({**parts, "scale": parts["scale"].double()}, (10,), torch.float32)
    with pytest.raises(CodecError, match="shape"):
        codec.decode(parts, (12,), torch.float32)  # k = 6, not 5
    with pytest.raises(CodecError, match="shape"):
        codec.decode({**parts, "scale": parts["scale"].reshape(1)}, (10,), torch.float32)
    ident, p = good("identity")
    with pytest.raises(CodecError, match=r"shape \(11,\)"):
        ident.decode(p, (11,), torch.float32)
    with pytest.raises(CodecError, match="must be float64"):
        ident.decode(p, (10,), torch.float64)


def test_decoders_reject_bad_indices():
    codec, parts = good()
    idx = parts["indices"]
    for bad, why in [
        (torch.tensor([0, 1, 2, 3, 10], dtype=torch.int32), "out of range"),
        (torch.tensor([-1, 1, 2, 3, 4], dtype=torch.int32), "negative"),
        (torch.tensor([0, 1, 1, 3, 4], dtype=torch.int32), "duplicate"),
        (torch.flip(idx, [0]), "unsorted"),
        (torch.tensor([0, 1, 2, 3, 2**31 - 1], dtype=torch.int32), "huge"),
    ]:
        with pytest.raises(CodecError, match=r"strictly ascending in \[0, 10\)"):
            codec.decode({**parts, "indices": bad}, (10,), torch.float32)
            pytest.fail(why)


def test_decoders_reject_bad_scales_and_values():
    codec, parts = good()
    for scale in [float("nan"), float("inf"), -1.0, 1e38]:
        with pytest.raises(CodecError, match=r"scale|NaN"):
            codec.decode({**parts, "scale": torch.tensor(scale)}, (10,), torch.float32)
    with pytest.raises(CodecError, match="-128"):
        codec.decode(
            {**parts, "values": torch.full((5,), -128, dtype=torch.int8)}, (10,), torch.float32
        )
    with pytest.raises(CodecError, match="scale must be in"):  # 127·s would overflow float16
        Int8().decode(
            {"values": torch.ones(2, dtype=torch.int8), "scale": torch.tensor(1e3)},
            (2,),
            torch.float16,
        )
    fp16 = parse_codec("fp16")
    with pytest.raises(CodecError, match="NaN or Inf"):
        fp16.decode({"values": torch.tensor([1.0, float("inf")]).half()}, (2,), torch.float32)
    with pytest.raises(CodecError, match="overflow float16"):
        parse_codec("bf16").decode({"values": torch.tensor([1e6]).bfloat16()}, (1,), torch.float16)


def test_codec_errors_are_protocol_errors():
    assert issubclass(CodecError, ProtocolError) and issubclass(CodecError, ChronosError)


# --- tensor dicts ---------------------------------------------------------------------------


def test_dict_roundtrip_with_slashes_in_names():
    d = {"enc/layer.0/w": torch.randn(3, 4), "b": torch.randn(5).double(), "": torch.ones(2)}
    parts = encode_dict("topk:0.5+fp16", d)
    assert "enc/layer.0/w/indices" in parts
    for like in (d, {k: (tuple(v.shape), v.dtype) for k, v in d.items()}):
        out = decode_dict("topk:0.5+fp16", parts, like)
        assert list(out) == list(d)
        assert all(out[k].shape == d[k].shape and out[k].dtype == d[k].dtype for k in d)
    exact = decode_dict("identity", encode_dict("identity", d), d)
    assert all(torch.equal(exact[k], d[k]) for k in d)


def test_decode_dict_strict_keys():
    d = {"a": torch.ones(3), "b/c": torch.ones(2)}
    parts = encode_dict("int8", d)
    with pytest.raises(CodecError, match=r"missing \['b/c'\]"):
        decode_dict("int8", {k: v for k, v in parts.items() if k.startswith("a/")}, d)
    with pytest.raises(CodecError, match=r"unexpected \['z'\]"):
        decode_dict("int8", {**parts, "z/values": torch.ones(1)}, d)
    with pytest.raises(CodecError, match=r"tensor 'b/c'.*unexpected"):
        decode_dict("int8", {**parts, "b/c/extra": torch.ones(1)}, d)
    with pytest.raises(CodecError, match="'name/part'"):
        decode_dict("int8", {**parts, "noslash": torch.ones(1)}, d)
    hostile = {f"x{i}/values": torch.zeros(1) for i in range(10_000)}
    with pytest.raises(CodecError) as e:
        decode_dict("int8", hostile, d)
    assert len(str(e.value)) < 300 and "more" in str(e.value)


def test_encode_dict_names_the_bad_tensor():
    with pytest.raises(ConfigError, match=r"tensor 'steps'.*identity"):
        encode_dict("int8", {"w": torch.ones(2), "steps": torch.tensor([1, 2])})
    with pytest.raises(NonFiniteError, match="tensor 'w'"):
        encode_dict("topk:0.5", {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ChronosTypeError):
        encode_dict("int8", {"w": [1.0]})  # type: ignore[dict-item]


# --- specs and dtypes -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_canonical_spec_roundtrips(spec):
    codec = parse_codec(spec)
    assert codec.spec == spec and parse_codec(codec.spec) == codec and str(codec) == spec


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (" TopK : 0.10 + INT8 ", "topk:0.1+int8"),
        ("float16", "fp16"),
        ("BFloat16", "bf16"),
        ("half", "fp16"),
        ("none", "identity"),
        ("int8:nearest", "int8"),
        ("int8:SR", "int8:stochastic"),
        ("topk:1e-3", "topk:0.001"),
        ("topk:1", "topk:1.0"),
        ("topk:0.2+identity", "topk:0.2"),
    ],
)
def test_spec_aliases_case_and_whitespace(raw, canonical):
    assert parse_codec(raw).spec == canonical
    assert parse_codec(parse_codec(raw)) == parse_codec(raw)


@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        ("gzip", "unknown codec 'gzip'"),
        ("topk", "needs a fraction"),
        ("topk:", "needs a fraction"),
        ("topk:0", r"\(0, 1\]"),
        ("topk:1.5", r"\(0, 1\]"),
        ("topk:-0.1", r"\(0, 1\]"),
        ("topk:nan", r"\(0, 1\]"),
        ("topk:abc", "not a number"),
        ("int8+int8", "'int8' appears twice"),
        ("topk:0.1+topk:0.2", "appears twice"),
        ("int8+topk:0.1", "cannot compose"),
        ("fp16+int8", "cannot compose"),
        ("topk:0.1+int8+fp16", "cannot compose"),
        ("fp16:2", "takes no argument"),
        ("int8:fast", "takes no argument"),
        ("", "empty"),
        ("topk:0.1+", "empty"),
    ],
)
def test_bad_specs_say_what_is_accepted(bad, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        parse_codec(bad)
    assert "accepted" in str(e.value) or "e.g." in str(e.value)


def test_bad_arguments():
    with pytest.raises(ChronosTypeError):
        parse_codec(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TopK(0.0)
    with pytest.raises(ConfigError):
        TopK(0.5, TopK(0.5))
    with pytest.raises(ConfigError):
        Cast(torch.float32)
    with pytest.raises(ConfigError, match="shape"):
        Int8().decode({}, (-1,), torch.float32)


@pytest.mark.parametrize("spec", ["fp16", "bf16", "int8", "topk:0.5", "topk:0.5+int8"])
@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
)
def test_lossy_codecs_refuse_non_float_inputs(spec, dtype):
    with pytest.raises(ConfigError, match="float16, bfloat16, float32, float64"):
        parse_codec(spec).encode(torch.zeros(3, dtype=dtype))
    with pytest.raises(ConfigError):
        parse_codec(spec).decode({}, (3,), dtype)


def test_identity_refuses_non_wire_dtypes():
    with pytest.raises(ConfigError):
        Identity().encode(torch.zeros(3, dtype=torch.complex64))


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_all_parts_are_wire_safe(spec, dtype):
    from chronos.distributed.protocol import DTYPES

    assert set(DTYPES.values()) >= WIRE_DTYPES
    parts = parse_codec(spec).encode(torch.randn(7, 3).to(dtype))
    assert all(p.dtype in WIRE_DTYPES for p in parts.values())
    assert set(parts) == parse_codec(spec).part_names


# --- bytes ----------------------------------------------------------------------------------


def test_byte_ratios_on_a_2000_float32_vector():
    x = {"w": torch.randn(2000, generator=torch.Generator().manual_seed(0))}
    dense = wire_bytes(x)
    assert dense == 8000
    specs = [*ALL_SPECS, "topk:0.1+int8", "topk:0.01+int8"]
    ratios = {s: wire_bytes(encode_dict(s, x)) / dense for s in specs}
    assert ratios["identity"] == 1.0 and ratios["fp16"] == ratios["bf16"] == 0.5
    assert ratios["int8"] == (2000 + 4) / 8000
    assert ratios["topk:0.1"] == 200 * 8 / 8000
    assert wire_bytes(encode_dict("topk:0.1+int8", x)) == 200 * 4 + 200 + 4
    assert ratios["topk:0.1+int8"] == 0.1255  # well under 20% of dense
