"""The coordinator's outer state: :class:`MetaState`.

``MetaState`` holds the versioned outer parameters λ, the outer optimizer's state and a
bounded history of per-version metrics. The version is an integer that grows by one per
outer step; :meth:`MetaState.state_dict` / :meth:`MetaState.load_state_dict` make it
checkpointable with ``torch.save``.

Example:
    >>> import torch
    >>> m = MetaState({"lr": 0.01})
    >>> m.update({"lr": torch.tensor(0.02)}, outer_loss=0.5)
    1
    >>> m.version, round(float(m.outer_params["lr"]), 6), m.history[-1]["outer_loss"]
    (1, 0.02, 0.5)
    >>> m2 = MetaState({"lr": 0.0}); m2.load_state_dict(m.state_dict()); m2.version
    1
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from chronos.core import tensordict as td
from chronos.core.errors import ChronosTypeError, ConfigError
from chronos.core.tensordict import TensorDict

__all__ = ["MetaState"]


class MetaState:
    """Versioned outer parameters + outer optimizer state + metric history.

    Args:
        outer_params: λ as tensors or numbers (copied).
        version: starting version (>= 0).
        optimizer_state: an outer optimizer's ``state_dict()`` (kept as given).
        max_history: keep at most this many history entries (``None``: all).
    """

    def __init__(
        self,
        outer_params: Mapping[str, Tensor | float],
        version: int = 0,
        optimizer_state: dict[str, Any] | None = None,
        max_history: int | None = 10_000,
    ) -> None:
        if not isinstance(version, int) or version < 0:
            raise ConfigError(f"version must be an int >= 0, got {version!r}")
        if max_history is not None and max_history < 1:
            raise ConfigError(f"max_history must be >= 1 or None, got {max_history}")
        self.outer_params: TensorDict = td.clone(
            td.as_tensor_dict(outer_params, what="outer_params")
        )
        if not self.outer_params:
            raise ConfigError("outer_params is empty; give at least one outer parameter")
        self.version = version
        self.optimizer_state: dict[str, Any] = dict(optimizer_state or {})
        self.history: deque[dict[str, Any]] = deque(maxlen=max_history)

    def update(self, new_params: Mapping[str, Tensor], **metrics: Any) -> int:
        """Replace λ (same keys and shapes), bump the version, record ``metrics``; return it."""
        td.check_same_structure(self.outer_params, new_params, "MetaState.update()")
        self.outer_params = td.clone(new_params)
        self.version += 1
        self.record(**metrics)
        return self.version

    def adopt(self, new_params: Mapping[str, Tensor], **metrics: Any) -> int:
        """Like :meth:`update`, but install ``new_params``' tensors as they are, without a copy.

        For a caller that computed new tensors for the new version, sharing no memory with the
        current ones (e.g. an optimizer step written into a buffer of its own), and hands them
        over: it must not modify them afterwards. MetaState never modifies its tensors in place
        either, so a reader may keep the previous version's tensors (e.g. frames still being
        sent zero-copy). Tensors that require grad are detached (a view: no copy).

        Example:
            >>> import torch
            >>> m = MetaState({"lr": 0.01})
            >>> new = {"lr": torch.tensor(0.02)}
            >>> m.adopt(new, outer_loss=0.5), m.outer_params["lr"] is new["lr"]
            (1, True)
        """
        old = self.outer_params
        if not (
            isinstance(new_params, Mapping)
            and new_params.keys() == old.keys()
            and all(
                isinstance(v, Tensor) and v.shape == old[k].shape for k, v in new_params.items()
            )
        ):
            td.check_same_structure(old, new_params, "MetaState.adopt()")  # raises: says why
        self.outer_params = {k: v.detach() if v.requires_grad else v for k, v in new_params.items()}
        self.version += 1
        self.record(**metrics)
        return self.version

    def record(self, **metrics: Any) -> None:
        """Append ``{"version": current, **metrics}`` to the history."""
        self.history.append({"version": self.version, **metrics})

    def state_dict(self) -> dict[str, Any]:
        """A copy of everything, suitable for ``torch.save``."""
        return {
            "version": self.version,
            "outer_params": td.clone(self.outer_params),
            "optimizer_state": self.optimizer_state,
            "history": list(self.history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` output (keys of λ may change: it is a restore)."""
        missing = {"version", "outer_params"} - set(state)
        if missing:
            raise ChronosTypeError(
                f"state dict lacks {sorted(missing)}; pass the output of MetaState.state_dict()"
            )
        version = state["version"]
        if not isinstance(version, int) or version < 0:
            raise ConfigError(f"state['version'] must be an int >= 0, got {version!r}")
        self.outer_params = td.clone(td.as_tensor_dict(state["outer_params"]))
        self.version = version
        self.optimizer_state = dict(state.get("optimizer_state") or {})
        self.history = deque(state.get("history", []), maxlen=self.history.maxlen)
