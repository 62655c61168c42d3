import pytest
import torch

from chronos.core import MetaState
from chronos.core.errors import (
    ChronosTypeError,
    ConfigError,
    KeyMismatchError,
    ShapeMismatchError,
)


def test_update_bumps_version_and_records_history():
    m = MetaState({"lr": 0.01, "wd": torch.zeros(3)})
    assert m.version == 0
    v = m.update({"lr": torch.tensor(0.02), "wd": torch.ones(3)}, outer_loss=1.5)
    assert v == 1 and m.version == 1
    assert m.history[-1] == {"version": 1, "outer_loss": 1.5}
    with pytest.raises(KeyMismatchError):
        m.update({"lr": torch.tensor(0.1)})
    assert m.version == 1


def test_state_dict_roundtrip_is_a_copy():
    m = MetaState({"lr": 0.01}, optimizer_state={"state": {}, "param_groups": []})
    m.update({"lr": torch.tensor(0.5)}, loss=0.1)
    sd = m.state_dict()
    sd["outer_params"]["lr"].add_(1.0)  # mutating the copy must not touch m
    assert float(m.outer_params["lr"]) == pytest.approx(0.5)
    m2 = MetaState({"other": 1.0})
    m2.load_state_dict(m.state_dict())
    assert m2.version == 1 and set(m2.outer_params) == {"lr"}
    assert list(m2.history) == list(m.history) and m2.optimizer_state == m.optimizer_state


def test_bad_inputs():
    with pytest.raises(ConfigError):
        MetaState({})
    with pytest.raises(ConfigError):
        MetaState({"a": 1.0}, version=-1)
    with pytest.raises(ConfigError):
        MetaState({"a": 1.0}, max_history=0)
    with pytest.raises(ChronosTypeError, match="state_dict"):
        MetaState({"a": 1.0}).load_state_dict({"version": 1})


def test_history_is_bounded():
    m = MetaState({"a": 1.0}, max_history=3)
    for _ in range(10):
        m.record(x=1)
    assert len(m.history) == 3


def test_adopt_installs_the_given_tensors_without_a_copy_and_checks_structure():
    m = MetaState({"lr": 0.01, "wd": torch.zeros(3)})
    new = {"lr": torch.tensor(0.02), "wd": torch.ones(3)}
    assert m.adopt(new, outer_loss=1.0) == 1
    assert m.outer_params["wd"] is new["wd"] and m.outer_params is not new
    assert m.history[-1] == {"version": 1, "outer_loss": 1.0}
    with pytest.raises(KeyMismatchError):
        m.adopt({"lr": torch.tensor(0.1)})
    with pytest.raises(ShapeMismatchError):
        m.adopt({"lr": torch.tensor(0.1), "wd": torch.ones(2)})
    with pytest.raises(ChronosTypeError):
        m.adopt({"lr": 0.1, "wd": torch.ones(3)})  # type: ignore[dict-item]
    assert m.version == 1 and m.outer_params["wd"] is new["wd"]
    leaf = torch.ones(3, requires_grad=True)
    m.adopt({"lr": torch.tensor(0.0), "wd": leaf})  # detached (a view, no copy)
    assert not m.outer_params["wd"].requires_grad
    assert m.outer_params["wd"].data_ptr() == leaf.data_ptr()
