"""Load test: one coordinator, 64 concurrent clients, a bounded time.

The coordinator (:class:`~chronos.distributed.Coordinator`) runs in this process, in its own
thread as usual. The clients run in ``P`` spawned processes (default ``min(4, cores)``); each
process drives its share of the clients from one loop: one non-blocking DEALER socket per
client (:class:`~chronos.distributed.transport.ClientTransport`, no routing identity: the
ROUTER picks one) and one :class:`zmq.Poller` over all of them. Clients compute nothing. A
client's cycle: ``Checkout`` (answered ``granted`` / ``not_modified`` at once, or ``deferred``
and granted later with the same request id) → optional think time (``--think-ms``, default 0)
→ ``Commit`` of a λ-shaped hypergradient (random normal, fixed seed) on the granted version
with a unique ``commit_id`` → again. Every client also sends a ``Heartbeat`` every
``heartbeat_interval`` (from its ``Registered`` reply). A ``LeaseCancelled`` for the lease a
client holds makes it check out again; a ``ShutdownNotice`` stops it.

Two configurations, one after the other, each on a fresh coordinator (the client processes
are spawned once and serve both):

* ``permissive``: nearly everything accepted: window 1000, staleness 1000,
  ``aggregation="buffered"``, ``min_commits=1`` (one outer step per commit);
* ``default``: the coordinator's defaults (window 3, staleness 4, ``aggregation="latest"``,
  ``min_commits="auto"``).

Both use SGD with a tiny ``outer_lr`` (1e-6) so λ stays finite. λ is one float32 tensor of
``--params`` elements (default 10,000).

Each configuration is measured for ``--duration`` seconds (default 20) from the moment every
client has registered: commits per second (commit replies received in the window), commits
accepted / rejected / duplicate, checkouts granted / not modified / deferred, leases
cancelled, error replies (as the clients saw them, and the coordinator's own counters over the
same window, from two :meth:`~chronos.distributed.Coordinator.stats` snapshots), latency
percentiles of a commit (send → ``CommitReply``) and of a checkout (send → grant, a deferral
included), the coordinator process's resident memory (``VmRSS``, sampled every 0.5 s: at the
window's start, its maximum, at its end), its CPU seconds (``time.process_time`` of this
process: the clients live in other processes) and messages / bytes on the wire
(coordinator side, per op too). Clients send their counts and latency samples (plain lists
of floats) back over a multiprocessing queue at the end.

Run: ``python -m chronos.benchmarks.load`` (``--clients``, ``--processes``, ``--duration``,
``--params``, ``--modes``, ``--think-ms``, ``--out``, ``--quiet``); writes ``results/load.json``
(after each configuration) and prints a table. :func:`load_rows` turns the JSON into Markdown
table rows for the README.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from queue import Empty
from typing import Any

import torch
import zmq

from chronos.benchmarks.staleness import jsonable, machine_info
from chronos.core.errors import ChronosError
from chronos.distributed.coordinator import Coordinator
from chronos.distributed.messages import (
    Checkout,
    CheckoutReply,
    Commit,
    CommitReply,
    Deregister,
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    LeaseCancelled,
    Register,
    Registered,
    ShutdownNotice,
)
from chronos.distributed.protocol import DecodeError
from chronos.distributed.transport import ClientTransport

__all__ = ["LOAD_HEADER", "MODES", "ClientProcesses", "LoadTestError", "load_rows", "main",
           "percentiles", "run_mode"]

MODES: dict[str, dict[str, Any]] = {
    "permissive": {"max_in_flight": 1000, "max_staleness": 1000, "aggregation": "buffered",
                   "min_commits": 1},
    "default": {},
    "journal-batch": {"journal_sync": "batch"},
    "journal-always": {"journal_sync": "always"},
}
"""Coordinator settings of each configuration (on top of SGD with :data:`OUTER_LR`). The
``journal-*`` ones are the defaults with a durable state directory (a fresh temporary one):
every accepted commit written to the log before its reply, with one fsync per batch of
messages (group commit) or one per record — what durability costs next to ``default``."""

OUTER_LR = 1e-6
KEY = "lam"  # λ's only key
REGISTER_TIMEOUT_S = 60.0  # a process's clients must all be registered by then
START_TIMEOUT_S = 180.0  # spawning, importing and registering, all processes
COLLECT_GRACE_S = 60.0  # after the window: deregistering and sending the results back
JOIN_TIMEOUT_S = 10.0

# shared flag between the main process and the client processes
_WAIT, _GO, _ABORT = 0, 1, 2

LOAD_HEADER = (
    "| Mode | Clients | Commits/s | Accepted | Commit latency p50 / p99 (ms) | "
    "Coordinator RSS start → max (MiB) |",
    "|---|---:|---:|---:|---:|---:|",
)
"""Header and separator lines of the Markdown table whose rows :func:`load_rows` makes."""


class LoadTestError(ChronosError, RuntimeError):
    """The load test could not run (clients failed to register, a process died...)."""


# -- statistics ---------------------------------------------------------------------------------


def percentiles(samples: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, Any]:
    """``{"n", "mean", "min", "max", "p50", ...}`` of ``samples`` (linear interpolation
    between order statistics; ``None`` for every figure but ``n`` when there are no samples).

    >>> percentiles([1.0, 2.0, 3.0, 4.0])["p50"]
    2.5
    """
    xs = sorted(float(x) for x in samples)
    out: dict[str, Any] = {"n": len(xs)}
    if not xs:
        out.update({"mean": None, "min": None, "max": None, **{f"p{q:g}": None for q in qs}})
        return out
    out["mean"] = math.fsum(xs) / len(xs)
    out["min"] = xs[0]
    out["max"] = xs[-1]
    for q in qs:
        pos = (len(xs) - 1) * q / 100.0
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[f"p{q:g}"] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


# -- memory -------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    """This process's resident set size (``VmRSS`` in ``/proc/self/status``), or ``None``."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class _RssSampler:
    """Samples :func:`_rss_bytes` every ``interval`` seconds from a thread of its own."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (time.time(), bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-rss", daemon=True)

    def sample(self) -> int | None:
        rss = _rss_bytes()
        if rss is not None:
            self.samples.append((time.time(), rss))
        return rss

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)


# -- the client side (runs in spawned processes) ------------------------------------------------

# client states
_REGISTER, _IDLE, _CHECKOUT, _THINK, _COMMIT, _STOPPED, _FAILED = range(7)


class _Client:
    """One simulated worker: its socket, its protocol state and its counts."""

    __slots__ = ("have_version", "heartbeat_s", "lease_rid", "lease_version", "name",
                 "next_heartbeat", "pending_rid", "sent_at", "state", "think_until", "transport")

    def __init__(self, name: str, transport: Any) -> None:
        self.name = name
        self.transport = transport
        self.state = _REGISTER
        self.pending_rid = -1  # the request whose reply the client waits for
        self.sent_at = 0.0  # perf_counter() when it was sent
        self.lease_rid = -1  # the checkout that granted the lease held
        self.lease_version = -1
        self.have_version = -1
        self.think_until = 0.0
        self.heartbeat_s = 2.0
        self.next_heartbeat = math.inf


def _new_counts() -> dict[str, Any]:
    return {
        "commits": 0, "commits_accepted": 0, "commits_rejected": 0, "commits_duplicate": 0,
        "checkouts_sent": 0, "checkouts_granted": 0, "checkouts_not_modified": 0,
        "checkouts_deferred": 0, "leases_cancelled": 0, "leases_cancelled_after_commit": 0,
        "heartbeats_sent": 0, "heartbeat_acks": 0, "errors": 0, "errors_by_code": {},
        "decode_errors": 0, "shutdown_notices": 0, "stray_replies": 0, "reregistrations": 0,
        "send_failures": 0, "in_flight_at_end": 0,
    }


class _ClientGroup:
    """The clients of one process and the loop that drives them."""

    def __init__(self, address: str, names: Sequence[str], numel: int, seed: int,
                 think_s: float) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.grad = {KEY: torch.randn(numel, generator=gen, dtype=torch.float32)}
        self.think_s = think_s
        self.rids = itertools.count(1)
        self.clients: list[_Client] = []
        self.poller = zmq.Poller()
        self.by_socket: dict[Any, _Client] = {}
        self.sweep: list[_Client] = []  # clients without a pollable socket (see _socket_of)
        for name in names:
            t = ClientTransport(address)  # no identity: the ROUTER assigns one
            c = _Client(name, t)
            self.clients.append(c)
            sock = _socket_of(t)
            if sock is None:
                self.sweep.append(c)
            else:
                self.poller.register(sock, zmq.POLLIN)
                self.by_socket[sock] = c
        self.counting = False  # inside the measured window
        self.active = False  # clients start new cycles
        self.counts = _new_counts()
        self.commit_ms: list[float] = []
        self.checkout_ms: list[float] = []
        self.error_samples: list[str] = []
        self.nonce = f"{os.getpid()}-{time.time_ns()}"

    # -- sending ------------------------------------------------------------------------------

    def _send(self, c: _Client, msg: Any) -> bool:
        ok = bool(c.transport.send_message(msg))
        if not ok:
            self.counts["send_failures"] += 1
        return ok

    def register(self, c: _Client) -> None:
        c.state, c.pending_rid = _REGISTER, next(self.rids)
        c.sent_at = time.perf_counter()
        self._send(c, Register(request_id=c.pending_rid, worker_id=c.name,
                               info={"benchmark": "load", "nonce": self.nonce}))

    def checkout(self, c: _Client) -> None:
        c.state, c.pending_rid = _CHECKOUT, next(self.rids)
        c.sent_at = time.perf_counter()
        if self.counting:
            self.counts["checkouts_sent"] += 1
        self._send(c, Checkout(request_id=c.pending_rid, worker_id=c.name,
                               have_version=c.have_version))

    def commit(self, c: _Client) -> None:
        rid = next(self.rids)
        c.state, c.pending_rid = _COMMIT, rid
        c.sent_at = time.perf_counter()
        self._send(c, Commit(request_id=rid, worker_id=c.name, version=c.lease_version,
                             commit_id=f"{c.name}-{self.nonce}-{rid}",
                             hypergradient=self.grad))

    def heartbeat(self, c: _Client, now: float) -> None:
        c.next_heartbeat = now + c.heartbeat_s
        if self.counting:
            self.counts["heartbeats_sent"] += 1
        self._send(c, Heartbeat(request_id=next(self.rids), worker_id=c.name))

    def deregister_all(self) -> None:
        for c in self.clients:
            if c.state in (_CHECKOUT, _THINK, _COMMIT):
                self.counts["in_flight_at_end"] += 1
            if c.state not in (_FAILED, _STOPPED, _REGISTER):
                c.state = _STOPPED
                self._send(c, Deregister(request_id=next(self.rids), worker_id=c.name))

    def close(self) -> None:
        for c in self.clients:
            c.transport.close()

    # -- receiving ----------------------------------------------------------------------------

    def _error(self, code: str, text: str) -> None:
        if self.counting:
            self.counts["errors"] += 1
            by = self.counts["errors_by_code"]
            by[code] = by.get(code, 0) + 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{code}: {text}"[:300])

    def on_message(self, c: _Client, m: Any, now: float) -> None:
        counts, counting = self.counts, self.counting
        rid = m.request_id
        if isinstance(m, CommitReply):
            if c.state != _COMMIT or rid != c.pending_rid:
                counts["stray_replies"] += counting
                return
            if counting:
                self.commit_ms.append((now - c.sent_at) * 1000.0)
                counts["commits"] += 1
                counts[f"commits_{m.status}"] = counts.get(f"commits_{m.status}", 0) + 1
            c.state, c.lease_rid = _IDLE, -1
            if self.active:
                self.checkout(c)
        elif isinstance(m, CheckoutReply):
            if c.state != _CHECKOUT or rid != c.pending_rid:
                counts["stray_replies"] += counting
                return
            if m.status == "deferred":
                counts["checkouts_deferred"] += counting
                return
            if counting:
                self.checkout_ms.append((now - c.sent_at) * 1000.0)
                key = "checkouts_not_modified" if m.status == "not_modified" else \
                    "checkouts_granted"
                counts[key] += 1
            c.lease_rid, c.lease_version, c.have_version = rid, m.version, m.version
            if not self.active:
                c.state = _IDLE  # the window closed meanwhile: the lease is left to expire
            elif self.think_s > 0:
                c.state, c.think_until = _THINK, now + self.think_s
            else:
                self.commit(c)
        elif isinstance(m, LeaseCancelled):
            if rid != c.lease_rid:
                counts["stray_replies"] += counting
            elif c.state == _THINK:
                counts["leases_cancelled"] += counting
                c.state, c.lease_rid = _IDLE, -1
                if self.active:
                    self.checkout(c)
            else:  # the commit is on its way already; its reply says what became of it
                counts["leases_cancelled_after_commit"] += counting
        elif isinstance(m, HeartbeatAck):
            counts["heartbeat_acks"] += counting
        elif isinstance(m, Registered):
            if c.state == _REGISTER and rid == c.pending_rid:
                hb = m.config.get("heartbeat_interval")
                if isinstance(hb, (int, float)) and not isinstance(hb, bool) and hb > 0:
                    c.heartbeat_s = float(hb)
                c.state, c.next_heartbeat = _IDLE, now + c.heartbeat_s
                if self.active:
                    self.checkout(c)
            else:
                counts["stray_replies"] += counting
        elif isinstance(m, ErrorReply):
            self._error(m.code, m.message)
            if rid != c.pending_rid or c.state not in (_REGISTER, _CHECKOUT, _COMMIT):
                return
            if c.state == _REGISTER:
                c.state = _FAILED
            elif m.code == "unknown_worker":  # expired: join again
                counts["reregistrations"] += 1
                self.register(c)
            else:  # the request was refused: drop the lease, check out again
                c.state, c.lease_rid = _IDLE, -1
                if self.active:
                    self.checkout(c)
        elif isinstance(m, ShutdownNotice):
            counts["shutdown_notices"] += 1
            c.state = _STOPPED
        else:
            counts["stray_replies"] += counting

    def _drain(self, c: _Client) -> None:
        t = c.transport
        while True:
            try:
                m = t.recv_message(timeout_ms=0)
            except DecodeError as e:
                self.counts["decode_errors"] += 1
                self._error("decode", str(e))
                continue
            if m is None:
                return
            # its own clock reading: handling one reply may send the next request (sent_at)
            self.on_message(c, m, time.perf_counter())

    def pump(self, max_wait_s: float) -> None:
        """Fire due timers (heartbeats, think time), wait up to ``max_wait_s`` for replies and
        handle every one that is there."""
        now = time.perf_counter()
        wait = max_wait_s
        for c in self.clients:
            st = c.state
            if st in (_STOPPED, _FAILED):
                continue
            if st != _REGISTER and now >= c.next_heartbeat:
                self.heartbeat(c, now)
            if st == _THINK:
                if now >= c.think_until:
                    self.commit(c)
                else:
                    wait = min(wait, c.think_until - now)
            elif st == _IDLE and self.active:
                self.checkout(c)
            wait = min(wait, max(0.0, c.next_heartbeat - now))
        if self.sweep:  # no pollable socket: poll each transport briefly instead
            wait = min(wait, 0.0005)
        events = self.poller.poll(max(0, int(wait * 1000))) if self.by_socket else []
        if self.sweep and not events:
            time.sleep(wait)
        for sock, _ in events:
            self._drain(self.by_socket[sock])
        for c in self.sweep:
            self._drain(c)


def _socket_of(transport: Any) -> Any:
    """The zmq socket behind a :class:`ClientTransport`, for a :class:`zmq.Poller` (it has no
    public accessor); ``None`` if it cannot be found, and the group then polls each transport
    in turn."""
    sock = getattr(transport, "_sock", None)
    return sock if isinstance(sock, zmq.Socket) else None


def _run_clients(slot: int, task: dict[str, Any], flag: Any, start_at: Any, live: Any,
                 results: Any) -> None:
    """One configuration in a client process: register the task's clients, report, wait for
    the go, run the cycles for ``duration`` seconds from ``start_at``, deregister, send the
    counts back on ``results``."""
    names, duration = task["names"], task["duration"]
    group = _ClientGroup(task["address"], names, task["numel"], task["seed"], task["think_s"])
    try:
        began = time.time()
        for c in group.clients:
            group.register(c)
        deadline = time.time() + REGISTER_TIMEOUT_S
        while any(c.state == _REGISTER for c in group.clients) and time.time() < deadline \
                and flag.value != _ABORT:
            group.pump(0.05)
        ok = sum(c.state == _IDLE for c in group.clients)
        results.put(("registered", slot, {"registered": ok, "clients": len(names),
                                          "seconds": time.time() - began,
                                          "errors": list(group.error_samples)}))
        if ok < len(names):
            return
        deadline = time.time() + START_TIMEOUT_S + REGISTER_TIMEOUT_S
        while flag.value == _WAIT and time.time() < deadline:
            group.pump(0.02)  # heartbeats while the other processes get ready
        if flag.value != _GO:
            return
        t0 = float(start_at.value)
        t1 = t0 + duration
        while time.time() < t0:
            group.pump(min(0.02, max(0.0, t0 - time.time())))
        cpu0 = time.process_time()
        group.counting = group.active = True
        for c in group.clients:
            if c.state == _IDLE:
                group.checkout(c)
        while True:
            now = time.time()
            if now >= t1 or flag.value == _ABORT:
                break
            group.pump(min(0.05, t1 - now))
            live[slot] = group.counts["commits"]
        group.counting = group.active = False
        cpu = time.process_time() - cpu0
        group.deregister_all()
        group.pump(0.05)  # let the Deregisters leave before LINGER 0 closes the sockets
        results.put(("result", slot, {
            **group.counts, "cpu_s": cpu, "commit_ms": group.commit_ms,
            "checkout_ms": group.checkout_ms, "errors_seen": list(group.error_samples),
            "clients": len(names)}))
    finally:
        group.close()


def _client_process(slot: int, flag: Any, start_at: Any, live: Any, tasks: Any,
                    results: Any) -> None:
    """A client process: run each configuration ``tasks`` hands it (see :func:`_run_clients`)
    until ``"exit"`` (or an abort, or the parent's death)."""
    torch.set_num_threads(1)
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=0.5)
        except Empty:
            if flag.value == _ABORT or os.getppid() != parent:
                break
            continue
        if task == "exit":
            break
        _run_clients(slot, task, flag, start_at, live, results)
    results.close()
    results.join_thread()  # everything put is in the pipe
    # sockets closed, results delivered: skip the interpreter's (torch's) slow teardown
    os._exit(0)


