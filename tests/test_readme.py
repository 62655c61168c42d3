"""The README's Python snippets run as written, in order, in one namespace (later snippets use
the objects earlier ones define, as a reader following along would)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.timeout(120)
def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3, "README lost its python snippets"
    namespace: dict = {"__name__": "readme"}
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)


def test_readme_has_the_two_commands_and_a_bench_section():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert "<!-- bench:start -->" in text and "<!-- bench:end -->" in text
