"""The coordinator's policy, as pure values and functions: :class:`CoordinatorConfig`, commit
validation, the aggregation rule, the sync barrier and the outer optimizer.

Everything here is a function of its arguments (no I/O, no clock, no hidden state), so the
coordinator state machine (:mod:`chronos.distributed.state`) stays a thin shell around it.

**Aggregation rule.** An outer step aggregates the ``n`` accepted commits that arrived since
the previous step; commit ``i`` carries hypergradient ``g_i`` computed ``s_i`` versions ago and
has weight ``w_i = decay ** s_i``. The gradient handed to the outer optimizer is

    ``g = (1/n) · Σ_i w_i g_i``

divided by the *number* of commits, **not** by ``Σ_i w_i``: normalizing by the weight sum would
cancel the weight of a lone stale commit (``w g / w = g``), and DESIGN.md requires that a commit
of staleness ``s`` really counts ``decay ** s`` times as much as a fresh one. With plain SGD and
one commit per step, a commit of staleness ``s`` therefore moves λ exactly ``decay ** s`` times
as far as a fresh commit of the same hypergradient. With fresh commits only (every weight 1;
always the case in sync mode) the rule is the plain average.

Example:
    >>> import torch
    >>> agg = empty_aggregate()
    >>> agg = add_commit(agg, {"lam": torch.tensor([4.0, 8.0], dtype=torch.float64)}, staleness=0,
    ...                  weight=1.0, metrics={"inner_loss": 1.0})
    >>> agg = add_commit(agg, {"lam": torch.tensor([4.0, 8.0], dtype=torch.float64)}, staleness=1,
    ...                  weight=0.5, metrics={"inner_loss": 3.0})
    >>> aggregate_gradient(agg)["lam"].tolist()       # (1·g + 0.5·g) / 2
    [3.0, 6.0]
    >>> aggregate_metrics(agg)
    {'inner_loss': 2.0, 'commits': 2, 'weight_sum': 1.5, 'mean_staleness': 0.5}
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal

import torch
from torch import Tensor

from chronos.continuum.timescale import MultiTimescaleConfig, MultiTimescaleOptimizer
from chronos.core import tensordict as td
from chronos.core.errors import ChronosTypeError, ChronosWarning, ConfigError
from chronos.core.problem import OptimizerSpec, make_optimizer
from chronos.core.tensordict import TensorDict
from chronos.core.versioning import BoundedVersionQueue
from chronos.distributed import defaults
from chronos.distributed.messages import ErrorCode

__all__ = [
    "OUTER_OPTIMIZERS",
    "Aggregate",
    "CoordinatorConfig",
    "WindowStalenessWarning",
    "add_commit",
    "aggregate_from_state",
    "aggregate_gradient",
    "aggregate_metrics",
    "aggregate_state",
    "all_finite",
    "build_outer_optimizer",
    "check_hypergradient",
    "effective_min_commits",
    "empty_aggregate",
    "is_int",
    "sync_barrier_ready",
]

OUTER_OPTIMIZERS = ("sgd", "momentum", "adam")
"""Optimizer names the coordinator accepts (L-BFGS needs a closure, so it is not one of them)."""

# names the coordinator writes itself, or that would clash with MetaState.update's arguments
_RESERVED_METRICS = frozenset(
    {"self", "new_params", "version", "commits", "weight_sum", "mean_staleness", "entries",
     "mean_entry_age"}
)


# -- configuration --------------------------------------------------------------------------------


def is_int(x: object) -> bool:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(x, int) and not isinstance(x, bool)


def _is_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything the coordinator state machine decides with; validated at construction.

    Every default comes from :mod:`chronos.distributed.defaults` (the one source the
    coordinator, the launcher and the CLI share).

    Args:
        mode: ``"async"`` (bounded asynchrony) or ``"sync"`` (barrier baseline).
        num_workers: workers per sync barrier (required, >= 1, for ``mode="sync"``; optional
            and informational in async mode).
        max_in_flight: async version window (>= 1; default 3).
        max_staleness: largest accepted staleness in async mode (>= 0; default 4). Keep it
            ``>= max_in_flight``: with a smaller value a worker can be granted a version whose
            commit can never be accepted (two workers suffice: while B holds ``v``, A alone
            moves the version to ``v + max_in_flight``); such a config warns
            (:class:`WindowStalenessWarning`) and relies on lease cancellation to save the work.
        decay: staleness weight base in (0, 1]: weight ``decay ** s`` (default 0.5).
        lease_timeout: seconds of silence after which a worker and its lease expire (> 0;
            default 20).
        heartbeat_interval: seconds between worker heartbeats, sent to workers on
            registration (> 0 and < ``lease_timeout``; default 2).
        outer_lr: learning rate of a named outer optimizer (> 0), or ``None``: the optimizer's
            default from :data:`~chronos.distributed.defaults.OUTER_LR`.
        optimizer: ``"sgd"``, ``"momentum"``, ``"adam"``, a factory
            ``params -> torch.optim.Optimizer`` (then ``outer_lr`` is not used), a
            :class:`~chronos.continuum.MultiTimescaleConfig` (each group of λ updated at its
            own frequency with its own optimizer and step size; ``outer_lr`` not used), or
            ``None``: :data:`~chronos.distributed.defaults.OUTER_OPTIMIZER` (Adam). The
            resolved pair is :meth:`outer_optimizer`; the fields keep what was given, so
            ``dataclasses.replace(cfg, optimizer="sgd")`` gets SGD's own default step size.
        min_commits: accepted commits aggregated per async outer step: an int >= 1, or
            ``"auto"`` (the default): ``ceil(live / 2)`` for ``live`` registered, alive
            workers (at least 1; see :func:`effective_min_commits`). With ``N`` equally fast
            workers every worker then sees about 2 outer steps per hypergradient it computes
            (staleness ~1–2, accepted at the defaults) instead of ``N − 1`` with one commit per
            step; a lone worker still steps on every commit. Re-evaluated as workers join and
            leave: buffered commits step as soon as the smaller count is reached.
        max_steps: the job is done after this many outer steps (>= 1, or ``None``: never).
        dedupe_window: how many accepted commit ids are remembered for idempotence (>= 1).
        stale_correction: correct a stale commit to the current λ with its worker's history,
            ``g + J_w (λ_V − λ_v)``, and count it with weight 1 instead of ``decay ** s``
            (:mod:`chronos.distributed.correction`; async mode only). Off by default. With
            ``aggregation="latest"`` every entry is corrected from its version to the current
            one at each step.
        aggregation: how an async step combines hypergradients. ``"latest"`` (the default):
            the mean of every live worker's latest hypergradient, each weighted 1, so a slow
            worker's shard is in every step (:mod:`chronos.distributed.latest`; memory: one
            hypergradient per live worker). ``"buffered"``: only the commits accepted since
            the last step, weighted ``decay ** s`` (the rule in this module's docstring;
            ``decay`` applies only here). Sync mode ignores it: every step averages the
            barrier's fresh commits.

    Example:
        >>> cfg = CoordinatorConfig()
        >>> (cfg.max_in_flight, cfg.max_staleness, cfg.min_commits, cfg.outer_optimizer())
        (3, 4, 'auto', ('adam', 0.05))
        >>> wc = CoordinatorConfig(mode="sync", num_workers=4).worker_config()
        >>> wc["mode"], wc["heartbeat_interval"], wc["lease_timeout"], wc["optimizer"]
        ('sync', 2.0, 20.0, 'adam')
        >>> try:
        ...     CoordinatorConfig(decay=2.0)
        ... except ConfigError as e:
        ...     print(e)
        decay must be in (0, 1], got 2.0
    """

    mode: Literal["async", "sync"] = "async"
    num_workers: int | None = None
    max_in_flight: int = defaults.MAX_IN_FLIGHT
    max_staleness: int = defaults.MAX_STALENESS
    decay: float = defaults.DECAY
    lease_timeout: float = defaults.LEASE_TIMEOUT
    heartbeat_interval: float = defaults.HEARTBEAT_INTERVAL
    outer_lr: float | None = None
    optimizer: OptimizerSpec | MultiTimescaleConfig | None = None
    min_commits: int | Literal["auto"] = defaults.MIN_COMMITS
    max_steps: int | None = None
    dedupe_window: int = 10_000
    stale_correction: bool = False
    aggregation: Literal["latest", "buffered"] = defaults.AGGREGATION

    def __post_init__(self) -> None:
        if self.mode not in ("async", "sync"):
            raise ConfigError(f"mode must be 'async' or 'sync', got {self.mode!r}")
        if self.num_workers is not None and (not is_int(self.num_workers) or self.num_workers < 1):
            raise ConfigError(f"num_workers must be an int >= 1 or None, got {self.num_workers!r}")
        if self.mode == "sync" and self.num_workers is None:
            raise ConfigError(
                "mode='sync' needs num_workers (how many commits each barrier waits for)"
            )
        # the queue validates max_in_flight, max_staleness, decay and lease_timeout
        BoundedVersionQueue(
            max_in_flight=self.max_in_flight,
            max_staleness=self.max_staleness,
            decay=self.decay,
            lease_timeout=self.lease_timeout,
        )
        if not _is_positive(self.heartbeat_interval):
            raise ConfigError(
                f"heartbeat_interval must be a positive number of seconds, "
                f"got {self.heartbeat_interval!r}"
            )
        if self.heartbeat_interval >= self.lease_timeout:
            raise ConfigError(
                f"heartbeat_interval ({self.heartbeat_interval}) must be < lease_timeout "
                f"({self.lease_timeout}), or live workers would expire between heartbeats; "
                "a third of lease_timeout or less is a good choice"
            )
        if self.outer_lr is not None and not _is_positive(self.outer_lr):
            raise ConfigError(
                f"outer_lr must be a positive number (or None: the optimizer's default), "
                f"got {self.outer_lr!r}"
            )
        if (
            self.optimizer is not None
            and not callable(self.optimizer)
            and not isinstance(self.optimizer, MultiTimescaleConfig)
            and self.optimizer not in OUTER_OPTIMIZERS
        ):
            raise ConfigError(
                f"optimizer must be one of {OUTER_OPTIMIZERS}, a callable "
                f"params -> torch.optim.Optimizer, a MultiTimescaleConfig, or None (default "
                f"{defaults.OUTER_OPTIMIZER!r}), got {self.optimizer!r}"
            )
        if self.min_commits != "auto" and (not is_int(self.min_commits) or self.min_commits < 1):
            raise ConfigError(
                f"min_commits must be an int >= 1 or 'auto' (ceil(live workers / 2)), "
                f"got {self.min_commits!r}"
            )
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            raise ConfigError(f"max_steps must be an int >= 1 or None, got {self.max_steps!r}")
        if not is_int(self.dedupe_window) or self.dedupe_window < 1:
            raise ConfigError(f"dedupe_window must be an int >= 1, got {self.dedupe_window!r}")
        if not isinstance(self.stale_correction, bool):
            raise ConfigError(
                f"stale_correction must be True or False, got {self.stale_correction!r}"
            )
        if self.aggregation not in ("latest", "buffered"):
            raise ConfigError(
                f"aggregation must be 'latest' (every live worker's latest hypergradient in "
                f"each step) or 'buffered' (the commits since the last step), got "
                f"{self.aggregation!r}"
            )
        if self.mode == "async" and self.max_in_flight > self.max_staleness:
            warnings.warn(
                f"max_in_flight={self.max_in_flight} > max_staleness={self.max_staleness}: "
                "the version window grants work that can never be accepted (while one worker "
                f"holds version v, another alone can move the version to v + "
                f"{self.max_in_flight}); such leases are cancelled as soon as they are too "
                "stale, but the compute already spent on them is lost. Use max_staleness >= "
                f"max_in_flight (defaults "
                f"{defaults.MAX_IN_FLIGHT}/{defaults.MAX_STALENESS}).",
                WindowStalenessWarning,
                stacklevel=_user_stacklevel(),
            )

    def outer_optimizer(self) -> tuple[OptimizerSpec | MultiTimescaleConfig, float]:
        """``(optimizer, outer_lr)`` this config runs with, defaults resolved
        (:func:`~chronos.distributed.defaults.resolve_outer_optimizer`)."""
        spec, lr = defaults.resolve_outer_optimizer(self.optimizer, self.outer_lr)
        return spec, lr

    def worker_config(self) -> dict[str, float | str]:
        """The scalars sent to a worker in :class:`Registered`: liveness, the mode, and the
        outer optimizer with its step size (a worker taking local outer steps uses an SGD
        coordinator's ``outer_lr`` as its own step; a factory is announced as ``"custom"``)."""
        spec, lr = self.outer_optimizer()
        return {
            "heartbeat_interval": float(self.heartbeat_interval),
            "lease_timeout": float(self.lease_timeout),
            "mode": self.mode,
            "optimizer": spec if isinstance(spec, str) else "custom",
            "outer_lr": float(lr),
        }


