"""CURVE key management for authenticated workers: ``chronos keys generate`` and the loaders.

``chronos keys generate DIR [--workers N | --names a,b,c] [--force]`` writes one key set::

    DIR/coordinator.key             the coordinator's public key: give it to every worker
    DIR/coordinator.key_secret      the coordinator's secret key: stays on the coordinator host
    DIR/workers/                    (mode 0o700)
    DIR/workers/<id>.key            a worker's public key: the coordinator admits these
    DIR/workers/<id>.key_secret     its secret key: belongs on that worker's host only

Files are pyzmq's ZPL certificates (plain text, the format of :func:`zmq.auth.create_certificates`
and :func:`zmq.auth.load_certificate`); every secret file is created with mode ``0o600``. Then
``chronos coordinator --curve-keys DIR`` serves with the coordinator's pair and admits exactly
the public keys in ``DIR/workers/*.key`` (another folder with ``--allowed-keys``), and
``chronos worker --curve-keys DIR --worker-id ID`` connects with ``DIR/workers/ID.key_secret``
(or ``DIR/ID.key_secret``: on another host, copy only ``coordinator.key`` and that worker's two
files into one folder).

Threat model, in short:

* **CURVE encrypts and authenticates** every connection (CurveZMQ: elliptic-curve key exchange,
  authenticated encryption). A worker only talks to a coordinator holding the secret key that
  matches the ``coordinator.key`` it was given, and the coordinator only admits client keys
  found in its allowed folder (ZAP); anybody else gets no reply at all.
* **Each worker key is bound to the worker id it is named after** (the file stem):
  :attr:`KeyRing.key_names` maps each admitted public key to that id, so the coordinator can
  check that a connection registers only under its own id (pyzmq's ZAP handler sets a received
  frame's ``User-Id`` property to the client's Z85 public key).
* **Copying a secret key is copying the identity**: whoever holds ``ID.key_secret`` (and the
  public ``coordinator.key``) *is* worker ``ID``. Keep secret files ``0o600``; the loaders refuse
  a secret file that group or others may read or write, unless the environment variable
  ``CHRONOS_ALLOW_OPEN_KEYS=1`` is set (e.g. a file system without POSIX permissions). To revoke
  a worker, delete its ``.key`` from the allowed folder and restart the coordinator; to revoke
  everything, ``chronos keys generate DIR --force`` (a new coordinator key).
* Not covered: a compromised coordinator or worker host, and which problem code a worker runs.
  The public keys are not secret but must reach the other side unaltered.

Worker ids (key names) are 1–128 characters of ``[A-Za-z0-9._-]``; ``coordinator`` is reserved.

Example:
    >>> import tempfile
    >>> from chronos.distributed.keys import (
    ...     generate_keys, load_coordinator_keys, load_worker_keys)
    >>> d = tempfile.mkdtemp()
    >>> made = generate_keys(d, ["w0", "w1"])
    >>> ring = load_coordinator_keys(d)
    >>> sorted(ring.key_names.values())
    ['w0', 'w1']
    >>> w0 = load_worker_keys(d, "w0")
    >>> w0.server_public_key == ring.server.public_key
    True
    >>> ring.worker_id_for(w0.public_key)
    'w0'
    >>> from chronos.distributed.messages import Heartbeat, HeartbeatAck
    >>> from chronos.distributed.transport import ClientTransport, ServerTransport
    >>> with ServerTransport(curve=ring.server) as server, \\
    ...         ClientTransport(server.address, curve=w0) as client:
    ...     client.send_message(Heartbeat(request_id=1, worker_id="w0"))
    ...     identity, msg = server.recv_message(timeout_ms=5000)
    ...     server.send_message(identity, HeartbeatAck(request_id=msg.request_id, version=0))
    ...     client.recv_message(timeout_ms=5000)
    True
    True
    HeartbeatAck(request_id=1, version=0)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import stat
import sys
import tempfile
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import zmq
import zmq.auth
from zmq.utils import z85

from chronos.core.errors import ConfigError
from chronos.distributed.transport import CurveClientConfig, CurveServerConfig

__all__ = [
    "ALLOW_OPEN_KEYS_ENV",
    "COORDINATOR_NAME",
    "DEFAULT_WORKERS",
    "MAX_WORKERS",
    "GeneratedKeys",
    "KeyRing",
    "Role",
    "add_curve_args",
    "check_worker_id",
    "curve_from_args",
    "default_worker_ids",
    "generate_keys",
    "load_coordinator_keys",
    "load_worker_keys",
    "main",
]

ALLOW_OPEN_KEYS_ENV = "CHRONOS_ALLOW_OPEN_KEYS"
"""Set to ``1`` to accept secret key files that group / others may read or write."""

COORDINATOR_NAME = "coordinator"
"""Stem of the coordinator's key files; reserved, so no worker can be named after it."""

