"""Data-parallel inner solves in a worker group, with three synchronization policies.

Every rank ``r`` of a :class:`~chronos.distributed.group.Group` holds shard ``r`` and takes
optimizer steps on its own shard's loss ``f_r``; the group minimizes ``f = (1/W) Σ_r f_r``.
What differs is when the ranks' parameters meet:

* ``every_step`` — the baseline (what DDP does): each step all-reduces the gradient, so every
  rank steps with ``∇f`` and the parameters never differ. One model-sized all-reduce per step.
* ``periodic:H`` — local SGD: ``H`` local steps, then the ranks average their parameters
  (one model-sized all-reduce every ``H`` steps).
* ``significance[:τ]`` — local steps; every ``check_every`` steps the ranks agree on the
  largest relative drift since the last synchronization, ``max_r ‖θ_r − θ̄‖ / ‖θ̄‖`` (one
  4-byte all-reduce), and average only when it exceeds ``τ`` (or after ``max_local_steps``
  local steps). Checking every few steps rather than every step matters more than the 4
  bytes: each collective is a point where every rank waits for the slowest. With
  ``target_rate`` the threshold adapts, ``τ ← τ·exp(gain·(synced − target_rate))``, from the
  same collective decision on every rank, so the ranks never disagree. The exchanged
  difference ``θ_r − θ̄`` may go through a lossy codec (``codec="topk:0.1"``, ``"int8"``...) with
  error feedback: what a codec leaves out is carried into the next synchronization, never lost.

The local policies always synchronize after the last step, so every rank returns the same θ
(which the distributed hypergradient needs). The solve runs exactly ``num_steps`` steps (no
tolerance: stopping early would need the global gradient norm, a collective per step).

L-BFGS is not offered: its line search evaluates the loss at trial points, which would need
the global loss (a collective) at each; use ``sgd``, ``momentum`` or ``adam``.

Example (a one-rank group, where every policy is plain gradient descent):
    >>> import torch
    >>> from chronos.core import InnerProblem
    >>> from chronos.distributed.group import Group, GroupSpec, free_port
    >>> prob = InnerProblem.from_functions(
    ...     inner_loss=lambda p, h: ((p["w"] - 3.0) ** 2).sum(),
    ...     outer_loss=lambda p, h: (p["w"] ** 2).sum(),
    ...     init_params={"w": torch.zeros(2)}, optimizer="sgd", inner_lr=0.25)
    >>> with Group(GroupSpec(0, 1, free_port())) as g:
    ...     theta, info = data_parallel_solve(prob, {}, g, SyncPolicy.parse("periodic:5"),
    ...                                       num_steps=20)
    >>> [round(x, 3) for x in theta["w"].tolist()], info.syncs
    ([3.0, 3.0], 4)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from chronos.communication.codecs import parse_codec
from chronos.communication.feedback import ErrorFeedbackCompressor, decode_dict
from chronos.core import tensordict as td
from chronos.core.errors import ChronosTypeError, ConfigError, NonFiniteError
from chronos.core.problem import InnerProblem, OptimizerSpec, make_optimizer
from chronos.core.tensordict import TensorDict
from chronos.distributed.group import Group

__all__ = ["POLICIES", "SyncInfo", "SyncPolicy", "data_parallel_solve"]

POLICIES = ("every_step", "significance", "periodic")


@dataclass(frozen=True)
class SyncPolicy:
    """When a group's ranks synchronize their inner parameters (see the module docstring).

    Args:
        kind: ``"every_step"``, ``"significance"`` or ``"periodic"``.
        period: ``H`` of ``periodic`` (>= 1).
        threshold: ``τ`` of ``significance``, relative drift (> 0).
        check_every: ``significance`` votes every this many local steps (>= 1).
        max_local_steps: ``significance`` synchronizes at the latest after this many local
            steps (>= 1).
        target_rate: adapt ``τ`` so about this fraction of steps synchronize (``None``: fixed).
        gain: adaptation speed of ``τ`` (> 0).
        codec: how the local policies exchange ``θ_r − θ̄`` (a codec spec; lossy ones keep an
            error-feedback residual). ``every_step`` always all-reduces dense gradients.
    """

    kind: Literal["every_step", "significance", "periodic"] = "significance"
    period: int = 10
    threshold: float = 0.05
    check_every: int = 4
    max_local_steps: int = 50
    target_rate: float | None = None
    gain: float = 0.1
    codec: str = "identity"

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ConfigError(f"sync policy must be one of {POLICIES}, got {self.kind!r}")
        for name in ("period", "max_local_steps", "check_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.threshold, (int, float)) and 0 < self.threshold < math.inf):
            raise ConfigError(f"threshold must be a finite number > 0, got {self.threshold!r}")
        if self.target_rate is not None and not 0 < self.target_rate <= 1:
            raise ConfigError(f"target_rate must be in (0, 1] or None, got {self.target_rate}")
        if not self.gain > 0:
            raise ConfigError(f"gain must be > 0, got {self.gain}")
        parse_codec(self.codec)  # validates

    @classmethod
    def parse(cls, spec: str | SyncPolicy, codec: str = "identity") -> SyncPolicy:
        """``"every_step"``, ``"periodic:H"``, ``"significance"`` or ``"significance:τ"``.

        >>> SyncPolicy.parse("periodic:4").period, SyncPolicy.parse("significance:0.1").threshold
        (4, 0.1)
        """
        if isinstance(spec, SyncPolicy):
            return spec
        if not isinstance(spec, str):
            raise ConfigError(f"sync policy must be a str like 'periodic:10', got {spec!r}")
        kind, colon, arg = spec.strip().partition(":")
        if kind not in POLICIES or (kind == "every_step" and colon) or (colon and not arg):
            raise ConfigError(
                f"unknown sync policy {spec!r}; use every_step, periodic:H (e.g. periodic:10) "
                "or significance[:threshold] (e.g. significance:0.05)"
            )
        if not arg:
            return cls(kind=kind, codec=codec)  # type: ignore[arg-type]
        try:
            value = int(arg) if kind == "periodic" else float(arg)
        except ValueError:
            what = "an int H" if kind == "periodic" else "a number τ"
            raise ConfigError(f"sync policy {spec!r}: after ':' give {what}") from None
        if kind == "periodic":
            return cls(kind="periodic", period=int(value), codec=codec)
        return cls(kind="significance", threshold=float(value), codec=codec)

    @property
    def spec(self) -> str:
        """The short text form (``parse(policy.spec)`` gives back kind and its number)."""
        if self.kind == "periodic":
            return f"periodic:{self.period}"
        if self.kind == "significance":
            return f"significance:{self.threshold:g}"
        return "every_step"


@dataclass(frozen=True)
class SyncInfo:
    """What one group solve did: ``steps`` taken, ``syncs`` (parameter or gradient exchanges),
    ``final_loss`` (this rank's shard loss at the last step), ``threshold`` (``τ`` at the end,
    for ``significance``)."""

    steps: int
    syncs: int
    final_loss: float
    threshold: float


def _set(leaves: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for k, p in leaves.items():
            p.copy_(values[k])


def data_parallel_solve(
    problem: InnerProblem,
    outer_params: Mapping[str, Tensor],
    group: Group,
    policy: SyncPolicy,
    *,
    num_steps: int | None = None,
    init_params: Mapping[str, Tensor] | None = None,
    optimizer: OptimizerSpec | None = None,
    lr: float | None = None,
    compressor: ErrorFeedbackCompressor | None = None,
    threshold: float | None = None,
) -> tuple[TensorDict, SyncInfo]:
    """Minimize ``(1/W) Σ_r f_r(θ, λ)`` over θ for fixed λ, together with the group.

    Every rank must call this with the same arguments except its own problem shard; the
    result θ is the same on every rank. Collective op names in ``group.counter``: ``"grad"``
    (every_step), ``"params"`` (averaging), ``"decision"`` (significance's 4-byte vote).

    Args:
        problem: this rank's shard of the inner problem.
        outer_params: λ (the same on every rank).
        group: the joined :class:`~chronos.distributed.group.Group`.
        policy: a :class:`SyncPolicy`.
        num_steps: optimizer steps (default ``problem.num_steps``).
        init_params: θ_0, the same on every rank (default ``problem.init_params()``).
        optimizer, lr: default the problem's ``optimizer`` / ``inner_lr``.
        compressor: the error-feedback state of a lossy ``policy.codec``, kept across solves
            by the caller (``None``: a fresh one per solve when the codec is lossy).
        threshold: the current adaptive ``τ`` (``None``: ``policy.threshold``); the returned
            :attr:`SyncInfo.threshold` is the value to pass next time.

    Raises:
        NonFiniteError: a rank's loss became NaN/Inf (every rank raises: the decision is
            collective).
        ConfigError: L-BFGS was asked for.
        GroupError: another rank died or hung.
    """
    steps = problem.num_steps if num_steps is None else num_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"num_steps must be an int >= 1, got {steps!r}")
    spec = problem.optimizer if optimizer is None else optimizer
    if spec == "lbfgs":
        raise ConfigError(
            "a worker group cannot run L-BFGS (its line search needs the global loss at every "
            "trial point); give the problem optimizer='sgd', 'momentum' or 'adam'"
        )
    step_lr = problem.inner_lr if lr is None else lr
    outer = td.detach(dict(outer_params))
    start = problem.init_params() if init_params is None else init_params
    params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
    opt = make_optimizer(spec, list(params.values()), step_lr)
    anchor = td.clone(params)  # θ̄: the parameters every rank agreed on last
    lossy = not parse_codec(policy.codec).lossless
    if lossy and compressor is None:
        compressor = ErrorFeedbackCompressor(policy.codec)
    tau = policy.threshold if threshold is None else float(threshold)
    syncs, local, loss_value = 0, 0, math.nan

    for step in range(steps):
        opt.zero_grad(set_to_none=False)
        loss = problem.inner_loss(params, outer)
        if loss.dim() != 0:
            raise ChronosTypeError(f"inner_loss must return a scalar, got shape "
                                   f"{tuple(loss.shape)}")
        loss.backward()
        loss_value = float(loss.detach())
        if policy.kind == "every_step":
            grads = {k: p.grad for k, p in params.items() if p.grad is not None}
            mean = group.all_reduce_mean(grads, op="grad")
            for k, g in mean.items():
                params[k].grad.copy_(g)  # type: ignore[union-attr]
            syncs += 1
            if not math.isfinite(float(td.norm(mean))):
                raise NonFiniteError(f"the group's inner gradient became NaN/Inf at step {step}; "
                                     f"lower the inner learning rate (now {step_lr})")
            opt.step()
            continue
        opt.step()
        local += 1
        last = step == steps - 1
        if policy.kind == "periodic":
            due = last or local >= policy.period  # the same on every rank: no vote needed
        elif not last and local % policy.check_every and local < policy.max_local_steps:
            continue  # not a voting step
        else:
            drift = float(td.norm(td.sub(td.detach(params), anchor))) / (
                float(td.norm(anchor)) + 1e-12)
            vote = group.all_reduce_max(drift if math.isfinite(drift) else math.inf,
                                        op="decision")
            due = last or vote > tau or local >= policy.max_local_steps
            if policy.target_rate is not None and not last:
                tau *= math.exp(policy.gain * (float(due) - policy.target_rate))
        if not due:
            continue
        delta = td.sub(td.detach(params), anchor)
        if lossy:
            assert compressor is not None
            mean = _gathered_mean(group, compressor, delta)
        else:
            mean = group.all_reduce_mean(delta, op="params")
        if not td.is_finite(mean):
            raise NonFiniteError(
                f"the group's inner parameters became NaN/Inf by step {step}; lower the inner "
                f"learning rate (now {step_lr})"
            )
        anchor = td.add(anchor, mean)
        _set(params, anchor)
        syncs += 1
        local = 0
    return td.clone(td.detach(params)), SyncInfo(steps, syncs, loss_value, tau)


def _gathered_mean(group: Group, ef: ErrorFeedbackCompressor, delta: TensorDict) -> TensorDict:
    """Mean of the ranks' coded ``delta`` (all-gather of each rank's coded parts; the codec's
    error goes into this rank's residual). Parts are fixed-size for a given codec and shape,
    so every rank's parts stack."""
    out = ef.compress(delta)
    names = sorted(out.parts)
    total: TensorDict = td.zeros_like(delta)
    gathered = {n: group.all_gather(out.parts[n].contiguous(), op="params") for n in names}
    for r in range(group.world_size):
        decoded = decode_dict(ef.codec, {n: gathered[n][r] for n in names}, delta)
        total = td.add(total, decoded)
    return td.scale(total, 1.0 / group.world_size)
