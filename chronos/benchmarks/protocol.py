"""Wire-protocol benchmark: raw pyzmq DEALER/ROUTER echo vs the Chronos coordinator.

Measured side by side in one run, interleaved, with the servers in this process (one thread
each, like the coordinator) and the clients in a separate ``spawn``-ed process:

1. **Round trip, tiny and 4 MB.** Raw: one DEALER sends a frame of N bytes, a ROUTER thread
   echoes it back (zero-copy both ways). Chronos: ``Checkout(have_version=-1)`` answered with
   λ (N bytes as one float32 tensor), then ``Commit`` of an N-byte hypergradient answered with a
   ``CommitReply`` — the same bytes down and up, through the full stack: msgpack header, frame
   validation, the state machine (lease, staleness, one SGD step of λ) and byte accounting.
2. **Small-commit throughput, 8 concurrent clients.** Each client keeps one request in
   flight; raw: tiny echoes; Chronos: commits of a 1-float hypergradient, each one an accepted
   outer step. Reported as messages per second.

This module is a benchmark baseline and so talks to pyzmq directly for the raw side; the
runtime itself only touches ZeroMQ through :mod:`chronos.distributed.transport`.

Run: ``python -m chronos.benchmarks.protocol`` (``--quick`` for a smoke run).
Targets: 4 MB round trip <= 1.5x raw; throughput >= 0.3x raw.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from chronos.distributed.coordinator import Coordinator
from chronos.distributed.messages import Checkout, Commit, CommitReply, Register
from chronos.distributed.protocol import decode, encode

__all__ = ["main"]

FOUR_MB = 1 << 20  # float32 elements: 4 MiB
TINY = 1


class _EchoServer:
    """A raw ROUTER echo loop in a thread (the baseline: no decoding, no state)."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(50):
                while True:
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.sock.send_multipart(frames, copy=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def _client_process(task: dict[str, Any], out: Any) -> None:
    """Runs in the child process: perform ``task`` and put the result on ``out``."""
    torch.set_num_threads(1)
    try:
        out.put(_run_task(task))
    except Exception as e:  # report, do not hang the parent
        out.put({"error": repr(e)})


def _run_task(task: dict[str, Any]) -> dict[str, Any]:
    ctx = zmq.Context()
    try:
        if task["kind"] == "latency":
            return _latency(ctx, task)
        return _throughput(ctx, task)
    finally:
        ctx.destroy(linger=0)


def _dealer(ctx: zmq.Context[Any], address: str, identity: bytes) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.ROUTING_ID, identity)
    s.connect(address)
    return s


def _rpc(sock: zmq.Socket[Any], frames: list[Any]) -> list[Any]:
    sock.send_multipart(frames, copy=False)
    return sock.recv_multipart(copy=False)


def _latency(ctx: zmq.Context[Any], task: dict[str, Any]) -> dict[str, Any]:
    n, reps = task["numel"], task["reps"]
    payload = torch.ones(n, dtype=torch.float32)
    sock = _dealer(ctx, task["address"], b"lat-client")
    times = []
    if task["server"] == "raw":
        frames = [b"h", payload.numpy().data]
        _rpc(sock, frames)  # warm-up
        for _ in range(reps):
            t = time.perf_counter()
            _rpc(sock, frames)
            times.append(time.perf_counter() - t)
    else:
        decode(_rpc(sock, encode(Register(request_id=0, worker_id="lat-client"))))
        rid = 1
        for i in range(reps + 1):
            t = time.perf_counter()
            reply = decode(_rpc(sock, encode(Checkout(request_id=rid, worker_id="lat-client"))))
            version = reply.version  # type: ignore[attr-defined]
            commit = Commit(request_id=rid + 1, worker_id="lat-client", version=version,
                            commit_id=f"c{rid}", hypergradient={"lam": payload})
            ack = decode(_rpc(sock, encode(commit)))
            if not isinstance(ack, CommitReply) or ack.status != "accepted":
                raise RuntimeError(f"commit not accepted: {ack}")
            if i:  # first is a warm-up
                times.append(time.perf_counter() - t)
            rid += 2
    sock.close(0)
    return {"median_s": statistics.median(times), "times": times}


def _throughput(ctx: zmq.Context[Any], task: dict[str, Any]) -> dict[str, Any]:
    clients, duration = task["clients"], task["duration"]
    socks = [_dealer(ctx, task["address"], f"tp-{i}".encode()) for i in range(clients)]
    chronos = task["server"] == "chronos"
    versions = [0] * clients
    counters = [0] * clients
    grad = {"lam": torch.ones(1, dtype=torch.float32)}

    def request(i: int) -> list[Any]:
        counters[i] += 1
        if not chronos:
            return [b"tiny-echo"]
        return encode(Commit(request_id=counters[i], worker_id=f"tp-{i}", version=versions[i],
                             commit_id=f"tp-{i}-{counters[i]}", hypergradient=grad))

    if chronos:
        for i, s in enumerate(socks):
            decode(_rpc(s, encode(Register(request_id=0, worker_id=f"tp-{i}"))))
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    index = {s: i for i, s in enumerate(socks)}
    done = 0
    bad = 0
    for i, s in enumerate(socks):
        s.send_multipart(request(i), copy=False)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < duration:
        for s, _ in poller.poll(100):
            i = index[s]
            frames = s.recv_multipart(copy=False)
            done += 1
            if chronos:
                reply = decode(frames)
                if isinstance(reply, CommitReply):
                    versions[i] = reply.version
                    bad += reply.status != "accepted"
            s.send_multipart(request(i), copy=False)
    elapsed = time.perf_counter() - t0
    for s in socks:
        s.close(0)
    return {"per_s": done / elapsed, "messages": done, "not_accepted": bad}


