"""Stale-commit correction: move a stale hypergradient to the current λ with the history.

A commit computed on version ``v`` arrives when the coordinator is at version ``V = v + s``.
Its hypergradient ``g = ∇F_w(λ_v)`` (worker ``w``'s shard) describes the wrong point. Plain
bounded asynchrony down-weights it by ``decay ** s``: safe, but a slow worker's shard then
barely counts. The history knows how ``∇F_w`` moves with ``λ``: each worker's past commits
``(λ_{v_i}, g_i)`` are kept in a :class:`~chronos.continuum.memory.ContinuumMemory` of its own
(shards differ, so one memory per worker: mixing them would read the differences between
shards as a slope), and the commit is corrected to first order:

    ``g' = g + ĝ_w(λ_V) − ĝ_w(λ_v) = g + J_w (λ_V − λ_v)``

with ``J_w`` the memory's local linear model around ``λ_v``
(:meth:`~chronos.continuum.memory.ContinuumMemory.predict_change`). ``g'`` estimates the
gradient at the current λ, so it counts with weight 1 instead of ``decay ** s``. Safeguards:

* a worker with fewer than ``min_entries`` stored commits (no slope to fit yet) is not
  corrected: the commit keeps its ``decay ** s`` weight;
* the correction is capped at ``max_ratio · ‖g‖`` (a slope fitted on a few noisy points
  must not dominate the measured gradient);
* fresh commits (``s = 0``) pass unchanged and are only stored.

Memory: ``capacity`` entries of two λ-sized tensors per live worker, plus λ for the last
``max_staleness + 1`` versions (shared with MetaState, not copied: λ's tensors are never
modified in place).

Example (a linear gradient field g(λ) = 2λ, so the correction is exact):
    >>> import torch
    >>> c = StaleCorrector(max_staleness=4)
    >>> lam = lambda x: {"x": torch.tensor([x], dtype=torch.float64)}
    >>> for version, x in enumerate([0.0, 1.0, 2.0]):
    ...     c.record_version(version, lam(x))
    >>> for x in (0.0, 1.0):                      # two fresh commits teach the slope
    ...     _ = c.correct("w", version=int(x), staleness=0, grad={"x": 2 * lam(x)["x"]})
    >>> g, corrected = c.correct("w", version=1, staleness=1, grad={"x": torch.tensor([2.0],
    ...                          dtype=torch.float64)})
    >>> corrected, g["x"].item()                  # 2·λ_1 moved to λ_2: 2·2
    (True, 4.0)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from chronos.continuum.memory import ContinuumMemory
from chronos.core import tensordict as td
from chronos.core.errors import ConfigError
from chronos.core.tensordict import TensorDict

__all__ = ["StaleCorrector"]


class StaleCorrector:
    """Per-worker histories and the first-order correction of stale commits (pure, no I/O).

    Args:
        max_staleness: versions of λ to keep (``max_staleness + 1``).
        capacity: commits remembered per worker (default 16).
        k: neighbours of the local model (default 5).
        min_entries: stored commits a worker needs before its commits are corrected (>= 2).
        max_ratio: the correction is capped at ``max_ratio · ‖g‖`` (> 0; default 1).
    """

    def __init__(
        self,
        max_staleness: int,
        *,
        capacity: int = 16,
        k: int = 5,
        min_entries: int = 2,
        max_ratio: float = 1.0,
    ) -> None:
        if not isinstance(min_entries, int) or min_entries < 2:
            raise ConfigError(f"min_entries must be an int >= 2, got {min_entries!r}")
        if not (isinstance(max_ratio, (int, float)) and math.isfinite(max_ratio)
                and max_ratio > 0):
            raise ConfigError(f"max_ratio must be a number > 0, got {max_ratio!r}")
        self.keep = max(int(max_staleness), 0) + 1
        self.capacity, self.k = capacity, k
        self.min_entries, self.max_ratio = min_entries, float(max_ratio)
        self._versions: OrderedDict[int, TensorDict] = OrderedDict()
        self._memories: dict[str, ContinuumMemory] = {}
        self.corrected = 0

    def record_version(self, version: int, outer_params: Mapping[str, Tensor]) -> None:
        """Remember λ of ``version`` (kept by reference; never modify it in place)."""
        self._versions[version] = dict(outer_params)
        while len(self._versions) > self.keep:
            self._versions.popitem(last=False)

    def forget(self, worker_id: str) -> None:
        """Drop a worker's history (it left or expired)."""
        self._memories.pop(worker_id, None)

    def correct(
        self,
        worker_id: str,
        version: int,
        staleness: int,
        grad: Mapping[str, Tensor],
        val_loss: float = 0.0,
    ) -> tuple[TensorDict, bool]:
        """``(g', corrected)`` for an accepted commit on ``version``, ``staleness`` behind.

        Stores ``(λ_version, g)`` in the worker's memory first; ``corrected`` is False (and
        ``g`` returned as given) for a fresh commit, a worker with too little history, or a
        version no longer kept.
        """
        if not self.observe(worker_id, version, grad, val_loss):
            return dict(grad), False
        return self.shift(worker_id, version, version + staleness, grad)

    def observe(
        self, worker_id: str, version: int, grad: Mapping[str, Tensor], val_loss: float = 0.0
    ) -> bool:
        """Store ``(λ_version, g)`` in the worker's memory; False if ``version`` is no longer
        kept (nothing stored)."""
        at = self._versions.get(version)
        if at is None:
            return False
        memory = self._memories.get(worker_id)
        if memory is None:
            memory = self._memories[worker_id] = ContinuumMemory(capacity=self.capacity, k=self.k)
        memory.store(at, grad, val_loss if math.isfinite(val_loss) else 0.0, version)
        return True

    def shift(
        self, worker_id: str, version: int, to_version: int, grad: Mapping[str, Tensor]
    ) -> tuple[TensorDict, bool]:
        """``(g + J_w (λ_to − λ_version), True)`` capped at ``max_ratio · ‖g‖``, or
        ``(g, False)`` when ``to_version == version``, either version is no longer kept, or the
        worker has fewer than ``min_entries`` stored commits. Stores nothing."""
        at, now = self._versions.get(version), self._versions.get(to_version)
        memory = self._memories.get(worker_id)
        if (to_version == version or at is None or now is None or memory is None
                or len(memory) < self.min_entries):
            return dict(grad), False
        delta = memory.predict_change(at, now, k=self.k)
        size = float(td.norm(delta))
        cap = self.max_ratio * float(td.norm(grad))
        if not math.isfinite(size):
            return dict(grad), False
        scale = 1.0 if size <= cap else cap / size
        out = {k: g + (delta[k] * scale).to(g.dtype) for k, g in grad.items()}
        self.corrected += 1
        return out, True

    def state_dict(self) -> dict[str, Any]:
        """Each worker's memory (plain containers and tensors) and the kept λ versions."""
        return {
            "versions": [(v, td.clone(p)) for v, p in self._versions.items()],
            "memories": {w: m.state_dict() for w, m in self._memories.items()},
            "corrected": self.corrected,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self._versions = OrderedDict((int(v), dict(p)) for v, p in state.get("versions", []))
        self._memories = {}
        for w, s in state.get("memories", {}).items():
            memory = ContinuumMemory(capacity=self.capacity, k=self.k)
            memory.load_state_dict(s)
            self._memories[w] = memory
        self.corrected = int(state.get("corrected", 0))

