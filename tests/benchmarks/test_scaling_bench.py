"""Smoke test of the scaling benchmark in --quick mode: real sockets for 1 and 4 clients, the
simulated state machine for 1, 4 and 64."""

import json

import pytest

from chronos.benchmarks import scaling


@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore::chronos.distributed.aggregation.WindowStalenessWarning")
def test_quick_scaling_benchmark_meets_the_target_and_writes_json(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    assert scaling.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "simulated" in printed and "sockets" in printed
    data = json.loads(out.read_text())
    sim = {(r["setting"], r["clients"]): r for r in data["simulated"]}
    assert set(sim) == {(s.name, n) for s in scaling.SETTINGS for n in (1, 4, 64)}
    # the target: >= 50% of computed hypergradients applied with 64 clients at the defaults
    assert sim["defaults", 64]["applied"] >= 0.5
    assert sim["seed (old)", 64]["applied"] < 0.5  # what the old defaults did
    for r in data["simulated"] + data["sockets"]:
        assert r["accepted"] + r["rejected"] == r["computed"]
        assert 0.0 <= r["applied"] <= 1.0 and 0.0 <= r["waste"] <= 1.0
    sock = {(r["setting"], r["clients"]): r for r in data["sockets"]}
    assert set(sock) == {(s.name, n) for s in scaling.SETTINGS for n in (1, 4)}
    assert all(r["computed"] == 3 * r["clients"] for r in data["sockets"])
    assert sock["defaults", 1]["applied"] == 1.0
