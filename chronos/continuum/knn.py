"""Exact k-nearest-neighbour search over a growing key matrix: :class:`ExactKNNIndex`.

The index stores ``N`` keys ``x ∈ R^D`` (rows of one preallocated matrix, grown geometrically
up to ``capacity``) and answers ``search(q, k)``: the ``k`` stored keys nearest to ``q``,
nearest first, ties broken by the lower *order* (the caller's insertion counter). It is exact:
the result equals sorting all ``N`` distances.

Metrics: ``"euclidean"`` (``‖q − x‖``) and ``"cosine"`` (``1 − (x·q)/(‖x‖‖q‖)``, clamped at 0;
zero-norm keys and queries are refused). Distances are computed in float64 from the stored keys
(queries are first rounded to the storage dtype, like the keys were). The bounds below work in
a *search space*: the keys themselves, or for cosine the normalized keys ``x̂ = x/‖x‖``, where
``‖q̂ − x̂‖² = 2·(1 − cos)`` (the bounds absorb the rounding of ``1 − cos`` with an extra
``8D·2⁻⁵³``).

**Small memories** (``N ≤ brute_force_max`` or ``D ≤ index_dims``): a plain exact scan when
``N·D ≤ 2¹⁶``; otherwise the *screen* below (one matrix-vector pass) orders the candidates and
exact distances are computed only for those it cannot rule out.

**Exact pruning.** For ``N > brute_force_max`` and ``D > index_dims`` the index keeps a centre
``c``, an orthonormal basis ``U ∈ R^{D×m}`` (``m = index_dims``; the top principal directions
of an evenly spaced sample of ≤ 2048 keys, by a seeded randomized range finder) and for every
key ``ỹ_x = [Uᵀ(x − c), r_x]`` with ``r_x = ‖(I − UUᵀ)(x − c)‖``. For a query,
``LB(x) = ‖ỹ_q − ỹ_x‖ ≤ ‖q − x‖`` for *any* orthonormal ``U`` (Pythagoras on the subspace
and its complement, then the reverse triangle inequality). Candidates are examined in
increasing ``LB`` order, in chunks that grow ×4, with exact float64 distances; the scan stops
once the ``k``-th best exact distance is below ``(1 − 10⁻⁶)·LB`` of the nearest unexamined
key, so no key that could enter the answer is skipped (``LB²`` is also lowered by
``10⁻¹⁰·(‖ỹ_q‖² + ‖ỹ_x‖²)`` to absorb rounding). When the subspace bound would need big
chunks (more than ``N/32`` keys), the *screen* tightens it: with ``x̃`` the key in the search
space (``x``, or ``x̂`` for cosine) and ``q_s`` the query in the storage dtype, one
storage-dtype matrix-vector product bounds ``‖q − x̃‖² ≥ ‖x̃‖² + ‖q‖² − 2·fl(x̃·q_s) −
2‖x̃‖(‖q − q_s‖ + γ_D‖q_s‖)``, ``γ_D = 2D·u`` (the worst-case rounding of a dot product in any
summation order, doubled), and the scan goes on with the larger of the two bounds.

The basis is (re)built lazily at a query when the size has doubled since the last build or as
many keys as it held have been written since (so after a load, at the first query); keys
written in between are projected on the current basis, so results stay exact. Building costs
one float64 projection of every key (about 1.4 s for 10⁵ keys of dimension 2,000 on one slow
core), amortized over the doubling.

**When it pays.** Histories of an optimization are trajectory-like: consecutive keys are
close and the cloud is nearly low-dimensional, so ``r_x`` is small, ``LB`` is tight and a few
hundred exact distances settle the answer (10⁵ keys of dimension 2,000: about 5 ms on one
slow core, against 55–85 ms for one brute-force float32 matrix-vector product). Isotropic
random keys have no low-dimensional structure: every subspace ``LB`` is far below the true
distances and the search degrades to a full scan (still exact), about one float32
brute-force pass thanks to the screen.

**Huge memories.** For memories too large to scan at all, the methods used by
:class:`~chronos.continuum.memory.ContinuumMemory` (``add``, ``add_many``, ``replace``,
``search``, ``keys``, ``order``) are the seam for an approximate index: a class with the same
methods wrapping e.g. faiss ``IndexIVFFlat`` or ``IndexHNSWFlat`` over the same rows would
trade exactness for sub-linear time. Chronos ships only this exact index and adds no
dependency.

Example:
    >>> import torch
    >>> index = ExactKNNIndex(dim=2, dtype=torch.float64, capacity=10)
    >>> for i, x in enumerate([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]]):
    ...     index.add(torch.tensor(x, dtype=torch.float64), order=i)
    0
    1
    2
    >>> slots, dist = index.search(torch.tensor([0.9, 0.0], dtype=torch.float64), k=2)
    >>> slots.tolist(), [round(d, 3) for d in dist.tolist()]
    ([1, 0], [0.1, 0.9])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from chronos.core.errors import ConfigError, ShapeMismatchError

__all__ = ["ExactKNNIndex", "Metric"]

Metric = Literal["euclidean", "cosine"]

_F64 = torch.float64
_INF = float("inf")
_SAMPLE = 2048  # rows used to fit the basis
_WORK = 2**19  # float64 entries per block of rows converted at once (4 MiB)
_FIRST_CHUNK = 64
_SCAN_MAX = 2**16  # up to N·D entries, a query is a plain exact scan
_SLACK = 1e-10  # LB² is lowered by _SLACK·(‖ỹ_q‖² + ‖ỹ_x‖²)
_MARGIN = 1.0 - 1e-6  # relative safety margin on LB


def _row_sq(rows: Tensor) -> Tensor:
    """``‖x‖²`` of each row in float64 (the same bits whatever the batch size)."""
    x = rows.to(_F64)
    return (x * x).sum(1)


class ExactKNNIndex:
    """Exact k-NN over rows ``0 … N−1`` (*slots*) of a key matrix (see the module doc).

    Args:
        dim: key dimension ``D``.
        dtype: storage dtype of the keys (float32 or float64).
        capacity: the most rows it will ever hold; the matrix grows ×2 up to it.
        metric: ``"euclidean"`` or ``"cosine"``.
        index_dims: ``m``, the dimension of the pruning subspace.
        brute_force_max: up to this many keys (or when ``D ≤ m``) no subspace is fitted: a
            query is a screened scan (a plain scan when ``N·D ≤ 2¹⁶``).
    """

    _basis: Tensor | None
    _centre: Tensor
    _ytil: Tensor  # [m + 1, alloc]: ỹ of every slot, one column per slot
    _ysq: Tensor  # [alloc]: ‖ỹ_x‖²·(1 − slack)

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype,
        capacity: int,
        metric: Metric = "euclidean",
        index_dims: int = 32,
        brute_force_max: int = 4096,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"key dtype must be float32 or float64, got {dtype}")
        if metric not in ("euclidean", "cosine"):
            raise ConfigError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
        if dim < 1 or capacity < 1 or index_dims < 1 or brute_force_max < 0:
            raise ConfigError(
                f"ExactKNNIndex needs dim, capacity, index_dims >= 1 and brute_force_max >= 0; "
                f"got {dim}, {capacity}, {index_dims}, {brute_force_max}"
            )
        self.dim, self.dtype, self.capacity, self.metric = dim, dtype, capacity, metric
        self.index_dims, self.brute_force_max = index_dims, brute_force_max
        self._n = 0
        alloc = min(capacity, 64)
        self._keys = torch.zeros(alloc, dim, dtype=dtype)
        self._order = torch.zeros(alloc, dtype=torch.int64)
        self._sq = torch.zeros(alloc, dtype=_F64)  # ‖x̃‖² in the search space
        self._nrm = torch.ones(alloc, dtype=_F64)  # ‖x‖ (cosine) or 1
        self._rows = max(1, min(256, _WORK // dim))
        # cosine distances are computed as 1 − cos: a bound must also absorb that rounding
        self._abs_slack = 8.0 * dim * 2.0**-53 if metric == "cosine" else 0.0
        self._ws: tuple[Tensor, Tensor] | None = None
        self._drop_basis()

    # -- storage --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    @property
    def keys(self) -> Tensor:
        """The stored keys, ``[N, D]`` (a view: do not modify)."""
        return self._keys[: self._n]

    @property
    def order(self) -> Tensor:
        """The tie-breaking order of every slot, ``[N]`` int64 (a view)."""
        return self._order[: self._n]

    def add(self, key: Tensor, order: int) -> int:
        """Append ``key`` (``[D]``) with tie-breaking ``order``; returns its slot."""
        if self._n == self.capacity:
            raise ConfigError(f"the index is full ({self.capacity} keys); replace() a slot")
        if self._n == self._keys.shape[0]:
            self._grow()
        self._n += 1
        try:
            self.replace(self._n - 1, key, order)
        except Exception:
            self._n -= 1
            raise
        return self._n - 1

    def add_many(self, keys: Tensor, orders: Tensor) -> None:
        """Append the rows of ``keys`` (``[B, D]``) with tie-breaking ``orders`` (``[B]``)."""
        b = keys.shape[0]
        if keys.shape != (b, self.dim) or orders.shape != (b,):
            raise ShapeMismatchError(
                f"add_many() needs keys [B, {self.dim}] and orders [B], got "
                f"{tuple(keys.shape)} and {tuple(orders.shape)}"
            )
        if self._n + b > self.capacity:
            raise ConfigError(f"{self._n} + {b} keys exceed the capacity {self.capacity}")
        rows = keys.detach().to("cpu", self.dtype)
        sq = torch.cat([_row_sq(rows[i : i + self._rows]) for i in range(0, b, self._rows)])
        if self.metric == "cosine" and not bool((sq > 0).all()):
            raise ConfigError("the cosine metric cannot store a key of norm zero")
        while self._n + b > self._keys.shape[0]:
            self._grow()
        lo, hi = self._n, self._n + b
        self._keys[lo:hi], self._order[lo:hi] = rows, orders
        if self.metric == "cosine":
            self._nrm[lo:hi], sq = sq.sqrt(), torch.ones_like(sq)
        self._sq[lo:hi] = sq
        self._n = hi
        self._drop_basis()

    def replace(self, slot: int, key: Tensor, order: int) -> None:
        """Overwrite slot ``slot`` (``0 ≤ slot < N``) with ``key`` and ``order``."""
        if not 0 <= slot < self._n:
            raise ConfigError(f"slot must be in [0, {self._n}), got {slot}")
        if key.shape != (self.dim,):
            raise ShapeMismatchError(f"key must have shape ({self.dim},), got {tuple(key.shape)}")
        row = key.detach()
        if row.dtype != self.dtype or row.device.type != "cpu":
            row = row.to("cpu", self.dtype)
        sq = _row_sq(row[None])
        if self.metric == "cosine":
            if not float(sq) > 0.0:
                raise ConfigError("the cosine metric cannot store a key of norm zero")
            self._nrm[slot], sq = sq.sqrt(), torch.ones_like(sq)
        self._keys[slot], self._order[slot], self._sq[slot] = row, order, sq
        if self._basis is not None:
            self._written += 1
            ytil, ysq = self._project(self._keys[slot : slot + 1], self._nrm[slot : slot + 1])
            self._ytil[:, slot], self._ysq[slot] = ytil[:, 0], ysq[0]

    def _grow(self) -> None:
        n, alloc = self._n, min(self.capacity, 2 * self._keys.shape[0])

        def grown(t: Tensor, fill: float = 0.0) -> Tensor:
            out = torch.full((alloc, *t.shape[1:]), fill, dtype=t.dtype)
            out[:n] = t[:n]
            return out

        self._keys, self._order = grown(self._keys), grown(self._order)
        self._sq, self._nrm = grown(self._sq), grown(self._nrm, 1.0)
        if self._basis is not None:
            self._ytil, self._ysq = grown(self._ytil.T).T.contiguous(), grown(self._ysq)

    def _drop_basis(self) -> None:
        self._basis = None
        self._centre = torch.zeros(0, dtype=_F64)
        self._ytil = torch.zeros(0, 0, dtype=_F64)
        self._ysq = torch.zeros(0, dtype=_F64)
        self._built_n = 0
        self._written = 0

    # -- geometry -------------------------------------------------------------------------------

    def prepare_query(self, query: Tensor) -> Tensor:
        """``query`` rounded to the storage dtype, in float64 (refused at norm zero for cosine)."""
        if query.shape != (self.dim,):
            raise ShapeMismatchError(
                f"query must have shape ({self.dim},), got {tuple(query.shape)}"
            )
        q = query.detach().to("cpu", self.dtype).to(_F64)
        if self.metric == "cosine" and not float(_row_sq(q[None])[0]) > 0.0:
            raise ConfigError("the cosine metric cannot compare a query of norm zero")
        return q

    def _norm_q(self, q: Tensor) -> float:
        """``‖q‖`` for cosine (the keys' formula), 1 for euclidean."""
        return float(_row_sq(q[None]).sqrt()) if self.metric == "cosine" else 1.0

    def _block(self, rows: Tensor, nrm: Tensor) -> Tensor:
        """Stored-dtype rows ``[B ≤ self._rows, D]`` as search-space float64 rows (a workspace
        view, valid until the next call)."""
        if self._ws is None:
            self._ws = (torch.empty(self._rows, self.dim, dtype=_F64),
                        torch.empty(self._rows, self.dim, dtype=self.dtype))
        out = self._ws[0][: rows.shape[0]]
        out.copy_(rows)
        if self.metric == "cosine":
            out.div_(nrm[:, None])
        return out

    def _project(self, rows: Tensor, nrm: Tensor) -> tuple[Tensor, Tensor]:
        """``(ỹᵀ [m+1, B], ‖ỹ‖²·(1 − slack) [B])`` of stored-dtype rows ``[B, D]``."""
        assert self._basis is not None
        x = self._block(rows, nrm).sub_(self._centre)
        y = x @ self._basis
        nx2 = torch.einsum("ij,ij->i", x, x)
        r2 = nx2 - torch.einsum("ij,ij->i", y, y)
        bad = r2 < 1e-4 * nx2  # cancellation: compute the residual directly
        r = r2.clamp_min(0.0).sqrt()
        if bool(bad.any()):
            xb = x[bad]
            r[bad] = torch.linalg.vector_norm(xb - (xb @ self._basis) @ self._basis.T, dim=1)
        ytil = torch.cat([y.T, r[None]], dim=0)
        return ytil, torch.einsum("ij,ij->j", ytil, ytil) * (1.0 - _SLACK)

    def _build(self) -> None:
        """Fit ``c`` and ``U`` on a sample of the keys and project every key."""
        n, dim, step = self._n, self.dim, self._rows
        sample = torch.linspace(0, n - 1, min(n, _SAMPLE), dtype=_F64).round().long().unique()
        s = self._keys.index_select(0, sample).to(_F64)
        if self.metric == "cosine":
            s = s / self._nrm[sample, None]
        centre = s.mean(0)
        s = s - centre
        q = min(self.index_dims, s.shape[0], dim)
        p = min(q + 8, s.shape[0], dim)
        gen = torch.Generator().manual_seed(0x5EED)
        basis = torch.linalg.qr(s @ torch.randn(dim, p, generator=gen, dtype=_F64)).Q
        for _ in range(2):  # power iterations sharpen the top directions
            basis = torch.linalg.qr(s @ (s.T @ basis)).Q
        _, _, vh = torch.linalg.svd(basis.T @ s, full_matrices=False)
        self._basis, self._centre = vh[:q].T.contiguous(), centre
        alloc = self._keys.shape[0]
        self._ytil = torch.zeros(q + 1, alloc, dtype=_F64)
        self._ysq = torch.zeros(alloc, dtype=_F64)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            self._ytil[:, lo:hi], self._ysq[lo:hi] = self._project(
                self._keys[lo:hi], self._nrm[lo:hi]
            )
        self._built_n, self._written = n, 0

    def _exact(self, slots: Tensor, q: Tensor) -> Tensor:
        """Metric distances (float64) of ``slots`` to the prepared query ``q``: ``‖q − x‖``, or
        ``1 − (x·q)/(‖x‖‖q‖)`` clamped at 0 for cosine."""
        out = torch.empty(slots.numel(), dtype=_F64)
        cosine, norm_q = self.metric == "cosine", self._norm_q(q)
        for lo in range(0, slots.numel(), self._rows):
            idx = slots[lo : lo + self._rows]
            if self._ws is None:
                self._ws = (torch.empty(self._rows, self.dim, dtype=_F64),
                            torch.empty(self._rows, self.dim, dtype=self.dtype))
            rows = torch.index_select(self._keys, 0, idx, out=self._ws[1][: idx.numel()])
            x = self._ws[0][: idx.numel()]
            x.copy_(rows)
            part = out[lo : lo + idx.numel()]
            if cosine:  # row sums: the same bits whatever the batch (unlike a GEMV)
                dots = x.mul_(q).sum(1).div_(self._nrm[idx].mul(norm_q))
                torch.sub(1.0, dots, out=part).clamp_min_(0.0)
            else:
                torch.linalg.vector_norm(x.sub_(q), dim=1, out=part)
        return out

    def _to_search(self, d: float) -> float:
        """A metric distance as a search-space distance (``‖q̂ − x̂‖ = √(2·d)`` for cosine)."""
        return (2.0 * max(d, 0.0)) ** 0.5 if self.metric == "cosine" else d

    def _subspace_lb2(self, q: Tensor) -> Tensor:
        """``‖ỹ_q − ỹ_x‖²`` less its rounding slack for every slot: a lower bound on the squared
        search-space distance (``‖q − x‖²``, ``‖q̂ − x̂‖²``); rebuilds the basis when due."""
        n = self._n
        if self._basis is None or n >= 2 * self._built_n or self._written >= self._built_n:
            self._build()
        assert self._basis is not None
        x = q / self._norm_q(q) - self._centre
        y = x @ self._basis
        r = torch.linalg.vector_norm(x - self._basis @ y)
        ytil_q = torch.cat([y, r[None]])
        qsq = float(ytil_q @ ytil_q) * (1.0 - _SLACK) - self._abs_slack
        return torch.addmv(self._ysq[:n], self._ytil[:, :n].T, ytil_q, alpha=-2.0).add_(qsq)

    def _screen(self, q: Tensor) -> Tensor:
        """The screen of the module doc for every slot: a lower bound on the squared
        search-space distance from one storage-dtype matrix-vector product ``fl(x·q)`` (``q`` is
        exact in the storage dtype), less its worst-case rounding ``γ_D‖x‖‖q‖``, ``γ_D = 2D·u``
        (any summation order), scaled like the distance."""
        n = self._n
        gamma = 2 * self.dim * torch.finfo(self.dtype).eps / 2
        dots = (self._keys[:n] @ q.to(self.dtype)).to(_F64)
        if self.metric == "cosine":  # ‖q̂ − x̂‖² = 2 − 2·(x·q)/(‖x‖‖q‖)
            dots.div_(self._nrm[:n].mul(self._norm_q(q)))
            err, qq = torch.full_like(dots, gamma), 1.0
        else:
            qq = float(q @ q)
            err = self._sq[:n].sqrt().mul_(gamma * qq**0.5)
        lb2 = (self._sq[:n] + qq).mul_(1.0 - _SLACK).sub_(dots, alpha=2.0)
        return lb2.sub_(err, alpha=2.0).sub_(self._abs_slack)

    # -- search ---------------------------------------------------------------------------------

    def search(self, query: Tensor, k: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest slots and their metric distances, nearest first (exact).

        ``mask`` (bool ``[N]``) restricts the search to the slots where it is True. Fewer than
        ``k`` eligible slots → all of them.
        """
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        n = self._n
        q = self.prepare_query(query)
        if mask is not None and mask.shape != (n,):
            raise ShapeMismatchError(f"mask must have shape ({n},), got {tuple(mask.shape)}")
        eligible = n if mask is None else int(mask.sum())
        k = min(k, eligible)
        if k == 0:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=_F64)
        if n * self.dim <= _SCAN_MAX:
            slots = torch.arange(n) if mask is None else mask.nonzero().squeeze(1)
            slots, dist = self._select(slots, self._exact(slots, q), k)
        elif n <= self.brute_force_max or self.dim <= self.index_dims:
            slots, dist = self._scan(q, k, mask, eligible, self._screen(q), screened=True)
        else:
            slots, dist = self._scan(q, k, mask, eligible, self._subspace_lb2(q), screened=False)
        return slots, dist

    def _select(self, slots: Tensor, dist: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` smallest ``(dist, order)`` pairs, sorted (exact under ties)."""
        if k < dist.numel():
            kth = torch.topk(dist, k, largest=False, sorted=False).values.max()
            keep = (dist <= kth).nonzero().squeeze(1)
            slots, dist = slots[keep], dist[keep]
        perm = torch.argsort(self._order[slots])
        perm = perm[torch.argsort(dist[perm], stable=True)][:k]
        return slots[perm], dist[perm]

    def _scan(
        self, q: Tensor, k: int, mask: Tensor | None, eligible: int, lb2: Tensor, screened: bool
    ) -> tuple[Tensor, Tensor]:
        """Exact distances in increasing order of the lower bounds ``lb2`` (squared) until the
        ``k``-th best is below every bound left (see the module doc)."""
        n = self._n
        if mask is not None:
            lb2.masked_fill_(~mask, _INF)
        found_s: list[Tensor] = []
        found_d: list[Tensor] = []
        remaining, chunk = eligible, max(_FIRST_CHUNK, 8 * k)
        while remaining > 0:
            if not screened and 32 * chunk > n:
                # an exact row costs ~7 rows of the screen's matrix-vector product: once the
                # subspace bound needs big chunks, tighten it with the screen and restart small
                lb2 = torch.maximum(lb2, self._screen(q))
                screened, chunk = True, max(_FIRST_CHUNK, 8 * k)
            if chunk + 1 >= remaining:
                cand = (lb2 < _INF).nonzero().squeeze(1)
                found_s.append(cand)
                found_d.append(self._exact(cand, q))
                break
            vals, idx = torch.topk(lb2, chunk + 1, largest=False, sorted=False)
            j = int(torch.argmax(vals))
            next_lb = float(vals[j].clamp_min(0.0).sqrt()) * _MARGIN
            cand = torch.cat([idx[:j], idx[j + 1 :]])
            found_s.append(cand)
            found_d.append(self._exact(cand, q))
            lb2.index_fill_(0, cand, _INF)
            remaining -= chunk
            d_all = torch.cat(found_d)
            if d_all.numel() >= k and self._to_search(float(torch.kthvalue(d_all, k).values)) < (
                next_lb
            ):
                break
            chunk *= 4
        return self._select(torch.cat(found_s), torch.cat(found_d), k)
