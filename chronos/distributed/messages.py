"""Every message of the Chronos wire protocol, as a frozen dataclass with an ``op`` name.

Workers (ZeroMQ DEALER) talk to the coordinator (ROUTER) asynchronously. Each message carries
the worker id and a request id chosen by the worker; replies echo the request id.
Tensor-valued fields (``outer_params``, ``hypergradient``) travel as raw frames next to a
msgpack header (see :mod:`chronos.distributed.protocol`); every other field is a msgpack
scalar, string, list or string-keyed dict of scalars.

Worker → coordinator: :class:`Register`, :class:`Checkout`, :class:`Commit`,
:class:`Heartbeat`, :class:`Deregister`.
Coordinator → worker: :class:`Registered`, :class:`CheckoutReply`, :class:`CommitReply`,
:class:`HeartbeatAck`, :class:`ErrorReply`, :class:`ShutdownNotice`, :class:`LeaseCancelled`
(unsolicited, like a deferred grant: a late answer to the checkout that granted the lease).

Example:
    >>> import torch
    >>> m = Commit(worker_id="w0", request_id=7, version=3, commit_id="w0-7",
    ...            hypergradient={"wd": torch.zeros(4)}, metrics={"inner_loss": 0.2})
    >>> m.op, m.tensor_field
    ('commit', 'hypergradient')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from chronos.core.tensordict import TensorDict

__all__ = [
    "MAX_ID_CHARS",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "Checkout",
    "CheckoutKind",
    "CheckoutReply",
    "CheckoutStatus",
    "Commit",
    "CommitReply",
    "CommitStatus",
    "Deregister",
    "ErrorCode",
    "ErrorReply",
    "Heartbeat",
    "HeartbeatAck",
    "LeaseCancelled",
    "Message",
    "Register",
    "Registered",
    "ShutdownNotice",
]

MAX_ID_CHARS = 128
"""Longest worker id or commit id a coordinator accepts (ids are kept in memory and in the
journal)."""

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; a peer speaking another version gets an error reply."""

Scalar = bool | int | float | str | None

CheckoutStatus = Literal["granted", "deferred", "not_modified"]
CheckoutKind = Literal["full", "delta"]
CommitStatus = Literal["accepted", "rejected", "duplicate"]
ErrorCode = Literal[
    "malformed",  # header not msgpack / wrong types / missing fields
    "protocol_version",  # peer speaks another protocol version
    "unknown_op",
    "bad_tensor",  # dtype not allowed, shape vs bytes mismatch, wrong keys/shapes
    "non_finite",  # NaN / Inf in a tensor
    "oversize",
    "unknown_worker",
    "duplicate_worker",
    "bad_version",  # a version that never existed / does not match the lease
    "shutting_down",
    "unsupported_codec",  # Register names a codec this coordinator does not accept
    "codec_mismatch",  # a Commit's codec is not the one its worker registered
    "not_owner",  # the worker id belongs to another connection (or CURVE key)
    "no_lease",  # a commit without a lease held by its worker
]


@dataclass(frozen=True)
class Message:
    """Base of all messages. ``request_id`` is chosen by the worker and echoed in replies."""

    op: ClassVar[str] = ""
    tensor_field: ClassVar[str | None] = None  # name of the dict[str, Tensor] field, if any

    request_id: int


# -- worker → coordinator -----------------------------------------------------------------------


@dataclass(frozen=True)
class Register(Message):
    """Join the job. ``info``: free-form scalars (host, pid, rank…). ``codec``: the
    :mod:`chronos.communication.codecs` spec (``"identity"``, ``"int8"``, ``"topk:0.1"``…)
    this worker's commits are encoded with and its delta checkouts are coded with; a
    coordinator that cannot or will not use it answers ``ErrorReply(code="unsupported_codec")``.
    """

    op: ClassVar[str] = "register"
    worker_id: str
    info: dict[str, Scalar] = field(default_factory=dict)
    codec: str = "identity"


@dataclass(frozen=True)
class Checkout(Message):
    """Ask for the current outer params. ``have_version``: the version the worker already holds
    (-1: none), so an unchanged state is answered ``not_modified`` without resending tensors
    and a changed one, for a worker with a lossy codec, as a coded delta. ``resync``: the
    worker threw its copy away because a delta did not reproduce the coordinator's checksum
    (sent with ``have_version=-1``; counted as a resync)."""

    op: ClassVar[str] = "checkout"
    worker_id: str
    have_version: int = -1
    resync: bool = False


