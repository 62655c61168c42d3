"""Hybrid state benchmark: worker groups on MNIST-5k, ``every_step`` vs ``significance`` vs
``periodic`` inner synchronization, every byte counted on both channels.

Each row is a real job, ``chronos run --workers G --group-size G --mode sync``: one coordinator
(ZeroMQ, λ) and one worker group of ``G`` processes (gloo on 127.0.0.1, θ) that solves the inner
problem over the union of its shards and computes the distributed-CG hypergradient. Models:
softmax regression with a per-pixel weight decay (7,850 parameters, 31 kB) and a
784 → 64 → 10 MLP with a per-layer weight decay (50,890 parameters, 204 kB), on 2,000 training
digits (the group's shards), 1,000 validation and 2,000 test digits. Every policy runs the same
outer steps, inner steps per step and seeds; the rows differ only in when the ranks exchange θ.

Columns: collective payload bytes (all ranks, sent; split into the inner synchronization —
``grad``/``params``/``decision`` — and the hypergradient's ``hvp``/``mixed``), ZeroMQ bytes
(both directions), wall time of the whole job and of the group's rounds (the leader's solve +
hypergradient seconds: the job without process start-up), final test accuracy of the group's
θ, and synchronizations. Ratios are against ``every_step`` of the same model and group size,
medians of ``--repeats`` interleaved runs.

The policy only changes the inner solves, so their wall time (the leader's solve seconds) is
reported apart from the hypergradient's, which every row shares (distributed CG, warm-started,
at most ``--max-iter`` iterations). A second part compares the group hypergradients:
distributed CG against the single-process hypergradient on the union of the shards (float64,
digits), and CG preconditioned by the local Hessians (``pcg``) and the one-all-reduce
``local`` method against distributed CG (float32, MNIST, from a cold start to the float32
tolerance): relative error, iterations, all-reduces, bytes, seconds.

Run: ``python -m chronos.benchmarks.hybrid`` (about 20 minutes on 2 cores; ``--quick``: a
smoke run). Writes ``results/hybrid.json``; ``python -m chronos.benchmarks.report`` puts the
rows into the README.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chronos.benchmarks.staleness import jsonable, machine_info
from chronos.core import tensordict as td
from chronos.distributed.group_hypergrad import METHODS

__all__ = ["MODELS", "POLICIES", "hypergradient_part", "main", "run_row", "summarize"]

MODELS = {
    "logistic": "chronos.benchmarks.problems:mnist_logistic_weight_decay",
    "mlp": "chronos.benchmarks.problems:mnist_mlp_weight_decay",
}
POLICIES = ("every_step", "significance", "periodic:10")
"""Default rows; ``--policies`` also takes ``policy+method`` for a group hypergradient other
than ``cg`` (e.g. ``significance+pcg``)."""
SYNC_OPS = ("grad", "params", "decision")
HYPER_OPS = ("hvp", "mixed", "precond")


def split_config(label: str) -> tuple[str, str]:
    """``"significance+pcg"`` → ``("significance", "pcg")``; no ``+``: distributed CG."""
    policy, _, method = label.partition("+")
    return policy, method or "cg"


def run_row(model: str, group_size: int, policy: str, *, steps: int, inner_steps: int,
            max_iter: int, seed: int) -> dict[str, Any]:
    """One job (see the module docstring); its figures. ``policy``: a row label, see
    :func:`split_config`."""
    from chronos.distributed.launcher import RunConfig, run_local

    sync, method = split_config(policy)
    cfg = RunConfig(problem=MODELS[model], workers=group_size, group_size=group_size,
                    mode="sync", max_steps=steps, inner_steps=inner_steps, sync=sync,
                    group_hypergradient=method, seed=seed, timeout=900.0,
                    worker_options={"max_iter": max_iter})
    cpu0 = _children_cpu()
    result = run_local(cfg)
    cpu = _children_cpu() - cpu0
    if not result.completed:
        raise RuntimeError(f"{model} G={group_size} {policy}: the job did not complete "
                           f"(version {result.version}/{steps}, exit codes "
                           f"{list(result.worker_exitcodes)})")
    by = result.bytes_by_op()
    coll = by.get("collective", {})
    zmq = by["coordinator"]
    leader = result.worker_stats.get("worker-0", {})
    group = leader.get("group", {})

    def sent(ops: Sequence[str] | None) -> int:
        return sum(c["sent"] for op, c in coll.items() if ops is None or op in ops)

    return {
        "model": model, "group_size": group_size, "policy": policy,
        "collective_bytes": sent(None), "sync_bytes": sent(SYNC_OPS),
        "hypergradient_bytes": sent(HYPER_OPS),
        "collective_messages": sum(c["messages_sent"] for c in coll.values()),
        "zmq_bytes": sum(c["sent"] + c["received"] for c in zmq.values()),
        "wall_s": result.wall_time,
        "solve_s": float(leader.get("solve_seconds", math.nan)),
        "hypergradient_s": float(leader.get("hypergrad_seconds", math.nan)),
        "rounds_s": float(leader.get("solve_seconds", math.nan))
        + float(leader.get("hypergrad_seconds", math.nan)),
        "cpu_s": cpu,
        "test_accuracy": group.get("test_accuracy", math.nan),
        "syncs": group.get("syncs"), "inner_steps": group.get("inner_steps"),
        "linear_iterations": group.get("linear_iterations"),
        "bytes_by_op": coll,
    }


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of each figure per (model, group size, policy), with ratios against
    ``every_step`` of the same model and group size."""
    keys = sorted({(r["model"], r["group_size"], r["policy"]) for r in runs},
                  key=lambda k: (k[0], k[1], POLICIES.index(k[2]) if k[2] in POLICIES else 9))
    rows = []
    for model, g, policy in keys:
        mine = [r for r in runs if (r["model"], r["group_size"], r["policy"]) == (model, g, policy)]
        row: dict[str, Any] = {"model": model, "group_size": g, "policy": policy,
                               "repeats": len(mine)}
        for f in ("collective_bytes", "sync_bytes", "hypergradient_bytes", "collective_messages",
                  "zmq_bytes", "wall_s", "rounds_s", "solve_s", "hypergradient_s", "cpu_s",
                  "test_accuracy", "syncs",
                  "inner_steps", "linear_iterations"):
            vals = [float(r[f]) for r in mine if isinstance(r.get(f), (int, float))]
            row[f] = statistics.median(vals) if vals else math.nan
        rows.append(row)
    for row in rows:
        base = next((b for b in rows if b["model"] == row["model"]
                     and b["group_size"] == row["group_size"] and b["policy"] == "every_step"),
                    None)
        if base is None:
            continue
        for f, name in (("collective_bytes", "bytes_ratio"), ("sync_bytes", "sync_bytes_ratio"),
                        ("wall_s", "wall_ratio"), ("rounds_s", "rounds_ratio"),
                        ("solve_s", "solve_ratio")):
            row[name] = row[f] / base[f] if base[f] else math.nan
        row["accuracy_delta_points"] = 100.0 * (row["test_accuracy"] - base["test_accuracy"])
    return rows


