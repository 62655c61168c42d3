"""Do the coordinator's defaults hold at 1, 4 and 64 equally fast workers?

For each worker count and each setting, N clients run checkout → fixed compute → commit
against a coordinator, and we count what happened to every hypergradient:

* ``computed``: hypergradients finished and committed; ``accepted`` / ``rejected`` of those;
  ``applied`` = ``accepted / computed`` (the target: >= 50% with 64 clients at the defaults);
* ``cancelled``: leases the coordinator cancelled while the client was computing (the client
  abandons that work: wasted, but the rest of its compute is saved); ``saved_s`` the compute
  not spent thanks to the cancellation;
* ``waste``: compute spent on work that was not applied (rejected commits in full, cancelled
  ones up to the cancellation) over all compute spent;
* ``steps``, ``mean_staleness`` of accepted commits, ``hg_per_s`` (hypergradients computed per
  second of the run) and ``busy`` (the fraction of client time spent computing rather than
  waiting for a deferred checkout; in the socket runs, per process, whose threads take turns
  on its GIL).

Settings: ``defaults`` (``CoordinatorConfig()``: window 3, staleness 4, ``min_commits="auto"``),
``seed shape`` (what ``Coordinator(outer_params=..., max_in_flight=3, max_staleness=2)`` does
now: the seed README's pair with the other defaults, lease cancellation on) and ``seed (old)``
(window 3, staleness 2, ``min_commits=1``, SGD: the seed defaults, with clients that ignore
cancellations, as before cancellation existed).

Two harnesses, one table each:

* ``simulated``: the pure :class:`~chronos.distributed.state.CoordinatorState` driven by a
  discrete-event simulation with an injected clock: exact and repeatable. Client ``i`` needs
  ``T · (1 + U(−jitter, jitter))`` seconds per hypergradient (``T = 1``, jitter 10%, seeded),
  messages arrive instantly.
* ``sockets``: a real :class:`~chronos.distributed.Coordinator` on 127.0.0.1 in this process
  and N client threads in ``spawn``-ed processes, each with its own DEALER socket, each
  hypergradient a busy loop of a fixed amount of the thread's own CPU time (equal work per
  hypergradient: the clients share the 2 cores, none hands its CPU to another by sleeping).
  A client polls its socket between slices of work and stops on a ``LeaseCancelled``.

Run: ``python -m chronos.benchmarks.scaling`` (``--quick`` for a smoke run); writes
``results/scaling.json``.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import multiprocessing as mp
import random
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from chronos.distributed import defaults
from chronos.distributed.aggregation import CoordinatorConfig, WindowStalenessWarning
from chronos.distributed.coordinator import Coordinator
from chronos.distributed.messages import (
    Checkout,
    CheckoutReply,
    Commit,
    CommitReply,
    Deregister,
    LeaseCancelled,
    Message,
    Register,
    Registered,
    ShutdownNotice,
)
from chronos.distributed.state import CoordinatorState, Outgoing

__all__ = ["SETTINGS", "Setting", "main", "simulate", "sockets"]

DIM = 8  # λ's size: the counts do not depend on it


@dataclass(frozen=True)
class Setting:
    """A coordinator configuration and whether clients honour lease cancellations."""

    name: str
    config: dict[str, Any]
    honour_cancel: bool = True

    def coordinator_config(self) -> CoordinatorConfig:
        with warnings.catch_warnings():  # the seed's window 3 > staleness 2, on purpose
            warnings.simplefilter("ignore", WindowStalenessWarning)
            return CoordinatorConfig(**self.config)


SETTINGS = (
    Setting("defaults", {}),
    Setting("seed shape", {"max_in_flight": 3, "max_staleness": 2}),
    Setting(
        "seed (old)",
        {"max_in_flight": 3, "max_staleness": 2, "min_commits": 1, "optimizer": "sgd",
         "outer_lr": 0.01},
        honour_cancel=False,
    ),
)


@dataclass
class Counts:
    """What happened to the hypergradients of one run (see the module docstring)."""

    clients: int
    computed: int = 0
    accepted: int = 0
    rejected: int = 0
    cancelled: int = 0
    steps: int = 0
    staleness_sum: int = 0
    work_s: float = 0.0  # compute spent, including abandoned work
    wasted_s: float = 0.0  # compute spent on work that was not applied
    saved_s: float = 0.0  # compute not spent thanks to cancellations
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, other: Counts) -> None:
        for k in ("computed", "accepted", "rejected", "cancelled", "staleness_sum"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for k in ("work_s", "wasted_s", "saved_s"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def summary(self) -> dict[str, Any]:
        c = max(self.computed, 1)
        return {
            **{k: v for k, v in asdict(self).items() if k != "extra"},
            "applied": self.accepted / c,
            "waste": self.wasted_s / self.work_s if self.work_s else 0.0,
            "mean_staleness": self.staleness_sum / max(self.accepted, 1),
            "hg_per_s": self.computed / self.wall_s if self.wall_s else 0.0,
            "busy": self.work_s / (self.clients * self.wall_s) if self.wall_s else 0.0,
            **self.extra,
        }


# -- discrete-event simulation of the pure state machine ----------------------------------------


def simulate(
    setting: Setting, clients: int, per_client: int, *, jitter: float = 0.1, seed: int = 0
) -> dict[str, Any]:
    """Drive :class:`CoordinatorState` with ``clients`` equally fast simulated clients until
    ``clients · per_client`` hypergradients were computed; return the counts."""
    rng = random.Random(seed)
    state = CoordinatorState({"lam": torch.zeros(DIM, dtype=torch.float64)},
                             setting.coordinator_config())
    grad = {"lam": torch.full((DIM,), 1e-3, dtype=torch.float64)}
    counts = Counts(clients)
    target = clients * per_client
    events: list[tuple[float, int, str, str, int]] = []  # (time, seq, kind, worker, token)
    seq = itertools.count()
    rids = itertools.count(1)
    lease: dict[str, tuple[int, int, float, float]] = {}  # wid -> (version, rid, start, dur)
    token: dict[str, int] = {}
    ckrid: dict[str, int] = {}

    def deliver(out: list[Outgoing], now: float) -> None:
        for o in out:
            m, w = o.message, o.to
            if isinstance(m, CheckoutReply) and m.status != "deferred":
                if ckrid.get(w) != m.request_id:
                    continue
                dur = 1.0 + rng.uniform(-jitter, jitter)
                token[w] = token.get(w, 0) + 1
                lease[w] = (m.version, m.request_id, now, dur)
                heapq.heappush(events, (now + dur, next(seq), "done", w, token[w]))
            elif isinstance(m, LeaseCancelled) and setting.honour_cancel and w in lease:
                _version, rid, start, dur = lease[w]
                if rid != m.request_id:
                    continue
                del lease[w]
                token[w] += 1  # the pending "done" event is void
                counts.cancelled += 1
                counts.work_s += now - start
                counts.wasted_s += now - start
                counts.saved_s += start + dur - now
                checkout(w, now)

    def checkout(w: str, now: float) -> None:
        ckrid[w] = next(rids)
        deliver(state.handle(w, Checkout(request_id=ckrid[w], worker_id=w), now), now)

    names = [f"c{i:03d}" for i in range(clients)]
    for w in names:
        start = rng.uniform(0.0, 0.1)
        heapq.heappush(events, (start, next(seq), "join", w, 0))
    now = 0.0
    while events and counts.computed < target:
        now, _, kind, w, tok = heapq.heappop(events)
        if kind == "join":
            state.handle(w, Register(request_id=next(rids), worker_id=w), now)
            checkout(w, now)
            continue
        if tok != token.get(w) or w not in lease:
            continue  # cancelled meanwhile
        version, _rid, start, dur = lease.pop(w)
        counts.computed += 1
        counts.work_s += dur
        out = state.handle(w, Commit(request_id=next(rids), worker_id=w, version=version,
                                     commit_id=f"{w}-{counts.computed}", hypergradient=grad),
                           now)
        reply = out[0].message
        assert isinstance(reply, CommitReply), reply
        if reply.status == "accepted":
            counts.accepted += 1
            counts.staleness_sum += reply.staleness
        else:
            counts.rejected += 1
            counts.wasted_s += dur
        deliver(out[1:], now)
        checkout(w, now)
    # time clients spent computing work still in flight at the end is not counted (not done)
    counts.wall_s = now
    counts.steps = state.version
    counts.extra = {"min_commits": state.stats()["min_commits"]}
    return counts.summary()


# -- real sockets -------------------------------------------------------------------------------


def _busy(cpu_s: float) -> None:
    """Spend ``cpu_s`` seconds of this thread's CPU time."""
    end = time.thread_time() + cpu_s
    x = 0
    while time.thread_time() < end:
        x += sum(range(100))


