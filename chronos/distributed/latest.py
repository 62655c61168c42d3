"""The aggregated-gradient table: each live worker's latest hypergradient (SAG / IAG style).

With ``aggregation="latest"`` (the async default) the coordinator keeps, for every live worker
``k``, the hypergradient ``g_k`` of its latest accepted commit and the version ``v_k`` it was
computed on. Each outer step uses their plain mean

    ``g = (min(n, K) / K) · (1/K) Σ_k g_k(λ_{v_k})``

over the ``K`` live workers (one that has not committed yet counts as a zero entry), whatever
the entries' age, with ``n`` the commits accepted
since the previous step: so a slow worker's shard is in every step at its latest value instead
of being rejected or decayed to nothing. This is the incremental aggregated gradient (IAG)
method, the deterministic sibling of SAG.

Why the factor ``n / K`` (the fraction of the table that is new): an entry stays in the table
for about ``K / n`` steps, so without it every hypergradient would be applied ``K / n`` times
(a step size ``K / n`` times larger than sync's for the same ``outer_lr``, unstable with delays).
With it, each hypergradient is applied with total weight about ``1/K``, as in a sync step, and a
worker ``r`` times slower than the others keeps its entry ``r`` times longer, which is exactly
what makes its shard count as much as theirs. When all ``K`` workers commit before a step the
rule is the sync average.

Why it finds the synchronous fixed point: if λ settles at ``λ̄``, every entry becomes
``g_k(λ̄)`` and the step direction ``(1/K) Σ_k g_k(λ̄)``, which must then be 0: ``λ̄`` is a root
of ``Σ_k g_k``, the point sync mode converges to. Commits weighted ``decay ** s`` instead settle
where ``Σ_k r_k E[decay ** s_k] g_k = 0`` (``r_k`` the commit rate of worker ``k``): a different
point as soon as the shards differ and the workers run at different speeds.

Convergence conditions relied on: the delays are bounded (the version window bounds them:
an entry is at most about ``max_staleness`` versions old when it arrives, plus the versions
taken while its worker computes the next one), and the step is small enough for that delay. For
a smooth, strongly convex outer objective, IAG with delay at most ``τ`` converges linearly for
a step size of order ``1 / (L (τ + 1))`` (Gürbüzbalaban, Ozdaglar & Parrilo, SIAM J. Optim.
2017). With Adam or momentum at the outer level there is no such theorem; the fixed point is the
same, and the benchmark (:mod:`chronos.benchmarks.staleness`) measures where runs end.

A commit that carries the sum of ``updates`` hypergradients (the significance filter) is
stored as their mean, ``g / updates``, so every entry is one hypergradient's worth. Entries are
replaced, never summed: a worker's older work is superseded by its newer. With a lossy commit
codec an entry is the decoded commit; error feedback puts what one commit dropped into the
next, so a worker's entries are right on average over time, not each one. The exact-sum
guarantee of sparse communication (Σ applied + Σ residuals = Σ computed) is that of
``aggregation="buffered"``.

Memory: one λ-sized hypergradient per live worker (:meth:`LatestGradients.nbytes`). A worker
that deregisters or expires is dropped with its entry; a worker that joins counts from its first
accepted commit, so ``K`` follows the live workers.

Example:
    >>> import torch
    >>> table = LatestGradients()
    >>> table.put("fast", {"x": torch.tensor([1.0])}, version=4)
    >>> table.put("slow", {"x": torch.tensor([3.0])}, version=1)
    >>> g, coefficients = table.mean()
    >>> g["x"].item(), coefficients
    (2.0, {'fast': 0.5, 'slow': 0.5})
    >>> table.mean(fresh=1)[0]["x"].item()            # one new entry of two: half a step
    1.0
    >>> table.put("fast", {"x": torch.tensor([-1.0])}, version=5)   # replaces, not sums
    >>> table.mean()[0]["x"].item(), table.ages(6)
    (1.0, {'fast': 1, 'slow': 5})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from chronos.core import tensordict as td
from chronos.core.errors import ChronosTypeError
from chronos.core.tensordict import TensorDict

__all__ = ["LatestEntry", "LatestGradients"]


@dataclass(frozen=True, eq=False)
class LatestEntry:
    """A worker's latest hypergradient and the version of λ it was computed on."""

    grad: TensorDict
    version: int


