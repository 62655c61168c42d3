"""``chronos run``, ``chronos coordinator`` and ``chronos worker``.

* ``chronos run PROBLEM --workers N [--mode async|sync] [--max-staleness S] ...`` — a coordinator
  and N worker processes on this machine, with progress (a bar on a terminal when tqdm is
  installed, one line a second otherwise), stopped cleanly on completion or Ctrl-C. It prints
  the coordinator's address first, so more workers can attach (``chronos worker``), and with
  ``--restart-workers`` / ``--max-restarts N`` starts a worker that died again (same rank).
* ``chronos coordinator --problem PROBLEM --port P ...`` — only the coordinator, for multi-host
  jobs (binds 127.0.0.1 unless ``--host`` and ``--allow-remote`` are given).
* ``chronos worker PROBLEM --coordinator tcp://HOST:PORT --rank R --world-size N`` — one worker.

``PROBLEM`` is ``package.module:factory`` (default: ``chronos.benchmarks.problems:
digits_weight_decay``); the factory is called as ``factory(rank, world_size)``. A module in the
current directory is found (as with ``python -m``), in the launcher and in every worker.
``--seed S`` seeds ``random``, NumPy and torch: the launcher / coordinator with ``S``, worker
``rank`` with ``S + rank``. Every default (see ``--help``) comes from
:mod:`chronos.distributed.defaults`.

Exit codes: 0 done (``run``: the job reached ``--steps``; ``coordinator`` / ``worker``: the job
is done, SIGTERM, or ``--max-iterations``); 1 the job failed or did not finish (``run``:
timeout or every worker died; ``worker``: the coordinator stayed unreachable); 2 bad usage or
configuration (one ``error:`` line on stderr, no traceback; e.g. a coordinator host name that
does not resolve); 130 interrupted by Ctrl-C, at any moment (after a clean stop: ``run`` stops
every process it started and still prints its summary and writes ``--json``, marked
``"interrupted": true``; ``coordinator`` tells its workers to leave).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from chronos.continuum.timescale import OPTIMIZERS, MultiTimescaleConfig, TimescaleConfig
from chronos.core.errors import ChronosError, ConfigError
from chronos.distributed import defaults

if TYPE_CHECKING:
    from chronos.distributed.launcher import RunConfig, RunResult

from chronos.distributed.keys import KeyRing, add_curve_args, curve_from_args
from chronos.distributed.transport import CurveClientConfig

__all__ = ["coordinator_main", "run_main", "worker_main"]

DEFAULT_PROBLEM = "chronos.benchmarks.problems:digits_weight_decay"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

RESTART_WORKERS = 5  # restarts per worker that `chronos run --restart-workers` allows


# -- argument types: a bad value is one `error:` line (argparse's) and exit code 2 ---------------


def _int_at_least(low: int, what: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{what} must be an int >= {low}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _float_type(accept: Callable[[float], bool], rule: str, what: str = "") -> Any:
    """An argparse type: a float for which ``accept`` holds, else ``"{what} must be {rule}"``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not accept(value):
            name = f"{what} " if what else ""
            raise argparse.ArgumentTypeError(f"{name}must be {rule}, got {text!r}")
        return value

    parse.__name__ = what or "number"
    return parse


def _is_positive(v: float) -> bool:
    return 0 < v < math.inf


_positive_float = _float_type(_is_positive, "a number of seconds > 0")
_positive_step = _float_type(_is_positive, "a number > 0")


def _min_commits(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"min_commits must be an int >= 1 or 'auto', got "
                                         f"{text!r}")
    return value


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


_seed = _int_at_least(0, "seed")

_TIMESCALE_USAGE = "expected NAME=FREQ[:OPTIMIZER[:LR]], e.g. log_decay=10 or log_decay=10:sgd:30"


def _timescale(text: str) -> TimescaleConfig:
    """``NAME=FREQ[:OPTIMIZER[:LR]]`` (``--timescale``) as a :class:`TimescaleConfig`; an empty
    OPTIMIZER (``NAME=FREQ::LR``) is the default group's."""
    name, eq, rest = text.partition("=")
    parts = rest.split(":")
    name = name.strip()
    if not eq or not name or len(parts) > 3:
        raise argparse.ArgumentTypeError(f"{_TIMESCALE_USAGE}; got {text!r}")
    try:
        freq = int(parts[0])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"timescale {name!r}: FREQ must be an int >= 1, got {parts[0]!r} ({_TIMESCALE_USAGE})"
        ) from None
    optimizer = (parts[1].strip().lower() or None) if len(parts) > 1 else None
    lr: float | None = None
    if len(parts) > 2:
        try:
            lr = float(parts[2])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"timescale {name!r}: LR must be a number > 0, got {parts[2]!r} "
                f"({_TIMESCALE_USAGE})"
            ) from None
    try:
        return TimescaleConfig(name, freq, optimizer=optimizer, lr=lr)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"{e} ({_TIMESCALE_USAGE})") from None


