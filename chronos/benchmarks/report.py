"""Write the measured benchmark table into README.md (never typed by hand).

Reads the JSON files the benchmarks wrote under ``results/`` and replaces the part of
README.md between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` with a table of the
measured figures, their targets and whether each is met. A benchmark whose JSON is missing
is listed as "not run".

Run: ``python -m chronos.benchmarks.report`` (``make bench`` runs the benchmarks first).

Example:
    >>> rows = table_rows({"protocol": {"ratios": {"4mb_round_trip_chronos_over_raw": 1.2,
    ...     "throughput_chronos_over_raw": 0.4, "tiny_round_trip_chronos_over_raw": 3.0}}})
    >>> [r[3] for r in rows if r[0].startswith("4 MB")]
    ['yes']
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

__all__ = ["hybrid_rows", "load_rows", "main", "render", "table_rows", "update_readme"]

START, END = "<!-- bench:start -->", "<!-- bench:end -->"

Row = tuple[str, str, str, str, str]  # what, measured, target, met, command


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _row(
    what: str, value: float | None, fmt: Callable[[float], str], target: str,
    ok: Callable[[float], bool] | None, command: str,
) -> Row:
    if value is None:
        return (what, "not run", target, "—", command)
    met = "—" if ok is None else ("yes" if ok(value) else "**no**")
    return (what, fmt(value), target, met, command)


def table_rows(results: dict[str, dict[str, Any]]) -> list[Row]:
    """The table's rows from ``{"hypergrad": json, "scaling": json, "protocol": json}`` (any
    may be absent)."""
    hg = results.get("hypergrad", {})
    pr = results.get("protocol", {})
    hg_cmd = "`python -m chronos.benchmarks.hypergrad`"
    pr_runs = _get(pr, "runs") or {}

    def spread(key: str) -> Callable[[float], str]:
        values = pr_runs.get(key, [])
        if len(values) < 2:
            return lambda v: f"{v:.2f}"
        lo, hi = min(values), max(values)
        return lambda v: f"{v:.2f} (median of {len(values)} runs: {lo:.2f}–{hi:.2f})"

    pr_cmd = "`python -m chronos.benchmarks.protocol`"
    per_it = _get(hg, "per_iteration", "ratio_to_floor") or {}
    topt_it = per_it.get("torchopt")
    topt_it_txt = f" (TorchOpt: {topt_it:.2f})" if topt_it is not None else ""
    cmp = _get(hg, "comparison") or {}
    iters = cmp.get("iterations") or {}

    def with_iters(*names: str) -> Callable[[float], str]:
        counts = ", ".join(f"{n.replace('chronos_', '')} {iters[n]}" for n in names if n in iters)
        return lambda v: f"{v:.2f}" + (f" (CG iterations: {counts})" if counts else "")

    reused = cmp.get("ratio_kfac_reused_over_torchopt")
    plain = cmp.get("ratio_chronos_over_torchopt")
    extra = "; ".join(x for x in (
        f"factors reused {reused:.2f}" if reused is not None else "",
        f"no preconditioner {plain:.2f}" if plain is not None else "") if x)
    return [
        _row("Per CG iteration, Chronos / hand-written exact HVP floor (MNIST-shaped)",
             per_it.get("chronos"), lambda v: f"{v:.2f}{topt_it_txt}", "≤ 1.25",
             lambda v: v <= 1.25, hg_cmd),
        _row("Time to an rtol-1e-6 hypergradient, Chronos K-FAC CG (set-up included) / "
             "TorchOpt CG", cmp.get("ratio_kfac_over_torchopt"),
             lambda v: with_iters("chronos_kfac", "torchopt")(v) + (f"; {extra}" if extra else ""),
             "≤ 0.5", lambda v: v <= 0.5, hg_cmd),
        _row("Matmul autotuner on / off (same CG; < 1 means it pays on this CPU)",
             cmp.get("ratio_autotune_on_over_off"), lambda v: f"{v:.2f}", "—", None, hg_cmd),
        _row("Hypergradient relative difference, TorchOpt vs Chronos",
             _get(hg, "comparison", "rel_diff_vs_chronos", "torchopt"),
             lambda v: f"{v:.1e}", "—", None, hg_cmd),
        _row("CG iterations saved by warm start (20 outer steps, K-FAC)",
             _get(hg, "warm_start", "iteration_reduction"),
             lambda v: f"{100 * v:.1f}%", "≥ 40%", lambda v: v >= 0.4, hg_cmd),
        *scaling_rows(results.get("scaling", {})),
        *communication_rows(results.get("communication", {})),
        *continuum_rows(results.get("continuum", {})),
        *staleness_rows(results.get("staleness", {})),
        *hybrid_rows(results.get("hybrid", {})),
        *load_rows(results.get("load", {})),
        _row("4 MB checkout+commit round trip / raw zero-copy echo",
             _get(pr, "ratios", "4mb_round_trip_chronos_over_raw"),
             spread("4mb_round_trip_chronos_over_raw"), "≤ 1.5", lambda v: v <= 1.5, pr_cmd),
        _row("Small-commit throughput / raw DEALER-ROUTER echo (8 clients)",
             _get(pr, "ratios", "throughput_chronos_over_raw"),
             spread("throughput_chronos_over_raw"), "≥ 0.3", lambda v: v >= 0.3, pr_cmd),
        _row("Tiny checkout+commit (2 round trips) / raw echo (1 round trip)",
             _get(pr, "ratios", "tiny_round_trip_chronos_over_raw"),
             spread("tiny_round_trip_chronos_over_raw"), "—", None, pr_cmd),
    ]


def scaling_rows(sc: dict[str, Any]) -> list[Row]:
    """Fraction of computed hypergradients applied at default settings, by client count (real
    sockets; the state-machine simulation in brackets) and the seed's old settings at 64."""
    cmd = "`python -m chronos.benchmarks.scaling`"

    def applied(kind: str, setting: str, n: int) -> float | None:
        for r in sc.get(kind) or []:
            if r.get("setting") == setting and r.get("clients") == n:
                return float(r["applied"])
        return None

    def percent(suffix: str = "") -> Callable[[float], str]:
        return lambda v: f"{100 * v:.1f}%{suffix}"

    rows = []
    for n in (1, 4, 64):
        sim = applied("simulated", "defaults", n)
        rows.append(_row(
            f"Computed hypergradients applied, {n} equally fast client{'s' * (n > 1)}, "
            "defaults", applied("sockets", "defaults", n),
            percent(f" (simulated: {100 * sim:.1f}%)" if sim is not None else ""),
            "≥ 50%" if n == 64 else "—", (lambda v: v >= 0.5) if n == 64 else None, cmd))
    old = applied("sockets", "seed (old)", 64)
    rows.append(_row("Same, 64 clients, the previous defaults (window 3, staleness 2, "
                     "1 commit per step)", old, percent(), "—", None, cmd))
    return rows