# -- hypergradient part ---------------------------------------------------------------------------


def _exact_target(group: Any, seed: int) -> dict[str, Any]:
    """Rank side of the float64 check: distributed CG at a fixed θ and λ."""
    from chronos.benchmarks.problems import digits_weight_decay
    from chronos.distributed.group_hypergrad import group_hypergradient

    torch.manual_seed(seed)
    prob = digits_weight_decay(group.rank, group.world_size, dtype=torch.float64)
    union = digits_weight_decay(0, 1, dtype=torch.float64)
    lam = prob.default_outer_params()
    theta, _ = union.solve(lam, num_steps=100)  # every rank: the same θ
    grad, info = group_hypergradient(prob.inner_loss, prob.outer_loss, theta, lam, group,
                                     tol=1e-13, max_iter=1000)
    return {"grad": grad["log_decay"].tolist(), "iterations": info.solve.iterations}


def _local_vs_cg_target(group: Any, model: str, inner_steps: int) -> dict[str, Any]:
    """Rank side of the float32 comparison on MNIST: θ from an every_step solve, then both
    methods from a cold start."""
    from chronos.distributed.group_hypergrad import group_hypergradient
    from chronos.distributed.group_worker import group_optimizer
    from chronos.distributed.inner_sync import SyncPolicy, data_parallel_solve
    from chronos.distributed.launcher import load_factory

    prob = load_factory(MODELS[model])(group.rank, group.world_size)
    lam = prob.default_outer_params()  # type: ignore[attr-defined]
    opt, lr = group_optimizer(prob)
    damping = float(getattr(prob, "hypergradient_damping", 0.0))
    theta, _ = data_parallel_solve(prob, lam, group, SyncPolicy.parse("every_step"),
                                   num_steps=inner_steps, optimizer=opt, lr=lr)
    out: dict[str, Any] = {}
    for method in METHODS:
        before = dict(group.counter.by_op())
        t0 = time.perf_counter()
        grad, info = group_hypergradient(prob.inner_loss, prob.outer_loss, theta, lam, group,
                                         method=method, max_iter=1000, damping=damping)
        after = group.counter.by_op()
        out[method] = {
            "grad": td.flatten(grad)[0].tolist(), "seconds": time.perf_counter() - t0,
            "iterations": info.solve.iterations, "collectives": info.collectives,
            "status": info.solve.status,
            "bytes": sum(c["sent"] for c in after.values())
            - sum(c["sent"] for c in before.values()),
        }
    return out