def _in_child(task: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    p = ctx.Process(target=_client_process, args=(task, out), daemon=True)
    p.start()
    try:
        result: dict[str, Any] = out.get(timeout=timeout)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)
    if "error" in result:
        raise RuntimeError(f"benchmark client failed: {result['error']}")
    return result


def _coordinator(numel: int) -> Coordinator:
    return Coordinator({"lam": torch.zeros(numel, dtype=torch.float32)}, port=0,
                       max_staleness=1_000_000, max_in_flight=1_000_000, decay=1.0,
                       # the protocol's cost, not an optimizer's: plain SGD, one step per
                       # commit (as before the defaults became Adam and min_commits="auto")
                       optimizer="sgd", outer_lr=1e-6, min_commits=1,
                       lease_timeout=600.0, heartbeat_interval=60.0).start()


def run(repeats: int, reps: int, duration: float, clients: int) -> dict[str, Any]:
    """Interleaved measurements; returns medians, ratios and raw samples."""
    samples: dict[str, list[float]] = {k: [] for k in (
        "raw_tiny_s", "chronos_tiny_s", "raw_4mb_s", "chronos_4mb_s", "raw_per_s",
        "chronos_per_s")}
    echo = _EchoServer()
    try:
        for r in range(repeats):
            print(f"repeat {r + 1}/{repeats}", file=sys.stderr, flush=True)
            for numel, key in ((TINY, "tiny"), (FOUR_MB, "4mb")):
                raw = _in_child({"kind": "latency", "server": "raw", "address": echo.address,
                                 "numel": numel, "reps": reps})
                samples[f"raw_{key}_s"].append(raw["median_s"])
                with _coordinator(numel) as coord:
                    ch = _in_child({"kind": "latency", "server": "chronos",
                                    "address": coord.address, "numel": numel, "reps": reps})
                samples[f"chronos_{key}_s"].append(ch["median_s"])
            raw = _in_child({"kind": "throughput", "server": "raw", "address": echo.address,
                             "clients": clients, "duration": duration})
            samples["raw_per_s"].append(raw["per_s"])
            with _coordinator(1) as coord:
                ch = _in_child({"kind": "throughput", "server": "chronos",
                                "address": coord.address, "clients": clients,
                                "duration": duration})
                if ch["not_accepted"]:
                    raise RuntimeError(f"{ch['not_accepted']} commits were not accepted")
            samples["chronos_per_s"].append(ch["per_s"])
    finally:
        echo.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "medians": med,
        "ratios": {
            "tiny_round_trip_chronos_over_raw": med["chronos_tiny_s"] / med["raw_tiny_s"],
            "4mb_round_trip_chronos_over_raw": med["chronos_4mb_s"] / med["raw_4mb_s"],
            "throughput_chronos_over_raw": med["chronos_per_s"] / med["raw_per_s"],
        },
        "samples": samples,
        "settings": {"repeats": repeats, "reps": reps, "duration_s": duration,
                     "clients": clients, "payload_bytes": FOUR_MB * 4},
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point (``chronos bench protocol``)."""
    p = argparse.ArgumentParser(prog="python -m chronos.benchmarks.protocol",
                                description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--repeats", type=int, default=5, help="interleaved repetitions")
    p.add_argument("--reps", type=int, default=30, help="round trips per latency sample")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per throughput sample")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--out", type=Path, default=Path("results/protocol.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.reps, args.duration = 1, 3, 0.3
    torch.set_num_threads(1)
    res = run(args.repeats, args.reps, args.duration, args.clients)
    m, r = res["medians"], res["ratios"]
    print(f"protocol benchmark ({args.repeats} interleaved repeats; medians)")
    print(f"  round trip, tiny : raw {m['raw_tiny_s'] * 1e6:8.1f} us | chronos "
          f"{m['chronos_tiny_s'] * 1e6:8.1f} us (checkout+commit) | ratio "
          f"{r['tiny_round_trip_chronos_over_raw']:.2f}")
    print(f"  round trip, 4 MB : raw {m['raw_4mb_s'] * 1e3:8.2f} ms | chronos "
          f"{m['chronos_4mb_s'] * 1e3:8.2f} ms (checkout+commit) | ratio "
          f"{r['4mb_round_trip_chronos_over_raw']:.2f}  (target <= 1.5)")
    print(f"  throughput, {args.clients} clients: raw {m['raw_per_s']:8.0f} msg/s | chronos "
          f"{m['chronos_per_s']:8.0f} commits/s | ratio "
          f"{r['throughput_chronos_over_raw']:.2f}  (target >= 0.3)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
