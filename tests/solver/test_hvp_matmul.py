"""Linearized inner gradient (HVP, mixed term) and the matmul orientation autotuner."""

import pytest
import torch
from solver_problems import make_logistic

from chronos.core.errors import ChronosTypeError, NonFiniteError
from chronos.solver import MatmulAutotuner, linearize_inner
from chronos.solver import matmul as matmul_module

f64 = torch.float64


def flat_problem():
    """The logistic problem as a function of one flat vector θ and one flat vector λ."""
    lg = make_logistic(n=20, d=3, classes=3)
    lam = lg.outer_params()
    d, c = 3, 3
    theta = {"W": 0.1 * torch.randn(d, c, dtype=f64, generator=torch.Generator().manual_seed(3)),
             "b": torch.tensor([0.1, -0.2, 0.05], dtype=f64)}

    def f_flat(tv, lv):
        p = {"W": tv[: d * c].view(d, c), "b": tv[d * c :]}
        h = {"log_wd": lv[:d], "s": lv[d:]}
        return lg.inner(p, h)

    tv = torch.cat([theta["W"].reshape(-1), theta["b"]])
    lv = torch.cat([lam["log_wd"], lam["s"]])
    return lg, theta, lam, f_flat, tv, lv


def test_hvp_and_mixed_match_explicit_second_derivatives():
    lg, theta, lam, f_flat, tv, lv = flat_problem()
    lin = linearize_inner(lg.inner, theta, lam)
    H = torch.autograd.functional.hessian(lambda t: f_flat(t, lv), tv)
    # mixed[i, j] = ∂²f / ∂λ_i ∂θ_j
    mixed = torch.autograd.functional.jacobian(
        lambda lv_: torch.autograd.functional.jacobian(lambda t: f_flat(t, lv_), tv,
                                                       create_graph=True), lv)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(tv.numel(), generator=g, dtype=f64)
        vd = {"W": v[:9].view(3, 3), "b": v[9:]}
        hv = lin.hvp(vd)
        assert torch.allclose(torch.cat([hv["W"].reshape(-1), hv["b"]]), H @ v, atol=1e-12)
        mv = lin.mixed(vd, release=False)
        assert torch.allclose(torch.cat([mv["log_wd"], mv["s"]]), mixed.T @ v, atol=1e-12)
    assert lin.hvp_calls == 3
    grad = torch.autograd.functional.jacobian(lambda t: f_flat(t, lv), tv)
    assert lin.grad_norm() == pytest.approx(float(grad.norm()))


def test_linearization_leaves_inputs_alone_and_releases_its_graph():
    lg, theta, lam, *_ = flat_problem()
    theta_in = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    lin = linearize_inner(lg.inner, theta_in, lam)
    out = lin.mixed({"W": torch.ones(3, 3, dtype=f64), "b": torch.ones(3, dtype=f64)})
    assert not out["s"].requires_grad
    assert all(v.grad is None and v.is_leaf for v in theta_in.values())
    # after release a second product finds no graph: zeros, not a crash or a leak
    assert float(lin.mixed({"W": torch.ones(3, 3, dtype=f64),
                            "b": torch.ones(3, dtype=f64)})["s"].abs().sum()) == 0.0


def test_blocks_without_curvature_and_unreached_outer_params():
    def f(p, h):  # linear in "u", λ "c" unused by the gradient, "a" used
        return h["a"] * (p["x"] ** 2).sum() + 3.0 * p["u"].sum() + h["c"]

    lin = linearize_inner(f, {"x": torch.ones(2), "u": torch.ones(2)},
                          {"a": torch.tensor(2.0), "c": torch.tensor(1.0)})
    hv = lin.hvp({"x": torch.ones(2), "u": torch.ones(2)})
    assert hv["x"].tolist() == [4.0, 4.0] and hv["u"].tolist() == [0.0, 0.0]
    mixed = lin.mixed({"x": torch.ones(2), "u": torch.ones(2)})
    assert float(mixed["a"]) == 4.0 and float(mixed["c"]) == 0.0
    assert lin.unreached == {"c"}


def test_linearization_errors():
    with pytest.raises(ChronosTypeError, match="callable"):
        linearize_inner("loss", {"x": torch.ones(1)}, {"c": 1.0})
    with pytest.raises(NonFiniteError, match="inner gradient"):
        linearize_inner(lambda p, h: p["x"].abs().sqrt().sum(), {"x": torch.zeros(2)}, {"c": 1.0})


@pytest.mark.parametrize("margin", [0.0, float("inf")])
def test_autotuner_both_orientations_give_equal_contiguous_results(margin):
    g = torch.Generator().manual_seed(0)
    X, V = torch.randn(64, 48, generator=g), torch.randn(48, 5, generator=g)
    bias = torch.randn(5, generator=g)
    with MatmulAutotuner(min_flops=0, margin=margin) as tuner:
        a = X @ V
        b = torch.nn.functional.linear(X, V.T, bias)  # addmm
        c = X.T[:48, :] @ torch.randn(64, 2, generator=g)  # transposed input
        a.view(-1)  # contiguous like mm's own output
    assert tuner.calls == 3
    assert tuner.swapped == (3 if margin == float("inf") else 0)
    assert a.is_contiguous() and b.is_contiguous() and c.shape == (48, 2)
    assert torch.allclose(a, X @ V, atol=1e-5)
    assert torch.allclose(b, X @ V + bias, atol=1e-5)


def test_autotuner_leaves_small_and_unsupported_products_alone():
    with MatmulAutotuner() as tuner:  # default min_flops: tiny products untouched
        torch.ones(3, 3) @ torch.ones(3, 3)
        torch.ones(3, dtype=torch.long) @ torch.ones(3, dtype=torch.long)
        torch.ones(2, 3, 3) @ torch.ones(2, 3, 3)  # bmm: not intercepted
    assert tuner.swapped == 0


def test_autotuner_caches_measurements_per_signature():
    matmul_module.clear_cache()
    X, V = torch.randn(300, 200), torch.randn(200, 20)
    with MatmulAutotuner(min_flops=0):
        X @ V
        X @ V
    info = matmul_module.cache_info()
    assert info["signatures"] == 1 and info["swapped"] in (0, 1)
    matmul_module.clear_cache()
    assert matmul_module.cache_info()["signatures"] == 0