# -- the main process ---------------------------------------------------------------------------


_GAUGES = frozenset({"workers_alive", "deferred_pending", "buffered_commits", "leases",
                     "min_commits", "delta_copies", "latest_entries", "latest_bytes",
                     "uptime_s"})
"""Figures of ``stats()`` that are levels, not running totals: reported as they end."""


def _coordinator_counters(stats: dict[str, Any]) -> dict[str, float]:
    """The numeric top-level figures of ``stats()``."""
    return {k: v for k, v in stats.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _merge(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for p in parts:
        for k, v in p.items():
            if k in ("commit_ms", "checkout_ms", "errors_seen"):
                total.setdefault(k, []).extend(v)
            elif k == "errors_by_code":
                by = total.setdefault(k, {})
                for code, n in v.items():
                    by[code] = by.get(code, 0) + n
            elif isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
    return total


def _reap(procs: Sequence[Any]) -> None:
    """Join every process; terminate, then kill, what does not end in time."""
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(JOIN_TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(JOIN_TIMEOUT_S)


class ClientProcesses:
    """``processes`` spawned client processes, kept for several configurations (spawning one
    costs an interpreter and a torch import). Use as a context manager: leaving it tells them
    to exit and joins them (terminating, then killing, any that does not end in time)."""

    def __init__(self, processes: int) -> None:
        ctx = mp.get_context("spawn")
        self.flag = ctx.RawValue("i", _WAIT)
        self.start_at = ctx.RawValue("d", 0.0)
        self.live = ctx.RawArray("q", processes)
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(processes)]
        self.procs: list[Any] = []
        try:
            for slot in range(processes):
                p = ctx.Process(target=_client_process, name=f"load-clients-{slot}", daemon=True,
                                args=(slot, self.flag, self.start_at, self.live,
                                      self.tasks[slot], self.results))
                p.start()
                self.procs.append(p)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ClientProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def abort(self) -> None:
        """Make every process give up what it is doing and exit."""
        self.flag.value = _ABORT

    def close(self) -> None:
        try:
            for q in self.tasks:
                q.put("exit")
            _reap(self.procs)
        finally:
            for q in (*self.tasks, self.results):
                q.close()
                q.cancel_join_thread()


def run_mode(mode: str, *, clients: int, processes: int, duration: float, numel: int,
             think_s: float = 0.0, seed: int = 0, log: Callable[[str], None] = print,
             pool: ClientProcesses | None = None) -> dict[str, Any]:
    """One configuration: a coordinator here, ``clients`` clients in ``processes`` client
    processes (``pool``'s, or new ones for this call) for ``duration`` seconds; every figure
    measured (see the module docstring)."""
    if pool is None:
        with ClientProcesses(processes) as own:
            return run_mode(mode, clients=clients, processes=processes, duration=duration,
                            numel=numel, think_s=think_s, seed=seed, log=log, pool=own)
    if len(pool.procs) != processes:
        raise ValueError(f"pool has {len(pool.procs)} processes, run_mode got {processes}")
    settings = {**MODES[mode], "optimizer": "sgd", "outer_lr": OUTER_LR}
    names = [f"load-{mode}-{i:03d}" for i in range(clients)]
    sampler = _RssSampler(0.5)
    state_dir = None
    if "journal_sync" in settings:
        state_dir = tempfile.mkdtemp(prefix="chronos-load-")
        settings["state_dir"] = state_dir
    try:
        coord = Coordinator({KEY: torch.zeros(numel, dtype=torch.float32)}, port=0,
                            **settings)
    except BaseException:
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)
        raise
    began = time.time()
    ok = False
    try:
        sampler.start()
        coord.start()
        pool.flag.value = _WAIT
        for slot in range(processes):
            pool.live[slot] = 0
            pool.tasks[slot].put({"address": coord.address, "names": names[slot::processes],
                                  "numel": numel, "seed": seed + slot, "think_s": think_s,
                                  "duration": duration})
        registered = _wait_for(pool.results, pool.procs, "registered", START_TIMEOUT_S)
        missing = [(s, r) for s, r in registered.items() if r["registered"] < r["clients"]]
        if missing:
            slot, r = missing[0]
            why = "; ".join(r["errors"]) or "no reply"
            raise LoadTestError(
                f"{mode}: process {slot} registered {r['registered']} of {r['clients']} clients "
                f"within {REGISTER_TIMEOUT_S:g} s (first errors: {why})")
        setup_s = time.time() - began
        log(f"{mode}: {clients} clients in {processes} processes registered "
            f"({setup_s:.1f} s after the coordinator started); measuring {duration:g} s")
        stats0 = coord.stats()
        cpu0 = time.process_time()
        t0 = time.time() + 0.05  # the clients see the flag within a pump (<= 20 ms)
        pool.start_at.value = t0
        pool.flag.value = _GO
        time.sleep(max(0.0, t0 - time.time()))
        rss0 = sampler.sample()
        progress: list[tuple[float, int]] = []
        t1 = t0 + duration
        tick = t0 + 1.0
        while True:
            now = time.time()
            if now >= t1:
                break
            time.sleep(min(tick, t1) - now)
            if time.time() >= tick:
                done = int(sum(pool.live))
                progress.append((time.time() - t0, done))
                log(f"  {mode}: {time.time() - t0:5.1f} s  {done:8d} commits  "
                    f"version {coord.version}")
                tick += 1.0
        stats1 = coord.stats()
        cpu = time.process_time() - cpu0
        rss1 = sampler.sample()
        window = time.time() - t0
        results = _wait_for(pool.results, pool.procs, "result", duration + COLLECT_GRACE_S)
        ok = True
    finally:
        if not ok:
            pool.abort()
        coord.stop()
        sampler.stop()
        journal = coord.stats().get("journal")
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)
    if journal is not None:
        stats1["journal"] = journal
    return _summarize(mode, settings, clients, processes, duration, window, setup_s,
                      registered, results, stats0, stats1, cpu, rss0, rss1, t0, t1,
                      sampler.samples, progress)


