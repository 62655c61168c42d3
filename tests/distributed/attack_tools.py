"""Tools for the attack tests (``test_attacks.py``): an honest worker against a live coordinator,
raw attacker sockets, a λ recorder and memory readings.

* :class:`Toy` — a tiny bilevel problem (λ of 8 floats, float32 or float64) that a real
  :class:`~chronos.distributed.worker.Worker` solves in a few milliseconds.
* :class:`Arena` — a real :class:`~chronos.distributed.coordinator.Coordinator` (its own thread)
  and one honest worker (``worker_id="honest"``) running :meth:`Worker.run` in a thread;
  :meth:`Arena.measure` counts the honest worker's accepted commits in an undisturbed window and
  in a window of the same length under attack; :meth:`Arena.check_integrity` checks that nobody
  acted as the honest worker and that every commit that moved λ was the honest worker's own.
* :class:`RawPeer` — an attacker's bare ZeroMQ DEALER (any routing id, any frames).
* :class:`LambdaLog` — records λ of every version the coordinator produces.
* :func:`sleeper_worker` — a real worker for a subprocess that checks out and then sleeps in its
  inner solve (heartbeating) until killed.

Runs as a script too (``python attack_tools.py sleeper ADDRESS``, ``python attack_tools.py
coordinator``), for the tests that need another process.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import zmq
from test_worker import Toy as WorkerToy  # this directory is on sys.path (pytest, subprocesses)
from test_worker import wait_until as wait_for

from chronos.distributed.coordinator import Coordinator
from chronos.distributed.messages import Message
from chronos.distributed.protocol import DecodeError, decode, encode
from chronos.distributed.transport import CurveClientConfig
from chronos.distributed.worker import Worker, WorkerConfig

HONEST = "honest"
N = 8  # λ is 8 floats


class Toy(WorkerToy):
    """The worker tests' toy (θ ∈ Rⁿ: f(θ, λ) = ½‖θ − 1‖² + ½ Σᵢ e^{λᵢ} θᵢ², F(θ) =
    ½‖θ − ¼‖², λ* = log 3). ``sleep=True``: a solve announces itself on stdout ("solving",
    flushed) and then sleeps until the process is killed (the subprocess of
    :func:`sleeper_worker`)."""

    def __init__(self, n: int = N, dtype: torch.dtype = torch.float64, sleep: bool = False):
        super().__init__(n, dtype=dtype)
        self.sleep = sleep

    def solve(self, outer_params, init_params=None, num_steps=None, **kwargs):
        if self.sleep:
            print("solving", flush=True)
            while True:
                time.sleep(3600)
        return super().solve(outer_params, init_params, num_steps, **kwargs)


# -- memory --------------------------------------------------------------------------------------


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's peak resident memory since the last :func:`reset_peak_rss` (MiB)."""
    return _status_mib("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the peak (``VmHWM``) to the current RSS (Linux >= 4.0); ``False`` if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- λ of every version --------------------------------------------------------------------------


class LambdaLog:
    """Records λ (a copy) of every version the coordinator's state produces, from the moment it
    is installed (wraps ``MetaState.record``, which every version bump calls; runs on the
    coordinator thread under its lock)."""

    def __init__(self, coord: Coordinator) -> None:
        self.versions: dict[int, dict[str, torch.Tensor]] = {}
        meta = coord._state._meta
        with coord._lock:
            self.versions[meta.version] = {k: v.clone() for k, v in meta.outer_params.items()}
            inner = meta.record

            def record(**metrics: Any) -> None:
                self.versions[meta.version] = {
                    k: v.detach().clone() for k, v in meta.outer_params.items()}
                inner(**metrics)

            meta.record = record  # type: ignore[method-assign]
        self._coord = coord

    def snapshot(self) -> dict[int, dict[str, torch.Tensor]]:
        with self._coord._lock:
            return dict(self.versions)

    def non_finite_versions(self) -> list[int]:
        return [v for v, lam in self.snapshot().items()
                if not all(bool(torch.isfinite(t).all()) for t in lam.values())]


# -- a raw attacker socket -----------------------------------------------------------------------


class RawPeer:
    """An attacker's DEALER socket: any routing id (``None``: the ROUTER assigns one), any
    frames, no protocol manners. Not thread-safe (one thread per peer)."""

    def __init__(self, address: str, routing_id: bytes | None = None,
                 ctx: zmq.Context[Any] | None = None, linger_ms: int = 0,
                 curve: CurveClientConfig | None = None) -> None:
        self._own_ctx = ctx is None
        self.ctx: zmq.Context[Any] = zmq.Context() if ctx is None else ctx
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        if curve is not None:
            self.sock.curve_serverkey = curve.server_public_key
            self.sock.curve_publickey = curve.public_key
            self.sock.curve_secretkey = curve.secret_key
        self.sock.connect(address)
        self.rid = 1000

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def send(self, frames: Sequence[Any]) -> bool:
        try:
            self.sock.send_multipart(list(frames), flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def send_msg(self, msg: Message) -> bool:
        return self.send(encode(msg))

    def recv(self, timeout_ms: int) -> Message | DecodeError | None:
        if not self.sock.poll(timeout_ms):
            return None
        frames = self.sock.recv_multipart(copy=True)
        try:
            return decode(frames)
        except DecodeError as e:
            return e

    def ask(self, msg: Message, timeout_ms: int = 5000) -> Message | None:
        """Send ``msg`` and return the reply carrying its request id (``None``: none came)."""
        assert self.send_msg(msg)
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                return None
            reply = self.recv(left)
            if reply is None:
                return None
            if getattr(reply, "request_id", None) == getattr(msg, "request_id", None):
                assert not isinstance(reply, DecodeError), reply
                return reply

    def drain(self, timeout_ms: int = 50) -> list[Message | DecodeError]:
        """Everything that arrives until ``timeout_ms`` pass without a message."""
        out = []
        while True:
            got = self.recv(timeout_ms)
            if got is None:
                return out
            out.append(got)

    def close(self) -> None:
        self.sock.close()
        if self._own_ctx:
            self.ctx.term()


# -- the arena: a coordinator and an honest worker -----------------------------------------------


class BackgroundTask:
    """``fn(stop)`` in a daemon thread; :meth:`finish` stops it, joins it and re-raises what it
    raised."""

    def __init__(self, fn: Callable[[threading.Event], Any], name: str) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.result: Any = None

        def run() -> None:
            try:
                self.result = fn(self.stop)
            except BaseException as e:  # re-raised by finish()
                self.error = e

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()

    def finish(self, timeout: float = 30.0) -> Any:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.thread.name} did not stop"
        if self.error is not None:
            raise self.error
        return self.result


class Arena:
    """A live coordinator and a real honest worker committing to it (see the module docstring).

    Args:
        problem: the honest worker's problem (default: a float64 :class:`Toy`).
        warmup: accepted commits to wait for before returning.
        worker_curve: the honest worker's CURVE keys (the coordinator's: ``curve=`` in
            ``coord_kwargs``).
        **coord_kwargs: for the :class:`Coordinator` (``heartbeat_interval`` defaults to 0.1).
    """

    def __init__(self, problem: Toy | None = None, warmup: int = 5,
                 worker_curve: CurveClientConfig | None = None, **coord_kwargs: Any) -> None:
        self.problem = problem or Toy()
        coord_kwargs.setdefault("heartbeat_interval", 0.1)
        self.coord = Coordinator(self.problem.default_outer_params(), port=0, **coord_kwargs)
        self.worker: Worker | None = None
        self._task: BackgroundTask | None = None
        self.coord.start()
        try:
            self.lam = LambdaLog(self.coord)
            self.worker = Worker(self.problem, WorkerConfig(
                coordinator_addr=self.coord.address, worker_id=HONEST, request_timeout=2.0,
                connect_timeout=10.0, curve=worker_curve))
            worker = self.worker
            self.prefix = f"{HONEST}-{worker._nonce}-"  # the honest worker's commit ids
            self._task = BackgroundTask(lambda stop: worker.run(), "honest-worker")
            wait_for(lambda: self.accepted() >= warmup, 20.0, "the honest worker's first commits")
            self.conn = self.connections()[HONEST]
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> str:
        return self.coord.address

    def accepted(self) -> int:
        """Commits the honest worker saw accepted so far."""
        assert self.worker is not None
        if self._task is not None and self._task.error is not None:
            raise self._task.error
        return int(self.worker.stats()["commits_accepted"])

    def connections(self) -> dict[str, str]:
        with self.coord._lock:
            return self.coord._state.connections

    def accepted_ids(self) -> list[tuple[str, str]]:
        """(worker id, commit id) of every commit the coordinator accepted (its dedupe record,
        10,000 entries: all of them in these tests)."""
        with self.coord._lock:
            return list(self.coord._state._seen)

    def window(self, seconds: float) -> float:
        """The honest worker's accepted commits per second over the next ``seconds``."""
        n0, t0 = self.accepted(), time.monotonic()
        time.sleep(seconds)  # a measurement window, not a synchronization
        return (self.accepted() - n0) / (time.monotonic() - t0)

    def measure(self, attack: Callable[[threading.Event], Any], seconds: float,
                ready: Callable[[], bool] | None = None) -> tuple[float, float, Any]:
        """``(undisturbed rate, rate under attack, attack's result)``: a window of ``seconds``
        without the attacker, then one of the same length while ``attack(stop)`` runs in a
        thread (``ready``, if given: the window starts once it is true)."""
        base = self.window(seconds)
        task = BackgroundTask(attack, "attacker")
        try:
            if ready is not None:
                wait_for(lambda: ready() or task.error is not None or not task.thread.is_alive(),
                         30.0, "the attack to start")
            hit = self.window(seconds)
        finally:
            result = task.finish()
        return base, hit, result

    def check_integrity(self, attackers_may_commit: bool = False) -> None:
        """Nobody acted as the honest worker: its id is still bound to its own connection, it
        never had to register again, and every commit accepted under its id is its own (commit
        id prefix). Unless ``attackers_may_commit``, every accepted commit at all is the honest
        worker's: λ moved by its hypergradients only."""
        assert self.worker is not None
        assert self.coord.running, "the coordinator loop died"
        assert self.connections().get(HONEST) == self.conn, "the honest id changed hands"
        s = self.worker.stats()
        assert s["registrations"] == 1 and s["reconnects"] == 0, s
        ids = self.accepted_ids()
        mine = [c for w, c in ids if w == HONEST]
        assert mine and all(c.startswith(self.prefix) for c in mine), [
            c for c in mine if not c.startswith(self.prefix)][:5]
        if not attackers_may_commit:
            assert {w for w, _ in ids} == {HONEST}, sorted({w for w, _ in ids})
            assert self.coord.stats()["commits_accepted"] == len(mine)

    def close(self) -> None:
        try:
            if self.worker is not None:
                self.worker.stop()
            if self._task is not None:
                self._task.thread.join(15.0)
        finally:
            self.coord.stop()


@contextlib.contextmanager
def arena(**kwargs: Any) -> Iterator[Arena]:
    a = Arena(**kwargs)
    try:
        yield a
    finally:
        a.close()


def all_finite(lam: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in lam.values())


def finite_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


# -- other processes -----------------------------------------------------------------------------


def sleeper_worker(address: str) -> None:
    """A real worker that registers, checks out (a lease), prints "solving" and sleeps in the
    solve, heartbeating, until the process is killed."""
    torch.set_num_threads(1)
    w = Worker(Toy(sleep=True), WorkerConfig(coordinator_addr=address, worker_id="sleeper",
                                             request_timeout=2.0, connect_timeout=10.0))
    w.run()


def serve_coordinator() -> None:
    """A coordinator (λ of 8 float64) that prints its address and serves until stdin closes."""
    c = Coordinator(Toy().default_outer_params(), port=0, heartbeat_interval=0.1).start()
    print(c.address, flush=True)
    try:
        sys.stdin.read()
    finally:
        c.stop()


if __name__ == "__main__":
    if sys.argv[1] == "sleeper":
        sleeper_worker(sys.argv[2])
    elif sys.argv[1] == "coordinator":
        serve_coordinator()
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
