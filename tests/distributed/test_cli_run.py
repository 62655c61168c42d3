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


CONSOLE_SCRIPT = Path(sys.executable).with_name("chronos")


class Proc:
    """A command in its own session, with its output read line by line by two threads.

    ``script=True`` runs the installed ``chronos`` console script (which, unlike
    ``python -m``, does not put the current directory on ``sys.path`` by itself)."""

    def __init__(self, *args: str, cwd: Path = ROOT, script: bool = False) -> None:
        command = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "chronos.cli"]
        self.popen = subprocess.Popen(
            [*command, *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=_env(), cwd=cwd, start_new_session=True,
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
        (["run", TOY, "--steps", "-1"], "steps must be an int >= 1"),
        (["run", TOY, "--min-commits", "x"], "min_commits must be an int >= 1 or 'auto'"),
        (["run", TOY, "--seed", "abc"], "seed must be an int >= 0"),
        (["run", TOY, "--max-staleness", "-1"], "max_staleness"),
        (["run", TOY, "--timeout", "0"], "--timeout"),
        (["run", TOY, "--decay", "2"], "decay"),
        (["run", TOY, "--aggregation", "mean"], "invalid choice: 'mean'"),
        (["coordinator", "--problem", TOY, "--aggregation", "x"], "--aggregation"),
        (["coordinator", "--problem", TOY, "--seed", "-3"], "seed must be an int >= 0"),
        (["coordinator", "--problem", TOY, "--steps", "x"], "steps must be an int >= 0"),
        (["worker", TOY, "--coordinator", "localhost:5555"], "coordinator_addr"),
        (["worker", TOY, "--rank", "2", "--world-size", "2"], "--rank 2 must be < --world-size"),
        (["worker", TOY, "--coordinator", "tcp://no-such-host.invalid:5555"],
         "cannot resolve the coordinator host 'no-such-host.invalid'"),
    ],
)
def test_bad_settings_give_one_error_line(args, message, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and message in err[0], err
    assert "Traceback" not in captured.out + captured.err


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
    # per-worker accounting in the JSON: sync counts both shards equally
    workers = report["stats"]["workers"]
    assert {w: (r["accepted"], r["share"]) for w, r in workers.items()} == {
        "worker-0": (6, 0.5), "worker-1": (6, 0.5)}
    err = "".join(p.err)  # the human-readable part went to stderr
    assert "aggregation sync; per worker:" in err
    assert "worker worker-0: share 50.0%, 6 accepted, 0 rejected" in err
    assert re.search(r"version +\d+/6 \| outer loss [\d.]+ \| [\d.]+ commits/s", err), err
    assert "nan" not in err  # before the first step: "outer loss —", never "nan"
    assert "finished: version 6/6" in err and "(complete)" in err
    assert "Traceback" not in err
    wait_group_gone(p.pgid)


@pytest.mark.timeout(90)
def test_run_with_amortized_workers_and_stale_correction(procs):
    p = Proc("run", TOY, "--workers", "2", "--steps", "8", "--min-commits", "1",
             "--amortized", "--stale-correction", "--straggler-delay", "0,0.1",
             "--heartbeat-interval", "0.2", "--json", "-")
    procs.append(p)
    assert p.wait(80) == 0, p.text()
    report = json.loads("".join(p.out))
    assert report["completed"] is True and report["version"] == 8
    assert report["config"]["stale_correction"] is True
    assert report["config"]["worker_options"]["amortized"] is True
    assert "commits_corrected" in report["stats"]
    wait_group_gone(p.pgid)


@pytest.mark.timeout(90)
def test_ctrl_c_stops_the_run_and_every_worker_process(procs, tmp_path):
    report = tmp_path / "run.json"
    p = Proc("run", TOY, "--workers", "2", "--steps", "100000", "--heartbeat-interval", "0.2",
             "--max-staleness", "100", "--straggler-delay", "0.02", "--seed", "7",
             "--json", str(report))
    procs.append(p)
    p.expect(r"version +[1-9]\d*/100000", timeout=60)  # both workers are up and committing
    members = group_members(p.pgid)
    assert len(members) >= 3, members  # chronos run + 2 workers (+ the resource tracker)
    os.killpg(p.pgid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert p.wait(30) == 130, p.text()
    err = "".join(p.err)
    assert "interrupted" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
    # the summary with the final λ is still printed, and the JSON written, marked interrupted
    out = "".join(p.out)
    assert re.search(r"finished: version [1-9]\d*/100000 .*\(INTERRUPTED\)", out), out
    assert re.search(r"lam = \[-?\d", out), out
    data = json.loads(report.read_text())
    assert data["completed"] is False and data["interrupted"] is True
    assert data["version"] >= 1 and len(data["outer_params"]["lam"]) == 8
    assert data["seed"] == 7 and data["config"]["seed"] == 7
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


# -- a user's own PROBLEM module, seeds, Ctrl-C while starting ------------------------------------

USER_MODULE = '''
import torch
from test_worker import Toy


def make(rank, world_size):
    print(f"myprob rank {rank} seed {torch.initial_seed()}", flush=True)
    return Toy()
'''


@pytest.mark.timeout(90)
def test_problem_module_in_the_current_directory_is_found_by_launcher_and_workers(
        procs, tmp_path):
    (tmp_path / "myprob.py").write_text(USER_MODULE)
    # the console script, not `python -m` (which would put the directory on sys.path anyway)
    p = Proc("run", "myprob:make", "--workers", "2", "--mode", "sync", "--steps", "3",
             "--heartbeat-interval", "0.2", "--seed", "11", cwd=tmp_path, script=True)
    procs.append(p)
    assert p.wait(80) == 0, p.text()
    text = p.text()
    assert "finished: version 3/3" in text and "No module named" not in text
    # seeds: the launcher's problem (rank 0) with 11, worker RANK with 11 + RANK
    assert "myprob rank 0 seed 11" in text and "myprob rank 1 seed 12" in text, text
    wait_group_gone(p.pgid)


SLOW_MODULE = '''
import threading

print("slowprob: importing", flush=True)
threading.Event().wait(60)  # a module that takes long to import (loading data, say)


def make(rank, world_size):
    raise AssertionError("never called")
'''


@pytest.mark.timeout(60)
def test_ctrl_c_while_starting_is_clean(procs, tmp_path):
    (tmp_path / "slowprob.py").write_text(SLOW_MODULE)
    p = Proc("run", "slowprob:make", "--workers", "2", cwd=tmp_path, script=True)
    procs.append(p)
    p.expect(r"slowprob: importing", timeout=40)  # the launcher is importing the user's module
    os.killpg(p.pgid, signal.SIGINT)
    assert p.wait(30) == 130, p.text()
    err = "".join(p.err)
    assert "interrupted" in err and "Traceback" not in p.text(), p.text()
    wait_group_gone(p.pgid)


# -- connecting: say where, show progress, fail fast on a bad host name ---------------------------


@pytest.mark.timeout(60)
def test_worker_says_where_it_connects_and_that_it_keeps_trying(procs):
    port = _free_port()
    p = Proc("worker", TOY, "--coordinator", f"tcp://127.0.0.1:{port}", "--connect-timeout",
             "3.5", "--request-timeout", "0.5")
    procs.append(p)
    p.expect(rf"connecting to tcp://127\.0\.0\.1:{port} \(timeout 3\.5 s\)", timeout=40)
    p.expect(rf"no answer from tcp://127\.0\.0\.1:{port} yet after \d+ s; still trying",
             timeout=10)
    assert p.wait(30) == 1
    assert "Traceback" not in p.text()


@pytest.mark.timeout(60)
def test_worker_with_a_host_that_does_not_resolve_fails_at_once(procs):
    p = Proc("worker", TOY, "--coordinator", "tcp://no-such-host.invalid:5555")
    procs.append(p)
    assert p.wait(40) == 2
    err = [line for line in p.err if "error:" in line]
    assert len(err) == 1 and "cannot resolve the coordinator host 'no-such-host.invalid'" in err[0]
    assert "Traceback" not in p.text()


@pytest.mark.timeout(90)
def test_a_worker_started_before_its_coordinator_registers_once(procs):
    # the worker's Registers queue while nobody listens; the coordinator must see one, not a
    # burst of copies answered `duplicate_worker`
    port = _free_port()
    worker = Proc("worker", TOY, "--coordinator", f"tcp://127.0.0.1:{port}", "--worker-id", "w",
                  "--request-timeout", "0.5")
    procs.append(worker)
    worker.expect(r"no answer from .* yet after", timeout=40)  # it has re-tried a while
    coord = Proc("coordinator", "--problem", TOY, "--port", str(port), "--steps", "3",
                 "--heartbeat-interval", "0.2", "--report-every", "1")
    procs.append(coord)
    assert coord.wait(60) == 0, coord.text()
    assert worker.wait(30) == 0, worker.text()
    assert "registrations 1" in coord.text(), coord.text()
    assert "duplicate_worker" not in coord.text() + worker.text()
    for p in (coord, worker):
        wait_group_gone(p.pgid)
