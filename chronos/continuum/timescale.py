"""Multi-timescale outer optimization: each group of outer parameters is updated at its own
frequency, with its own optimizer and step size.

**The rule.** Outer parameters λ are split into groups ``G`` (one per :class:`TimescaleConfig`,
plus a ``"default"`` group of the names no timescale claims). Group ``G`` has an update
frequency ``f_G``, an optimizer ``U_G`` (SGD, SGD with momentum 0.9, or Adam) and a step size
``η_G``. At global step ``t = 1, 2, …`` (one per :meth:`MultiTimescaleOptimizer.step` call) each
group adds the current gradient of each of its parameters to an accumulator,

    ``a_G ← a_G + g_t``,    ``n_G ← n_G + 1``,

and when ``t ≡ 0 (mod f_G)`` it applies the **mean** gradient of the steps since its last update
with its own optimizer, then forgets it:

    ``λ_G ← U_G(λ_G, a_G / n_G)``,    ``a_G ← 0``,    ``n_G ← 0``.

So ``n_G = f_G`` at every update, and a group with ``f_G = 1`` is a plain optimizer. With SGD,
``f = 3`` and gradients ``g₁, g₂, g₃``: ``λ₃ = λ₀ − η (g₁ + g₂ + g₃) / 3``. Averaging (not
summing) keeps a slow group's step the size of one step of its optimizer, whatever ``f``; Adam
sees one gradient per update, so its moments run on the slow clock.

A parameter whose ``.grad`` is ``None`` at a step contributes zero to its group's sum (the step
still counts in ``n_G``); a parameter with no gradient at any step since its group's last update
is handed to its optimizer with ``grad = None``, i.e. skipped, as torch optimizers skip it.

Defaults learn out of the box: Adam with step 0.05 (:data:`DEFAULT_OPTIMIZER`,
:data:`DEFAULT_LR`, the distributed runtime's defaults where nothing is known), every step.

Example (SGD, by hand: ``a`` every step with gradient 1; ``b`` every 3rd step with the mean of
its gradients 1, 2, 3, i.e. ``1 − 0.1 · 2``):
    >>> import torch
    >>> lam = {"a": torch.tensor(1.0, requires_grad=True),
    ...        "b": torch.tensor(1.0, requires_grad=True)}
    >>> opt = MultiTimescaleOptimizer(lam, MultiTimescaleConfig(
    ...     [TimescaleConfig("b", update_frequency=3)], optimizer="sgd", lr=0.1))
    >>> opt.timescales
    {'b': (3, ('b',)), 'default': (1, ('a',))}
    >>> for t in (1, 2, 3):
    ...     lam["a"].grad, lam["b"].grad = torch.tensor(1.0), torch.tensor(float(t))
    ...     opt.step()
    ...     print(t, round(lam["a"].item(), 6), round(lam["b"].item(), 6))
    1 0.9 1.0
    2 0.8 1.0
    3 0.7 0.8
    >>> opt.num_steps, opt.due(5), opt.due(6)
    (3, ('default',), ('b', 'default'))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, overload

import torch
from torch import Tensor

from chronos.continuum.timescale_config import (
    DEFAULT_LABEL,
    DEFAULT_LR,
    DEFAULT_OPTIMIZER,
    OPTIMIZERS,
    MultiTimescaleConfig,
    TimescaleConfig,
    TimescaleGroup,
    due_labels,
    is_int,
    resolve_timescales,
)
from chronos.core.errors import (
    ChronosTypeError,
    ConfigError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
)
from chronos.core.problem import make_optimizer

__all__ = [
    "DEFAULT_LABEL",
    "DEFAULT_LR",
    "DEFAULT_OPTIMIZER",
    "OPTIMIZERS",
    "MultiTimescaleConfig",
    "MultiTimescaleOptimizer",
    "TimescaleConfig",
    "TimescaleGroup",
    "due_labels",
    "resolve_timescales",
]

# -- the optimizer --------------------------------------------------------------------------------


def _check_leaves(outer_params: object) -> dict[str, Tensor]:
    if not isinstance(outer_params, Mapping):
        raise ChronosTypeError(
            "outer_params must be a dict name -> leaf tensor (requires_grad=True), got "
            f"{type(outer_params).__name__}"
        )
    if not outer_params:
        raise ConfigError("outer_params is empty; give at least one outer parameter")
    fix = "e.g. {k: torch.tensor(v, requires_grad=True) for k, v in outer_params.items()}"
    out: dict[str, Tensor] = {}
    seen: dict[int, str] = {}
    for k, v in outer_params.items():
        if not isinstance(k, str):
            raise ChronosTypeError(f"outer parameter names must be str, got {k!r}")
        if not isinstance(v, Tensor):
            raise ChronosTypeError(
                f"outer parameter {k!r} is a {type(v).__name__}, not a tensor; the optimizer "
                f"updates tensors in place, so pass leaf tensors with requires_grad=True, {fix}"
            )
        if not (v.is_leaf and v.requires_grad and v.is_floating_point()):
            raise ConfigError(
                f"outer parameter {k!r} must be a floating-point leaf tensor with "
                f"requires_grad=True (got is_leaf={v.is_leaf}, requires_grad={v.requires_grad}, "
                f"dtype={v.dtype}); pass leaf tensors, {fix}"
            )
        if id(v) in seen:
            raise ConfigError(
                f"outer parameters {seen[id(v)]!r} and {k!r} are the same tensor; give each "
                "name its own tensor"
            )
        seen[id(v)] = k
        out[k] = v
    return out


class MultiTimescaleOptimizer(torch.optim.Optimizer):
    """A :class:`torch.optim.Optimizer` over named outer parameters that updates each group at
    its own frequency with the mean gradient since its last update (the rule in the module
    docstring).

    Use it like any torch optimizer (set ``.grad``, :meth:`step`, :meth:`zero_grad`), or hand
    :meth:`step` the hypergradient as a dict. Each group has its own torch optimizer (SGD,
    SGD with momentum 0.9, or Adam) over its parameters; ``param_groups[i]`` *is* that
    optimizer's group (with ``label``, ``update_frequency``, ``optimizer`` and ``names`` added),
    so an LR scheduler that changes ``param_groups[i]["lr"]`` changes that group's step size.
    The parameters are updated in place under ``torch.no_grad()``: they stay the same leaf
    tensors.

    Args:
        outer_params: name → floating-point leaf tensor with ``requires_grad=True`` (e.g. the
            ``outer_params`` of an :class:`~chronos.solver.ImplicitDifferentiation`).
        config: the timescales (:class:`MultiTimescaleConfig`).

    Attributes:
        timescales: label → ``(update frequency, parameter names)``, one entry per group.
        num_steps: :meth:`step` calls so far (the global step ``t`` of the last one).

    Example (the seed's three timescales; Adam, step 0.05, by default):
        >>> import torch
        >>> lam = {k: torch.tensor(v, requires_grad=True)
        ...        for k, v in {"lr": 0.1, "weight_decay": 1e-4, "dropout": 0.2}.items()}
        >>> opt = MultiTimescaleOptimizer(lam, MultiTimescaleConfig(timescales=[
        ...     TimescaleConfig("lr", update_frequency=1),
        ...     TimescaleConfig("weight_decay", update_frequency=10),
        ...     TimescaleConfig("dropout", update_frequency=50)]))
        >>> g = {"lr": torch.tensor(1.0), "weight_decay": torch.tensor(1.0),
        ...      "dropout": torch.tensor(1.0)}
        >>> opt.step(g)                      # step 1: only "lr" moves (Adam: by lr = 0.05)
        >>> [round(v.item(), 4) for v in lam.values()]
        [0.05, 0.0001, 0.2]
        >>> opt.due(10)
        ('lr', 'weight_decay')
    """

    def __init__(self, outer_params: Mapping[str, Tensor], config: MultiTimescaleConfig) -> None:
        if not isinstance(config, MultiTimescaleConfig):
            raise ChronosTypeError(
                "config must be a MultiTimescaleConfig, e.g. MultiTimescaleConfig(timescales=["
                f"TimescaleConfig('lr', update_frequency=1)]), got {type(config).__name__}"
            )
        params = _check_leaves(outer_params)
        groups = resolve_timescales(list(params), config)
        self._sealed = False
        super().__init__(
            [{"params": [params[n] for n in g.names]} for g in groups],
            {"optimizer": config.optimizer, "lr": config.lr},
        )
        self.config = config
        self._params = params
        self._groups = groups
        self._inner: dict[str, torch.optim.Optimizer] = {}
        for i, g in enumerate(groups):
            inner = make_optimizer(g.optimizer, [params[n] for n in g.names], g.lr)
            self._inner[g.label] = inner
            self._link(i, g)
        self._acc: dict[str, dict[str, Tensor]] = {g.label: {} for g in groups}
        self._count: dict[str, int] = {g.label: 0 for g in groups}
        self._t = 0
        self._sealed = True

    def _link(self, i: int, g: TimescaleGroup) -> None:
        """Make ``param_groups[i]`` the group dict of ``g``'s own optimizer."""
        group = self._inner[g.label].param_groups[0]
        group.update(label=g.label, update_frequency=g.frequency, optimizer=g.optimizer,
                     names=list(g.names))
        self.param_groups[i] = group

    # -- views ------------------------------------------------------------------------------

    @property
    def timescales(self) -> dict[str, tuple[int, tuple[str, ...]]]:
        """label → ``(update frequency, parameter names)`` of every group, in order."""
        return {g.label: (g.frequency, g.names) for g in self._groups}

    @property
    def groups(self) -> tuple[TimescaleGroup, ...]:
        """The resolved groups (frequency, names, optimizer, initial step size)."""
        return self._groups

    @property
    def num_steps(self) -> int:
        """How many times :meth:`step` has run (the global step of the last one)."""
        return self._t

    @property
    def outer_params(self) -> dict[str, Tensor]:
        """The outer parameters: the very tensors given (updated in place)."""
        return dict(self._params)

    def due(self, step: int | None = None) -> tuple[str, ...]:
        """Labels of the groups that apply their mean gradient at global step ``step``
        (default: the next step, ``num_steps + 1``); see :func:`due_labels`."""
        return due_labels(self._groups, self._t + 1 if step is None else step)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only used while building: the groups come from the :class:`MultiTimescaleConfig`."""
        if getattr(self, "_sealed", False):
            raise ConfigError(
                "MultiTimescaleOptimizer's groups come from its MultiTimescaleConfig; to add "
                "outer parameters build a new optimizer with them (and a TimescaleConfig)"
            )
        super().add_param_group(param_group)

    # -- stepping ---------------------------------------------------------------------------

    def _gradients(self, hypergradient: Mapping[str, Tensor] | None) -> dict[str, Tensor | None]:
        """Each parameter's gradient for this step (``.grad`` or the dict's), validated; no
        state is changed."""
        params = self._params
        if hypergradient is None:
            grads: dict[str, Tensor | None] = {k: p.grad for k, p in params.items()}
        else:
            if not isinstance(hypergradient, Mapping):
                raise ChronosTypeError(
                    "step() takes None (use .grad), a dict name -> tensor (the hypergradient) "
                    f"or a closure, got {type(hypergradient).__name__}"
                )
            if hypergradient.keys() != params.keys():
                missing = sorted(set(params) - set(hypergradient))
                extra = sorted(str(k) for k in set(hypergradient) - set(params))
                raise KeyMismatchError(
                    f"hypergradient keys must be the outer parameters' {sorted(params)}: "
                    f"missing {missing}, unexpected {extra}"
                )
            grads = {}
            for k, p in params.items():
                g = hypergradient[k]
                if not isinstance(g, Tensor):
                    raise ChronosTypeError(
                        f"hypergradient[{k!r}] must be a tensor, got {type(g).__name__}"
                    )
                if g.shape != p.shape:
                    raise ShapeMismatchError(
                        f"hypergradient[{k!r}] has shape {tuple(g.shape)}; the outer parameter "
                        f"has shape {tuple(p.shape)}"
                    )
                grads[k] = g.detach().to(device=p.device, dtype=p.dtype)
        for k, grad in grads.items():
            if grad is not None and not bool(torch.isfinite(grad).all()):
                raise NonFiniteError(
                    f"the gradient of outer parameter {k!r} contains NaN or Inf; nothing was "
                    f"accumulated or applied (still at step {self._t})"
                )
        return grads

    @overload
    def step(self, hypergradient: None = None) -> None: ...

    @overload
    def step(self, hypergradient: Callable[[], float]) -> float: ...

    @overload
    def step(self, hypergradient: Mapping[str, Tensor]) -> None: ...

    def step(
        self, hypergradient: Mapping[str, Tensor] | Callable[[], float] | None = None
    ) -> float | None:
        """One global step: accumulate every parameter's gradient in its group, then let each
        due group (``num_steps % update_frequency == 0``) apply its mean gradient.

        Args:
            hypergradient: ``None``: each parameter's ``.grad``; a dict name → tensor with
                exactly the outer parameters' names and shapes: used instead of ``.grad``
                (which is left alone); a callable: a torch closure, called with grad enabled,
                then ``.grad`` is used and its result returned.

        Raises :class:`~chronos.core.errors.NonFiniteError` for a NaN or Inf gradient, and
        key / shape / type errors for a bad dict; then nothing has changed (not even
        :attr:`num_steps`).
        """
        loss: float | None = None
        if callable(hypergradient):
            with torch.enable_grad():
                loss = hypergradient()
            grads = self._gradients(None)
        else:
            grads = self._gradients(hypergradient)
        t = self._t + 1
        with torch.no_grad():
            for g in self._groups:
                due = t % g.frequency == 0
                if due and self._count[g.label] == 0:
                    # a window of one step (f = 1): its mean is this gradient, no copy needed
                    self._apply(g, {n: grads[n] for n in g.names})
                    continue
                acc = self._acc[g.label]
                for n in g.names:
                    grad = grads[n]
                    if grad is None:
                        continue
                    if n in acc:
                        acc[n].add_(grad)
                    else:
                        acc[n] = grad.clone()
                self._count[g.label] += 1
                if due:
                    count = self._count[g.label]
                    self._apply(g, {n: a.div_(count) for n, a in acc.items()})
        self._t = t
        return loss

    def _apply(self, g: TimescaleGroup, mean: Mapping[str, Tensor | None]) -> None:
        """``λ_G ← U_G(λ_G, mean)`` (a name missing from ``mean`` or ``None``: skipped); then
        the group's window is empty. Every ``.grad`` is restored."""
        params = [self._params[n] for n in g.names]
        saved = [p.grad for p in params]
        try:
            for n, p in zip(g.names, params, strict=True):
                p.grad = mean.get(n)
            self._inner[g.label].step()
        finally:
            for p, s in zip(params, saved, strict=True):
                p.grad = s
        self._acc[g.label] = {}
        self._count[g.label] = 0

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue exactly: the step counter,
        each group's accumulated gradients and count, and each group's optimizer state (with
        its step size). Plain dicts, lists, numbers, strings and tensors (copies), so
        ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it."""
        return {
            "num_steps": self._t,
            "timescales": {
                g.label: {"update_frequency": g.frequency, "params": list(g.names),
                          "optimizer": g.optimizer}
                for g in self._groups
            },
            "groups": {
                g.label: {
                    "count": self._count[g.label],
                    "accumulators": {n: a.detach().clone() for n, a in self._acc[g.label].items()},
                    "optimizer": copy.deepcopy(self._inner[g.label].state_dict()),
                }
                for g in self._groups
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output of an optimizer with the same timescales (labels,
        frequencies, parameter names and optimizers); anything else raises
        :class:`~chronos.core.errors.ConfigError` and changes nothing."""
        mine = self.state_dict()["timescales"]
        if not isinstance(state_dict, Mapping) or not {"num_steps", "timescales", "groups"} <= set(
            state_dict
        ):
            raise ConfigError(
                "not a MultiTimescaleOptimizer state dict (needs num_steps, timescales, groups); "
                "pass MultiTimescaleOptimizer.state_dict() output"
            )
        theirs = state_dict["timescales"]
        if dict(theirs) != mine:
            raise ConfigError(
                f"the state dict was saved with timescales {dict(theirs)}; this optimizer has "
                f"{mine}: build the optimizer with the same MultiTimescaleConfig and outer "
                "parameter names"
            )
        t = state_dict["num_steps"]
        if not is_int(t) or t < 0:
            raise ConfigError(f"num_steps must be an int >= 0, got {t!r}")
        new_acc: dict[str, dict[str, Tensor]] = {}
        new_count: dict[str, int] = {}
        for g in self._groups:
            saved = state_dict["groups"].get(g.label) if isinstance(
                state_dict["groups"], Mapping) else None
            if not isinstance(saved, Mapping) or not {"count", "accumulators", "optimizer"} <= set(
                saved
            ):
                raise ConfigError(f"the state dict lacks group {g.label!r}'s count, "
                                  "accumulators or optimizer state")
            count = saved["count"]
            if not is_int(count) or not 0 <= count < g.frequency:
                raise ConfigError(
                    f"group {g.label!r}: count must be an int in [0, {g.frequency}), got {count!r}"
                )
            acc = {}
            for n, a in dict(saved["accumulators"]).items():
                p = self._params.get(n) if n in g.names else None
                if p is None or not isinstance(a, Tensor) or a.shape != p.shape:
                    raise ConfigError(
                        f"group {g.label!r}: saved accumulator {n!r} does not match an outer "
                        f"parameter of the group {list(g.names)} (name and shape)"
                    )
                acc[n] = a.detach().to(device=p.device, dtype=p.dtype, copy=True)
            new_acc[g.label], new_count[g.label] = acc, count
        before = {label: copy.deepcopy(o.state_dict()) for label, o in self._inner.items()}
        try:
            for g in self._groups:
                self._inner[g.label].load_state_dict(
                    copy.deepcopy(state_dict["groups"][g.label]["optimizer"])
                )
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            for label, s in before.items():
                self._inner[label].load_state_dict(s)
            for i, g in enumerate(self._groups):
                self._link(i, g)
            raise ConfigError(f"cannot restore a group's optimizer state: {e}") from e
        for i, g in enumerate(self._groups):
            self._link(i, g)  # torch's load_state_dict installs a new group dict
        self._acc, self._count, self._t = new_acc, new_count, t
