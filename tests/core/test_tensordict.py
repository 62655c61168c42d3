import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chronos.core import tensordict as td
from chronos.core.errors import (
    ChronosError,
    ChronosTypeError,
    KeyMismatchError,
    ShapeMismatchError,
)


def _pair():
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.0, -2.0])}
    b = {"w": torch.ones(2, 3), "b": torch.tensor([0.5, 0.5])}
    return a, b


def test_arithmetic_matches_per_key_math():
    a, b = _pair()
    assert torch.equal(td.add(a, b)["w"], a["w"] + 1)
    assert torch.equal(td.sub(a, b)["b"], torch.tensor([0.5, -2.5]))
    assert torch.equal(td.scale(a, 2.0)["b"], torch.tensor([2.0, -4.0]))
    assert torch.equal(td.axpy(3.0, b, a)["b"], torch.tensor([2.5, -0.5]))
    expected_dot = (a["w"] * b["w"]).sum() + (a["b"] * b["b"]).sum()
    assert torch.isclose(td.dot(a, b), expected_dot)
    expected_norm = torch.cat([a["w"].flatten(), a["b"]]).norm()
    assert torch.isclose(td.norm(a), expected_norm)


def test_zeros_clone_detach_to():
    a, _ = _pair()
    z = td.zeros_like(a)
    assert all(float(v.abs().sum()) == 0 for v in z.values())
    x = {"w": torch.ones(2, requires_grad=True)}
    c = td.clone(x)
    assert not c["w"].requires_grad and c["w"].data_ptr() != x["w"].data_ptr()
    d = td.detach(x)
    assert not d["w"].requires_grad and d["w"].data_ptr() == x["w"].data_ptr()
    assert td.to(a, dtype=torch.float64)["w"].dtype == torch.float64


def test_key_and_shape_mismatch_raise_clear_errors():
    a, b = _pair()
    with pytest.raises(KeyMismatchError, match="only in the first"):
        td.add(a, {"w": b["w"]})
    with pytest.raises(ShapeMismatchError, match=r"\['w'\] shapes differ"):
        td.dot(a, {"w": torch.ones(3, 2), "b": b["b"]})
    with pytest.raises(ChronosTypeError, match="dict"):
        td.norm(torch.ones(3))  # type: ignore[arg-type]
    with pytest.raises(ChronosError, match=r"must be a torch\.Tensor"):
        td.add({"w": 1.0}, {"w": 1.0})  # type: ignore[dict-item]


def test_as_tensor_dict_converts_numbers_and_rejects_junk():
    out = td.as_tensor_dict({"lr": 0.01, "n": 3})
    assert out["lr"].dtype == torch.get_default_dtype() and out["lr"].dim() == 0
    assert td.as_tensor_dict({"x": torch.ones(2)}, dtype=torch.float64)["x"].dtype == torch.float64
    with pytest.raises(ChronosTypeError, match="number"):
        td.as_tensor_dict({"x": "0.1"})
    with pytest.raises(ChronosTypeError):
        td.as_tensor_dict({"x": True})
    with pytest.raises(ChronosTypeError):
        td.as_tensor_dict([1.0])  # type: ignore[arg-type]


def test_is_finite():
    assert td.is_finite({"a": torch.ones(2)})
    assert not td.is_finite({"a": torch.tensor([1.0, float("nan")])})
    assert not td.is_finite({"a": torch.tensor([float("inf")])})


@given(
    shapes=st.dictionaries(
        st.text("abcdefgh", min_size=1, max_size=4),
        st.lists(st.integers(0, 4), min_size=0, max_size=3),
        min_size=0,
        max_size=5,
    )
)
def test_flatten_unflatten_roundtrip(shapes):
    a = {k: torch.randn(tuple(s), dtype=torch.float64) for k, s in shapes.items()}
    vec, spec = td.flatten(a)
    assert vec.dim() == 1 and vec.numel() == spec.numel
    back = td.unflatten(vec, spec)
    assert back.keys() == a.keys()
    for k in a:
        assert back[k].shape == a[k].shape and torch.equal(back[k], a[k])


def test_flatten_is_differentiable_and_unflatten_checks_size():
    x = {"a": torch.ones(3, requires_grad=True)}
    vec, spec = td.flatten(x)
    (vec * 2).sum().backward()
    assert torch.equal(x["a"].grad, torch.full((3,), 2.0))
    with pytest.raises(ShapeMismatchError, match="spec needs 3"):
        td.unflatten(torch.zeros(4), spec)