WORKERS_DIR = "workers"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
DEFAULT_WORKERS = 4
MAX_WORKERS = 4096
"""Upper bound of ``--workers`` / ``--names`` in one key set (a typo must not write a million
files); add more keys to ``DIR/workers`` with another run into a different folder if needed."""

_WORKER_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_WORKER_ID_RULE = "1-128 characters of A-Z a-z 0-9 . _ -"
Role = Literal["coordinator", "worker", "run"]
"""Who reads the options of :func:`add_curve_args`: ``chronos coordinator``, ``worker``, ``run``."""
_ROLES: tuple[str, ...] = ("coordinator", "worker", "run")

EXIT_OK, EXIT_USAGE = 0, 2


# -- names ----------------------------------------------------------------------------------------


def check_worker_id(name: object) -> str:
    """``name`` if it can name a worker key (and be the worker id bound to it), else ConfigError.

    >>> check_worker_id("worker-0")
    'worker-0'
    """
    if not isinstance(name, str) or not _WORKER_ID.fullmatch(name):
        raise ConfigError(f"bad worker id {name!r:.80}: a worker id (key name) must be "
                          f"{_WORKER_ID_RULE}")
    if name == COORDINATOR_NAME:
        raise ConfigError(f"worker id {name!r} is reserved for the coordinator's own key; "
                          "pick another name")
    return name


def default_worker_ids(n: int = DEFAULT_WORKERS) -> list[str]:
    """``["worker-0", …, "worker-{n-1}"]``, the names ``chronos keys generate`` uses by default.

    >>> default_worker_ids(2)
    ['worker-0', 'worker-1']
    """
    if type(n) is not int or not 1 <= n <= MAX_WORKERS:
        raise ConfigError(f"the number of workers must be an int in [1, {MAX_WORKERS}], got {n!r}")
    return [f"worker-{i}" for i in range(n)]


