"""``chronos run`` / ``chronos coordinator`` / ``chronos worker`` as real processes.

Every command runs in its own session (process group) so the tests can deliver Ctrl-C the
way a terminal does (SIGINT to the whole group) and then check, through /proc, that no
process of the group is left. The PROBLEM is ``test_worker:toy_problem`` (this directory on
``PYTHONPATH``): a tiny quadratic, so the processes spend their time starting up, not solving.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chronos.cli import main

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOY = "test_worker:toy_problem"


def _env() -> dict[str, str]:
    path = [str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p),
                PYTHONUNBUFFERED="1")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def wait_group_gone(pgid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes left behind in group {pgid}: {group_members(pgid)}")
        time.sleep(0.05)


class Proc:
    """A command in its own session, with its output read line by line by two threads."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "chronos.cli", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT, start_new_session=True,
        )
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, "out", self.out),
                             daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, "err", self.err),
                             daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream, name: str, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            self.lines.put((name, line))

    @property
    def pgid(self) -> int:
        return self.popen.pid

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Wait for a line (stdout or stderr) matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r}; got:\n{self.text()}")
            try:
                _, line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            m = re.search(pattern, line)
            if m:
                return m

    def wait(self, timeout: float = 60.0) -> int:
        code = self.popen.wait(timeout)
        for t in self._readers:
            t.join(5.0)
        return code

    def text(self) -> str:
        return "".join(self.out) + "\n--- stderr ---\n" + "".join(self.err)

    def kill_group(self) -> None:
        if group_members(self.pgid):
            os.killpg(self.pgid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.wait(10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- bad input: one line, no traceback -------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "worker", "coordinator"])
