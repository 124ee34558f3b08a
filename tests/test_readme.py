"""The README's examples run as written."""

from __future__ import annotations

import re

from .conftest import ROOT, run_python


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_python_examples_run(daemon, tmp_path):
    blocks = readme_blocks("python")
    assert blocks
    for block in blocks:
        run_python(f"import os; os.chdir({str(tmp_path)!r})\n" + block, daemon.env)
    assert daemon.client().info("demo/tiny-gpt2:1").tensors > 0


def test_the_two_commands_are_the_ones_ci_and_make_run():
    first = readme_blocks("")[0].splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
