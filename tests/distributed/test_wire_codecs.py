"""Codecs on the wire: a worker announces its codec in Register; its commits carry encoded
parts, which a real coordinator (real sockets on 127.0.0.1) decodes against λ before applying.

With ``optimizer="sgd"`` and ``outer_lr=1.0`` a lone fresh commit moves λ by exactly minus the
decoded payload, so "decoded and applied" is checked bitwise. Refused commits (codec mismatch,
malformed parts) and refused registrations (unsupported codec) change nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from chronos.communication.codecs import parse_codec
from chronos.communication.feedback import decode_dict, encode_dict
from chronos.distributed.coordinator import Coordinator
from chronos.distributed.messages import (
    Checkout,
    CheckoutReply,
    Commit,
    CommitReply,
    ErrorReply,
    Message,
    Register,
    Registered,
)
from chronos.distributed.transport import ClientTransport

pytestmark = pytest.mark.timeout(60)


def lam0() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(64, generator=g),
        "b": torch.randn(3, 5, generator=g, dtype=torch.float64),
    }


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    c = Coordinator(lam0(), port=0, optimizer="sgd", outer_lr=1.0, min_commits=1,
                    max_in_flight=100, max_staleness=100, aggregation="buffered")
    c.start()
    try:
        yield c
    finally:
        c.stop()


class Peer:
    """A raw worker: one DEALER socket, request/reply by request id."""

    def __init__(self, address: str, wid: str) -> None:
        self.wid = wid
        self.t = ClientTransport(address, identity=wid.encode())
        self.rid = 0

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def call(self, msg: Message, timeout_ms: int = 10_000) -> Message:
        self.t.send_message(msg)
        while True:
            reply = self.t.recv_message(timeout_ms=timeout_ms)
            assert reply is not None, f"no reply to {msg.op}"
            if reply.request_id == msg.request_id:
                return reply

    def register(self, codec: str = "identity") -> Message:
        return self.call(Register(request_id=self.next_rid(), worker_id=self.wid, codec=codec))

    def checkout(self, have: int = -1) -> CheckoutReply:
        r = self.call(Checkout(request_id=self.next_rid(), worker_id=self.wid, have_version=have))
        assert isinstance(r, CheckoutReply) and r.status in ("granted", "not_modified"), r
        return r

    def commit(self, version: int, parts: dict[str, torch.Tensor], codec: str,
               updates: int = 1) -> Message:
        rid = self.next_rid()
        return self.call(Commit(request_id=rid, worker_id=self.wid, version=version,
                                commit_id=f"{self.wid}-{rid}", hypergradient=parts,
                                codec=codec, updates=updates))

    def close(self) -> None:
        self.t.close()


@pytest.fixture
def peer(coordinator: Coordinator) -> Iterator[Peer]:
    p = Peer(coordinator.address, "w0")
    try:
        yield p
    finally:
        p.close()


def grad_like(lam: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in lam.items()}


@pytest.mark.parametrize("spec", ["int8", "topk:0.1", "topk:0.2+int8", "fp16", "bf16",
                                  "int8:stochastic"])
def test_encoded_commits_are_decoded_and_applied_exactly(
    coordinator: Coordinator, peer: Peer, spec: str
) -> None:
    assert isinstance(peer.register(spec), Registered)
    codec = parse_codec(spec)
    for i in range(3):
        r = peer.checkout()
        before = coordinator.outer_params
        parts = encode_dict(codec, grad_like(before, i))
        reply = peer.commit(r.version, parts, codec.spec, updates=2)
        assert isinstance(reply, CommitReply) and reply.status == "accepted", reply
        decoded = decode_dict(codec, parts, before)
        after = coordinator.outer_params
        for k in before:  # sgd, lr 1, weight 1, one commit per step: λ ← λ − decoded
            assert torch.equal(after[k], before[k] - decoded[k]), (spec, k)
    s = coordinator.stats()
    assert s["version"] == 3 and s["commits_accepted"] == 3
    assert s["hypergradients_accepted"] == 6
    assert s["worker_codecs"] == {"w0": codec.spec}


def test_identity_commits_still_carry_plain_tensors(coordinator: Coordinator, peer: Peer) -> None:
    assert isinstance(peer.register(), Registered)
    r = peer.checkout()
    g = grad_like(r.outer_params, 1)
    assert isinstance(peer.commit(r.version, g, "identity"), CommitReply)
    assert torch.equal(coordinator.outer_params["a"], r.outer_params["a"] - g["a"])


def _unchanged(coordinator: Coordinator, version: int, lam: dict[str, torch.Tensor]) -> None:
    assert coordinator.version == version
    now = coordinator.outer_params
    assert all(torch.equal(now[k], lam[k]) for k in lam)


def test_codec_mismatch_is_refused_and_changes_nothing(
    coordinator: Coordinator, peer: Peer
) -> None:
    assert isinstance(peer.register("int8"), Registered)
    r = peer.checkout()
    lam = coordinator.outer_params
    parts = encode_dict("topk:0.1", grad_like(lam, 0))
    reply = peer.commit(r.version, parts, "topk:0.1")
    assert isinstance(reply, ErrorReply) and reply.code == "codec_mismatch"
    assert "int8" in reply.message and "topk:0.1" in reply.message
    # a plain (identity) commit from an int8 worker is a mismatch too: never silently misread
    reply = peer.commit(r.version, grad_like(lam, 0), "identity")
    assert isinstance(reply, ErrorReply) and reply.code == "codec_mismatch"
    # the canonical spelling of the registered codec is fine
    ok = peer.commit(r.version, encode_dict("int8", grad_like(lam, 0)), "INT8")
    assert isinstance(ok, CommitReply) and ok.status == "accepted"
    assert coordinator.stats()["errors_by_code"]["codec_mismatch"] == 2


def test_unsupported_codec_registration_is_refused(coordinator: Coordinator) -> None:
    p = Peer(coordinator.address, "bad")
    try:
        reply = p.register("gzip:9")
        assert isinstance(reply, ErrorReply) and reply.code == "unsupported_codec"
        assert "gzip:9" in reply.message
        assert coordinator.stats()["workers_alive"] == 0
        assert isinstance(p.register("int8"), Registered)  # the same id may then register
    finally:
        p.close()


def test_codec_allow_list() -> None:
    c = Coordinator(lam0(), port=0, optimizer="sgd", outer_lr=1.0, codecs=["int8", "TopK:0.10"])
    c.start()
    peers = [Peer(c.address, f"w{i}") for i in range(4)]
    try:
        refused = peers[0].register("fp16")
        assert isinstance(refused, ErrorReply) and refused.code == "unsupported_codec"
        assert "int8" in refused.message and "topk:0.1" in refused.message
        assert isinstance(peers[1].register("int8"), Registered)
        assert isinstance(peers[2].register("topk:0.1"), Registered)  # canonical match
        assert isinstance(peers[3].register("identity"), Registered)  # always allowed
        assert c.stats()["workers_alive"] == 3
    finally:
        for p in peers:
            p.close()
        c.stop()


def _malformed_topk(lam: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    good = encode_dict("topk:0.1", grad_like(lam, 0))
    out_of_range = dict(good)
    idx = good["a/indices"].clone()
    idx[-1] = lam["a"].numel()  # one past the end
    out_of_range["a/indices"] = idx
    negative = dict(good)
    idx = good["a/indices"].clone()
    idx[0] = -1
    negative["a/indices"] = idx
    wrong_dtype = dict(good)
    wrong_dtype["a/values"] = good["a/values"].to(torch.float16)
    missing = {k: v for k, v in good.items() if k != "b/values"}
    unknown_key = dict(good, **{"zzz/values": torch.zeros(2)})
    too_many = dict(good)
    too_many["a/values"] = torch.zeros(good["a/values"].numel() + 1)
    return [("out_of_range", out_of_range), ("negative", negative),
            ("wrong_dtype", wrong_dtype), ("missing", missing), ("unknown_key", unknown_key),
            ("too_many", too_many)]


def test_malformed_encoded_parts_are_refused(coordinator: Coordinator, peer: Peer) -> None:
    assert isinstance(peer.register("topk:0.1"), Registered)
    r = peer.checkout()
    lam = coordinator.outer_params
    for name, parts in _malformed_topk(lam):
        reply = peer.commit(r.version, parts, "topk:0.1")
        assert isinstance(reply, ErrorReply) and reply.code == "bad_tensor", (name, reply)
        _unchanged(coordinator, 0, lam)
    # int8 parts with a NaN scale decode to NaN: refused as non-finite, nothing applied
    parts = encode_dict("int8", grad_like(lam, 0))
    p2 = Peer(coordinator.address, "w8")
    try:
        assert isinstance(p2.register("int8"), Registered)
        r2 = p2.checkout()
        parts["a/scale"] = torch.tensor(float("nan"))
        reply = p2.commit(r2.version, parts, "int8")
        assert isinstance(reply, ErrorReply) and reply.code in ("bad_tensor", "non_finite")
        bad_updates = p2.commit(r2.version, encode_dict("int8", grad_like(lam, 0)), "int8",
                                updates=0)
        assert isinstance(bad_updates, ErrorReply) and bad_updates.code == "malformed"
    finally:
        p2.close()
    _unchanged(coordinator, 0, lam)
    # the lease survived every refusal: a good commit is still accepted
    ok = peer.commit(r.version, encode_dict("topk:0.1", grad_like(lam, 0)), "topk:0.1")
    assert isinstance(ok, CommitReply) and ok.status == "accepted"
    assert coordinator.version == 1