def _check_worker_ids(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise ConfigError(f"worker ids must be a sequence of names, not one string {names!r}")
    out = [check_worker_id(n) for n in names]
    if not out:
        raise ConfigError("no worker ids given: name at least one worker")
    if len(out) > MAX_WORKERS:
        raise ConfigError(f"{len(out)} workers is more than one key set holds ({MAX_WORKERS})")
    seen: set[str] = set()
    for n in out:
        if n in seen:
            raise ConfigError(f"worker id {n!r} is given twice; each worker needs its own name")
        seen.add(n)
    return out


# -- files ----------------------------------------------------------------------------------------


def _zpl(public_key: bytes, secret_key: bytes | None, what: str) -> str:
    """A ZPL certificate in the layout of pyzmq's ``zmq.auth.create_certificates``."""
    lines = [
        f"#   {what}, written by `chronos keys generate`",
        "#   ZeroMQ CURVE " + ("**Secret** Certificate" if secret_key else "Public Certificate"),
        ("#   DO NOT GIVE THIS FILE TO ANYONE: whoever holds it can act as this key's owner."
         if secret_key else
         "#   Not secret, but it must reach the other side unaltered."),
        "",
        "metadata",
        "curve",
        f'    public-key = "{public_key.decode("ascii")}"',
    ]
    if secret_key:
        lines.append(f'    secret-key = "{secret_key.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` through a temporary file created with ``mode`` (so a secret is
    never readable by others, not even for a moment) and renamed over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp made it 0o600; widen a public file to `mode`
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _mkdir_private(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.name == "posix":
        os.chmod(path, 0o700)


@dataclass(frozen=True)
class GeneratedKeys:
    """What :func:`generate_keys` wrote (all paths absolute).

    Attributes:
        directory: the key set's folder (``DIR``).
        coordinator: ``(DIR/coordinator.key, DIR/coordinator.key_secret)``.
        workers: worker id -> ``(DIR/workers/ID.key, DIR/workers/ID.key_secret)``, in order.
        removed: stale worker key files that ``force=True`` deleted from ``DIR/workers``.
    """

    directory: Path
    coordinator: tuple[Path, Path]
    workers: Mapping[str, tuple[Path, Path]]
    removed: tuple[Path, ...] = ()


def generate_keys(
    curve_dir: str | os.PathLike[str],
    worker_ids: Sequence[str] | None = None,
    *,
    force: bool = False,
) -> GeneratedKeys:
    """Write a new key set: the coordinator's pair and one pair per worker (see the module doc).

    Args:
        curve_dir: the folder (created if missing, mode 0o700).
        worker_ids: the workers' names, each the worker id its key may register as (default:
            :func:`default_worker_ids`, ``worker-0`` … ``worker-3``).
        force: replace existing keys. The coordinator gets a new key (workers holding the old
            key set can no longer connect) and worker key files in ``DIR/workers`` that are not
            in ``worker_ids`` are deleted, so the coordinator admits exactly this set. Without
            it, an existing coordinator key or any key file in ``DIR/workers`` is an error.

    Raises:
        ConfigError: a bad or repeated worker id; a key file exists and ``force`` is false
            (nothing is written then); a file cannot be written.
    """
    names = _check_worker_ids(default_worker_ids() if worker_ids is None else worker_ids)
    if not zmq.has("curve"):
        raise ConfigError("this libzmq has no CURVE support; install pyzmq built with libsodium")
    root = Path(os.fspath(curve_dir)).expanduser().absolute()
    wdir = root / WORKERS_DIR
    coordinator = (root / f"{COORDINATOR_NAME}{PUBLIC_SUFFIX}",
                   root / f"{COORDINATOR_NAME}{SECRET_SUFFIX}")
    workers = {n: (wdir / f"{n}{PUBLIC_SUFFIX}", wdir / f"{n}{SECRET_SUFFIX}") for n in names}
    targets = [*coordinator, *(p for pair in workers.values() for p in pair)]
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a folder; choose a folder for the keys")
    if wdir.exists() and not wdir.is_dir():
        raise ConfigError(f"{wdir} exists and is not a folder; remove it or choose another DIR")
    keep = {p.name for pair in workers.values() for p in pair}
    stale: list[Path] = []  # other worker key files: the coordinator would admit them too
    if wdir.is_dir():
        stale = [p for p in sorted(wdir.iterdir())
                 if p.name not in keep and p.name.endswith((PUBLIC_SUFFIX, SECRET_SUFFIX))
                 and (p.is_file() or p.is_symlink())]
    if not force:
        for p in [*targets, *stale]:
            if p.exists() or p.is_symlink():
                raise ConfigError(
                    f"{p} already exists; nothing was written. Pass --force (force=True) to "
                    f"replace the key set in {root} (workers holding the old keys can no longer "
                    "connect), or choose another DIR"
                )
    try:
        if not root.exists():
            _mkdir_private(root)
        _mkdir_private(wdir)
        for name, (pub_path, sec_path) in [(COORDINATOR_NAME, coordinator), *workers.items()]:
            public, secret = zmq.curve_keypair()
            what = ("the coordinator's key" if name == COORDINATOR_NAME
                    else f"the key of worker {name}")
            _write_atomic(sec_path, _zpl(public, secret, what), 0o600)
            _write_atomic(pub_path, _zpl(public, None, what), 0o644)
        for p in stale:
            p.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the keys into {root}: {e.strerror or e}; check that "
                          "the folder is writable, or choose another DIR") from None
    return GeneratedKeys(root, coordinator, types.MappingProxyType(workers), tuple(stale))


def _allow_open_keys() -> bool:
    return os.environ.get(ALLOW_OPEN_KEYS_ENV, "").strip() == "1"


def _check_secret_mode(path: Path) -> None:
    if os.name != "posix" or _allow_open_keys():
        return
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return  # reading it reports the problem
    if mode & 0o077:
        raise ConfigError(
            f"{path} holds a secret key but its mode is {mode:#o} (group/others may access "
            f"it): run `chmod 600 {shlex.quote(str(path))}`, or set {ALLOW_OPEN_KEYS_ENV}=1 "
            "to accept it anyway (e.g. on a file system without POSIX permissions)"
        )


def _check_z85(key: bytes | None, path: Path, what: str) -> bytes:
    if key is None:
        raise ConfigError(f"{path} has no {what}; it is not a secret key file: use the "
                          f"'{SECRET_SUFFIX}' file written by `chronos keys generate`")
    ok = len(key) == 40
    if ok:
        try:
            z85.decode(key)
        except Exception:
            ok = False
    if not ok:
        raise ConfigError(f"{path}: the {what} is not a 40-character Z85 key ({key!r:.60}); "
                          "the file is damaged: copy it again or make new keys with "
                          "`chronos keys generate DIR --force`")
    return key


def _read_cert(path: Path, secret: bool, hint: str) -> tuple[bytes, bytes | None]:
    """``(public, secret)`` from the certificate ``path``; ``secret`` also requires (and checks)
    the secret key. ``hint`` says how to get the file if it is missing."""
    if not path.is_file():
        why = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"{path} {why}; {hint}")
    if secret:
        _check_secret_mode(path)
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError, UnicodeError) as e:
        raise ConfigError(f"cannot read the key file {path}: {e}; {hint}") from None
    public = _check_z85(public, path, "public key")
    if not secret:
        return public, None
    secret_key = _check_z85(secret_key, path, "secret key")
    if zmq.curve_public(secret_key) != public:
        raise ConfigError(f"{path}: its secret key does not match its public key; the file is "
                          "damaged or edited: make new keys with `chronos keys generate DIR "
                          "--force`")
    return public, secret_key


