"""Defaults that agree (one source), config/keyword conflicts, min_commits="auto", the
window/staleness warning and lease cancellation in the pure state machine."""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Any

import pytest
import torch

from chronos.core.errors import ConfigError
from chronos.distributed import defaults
from chronos.distributed.aggregation import (
    CoordinatorConfig,
    WindowStalenessWarning,
    effective_min_commits,
)
from chronos.distributed.coordinator import Coordinator
from chronos.distributed.messages import (
    Checkout,
    CheckoutReply,
    Commit,
    CommitReply,
    Deregister,
    LeaseCancelled,
    Register,
)
from chronos.distributed.state import CoordinatorState, Outgoing

F64 = torch.float64


def lam() -> dict[str, torch.Tensor]:
    return {"lam": torch.zeros(2, dtype=F64)}


G = {"lam": torch.tensor([1.0, -1.0], dtype=F64)}


# -- one source of defaults ------------------------------------------------------------------


def test_config_and_coordinator_defaults_come_from_the_defaults_module() -> None:
    cfg = CoordinatorConfig()
    assert (cfg.max_in_flight, cfg.max_staleness, cfg.decay, cfg.min_commits) == (
        defaults.MAX_IN_FLIGHT, defaults.MAX_STALENESS, defaults.DECAY, defaults.MIN_COMMITS)
    assert (cfg.lease_timeout, cfg.heartbeat_interval) == (
        defaults.LEASE_TIMEOUT, defaults.HEARTBEAT_INTERVAL)
    assert cfg.outer_optimizer() == (defaults.OUTER_OPTIMIZER,
                                      defaults.OUTER_LR[defaults.OUTER_OPTIMIZER])
    coord = Coordinator(lam(), port=0)  # never started: nothing bound
    resolved = dataclasses.replace(cfg, optimizer="adam", outer_lr=0.05)
    assert coord.config == resolved
    assert coord.config.outer_optimizer() == cfg.outer_optimizer() == ("adam", 0.05)
    # the window can never grant work that cannot be accepted with the defaults
    assert defaults.MAX_STALENESS >= defaults.MAX_IN_FLIGHT + 1


def test_optimizer_defaults_follow_the_user_then_the_problem_then_adam() -> None:
    class Problem:
        default_outer_lr = 30.0

        def default_outer_params(self) -> dict[str, torch.Tensor]:
            return lam()

    assert Coordinator(port=0, problem=Problem()).config.outer_optimizer() == ("sgd", 30.0)
    assert Coordinator(lam(), port=0, problem=Problem(), optimizer="adam"
                       ).config.outer_optimizer() == ("adam", 0.05)
    assert Coordinator(lam(), port=0, optimizer="sgd").config.outer_optimizer() == ("sgd", 0.1)
    assert Coordinator(lam(), port=0, outer_lr=0.2).config.outer_optimizer() == ("adam", 0.2)
    # a config keeps what was given, so replace() does not carry another optimizer's step size
    sgd = dataclasses.replace(CoordinatorConfig(), optimizer="sgd")
    assert sgd.outer_optimizer() == ("sgd", 0.1)
    with pytest.raises(ConfigError, match="outer_params"):
        Coordinator(port=0)


@pytest.mark.parametrize("kw", [{"max_staleness": 7}, {"optimizer": None},
                                {"min_commits": 1, "decay": 0.5}])
def test_config_plus_a_keyword_setting_is_refused_with_what_to_do(kw: dict[str, Any]) -> None:
    cfg = CoordinatorConfig(max_staleness=5)
    with pytest.raises(ConfigError) as info:
        Coordinator(lam(), port=0, config=cfg, **kw)
    msg = str(info.value)
    assert "dataclasses.replace" in msg and all(k in msg for k in kw)
    # what the message suggests works, and non-settings (port, host...) are fine with config
    coord = Coordinator(lam(), port=0, host="127.0.0.1",
                        config=dataclasses.replace(cfg, **kw))
    assert all(getattr(coord.config, k) == v for k, v in kw.items())


