"""The hybrid benchmark's arithmetic, its README rows and its argument checks.

The jobs themselves are real ``run_local`` runs with worker groups, covered end to end by
``tests/distributed/test_group_run.py``; here the summaries they feed are checked exactly.
"""

from __future__ import annotations

import math

import pytest

from chronos.benchmarks.hybrid import main, summarize
from chronos.benchmarks.report import hybrid_rows


def _run(policy: str, coll: float, sync: float, wall: float, rounds: float, acc: float,
         model: str = "logistic", g: int = 2) -> dict[str, object]:
    return {"model": model, "group_size": g, "policy": policy, "collective_bytes": coll,
            "sync_bytes": sync, "hypergradient_bytes": coll - sync, "collective_messages": 10,
            "zmq_bytes": 100, "wall_s": wall, "rounds_s": rounds, "solve_s": rounds / 2,
            "hypergradient_s": rounds / 2, "cpu_s": 1.0,
            "test_accuracy": acc, "syncs": 5, "inner_steps": 50, "linear_iterations": 20}


def test_summarize_takes_medians_and_ratios_against_every_step_of_the_same_group() -> None:
    runs = [
        _run("every_step", 1000, 800, 10, 8, 0.90), _run("every_step", 1200, 800, 12, 10, 0.92),
        _run("every_step", 1100, 800, 11, 9, 0.91),
        _run("significance", 400, 100, 9, 4, 0.905), _run("significance", 300, 100, 5, 5, 0.91),
        _run("significance", 500, 100, 7, 6, 0.915),
        _run("every_step", 5000, 4000, 20, 16, 0.8, g=4),  # another group size: its own base
        _run("significance", 1000, 400, 10, 4, 0.8, g=4),
    ]
    rows = {(r["group_size"], r["policy"]): r for r in summarize(runs)}
    base, sig = rows[(2, "every_step")], rows[(2, "significance")]
    assert (base["collective_bytes"], base["wall_s"], base["repeats"]) == (1100, 11, 3)
    assert sig["bytes_ratio"] == pytest.approx(400 / 1100)
    assert sig["sync_bytes_ratio"] == pytest.approx(100 / 800)
    assert sig["wall_ratio"] == pytest.approx(7 / 11)
    assert sig["rounds_ratio"] == pytest.approx(5 / 9)
    assert sig["solve_ratio"] == pytest.approx(2.5 / 4.5)
    assert sig["accuracy_delta_points"] == pytest.approx(100 * (0.91 - 0.91))
    assert rows[(4, "significance")]["sync_bytes_ratio"] == pytest.approx(0.1)
    assert base["bytes_ratio"] == 1.0


def test_readme_rows_judge_bytes_with_the_accuracy_band_and_name_both_ratios() -> None:
    rows = summarize([_run("every_step", 1000, 800, 10, 8, 0.90),
                      _run("significance", 300, 100, 8, 6, 0.89),  # −1 point: not met
                      _run("every_step", 1000, 800, 10, 8, 0.90, model="mlp"),
                      _run("significance", 300, 100, 8, 9, 0.899, model="mlp")])
    out = hybrid_rows({"rows": rows, "hypergradient": {
        "exact_vs_single_process": {"relative_error": 3e-11},
        "local_vs_cg": [{"model": "mlp", "group_size": 2, "relative_error": 0.5, "cosine": 0.9,
                         "local_collectives": 2, "cg_collectives": 40}]}})
    byname = {r[0]: r for r in out}
    lr = byname["Inner-sync collective bytes, significance / every_step, MNIST softmax "
                "regression, group of 2 (test accuracy difference)"]
    assert lr[1].startswith("0.125 (-1.00 points") and "0.300" in lr[1] and lr[3] == "**no**"
    mlp = byname["Inner-sync collective bytes, significance / every_step, MNIST MLP, group of 2 "
                 "(test accuracy difference)"]
    assert mlp[3] == "yes"
    walls = [r for r in out if r[0].startswith("Wall time of the group's inner solves")]
    assert [r[3] for r in walls] == ["yes", "**no**"]  # 6/8 < 1; 9/8 > 1
    exact = next(r for r in out if r[0].startswith("Distributed CG"))
    assert (exact[1], exact[3]) == ("3.0e-11", "yes")
    assert any("all-reduces 2 vs 40" in r[1] for r in out)
    assert hybrid_rows({}) == []
    missing = hybrid_rows({"rows": []})
    assert [r[1] for r in missing] == ["not run"]


@pytest.mark.parametrize("argv", [
    ["--models", "resnet"], ["--policies", "significance"], ["--policies", "every_step,bogus"],
    ["--group-sizes", "0"], ["--group-sizes", "x"], ["--repeats", "0"], ["--steps", "0"],
])
def test_bad_arguments_exit_with_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_nan_figures_stay_out_of_ratios() -> None:
    rows = summarize([_run("every_step", 1000, 800, 10, math.nan, 0.9),
                      _run("significance", 300, 100, 8, 5, 0.9)])
    sig = next(r for r in rows if r["policy"] == "significance")
    assert math.isnan(sig["rounds_ratio"])
