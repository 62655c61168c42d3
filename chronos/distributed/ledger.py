"""Per-worker accounting: what each worker's shard contributed to the outer updates.

Every outer step hands the optimizer ``g = Σ_i c_i g_i``, a combination of hypergradients with
coefficients ``c_i`` that the aggregation policy decides:

* ``aggregation="buffered"`` (commits since the last step): ``c_i = w_i / n`` with
  ``w_i = decay ** s_i`` and ``n`` commits in the step;
* ``aggregation="latest"`` (every live worker's latest hypergradient): ``c_k = 1 / K`` for the
  ``K`` workers holding an entry;
* sync mode: ``c_i = 1 / n``.

A worker's **contribution** is the sum of its coefficients over every step taken, and its
**share** is its contribution over the sum of everybody's: ``N`` equally represented workers get
``1 / N`` each. A worker whose commits are all rejected, or decayed to nothing, has a share near
0, which is what :meth:`WorkerLedger.warnings` reports (a live worker below ``0.5 / N``).

The ledger also counts, per worker: commits accepted and rejected, leases cancelled, the sum of
the weights its accepted commits were given (``weight_sum``), and the version of its last accepted
commit. Records of workers that left are kept (marked not alive) so a summary shows them; at most
``max_workers`` records are kept, the oldest departed ones dropped first.

Example (one step with a fresh and a stale commit, then a step of the stale worker alone):
    >>> ledger = WorkerLedger()
    >>> for w in ("a", "b"):
    ...     ledger.joined(w)
    >>> ledger.accepted("a", version=0, weight=1.0)
    >>> ledger.accepted("b", version=0, weight=0.5)
    >>> ledger.stepped({"a": 1.0 / 2, "b": 0.5 / 2})
    >>> ledger.accepted("b", version=1, weight=1.0)
    >>> ledger.stepped({"b": 1.0})
    >>> {w: round(r["share"], 4) for w, r in ledger.summary().items()}   # 0.5 / 1.75, 1.25 / 1.75
    {'a': 0.2857, 'b': 0.7143}
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SHARE_WARNING", "WorkerLedger", "WorkerRecord", "format_worker_lines", "share_warnings"]

SHARE_WARNING = 0.5
"""A live worker whose share is below ``SHARE_WARNING / N`` is reported by
:meth:`WorkerLedger.warnings`."""


@dataclass
class WorkerRecord:
    """One worker's figures (mutable; owned by :class:`WorkerLedger`)."""

    accepted: int = 0
    rejected: int = 0
    cancelled: int = 0
    weight_sum: float = 0.0
    contribution: float = 0.0
    steps: int = 0
    last_version: int = -1
    alive: bool = True