def _generate_hint(root: Path) -> str:
    return f"run `chronos keys generate {shlex.quote(str(root))}` first"


# -- coordinator ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRing:
    """What a coordinator needs to serve authenticated workers.

    Attributes:
        server: its key pair and ``allowed_client_keys`` (Z85 public keys, as ``bytes``), ready
            for ``ServerTransport(curve=...)``.
        key_names: Z85 public key (``str``) -> the worker id it is bound to (its file stem).
            The Z85 ``str`` is what pyzmq's ZAP handler puts in a received frame's ``User-Id``.
    """

    server: CurveServerConfig
    key_names: Mapping[str, str] = field(default_factory=dict)

    def worker_id_for(self, public_key: str | bytes) -> str | None:
        """The worker id bound to ``public_key`` (Z85), or ``None`` for a key not admitted."""
        key = public_key.decode("ascii", "replace") if isinstance(public_key, bytes) else public_key
        return self.key_names.get(key)


def load_coordinator_keys(
    curve_dir: str | os.PathLike[str],
    allowed_dir: str | os.PathLike[str] | None = None,
) -> KeyRing:
    """The coordinator's :class:`KeyRing`: its pair from ``curve_dir/coordinator.key_secret``
    and the client keys it admits, every ``*.key`` in ``allowed_dir`` (default
    ``curve_dir/workers``), each bound to its file stem as worker id.

    ``curve_dir/coordinator.key``, when present, must hold the same public key (it is what the
    workers get). Raises :class:`ConfigError` naming the file and the fix when a file is missing,
    damaged, has an invalid name, repeats another's key, or a secret file is open to others
    (see :data:`ALLOW_OPEN_KEYS_ENV`).
    """
    root = Path(os.fspath(curve_dir)).expanduser().absolute()
    hint = _generate_hint(root)
    if not root.is_dir():
        raise ConfigError(f"the key folder {root} does not exist; {hint}")
    public, secret = _read_cert(root / f"{COORDINATOR_NAME}{SECRET_SUFFIX}", True, hint)
    assert secret is not None
    shared = root / f"{COORDINATOR_NAME}{PUBLIC_SUFFIX}"
    if shared.exists():
        shared_public, _ = _read_cert(shared, False, hint)
        if shared_public != public:
            raise ConfigError(
                f"{shared} does not match {root / (COORDINATOR_NAME + SECRET_SUFFIX)}: workers "
                "given this public key could not connect; the files come from different key "
                f"sets: copy the right pair, or make a new set with `chronos keys generate "
                f"{shlex.quote(str(root))} --force`"
            )
    adir = (root / WORKERS_DIR if allowed_dir is None
            else Path(os.fspath(allowed_dir)).expanduser().absolute())
    if not adir.is_dir():
        raise ConfigError(f"the allowed-keys folder {adir} does not exist; "
                          + (hint if allowed_dir is None
                             else "give a folder holding the workers' *.key files"))
    names: dict[str, str] = {}
    for path in sorted(adir.glob(f"*{PUBLIC_SUFFIX}")):
        stem = path.name[: -len(PUBLIC_SUFFIX)]
        if stem == COORDINATOR_NAME:
            raise ConfigError(f"{path} is the coordinator's own key, not a worker's: point the "
                              "allowed keys at the workers' folder (DIR/workers)")
        try:
            check_worker_id(stem)
        except ConfigError:
            raise ConfigError(f"{path}: the file name must be a worker id ({_WORKER_ID_RULE}) "
                              "followed by .key; rename or remove it") from None
        key, _ = _read_cert(path, False, hint)
        text = key.decode("ascii")
        if text in names:
            raise ConfigError(f"{path} holds the same public key as {names[text]}.key in {adir}: "
                              "a key is bound to one worker id; remove one of them")
        names[text] = stem
    if not names:
        raise ConfigError(f"no worker keys (*.key files) in {adir}: no worker could connect; "
                          + (hint if allowed_dir is None else
                             "copy the workers' public .key files there"))
    server = CurveServerConfig(public_key=public, secret_key=secret,
                               allowed_client_keys=frozenset(k.encode() for k in names))
    return KeyRing(server=server, key_names=types.MappingProxyType(names))