def _wait_for(queue: Any, procs: Sequence[Any], kind: str, timeout: float
              ) -> dict[int, dict[str, Any]]:
    """The ``kind`` messages of every process, by slot; raise if one dies or time runs out."""
    got: dict[int, dict[str, Any]] = {}
    deadline = time.time() + timeout
    while len(got) < len(procs):
        try:
            what, slot, payload = queue.get(timeout=0.5)
        except Empty:
            dead = [p for i, p in enumerate(procs) if i not in got and p.exitcode is not None]
            if dead:
                raise LoadTestError(f"client process {dead[0].name} ended (exit code "
                                    f"{dead[0].exitcode}) before sending its {kind!r} "
                                    "report") from None
            if time.time() > deadline:
                raise LoadTestError(f"no {kind!r} report from {len(procs) - len(got)} client "
                                    f"process(es) within {timeout:g} s") from None
            continue
        if what == kind:
            got[slot] = payload
    return got


def _summarize(mode: str, settings: dict[str, Any], clients: int, processes: int,
               duration: float, window: float, setup_s: float,
               registered: dict[int, dict[str, Any]], results: dict[int, dict[str, Any]],
               stats0: dict[str, Any], stats1: dict[str, Any], cpu: float,
               rss0: int | None, rss1: int | None, t0: float, t1: float,
               samples: list[tuple[float, int]], progress: list[tuple[float, int]]
               ) -> dict[str, Any]:
    total = _merge([results[s] for s in sorted(results)])
    commit_ms = total.pop("commit_ms", [])
    checkout_ms = total.pop("checkout_ms", [])
    errors_seen = total.pop("errors_seen", [])
    c0, c1 = _coordinator_counters(stats0), _coordinator_counters(stats1)
    delta = {k: c1[k] - c0.get(k, 0) for k in c1 if k not in _GAUGES}
    commits = int(total.get("commits", 0))
    in_window = [r for t, r in samples if t0 <= t <= t1 + 0.01]
    rss_values = [r for r in (rss0, *in_window, rss1) if r is not None]
    by_op0, by_op1 = stats0.get("bytes_by_op", {}), stats1.get("bytes_by_op", {})
    ops = {op: {k: v - by_op0.get(op, {}).get(k, 0) for k, v in figs.items()}
           for op, figs in by_op1.items()}
    coord_commits = sum(delta.get(k, 0) for k in
                        ("commits_accepted", "commits_rejected", "commits_duplicate"))
    accepted = int(total.get("commits_accepted", 0))
    return {
        "mode": mode,
        "settings": settings,
        "clients": clients,
        "processes": processes,
        "duration_s": duration,
        "window_s": window,
        "setup_s": setup_s,
        "registration": {str(s): {k: v for k, v in r.items() if k != "errors"}
                         for s, r in registered.items()},
        "commits": commits,
        "commits_per_s": commits / window if window > 0 else 0.0,
        "accepted_fraction": accepted / commits if commits else 0.0,
        "client": total,
        "client_errors_seen": errors_seen,
        "latency_ms": {"commit": percentiles(commit_ms, (50, 90, 95, 99, 99.9)),
                       "checkout": percentiles(checkout_ms, (50, 90, 95, 99, 99.9))},
        "coordinator": {
            "window": delta,  # running totals: end of the window minus its start
            "gauges_end": {k: c1[k] for k in c1 if k in _GAUGES},
            "commits": coord_commits,
            "commits_per_s": coord_commits / window if window > 0 else 0.0,
            "errors_by_code_end": stats1.get("errors_by_code", {}),
            "bytes_by_op_window": ops,
            "final": stats1,
        },
        "network": {
            **{k: delta.get(k, 0) for k in ("messages_received", "messages_sent",
                                            "bytes_received", "bytes_sent",
                                            "messages_dropped", "decode_errors")},
            "messages_per_s": (delta.get("messages_received", 0)
                               + delta.get("messages_sent", 0)) / window if window else 0.0,
            "bytes_per_s": (delta.get("bytes_received", 0)
                            + delta.get("bytes_sent", 0)) / window if window else 0.0,
        },
        "cpu": {
            "coordinator_s": cpu,
            "coordinator_share": cpu / window if window else 0.0,
            "coordinator_ms_per_commit": 1000.0 * cpu / commits if commits else None,
            "clients_s": total.get("cpu_s", 0.0),
        },
        "rss": {
            "start_bytes": rss0,
            "max_bytes": max(rss_values) if rss_values else None,
            "end_bytes": rss1,
            "interval_s": 0.5,
            "samples": [[round(t - t0, 3), r] for t, r in samples],  # t < 0: before the window
        },
        "progress": [[round(t, 3), n] for t, n in progress],
    }


