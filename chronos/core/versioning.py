"""Versioned bounded asynchrony: :class:`VersionTracker` and :class:`BoundedVersionQueue`.

The coordinator's outer state has an integer version ``V`` that grows by one per outer step.
A worker *checks out* ``V``, solves its inner problem for the λ of that version and *commits* a
hypergradient computed on version ``v``. Two bounds keep slow workers from poisoning the
outer loop:

* **staleness** ``s = V − v`` at commit time. ``s > max_staleness`` → rejected (nothing
  applied, reason given); otherwise accepted with weight ``decay ** s``.
* **version window** (stale-synchronous parallel): a checkout of the current version ``V`` is
  *deferred* while ``V − (oldest version still checked out) >= max_in_flight``, so fast
  workers wait for the slowest outstanding lease instead of running away from it. A deferred
  checkout is queued, never blocks, and is granted by :meth:`BoundedVersionQueue.grant_deferred`
  as soon as the window allows (after the blocking lease commits, is released or expires).

How the two interact: in async mode every accepted commit is one version, so N equally fast
workers already see staleness up to about N − 1. With two workers, ``max_staleness >=
max_in_flight`` means no commit of a live lease is ever rejected: while worker B holds a lease
on ``v``, worker A can only check out versions ``< v + max_in_flight``, so B commits with
staleness ``<= max_in_flight``. With more workers each lease holder can add one version, so
choose ``max_staleness`` around ``max_in_flight + N − 2`` (or aggregate several commits per step)
if rejections should be rare.

Leases expire after ``lease_timeout`` seconds without a checkout, commit or heartbeat, so a
dead worker cannot hold the window forever. Time is always passed in (``now``); nothing here
sleeps, spawns threads or reads a clock.

Example:
    >>> q = BoundedVersionQueue(max_in_flight=1, max_staleness=1, decay=0.5, lease_timeout=10)
    >>> q.checkout("a", now=0.0).granted, q.checkout("b", now=0.0).granted
    (True, True)
    >>> q.commit("a", version=0, now=1.0).weight, q.advance()
    (1.0, 1)
    >>> q.checkout("a", now=1.0).deferred        # b still holds version 0
    True
    >>> d = q.commit("b", version=0, now=2.0); (d.accepted, d.staleness, d.weight)
    (True, 1, 0.5)
    >>> q.grant_deferred(now=2.0)
    [('a', 1)]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from chronos.core.errors import ChronosTypeError, ConfigError, UnknownWorkerError, VersionError

__all__ = [
    "BoundedVersionQueue",
    "CheckoutDecision",
    "CommitDecision",
    "Lease",
    "VersionTracker",
]


def _check_worker_id(worker_id: object) -> str:
    if type(worker_id) is str and worker_id:  # the common case, cheaply (a hot path)
        return worker_id
    if not isinstance(worker_id, str) or not worker_id:
        raise ChronosTypeError(f"worker_id must be a non-empty str, got {worker_id!r}")
    return worker_id


def _check_time(now: object) -> float:
    if type(now) is float and math.isfinite(now):  # the common case, cheaply (a hot path)
        return now
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ChronosTypeError(f"now must be a finite number of seconds, got {now!r}")
    return float(now)


@dataclass(frozen=True)
class Lease:
    """A worker's claim on a checked-out version, valid until ``expires_at``."""

    worker_id: str
    version: int
    expires_at: float


@dataclass(frozen=True)
class CheckoutDecision:
    """Answer to a checkout: granted at ``version``, or deferred (retry / wait to be granted)."""

    granted: bool
    version: int
    reason: str = ""

    @property
    def deferred(self) -> bool:
        """True when the checkout is queued until the version window allows it."""
        return not self.granted


@dataclass(frozen=True)
class CommitDecision:
    """Answer to a commit: accepted with ``weight = decay ** staleness``, or rejected."""

    accepted: bool
    staleness: int
    weight: float
    reason: str = ""