_timescale.__name__ = "timescale"


def _outer_optimizer(args: argparse.Namespace) -> Any:
    """The coordinator's ``optimizer``: ``--optimizer`` (a name or ``None``), or with
    ``--timescale`` a :class:`MultiTimescaleConfig` whose default group (and timescales that
    name no optimizer / LR) use ``--optimizer`` / ``--outer-lr``: given, else its defaults
    (Adam, 0.05; a named optimizer without ``--outer-lr`` gets its own default step)."""
    if not args.timescale:
        return args.optimizer
    settings: dict[str, Any] = {}
    if args.optimizer is not None:
        settings["optimizer"] = args.optimizer
        settings["lr"] = defaults.OUTER_LR.get(args.optimizer)
    if args.outer_lr is not None:
        settings["lr"] = args.outer_lr
    return MultiTimescaleConfig(args.timescale, **settings)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout; appends ``(default: …)`` to every option whose help
    does not already say what its default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.default is argparse.SUPPRESS or "(default" in text
                or (not action.option_strings and action.nargs not in ("?", "*"))):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: ``PROG: error: WHAT (see PROG
    --help)``, exit code 2."""

    def error(self, message: str) -> Any:  # argparse declares NoReturn
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr,
              flush=True)
        raise SystemExit(EXIT_USAGE)


def _parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=doc, formatter_class=_HelpFormatter)


def _parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """``p.parse_args(argv)``, or the exit code argparse chose (0 for ``--help``, 2 for bad
    usage: it has printed the usage and one ``error:`` line)."""
    try:
        return p.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE


def _error(prog: str, e: BaseException) -> int:
    """One line on stderr; exit code 2 for configuration errors, else 1."""
    print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
    return EXIT_USAGE if isinstance(e, ConfigError) else EXIT_FAILED


def _interrupted(prog: str, what: str) -> int:
    print(f"{prog}: interrupted; {what}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def _coordinator_args(
    p: argparse.ArgumentParser,
    seed_help: str = "seed random/NumPy/torch in this process (default: unseeded)",
) -> None:
    p.add_argument("--mode", choices=["async", "sync"], default="async",
                   help="async: bounded staleness; sync: every worker on every version")
    p.add_argument("--max-staleness", type=_int_at_least(0, "max_staleness"),
                   default=defaults.MAX_STALENESS, help="reject commits staler than S versions")
    p.add_argument("--max-in-flight", type=_int_at_least(1, "max_in_flight"),
                   default=defaults.MAX_IN_FLIGHT, help="version window width")
    p.add_argument("--decay", type=float, default=defaults.DECAY,
                   help="a commit of staleness s is weighted decay**s")
    p.add_argument("--optimizer", choices=sorted(defaults.OUTER_LR), default=None,
                   help="outer optimizer (default: the problem's default_outer_optimizer if it "
                        f"has a default_outer_lr, else {defaults.OUTER_OPTIMIZER})")
    lrs = ", ".join(f"{k} {v:g}" for k, v in defaults.OUTER_LR.items())
    p.add_argument("--outer-lr", type=_positive_step, default=None,
                   help="outer step size (default: the problem's default_outer_lr with its own "
                        f"optimizer, else per optimizer: {lrs})")
    p.add_argument("--timescale", type=_timescale, action="append", default=None,
                   metavar="NAME=FREQ[:OPTIMIZER[:LR]]",
                   help="update outer parameter NAME (or an fnmatch pattern) only every FREQ "
                        "outer steps, with the mean of its gradients since its last update, "
                        f"optionally with its own OPTIMIZER ({', '.join(OPTIMIZERS)}) and step "
                        "LR; repeatable. The other outer parameters form one group updated "
                        "every step. With --timescale, timescales and that group use "
                        "--optimizer / --outer-lr if given, else Adam with step 0.05 "
                        "(default: none, one optimizer for all of λ)")
    p.add_argument("--stale-correction", action="store_true",
                   help="correct a stale commit to the current λ with its worker's history "
                        "(g + J (λ_now − λ_v)) and count it fully, instead of only "
                        "down-weighting it by decay**staleness")
    p.add_argument("--aggregation", choices=["latest", "buffered"], default=defaults.AGGREGATION,
                   help="async outer steps: 'latest' averages every live worker's latest "
                        "hypergradient (a slow worker's shard counts fully); 'buffered' uses "
                        "only the commits since the last step, weighted decay**staleness")
    p.add_argument("--min-commits", type=_min_commits, default=defaults.MIN_COMMITS,
                   help="commits aggregated per async outer step: an int >= 1, or 'auto' "
                        "(scales with the number of live workers)")
    p.add_argument("--lease-timeout", type=_positive_float, default=defaults.LEASE_TIMEOUT,
                   help="seconds of silence after which a worker and its lease expire")
    p.add_argument("--heartbeat-interval", type=_positive_float,
                   default=defaults.HEARTBEAT_INTERVAL,
                   help="seconds between worker heartbeats (sent to workers on registration)")
    p.add_argument("--seed", type=_seed, default=None, help=seed_help)


def _durability_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("durability")
    g.add_argument("--state-dir", metavar="DIR", default=None,
                   help="keep the coordinator's state in DIR (commit log + snapshots): an "
                        "acknowledged commit is on disk, and a coordinator started on the same "
                        "DIR after a crash resumes where it was (default: in memory only)")
    if p.prog.endswith("coordinator"):
        g.add_argument("--journal-sync", choices=["batch", "always", "none"], default="batch",
                       help="fsync the log once per batch of messages (group commit), after "
                            "every record, or never (survives a process crash, not a power "
                            "loss)")
        g.add_argument("--snapshot-every", type=_int_at_least(1, "snapshot_every"),
                       default=100, help="versions between snapshots")


# -- chronos run -------------------------------------------------------------------------------


def _worker_solve_args(p: argparse.ArgumentParser) -> None:
    """How each worker solves and differentiates (``run`` and ``worker`` share them)."""
    p.add_argument("--inner-steps", type=_int_at_least(1, "inner_steps"), default=None,
                   help="inner solver steps (default: the problem's)")
    p.add_argument("--hypergradient", choices=["implicit", "unrolled"], default="implicit",
                   help="how workers differentiate through the inner solve")
    p.add_argument("--unroll-lr", type=_positive_step, default=None,
                   help="with --hypergradient unrolled: unroll plain gradient descent of this "
                        "step from the solution (default: replay the problem's own SGD/momentum "
                        "solve; needed for problems solved by L-BFGS or Adam)")
    p.add_argument("--amortized", action="store_true",
                   help="amortized hypergradients: warm-start the inner and linear solves from "
                        "the worker's memory of past steps and loosen the inner tolerance in "
                        "proportion to the hypergradient norm (implicit only)")
    p.add_argument("--significance-threshold", default=0.0,
                   type=_float_type(lambda v: 0 <= v < math.inf, "a number >= 0",
                                    "significance_threshold"),
                   help="hold hypergradients back (taking local outer steps, error feedback) "
                        "until the accumulated step ||η·r|| / (||λ|| + scale) exceeds this; "
                        "0 sends every one")
    p.add_argument("--target-rate", default=None,
                   type=_float_type(lambda v: 0 < v <= 1, "in (0, 1]", "target_rate"),
                   help="adapt the threshold so about this fraction of rounds is sent "
                        "(default: fixed threshold)")
    p.add_argument("--max-skip", type=_int_at_least(1, "max_skip"), default=None,
                   help="send at the latest after this many held-back rounds (default: "
                        "WorkerConfig's, 8)")
    p.add_argument("--local-lr", type=_positive_step, default=None,
                   help="step size of the local outer steps (default: the coordinator's SGD "
                        "step, else measured from its steps)")
    p.add_argument("--codec", default="identity",
                   help="compression of commits and delta checkouts, with error feedback: "
                        "identity, fp16, bf16, int8, int8:stochastic, topk:F, topk:F+int8, ...")


def _sparse_options(args: argparse.Namespace) -> dict[str, Any]:
    """The WorkerConfig fields of :func:`_worker_solve_args`' sparse-communication options."""
    out: dict[str, Any] = {"codec": args.codec}
    if args.amortized:
        out["amortized"] = True
    for name in ("target_rate", "max_skip", "local_lr"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    return out


def _group_args(p: argparse.ArgumentParser) -> None:
    """``chronos run``'s worker-group options (see :mod:`chronos.distributed.group_worker`)."""
    g = p.add_argument_group("worker groups (data-parallel inner solves over torch.distributed)")
    g.add_argument("--group-size", type=_int_at_least(1, "group_size"), default=1, metavar="G",
                   help="processes per worker group: each group solves one inner problem over "
                        "the union of its members' shards, synchronizing θ through gloo "
                        "collectives; --workers counts every process and must be a multiple "
                        "of G (default 1: no groups)")
    g.add_argument("--sync", default="significance", metavar="POLICY",
                   help="when a group's ranks synchronize θ: every_step (all-reduce every "
                        "step, like DDP), periodic:H (local SGD) or significance[:τ] (when "
                        "the relative drift exceeds τ, checked every 4 steps; default τ 0.05)")
    g.add_argument("--group-hypergradient", choices=["cg", "pcg", "local"], default="cg",
                   help="cg: distributed CG, exact (default); pcg: distributed CG "
                        "preconditioned by the ranks' local Hessians, exact, fewer messages; "
                        "local: averaged local solves, one all-reduce, approximate")
    g.add_argument("--group-codec", default="identity", metavar="CODEC",
                   help="codec of the local policies' parameter exchanges, with error "
                        "feedback (e.g. topk:0.1, int8; default identity)")


def run_main(argv: list[str] | None = None) -> int:
    """``chronos run``: a coordinator and N worker processes on this machine."""
    try:
        return _run(argv)
    except KeyboardInterrupt:  # e.g. while importing torch or the problem's data
        return _interrupted("chronos run", "nothing is left running")


def _run(argv: list[str] | None) -> int:
    p = _parser("chronos run", run_main.__doc__)
    p.add_argument("problem", nargs="?", default=DEFAULT_PROBLEM, help="package.module:factory")
    p.add_argument("--workers", type=_int_at_least(1, "workers"), default=2,
                   help="worker processes to start")
    _coordinator_args(p, "seed random/NumPy/torch: the launcher with SEED, worker RANK with "
                         "SEED + RANK; recorded in --json (default: unseeded)")
    p.add_argument("--steps", type=_int_at_least(1, "steps"), default=50,
                   help="outer steps (versions) to run")
    p.add_argument("--straggler-delay", type=_delays, default=0.0,
                   help="seconds per iteration, one value or one per worker (comma-separated)")
    _worker_solve_args(p)
    _group_args(p)
    p.add_argument("--timeout", type=_positive_float, default=300.0,
                   help="give up after this many seconds")
    p.add_argument("--restart-workers", action="store_true",
                   help="start a worker process that dies before the job is done (a non-zero "
                        "exit, e.g. killed) again, with the same rank and id, up to "
                        f"{RESTART_WORKERS} times per worker (default: a dead worker stays "
                        "dead)")
    p.add_argument("--max-restarts", type=_int_at_least(0, "max_restarts"), default=None,
                   metavar="N",
                   help="as --restart-workers, with at most N restarts per worker (0: none) "
                        "(default: 0, or with --restart-workers "
                        f"{RESTART_WORKERS})")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write the result (config, figures, history) as JSON to FILE; '-' "
                        "prints it on stdout (the progress then goes to stderr) "
                        "(default: no JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _durability_args(p)
    add_curve_args(p, "run")
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    from chronos.distributed.launcher import (
        RunConfig,
        RunInterrupted,
        add_cwd_to_path,
        load_factory,
        run_local,
    )

    out: TextIO = sys.stderr if args.json == "-" else sys.stdout
    add_cwd_to_path()
    try:
        cfg = RunConfig(
            problem=args.problem, workers=args.workers, mode=args.mode, max_steps=args.steps,
            max_in_flight=args.max_in_flight, max_staleness=args.max_staleness,
            decay=args.decay, outer_lr=args.outer_lr, optimizer=_outer_optimizer(args),
            min_commits=args.min_commits, lease_timeout=args.lease_timeout,
            heartbeat_interval=args.heartbeat_interval, straggler_delay=args.straggler_delay,
            inner_steps=args.inner_steps, hypergradient=args.hypergradient,
            unroll_lr=args.unroll_lr,
            significance_threshold=args.significance_threshold, timeout=args.timeout,
            worker_options=_sparse_options(args), stale_correction=args.stale_correction,
            aggregation=args.aggregation, seed=args.seed, group_size=args.group_size,
            sync=args.sync, group_hypergradient=args.group_hypergradient,
            group_codec=args.group_codec, max_restarts=_max_restarts(args),
            curve_keys=args.curve_keys, allowed_keys=args.allowed_keys,
            state_dir=args.state_dir,
        )
        load_factory(cfg.problem)  # a bad PROBLEM fails here, before anything starts
        from chronos.distributed.worker import WorkerConfig

        WorkerConfig(**cfg.worker_options)  # and a bad --codec / sparse option here
    except ChronosError as e:
        return _error(p.prog, e)

    if cfg.group_size > 1:
        print(f"worker groups: {cfg.num_groups} of {cfg.group_size} processes (gloo on "
              f"127.0.0.1), inner sync {cfg.group_settings().policy.spec}, hypergradient "
              f"{cfg.group_hypergradient}; one leader per group talks to the coordinator",
              file=out, flush=True)
    print(f"chronos run {cfg.problem}: {cfg.workers} workers, mode {cfg.mode}, "
          f"{cfg.max_steps} outer steps, max_staleness {cfg.max_staleness}, max_in_flight "
          f"{cfg.max_in_flight}"
          + ("" if cfg.mode == "sync" else f", aggregation {cfg.aggregation}")
          + ("" if cfg.seed is None else f", seed {cfg.seed}")
          + "".join(f", {t.name} every {t.update_frequency}" for t in args.timescale or ())
          + ("" if not cfg.max_restarts else
             f", dead workers restarted up to {cfg.max_restarts} "
             f"time{'s' if cfg.max_restarts > 1 else ''} each"),
          file=out, flush=True)
    progress = Progress(out, cfg.max_steps, cfg.workers, quiet=args.quiet,
                        committers=cfg.num_groups)

    def announce(address: str) -> None:
        progress.message(address_line(address, cfg.problem))

    code = EXIT_OK
    try:
        result = run_local(cfg, progress=progress, on_start=announce)
    except RunInterrupted as e:
        progress.close()
        print("chronos run: interrupted; every worker process was stopped", file=sys.stderr,
              flush=True)
        result, code = e.result, EXIT_INTERRUPTED
    except ChronosError as e:
        progress.close()
        return _error(p.prog, e)
    finally:
        progress.close()
    print_summary(result, cfg, out)
    if args.json is not None:
        _write_json(args.json, cfg, result, out)
    if code == EXIT_OK and not result.completed:
        code = EXIT_FAILED
    return code


def _max_restarts(args: argparse.Namespace) -> int:
    """``--max-restarts N`` if given, else ``RESTART_WORKERS`` with ``--restart-workers``,
    else 0."""
    if args.max_restarts is not None:
        return int(args.max_restarts)
    return RESTART_WORKERS if args.restart_workers else 0


def address_line(address: str, problem: str) -> str:
    """``chronos run``'s line saying where its coordinator listens and how to attach more
    workers to it."""
    return (f"coordinator: {address} (attach more workers with: chronos worker {problem} "
            f"--coordinator {address})")


def _format_loss(s: dict[str, Any], workers: int) -> str:
    loss = s.get("outer_loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        return f"outer loss {loss:.4f}"
    if not s.get("commits_accepted") and not s.get("version"):
        alive = s.get("workers_alive")
        if isinstance(alive, int) and alive < workers:
            return f"outer loss — (waiting for workers: {alive}/{workers} connected)"
        return "outer loss — (waiting for the first commit)"
    return "outer loss —"


def progress_line(s: dict[str, Any], max_steps: int, workers: int,
                  committers: int | None = None) -> str:
    """One progress line from :func:`~chronos.distributed.launcher.run_local`'s figures; the
    outer loss reads ``—`` until a step has reported one (never ``nan``). ``committers``: how
    many processes register with the coordinator (default ``workers``; with worker groups,
    one per group)."""
    return (f"[{s.get('elapsed_s', 0.0):6.1f}s] version {s.get('version', 0):4d}/{max_steps} | "
            f"{_format_loss(s, committers or workers)} | "
            f"{s.get('commits_per_s', 0.0):.1f} commits/s | "
            f"accepted {s.get('commits_accepted', 0)} rejected "
            f"{s.get('commits_rejected', 0)} deferred {s.get('checkouts_deferred', 0)} | "
            f"workers {s.get('workers_running', 0)}/{workers}")


class Progress:
    """``chronos run``'s progress: a tqdm bar when ``out`` is a terminal and tqdm is installed
    (``pip install chronos[bench]``), else one plain line per report (what logs, tests and CI
    read); nothing with ``quiet``. Call it with run_local's figures; :meth:`close` at the end."""

    def __init__(self, out: TextIO, max_steps: int, workers: int, quiet: bool = False,
                 committers: int | None = None) -> None:
        self.out, self.max_steps, self.workers, self.quiet = out, max_steps, workers, quiet
        self.committers = committers or workers
        self.bar: Any = None
        if quiet or not _isatty(out):
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=max_steps, file=out, unit="step", desc="outer steps",
                        dynamic_ncols=True, leave=True)

    def __call__(self, s: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.bar is None:
            print(progress_line(s, self.max_steps, self.workers, self.committers),
                  file=self.out, flush=True)
            return
        version = min(int(s.get("version", 0)), self.max_steps)
        if version > self.bar.n:
            self.bar.update(version - self.bar.n)
        self.bar.set_postfix_str(
            f"{_format_loss(s, self.committers)} | {s.get('commits_per_s', 0.0):.1f} commits/s | "
            f"rejected "
            f"{s.get('commits_rejected', 0)} | workers {s.get('workers_running', 0)}/"
            f"{self.workers}", refresh=True)

    def message(self, line: str) -> None:
        """Print ``line`` (also with ``quiet``), above the bar if there is one."""
        if self.bar is not None:
            self.bar.write(line, file=self.out)
            self.out.flush()
            return
        print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def print_summary(result: RunResult, cfg: RunConfig, out: TextIO) -> None:
    """The end of ``chronos run``: how far it got, the counters, one line per worker (its share
    of the outer updates, commits accepted and rejected; a warning for a live worker whose
    share is far below 1/N), the outer loss and the final λ."""
    from chronos.distributed.launcher import format_bytes_by_op, outer_losses
    from chronos.distributed.ledger import format_worker_lines

    s = result.stats
    wall = result.wall_time
    status = ("INTERRUPTED" if result.interrupted else
              "complete" if result.completed else "INCOMPLETE")
    print(f"finished: version {result.version}/{cfg.max_steps} in {wall:.1f} s ({status}); "
          f"{s.get('commits_accepted', 0) / wall if wall > 0 else 0.0:.2f} commits/s; "
          f"commits accepted {s.get('commits_accepted', 0)}, rejected "
          f"{s.get('commits_rejected', 0)}; checkouts deferred {s.get('checkouts_deferred', 0)}; "
          f"bytes received {s.get('bytes_received', 0)}, sent {s.get('bytes_sent', 0)}; "
          f"worker exit codes {list(result.worker_exitcodes)}", file=out, flush=True)
    if result.worker_restarts:
        shown = ", ".join(f"{w} ×{n}" for w, n in result.worker_restarts.items())
        print(f"  restarts: {shown}", file=out, flush=True)
    restored = s.get("restored")
    if isinstance(restored, dict) and (restored.get("snapshot") is not None
                                       or restored.get("records")):
        print(f"  resumed from {cfg.state_dir} at version {restored['version']} (its counters "
              "include the earlier run's)", file=out, flush=True)
    for line in format_bytes_by_op(result):
        print(line, file=out)
    for wid, ws in result.worker_stats.items():
        g = ws.get("group")
        if isinstance(g, dict) and g.get("role") == "leader":
            acc = g.get("test_accuracy")
            print(f"  group of {wid}: {g.get('rounds', 0)} rounds, {g.get('syncs', 0)} syncs in "
                  f"{g.get('inner_steps', 0)} inner steps ({g.get('policy')}), "
                  f"{g.get('linear_iterations', 0)} CG iterations"
                  + ("" if acc is None else f", test accuracy {100 * acc:.2f}%"), file=out)
    workers = s.get("workers")
    if isinstance(workers, dict):
        print(f"  aggregation {s.get('aggregation', '?')}; per worker:", file=out)
        for line in format_worker_lines(workers):
            print(line, file=out)
    losses = outer_losses(result.history)
    if losses:
        n = min(cfg.num_groups, len(losses))
        print(f"  outer loss (mean of {n} steps): first {sum(losses[:n]) / n:.4f}, last "
              f"{sum(losses[-n:]) / n:.4f}", file=out)
    else:
        print("  outer loss: — (no step reported one)", file=out)
    for k, v in result.outer_params.items():
        flat = v.flatten()
        shown = ", ".join(f"{x:.4f}" for x in flat[:6].tolist())
        more = f", ... ({flat.numel()} values)" if flat.numel() > 6 else ""
        print(f"  {k} = [{shown}{more}]", file=out, flush=True)


def _write_json(target: str, cfg: RunConfig, result: RunResult, out: TextIO) -> None:
    from chronos.distributed.launcher import config_dict

    text = json.dumps({"config": config_dict(cfg), "seed": cfg.seed, **result.summary(),
                       "history": result.history}, indent=2, default=str)
    if target == "-":
        print(text, flush=True)
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}", file=out, flush=True)


# -- chronos coordinator -----------------------------------------------------------------------


def coordinator_main(argv: list[str] | None = None) -> int:
    """``chronos coordinator``: serve until ``--steps`` outer steps are done, SIGTERM or
    Ctrl-C (then every worker is told to stop)."""
    try:
        return _coordinator(argv)
    except KeyboardInterrupt:  # before the loop: nothing was serving yet
        return _interrupted("chronos coordinator", "nothing is left running")


def _coordinator(argv: list[str] | None) -> int:
    p = _parser("chronos coordinator", coordinator_main.__doc__)
    p.add_argument("--problem", default=DEFAULT_PROBLEM,
                   help="factory whose default_outer_params() gives the initial λ")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind")
    p.add_argument("--port", type=_int_at_least(0, "port"), default=5555,
                   help="0: any free port (printed)")
    p.add_argument("--allow-remote", action="store_true",
                   help="permit binding a non-loopback --host")
    p.add_argument("--num-workers", type=_int_at_least(1, "num_workers"), default=None,
                   help="workers in the job; required for --mode sync (default: not fixed)")
    _coordinator_args(p)
    p.add_argument("--steps", type=_int_at_least(0, "steps"), default=50,
                   help="outer steps (versions) to run; 0: until stopped")
    p.add_argument("--report-every", type=_positive_float, default=5.0,
                   help="seconds between reports")
    _durability_args(p)
    add_curve_args(p, "coordinator")
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    from chronos.distributed.launcher import (
        add_cwd_to_path,
        coordinator_settings,
        initial_outer_params,
        make_coordinator,
        make_problem,
        seed_everything,
    )

    logging.basicConfig(level=logging.INFO, format="[coordinator] %(levelname)s %(message)s")
    add_cwd_to_path()
    seed_everything(args.seed)
    try:
        ring = curve_from_args(args, "coordinator")
        assert ring is None or isinstance(ring, KeyRing)
        problem = make_problem(args.problem, 0, args.num_workers or 1)
        coord = make_coordinator(
            initial_outer_params(problem, args.problem),
            coordinator_settings(_outer_optimizer(args), args.outer_lr, args.min_commits,
                                 problem),
            port=args.port, host=args.host, allow_remote=args.allow_remote, mode=args.mode,
            num_workers=args.num_workers, max_in_flight=args.max_in_flight,
            max_staleness=args.max_staleness, decay=args.decay, max_steps=args.steps or None,
            lease_timeout=args.lease_timeout, heartbeat_interval=args.heartbeat_interval,
            stale_correction=args.stale_correction, aggregation=args.aggregation,
            state_dir=args.state_dir, journal_sync=args.journal_sync,
            snapshot_every=args.snapshot_every,
            curve=None if ring is None else ring.server,
            key_names=None if ring is None else ring.key_names,
        )
    except ChronosError as e:
        return _error(p.prog, e)
    if coord.restored is not None:
        r = coord.restored
        print(f"state directory {args.state_dir}: " + (
            f"resumed at version {r['version']} (snapshot {r['snapshot']} + {r['records']} "
            "log records)" if r["snapshot"] is not None or r["records"] else "new"),
            flush=True)
    code = EXIT_OK
    try:
        try:
            coord.start()
        except ChronosError as e:
            return _error(p.prog, e)
        print(f"coordinator listening on {coord.address}"
              + ("" if args.seed is None else f" (seed {args.seed})")
              + (", CURVE" if ring is not None else ""), flush=True)
        signal.signal(signal.SIGTERM, lambda *_: coord.stop())
        while not coord.wait(timeout=args.report_every):
            s = coord.stats()
            print(f"version {s['version']} | workers {s.get('workers_alive', 0)} | accepted "
                  f"{s.get('commits_accepted', 0)} rejected {s.get('commits_rejected', 0)}",
                  flush=True)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop
        coord.stop()
    s = coord.stats()
    print(f"stopped at version {coord.version}; commits accepted {s.get('commits_accepted', 0)}"
          f", rejected {s.get('commits_rejected', 0)}; registrations "
          f"{s.get('registrations', 0)}; aggregation {s.get('aggregation', '?')}", flush=True)
    from chronos.distributed.ledger import format_worker_lines

    for line in format_worker_lines(s.get("workers") or {}):
        print(line, flush=True)
    return code


# -- chronos worker ----------------------------------------------------------------------------


def worker_main(argv: list[str] | None = None) -> int:
    """``chronos worker``: one worker process against a running coordinator (until the job is
    done, ``--max-iterations``, SIGTERM or Ctrl-C)."""
    try:
        return _worker(argv)
    except KeyboardInterrupt:  # before the worker runs (e.g. importing torch)
        return _interrupted("chronos worker", "nothing is left running")


def _worker(argv: list[str] | None) -> int:
    p = _parser("chronos worker", worker_main.__doc__)
    p.add_argument("problem", nargs="?", default=DEFAULT_PROBLEM, help="package.module:factory")
    p.add_argument("--coordinator", default="tcp://127.0.0.1:5555",
                   help="the coordinator's address, tcp://HOST:PORT")
    p.add_argument("--rank", type=_int_at_least(0, "rank"), default=0,
                   help="this worker's rank (its data shard; its seed is --seed + rank)")
    p.add_argument("--world-size", type=_int_at_least(1, "world_size"), default=1,
                   help="number of workers in the job")
    p.add_argument("--worker-id", default=None,
                   help="unique id of this worker (default: host name and process id)")
    _worker_solve_args(p)
    p.add_argument("--straggler-delay", type=float, default=0.0,
                   help="injected seconds of busy work per iteration")
    p.add_argument("--threads", type=_int_at_least(1, "threads"), default=1,
                   help="torch threads")
    p.add_argument("--max-iterations", type=_int_at_least(0, "max_iterations"), default=None,
                   help="stop after this many iterations (default: until the job is done)")
    p.add_argument("--heartbeat-interval", type=_positive_float, default=None,
                   help="seconds between heartbeats (default: the coordinator's)")
    p.add_argument("--request-timeout", type=_positive_float, default=10.0,
                   help="re-send a request after this many seconds without a reply")
    p.add_argument("--connect-timeout", type=_positive_float, default=60.0,
                   help="give up after this many seconds without a coordinator")
    p.add_argument("--seed", type=_seed, default=None,
                   help="seed random/NumPy/torch with seed + rank (default: unseeded)")
    add_curve_args(p, "worker")
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    if args.rank >= args.world_size:
        why = f"--rank {args.rank} must be < --world-size {args.world_size}"
        return _error(p.prog, ConfigError(why))
    from chronos.distributed.launcher import add_cwd_to_path, make_problem, seed_everything
    from chronos.distributed.worker import Worker, WorkerConfig
    from chronos.distributed.worker_link import resolve_address

    logging.basicConfig(level=logging.INFO, format="[worker] %(levelname)s %(message)s")
    add_cwd_to_path()
    seed_everything(None if args.seed is None else args.seed + args.rank)
    try:
        curve = curve_from_args(args, "worker")
        assert curve is None or isinstance(curve, CurveClientConfig)
        cfg = WorkerConfig(
            coordinator_addr=args.coordinator, worker_id=args.worker_id, curve=curve,
            inner_steps=args.inner_steps, hypergradient=args.hypergradient,
            unroll_lr=args.unroll_lr, significance_threshold=args.significance_threshold,
            straggler_delay=args.straggler_delay, num_threads=args.threads,
            heartbeat_interval=args.heartbeat_interval, request_timeout=args.request_timeout,
            connect_timeout=args.connect_timeout, **_sparse_options(args),
        )
        resolve_address(cfg.coordinator_addr)  # a host that does not resolve: say so, now
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
    print(f"worker {worker.worker_id}: connecting to {cfg.coordinator_addr} (timeout "
          f"{cfg.connect_timeout:g} s)", flush=True)
    t0 = time.perf_counter()
    try:
        stats = worker.run(max_iterations=args.max_iterations)
    except ChronosError as e:
        return EXIT_INTERRUPTED if interrupted else _error(p.prog, e)
    print(f"worker {worker.worker_id} done in {time.perf_counter() - t0:.1f} s "
          f"({worker.stop_reason or 'max iterations'}): {int(stats['iterations'])} iterations, "
          f"{int(stats['commits_accepted'])} accepted, {int(stats['commits_rejected'])} "
          f"rejected, {int(stats['reconnects'])} reconnects", flush=True)
    return EXIT_INTERRUPTED if interrupted else EXIT_OK