# -- worker ---------------------------------------------------------------------------------------


def load_worker_keys(
    curve_dir: str | os.PathLike[str],
    worker_id: str,
    server_key: str | os.PathLike[str] | None = None,
) -> CurveClientConfig:
    """Worker ``worker_id``'s :class:`CurveClientConfig`, for ``ClientTransport(curve=...)``.

    Its pair comes from ``curve_dir/workers/<worker_id>.key_secret``, or from
    ``curve_dir/<worker_id>.key_secret`` (a folder holding only what one worker's host needs:
    ``coordinator.key`` and that worker's files); if both exist they must hold the same key.
    The coordinator's public key comes from ``curve_dir/coordinator.key``, or from the
    certificate file ``server_key``. Raises :class:`ConfigError` naming the missing or bad file.
    """
    check_worker_id(worker_id)
    root = Path(os.fspath(curve_dir)).expanduser().absolute()
    hint = _generate_hint(root)
    if not root.is_dir():
        raise ConfigError(f"the key folder {root} does not exist; {hint}")
    nested = root / WORKERS_DIR / f"{worker_id}{SECRET_SUFFIX}"
    flat = root / f"{worker_id}{SECRET_SUFFIX}"
    found = [p for p in (nested, flat) if p.exists()]
    if not found:
        raise ConfigError(
            f"no secret key for worker {worker_id!r}: neither {nested} nor {flat} exists; "
            f"use a worker id that has a key in {root / WORKERS_DIR}, or "
            f"`chronos keys generate DIR --names {worker_id}` and copy its files here"
        )
    public, secret = _read_cert(found[0], True, hint)
    if len(found) == 2 and _read_cert(found[1], True, hint)[0] != public:
        raise ConfigError(f"{nested} and {flat} hold different keys for worker {worker_id!r}; "
                          "remove the one that is stale")
    assert secret is not None
    server_path = (root / f"{COORDINATOR_NAME}{PUBLIC_SUFFIX}" if server_key is None
                   else Path(os.fspath(server_key)).expanduser().absolute())
    server_public, _ = _read_cert(
        server_path, False,
        "copy the coordinator's public key (coordinator.key) from the coordinator's key folder",
    )
    return CurveClientConfig(server_public_key=server_public, public_key=public,
                             secret_key=secret)


# -- command-line options for chronos coordinator / worker / run ----------------------------------


