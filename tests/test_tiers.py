"""`make test` runs the fast tier (every test not marked slow) unless CI=true or TIER=all, where it runs them all:
the README's test command answers in minutes on a laptop, and CI still runs every assertion."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import REPO


def pytest_line(**env: str) -> str:
    """The pytest command `make test` would run with these variables (make -n: printed, not run)."""
    out = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CI": "", **env}).stdout
    return next(line for line in out.replace("\\\n", " ").splitlines() if " -m pytest" in line)


@pytest.mark.parametrize("env, fast", [({}, True), ({"CI": "true"}, False), ({"TIER": "all"}, False),
                                       ({"CI": "true", "TIER": "fast"}, True)])
def test_make_test_leaves_the_slow_tier_to_ci(env: dict[str, str], fast: bool):
    assert ('-m "not slow"' in pytest_line(**env)) == fast

