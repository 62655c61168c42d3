"""The ``chronos`` command line.

Subcommands:
  demo         the main job, quick: Chronos vs the synchronous baseline on MNIST
               hyper-cleaning (see ``chronos demo --help``)
  run          a coordinator and N worker processes on this machine
  coordinator  only the coordinator (multi-host jobs)
  worker       one worker against a running coordinator
  bench        run a benchmark: ``chronos bench NAME [ARGS...]``
               (= ``python -m chronos.benchmarks.NAME``)

Each subcommand's module exposes ``main(argv) -> int``; its heavy imports happen only when
the subcommand runs, so ``chronos --help`` stays fast. Output is line-buffered even into a pipe
(a benchmark's progress shows as it happens), and Ctrl-C at any moment, imports included, ends
with one line and exit code 130, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from chronos import __version__

__all__ = ["main"]

# name -> (module with main(argv), or module:function, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("chronos.benchmarks.headline:demo_main",
             "the main job, quick: Chronos vs the sync baseline, MNIST hyper-cleaning"),
    "run": ("chronos.distributed.cli:run_main", "a coordinator + N worker processes, here"),
    "coordinator": ("chronos.distributed.cli:coordinator_main", "serve one job's outer state"),
    "worker": ("chronos.distributed.cli:worker_main", "one worker against a coordinator"),
    "keys": ("chronos.distributed.keys:main", "generate CURVE keys for authenticated workers"),
}

BENCHMARKS: dict[str, str] = {
    "headline": "chronos.benchmarks.headline",
    "regularization": "chronos.benchmarks.demo",
    "hypergrad": "chronos.benchmarks.hypergrad",
    "protocol": "chronos.benchmarks.protocol",
    "scaling": "chronos.benchmarks.scaling",
    "communication": "chronos.benchmarks.communication",
    "continuum": "chronos.benchmarks.continuum",
    "staleness": "chronos.benchmarks.staleness",
    "hybrid": "chronos.benchmarks.hybrid",
    "load": "chronos.benchmarks.load",
    "report": "chronos.benchmarks.report",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chronos",
        description="Chronos: distributed bilevel optimization for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"chronos {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    bench = sub.add_parser("bench", help="run a benchmark", add_help=False)
    bench.add_argument("name", nargs="?", choices=sorted(BENCHMARKS))
    return parser


EXIT_INTERRUPTED = 130


def _line_buffered() -> None:
    """Flush stdout / stderr at every newline, also into a pipe or file (progress of a long
    benchmark must not sit in a block buffer until it ends)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True)
            except (ValueError, OSError):  # pragma: no cover  (a closed or odd stream)
                pass


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the subcommand; return an exit code."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # e.g. while a subcommand imports torch: one line, no traceback
        sys.stdout.flush()
        print("chronos: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    args_in = sys.argv[1:] if argv is None else list(argv)
    parser = _build_parser()
    if not args_in or args_in[0] in ("-h", "--help", "--version"):
        parser.parse_args(args_in)
        parser.print_help()
        return 0
    command, rest = args_in[0], args_in[1:]
    _line_buffered()
    if command in SUBCOMMANDS:
        module_name, _, func = SUBCOMMANDS[command][0].partition(":")
        module = importlib.import_module(module_name)
        return int(getattr(module, func or "main")(rest))
    if command == "bench":
        if not rest or rest[0] not in BENCHMARKS:
            parser.error(f"bench needs one of {sorted(BENCHMARKS)}, e.g. `chronos bench hypergrad`")
        module = importlib.import_module(BENCHMARKS[rest[0]])
        try:
            return int(module.main(rest[1:]))
        finally:
            sys.stdout.flush()
    parser.error(f"unknown command {command!r}; see `chronos --help`")
    return 2  # pragma: no cover  (parser.error exits)


if __name__ == "__main__":
    raise SystemExit(main())
