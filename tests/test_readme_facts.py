"""The README's facts about the source that drift when the code changes (line ranges, line counts) are computed
here from the files themselves: a change that moves them fails this test, whose message gives the lines to paste."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
from conftest import REPO


def lines(name: str) -> list[str]:
    return (REPO / name).read_text().splitlines()


def assignment(name: str, target: str) -> tuple[int, int]:
    """First and last line of a top-level `target = ...` (or `target: T = ...`) in a file."""
    for node in ast.parse((REPO / name).read_text()).body:
        names = [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
        if target in names:
            return node.lineno, node.end_lineno
    raise AssertionError(f"{name} has no top-level {target} assignment")


def readme_facts() -> list[str]:
    """The README's sentences and table rows that state line numbers or counts, as the code now has them."""
    model, data, train, sweep = (len(lines(name)) for name in ("model.py", "datamodule.py", "train.py", "sweep.py"))
    data_end = assignment("datamodule.py", "DEFAULT_DATASET")[1]  # DATASETS, their build functions, the default
    marked = [i for i, line in enumerate(lines("train.py"), 1) if line.startswith("# ----")]
    section = marked[0], marked[1]  # "# ---- What you change ----" ... "# ------"
    section_lines = section[1] - section[0] + 1
    config = assignment("sweep.py", "SWEEP_CONFIG")
    return [
        f"| `model.py` | your LightningModule (the example: a small CNN) | {model} |",
        f"| `datamodule.py`, lines 1-{data_end} | `DATASETS` and their build functions, `DEFAULT_DATASET`; or "
        f"replace the DataModule (rest of the file) | {data} in all |",
        f'| `train.py`, lines {section[0]}-{section[1]}, "What you change" | `MODEL_CLASS`, `DATAMODULE_CLASS`, '
        f"`MONITOR` and `MONITOR_MODE`, `MAX_EPOCHS`, `PATIENCE`, `LINKED` | {section_lines} of {train} |",
        f"| `sweep.py`, lines {config[0]}-{config[1]} | `SWEEP_CONFIG`: what a sweep tries (full dotted train.py "
        f"keys) | {config[1] - config[0] + 1} of {sweep} |",
        f"train.py's section ({model + section_lines} lines)",
        f"`datamodule.py` down to `DEFAULT_DATASET` ({data_end})",
    ]


def test_the_readme_states_the_line_ranges_and_counts_the_code_has() -> None:
    readme = " ".join((REPO / "README.md").read_text().split())  # a sentence may wrap anywhere
    stale = [fact for fact in readme_facts() if " ".join(fact.split()) not in readme]
    assert not stale, "README.md is out of date; it should say:\n" + "\n".join(stale)


@pytest.mark.slow
def test_the_readme_states_how_many_tests_each_tier_has() -> None:
    """`make test`'s fast tier and the whole suite (CI), as pytest collects them now (~15 s: collection imports
    every test module, so it runs with the slow tests)."""
    def collected(*marks: str) -> int:
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *marks], cwd=REPO,
                             capture_output=True, text=True, timeout=300).stdout
        return int(re.search(r"^(\d+)(?:/\d+)? tests? collected", out, re.MULTILINE).group(1))

    everything, fast = collected(), collected("-m", "not slow")
    readme = " ".join((REPO / "README.md").read_text().split())
    fact = f"the fast tier: {fast} of the {everything} tests"
    assert fact in readme, f"README.md is out of date; it should say: {fact}"
