"""Bounds on what hostile or broken peers can cost the coordinator: :class:`LogLimiter` and
:class:`PeerBudget`.

The coordinator runs one loop thread. Whatever a peer makes it do per message — decode,
reply, log — is paid on that thread, so each kind of cost a peer can trigger at will is
capped:

* **Logs.** :class:`LogLimiter` lets through at most ``burst`` lines per ``key`` (e.g. an
  error code) and then one line per ``1 / rate`` seconds, each cut to ``max_chars``; the lines
  it held back are counted and reported with the next line it lets through ("… 4,512 similar
  lines suppressed"). A flood of bad messages writes a few lines a second, not megabytes.
* **Error replies.** :class:`PeerBudget` is a token bucket per connection: ``rate`` tokens a
  second up to ``burst``; each error reply costs one. A peer that sends junk faster than that
  is simply not answered (counted), so it cannot make the loop encode and send a reply per
  junk message. Buckets of connections idle for ``idle_s`` are dropped (:meth:`prune`), so
  10,000 one-shot peers leave nothing behind.

Both take the time as an argument (pure; tests pass a simulated clock).

Example:
    >>> limiter = LogLimiter(burst=2, rate=1.0, max_chars=20)
    >>> [limiter.admit("bad_tensor", "x" * 50, now=0.0) for _ in range(4)]
    ['xxxxxxxxxxxxxxxxx...', 'xxxxxxxxxxxxxxxxx...', None, None]
    >>> limiter.admit("bad_tensor", "later", now=1.5)
    'later (2 similar lines suppressed)'
    >>> budget = PeerBudget(rate=1.0, burst=2)
    >>> [budget.spend("peer", now=0.0) for _ in range(3)]
    [True, True, False]
"""

from __future__ import annotations

from chronos.core.errors import ConfigError

__all__ = ["LogLimiter", "PeerBudget"]


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class _Buckets:
    """Token buckets by key: ``rate`` tokens a second, at most ``burst``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = _positive("rate", rate)
        self.burst = _positive("burst", burst)
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, time)

    def take(self, key: str, now: float) -> bool:
        tokens, then = self._state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
        ok = tokens >= 1.0
        self._state[key] = (tokens - 1.0 if ok else tokens, now)
        return ok

    def prune(self, now: float, idle_s: float) -> int:
        stale = [k for k, (_, then) in self._state.items() if now - then > idle_s]
        for k in stale:
            del self._state[k]
        return len(stale)

    def __len__(self) -> int:
        return len(self._state)


class LogLimiter:
    """Rate-limited, truncated log lines per key (see the module docstring)."""

    def __init__(self, burst: int = 5, rate: float = 0.5, max_chars: int = 300) -> None:
        self._buckets = _Buckets(rate, burst)
        self.max_chars = int(_positive("max_chars", max_chars))
        self._held: dict[str, int] = {}
        self.suppressed = 0
        """Lines held back so far, over all keys."""

    def admit(self, key: str, line: str, now: float) -> str | None:
        """The line to log now (cut to ``max_chars``, with a count of the lines held back
        since the last one), or ``None`` to drop it."""
        if not self._buckets.take(key, now):
            self._held[key] = self._held.get(key, 0) + 1
            self.suppressed += 1
            return None
        if len(line) > self.max_chars:
            line = line[: self.max_chars - 3] + "..."
        held = self._held.pop(key, 0)
        return f"{line} ({held:,} similar lines suppressed)" if held else line


class PeerBudget:
    """Error replies per connection, as token buckets (see the module docstring)."""

    def __init__(self, rate: float = 20.0, burst: float = 40.0, idle_s: float = 30.0) -> None:
        self._buckets = _Buckets(rate, burst)
        self.idle_s = _positive("idle_s", idle_s)
        self.refused = 0
        """Error replies not sent because their peer's budget was spent."""

    def spend(self, peer: str, now: float) -> bool:
        """Whether ``peer`` may get one more error reply at ``now``."""
        ok = self._buckets.take(peer, now)
        self.refused += not ok
        return ok

    def prune(self, now: float) -> int:
        """Forget peers idle for ``idle_s``; return how many."""
        return self._buckets.prune(now, self.idle_s)

    def __len__(self) -> int:
        return len(self._buckets)
