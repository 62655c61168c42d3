"""MultiTimescaleOptimizer: gating, mean accumulation, per-group optimizers, checkpoints, errors."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from chronos.continuum import MultiTimescaleConfig, MultiTimescaleOptimizer, TimescaleConfig
from chronos.continuum.timescale import DEFAULT_LR, DEFAULT_OPTIMIZER, resolve_timescales
from chronos.core.errors import (
    ChronosTypeError,
    ConfigError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
)

F64 = torch.float64

SEED_SNIPPET = '''
from chronos.continuum import MultiTimescaleOptimizer, TimescaleConfig

config = MultiTimescaleConfig(timescales=[
    TimescaleConfig("lr", update_frequency=1),        # Fast (every step)
    TimescaleConfig("weight_decay", update_frequency=10),  # Medium
    TimescaleConfig("dropout", update_frequency=50),  # Slow
])
optimizer = MultiTimescaleOptimizer(outer_params, config)
'''


def leaves(**values: Any) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=F64, requires_grad=True) for k, v in values.items()}


def sgd(*timescales: TimescaleConfig, lr: float = 0.1, **kw: Any) -> MultiTimescaleConfig:
    return MultiTimescaleConfig(list(timescales), optimizer="sgd", lr=lr, **kw)


def values(params: dict[str, torch.Tensor]) -> dict[str, list[float] | float]:
    return {k: v.detach().tolist() for k, v in params.items()}


# -- the seed's snippet and the defaults -----------------------------------------------------------


def test_the_seed_snippet_runs_as_written_on_an_implicit_differentiation_s_outer_params() -> None:
    from chronos.solver import ImplicitDifferentiation

    outer = ImplicitDifferentiation(
        outer_params={"lr": torch.tensor(0.01), "weight_decay": torch.tensor(1e-4),
                      "dropout": torch.tensor(0.2)}, lr=0.001,
    ).outer_params
    ns: dict[str, Any] = {"outer_params": outer, "MultiTimescaleConfig": MultiTimescaleConfig}
    exec(SEED_SNIPPET, ns)
    opt = ns["optimizer"]
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.timescales == {"lr": (1, ("lr",)), "weight_decay": (10, ("weight_decay",)),
                              "dropout": (50, ("dropout",))}
    assert [g["optimizer"] for g in opt.param_groups] == ["adam"] * 3
    before = {k: v.item() for k, v in outer.items()}
    for _ in range(10):  # lr moves every step, weight_decay once, dropout not yet
        opt.step({k: torch.ones_like(v) for k, v in outer.items()})
    assert outer["lr"].item() < before["lr"] - 0.4  # Adam: ~lr 0.05 per step, 10 steps
    assert outer["weight_decay"].item() == pytest.approx(before["weight_decay"] - 0.05)
    assert outer["dropout"].item() == before["dropout"]


def test_defaults_learn_and_equal_the_distributed_runtime_s() -> None:
    from chronos.distributed import defaults

    assert DEFAULT_OPTIMIZER == defaults.OUTER_OPTIMIZER
    assert DEFAULT_LR == defaults.OUTER_LR[defaults.OUTER_OPTIMIZER]
    cfg = MultiTimescaleConfig([TimescaleConfig("a")])
    assert (cfg.optimizer, cfg.lr, cfg.default_frequency) == (DEFAULT_OPTIMIZER, DEFAULT_LR, 1)
    assert isinstance(cfg.timescales, tuple) and hash(cfg) == hash(
        MultiTimescaleConfig((TimescaleConfig("a"),)))


# -- gating and accumulation ---------------------------------------------------------------------


def test_frequencies_1_and_3_over_7_steps_match_the_hand_computed_sequence() -> None:
    lam = leaves(a=1.0, b=2.0)
    opt = MultiTimescaleOptimizer(lam, sgd(TimescaleConfig("b", update_frequency=3), lr=0.1))
    seen = []
    for t in range(1, 8):
        lam["a"].grad = torch.tensor(float(t), dtype=F64)
        lam["b"].grad = torch.tensor(10.0 * t, dtype=F64)
        assert opt.due() == (("b", "default") if t % 3 == 0 else ("default",))
        opt.step()
        seen.append((lam["a"].item(), lam["b"].item()))
    # a: a ← a − 0.1·t every step; b: at t = 3, 6: b ← b − 0.1·mean(10·(t−2), 10·(t−1), 10·t)
    hand = [(0.9, 2.0), (0.7, 2.0), (0.4, 0.0), (0.0, 0.0), (-0.5, 0.0), (-1.1, -5.0),
            (-1.8, -5.0)]
    for (a, b), (ha, hb) in zip(seen, hand, strict=True):
        assert a == pytest.approx(ha, abs=1e-12) and b == pytest.approx(hb, abs=1e-12)
    state = opt.state_dict()
    assert opt.num_steps == state["num_steps"] == 7
    assert state["groups"]["b"]["count"] == 1
    assert state["groups"]["b"]["accumulators"]["b"].item() == 70.0
    assert state["groups"]["default"] == {"count": 0, "accumulators": {},
                                          "optimizer": state["groups"]["default"]["optimizer"]}


def test_a_missing_grad_counts_as_zero_and_a_group_without_any_is_skipped() -> None:
    lam = leaves(a=1.0, b=1.0, c=1.0)
    cfg = MultiTimescaleConfig([TimescaleConfig("slow", 2, params=("b", "c"))], optimizer="adam")
    opt = MultiTimescaleOptimizer(lam, cfg)
    lam["a"].grad = torch.tensor(1.0, dtype=F64)
    opt.step()  # b, c: no grad
    lam["b"].grad = torch.tensor(4.0, dtype=F64)
    ref_b = torch.tensor(1.0, dtype=F64, requires_grad=True)
    ref = torch.optim.Adam([ref_b], lr=DEFAULT_LR)
    ref_b.grad = torch.tensor(2.0, dtype=F64)  # mean of (0, 4) over the window of 2
    ref.step()
    opt.step()
    assert lam["b"].item() == ref_b.item()
    assert lam["c"].item() == 1.0 and lam["c"].grad is None  # never had a gradient: not moved


def test_adam_group_gets_the_mean_gradient_of_its_window() -> None:
    torch.manual_seed(0)
    lam = {"w": torch.randn(5, dtype=F64, requires_grad=True)}
    ref_w = lam["w"].detach().clone().requires_grad_(True)
    opt = MultiTimescaleOptimizer(lam, MultiTimescaleConfig([TimescaleConfig("w", 3, lr=0.01)]))
    ref = torch.optim.Adam([ref_w], lr=0.01)
    grads = [torch.randn(5, dtype=F64) for _ in range(9)]
    for t, g in enumerate(grads, start=1):
        lam["w"].grad = g
        opt.step()
        if t % 3 == 0:
            ref_w.grad = (grads[t - 3].clone().add_(grads[t - 2]).add_(grads[t - 1])).div_(3)
            ref.step()
        torch.testing.assert_close(lam["w"].detach(), ref_w.detach(), rtol=0, atol=1e-15)
    assert opt.state_dict()["groups"]["w"]["optimizer"]["state"][0]["step"].item() == 3


def test_each_timescale_uses_its_own_optimizer_and_step_size() -> None:
    torch.manual_seed(1)
    lam = {k: torch.randn(3, dtype=F64, requires_grad=True) for k in ("x", "y", "z")}
    cfg = MultiTimescaleConfig(
        [TimescaleConfig("x", 1, optimizer="sgd", lr=0.5),
         TimescaleConfig("y", 1, optimizer="momentum", lr=0.1)],
        optimizer="adam", lr=0.02,
    )
    opt = MultiTimescaleOptimizer(lam, cfg)
    refs = {k: v.detach().clone().requires_grad_(True) for k, v in lam.items()}
    ref_opts = [torch.optim.SGD([refs["x"]], lr=0.5),
                torch.optim.SGD([refs["y"]], lr=0.1, momentum=0.9),
                torch.optim.Adam([refs["z"]], lr=0.02)]
    assert [(g["label"], g["optimizer"], g["lr"]) for g in opt.param_groups] == [
        ("x", "sgd", 0.5), ("y", "momentum", 0.1), ("default", "adam", 0.02)]
    for _ in range(4):
        for k in lam:
            g = torch.randn(3, dtype=F64)
            lam[k].grad, refs[k].grad = g, g.clone()
        opt.step()
        for o in ref_opts:
            o.step()
    for k in lam:
        torch.testing.assert_close(lam[k].detach(), refs[k].detach(), rtol=0, atol=1e-15)


def test_param_groups_lr_is_the_group_s_step_size_also_after_a_restore() -> None:
    lam = leaves(a=1.0)
    opt = MultiTimescaleOptimizer(lam, sgd(lr=0.1))
    opt.param_groups[0]["lr"] = 1.0  # what an LR scheduler does
    lam["a"].grad = torch.tensor(0.5, dtype=F64)
    opt.step()
    assert lam["a"].item() == 0.5
    opt.load_state_dict(opt.state_dict())
    opt.param_groups[0]["lr"] = 2.0
    opt.step()
    assert lam["a"].item() == -0.5


def test_params_stay_the_same_leaf_tensors_and_grads_are_left_as_they_were() -> None:
    lam = leaves(a=[1.0, 2.0], b=3.0)
    ids = {k: id(v) for k, v in lam.items()}
    opt = MultiTimescaleOptimizer(lam, sgd(TimescaleConfig("b", 2)))
    grads = {k: torch.ones_like(v) for k, v in lam.items()}
    for k, v in lam.items():
        v.grad = grads[k]
    for _ in range(4):
        opt.step()
    for k, v in lam.items():
        assert id(v) == ids[k] and opt.outer_params[k] is v
        assert v.is_leaf and v.requires_grad and v.grad is grads[k]
        assert grads[k].eq(1).all()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == set(ids.values())
    opt.zero_grad()
    assert all(v.grad is None for v in lam.values())


def test_step_with_a_dict_equals_the_grad_path_and_leaves_grad_alone() -> None:
    torch.manual_seed(2)
    cfg = MultiTimescaleConfig([TimescaleConfig("a", 2, optimizer="momentum", lr=0.1)])
    lam1 = {k: torch.randn(4, dtype=F64, requires_grad=True) for k in ("a", "b")}
    lam2 = {k: v.detach().clone().requires_grad_(True) for k, v in lam1.items()}
    o1, o2 = MultiTimescaleOptimizer(lam1, cfg), MultiTimescaleOptimizer(lam2, cfg)
    for _ in range(5):
        g = {k: torch.randn(4, dtype=F64) for k in lam1}
        for k, v in lam1.items():
            v.grad = g[k]
        o1.step()
        assert o2.step(g) is None
    assert all(v.grad is None for v in lam2.values())
    for k in lam1:
        assert torch.equal(lam1[k], lam2[k])


def test_a_closure_is_called_with_grad_enabled_and_its_loss_returned() -> None:
    lam = leaves(a=3.0)
    opt = MultiTimescaleOptimizer(lam, sgd(lr=0.25))

    def closure() -> float:
        opt.zero_grad()
        loss = lam["a"] ** 2
        loss.backward()
        return float(loss.detach())

    with torch.no_grad():
        assert opt.step(closure) == 9.0
    assert lam["a"].item() == 3.0 - 0.25 * 6.0


@pytest.mark.parametrize("via", ["grad", "dict"])
def test_non_finite_gradients_are_refused_and_nothing_changes(via: str) -> None:
    lam = leaves(a=[1.0, 2.0], b=3.0)
    opt = MultiTimescaleOptimizer(lam, MultiTimescaleConfig([TimescaleConfig("b", 2)]))
    opt.step({"a": torch.ones(2, dtype=F64), "b": torch.ones((), dtype=F64)})
    before, state = values(lam), opt.state_dict()
    bad = {"a": torch.tensor([1.0, math.nan], dtype=F64), "b": torch.tensor(math.inf, dtype=F64)}
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        if via == "dict":
            opt.step(bad)
        else:
            for k, v in lam.items():
                v.grad = bad[k]
            opt.step()
    assert values(lam) == before and opt.num_steps == 1
    after = opt.state_dict()
    assert after["groups"]["b"]["count"] == state["groups"]["b"]["count"] == 1
    assert torch.equal(after["groups"]["b"]["accumulators"]["b"],
                       state["groups"]["b"]["accumulators"]["b"])


def test_bad_hypergradient_dicts_say_what_is_wrong() -> None:
    lam = leaves(a=[1.0, 2.0])
    opt = MultiTimescaleOptimizer(lam, sgd())
    with pytest.raises(KeyMismatchError, match=r"missing \['a'\], unexpected \['x'\]"):
        opt.step({"x": torch.ones(2)})
    with pytest.raises(ShapeMismatchError, match="shape"):
        opt.step({"a": torch.ones(3)})
    with pytest.raises(ChronosTypeError, match="must be a tensor"):
        opt.step({"a": [1.0, 2.0]})  # type: ignore[dict-item]
    assert opt.num_steps == 0 and values(lam) == {"a": [1.0, 2.0]}


# -- checkpoints -----------------------------------------------------------------------------------


def _config() -> MultiTimescaleConfig:
    return MultiTimescaleConfig(
        [TimescaleConfig("fast", 1, params=["w*"], optimizer="momentum", lr=0.1),
         TimescaleConfig("slow", 3, params=["b"]),
         TimescaleConfig("slower", 4, params=["c"], optimizer="sgd", lr=0.2)],
        default_frequency=2,
    )


def _run(opt: MultiTimescaleOptimizer, grads: list[dict[str, torch.Tensor]]) -> None:
    for g in grads:
        opt.step(g)


def test_state_dict_round_trips_mid_window_through_torch_save_weights_only() -> None:
    torch.manual_seed(3)
    shapes = {"w1": (3,), "w2": (2, 2), "b": (), "c": (2,), "d": (1,)}
    lam0 = {k: torch.randn(s, dtype=F64) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, dtype=F64) for k, s in shapes.items()} for _ in range(11)]

    def fresh(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().requires_grad_(True) for k, v in src.items()}

    whole = fresh(lam0)
    _run(MultiTimescaleOptimizer(whole, _config()), grads)

    first = fresh(lam0)
    opt = MultiTimescaleOptimizer(first, _config())
    _run(opt, grads[:5])  # slow (3), slower (4) and default (2) all mid-window
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["num_steps"] == 5 and saved["groups"]["slow"]["count"] == 2
    second = fresh({k: v.detach() for k, v in first.items()})
    restored = MultiTimescaleOptimizer(second, _config())
    restored.load_state_dict(saved)
    _run(restored, grads[5:])
    for k in lam0:
        assert torch.equal(whole[k], second[k]), k
    assert restored.num_steps == 11


def test_state_dict_holds_copies() -> None:
    lam = leaves(a=[1.0, 2.0])
    opt = MultiTimescaleOptimizer(lam, MultiTimescaleConfig([TimescaleConfig("a", 1)]))
    opt.step({"a": torch.ones(2, dtype=F64)})
    state = opt.state_dict()
    snapshot = state["groups"]["a"]["optimizer"]["state"][0]["exp_avg"].clone()
    opt.step({"a": torch.ones(2, dtype=F64)})
    assert torch.equal(state["groups"]["a"]["optimizer"]["state"][0]["exp_avg"], snapshot)


def test_loading_a_state_of_other_timescales_is_refused_and_changes_nothing() -> None:
    lam = leaves(a=1.0, b=2.0)
    opt = MultiTimescaleOptimizer(lam, sgd(TimescaleConfig("b", 3)))
    opt.step({"a": torch.tensor(1.0, dtype=F64), "b": torch.tensor(1.0, dtype=F64)})
    other = MultiTimescaleOptimizer(leaves(a=1.0, b=2.0), sgd(TimescaleConfig("b", 2)))
    before = opt.state_dict()
    with pytest.raises(ConfigError, match="saved with timescales"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ConfigError, match="not a MultiTimescaleOptimizer state dict"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    broken = opt.state_dict()
    broken["groups"]["b"]["accumulators"] = {"b": torch.ones(3, dtype=F64)}
    with pytest.raises(ConfigError, match="accumulator 'b'"):
        opt.load_state_dict(broken)
    assert opt.num_steps == 1
    assert opt.state_dict()["groups"]["b"]["accumulators"]["b"].item() == (
        before["groups"]["b"]["accumulators"]["b"].item())


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "needle"),
    [
        (lambda: TimescaleConfig("a", update_frequency=0), ConfigError, "int >= 1"),
        (lambda: TimescaleConfig("a", update_frequency=-2), ConfigError, "int >= 1"),
        (lambda: TimescaleConfig("a", update_frequency=2.5), ConfigError, "got 2.5"),
        (lambda: TimescaleConfig("a", update_frequency=True), ConfigError, "got True"),
        (lambda: TimescaleConfig("a", update_frequency="3"), ConfigError, "got '3'"),
        (lambda: TimescaleConfig("", 1), ConfigError, "non-empty str"),
        (lambda: TimescaleConfig("a", 1, params=()), ConfigError, "non-empty sequence"),
        (lambda: TimescaleConfig("a", 1, optimizer="rmsprop"), ConfigError,
         "one of ('sgd', 'momentum', 'adam')"),
        (lambda: TimescaleConfig("a", 1, lr=0.0), ConfigError, "lr must be a finite number > 0"),
        (lambda: TimescaleConfig("a", 1, lr=-1.0), ConfigError, "got -1.0"),
        (lambda: TimescaleConfig("a", 1, lr=math.nan), ConfigError, "got nan"),
        (lambda: MultiTimescaleConfig([TimescaleConfig("a"), TimescaleConfig("a", 3)]),
         ConfigError, "two timescales are named 'a'"),
        (lambda: MultiTimescaleConfig([], optimizer="lbfgs"), ConfigError, "optimizer must be"),
        (lambda: MultiTimescaleConfig([], lr=0), ConfigError, "lr must be"),
        (lambda: MultiTimescaleConfig([], default_frequency=0), ConfigError,
         "default_frequency must be an int >= 1"),
        (lambda: MultiTimescaleConfig(["a"]), ChronosTypeError, "TimescaleConfig"),
        (lambda: MultiTimescaleConfig("a"), ChronosTypeError, "list of TimescaleConfig"),
    ],
)
def test_bad_configs_say_what_is_accepted(
    make: Callable[[], object], error: type[Exception], needle: str
) -> None:
    with pytest.raises(error) as info:
        make()
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("timescales", "needle"),
    [
        ([TimescaleConfig("dropout", 50)],
         "timescale 'dropout': 'dropout' matches no outer parameter; the outer parameters are "
         "['lr', 'wd_1', 'wd_2']"),
        ([TimescaleConfig("decays", 5, params=["decay_*"])], "'decay_*' matches no outer"),
        ([TimescaleConfig("decays", 5, params=["wd_*"]), TimescaleConfig("wd_2", 3)],
         "outer parameter 'wd_2' is claimed by timescales 'decays' and 'wd_2'"),
        ([TimescaleConfig("default", 5, params=["lr"])], "the label 'default'"),
    ],
)
def test_bad_timescales_for_these_outer_params_are_config_errors(
    timescales: list[TimescaleConfig], needle: str
) -> None:
    lam = leaves(lr=0.1, wd_1=0.0, wd_2=0.0)
    with pytest.raises(ConfigError) as info:
        MultiTimescaleOptimizer(lam, MultiTimescaleConfig(timescales))
    assert needle in str(info.value)


def test_patterns_and_labels_resolve_in_outer_param_order() -> None:
    cfg = MultiTimescaleConfig([TimescaleConfig("decays", 5, params="wd_*"),
                                TimescaleConfig("lr", 2, optimizer="sgd", lr=0.3)])
    groups = resolve_timescales(["wd_2", "lr", "x", "wd_1"], cfg)
    assert [(g.label, g.frequency, g.names, g.optimizer, g.lr) for g in groups] == [
        ("decays", 5, ("wd_2", "wd_1"), "adam", 0.05),
        ("lr", 2, ("lr",), "sgd", 0.3),
        ("default", 1, ("x",), "adam", 0.05),
    ]
    # a timescale may be labelled "default" when it leaves nothing unclaimed
    only = MultiTimescaleConfig([TimescaleConfig("default", 2, params=["*"])])
    assert [g.label for g in resolve_timescales(["a", "b"], only)] == ["default"]


@pytest.mark.parametrize(
    ("outer", "error", "needle"),
    [
        ({}, ConfigError, "outer_params is empty"),
        ({"a": 0.1}, ChronosTypeError, "torch.tensor(v, requires_grad=True)"),
        ({"a": torch.tensor(0.1)}, ConfigError, "requires_grad=True"),
        ({"a": torch.tensor(0.1, requires_grad=True) * 2}, ConfigError, "is_leaf=False"),
        ({"a": torch.tensor(1)}, ConfigError, "floating-point leaf tensor"),
        ([torch.tensor(0.1, requires_grad=True)], ChronosTypeError, "dict name -> leaf tensor"),
    ],
)
def test_outer_params_must_be_a_dict_of_leaf_tensors(
    outer: Any, error: type[Exception], needle: str
) -> None:
    with pytest.raises(error) as info:
        MultiTimescaleOptimizer(outer, MultiTimescaleConfig())
    assert needle in str(info.value)


def test_the_same_tensor_under_two_names_and_late_param_groups_are_refused() -> None:
    t = torch.tensor(0.1, requires_grad=True)
    with pytest.raises(ConfigError, match="are the same tensor"):
        MultiTimescaleOptimizer({"a": t, "b": t}, MultiTimescaleConfig())
    opt = MultiTimescaleOptimizer({"a": t}, MultiTimescaleConfig())
    with pytest.raises(ConfigError, match="build a new optimizer"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    with pytest.raises(ChronosTypeError, match="must be a MultiTimescaleConfig"):
        MultiTimescaleOptimizer({"a": t}, {"a": 1})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="steps count from 1"):
        opt.due(0)
