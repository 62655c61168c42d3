"""Workers that die come back: ``RunConfig.max_restarts`` / ``chronos run --restart-workers``.

Real coordinator, real worker processes on 127.0.0.1. The PROBLEM is ``test_worker:toy_problem``
(this directory on ``sys.path``; spawned workers inherit it), a tiny quadratic, slowed down by
straggler delays so that a run lasts long enough for a worker to be killed and come back.
The coordinator may notice the dead worker only when its lease expires, so the lease is short
(3 s) and the pytest timeouts generous.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from chronos.cli import main
from chronos.core.errors import ConfigError
from chronos.distributed.cli import print_summary
from chronos.distributed.launcher import RunConfig, RunResult, config_dict, run_local

HERE = Path(__file__).resolve().parent
TOY = "test_worker:toy_problem"


@pytest.fixture(autouse=True)
def _toy_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))


class Killer:
    """A progress callback that SIGKILLs worker ``rank`` once the version reaches ``at``, and
    records every rank's pid at every report."""

    def __init__(self, rank: int = 1, at: int = 3) -> None:
        self.rank, self.at = rank, at
        self.killed: int | None = None
        self.pids: list[list[int | None]] = []  # worker_pids of every report
        self.kill_report: int | None = None  # index into pids of the report that killed

    def __call__(self, s: dict[str, Any]) -> None:
        pids = list(s["worker_pids"])
        assert len(pids) == 2 and all(p is None or isinstance(p, int) for p in pids)
        self.pids.append(pids)
        if self.killed is None and s["version"] >= self.at and pids[self.rank] is not None:
            os.kill(pids[self.rank], signal.SIGKILL)
            self.killed = pids[self.rank]
            self.kill_report = len(self.pids) - 1

    def pids_after_kill(self) -> list[int | None]:
        """Rank ``rank``'s pid in every report after the kill."""
        assert self.kill_report is not None, "the worker was never killed"
        return [p[self.rank] for p in self.pids[self.kill_report + 1:]]


@pytest.mark.timeout(240)
def test_a_killed_worker_is_restarted_with_its_rank_and_id(
        caplog: pytest.LogCaptureFixture) -> None:
    # worker 0 is slow (it alone would need ~80 s for the job), worker 1 fast: the job is
    # still running when worker 1 comes back, and finishes soon after it did
    cfg = RunConfig(problem=TOY, workers=2, max_steps=80, max_restarts=2, lease_timeout=3.0,
                    heartbeat_interval=0.2, straggler_delay=(1.0, 0.05), timeout=200)
    killer = Killer(rank=1, at=3)
    with caplog.at_level(logging.WARNING, logger="chronos.launcher"):
        result = run_local(cfg, killer, progress_interval=0.05)
    assert killer.killed is not None
    assert result.completed and result.version == cfg.max_steps, result.summary()["stats"]
    assert result.worker_restarts == {"worker-1": 1}
    assert result.summary()["worker_restarts"] == {"worker-1": 1}
    # a new process for rank 1 (a new pid) showed up after the kill
    assert [p for p in killer.pids_after_kill() if p not in (None, killer.killed)]
    assert "worker 1 exited with code -9; restarting it (restart 1 of 2)" in caplog.text
    # the new process registered under the same id, and ended cleanly with its stats
    assert result.stats["registrations"] >= 3
    assert set(result.stats["workers"]) == {"worker-0", "worker-1"}
    assert result.worker_exitcodes == (0, 0)
    assert "worker-1" in result.worker_stats  # its last process's