class LatestGradients:
    """Worker id → :class:`LatestEntry`; the mean used by an aggregated-gradient step."""

    def __init__(self) -> None:
        self._entries: dict[str, LatestEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, wid: object) -> bool:
        return wid in self._entries

    @property
    def entries(self) -> Mapping[str, LatestEntry]:
        """The entries (read-only view; do not modify the tensors)."""
        return dict(self._entries)

    def put(
        self,
        wid: str,
        grad: Mapping[str, Tensor],
        version: int,
        *,
        updates: int = 1,
        take: bool = False,
    ) -> None:
        """Make ``grad / updates`` (validated by the caller) ``wid``'s entry, replacing any.

        ``take=True``: the caller hands the tensors over (nobody else uses them), so they are
        kept without a copy when ``updates == 1``; otherwise the table keeps its own copy.
        """
        if updates == 1:
            kept = {k: v.detach() if take else v.detach().clone() for k, v in grad.items()}
        else:
            kept = {k: v.detach() / updates for k, v in grad.items()}
        self._entries[wid] = LatestEntry(kept, int(version))

    def drop(self, wid: str) -> None:
        """Forget ``wid``'s entry (it left or expired); no error if it has none."""
        self._entries.pop(wid, None)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()

    def ages(self, version: int) -> dict[str, int]:
        """Worker id → ``version − v_k``: how many versions old each entry is."""
        return {w: version - e.version for w, e in self._entries.items()}

    def mean(
        self,
        shift: Callable[[str, LatestEntry], TensorDict] | None = None,
        *,
        fresh: int | None = None,
        workers: int = 0,
    ) -> tuple[TensorDict, dict[str, float]]:
        """``(c · Σ_k g_k, {worker: c})``: fresh tensors the caller may write into.

        ``K = max(entries, workers)``: live workers that have no entry yet count as zero
        entries (as in SAG, whose table starts at zero), so the first steps of a job are not
        taken on the first worker's shard alone. ``c = 1/K``, or with ``fresh = n`` (commits
        since the last step) ``c = min(1, n/K) / K``: the step is scaled by the fraction of the
        table that is new, so a hypergradient reused by about ``K/n`` steps is applied with total
        weight about ``1/K``, as in a sync step (see the module docstring).

        ``shift(wid, entry)`` (optional) replaces each entry's gradient before the mean, e.g.
        a first-order correction to the current λ
        (:class:`~chronos.distributed.correction.StaleCorrector`).
        """
        if not self._entries:
            raise ChronosTypeError("mean() needs at least one entry")
        k = max(len(self._entries), int(workers))
        c = 1.0 / k if fresh is None else min(1.0, fresh / k) / k
        total: TensorDict = {}
        for wid, entry in self._entries.items():
            g = entry.grad if shift is None else shift(wid, entry)
            if not total:
                total = {name: t.detach() * c for name, t in g.items()}
            else:
                for name, t in g.items():
                    total[name].add_(t.detach().to(total[name].device), alpha=c)
        return total, dict.fromkeys(self._entries, c)

    def nbytes(self) -> int:
        """Bytes held by the entries' tensors."""
        return sum(t.numel() * t.element_size() for e in self._entries.values()
                   for t in e.grad.values())

    def state_dict(self) -> dict[str, Any]:
        """The entries as plain containers and tensors (copies)."""
        return {w: {"grad": td.clone(e.grad), "version": e.version}
                for w, e in self._entries.items()}
