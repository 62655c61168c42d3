"""Worker groups: a ``torch.distributed`` process group whose collectives are byte-counted.

A *worker group* is ``W`` processes that solve one inner problem together, data-parallel:
rank ``r`` holds shard ``r`` of the training data, and the group's inner objective is the
mean of the shards' objectives, ``f(θ, λ) = (1/W) Σ_r f_r(θ, λ)`` (equal shards, so this is the
objective over the union). Inner parameters move between ranks through collectives (gloo on
CPU) — never through the coordinator, which keeps only the small, versioned meta-state λ.

:class:`GroupSpec` says where the group meets: explicit (Chronos' launcher picks a free port
on 127.0.0.1) or :meth:`GroupSpec.from_env` from ``torchrun``'s variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so the same worker code runs on
one machine or many. :class:`Group` joins it and offers the few collectives the group solve
needs, each counted in a :class:`~chronos.communication.accounting.ByteCounter` on channel
``"collective"`` under the op name the caller gives.

Byte accounting (payload, per rank): ``all_reduce`` counts the tensor's bytes as sent and as
received; ``broadcast`` counts them as sent on the source and received elsewhere;
``all_gather`` counts this rank's tensor as sent and the other ``W − 1`` as received. The wire
carries more than the payload (a ring all-reduce moves about ``2(W−1)/W`` times it per rank,
plus TCP/gloo framing); payload bytes are what a codec can shrink, so they are what we report.

Joining checks what would otherwise hang or corrupt silently: every rank states its world size
and a fingerprint (parameter names, shapes and dtypes, shard size) in the rendezvous store
before gloo connects, so mismatched world sizes, shapes or shard sizes fail with a
:class:`~chronos.core.errors.ConfigError` naming the rank, within ``timeout``. Every collective
has the same ``timeout``: a rank that dies makes the others raise (within about a second when
its connections close, within ``timeout`` when it hangs), never wait forever.

Example (a one-rank group; real groups have ``world_size >= 2``):
    >>> import torch
    >>> from chronos.distributed.group import Group, GroupSpec, free_port
    >>> with Group(GroupSpec(rank=0, world_size=1, port=free_port())) as g:
    ...     x = g.all_reduce_mean({"w": torch.ones(3)}, op="demo")
    ...     g.counter.by_op()["demo"]["sent"]
    12
"""

from __future__ import annotations

import datetime
import math
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from chronos.communication.accounting import ByteCounter
from chronos.core.errors import ChronosError, ConfigError
from chronos.core.tensordict import TensorDict

__all__ = ["Group", "GroupError", "GroupSpec", "fingerprint", "free_port", "spawn_group"]


