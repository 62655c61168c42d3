"""Module-level code that ``test_group.py`` runs in spawned processes.

A spawned child imports its target by module and name, so targets cannot live in the test
module's closures; pytest puts ``tests/distributed`` on ``sys.path`` and spawned children
inherit the parent's ``sys.path``, so ``import group_targets`` works in both.

Targets return plain Python / numpy values, never torch tensors: a tensor put on a
``multiprocessing`` queue is passed as a shared-memory file descriptor that the receiver
fetches from the sender, which has usually exited by then.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from chronos.benchmarks.problems import digits_weight_decay
from chronos.core import InnerProblem
from chronos.core.errors import ChronosError
from chronos.distributed.group import Group, GroupError, GroupSpec
from chronos.distributed.group_hypergrad import group_hypergradient
from chronos.distributed.inner_sync import SyncPolicy, data_parallel_solve

POLICY_SPECS = ("every_step", "periodic:10", "significance")
CODED = "significance, top-25% codec"  # the exchanged θ_r − θ̄ coded, with error feedback


def to_numpy(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in tensors.items()}


def to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


# -- a hand-built problem with per-sample outer parameters (hyper-cleaning-like) ----------------


def cleaning_problem(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                     rho: float = 1e-2) -> InnerProblem:
    """Softmax regression on rows ``x`` whose per-sample losses are weighted by σ(s_i):

    f(θ, s) = mean_i σ(s_i) CE(x_i W + b, y_i) + ½ ρ (‖W‖² + ‖b‖²),  F(θ) = CE on (x_val, y_val).

    ``s`` has one entry per row of ``x`` (a rank's ``x`` is its shard, so its ``s`` is its slice).
    """
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    xv, yv = torch.from_numpy(x_val), torch.from_numpy(y_val)
    d, c = xt.shape[1], int(max(y.max(), y_val.max())) + 1

    def inner(p: Mapping[str, torch.Tensor], h: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ce = F.cross_entropy(xt @ p["W"] + p["b"], yt, reduction="none")
        ridge = 0.5 * rho * ((p["W"] ** 2).sum() + (p["b"] ** 2).sum())
        return (torch.sigmoid(h["s"]) * ce).mean() + ridge

    def outer(p: Mapping[str, torch.Tensor], h: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(xv @ p["W"] + p["b"], yv)

    init = {"W": torch.zeros(d, c, dtype=xt.dtype), "b": torch.zeros(c, dtype=xt.dtype)}
    return InnerProblem.from_functions(inner, outer, init, optimizer="lbfgs", num_steps=50)


# -- spawn_group targets: ``target(group, *args)`` ----------------------------------------------


def _op_counts(group: Group) -> dict[str, dict[str, int]]:
    return {op: dict(c) for op, c in group.counter.by_op().items()}


def _delta(after: Mapping[str, Mapping[str, int]], before: Mapping[str, Mapping[str, int]],
           op: str, field: str) -> int:
    return after.get(op, {}).get(field, 0) - before.get(op, {}).get(field, 0)


def happy_target(group: Group, theta: Mapping[str, np.ndarray],
                 cleaning: Mapping[str, Any], policy_steps: int) -> dict[str, Any]:
    """Everything the healthy 2-rank group computes, in one spawn (process start-up dominates):
    digits hypergradients (``local``, then ``cg``), the sharded per-sample hypergradient, and
    a data-parallel solve under each sync policy."""
    out: dict[str, Any] = {"rank": group.rank, "world_size": group.world_size, "seconds": {}}
    start = time.monotonic()

    def lap(name: str) -> None:
        nonlocal start
        out["seconds"][name] = time.monotonic() - start
        start = time.monotonic()

    # 1. weight-decay hypergradient on the rank's digits shard, float64, at a fixed θ
    prob = digits_weight_decay(group.rank, group.world_size, dtype=torch.float64)
    lam = prob.default_outer_params()
    th = to_torch(theta)
    out["shard_rows"] = len(prob.x_train)
    lap("load digits")
    for method in ("local", "cg", "pcg"):
        before = _op_counts(group)
        grad, info = group_hypergradient(prob.inner_loss, prob.outer_loss, th, lam, group,
                                         method=method, tol=1e-12, max_iter=500)
        after = _op_counts(group)
        out[method] = {
            "grad": to_numpy(grad),
            "hvp_messages": _delta(after, before, "hvp", "messages_sent"),
            "hvp_sent": _delta(after, before, "hvp", "sent"),
            "mixed_messages": _delta(after, before, "mixed", "messages_sent"),
            "precond_messages": _delta(after, before, "precond", "messages_sent"),
            "collectives": info.collectives,
            "iterations": info.solve.iterations,
            "converged": info.solve.converged,
        }
        lap(f"hypergradient {method}")

    # 2. per-sample outer parameters: this rank's λ["s"] holds only its own samples
    c = cleaning
    shard_prob = cleaning_problem(c["x"][group.rank], c["y"][group.rank], c["x_val"], c["y_val"])
    s_mine = torch.from_numpy(np.array(c["s"][group.rank]))
    before = _op_counts(group)
    grad, info = group_hypergradient(shard_prob.inner_loss, shard_prob.outer_loss,
                                     to_torch(c["theta"]), {"s": s_mine}, group, method="cg",
                                     tol=1e-12, max_iter=500, sharded_outer=("s",))
    after = _op_counts(group)
    out["sharded"] = {"s": grad["s"].numpy().copy(),
                      "mixed_messages": _delta(after, before, "mixed", "messages_sent"),
            "precond_messages": _delta(after, before, "precond", "messages_sent"),
                      "collectives": info.collectives}
    lap("sharded hypergradient")

    # 3. the data-parallel inner solve under each policy, float32
    prob32 = digits_weight_decay(group.rank, group.world_size)
    lam32 = prob32.default_outer_params()
    out["policies"] = {}
    for spec in (*POLICY_SPECS, CODED):
        before = _op_counts(group)
        policy = (SyncPolicy.parse("significance", codec="topk:0.25") if spec == CODED
                  else SyncPolicy.parse(spec))
        theta_p, sync = data_parallel_solve(prob32, lam32, group, policy,
                                            num_steps=policy_steps,
                                            optimizer=prob32.group_optimizer,
                                            lr=prob32.group_inner_lr)
        after = _op_counts(group)
        ops = set(after) | set(before)
        out["policies"][spec] = {
            "theta": to_numpy(theta_p),
            "test_accuracy": prob32.accuracy(theta_p, "test"),
            "sent": sum(_delta(after, before, op, "sent") for op in ops),
            "by_op_sent": {op: _delta(after, before, op, "sent") for op in ops},
            "steps": sync.steps,
            "syncs": sync.syncs,
            "final_loss": sync.final_loss,
        }
        lap(f"solve {spec}")
    out["param_bytes"] = sum(v.nbytes for v in prob32.init_params().values())
    return out


def idle_target(group: Group) -> int:
    return group.rank


def tensor_target(group: Group) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), float(group.rank))}


def dying_target(group: Group, die_after: int) -> int:
    """Rank 1 exits hard after ``die_after`` all-reduces; rank 0 keeps all-reducing. The
    GroupError that rank 0 raises carries how long its failing call took."""
    done = 0
    while True:
        if group.rank == 1 and done == die_after:
            os._exit(3)
        start = time.monotonic()
        try:
            group.all_reduce_mean({"x": torch.ones(8)}, op="beat")
        except GroupError as e:
            raise GroupError(f"{e} [after {done} all-reduces; failing call took "
                             f"{time.monotonic() - start:.3f} s]") from None
        done += 1
        if done > 100_000:  # never: rank 1 dies after a few
            return done


# -- a minimal runner of our own, for groups spawn_group cannot build ---------------------------


def env_join_target(env: Mapping[str, str], timeout: float) -> dict[str, Any]:
    """What torchrun would do: read the rank's spec from the environment, join, communicate."""
    spec = GroupSpec.from_env(env, timeout=timeout)
    start = time.monotonic()
    with Group(spec, fingerprint="same on every rank") as g:
        joined = time.monotonic() - start
        r, w = g.rank, g.world_size
        mean = g.all_reduce_mean({"r": torch.tensor([float(r), 1.0])}, op="mean")["r"]
        peak = g.all_reduce_max(float(10 * r), op="max")
        bcast = g.broadcast(torch.full((5,), float(r), dtype=torch.float64), op="bcast",
                            src=w - 1)
        gathered = g.all_gather(torch.tensor([r, 7 * r], dtype=torch.int64), op="gather")
        return {
            "spec": (spec.rank, spec.world_size, spec.port, spec.host, spec.local_rank,
                     spec.timeout),
            "group": (r, w),
            "joined_s": joined,
            "mean": mean.tolist(),
            "max": peak,
            "broadcast": bcast.tolist(),
            "gathered": [t.tolist() for t in gathered],
            "by_op": {op: dict(c) for op, c in g.counter.by_op().items()},
            "bytes": g.bytes(),
        }


def _child(fn: Callable[..., Any], rank: int, args: tuple[Any, ...], results: Any) -> None:
    torch.set_num_threads(1)
    start = time.monotonic()
    try:
        value = fn(*args)
        results.put((rank, True, value, time.monotonic() - start))
    except BaseException as e:
        text = (f"{type(e).__name__}: {e}" if isinstance(e, ChronosError)
                else f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
        results.put((rank, False, text, time.monotonic() - start))


def run_ranks(fn: Callable[..., Any], per_rank: Sequence[tuple[Any, ...]],
              timeout: float) -> dict[int, tuple[bool, Any, float]]:
    """Run ``fn(*per_rank[r])`` in one spawned process per rank; ``{rank: (ok, value or error
    text, seconds in fn)}`` for every rank that reported within ``timeout``. Every process is
    gone when this returns (killed after ``timeout``)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, r, tuple(a), results), daemon=True)
             for r, a in enumerate(per_rank)]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any, float]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < len(procs) and time.monotonic() < deadline:
            try:
                rank, ok, value, seconds = results.get(
                    timeout=max(0.01, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
                continue
            got[rank] = (ok, value, seconds)
    finally:
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5.0)
        results.close()
    return got
