"""Every shard counts: sync vs three async policies, one worker 3× slower, shards that differ.

Four workers, each owning a shard that wants a different λ; one worker (the one whose shard
differs most) is about 3× slower than the others. Rows, measured side by side in one run:

* ``sync``: the barrier baseline (every step averages all four shards' fresh hypergradients);
* ``async reject``: ``aggregation="buffered"`` with ``max_staleness=2`` under the window 3 (the
  seed's pair, the configuration the issue measured): most of the slow worker's commits are too
  stale and rejected;
* ``async decay-only``: ``aggregation="buffered"`` at today's window 3 / staleness 4: nothing is
  rejected, but a commit of staleness ``s`` counts ``0.5 ** s``;
* ``async aggregated``: the defaults, ``aggregation="latest"``: every step averages each live
  worker's latest hypergradient (:mod:`chronos.distributed.latest`).

Columns: time to target on the all-shard validation loss (the mean of the shards' validation
losses, ``F̄(λ) = (1/N) Σ_k F_k(λ)``; target: 90% of the way from ``F̄(λ₀)`` to ``F̄`` at the
sync fixed point, reached and kept to the end of the run), that time over sync's, the
distance of the final λ from the sync fixed point, each worker's share of the outer updates
(``stats()["workers"]``), how much of the slow worker's work was lost (commits rejected plus
leases cancelled), bytes on the wire, and CPU seconds (all processes).

Problems:

* ``ridge``: :func:`~chronos.benchmarks.problems.digits_ridge_noisy_shards` (scalar log decay;
  shard ``k`` has target noise ``4k/3``). Each shard's hypergradient is exact in closed form,
  so the sync fixed point (the root of ``Σ_k g_k``) and ``F̄`` are exact.
* ``digits``: :func:`~chronos.benchmarks.problems.digits_weight_decay_by_class` (64 per-feature
  log decays, digits sharded by class, each shard validated on its own classes). The sync
  fixed point is the final λ of the sync runs (median over repeats); ``F̄`` is evaluated by
  solving each shard's inner problem at the traced λ.

Two harnesses:

* ``simulated`` (ridge only): the pure :class:`~chronos.distributed.state.CoordinatorState`
  driven by a discrete-event simulation with an injected clock and the closed-form
  hypergradients: compute 1 s per hypergradient (±5%), 3 s for the slow worker; exact and
  repeatable.
* ``processes``: ``chronos run``'s launcher (:func:`~chronos.distributed.launcher.run_local`),
  a real coordinator and 4 worker processes on 127.0.0.1 solving the inner problems. Every
  worker waits an injected 0.4 s per iteration on top of its compute, and the slow one
  ``3 · (0.4 + o) − o``, with ``o`` the compute of an iteration measured by a calibration run
  of equally fast workers first; the measured ratio of the slow worker's work per iteration
  (solve, delay, hypergradient; waiting for a checkout not counted) to the others' is printed
  with each table. The delay
  stands in for compute a real cluster would run in parallel: 4 compute-bound processes on 2
  cores cannot gain anything from asynchrony. Times are from the moment all four workers had
  registered (start-up excluded; it is the same for every row). λ is traced every 0.2 s (on
  digits, ``F̄`` is evaluated at about 40 points of each run).

Run: ``python -m chronos.benchmarks.staleness`` (``--quick`` for a smoke run, ``--parts``,
``--repeats``); writes ``results/staleness.json`` after every row.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import os
import random
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chronos.benchmarks.problems import (
    LogisticRegressionProblem,
    RidgeProblem,
    digits_ridge_noisy_shards,
    digits_weight_decay_by_class,
)
from chronos.core.errors import ChronosError
from chronos.core.tensordict import TensorDict
from chronos.distributed.aggregation import CoordinatorConfig, WindowStalenessWarning
from chronos.distributed.launcher import RunConfig, run_local
from chronos.distributed.messages import (
    Checkout,
    CheckoutReply,
    Commit,
    CommitReply,
    LeaseCancelled,
    Register,
)
from chronos.distributed.state import CoordinatorState, Outgoing

__all__ = ["POLICIES", "Policy", "SimRun", "find_root", "jsonable", "machine_info", "main",
           "simulate"]

WORKERS = 4
SLOW = 3.0  # the slow worker's compute time over the others'
RIDGE = "chronos.benchmarks.problems:digits_ridge_noisy_shards"
DIGITS = "chronos.benchmarks.problems:digits_weight_decay_by_class"


@dataclass(frozen=True)
class Policy:
    """A row: the coordinator settings it runs with."""

    name: str
    config: dict[str, Any]

    def coordinator_config(self, **extra: Any) -> CoordinatorConfig:
        with warnings.catch_warnings():  # "async reject" pairs window 3 with staleness 2
            warnings.simplefilter("ignore", WindowStalenessWarning)
            return CoordinatorConfig(**(self.config | extra))


POLICIES = (
    Policy("sync", {"mode": "sync", "num_workers": WORKERS}),
    Policy("async reject", {"aggregation": "buffered", "max_in_flight": 3, "max_staleness": 2}),
    Policy("async decay-only", {"aggregation": "buffered"}),
    Policy("async aggregated", {}),
)


def find_root(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-10) -> float:
    """A root of ``f`` in ``[lo, hi]`` (``f(lo)`` and ``f(hi)`` of opposite signs) by bisection.

    Example:
        >>> round(find_root(lambda x: x * x - 2.0, 0.0, 2.0), 9)
        1.414213562
    """
    flo = f(lo)
    if flo * f(hi) > 0:
        raise ChronosError(f"f does not change sign on [{lo}, {hi}]")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        fm = f(mid)
        if (fm <= 0) == (flo <= 0):
            lo, flo = mid, fm
        else:
            hi = mid
    return 0.5 * (lo + hi)


# -- discrete-event simulation of the pure state machine ------------------------------------------


@dataclass
class SimRun:
    """One simulated run: λ after every outer step ``(time, version, λ)``, the coordinator's
    final stats and the hypergradients each worker computed."""

    trajectory: list[tuple[float, int, TensorDict]]
    stats: dict[str, Any]
    computed: dict[str, int] = field(default_factory=dict)

    @property
    def final(self) -> TensorDict:
        return self.trajectory[-1][2]


def simulate(
    config: CoordinatorConfig,
    outer_params: TensorDict,
    gradients: Sequence[Callable[[TensorDict], TensorDict]],
    durations: Sequence[float],
    *,
    until: float,
    jitter: float = 0.05,
    seed: int = 0,
) -> SimRun:
    """Drive :class:`CoordinatorState` with ``len(gradients)`` simulated workers until time
    ``until``: worker ``k`` checks out, computes ``gradients[k](λ)`` in ``durations[k] · (1 ±
    jitter)`` seconds (seeded), commits, and checks out again; it abandons work whose lease is
    cancelled. Messages arrive instantly. Pure and repeatable.

    Example (two equally fast workers whose shards pull λ towards 1 and 3):
        >>> import torch
        >>> g = lambda c: (lambda lam: {"x": lam["x"] - c})
        >>> cfg = CoordinatorConfig(optimizer="sgd", outer_lr=0.5)
        >>> run = simulate(cfg, {"x": torch.zeros(1, dtype=torch.float64)}, [g(1.0), g(3.0)],
        ...                [1.0, 1.0], until=40.0)
        >>> round(run.final["x"].item(), 6)
        2.0
    """
    if len(gradients) != len(durations) or not gradients:
        raise ChronosError("need one duration per gradient function, and at least one")
    rng = random.Random(seed)
    state = CoordinatorState(outer_params, config)
    names = [f"worker-{k}" for k in range(len(gradients))]
    events: list[tuple[float, int, str, int]] = []  # (time, seq, worker, token)
    seq, rids = itertools.count(), itertools.count(1)
    lease: dict[str, tuple[int, int, TensorDict]] = {}  # worker -> (version, rid, λ)
    token: dict[str, int] = dict.fromkeys(names, 0)
    asked: dict[str, int] = {}
    computed = dict.fromkeys(names, 0)
    trajectory: list[tuple[float, int, TensorDict]] = [(0.0, 0, state.outer_params)]

    def deliver(out: list[Outgoing], now: float) -> None:
        for o in out:
            m, w = o.message, o.to
            if isinstance(m, CheckoutReply) and m.status == "granted":
                if asked.get(w) != m.request_id:
                    continue
                token[w] += 1
                lease[w] = (m.version, m.request_id, dict(m.outer_params))
                k = names.index(w)
                dur = durations[k] * (1.0 + rng.uniform(-jitter, jitter))
                heapq.heappush(events, (now + dur, next(seq), w, token[w]))
            elif isinstance(m, LeaseCancelled) and w in lease and lease[w][1] == m.request_id:
                del lease[w]
                token[w] += 1  # the pending completion is void
                checkout(w, now)

    def checkout(w: str, now: float) -> None:
        asked[w] = next(rids)
        deliver(state.handle(w, Checkout(request_id=asked[w], worker_id=w), now), now)

    def record(now: float) -> None:
        if state.version != trajectory[-1][1]:
            trajectory.append((now, state.version, state.outer_params))

    for w in names:
        state.handle(w, Register(request_id=next(rids), worker_id=w), 0.0)
    for w in names:
        checkout(w, 0.0)
    while events and events[0][0] <= until and not state.done:
        now, _, w, tok = heapq.heappop(events)
        if tok != token[w] or w not in lease:
            continue
        version, _rid, lam = lease.pop(w)
        grad = gradients[names.index(w)](lam)
        computed[w] += 1
        out = state.handle(w, Commit(request_id=next(rids), worker_id=w, version=version,
                                     commit_id=f"{w}-{computed[w]}", hypergradient=grad), now)
        assert isinstance(out[0].message, CommitReply), out[0].message
        deliver(out[1:], now)
        record(now)
        checkout(w, now)
        record(now)
    return SimRun(trajectory, state.stats(), computed)


# -- problems -------------------------------------------------------------------------------------


def ridge_shards(workers: int = WORKERS) -> list[RidgeProblem]:
    """The heterogeneous ridge's shards (in this process; exact hypergradients)."""
    return [digits_ridge_noisy_shards(k, workers) for k in range(workers)]


