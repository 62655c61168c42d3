"""One rank of a worker group, started by ``torchrun`` (on one machine or many).

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; this module reads
them (:meth:`~chronos.distributed.group.GroupSpec.from_env`), builds the rank's problem as
``factory(RANK, WORLD_SIZE)`` (its shard of the data) and joins the group; rank 0 is the
group's leader and talks to the coordinator (see :mod:`chronos.distributed.group_worker`)::

    chronos coordinator --host 0.0.0.0 --allow-remote --problem mypkg.problems:factory
    torchrun --nnodes 2 --nproc-per-node 4 --node-rank N --master-addr HOST0 \\
        --master-port 29500 -m chronos.distributed.torchrun mypkg.problems:factory \\
        --coordinator tcp://HOST0:5555 --sync significance

(``torchrun --standalone --nproc-per-node 2 -m chronos.distributed.torchrun ...`` on one
machine.) Nothing imports this module, so ``python -m`` runs it without a second copy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from chronos.core.errors import ChronosError
from chronos.distributed.group import GroupSpec
from chronos.distributed.group_hypergrad import METHODS
from chronos.distributed.group_worker import GroupSettings, group_main
from chronos.distributed.inner_sync import SyncPolicy

__all__ = ["main"]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m chronos.distributed.torchrun",
        description="One rank of a worker group, from torchrun's environment (RANK, "
                    "WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Rank 0 talks to the coordinator.")
    p.add_argument("problem", help="PROBLEM factory 'package.module:function', called as "
                                   "factory(rank, world_size)")
    p.add_argument("--coordinator", required=True, metavar="tcp://HOST:PORT")
    p.add_argument("--sync", default="significance", metavar="POLICY",
                   help="every_step, periodic:H or significance[:τ] (default: significance)")
    p.add_argument("--codec", default="identity", help="codec of parameter exchanges")
    p.add_argument("--group-hypergradient", choices=METHODS, default="cg")
    p.add_argument("--inner-steps", type=int, default=None)
    p.add_argument("--max-iterations", type=int, default=None)
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a collective may take before the group fails (default 60)")
    p.add_argument("--worker-id", default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m chronos.distributed.torchrun``: see the module docstring."""
    from chronos.distributed.worker import WorkerConfig

    args = _parse(argv)
    try:
        spec = GroupSpec.from_env(timeout=args.timeout)
        settings = GroupSettings(policy=SyncPolicy.parse(args.sync, codec=args.codec),
                                 method=args.group_hypergradient, inner_steps=args.inner_steps)
        config = WorkerConfig(coordinator_addr=args.coordinator, worker_id=args.worker_id,
                              inner_steps=args.inner_steps)
    except ChronosError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    group_main(args.problem, spec.rank, spec.world_size, spec, settings, config,
               max_iterations=args.max_iterations, log_level=logging.INFO,
               import_path=(launcher_cwd(),))
    return 0


def launcher_cwd() -> str:
    """The current directory, where a user's PROBLEM module lives."""
    from chronos.distributed.launcher import add_cwd_to_path

    return add_cwd_to_path()


if __name__ == "__main__":
    raise SystemExit(main())