def communication_rows(cm: dict[str, Any]) -> list[Row]:
    """Bytes on the wire (all ops, both directions) of each sparse row over the dense row,
    with the test-accuracy difference in points; the target applies to hyper-cleaning."""
    cmd = "`python -m chronos.benchmarks.communication`"
    rows = []
    for name, prob in (cm.get("problems") or {}).items():
        for r in prob.get("rows", [])[1:]:
            diff = float(r["accuracy_diff_points"])
            target = name == "hyper-cleaning"

            def ok(v: float, diff: float = diff) -> bool:
                return v <= 0.2 and abs(diff) <= 0.5

            def fmt(v: float, diff: float = diff) -> str:
                return f"{v:.3f} ({diff:+.2f} points)"

            rows.append(_row(
                f"Bytes on the wire {r['row']} / dense, {name} (test accuracy difference)",
                float(r["bytes_ratio"]), fmt, "≤ 0.2 at ±0.5 points" if target else "—",
                ok if target else None, cmd))
    return rows


def _suffixed(fmt: str, suffix: str) -> Callable[[float], str]:
    """A formatter: ``fmt.format(v) + suffix``."""
    return lambda v: fmt.format(v) + suffix


_CONTINUUM_PROBLEMS = ("digits weight decay", "hyper-cleaning")