class WorkerLedger:
    """Per-worker counters and contribution shares (pure bookkeeping, no I/O).

    Args:
        max_workers: records kept at most (>= 1); beyond it the oldest record of a worker that
            left is dropped (live workers are never dropped).
    """

    def __init__(self, max_workers: int = 4096) -> None:
        self.max_workers = int(max_workers)
        self._records: OrderedDict[str, WorkerRecord] = OrderedDict()

    def _get(self, wid: str) -> WorkerRecord:
        rec = self._records.get(wid)
        if rec is None:
            rec = self._records[wid] = WorkerRecord()
            self._prune()
        return rec

    def _prune(self) -> None:
        if len(self._records) <= self.max_workers:
            return
        for wid in [w for w, r in self._records.items() if not r.alive]:
            del self._records[wid]
            if len(self._records) <= self.max_workers:
                return

    def joined(self, wid: str) -> None:
        """``wid`` registered (again): it is alive."""
        self._get(wid).alive = True
        self._records.move_to_end(wid)

    def left(self, wid: str) -> None:
        """``wid`` deregistered or expired."""
        rec = self._records.get(wid)
        if rec is not None:
            rec.alive = False

    def accepted(self, wid: str, version: int, weight: float) -> None:
        """A commit of ``wid`` computed on ``version`` was accepted with ``weight``."""
        rec = self._get(wid)
        rec.accepted += 1
        rec.weight_sum += float(weight)
        rec.last_version = max(rec.last_version, int(version))

    def rejected(self, wid: str) -> None:
        """A commit of ``wid`` was rejected (too stale, or sync barrier)."""
        self._get(wid).rejected += 1

    def cancelled(self, wid: str) -> None:
        """A lease of ``wid`` was cancelled (its commit could not have been accepted)."""
        self._get(wid).cancelled += 1

    def stepped(self, coefficients: Mapping[str, float]) -> None:
        """An outer step combined hypergradients with these per-worker coefficients ``c_w``."""
        for wid, c in coefficients.items():
            rec = self._get(wid)
            rec.contribution += float(c)
            rec.steps += 1

    def summary(self) -> dict[str, dict[str, Any]]:
        """Worker id → ``accepted``, ``rejected``, ``cancelled``, ``weight_sum``,
        ``contribution``, ``share``, ``steps`` (steps that used it), ``last_version``,
        ``alive``; in registration order."""
        total = sum(r.contribution for r in self._records.values())
        return {
            wid: {
                "accepted": r.accepted,
                "rejected": r.rejected,
                "cancelled": r.cancelled,
                "weight_sum": r.weight_sum,
                "contribution": r.contribution,
                "share": r.contribution / total if total > 0 else 0.0,
                "steps": r.steps,
                "last_version": r.last_version,
                "alive": r.alive,
            }
            for wid, r in self._records.items()
        }

    def warnings(self) -> list[str]:
        """One line per live worker whose share is below ``0.5 / N`` (``N`` workers that
        contributed or are alive), saying what it means and what to change."""
        return share_warnings(self.summary())

    def state_dict(self) -> dict[str, Any]:
        """The records as plain containers."""
        return {w: vars(r).copy() for w, r in self._records.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Inverse of :meth:`state_dict`; every restored worker is marked not alive (workers
        register again after a restore)."""
        self._records = OrderedDict()
        fields = WorkerRecord.__dataclass_fields__
        for wid, values in state.items():
            rec = WorkerRecord(**{k: v for k, v in values.items() if k in fields})
            rec.alive = False
            self._records[str(wid)] = rec


def share_warnings(workers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Warnings for live workers with a share below ``0.5 / N`` in a
    :meth:`WorkerLedger.summary` (or the ``workers`` entry of the coordinator's stats)."""
    counted = [w for w, r in workers.items() if r.get("alive") or r.get("contribution", 0) > 0]
    n = len(counted)
    if n < 2 or not any(r.get("contribution", 0) > 0 for r in workers.values()):
        return []
    floor = SHARE_WARNING / n
    out = []
    for wid, r in workers.items():
        if r.get("alive") and r.get("share", 0.0) < floor:
            cancelled = r.get("cancelled", 0)
            out.append(
                f"worker {wid!r} contributed {r.get('share', 0.0):.1%} of the outer updates "
                f"(fair share {1 / n:.1%}; {r.get('accepted', 0)} commits accepted, "
                f"{r.get('rejected', 0)} rejected"
                + (f", {cancelled} leases cancelled" if cancelled else "")
                + "): its shard barely counts, so λ is fit to the "
                "other shards. Use aggregation='latest' (--aggregation latest, the default), or "
                "mode='sync'."
            )
    return out


def format_worker_lines(workers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One summary line per worker (for ``chronos run``), then the share warnings.

    Example:
        >>> format_worker_lines({"w0": {"accepted": 3, "rejected": 1, "weight_sum": 2.5,
        ...     "share": 1.0, "last_version": 7, "alive": False, "contribution": 1.0}})[0][-38:]
        'weight sum 2.50, last version 7 (left)'
    """
    lines = []
    for wid, r in workers.items():
        state = "" if r.get("alive") else " (left)"
        cancelled = r.get("cancelled", 0)
        lines.append(
            f"  worker {wid}: share {r.get('share', 0.0):.1%}, {r.get('accepted', 0)} accepted, "
            f"{r.get('rejected', 0)} rejected"
            + (f", {cancelled} leases cancelled" if cancelled else "")
            + f", weight sum {r.get('weight_sum', 0.0):.2f}, "
            f"last version {r.get('last_version', -1)}{state}"
        )
    lines.extend(f"warning: {w}" for w in share_warnings(workers))
    return lines