@dataclass(frozen=True)
class Commit(Message):
    """A hypergradient computed on ``version``. ``commit_id`` is unique per commit: a re-sent
    commit with the same id is applied once.

    ``codec``: must be the codec the worker registered with (else ``codec_mismatch``). With
    ``"identity"`` the hypergradient is λ-shaped (λ's keys, shapes, dtypes); with any other
    codec it holds the encoded parts (``"key/part"`` names, see
    :func:`chronos.communication.codecs.encode_dict`), which the coordinator decodes against
    λ's shapes and dtypes before validating and applying the result. ``updates``: how many
    hypergradients the payload sums (>= 1; several after local steps; recorded in stats)."""

    op: ClassVar[str] = "commit"
    tensor_field: ClassVar[str | None] = "hypergradient"
    worker_id: str
    version: int
    commit_id: str
    hypergradient: TensorDict
    metrics: dict[str, float] = field(default_factory=dict)
    codec: str = "identity"
    updates: int = 1


@dataclass(frozen=True)
class Heartbeat(Message):
    """I am alive (renews the worker's lease)."""

    op: ClassVar[str] = "heartbeat"
    worker_id: str


@dataclass(frozen=True)
class Deregister(Message):
    """Leave the job (releases the worker's lease)."""

    op: ClassVar[str] = "deregister"
    worker_id: str


# -- coordinator → worker -----------------------------------------------------------------------


@dataclass(frozen=True)
class Registered(Message):
    """Welcome. ``config``: scalars the worker should honour (e.g. heartbeat interval)."""

    op: ClassVar[str] = "registered"
    worker_id: str
    version: int
    config: dict[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckoutReply(Message):
    """``granted`` (with ``outer_params``), ``not_modified`` (granted, no tensors: the worker's
    copy is current) or ``deferred`` (the version window is full; a ``granted`` reply with the
    same request id follows as soon as it allows).

    A ``granted`` reply is ``kind="full"`` (``outer_params`` is λ itself) or ``kind="delta"``
    (``outer_params`` holds the parts of ``λ_version − copy``, coded with the worker's
    registered codec, where ``copy`` is the coordinator's record of the worker's λ at
    ``base_version``, the worker's ``have_version``). The worker decodes the parts against its
    copy's shapes and dtypes, computes ``copy + decoded`` in λ's dtype, and checks
    :func:`~chronos.distributed.protocol.checksum` of the result against ``checksum``; on a
    mismatch it discards its copy and checks out again with ``have_version=-1,
    resync=True``. ``checksum`` is -1 (none) on full replies."""

    op: ClassVar[str] = "checkout_reply"
    tensor_field: ClassVar[str | None] = "outer_params"
    status: CheckoutStatus
    version: int
    outer_params: TensorDict = field(default_factory=dict)
    reason: str = ""
    kind: CheckoutKind = "full"
    base_version: int = -1
    checksum: int = -1


@dataclass(frozen=True)
class CommitReply(Message):
    """``accepted`` (applied with ``weight = decay**staleness``), ``rejected`` (nothing applied;
    ``reason`` says why) or ``duplicate`` (this commit id was already applied)."""

    op: ClassVar[str] = "commit_reply"
    commit_id: str
    status: CommitStatus
    staleness: int
    weight: float
    version: int  # the coordinator's version after handling the commit
    reason: str = ""


@dataclass(frozen=True)
class HeartbeatAck(Message):
    """Heartbeat received; ``version`` is the coordinator's current version."""

    op: ClassVar[str] = "heartbeat_ack"
    version: int


@dataclass(frozen=True)
class LeaseCancelled(Message):
    """The lease granted by checkout ``request_id`` on ``version`` can no longer be accepted:
    the coordinator is at ``current_version > version + max_staleness``, so a commit of that
    work would be rejected. The coordinator has dropped the lease (it no longer holds the
    version window); the worker should abandon the work and check out again."""

    op: ClassVar[str] = "lease_cancelled"
    version: int
    current_version: int
    reason: str = ""


@dataclass(frozen=True)
class ErrorReply(Message):
    """A request was refused; no state changed. ``request_id`` is -1 when unparseable."""

    op: ClassVar[str] = "error"
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class ShutdownNotice(Message):
    """The coordinator is stopping (or the job is done); workers should exit."""

    op: ClassVar[str] = "shutdown"
    reason: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.op: cls
    for cls in (
        Register,
        Checkout,
        Commit,
        Heartbeat,
        Deregister,
        Registered,
        CheckoutReply,
        CommitReply,
        HeartbeatAck,
        ErrorReply,
        ShutdownNotice,
        LeaseCancelled,
    )
}
"""op name → message class; the decoder accepts nothing else."""
