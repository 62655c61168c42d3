"""The load benchmark end to end at a small size (8 clients in 2 processes, 2 s per
configuration), its README rows, and bad arguments."""

from __future__ import annotations

import json
import math
import multiprocessing

import pytest

from chronos.benchmarks import load


@pytest.mark.timeout(120)
def test_small_load_run_measures_both_modes_and_leaves_nothing_running(tmp_path, capsys):
    out = tmp_path / "load.json"
    assert load.main(["--clients", "8", "--processes", "2", "--duration", "2", "--params", "100",
                      "--modes", "permissive,default,journal-batch", "--out", str(out),
                      "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "permissive" in printed and "default" in printed and "commits/s" in printed
    assert multiprocessing.active_children() == []

    data = json.loads(out.read_text())
    assert data["machine"]["cpus"] >= 1 and data["params"]["clients"] == 8
    assert set(data["modes"]) == {"permissive", "default", "journal-batch"}
    journal = data["modes"]["journal-batch"]["coordinator"]["final"]["journal"]
    assert journal["records_written"] > 0 and 0 < journal["fsyncs"] <= journal["records_written"]
    for mode, r in data["modes"].items():
        assert r["clients"] == 8 and r["processes"] == 2
        assert r["commits"] > 0 and r["commits_per_s"] > 0, mode
        cl = r["client"]
        assert cl["commits"] == cl["commits_accepted"] + cl["commits_rejected"] + \
            cl["commits_duplicate"]
        assert cl["decode_errors"] == 0
        assert r["coordinator"]["window"]["commits_accepted"] > 0
        assert r["network"]["messages_received"] > 0 and r["network"]["bytes_sent"] > 0
        for kind in ("commit", "checkout"):
            lat = r["latency_ms"][kind]
            assert lat["n"] > 0, (mode, kind)
            figures = [lat[k] for k in ("min", "p50", "p95", "p99", "max")]
            assert all(math.isfinite(x) for x in figures), (mode, kind, lat)
            assert figures == sorted(figures) and lat["min"] >= 0.0, (mode, kind, lat)
        rss = r["rss"]
        assert rss["samples"] and all(b > 0 for _, b in rss["samples"])
        assert 0 < rss["start_bytes"] <= rss["max_bytes"] and rss["end_bytes"] > 0
        assert r["cpu"]["coordinator_s"] > 0
    permissive = data["modes"]["permissive"]
    assert permissive["client"]["commits_accepted"] > 0
    assert permissive["accepted_fraction"] > 0.9  # window and staleness 1000: nearly all

    rows = load.load_rows(data)
    assert len(rows) == 3 and rows[0].startswith("| permissive | 8 | ")
    assert all(r.count("|") == load.LOAD_HEADER[0].count("|") for r in rows)


def test_load_rows_of_nothing_is_empty() -> None:
    assert load.load_rows({}) == []


@pytest.mark.parametrize("argv", [
    ["--clients", "0"],
    ["--clients", "4", "--processes", "5"],
    ["--processes", "0"],
    ["--duration", "0"],
    ["--duration", "nan"],
    ["--params", "0"],
    ["--modes", "permissive,bogus"],
    ["--modes", ","],
    ["--modes", "default,default"],
    ["--think-ms", "-1"],
    ["--clients", "many"],
])
def test_bad_arguments_exit_2_with_one_line(argv, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        load.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("python -m chronos.benchmarks.load: error:")
