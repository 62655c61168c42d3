"""The coordinator's socket loop: what its zero-copy fast paths must never break.

The loop decodes without a finiteness pass (the state machine checks every hypergradient) and
hands decoded tensors over to the state machine, which computes the next λ in their memory; λ
is sent zero-copy. These tests go through real sockets on 127.0.0.1.
"""

from __future__ import annotations

import math

import pytest
import torch

from chronos.distributed.coordinator import Coordinator
from chronos.distributed.messages import (
    Checkout,
    CheckoutReply,
    Commit,
    CommitReply,
    ErrorReply,
    Message,
    Register,
)
from chronos.distributed.protocol import decode, encode
from chronos.distributed.transport import ClientTransport


def _rpc(c: ClientTransport, msg: Message) -> Message:
    assert c.send(encode(msg))
    frames = c.recv(timeout_ms=10_000)
    assert frames is not None, "no reply"
    return decode(frames)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [3, 100_000], ids=["small", "large"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_commits_over_the_wire_are_refused_and_change_nothing(
    n: int, bad: float
) -> None:
    with (
        Coordinator({"lam": torch.ones(n)}, port=0, optimizer="sgd", outer_lr=0.5) as coord,
        ClientTransport(coord.address, identity=b"w") as c,
    ):
        _rpc(c, Register(request_id=1, worker_id="w"))
        assert isinstance(_rpc(c, Checkout(request_id=2, worker_id="w")), CheckoutReply)
        g = torch.ones(n)
        g[n // 2] = bad
        reply = _rpc(
            c,
            Commit(
                request_id=3, worker_id="w", version=0, commit_id="c3", hypergradient={"lam": g}
            ),
        )
        assert isinstance(reply, ErrorReply) and reply.code == "non_finite", reply
        assert coord.version == 0 and torch.equal(coord.outer_params["lam"], torch.ones(n))
        assert coord.stats()["errors_by_code"] == {"non_finite": 1}
        g[n // 2] = 2.0  # a finite one is applied: λ − 0.5·g
        reply = _rpc(
            c,
            Commit(
                request_id=4, worker_id="w", version=0, commit_id="c4", hypergradient={"lam": g}
            ),
        )
        assert isinstance(reply, CommitReply) and reply.status == "accepted"
        assert torch.equal(coord.outer_params["lam"], torch.ones(n) - 0.5 * g)


@pytest.mark.timeout(60)
def test_lambda_sent_zero_copy_is_a_consistent_snapshot_while_steps_go_on() -> None:
    """A reader floods checkouts of a 4 MB λ (sent zero-copy, without waiting) while a writer
    commits as fast as it can; every λ received must be exactly one version's λ."""
    n, lr, steps = 1 << 20, 0.5, 40
    with (
        Coordinator(
            {"lam": torch.zeros(n)},
            port=0,
            optimizer="sgd",
            outer_lr=lr,
            max_staleness=10**6,
            max_in_flight=10**6,
            decay=1.0,
            aggregation="buffered",  # every commit a full step: λ = −lr · version
        ) as coord,
        ClientTransport(coord.address, identity=b"reader") as reader,
        ClientTransport(coord.address, identity=b"writer") as writer,
    ):
        _rpc(reader, Register(request_id=0, worker_id="reader"))
        _rpc(writer, Register(request_id=0, worker_id="writer"))
        for v in range(steps):
            for i in range(3):  # not waiting: answered, zero-copy, just before the next step
                assert reader.send(encode(Checkout(request_id=3 * v + i, worker_id="reader")))
            co = _rpc(writer, Checkout(request_id=2 * v + 1, worker_id="writer"))
            assert isinstance(co, CheckoutReply) and co.version == v
            reply = _rpc(
                writer,
                Commit(
                    request_id=2 * v + 2,
                    worker_id="writer",
                    version=v,
                    commit_id=f"c{v}",
                    hypergradient={"lam": torch.ones(n)},
                ),
            )
            assert isinstance(reply, CommitReply) and reply.status == "accepted"
        seen = set()
        for _ in range(3 * steps):
            frames = reader.recv(timeout_ms=10_000)
            assert frames is not None
            got = decode(frames)
            assert isinstance(got, CheckoutReply) and got.status == "granted"
            lam = got.outer_params["lam"]
            assert torch.equal(lam, torch.full((n,), -lr * got.version)), got.version
            seen.add(got.version)
        assert coord.version == steps and len(seen) > 1