def add_curve_args(p: argparse.ArgumentParser, role: Role) -> None:
    """Add ``--curve-keys DIR`` (every role) and ``--allowed-keys DIR`` (``coordinator``,
    ``run``) to ``p``, in a group of their own; read them back with :func:`curve_from_args`."""
    if role not in _ROLES:
        raise ConfigError(f"role must be one of {list(_ROLES)}, got {role!r}")
    g = p.add_argument_group("authentication (CURVE)")
    helps = {
        "coordinator": "encrypt and authenticate: serve with DIR/coordinator.key_secret and admit "
                       "only the workers whose public keys are in DIR/workers/*.key (make DIR "
                       "with `chronos keys generate DIR`; default: no CURVE)",
        "worker": "encrypt and authenticate: connect with DIR/workers/ID.key_secret (or "
                  "DIR/ID.key_secret), ID being --worker-id, and trust only the coordinator in "
                  "DIR/coordinator.key (default: no CURVE)",
        "run": "encrypt and authenticate every connection with the key set in DIR (`chronos "
               "keys generate DIR`): the coordinator admits DIR/workers/*.key, each worker "
               "uses its own pair (default: no CURVE)",
    }
    g.add_argument("--curve-keys", metavar="DIR", default=None, help=helps[role])
    if role in ("coordinator", "run"):
        g.add_argument("--allowed-keys", metavar="DIR", default=None,
                       help="admit the public keys in DIR/*.key instead of the ones in "
                            "CURVE_KEYS/workers; each file's name is the worker id its key "
                            "may register as (default: CURVE_KEYS/workers)")


def curve_from_args(args: argparse.Namespace, role: Role) -> KeyRing | CurveClientConfig | None:
    """The CURVE configuration the options of :func:`add_curve_args` ask for: ``None`` without
    ``--curve-keys``; a :class:`KeyRing` for ``coordinator`` and ``run`` (a launcher then loads
    each worker's side with :func:`load_worker_keys`); a :class:`CurveClientConfig` for
    ``worker``, whose key is chosen by ``args.worker_id`` (``--worker-id``, required then).
    Raises :class:`ConfigError` (say it as one ``error:`` line, exit code 2)."""
    if role not in _ROLES:
        raise ConfigError(f"role must be one of {list(_ROLES)}, got {role!r}")
    curve_dir: Any = getattr(args, "curve_keys", None)
    allowed: Any = getattr(args, "allowed_keys", None)
    if curve_dir is None:
        if allowed is not None:
            raise ConfigError("--allowed-keys needs --curve-keys DIR (the coordinator's own "
                              "keys); make them with `chronos keys generate DIR`")
        return None
    if role == "worker":
        worker_id = getattr(args, "worker_id", None)
        if not worker_id:
            raise ConfigError("--curve-keys needs --worker-id ID, the name of this worker's key "
                              f"(DIR/{WORKERS_DIR}/ID{SECRET_SUFFIX})")
        return load_worker_keys(curve_dir, worker_id)
    return load_coordinator_keys(curve_dir, allowed)


# -- chronos keys -------------------------------------------------------------------------------


