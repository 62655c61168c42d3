"""``chronos run``, ``chronos coordinator`` and ``chronos worker``.

* ``chronos run PROBLEM --workers N [--mode async|sync] [--max-staleness S] ...`` — a coordinator
  and N worker processes on this machine, with progress, stopped cleanly on completion or Ctrl-C.
* ``chronos coordinator --problem PROBLEM --port P ...`` — only the coordinator, for multi-host
  jobs (binds 127.0.0.1 unless ``--host`` and ``--allow-remote`` are given).
* ``chronos worker PROBLEM --coordinator tcp://HOST:PORT --rank R --world-size N`` — one worker.

``PROBLEM`` is ``package.module:factory`` (default: ``chronos.benchmarks.problems:
digits_weight_decay``); the factory is called as ``factory(rank, world_size)``.

Exit codes: 0 done (``run``: the job reached ``--steps``; ``coordinator`` / ``worker``: the job
is done, SIGTERM, or ``--max-iterations``); 1 the job failed or did not finish (``run``:
timeout or every worker died; ``worker``: the coordinator stayed unreachable); 2 bad usage or
configuration (one ``error:`` line on stderr, no traceback); 130 interrupted by Ctrl-C (after a
clean stop: ``run`` stops every process it started, ``coordinator`` tells its workers to leave).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from chronos.core.errors import ChronosError, ConfigError

__all__ = ["coordinator_main", "run_main", "worker_main"]

DEFAULT_PROBLEM = "chronos.benchmarks.problems:digits_weight_decay"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _delays(text: str) -> float | tuple[float, ...]:
    try:
        parts = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parts = []
    if not parts or not all(0 <= x < math.inf for x in parts):
        raise argparse.ArgumentTypeError(
            f"expected seconds >= 0, one value or one per worker separated by commas "
            f"(e.g. 0 or 0,0,1.5), got {text!r}"
        )
    return parts[0] if len(parts) == 1 else tuple(parts)


def _error(prog: str, e: BaseException) -> int:
    """One line on stderr; exit code 2 for configuration errors, else 1."""
    print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
    return EXIT_USAGE if isinstance(e, ConfigError) else EXIT_FAILED


def _coordinator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["async", "sync"], default="async")
    p.add_argument("--max-staleness", type=int, default=2, help="reject commits staler than S")
    p.add_argument("--max-in-flight", type=int, default=3, help="version window width")
    p.add_argument("--decay", type=float, default=0.5, help="stale commit weight = decay**s")
    p.add_argument("--outer-lr", type=float, default=None,
                   help="outer SGD step size (default: the problem's default_outer_lr, else 0.1)")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adam"], default="sgd")
    p.add_argument("--min-commits", type=int, default=1)
    p.add_argument("--lease-timeout", type=float, default=20.0)
    p.add_argument("--heartbeat-interval", type=float, default=1.0)


def run_main(argv: list[str] | None = None) -> int:
    """``chronos run``: a coordinator and N worker processes on this machine."""
    from chronos.distributed.launcher import (
        RunConfig,
        config_dict,
        load_factory,
        outer_losses,
        run_local,
    )

    p = argparse.ArgumentParser(prog="chronos run", description=run_main.__doc__)
    p.add_argument("problem", nargs="?", default=DEFAULT_PROBLEM, help="package.module:factory")
    p.add_argument("--workers", type=int, default=2)
    _coordinator_args(p)
    p.add_argument("--steps", type=int, default=50, help="outer steps (versions) to run")
    p.add_argument("--straggler-delay", type=_delays, default=0.0,
                   help="seconds per iteration, one value or one per worker (comma-separated)")
    p.add_argument("--inner-steps", type=int, default=None)
    p.add_argument("--hypergradient", choices=["implicit", "unrolled"], default="implicit")
    p.add_argument("--significance-threshold", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=300.0, help="give up after this many s")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write the result (config, figures, history) as JSON to FILE; '-' "
                        "prints it on stdout (the progress then goes to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    out: TextIO = sys.stderr if args.json == "-" else sys.stdout
    try:
        cfg = RunConfig(
            problem=args.problem, workers=args.workers, mode=args.mode, max_steps=args.steps,
            max_in_flight=args.max_in_flight, max_staleness=args.max_staleness,
            decay=args.decay, outer_lr=args.outer_lr, optimizer=args.optimizer,
            min_commits=args.min_commits, lease_timeout=args.lease_timeout,
            heartbeat_interval=args.heartbeat_interval, straggler_delay=args.straggler_delay,
            inner_steps=args.inner_steps, hypergradient=args.hypergradient,
            significance_threshold=args.significance_threshold, timeout=args.timeout,
        )
        load_factory(cfg.problem)  # a bad PROBLEM fails here, before anything starts
    except ChronosError as e:
        return _error(p.prog, e)

    def show(s: dict[str, Any]) -> None:
        if not args.quiet:
            print(f"[{s['elapsed_s']:6.1f}s] version {s['version']:4d}/{cfg.max_steps} | "
                  f"outer loss {s['outer_loss']:.4f} | {s['commits_per_s']:.1f} commits/s | "
                  f"accepted {s.get('commits_accepted', 0)} rejected "
                  f"{s.get('commits_rejected', 0)} deferred {s.get('checkouts_deferred', 0)} | "
                  f"workers {s.get('workers_running', 0)}/{cfg.workers}", file=out, flush=True)

    print(f"chronos run {cfg.problem}: {cfg.workers} workers, mode {cfg.mode}, "
          f"{cfg.max_steps} outer steps, max_staleness {cfg.max_staleness}, max_in_flight "
          f"{cfg.max_in_flight}", file=out, flush=True)
    try:
        result = run_local(cfg, progress=show)
    except KeyboardInterrupt:
        print("chronos run: interrupted; every worker process was stopped", file=sys.stderr,
              flush=True)
        return EXIT_INTERRUPTED
    except ChronosError as e:
        return _error(p.prog, e)
    s = result.stats
    wall = result.wall_time
    print(f"finished: version {result.version}/{cfg.max_steps} in {wall:.1f} s "
          f"({'complete' if result.completed else 'INCOMPLETE'}); "
          f"{s.get('commits_accepted', 0) / wall if wall > 0 else 0.0:.2f} commits/s; "
          f"commits accepted {s.get('commits_accepted', 0)}, rejected "
          f"{s.get('commits_rejected', 0)}; checkouts deferred {s.get('checkouts_deferred', 0)}; "
          f"bytes received {s.get('bytes_received', 0)}, sent {s.get('bytes_sent', 0)}; "
          f"worker exit codes {list(result.worker_exitcodes)}", file=out, flush=True)
    losses = outer_losses(result.history)
    if losses:
        n = min(cfg.workers, len(losses))
        print(f"  outer loss (mean of {n} steps): first {sum(losses[:n]) / n:.4f}, last "
              f"{sum(losses[-n:]) / n:.4f}", file=out)
    for k, v in result.outer_params.items():
        flat = v.flatten()
        shown = ", ".join(f"{x:.4f}" for x in flat[:6].tolist())
        more = f", ... ({flat.numel()} values)" if flat.numel() > 6 else ""
        print(f"  {k} = [{shown}{more}]", file=out, flush=True)
    if args.json is not None:
        text = json.dumps({"config": config_dict(cfg), **result.summary(),
                           "history": result.history}, indent=2, default=str)
        if args.json == "-":
            print(text, flush=True)
        else:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}", file=out)
    return EXIT_OK if result.completed else EXIT_FAILED


def coordinator_main(argv: list[str] | None = None) -> int:
    """``chronos coordinator``: serve until ``--steps`` outer steps are done, SIGTERM or
    Ctrl-C (then every worker is told to stop)."""
    from chronos.distributed.coordinator import Coordinator
    from chronos.distributed.launcher import (
        default_outer_lr,
        initial_outer_params,
        make_problem,
    )

    p = argparse.ArgumentParser(prog="chronos coordinator", description=coordinator_main.__doc__)
    p.add_argument("--problem", default=DEFAULT_PROBLEM,
                   help="factory whose default_outer_params() gives the initial λ")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5555, help="0: any free port (printed)")
    p.add_argument("--allow-remote", action="store_true",
                   help="permit binding a non-loopback --host")
    p.add_argument("--num-workers", type=int, default=None, help="required for --mode sync")
    _coordinator_args(p)
    p.add_argument("--steps", type=int, default=50,
                   help="outer steps (versions) to run; 0: until stopped")
    p.add_argument("--report-every", type=float, default=5.0, help="seconds between reports")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[coordinator] %(levelname)s %(message)s")
    try:
        problem = make_problem(args.problem, 0, args.num_workers or 1)
        coord = Coordinator(
            initial_outer_params(problem, args.problem), port=args.port, host=args.host,
            allow_remote=args.allow_remote, mode=args.mode, num_workers=args.num_workers,
            max_in_flight=args.max_in_flight, max_staleness=args.max_staleness,
            decay=args.decay,
            outer_lr=default_outer_lr(problem) if args.outer_lr is None else args.outer_lr,
            optimizer=args.optimizer, min_commits=args.min_commits, max_steps=args.steps or None,
            lease_timeout=args.lease_timeout, heartbeat_interval=args.heartbeat_interval,
        )
        coord.start()
    except ChronosError as e:
        return _error(p.prog, e)
    print(f"coordinator listening on {coord.address}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: coord.stop())
    code = EXIT_OK
    try:
        while not coord.wait(timeout=args.report_every):
            s = coord.stats()
            print(f"version {s['version']} | workers {s.get('workers_alive', 0)} | accepted "
                  f"{s.get('commits_accepted', 0)} rejected {s.get('commits_rejected', 0)}",
                  flush=True)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    finally:
        coord.stop()
    s = coord.stats()
    print(f"stopped at version {coord.version}; commits accepted {s.get('commits_accepted', 0)}"
          f", rejected {s.get('commits_rejected', 0)}; registrations "
          f"{s.get('registrations', 0)}", flush=True)
    return code


def worker_main(argv: list[str] | None = None) -> int:
    """``chronos worker``: one worker process against a running coordinator (until the job is
    done, ``--max-iterations``, SIGTERM or Ctrl-C)."""
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
    p.add_argument("--heartbeat-interval", type=float, default=None,
                   help="default: the coordinator's")
    p.add_argument("--request-timeout", type=float, default=10.0)
    p.add_argument("--connect-timeout", type=float, default=60.0,
                   help="give up after this many seconds without a coordinator")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[worker] %(levelname)s %(message)s")
    try:
        cfg = WorkerConfig(
            coordinator_addr=args.coordinator, worker_id=args.worker_id,
            inner_steps=args.inner_steps, hypergradient=args.hypergradient,
            significance_threshold=args.significance_threshold,
            straggler_delay=args.straggler_delay, num_threads=args.threads,
            heartbeat_interval=args.heartbeat_interval, request_timeout=args.request_timeout,
            connect_timeout=args.connect_timeout,
        )
        problem = make_problem(args.problem, args.rank, args.world_size)
        worker = Worker(problem, cfg)
    except ChronosError as e:
        return _error(p.prog, e)
    interrupted: list[bool] = []

    def on_sigint(*_: object) -> None:
        interrupted.append(True)
        worker.stop()

    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, on_sigint)
    t0 = time.perf_counter()
    try:
        stats = worker.run(max_iterations=args.max_iterations)
    except ChronosError as e:
        return _error(p.prog, e)
    print(f"worker {worker.worker_id} done in {time.perf_counter() - t0:.1f} s "
          f"({worker.stop_reason or 'max iterations'}): {int(stats['iterations'])} iterations, "
          f"{int(stats['commits_accepted'])} accepted, {int(stats['commits_rejected'])} "
          f"rejected, {int(stats['reconnects'])} reconnects", flush=True)
    return EXIT_INTERRUPTED if interrupted else EXIT_OK
