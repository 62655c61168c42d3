"""Tensor dicts through a codec, error feedback and byte counts.

:func:`encode_dict` / :func:`decode_dict` apply a :class:`~chronos.communication.codecs.Codec`
to every tensor of a dict (keys ``"{name}/{part}"``); :func:`compress` adds error feedback:
with residual ``r₀ = 0``, candidate ``c_t = Δ_t + r_{t−1}``, sent ``d_t = decode(encode(c_t))``
and ``r_t = c_t − d_t``, so ``Σ_{i≤t} d_i + r_t = Σ_{i≤t} Δ_i`` (compression delays mass, it
never loses it).

Example:
    >>> import torch
    >>> x = torch.tensor([0.1, -1.27, 0.2, 0.5, 0.0, 0.3, -0.05, 0.01])
    >>> out = compress("topk:0.25+int8", {"w": x})     # error feedback keeps the rest
    >>> bool(torch.allclose(out.decoded["w"] + out.residual["w"], x))
    True
    >>> wire_bytes(out.parts), wire_bytes({"w": x})    # 2 indices + 2 int8 + 1 scale
    (14, 32)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from chronos.communication.codecs import Codec, CodecError, Shape, _name, _preview, parse_codec
from chronos.core.errors import (
    ChronosError,
    ChronosTypeError,
    ConfigError,
    NonFiniteError,
    ShapeMismatchError,
)
from chronos.core.tensordict import TensorDict

__all__ = [
    "Compressed",
    "ErrorFeedbackCompressor",
    "compress",
    "decode_dict",
    "encode_dict",
    "wire_bytes",
]


def wire_bytes(parts: Mapping[str, Tensor]) -> int:
    """Payload bytes of a tensor dict: ``Σ numel·itemsize`` (frame headers not included).

    >>> import torch
    >>> wire_bytes({"a/values": torch.zeros(10, dtype=torch.int8), "a/scale": torch.zeros(())})
    14
    """
    return sum(t.numel() * t.element_size() for t in parts.values())


def _renamed(name: str, err: ChronosError) -> ChronosError:
    return type(err)(f"tensor {name!r}: {err}")


def encode_dict(
    codec: Codec | str, d: Mapping[str, Tensor], *, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Encode every tensor of ``d``; keys ``f"{name}/{part}"`` (part names have no ``/``).

    >>> import torch
    >>> sorted(encode_dict("int8", {"layer/w": torch.ones(3)}))
    ['layer/w/scale', 'layer/w/values']
    """
    c = parse_codec(codec)
    if not isinstance(d, Mapping):
        raise ChronosTypeError(f"encode_dict() takes a dict[str, Tensor], got {type(d).__name__}")
    out: dict[str, Tensor] = {}
    for name, t in d.items():
        if not isinstance(name, str):
            raise ChronosTypeError(f"tensor names must be str, got {name!r}")
        try:
            parts = c.encode(t, generator=generator)
        except (ConfigError, NonFiniteError, ChronosTypeError) as e:
            raise _renamed(name, e) from e
        out.update({f"{name}/{p}": v for p, v in parts.items()})
    return out


def decode_dict(
    codec: Codec | str,
    parts: Mapping[str, Tensor],
    like: Mapping[str, Tensor] | Mapping[str, tuple[Shape, torch.dtype]],
) -> TensorDict:
    """Inverse of :func:`encode_dict`; ``like`` gives each name's (shape, dtype) or a tensor.

    Keys are split on their last ``/``; names in ``parts`` and ``like`` must match exactly
    (else :class:`CodecError`). The result follows ``like``'s key order.

    >>> import torch
    >>> x = {"a/b": torch.tensor([1.0, -2.0])}
    >>> decode_dict("fp16", encode_dict("fp16", x), {"a/b": ((2,), torch.float32)})
    {'a/b': tensor([ 1., -2.])}
    """
    c = parse_codec(codec)
    if not isinstance(parts, Mapping):
        raise CodecError(f"encoded parts must be a dict, got {type(parts).__name__}")
    if not isinstance(like, Mapping):
        raise ChronosTypeError(f"like must be a dict of tensors or (shape, dtype), got {like!r}")
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in parts.items():
        if not isinstance(key, str) or "/" not in key:
            raise CodecError(f"encoded part key {key!r} is not of the form 'name/part'")
        name, part = key.rsplit("/", 1)
        groups.setdefault(name, {})[part] = t
    missing, extra = set(like) - set(groups), set(groups) - set(like)
    if missing or extra:
        raise CodecError(
            f"encoded tensor names do not match: missing {_preview(missing)}, "
            f"unexpected {_preview(extra)}"
        )
    out: TensorDict = {}
    for name, ref in like.items():
        if isinstance(ref, Tensor):
            shape, dtype = tuple(ref.shape), ref.dtype
        elif isinstance(ref, tuple) and len(ref) == 2 and isinstance(ref[1], torch.dtype):
            shape, dtype = tuple(ref[0]), ref[1]
        else:
            raise ChronosTypeError(
                f"like[{name!r}] must be a Tensor or a (shape, dtype) pair, got {ref!r}"
            )
        try:
            out[name] = c.decode(groups[name], shape, dtype)
        except (CodecError, ConfigError) as e:
            raise _renamed(name, e) from e
    return out


