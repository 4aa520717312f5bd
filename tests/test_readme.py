"""The README's promises: its two commands exist, its Python example runs, and the
acceptance it states for the default draft is the one measured next to the weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

from uhlm_jax.models.early_exit import embedded_exit_head_path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_two_commands_are_make_targets_and_ci_runs_the_tests():
    assert "make demo" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: install\n\t\$\(BIN\)/uhlm demo", makefile, re.M)
    assert re.search(r"^test: install\n", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_python_example_runs(capsys):
    block = re.search(r"## Thresholds and rollouts from Python\n\n```python\n(.*?)```", README,
                      re.S)
    assert block is not None
    exec(compile(block.group(1), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "0.07317073 0.42682928"
    rates = [float(x) for x in lines[1].strip("[]").split()]
    assert rates[0] == 1.0 and rates[-1] == 0.0


def test_stated_acceptance_is_the_measured_one():
    sidecar = json.loads(Path(embedded_exit_head_path()).with_suffix(".json").read_text())
    stated = re.findall(r"acceptance `1 − TV` (?:is|of) (0\.\d+)", README)
    assert stated, "the README states the default draft's acceptance"
    for value in stated:
        assert float(value) == round(sidecar["acceptance"], 2)