def continuum_rows(cn: dict[str, Any]) -> list[Row]:
    """Amortization (time to the exact run's final validation loss; CG iterations saved by
    memory warm starts), stale correction at staleness 2, and retrieval time at 10⁵ entries."""
    cmd = "`python -m chronos.benchmarks.continuum`"
    rows = []
    measured = cn.get("amortization") or {}
    names = [*measured, *(n for n in _CONTINUUM_PROBLEMS if cn and n not in measured)]
    for name in names:  # a problem the run left out shows as "not run"
        res = measured.get(name, {})
        by_mode = {r["mode"]: r for r in res.get("rows", [])}
        am, mem = by_mode.get("amortized", {}), by_mode.get("warm memory", {})
        note = (f" (CG iterations ×{am['cg_ratio']:.2f}, inner ×{am['inner_ratio']:.2f})"
                if am else "")
        rows.append(_row(
            f"Outer-loop time to the exact run's final validation loss, amortized / exact, "
            f"{name}", am.get("time_to_target_ratio"), _suffixed("{:.2f}", note), "≤ 0.4",
            lambda v: v <= 0.4, cmd))
        prev = by_mode.get("warm previous", {})
        note = (f" (warm from previous: {100 * (1 - prev['cg_ratio']):.1f}%)"
                if "cg_ratio" in prev else "")
        rows.append(_row(
            f"CG iterations saved by warm starts from the memory, same tolerances, {name}",
            None if "cg_ratio" not in mem else 1.0 - mem["cg_ratio"],
            _suffixed("{:.1%}", note), "≥ 40%", lambda v: v >= 0.4, cmd))
    for name, res in (cn.get("stale") or {}).items():
        for r in res.get("rows", []):
            if r["staleness"] != 2:
                continue
            undecayed = r.get("undecayed", {}).get("final_val_loss")
            note = (f" ({r['corrected']['final_val_loss']:.4f} vs "
                    f"{r['decay']['final_val_loss']:.4f}"
                    + (f"; stale commits at weight 1: {undecayed:.4f}" if undecayed else "")
                    + ")")
            rows.append(_row(
                f"Final validation loss, stale correction − decay only, staleness 2, {name}",
                r["corrected_minus_decay"], _suffixed("{:+.4f}", note), "< 0",
                lambda v: v < 0, cmd))
    for r in (cn.get("retrieval") or {}).get("rows", []):
        if r["entries"] != 100_000:
            continue
        walk = r["kind"] == "random walk"
        rows.append(_row(
            f"retrieve_similar(k=5), 10⁵ entries × 2,000, {r['kind']} keys",
            r["median_ms"], lambda v: f"{v:.1f} ms", "< 20 ms" if walk else "—",
            (lambda v: v < 20) if walk else None, cmd))
    return rows


_STALENESS_PROBLEMS = {"ridge": "heterogeneous ridge", "digits": "digits by class"}


def staleness_rows(st: dict[str, Any]) -> list[Row]:
    """Every shard counts (4 worker processes, one 3× slower): time to target of the
    aggregated-gradient default over sync, the smallest worker share, and (ridge) the distance
    of the final λ from the sync fixed point; the old policies in brackets."""
    cmd = "`python -m chronos.benchmarks.staleness`"
    rows = []
    for key, name in _STALENESS_PROBLEMS.items():
        if not st:
            break
        by = {r["policy"]: r for r in (st.get(key) or {}).get("rows", [])}
        agg = by.get("async aggregated", {})
        old = [(label, by.get(p, {})) for label, p in
               (("decay-only", "async decay-only"), ("reject", "async reject"))]

        def others(field: str, fmt: str, old: list[tuple[str, dict[str, Any]]] = old) -> str:
            # a target never reached is stored as null: such a policy is left out
            return "; ".join(f"{label} {format(r[field], fmt)}" for label, r in old
                             if isinstance(r.get(field), (int, float)) and math.isfinite(r[field]))

        sync_t = by.get("sync", {}).get("time_to_target")
        ratios = others("time_ratio", ".2f")
        slow = [f"{r['slow_ratio']:.1f}× in {label}" for label, r in
                (("sync", by.get("sync", {})), ("aggregated", agg))
                if isinstance(r.get("slow_ratio"), (int, float))]
        note = (f" (sync {sync_t:.1f} s" + (f"; {ratios}" if ratios else "")
                + (f"; slow worker {', '.join(slow)}" if slow else "") + ")"
                if isinstance(sync_t, (int, float)) else "")
        rows.append(_row(
            f"Time to target, async aggregated / sync, one of 4 workers ~3× slower, {name}",
            agg.get("time_ratio"), _suffixed("{:.3f}", note), "≤ 0.6", lambda v: v <= 0.6,
            cmd))
        shares = agg.get("shares") or {}
        old_min = [f"{label} {min(r['shares'].values()):.1%}" for label, r in old
                   if r.get("shares")]
        rows.append(_row(
            f"Smallest worker share of the outer updates, async aggregated, {name}",
            min(shares.values()) if shares else None,
            _suffixed("{:.1%}", f" ({'; '.join(old_min)})" if old_min else ""),
            "≥ 12.5%", lambda v: v >= 0.125, cmd))
        if key == "ridge":
            rows.append(_row(
                f"Final λ distance from the sync fixed point, async aggregated, {name}",
                agg.get("distance"),
                _suffixed("{:.3f}", f" ({others('distance', '.3f')})" if old else ""), "≤ 0.05",
                lambda v: v <= 0.05, cmd))
    return rows


