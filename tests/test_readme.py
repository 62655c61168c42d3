"""Every Python block of the README runs on its own, in a fresh namespace, as a reader who
copies just that block would run it."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_keeps_its_python_snippets():
    assert len(BLOCKS) >= 3, "README lost its python snippets"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_on_its_own(index):
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"{README}:block{index}", "exec"), namespace)


def test_readme_has_the_two_commands_and_a_bench_section():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert "<!-- bench:start -->" in text and "<!-- bench:end -->" in text