def test_window_wider_than_staleness_warns_and_coherent_settings_do_not() -> None:
    with pytest.warns(WindowStalenessWarning, match="max_staleness >= max_in_flight") as rec:
        CoordinatorConfig(max_in_flight=3, max_staleness=2)
    assert rec[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CoordinatorConfig()
        CoordinatorConfig(max_in_flight=2, max_staleness=2)
        CoordinatorConfig(mode="sync", num_workers=2, max_in_flight=3, max_staleness=0)
    with pytest.raises(ConfigError, match="'auto'"):
        CoordinatorConfig(min_commits="half")  # type: ignore[arg-type]


# -- min_commits="auto" ----------------------------------------------------------------------


class Driver:
    def __init__(self, **kw: Any) -> None:
        kw.setdefault("optimizer", "sgd")
        kw.setdefault("outer_lr", 1.0)
        self.s = CoordinatorState(lam(), CoordinatorConfig(**kw))
        self.rids = itertools.count(1)
        self.now = 0.0
        self.grants: dict[str, int] = {}  # worker -> request id of its last granting checkout

    def send(self, wid: str, msg: Any) -> list[Outgoing]:
        out = self.s.handle(wid, msg, self.now)
        for o in out:
            m = o.message
            if isinstance(m, CheckoutReply) and m.status != "deferred":
                self.grants[o.to] = m.request_id
        return out

    def join(self, *wids: str) -> None:
        for w in wids:
            self.send(w, Register(request_id=next(self.rids), worker_id=w))
            self.checkout(w)

    def checkout(self, w: str) -> list[Outgoing]:
        return self.send(w, Checkout(request_id=next(self.rids), worker_id=w))

    def commit(self, w: str, version: int) -> list[Outgoing]:
        rid = next(self.rids)
        return self.send(w, Commit(request_id=rid, worker_id=w, version=version,
                                   commit_id=f"{w}-{rid}", hypergradient=G))


def test_auto_min_commits_is_half_the_live_workers_rounded_up() -> None:
    assert [effective_min_commits("auto", n) for n in range(7)] == [1, 1, 1, 2, 2, 3, 3]
    assert effective_min_commits(5, 1) == 5
    d = Driver()
    d.join("a")
    d.commit("a", 0)
    assert d.s.version == 1  # alone: every commit steps
    d.join("b", "c", "d")
    assert d.s.stats()["min_commits"] == 2
    for w in ("b", "c"):
        d.commit(w, 1)
    assert d.s.version == 2 and d.s.history[-1]["commits"] == 2
    d.commit("d", 1)  # one commit buffered, waiting for a second
    assert d.s.version == 2 and d.s.stats()["buffered_commits"] == 1
    # two workers leave: "auto" now needs 1 commit, so the buffered one steps at once
    d.send("b", Deregister(request_id=next(d.rids), worker_id="b"))
    assert d.s.version == 2  # 3 alive: still 2
    d.send("c", Deregister(request_id=next(d.rids), worker_id="c"))
    assert d.s.version == 3 and d.s.history[-1]["commits"] == 1


def test_an_int_min_commits_still_works_as_before() -> None:
    d = Driver(min_commits=3)
    d.join("a", "b")
    for _ in range(2):
        d.commit("a", 0)
        d.checkout("a")
    assert d.s.version == 0
    d.commit("b", 0)
    assert d.s.version == 1 and d.s.history[-1]["commits"] == 3


# -- lease cancellation (pure state machine) --------------------------------------------------


@pytest.mark.filterwarnings("ignore::chronos.distributed.aggregation.WindowStalenessWarning")
def test_a_lease_that_can_no_longer_be_accepted_is_cancelled_and_its_worker_told() -> None:
    d = Driver(max_in_flight=3, max_staleness=2, min_commits=1)  # the seed README's pair
    d.join("slow", "fast")
    slow_rid = d.grants["slow"]
    cancels: list[Outgoing] = []
    for v in range(3):
        out = d.commit("fast", v)
        cancels += [o for o in out if isinstance(o.message, LeaseCancelled)]
        if v < 2:
            assert not cancels
            d.checkout("fast")
    assert d.s.version == 3
    # V − 0 = 3 > max_staleness: the slow lease is dropped and its worker told, with the
    # request id of the checkout that granted it
    assert len(cancels) == 1 and cancels[0].to == "slow"
    msg = cancels[0].message
    assert (msg.request_id, msg.version, msg.current_version) == (slow_rid, 0, 3)
    assert "max_staleness 2" in msg.reason
    assert "slow" not in d.s.leases and d.s.stats()["leases_cancelled"] == 1
    # it no longer holds the window: the fast worker is granted version 3 at once
    out = d.checkout("fast")
    assert out[0].message.status == "granted" and out[0].message.version == 3
    # a commit of the cancelled work that still arrives is rejected, nothing applied
    before = d.s.outer_params
    reply = d.commit("slow", 0)[0].message
    assert isinstance(reply, CommitReply) and reply.status == "rejected"
    assert torch.equal(d.s.outer_params["lam"], before["lam"])


def test_no_lease_is_ever_cancelled_at_the_defaults_with_a_fixed_set_of_workers() -> None:
    """max_staleness >= max_in_flight + 1 with min_commits="auto": the slowest live lease
    always lands (state.py's window-vs-staleness rule), for 2 to 9 equally fast workers and a
    straggler 5x slower."""
    for n in range(2, 10):
        d = Driver()
        names = [f"w{i}" for i in range(n)]
        d.join(*names)
        lease_v = {w: 0 for w in names}
        finish = {w: (5.0 if w == "w0" else 1.0) + 0.01 * i for i, w in enumerate(names)}
        waiting: set[str] = set()
        for _ in range(40 * n):
            w = min((x for x in names if x not in waiting), key=finish.__getitem__)
            d.now = finish[w]
            out = d.commit(w, lease_v[w])
            assert out[0].message.status == "accepted", (n, out[0].message)
            out += d.checkout(w)
            assert not [o for o in out if isinstance(o.message, LeaseCancelled)]
            for o in out:
                m = o.message
                if isinstance(m, CheckoutReply) and m.status == "deferred":
                    waiting.add(o.to)
                elif isinstance(m, CheckoutReply):
                    waiting.discard(o.to)
                    lease_v[o.to] = m.version
                    finish[o.to] = d.now + (5.0 if o.to == "w0" else 1.0)
        assert d.s.stats()["commits_rejected"] == 0 and d.s.stats()["leases_cancelled"] == 0
