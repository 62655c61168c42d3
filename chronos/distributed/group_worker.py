"""Worker groups in the runtime: one leader talks to the coordinator, the group computes.

Two channels, two kinds of state. λ (small, versioned, changes once per outer step) goes
through the ZeroMQ coordinator; θ (large, changes every inner step) stays inside a group of
``W`` processes and moves through ``torch.distributed`` collectives. Only the group's **leader**
(rank 0) is a coordinator worker: it checks out λ, broadcasts it to the group, the group solves
the inner problem over the union of its shards (:func:`~.inner_sync.data_parallel_solve`) and
computes the hypergradient of that problem (:func:`~.group_hypergrad.group_hypergradient`), and
the leader commits it. Why one rank and not every rank with its slice: the hypergradient of a
group is *one* gradient of *one* inner problem (a sum over shards that the group already
reduced), so one commit carries it; W commits would multiply the coordinator's messages, leases
and staleness bookkeeping by W for the same information.

Within a group the leader drives the followers with tiny broadcasts (op ``"control"``, 16
bytes): ``WORK`` (λ follows, op ``"outer"``), then after the solve ``GO`` (compute the
hypergradient) or ``SKIP`` (the lease was cancelled: drop this round), or ``STOP``. The
control broadcasts have their own, long timeout (a leader may wait long for a checkout); the
solve's collectives have the group's timeout. A dead rank makes the others' collectives fail
at once (its connections close): the leader's worker leaves the coordinator (it deregisters
on the way out, so the coordinator sees it go), the followers exit with an error.

Entry points:

* :func:`group_main` — one process of a group, as :func:`~.launcher.run_local` starts them
  (``chronos run --group-size G``);
* ``python -m chronos.distributed.torchrun PROBLEM --coordinator tcp://HOST:PORT`` — the
  same from ``torchrun``'s environment, across machines (:mod:`chronos.distributed.torchrun`).

Example (a one-process group solving with the coordinator, in-process):
    >>> from chronos.distributed.inner_sync import SyncPolicy
    >>> GroupSettings(policy=SyncPolicy.parse("periodic:5")).policy.spec
    'periodic:5'
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from chronos.communication.codecs import parse_codec
from chronos.communication.feedback import ErrorFeedbackCompressor
from chronos.core import tensordict as td
from chronos.core.errors import ChronosError, ConfigError
from chronos.core.problem import InnerProblem
from chronos.core.tensordict import TensorDict
from chronos.core.trajectory import Trajectory
from chronos.distributed.group import Group, GroupError, GroupSpec, fingerprint
from chronos.distributed.group_hypergrad import METHODS, group_hypergradient
from chronos.distributed.inner_sync import SyncPolicy, data_parallel_solve

__all__ = ["GroupMember", "GroupSettings", "check_group_problem", "group_main",
           "group_optimizer", "join"]

log = logging.getLogger("chronos.group")

_STOP, _WORK, _GO, _SKIP = 0, 1, 2, 3
_NAMES = {_STOP: "STOP", _WORK: "WORK", _GO: "GO", _SKIP: "SKIP"}


@dataclass(frozen=True)
class GroupSettings:
    """How a group solves: ``policy`` (:class:`~.inner_sync.SyncPolicy`), ``method``
    (``"cg"``: distributed CG, exact; ``"pcg"``: preconditioned by the local Hessians, exact;
    ``"local"``: averaged local solves), ``inner_steps`` (default: the problem's
    ``num_steps``), ``max_iter`` / ``tol`` / ``damping`` of the linear solve (``damping`` 0:
    the problem's ``hypergradient_damping`` if it has one, e.g. a network whose Hessian is
    indefinite away from a minimum), ``warm_start`` (θ and ``v`` from the previous round),
    ``control_timeout`` (seconds a follower waits for the leader's next command)."""

    policy: SyncPolicy = field(default_factory=SyncPolicy)
    method: str = "cg"
    inner_steps: int | None = None
    max_iter: int = 100
    tol: float | None = None
    damping: float = 0.0
    warm_start: bool = True
    control_timeout: float = 3600.0

    def __post_init__(self) -> None:
        if not isinstance(self.policy, SyncPolicy):
            raise ConfigError(f"policy must be a SyncPolicy, got {self.policy!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        steps = self.inner_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):
            raise ConfigError(f"inner_steps must be an int >= 1 or None, got {steps!r}")
        if not (isinstance(self.control_timeout, (int, float)) and self.control_timeout > 0):
            raise ConfigError(f"control_timeout must be > 0, got {self.control_timeout!r}")


class GroupMember:
    """One rank's part of a group's rounds (leader or follower; see the module docstring).

    The leader calls :meth:`solve`, then :meth:`skip` or :meth:`hypergradient`, and
    :meth:`stop` at the end (:class:`~.worker.Worker` does, given ``group=``); a follower calls
    :meth:`follow`, which returns when the leader stops.
    """

    def __init__(self, problem: InnerProblem, group: Group, settings: GroupSettings) -> None:
        self.problem = problem
        self.group = group
        self.settings = settings
        self.is_leader = group.rank == 0
        self._like = td.clone(td.as_tensor_dict(_default_outer(problem), what="λ"))
        self._theta: TensorDict | None = None
        self._solution: TensorDict | None = None
        self._threshold: float | None = None
        lossy = not parse_codec(settings.policy.codec).lossless  # as data_parallel_solve decides
        self._ef = ErrorFeedbackCompressor(settings.policy.codec) if lossy else None
        self._control = dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=settings.control_timeout))
        self._stopped = False
        self.counts = {"rounds": 0, "skipped": 0, "syncs": 0, "inner_steps": 0,
                       "linear_iterations": 0, "collectives": 0}

    # -- the leader's side ------------------------------------------------------------------

    def _command(self, cmd: int, n: int = 0) -> tuple[int, int]:
        t = torch.tensor([cmd, n], dtype=torch.int64)
        try:
            dist.broadcast(t, src=0, group=self._control)
        except (RuntimeError, dist.DistError) as e:
            raise GroupError(f"rank {self.group.rank}: the group's control channel failed "
                             f"({str(e).splitlines()[0][:200]}); a rank died") from None
        c = self.group.counter
        (c.sent if self.is_leader else c.received)("control", t.nbytes)
        return int(t[0]), int(t[1])

    def solve(self, outer: Mapping[str, torch.Tensor], version: int = 0,
              worker_id: str | None = None) -> tuple[TensorDict, Trajectory]:
        """Leader: send λ to the group and solve the inner problem together."""
        flat, spec = td.flatten(td.detach(dict(outer)))
        self._command(_WORK, flat.numel())
        self.group.broadcast(flat.contiguous(), op="outer")
        return self._solve(td.unflatten(flat, spec), version, worker_id)

    def skip(self) -> None:
        """Leader: the round's work is not wanted (lease lost); followers drop it too."""
        self._command(_SKIP)
        self.counts["skipped"] += 1

    def hypergradient(self, theta: TensorDict,
                      outer: Mapping[str, torch.Tensor]) -> tuple[TensorDict, dict[str, float]]:
        """Leader: the group's hypergradient at ``theta`` (after :meth:`solve`)."""
        self._command(_GO)
        return self._hypergradient(theta, dict(outer))

    def stop(self) -> None:
        """Leader: release the followers (idempotent; best effort if the group broke)."""
        if self._stopped or not self.is_leader:
            return
        self._stopped = True
        with contextlib.suppress(ChronosError):
            self._command(_STOP)

    # -- both sides --------------------------------------------------------------------------

    def _solve(self, outer: TensorDict, version: int,
               worker_id: str | None) -> tuple[TensorDict, Trajectory]:
        s = self.settings
        t0 = time.perf_counter()
        init = self._theta if s.warm_start else None
        optimizer, lr = group_optimizer(self.problem)
        theta, info = data_parallel_solve(
            self.problem, outer, self.group, s.policy, num_steps=s.inner_steps,
            init_params=init, optimizer=optimizer, lr=lr, compressor=self._ef,
            threshold=self._threshold)
        self._threshold = info.threshold
        self._theta = theta
        self.counts["rounds"] += 1
        self.counts["syncs"] += info.syncs
        self.counts["inner_steps"] += info.steps
        traj = Trajectory(outer_params=td.clone(outer), final_params=theta, version=version,
                          worker_id=worker_id, losses=(info.final_loss,), num_steps=info.steps,
                          converged=False, wall_time=time.perf_counter() - t0)
        return theta, traj

    def _hypergradient(self, theta: TensorDict,
                       outer: TensorDict) -> tuple[TensorDict, dict[str, float]]:
        s, prob = self.settings, self.problem
        grad, info = group_hypergradient(
            lambda p, h: prob.inner_loss(p, h), lambda p, h: prob.outer_loss(p, h),
            theta, outer, self.group, method=s.method, max_iter=s.max_iter, tol=s.tol,
            damping=s.damping or float(getattr(prob, "hypergradient_damping", 0.0)),
            init=self._solution if s.warm_start else None)
        self._solution = info.solution
        self.counts["linear_iterations"] += info.solve.iterations
        self.counts["collectives"] += info.collectives
        return grad, {"outer_loss": info.outer_loss,
                      "linear_iterations": float(info.solve.iterations)}

    def follow(self) -> None:
        """Follower: serve the leader's rounds until it stops (or the group breaks)."""
        while True:
            cmd, n = self._command(_STOP)
            if cmd == _STOP:
                return
            if cmd != _WORK:
                raise GroupError(f"rank {self.group.rank}: expected WORK or STOP from the "
                                 f"leader, got {_NAMES.get(cmd, cmd)}")
            flat, spec = td.flatten(self._like)
            if n != flat.numel():
                raise ConfigError(
                    f"rank {self.group.rank}: the leader sent λ with {n} entries, this rank's "
                    f"problem has {flat.numel()}; every rank needs the same problem"
                )
            outer = td.unflatten(self.group.broadcast(flat.clone(), op="outer"), spec)
            theta, _ = self._solve(outer, 0, None)
            cmd, _ = self._command(_STOP)
            if cmd == _STOP:
                return
            if cmd == _GO:
                self._hypergradient(theta, outer)
            else:
                self.counts["skipped"] += 1

    def stats(self) -> dict[str, Any]:
        """Rounds, syncs, steps, and this rank's collective bytes by op."""
        out: dict[str, Any] = dict(self.counts)
        out.update(role="leader" if self.is_leader else "follower", rank=self.group.rank,
                   group_size=self.group.world_size, policy=self.settings.policy.spec,
                   method=self.settings.method,
                   collective_bytes_by_op=self.group.counter.by_op())
        if self._threshold is not None:
            out["threshold"] = self._threshold
        accuracy = getattr(self.problem, "accuracy", None)
        if self._theta is not None and callable(accuracy):
            with contextlib.suppress(Exception):
                out["test_accuracy"] = float(accuracy(self._theta, "test"))
        return out