# -- report -------------------------------------------------------------------------------------


def _mib(x: Any) -> str:
    return "—" if x is None else f"{x / 2**20:.0f}"


def _ms(x: Any) -> str:
    return "—" if x is None else f"{x:.2f}"


def load_rows(data: dict[str, Any]) -> list[str]:
    """Markdown table rows (see :data:`LOAD_HEADER`) from ``results/load.json``: per mode, the
    clients, commits/s, accepted %, p50 / p99 commit latency and the coordinator's RSS at the
    start of the window → its maximum. Modes missing from ``data`` give no row.

    >>> load_rows({"modes": {"default": {"clients": 64, "commits_per_s": 812.3,
    ...     "accepted_fraction": 0.991, "latency_ms": {"commit": {"p50": 1.234, "p99": 9.87}},
    ...     "rss": {"start_bytes": 300 * 2**20, "max_bytes": 310 * 2**20}}}})
    ['| default | 64 | 812.3 | 99.1% | 1.23 / 9.87 | 300 → 310 |']
    """
    rows = []
    for mode, r in (data.get("modes") or {}).items():
        lat = (r.get("latency_ms") or {}).get("commit") or {}
        rss = r.get("rss") or {}
        rows.append(
            f"| {mode} | {r.get('clients', '—')} | {float(r.get('commits_per_s', 0.0)):.1f} | "
            f"{100 * float(r.get('accepted_fraction', 0.0)):.1f}% | "
            f"{_ms(lat.get('p50'))} / {_ms(lat.get('p99'))} | "
            f"{_mib(rss.get('start_bytes'))} → {_mib(rss.get('max_bytes'))} |")
    return rows


