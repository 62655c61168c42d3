import io
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from chronos import __version__
from chronos.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "bench" in out


def test_unknown_command_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_console_script_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "chronos.cli", "--version"],
        capture_output=True, text=True, timeout=50, check=True,
    )
    assert out.stdout.strip() == f"chronos {__version__}"


# -- help: every option of every subcommand says its default ----------------------------------


@pytest.mark.parametrize("command", ["run", "coordinator", "worker"])
def test_every_option_shows_its_default(command, capsys, monkeypatch):
    import chronos.distributed.cli as dcli

    built = []
    real = dcli._parser

    def spy(prog, doc):
        built.append(real(prog, doc))
        return built[-1]

    monkeypatch.setattr(dcli, "_parser", spy)
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    formatter = built[0]._get_formatter()
    for action in built[0]._actions:
        if action.dest != "help":
            assert "(default" in formatter._get_help_string(action), action.option_strings
    assert text.count("(default") >= len(built[0]._actions) - 1


def test_defaults_come_from_the_defaults_module(capsys):
    from chronos.distributed import defaults
    from chronos.distributed.launcher import RunConfig

    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {defaults.MAX_STALENESS})" in text
    assert f"(default: {defaults.LEASE_TIMEOUT})" in text
    assert f"(default: {defaults.MIN_COMMITS})" in text
    assert f"else {defaults.OUTER_OPTIMIZER})" in text
    cfg = RunConfig(problem="a:b")
    assert (cfg.max_staleness, cfg.max_in_flight, cfg.decay, cfg.min_commits) == (
        defaults.MAX_STALENESS, defaults.MAX_IN_FLIGHT, defaults.DECAY, defaults.MIN_COMMITS)
    assert (cfg.lease_timeout, cfg.heartbeat_interval) == (
        defaults.LEASE_TIMEOUT, defaults.HEARTBEAT_INTERVAL)
    assert cfg.optimizer is None and cfg.outer_lr is None and cfg.seed is None


# -- progress and summary ------------------------------------------------------------------------


def test_progress_line_never_shows_nan():
    from chronos.distributed.cli import progress_line

    start = {"version": 0, "outer_loss": float("nan"), "elapsed_s": 3.0, "workers_alive": 1}
    line = progress_line(start, 10, 2)
    assert "nan" not in line and "outer loss — (waiting for workers: 1/2 connected)" in line
    line = progress_line({**start, "workers_alive": 2}, 10, 2)
    assert "outer loss — (waiting for the first commit)" in line
    line = progress_line({**start, "version": 3, "commits_accepted": 3}, 10, 2)
    assert "outer loss — |" in line
    line = progress_line({**start, "version": 3, "outer_loss": 0.25}, 10, 2)
    assert "outer loss 0.2500 |" in line


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    pytest.importorskip("tqdm")
    from chronos.distributed.cli import Progress

    figures = {"version": 4, "outer_loss": 0.5, "commits_per_s": 2.0, "workers_running": 2}
    tty = _FakeTTY()
    bar = Progress(tty, 10, 2)
    bar(figures)
    bar.close()
    assert "\r" in tty.getvalue() and "4/10" in tty.getvalue(), tty.getvalue()
    assert "outer loss 0.5000" in tty.getvalue()
    pipe = io.StringIO()
    plain = Progress(pipe, 10, 2)
    plain(figures)
    plain.close()
    assert pipe.getvalue().count("\n") == 1 and "version    4/10" in pipe.getvalue()
    quiet = _FakeTTY()
    q = Progress(quiet, 10, 2, quiet=True)
    q(figures)
    q.close()
    assert quiet.getvalue() == ""


def test_progress_falls_back_to_lines_without_tqdm(monkeypatch):
    from chronos.distributed.cli import Progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    tty = _FakeTTY()
    p = Progress(tty, 10, 2)
    p({"version": 1})
    assert p.bar is None and "version    1/10" in tty.getvalue()


def test_summary_has_one_line_per_worker_when_the_stats_have_them():
    import torch

    from chronos.distributed.cli import print_summary
    from chronos.distributed.launcher import RunConfig, RunResult

    def rec(accepted: int, rejected: int, share: float) -> dict[str, object]:
        return {"accepted": accepted, "rejected": rejected, "weight_sum": float(accepted),
                "contribution": share, "share": share, "last_version": 4, "alive": True}

    stats = {"commits_accepted": 5, "aggregation": "buffered", "workers": {
        "worker-0": rec(3, 0, 0.95), "worker-1": rec(2, 7, 0.05) | {"cancelled": 4}}}
    result = RunResult(outer_params={"lam": torch.zeros(2)}, version=5, wall_time=1.0,
                       stats=stats, history=[], worker_exitcodes=(0, 0), completed=True)
    out = io.StringIO()
    print_summary(result, RunConfig(problem="a:b", max_steps=5), out)
    lines = out.getvalue().splitlines()
    assert "  aggregation buffered; per worker:" in lines
    assert ("  worker worker-0: share 95.0%, 3 accepted, 0 rejected, weight sum 3.00, last "
            "version 4") in lines
    assert ("  worker worker-1: share 5.0%, 2 accepted, 7 rejected, 4 leases cancelled, weight "
            "sum 2.00, last version 4") in lines
    # worker-1's share is below half its fair 50%: the user is told, with what to change
    warning = [x for x in lines if x.startswith("warning: worker 'worker-1' contributed 5.0%")]
    assert len(warning) == 1 and "--aggregation latest" in warning[0]
    assert "7 rejected, 4 leases cancelled)" in warning[0]
    assert not any("worker 'worker-0' contributed" in x for x in lines)
    assert "  outer loss: — (no step reported one)" in lines
    out = io.StringIO()
    print_summary(replace(result, stats={"commits_accepted": 5}), RunConfig(problem="a:b"), out)
    assert "worker-0" not in out.getvalue()  # no per-worker figures: no per-worker lines


# -- Ctrl-C and buffering -------------------------------------------------------------------------


def test_ctrl_c_while_a_subcommand_imports_is_one_line(monkeypatch, capsys):
    import chronos.cli as cli

    def interrupted(name: str):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert cli.main(["run"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "chronos: interrupted"


SLOW_BENCH = '''
import sys


def main(argv):
    print("bench: first result", flush=False)  # a benchmark that does not flush
    sys.stdin.readline()  # ... and goes on working until the test says stop
    print("bench: done")
    return 0
'''


@pytest.mark.timeout(60)
def test_bench_output_is_not_held_in_a_buffer(tmp_path):
    (tmp_path / "slowbench.py").write_text(SLOW_BENCH)
    code = ("import sys; import chronos.cli as c; c.BENCHMARKS['slow'] = 'slowbench'; "
            "raise SystemExit(c.main(['bench', 'slow']))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        # arrives while the benchmark still runs (it waits on stdin): line-buffered stdout
        assert proc.stdout.readline() == "bench: first result\n"
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "bench: done\n"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
