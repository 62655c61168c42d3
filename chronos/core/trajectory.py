"""What one inner solve produced: :class:`Trajectory`.

A trajectory records the outer parameters λ an inner solve was run for, the final inner
parameters θ_T(λ), the version λ was checked out at, who computed it, optionally the
intermediate iterates θ_0 … θ_T (every ``record_every`` steps), the inner losses and the wall
time. Hypergradient methods read ``final_params`` and ``outer_params`` from it; the distributed
runtime reads ``version`` and ``worker_id``.

Example:
    >>> import torch
    >>> t = Trajectory(outer_params={"wd": torch.tensor(0.1)},
    ...                final_params={"w": torch.zeros(3)}, num_steps=10)
    >>> t.version, t.num_steps, t.weight
    (0, 10, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chronos.core.errors import ConfigError
from chronos.core.tensordict import TensorDict

__all__ = ["Trajectory"]


@dataclass(frozen=True)
class Trajectory:
    """The record of one inner solve.

    Attributes:
        outer_params: λ the solve was run for (detached).
        final_params: θ_T (detached leaves).
        version: outer-state version λ was checked out at (0 for single-node use).
        worker_id: who computed it (``None`` for single-node use).
        steps: recorded iterates θ_0, θ_k, θ_2k, … (empty unless ``record_every`` > 0).
        losses: inner loss at every step, as floats.
        num_steps: inner steps actually taken.
        converged: whether the solve stopped on its tolerance before ``num_steps``.
        wall_time: seconds the solve took.
        weight: relative weight when several trajectories are averaged (e.g. ``decay**s``).
        metrics: free-form scalar metrics (e.g. ``{"outer_loss": 0.3}``).
    """

    outer_params: TensorDict
    final_params: TensorDict
    version: int = 0
    worker_id: str | None = None
    steps: tuple[TensorDict, ...] = ()
    losses: tuple[float, ...] = ()
    num_steps: int = 0
    converged: bool = False
    wall_time: float = 0.0
    weight: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version < 0:
            raise ConfigError(f"Trajectory.version must be >= 0, got {self.version}")
        if not self.weight >= 0.0:
            raise ConfigError(f"Trajectory.weight must be >= 0, got {self.weight}")

    @property
    def final_loss(self) -> float | None:
        """The last recorded inner loss, or ``None`` when no step was taken."""
        return self.losses[-1] if self.losses else None
