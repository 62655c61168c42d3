"""The coordinator's decisions as a pure state machine: :class:`CoordinatorState`.

Events in, instructions out, time passed in: :meth:`CoordinatorState.handle` takes one message
from a worker and returns the messages to send (:class:`Outgoing`, possibly to *other* workers,
e.g. a deferred checkout granted because this commit freed the window);
:meth:`CoordinatorState.tick` does what time alone causes (leases expiring). No I/O, no
threads, no sleeps, no clock reads: the socket loop around it only carries messages.

Rules (DESIGN.md, "Semantics that must hold"):

* **Versions.** λ has an integer version, +1 per outer step; ``version == steps`` always.
* **Staleness.** A commit computed on version ``v`` when the current version is ``V`` has
  staleness ``s = V − v``; ``s > max_staleness`` → ``CommitReply(status="rejected")`` and
  nothing applied; otherwise accepted with weight ``w = decay ** s``.
* **Aggregation** (async; ``CoordinatorConfig.aggregation``). ``"latest"`` (the default,
  :mod:`chronos.distributed.latest`): an accepted commit replaces its worker's entry in a table
  of each live worker's latest hypergradient (weight 1; the reply says so), and an outer step
  uses the mean ``(1/K) Σ_k g_k`` over the ``K`` live workers' entries, however old (a worker
  that has not committed yet counts as zero), scaled by the fraction
  ``min(n, K) / K`` of them that is new (``n`` commits since the last step), so every shard is
  in every step; a worker's entry goes when it deregisters or expires. ``"buffered"``
  (:mod:`chronos.distributed.aggregation`): a step uses ``g = (1/n) Σ_i w_i g_i`` over the ``n``
  commits accepted since the last step (divided by ``n``, not ``Σ w_i``, so the weight is
  really applied: under SGD a lone commit of staleness ``s`` moves λ exactly ``decay ** s``
  times as far as a fresh one). Either way async mode steps once ``m`` commits are in since the
  last step; sync mode averages the commits at its barrier.
* **Per-worker accounting** (:class:`~chronos.distributed.ledger.WorkerLedger`, in
  ``stats()["workers"]``): commits accepted / rejected, leases cancelled, Σ applied weights,
  last version, and each worker's share of the outer updates (the sum of its coefficients in
  every step's gradient over everybody's).
* **min_commits** (async). ``m = min_commits`` for an int; for ``"auto"`` (the default)
  ``m = max(1, ceil(live / 2))`` with ``live`` the registered, alive workers
  (:func:`~chronos.distributed.aggregation.effective_min_commits`). ``N`` equally fast workers
  then produce about 2 versions per hypergradient time (staleness ~1–2) instead of ``N − 1``.
  ``m`` is re-evaluated after every event: when workers leave, commits already buffered step
  as soon as they reach the smaller ``m``.
* **Window** (async). A checkout is deferred while ``V − oldest live lease >= max_in_flight``
  (:class:`~chronos.core.versioning.BoundedVersionQueue`); the deferred request is answered
  later, with the *same request id*, by a ``granted`` / ``not_modified`` reply as soon as the
  window allows (checked after every commit, deregistration and expiry). A worker has at most
  one outstanding checkout: a new Checkout supersedes its deferred one, whose id is then never
  answered.
* **Window vs staleness.** Take a live lease on ``v`` and a fixed set of ``N`` workers. Once
  the version reaches ``v + max_in_flight`` no further lease is granted, the aggregate has
  just been emptied by that step, and the at most ``N − 2`` other leases then outstanding add
  at most ``⌊(N − 2) / m⌋`` steps. So ``max_staleness >= max_in_flight + ⌊(N − 2) / m⌋``
  means no commit of a live lease is ever rejected: ``max_in_flight`` for two workers,
  ``max_in_flight + 1`` for any ``N`` with ``min_commits="auto"`` (the defaults 3 / 4),
  ``max_in_flight + N − 2`` with ``min_commits=1``.
* **Lease cancellation** (async). After every outer step, each lease whose version ``v`` has
  fallen out of reach (``V − v > max_staleness``: its commit would be rejected) is dropped and
  its worker is sent :class:`~chronos.distributed.messages.LeaseCancelled` carrying the
  request id of the checkout that granted it (a late answer to that checkout, like a deferred
  grant). The worker abandons the work and checks out again instead of finishing it; a commit
  that still arrives is judged on staleness alone (rejected). A cancelled lease no longer
  holds the window.
* **Sync mode** (the baseline). Everyone computes on the current version ``V``. The queue
  runs with ``max_staleness=0`` (a commit on an older version is rejected) and no window;
  instead a barrier: a worker that already committed ``V`` and checks out again is deferred;
  after ``num_workers`` accepted commits on ``V`` the coordinator averages them (all weight 1),
  steps once and grants ``V + 1`` to every waiting worker. A second commit on ``V`` by the same
  worker is rejected. Dead workers (see :func:`~chronos.distributed.aggregation.
  sync_barrier_ready`): once ``num_workers`` workers have been alive together, the barrier also
  releases as soon as every *alive* worker has committed ``V``, so when a worker expires or
  deregisters the step uses the commits that arrived; before that (start-up) it waits for
  ``num_workers`` commits. ``max_in_flight``, ``max_staleness``, ``decay`` and ``min_commits``
  do not apply in sync mode.
* **Liveness.** A worker is alive from Register until Deregister or until ``lease_timeout``
  seconds pass without a successfully handled message from it (any message that does not get
  an :class:`ErrorReply` renews it, together with its lease). An expired worker is forgotten
  (lease and deferred checkout dropped; its later messages get ``unknown_worker``: it must
  Register again, which is then allowed). Registering an id that is alive →
  ``duplicate_worker``, except a re-sent copy of the very Register that registered it (same
  request id and ``info``, which workers make unique with a nonce), which is answered
  ``Registered`` again. ``handle(…, now)`` first does what
  ``tick(now)`` would do, so results never depend on how often the loop ticks; ``now`` is
  clamped to never run backwards.
* **Codecs.** A worker names its codec in Register (``codec``, a
  :func:`~chronos.communication.codecs.parse_codec` spec; default ``"identity"``). A spec that
  does not parse, or is not in the ``codecs`` allow-list the state was built with (default:
  every built-in), gets ``ErrorReply(code="unsupported_codec")`` and no registration. Its
  commits must say the same codec (else ``codec_mismatch``); a non-identity commit carries the
  encoded parts, decoded against λ's shapes and dtypes (malformed parts → ``bad_tensor``)
  *before* the usual checks (keys, shapes, dtypes, finiteness) and staleness decision, so a
  refused commit changes nothing. ``Commit.updates`` (hypergradients summed in the payload) is
  added to ``hypergradients_accepted`` for accepted commits.
* **Delta checkouts.** For a worker with a non-identity codec the state keeps ``copy_w``, its
  record of the λ that worker holds, with the version it stands for. A checkout with
  ``have_version`` equal to that version and at most ``max_delta_lag`` versions behind is
  answered ``kind="delta"``: the parts of ``encode(λ − copy_w)`` in the worker's codec; then
  ``copy_w ← copy_w + decode(parts)`` (:func:`~chronos.distributed.protocol.apply_delta`, the
  very operation the worker runs) and the reply carries ``checksum(copy_w)``
  (:func:`~chronos.distributed.protocol.checksum`). What a lossy code drops stays in
  ``λ − copy_w`` and goes out with the next delta: the worker's error never accumulates.
  Anything else (no copy, ``have_version`` -1 or not the recorded version, too far behind,
  the identity codec — a dense delta is as big as λ itself) gets ``kind="full"``, and
  ``copy_w`` becomes λ (shared, not copied: λ's tensors are never modified in place). Memory:
  one λ-sized copy per worker that received a delta. A ``Checkout(resync=True)`` (a worker
  whose checksum did not match) is counted in ``checkout_resyncs``; it carries
  ``have_version=-1`` and so gets a full copy.
* **Replies.** A ``granted`` checkout carries λ of its version as MetaState holds it: tensors
  never modified in place afterwards (every step installs new tensors: plain SGD computes them
  in the memory of the step's own gradient, other optimizers step separate leaves that are
  then copied), so a reply keeps its version's λ and can be sent zero-copy; treat them as
  read-only. ``not_modified`` (``have_version == version``) carries no tensors.
* **Stale correction** (``stale_correction=True``, async). Every accepted commit is stored in
  its worker's history; a stale one (``s >= 1``) from a worker with at least two stored
  commits is replaced by ``g + J_w (λ_V − λ_v)`` (capped at ``‖g‖``) and weighted 1 instead
  of ``decay ** s`` (:class:`~chronos.distributed.correction.StaleCorrector`); the reply and
  the dedupe record carry that weight, ``commits_corrected`` counts them.
* **Idempotence.** An accepted commit id is remembered *per worker* (the last
  ``dedupe_window`` (worker id, commit id) pairs); the same worker re-sending it gets
  ``CommitReply(status="duplicate")`` with the original staleness and weight and applies
  nothing. Another worker using the same commit id is a different commit (no peer can squat
  another's ids). Rejected or refused commits are not remembered.
* **Ownership.** A worker id belongs to the connection that registered it: ``handle``'s
  ``identity`` is the connection (the coordinator passes the ROUTER's routing id, which a peer
  cannot choose for another's connection). Any message for that id from another connection
  gets ``ErrorReply(code="not_owner")`` (counted in ``impersonations``) and changes nothing;
  a connection serves one worker id. With CURVE (``principal`` = the sender's public key) an
  id is also bound to the key that first registered it (for good: the binding is journaled),
  and a key listed in ``key_names`` may register only the id it is named after; the same key
  registering its id from a new connection supersedes the old registration at once
  (``registrations_superseded``: a restarted worker needs no lease timeout).
  :meth:`CoordinatorState.disconnected` (the coordinator saw the connection close, or stop
  answering transport heartbeats) lets its worker go at once (``workers_disconnected``).
* **Leases.** A commit is accepted only against a lease its worker holds; without one it gets
  ``ErrorReply(code="no_lease")`` (``commits_without_lease``), checked before any tensor is
  decoded — unless it is too stale to count anyway (e.g. its lease was cancelled), which is
  rejected as before. So no peer can move λ past the version window.
* **λ stays finite.** A step whose aggregated gradient, or the λ or optimizer state it would
  produce (an infinite Adam moment would freeze λ), is not finite is refused: λ, its version
  and the optimizer state stay exactly as they were, the buffered hypergradients (and the
  "latest" table) are dropped (``steps_refused``), and the commit that completed the step gets
  ``ErrorReply(code="non_finite")`` saying so instead of an acknowledgement.
* **Durability** (``durable=True``). Every event that changes what must survive a restart
  leaves a journal record (:meth:`drain_records`; :class:`~chronos.distributed.journal.Record`
  kinds ``commit`` (with the decoded hypergradient), ``step`` (with the aggregated gradient
  the step applied), ``lease`` / ``unlease``, ``left``, ``bind``, ``discard``, ``reset``,
  ``unsee``). A state
  rebuilt with :meth:`restore` from a :meth:`durable_state` snapshot and the records written
  after it has the same version, λ, optimizer state, buffered commits, remembered commit ids
  and ledger, bit for bit (a step is replayed by applying the logged gradient with the same
  optimizer). Stale-correction histories are not journaled: they start empty after a
  restore. Deregister is acknowledged with a ``HeartbeatAck`` carrying its request id.
* **Bad input** (unknown or mismatched worker id, a version never issued or not matching the
  worker's lease, wrong keys/shapes/dtypes, NaN/Inf, coordinator-bound ops of the wrong
  direction): an :class:`ErrorReply` with its code, an error counter, and no other change.
  Worker and commit ids longer than :data:`MAX_ID_CHARS` are ``malformed``. Nothing a remote
  peer sends makes :meth:`handle` raise.
* **max_steps.** After that many steps the job is done: every registered worker gets a
  :class:`ShutdownNotice` (carrying the request id of its deferred checkout if it had one, else
  ``-1``); afterwards Checkout / Commit / Heartbeat are answered with a ShutdownNotice, Register
  with ``ErrorReply(code="shutting_down")``; Deregister still works.

Example:
    >>> import torch
    >>> from chronos.distributed.messages import Checkout, Commit, Register
    >>> st = CoordinatorState({"lam": torch.tensor([1.0], dtype=torch.float64)},
    ...                       CoordinatorConfig(optimizer="sgd", outer_lr=0.1, max_in_flight=1))
    >>> for w in ("a", "b"):
    ...     _ = st.handle(w, Register(request_id=0, worker_id=w), now=0.0)
    ...     print(st.handle(w, Checkout(request_id=1, worker_id=w), now=0.0)[0].message.status)
    granted
    granted
    >>> g = {"lam": torch.tensor([2.0], dtype=torch.float64)}
    >>> r = st.handle("a", Commit(request_id=2, worker_id="a", version=0, commit_id="a2",
    ...                           hypergradient=g), now=1.0)[0].message
    >>> # "latest": K = 2 live workers (b has no entry yet: zero), 1 of 2 new: c = ½ · ½
    >>> r.status, r.weight, st.version, st.outer_params["lam"].item()      # 1 − 0.1·¼·2
    ('accepted', 1.0, 1, 0.95)
    >>> st.handle("a", Checkout(request_id=3, worker_id="a"), now=1.0)[0].message.status
    'deferred'
    >>> out = st.handle("b", Commit(request_id=4, worker_id="b", version=0, commit_id="b4",
    ...                             hypergradient=g), now=2.0)
    >>> [(o.to, o.message.op, o.message.request_id) for o in out]   # b's reply, a's grant
    [('b', 'commit_reply', 4), ('a', 'checkout_reply', 3)]
    >>> out[0].message.weight, round(st.outer_params["lam"].item(), 12)  # 0.95 − 0.1·¼·(2 + 2)
    (1.0, 0.85)
    >>> {w: r["share"] for w, r in st.stats()["workers"].items()}   # steps {a: ¼}, {a: ¼, b: ¼}
    {'a': 0.6666666666666666, 'b': 0.3333333333333333}
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from chronos.communication.codecs import Codec, parse_codec
from chronos.communication.feedback import decode_dict, encode_dict
from chronos.core import tensordict as td
from chronos.core.errors import (
    ChronosError,
    ChronosTypeError,
    ConfigError,
    UnknownWorkerError,
    VersionError,
)
from chronos.core.metastate import MetaState
from chronos.core.tensordict import TensorDict
from chronos.core.versioning import BoundedVersionQueue, CommitDecision, Lease
from chronos.distributed.aggregation import (
    CoordinatorConfig,
    add_commit,
    aggregate_from_state,
    aggregate_gradient,
    aggregate_metrics,
    aggregate_state,
    build_outer_optimizer,
    check_hypergradient,
    effective_min_commits,
    empty_aggregate,
    is_int,
    sync_barrier_ready,
)
from chronos.distributed.correction import StaleCorrector
from chronos.distributed.journal import Record
from chronos.distributed.latest import LatestEntry, LatestGradients
from chronos.distributed.ledger import WorkerLedger
from chronos.distributed.messages import (
    MAX_ID_CHARS,
    Checkout,
    CheckoutReply,
    Commit,
    CommitReply,
    CommitStatus,
    Deregister,
    ErrorCode,
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    LeaseCancelled,
    Message,
    Register,
    Registered,
    ShutdownNotice,
)
from chronos.distributed.protocol import apply_delta, checksum

__all__ = [
    "DEFAULT_MAX_DELTA_LAG", "MAX_ID_CHARS", "CoordinatorConfig", "CoordinatorState", "Outgoing",
]

DEFAULT_MAX_DELTA_LAG = 8
"""A worker more than this many versions behind gets a full λ instead of a delta."""

_INBOUND = (Register, Checkout, Commit, Heartbeat, Deregister)


@dataclass(frozen=True)
class Outgoing:
    """An instruction for the socket loop: send ``message`` to worker ``to``."""

    to: str
    message: Message


@dataclass(frozen=True)
class _Pending:
    """A deferred checkout waiting to be answered."""

    request_id: int
    have_version: int


_COUNTERS = (
    "steps registrations deregistrations workers_expired leases_expired heartbeats checkouts "
    "checkouts_granted checkouts_not_modified checkouts_deferred deferred_granted "
    "checkouts_superseded commits_accepted commits_rejected commits_duplicate leases_cancelled "
    "errors checkouts_full checkouts_delta checkout_resyncs hypergradients_accepted "
    "commits_corrected registrations_superseded impersonations commits_without_lease "
    "workers_disconnected steps_refused leases_restored"
).split()


def _finite_tree(x: Any) -> bool:
    """Whether every floating tensor in a nested optimizer state is finite."""
    if isinstance(x, Tensor):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())
    if isinstance(x, Mapping):
        return all(_finite_tree(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_finite_tree(v) for v in x)
    return True


class CoordinatorState:
    """The coordinator as a pure state machine (see the module docstring for every rule).

    Args:
        outer_params: λ as tensors or numbers (copied; floating dtypes only).
        config: a :class:`CoordinatorConfig` (default: ``CoordinatorConfig()``).
        codecs: the codec specs workers may register with (``None``: every spec
            :func:`~chronos.communication.codecs.parse_codec` accepts); compared in canonical
            form, so ``"topk:0.10"`` allows ``"topk:0.1"``. ``"identity"`` is always allowed.
        max_delta_lag: the most versions a delta checkout may bridge (>= 1); further behind, a
            worker gets a full λ.
    """

    def __init__(
        self,
        outer_params: Mapping[str, Tensor | float],
        config: CoordinatorConfig | None = None,
        *,
        codecs: Iterable[str] | None = None,
        max_delta_lag: int = DEFAULT_MAX_DELTA_LAG,
        durable: bool = False,
        key_names: Mapping[str, str] | None = None,
    ) -> None:
        config = CoordinatorConfig() if config is None else config
        if not isinstance(config, CoordinatorConfig):
            raise ChronosTypeError(
                f"config must be a CoordinatorConfig, got {type(config).__name__}"
            )
        self.config = config
        if isinstance(codecs, str):
            raise ConfigError(f"codecs must be a list of codec specs, got the str {codecs!r}")
        self._allowed_codecs: frozenset[str] | None = (
            None if codecs is None
            else frozenset({"identity", *(parse_codec(c).spec for c in codecs)})
        )
        if not is_int(max_delta_lag) or max_delta_lag < 1:
            raise ConfigError(f"max_delta_lag must be an int >= 1, got {max_delta_lag!r}")
        self.max_delta_lag = max_delta_lag
        self._optimizer_spec, self._lr = config.outer_optimizer()
        self._plain_sgd = self._optimizer_spec == "sgd"
        self._meta = MetaState(outer_params)
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._errors_by_code: dict[str, int] = {}
        self._accepted_by_staleness: dict[int, int] = {}
        # (worker id, commit id) -> (staleness, weight) of accepted commits (idempotence)
        self._seen: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self._done = False
        self._now = -math.inf
        self._durable = bool(durable)
        self._records: list[Record] = []  # journal records not drained yet (durable only)
        # CURVE key -> the worker id it may register (its key file's name), and worker id ->
        # the key that registered it first (bindings outlive registrations)
        self._key_names: dict[str, str] = dict(key_names or {})
        self._keys: dict[str, str] = {}
        self._orphans: dict[str, int] = {}  # worker -> version it held a lease on (restored)
        self._sender, self._principal = "", None  # type: tuple[str, str | None]
        self._refused: str | None = None
        self._reset_runtime()

    # -- construction helpers ---------------------------------------------------------------

    def _reset_runtime(self) -> None:
        """(Re)build leaves, optimizer and queue from the MetaState; forget workers."""
        bad = [k for k, v in self._meta.outer_params.items() if not v.is_floating_point()]
        if bad:
            raise ConfigError(
                f"outer params {bad} are not floating point; give float tensors or Python floats"
            )
        self._leaves: TensorDict = {
            k: v.detach().clone().requires_grad_(True) for k, v in self._meta.outer_params.items()
        }
        self._optimizer = build_outer_optimizer(
            self._optimizer_spec, list(self._leaves.values()), self._lr, names=list(self._leaves)
        )
        sync = self.config.mode == "sync"
        self._queue = BoundedVersionQueue(
            max_in_flight=sys.maxsize if sync else self.config.max_in_flight,
            max_staleness=0 if sync else self.config.max_staleness,
            decay=self.config.decay,
            lease_timeout=self.config.lease_timeout,
            version=self._meta.version,
        )
        self._workers: dict[str, float] = {}  # worker id -> last seen
        self._conn: dict[str, str] = {}  # worker id -> the connection that registered it
        self._wid_of: dict[str, str] = {}  # connection -> worker id
        # a lower bound on the earliest worker / lease expiry: nothing can expire before it, so
        # handle() and tick() skip the sweep until then (see _sweep)
        self._next_expiry = math.inf
        self._pending: dict[str, _Pending] = {}
        self._lease_rids: dict[str, int] = {}  # worker id -> request id of its granting checkout
        # worker id -> (request id, info, codec) of the Register that registered it
        self._registered_by: dict[str, tuple[int, dict[str, Any], str]] = {}
        self._codecs: dict[str, Codec] = {}  # worker id -> its codec (non-identity only)
        # worker id -> (version, copy_w): what a delta-checkout worker holds (module docstring)
        self._copies: dict[str, tuple[int, TensorDict]] = {}
        self._agg = empty_aggregate()
        self._committed: dict[str, None] = {}  # sync: workers whose commit on V is in
        # async "latest": each live worker's latest hypergradient (chronos.distributed.latest)
        self._latest_mode = not sync and self.config.aggregation == "latest"
        self._latest = LatestGradients()
        # worker -> Σ weights of its commits in the buffered aggregate (for the ledger)
        self._step_weights: dict[str, float] = {}
        self._ledger = WorkerLedger()
        self._corrector: StaleCorrector | None = None
        if self.config.stale_correction and not sync:
            # "latest" entries can age by up to about two staleness bounds before replaced
            keep = self.config.max_staleness * (2 if self._latest_mode else 1) + 1
            self._corrector = StaleCorrector(keep)
            self._corrector.record_version(self._meta.version, self._meta.outer_params)
        self._started = False  # sync: num_workers were alive together at some point

    # -- views ------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The current version of λ (== number of outer steps taken)."""
        return self._meta.version

    @property
    def outer_params(self) -> TensorDict:
        """A detached copy of the current λ."""
        return td.clone(self._meta.outer_params)

    @property
    def done(self) -> bool:
        """True once ``max_steps`` outer steps were taken."""
        return self._done

    @property
    def workers(self) -> tuple[str, ...]:
        """Ids of the registered, alive workers (as of the last event), in registration order."""
        return tuple(self._workers)

    def worker_of(self, identity: str) -> str | None:
        """The worker registered from connection ``identity``, if any."""
        return self._wid_of.get(identity)

    @property
    def connections(self) -> dict[str, str]:
        """Registered workers' connections: worker id → connection identity."""
        return dict(self._conn)

    @property
    def pending_checkouts(self) -> dict[str, int]:
        """Deferred checkouts not answered yet: worker id → request id."""
        return {w: p.request_id for w, p in self._pending.items()}

    @property
    def leases(self) -> Mapping[str, Lease]:
        """Current leases by worker id (see :class:`~chronos.core.versioning.Lease`)."""
        return self._queue.leases

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-step records: version, mean worker metrics, ``commits``, ``weight_sum``,
        ``mean_staleness``."""
        return [dict(h) for h in self._meta.history]

    def stats(self) -> dict[str, Any]:
        """Counters and gauges as of the last event: ``version``, ``steps``, ``done``, ``mode``;
        ``commits_accepted`` / ``_rejected`` / ``_duplicate`` and ``accepted_by_staleness``
        (staleness → count); ``checkouts`` (handled), ``checkouts_granted`` (incl.
        ``checkouts_not_modified``), ``checkouts_deferred``, ``deferred_granted`` (deferred ones
        answered later), ``checkouts_superseded``, ``deferred_pending``; ``errors`` and
        ``errors_by_code``; ``registrations``, ``deregistrations``, ``workers_expired``,
        ``leases_expired``, ``leases_cancelled`` (too stale to be accepted; worker told),
        ``heartbeats``, ``workers_alive``, ``leases``, ``buffered_commits`` (accepted, waiting
        for the next step) and ``min_commits`` (commits the next async step needs now);
        ``checkouts_full`` / ``checkouts_delta`` (granted with tensors, to workers with a
        non-identity codec), ``checkout_resyncs``, ``hypergradients_accepted`` (Σ
        ``Commit.updates`` over accepted commits), ``worker_codecs`` (worker → codec spec, for
        non-identity codecs) and ``delta_copies`` (λ copies kept for delta checkouts);
        ``aggregation`` (``"latest"``, ``"buffered"`` or ``"sync"``), ``latest_entries`` /
        ``latest_bytes`` (the "latest" table) and ``workers``: per worker (also those that
        left), ``accepted``, ``rejected``, ``cancelled``, ``weight_sum``, ``contribution``,
        ``share`` (of the outer updates), ``steps``, ``last_version``, ``alive`` and
        ``entry_age`` (:class:`~chronos.distributed.ledger.WorkerLedger`)."""
        return {
            "mode": self.config.mode,
            "version": self.version,
            "done": self._done,
            **self._counters,
            "errors_by_code": dict(self._errors_by_code),
            "accepted_by_staleness": dict(sorted(self._accepted_by_staleness.items())),
            "workers_alive": len(self._workers),
            "deferred_pending": len(self._pending),
            "buffered_commits": self._agg.count,
            "leases": len(self._queue.leases),
            "min_commits": self._min_commits(),
            "worker_codecs": {w: c.spec for w, c in self._codecs.items()},
            "delta_copies": len(self._copies),
            "aggregation": "latest" if self._latest_mode else (
                "sync" if self.config.mode == "sync" else "buffered"),
            "latest_entries": len(self._latest),
            "latest_bytes": self._latest.nbytes(),
            "workers": self._worker_summary(),
        }

    def _worker_summary(self) -> dict[str, dict[str, Any]]:
        """The ledger's per-worker figures plus ``entry_age``: how many versions old the
        worker's "latest" entry is (``None``: no entry)."""
        ages = self._latest.ages(self.version)
        out = self._ledger.summary()
        for wid, rec in out.items():
            rec["entry_age"] = ages.get(wid)
        return out

    # -- events -----------------------------------------------------------------------------

    def handle(
        self, identity: str, msg: Message, now: float, *, owned: bool = False,
        principal: str | None = None,
    ) -> list[Outgoing]:
        """Handle one message from connection ``identity`` at time ``now``; return what to send.

        Does what :meth:`tick` would do at ``now`` first (its messages come first). Never raises
        for anything in ``msg``; raises :class:`ChronosTypeError` only for a non-finite ``now``.
        Replies go to ``identity``; messages to other workers to the connections that
        registered them (:attr:`connections`). ``principal`` is the sender's authenticated
        CURVE public key, if any (see "Ownership" in the module docstring).

        ``owned=True`` hands ``msg``'s tensors over to the state machine (nobody else holds
        them, e.g. they were just decoded from the wire): it may then keep them and reuse their
        memory (a commit's hypergradient becomes the next λ in place) instead of copying. Leave
        it ``False`` for tensors the caller still uses: they are then never written to.
        """
        now = self._clock(now)
        out = self._sweep(now) if now >= self._next_expiry else []
        self._sender, self._principal = identity, principal
        out.extend(self._dispatch(identity, msg, now, owned))
        out.extend(self._after_change(now))  # e.g. a re-checkout dropped a window-holding lease
        return out

    def tick(self, now: float) -> list[Outgoing]:
        """Time passes: expire silent workers and leases, then grant deferred checkouts (async)
        or release a sync barrier that no live worker can complete any more."""
        now = self._clock(now)
        return self._sweep(now) if now >= self._next_expiry else []

    def disconnected(self, identity: str, now: float) -> list[Outgoing]:
        """The connection ``identity`` is gone (the peer closed it, died, or stopped answering
        transport heartbeats): the worker it registered leaves at once, with its lease and
        deferred checkout, instead of after ``lease_timeout``. Unknown connections: nothing."""
        now = self._clock(now)
        out = self._sweep(now) if now >= self._next_expiry else []
        wid = self._wid_of.get(identity)
        if wid is None:
            return out
        self._counters["workers_disconnected"] += 1
        self._forget(wid)
        out.extend(self._after_change(now))
        return out

    def _journal(self, kind: str, meta: dict[str, Any],
                 tensors: Mapping[str, Tensor] | None = None) -> None:
        if self._durable:
            self._records.append(Record(kind, meta, dict(tensors or {})))

    def drain_records(self) -> list[Record]:
        """The journal records of the events handled since the last call (``durable=True``),
        oldest first: write them to the log (:class:`~chronos.distributed.journal.Journal`)
        before sending the replies of those events."""
        out, self._records = self._records, []
        return out

    def _clock(self, now: float) -> float:
        if type(now) is not float:  # the loop passes floats: check the rest only here
            if isinstance(now, bool) or not isinstance(now, (int, float)):
                raise ChronosTypeError(f"now must be a finite number of seconds, got {now!r}")
            now = float(now)
        if not math.isfinite(now):
            raise ChronosTypeError(f"now must be a finite number of seconds, got {now!r}")
        if now > self._now:
            self._now = now
        return self._now

    def _dispatch(self, identity: str, msg: Message, now: float, owned: bool) -> list[Outgoing]:
        rid = getattr(msg, "request_id", -1)
        rid = rid if is_int(rid) else -1
        if not isinstance(msg, _INBOUND):
            op = getattr(msg, "op", type(msg).__name__)
            accepted = [c.op for c in _INBOUND]
            return self._error(rid, "unknown_op", f"accepted: {accepted}, got {op!r}")
        wid = msg.worker_id
        if not isinstance(wid, str) or not wid or len(wid) > MAX_ID_CHARS:
            why = f"worker_id must be a non-empty str of at most {MAX_ID_CHARS} characters"
            return self._error(rid, "malformed", f"{why}, got {repr(wid)[:80]}")
        if isinstance(msg, Register):
            return self._on_register(msg, rid, now, identity)
        owner = self._conn.get(wid)
        if owner is None:
            why = (
                f"worker {wid!r} is not registered (never registered, deregistered, or expired "
                f"after {self.config.lease_timeout}s without a message); send Register first"
            )
            return self._error(rid, "unknown_worker", why)
        if owner != identity:
            why = (
                f"worker {wid!r} is registered from another connection; a worker id belongs to "
                "the connection (and CURVE key) that registered it: speak only for yourself"
            )
            return self._not_owner(rid, why)
        if isinstance(msg, Deregister):  # acknowledged (a HeartbeatAck with its request id)
            self._forget(wid)
            self._counters["deregistrations"] += 1
            return [Outgoing(identity, HeartbeatAck(request_id=rid, version=self.version))]
        if self._done:
            notice = ShutdownNotice(request_id=rid, reason=self._done_reason())
            return [Outgoing(self._conn[wid], notice)]
        if isinstance(msg, Heartbeat):
            self._touch(wid, now)
            self._counters["heartbeats"] += 1
            return [Outgoing(self._conn[wid], HeartbeatAck(request_id=rid, version=self.version))]
        if isinstance(msg, Checkout):
            return self._on_checkout(msg, rid, now)
        return self._on_commit(msg, rid, now, owned)

    def _on_register(self, msg: Register, rid: int, now: float, conn: str) -> list[Outgoing]:
        wid = msg.worker_id
        if self._done:
            return self._error(rid, "shutting_down", self._done_reason())
        key = self._principal
        if key is not None and self._key_names.get(key, wid) != wid:
            why = (f"this CURVE key belongs to worker {self._key_names[key]!r}, not {wid!r}; "
                   "register with the worker id its key file is named after")
            return self._not_owner(rid, why)
        bound = self._keys.get(wid)
        if bound is not None and key != bound:
            why = (f"worker id {wid!r} is bound to another CURVE key (the one that first "
                   "registered it); register with that worker's key, or use another id")
            return self._not_owner(rid, why)
        other = self._wid_of.get(conn)
        if other is not None and other != wid:
            why = (f"this connection already registered worker {other!r}; one connection "
                   "serves one worker (Deregister it first, or connect another socket)")
            return self._not_owner(rid, why)
        spec = msg.codec
        owner = self._conn.get(wid)
        if owner == conn and self._registered_by.get(wid) == (rid, msg.info, spec):
            # a re-sent copy of the Register that registered this worker (its reply was slow
            # or lost): answer it again instead of calling the worker its own duplicate
            self._touch(wid, now)
            return [Outgoing(conn, self._registered(wid, rid))]
        if owner is not None:
            if key is None or owner == conn:
                why = (
                    f"worker id {wid!r} is already registered and alive; pick another id, or "
                    "Deregister first (an expired, deregistered or disconnected id may "
                    "register again)"
                )
                return self._error(rid, "duplicate_worker", why)
            # the same key on a new connection: a restart of that worker supersedes the old
            # registration (its lease and deferred checkout go with it)
            self._counters["registrations_superseded"] += 1
            self._forget(wid)
        codec = self._parse_worker_codec(spec)
        if isinstance(codec, str):
            return self._error(rid, "unsupported_codec", codec)
        if key is not None and bound is None:
            self._keys[wid] = key
            self._journal("bind", {"w": wid, "k": key})
        self._conn[wid] = conn
        self._wid_of[conn] = wid
        self._workers[wid] = now
        self._registered_by[wid] = (rid, dict(msg.info), spec)
        self._copies.pop(wid, None)
        if codec.spec == "identity":
            self._codecs.pop(wid, None)
        else:
            self._codecs[wid] = codec
        self._next_expiry = min(self._next_expiry, now + self.config.lease_timeout)
        self._counters["registrations"] += 1
        self._ledger.joined(wid)
        if self.config.num_workers is not None and len(self._workers) >= self.config.num_workers:
            self._started = True
        restored = self._orphans.pop(wid, None)
        if restored is not None and restored <= self.version:
            # a lease this worker held when the coordinator went down (restored from its state
            # directory): its in-flight commit is judged by the usual staleness rules
            self._queue.restore_lease(wid, restored, now)
            self._counters["leases_restored"] += 1
        return [Outgoing(conn, self._registered(wid, rid))]

    def _parse_worker_codec(self, spec: object) -> Codec | str:
        """The codec a Register names, or why it is refused (a str)."""
        if not isinstance(spec, str):
            return f"codec must be a codec spec str, got {spec!r}"
        try:
            codec = parse_codec(spec)
        except ChronosError as e:
            return f"codec {spec!r} is not a valid codec spec: {e}"
        allowed = self._allowed_codecs
        if allowed is not None and codec.spec not in allowed:
            return (
                f"codec {codec.spec!r} is not accepted by this coordinator (accepted: "
                f"{', '.join(sorted(allowed))}); register with one of those"
            )
        return codec

    def _registered(self, wid: str, rid: int) -> Registered:
        return Registered(
            request_id=rid,
            worker_id=wid,
            version=self.version,
            config=dict(self.config.worker_config()),
        )

    def _on_checkout(self, msg: Checkout, rid: int, now: float) -> list[Outgoing]:
        wid, have = msg.worker_id, msg.have_version
        if not is_int(have):
            return self._error(rid, "malformed", f"have_version must be an int, got {have!r}")
        self._touch(wid, now)
        self._counters["checkouts"] += 1
        if msg.resync is True:
            self._counters["checkout_resyncs"] += 1
        if self._pending.pop(wid, None) is not None:
            self._counters["checkouts_superseded"] += 1
        if self.config.mode == "sync" and wid in self._committed:
            reason = (
                f"sync barrier: worker already committed version {self.version}; "
                f"{len(self._committed)} of {self.config.num_workers} commits in"
            )
        else:
            decision = self._queue.checkout(wid, now)
            if decision.granted:
                return [self._grant(wid, rid, have)]
            reason = decision.reason
        self._pending[wid] = _Pending(rid, have)
        self._counters["checkouts_deferred"] += 1
        reply = CheckoutReply(
            request_id=rid, status="deferred", version=self.version, reason=reason
        )
        return [Outgoing(self._conn[wid], reply)]

    def _on_commit(self, msg: Commit, rid: int, now: float, owned: bool) -> list[Outgoing]:
        wid, cid = msg.worker_id, msg.commit_id
        if not isinstance(cid, str) or not cid or len(cid) > MAX_ID_CHARS:
            why = f"commit_id must be a non-empty str of at most {MAX_ID_CHARS} characters"
            return self._error(rid, "malformed", f"{why}, got {repr(cid)[:80]}")
        seen = self._seen.get((wid, cid))
        if seen is not None:
            self._touch(wid, now)
            self._seen.move_to_end((wid, cid))
            self._counters["commits_duplicate"] += 1
            decision = CommitDecision(True, seen[0], seen[1], "already applied; not applied again")
            return [self._commit_reply(wid, rid, cid, "duplicate", decision)]
        updates = msg.updates
        if not is_int(updates) or updates < 1:
            return self._error(rid, "malformed", f"updates must be an int >= 1, got "
                               f"{updates!r}")
        version = msg.version
        if self._queue.lease_of(wid) is None and wid not in self._committed:
            # cheap, before any tensor is decoded: only a lease the worker holds can be
            # committed; a commit too stale to count anyway (a cancelled lease) is rejected
            stale = is_int(version) and 0 <= version <= self.version and (
                self.version - version > self._queue.max_staleness)
            if not stale:
                self._counters["commits_without_lease"] += 1
                return self._error(rid, "no_lease", (
                    f"worker {wid!r} holds no lease on version {version!r}: commit only what "
                    "you checked out (a lease ends with its commit, when it is cancelled, or "
                    "when its worker disconnects); check out again"))
        grad = self._decode_commit(wid, msg)
        if isinstance(grad, tuple):
            return self._error(rid, grad[0], grad[1])
        problem = check_hypergradient(self._meta.outer_params, grad)
        if problem is not None:
            return self._error(rid, problem[0], problem[1])
        try:
            decision = self._queue.commit(wid, version, now)  # ends the worker's lease
        except VersionError as e:
            return self._error(rid, "bad_version", str(e))
        self._touch(wid, now)
        if decision.accepted and wid in self._committed:
            why = f"sync mode: already committed version {self.version}; wait for the barrier"
            decision = CommitDecision(accepted=False, staleness=0, weight=0.0, reason=why)
        after: list[Outgoing] = []
        if not decision.accepted:
            self._counters["commits_rejected"] += 1
            self._ledger.rejected(wid)
            self._journal("unlease", {"w": wid})
        else:
            metrics = msg.metrics if isinstance(msg.metrics, Mapping) else None
            loss = 0.0
            if self._corrector is not None and metrics is not None:
                raw = metrics.get("outer_loss")
                loss = float(raw) if isinstance(raw, (int, float)) else 0.0
            if self._corrector is not None and self._latest_mode:
                self._corrector.observe(wid, version, grad, loss)
            elif self._corrector is not None:
                grad, corrected = self._corrector.correct(
                    wid, version, decision.staleness, grad, loss)
                if corrected:  # an estimate at the current λ: full weight (module docstring)
                    self._counters["commits_corrected"] += 1
                    decision = dataclasses.replace(
                        decision, weight=1.0, reason="accepted, corrected to the current λ"
                    )
            decision = self._admit(wid, cid, version, decision, grad, updates, metrics, owned)
            if self.config.mode == "async" and self._agg.count >= self._min_commits():
                after = self._step()
                if self._refused is not None:
                    # the step this commit completed would have made λ non-finite: nothing
                    # applied, the buffered commits dropped; say so instead of "accepted"
                    self._seen.pop((wid, cid), None)
                    self._journal("unsee", {"w": wid, "c": cid})
                    return [*self._error(rid, "non_finite", self._refused), *after]
        after.extend(self._after_change(now))
        status: CommitStatus = "accepted" if decision.accepted else "rejected"
        return [self._commit_reply(wid, rid, cid, status, decision), *after]

    def _admit(
        self, wid: str, cid: str, version: int, decision: CommitDecision, grad: TensorDict,
        updates: int, metrics: Mapping[str, Any] | None, owned: bool,
    ) -> CommitDecision:
        """Take an accepted commit into the aggregate ("buffered", sync) or the worker's
        "latest" entry (weight 1), remember its id, count it and journal it. Shared by live
        commits and the replay of a state directory's log. Returns the decision to reply with."""
        if self._durable:
            self._journal("commit", {
                "w": wid, "c": cid, "v": version, "s": decision.staleness,
                "wt": decision.weight, "u": updates, "m": None if metrics is None else
                dict(metrics)}, td.clone(grad))
        if self._latest_mode:
            self._latest.put(wid, grad, version, updates=updates, take=owned)
            decision = dataclasses.replace(
                decision, weight=1.0,
                reason="accepted as the worker's latest hypergradient (aggregation 'latest')",
            )
            self._agg = add_commit(self._agg, {}, decision.staleness, 1.0, metrics)
        else:
            # take=owned: a fresh commit's tensors then need no copy
            self._agg = add_commit(
                self._agg, grad, decision.staleness, decision.weight, metrics, take=owned)
            self._step_weights[wid] = self._step_weights.get(wid, 0.0) + decision.weight
            if self.config.mode == "sync":
                self._committed[wid] = None
        self._remember(wid, cid, decision)
        self._counters["commits_accepted"] += 1
        self._counters["hypergradients_accepted"] += updates
        s = decision.staleness
        self._accepted_by_staleness[s] = self._accepted_by_staleness.get(s, 0) + 1
        self._ledger.accepted(wid, version, decision.weight)
        return decision

    def _decode_commit(self, wid: str, msg: Commit) -> TensorDict | tuple[ErrorCode, str]:
        """The λ-shaped hypergradient of ``msg`` (decoded with the worker's codec), or the
        error to reply with: a codec other than the registered one, or parts that do not
        decode against λ's shapes and dtypes."""
        codec = self._codecs.get(wid)
        spec = "identity" if codec is None else codec.spec
        said = msg.codec
        if said != spec:
            try:
                same = isinstance(said, str) and parse_codec(said).spec == spec
            except ChronosError:
                same = False
            if not same:
                return "codec_mismatch", (
                    f"commit encoded with codec {said!r}, but worker {wid!r} registered codec "
                    f"{spec!r}; encode commits with the registered codec (or register again)"
                )
        if codec is None:
            return msg.hypergradient
        parts = msg.hypergradient
        if not isinstance(parts, Mapping):
            return "bad_tensor", f"hypergradient must be a dict of tensors, got {type(parts)}"
        try:
            return decode_dict(codec, dict(parts), self._meta.outer_params)
        except Exception as e:  # ChronosError for malformed parts; anything else is one too
            return "bad_tensor", (
                f"cannot decode the {spec!r}-encoded hypergradient against the outer params "
                f"(keys {sorted(self._meta.outer_params)}): {type(e).__name__}: {e}"
            )[:1000]

    # -- internals --------------------------------------------------------------------------

    def _not_owner(self, rid: int, why: str) -> list[Outgoing]:
        """Refuse a message that speaks for a worker id (or key) the sender does not own."""
        self._counters["impersonations"] += 1
        return self._error(rid, "not_owner", why)

    def _error(self, rid: int, code: ErrorCode, message: str) -> list[Outgoing]:
        """An error reply to the connection the message being handled came from."""
        self._counters["errors"] += 1
        self._errors_by_code[code] = self._errors_by_code.get(code, 0) + 1
        return [Outgoing(self._sender, ErrorReply(request_id=rid, code=code, message=message))]

    def _commit_reply(
        self, wid: str, rid: int, cid: str, status: CommitStatus, decision: CommitDecision
    ) -> Outgoing:
        reply = CommitReply(
            request_id=rid,
            commit_id=cid,
            status=status,
            staleness=decision.staleness,
            weight=decision.weight,
            version=self.version,
            reason=decision.reason,
        )
        return Outgoing(self._conn[wid], reply)

    def _min_commits(self) -> int:
        """Commits the next async step needs (``min_commits``, resolved for ``"auto"``)."""
        return effective_min_commits(self.config.min_commits, len(self._workers))

    def _touch(self, wid: str, now: float) -> None:
        """The worker is alive at ``now``: renew its liveness and its lease."""
        self._workers[wid] = now
        self._queue.heartbeat(wid, now)

    def _remember(self, wid: str, cid: str, decision: CommitDecision) -> None:
        self._seen[(wid, cid)] = (decision.staleness, decision.weight)
        while len(self._seen) > self.config.dedupe_window:
            self._seen.popitem(last=False)

    def _forget(self, wid: str) -> None:
        """Drop a worker with its lease and deferred checkout."""
        self._workers.pop(wid, None)
        conn = self._conn.pop(wid, None)
        if conn is not None:
            self._wid_of.pop(conn, None)
        self._pending.pop(wid, None)
        self._lease_rids.pop(wid, None)
        self._journal("left", {"w": wid})  # its lease and "latest" entry go with it
        self._registered_by.pop(wid, None)
        self._codecs.pop(wid, None)
        self._copies.pop(wid, None)
        if self._corrector is not None:
            self._corrector.forget(wid)
        self._latest.drop(wid)
        self._ledger.left(wid)
        self._drop_from_queue(wid)

    def _drop_from_queue(self, wid: str) -> None:
        try:
            self._queue.release(wid)
        except UnknownWorkerError:
            pass  # held no lease and waited for none

    def _params_for_reply(self) -> TensorDict:
        """λ for a granted checkout: MetaState's copy for this version, shared read-only.

        Every step installs new tensors in the MetaState (see :meth:`_step`), so these are never
        modified in place afterwards: a reply keeps the λ of its version and is safe to send
        zero-copy. Consumers must not modify them.
        """
        return dict(self._meta.outer_params)

    def _grant(self, wid: str, rid: int, have: int) -> Outgoing:
        self._counters["checkouts_granted"] += 1
        self._lease_rids[wid] = rid
        self._journal("lease", {"w": wid, "v": self.version})
        if have == self.version:
            self._counters["checkouts_not_modified"] += 1
            reply = CheckoutReply(request_id=rid, status="not_modified", version=self.version)
        else:
            reply = self._granted_reply(wid, rid, have)
        return Outgoing(self._conn[wid], reply)

    def _granted_reply(self, wid: str, rid: int, have: int) -> CheckoutReply:
        """λ in full, or (a worker with a lossy codec whose copy we know) a coded delta; see
        "Delta checkouts" in the module docstring."""
        version = self.version
        codec = self._codecs.get(wid)
        if codec is not None:
            record = self._copies.get(wid)
            if record is not None and have >= 0 and record[0] == have and (
                0 < version - have <= self.max_delta_lag
            ):
                lam = self._meta.outer_params
                base = record[1]
                try:
                    parts = encode_dict(codec, {k: torch.sub(v, base[k]) for k, v in lam.items()})
                    held = apply_delta(base, decode_dict(codec, parts, lam))
                except ChronosError:  # cannot code this delta (e.g. non-finite): send it all
                    pass
                else:
                    self._copies[wid] = (version, held)
                    self._counters["checkouts_delta"] += 1
                    return CheckoutReply(
                        request_id=rid,
                        status="granted",
                        version=version,
                        outer_params=parts,
                        kind="delta",
                        base_version=have,
                        checksum=checksum(held),
                    )
            self._copies[wid] = (version, self._params_for_reply())
            self._counters["checkouts_full"] += 1
        return CheckoutReply(
            request_id=rid,
            status="granted",
            version=version,
            outer_params=self._params_for_reply(),
        )

    def _sweep(self, now: float) -> list[Outgoing]:
        """Expire workers silent for ``lease_timeout`` and stray leases; then re-decide.

        Afterwards ``_next_expiry`` is the earliest deadline left. Deadlines only ever move
        later (a message renews its worker and lease), and every new one is ``now +
        lease_timeout`` with ``now`` never running backwards, so it stays a valid lower bound
        as long as registrations (the only way to add a deadline when there are none) lower it.
        Until then nothing can expire, every event already ended with :meth:`_after_change`,
        and a sweep would change nothing: :meth:`handle` and :meth:`tick` skip it.
        """
        timeout = self.config.lease_timeout
        expired = [w for w, seen in self._workers.items() if seen + timeout <= now]
        held = self._queue.leases
        for w in expired:
            self._counters["leases_expired"] += int(w in held)
            self._counters["workers_expired"] += 1
            self._forget(w)
        self._counters["leases_expired"] += len(self._queue.expire(now))
        self._next_expiry = min(
            min(self._workers.values(), default=math.inf) + timeout,
            min((lease.expires_at for lease in self._queue.leases.values()), default=math.inf),
        )
        return self._after_change(now)

    def _after_change(self, now: float) -> list[Outgoing]:
        """Answer what a freed window / completed barrier now allows."""
        if self._done:
            return []
        out: list[Outgoing] = []
        if self.config.mode == "async":
            if self._agg.count and self._agg.count >= self._min_commits():
                out.extend(self._step())  # workers left: "auto" now needs fewer commits
                if self._done:
                    return out
            for wid, _version in self._queue.grant_deferred(now):
                pending = self._pending.pop(wid, None)
                if pending is None:  # nobody to tell: do not let a phantom lease hold the window
                    self._drop_from_queue(wid)
                    continue
                self._counters["deferred_granted"] += 1
                out.append(self._grant(wid, pending.request_id, pending.have_version))
            return out
        assert self.config.num_workers is not None  # validated for sync mode
        if not sync_barrier_ready(
            self._committed.keys(), self._workers.keys(), self.config.num_workers, self._started
        ):
            return out
        out.extend(self._step())
        if not self._done:
            waiting, self._pending = self._pending, {}
            for wid, pending in waiting.items():
                self._queue.checkout(wid, now)  # sync mode has no window: always granted
                self._counters["deferred_granted"] += 1
                out.append(self._grant(wid, pending.request_id, pending.have_version))
        return out

    def _step(self) -> list[Outgoing]:
        """One outer step with ``(1/n) Σ w_i g_i`` ("buffered", sync) or the mean of the
        latest entries ("latest"); returns shutdown notices if now done. A step that would make
        λ non-finite is refused (see :meth:`_apply_step`): ``self._refused`` then says why."""
        self._refused = None
        if self._latest_mode and not len(self._latest):
            # the commits counted towards this step left with their workers (they committed,
            # then deregistered or disconnected): nothing to average
            self._agg = empty_aggregate()
            self._journal("reset", {})
            return []
        metrics: dict[str, Any] = aggregate_metrics(self._agg)
        if self._latest_mode:
            grad, coefficients = self._latest.mean(
                None if self._corrector is None else self._shift_entry, fresh=self._agg.count,
                workers=len(self._workers),
            )
            ages = self._latest.ages(self.version)
            metrics["entries"] = len(ages)
            metrics["mean_entry_age"] = sum(ages.values()) / len(ages)
        else:
            grad = aggregate_gradient(self._agg)
            n = self._agg.count
            coefficients = {w: x / n for w, x in self._step_weights.items()}
        record = td.clone(grad) if self._durable else None
        if not self._apply_step(grad, coefficients, metrics):
            return self._refuse_step()
        if record is not None:
            self._journal("step", {"v": self.version, "m": metrics, "coef": coefficients}, record)
        if self._corrector is not None:
            self._corrector.record_version(self.version, self._meta.outer_params)
        max_steps = self.config.max_steps
        if max_steps is not None and self._counters["steps"] >= max_steps:
            return self._finish()
        return self._cancel_unreachable_leases() if self.config.mode == "async" else []

    def _apply_step(
        self, grad: TensorDict, coefficients: Mapping[str, float], metrics: dict[str, Any]
    ) -> bool:
        """Apply the outer step with aggregated gradient ``grad`` (its memory may be reused)
        and advance the version; ``False`` (and nothing changed) when ``grad`` or the λ it
        would produce is not finite. Shared by live steps and the replay of a log."""
        if not all(bool(torch.isfinite(g).all()) for g in grad.values()):
            return False
        if self._plain_sgd:
            # λ ← λ − lr·g, the arithmetic of torch.optim.SGD(lr), written into g's memory (the
            # aggregate's own, dropped below; with owned=True a received frame's): the next λ
            # without allocating or copying, while the previous version's tensors (maybe still
            # being sent zero-copy) are never written to. No optimizer call (~15 µs of hooks a
            # step), no optimizer state: the leaves and the optimizer object are not used on
            # this path (they back state_dict()).
            lr = self._lr
            new = {}
            for k, lam in self._meta.outer_params.items():
                g = grad[k].to(device=lam.device, dtype=lam.dtype)
                new[k] = torch.sub(lam, g, alpha=lr, out=g)
            if not all(bool(torch.isfinite(v).all()) for v in new.values()):
                return False  # λ untouched: the candidate lived in g's memory
            self._meta.adopt(new, **metrics)
        else:
            saved = copy.deepcopy(self._optimizer.state_dict())
            for k, leaf in self._leaves.items():
                leaf.grad = grad[k].to(device=leaf.device, dtype=leaf.dtype)
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
            if not (all(bool(torch.isfinite(v).all()) for v in self._leaves.values())
                    and _finite_tree(self._optimizer.state_dict())):
                # a finite λ with an infinite optimizer state (Adam's second moment of a
                # float-max gradient) would freeze λ for good: refused as well
                with torch.no_grad():  # back to the previous λ and optimizer state, exactly
                    for k, leaf in self._leaves.items():
                        leaf.copy_(self._meta.outer_params[k])
                self._optimizer.load_state_dict(saved)
                return False
            self._meta.update(td.detach(self._leaves), **metrics)
        self._ledger.stepped(coefficients)
        self._step_weights = {}
        self._queue.advance()
        self._agg = empty_aggregate()
        self._committed.clear()
        self._counters["steps"] += 1
        return True

    def _refuse_step(self) -> list[Outgoing]:
        """The aggregate would make λ non-finite: drop it (and, "latest", every entry), keep λ
        and its version, count and explain it (the reply to the commit that completed the step
        carries the explanation: :meth:`_on_commit`)."""
        self._counters["steps_refused"] += 1
        self._refused = (
            f"outer step refused at version {self.version}: the aggregated hypergradient (or "
            "the λ it would produce) is not finite; λ is unchanged and the buffered "
            "hypergradients were dropped (are some workers' hypergradients enormous?)"
        )
        self._journal("discard", {})
        self._drop_aggregate()
        return []

    def _drop_aggregate(self) -> None:
        self._agg = empty_aggregate()
        self._step_weights = {}
        self._committed.clear()
        self._latest.clear()

    def _shift_entry(self, wid: str, entry: LatestEntry) -> TensorDict:
        """A "latest" entry corrected from its version to the current one (stale correction)."""
        assert self._corrector is not None
        grad, corrected = self._corrector.shift(wid, entry.version, self.version, entry.grad)
        self._counters["commits_corrected"] += int(corrected)
        return grad

    def _cancel_unreachable_leases(self) -> list[Outgoing]:
        """Drop every lease whose commit could no longer be accepted and tell its worker."""
        version, limit = self.version, self.config.max_staleness
        out = []
        for wid, lease in self._queue.leases.items():
            if version - lease.version <= limit:
                continue
            self._queue.release(wid)
            rid = self._lease_rids.pop(wid, -1)
            self._journal("unlease", {"w": wid})
            self._counters["leases_cancelled"] += 1
            self._ledger.cancelled(wid)
            reason = (
                f"lease on version {lease.version} cancelled: the coordinator is at version "
                f"{version} (staleness {version - lease.version} > max_staleness {limit}), so "
                "its commit would be rejected; abandon the work and check out again"
            )
            msg = LeaseCancelled(
                request_id=rid, version=lease.version, current_version=version, reason=reason
            )
            out.append(Outgoing(self._conn[wid], msg))
        return out

    def _done_reason(self) -> str:
        return f"job done: {self.config.max_steps} outer steps taken (version {self.version})"

    def _finish(self) -> list[Outgoing]:
        self._done = True
        out = []
        for wid in self._workers:
            pending = self._pending.pop(wid, None)
            rid = -1 if pending is None else pending.request_id
            notice = ShutdownNotice(request_id=rid, reason=self._done_reason())
            out.append(Outgoing(self._conn[wid], notice))
        for wid in self._queue.deferred:
            self._drop_from_queue(wid)
        return out

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """λ, version, history, optimizer state, counters, remembered commit ids and the
        per-worker ledger (for ``torch.save``). Workers, leases, deferred checkouts and the
        "latest" table are not saved: after a restore workers register again, and each one's
        entry comes back with its next commit."""
        meta = self._meta.state_dict()
        meta["optimizer_state"] = copy.deepcopy(self._optimizer.state_dict())
        return {
            "meta": meta,
            "done": self._done,
            "counters": dict(self._counters),
            "seen_commits": [[wid, cid, s, w] for (wid, cid), (s, w) in self._seen.items()],
            "aggregate": aggregate_state(self._agg),
            "sync_committed": list(self._committed),
            "step_weights": dict(self._step_weights),
            "ledger": self._ledger.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` output. Workers, leases and deferred checkouts start
        empty (workers register again); commits buffered towards the next step are kept."""
        missing = {"meta", "counters"} - set(state)
        if missing:
            raise ChronosTypeError(
                f"state dict lacks {sorted(missing)}; pass CoordinatorState.state_dict() output"
            )
        self._meta.load_state_dict(state["meta"])
        self._reset_runtime()
        opt_state = state["meta"].get("optimizer_state")
        if opt_state:
            self._optimizer.load_state_dict(copy.deepcopy(opt_state))
        self._counters = dict.fromkeys(_COUNTERS, 0) | {
            k: int(v) for k, v in state["counters"].items() if k in _COUNTERS
        }
        # done is this config's: a job resumed with a larger max_steps goes on
        self._done = self.config.max_steps is not None and self.version >= self.config.max_steps
        self._seen = OrderedDict(  # entries of 3 (an older format): not tied to a worker
            ((str(e[0]), str(e[1])) if len(e) == 4 else ("", str(e[0])),
             (int(e[-2]), float(e[-1])))
            for e in state.get("seen_commits", [])
        )
        if state.get("aggregate") is not None:
            self._agg = aggregate_from_state(state["aggregate"], self._meta.outer_params)
        self._committed = dict.fromkeys(state.get("sync_committed", []))
        self._step_weights = {str(w): float(x) for w, x in state.get("step_weights", {}).items()}
        self._ledger.load_state_dict(state.get("ledger", {}))

    # -- durability (a state directory: chronos.distributed.journal) -------------------------

    def durable_state(self) -> dict[str, Any]:
        """:meth:`state_dict` plus what a restart from a state directory needs besides: the
        "latest" table, the key bindings and the leases held (by worker: version). For
        :meth:`~chronos.distributed.journal.Journal.snapshot`."""
        tree = self.state_dict()
        tree["latest"] = [[w, e.version, dict(e.grad)] for w, e in self._latest.entries.items()]
        tree["keys"] = dict(self._keys)
        tree["leases"] = {**self._orphans,
                          **{w: lease.version for w, lease in self._queue.leases.items()}}
        return tree

    def restore(self, tree: Mapping[str, Any] | None, records: Iterable[Record]) -> int:
        """Restore a snapshot (:meth:`durable_state` output, or ``None``: start from the
        initial λ) and replay the journal records written after it; return how many records
        were replayed. Afterwards version, λ, optimizer state, buffered commits, remembered
        commit ids and ledger are those of the last journaled event; workers register again,
        and a worker that held a lease gets it back when it does (its in-flight commit is then
        judged by the usual rules)."""
        if tree is not None:
            self.load_state_dict(tree)
            for w, v, grad in tree.get("latest", []):
                self._latest.put(str(w), grad, int(v), take=True)
            self._keys = {str(w): str(k) for w, k in tree.get("keys", {}).items()}
            self._orphans = {str(w): int(v) for w, v in tree.get("leases", {}).items()}
        durable, self._durable = self._durable, False  # replayed events are journaled already
        n = 0
        try:
            for r in records:
                self._replay(r)
                n += 1
        finally:
            self._durable = durable
        for w in self._ledger.summary():
            self._ledger.left(w)  # nobody is registered until workers register again
        return n

    def _replay(self, r: Record) -> None:
        m = r.meta
        if r.kind == "commit":
            decision = CommitDecision(True, int(m["s"]), float(m["wt"]), "")
            self._admit(str(m["w"]), str(m["c"]), int(m["v"]), decision, r.tensors,
                        int(m["u"]), m.get("m"), owned=True)
            self._orphans.pop(str(m["w"]), None)
        elif r.kind == "step":
            if not self._apply_step(dict(r.tensors), m["coef"], dict(m["m"])) or (
                    self.version != int(m["v"])):
                raise ChronosError(
                    f"the log's step to version {m['v']} does not replay (at version "
                    f"{self.version}); was the state directory written by another job?")
            if self.config.max_steps is not None and self.version >= self.config.max_steps:
                self._done = True
        elif r.kind == "lease":
            self._orphans[str(m["w"])] = int(m["v"])
        elif r.kind == "unlease":
            self._orphans.pop(str(m["w"]), None)
        elif r.kind == "left":
            self._orphans.pop(str(m["w"]), None)
            self._latest.drop(str(m["w"]))
        elif r.kind == "reset":
            self._agg = empty_aggregate()
        elif r.kind == "bind":
            self._keys[str(m["w"])] = str(m["k"])
        elif r.kind == "discard":
            self._counters["steps_refused"] += 1
            self._drop_aggregate()
        elif r.kind == "unsee":
            self._seen.pop((str(m["w"]), str(m["c"])), None)
        else:
            raise ChronosError(f"unknown journal record kind {r.kind!r} in the state directory")