def _client(address: str, wid: str, work_s: float, per_client: int, honour: bool,
            go: threading.Event, out: list[Counts]) -> None:
    from chronos.distributed.transport import ClientTransport

    counts = Counts(1)
    rids = itertools.count(1)
    grad = {"lam": torch.full((DIM,), 1e-3, dtype=torch.float64)}
    slice_s = min(0.002, work_s / 4)
    with ClientTransport(address, identity=wid.encode()) as t:

        def call(msg: Message, until: float) -> Message | None:
            t.send_message(msg)
            while time.monotonic() < until:
                reply = t.recv_message(timeout_ms=100)
                if isinstance(reply, ShutdownNotice):
                    return reply
                if reply is None or reply.request_id != msg.request_id:
                    continue  # a late LeaseCancelled for an old lease, ...
                if isinstance(reply, CheckoutReply) and reply.status == "deferred":
                    continue  # the grant follows with the same request id
                return reply
            return None

        deadline = time.monotonic() + 600
        if not isinstance(call(Register(request_id=next(rids), worker_id=wid), deadline),
                          Registered):
            raise RuntimeError(f"{wid}: registration failed")
        go.wait(60)
        while counts.computed < per_client:
            co = call(Checkout(request_id=next(rids), worker_id=wid), deadline)
            if not isinstance(co, CheckoutReply):
                break
            start, cancelled = time.thread_time(), False
            while time.thread_time() - start < work_s:
                _busy(slice_s)
                m = t.recv_message(timeout_ms=0) if honour else None
                if isinstance(m, LeaseCancelled) and m.request_id == co.request_id:
                    cancelled = True
                    break
            spent = time.thread_time() - start
            counts.work_s += spent
            if cancelled:
                counts.cancelled += 1
                counts.wasted_s += spent
                counts.saved_s += max(0.0, work_s - spent)
                continue
            counts.computed += 1
            reply = call(Commit(request_id=next(rids), worker_id=wid, version=co.version,
                                commit_id=f"{wid}-{counts.computed}", hypergradient=grad),
                         deadline)
            if not isinstance(reply, CommitReply):
                break
            if reply.status == "accepted":
                counts.accepted += 1
                counts.staleness_sum += reply.staleness
            else:
                counts.rejected += 1
                counts.wasted_s += spent
        t.send_message(Deregister(request_id=next(rids), worker_id=wid))
        t.recv_message(timeout_ms=50)  # let the Deregister leave before LINGER 0 closes
    out.append(counts)