def group_optimizer(problem: InnerProblem) -> tuple[Any, float]:
    """The inner optimizer and step size of a group solve: the problem's ``group_optimizer`` /
    ``group_inner_lr`` when it has them (a problem solved by L-BFGS alone can name a
    first-order one for groups), else its ``optimizer`` / ``inner_lr``."""
    return (getattr(problem, "group_optimizer", None) or problem.optimizer,
            float(getattr(problem, "group_inner_lr", None) or problem.inner_lr))


def check_group_problem(problem: InnerProblem) -> None:
    """Fail early, with what to do, for a problem a group cannot solve."""
    _default_outer(problem)
    if group_optimizer(problem)[0] == "lbfgs":
        raise ConfigError(
            f"{type(problem).__name__} is solved by L-BFGS, which a worker group cannot run (its "
            "line search needs the global loss at every trial point); give the problem "
            "group_optimizer = 'momentum' (or 'sgd', 'adam') and group_inner_lr"
        )


def _default_outer(problem: InnerProblem) -> Mapping[str, Any]:
    init = getattr(problem, "default_outer_params", None)
    if not callable(init):
        raise ConfigError("a group's problem needs default_outer_params() (the λ structure the "
                          "followers expect)")
    return init()


def _shard_size(problem: InnerProblem) -> int | None:
    x = getattr(problem, "x_train", None)
    return len(x) if x is not None and hasattr(x, "__len__") else None


