"""Worker groups in the runtime: real coordinator, real worker processes, real gloo groups.

``run_local(group_size=2)`` end to end; a follower SIGKILLed mid-run makes its group fail
loudly and the coordinator see the leader leave (well before any lease could expire); the
``python -m chronos.distributed.torchrun`` entry point under real ``torchrun``; and bad
input to ``chronos run``'s group options.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chronos.cli import main as cli_main
from chronos.core.errors import ConfigError
from chronos.distributed.group import GroupSpec, free_port
from chronos.distributed.group_worker import GroupSettings, group_main
from chronos.distributed.inner_sync import SyncPolicy
from chronos.distributed.launcher import (
    RunConfig,
    coordinator_settings,
    initial_outer_params,
    make_coordinator,
    make_problem,
    run_local,
)
from chronos.distributed.torchrun import main as torchrun_main
from chronos.distributed.worker import WorkerConfig

DIGITS = "chronos.benchmarks.problems:digits_weight_decay"
ROOT = Path(__file__).resolve().parents[2]


def _coordinator(mode: str = "async", max_steps: int = 1000, lease_timeout: float = 60.0):
    prob = make_problem(DIGITS, 0, 1)
    return make_coordinator(initial_outer_params(prob, DIGITS),
                            coordinator_settings(None, None, 1, prob), port=0, mode=mode,
                            max_steps=max_steps, lease_timeout=lease_timeout)


@pytest.mark.timeout(180)
def test_run_local_with_two_groups_counts_both_channels() -> None:
    cfg = RunConfig(problem=DIGITS, workers=4, group_size=2, mode="sync", max_steps=3,
                    inner_steps=20, sync="significance", seed=0, timeout=150)
    result = run_local(cfg)
    assert result.completed and result.version == 3
    assert list(result.worker_exitcodes) == [0, 0, 0, 0]
    # one coordinator worker per group: the leaders (ranks 0 and 2)
    assert set(result.stats["workers"]) == {"worker-0", "worker-2"}
    groups = {wid: s["group"] for wid, s in result.worker_stats.items()}
    assert [groups[w]["role"] for w in sorted(groups)] == ["leader", "follower"] * 2
    for leader, follower in (("worker-0", "worker-1"), ("worker-2", "worker-3")):
        assert groups[leader]["rounds"] == groups[follower]["rounds"] >= 1
        assert groups[leader]["syncs"] == groups[follower]["syncs"] >= 1
        # both ranks hold the same θ at the end
        assert groups[leader]["test_accuracy"] == groups[follower]["test_accuracy"] > 0.8
    coll = result.bytes_by_op()["collective"]
    assert {"params", "decision", "hvp", "mixed", "outer", "control"} <= set(coll)
    assert "grad" not in coll  # significance never all-reduces gradients
    for op in ("params", "decision", "hvp", "mixed"):  # all-reduces: sent == received
        assert coll[op]["sent"] == coll[op]["received"] > 0
    # λ (64 float32) goes from each leader to its follower once per round
    rounds = groups["worker-0"]["rounds"] + groups["worker-2"]["rounds"]
    assert coll["outer"]["sent"] == coll["outer"]["received"] == rounds * 64 * 4


@pytest.mark.timeout(120)
def test_killed_follower_fails_the_group_and_the_leader_leaves_the_coordinator() -> None:
    coordinator = _coordinator(lease_timeout=60.0).start()
    ctx = mp.get_context("spawn")
    port = free_port()
    settings = GroupSettings(policy=SyncPolicy.parse("every_step"), inner_steps=200)
    procs = []
    try:
        for rank in range(2):
            wcfg = WorkerConfig(coordinator_addr=coordinator.address, worker_id="group-a",
                                connect_timeout=30.0)
            spec = GroupSpec(rank=rank, world_size=2, port=port, timeout=30.0)
            procs.append(ctx.Process(target=group_main, daemon=True, args=(
                DIGITS, rank, 2, spec, settings, wcfg)))
            procs[-1].start()
        assert coordinator.wait_for_version(1, timeout=60), "the group never committed"
        assert coordinator.stats()["workers_alive"] == 1
        os.kill(procs[1].pid, signal.SIGKILL)  # the follower, mid-collective or close to it
        t0 = time.monotonic()
        procs[0].join(timeout=20)
        # loudly: exit code 1 from the error (or gloo's own abort, -6, when its thread is
        # torn down under load), never a hang or 0
        assert procs[0].exitcode in (1, -6), "the leader must fail loudly, not hang or exit 0"
        while coordinator.stats()["workers_alive"] != 0:
            assert time.monotonic() - t0 < 15, "the coordinator did not see the leader leave"
            coordinator.wait(timeout=0.05)
        # gone by its Deregister, not by a lease expiring (60 s)
        assert time.monotonic() - t0 < 15
        assert coordinator.stats()["workers"]["group-a"]["alive"] is False
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        coordinator.stop()


@pytest.mark.timeout(150)
def test_torchrun_runs_a_group_from_its_environment() -> None:
    coordinator = _coordinator(max_steps=100).start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             "2", "-m", "chronos.distributed.torchrun", DIGITS, "--coordinator",
             coordinator.address, "--inner-steps", "10", "--max-iterations", "2",
             "--worker-id", "torchrun-group", "--sync", "periodic:5"],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        stats = coordinator.stats()
        assert set(stats["workers"]) == {"torchrun-group"}  # rank 0 only
        assert stats["workers"]["torchrun-group"]["accepted"] == 2
        assert coordinator.version == 2
    finally:
        coordinator.stop()


def test_torchrun_entry_point_without_its_environment_says_what_to_do(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_main([DIGITS, "--coordinator", "tcp://127.0.0.1:5555"]) == 2
    err = capsys.readouterr().err
    assert "RANK is not set" in err and "torchrun" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "3", "--group-size", "2"], "divides workers=3"),
    (["--workers", "2", "--group-size", "2", "--sync", "periodic:0"], "period must be"),
    (["--workers", "2", "--group-size", "2", "--sync", "sometimes"], "unknown sync policy"),
    (["--workers", "2", "--group-size", "2", "--group-codec", "zip"], "codec"),
    (["--group-size", "0"], "group_size"),
    (["--workers", "2", "--group-size", "2", "--hypergradient", "unrolled", "--unroll-lr",
      "0.1"], "implicit hypergradients"),
    (["--workers", "2", "--group-size", "2", "--amortized"], "implicit hypergradients"),
])
def test_chronos_run_refuses_bad_group_options(
        args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["run", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_problem_only_lbfgs_can_solve_is_refused_before_anything_starts() -> None:
    cfg = RunConfig(problem="chronos.benchmarks.problems:digits_ridge", workers=2,
                    group_size=2, mode="sync", max_steps=1)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="L-BFGS"):
        run_local(cfg)
    assert time.monotonic() - t0 < 10