def _client_process(address: str, names: list[str], work_s: float, per_client: int,
                    honour: bool, start_at: float) -> dict[str, Any]:
    """Run one client thread per name (in a spawned process); return their summed counts."""
    torch.set_num_threads(1)
    out: list[Counts] = []
    go = threading.Event()
    threads = [threading.Thread(target=_client, args=(address, n, work_s, per_client, honour,
                                                      go, out), daemon=True) for n in names]
    for th in threads:
        th.start()
    time.sleep(max(0.0, start_at - time.time()))  # both processes start computing together
    began = time.time()
    go.set()
    for th in threads:
        th.join(600)
    total = Counts(len(names))
    for c in out:
        total.add(c)
    return {**asdict(total), "began": began, "ended": time.time()}


def _warm(_: int) -> int:
    return torch.get_num_threads()


def sockets(setting: Setting, clients: int, per_client: int, work_s: float,
            pool: Any, processes: int) -> dict[str, Any]:
    """One run with a real coordinator and ``clients`` client threads in ``pool``."""
    cfg = setting.coordinator_config()
    with Coordinator({"lam": torch.zeros(DIM, dtype=torch.float64)}, port=0,
                     config=cfg) as coord:
        groups = [g for g in (
            [f"c{i:03d}" for i in range(clients)][p::processes] for p in range(processes)) if g]
        start_at = time.time() + 0.5 + 0.01 * clients  # after every client registered
        jobs = [pool.apply_async(_client_process, (coord.address, g, work_s, per_client,
                                                   setting.honour_cancel, start_at))
                for g in groups]
        parts = [j.get(timeout=900) for j in jobs]
        stats = coord.stats()
    total = Counts(clients)
    for part in parts:
        total.add(Counts(**{k: v for k, v in part.items() if k in Counts.__dataclass_fields__
                            and k != "extra"}))
    total.wall_s = max(p["ended"] for p in parts) - min(p["began"] for p in parts)
    total.steps = stats["steps"]
    row = total.summary()
    # threads of one process take turns on its GIL: a process is one lane of compute
    lanes = len(groups)
    row["busy"] = total.work_s / (lanes * total.wall_s) if total.wall_s else 0.0
    row.update(coordinator_rejected=stats["commits_rejected"],
               coordinator_cancelled=stats["leases_cancelled"], lanes=lanes)
    return row


