"""CURVE key management: ``chronos keys generate``, the loaders, the CLI options, and real
CURVE handshakes with the loaded keys (127.0.0.1 only; every wait is a bounded poll)."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
import zmq.auth.thread

from chronos.cli import main as chronos_main
from chronos.core.errors import ConfigError
from chronos.distributed.keys import (
    ALLOW_OPEN_KEYS_ENV,
    GeneratedKeys,
    KeyRing,
    Role,
    add_curve_args,
    check_worker_id,
    curve_from_args,
    default_worker_ids,
    generate_keys,
    load_coordinator_keys,
    load_worker_keys,
)
from chronos.distributed.messages import Heartbeat, HeartbeatAck
from chronos.distributed.transport import (
    ClientTransport,
    CurveClientConfig,
    ServerTransport,
)

WAIT_MS = 5000  # upper bound for what must arrive; never slept
REFUSED_MS = 1000  # how long a refused client waits for a reply that must not come

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture(autouse=True)
def _strict_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_OPEN_KEYS_ENV, raising=False)


@pytest.fixture
def keyset(tmp_path: Path) -> GeneratedKeys:
    return generate_keys(tmp_path / "keys", ["a", "b"])


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# -- generate -------------------------------------------------------------------------------------


@posix_only
def test_generate_writes_zpl_certificates_with_private_modes(keyset: GeneratedKeys) -> None:
    d = keyset.directory
    assert keyset.coordinator == (d / "coordinator.key", d / "coordinator.key_secret")
    assert list(keyset.workers) == ["a", "b"]
    assert keyset.workers["a"] == (d / "workers" / "a.key", d / "workers" / "a.key_secret")
    assert _mode(d / "workers") == 0o700
    for pub, sec in [keyset.coordinator, *keyset.workers.values()]:
        assert _mode(sec) == 0o600
        assert not _mode(pub) & 0o022  # nobody else may change a public key
        # pyzmq's own reader parses both; the public file holds no secret
        public, secret = zmq.auth.load_certificate(sec)
        assert secret is not None and zmq.curve_public(secret) == public
        assert zmq.auth.load_certificate(pub) == (public, None)
        assert b"secret-key" not in pub.read_bytes()
    assert sorted(p.name for p in d.rglob("*")) == sorted(
        ["coordinator.key", "coordinator.key_secret", "workers", "a.key", "a.key_secret",
         "b.key", "b.key_secret"])  # no temporary files left behind


def test_default_names() -> None:
    assert default_worker_ids() == ["worker-0", "worker-1", "worker-2", "worker-3"]
    with pytest.raises(ConfigError, match="number of workers"):
        default_worker_ids(0)


def test_load_round_trip_and_key_names(keyset: GeneratedKeys) -> None:
    d = keyset.directory
    ring = load_coordinator_keys(d)
    assert isinstance(ring, KeyRing)
    coord_public, coord_secret = zmq.auth.load_certificate(d / "coordinator.key_secret")
    assert (ring.server.public_key, ring.server.secret_key) == (coord_public, coord_secret)
    publics = {n: zmq.auth.load_certificate(pub)[0] for n, (pub, _) in keyset.workers.items()}
    assert ring.server.allowed_client_keys == frozenset(publics.values())
    assert dict(ring.key_names) == {publics["a"].decode(): "a", publics["b"].decode(): "b"}
    for name in ("a", "b"):
        client = load_worker_keys(d, name)
        assert isinstance(client, CurveClientConfig)
        assert client.server_public_key == coord_public
        assert client.public_key == publics[name]
        assert zmq.curve_public(client.secret_key) == client.public_key
        assert ring.worker_id_for(client.public_key) == name
        assert ring.worker_id_for(client.public_key.decode()) == name
    assert ring.worker_id_for(zmq.curve_keypair()[0]) is None
    with pytest.raises(TypeError):
        ring.key_names["x"] = "y"  # type: ignore[index]


def test_default_worker_names_are_the_file_stems(tmp_path: Path) -> None:
    made = generate_keys(tmp_path / "k")
    ring = load_coordinator_keys(tmp_path / "k")
    assert sorted(ring.key_names.values()) == ["worker-0", "worker-1", "worker-2", "worker-3"]
    for name, (pub, _) in made.workers.items():
        assert pub.stem == name
        assert ring.key_names[zmq.auth.load_certificate(pub)[0].decode()] == name


def test_refuses_to_overwrite_without_force(keyset: GeneratedKeys) -> None:
    d = keyset.directory
    before = _snapshot(d)
    with pytest.raises(ConfigError) as e:
        generate_keys(d, ["a", "b"])
    assert str(d / "coordinator.key") in str(e.value) and "--force" in str(e.value)
    # a different set of names into the same folder is refused too, before writing anything
    with pytest.raises(ConfigError, match="already exists"):
        generate_keys(d, ["c"])
    assert _snapshot(d) == before


def test_refuses_a_folder_holding_other_worker_keys(tmp_path: Path) -> None:
    d = tmp_path / "k"
    (d / "workers").mkdir(parents=True)
    (d / "workers" / "old.key").write_text("x")
    with pytest.raises(ConfigError, match=r"old\.key already exists"):
        generate_keys(d, ["a"])
    assert not (d / "coordinator.key").exists()


def test_force_replaces_the_key_set_and_removes_stale_worker_keys(
    keyset: GeneratedKeys,
) -> None:
    d = keyset.directory
    old_ring = load_coordinator_keys(d)
    made = generate_keys(d, ["a", "c"], force=True)
    assert sorted(p.name for p in made.removed) == ["b.key", "b.key_secret"]
    ring = load_coordinator_keys(d)
    assert ring.server.public_key != old_ring.server.public_key
    assert sorted(ring.key_names.values()) == ["a", "c"]
    assert not set(ring.key_names) & set(old_ring.key_names)
    if os.name == "posix":
        assert _mode(d / "workers" / "c.key_secret") == 0o600


@pytest.mark.parametrize(
    "names",
    [[""], ["a b"], ["a/b"], ["../x"], ["x" * 129], ["coordinator"], ["a", "a"], [], "ab",
     ["ok", "é"]],
)
def test_bad_names_are_refused_and_nothing_is_written(tmp_path: Path, names: Any) -> None:
    with pytest.raises(ConfigError):
        generate_keys(tmp_path / "k", names)
    assert not (tmp_path / "k").exists()


def test_valid_names() -> None:
    for name in ["a", "w-0", "node_1.gpu-2", "x" * 128, "A.B_C-D"]:
        assert check_worker_id(name) == name


# -- loading: what is missing, what is bad --------------------------------------------------------


def test_missing_folder_says_to_generate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chronos keys generate") as e:
        load_coordinator_keys(tmp_path / "nope")
    assert "nope" in str(e.value)
    with pytest.raises(ConfigError, match="chronos keys generate"):
        load_worker_keys(tmp_path / "nope", "a")


def test_missing_files_are_named(keyset: GeneratedKeys, tmp_path: Path) -> None:
    d = keyset.directory
    (d / "coordinator.key_secret").rename(tmp_path / "moved")
    with pytest.raises(ConfigError, match=r"coordinator\.key_secret does not exist; run "
                                          r"`chronos keys generate"):
        load_coordinator_keys(d)
    (tmp_path / "moved").rename(d / "coordinator.key_secret")

    (d / "coordinator.key").unlink()  # the worker side needs it; the coordinator does not
    load_coordinator_keys(d)
    with pytest.raises(ConfigError, match=r"coordinator\.key does not exist"):
        load_worker_keys(d, "a")

    with pytest.raises(ConfigError, match=r"no secret key for worker 'zed'") as e:
        load_worker_keys(d, "zed")
    assert str(d / "workers" / "zed.key_secret") in str(e.value)


def test_empty_or_missing_allowed_folder(keyset: GeneratedKeys, tmp_path: Path) -> None:
    d = keyset.directory
    with pytest.raises(ConfigError, match=r"allowed-keys folder .* does not exist"):
        load_coordinator_keys(d, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no worker keys"):
        load_coordinator_keys(d, tmp_path / "empty")
    shutil.rmtree(d / "workers")
    with pytest.raises(ConfigError, match="chronos keys generate"):
        load_coordinator_keys(d)


def test_damaged_and_mismatched_files(keyset: GeneratedKeys, tmp_path: Path) -> None:
    d = keyset.directory
    a_pub = d / "workers" / "a.key"
    a_pub.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"a\.key"):
        load_coordinator_keys(d)
    a_pub.write_text('curve\n    public-key = "tooshort"\n')
    with pytest.raises(ConfigError, match=r"a\.key.*40-character Z85"):
        load_coordinator_keys(d)

    # a secret file whose secret does not belong to its public key
    other = generate_keys(tmp_path / "other", ["a"])
    sec = d / "workers" / "b.key_secret"
    other_secret = zmq.auth.load_certificate(other.workers["a"][1])[1]
    assert other_secret is not None
    own_secret = load_worker_keys(d, "b").secret_key
    sec.write_text(sec.read_text().replace(own_secret.decode(), other_secret.decode()))
    with pytest.raises(ConfigError, match="does not match its public key"):
        load_worker_keys(d, "b")

    # coordinator.key from another key set
    shutil.copy(other.coordinator[0], d / "coordinator.key")
    with pytest.raises(ConfigError, match=r"coordinator\.key does not match"):
        load_coordinator_keys(tmp_path / "keys", tmp_path / "other" / "workers")

    # a public file where a secret one is expected
    shutil.copy(other.workers["a"][0], d / "workers" / "a.key_secret")
    os.chmod(d / "workers" / "a.key_secret", 0o600)
    with pytest.raises(ConfigError, match="has no secret key"):
        load_worker_keys(d, "a")


def test_allowed_folder_names_must_be_worker_ids(keyset: GeneratedKeys) -> None:
    d = keyset.directory
    w = d / "workers"
    shutil.copy(w / "a.key", w / "bad name.key")
    with pytest.raises(ConfigError, match=r"bad name\.key: the file name must be a worker id"):
        load_coordinator_keys(d)
    (w / "bad name.key").rename(w / "a2.key")
    with pytest.raises(ConfigError, match=r"same public key as a\.key"):
        load_coordinator_keys(d)
    (w / "a2.key").unlink()
    with pytest.raises(ConfigError, match="coordinator's own key"):
        load_coordinator_keys(d, d)  # DIR itself, not DIR/workers


@posix_only
def test_open_secret_is_refused_unless_allowed(
    keyset: GeneratedKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = keyset.directory
    sec = d / "workers" / "a.key_secret"
    os.chmod(sec, 0o644)
    with pytest.raises(ConfigError) as e:
        load_worker_keys(d, "a")
    msg = str(e.value)
    assert str(sec) in msg and "0o644" in msg and "chmod 600" in msg
    assert ALLOW_OPEN_KEYS_ENV in msg
    os.chmod(d / "coordinator.key_secret", 0o640)
    with pytest.raises(ConfigError, match=r"coordinator\.key_secret.*chmod 600"):
        load_coordinator_keys(d)
    monkeypatch.setenv(ALLOW_OPEN_KEYS_ENV, "1")
    assert load_worker_keys(d, "a").public_key == zmq.auth.load_certificate(sec)[0]
    load_coordinator_keys(d)


def test_flat_folder_for_one_worker_host(keyset: GeneratedKeys, tmp_path: Path) -> None:
    d = keyset.directory
    host = tmp_path / "host"
    host.mkdir()
    for p in (d / "coordinator.key", d / "workers" / "a.key", d / "workers" / "a.key_secret"):
        shutil.copy2(p, host / p.name)
    assert load_worker_keys(host, "a") == load_worker_keys(d, "a")
    # the server key from an explicit file
    (host / "coordinator.key").rename(tmp_path / "server.key")
    with pytest.raises(ConfigError, match=r"coordinator\.key does not exist"):
        load_worker_keys(host, "a")
    assert load_worker_keys(host, "a", server_key=tmp_path / "server.key") == load_worker_keys(
        d, "a")
    with pytest.raises(ConfigError):  # the coordinator's own pair is no worker's
        load_worker_keys(d, "coordinator")


def test_nested_and_flat_copies_must_agree(keyset: GeneratedKeys, tmp_path: Path) -> None:
    d = keyset.directory
    shutil.copy2(d / "workers" / "b.key_secret", d / "a.key_secret")
    with pytest.raises(ConfigError, match="hold different keys for worker 'a'"):
        load_worker_keys(d, "a")


# -- real CURVE handshakes ------------------------------------------------------------------------


def test_curve_handshake_with_loaded_keys(keyset: GeneratedKeys) -> None:
    ring = load_coordinator_keys(keyset.directory)
    with ServerTransport(curve=ring.server) as server, ClientTransport(
        server.address, curve=load_worker_keys(keyset.directory, "b")
    ) as client:
        assert client.send_message(Heartbeat(request_id=7, worker_id="b"))
        got = server.recv_message(timeout_ms=WAIT_MS)
        assert got is not None
        identity, msg = got
        assert msg == Heartbeat(request_id=7, worker_id="b")
        assert server.send_message(identity, HeartbeatAck(request_id=7, version=0))
        assert client.recv_message(timeout_ms=WAIT_MS) == HeartbeatAck(request_id=7, version=0)


def test_key_not_in_the_allowed_folder_gets_no_reply(
    keyset: GeneratedKeys, tmp_path: Path
) -> None:
    ring = load_coordinator_keys(keyset.directory)
    stranger = generate_keys(tmp_path / "stranger", ["a"])  # same name, other key
    own = load_worker_keys(stranger.directory, "a")
    # it even knows the right server key: only its own key is not admitted
    intruder = CurveClientConfig(server_public_key=ring.server.public_key,
                                 public_key=own.public_key, secret_key=own.secret_key)
    with ServerTransport(curve=ring.server) as server, ClientTransport(
        server.address, curve=intruder
    ) as client:
        client.send_message(Heartbeat(request_id=1, worker_id="a"))
        assert server.recv_message(timeout_ms=REFUSED_MS) is None
        assert client.recv_message(timeout_ms=0) is None
    # admitted once its public key is in the allowed folder
    ring2 = load_coordinator_keys(keyset.directory, stranger.directory / "workers")
    with ServerTransport(curve=ring2.server) as server, ClientTransport(
        server.address, curve=intruder
    ) as client:
        client.send_message(Heartbeat(request_id=2, worker_id="a"))
        got = server.recv_message(timeout_ms=WAIT_MS)
        assert got is not None and got[1] == Heartbeat(request_id=2, worker_id="a")


def test_zap_user_id_is_the_key_bound_to_the_worker_id(keyset: GeneratedKeys) -> None:
    """What the coordinator can check a Register against: pyzmq's ZAP handler puts the client's
    Z85 public key in each received frame's User-Id, and key_names maps it to the worker id."""
    ring = load_coordinator_keys(keyset.directory)
    assert ring.server.allowed_client_keys is not None
    allowed: frozenset[bytes] = ring.server.allowed_client_keys

    class Allow:
        def callback(self, domain: str, key: bytes) -> bool:
            return key in allowed

    ctx: zmq.Context[Any] = zmq.Context()
    auth = zmq.auth.thread.ThreadAuthenticator(ctx)
    try:
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=Allow())
        server = ctx.socket(zmq.ROUTER)
        server.linger = 0
        server.curve_secretkey = ring.server.secret_key
        server.curve_publickey = ring.server.public_key
        server.curve_server = True
        port = server.bind_to_random_port("tcp://127.0.0.1")
        cfg = load_worker_keys(keyset.directory, "a")
        client = ctx.socket(zmq.DEALER)
        client.linger = 0
        client.curve_serverkey = cfg.server_public_key
        client.curve_publickey = cfg.public_key
        client.curve_secretkey = cfg.secret_key
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"hello")
        assert server.poll(WAIT_MS)
        _identity, frame = server.recv_multipart(copy=False)
        assert ring.worker_id_for(frame.get("User-Id")) == "a"
        client.close()
        server.close()
    finally:
        auth.stop()
        ctx.term()