def ridge_fixed_point(shards: Sequence[RidgeProblem]) -> float:
    """The sync fixed point: the root of ``Σ_k g_k(λ)``, exactly."""
    return find_root(lambda x: sum(p.closed_form_hypergradient(x) for p in shards), -6.0, 6.0)


def ridge_loss(shards: Sequence[RidgeProblem], lam: float) -> float:
    """``F̄(λ)``: the mean of the shards' validation losses at their exact inner optima."""
    return sum(p.validation_loss(lam) for p in shards) / len(shards)


def _scalar(lam: TensorDict) -> float:
    return float(lam["log_decay"])


def time_to_target(trace: Sequence[tuple[float, float]], target: float) -> float:
    """The first time from which the traced loss stays <= ``target`` to the end of the trace
    (``nan`` if it is above at the end). A run that passes through the target on its way to a
    wrong point, as λ does here when it drifts towards the fast shards' optimum, never
    reaches it.

    Example:
        >>> time_to_target([(0, 5.0), (1, 0.5), (2, 2.0), (3, 0.9), (4, 0.2)], 1.0)
        3
        >>> time_to_target([(0, 5.0), (1, 0.5), (2, 2.0)], 1.0)
        nan
    """
    reached = math.nan
    for t, loss in trace:
        if loss > target:
            reached = math.nan
        elif math.isnan(reached):
            reached = t
    return reached


