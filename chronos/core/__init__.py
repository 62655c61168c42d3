"""Core vocabulary: tensor dicts, errors, inner problems, trajectories, meta-state, versions.

Example:
    >>> from chronos.core import BoundedVersionQueue, InnerProblem, MetaState, VersionTracker
    >>> BoundedVersionQueue(max_in_flight=3, max_staleness=2).version
    0
"""

from chronos.core import tensordict
from chronos.core.errors import (
    ChronosError,
    ChronosTypeError,
    ChronosWarning,
    ConfigError,
    ConvergenceWarning,
    KeyMismatchError,
    NonFiniteError,
    ProtocolError,
    ShapeMismatchError,
    UnknownWorkerError,
    VersionError,
)
from chronos.core.metastate import MetaState
from chronos.core.problem import FunctionalProblem, InnerProblem, make_optimizer
from chronos.core.tensordict import TensorDict
from chronos.core.trajectory import Trajectory
from chronos.core.versioning import (
    BoundedVersionQueue,
    CheckoutDecision,
    CommitDecision,
    Lease,
    VersionTracker,
)

__all__ = [
    "BoundedVersionQueue",
    "CheckoutDecision",
    "ChronosError",
    "ChronosTypeError",
    "ChronosWarning",
    "CommitDecision",
    "ConfigError",
    "ConvergenceWarning",
    "FunctionalProblem",
    "InnerProblem",
    "KeyMismatchError",
    "Lease",
    "MetaState",
    "NonFiniteError",
    "ProtocolError",
    "ShapeMismatchError",
    "TensorDict",
    "Trajectory",
    "UnknownWorkerError",
    "VersionError",
    "VersionTracker",
    "make_optimizer",
    "tensordict",
]
