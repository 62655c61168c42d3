"""The every-shard-counts benchmark: the simulated part end to end, one real process run, the
report rows, and bad arguments."""

from __future__ import annotations

import json

import pytest

from chronos.benchmarks import staleness
from chronos.benchmarks.report import staleness_rows


@pytest.mark.timeout(120)
def test_quick_simulated_part_writes_every_policy_and_the_aggregated_one_lands(tmp_path, capsys):
    out = tmp_path / "staleness.json"
    assert staleness.main(["--quick", "--parts", "simulated", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "simulated ridge" in printed and "async aggregated" in printed
    sim = json.loads(out.read_text())["simulated"]
    rows = {r["policy"]: r for r in sim["rows"]}
    assert set(rows) == {p.name for p in staleness.POLICIES}
    assert rows["async aggregated"]["distance"] < 1e-3
    assert min(rows["async aggregated"]["shares"].values()) > 0.2
    assert rows["async decay-only"]["distance"] > 0.5  # the failure mode, measured
    assert rows["async decay-only"]["time_to_target"] is None  # never settles at the target
    assert rows["sync"]["time_ratio"] == 1.0


@pytest.mark.timeout(180)
def test_one_process_run_traces_lambda_and_reports_shares_bytes_and_cpu() -> None:
    run = staleness.run_policy(staleness.RIDGE, staleness.POLICIES[-1], [0.0] * 4, max_steps=3,
                               seed=0, timeout=150.0)
    assert run["steps"] == 3 and run["bytes"] > 0 and run["cpu_s"] > 0
    assert run["trace"] and run["trace"][-1][1] == 3
    assert set(run["workers"]) == {f"worker-{k}" for k in range(4)}
    assert sum(r["share"] for r in run["workers"].values()) == pytest.approx(1.0)


def test_report_rows_judge_the_targets_and_show_the_old_policies() -> None:
    def row(policy: str, ratio: float | None, distance: float, shares: list[float]) -> dict:
        return {"policy": policy, "time_to_target": None if ratio is None else 10.0 * ratio,
                "time_ratio": ratio, "distance": distance,
                "shares": {f"worker-{k}": s for k, s in enumerate(shares)}}

    ridge = {"rows": [row("sync", 1.0, 0.01, [0.25] * 4),
                      row("async reject", None, 0.86, [0.34, 0.33, 0.33, 0.0]),
                      row("async decay-only", None, 0.79, [0.33, 0.33, 0.32, 0.02]),
                      row("async aggregated", 0.55, 0.004, [0.26, 0.25, 0.25, 0.24])]}
    rows = staleness_rows({"ridge": ridge})
    by = {r[0]: r for r in rows}
    time_row = next(r for r in rows if r[0].startswith("Time to target") and "ridge" in r[0])
    assert time_row[1].startswith("0.550 (sync 10.0 s") and time_row[3] == "yes"
    share = next(r for r in rows if r[0].startswith("Smallest worker share") and "ridge" in r[0])
    assert share[1].startswith("24.0%") and "decay-only 2.0%" in share[1] and share[3] == "yes"
    dist = next(r for r in rows if r[0].startswith("Final λ distance"))
    assert dist[1] == "0.004 (decay-only 0.790; reject 0.860)" and dist[3] == "yes"
    digits = [r for name, r in by.items() if "digits by class" in name]
    assert digits and all(r[1] == "not run" for r in digits)  # left out of the run
    assert staleness_rows({}) == []


def test_bad_parts_and_repeats_are_refused(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        staleness.main(["--parts", "simulated,bogus"])
    assert e.value.code == 2 and "unknown parts ['bogus']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        staleness.main(["--repeats", "0"])
    assert e.value.code == 2