_MODELS = {"logistic": "MNIST softmax regression", "mlp": "MNIST MLP"}


def _within(limit: float, also: bool) -> Callable[[float], bool]:
    return lambda v: v <= limit and also


def hybrid_rows(hy: dict[str, Any]) -> list[Row]:
    """Worker groups: per model and group size, significance's collective bytes and wall time
    over every_step's (the inner synchronization alone, and everything with the distributed-CG
    hypergradient's all-reduces, which both policies share); distributed CG against one
    process; the one-all-reduce ``local`` hypergradient's error."""
    cmd = "`python -m chronos.benchmarks.hybrid`"
    rows: list[Row] = []
    all_rows = hy.get("rows", []) if hy else []
    for r in all_rows:
        if r.get("policy") != "significance" or "bytes_ratio" not in r:
            continue
        where = f"{_MODELS.get(r['model'], r['model'])}, group of {r['group_size']}"
        delta = r.get("accuracy_delta_points")
        ok_acc = isinstance(delta, (int, float)) and abs(delta) <= 0.5
        pcg = next((x for x in all_rows if x.get("policy") == "significance+pcg"
                    and (x["model"], x["group_size"]) == (r["model"], r["group_size"])), None)
        total = f"; all collective bytes {r['bytes_ratio']:.3f}"
        if pcg is not None and isinstance(pcg.get("bytes_ratio"), (int, float)):
            total += f", {pcg['bytes_ratio']:.3f} with the local-Hessian PCG hypergradient"
        rows.append(_row(
            f"Inner-sync collective bytes, significance / every_step, {where} (test accuracy "
            "difference)", r.get("sync_bytes_ratio"),
            _suffixed("{:.3f}", f" ({delta:+.2f} points{total})"
                      if isinstance(delta, (int, float)) else ""),
            "≤ 0.2 at ±0.5 points", _within(0.2, ok_acc), cmd))
        rows.append(_row(
            f"Wall time of the group's inner solves, significance / every_step, {where}",
            r.get("solve_ratio"),
            _suffixed("{:.3f}", f" (with the shared hypergradients: {r['rounds_ratio']:.3f}; "
                      f"whole job with start-up: {r['wall_ratio']:.3f})"
                      if isinstance(r.get("wall_ratio"), (int, float)) else ""),
            "< 1", lambda v: v < 1, cmd))
    hg = hy.get("hypergradient", {}) if hy else {}
    ex = hg.get("exact_vs_single_process")
    if ex or hy:
        rows.append(_row("Distributed CG hypergradient (2 ranks) vs one process on the union, "
                         "float64, relative difference", (ex or {}).get("relative_error"),
                         lambda v: f"{v:.1e}", "≤ 1e-6", lambda v: v <= 1e-6, cmd))
    for r in hg.get("local_vs_cg", []):
        where = f"{_MODELS.get(r['model'], r['model'])}, group of {r['group_size']}"
        if isinstance(r.get("pcg_collectives"), int):
            rows.append(_row(
                f"All-reduces per hypergradient, local-Hessian PCG / distributed CG, {where}",
                r["pcg_collectives"] / r["cg_collectives"] if r.get("cg_collectives") else None,
                _suffixed("{:.3f}", f" ({r['pcg_collectives']} vs {r['cg_collectives']}; "
                          f"relative difference {r['pcg_relative_error']:.1e}; seconds "
                          f"{r['pcg_seconds']:.2f} vs {r['cg_seconds']:.2f})"), "—", None,
                cmd))
        rows.append(_row(
            f"Hypergradient with one all-reduce (averaged local solves) vs distributed CG, "
            f"{where}, relative error", r.get("relative_error"),
            _suffixed("{:.3f}", f" (all-reduces {r['local_collectives']} vs "
                      f"{r['cg_collectives']}; cosine {r['cosine']:.3f})"), "—", None, cmd))
    return rows