class VersionTracker:
    """The current version and the staleness rule.

    ``staleness(v) = current − v``; a commit on ``v`` is accepted iff
    ``staleness <= max_staleness`` and then weighted ``decay ** staleness``.

    Args:
        max_staleness: largest accepted staleness (>= 0; 0 accepts only fresh commits).
        decay: weight base in (0, 1]; 1.0 weights every accepted commit equally.
        version: starting version (>= 0).

    Example:
        >>> t = VersionTracker(max_staleness=2, decay=0.5)
        >>> t.advance(); t.advance(); t.advance()
        1
        2
        3
        >>> t.evaluate(2).weight, t.evaluate(0).accepted
        (0.5, False)
    """

    def __init__(self, max_staleness: int = 2, decay: float = 0.5, version: int = 0) -> None:
        if isinstance(max_staleness, bool) or not isinstance(max_staleness, int):
            raise ConfigError(f"max_staleness must be an int >= 0, got {max_staleness!r}")
        if max_staleness < 0:
            raise ConfigError(
                f"max_staleness must be >= 0 (0 accepts only fresh commits), got {max_staleness}"
            )
        if isinstance(decay, bool) or not isinstance(decay, (int, float)):
            raise ConfigError(f"decay must be a number in (0, 1], got {decay!r}")
        if not (0.0 < decay <= 1.0):
            raise ConfigError(f"decay must be in (0, 1], got {decay}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ConfigError(f"version must be an int >= 0, got {version!r}")
        self.max_staleness = max_staleness
        self.decay = float(decay)
        self.current = version

    def advance(self) -> int:
        """Bump the version by one (one outer step) and return the new version."""
        self.current += 1
        return self.current

    def staleness(self, version: int) -> int:
        """``current − version``; raises :class:`VersionError` for a version never issued."""
        if type(version) is not int and (isinstance(version, bool) or not isinstance(version, int)):
            raise VersionError(f"version must be an int, got {version!r}")
        if version < 0 or version > self.current:
            raise VersionError(
                f"version {version} was never issued; versions 0..{self.current} exist"
            )
        return self.current - version

    def weight(self, staleness: int) -> float:
        """``decay ** staleness``."""
        return self.decay**staleness

    def evaluate(self, version: int) -> CommitDecision:
        """Accept (with weight) or reject a commit computed on ``version``."""
        s = self.staleness(version)
        if s > self.max_staleness:
            return CommitDecision(
                accepted=False,
                staleness=s,
                weight=0.0,
                reason=(
                    f"stale: computed on version {version}, current is {self.current} "
                    f"(staleness {s} > max_staleness {self.max_staleness}); check out again"
                ),
            )
        return CommitDecision(accepted=True, staleness=s, weight=self.weight(s))


class BoundedVersionQueue:
    """Leases, the version window and the staleness rule, as a pure state machine.

    Args:
        max_in_flight: width of the version window (>= 1): a checkout of ``V`` is deferred
            while ``V − oldest live lease version >= max_in_flight``.
        max_staleness: see :class:`VersionTracker`.
        decay: see :class:`VersionTracker`.
        lease_timeout: seconds a lease lives without checkout/commit/heartbeat (> 0).
        version: starting version.

    All methods take the current time ``now`` (seconds, any monotonic origin) where time matters.
    """

    def __init__(
        self,
        max_in_flight: int = 3,
        max_staleness: int = 2,
        decay: float = 0.5,
        lease_timeout: float = 60.0,
        version: int = 0,
    ) -> None:
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int):
            raise ConfigError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        if max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if isinstance(lease_timeout, bool) or not isinstance(lease_timeout, (int, float)):
            raise ConfigError(f"lease_timeout must be a positive number, got {lease_timeout!r}")
        if not (lease_timeout > 0 and math.isfinite(lease_timeout)):
            raise ConfigError(
                f"lease_timeout must be a positive finite number of seconds, got {lease_timeout}"
            )
        self.tracker = VersionTracker(max_staleness=max_staleness, decay=decay, version=version)
        self.max_in_flight = max_in_flight
        self.lease_timeout = float(lease_timeout)
        self._leases: dict[str, Lease] = {}
        self._waiting: dict[str, None] = {}  # insertion-ordered set of deferred worker ids

    # -- views --------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The current version ``V``."""
        return self.tracker.current

    @property
    def max_staleness(self) -> int:
        return self.tracker.max_staleness

    @property
    def decay(self) -> float:
        return self.tracker.decay

    @property
    def leases(self) -> Mapping[str, Lease]:
        """Current leases by worker id (live or expired-but-not-yet-collected)."""
        return dict(self._leases)

    @property
    def deferred(self) -> tuple[str, ...]:
        """Worker ids whose checkout waits for the window, in arrival order."""
        return tuple(self._waiting)

    def live_leases(self, now: float) -> dict[str, Lease]:
        """Leases not yet expired at ``now``."""
        now = _check_time(now)
        return {w: lease for w, lease in self._leases.items() if lease.expires_at > now}

    def oldest_version(self, now: float) -> int | None:
        """Oldest version held by a live lease, or ``None`` when nothing is checked out."""
        live = self.live_leases(now)
        return min((lease.version for lease in live.values()), default=None)

    def window(self, now: float) -> int:
        """``V − oldest live lease version`` (0 when nothing is checked out)."""
        oldest = self.oldest_version(now)
        return 0 if oldest is None else self.version - oldest

    def window_allows(self, now: float) -> bool:
        """True when a checkout of the current version would be granted at ``now``."""
        return self.window(now) < self.max_in_flight

    # -- events -------------------------------------------------------------------------------

    def checkout(self, worker_id: str, now: float) -> CheckoutDecision:
        """Grant the current version to ``worker_id``, or defer it while the window is full.

        A worker that checks out again abandons its previous lease first. A deferred worker is
        queued; :meth:`grant_deferred` grants it as soon as the window allows.
        """
        worker_id = _check_worker_id(worker_id)
        now = _check_time(now)
        self._leases.pop(worker_id, None)
        if not self.window_allows(now):
            self._waiting[worker_id] = None
            oldest = self.oldest_version(now)
            return CheckoutDecision(
                granted=False,
                version=self.version,
                reason=(
                    f"deferred: version window full (current {self.version}, oldest checked out "
                    f"{oldest}, max_in_flight {self.max_in_flight})"
                ),
            )
        self._waiting.pop(worker_id, None)
        self._leases[worker_id] = Lease(worker_id, self.version, now + self.lease_timeout)
        return CheckoutDecision(granted=True, version=self.version)

    def commit(self, worker_id: str, version: int, now: float) -> CommitDecision:
        """Judge a commit computed on ``version`` and end ``worker_id``'s lease.

        A worker without a lease (it expired, or it never checked out) is judged on staleness
        alone. A commit for a version other than the one its live lease holds raises
        :class:`VersionError`, as does a version never issued.
        """
        worker_id = _check_worker_id(worker_id)
        now = _check_time(now)
        decision = self.tracker.evaluate(version)  # raises for versions never issued
        lease = self._leases.get(worker_id)
        if lease is not None and lease.version != version:
            raise VersionError(
                f"worker {worker_id!r} holds a lease on version {lease.version} but committed "
                f"version {version}; commit the version you checked out"
            )
        self._leases.pop(worker_id, None)
        return decision

    def lease_of(self, worker_id: str) -> Lease | None:
        """``worker_id``'s lease, or ``None`` (no copy of the table, unlike :attr:`leases`)."""
        return self._leases.get(worker_id)

    def restore_lease(self, worker_id: str, version: int, now: float) -> None:
        """Give ``worker_id`` a lease on ``version`` (an issued one) again, e.g. the lease it
        held when a coordinator that restarted from its state directory went down."""
        worker_id = _check_worker_id(worker_id)
        now = _check_time(now)
        self.tracker.evaluate(version)  # raises VersionError for a version never issued
        self._waiting.pop(worker_id, None)
        self._leases[worker_id] = Lease(worker_id, version, now + self.lease_timeout)

    def heartbeat(self, worker_id: str, now: float) -> bool:
        """Renew ``worker_id``'s lease; return whether it holds one."""
        worker_id = _check_worker_id(worker_id)
        now = _check_time(now)
        lease = self._leases.get(worker_id)
        if lease is None:
            return False
        self._leases[worker_id] = Lease(worker_id, lease.version, now + self.lease_timeout)
        return True

    def release(self, worker_id: str) -> None:
        """Drop ``worker_id``'s lease and any deferred checkout (e.g. it deregistered)."""
        worker_id = _check_worker_id(worker_id)
        had_lease = self._leases.pop(worker_id, None) is not None
        was_waiting = self._waiting.pop(worker_id, 0) is None
        if not (had_lease or was_waiting):
            known = sorted(set(self._leases) | set(self._waiting))
            raise UnknownWorkerError(
                f"worker {worker_id!r} holds no lease and waits for none; known: {known}"
            )

    def expire(self, now: float) -> list[str]:
        """Remove leases that expired at or before ``now``; return their worker ids."""
        now = _check_time(now)
        gone = [w for w, lease in self._leases.items() if lease.expires_at <= now]
        for w in gone:
            del self._leases[w]
        return gone

    def advance(self) -> int:
        """One outer step: bump the version and return it."""
        return self.tracker.advance()

    def grant_deferred(self, now: float) -> list[tuple[str, int]]:
        """Grant queued checkouts that the window now allows; return ``(worker_id, version)``.

        Granting the current version never narrows the window for the next one, so either all
        queued checkouts are granted or none.
        """
        now = _check_time(now)
        if not self._waiting or not self.window_allows(now):
            return []
        granted = []
        for w in list(self._waiting):
            del self._waiting[w]
            self._leases[w] = Lease(w, self.version, now + self.lease_timeout)
            granted.append((w, self.version))
        return granted