@dataclass(frozen=True)
class Compressed:
    """One error-feedback step: ``parts`` to send, ``decoded`` = what the receiver will get,
    ``residual`` = ``update + old residual − decoded`` (keep it for the next step)."""

    parts: dict[str, Tensor]
    decoded: TensorDict
    residual: TensorDict

    @property
    def nbytes(self) -> int:
        """:func:`wire_bytes` of ``parts``."""
        return wire_bytes(self.parts)


def compress(
    codec: Codec | str,
    update: Mapping[str, Tensor],
    residual: Mapping[str, Tensor] | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Compressed:
    """Error-feedback compression: ``c = update + residual``, ``d = decode(encode(c))``,
    new residual ``c − d``; so ``Σ d + residual = Σ updates`` over any sequence of steps.

    ``residual`` (default zeros) must match ``update``'s keys, shapes and dtypes.

    >>> import torch
    >>> r, total = None, torch.zeros(4, dtype=torch.float64)
    >>> sent = torch.zeros(4, dtype=torch.float64)
    >>> for t in range(5):
    ...     u = {"w": torch.linspace(-1, 1, 4, dtype=torch.float64) * (t + 1)}
    ...     out = compress("topk:0.25+int8", u, r)
    ...     r, total, sent = out.residual, total + u["w"], sent + out.decoded["w"]
    >>> bool(torch.allclose(sent + r["w"], total, atol=1e-12))
    True
    """
    if not isinstance(update, Mapping) or not all(isinstance(v, Tensor) for v in update.values()):
        raise ChronosTypeError(f"compress() takes a dict[str, Tensor], got {update!r:.80}")
    if residual is None:
        candidate = {k: v.detach().clone() for k, v in update.items()}
    else:
        if update.keys() != residual.keys():
            raise ShapeMismatchError(
                f"residual keys {_preview(residual)} differ from update keys {_preview(update)}"
            )
        for k, v in update.items():
            r = residual[k]
            if r.shape != v.shape or r.dtype != v.dtype:
                raise ShapeMismatchError(
                    f"residual[{k!r}] is {tuple(r.shape)} {_name(r.dtype)}, update is "
                    f"{tuple(v.shape)} {_name(v.dtype)}; reset the residual if the model changed"
                )
        candidate = {k: v.detach() + residual[k].detach() for k, v in update.items()}
    parts = encode_dict(codec, candidate, generator=generator)
    decoded = decode_dict(codec, parts, candidate)
    return Compressed(parts, decoded, {k: candidate[k] - decoded[k] for k in candidate})


class ErrorFeedbackCompressor:
    """Stateful wrapper around :func:`compress`: keeps the residual and byte counters.

    Args:
        codec: a :class:`Codec` or a spec string.
        seed: seed of the generator for stochastic rounding (``None``: torch's global one).

    >>> import torch
    >>> ef = ErrorFeedbackCompressor("topk:0.5", seed=0)
    >>> ef.compress({"w": torch.tensor([1.0, -3.0])}).decoded["w"].tolist()
    [0.0, -3.0]
    >>> ef.compress({"w": torch.tensor([0.5, 0.0])}).decoded["w"].tolist()  # 1 + 0.5 sent
    [1.5, 0.0]
    >>> ef.bytes_sent, ef.dense_bytes
    (16, 16)
    """

    def __init__(self, codec: Codec | str, *, seed: int | None = None) -> None:
        self.codec = parse_codec(codec)
        self.seed = seed
        self.residual: TensorDict | None = None
        self.bytes_sent = 0
        self.dense_bytes = 0
        self._generator: torch.Generator | None = None

    def compress(self, update: Mapping[str, Tensor]) -> Compressed:
        """Compress ``update`` plus the residual; keep the new residual; count bytes."""
        if self.seed is not None and self._generator is None:
            dev = next(iter(update.values())).device if update else torch.device("cpu")
            self._generator = torch.Generator(device=dev).manual_seed(self.seed)
        out = compress(self.codec, update, self.residual, generator=self._generator)
        self.residual = out.residual
        self.bytes_sent += out.nbytes
        self.dense_bytes += wire_bytes(update)
        return out

    def requeue(self, decoded: Mapping[str, Tensor]) -> None:
        """Put back what was sent but not applied (a rejected commit): ``residual += decoded``."""
        back = {k: v.detach().clone() for k, v in decoded.items()}
        if self.residual is not None:
            if back.keys() != self.residual.keys():
                raise ShapeMismatchError(
                    f"requeue() keys {_preview(back)} differ from the residual's "
                    f"{_preview(self.residual)}"
                )
            back = {k: self.residual[k] + v for k, v in back.items()}
        self.residual = back

    def reset(self) -> None:
        """Forget the residual (e.g. after the parameters were replaced)."""
        self.residual = None
