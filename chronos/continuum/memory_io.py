"""The file form of a :class:`~chronos.continuum.ContinuumMemory` state dict: named tensors plus
JSON metadata for :mod:`chronos.core.safeio` (no pickle).

:func:`state_to_tensors` and :func:`state_from_tensors` are inverse pure functions between a
``ContinuumMemory.state_dict()`` and ``(tensors, metadata)``. Per-entry tensors of one fixed
structure are stacked along a new first axis, so a memory of ``N`` entries is a handful of
tensors, not ``N`` of them:

* ``keys [N, D]``, ``generator_state``, ``index [N]``, ``step [N]``, ``val_loss [N]``;
* ``outer_params.j`` / ``hypergradient.j`` ``[N, *shape_j]`` for the ``j``-th key of the spec;
* ``xtd.e.j`` ``[M_e, *shape_j]``: the ``e``-th TensorDict extra, for the ``M_e`` entries
  that hold it (their positions in ``metadata["extra_rows"]``);
* ``xt.p.c``: the ``c``-th plain-tensor extra of entry ``p``; scalar extras (``float``,
  ``int``, ``bool``, ``str``) go to ``metadata["entries"][p]["scalars"]``.

:func:`state_from_tensors` checks the format tag and the row counts; everything else is
validated by ``ContinuumMemory.load_state_dict``.

Example:
    >>> import torch
    >>> from chronos.continuum import ContinuumMemory
    >>> mem = ContinuumMemory(capacity=4)
    >>> _ = mem.store({"lr": torch.tensor([0.1])}, {"lr": torch.tensor([2.0])}, 0.5, 0, w="a")
    >>> tensors, meta = state_to_tensors(mem.state_dict())
    >>> sorted(tensors)[:3], meta["entries"]
    (['generator_state', 'hypergradient.0', 'index'], [{'scalars': {'w': 'a'}, 'tensors': []}])
    >>> state_from_tensors(tensors, meta)["entries"][0]["extra"]
    {'w': 'a'}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from chronos.core.errors import ConfigError
from chronos.core.safeio import DTYPES
from chronos.core.tensordict import FlatSpec

__all__ = ["FORMAT", "spec_from_json", "spec_to_json", "state_from_tensors", "state_to_tensors"]

FORMAT = "chronos.ContinuumMemory"
"""The ``format`` tag of a state dict and of its file metadata (version 1)."""

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def spec_to_json(spec: FlatSpec) -> dict[str, Any]:
    """A :class:`~chronos.core.tensordict.FlatSpec` as plain JSON containers."""
    return {"keys": list(spec.keys), "shapes": [list(s) for s in spec.shapes],
            "dtypes": [_DTYPE_NAMES[d] for d in spec.dtypes]}


def spec_from_json(obj: Any, what: str) -> FlatSpec:
    """Inverse of :func:`spec_to_json` (``ConfigError`` naming ``what`` when malformed)."""
    try:
        keys, shapes, dtypes = obj["keys"], obj["shapes"], obj["dtypes"]
        if not (len(keys) == len(shapes) == len(dtypes)):
            raise ValueError("keys, shapes and dtypes differ in length")
        return FlatSpec(tuple(str(k) for k in keys),
                        tuple(torch.Size([int(n) for n in s]) for s in shapes),
                        tuple(DTYPES[d] for d in dtypes))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"state[{what!r}] is not a valid tensor spec ({e!r})") from None


def _stack(values: list[Tensor], spec: FlatSpec, j: int) -> Tensor:
    if not values:
        return torch.zeros(0, *spec.shapes[j], dtype=spec.dtypes[j])
    return torch.stack(values)


def state_to_tensors(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a ``ContinuumMemory.state_dict()`` (see the module doc)."""
    entries, specs = state["entries"], state["specs"]
    tensors: dict[str, Tensor] = {
        "keys": state["keys"],
        "generator_state": state["generator_state"],
        "index": torch.tensor([e["index"] for e in entries], dtype=torch.int64),
        "step": torch.tensor([e["step"] for e in entries], dtype=torch.int64),
        "val_loss": torch.tensor([e["val_loss"] for e in entries], dtype=torch.float64),
    }
    for part in ("outer_params", "hypergradient"):
        if specs[part] is not None:
            spec = spec_from_json(specs[part], part)
            for j, name in enumerate(spec.keys):
                tensors[f"{part}.{j}"] = _stack([e[part][name] for e in entries], spec, j)
    extra_rows: dict[str, list[int]] = {}
    for x, (name, obj) in enumerate(specs["extras"].items()):
        spec = spec_from_json(obj, f"extras/{name}")
        rows = [p for p, e in enumerate(entries) if name in e["extra"]]
        extra_rows[name] = rows
        for j, key in enumerate(spec.keys):
            tensors[f"xtd.{x}.{j}"] = _stack([entries[p]["extra"][name][key] for p in rows],
                                             spec, j)
    others = []
    for p, e in enumerate(entries):
        scalars: dict[str, Any] = {}
        names: list[str] = []
        for name, v in e["extra"].items():
            if isinstance(v, Tensor):
                tensors[f"xt.{p}.{len(names)}"] = v
                names.append(name)
            elif not isinstance(v, Mapping):
                scalars[name] = v
        others.append({"scalars": scalars, "tensors": names})
    meta = {"format": FORMAT, "version": 1, "config": state["config"], "count": state["count"],
            "specs": specs, "extra_rows": extra_rows, "entries": others}
    return tensors, meta


