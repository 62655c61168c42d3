"""Solve the inner problem of the demo for one regularization strength and report accuracy.

Run: ``python examples/solve_digits.py``
"""

import math

import torch

from chronos.benchmarks.problems import digits_weight_decay

problem = digits_weight_decay(rank=0, world_size=1, per_feature=False)
outer = {"log_decay": torch.tensor(math.log(1e-3))}
theta, trajectory = problem.solve(outer, num_steps=50)
print(f"{trajectory.num_steps} L-BFGS steps, inner loss {trajectory.losses[-1]:.4f}")
val_acc, test_acc = problem.accuracy(theta, "val"), problem.accuracy(theta, "test")
print(f"val acc {val_acc:.3f}, test acc {test_acc:.3f}")
