import subprocess
import sys

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