_PROG = "chronos keys"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line: ``chronos keys: error: WHAT (see `PROG --help`)``, exit
    code 2 (``PROG`` is the (sub)command that failed to parse)."""

    def error(self, message: str) -> Any:  # argparse declares NoReturn
        print(f"{_PROG}: error: {message} (see `{self.prog} --help`)", file=sys.stderr,
              flush=True)
        raise SystemExit(EXIT_USAGE)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"must be an int in [1, {MAX_WORKERS}], got {text!r}")
    return n


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=_PROG,
        description="CURVE keys for authenticated workers (encrypted connections; the "
                    "coordinator admits only the workers whose keys it holds).",
        epilog="e.g. `chronos keys generate keys/ --workers 8`, then `chronos coordinator "
               "--curve-keys keys/ ...` and `chronos worker --curve-keys keys/ --worker-id "
               "worker-0 ...`",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    g = sub.add_parser(
        "generate", help="write a coordinator key pair and one key pair per worker",
        description="Write DIR/coordinator.key (public) + DIR/coordinator.key_secret and, per "
                    "worker, DIR/workers/ID.key + DIR/workers/ID.key_secret (secret files mode "
                    "0600). Each worker key may register only as the worker id it is named "
                    "after. Copying a secret key is copying that identity.",
    )
    g.add_argument("dir", metavar="DIR", help="folder for the keys (created if missing)")
    g.add_argument("--workers", metavar="N", type=_count, default=None,
                   help=f"number of worker keys, named worker-0 … worker-(N-1) (default: "
                        f"{DEFAULT_WORKERS})")
    g.add_argument("--names", metavar="A,B,...", default=None,
                   help=f"comma-separated worker ids instead ({_WORKER_ID_RULE} each)")
    g.add_argument("--force", action="store_true",
                   help="replace existing keys: a new coordinator key, and worker keys in "
                        "DIR/workers not named now are deleted")
    return p


def _names(args: argparse.Namespace) -> list[str]:
    if args.names is None:
        return default_worker_ids(DEFAULT_WORKERS if args.workers is None else args.workers)
    names = [n.strip() for n in args.names.split(",")]
    if any(not n for n in names):
        raise ConfigError(f"--names {args.names!r} has an empty name; separate worker ids by "
                          "single commas, e.g. --names a,b,c")
    if args.workers is not None and args.workers != len(names):
        raise ConfigError(f"--workers {args.workers} does not match the {len(names)} names in "
                          "--names; give one of them")
    return names


def _report(made: GeneratedKeys, out: Any) -> None:
    root = made.directory
    q = shlex.quote
    d = q(str(root))

    def rel(p: Path) -> str:
        return str(p.relative_to(root))

    print(f"wrote CURVE keys to {root}:", file=out)
    print(f"  {rel(made.coordinator[0])}  (coordinator, public: give it to every worker)",
          file=out)
    print(f"  {rel(made.coordinator[1])}  (coordinator, secret: keep it on the coordinator "
          "host)", file=out)
    for name, (pub, sec) in made.workers.items():
        print(f"  {rel(pub)}, {rel(sec)}  (worker {name!r}: may register only as {name})",
              file=out)
    for p in made.removed:
        print(f"  removed stale {rel(p)}", file=out)
    first = next(iter(made.workers))
    wdir = root / WORKERS_DIR
    print("use them:", file=out)
    print(f"  chronos coordinator --curve-keys {d} ...", file=out)
    print(f"      loads {COORDINATOR_NAME}{SECRET_SUFFIX}, admits only the keys in "
          f"{WORKERS_DIR}/*{PUBLIC_SUFFIX}", file=out)
    print(f"  chronos worker --curve-keys {d} --worker-id {q(first)} ...", file=out)
    print(f"      loads {COORDINATOR_NAME}{PUBLIC_SUFFIX} and {WORKERS_DIR}/{first}{SECRET_SUFFIX}",
          file=out)
    print(f"  chronos run --curve-keys {d} ...  (coordinator and workers on this machine)",
          file=out)
    print("a worker on another machine needs only the coordinator's public key and its own pair; "
          "copy them into one folder there, e.g.", file=out)
    files = " ".join(q(str(p)) for p in (made.coordinator[0], wdir / f"{first}{PUBLIC_SUFFIX}",
                                         wdir / f"{first}{SECRET_SUFFIX}"))
    print(f"  scp -p {files} HOST:keys/   (-p keeps the secret file's mode 600)", file=out)
    print(f"  chronos worker --curve-keys keys --worker-id {q(first)} ...   (there)", file=out)
    print("never copy a .key_secret anywhere else: whoever holds it can act as that worker "
          "(or, for coordinator.key_secret, as the coordinator)", file=out)


def main(argv: list[str] | None = None) -> int:
    """``chronos keys``: key management (``chronos keys generate DIR ...``); returns the exit
    code (0 done, 2 bad usage or configuration: one ``error:`` line on stderr)."""
    p = _build_parser()
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.action is None:
        p.print_help()
        print(f"{p.prog}: error: choose an action, e.g. `chronos keys generate DIR`",
              file=sys.stderr, flush=True)
        return EXIT_USAGE
    try:
        made = generate_keys(args.dir, _names(args), force=args.force)
    except ConfigError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    _report(made, sys.stdout)
    sys.stdout.flush()
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
