"""The coordinator with a MultiTimescaleConfig: the state machine (no sockets) and the CLI."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from chronos.cli import main
from chronos.continuum import MultiTimescaleConfig, MultiTimescaleOptimizer, TimescaleConfig
from chronos.core.errors import ConfigError
from chronos.distributed.aggregation import CoordinatorConfig, build_outer_optimizer
from chronos.distributed.coordinator import Coordinator
from chronos.distributed.messages import Checkout, CheckoutReply, Commit, CommitReply, Register
from chronos.distributed.state import CoordinatorState

F64 = torch.float64
HERE = Path(__file__).resolve().parent
TOY = "test_worker:toy_problem"
RIDS = itertools.count(1)  # request / commit ids unique across states (a restored one dedupes)


def lam0() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([1.0, 2.0], dtype=F64), "b": torch.tensor(0.5, dtype=F64)}


def slow_b() -> MultiTimescaleConfig:
    # "b" every 2nd outer step; "a" (unclaimed) every step; SGD with step 0.5 for both
    return MultiTimescaleConfig([TimescaleConfig("b", update_frequency=2)], optimizer="sgd",
                                lr=0.5)


class Sync:
    """Two workers in sync mode: every outer step averages their two commits."""

    def __init__(self, state: CoordinatorState) -> None:
        self.s = state
        self.rids = RIDS
        for w in ("w0", "w1"):
            self.s.handle(w, Register(request_id=next(self.rids), worker_id=w), now=0.0)

    def step(self, k: int) -> None:
        version = self.s.version
        g = {"w0": {"a": [k, 2 * k], "b": -k}, "w1": {"a": [3 * k, 0], "b": -3 * k}}
        for w in ("w0", "w1"):
            out = self.s.handle(w, Checkout(request_id=next(self.rids), worker_id=w), now=0.0)
            assert isinstance(out[0].message, CheckoutReply) and out[0].message.status == "granted"
        for w in ("w0", "w1"):
            rid = next(self.rids)
            hg = {name: torch.tensor(v, dtype=F64) for name, v in g[w].items()}
            out = self.s.handle(w, Commit(request_id=rid, worker_id=w, version=version,
                                          commit_id=f"{w}-{rid}", hypergradient=hg), now=0.0)
            reply = next(o.message for o in out if isinstance(o.message, CommitReply))
            assert reply.status == "accepted", reply
        assert self.s.version == version + 1


def sync_state(**kw: Any) -> CoordinatorState:
    cfg = CoordinatorConfig(mode="sync", num_workers=2, optimizer=slow_b(), lease_timeout=5.0,
                            heartbeat_interval=1.0, **kw)
    return CoordinatorState(lam0(), cfg)


def lam(state: CoordinatorState) -> tuple[list[float], float]:
    p = state.outer_params
    return p["a"].tolist(), p["b"].item()


def test_the_slow_group_steps_every_f_outer_steps_with_the_mean_of_the_aggregates() -> None:
    s = sync_state()
    assert isinstance(s._optimizer, MultiTimescaleOptimizer)
    assert s.config.worker_config()["optimizer"] == "custom"
    d = Sync(s)
    # step k aggregates a: ([k, 2k] + [3k, 0]) / 2 = [2k, k] and b: (−k − 3k) / 2 = −2k;
    # a ← a − 0.5·[2k, k] every step; b ← b − 0.5·mean(−2(k−1), −2k) at k = 2, 4
    hand = [([0.0, 1.5], 0.5), ([-2.0, 0.5], 2.0), ([-5.0, -1.0], 2.0), ([-9.0, -3.0], 5.5)]
    for k, expected in enumerate(hand, start=1):
        d.step(k)
        assert lam(s) == expected, k


def test_a_restored_coordinator_state_continues_the_window_exactly() -> None:
    whole = sync_state()
    d = Sync(whole)
    for k in range(1, 4):
        d.step(k)
    first = sync_state()
    Sync(first).step(1)  # mid-window for "b": one aggregate accumulated
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    restored = sync_state()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    d2 = Sync(restored)
    for k in (2, 3):
        d2.step(k)
    assert lam(restored) == lam(whole) == ([-5.0, -1.0], 2.0)


def test_a_timescale_naming_no_outer_param_fails_at_construction() -> None:
    cfg = CoordinatorConfig(optimizer=MultiTimescaleConfig([TimescaleConfig("nope", 2)]))
    with pytest.raises(ConfigError, match=r"'nope' matches no outer parameter; the outer "
                                          r"parameters are \['a', 'b'\]"):
        CoordinatorState(lam0(), cfg)
    with pytest.raises(ConfigError, match="needs the outer parameters' names"):
        build_outer_optimizer(slow_b(), [torch.zeros(1, requires_grad=True)], 0.1)


def test_coordinator_passes_a_multi_timescale_config_through() -> None:
    c = Coordinator(lam0(), port=0, optimizer=slow_b())
    assert c.config.optimizer == slow_b()
    assert c.config.outer_optimizer()[0] == slow_b()


# -- CLI -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("lam", "expected NAME=FREQ[:OPTIMIZER[:LR]]"),
        ("lam=0", "update_frequency must be an int >= 1"),
        ("lam=x", "FREQ must be an int >= 1, got 'x'"),
        ("lam=2:rmsprop", "optimizer must be one of"),
        ("lam=2:sgd:-1", "lr must be a finite number > 0"),
        ("lam=2:sgd:0.1:9", "expected NAME=FREQ[:OPTIMIZER[:LR]]"),
    ],
)
def test_a_bad_timescale_spec_is_a_usage_error(spec: str, needle: str, capsys: Any) -> None:
    assert main(["run", TOY, "--timescale", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --timescale" in err[0] and needle in err[0], err


def test_an_unknown_timescale_name_is_one_error_line(capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    assert main(["coordinator", "--problem", TOY, "--port", "0", "--timescale", "nope=2"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "'nope' matches no outer parameter" in err[0] and "['lam']" in err[0]
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.timeout(60)
def test_chronos_run_with_a_timescale_updates_lambda_every_second_step(
    tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    from test_worker import Toy

    report = tmp_path / "run.json"
    code = main(["run", TOY, "--workers", "1", "--mode", "sync", "--steps", "4",
                 "--timescale", "lam=2:sgd:1", "--heartbeat-interval", "0.2", "--quiet",
                 "--json", str(report)])
    assert code == 0, capsys.readouterr()
    result = json.loads(report.read_text())
    assert result["config"]["optimizer"]["timescales"][0]["name"] == "lam"
    # steps 1-2 both see λ = 0: λ₂ = 0 − 1·g(0); steps 3-4 both see λ₂: λ₄ = λ₂ − 1·g(λ₂)
    toy = Toy()
    lam2 = -toy.closed_form_hypergradient(torch.zeros(toy.n, dtype=F64))
    lam4 = lam2 - toy.closed_form_hypergradient(lam2)
    assert torch.allclose(lam2, torch.full_like(lam2, 1 / 16))
    got = torch.tensor(result["outer_params"]["lam"], dtype=F64)
    torch.testing.assert_close(got, lam4, rtol=0, atol=1e-6)