# -- report -------------------------------------------------------------------------------------


def _table(title: str, rows: Sequence[dict[str, Any]]) -> str:
    head = (f"{'setting':<11} {'N':>3} {'computed':>8} {'accepted':>8} {'rejected':>8} "
            f"{'cancelled':>9} {'applied':>7} {'waste':>6} {'steps':>5} {'stale':>5} "
            f"{'hg/s':>7} {'busy':>5}")
    lines = [title, head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['setting']:<11} {r['clients']:>3} {r['computed']:>8} {r['accepted']:>8} "
            f"{r['rejected']:>8} {r['cancelled']:>9} {r['applied']:>7.1%} {r['waste']:>6.1%} "
            f"{r['steps']:>5} {r['mean_staleness']:>5.2f} {r['hg_per_s']:>7.1f} "
            f"{r['busy']:>5.0%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chronos.benchmarks.scaling",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 64])
    p.add_argument("--no-sockets", action="store_true", help="only the simulation")
    p.add_argument("--work-ms", type=float, default=None,
                   help="CPU ms per hypergradient in the socket runs (default 20; quick 5)")
    p.add_argument("--out", type=Path, default=Path("results/scaling.json"))
    args = p.parse_args(argv)
    sim_per_client = 5 if args.quick else 40
    sock_per_client = 3 if args.quick else 10
    work_s = (args.work_ms if args.work_ms is not None else 5.0 if args.quick else 20.0) / 1000
    sock_clients = [n for n in args.clients if n <= 4] if args.quick else args.clients
    result: dict[str, Any] = {
        "defaults": {
            "max_in_flight": defaults.MAX_IN_FLIGHT, "max_staleness": defaults.MAX_STALENESS,
            "decay": defaults.DECAY, "min_commits": defaults.MIN_COMMITS,
            "outer_optimizer": list(defaults.resolve_outer_optimizer(None, None)),
        },
        "settings": {s.name: {**s.config, "honour_cancel": s.honour_cancel} for s in SETTINGS},
        "simulated": [], "sockets": [],
        "params": {"quick": args.quick, "sim_per_client": sim_per_client,
                   "sock_per_client": sock_per_client, "work_s": work_s},
    }
    for n in args.clients:
        for s in SETTINGS:
            result["simulated"].append({"setting": s.name, **simulate(s, n, sim_per_client)})
    print(_table(f"simulated (pure state machine, injected clock; {sim_per_client} hypergradients"
                 " per client, compute 1 s ± 10%)", result["simulated"]))
    if not args.no_sockets and sock_clients:
        processes = 2
        ctx = mp.get_context("spawn")
        with ctx.Pool(processes) as pool:
            pool.map(_warm, range(processes))  # import torch & co. before any clock starts
            for n in sock_clients:
                for s in SETTINGS:
                    row = sockets(s, n, sock_per_client, work_s, pool, processes)
                    result["sockets"].append({"setting": s.name, **row})
        print()
        print(_table(f"sockets (127.0.0.1, {processes} client processes, {sock_per_client} "
                     f"hypergradients per client, {work_s * 1000:g} ms CPU each)",
                     result["sockets"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
