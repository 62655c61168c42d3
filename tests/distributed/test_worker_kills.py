"""Workers SIGKILLed again and again during a run: the job completes, no acknowledged commit is
lost or applied twice (the workers' own acknowledgement logs against the coordinator's
journal), and the coordinator lets a dead worker go at once (its connection closed), not after
a lease timeout. Real coordinator, real worker processes, 127.0.0.1."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from chronos.distributed.journal import Journal
from chronos.distributed.launcher import RunConfig, run_local

HERE = Path(__file__).resolve().parent
TOY = "test_worker:toy_problem"
HEARTBEAT = 0.5


@pytest.fixture(autouse=True)
def _toy_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))


class Killer:
    """A progress callback (every 20 ms): SIGKILLs a random live worker every ``every``
    versions, ``kills`` times, and measures how long the coordinator takes to notice each
    death (``workers_disconnected`` goes up)."""

    def __init__(self, kills: int, every: int, seed: int = 0) -> None:
        self.left, self.every = kills, every
        self.rng = random.Random(seed)
        self.next_at = every
        self.killed: list[tuple[float, int]] = []  # (time, disconnected count before)
        self.stalls: list[float] = []

    def __call__(self, s: dict[str, Any]) -> None:
        now = time.monotonic()
        if self.killed and len(self.stalls) < len(self.killed):
            t, before = self.killed[len(self.stalls)]
            if s["workers_disconnected"] > before:
                self.stalls.append(now - t)
        if self.left and s["version"] >= self.next_at and len(self.stalls) == len(self.killed) \
                and s["workers_alive"] == 3:  # every process registered: the kill is noticed
            live = [p for p in s["worker_pids"] if p is not None]
            if live:
                os.kill(self.rng.choice(live), signal.SIGKILL)
                self.killed.append((time.monotonic(), s["workers_disconnected"]))
                self.left -= 1
                self.next_at = s["version"] + self.every


@pytest.mark.timeout(300)
def test_repeated_worker_kills_lose_no_acknowledged_commit_and_stall_briefly(
        tmp_path: Path) -> None:
    acks = tmp_path / "acks.log"
    state = tmp_path / "state"
    cfg = RunConfig(problem=TOY, workers=3, max_steps=100, max_restarts=4, lease_timeout=30.0,
                    heartbeat_interval=HEARTBEAT, straggler_delay=0.2, timeout=240,
                    state_dir=str(state), worker_options={"ack_log": str(acks)})
    killer = Killer(kills=4, every=8)
    result = run_local(cfg, killer, progress_interval=0.02)
    assert len(killer.killed) == 4
    assert result.completed and result.version == cfg.max_steps, result.summary()["stats"]
    assert sum(result.worker_restarts.values()) == 4
    # every death noticed within two heartbeat intervals (the lease timeout is 30 s)
    print(f"stalls after each death: {[round(x, 3) for x in killer.stalls]} s")
    assert len(killer.stalls) == 4 and max(killer.stalls) <= 2 * HEARTBEAT, killer.stalls
    # the workers' acknowledgements against the coordinator's journal
    acked = [line.split() for line in acks.read_text().splitlines()]
    accepted = {(w, c) for w, c, status, _ in acked if status == "accepted"}
    assert len(accepted) == sum(1 for a in acked if a[2] == "accepted")  # none acked twice
    with Journal(state) as j:
        tree, records = j.restore()
    assert tree is not None
    logged = [(w, c) for w, c, _s, _wt in tree["seen_commits"]]
    logged += [(r.meta["w"], r.meta["c"]) for r in records if r.kind == "commit"]
    assert len(logged) == len(set(logged))  # applied once each
    assert accepted <= set(logged)  # 0 acknowledged commits lost
    # commits applied but never acknowledged: only those whose reply died with a worker
    assert len(set(logged) - accepted) <= len(killer.killed)
    assert result.stats["commits_accepted"] == len(logged)