def hypergradient_part(group_sizes: Sequence[int], models: Sequence[str], inner_steps: int,
                       seed: int) -> dict[str, Any]:
    """Distributed CG vs single process (float64) and ``local`` vs distributed CG (float32)."""
    from chronos.benchmarks.problems import digits_weight_decay
    from chronos.distributed.group import spawn_group
    from chronos.solver import implicit_hypergradient

    union = digits_weight_decay(0, 1, dtype=torch.float64)
    lam = union.default_outer_params()
    theta, _ = union.solve(lam, num_steps=100)
    ref = implicit_hypergradient(union.inner_loss, union.outer_loss, theta, lam, tol=1e-13,
                                 max_iter=1000)
    assert isinstance(ref, dict)
    exact = spawn_group(_exact_target, 2, [(seed,)] * 2, timeout=300)
    r = ref["log_decay"]
    errs = [float((torch.tensor(e["grad"], dtype=torch.float64) - r).norm() / r.norm())
            for e in exact]
    out: dict[str, Any] = {"exact_vs_single_process": {
        "group_size": 2, "relative_error": max(errs), "iterations": exact[0]["iterations"]}}
    rows = []
    for model in models:
        for g in group_sizes:
            res = spawn_group(_local_vs_cg_target, g, [(model, inner_steps)] * g, timeout=600)[0]
            cg = torch.tensor(res["cg"]["grad"])
            row: dict[str, Any] = {"model": model, "group_size": g}
            for m in METHODS:
                other = torch.tensor(res[m]["grad"])
                row[f"{m}_relative_error"] = float((other - cg).norm() / cg.norm())
                row[f"{m}_cosine"] = float(torch.dot(other, cg) / (other.norm() * cg.norm()))
                row.update({f"{m}_{k}": res[m][k] for k in
                            ("seconds", "iterations", "collectives", "bytes", "status")})
            row["relative_error"], row["cosine"] = row["local_relative_error"], row["local_cosine"]
            rows.append(row)
    out["local_vs_cg"] = rows
    return out


