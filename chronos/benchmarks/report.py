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
import platform
import statistics
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

__all__ = ["main", "render", "table_rows", "update_readme"]

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
    """The table's rows from ``{"hypergrad": json, "protocol": json}`` (either may be absent)."""
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
    ratio_off = _get(hg, "comparison", "ratio_autotune_off_over_torchopt")
    off = f" (matmul autotune off: {ratio_off:.2f})" if ratio_off is not None else ""
    return [
        _row("Hypergradient time, Chronos CG / TorchOpt `custom_root`+`solve_cg`",
             _get(hg, "comparison", "ratio_chronos_over_torchopt"),
             lambda v: f"{v:.2f}{off}", "≤ 0.8", lambda v: v <= 0.8, hg_cmd),
        _row("Hypergradient relative difference vs TorchOpt",
             _get(hg, "comparison", "rel_diff_chronos_torchopt"),
             lambda v: f"{v:.1e}", "—", None, hg_cmd),
        _row("CG iterations saved by warm start (20 outer steps)",
             _get(hg, "warm_start", "iteration_reduction"),
             lambda v: f"{100 * v:.1f}%", "≥ 40%", lambda v: v >= 0.4, hg_cmd),
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


def render(results: dict[str, dict[str, Any]], when: str | None = None) -> str:
    """The Markdown block (without the markers)."""
    rows = table_rows(results)
    lines = [
        f"Measured on {when or date.today().isoformat()}, {platform.machine()} CPU "
        "(2 shared cores), medians of interleaved repeats, ratios measured side by side in "
        "one run. Regenerate with `make bench`.",
        "",
        "| measurement | measured | target | met | command |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> None:
    """Replace the text between the markers in ``readme`` by ``block``."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} section to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{block}\n{END}{tail}")


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """``{name: json}`` from ``results/NAME*.json``; several protocol runs are merged into the
    median of each ratio, with the per-run values kept under ``runs``."""
    out: dict[str, dict[str, Any]] = {}
    path = results_dir / "hypergrad.json"
    if path.exists():
        out["hypergrad"] = json.loads(path.read_text())
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
