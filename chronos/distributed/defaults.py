"""One source of defaults for the coordinator, its config, the launcher and the CLI.

Every default that the distributed runtime uses lives here, so ``Coordinator(...)``,
``CoordinatorConfig()``, ``RunConfig`` and ``chronos run --help`` cannot disagree.

Outer optimizer. Where no problem is known (a seed-shaped ``Coordinator(outer_params=...)``),
the default is Adam: its step is about ``outer_lr`` per coordinate whatever the scale of the
hypergradient, so a run makes progress without tuning (plain SGD with a fixed step moves λ by
``lr·‖g‖``, which for hypergradients of ~1e-3 is nothing). Where a problem is known and
defines ``default_outer_lr`` (and optionally ``default_outer_optimizer``, default ``"sgd"``),
those are used; an explicit optimizer or step size always wins.

Example:
    >>> resolve_outer_optimizer(None, None)
    ('adam', 0.05)
    >>> resolve_outer_optimizer("sgd", None)
    ('sgd', 0.1)
    >>> class P:
    ...     default_outer_lr = 30.0
    >>> resolve_outer_optimizer(None, None, P())
    ('sgd', 30.0)
    >>> resolve_outer_optimizer("adam", None, P())     # the problem's lr is for its own rule
    ('adam', 0.05)
"""

from __future__ import annotations

from typing import Any, Literal

from chronos.core.errors import ConfigError

__all__ = [
    "AGGREGATION",
    "DECAY",
    "HEARTBEAT_INTERVAL",
    "LEASE_TIMEOUT",
    "MAX_IN_FLIGHT",
    "MAX_STALENESS",
    "MIN_COMMITS",
    "OUTER_LR",
    "OUTER_OPTIMIZER",
    "resolve_outer_optimizer",
]

MAX_IN_FLIGHT = 3
"""Async version window (stale-synchronous-parallel bound)."""
MAX_STALENESS = 4
"""Largest accepted staleness; kept >= MAX_IN_FLIGHT so work granted inside the window can land."""
DECAY = 0.5
"""A commit of staleness ``s`` is weighted ``DECAY ** s``."""
AGGREGATION: Literal["latest", "buffered"] = "latest"
"""Async outer steps average every live worker's latest hypergradient (every shard counts)."""
MIN_COMMITS: int | Literal["auto"] = "auto"
"""Commits aggregated per async outer step; ``"auto"`` scales with the number of live workers."""
LEASE_TIMEOUT = 20.0
"""Seconds of silence after which a worker and its lease expire."""
HEARTBEAT_INTERVAL = 2.0
"""Seconds between worker heartbeats (sent to workers on registration)."""
OUTER_OPTIMIZER = "adam"
"""The outer optimizer where no problem says otherwise."""
OUTER_LR: dict[str, float] = {"sgd": 0.1, "momentum": 0.1, "adam": 0.05}
"""Step size per named outer optimizer where neither the user nor the problem gives one."""


def _problem_lr(problem: Any) -> float | None:
    lr = getattr(problem, "default_outer_lr", None)
    if lr is None:
        return None
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(
            f"{type(problem).__name__}.default_outer_lr must be a number > 0, got {lr!r}"
        )
    return float(lr)


def resolve_outer_optimizer(
    optimizer: Any, outer_lr: float | None, problem: Any = None
) -> tuple[Any, float]:
    """``(optimizer, outer_lr)`` after defaults: the user's choice, else the problem's, else
    :data:`OUTER_OPTIMIZER` with its :data:`OUTER_LR`.

    ``optimizer`` is a name, a factory ``params -> torch.optim.Optimizer``, a
    :class:`~chronos.continuum.MultiTimescaleConfig` (like a factory, it carries its own step
    sizes: the ``outer_lr`` returned is then unused) or ``None``; ``outer_lr`` a number or
    ``None``. A problem's ``default_outer_lr`` applies only to its
    own optimizer (``default_outer_optimizer``, default ``"sgd"``).
    """
    problem_lr = _problem_lr(problem) if problem is not None else None
    problem_opt = getattr(problem, "default_outer_optimizer", "sgd") if problem_lr else None
    if optimizer is None:
        optimizer = problem_opt if problem_opt is not None else OUTER_OPTIMIZER
    if outer_lr is None:
        if problem_lr is not None and optimizer == problem_opt:
            outer_lr = problem_lr
        elif isinstance(optimizer, str) and optimizer in OUTER_LR:
            outer_lr = OUTER_LR[optimizer]
        else:
            outer_lr = OUTER_LR[OUTER_OPTIMIZER]  # a factory sets its own lr; unused
    return optimizer, float(outer_lr)