class GroupError(ChronosError, RuntimeError):
    """A collective failed: a rank died, hung past the timeout or disagreed on the setup."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (for a group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _env_int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    if raw is None:
        raise ConfigError(
            f"{name} is not set; start the group with torchrun (which sets RANK, WORLD_SIZE, "
            "MASTER_ADDR and MASTER_PORT) or give rank/world_size/port explicitly"
        )
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class GroupSpec:
    """Where and how a worker group meets.

    Args:
        rank: this process's rank, ``0 <= rank < world_size``; rank 0 is the group's leader
            (it hosts the rendezvous store and talks to the coordinator).
        world_size: processes in the group (>= 1).
        port: the rendezvous TCP port on ``host`` (>= 1).
        host: the leader's address; 127.0.0.1 unless the group spans machines.
        timeout: seconds a rendezvous or a collective may take before it fails (> 0).
        local_rank: the rank on this machine (torchrun's ``LOCAL_RANK``; informational).
        host_store: rank 0 hosts the rendezvous store on ``port`` (False under torchrun,
            whose agent already serves it there).
        prefix: key prefix in the store (torchrun restarts get a fresh one each).
    """

    rank: int
    world_size: int
    port: int
    host: str = "127.0.0.1"
    timeout: float = 60.0
    local_rank: int | None = None
    host_store: bool = True
    prefix: str = "chronos"

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "port"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name} must be an int, got {v!r}")
        if self.world_size < 1:
            raise ConfigError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"rank must be in [0, world_size={self.world_size}), got {self.rank}"
            )
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port must be in [1, 65535], got {self.port}")
        if not (isinstance(self.timeout, (int, float)) and 0 < self.timeout < math.inf):
            raise ConfigError(f"timeout must be a finite number of seconds > 0, got "
                              f"{self.timeout!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, timeout: float = 60.0) -> GroupSpec:
        """Read torchrun's ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` (default 127.0.0.1),
        ``MASTER_PORT`` and ``LOCAL_RANK`` (optional) from ``env`` (default ``os.environ``).

        >>> GroupSpec.from_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}).rank
        1
        """
        env = os.environ if env is None else env
        local = env.get("LOCAL_RANK")
        agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        return cls(
            rank=_env_int(env, "RANK"), world_size=_env_int(env, "WORLD_SIZE"),
            port=_env_int(env, "MASTER_PORT"), host=env.get("MASTER_ADDR", "127.0.0.1"),
            timeout=timeout, local_rank=None if local is None else _env_int(env, "LOCAL_RANK"),
            host_store=not agent,
            prefix=f"chronos/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}",
        )


def fingerprint(params: Mapping[str, Tensor], shard_size: int | None = None) -> str:
    """A short text naming the parameter structure (names, shapes, dtypes) and shard size,
    compared across ranks when a group forms.

    >>> import torch
    >>> fingerprint({"w": torch.zeros(2, 3)}, shard_size=10)
    'w:2x3:float32 | shard 10'
    """
    parts = [f"{k}:{'x'.join(map(str, v.shape)) or 'scalar'}:{str(v.dtype).removeprefix('torch.')}"
             for k, v in params.items()]
    return " ".join(parts) + ("" if shard_size is None else f" | shard {shard_size}")


def _differ(mine: str, theirs: str) -> str:
    if len(mine) + len(theirs) < 300:
        return f"{theirs!r}, this rank has {mine!r}"
    crc = [f"{zlib.crc32(x.encode()):08x}" for x in (theirs, mine)]
    return f"checksum {crc[0]}, this rank has {crc[1]}"


class Group:
    """A joined worker group (see the module docstring). Use as a context manager, or call
    :meth:`close`; only one group per process at a time (it is torch's default group).

    Args:
        spec: a :class:`GroupSpec`.
        fingerprint: compared across ranks on joining (see :func:`fingerprint`); ``None``
            skips the comparison.
    """

    def __init__(self, spec: GroupSpec, fingerprint: str | None = None) -> None:
        if dist.is_initialized():
            raise ConfigError("this process is already in a torch.distributed group; "
                              "close the other Group first")
        self.spec = spec
        self.rank = spec.rank
        self.world_size = spec.world_size
        self.counter = ByteCounter("collective")
        self._timeout = datetime.timedelta(seconds=spec.timeout)
        self._closed = False
        try:
            store = dist.TCPStore(spec.host, spec.port, None,
                                  spec.rank == 0 and spec.host_store,
                                  timeout=self._timeout, wait_for_workers=False)
        except Exception as e:
            raise GroupError(
                f"rank {spec.rank}: cannot reach the group's rendezvous at {spec.host}:"
                f"{spec.port} within {spec.timeout:g} s ({type(e).__name__}: {e}); is the "
                "leader (rank 0) running, and are MASTER_ADDR/MASTER_PORT the same everywhere?"
            ) from None
        self._key = f"{spec.prefix}/join/"
        self._check_peers(store, fingerprint)
        try:
            dist.init_process_group("gloo", store=dist.PrefixStore(f"{spec.prefix}/pg", store),
                                    rank=spec.rank, world_size=spec.world_size,
                                    timeout=self._timeout)
        except Exception as e:
            raise GroupError(f"rank {spec.rank}: the gloo group did not form: {e}") from None
        self._store = store

    def _check_peers(self, store: Any, mine: str | None) -> None:
        """Publish (world size, fingerprint); compare each peer's as soon as it appears, so a
        mismatch fails at once (not after waiting for a rank that will never come)."""
        spec = self.spec
        store.set(f"{self._key}{spec.rank}", f"{spec.world_size}\n{mine or ''}")
        pending = set(range(spec.world_size))
        deadline = time.monotonic() + spec.timeout
        while pending:
            try:
                ready = [r for r in sorted(pending) if store.check([f"{self._key}{r}"])]
                entries = {r: store.get(f"{self._key}{r}").decode() for r in ready}
            except Exception as e:
                raise GroupError(
                    f"rank {spec.rank}: the group's rendezvous store at {spec.host}:{spec.port} "
                    f"went away ({type(e).__name__}); the rank hosting it (rank 0) failed or "
                    "exited: see its error"
                ) from None
            for r, entry in entries.items():
                self._compare(r, entry, mine)
                pending.discard(r)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise GroupError(
                    f"rank {spec.rank}: ranks {', '.join(map(str, sorted(pending)))} of "
                    f"{spec.world_size} did not join within {spec.timeout:g} s; start "
                    f"world_size={spec.world_size} processes (every rank with the same "
                    "WORLD_SIZE) or lower world_size"
                )
            time.sleep(0.02)  # a store has no "any key changed" event to wait on

    def _compare(self, r: int, entry: str, mine: str | None) -> None:
        """Fail if peer ``r``'s published (world size, fingerprint) differs from ours."""
        spec = self.spec
        ws, _, theirs = entry.partition("\n")
        if int(ws) != spec.world_size:
            raise ConfigError(
                f"rank {spec.rank}: rank {r} was started with world_size={ws}, this rank "
                f"with {spec.world_size}; give every rank the same WORLD_SIZE"
            )
        if mine is not None and theirs and theirs != mine:
            raise ConfigError(
                f"rank {spec.rank}: rank {r} has a different problem: {_differ(mine, theirs)};"
                " every rank needs the same parameter shapes and equal shard sizes (give "
                "the problem a training-set size divisible by the group size)"
            )

    # -- collectives ------------------------------------------------------------------------

    def _run(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise GroupError("this Group was closed")
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as e:
            raise GroupError(
                f"rank {self.rank}: {what} failed ({str(e).splitlines()[0][:300]}); another "
                f"rank of the group died or hung for more than {self.spec.timeout:g} s"
            ) from None

    def all_reduce_mean(self, tensors: Mapping[str, Tensor], op: str) -> TensorDict:
        """``(1/W) Σ_r tensors_r``, one flat all-reduce per dtype (returns new tensors, each in
        its own dtype). Floating-point tensors only."""
        out: TensorDict = {}
        by_dtype: dict[torch.dtype, list[str]] = {}
        for k, t in tensors.items():
            if not t.is_floating_point():
                raise ConfigError(f"all_reduce_mean needs floating-point tensors; {k!r} is "
                                  f"{t.dtype}")
            by_dtype.setdefault(t.dtype, []).append(k)
        for keys in by_dtype.values():
            flat = torch.cat([tensors[k].detach().reshape(-1) for k in keys])
            self._run(op, dist.all_reduce, flat)
            self.counter.sent(op, flat.nbytes)
            self.counter.received(op, flat.nbytes)
            flat /= self.world_size
            i = 0
            for k in keys:
                n = tensors[k].numel()
                out[k] = flat[i:i + n].view_as(tensors[k])
                i += n
        return {k: out[k] for k in tensors}

    def all_reduce_max(self, value: float, op: str) -> float:
        """The largest ``value`` over the ranks (one float32: 4 bytes)."""
        t = torch.tensor([value], dtype=torch.float32)
        self._run(op, dist.all_reduce, t, op=dist.ReduceOp.MAX)
        self.counter.sent(op, t.nbytes)
        self.counter.received(op, t.nbytes)
        return float(t)

    def broadcast(self, tensor: Tensor, op: str, src: int = 0) -> Tensor:
        """``tensor`` from rank ``src`` to every rank, in place (returned for convenience)."""
        self._run(op, dist.broadcast, tensor, src=src)
        if self.rank == src:
            self.counter.sent(op, tensor.nbytes)
        else:
            self.counter.received(op, tensor.nbytes)
        return tensor

    def all_gather(self, tensor: Tensor, op: str) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on every rank), by rank."""
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._run(op, dist.all_gather, out, tensor.contiguous())
        self.counter.sent(op, tensor.nbytes)
        self.counter.received(op, tensor.nbytes * (self.world_size - 1))
        return out

    def bytes(self) -> dict[str, int]:
        """Total payload bytes this rank sent and received through collectives."""
        ops = self.counter.by_op().values()
        return {"sent": sum(c["sent"] for c in ops), "received": sum(c["received"] for c in ops)}

    def close(self) -> None:
        """Leave the group (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spawned(target: Callable[..., Any], spec: GroupSpec, args: tuple[Any, ...],
             fp: str | None, results: Any) -> None:
    torch.set_num_threads(1)
    try:
        with Group(spec, fp) as group:
            out = target(group, *args)
        # as bytes: a tensor put on a multiprocessing queue as-is is a shared-memory handle
        # that dies with this process, which may exit before the parent reads it
        results.put((spec.rank, True, pickle.dumps(out)))
    except BaseException as e:  # reported to the parent, which raises
        text = f"{type(e).__name__}: {e}" if isinstance(e, ChronosError) else (
            traceback.format_exc(limit=4))
        results.put((spec.rank, False, text))


def spawn_group(
    target: Callable[..., Any], world_size: int, args: Sequence[tuple[Any, ...]] | None = None,
    *, timeout: float = 120.0, group_timeout: float = 30.0,
    fingerprints: Sequence[str | None] | None = None,
) -> list[Any]:
    """Run ``target(group, *args[rank])`` in ``world_size`` fresh processes that form a group
    on 127.0.0.1, and return the results by rank (each must pickle).

    ``args`` gives each rank its arguments (default none), ``fingerprints`` each rank's
    :func:`fingerprint` (default none compared). Every process is stopped before this returns:
    after ``timeout`` seconds the remaining ones are killed and :class:`GroupError` is raised;
    a rank that raised makes this raise :class:`GroupError` with its message (the first by
    rank). ``group_timeout`` is the group's own rendezvous / collective timeout.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be an int >= 1, got {world_size!r}")
    per_rank = list(args) if args is not None else [() for _ in range(world_size)]
    fps = list(fingerprints) if fingerprints is not None else [None] * world_size
    if len(per_rank) != world_size or len(fps) != world_size:
        raise ConfigError(f"give args and fingerprints for each of the {world_size} ranks")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_spawned, daemon=True, name=f"chronos-group-{r}", args=(
        target, GroupSpec(r, world_size, port, timeout=group_timeout), tuple(per_rank[r]),
        fps[r], results)) for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(left, 0.5))
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break  # a rank died without reporting (killed)
                continue
            got[rank] = (ok, pickle.loads(value) if ok else value)
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join(5.0)
        results.close()
    failed = sorted(r for r, (ok, _) in got.items() if not ok)
    if failed:
        raise GroupError(f"rank {failed[0]} failed: {got[failed[0]][1]}")
    if len(got) < world_size:
        missing = sorted(set(range(world_size)) - set(got))
        raise GroupError(f"ranks {missing} did not finish within {timeout:g} s (exit codes "
                         f"{[procs[r].exitcode for r in missing]})")
    return [got[r][1] for r in range(world_size)]
