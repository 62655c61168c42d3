"""Bilevel test problems for the solver conformance battery (float64 unless stated)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

f64 = torch.float64


@dataclass
class Ridge:
    """Ridge with per-feature log weight decay; closed-form θ*(λ) and hypergradient.

    f(w, λ) = ½‖Xw − y‖²/n + ½ Σ_j exp(λ_j) w_j²,   F(w) = ½‖X_v w − y_v‖²/m.
    """

    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    lam: torch.Tensor

    def inner(self, p, h):
        r = self.X @ p["w"] - self.y
        return 0.5 * (r @ r) / len(self.y) + 0.5 * (h["log_wd"].exp() * p["w"] ** 2).sum()

    def outer(self, p, h):
        r = self.Xv @ p["w"] - self.yv
        return 0.5 * (r @ r) / len(self.yv)

    def hessian(self, lam=None):
        lam = self.lam if lam is None else lam
        return self.X.T @ self.X / len(self.y) + torch.diag(lam.exp())

    def optimum(self, lam=None):
        return torch.linalg.solve(self.hessian(lam), self.X.T @ self.y / len(self.y))

    def exact_hypergradient(self):
        """dF/dλ by autograd through the closed-form solve (an independent reference)."""
        lam = self.lam.clone().requires_grad_(True)
        w = self.optimum(lam)
        (g,) = torch.autograd.grad(self.outer({"w": w}, {}), lam)
        return g


def make_ridge(n=40, m=30, d=6, seed=0, dtype=f64) -> Ridge:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=f64)
    w_true = torch.randn(d, generator=g, dtype=f64)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=f64)
    Xv = torch.randn(m, d, generator=g, dtype=f64)
    yv = Xv @ w_true + 0.5 * torch.randn(m, generator=g, dtype=f64)
    lam = torch.linspace(-2.0, 0.5, d, dtype=f64)
    return Ridge(X.to(dtype), y.to(dtype), Xv.to(dtype), yv.to(dtype), lam.to(dtype))


@dataclass
class Logistic:
    """Multinomial logistic regression, per-feature log decay λ_j and per-sample weight logits.

    f(θ, λ) = Σ_i σ(s_i) CE_i / n + ½ Σ_j exp(λ_j) ‖W_j‖² + ½·0.01‖b‖²,
    F(θ) = CE on validation data (the bias penalty removes softmax's shift invariance).
    """

    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    classes: int

    def inner(self, p, h):
        ce = F.cross_entropy(self.X @ p["W"] + p["b"], self.y, reduction="none")
        data = (torch.sigmoid(h["s"]) * ce).mean()
        penalty = 0.5 * (h["log_wd"].exp() * (p["W"] ** 2).sum(dim=1)).sum()
        return data + penalty + 0.005 * (p["b"] ** 2).sum()

    def outer(self, p, h):
        return F.cross_entropy(self.Xv @ p["W"] + p["b"], self.yv)

    def outer_params(self):
        d, n = self.X.shape[1], self.X.shape[0]
        g = torch.Generator().manual_seed(1)
        return {
            "log_wd": torch.linspace(-3.0, -1.0, d, dtype=f64),
            "s": torch.randn(n, generator=g, dtype=f64),
        }

    def solve(self, outer_params, iters=30):
        """θ*(λ) by Newton's method on the flattened parameters (exact to rounding)."""
        d, c = self.X.shape[1], self.classes
        vec = torch.zeros(d * c + c, dtype=f64)

        def f(v):
            return self.inner({"W": v[: d * c].view(d, c), "b": v[d * c :]}, outer_params)

        for _ in range(iters):
            g = torch.autograd.functional.jacobian(f, vec)
            if float(g.norm()) < 1e-13:
                break
            H = torch.autograd.functional.hessian(f, vec)
            vec = vec - torch.linalg.solve(H, g)
        return {"W": vec[: d * c].view(d, c).clone(), "b": vec[d * c :].clone()}


def make_logistic(n=40, m=30, d=4, classes=3, seed=0) -> Logistic:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, classes, generator=g, dtype=f64)
    X = torch.randn(n, d, generator=g, dtype=f64)
    Xv = torch.randn(m, d, generator=g, dtype=f64)
    noise = 0.8
    y = (X @ W + noise * torch.randn(n, classes, generator=g, dtype=f64)).argmax(1)
    yv = (Xv @ W + noise * torch.randn(m, classes, generator=g, dtype=f64)).argmax(1)
    return Logistic(X, y, Xv, yv, classes)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