# -- output -------------------------------------------------------------------------------------


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The terminal table of :func:`summarize`'s rows."""
    head = (f"{'model':9} {'G':>2} {'policy':16} {'coll. MB':>9} {'ratio':>6} {'sync ratio':>10} "
            f"{'zmq kB':>7} {'wall s':>7} {'ratio':>6} {'solves s':>8} {'ratio':>6} "
            f"{'hypergr s':>9} "
            f"{'test acc':>8} {'Δ pts':>6} {'syncs':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:9} {r['group_size']:>2} {r['policy']:16} "
            f"{_fmt(r['collective_bytes'] / 1e6, '9.2f')} {_fmt(r.get('bytes_ratio'), '6.3f')} "
            f"{_fmt(r.get('sync_bytes_ratio'), '10.3f')} {_fmt(r['zmq_bytes'] / 1e3, '7.1f')} "
            f"{_fmt(r['wall_s'], '7.1f')} {_fmt(r.get('wall_ratio'), '6.3f')} "
            f"{_fmt(r['solve_s'], '8.1f')} {_fmt(r.get('solve_ratio'), '6.3f')} "
            f"{_fmt(r['hypergradient_s'], '9.1f')} "
            f"{_fmt(100 * r['test_accuracy'], '8.2f')} "
            f"{_fmt(r.get('accuracy_delta_points'), '6.2f')} {_fmt(r['syncs'], '6.0f')}")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chronos.benchmarks.hybrid",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (a few minutes)")
    p.add_argument("--models", default="logistic,mlp", help="comma-separated: logistic, mlp")
    p.add_argument("--group-sizes", type=_ints, default=None, help="default 2,4 (quick: 2)")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="comma-separated rows: a sync policy, +pcg or +local for another group "
                        f"hypergradient (default {','.join(POLICIES)})")
    p.add_argument("--steps", type=int, default=None, help="outer steps per job (default 8)")
    p.add_argument("--inner-steps", type=int, default=50, help="inner steps per outer step")
    p.add_argument("--max-iter", type=int, default=50,
                   help="iterations of each hypergradient's linear solve (warm-started)")
    p.add_argument("--repeats", type=int, default=None, help="runs per row (default 3; quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hypergradient", action="store_true")
    p.add_argument("--out", type=Path, default=Path("results/hybrid.json"))
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - set(MODELS):
        p.error(f"--models: choose from {', '.join(MODELS)}")
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    if "every_step" not in policies:
        p.error("--policies must include every_step (the baseline of every ratio)")
    from chronos.core.errors import ChronosError
    from chronos.distributed.inner_sync import SyncPolicy

    try:
        for pol in policies:
            SyncPolicy.parse(split_config(pol)[0])
            if split_config(pol)[1] not in METHODS:
                raise ChronosError(f"{pol!r}: the method after '+' must be one of {METHODS}")
    except ChronosError as e:
        p.error(str(e))
    sizes = args.group_sizes or ([2] if args.quick else [2, 4])
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (3 if args.quick else 8)
    for name, v in (("--repeats", repeats), ("--steps", steps), ("--inner-steps", args.inner_steps),
                    ("--max-iter", args.max_iter)):
        if v < 1:
            p.error(f"{name} must be >= 1")
    torch.set_num_threads(1)
    result: dict[str, Any] = {"machine": machine_info(), "params": {
        "quick": args.quick, "models": models, "group_sizes": sizes, "policies": policies,
        "steps": steps, "inner_steps": args.inner_steps, "max_iter": args.max_iter,
        "repeats": repeats, "seed": args.seed}, "runs": []}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(jsonable(result), indent=2))

    jobs = [(m, g, pol) for m in models for g in sizes for pol in policies]
    total = len(jobs) * repeats
    t0 = time.perf_counter()
    done = 0
    for rep in range(repeats):  # interleaved: each repeat runs every row once
        for model, g, pol in jobs:
            row = run_row(model, g, pol, steps=steps, inner_steps=args.inner_steps,
                          max_iter=args.max_iter, seed=args.seed)
            row["repeat"] = rep
            result["runs"].append(row)
            done += 1
            print(f"[{time.perf_counter() - t0:6.0f}s] {done}/{total} {model} G={g} {pol}: "
                  f"collective {row['collective_bytes'] / 1e6:.2f} MB, wall {row['wall_s']:.1f} s"
                  f", solves {row['solve_s']:.1f} s + hypergradients "
                  f"{row['hypergradient_s']:.1f} s, test accuracy "
                  f"{100 * row['test_accuracy']:.2f}%", flush=True)
            result["rows"] = summarize(result["runs"])
            save()
    print()
    print(table(result["rows"]))
    if not args.skip_hypergradient:
        print("\nhypergradients: distributed CG vs one process (float64), local vs CG ...",
              flush=True)
        hg = hypergradient_part(sizes, models, args.inner_steps * steps, args.seed)
        result["hypergradient"] = hg
        save()
        ex = hg["exact_vs_single_process"]
        print(f"distributed CG (2 ranks) vs single-process CG on the union, float64: relative "
              f"error {ex['relative_error']:.2e}")
        for r in hg["local_vs_cg"]:
            for m in METHODS:
                print(f"{r['model']:9} G={r['group_size']} {m:5}: {r[m + '_iterations']:4d} "
                      f"iterations ({r[m + '_status']}), {r[m + '_collectives']:4d} all-reduces, "
                      f"{r[m + '_bytes'] / 1e6:7.2f} MB, {r[m + '_seconds']:6.2f} s, relative "
                      f"error vs cg {r[m + '_relative_error']:.2e}")
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