# -- harness 1: simulation ------------------------------------------------------------------------


def simulated_rows(until: float, init: float = 3.0, seed: int = 0) -> dict[str, Any]:
    """Every policy on the heterogeneous ridge, simulated (see the module docstring)."""
    shards = ridge_shards()
    star = ridge_fixed_point(shards)
    f0, fstar = ridge_loss(shards, init), ridge_loss(shards, star)
    target = fstar + 0.1 * (f0 - fstar)

    def grad_fn(p: RidgeProblem) -> Callable[[TensorDict], TensorDict]:
        return lambda lam: {"log_decay": torch.tensor(
            p.closed_form_hypergradient(_scalar(lam)), dtype=torch.float64)}

    lam0 = {"log_decay": torch.tensor(init, dtype=torch.float64)}
    durations = [1.0] * (WORKERS - 1) + [SLOW]
    rows = []
    for policy in POLICIES:
        cfg = policy.coordinator_config(optimizer="sgd", outer_lr=shards[0].default_outer_lr)
        run = simulate(cfg, lam0, [grad_fn(p) for p in shards], durations, until=until,
                       seed=seed)
        trace = [(t, ridge_loss(shards, _scalar(lam))) for t, _v, lam in run.trajectory]
        rows.append({
            "policy": policy.name,
            "time_to_target": time_to_target(trace, target),
            "final_lambda": _scalar(run.final),
            "distance": abs(_scalar(run.final) - star),
            "steps": run.stats["steps"],
            "computed": run.computed,
            "shares": {w: r["share"] for w, r in run.stats["workers"].items()},
            "lost": {w: r["rejected"] + r["cancelled"]
                     for w, r in run.stats["workers"].items()},
        })
    sync_t = rows[0]["time_to_target"]
    for r in rows:
        r["time_ratio"] = r["time_to_target"] / sync_t if sync_t > 0 else math.nan
    return {"fixed_point": star, "target_loss": target, "init": init, "until": until,
            "rows": rows}


