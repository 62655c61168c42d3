"""Communication layer: significance-triggered sending with error feedback (no network I/O).

Example:
    >>> from chronos.communication import SignificanceFilter
    >>> SignificanceFilter().threshold
    0.01
"""

from chronos.communication.significance import (
    FilterState,
    SignificanceConfig,
    SignificanceFilter,
    filter_step,
    init_filter,
    significance,
)

__all__ = [
    "FilterState",
    "SignificanceConfig",
    "SignificanceFilter",
    "filter_step",
    "init_filter",
    "significance",
]
