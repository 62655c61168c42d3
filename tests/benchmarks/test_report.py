from chronos.benchmarks.report import END, START, render, table_rows, update_readme


def test_rows_mark_targets_met_and_missed():
    rows = table_rows({
        "hypergrad": {"per_iteration": {"ratio_to_floor": {"chronos": 1.3, "torchopt": 1.2}},
                      "comparison": {"ratio_kfac_over_torchopt": 0.4,
                                     "ratio_kfac_reused_over_torchopt": 0.3,
                                     "ratio_chronos_over_torchopt": 1.0,
                                     "iterations": {"chronos_kfac": 20, "torchopt": 120},
                                     "rel_diff_vs_chronos": {"torchopt": 1e-6}},
                      "warm_start": {"iteration_reduction": 0.5}},
        "protocol": {"ratios": {"4mb_round_trip_chronos_over_raw": 1.2,
                                "throughput_chronos_over_raw": 0.1,
                                "tiny_round_trip_chronos_over_raw": 3.0}},
    })
    met = {r[0].split(",")[0]: r[3] for r in rows}
    assert met["Per CG iteration"] == "**no**"
    assert met["Time to an rtol-1e-6 hypergradient"] == "yes"
    assert met["CG iterations saved by warm start (20 outer steps"] == "yes"
    assert met["4 MB checkout+commit round trip / raw zero-copy echo"] == "yes"
    assert met["Small-commit throughput / raw DEALER-ROUTER echo (8 clients)"] == "**no**"
    kfac = next(r for r in rows if r[0].startswith("Time to"))
    assert "kfac 20, torchopt 120" in kfac[1] and "factors reused 0.30" in kfac[1]


def test_missing_results_say_not_run_and_readme_is_rewritten(tmp_path):
    block = render({}, when="2026-01-01")
    assert "not run" in block and "2026-01-01" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold\n{END}\nrest\n")
    update_readme(readme, block)
    text = readme.read_text()
    assert "old" not in text and "not run" in text and text.endswith("rest\n")


def test_several_protocol_runs_are_merged_into_medians(tmp_path):
    import json

    from chronos.benchmarks.report import load_results

    for i, r in enumerate([1.2, 1.8, 1.4]):
        (tmp_path / f"protocol_{i}.json").write_text(json.dumps({"ratios": {
            "4mb_round_trip_chronos_over_raw": r, "throughput_chronos_over_raw": 0.4,
            "tiny_round_trip_chronos_over_raw": 3.0}}))
    res = load_results(tmp_path)
    assert res["protocol"]["ratios"]["4mb_round_trip_chronos_over_raw"] == 1.4
    row = next(r for r in table_rows(res) if r[0].startswith("4 MB"))
    assert row[1] == "1.40 (median of 3 runs: 1.20–1.80)" and row[3] == "yes"


def test_scaling_rows_report_applied_fractions_with_the_64_client_target():
    from chronos.benchmarks.report import scaling_rows

    def row(kind_setting: str, n: int, applied: float) -> dict:
        return {"setting": kind_setting, "clients": n, "applied": applied}

    rows = scaling_rows({
        "sockets": [row("defaults", 1, 1.0), row("defaults", 64, 0.45),
                    row("seed (old)", 64, 0.1)],
        "simulated": [row("defaults", 64, 0.9)],
    })
    by_what = {r[0]: r for r in rows}
    r64 = by_what["Computed hypergradients applied, 64 equally fast clients, defaults"]
    assert r64[1] == "45.0% (simulated: 90.0%)" and r64[3] == "**no**"
    assert by_what["Computed hypergradients applied, 4 equally fast clients, defaults"][1] == (
        "not run")
    assert any(r[1] == "10.0%" for r in rows)


def test_communication_rows_judge_hyper_cleaning_on_bytes_and_accuracy():
    from chronos.benchmarks.report import communication_rows

    def row(name: str, ratio: float, diff: float) -> dict:
        return {"row": name, "bytes_ratio": ratio, "accuracy_diff_points": diff}

    rows = communication_rows({"problems": {
        "hyper-cleaning": {"rows": [row("dense", 1.0, 0.0), row("filter", 0.15, -0.3),
                                    row("codec", 0.1, -0.9)]},
        "digits weight decay": {"rows": [row("dense", 1.0, 0.0), row("filter", 0.5, 0.1)]},
    }})
    met = {r[0]: (r[1], r[3]) for r in rows}
    assert met["Bytes on the wire filter / dense, hyper-cleaning (test accuracy difference)"] \
        == ("0.150 (-0.30 points)", "yes")
    assert met["Bytes on the wire codec / dense, hyper-cleaning (test accuracy difference)"][1] \
        == "**no**"  # bytes fine, accuracy 0.9 points off
    assert met["Bytes on the wire filter / dense, digits weight decay (test accuracy "
               "difference)"][1] == "—"
