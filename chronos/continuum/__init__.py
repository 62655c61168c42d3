"""The HOPE features: a memory of the outer loop's history, amortized hypergradients and
per-parameter update frequencies.

* :class:`ContinuumMemory` — stores ``(λ, dF/dλ, validation loss, step, extras)``; exact
  nearest-neighbour retrieval and a local linear model of anything stored as a function of λ.
* :class:`AmortizedHypergradient` — warm-started, adaptively inexact inner and linear solves.
* :class:`MultiTimescaleOptimizer` — each group of outer parameters updated every
  ``update_frequency`` steps with the mean of its hypergradients since its last update.
"""

from chronos.continuum.amortized import (
    AmortizationConfig,
    AmortizedHypergradient,
    AmortizedStep,
)
from chronos.continuum.memory import ContinuumMemory, MemoryEntry
from chronos.continuum.timescale import (
    MultiTimescaleConfig,
    MultiTimescaleOptimizer,
    TimescaleConfig,
)

__all__ = [
    "AmortizationConfig",
    "AmortizedHypergradient",
    "AmortizedStep",
    "ContinuumMemory",
    "MemoryEntry",
    "MultiTimescaleConfig",
    "MultiTimescaleOptimizer",
    "TimescaleConfig",
]