def _table(rows: Sequence[dict[str, Any]]) -> str:
    head = (f"{'mode':<14} {'N':>3} {'commits/s':>9} {'accept':>6} {'deferred':>8} "
            f"{'cancel':>6} {'errors':>6} {'commit p50/p95/p99 ms':>22} "
            f"{'checkout p50/p95/p99 ms':>24} {'RSS MiB start/max/end':>21} {'cpu s':>6} "
            f"{'MB/s':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        cm, co = r["latency_ms"]["commit"], r["latency_ms"]["checkout"]
        rss = r["rss"]
        cl = r["client"]
        lat = f"{_ms(cm['p50'])}/{_ms(cm['p95'])}/{_ms(cm['p99'])}"
        clat = f"{_ms(co['p50'])}/{_ms(co['p95'])}/{_ms(co['p99'])}"
        mem = f"{_mib(rss['start_bytes'])}/{_mib(rss['max_bytes'])}/{_mib(rss['end_bytes'])}"
        lines.append(
            f"{r['mode']:<14} {r['clients']:>3} {r['commits_per_s']:>9.1f} "
            f"{r['accepted_fraction']:>6.1%} {cl.get('checkouts_deferred', 0):>8} "
            f"{cl.get('leases_cancelled', 0):>6} {cl.get('errors', 0):>6} {lat:>22} "
            f"{clat:>24} {mem:>21} {r['cpu']['coordinator_s']:>6.1f} "
            f"{r['network']['bytes_per_s'] / 1e6:>6.1f}")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chronos.benchmarks.load",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--processes", type=int, default=None,
                   help="client processes (default min(4, cores), at most --clients)")
    p.add_argument("--duration", type=float, default=20.0,
                   help="seconds measured per configuration (default 20)")
    p.add_argument("--params", type=int, default=10_000,
                   help="elements of λ, one float32 tensor (default 10000)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated configurations: {', '.join(MODES)} (default: all)")
    p.add_argument("--think-ms", type=float, default=0.0,
                   help="think time between a grant and its commit, ms (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/load.json"))
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.clients < 1:
        p.error(f"--clients must be >= 1, got {args.clients}")
    if args.processes is None:
        args.processes = min(4, os.cpu_count() or 1, args.clients)
    if args.processes < 1 or args.processes > args.clients:
        p.error(f"--processes must be in [1, --clients={args.clients}], got {args.processes}")
    if not math.isfinite(args.duration) or args.duration <= 0:
        p.error(f"--duration must be a positive number of seconds, got {args.duration}")
    if args.params < 1:
        p.error(f"--params must be >= 1, got {args.params}")
    if not math.isfinite(args.think_ms) or args.think_ms < 0:
        p.error(f"--think-ms must be >= 0, got {args.think_ms}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if not modes or unknown:
        p.error(f"--modes: unknown {unknown or modes}; choose from {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        p.error(f"--modes names a configuration twice: {args.modes}")
    args.modes = modes
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    quiet = args.quiet

    def log(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    began = time.time()
    result: dict[str, Any] = {
        "machine": machine_info(),
        "params": {"clients": args.clients, "processes": args.processes,
                   "duration_s": args.duration, "params": args.params, "modes": args.modes,
                   "think_ms": args.think_ms, "seed": args.seed, "outer_lr": OUTER_LR},
        "modes": {},
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(jsonable(result), indent=2))

    torch.set_num_threads(1)
    try:
        with ClientProcesses(args.processes) as pool:
            for mode in args.modes:
                result["modes"][mode] = run_mode(
                    mode, clients=args.clients, processes=args.processes,
                    duration=args.duration, numel=args.params, think_s=args.think_ms / 1000.0,
                    seed=args.seed, log=log, pool=pool)
                result["wall_s"] = time.time() - began
                save()
    except LoadTestError as e:
        print(f"load: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"\nload test: one coordinator, {args.clients} clients in {args.processes} "
          f"processes, λ = {args.params} float32, {args.duration:g} s per configuration")
    print(_table(list(result["modes"].values())))
    print(f"\nwrote {args.out} ({time.time() - began:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
