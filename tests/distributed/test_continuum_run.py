"""Continuum features end to end: amortized workers and stale correction in a real run
(coordinator and worker processes, real sockets on 127.0.0.1)."""

import pytest

from chronos.benchmarks.problems import digits_ridge
from chronos.core.errors import ConfigError
from chronos.distributed.launcher import RunConfig, run_local
from chronos.distributed.worker import WorkerConfig

RIDGE = "chronos.benchmarks.problems:digits_ridge"


@pytest.mark.timeout(150)
def test_amortized_workers_with_stale_correction_reach_the_closed_form_optimum():
    # worker 1 is slower, so its commits are stale; both features on at once
    cfg = RunConfig(problem=RIDGE, workers=2, max_steps=40, outer_lr=2.0, min_commits=1,
                    straggler_delay=(0.0, 0.15), stale_correction=True, timeout=120,
                    worker_options={"amortized": True})
    result = run_local(cfg)
    assert result.completed, result.worker_exitcodes
    optimum = digits_ridge().optimal_log_decay()
    assert abs(float(result.outer_params["log_decay"]) - optimum) < 0.02
    s = result.stats
    assert s["commits_corrected"] >= 1
    assert any(k > 0 for k in s["accepted_by_staleness"])
    assert all(code == 0 for code in result.worker_exitcodes)


def test_amortized_needs_the_implicit_hypergradient():
    with pytest.raises(ConfigError, match="amortized=True needs hypergradient='implicit'"):
        WorkerConfig(amortized=True, hypergradient="unrolled")
    with pytest.raises(ConfigError, match="amortized must be True or False"):
        WorkerConfig(amortized=1)  # type: ignore[arg-type]
