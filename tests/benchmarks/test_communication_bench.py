"""Smoke test of the traffic benchmark: real processes and sockets, digits, two rows."""

import json

import pytest

pytest.importorskip("sklearn")

from chronos.benchmarks import communication


@pytest.mark.timeout(240)
def test_quick_benchmark_measures_dense_and_sparse_traffic(tmp_path, capsys):
    out = tmp_path / "communication.json"
    assert communication.main(["--quick", "--rows", "filter+codec",
                               "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "digits weight decay" in printed and "filter+codec" in printed
    rows = json.loads(out.read_text())["problems"]["digits weight decay"]["rows"]
    assert [r["row"] for r in rows] == ["dense", "filter+codec"]
    dense, sparse = rows
    assert dense["bytes_ratio"] == 1.0 and dense["worker_options"]["codec"] == "identity"
    assert sparse["worker_options"]["codec"] == "topk:0.1+int8"
    for r in rows:
        # every byte counted: the per-op counters add up to the totals, both directions
        by_op = r["bytes_by_op"]
        assert sum(v["received"] for v in by_op.values()) == r["bytes_received"]
        assert sum(v["sent"] for v in by_op.values()) == r["bytes_sent"]
        assert r["hypergradients"] == 6 and 0.5 < r["test_accuracy"] <= 1.0
        assert r["commits_accepted"] >= 1


def test_bad_rows_and_problems_are_usage_errors():
    with pytest.raises(SystemExit):
        communication.main(["--rows", "magic"])
    with pytest.raises(SystemExit):
        communication.main(["--problems", "imagenet"])
