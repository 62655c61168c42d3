"""The continuum memory of an outer optimization's history: :class:`ContinuumMemory`.

Each :meth:`~ContinuumMemory.store` records one visited point of the outer loop: λ, the
hypergradient ``g = dF/dλ`` at λ, the validation loss, the step and free-form extras (e.g. the
inner solution ``θ*(λ)`` and the linear-system solution ``v`` that produced ``g``). The memory
answers three questions about a new λ:

* :meth:`~ContinuumMemory.retrieve_similar`: the ``k`` stored entries nearest to λ (exact
  k-NN, ``"euclidean"`` ``‖λ − λ_i‖`` or ``"cosine"`` ``1 − cos(λ, λ_i)``; ties go to the older
  entry), for warm starts;
* :meth:`~ContinuumMemory.predict`: a value (the hypergradient, or a TensorDict extra such as
  ``"inner_solution"``) at λ from a distance-weighted local *linear* model of its neighbours;
* :meth:`~ContinuumMemory.predict_change`: ``J·(λ_to − λ_from)`` from the same local model
  fitted around ``λ_from``, e.g. to correct a stale hypergradient for the drift of λ.

**Local linear model** (:mod:`chronos.continuum.local_linear`, float64). For neighbours
``x_i`` with values ``g_i`` at distances ``d_i`` from the query ``q``: weights
``w_i ∝ 1/(d_i + ε)``, ``ε = 10⁻¹²·(1 + mean d)`` (all positive, normalized to ``Σw = 1``);
weighted means ``x̄, ḡ``; ``J`` the minimum-norm weighted least-squares solution of
``g_i − ḡ ≈ J(x_i − x̄)``, from the SVD of ``W^{1/2}(X − x̄)`` with singular values below
``10⁻¹⁰·s_max`` dropped; prediction ``ĝ(q) = ḡ − J(x̄ − q)``. It is exact on a linear field
``g(x) = g₀ + Ax`` whenever ``q`` lies in the affine hull of its neighbours (always when
``k > D`` and the points are in general position). Outside that hull the minimum-norm ``J``
has no variation along unseen directions, i.e. it extrapolates as if ``g`` were constant along
them. A neighbour at distance 0 (within ``10⁻¹²·(1 + mean d)``) makes the prediction the mean
of the values stored at distance 0; a single entry predicts its own value. A fit that is not
finite, in float64 or once cast to the stored dtype (an extrapolation beyond float32's range,
say), falls back to the nearest entry's value (and to a zero change in
:meth:`~ContinuumMemory.predict_change`).

**Storage.** The first store fixes the key set and shapes of λ (and of the hypergradient and
of every TensorDict extra, by name) and the storage dtype: float64 if λ holds a float64
tensor, float32 otherwise. λ is flattened (sorted keys) into one row of a key matrix that
grows ×2 up to ``capacity``; queries are rounded to the storage dtype like the keys. Entries
keep their own copies of the tensors they were given (detached, on the CPU); treat what
:meth:`~ContinuumMemory.retrieve_similar` returns as read-only. NaN/Inf anywhere (λ, the
hypergradient, the loss, a tensor or float extra) is refused and nothing is stored.

**Eviction** when ``capacity`` entries are held: ``"fifo"`` drops the oldest entry, so the
memory holds the newest ``capacity``; ``"reservoir"`` (Algorithm R, a ``torch.Generator``
seeded by ``seed``) keeps the ``i``-th store (0-based) with probability ``capacity/(i + 1)``,
replacing a uniformly chosen entry, so the memory is a uniform sample of the whole history
(the newest entry may be among those not kept).

**Search** (:class:`~chronos.continuum.knn.ExactKNNIndex`): exact k-NN. Up to 4,096 entries a
query is one brute-force pass (a storage-dtype matrix-vector screen with a proven error bound,
then exact float64 distances for the candidates it cannot rule out); above that, candidates are
scanned in increasing order of an exact lower bound from a PCA subspace of ``index_dims``
dimensions, which settles trajectory-like histories after a few hundred distances (10⁵ entries
of dimension 2,000: 5–8 ms on one slow core) and degrades to a full scan (about one float32
brute-force pass) on isotropic random keys. See that module for the bounds and for the path
to an approximate (IVF/HNSW) index for memories too big to scan.

Everything is CPU and torch; only :meth:`~ContinuumMemory.save` / :meth:`~ContinuumMemory.load`
touch the disk (through :mod:`chronos.core.safeio`: no pickle).

Example:
    >>> import torch
    >>> from chronos.continuum import ContinuumMemory
    >>> mem = ContinuumMemory(capacity=100, k=3)
    >>> for t in range(5):                      # g(λ) = 2λ along a path
    ...     lam = {"wd": torch.tensor([0.1 * t, 1.0])}
    ...     _ = mem.store(lam, {"wd": 2 * lam["wd"]}, val_loss=1.0 / (t + 1), step=t)
    >>> [e.step for e in mem.retrieve_similar({"wd": torch.tensor([0.22, 1.0])}, k=2)]
    [2, 3]
    >>> mem.predict({"wd": torch.tensor([0.25, 1.0])})["wd"]
    tensor([0.5000, 2.0000])
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

from chronos.continuum.knn import ExactKNNIndex, Metric
from chronos.continuum.local_linear import LocalLinearModel, local_linear_fit
from chronos.continuum.memory_io import (
    FORMAT,
    spec_from_json,
    spec_to_json,
    state_from_tensors,
    state_to_tensors,
)
from chronos.core import tensordict as td
from chronos.core.errors import (
    ChronosError,
    ChronosTypeError,
    ConfigError,
    CorruptFileError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
)
from chronos.core.safeio import load_tensors, save_tensors
from chronos.core.tensordict import FlatSpec, TensorDict

__all__ = ["ContinuumMemory", "MemoryEntry"]

Eviction = Literal["fifo", "reservoir"]
_F64 = torch.float64
_BRUTE_FORCE_MAX = 4096


@dataclass(frozen=True, eq=False)
class MemoryEntry:
    """One stored point of the outer optimization.

    Attributes:
        outer_params: λ as stored (the memory's own tensors; read-only).
        hypergradient: ``dF/dλ`` at λ, λ-shaped.
        val_loss: the validation (outer) loss at λ.
        step: the outer step (or version) it was computed at.
        extra: free-form extras given to :meth:`ContinuumMemory.store` (TensorDict, Tensor,
            float, int, bool or str values).
        distance: distance to the query in :meth:`ContinuumMemory.retrieve_similar`, else 0.
        index: insertion counter (0, 1, 2, … over the memory's life).
    """

    outer_params: TensorDict
    hypergradient: TensorDict
    val_loss: float
    step: int
    extra: Mapping[str, Any]
    distance: float = 0.0
    index: int = -1


# -- helpers ----------------------------------------------------------------------------------


def _as_dict(x: object, what: str) -> TensorDict:
    if isinstance(x, Tensor):
        x = {"params": x}
    if not isinstance(x, Mapping):
        raise ChronosTypeError(
            f"{what} must be a dict[str, Tensor | float] or a Tensor, got {type(x).__name__}"
        )
    return {
        k: v.detach() if v.device.type == "cpu" else v.detach().to("cpu")
        for k, v in td.as_tensor_dict(x, what=what).items()
    }


def _spec_of(d: TensorDict, floating: torch.dtype | None = None) -> FlatSpec:
    keys = tuple(sorted(d))
    dtypes = tuple(
        d[k].dtype if floating is None or d[k].dtype.is_floating_point else floating
        for k in keys
    )
    return FlatSpec(keys, tuple(d[k].shape for k in keys), dtypes)


def _check_spec(d: TensorDict, spec: FlatSpec, what: str) -> None:
    if tuple(sorted(d)) != spec.keys:
        raise KeyMismatchError(
            f"{what} must have the keys of the first stored entry: expected {list(spec.keys)}, "
            f"got {sorted(d)}"
        )
    for k, shape in zip(spec.keys, spec.shapes, strict=True):
        if d[k].shape != shape:
            raise ShapeMismatchError(
                f"{what}[{k!r}] must have the shape of the first stored entry: expected "
                f"{tuple(shape)}, got {tuple(d[k].shape)}"
            )


def _finite(t: Tensor) -> bool:
    """No NaN/Inf in ``t``: a finite sum proves it (one cheap reduction); else check each."""
    if t.dtype.is_floating_point and math.isfinite(float(t.sum())):
        return True
    return not (t.dtype.is_floating_point or t.dtype.is_complex) or bool(torch.isfinite(t).all())


def _check_finite(d: TensorDict, what: str) -> None:
    if not all(_finite(v) for v in d.values()):
        raise NonFiniteError(f"{what} contains NaN or Inf; nothing was stored")


def _own(d: TensorDict, spec: FlatSpec) -> TensorDict:
    return {
        k: d[k].clone() if d[k].dtype == dt else d[k].to(dt)
        for k, dt in zip(spec.keys, spec.dtypes, strict=True)
    }


def _flat(d: Mapping[str, Tensor], spec: FlatSpec, dtype: torch.dtype = _F64) -> Tensor:
    parts = [d[k].reshape(-1) for k in spec.keys]
    return torch.cat([p if p.dtype == dtype else p.to(dtype) for p in parts])


class ContinuumMemory:
    """A bounded memory of ``(λ, dF/dλ, loss, step, extras)`` with exact k-NN retrieval and
    local linear prediction (see the module doc for the math, eviction and search).

    Args:
        capacity: the most entries held (``>= 1``).
        metric: ``"euclidean"`` or ``"cosine"`` (zero-norm λ is refused under cosine).
        k: default number of neighbours of :meth:`retrieve_similar` and :meth:`predict`.
        eviction: ``"fifo"`` (keep the newest) or ``"reservoir"`` (uniform sample).
        seed: seed of the reservoir's generator.
        index_dims: dimension of the search's pruning subspace.
    """

    def __init__(
        self,
        capacity: int = 10_000,
        metric: Metric = "euclidean",
        *,
        k: int = 5,
        eviction: Eviction = "fifo",
        seed: int = 0,
        index_dims: int = 32,
    ) -> None:
        for name, value in (("capacity", capacity), ("k", k), ("index_dims", index_dims)):
            if type(value) is not int or value < 1:
                raise ConfigError(f"ContinuumMemory {name} must be an int >= 1, got {value!r}")
        if metric not in ("euclidean", "cosine"):
            raise ConfigError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
        if eviction not in ("fifo", "reservoir"):
            raise ConfigError(f"eviction must be 'fifo' or 'reservoir', got {eviction!r}")
        if type(seed) is not int:
            raise ConfigError(f"seed must be an int, got {seed!r}")
        self.capacity, self.metric, self.k = capacity, metric, k
        self.eviction, self.seed, self.index_dims = eviction, seed, index_dims
        self.clear()

    # -- bookkeeping ------------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every entry and the fixed key set (the memory is as new, generator reseeded)."""
        self._entries: list[MemoryEntry] = []
        self._index: ExactKNNIndex | None = None
        self._spec: FlatSpec | None = None
        self._grad_spec: FlatSpec | None = None
        self._extra_specs: dict[str, FlatSpec] = {}
        self._has: dict[str, bytearray] = {}  # per TensorDict extra: 1 where the slot has it
        self._count = 0
        self._latest = -1
        self._gen = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"ContinuumMemory(size={len(self)}, capacity={self.capacity}, "
                f"metric={self.metric!r}, eviction={self.eviction!r})")

    def latest(self) -> MemoryEntry | None:
        """The held entry with the highest index (None when empty)."""
        return self._entries[self._latest] if self._entries else None

    def _config(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "metric": self.metric, "k": self.k,
                "eviction": self.eviction, "seed": self.seed, "index_dims": self.index_dims}

    # -- store ----------------------------------------------------------------------------------

    def store(
        self,
        outer_params: Mapping[str, Tensor | float] | Tensor,
        hypergradient: Mapping[str, Tensor | float] | Tensor,
        val_loss: float,
        step: int,
        **extra: Any,
    ) -> int:
        """Record one point; returns its index (the insertion counter).

        Raises (and stores nothing) on a key/shape mismatch with the first entry, NaN/Inf, a
        zero-norm λ under the cosine metric, or an extra of an unsupported type.
        """
        params = _as_dict(outer_params, "outer_params")
        grad = _as_dict(hypergradient, "hypergradient")
        td.check_same_structure(params, grad, "outer_params and hypergradient")
        spec = self._spec
        if spec is None:
            if not params:
                raise ConfigError("outer_params is empty; store at least one tensor")
            f64 = any(v.dtype == _F64 for v in params.values())
            spec = _spec_of(params, _F64 if f64 else torch.float32)
        _check_spec(params, spec, "outer_params")
        grad_spec = self._grad_spec or _spec_of(grad, self._storage_dtype(spec))
        _check_finite(params, "outer_params")
        _check_finite(grad, "hypergradient")
        try:
            loss = float(val_loss)
        except (TypeError, ValueError):
            raise ChronosTypeError(
                "val_loss must be a number (or a one-element tensor), got "
                f"{type(val_loss).__name__}"
            ) from None
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise NonFiniteError(f"val_loss is {loss}; nothing was stored")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ChronosTypeError(f"step must be an int, got {type(step).__name__}")
        extras, new_specs = self._check_extras(extra)
        key = _flat(params, spec, self._storage_dtype(spec))
        if self._index is None:
            index = ExactKNNIndex(key.numel(), key.dtype, self.capacity, self.metric,
                                  self.index_dims, _BRUTE_FORCE_MAX)
        else:
            index = self._index
        if self.metric == "cosine" and not bool(key.abs().max() > 0):
            raise ConfigError("outer_params has norm zero: the cosine metric cannot store it")
        # everything is valid: commit
        i, self._count = self._count, self._count + 1
        entry = MemoryEntry(_own(params, spec), _own(grad, grad_spec), loss, int(step),
                            MappingProxyType(extras), index=i)
        self._index, self._spec, self._grad_spec = index, spec, grad_spec
        self._extra_specs.update(new_specs)
        for name in new_specs:
            self._has[name] = bytearray(len(self._entries))
        if len(self._entries) < self.capacity:
            slot = index.add(key, i)
            self._entries.append(entry)
            for has in self._has.values():
                has.append(0)
        else:
            if self.eviction == "fifo":
                slot = int(torch.argmin(index.order))
            else:
                slot = int(torch.randint(0, i + 1, (1,), generator=self._gen))
                if slot >= self.capacity:
                    return i
            index.replace(slot, key, i)
            self._entries[slot] = entry
        for name, has in self._has.items():
            has[slot] = name in extras
        self._latest = slot
        return i

    @staticmethod
    def _storage_dtype(spec: FlatSpec) -> torch.dtype:
        return _F64 if _F64 in spec.dtypes else torch.float32

    def _check_extras(
        self, extra: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, FlatSpec]]:
        out: dict[str, Any] = {}
        new: dict[str, FlatSpec] = {}
        for name, value in extra.items():
            if isinstance(value, Mapping):
                d = _as_dict(value, f"extra {name!r}")
                if not d:
                    raise ConfigError(f"extra {name!r} is an empty dict; give it tensors")
                spec = self._extra_specs.get(name) or new.get(name) or _spec_of(d)
                _check_spec(d, spec, f"extra {name!r}")
                _check_finite(d, f"extra {name!r}")
                if name not in self._extra_specs:
                    new[name] = spec
                out[name] = _own(d, spec)
            elif name in self._extra_specs:
                raise ChronosTypeError(
                    f"extra {name!r} held a TensorDict in earlier entries; got "
                    f"{type(value).__name__} (keep one type per extra name)"
                )
            elif isinstance(value, Tensor):
                if not _finite(value):
                    raise NonFiniteError(f"extra {name!r} contains NaN or Inf; nothing was stored")
                out[name] = value.detach().to("cpu", copy=True)
            elif isinstance(value, float):
                if value != value or value in (float("inf"), float("-inf")):
                    raise NonFiniteError(f"extra {name!r} is {value}; nothing was stored")
                out[name] = value
            elif isinstance(value, (int, str)):
                out[name] = value
            else:
                raise ChronosTypeError(
                    f"extra {name!r} is a {type(value).__name__}; extras may be a TensorDict, "
                    "a Tensor, a float, an int, a bool or a str"
                )
        return out, new

    # -- queries ----------------------------------------------------------------------------------

    def _check_k(self, k: int | None) -> int:
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int):
            raise ChronosTypeError(f"k must be an int, got {type(k).__name__}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        return k

    def _query(self, params: object, what: str) -> tuple[ExactKNNIndex, Tensor]:
        """The index and the validated, flattened query (rounded to the storage dtype)."""
        if self._index is None or self._spec is None or not self._entries:
            raise ConfigError(f"the memory is empty; store(...) at least one entry before {what}")
        d = _as_dict(params, "params")
        _check_spec(d, self._spec, "params")
        if not td.is_finite(d):
            raise NonFiniteError(f"params contains NaN or Inf; {what} needs a finite query")
        return self._index, _flat(d, self._spec, self._index.dtype).to(_F64)

    def retrieve_similar(
        self, params: Mapping[str, Tensor | float] | Tensor, k: int | None = None
    ) -> list[MemoryEntry]:
        """The ``k`` entries nearest to ``params`` (all when fewer), nearest first, each with
        its ``distance``; ties go to the lower index."""
        k = self._check_k(k)
        index, q = self._query(params, "retrieve_similar()")
        slots, dist = index.search(q, k)
        return [dataclasses.replace(self._entries[int(s)], distance=float(d))
                for s, d in zip(slots, dist, strict=True)]

    def _values(self, key: str) -> tuple[FlatSpec, Tensor | None]:
        """The spec of ``key``'s values and the mask of the slots holding it (None: all)."""
        if key == "hypergradient":
            assert self._grad_spec is not None
            return self._grad_spec, None
        if key not in self._extra_specs:
            raise ConfigError(
                f"cannot predict {key!r}: it is neither 'hypergradient' nor an extra holding a "
                f"TensorDict (those stored: {sorted(self._extra_specs)})"
            )
        has = self._has[key]
        if all(has):
            return self._extra_specs[key], None
        return self._extra_specs[key], torch.frombuffer(bytearray(has), dtype=torch.uint8).bool()

    def _value(self, slot: int, key: str, spec: FlatSpec) -> Tensor:
        e = self._entries[slot]
        return _flat(e.hypergradient if key == "hypergradient" else e.extra[key], spec)

    def _fit(
        self, params: object, key: str, k: int | None, what: str
    ) -> tuple[LocalLinearModel, FlatSpec, Tensor, Tensor]:
        k = self._check_k(k)
        index, q = self._query(params, what)
        spec, mask = self._values(key)
        slots, dist = index.search(q, k, mask)
        if slots.numel() == 0:
            raise ConfigError(f"no held entry has the extra {key!r} any more; cannot {what}")
        x = index.keys.index_select(0, slots).to(_F64)
        g = torch.stack([self._value(int(s), key, spec) for s in slots])
        return local_linear_fit(x, g, q, dist), spec, q, g

    def predict(
        self,
        params: Mapping[str, Tensor | float] | Tensor,
        key: str = "hypergradient",
        k: int | None = None,
    ) -> TensorDict:
        """``ĝ(params)``: the local linear prediction of ``key``'s values (``"hypergradient"`` or
        a TensorDict extra, e.g. ``"inner_solution"``) from the ``k`` nearest entries holding
        it; shapes and dtypes as stored."""
        model, spec, _, g = self._fit(params, key, k, "predict()")
        out = td.unflatten(model.value, spec)
        if not td.is_finite(out):  # beyond the range of the stored dtype: the nearest value
            out = td.unflatten(g[0], spec)
        return out

    def predict_gradient(
        self, params: Mapping[str, Tensor | float] | Tensor, k: int | None = None
    ) -> TensorDict:
        """:meth:`predict` of the hypergradient."""
        return self.predict(params, "hypergradient", k)

    def predict_change(
        self,
        from_params: Mapping[str, Tensor | float] | Tensor,
        to_params: Mapping[str, Tensor | float] | Tensor,
        key: str = "hypergradient",
        k: int | None = None,
    ) -> TensorDict:
        """``ĝ(to) − ĝ(from) = J·(to − from)`` with ``J`` of one local model fitted on the
        neighbours of ``from_params``; zeros when fewer than two entries hold ``key``."""
        model, spec, q_from, g = self._fit(from_params, key, k, "predict_change()")
        _, q_to = self._query(to_params, "predict_change()")
        out = td.unflatten(model.jvp(q_to - q_from), spec)
        if g.shape[0] < 2 or not td.is_finite(out):
            out = td.unflatten(torch.zeros_like(model.value), spec)
        return out

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors (no custom classes): config, counters, the keys
        ``[N, D]``, the entries in slot order, the specs and the generator state."""
        specs: dict[str, Any] = {
            "outer_params": None if self._spec is None else spec_to_json(self._spec),
            "hypergradient": None if self._grad_spec is None else spec_to_json(self._grad_spec),
            "extras": {n: spec_to_json(s) for n, s in self._extra_specs.items()},
        }
        entries = [
            {"index": e.index, "step": e.step, "val_loss": e.val_loss,
             "outer_params": td.clone(e.outer_params), "hypergradient": td.clone(e.hypergradient),
             "extra": {n: td.clone(v) if isinstance(v, Mapping)
                       else v.clone() if isinstance(v, Tensor) else v
                       for n, v in e.extra.items()}}
            for e in self._entries
        ]
        keys = self._index.keys.clone() if self._index is not None else torch.zeros(0, 0)
        return {"format": FORMAT, "version": 1, "config": self._config(), "count": self._count,
                "specs": specs, "keys": keys, "entries": entries,
                "generator_state": self._gen.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Become an exact copy of the memory that produced ``state`` (config included).

        Raises a :class:`~chronos.core.errors.ChronosError` (``ConfigError``, or the key, shape
        or finiteness error of the entry at fault) and changes nothing when ``state`` is not a
        consistent :meth:`state_dict`.
        """
        try:
            copy = _from_state(state)
        except ChronosError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"not a valid ContinuumMemory state_dict: {e!r}") from None
        self.__dict__.update(copy.__dict__)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the memory to ``path`` (atomically, :mod:`chronos.core.safeio`, no pickle)."""
        save_tensors(path, *state_to_tensors(self.state_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ContinuumMemory:
        """Read a memory written by :meth:`save` (raises
        :class:`~chronos.core.errors.CorruptFileError` for a damaged or foreign file)."""
        tensors, meta = load_tensors(path)
        try:
            state = state_from_tensors(tensors, meta)
            return _from_state(state, cls)
        except (ConfigError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise CorruptFileError(
                f"{os.fspath(path)!r} is not a valid ContinuumMemory file: {e}"
            ) from None


def _from_state(
    state: Mapping[str, Any], cls: type[ContinuumMemory] = ContinuumMemory
) -> ContinuumMemory:
    """A new memory from a :meth:`ContinuumMemory.state_dict` (validated)."""
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        raise ConfigError(f"a ContinuumMemory state_dict has format {FORMAT!r}")
    config = dict(state["config"])
    if set(config) != {"capacity", "metric", "k", "eviction", "seed", "index_dims"}:
        raise ConfigError(f"state['config'] has the wrong fields: {sorted(config)}")
    mem = cls(**config)
    count = state["count"]
    if type(count) is not int or count < 0:
        raise ConfigError(f"state['count'] must be an int >= 0, got {count!r}")
    gen = state["generator_state"]
    if not isinstance(gen, Tensor) or gen.dtype != torch.uint8:
        raise ConfigError("state['generator_state'] must be a uint8 tensor")
    mem._gen.set_state(gen.clone())
    mem._count = count
    entries = state["entries"]
    if not entries:
        return mem
    specs = state["specs"]
    spec = spec_from_json(specs["outer_params"], "outer_params")
    grad_spec = spec_from_json(specs["hypergradient"], "hypergradient")
    mem._extra_specs = {str(n): spec_from_json(s, f"extras/{n}")
                        for n, s in specs["extras"].items()}
    if len(entries) > mem.capacity:
        raise ConfigError(f"{len(entries)} entries exceed the capacity {mem.capacity}")
    dtype = ContinuumMemory._storage_dtype(spec)
    keys = state["keys"]
    if not isinstance(keys, Tensor) or keys.dtype != dtype or keys.shape != (
        len(entries), spec.numel
    ):
        raise ConfigError(f"state['keys'] must be a {dtype} tensor [{len(entries)}, {spec.numel}]")
    held = []
    for e in entries:
        params = _as_dict(e["outer_params"], "entry outer_params")
        grad = _as_dict(e["hypergradient"], "entry hypergradient")
        _check_spec(params, spec, "entry outer_params")
        _check_spec(grad, grad_spec, "entry hypergradient")
        i, step = e["index"], e["step"]
        if type(i) is not int or not 0 <= i < count or type(step) is not int:
            raise ConfigError(f"entry index {i!r} / step {step!r} out of range")
        extras, new = mem._check_extras(e["extra"])
        if new:
            raise ConfigError(f"entry extras {sorted(new)} have no spec in state['specs']")
        held.append(MemoryEntry(_own(params, spec), _own(grad, grad_spec), float(e["val_loss"]),
                                step, MappingProxyType(extras), index=i))
        _check_finite(params, "entry outer_params")
        _check_finite(grad, "entry hypergradient")
    order = torch.tensor([e.index for e in held], dtype=torch.int64)
    if order.unique().numel() != order.numel():
        raise ConfigError("entry indices repeat")
    flat = torch.stack([_flat(e.outer_params, spec, dtype) for e in held])
    if not torch.equal(flat, keys):
        raise ConfigError("state['keys'] does not match the entries' outer_params")
    index = ExactKNNIndex(spec.numel, dtype, mem.capacity, mem.metric, mem.index_dims,
                          _BRUTE_FORCE_MAX)
    index.add_many(keys, order)
    mem._index, mem._spec, mem._grad_spec, mem._entries = index, spec, grad_spec, held
    mem._has = {n: bytearray(int(n in e.extra) for e in held) for n in mem._extra_specs}
    mem._latest = int(torch.argmax(order))
    return mem
