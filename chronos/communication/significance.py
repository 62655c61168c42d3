"""Significance-triggered communication with error feedback.

An update Δ is worth sending only when it is large relative to the parameters it changes:

    significance(Δ, θ) = ‖η·Δ‖₂ / (‖θ‖₂ + scale + eps)   and send  ⇔  significance > threshold.

``η`` (``step_size``, default 1) maps Δ into parameter space: a sender that accumulates
*gradients* passes the step size it would move θ with, so the test is "would the held-back work
move θ by more than ``threshold`` relative to θ?". ``scale`` (default 0) is a typical
parameter-space step (e.g. a running mean of past ‖θ_{v+1} − θ_v‖) added to ‖θ‖, so that θ = 0
is not special: without it every update of θ = 0 has infinite significance.

What is not sent is not lost: it stays in an error-feedback residual ``r`` that is added to the
next update. With ``c_t = r_{t−1} + Δ_t``, either ``c_t`` is sent and ``r_t = 0``, or nothing is
sent and ``r_t = c_t``. Hence, at every step,

    Σ (what was sent) + r_t = Σ_t Δ_t            (the error-feedback invariant)

so the receiver's sum is exactly the sender's sum once the residual is flushed. A payload that
the receiver did not take after all (rejected, refused, never acknowledged) is put back with
:func:`restore_payload` / :meth:`SignificanceFilter.restore`, which keeps the invariant with
"sent" meaning *accepted*.

``max_skip`` bounds silence: after ``max_skip`` consecutive held-back updates the next one is
sent whatever its significance (so at least one send every ``max_skip + 1`` updates; a huge
threshold cannot stall a sender). With a ``target_rate`` the threshold adapts multiplicatively,
``τ ← τ · exp(gain · (sent − target))``, so over time about a ``target_rate`` fraction of
updates is sent.

The functional core (:func:`significance`, :func:`filter_step`, :func:`restore_payload`) is
pure; :class:`SignificanceFilter` is a thin stateful wrapper.

Example:
    >>> import torch
    >>> f = SignificanceFilter(SignificanceConfig(threshold=0.1))
    >>> theta = {"w": torch.ones(4)}                       # ‖θ‖ = 2
    >>> f.update({"w": torch.full((4,), 0.05)}, theta) is None   # ‖Δ‖ = 0.1 → 0.05 ≤ 0.1
    True
    >>> sent = f.update({"w": torch.full((4,), 0.1)}, theta)     # residual + Δ: 0.15 > 0.1
    >>> [round(x, 2) for x in sent["w"].tolist()], float(f.residual_norm)
    ([0.15, 0.15, 0.15, 0.15], 0.0)
    >>> f.restore(sent)                                     # the receiver refused it
    >>> round(float(f.residual_norm), 2)                    # back in the residual
    0.3
    >>> zero = {"w": torch.zeros(4)}                        # θ = 0: scale is the yardstick
    >>> round(significance({"w": torch.full((4,), 0.5)}, zero, step_size=0.1, scale=1.0), 3)
    0.1
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from chronos.core import tensordict as td
from chronos.core.errors import ConfigError
from chronos.core.tensordict import TensorDict

__all__ = [
    "FilterState",
    "SignificanceConfig",
    "SignificanceFilter",
    "filter_step",
    "init_filter",
    "restore_payload",
    "significance",
]


@dataclass(frozen=True)
class SignificanceConfig:
    """Settings of a significance filter.

    Args:
        threshold: send when ‖η·Δ‖/(‖θ‖+scale+eps) exceeds this (>= 0; 0 sends every nonzero
            update).
        eps: added to the denominator so θ = 0 with no scale does not divide by zero (> 0).
        target_rate: if set (in (0, 1]), adapt the threshold so about this fraction is sent.
        gain: adaptation speed for ``target_rate`` (> 0).
        min_threshold, max_threshold: clamp of the adapted threshold.
        max_skip: send at the latest after this many consecutive held-back updates (an int
            >= 1), or ``None`` for no bound.
    """

    threshold: float = 0.01
    eps: float = 1e-12
    target_rate: float | None = None
    gain: float = 0.1
    min_threshold: float = 1e-8
    max_threshold: float = 1e3
    max_skip: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and self.threshold >= 0
                and math.isfinite(self.threshold)):
            raise ConfigError(f"threshold must be a finite number >= 0, got {self.threshold!r}")
        if not self.eps > 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        if self.target_rate is not None and not 0.0 < self.target_rate <= 1.0:
            raise ConfigError(f"target_rate must be in (0, 1] or None, got {self.target_rate}")
        if not self.gain > 0:
            raise ConfigError(f"gain must be > 0, got {self.gain}")
        if not 0 < self.min_threshold <= self.max_threshold:
            raise ConfigError("need 0 < min_threshold <= max_threshold")
        ms = self.max_skip
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, int) or ms < 1):
            raise ConfigError(f"max_skip must be an int >= 1 or None, got {ms!r}")


@dataclass(frozen=True)
class FilterState:
    """Residual not yet sent, the current threshold and counters: ``sent`` / ``skipped``
    updates, ``held`` (consecutive skips since the last send, for ``max_skip``), ``forced``
    (sends because of ``max_skip`` or ``force``) and ``restored`` (payloads put back)."""

    residual: TensorDict
    threshold: float
    sent: int = 0
    skipped: int = 0
    held: int = 0
    forced: int = 0
    restored: int = 0


def significance(delta: Mapping[str, Tensor], params: Mapping[str, Tensor],
                 eps: float = 1e-12, *, step_size: float = 1.0, scale: float = 0.0) -> float:
    """``‖step_size·Δ‖₂ / (‖θ‖₂ + scale + eps)`` over all entries of the dicts."""
    num = abs(step_size) * float(td.norm(delta))
    return num / (float(td.norm(params)) + max(scale, 0.0) + eps)


def init_filter(like: Mapping[str, Tensor], config: SignificanceConfig) -> FilterState:
    """A fresh state with a zero residual shaped like ``like``."""
    return FilterState(residual=td.zeros_like(like), threshold=float(config.threshold))


def filter_step(
    state: FilterState,
    delta: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    config: SignificanceConfig,
    *,
    step_size: float = 1.0,
    scale: float = 0.0,
    force: bool = False,
) -> tuple[FilterState, TensorDict | None]:
    """Add ``delta`` to the residual; return the new state and what to send (or ``None``).

    Sent when the significance of residual + Δ (see :func:`significance`, with ``step_size``
    and ``scale``) exceeds the threshold, when ``max_skip`` updates in a row were held back,
    or when ``force`` is set (e.g. the sender has no yardstick yet)."""
    candidate = td.add(state.residual, td.detach(delta))
    significant = significance(candidate, params, config.eps, step_size=step_size,
                               scale=scale) > state.threshold
    forced = not significant and (
        force or (config.max_skip is not None and state.held >= config.max_skip)
    )
    send = significant or forced
    threshold = state.threshold
    if config.target_rate is not None:
        threshold *= math.exp(config.gain * ((1.0 if send else 0.0) - config.target_rate))
        threshold = min(max(threshold, config.min_threshold), config.max_threshold)
    if send:
        new = replace(state, residual=td.zeros_like(candidate), threshold=threshold,
                      sent=state.sent + 1, held=0, forced=state.forced + int(forced))
        return new, candidate
    new = replace(state, residual=candidate, threshold=threshold, skipped=state.skipped + 1,
                  held=state.held + 1)
    return new, None


def restore_payload(state: FilterState, payload: Mapping[str, Tensor]) -> FilterState:
    """Put a payload that was not delivered after all (rejected, refused, unacknowledged; or
    the part of a send that a lossy codec dropped) back into the residual, so that
    ``Σ delivered + residual = Σ updates`` still holds with "delivered" meaning accepted."""
    residual = td.add(state.residual, td.detach(payload))
    return replace(state, residual=residual, restored=state.restored + 1)


class SignificanceFilter:
    """Stateful wrapper around :func:`filter_step` (one per sender).

    ``update(delta, params)`` returns what to send now (residual included) or ``None``;
    ``restore(payload)`` puts back a payload the receiver did not take; ``flush()`` returns and
    clears the residual (e.g. at the end of a job).
    """

    def __init__(self, config: SignificanceConfig | None = None) -> None:
        self.config = config or SignificanceConfig()
        self._state: FilterState | None = None

    def should_communicate(self, delta: Mapping[str, Tensor], params: Mapping[str, Tensor],
                           *, step_size: float = 1.0, scale: float = 0.0) -> bool:
        """Would ``delta`` (plus the residual) be significant now? Changes nothing (and does
        not look at ``max_skip``)."""
        candidate = td.detach(delta) if self._state is None else td.add(self._state.residual, delta)
        threshold = self.config.threshold if self._state is None else self._state.threshold
        return significance(candidate, params, self.config.eps, step_size=step_size,
                            scale=scale) > threshold

    def update(
        self,
        delta: Mapping[str, Tensor],
        params: Mapping[str, Tensor],
        *,
        step_size: float = 1.0,
        scale: float = 0.0,
        force: bool = False,
    ) -> TensorDict | None:
        """Accumulate ``delta``; return what to send now, or ``None`` (see
        :func:`filter_step` for ``step_size``, ``scale`` and ``force``)."""
        if self._state is None:
            self._state = init_filter(delta, self.config)
        self._state, out = filter_step(self._state, delta, params, self.config,
                                       step_size=step_size, scale=scale, force=force)
        return out

    def restore(self, payload: Mapping[str, Tensor]) -> None:
        """Put back a payload that was not delivered (see :func:`restore_payload`)."""
        if self._state is None:
            self._state = init_filter(payload, self.config)
        self._state = restore_payload(self._state, payload)

    def flush(self) -> TensorDict | None:
        """Return the residual (``None`` if empty or all zero) and reset it to zero."""
        if self._state is None:
            return None
        res = self._state.residual
        self._state = replace(self._state, residual=td.zeros_like(res))
        return res if float(td.norm(res)) > 0 else None

    @property
    def residual(self) -> TensorDict:
        """What has been held back so far (empty before the first update)."""
        return {} if self._state is None else td.clone(self._state.residual)

    @property
    def residual_norm(self) -> Tensor:
        return torch.zeros(()) if self._state is None else td.norm(self._state.residual)

    @property
    def threshold(self) -> float:
        return self.config.threshold if self._state is None else self._state.threshold

    @property
    def held(self) -> int:
        """Consecutive updates held back since the last send."""
        return 0 if self._state is None else self._state.held

    def stats(self) -> dict[str, float]:
        """``sent``, ``skipped``, ``forced``, ``restored``, ``threshold``, ``residual_norm``."""
        s = self._state
        return {
            "sent": 0 if s is None else s.sent,
            "skipped": 0 if s is None else s.skipped,
            "forced": 0 if s is None else s.forced,
            "restored": 0 if s is None else s.restored,
            "threshold": self.threshold,
            "residual_norm": float(self.residual_norm),
        }