@pytest.mark.timeout(180)
def test_without_restarts_a_killed_worker_stays_dead_and_the_job_finishes() -> None:
    cfg = RunConfig(problem=TOY, workers=2, max_steps=40, lease_timeout=3.0,
                    heartbeat_interval=0.2, straggler_delay=0.05, timeout=150)
    assert cfg.max_restarts == 0
    killer = Killer(rank=1, at=3)
    result = run_local(cfg, killer, progress_interval=0.05)
    assert killer.killed is not None
    assert result.completed and result.version == cfg.max_steps
    assert result.worker_restarts == {} and result.summary()["worker_restarts"] == {}
    # rank 1 never had a process again (its killed one may show until it is reaped)
    assert set(killer.pids_after_kill()) <= {None, killer.killed}
    assert result.worker_exitcodes[1] == -signal.SIGKILL
    assert "worker-1" not in result.worker_stats


def test_run_config_checks_max_restarts() -> None:
    assert RunConfig(problem="a:b").max_restarts == 0
    assert RunConfig(problem="a:b", max_restarts=3).max_restarts == 3
    assert config_dict(RunConfig(problem="a:b", max_restarts=3))["max_restarts"] == 3
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(ConfigError, match="max_restarts must be an int >= 0"):
            RunConfig(problem="a:b", max_restarts=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_restarts=1 needs group_size=1"):
        RunConfig(problem="a:b", workers=4, group_size=2, max_restarts=1)
    RunConfig(problem="a:b", workers=4, group_size=2, max_restarts=0)  # groups alone: fine


# -- chronos run -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--max-restarts", "-1"], "max_restarts must be an int >= 0, got '-1'"),
    (["--max-restarts", "x"], "max_restarts must be an int >= 0, got 'x'"),
    (["--restart-workers", "--workers", "2", "--group-size", "2"],
     "max_restarts=5 needs group_size=1"),
])
def test_chronos_run_refuses_bad_restart_options(
        args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", TOY, *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and message in err[0], err
    assert "Traceback" not in captured.out + captured.err


def test_chronos_run_help_lists_the_restart_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--restart-workers" in text and "up to 5 times per worker" in text
    assert "--max-restarts N" in text


@pytest.mark.timeout(120)
def test_chronos_run_prints_its_coordinator_address_and_the_restart_budget(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    report = tmp_path / "run.json"
    assert main(["run", TOY, "--workers", "1", "--steps", "3", "--heartbeat-interval", "0.2",
                 "--restart-workers", "--quiet", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    m = re.search(r"^coordinator: (tcp://127\.0\.0\.1:\d+) \(attach more workers with: "
                  rf"chronos worker {re.escape(TOY)} --coordinator (tcp://\S+)\)$", out, re.M)
    assert m and m.group(1) == m.group(2), out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("chronos run "))
    assert lines[header + 1].startswith("coordinator: "), out  # right after the header
    assert "dead workers restarted up to 5 times each" in lines[header]
    assert "finished: version 3/3" in out and "restarts:" not in out  # nobody restarted
    data = json.loads(report.read_text())
    assert data["worker_restarts"] == {} and data["config"]["max_restarts"] == 5


@pytest.mark.timeout(120)
def test_with_json_on_stdout_the_address_goes_to_stderr(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", TOY, "--workers", "1", "--steps", "2", "--heartbeat-interval", "0.2",
                 "--max-restarts", "1", "--json", "-"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout holds only the JSON
    assert report["config"]["max_restarts"] == 1 and report["worker_restarts"] == {}
    assert re.search(r"^coordinator: tcp://127\.0\.0\.1:\d+ ", captured.err, re.M), captured.err


def test_summary_says_which_workers_were_restarted() -> None:
    result = RunResult(outer_params={"lam": torch.zeros(2)}, version=5, wall_time=1.0,
                       stats={}, history=[], worker_exitcodes=(0, 0, 0), completed=True,
                       worker_restarts={"worker-1": 2, "worker-2": 1})
    out = io.StringIO()
    print_summary(result, RunConfig(problem="a:b", workers=3, max_steps=5), out)
    assert "  restarts: worker-1 ×2, worker-2 ×1\n" in out.getvalue()


def test_allowed_keys_without_curve_keys_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs curve_keys"):
        RunConfig(problem=TOY, allowed_keys="keys/workers")
