"""``chronos run``, ``chronos coordinator`` and ``chronos worker``.

* ``chronos run PROBLEM --workers N [--mode async|sync] [--max-staleness S] ...`` — a coordinator
  and N worker processes on this machine, with progress, stopped cleanly on completion or Ctrl-C.
* ``chronos coordinator --problem PROBLEM --port P ...`` — only the coordinator, for multi-host
  jobs (binds 127.0.0.1 unless ``--host`` and ``--allow-remote`` are given).
* ``chronos worker PROBLEM --coordinator tcp://HOST:PORT --rank R --world-size N`` — one worker.

``PROBLEM`` is ``package.module:factory`` (default: ``chronos.benchmarks.problems:
digits_weight_decay``); the factory is called as ``factory(rank, world_size)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from chronos.core.errors import ChronosError

__all__ = ["coordinator_main", "run_main", "worker_main"]

DEFAULT_PROBLEM = "chronos.benchmarks.problems:digits_weight_decay"


def _delays(text: str) -> float | tuple[float, ...]:
    parts = [float(x) for x in text.split(",") if x.strip()]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _coordinator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["async", "sync"], default="async")
    p.add_argument("--max-staleness", type=int, default=2, help="reject commits staler than S")
    p.add_argument("--max-in-flight", type=int, default=3, help="version window width")
    p.add_argument("--decay", type=float, default=0.5, help="stale commit weight = decay**s")
    p.add_argument("--outer-lr", type=float, default=0.1)
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adam"], default="sgd")
    p.add_argument("--steps", type=int, default=50, help="outer steps (versions) to run")
    p.add_argument("--min-commits", type=int, default=1)
    p.add_argument("--lease-timeout", type=float, default=20.0)
    p.add_argument("--heartbeat-interval", type=float, default=1.0)


def run_main(argv: list[str] | None = None) -> int:
    """``chronos run``."""
    from chronos.distributed.launcher import RunConfig, config_dict, run_local

    p = argparse.ArgumentParser(prog="chronos run", description=run_main.__doc__)
    p.add_argument("problem", nargs="?", default=DEFAULT_PROBLEM, help="package.module:factory")
    p.add_argument("--workers", type=int, default=2)
    _coordinator_args(p)
    p.add_argument("--straggler-delay", type=_delays, default=0.0,
                   help="seconds per iteration, one value or one per worker (comma-separated)")
    p.add_argument("--inner-steps", type=int, default=None)
    p.add_argument("--hypergradient", choices=["implicit", "unrolled"], default="implicit")
    p.add_argument("--significance-threshold", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=300.0, help="give up after this many s")
    p.add_argument("--json", type=Path, default=None, help="write the result summary here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    cfg = RunConfig(
        problem=args.problem, workers=args.workers, mode=args.mode, max_steps=args.steps,
        max_in_flight=args.max_in_flight, max_staleness=args.max_staleness, decay=args.decay,
        outer_lr=args.outer_lr, optimizer=args.optimizer, min_commits=args.min_commits,
        lease_timeout=args.lease_timeout, heartbeat_interval=args.heartbeat_interval,
        straggler_delay=args.straggler_delay, inner_steps=args.inner_steps,
        hypergradient=args.hypergradient, significance_threshold=args.significance_threshold,
        timeout=args.timeout,
    )

    def show(s: dict[str, Any]) -> None:
        if not args.quiet:
            print(f"[{s['elapsed_s']:6.1f}s] version {s['version']:4d}/{cfg.max_steps} | "
                  f"outer loss {s['outer_loss']:.4f} | {s['commits_per_s']:.1f} commits/s | "
                  f"accepted {s.get('commits_accepted', 0)} rejected "
                  f"{s.get('commits_rejected', 0)} deferred {s.get('checkouts_deferred', 0)}",
                  flush=True)

    print(f"chronos run {cfg.problem}: {cfg.workers} workers, mode {cfg.mode}, "
          f"{cfg.max_steps} outer steps", flush=True)
    try:
        result = run_local(cfg, progress=show)
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", file=sys.stderr)
        return 130
    s = result.stats
    print(f"finished: version {result.version} in {result.wall_time:.1f} s "
          f"({'complete' if result.completed else 'INCOMPLETE'}); commits accepted "
          f"{s.get('commits_accepted', 0)}, rejected {s.get('commits_rejected', 0)}; "
          f"bytes received {s.get('bytes_received', 0)}, sent {s.get('bytes_sent', 0)}")
    for k, v in result.outer_params.items():
        flat = v.flatten()
        shown = ", ".join(f"{x:.4f}" for x in flat[:6].tolist())
        more = f", ... ({flat.numel()} values)" if flat.numel() > 6 else ""
        print(f"  {k} = [{shown}{more}]")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": config_dict(cfg), **result.summary(),
                                         "history": result.history}, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0 if result.completed else 1


def coordinator_main(argv: list[str] | None = None) -> int:
    """``chronos coordinator``: serve until ``--steps`` outer steps are done or Ctrl-C."""
    from chronos.distributed.coordinator import Coordinator
    from chronos.distributed.launcher import make_problem

    p = argparse.ArgumentParser(prog="chronos coordinator", description=coordinator_main.__doc__)
    p.add_argument("--problem", default=DEFAULT_PROBLEM,
                   help="factory whose default_outer_params() gives the initial λ")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--allow-remote", action="store_true",
                   help="permit binding a non-loopback --host")
    p.add_argument("--num-workers", type=int, default=None, help="required for --mode sync")
    _coordinator_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[coordinator] %(levelname)s %(message)s")
    problem = make_problem(args.problem, 0, args.num_workers or 1)
    outer0 = problem.default_outer_params()  # type: ignore[attr-defined]
    coord = Coordinator(
        outer0, port=args.port, host=args.host, allow_remote=args.allow_remote,
        mode=args.mode, num_workers=args.num_workers, max_in_flight=args.max_in_flight,
        max_staleness=args.max_staleness, decay=args.decay, outer_lr=args.outer_lr,
        optimizer=args.optimizer, min_commits=args.min_commits, max_steps=args.steps,
        lease_timeout=args.lease_timeout, heartbeat_interval=args.heartbeat_interval,
    )
    coord.start()
    print(f"coordinator listening on {coord.address}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: coord.stop())
    try:
        while not coord.wait(timeout=5.0):
            s = coord.stats()
            print(f"version {s['version']} | workers {s.get('workers_alive', 0)} | accepted "
                  f"{s.get('commits_accepted', 0)} rejected {s.get('commits_rejected', 0)}",
                  flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        coord.stop()
    print(f"stopped at version {coord.version}")
    return 0


def worker_main(argv: list[str] | None = None) -> int:
    """``chronos worker``: one worker process against a running coordinator."""
    from chronos.distributed.launcher import make_problem
    from chronos.distributed.worker import Worker, WorkerConfig

    p = argparse.ArgumentParser(prog="chronos worker", description=worker_main.__doc__)
    p.add_argument("problem", nargs="?", default=DEFAULT_PROBLEM)
    p.add_argument("--coordinator", default="tcp://127.0.0.1:5555")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--worker-id", default=None)
    p.add_argument("--inner-steps", type=int, default=None)
    p.add_argument("--hypergradient", choices=["implicit", "unrolled"], default="implicit")
    p.add_argument("--significance-threshold", type=float, default=0.0)
    p.add_argument("--straggler-delay", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-iterations", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[worker] %(levelname)s %(message)s")
    problem = make_problem(args.problem, args.rank, args.world_size)
    cfg = WorkerConfig(
        coordinator_addr=args.coordinator, worker_id=args.worker_id,
        inner_steps=args.inner_steps, hypergradient=args.hypergradient,
        significance_threshold=args.significance_threshold,
        straggler_delay=args.straggler_delay, num_threads=args.threads,
    )
    worker = Worker(problem, cfg)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    t0 = time.perf_counter()
    try:
        stats = worker.run(max_iterations=args.max_iterations)
    except KeyboardInterrupt:
        worker.close()
        stats = worker.stats()
    except ChronosError as e:
        print(f"worker failed: {e}", file=sys.stderr)
        return 1
    print(f"worker {worker.worker_id} done in {time.perf_counter() - t0:.1f} s: "
          f"{int(stats['iterations'])} iterations, {int(stats['commits_accepted'])} accepted, "
          f"{int(stats['commits_rejected'])} rejected")
    return 0
