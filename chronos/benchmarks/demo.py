"""``chronos bench regularization``: bilevel regularization, end to end on real data.

(This was the first ``chronos demo``; the demo is now the headline comparison,
:mod:`chronos.benchmarks.headline`.)

Fits an L2-regularized multinomial logistic regression on scikit-learn's digits through
:meth:`~chronos.core.InnerProblem.solve` for a small grid of regularization strengths, with a
progress bar, and prints validation / test accuracy before training and after each solve.
Then it *learns* one L2 strength per input feature (64) by hypergradient descent:
implicit differentiation with conjugate gradient
(:class:`~chronos.solver.ImplicitDifferentiation`) on the validation loss, printing the outer
loss at every outer step and the learned model's validation / test accuracy next to the best
fixed strength of the grid.

Run:  ``chronos bench regularization``  (or ``python -m chronos.benchmarks.demo``)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from chronos.benchmarks.problems import LogisticRegressionProblem, digits_weight_decay
from chronos.solver import ImplicitDifferentiation

__all__ = ["grid_search", "learn_strengths", "main"]

DEFAULT_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _progress(total: int, desc: str, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=quiet, file=sys.stderr,
                dynamic_ncols=True)


def _ticker(bar: Any) -> Callable[[int, float], None]:
    """A ``solve`` callback that advances ``bar`` by one step."""

    def tick(_step: int, _loss: float) -> None:
        bar.update(1)

    return tick


def grid_search(
    problem: LogisticRegressionProblem,
    grid: tuple[float, ...] = DEFAULT_GRID,
    num_steps: int = 100,
    quiet: bool = False,
) -> list[dict[str, float]]:
    """Solve the inner problem for each strength in ``grid``; return one row per strength."""
    rows = []
    for strength in grid:
        outer = {"log_decay": torch.full_like(problem.default_outer_params()["log_decay"],
                                              math.log(strength))}
        bar = _progress(num_steps, f"strength {strength:g}", quiet)
        try:
            theta, traj = problem.solve(outer, num_steps=num_steps, callback=_ticker(bar))
        finally:
            bar.close()
        rows.append({
            "strength": strength,
            "inner_steps": traj.num_steps,
            "inner_loss": traj.losses[-1] if traj.losses else float("nan"),
            "val_loss": float(problem.outer_loss(theta, outer)),
            "val_acc": problem.accuracy(theta, "val"),
            "test_acc": problem.accuracy(theta, "test"),
            "seconds": traj.wall_time,
        })
    return rows


def learn_strengths(
    problem: LogisticRegressionProblem,
    outer_steps: int = 20,
    outer_lr: float = 30.0,
    num_steps: int = 100,
    report: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Hypergradient descent on the per-feature log L2 strengths λ (implicit CG, SGD).

    Each outer step re-solves the inner problem for the current λ (L-BFGS, warm-started from
    the previous θ), computes ``dF/dλ`` of the validation loss by implicit differentiation
    (CG warm-started from the previous linear solution) and takes one SGD step. Starts from
    the problem's default λ. ``report`` is called with each step's row.
    """
    opt = ImplicitDifferentiation(problem.default_outer_params(), lr=outer_lr, method="cg",
                                  tol=1e-6, max_iter=300, warm_start=True)
    start = math.exp(float(problem.default_outer_params()["log_decay"].flatten()[0]))
    theta = None
    rows = []
    for step in range(outer_steps):
        theta, traj = problem.solve(opt.outer_params, init_params=theta, num_steps=num_steps)
        hypergradient = opt.compute_hypergradient([traj], problem)
        info = opt.last_info[0]
        row = {"step": step, "val_loss": info.outer_loss, "val_acc": problem.accuracy(theta),
               "cg_iterations": info.iterations, "inner_steps": traj.num_steps}
        rows.append(row)
        if report is not None:
            report(row)
        opt.step(hypergradient)
    learned = {k: v.detach().clone() for k, v in opt.outer_params.items()}
    theta, _ = problem.solve(learned, init_params=theta, num_steps=num_steps)
    strengths = learned["log_decay"].exp()
    return {
        "steps": rows,
        "start_strength": start,
        "val_loss": float(problem.outer_loss(theta, learned)),
        "val_acc": problem.accuracy(theta, "val"),
        "test_acc": problem.accuracy(theta, "test"),
        "min_strength": float(strengths.min()),
        "max_strength": float(strengths.max()),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``chronos bench regularization``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="chronos bench regularization",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="max inner L-BFGS steps")
    parser.add_argument("--seed", type=int, default=0, help="data split seed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--outer-steps", type=int, default=20,
                        help="hypergradient steps on the per-feature strengths (0: skip)")
    parser.add_argument("--outer-lr", type=float, default=30.0,
                        help="SGD step size on the log strengths")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these small problems)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    problem = digits_weight_decay(per_feature=True, seed=args.seed)
    untrained = problem.init_params()
    print(f"digits: {len(problem.x_train)} train / {len(problem.split.x_val)} val / "
          f"{len(problem.split.x_test)} test samples, {problem.split.num_features} features")
    print(f"before training: val acc {problem.accuracy(untrained, 'val'):.3f}, "
          f"test acc {problem.accuracy(untrained, 'test'):.3f}")
    rows = grid_search(problem, num_steps=args.steps, quiet=args.quiet)
    print(f"{'L2 strength':>12} {'steps':>6} {'val loss':>9} {'val acc':>8} {'test acc':>9}")
    for r in rows:
        print(f"{r['strength']:>12g} {r['inner_steps']:>6d} {r['val_loss']:>9.4f} "
              f"{r['val_acc']:>8.3f} {r['test_acc']:>9.3f}")
    best = min(rows, key=lambda r: r["val_loss"])
    print(f"after training: best fixed strength {best['strength']:g} by validation loss: "
          f"val acc {best['val_acc']:.3f}, test acc {best['test_acc']:.3f}")
    if args.outer_steps > 0:
        nf = problem.split.num_features
        print(f"learning {nf} per-feature L2 strengths by hypergradient descent (implicit "
              f"differentiation, CG; SGD lr {args.outer_lr:g}) on the validation loss:")
        print(f"{'outer step':>11} {'val loss':>9} {'val acc':>8} {'CG iters':>9}")

        def report(row: dict[str, float]) -> None:
            print(f"{row['step']:>11d} {row['val_loss']:>9.4f} {row['val_acc']:>8.3f} "
                  f"{row['cg_iterations']:>9d}", flush=True)

        learned = learn_strengths(problem, args.outer_steps, args.outer_lr, args.steps, report)
        print(f"after training (learned strengths {learned['min_strength']:.2g}.."
              f"{learned['max_strength']:.2g}, from {learned['start_strength']:g} each, "
              f"{args.outer_steps} outer steps): val loss {learned['val_loss']:.4f}, "
              f"val acc {learned['val_acc']:.3f}, test acc {learned['test_acc']:.3f}")
        print(f"   vs best fixed strength {best['strength']:g} (grid):  val loss "
              f"{best['val_loss']:.4f}, val acc {best['val_acc']:.3f}, test acc "
              f"{best['test_acc']:.3f}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