@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("no_such_module_xyz:factory", "cannot import 'no_such_module_xyz'"),
        ("not-a-spec", "must look like 'package.module:factory'"),
        (":factory", "must look like 'package.module:factory'"),
        ("chronos.benchmarks.problems:no_such_factory", "has no callable 'no_such_factory'"),
        ("chronos.core.errors:ChronosError", "not an InnerProblem"),
    ],
)
def test_bad_problem_gives_one_error_line(command, problem, message, capsys):
    args = [command, "--problem", problem] if command == "coordinator" else [command, problem]
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"chronos {command}: error: ") and message in lines[0]
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", TOY, "--workers", "0"], "workers must be an int >= 1"),
        (["run", TOY, "--max-staleness", "-1"], "max_staleness"),
        (["worker", TOY, "--coordinator", "localhost:5555"], "coordinator_addr"),
    ],
)
def test_bad_settings_give_one_error_line(args, message, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and message in err[0], err


@pytest.mark.timeout(60)
def test_bad_problem_from_the_real_command_line(procs):
    p = Proc("run", "no_such_module_xyz:factory", "--workers", "2")
    procs.append(p)
    assert p.wait(50) == 2
    assert p.text().count("error:") == 1 and "Traceback" not in p.text()
    assert not group_members(p.pgid)


# -- chronos run -----------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_run_completes_prints_progress_and_json_and_leaves_no_process(procs):
    # sync mode: every step needs both workers, so neither can miss the job (however slowly
    # it starts on a busy machine) and both leave on the coordinator's ShutdownNotice
    p = Proc("run", TOY, "--workers", "2", "--mode", "sync", "--steps", "6",
             "--heartbeat-interval", "0.2", "--json", "-")
    procs.append(p)
    assert p.wait(80) == 0, p.text()
    report = json.loads("".join(p.out))  # stdout holds only the JSON
    assert report["completed"] is True and report["version"] == 6
    assert report["worker_exitcodes"] == [0, 0]
    assert report["stats"]["commits_accepted"] == 12 and len(report["history"]) == 6
    assert all(h["commits"] == 2 for h in report["history"])
    assert report["config"]["workers"] == 2 and report["config"]["max_steps"] == 6
    err = "".join(p.err)  # the human-readable part went to stderr
    assert re.search(r"version +\d+/6 \| outer loss [\d.]+ \| [\d.]+ commits/s", err), err
    assert "finished: version 6/6" in err and "(complete)" in err
    assert "Traceback" not in err
    wait_group_gone(p.pgid)


@pytest.mark.timeout(90)
def test_ctrl_c_stops_the_run_and_every_worker_process(procs):
    p = Proc("run", TOY, "--workers", "2", "--steps", "100000", "--heartbeat-interval", "0.2",
             "--max-staleness", "100", "--straggler-delay", "0.02")
    procs.append(p)
    p.expect(r"version +[1-9]\d*/100000", timeout=60)  # both workers are up and committing
    members = group_members(p.pgid)
    assert len(members) >= 3, members  # chronos run + 2 workers (+ the resource tracker)
    os.killpg(p.pgid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert p.wait(30) == 130, p.text()
    err = "".join(p.err)
    assert "interrupted" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
    wait_group_gone(p.pgid)
    assert not [pid for pid in members if os.path.exists(f"/proc/{pid}")
                and pid in group_members(p.pgid)]


# -- chronos coordinator + chronos worker (multi-host style, here on 127.0.0.1) -----------------


@pytest.mark.timeout(90)
def test_coordinator_and_worker_commands_work_together(procs):
    # sync mode: both workers take part in every step (see the test above)
    coord = Proc("coordinator", "--problem", TOY, "--port", "0", "--steps", "8", "--mode",
                 "sync", "--num-workers", "2", "--heartbeat-interval", "0.2",
                 "--report-every", "1")
    procs.append(coord)
    address = coord.expect(r"listening on (tcp://127\.0\.0\.1:\d+)").group(1)
    workers = [Proc("worker", TOY, "--coordinator", address, "--rank", str(r), "--world-size",
                    "2", "--worker-id", f"host-{r}", "--request-timeout", "2")
               for r in range(2)]
    procs.extend(workers)
    assert coord.wait(60) == 0, coord.text()
    assert "stopped at version 8; commits accepted 16" in coord.text()
    for r, w in enumerate(workers):
        assert w.wait(30) == 0, w.text()
        assert re.search(rf"worker host-{r} done in [\d.]+ s \(job done", w.text()), w.text()
        assert "Traceback" not in w.text()
    for p in (coord, *workers):
        wait_group_gone(p.pgid)


@pytest.mark.timeout(60)
def test_worker_command_without_a_coordinator_fails_clearly(procs):
    port = _free_port()
    p = Proc("worker", TOY, "--coordinator", f"tcp://127.0.0.1:{port}", "--connect-timeout",
             "0.5", "--request-timeout", "0.2")
    procs.append(p)
    assert p.wait(50) == 1
    err = [line for line in p.err if "error:" in line]
    assert len(err) == 1 and f"no coordinator answered at tcp://127.0.0.1:{port}" in err[0]
    assert "Traceback" not in p.text()


@pytest.mark.timeout(90)
def test_ctrl_c_on_the_coordinator_tells_its_workers_to_leave(procs):
    coord = Proc("coordinator", "--problem", TOY, "--port", "0", "--steps", "0",
                 "--heartbeat-interval", "0.2", "--max-staleness", "100", "--report-every", "0.2")
    procs.append(coord)
    address = coord.expect(r"listening on (tcp://127\.0\.0\.1:\d+)").group(1)
    worker = Proc("worker", TOY, "--coordinator", address, "--worker-id", "w", "--straggler-delay",
                  "0.02")
    procs.append(worker)
    coord.expect(r"version [1-9]\d* \| workers 1", timeout=60)  # the worker is committing
    os.killpg(coord.pgid, signal.SIGINT)
    assert coord.wait(30) == 130, coord.text()
    assert worker.wait(30) == 0, worker.text()
    assert re.search(r"worker w done in [\d.]+ s \([^)]*stopped", worker.text()), worker.text()
    assert "Traceback" not in coord.text() + worker.text()
    for p in (coord, worker):
        wait_group_gone(p.pgid)
