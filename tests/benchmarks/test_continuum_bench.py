"""Smoke test of the continuum benchmark (--quick: digits, a few steps), and its report rows."""

import json

import pytest

pytest.importorskip("sklearn")

from chronos.benchmarks import continuum, report


@pytest.mark.timeout(240)
def test_quick_benchmark_measures_every_part(tmp_path, capsys):
    out = tmp_path / "continuum.json"
    assert continuum.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "amortized" in printed and "retrieve_similar" in printed
    res = json.loads(out.read_text())
    rows = res["amortization"]["digits weight decay"]["rows"]
    assert [r["mode"] for r in rows] == list(continuum.MODES)
    exact = rows[0]
    assert exact["cg_ratio"] == 1.0 and exact["time_to_target_ratio"] == 1.0
    for r in rows:
        assert r["cg_iterations"] > 0 and len(r["cg_per_step"]) == 6
        if r["mode"] != "amortized":  # equal accuracy at the same tight tolerances
            assert r["hypergradient_rel_error_median"] < 1e-3, r
    stale = res["stale"]["digits weight decay"]["rows"]
    assert [r["staleness"] for r in stale] == [2]
    assert stale[0]["decay"]["commits_corrected"] == 0
    assert stale[0]["undecayed"]["commits_corrected"] == 0
    assert stale[0]["corrected"]["commits_corrected"] >= 1
    assert [r["entries"] for r in res["retrieval"]["rows"]] == [1000, 1000]
    texts = [row[0] for row in report.continuum_rows(res)]
    assert any("amortized / exact" in t for t in texts)
    assert any("stale correction" in t for t in texts)


def test_report_rows_judge_the_continuum_targets():
    res = {
        "amortization": {"p": {"rows": [
            {"mode": "exact", "cg_ratio": 1.0, "inner_ratio": 1.0, "time_to_target_ratio": 1.0},
            {"mode": "warm previous", "cg_ratio": 0.8, "inner_ratio": 0.5,
             "time_to_target_ratio": 0.6},
            {"mode": "warm memory", "cg_ratio": 0.55, "inner_ratio": 0.4,
             "time_to_target_ratio": 0.5},
            {"mode": "amortized", "cg_ratio": 0.5, "inner_ratio": 0.2,
             "time_to_target_ratio": 0.45}]}},
        "stale": {"p": {"rows": [{"staleness": 2, "corrected_minus_decay": -0.01,
                                  "corrected": {"final_val_loss": 0.1},
                                  "decay": {"final_val_loss": 0.11}}]}},
        "retrieval": {"rows": [{"kind": "random walk", "entries": 100_000, "median_ms": 8.0},
                               {"kind": "isotropic", "entries": 100_000, "median_ms": 90.0}]},
    }
    rows = {r[0]: r for r in report.continuum_rows(res)}
    met = [r[3] for r in rows.values()]
    # p's two amortization rows, then the two expected problems the run left out: "not run"
    assert met == ["**no**", "yes", "—", "—", "—", "—", "yes", "yes", "—"]
    assert [r[1] for r in rows.values()][2:6] == ["not run"] * 4
    saved = next(r for t, r in rows.items() if t.startswith("CG iterations saved"))
    assert saved[1] == "45.0% (warm from previous: 20.0%)"
