"""Smoke test of the hypergradient benchmark in --quick mode (seconds)."""

import json
import math

import pytest
import torch

pytest.importorskip("mlxtend")

from chronos.benchmarks import hypergrad


def test_quick_benchmark_writes_consistent_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "hypergrad.json"
    assert hypergrad.main(["--quick", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # restored
    printed = capsys.readouterr().out
    assert "machine:" in printed and "[4/4]" in printed  # the machine and progress lines
    assert "warm start over 3 outer steps" in printed
    data = json.loads(out.read_text())
    env = data["environment"]
    assert env["cpu"] and env["torch"] == torch.__version__ and "blas" in env
    it = data["per_iteration"]
    assert it["floor_rel_diff_vs_autograd"] < 1e-4  # the hand-written floor is the exact HVP
    assert it["per_iteration_s"]["floor"] > 0 and it["per_iteration_s"]["chronos_loop"] > 0
    cmp, ws = data["comparison"], data["warm_start"]
    iters = cmp["iterations"]
    assert all(1 <= v <= 30 for v in iters.values())  # quick mode: max_iter 30
    assert all(v > 0 for v in cmp["median_s"].values())
    assert cmp["rel_diff_vs_chronos"]["chronos_kfac"] < 0.2  # unconverged float32 CG
    assert cmp["rel_diff_vs_chronos"]["chronos_autotune"] < 0.2
    if env["torchopt"] is not None:
        assert "time ratio vs TorchOpt" in printed
        assert iters["torchopt"] == iters["chronos"]
        assert 0 < cmp["ratio_chronos_over_torchopt"] < 10
        assert cmp["rel_diff_vs_chronos"]["torchopt"] < 0.2  # 30 float32 CG steps, unconverged
    assert len(ws["steps"]) == 3
    assert ws["total_cold_iterations"] == sum(r["cold_iterations"] for r in ws["steps"])
    assert ws["preconditioner"] == "kfac"
    assert ws["val_loss_final"] < ws["val_loss_first"]  # the outer steps do clean the data
    assert data["config"]["quick"] is True


def test_problem_definition_matches_the_docstring():
    prob = hypergrad.make_problem(n_train=50, n_val=20)
    assert int(prob.corrupted.sum()) == 25
    assert float(prob.x_train.min()) >= 0.0 and float(prob.x_train.max()) <= 1.0
    theta = prob.init_params()
    s = torch.zeros(50)
    # zero weights logits: σ(0) = 1/2 times the mean cross-entropy log(10) at θ = 0
    assert float(prob.inner(theta, {"s": s})) == pytest.approx(0.5 * math.log(10), rel=1e-5)
