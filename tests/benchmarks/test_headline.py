"""The headline benchmark: its scores, summaries, tables and plots on hand-made runs, the
problem factories the workers load, bad arguments, and one small real run end to end (two
4-worker jobs on 127.0.0.1)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chronos.benchmarks import headline
from chronos.benchmarks.problems import mnist_hyper_cleaning
from chronos.distributed.launcher import load_factory


class _Flags:
    def __init__(self, corrupted: list[bool]) -> None:
        self.corrupted = torch.tensor(corrupted)


def test_cleaning_scores_count_flagged_samples_by_hand() -> None:
    # samples 0-2 corrupted; flagged (s < 0): 0, 1 and 3 -> tp 2, fp 1, fn 1
    problem = _Flags([True, True, True, False, False])
    scores = headline.cleaning_scores(problem, torch.tensor([-1.0, -0.1, 0.5, -2.0, 3.0]))
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    none = headline.cleaning_scores(problem, torch.ones(5))
    assert none == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_factories_by_seed_load_the_split_of_that_seed() -> None:
    factory = load_factory(headline.problem_spec(2))
    shard = factory(1, 4)
    whole = mnist_hyper_cleaning(0, 1, seed=2)
    assert len(shard.x_train) == 500
    assert torch.equal(shard.corrupted, whole.corrupted)
    assert not torch.equal(whole.corrupted, mnist_hyper_cleaning(0, 1, seed=0).corrupted)
    with pytest.raises(AttributeError):
        headline.cleaning_sx  # noqa: B018  (not a factory name)


def test_run_config_gives_every_row_the_same_hypergradients_and_step_per_hypergradient() -> None:
    sync = headline.VARIANTS["sync"].run_config("m:f", 96, 0, [0.0] * 4, outer_lr=1.0)
    chronos = headline.VARIANTS["chronos"].run_config("m:f", 96, 0, [0.0] * 4, outer_lr=1.0)
    assert (sync.mode, sync.max_steps, sync.outer_lr) == ("sync", 24, 1.0)
    assert (chronos.mode, chronos.max_steps, chronos.min_commits) == ("async", 48, 2)
    assert chronos.outer_lr == 0.5  # two commits per step against four: half the step
    assert chronos.worker_options["codec"] == headline.SPARSE
    assert chronos.worker_options["amortized"] is True
    assert "codec" not in sync.worker_options and "amortized" not in sync.worker_options


def _run(variant: str, slow: bool, seed: int, acc: float, bytes_: int,
         trace: list[tuple[float, int, int, float]]) -> dict:
    return {"variant": variant, "straggler": slow, "seed": seed, "test_acc": acc, "f1": 0.8,
            "bytes": bytes_, "messages": 10, "wall_s": trace[-1][0], "cpu_s": 5.0, "steps": 4,
            "rejected": 0, "stale_accepted": 1, "startup_s": 2.0,
            "workers": {"worker-0": {"accepted": 3, "rejected": 0, "cancelled": 0, "share": 1}},
            "trace": trace}


def test_summarize_takes_means_medians_time_to_target_and_ratios_to_sync() -> None:
    runs = [
        _run("sync", False, 0, 0.80, 1000, [(0.0, 0, 0, 0.5), (4.0, 0, 2, 0.81), (8.0, 0, 4, 0.8)]),
        _run("sync", False, 1, 0.84, 1000, [(0.0, 0, 0, 0.5), (6.0, 0, 4, 0.84)]),
        _run("chronos", False, 0, 0.82, 100, [(0.0, 0, 0, 0.5), (2.0, 0, 2, 0.8)]),
        _run("chronos", False, 1, 0.82, 300, [(0.0, 0, 0, 0.5), (1.0, 0, 2, 0.81)]),
        _run("chronos", True, 0, 0.70, 100, [(0.0, 0, 0, 0.5), (9.0, 0, 2, 0.7)]),
    ]
    rows = {(r["variant"], r["straggler"]): r for r in headline.summarize(runs, target=0.8)}
    sync, chronos = rows[("sync", False)], rows[("chronos", False)]
    assert sync["test_acc"] == pytest.approx(0.82) and sync["runs"] == 2
    assert sync["test_acc_std"] == pytest.approx(math.sqrt(0.0008))
    assert sync["time_to_target"] == pytest.approx(5.0)  # median of 4 and 6
    assert chronos["time_to_target"] == pytest.approx(1.5)
    assert chronos["time_to_target_ratio"] == pytest.approx(0.3)
    assert chronos["bytes_ratio"] == pytest.approx(0.2)  # median 200 over 1000
    slow = rows[("chronos", True)]
    assert math.isnan(slow["time_to_target"]) and slow["reached"] == 0
    assert math.isnan(slow["bytes_ratio"])  # no sync row with a straggler to compare with


def test_tables_and_plots_come_from_the_result(tmp_path) -> None:
    runs = [
        _run("sync", False, 0, 0.80, 1000, [(0.0, 0, 0, 0.5), (4.0, 500, 2, 0.81)]),
        _run("chronos", False, 0, 0.83, 100, [(0.0, 0, 0, 0.5), (2.0, 50, 2, 0.83)]),
        _run("sync", True, 0, 0.80, 1000, [(0.0, 0, 0, 0.5), (12.0, 500, 2, 0.81)]),
        _run("chronos", True, 0, 0.82, 100, [(0.0, 0, 0, 0.5), (3.0, 50, 2, 0.82)]),
    ]
    result = {
        "machine": {"cpu": "Test CPU", "cpus": 2, "torch": "2.13.0", "time": "2026-12-02 12:00"},
        "params": {"target": 0.8, "seeds": 1, "seed_list": [0], "hypergradients": 8,
                   "command": "chronos bench headline --full"},
        "references": {"oracle": {"test_acc": 0.87, "f1": 1.0},
                       "no cleaning": {"test_acc": 0.6, "f1": 0.0}},
        "runs": runs, "rows": headline.summarize(runs, 0.8),
    }
    md = headline.markdown_table(result)
    assert "Test CPU (2 logical CPUs)" in md and "chronos bench headline --full" in md
    assert "| **chronos** | — | 83.00 ± 0.00 |" in md and "**0.100**" in md
    assert "| oracle | | 87.00 |" in md
    text = headline.terminal_table(result["rows"], result["references"], 0.8)
    assert "chronos" in text and "0.100" in text and "87.00" in text
    paths = headline.plots(result, tmp_path, "h")
    assert [p.name for p in paths] == ["h_time.png", "h_bytes.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


@pytest.mark.parametrize("args, message", [
    (["--rows", "sync,bogus"], "unknown rows"),
    (["--rows", "chronos"], "must include sync"),
    (["--hypergradients", "6"], "multiple of 4"),
    (["--target", "87"], "--target"),
    (["--seeds", "0"], "--seeds"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        headline.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_small_real_run_writes_json_markdown_plots_and_a_readme_section(tmp_path, capsys) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{headline.README_START}\nold\n{headline.README_END}\nafter\n")
    out = tmp_path / "h.json"
    code = headline.main(["--hypergradients", "8", "--no-straggler", "--quiet", "--target",
                          "0.5", "--out", str(out), "--readme", str(readme)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sync" in printed and "chronos" in printed and "h_time.png" in printed
    result = json.loads(out.read_text())
    assert result["machine"]["cpus"] >= 1 and result["params"]["hypergradients"] == 8
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == {"sync", "chronos"}
    assert runs["sync"]["steps"] == 2 and runs["chronos"]["steps"] == 4
    for r in runs.values():
        assert r["accepted"] >= 8 and r["rejected"] == 0 and r["bytes"] > 0
        assert 0.5 < r["test_acc"] < 1.0 and len(r["workers"]) == 4
        assert r["trace"][-1][2] == r["steps"]  # the last point is the final λ
    # sparse int8 messages: a fraction of sync's bytes for as many hypergradients
    assert runs["chronos"]["bytes"] < 0.5 * runs["sync"]["bytes"]
    refs = result["references"]
    assert refs["oracle"]["f1"] == 1.0 and refs["oracle"]["test_acc"] > refs["no cleaning"][
        "test_acc"]
    assert "sequential exact" not in refs  # only with --full or --sequential
    text = readme.read_text()
    assert "old" not in text and "| **chronos** |" in text and text.endswith("after\n")
    assert (tmp_path / "h.md").read_text().strip() in text
    assert (tmp_path / "h_time.png").exists() and (tmp_path / "h_bytes.png").exists()


def test_chronos_demo_and_bench_headline_are_this_benchmark(capsys) -> None:
    from chronos.cli import main as cli_main

    for argv, prog in ((["demo", "--help"], "chronos demo"),
                       (["bench", "headline", "--help"], "chronos bench headline")):
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: {prog}" in out and "--full" in out and "--hypergradients" in out
