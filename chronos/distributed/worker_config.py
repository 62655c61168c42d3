"""How a worker runs: :class:`WorkerConfig` (a frozen, validated dataclass).

Example:
    >>> cfg = WorkerConfig(coordinator_addr="tcp://127.0.0.1:5555", significance_threshold=0.01)
    >>> cfg.hypergradient, cfg.request_timeout
    ('implicit', 10.0)
    >>> try:
    ...     WorkerConfig(coordinator_addr="127.0.0.1:5555")
    ... except ConfigError as e:
    ...     print(str(e)[:54])
    coordinator_addr must look like 'tcp://127.0.0.1:5555'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, TypeGuard

from chronos.communication.codecs import parse_codec
from chronos.core.errors import ChronosError, ConfigError
from chronos.distributed.messages import MAX_ID_CHARS
from chronos.distributed.transport import CurveClientConfig
from chronos.solver import METHODS, default_tol

__all__ = ["WorkerConfig", "default_tol", "is_int", "is_number"]

_ADDRESS = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")


def is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: object) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker runs.

    Args:
        coordinator_addr: ``tcp://host:port`` of the coordinator.
        worker_id: unique name (default: ``host-pid-random``).
        inner_steps: inner solver steps per checkout (default: the problem's own).
        hypergradient: ``"implicit"`` or ``"unrolled"``.
        method, max_iter, tol, damping: the implicit linear solve (``method``: one of
            :data:`chronos.solver.METHODS`; ``tol``: relative residual, default by the inner
            parameters' dtype: 1e-10 in float64, 1e-5 in float32 or lower, where the residual
            cannot get much below ~1e-6 and a tighter ``tol`` only burns ``max_iter``).
        unroll_steps, unroll_lr, truncate: the unrolled hypergradient. By default
            (``None``) it differentiates exactly the inner solve the worker ran — the same
            start, the same number of steps, the problem's own ``inner_lr`` (and momentum 0.9
            for ``optimizer="momentum"``) — which needs a problem solved by ``"sgd"`` or
            ``"momentum"``. For other inner optimizers (L-BFGS, Adam) give ``unroll_lr``:
            then ``unroll_steps`` (default 20) steps of plain gradient descent are unrolled
            from the solution (truncated back-propagation at the optimum).
        warm_start: start each inner solve from the previous θ and each linear solve from the
            previous solution.
        amortized: amortized hypergradients (``hypergradient="implicit"`` only): θ and the
            linear solution start from the worker's own
            :class:`~chronos.continuum.memory.ContinuumMemory` prediction at the checked-out
            λ, and the inner tolerance is loosened in proportion to the hypergradient norm
            (:mod:`chronos.continuum.amortized`; the problem's ``tol`` and ``tol`` here stay
            the exact floors). Replaces ``warm_start``. Off by default.
        significance_threshold: hold back hypergradients whose accumulated update is not
            significant in parameter space, ‖η·r‖ / (‖λ_local‖ + scale) <= threshold (``r``:
            the error-feedback residual of hypergradients not yet sent, ``η``: the local step
            size, ``scale``: a running mean of the coordinator's per-version step); a worker
            that holds back takes a local outer step λ_local ← λ_local − η·g and solves there
            next (see :mod:`chronos.distributed.worker`). 0 (the default): off, every
            hypergradient is sent.
        target_rate: with the filter on, adapt the threshold so that about this fraction of
            hypergradients is sent (in (0, 1]; None: fixed threshold).
        max_skip: with the filter on, send at the latest after this many consecutive
            held-back rounds (an int >= 1; default 8: at least one commit every 9 rounds).
        local_lr: step size η of the local outer steps (> 0). None (default): the
            coordinator's own step size if it announces SGD at registration, otherwise
            measured: η = mean ‖λ_{v+1} − λ_v‖ per version / mean ‖g‖ over the last few
            checkouts and hypergradients, i.e. a local step moves λ_local about as far as one
            coordinator step (see :mod:`chronos.distributed.worker`).
        codec: how a commit's payload is compressed (``"identity"``: dense; see
            :func:`chronos.communication.codecs.parse_codec`).
        heartbeat_interval: seconds between heartbeats (default: the coordinator's).
        request_timeout: seconds without a reply before a request is re-sent; the coordinator
            counts as gone after ``max(request_timeout, 3 × heartbeat_interval)`` of silence.
        connect_timeout: give up (raise :class:`ChronosError`) after this many seconds of trying
            to register without an answer.
        straggler_delay: extra seconds of (simulated) work per iteration, for experiments.
        num_threads: ``torch.set_num_threads`` for this worker (None: leave as is).
        curve: CURVE client keys when the coordinator uses CURVE.
        ack_log: a file to append one line per commit reply to (``WORKER_ID COMMIT_ID STATUS
            VERSION``, opened with ``O_APPEND`` so several workers can share it): the
            worker's own record of what the coordinator acknowledged, e.g. to audit that no
            acknowledged commit was lost (None: no log).
    """

    coordinator_addr: str = "tcp://127.0.0.1:5555"
    worker_id: str | None = None
    inner_steps: int | None = None
    hypergradient: Literal["implicit", "unrolled"] = "implicit"
    method: str = "cg"
    max_iter: int = 100
    tol: float | None = None
    damping: float = 0.0
    unroll_steps: int | None = None
    unroll_lr: float | str | None = None
    truncate: int | None = None
    warm_start: bool = True
    amortized: bool = False
    significance_threshold: float = 0.0
    target_rate: float | None = None
    max_skip: int = 8
    local_lr: float | None = None
    codec: str = "identity"
    heartbeat_interval: float | None = None
    request_timeout: float = 10.0
    connect_timeout: float = 60.0
    straggler_delay: float = 0.0
    num_threads: int | None = None
    curve: CurveClientConfig | None = None
    ack_log: str | None = None

    def __post_init__(self) -> None:
        addr = self.coordinator_addr
        m = _ADDRESS.match(addr) if isinstance(addr, str) else None
        if m is None or not 1 <= int(m.group(2)) <= 65535:
            raise ConfigError(
                f"coordinator_addr must look like 'tcp://127.0.0.1:5555' (tcp://HOST:PORT, "
                f"port 1-65535), got {addr!r}"
            )
        wid = self.worker_id
        if wid is not None and (
            not isinstance(wid, str) or not 0 < len(wid) <= MAX_ID_CHARS
            or wid.startswith(chr(0))
        ):
            raise ConfigError(
                f"worker_id must be a non-empty str of at most {MAX_ID_CHARS} characters (not "
                f"starting with NUL), or None for an automatic one; got {wid!r}"
            )
        if self.ack_log is not None and (not isinstance(self.ack_log, str) or not self.ack_log):
            raise ConfigError(f"ack_log must be a file path (str) or None, got "
                              f"{self.ack_log!r}")
        if self.hypergradient not in ("implicit", "unrolled"):
            raise ConfigError(
                f"hypergradient must be 'implicit' or 'unrolled', got {self.hypergradient!r}"
            )
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ConfigError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        self._check_int("inner_steps", self.inner_steps, minimum=1, allow_none=True)
        self._check_int("max_iter", self.max_iter, minimum=1)
        self._check_int("unroll_steps", self.unroll_steps, minimum=1, allow_none=True)
        self._check_int("truncate", self.truncate, minimum=1, allow_none=True)
        self._check_int("num_threads", self.num_threads, minimum=1, allow_none=True)
        self._check_int("max_skip", self.max_skip, minimum=1)
        rate = self.target_rate
        if rate is not None and not (is_number(rate) and 0.0 < rate <= 1.0):
            raise ConfigError(
                f"target_rate must be a number in (0, 1] (the fraction of hypergradients to "
                f"send) or None, got {rate!r}"
            )
        if self.local_lr is not None:
            self._check_number("local_lr", self.local_lr, minimum=0.0, strict=True,
                               unit=" (or None: the coordinator's step, measured)")
        self._check_codec()
        if self.tol is not None:
            self._check_number("tol", self.tol, minimum=0.0)
        for name in ("damping", "significance_threshold", "straggler_delay"):
            self._check_number(name, getattr(self, name), minimum=0.0)
        for name in ("request_timeout", "connect_timeout"):
            self._check_number(name, getattr(self, name), minimum=0.0, strict=True,
                               unit=" seconds")
        if self.heartbeat_interval is not None:
            self._check_number("heartbeat_interval", self.heartbeat_interval, minimum=0.0,
                               strict=True, unit=" seconds (or None: the coordinator's)")
        if self.unroll_steps is not None and self.unroll_lr is None:
            raise ConfigError(
                "unroll_steps applies to gradient descent unrolled from the solution and needs "
                "unroll_lr too; without unroll_lr the worker replays its whole inner solve "
                "(bound its memory with truncate=K)"
            )
        lr = self.unroll_lr
        if lr is not None and not (isinstance(lr, str) and lr) and not (is_number(lr) and lr > 0):
            raise ConfigError(
                f"unroll_lr must be a positive number, the name of a scalar outer parameter, or "
                f"None (the problem's own inner_lr), got {lr!r}"
            )
        if not isinstance(self.warm_start, bool):
            raise ConfigError(f"warm_start must be True or False, got {self.warm_start!r}")
        if not isinstance(self.amortized, bool):
            raise ConfigError(f"amortized must be True or False, got {self.amortized!r}")
        if self.amortized and self.hypergradient != "implicit":
            raise ConfigError(
                "amortized=True needs hypergradient='implicit' (it warm-starts and loosens the "
                "implicit linear solve); drop one of them"
            )
        if self.curve is not None and not isinstance(self.curve, CurveClientConfig):
            raise ConfigError(
                f"curve must be a CurveClientConfig or None, got {type(self.curve).__name__}"
            )

    def _check_codec(self) -> None:
        codec = self.codec
        if not isinstance(codec, str) or not codec:
            raise ConfigError(f"codec must be a codec spec such as 'identity', got {codec!r}")
        try:
            parse_codec(codec)
        except ChronosError as e:
            raise ConfigError(f"codec: {e}") from None

    @staticmethod
    def _check_int(name: str, value: object, minimum: int, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if not is_int(value) or value < minimum:
            alt = " or None" if allow_none else ""
            raise ConfigError(f"{name} must be an int >= {minimum}{alt}, got {value!r}")

    @staticmethod
    def _check_number(
        name: str, value: object, minimum: float, strict: bool = False, unit: str = ""
    ) -> None:
        if not is_number(value) or not (value > minimum if strict else value >= minimum):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise ConfigError(f"{name} must be a finite number {bound}{unit}, got {value!r}")
