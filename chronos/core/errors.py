"""Every error Chronos raises on purpose derives from :class:`ChronosError`.

Messages say what was wrong *and* what is accepted, so a user can fix the call without
reading the source. Subclasses also derive from the matching builtin (``ValueError``,
``KeyError``, ``TypeError``) so generic handlers keep working.

Example:
    >>> from chronos.core.errors import ChronosError, ConfigError
    >>> try:
    ...     raise ConfigError("decay must be in (0, 1], got 2.0")
    ... except ChronosError as e:
    ...     print(e)
    decay must be in (0, 1], got 2.0
"""

from __future__ import annotations


class ChronosError(Exception):
    """Base class of every error raised by Chronos on purpose."""


class ConfigError(ChronosError, ValueError):
    """A configuration value is out of range or of the wrong kind."""


class ChronosTypeError(ChronosError, TypeError):
    """An argument has the wrong type."""


class KeyMismatchError(ChronosError, KeyError):
    """Two tensor dicts that must share keys do not."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(ChronosError, ValueError):
    """Two tensors that must share a shape (or dtype) do not."""


class UnknownWorkerError(ChronosError, KeyError):
    """A worker id that the coordinator or version queue does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class VersionError(ChronosError, ValueError):
    """A version that never existed, or that does not match a lease."""


class NonFiniteError(ChronosError, ValueError):
    """A loss, gradient or hypergradient contains NaN or Inf."""


class ProtocolError(ChronosError, ValueError):
    """A message violates the wire protocol (malformed, oversize, unknown op, bad tensor)."""


class CorruptFileError(ChronosError, ValueError):
    """A file Chronos reads is not in its format, is truncated, or fails its checksum."""


class ChronosWarning(UserWarning):
    """Base class of Chronos warnings (e.g. a linear solve that did not converge)."""


class ConvergenceWarning(ChronosWarning):
    """An iterative solver stopped at ``max_iter`` before reaching its tolerance."""