# -- harness 2: real processes --------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def iteration_overhead(spec: str, delay: float, seed: int) -> float:
    """Seconds of work in a worker iteration beyond its injected ``delay`` (inner solve and
    hypergradient on a CPU shared by four workers), from a short run of four equally fast
    workers."""
    # 40 steps: ~10 iterations per worker, so the first (cold) solve weighs little
    run = run_policy(spec, POLICIES[-1], [delay] * WORKERS, 40, seed, timeout=600.0)
    return max(0.0, statistics.median(run["iteration_s"].values()) - delay)


def run_policy(spec: str, policy: Policy, delays: Sequence[float], max_steps: int,
               seed: int, timeout: float) -> dict[str, Any]:
    """One ``run_local`` job; the λ trace (time from all workers registered), shares, bytes,
    CPU seconds and the measured per-worker iteration times."""
    cfg_kw = dict(policy.config)
    mode = cfg_kw.pop("mode", "async")
    cfg_kw.pop("num_workers", None)
    cfg = RunConfig(problem=spec, workers=WORKERS, mode=mode, max_steps=max_steps, seed=seed,
                    straggler_delay=tuple(delays), timeout=timeout, **cfg_kw)
    trace: list[tuple[float, int, TensorDict]] = []
    ready: list[float] = []

    def progress(s: dict[str, Any]) -> None:
        if not ready and s.get("registrations", 0) >= WORKERS:
            ready.append(s["elapsed_s"])
        if ready:
            trace.append((s["elapsed_s"], int(s["version"]), s["outer_params"]))

    cpu0 = cpu_seconds()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WindowStalenessWarning)
        result = run_local(cfg, progress, progress_interval=0.2, track_outer_params=True)
    cpu = cpu_seconds() - cpu0
    if not result.completed:
        raise ChronosError(f"{policy.name} on {spec} did not finish: exit codes "
                           f"{result.worker_exitcodes}, version {result.version}")
    start = ready[0] if ready else 0.0
    trace.append((result.wall_time, result.version, result.outer_params))
    st = result.stats
    iter_s = {}  # seconds of work (solve, injected delay, hypergradient) per iteration
    for w, ws in result.worker_stats.items():
        n = ws.get("iterations", 0)
        work = ws.get("solve_seconds", 0.0) + ws.get("hypergrad_seconds", 0.0)
        iter_s[w] = work / n if n else math.nan
    return {
        "policy": policy.name,
        "trace": [(t - start, v, lam) for t, v, lam in trace],
        "final": result.outer_params,
        "wall_s": result.wall_time - start,
        "cpu_s": cpu,
        "bytes": int(st["bytes_received"] + st["bytes_sent"]),
        "steps": result.version,
        "workers": st["workers"],
        "iteration_s": iter_s,
    }


