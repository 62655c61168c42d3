"""Significance-triggered communication with error feedback.

An update Δ is worth sending only when it is large relative to the parameters it changes:

    significance(Δ, θ) = ‖Δ‖₂ / (‖θ‖₂ + eps)   and send  ⇔  significance > threshold.

What is not sent is not lost: it stays in an error-feedback residual ``r`` that is added to the
next update. With ``c_t = r_{t−1} + Δ_t``, either ``c_t`` is sent and ``r_t = 0``, or nothing is
sent and ``r_t = c_t``. Hence, at every step,

    Σ (what was sent) + r_t = Σ_t Δ_t            (the error-feedback invariant)

so the receiver's sum is exactly the sender's sum once the residual is flushed. With a
``target_rate`` the threshold adapts multiplicatively, ``τ ← τ · exp(gain · (sent − target))``,
so over time about a ``target_rate`` fraction of updates is sent.

The functional core (:func:`significance`, :func:`filter_step`) is pure; :class:`SignificanceFilter`
is a thin stateful wrapper.

Example:
    >>> import torch
    >>> f = SignificanceFilter(SignificanceConfig(threshold=0.1))
    >>> theta = {"w": torch.ones(4)}                       # ‖θ‖ = 2
    >>> f.update({"w": torch.full((4,), 0.05)}, theta) is None   # ‖Δ‖ = 0.1 → 0.05 ≤ 0.1
    True
    >>> sent = f.update({"w": torch.full((4,), 0.1)}, theta)     # residual + Δ: 0.15 > 0.1
    >>> [round(x, 2) for x in sent["w"].tolist()], float(f.residual_norm)
    ([0.15, 0.15, 0.15, 0.15], 0.0)
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
    "significance",
]


@dataclass(frozen=True)
class SignificanceConfig:
    """Settings of a significance filter.

    Args:
        threshold: send when ‖Δ‖/(‖θ‖+eps) exceeds this (>= 0; 0 sends every nonzero update).
        eps: added to ‖θ‖ so θ = 0 does not divide by zero (> 0).
        target_rate: if set (in (0, 1]), adapt the threshold so about this fraction is sent.
        gain: adaptation speed for ``target_rate`` (> 0).
        min_threshold, max_threshold: clamp of the adapted threshold.
    """

    threshold: float = 0.01
    eps: float = 1e-12
    target_rate: float | None = None
    gain: float = 0.1
    min_threshold: float = 1e-8
    max_threshold: float = 1e3

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


@dataclass(frozen=True)
class FilterState:
    """Residual not yet sent, the current threshold and counters."""

    residual: TensorDict
    threshold: float
    sent: int = 0
    skipped: int = 0


def significance(delta: Mapping[str, Tensor], params: Mapping[str, Tensor],
                 eps: float = 1e-12) -> float:
    """``‖Δ‖₂ / (‖θ‖₂ + eps)`` over all entries of the dicts."""
    return float(td.norm(delta)) / (float(td.norm(params)) + eps)


def init_filter(like: Mapping[str, Tensor], config: SignificanceConfig) -> FilterState:
    """A fresh state with a zero residual shaped like ``like``."""
    return FilterState(residual=td.zeros_like(like), threshold=float(config.threshold))


def filter_step(
    state: FilterState,
    delta: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    config: SignificanceConfig,
) -> tuple[FilterState, TensorDict | None]:
    """Add ``delta`` to the residual; return the new state and what to send (or ``None``)."""
    candidate = td.add(state.residual, td.detach(delta))
    send = significance(candidate, params, config.eps) > state.threshold
    threshold = state.threshold
    if config.target_rate is not None:
        threshold *= math.exp(config.gain * ((1.0 if send else 0.0) - config.target_rate))
        threshold = min(max(threshold, config.min_threshold), config.max_threshold)
    if send:
        new = FilterState(td.zeros_like(candidate), threshold, state.sent + 1, state.skipped)
        return new, candidate
    return replace(state, residual=candidate, threshold=threshold, skipped=state.skipped + 1), None


class SignificanceFilter:
    """Stateful wrapper around :func:`filter_step` (one per sender).

    ``update(delta, params)`` returns what to send now (residual included) or ``None``;
    ``flush()`` returns and clears the residual (e.g. at the end of a job).
    """

    def __init__(self, config: SignificanceConfig | None = None) -> None:
        self.config = config or SignificanceConfig()
        self._state: FilterState | None = None

    def should_communicate(self, delta: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> bool:
        """Would ``delta`` (plus the residual) be sent now? Changes nothing."""
        candidate = td.detach(delta) if self._state is None else td.add(self._state.residual, delta)
        threshold = self.config.threshold if self._state is None else self._state.threshold
        return significance(candidate, params, self.config.eps) > threshold

    def update(
        self, delta: Mapping[str, Tensor], params: Mapping[str, Tensor]
    ) -> TensorDict | None:
        """Accumulate ``delta``; return what to send now, or ``None``."""
        if self._state is None:
            self._state = init_filter(delta, self.config)
        self._state, out = filter_step(self._state, delta, params, self.config)
        return out

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

    def stats(self) -> dict[str, float]:
        """``sent``, ``skipped``, ``threshold``, ``residual_norm``."""
        s = self._state
        return {
            "sent": 0 if s is None else s.sent,
            "skipped": 0 if s is None else s.skipped,
            "threshold": self.threshold,
            "residual_norm": float(self.residual_norm),
        }
