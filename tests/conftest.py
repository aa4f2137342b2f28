"""Shared test set-up: offline wandb, every test in its own working directory, helpers to run the scripts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["slurm_fixtures", "mount_fixtures"]  # local Slurm, small filesystems: for tests that ask


def pytest_configure(config: pytest.Config) -> None:
    """The tests expect the template's own defaults: the generic cluster, no account. A project made with other
    answers (copier.yml: default_cluster, hec_account, bede_account, generic_account) runs them with a copy of its
    clusters.toml that has those reset ($MLMODELDEV_CLUSTERS, seen by every script the tests start); its own file
    stays as it is. Whole lines are replaced: an answer may hold escaped quotes."""
    text = (REPO / "clusters.toml").read_text()
    reset = re.sub(r"(?m)^default_cluster = .*$", 'default_cluster = "generic"', text)
    reset = re.sub(r"(?m)^default_account = .*$", 'default_account = ""', reset)
    if reset != text and "MLMODELDEV_CLUSTERS" not in os.environ:
        folder = Path(tempfile.mkdtemp(prefix="clusters-"))
        (folder / "clusters.toml").write_text(reset)
        os.environ["MLMODELDEV_CLUSTERS"] = str(folder / "clusters.toml")
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Runs each test in an empty directory (runs/ and data/ land there) with wandb offline and no credentials."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("TRAIN_RUN_DIR", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests: two torch threads on a 2-core machine stall on small operations."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def script_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: one torch thread (two 2-thread processes on 2 cores run ~15x slower), and
    not this process's wandb service (WANDB_SERVICE, set once a test here ran wandb): a child would log through it,
    and a killed-and-requeued job's run would still be open there ("run ID ... is in use")."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_SERVICE", None)
    env.update(extra)
    return env


def run_script(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Runs `python <repo>/<script> args...` in the current directory and returns its result (text)."""
    script, *rest = args
    return subprocess.run([sys.executable, str(REPO / script), *rest], capture_output=True, text=True,
                          timeout=timeout, env=script_env(**env))


# What the example classes are called; train.py's MODEL_CLASS / DATAMODULE_CLASS name the ones in use.
EXAMPLE_CLASSES = {"example_model": ("MODEL_CLASS", "model.ImageClassifier"),
                   "example_data": ("DATAMODULE_CLASS", "datamodule.DataModule")}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Once a researcher has put their own model or data in train.py, the tests of the example's own behaviour
    (its accuracy on digits, its constructor arguments) no longer apply: they are skipped, and say why. The
    machinery's tests use the tests' own model and data (tests/toy.py) and always run."""
    import train

    for marker, (name, example) in EXAMPLE_CLASSES.items():
        chosen = getattr(train, name)
        if f"{chosen.__module__}.{chosen.__qualname__}" == example:
            continue
        skip = pytest.mark.skip(reason=f"train.{name} is {chosen.__qualname__}, not the example {example}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


def copy_of_repo(copy: Path, suffix: str = "") -> Path:
    """This repository's files (tracked, and new ones git does not ignore), those ending in `suffix`, copied into
    `copy`: a project as a researcher has it, for tests that edit the researcher's places."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in names:
        if (REPO / name).is_file() and name.endswith(suffix):
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    return copy


@pytest.fixture
def toy_in_train(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.py as it reads after MODEL_CLASS = ToyClassifier and DATAMODULE_CLASS = ToyData (tests/toy.py)."""
    from toy import ToyClassifier, ToyData

    import train

    monkeypatch.setattr(train, "MODEL_CLASS", ToyClassifier)
    monkeypatch.setattr(train, "DATAMODULE_CLASS", ToyData)
    monkeypatch.setitem(train.CLI_SETUP, "model_class", ToyClassifier)
    monkeypatch.setitem(train.CLI_SETUP, "datamodule_class", ToyData)


QUICK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