def load_rows(ld: dict[str, Any]) -> list[Row]:
    """One coordinator under 64 concurrent clients: commit throughput and p99 latency at default
    settings, RSS growth, and what a durable state directory costs (group commit, and an fsync
    per record) as throughput ratios to the in-memory default, measured in the same run."""
    cmd = "`python -m chronos.benchmarks.load`"
    modes = (ld or {}).get("modes") or {}
    default = modes.get("default") or {}
    cps = default.get("commits_per_s")
    n = default.get("clients", 64)
    p99 = _get(default, "latency_ms", "commit", "p99")
    acc = default.get("accepted_fraction")
    rss = default.get("rss") or {}
    grow = (rss["max_bytes"] - rss["start_bytes"]) / 2**20 if isinstance(
        rss.get("max_bytes"), int) and isinstance(rss.get("start_bytes"), int) else None
    rows = [
        _row(f"Load: {n} concurrent clients on one coordinator, default settings, commits/s "
             "(accepted; p99 commit latency; RSS growth)", cps,
             _suffixed("{:.0f}", (f" ({100 * acc:.1f}% accepted; p99 {p99:.1f} ms"
                                  if isinstance(acc, float) and isinstance(p99, float) else " (")
                       + (f"; +{grow:.0f} MiB)" if grow is not None else ")")),
             "—", None, cmd)]
    for mode, what in (("journal-batch", "group commit, one fsync per batch"),
                       ("journal-always", "one fsync per record")):
        got = (modes.get(mode) or {}).get("commits_per_s")
        ratio = got / cps if isinstance(got, float) and isinstance(cps, float) and cps else None
        if ld or ratio is not None:
            rows.append(_row(f"Durable state directory ({what}) / in memory, commits/s under "
                             "the same load", ratio, lambda v: f"{v:.2f}", "—", None, cmd))
    return rows


def render(results: dict[str, dict[str, Any]], when: str | None = None) -> str:
    """The Markdown block (without the markers)."""
    rows = table_rows(results)
    env = _get(results.get("hypergrad", {}), "environment") or {}
    cpu = env.get("cpu") or platform.processor() or "unknown CPU"
    cores = env.get("logical_cpus") or os.cpu_count()
    libs = ", ".join(x for x in (f"torch {env['torch']}" if env.get("torch") else "",
                                 f"BLAS {env['blas']}" if env.get("blas") else "") if x)
    lines = [
        f"Measured on {when or date.today().isoformat()} on {cpu} ({platform.machine()}, "
        f"{cores} logical CPUs, shared{', ' + libs if libs else ''}, 1 torch thread): medians "
        "of interleaved repeats, ratios measured side by side in one run. Your CPU will give "
        "other figures; regenerate them there with `make bench`.",
        "",
        "| measurement | measured | target | met | command |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines)


def update_readme(readme: Path, block: str, start: str = START, end: str = END) -> None:
    """Replace the text between the markers ``start`` and ``end`` in ``readme`` by ``block``."""
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} section to fill")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{block}\n{end}{tail}")


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """``{name: json}`` from ``results/NAME*.json``; several protocol runs are merged into the
    median of each ratio, with the per-run values kept under ``runs``."""
    out: dict[str, dict[str, Any]] = {}
    for name in ("hypergrad", "scaling", "communication", "continuum", "staleness", "hybrid",
                 "load"):
        path = results_dir / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    runs = [json.loads(p.read_text()) for p in sorted(results_dir.glob("protocol*.json"))]
    if runs:
        keys = runs[0].get("ratios", {}).keys()
        out["protocol"] = {
            "ratios": {k: statistics.median(r["ratios"][k] for r in runs) for k in keys},
            "runs": {k: [r["ratios"][k] for r in runs] for k in keys},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chronos.benchmarks.report")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    p.add_argument("--print", action="store_true", help="print the table, do not write")
    args = p.parse_args(argv)
    block = render(load_results(args.results))
    if args.print:
        print(block)
    else:
        update_readme(args.readme, block)
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