class WindowStalenessWarning(ChronosWarning):
    """``max_in_flight > max_staleness``: the version window grants work that can be rejected."""


def _user_stacklevel() -> int:
    """Stack level of the first frame outside Chronos and dataclasses (the user's call)."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith("chronos.") or name in ("dataclasses", "<string>")):
            return level
        frame = frame.f_back
        level += 1
    return 2


def effective_min_commits(min_commits: int | str, live_workers: int) -> int:
    """Commits per async outer step: ``min_commits`` itself, or for ``"auto"``
    ``max(1, ceil(live_workers / 2))``.

    Why ``/ 2``: ``N`` equally fast workers commit ``N`` hypergradients per compute time ``T``;
    stepping every ``m`` commits gives ``N / m`` versions per ``T``, which is the staleness a
    commit sees. ``m = ceil(N / 2)`` keeps it near 2 for any ``N`` (inside the default
    ``max_staleness`` 4 and the window 3, with room for jitter), while still taking about two
    steps per ``T`` (``m = N`` would halve the number of steps for a staleness of ~1);
    measured in :mod:`chronos.benchmarks.scaling`.

    Example:
        >>> [effective_min_commits("auto", n) for n in (0, 1, 2, 3, 4, 64)]
        [1, 1, 1, 2, 2, 32]
        >>> effective_min_commits(3, 64)
        3
    """
    if min_commits == "auto":
        return max(1, -(-live_workers // 2))
    return int(min_commits)


# -- validation -----------------------------------------------------------------------------------


def check_hypergradient(
    reference: Mapping[str, Tensor], hypergradient: object
) -> tuple[ErrorCode, str] | None:
    """``None`` if ``hypergradient`` matches λ exactly, else ``(error code, message)``.

    A valid hypergradient is a ``dict[str, Tensor]`` with λ's keys and, per key, λ's shape and
    dtype (code ``"bad_tensor"`` otherwise), holding only finite values (``"non_finite"``).

    Example:
        >>> lam = {"a": torch.zeros(2)}
        >>> check_hypergradient(lam, {"a": torch.ones(2)}) is None
        True
        >>> check_hypergradient(lam, {"a": torch.ones(3)})[0]
        'bad_tensor'
        >>> check_hypergradient(lam, {"a": torch.tensor([1.0, float("nan")])})[0]
        'non_finite'
    """
    if not isinstance(hypergradient, Mapping):
        return "bad_tensor", (
            f"hypergradient must be a dict of tensors, got {type(hypergradient).__name__}"
        )
    if hypergradient.keys() != reference.keys():
        missing = sorted(set(reference) - {k for k in hypergradient if isinstance(k, str)})
        extra = sorted(str(k) for k in set(hypergradient) - set(reference))
        return "bad_tensor", (
            f"hypergradient keys must equal the outer params' keys {sorted(reference)}: "
            f"missing {missing}, unexpected {extra}"
        )
    for k, ref in reference.items():
        g = hypergradient[k]
        if not isinstance(g, Tensor):
            return "bad_tensor", f"hypergradient[{k!r}] must be a tensor, got {type(g).__name__}"
        if g.shape != ref.shape or g.dtype != ref.dtype:
            return "bad_tensor", (
                f"hypergradient[{k!r}] must have shape {tuple(ref.shape)} and dtype {ref.dtype} "
                f"like the outer parameter, got shape {tuple(g.shape)} and dtype {g.dtype}"
            )
    for k, g in hypergradient.items():
        if not all_finite(g):
            return "non_finite", f"hypergradient[{k!r}] contains NaN or Inf; nothing applied"
    return None


_SMALL_NUMEL = 64  # up to this many elements, Python floats beat a torch reduction


def all_finite(t: Tensor) -> bool:
    """Whether every element of the floating-point tensor ``t`` is finite, in one pass.

    NaN and ±Inf propagate through IEEE addition, so a finite sum proves every entry finite
    without the temporaries of ``isfinite(t).all()`` (~40x slower on 1M floats); only a
    non-finite sum (perhaps an overflow of finite values) needs the exact test. Small tensors
    are summed as Python floats (cheaper than launching a torch reduction).

    Example:
        >>> all_finite(torch.ones(3)), all_finite(torch.tensor([1.0, float("inf")]))
        (True, False)
        >>> all_finite(torch.full((100,), 3e38))   # the float32 sum overflows; entries finite
        True
    """
    if t.numel() <= _SMALL_NUMEL:
        vals = t.tolist() if t.dim() == 1 else t.reshape(-1).tolist()
        return math.isfinite(sum(vals)) or all(map(math.isfinite, vals))
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


# -- aggregation ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Aggregate:
    """Commits accepted since the last outer step: ``total = Σ_i w_i g_i`` and bookkeeping.

    ``total``'s tensors belong to the aggregate, never to a caller (see :func:`add_commit`), so
    whoever consumes it for a step and then drops it may reuse their memory.

    ``metric_sums`` maps a worker metric name to ``(sum, count)`` over the commits that reported
    a finite number for it.
    """

    total: TensorDict
    count: int = 0
    weight_sum: float = 0.0
    staleness_sum: int = 0
    metric_sums: Mapping[str, tuple[float, int]] = field(default_factory=dict)


def empty_aggregate() -> Aggregate:
    """An aggregate of no commits (``total`` is empty until the first commit)."""
    return Aggregate(total={})


def _finite_number(x: object) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    value = float(x)
    return value if math.isfinite(value) else None


def add_commit(
    agg: Aggregate,
    hypergradient: Mapping[str, Tensor],
    staleness: int,
    weight: float,
    metrics: Mapping[str, object] | None = None,
    *,
    take: bool = False,
) -> Aggregate:
    """A new aggregate with one more commit: ``total + weight · hypergradient``.

    ``hypergradient`` must already be validated (:func:`check_hypergradient`). By default it is
    left untouched and never aliased: ``total`` is always the aggregate's own memory. With
    ``take=True`` the caller hands the hypergradient's tensors over (nobody else may use them
    any more, e.g. they were just decoded from the wire): a first commit of weight 1 then
    becomes ``total`` as it is, without a copy (``1 · g`` is ``g``). Metrics that are not finite
    numbers, or whose names the coordinator uses itself, are ignored.

    Example:
        >>> g = {"lam": torch.ones(2)}
        >>> shares = lambda agg: agg.total["lam"].data_ptr() == g["lam"].data_ptr()
        >>> shares(add_commit(empty_aggregate(), g, 0, 1.0, take=True))
        True
        >>> shares(add_commit(empty_aggregate(), g, 0, 1.0)), shares(add_commit(
        ...     empty_aggregate(), g, 1, 0.5, take=True))
        (False, False)
    """
    if agg.count == 0:  # one pass per tensor (or none): no zeros to add to
        if take and weight == 1.0:
            total = {k: v.detach() for k, v in hypergradient.items()}
        else:
            total = {k: v.detach() * weight for k, v in hypergradient.items()}
    else:
        total = {
            k: v.add(hypergradient[k].detach().to(v.device), alpha=weight)
            for k, v in agg.total.items()
        }
    sums = dict(agg.metric_sums)
    for name, raw in (metrics or {}).items():
        value = _finite_number(raw)
        if value is None or not isinstance(name, str) or name in _RESERVED_METRICS:
            continue
        s, c = sums.get(name, (0.0, 0))
        sums[name] = (s + value, c + 1)
    return Aggregate(
        total=total,
        count=agg.count + 1,
        weight_sum=agg.weight_sum + float(weight),
        staleness_sum=agg.staleness_sum + int(staleness),
        metric_sums=sums,
    )


def aggregate_gradient(agg: Aggregate) -> TensorDict:
    """``(1/n) Σ_i w_i g_i`` (see the module docstring for why not ``/ Σ_i w_i``).

    The tensors are ``agg``'s own or fresh ones: a caller that drops ``agg`` afterwards may
    write into them (the coordinator's SGD step computes the next λ in their memory).
    """
    if agg.count < 1:
        raise ChronosTypeError("aggregate_gradient() needs at least one commit")
    if agg.count == 1:
        return dict(agg.total)
    return td.scale(agg.total, 1.0 / agg.count)


def aggregate_metrics(agg: Aggregate) -> dict[str, float | int]:
    """Mean of each worker metric, plus ``commits``, ``weight_sum`` and ``mean_staleness``."""
    out: dict[str, float | int] = {name: s / c for name, (s, c) in sorted(agg.metric_sums.items())}
    out["commits"] = agg.count
    out["weight_sum"] = agg.weight_sum
    out["mean_staleness"] = agg.staleness_sum / agg.count if agg.count else 0.0
    return out


def aggregate_state(agg: Aggregate) -> dict[str, object]:
    """``agg`` as plain containers and tensors (for ``torch.save`` with ``weights_only``)."""
    return {
        "total": td.clone(agg.total),
        "count": agg.count,
        "weight_sum": agg.weight_sum,
        "staleness_sum": agg.staleness_sum,
        "metric_sums": dict(agg.metric_sums),
    }


def aggregate_from_state(state: Mapping[str, Any], reference: Mapping[str, Tensor]) -> Aggregate:
    """Inverse of :func:`aggregate_state`; ``reference`` (λ) checks the saved tensors."""
    if int(state["count"]) == 0:
        return empty_aggregate()
    td.check_same_structure(reference, state["total"], "saved aggregate")
    return Aggregate(
        total=td.clone(state["total"]),
        count=int(state["count"]),
        weight_sum=float(state["weight_sum"]),
        staleness_sum=int(state["staleness_sum"]),
        metric_sums=dict(state["metric_sums"]),
    )


# -- sync barrier ---------------------------------------------------------------------------------


def sync_barrier_ready(
    committed: Set[str], alive: Set[str], num_workers: int, started: bool
) -> bool:
    """Whether the sync-mode barrier on the current version may release (step).

    ``committed``: workers whose commit on the current version was accepted; ``alive``:
    registered workers not expired; ``started``: ``num_workers`` workers were alive at once at
    some point. The barrier releases when at least one commit is in and either

    * ``len(committed) >= num_workers`` (the normal case), or
    * the job has started and every alive worker has committed (``alive ⊆ committed``): workers
      were lost (expired or deregistered) and nobody left could add a commit, so the step uses
      the commits that arrived instead of waiting forever.

    Before the job has started, the barrier waits for ``num_workers`` commits (workers still
    joining).

    Example:
        >>> sync_barrier_ready({"a"}, {"a", "b"}, num_workers=2, started=True)
        False
        >>> sync_barrier_ready({"a"}, {"a"}, num_workers=2, started=True)   # b died
        True
        >>> sync_barrier_ready({"a"}, {"a"}, num_workers=2, started=False)  # b not joined yet
        False
    """
    if not committed:
        return False
    if len(committed) >= num_workers:
        return True
    return started and alive <= committed


# -- outer optimizer ------------------------------------------------------------------------------


def build_outer_optimizer(
    spec: OptimizerSpec | MultiTimescaleConfig,
    params: list[Tensor],
    lr: float,
    names: Sequence[str] | None = None,
) -> torch.optim.Optimizer:
    """The outer optimizer over ``params`` (leaf tensors): ``"sgd"``, ``"momentum"``,
    ``"adam"``, a factory ``params -> torch.optim.Optimizer`` that must optimize exactly the
    tensors it is given, or a :class:`~chronos.continuum.MultiTimescaleConfig`: then a
    :class:`~chronos.continuum.MultiTimescaleOptimizer` over ``dict(zip(names, params))``
    (``names``, the outer parameters' names, are required; ``lr`` is not used)."""
    if isinstance(spec, MultiTimescaleConfig):
        if names is None or len(names) != len(params):
            raise ConfigError(
                "a MultiTimescaleConfig needs the outer parameters' names, one per tensor: "
                "build_outer_optimizer(spec, params, lr, names=[...])"
            )
        return MultiTimescaleOptimizer(dict(zip(names, params, strict=True)), spec)
    if isinstance(spec, str) and spec not in OUTER_OPTIMIZERS:
        raise ConfigError(
            f"unknown outer optimizer {spec!r}; use one of {OUTER_OPTIMIZERS} or a callable "
            "params -> torch.optim.Optimizer"
        )
    try:
        opt = make_optimizer(spec, params, lr)
    except ChronosTypeError as e:
        raise ConfigError(str(e)) from e
    given = {id(p) for p in params}
    used = {id(p) for group in opt.param_groups for p in group["params"]}
    if used != given:
        raise ConfigError(
            "the optimizer factory must optimize exactly the list of tensors it is given "
            "(the coordinator's copies of the outer params), e.g. lambda ps: torch.optim.SGD(ps, "
            "lr=0.1)"
        )
    return opt
