"""Configuration of multi-timescale outer optimization: :class:`TimescaleConfig`,
:class:`MultiTimescaleConfig`, and their resolution into groups of outer-parameter names
(:func:`resolve_timescales`, :func:`due_labels`). The optimizer that runs them is
:class:`~chronos.continuum.timescale.MultiTimescaleOptimizer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from fnmatch import fnmatchcase

from chronos.core.errors import ChronosTypeError, ConfigError

__all__ = [
    "DEFAULT_LABEL",
    "DEFAULT_LR",
    "DEFAULT_OPTIMIZER",
    "OPTIMIZERS",
    "MultiTimescaleConfig",
    "TimescaleConfig",
    "TimescaleGroup",
    "due_labels",
    "is_int",
    "resolve_timescales",
]

OPTIMIZERS = ("sgd", "momentum", "adam")
"""Optimizer names a timescale accepts (``"momentum"``: SGD with momentum 0.9)."""
DEFAULT_OPTIMIZER = "adam"
"""Optimizer of a timescale that names none (the distributed runtime's default too)."""
DEFAULT_LR = 0.05
"""Step size of a timescale that gives none (Adam's step in the distributed defaults)."""
DEFAULT_LABEL = "default"
"""Label of the group of outer parameters that no timescale claims."""


# -- validation helpers ---------------------------------------------------------------------------


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_frequency(value: object, what: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"{what} must be an int >= 1 (update every that many steps), "
                          f"got {value!r}")


def _check_optimizer(value: object, what: str, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str) or value not in OPTIMIZERS:
        also = " or None (the MultiTimescaleConfig's)" if allow_none else ""
        raise ConfigError(f"{what} must be one of {OPTIMIZERS}{also}, got {value!r}")


def _check_lr(value: object, what: str, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        also = " or None (the MultiTimescaleConfig's)" if allow_none else ""
        raise ConfigError(f"{what} must be a finite number > 0{also}, got {value!r}")


# -- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimescaleConfig:
    """One timescale: which outer parameters it claims, how often and how they are updated.

    Args:
        name: the outer parameter it claims, e.g. ``"lr"``; with ``params`` given, only the
            group's label.
        update_frequency: apply the mean accumulated gradient every this many steps (int >= 1).
        params: names or :func:`fnmatch.fnmatchcase` patterns (``"decay_*"``) of the outer
            parameters it claims (a lone str is one pattern; stored as a tuple); each must
            match at least one outer parameter.
        optimizer: ``"sgd"``, ``"momentum"`` or ``"adam"``; ``None``: the
            :class:`MultiTimescaleConfig`'s.
        lr: step size (> 0); ``None``: the :class:`MultiTimescaleConfig`'s.

    Example:
        >>> TimescaleConfig("dropout", update_frequency=50).patterns
        ('dropout',)
        >>> TimescaleConfig("decays", 10, params=["decay_*"], optimizer="sgd").patterns
        ('decay_*',)
        >>> try:
        ...     TimescaleConfig("lr", update_frequency=0)
        ... except ConfigError as e:
        ...     print(e)
        timescale 'lr': update_frequency must be an int >= 1 (update every that many steps), got 0
    """

    name: str
    update_frequency: int = 1
    _: KW_ONLY
    params: Sequence[str] | None = None
    optimizer: str | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(
                f"TimescaleConfig name must be a non-empty str (an outer parameter's name, or a "
                f"label when params= is given), got {self.name!r}"
            )
        what = f"timescale {self.name!r}"
        _check_frequency(self.update_frequency, f"{what}: update_frequency")
        if self.params is not None:
            params = (self.params,) if isinstance(self.params, str) else self.params
            try:
                params = tuple(params)
            except TypeError:
                params = ()
            if not params or not all(isinstance(p, str) and p for p in params):
                raise ConfigError(
                    f"{what}: params must be a non-empty sequence of outer parameter names or "
                    f"fnmatch patterns (e.g. ('decay_*',)), or None (claim {self.name!r}), "
                    f"got {self.params!r}"
                )
            object.__setattr__(self, "params", params)
        _check_optimizer(self.optimizer, f"{what}: optimizer", allow_none=True)
        _check_lr(self.lr, f"{what}: lr", allow_none=True)

    @property
    def patterns(self) -> tuple[str, ...]:
        """The names / patterns this timescale claims: ``params``, else ``(name,)``."""
        return tuple(self.params) if self.params is not None else (self.name,)


@dataclass(frozen=True)
class MultiTimescaleConfig:
    """The timescales of a :class:`MultiTimescaleOptimizer` and the defaults they fall back on.

    Args:
        timescales: :class:`TimescaleConfig` s with distinct names (stored as a tuple).
        optimizer: optimizer of every timescale that names none, and of the default group
            (``"sgd"``, ``"momentum"``, ``"adam"``; default :data:`DEFAULT_OPTIMIZER`).
        lr: step size of every timescale that gives none, and of the default group (> 0;
            default :data:`DEFAULT_LR`).
        default_frequency: update frequency of the default group: the outer parameters that
            no timescale claims (int >= 1; default 1).

    Example:
        >>> cfg = MultiTimescaleConfig([TimescaleConfig("lr"), TimescaleConfig("wd", 10)])
        >>> cfg.timescales[1], cfg.optimizer, cfg.lr
        (TimescaleConfig(name='wd', update_frequency=10, params=None, optimizer=None, lr=None), \
'adam', 0.05)
        >>> try:
        ...     MultiTimescaleConfig([TimescaleConfig("lr"), TimescaleConfig("lr", 5)])
        ... except ConfigError as e:
        ...     print(e)
        two timescales are named 'lr'; give each TimescaleConfig its own name
    """

    timescales: Sequence[TimescaleConfig] = ()
    optimizer: str = DEFAULT_OPTIMIZER
    lr: float = DEFAULT_LR
    default_frequency: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.timescales, (str, Mapping)) or not isinstance(
            self.timescales, Sequence
        ):
            raise ChronosTypeError(
                "timescales must be a list of TimescaleConfig, e.g. [TimescaleConfig('lr', 1)], "
                f"got {type(self.timescales).__name__}"
            )
        timescales = tuple(self.timescales)
        seen: set[str] = set()
        for ts in timescales:
            if not isinstance(ts, TimescaleConfig):
                raise ChronosTypeError(
                    f"every timescale must be a TimescaleConfig, e.g. TimescaleConfig('lr', "
                    f"update_frequency=1), got {ts!r}"
                )
            if ts.name in seen:
                raise ConfigError(
                    f"two timescales are named {ts.name!r}; give each TimescaleConfig its own name"
                )
            seen.add(ts.name)
        object.__setattr__(self, "timescales", timescales)
        _check_optimizer(self.optimizer, "MultiTimescaleConfig optimizer", allow_none=False)
        _check_lr(self.lr, "MultiTimescaleConfig lr", allow_none=False)
        _check_frequency(self.default_frequency, "MultiTimescaleConfig default_frequency")


@dataclass(frozen=True)
class TimescaleGroup:
    """A resolved timescale: its label, frequency, the outer parameters it updates (in the
    order of the outer-parameter dict), its optimizer name and step size."""

    label: str
    frequency: int
    names: tuple[str, ...]
    optimizer: str
    lr: float


def resolve_timescales(
    names: Sequence[str], config: MultiTimescaleConfig
) -> tuple[TimescaleGroup, ...]:
    """The groups ``config`` makes of the outer parameters ``names``: one per timescale, in the
    config's order, then :data:`DEFAULT_LABEL` for the names no timescale claims (if any).

    Raises :class:`ConfigError` for no names, a name or pattern that matches no outer parameter
    (listing the ones there are), a parameter claimed by two timescales (naming both), or a
    timescale named ``"default"`` while some parameters are unclaimed.

    Example:
        >>> cfg = MultiTimescaleConfig([TimescaleConfig("decays", 5, params=["wd_*"])],
        ...                            optimizer="sgd")
        >>> [(g.label, g.frequency, g.names) for g in resolve_timescales(
        ...     ["lr", "wd_1", "wd_2"], cfg)]
        [('decays', 5, ('wd_1', 'wd_2')), ('default', 1, ('lr',))]
        >>> try:
        ...     resolve_timescales(["lr"], MultiTimescaleConfig([TimescaleConfig("dropout", 50)]))
        ... except ConfigError as e:
        ...     print(e)
        timescale 'dropout': 'dropout' matches no outer parameter; the outer parameters are ['lr']
    """
    names = list(names)
    if not names:
        raise ConfigError("outer_params is empty; give at least one outer parameter")
    owner: dict[str, str] = {}
    claimed: list[tuple[TimescaleConfig, set[str]]] = []
    for ts in config.timescales:
        mine: set[str] = set()
        for pattern in ts.patterns:
            hits = [n for n in names if n == pattern or fnmatchcase(n, pattern)]
            if not hits:
                raise ConfigError(
                    f"timescale {ts.name!r}: {pattern!r} matches no outer parameter; the outer "
                    f"parameters are {sorted(names)}"
                )
            mine.update(hits)
        for n in sorted(mine):
            if n in owner:
                raise ConfigError(
                    f"outer parameter {n!r} is claimed by timescales {owner[n]!r} and "
                    f"{ts.name!r}; give each parameter to one timescale"
                )
            owner[n] = ts.name
        claimed.append((ts, mine))
    groups = [
        TimescaleGroup(
            label=ts.name,
            frequency=ts.update_frequency,
            names=tuple(n for n in names if n in mine),
            optimizer=ts.optimizer if ts.optimizer is not None else config.optimizer,
            lr=float(ts.lr if ts.lr is not None else config.lr),
        )
        for ts, mine in claimed
    ]
    rest = tuple(n for n in names if n not in owner)
    if rest:
        if DEFAULT_LABEL in {g.label for g in groups}:
            raise ConfigError(
                f"the label {DEFAULT_LABEL!r} names the group of unclaimed outer parameters "
                f"{list(rest)}; give that timescale another name (and params=[...])"
            )
        groups.append(TimescaleGroup(DEFAULT_LABEL, config.default_frequency, rest,
                                     config.optimizer, float(config.lr)))
    return tuple(groups)


def due_labels(groups: Sequence[TimescaleGroup], step: int) -> tuple[str, ...]:
    """Labels of the groups that apply their mean gradient at global step ``step`` (>= 1):
    those whose frequency divides it.

    Example:
        >>> gs = [TimescaleGroup("fast", 1, ("a",), "sgd", 0.1),
        ...       TimescaleGroup("slow", 3, ("b",), "sgd", 0.1)]
        >>> [due_labels(gs, t) for t in (1, 2, 3)]
        [('fast',), ('fast',), ('fast', 'slow')]
    """
    if not is_int(step) or step < 1:
        raise ConfigError(f"step must be an int >= 1 (steps count from 1), got {step!r}")
    return tuple(g.label for g in groups if step % g.frequency == 0)