class DigitsEvaluator:
    """``F̄(λ)`` on the digits-by-class shards: each shard's inner problem solved at λ from
    scratch (a warm start from a converged point stalls float32 L-BFGS for all its steps), its
    validation loss, averaged."""

    def __init__(self, workers: int = WORKERS) -> None:
        self.shards: list[LogisticRegressionProblem] = [
            digits_weight_decay_by_class(k, workers) for k in range(workers)]

    def __call__(self, lam: TensorDict) -> float:
        total = 0.0
        for p in self.shards:
            theta, _ = p.solve(lam)
            total += float(p.outer_loss(theta, lam))
        return total / len(self.shards)


def _vec(lam: TensorDict) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for _k, v in sorted(lam.items())])


def process_rows(problem: str, repeats: int, seed: int, quick: bool,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Every policy as real processes on ``problem`` ("ridge" or "digits"), ``repeats`` times
    each (rows interleaved), medians."""
    spec = RIDGE if problem == "ridge" else DIGITS
    fast = 0.4
    log(f"  {problem}: calibrating (4 equally fast workers)")
    o = iteration_overhead(spec, fast, seed)
    delays = [fast] * (WORKERS - 1) + [SLOW * (fast + o) - o]
    log(f"  {problem}: {o:.2f} s per iteration besides the delay; delays {fast:.2f} s, slow "
        f"{delays[-1]:.2f} s")
    sync_steps = (6 if quick else 15) if problem == "ridge" else (5 if quick else 12)
    runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in POLICIES}
    for rep in range(repeats):
        for policy in POLICIES:
            steps = sync_steps if policy.name == "sync" else 4 * sync_steps
            log(f"  {problem}: {policy.name} (repeat {rep + 1}/{repeats}, {steps} steps)")
            runs[policy.name].append(run_policy(spec, policy, delays, steps, seed + rep,
                                                timeout=600.0))
    if problem == "ridge":
        shards = ridge_shards()
        star_lam = ridge_fixed_point(shards)
        star = {"log_decay": torch.tensor(star_lam, dtype=torch.float64)}

        def loss(lam: TensorDict) -> float:
            return ridge_loss(shards, _scalar(lam))
    else:
        evaluator = DigitsEvaluator()
        finals = torch.stack([_vec(r["final"]) for r in runs["sync"]])
        star_vec = finals.median(dim=0).values
        star = {"log_decay": star_vec.float()}
        loss = evaluator
    f0 = loss(runs["sync"][0]["trace"][0][2])
    fstar = loss(star)
    target = fstar + 0.1 * (f0 - fstar)
    rows = []
    for policy in POLICIES:
        per = []
        for r in runs[policy.name]:
            # F̄ is exact and cheap on the ridge; on digits each point costs 4 inner solves,
            # so at most ~40 points per run (a resolution of about 1 s)
            stride = 1 if problem == "ridge" else max(1, len(r["trace"]) // 40)
            points = [*r["trace"][::stride], r["trace"][-1]]
            trace = [(t, loss(lam)) for t, _v, lam in points]
            per.append({
                "time_to_target": time_to_target(trace, target),
                "distance": float((_vec(r["final"]) - _vec(star)).norm()),
                "final_loss": trace[-1][1],
                "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "bytes": r["bytes"],
                "steps": r["steps"],
                "shares": {w: x["share"] for w, x in r["workers"].items()},
                "lost": {w: x["rejected"] + x["cancelled"] for w, x in r["workers"].items()},
                "iteration_s": r["iteration_s"],
            })
        rows.append(_median_row(policy.name, per))
    sync_t = rows[0]["time_to_target"]
    for r in rows:
        r["time_ratio"] = r["time_to_target"] / sync_t if sync_t > 0 else math.nan
    return {"problem": spec, "delays": delays, "target_loss": target, "fixed_point_loss": fstar,
            "repeats": repeats, "rows": rows}


def _median(xs: Sequence[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    # a run that never reached the target counts as infinitely slow (nan if most did not)
    if len(finite) * 2 <= len(xs) and len(finite) < len(xs):
        return math.nan
    return float(statistics.median(sorted(xs, key=lambda x: x if math.isfinite(x) else math.inf)))


def _median_row(name: str, per: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"policy": name, "runs": per}
    for key in ("time_to_target", "distance", "final_loss", "wall_s", "cpu_s", "bytes", "steps"):
        out[key] = _median([float(p[key]) for p in per])
    workers = sorted(per[0]["shares"])
    out["shares"] = {w: _median([p["shares"].get(w, 0.0) for p in per]) for w in workers}
    out["lost"] = {w: _median([p["lost"].get(w, 0) for p in per]) for w in workers}
    it = {w: _median([p["iteration_s"].get(w, math.nan) for p in per]) for w in workers}
    out["iteration_s"] = it
    fast = [v for w, v in it.items() if not w.endswith(str(WORKERS - 1))]
    out["slow_ratio"] = it.get(f"worker-{WORKERS - 1}", math.nan) / statistics.median(fast)
    return out


# -- output ---------------------------------------------------------------------------------------


def _fmt(x: float, spec: str) -> str:
    return "—" if not math.isfinite(x) else format(x, spec)


def table(title: str, rows: Sequence[dict[str, Any]], distance: str) -> str:
    """The printed table for one problem."""
    head = (f"{'policy':<17} {'to target':>9} {'× sync':>6} {distance:>9} "
            f"{'shares w0/w1/w2/w3 (w3 slow)':>30} {'w3 lost':>7} {'bytes':>9} {'CPU s':>6}")
    lines = [title, head, "-" * len(head)]
    for r in rows:
        shares = "/".join(f"{100 * s:.0f}%" for s in r["shares"].values())
        lost = list(r["lost"].values())[-1] if r["lost"] else 0
        lines.append(
            f"{r['policy']:<17} {_fmt(r['time_to_target'], '.1f'):>8}s "
            f"{_fmt(r['time_ratio'], '.2f'):>6} {_fmt(r['distance'], '.3f'):>9} "
            f"{shares:>30} {lost:>7.0f} {_fmt(float(r.get('bytes', math.nan)), '.0f'):>9} "
            f"{_fmt(float(r.get('cpu_s', math.nan)), '.1f'):>6}"
        )
    return "\n".join(lines)


def jsonable(x: Any) -> Any:
    """``x`` with tensors as lists and non-finite floats as ``None`` (for ``json.dumps``)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chronos.benchmarks.staleness",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    p.add_argument("--parts", default="simulated,ridge,digits",
                   help="comma-separated: simulated, ridge, digits (default: all)")
    p.add_argument("--repeats", type=int, default=None, help="runs per row (default 3; quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/staleness.json"))
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - {"simulated", "ridge", "digits"})
    if unknown:
        p.error(f"unknown parts {unknown}; choose from simulated, ridge, digits")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        p.error("--repeats must be >= 1")
    torch.set_num_threads(1)
    result: dict[str, Any] = {"machine": machine_info(), "params": {
        "quick": args.quick, "repeats": repeats, "seed": args.seed, "workers": WORKERS,
        "slow": SLOW}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(jsonable(result), indent=2))

    def log(msg: str) -> None:
        print(msg, flush=True)

    if "simulated" in parts:
        sim = simulated_rows(until=60.0 if args.quick else 200.0, seed=args.seed)
        result["simulated"] = sim
        save()
        print(table(f"simulated ridge (pure state machine; compute 1 s, worker 3: {SLOW:g} s; "
                    f"fixed point λ* = {sim['fixed_point']:.4f})", sim["rows"], "|λ − λ*|"))
        print()
    for problem in ("ridge", "digits"):
        if problem not in parts:
            continue
        log(f"{problem}: {len(POLICIES)} policies × {repeats} runs, {WORKERS} worker processes")
        out = process_rows(problem, repeats, args.seed, args.quick, log)
        result[problem] = out
        save()
        ratios = ", ".join(f"{r['policy']} {r['slow_ratio']:.1f}×" for r in out["rows"]
                           if math.isfinite(r["slow_ratio"]))
        print(table(f"{problem} (processes, median of {repeats}; the slow worker's work per "
                    f"iteration over the others': {ratios})", out["rows"], "‖λ − λ*‖"))
        print()
    save()
    print(f"wrote {args.out}")
    return 0


def machine_info() -> dict[str, Any]:
    """CPU, core count, torch and Python versions, and the time: a benchmark JSON's header."""
    import platform

    from chronos.benchmarks.hypergrad import cpu_model

    return {"cpu": cpu_model(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


if __name__ == "__main__":
    sys.exit(main())
