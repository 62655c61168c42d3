"""Composable compression codecs for tensors on the wire, with error feedback.

A codec turns one tensor ``x`` into named *parts* (plain tensors of wire-safe dtypes, see
:data:`WIRE_DTYPES`) and back: ``x̂ = decode(encode(x), shape, dtype)``. Codecs (spec strings
for :func:`parse_codec`, case-insensitive):

- ``identity``: lossless, ``x̂ = x``.
- ``fp16`` / ``bf16``: round to half / bfloat16 (relative error ≤ 2⁻¹¹ / 2⁻⁸ in the normal
  range); values beyond the wire type's (or the original dtype's) range saturate.
- ``int8``: one scale per tensor, ``s = max|x| / 127``, ``q = round(x / s) ∈ [−127, 127]``,
  ``x̂ = q·s``, so ``|x − x̂| ≤ s/2`` per entry. ``int8:stochastic`` rounds
  ``q = ⌊x/s + u⌋`` with ``u ~ U[0, 1)`` instead: ``P(q = ⌊y⌋+1) = y − ⌊y⌋`` for
  ``y = x/s``, so ``E[q] = y`` and ``E[x̂] = x`` (unbiased), at ``|x − x̂| < s``.
- ``topk:F``: keep the ``k = ⌈F·n⌉`` entries of largest magnitude (``F`` in (0, 1], read as
  the decimal you wrote), send their indices (ascending; int32 when ``n < 2³¹``, else int64)
  and values, zero the rest. Top-k is *biased* (``E[x̂] ≠ x``: small entries are always
  dropped); error feedback is what makes it converge.
- ``topk:F+V``: top-k, then its ``k`` values coded by ``V`` ∈ {fp16, bf16, int8,
  int8:stochastic}.

Error feedback (:func:`~chronos.communication.feedback.compress`): with residual ``r₀ = 0``,
candidate ``c_t = Δ_t + r_{t−1}``, sent ``d_t = decode(encode(c_t))`` and
``r_t = c_t − d_t``. Telescoping,

    Σ_{i≤t} d_i + r_t = Σ_{i≤t} Δ_i            (the error-feedback invariant)

exactly in real arithmetic (up to float rounding in practice): compression delays mass, it
never loses it.

Decoders treat parts as hostile network input: every part name, dtype, shape, index range and
scale is checked, and a violation raises :class:`CodecError` (a
:class:`~chronos.core.errors.ProtocolError`) before anything is written; the only allocation is
the output, whose size the *receiver* gives.

Example:
    >>> import torch
    >>> codec = parse_codec(" TopK:0.25 + INT8 ")
    >>> codec.spec
    'topk:0.25+int8'
    >>> x = torch.tensor([0.1, -1.27, 0.2, 0.5, 0.0, 0.3, -0.05, 0.01])
    >>> parts = codec.encode(x)
    >>> sorted(parts), parts["indices"].tolist(), parts["values"].tolist()
    (['indices', 'scale', 'values'], [1, 3], [-127, 50])
    >>> [round(v, 2) for v in codec.decode(parts, x.shape, x.dtype).tolist()]
    [0.0, -1.27, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]

Tensor dicts, error feedback and byte counts live in :mod:`chronos.communication.feedback`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import Tensor

from chronos.core.errors import (
    ChronosTypeError,
    ConfigError,
    NonFiniteError,
    ProtocolError,
)

__all__ = [
    "WIRE_DTYPES",
    "Cast",
    "Codec",
    "CodecError",
    "Identity",
    "Int8",
    "TopK",
    "parse_codec",
]

WIRE_DTYPES: frozenset[torch.dtype] = frozenset(
    {
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.uint8,
        torch.int32,
        torch.int64,
    }
)
"""The dtypes a codec may put in a part (a subset of the wire protocol's whitelist)."""

_FLOATS: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ALL: tuple[torch.dtype, ...] = (*_FLOATS, torch.int8, torch.uint8, torch.int32, torch.int64)
_ACCEPTED_SPECS = (
    "accepted: 'identity', 'fp16', 'bf16', 'int8', 'int8:stochastic', 'topk:F' with F in "
    "(0, 1], and 'topk:F+V' with V one of fp16, bf16, int8, int8:stochastic "
    "(case-insensitive), e.g. 'topk:0.1+int8'"
)

Shape = Sequence[int]


class CodecError(ProtocolError):
    """Encoded parts that no encoder of the codec could have produced (refuse the message)."""


def _name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _preview(items: Iterable[object], limit: int = 5) -> str:
    """Sorted ``repr`` list, capped (names can come from a hostile peer)."""
    xs = sorted(repr(x) for x in items)
    more = f", … ({len(xs) - limit} more)" if len(xs) > limit else ""
    return "[" + ", ".join(xs[:limit]) + more + "]"


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


def _check_names(spec: str, parts: object, names: Iterable[str]) -> Mapping[str, Tensor]:
    """``parts`` is a mapping whose keys are exactly ``names``."""
    if not isinstance(parts, Mapping):
        raise CodecError(f"codec {spec!r}: parts must be a dict, got {type(parts).__name__}")
    want = set(names)
    missing, extra = want - set(parts), set(parts) - want
    if missing or extra:
        raise CodecError(
            f"codec {spec!r} expects parts {sorted(want)}; missing {_preview(missing)}, "
            f"unexpected {_preview(extra)}"
        )
    return parts


def _check_parts(
    spec: str, parts: object, expected: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
) -> Mapping[str, Tensor]:
    """Exact part names, then per part: a Tensor of the expected dtype and shape, finite."""
    parts = _check_names(spec, parts, expected)
    for name, (dtype, shape) in expected.items():
        t = parts[name]
        if not isinstance(t, Tensor):
            raise CodecError(f"codec {spec!r}: part {name!r} is a {type(t).__name__}, not a Tensor")
        if t.dtype != dtype:
            raise CodecError(
                f"codec {spec!r}: part {name!r} must be {_name(dtype)}, got {_name(t.dtype)}"
            )
        if tuple(t.shape) != shape:
            raise CodecError(
                f"codec {spec!r}: part {name!r} must have shape {shape} for this tensor, "
                f"got {tuple(t.shape)} (was it encoded for another shape or codec?)"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CodecError(f"codec {spec!r}: part {name!r} holds NaN or Inf")
    return parts


def _saturation(wire: torch.dtype, orig: torch.dtype) -> float:
    """Largest ``wire`` value that is also ≤ the largest finite ``orig`` value."""
    lim = min(torch.finfo(wire).max, torch.finfo(orig).max)
    m = torch.tensor(lim, dtype=torch.float64).to(wire)
    if float(m) > lim:  # rounded up: step one ulp down (16-bit floats: bit patterns are ordered)
        m = (m.view(torch.int16) - 1).view(wire)
    return float(m)


class Codec(ABC):
    """A tensor codec: ``encode(x) -> parts`` and ``decode(parts, shape, dtype) -> x̂``.

    Subclasses are frozen dataclasses (equal when their specs are equal); build them with
    :func:`parse_codec`. ``spec`` is canonical: ``parse_codec(c.spec) == c``.
    """

    @property
    @abstractmethod
    def spec(self) -> str:
        """Canonical spec string."""

    @property
    @abstractmethod
    def part_names(self) -> frozenset[str]:
        """Names of the parts :meth:`encode` produces."""

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        """Input dtypes this codec accepts (floating point unless it is ``identity``)."""
        return _FLOATS

    @property
    def lossless(self) -> bool:
        """``decode(encode(x)) == x`` exactly (only ``identity``): no error feedback needed."""
        return False

    @abstractmethod
    def _encode(self, flat: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]: ...

    @abstractmethod
    def _decode(self, parts: Mapping[str, Tensor], n: int, dtype: torch.dtype) -> Tensor: ...

    def _check_dtype(self, dtype: object) -> None:
        if dtype not in self.dtypes:
            hint = " Use 'identity' for integer tensors." if dtype in _ALL else ""
            raise ConfigError(
                f"codec {self.spec!r} takes tensors of dtype "
                f"{', '.join(_name(d) for d in self.dtypes)}; got {dtype}.{hint}"
            )

    def encode(self, x: Tensor, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Encode ``x`` into wire-safe parts (fresh tensors; ``x`` is not modified).

        ``generator`` drives stochastic rounding (``int8:stochastic``); ``None`` uses torch's
        global generator. Raises :class:`~chronos.core.errors.ConfigError` for an unsupported
        dtype and :class:`~chronos.core.errors.NonFiniteError` for NaN/Inf entries.
        """
        if not isinstance(x, Tensor):
            raise ChronosTypeError(f"encode() takes a torch.Tensor, got {type(x).__name__}")
        self._check_dtype(x.dtype)
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise NonFiniteError(
                f"codec {self.spec!r} cannot encode NaN or Inf; find where the update diverged"
            )
        with torch.no_grad():
            return self._encode(x.detach().reshape(-1), generator)

    def decode(self, parts: Mapping[str, Tensor], shape: Shape, dtype: torch.dtype) -> Tensor:
        """Rebuild a tensor of ``shape`` and ``dtype`` (the original's) from ``parts``.

        Raises :class:`CodecError` when the parts cannot come from this codec's encoder.
        """
        if isinstance(shape, int) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise ConfigError(f"shape must be a sequence of ints >= 0, got {shape!r}")
        self._check_dtype(dtype)
        n = math.prod(shape)
        with torch.no_grad():
            return self._decode(parts, n, dtype).reshape(tuple(shape))

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class Identity(Codec):
    """Lossless: one part ``values`` = the flattened tensor (any dtype in :data:`WIRE_DTYPES`).

    >>> import torch
    >>> Identity().decode(Identity().encode(torch.arange(4)), (2, 2), torch.int64).tolist()
    [[0, 1], [2, 3]]
    """

    @property
    def spec(self) -> str:
        return "identity"

    @property
    def lossless(self) -> bool:
        return True

    @property
    def part_names(self) -> frozenset[str]:
        return frozenset({"values"})

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return _ALL

    def _encode(self, flat: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        return {"values": flat.clone()}

    def _decode(self, parts: Mapping[str, Tensor], n: int, dtype: torch.dtype) -> Tensor:
        return _check_parts(self.spec, parts, {"values": (dtype, (n,))})["values"].clone()


@dataclass(frozen=True)
class Cast(Codec):
    """Round to ``wire`` (float16 or bfloat16); one part ``values``.

    Round-to-nearest gives ``|x − x̂| ≤ 2⁻¹¹|x|`` (fp16) or ``2⁻⁸|x|`` (bf16) for normal
    numbers. Entries beyond ``M`` = the largest value finite in both ``wire`` and the original
    dtype are saturated to ``±M`` (error feedback carries the excess).

    >>> import torch
    >>> c = Cast(torch.float16)
    >>> c.decode(c.encode(torch.tensor([1e5, 1/3])), (2,), torch.float32).tolist()
    [65504.0, 0.333251953125]
    """

    wire: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.wire not in (torch.float16, torch.bfloat16):
            raise ConfigError(f"Cast wire dtype must be float16 or bfloat16, got {self.wire}")

    @property
    def spec(self) -> str:
        return "fp16" if self.wire == torch.float16 else "bf16"

    @property
    def part_names(self) -> frozenset[str]:
        return frozenset({"values"})

    def _encode(self, flat: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        if flat.dtype == self.wire:
            return {"values": flat.clone()}
        m = _saturation(self.wire, flat.dtype)
        return {"values": flat.to(torch.float64).clamp(-m, m).to(self.wire)}

    def _decode(self, parts: Mapping[str, Tensor], n: int, dtype: torch.dtype) -> Tensor:
        v = _check_parts(self.spec, parts, {"values": (self.wire, (n,))})["values"]
        if n and float(v.abs().max()) > _saturation(self.wire, dtype):
            raise CodecError(f"codec {self.spec!r}: values overflow {_name(dtype)}")
        return v.to(dtype, copy=True)


@dataclass(frozen=True)
class Int8(Codec):
    """Per-tensor int8 quantization; parts ``values`` (int8, in [−127, 127]) and ``scale``.

    ``s = max|x| / 127`` (a 0-d float32 part; float64 for float64 tensors), ``x̂ = q·s``.
    Nearest: ``q = round(x/s)``, ``|x − x̂| ≤ s/2``. Stochastic: ``q = ⌊x/s + u⌋``,
    ``u ~ U[0, 1)`` from ``generator``, so ``E[x̂] = x`` and ``|x − x̂| < s``.

    >>> import torch
    >>> c, x = Int8(), torch.tensor([-1.27, 0.5, 0.004])
    >>> p = c.encode(x)
    >>> p["values"].tolist(), round(float(p["scale"]), 4)
    ([-127, 50, 0], 0.01)
    >>> g = torch.Generator().manual_seed(0)
    >>> s = Int8(stochastic=True)
    >>> m = s.decode(s.encode(x.repeat(4000), generator=g), (4000, 3), x.dtype).mean(0)
    >>> bool(torch.allclose(m, x, atol=3e-4))    # unbiased: 0.004 is not rounded away
    True
    """

    stochastic: bool = False

    @property
    def spec(self) -> str:
        return "int8:stochastic" if self.stochastic else "int8"

    @property
    def part_names(self) -> frozenset[str]:
        return frozenset({"values", "scale"})

    @staticmethod
    def _work(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    def _encode(self, flat: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        work = self._work(flat.dtype)
        x = flat.to(work)
        scale = x.abs().max() / 127 if x.numel() else torch.zeros((), dtype=work)
        y = x / torch.where(scale > 0, scale, torch.ones_like(scale))
        if self.stochastic:
            dev = generator.device if generator is not None else x.device
            u = torch.rand(x.shape, generator=generator, dtype=work, device=dev)
            q = torch.floor(y + u.to(x.device))
        else:
            q = torch.round(y)
        return {"values": q.clamp_(-127, 127).to(torch.int8), "scale": scale.reshape(())}

    def _decode(self, parts: Mapping[str, Tensor], n: int, dtype: torch.dtype) -> Tensor:
        work = self._work(dtype)
        p = _check_parts(self.spec, parts, {"values": (torch.int8, (n,)), "scale": (work, ())})
        scale, q = float(p["scale"]), p["values"]
        top = float(torch.finfo(dtype).max)
        if not 0.0 <= scale <= top / 127 * (1 + 2**-20):
            raise CodecError(
                f"codec {self.spec!r}: scale must be in [0, {top / 127:.4g}], got {scale!r}"
            )
        if n and int(q.min()) < -127:
            raise CodecError(f"codec {self.spec!r}: values must be in [-127, 127], got -128")
        return (q.to(work) * p["scale"]).clamp_(-top, top).to(dtype)


@dataclass(frozen=True)
class TopK(Codec):
    """Keep the ``k = ⌈F·n⌉`` largest-magnitude entries; ``values`` coded by ``values_codec``.

    Parts: ``indices`` (strictly ascending, int32 when ``n < 2³¹`` else int64) plus the parts of
    ``values_codec`` for the ``k`` kept values. ``x̂`` is zero off the kept set. Biased
    (``‖x − x̂‖² = Σ`` of the dropped squares); pair it with error feedback (:func:`compress`).

    >>> import torch
    >>> c = TopK(0.5)
    >>> p = c.encode(torch.tensor([3.0, -1.0, 0.5, -4.0]))
    >>> p["indices"].tolist(), p["values"].tolist()
    ([0, 3], [3.0, -4.0])
    >>> c.decode(p, (4,), torch.float32).tolist()
    [3.0, 0.0, 0.0, -4.0]
    """

    fraction: float
    values_codec: Codec = field(default_factory=Identity)

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ConfigError(f"topk fraction must be a number in (0, 1], got {f!r}")
        object.__setattr__(self, "fraction", float(f))
        if not isinstance(self.values_codec, (Identity, Cast, Int8)):
            raise ConfigError(
                f"topk values codec must be identity, fp16, bf16 or int8, got "
                f"{self.values_codec!r}; {_ACCEPTED_SPECS}"
            )

    @property
    def spec(self) -> str:
        tail = "" if isinstance(self.values_codec, Identity) else "+" + self.values_codec.spec
        return f"topk:{self.fraction!r}{tail}"

    @property
    def part_names(self) -> frozenset[str]:
        return self.values_codec.part_names | {"indices"}

    def k(self, n: int) -> int:
        """Entries kept of ``n``: ``min(n, max(1, ⌈F·n⌉))`` (0 when ``n = 0``), exact decimal F."""
        if n <= 0:
            return 0
        return min(n, max(1, math.ceil(Fraction(repr(self.fraction)) * n)))

    def _encode(self, flat: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        n, k = flat.numel(), self.k(flat.numel())
        if k == n:
            idx = torch.arange(n, device=flat.device)
        else:
            idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        inner = self.values_codec._encode(flat[idx], generator)
        return {"indices": idx.to(_index_dtype(n)), **inner}

    def _decode(self, parts: Mapping[str, Tensor], n: int, dtype: torch.dtype) -> Tensor:
        k, names = self.k(n), self.part_names
        _check_names(self.spec, parts, names)
        idx = _check_parts(
            self.spec, {"indices": parts["indices"]}, {"indices": (_index_dtype(n), (k,))}
        )["indices"]
        if k and not (int(idx[0]) >= 0 and int(idx[-1]) < n and bool((idx[1:] > idx[:-1]).all())):
            raise CodecError(
                f"codec {self.spec!r}: indices must be strictly ascending in [0, {n}), "
                f"got range [{int(idx.min())}, {int(idx.max())}]"
            )
        vals = self.values_codec._decode(
            {name: t for name, t in parts.items() if name != "indices"}, k, dtype
        )
        out = torch.zeros(n, dtype=dtype, device=vals.device)
        out[idx.long()] = vals
        return out


_ALIASES = {
    "identity": "identity",
    "none": "identity",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "int8": "int8",
    "topk": "topk",
}


def _parse_stage(stage: str, spec: str) -> Codec:
    raw_name, _, raw_arg = stage.partition(":")
    name, arg = _ALIASES.get(raw_name.strip()), raw_arg.strip()
    if name is None:
        raise ConfigError(f"unknown codec {raw_name.strip()!r} in {spec!r}; {_ACCEPTED_SPECS}")
    if name == "topk":
        if not arg:
            raise ConfigError(f"'topk' needs a fraction, e.g. 'topk:0.1', in {spec!r}")
        try:
            f = float(arg)
        except ValueError:
            raise ConfigError(f"topk fraction {arg!r} is not a number; {_ACCEPTED_SPECS}") from None
        if not 0.0 < f <= 1.0:  # also rejects nan
            raise ConfigError(
                f"topk fraction must be in (0, 1] (e.g. 'topk:0.1' keeps 10%), got {arg!r} "
                f"in {spec!r}"
            )
        return TopK(f)
    if name == "int8" and arg in ("", "nearest", "stochastic", "sr"):
        return Int8(stochastic=arg in ("stochastic", "sr"))
    if arg:
        raise ConfigError(f"codec {name!r} takes no argument, got {stage!r}; {_ACCEPTED_SPECS}")
    if name == "identity":
        return Identity()
    return Cast(torch.float16 if name == "fp16" else torch.bfloat16)


def parse_codec(spec: str | Codec) -> Codec:
    """Parse a codec spec such as ``'topk:0.1+int8'`` (case and whitespace do not matter).

    A :class:`Codec` is returned as it is. ``parse_codec(c.spec) == c`` for every codec.

    >>> parse_codec("TOPK: 0.10 + fp16").spec, parse_codec("topk:1e-3").spec
    ('topk:0.1+fp16', 'topk:0.001')
    >>> parse_codec("int8+int8")
    Traceback (most recent call last):
    ...
    chronos.core.errors.ConfigError: 'int8' appears twice in 'int8+int8'; accepted: ...
    """
    if isinstance(spec, Codec):
        return spec
    if not isinstance(spec, str):
        raise ChronosTypeError(f"codec spec must be a str, got {type(spec).__name__}")
    stages = [s.strip() for s in spec.lower().split("+")]
    if not all(stages):
        raise ConfigError(f"empty codec stage in {spec!r}; {_ACCEPTED_SPECS}")
    codecs = [_parse_stage(s, spec) for s in stages]
    if len(codecs) == 1:
        return codecs[0]
    kinds = [c.spec.partition(":")[0] for c in codecs]
    for kind in kinds:
        if kinds.count(kind) > 1:
            raise ConfigError(f"{kind!r} appears twice in {spec!r}; {_ACCEPTED_SPECS}")
    first, second = codecs[0], codecs[1]
    if len(codecs) > 2 or not isinstance(first, TopK) or isinstance(second, TopK):
        raise ConfigError(f"cannot compose {spec!r}: only 'topk:F+V' is; {_ACCEPTED_SPECS}")
    return TopK(first.fraction, second)