# -- command-line options for coordinator / worker / run ------------------------------------------


def _args(role: Any, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    if role == "worker":
        p.add_argument("--worker-id", default=None)
    add_curve_args(p, role)
    return p.parse_args(argv)


def test_curve_args(keyset: GeneratedKeys, tmp_path: Path) -> None:
    d = str(keyset.directory)
    roles: list[Role] = ["coordinator", "run", "worker"]
    for role in roles:
        assert curve_from_args(_args(role, []), role) is None
    for role in roles[:2]:
        ring = curve_from_args(_args(role, ["--curve-keys", d]), role)
        assert isinstance(ring, KeyRing) and sorted(ring.key_names.values()) == ["a", "b"]
    other = generate_keys(tmp_path / "other", ["z"])
    ring = curve_from_args(
        _args("coordinator", ["--curve-keys", d, "--allowed-keys",
                              str(other.directory / "workers")]), "coordinator")
    assert isinstance(ring, KeyRing) and list(ring.key_names.values()) == ["z"]
    client = curve_from_args(_args("worker", ["--curve-keys", d, "--worker-id", "b"]), "worker")
    assert client == load_worker_keys(d, "b")

    with pytest.raises(SystemExit):  # a worker has no --allowed-keys
        _args("worker", ["--allowed-keys", d])
    with pytest.raises(ConfigError, match="--worker-id"):
        curve_from_args(_args("worker", ["--curve-keys", d]), "worker")
    with pytest.raises(ConfigError, match="--allowed-keys needs --curve-keys"):
        curve_from_args(_args("coordinator", ["--allowed-keys", d]), "coordinator")
    with pytest.raises(ConfigError, match="role"):
        add_curve_args(argparse.ArgumentParser(), "server")  # type: ignore[arg-type]


def test_curve_args_help_text() -> None:
    p = argparse.ArgumentParser()
    add_curve_args(p, "coordinator")
    text = p.format_help()
    assert "--curve-keys DIR" in text and "--allowed-keys DIR" in text
    assert "chronos keys generate" in text


# -- chronos keys ---------------------------------------------------------------------------------


def test_cli_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "k"
    assert chronos_main(["keys", "generate", str(d), "--names", "a,b"]) == 0
    out = capsys.readouterr().out
    assert f"chronos coordinator --curve-keys {d}" in out
    assert f"chronos worker --curve-keys {d} --worker-id a" in out
    assert "coordinator.key_secret" in out and "workers/b.key_secret" in out
    assert sorted(load_coordinator_keys(d).key_names.values()) == ["a", "b"]

    assert chronos_main(["keys", "generate", str(d), "--workers", "3", "--force"]) == 0
    out = capsys.readouterr().out
    assert "removed stale workers/a.key" in out
    assert sorted(load_coordinator_keys(d).key_names.values()) == [
        "worker-0", "worker-1", "worker-2"]


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--names", "a b"], "chronos keys: error: bad worker id 'a b'"),
        (["--names", "a,,b"], "chronos keys: error: --names 'a,,b' has an empty name"),
        (["--names", "coordinator"], "chronos keys: error: worker id 'coordinator' is reserved"),
        (["--workers", "0"], "chronos keys: error: argument --workers: must be an int"),
        (["--workers", "2", "--names", "a"], "chronos keys: error: --workers 2 does not match"),
        (["--bogus"], "chronos keys: error: unrecognized arguments: --bogus"),
    ],
)
def test_cli_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expect: str
) -> None:
    assert chronos_main(["keys", "generate", str(tmp_path / "k"), *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith(expect), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "k").exists()


def test_cli_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "k"
    assert chronos_main(["keys", "generate", str(d)]) == 0
    capsys.readouterr()
    assert chronos_main(["keys", "generate", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"chronos keys: error: {d / 'coordinator.key'} already exists")
    assert "--force" in err and err.count("\n") == 1


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert chronos_main(["keys", "--help"]) == 0
    assert "generate" in capsys.readouterr().out
    assert chronos_main(["keys", "generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--workers N" in out and "--names" in out and "--force" in out
    assert chronos_main(["keys"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chronos keys: error: choose an action") and err.count("\n") == 1