def state_from_tensors(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`state_to_tensors` (raises ``ConfigError``, ``KeyError`` or
    ``IndexError`` on a file that is not one)."""
    if meta.get("format") != FORMAT or meta.get("version") != 1:
        raise ConfigError(f"its metadata does not describe a {FORMAT} (version 1)")
    specs = meta["specs"]
    index, step, loss = tensors["index"], tensors["step"], tensors["val_loss"]
    n = int(index.shape[0])
    if step.shape != (n,) or loss.shape != (n,) or len(meta["entries"]) != n:
        raise ConfigError(f"the per-entry records do not all have {n} rows")
    entries: list[dict[str, Any]] = [
        {"index": int(index[p]), "step": int(step[p]), "val_loss": float(loss[p]),
         "outer_params": {}, "hypergradient": {}, "extra": {}}
        for p in range(n)
    ]
    for part in ("outer_params", "hypergradient"):
        if specs[part] is not None:
            for j, name in enumerate(specs[part]["keys"]):
                stacked = tensors[f"{part}.{j}"]
                if stacked.shape[0] != n:
                    raise ConfigError(f"{part}.{j} has {stacked.shape[0]} rows, not {n}")
                for p in range(n):
                    entries[p][part][name] = stacked[p]
    for x, (name, obj) in enumerate(specs["extras"].items()):
        rows = meta["extra_rows"][name]
        for p in rows:
            entries[p]["extra"][name] = {}
        for j, key in enumerate(obj["keys"]):
            stacked = tensors[f"xtd.{x}.{j}"]
            if stacked.shape[0] != len(rows):
                raise ConfigError(f"extra {name!r} has {stacked.shape[0]} rows, not {len(rows)}")
            for r, p in enumerate(rows):
                entries[p]["extra"][name][key] = stacked[r]
    for p, other in enumerate(meta["entries"]):
        entries[p]["extra"].update(other["scalars"])
        for c, name in enumerate(other["tensors"]):
            entries[p]["extra"][name] = tensors[f"xt.{p}.{c}"]
    return {"format": FORMAT, "version": 1, "config": meta["config"], "count": meta["count"],
            "specs": specs, "keys": tensors["keys"], "entries": entries,
            "generator_state": tensors["generator_state"]}