def join(problem: InnerProblem, spec: GroupSpec, settings: GroupSettings) -> GroupMember:
    """Join the group described by ``spec`` (checking every rank has the same parameter
    shapes and shard size) and return this rank's :class:`GroupMember`."""
    check_group_problem(problem)
    group = Group(spec, fingerprint(problem.init_params(), _shard_size(problem)))
    try:
        return GroupMember(problem, group, settings)
    except BaseException:
        group.close()
        raise


def group_main(
    spec_str: str, rank: int, world_size: int, group: GroupSpec, settings: GroupSettings,
    config: Any, max_iterations: int | None = None, log_level: int = logging.WARNING,
    import_path: tuple[str, ...] = (), seed: int | None = None, result_queue: Any = None,
) -> None:
    """One process of a worker group, as :func:`~.launcher.run_local` starts it: global
    ``rank`` of ``world_size`` (its data shard), ``group`` its place in the group. The leader
    runs a :class:`~.worker.Worker` with ``config``; the others follow. Puts ``(rank,
    stats)`` on ``result_queue`` when done (the leader's worker stats include ``group``)."""
    from chronos.distributed import launcher
    from chronos.distributed.worker import Worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for entry in reversed(import_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    launcher.seed_everything(None if seed is None else seed + rank)
    logging.basicConfig(level=log_level, format=f"[worker {rank}] %(levelname)s %(message)s")
    logging.captureWarnings(True)
    torch.set_num_threads(getattr(config, "num_threads", None) or 1)
    member: GroupMember | None = None
    try:
        problem = launcher.make_problem(spec_str, rank, world_size)
        member = join(problem, group, settings)
        if member.is_leader:
            worker = Worker(problem, config, group=member)
            signal.signal(signal.SIGTERM, lambda s, f: worker.stop())
            final = worker.run(max_iterations=max_iterations)
        else:
            signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
            member.follow()
            final = {"group": member.stats()}
        if result_queue is not None:
            result_queue.put((rank, final))
    except ChronosError as e:
        logging.getLogger("chronos.launcher").error("%s", e)
        raise SystemExit(1) from None
    finally:
        if member is not None:
            member.stop()
            member.group.close()
    launcher.exit_fast()
