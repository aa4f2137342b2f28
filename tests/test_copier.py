"""The repository as a Copier template (README.md, "Start a new project", "Take template updates"), offline: the
template is a copy of this repository's files committed and tagged in a temporary git repository, the project is
made from it with `copier copy`, changed by its researcher in the four places, and updated with `make update`
to later tags, one with a change that conflicts with the researcher's. The template's own: copier.yml leaves it out
of projects."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import QUICK, REPO, copy_of_repo, script_env
from test_make_it_your_own import OWN_DATASET, OWN_MODEL, edit, make_it_mine

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.org", "GIT_COMMITTER_NAME": "Test",
                "GIT_COMMITTER_EMAIL": "test@example.org"}
# One epoch of a few batches: each training here is one torch process, most of it importing torch and Lightning.
TINY = [*QUICK, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", "--cka.every_n_epochs=0", "--run_dir=runs/tiny"]  # runs/: ignored by git
TEMPLATE_ONLY = ["copier.yml", "tests/test_copier.py", "tests/test_copier_projects.py", "docs/template.md", "skeleton",
                 "model.py.jinja"]


def run(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=script_env(**GIT_IDENTITY))


def ok(cwd: Path, *args: str, timeout: float = 300) -> str:
    result = run(cwd, *args, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def commit_all(repo: Path, message: str) -> None:
    ok(repo, "git", "add", "-A")
    ok(repo, "git", "commit", "-qm", message)


def release(template: Path, tag: str) -> None:
    commit_all(template, f"Template {tag}")
    ok(template, "git", "tag", tag)


def make_template(root: Path) -> Path:
    """This repository's files (tracked, and new ones not ignored) as a git repository in `root`, released v1.0.0."""
    template = copy_of_repo(root / "template")
    ok(template, "git", "init", "-q")
    release(template, "v1.0.0")
    return template


def copier_copy(template: Path | str, project: Path, *answers: str, version: str = "v1.0.0") -> str:
    data = [f"--data={answer}" for answer in answers]
    return ok(project.parent, sys.executable, "-m", "copier", "copy", "--vcs-ref", version, "--defaults", *data,
              str(template), project.name)


def make_update(project: Path) -> subprocess.CompletedProcess:
    # This test's own environment (make's VENV), so make finds it complete and builds nothing.
    return run(project, "make", "--no-print-directory", "update", f"VENV={sys.prefix}")


def train(project: Path, *args: str) -> str:
    shutil.rmtree(project / "runs", ignore_errors=True)
    return ok(project, sys.executable, "train.py", *TINY, *args)


def four_places(project: Path, sweep_values: str) -> dict[str, str]:
    """The researcher's own model, dataset, metric and sweep values in the four places; returns those four files."""
    make_it_mine(project)
    edit(project / "sweep.py", '"model.hidden_dim": {"values": [64, 128, 256]},', sweep_values)
    return {name: (project / name).read_text() for name in ["model.py", "datamodule.py", "train.py", "sweep.py"]}


# What the project's tests see as clusters.toml (tests/conftest.py's pytest_configure).
TEST_DEFAULTS = """import sys; sys.path.insert(0, "tests")
import conftest
from support.clusters.profiles import load_clusters
cleanups = []
conftest.pytest_configure(type("Config", (), {"add_cleanup": lambda self, f: cleanups.append(f)})())
clusters = load_clusters()
print(clusters.default_cluster, repr(clusters.get("hec").default_account))
for cleanup in cleanups:
    cleanup()
"""


def test_copier_questions_offer_every_cluster_of_clusters_toml():
    questions = yaml.safe_load((REPO / "copier.yml").read_text())
    clusters = tomllib.loads((REPO / "clusters.toml").read_text())
    assert questions["default_cluster"]["help"].endswith(" - " + ", ".join(list(clusters["clusters"])[:-1]) + " or "
                                                         + list(clusters["clusters"])[-1]), \
        "copier.yml's default_cluster help names other clusters than clusters.toml has: name the same ones"
    assert questions["default_cluster"]["default"] == clusters["default_cluster"]


@pytest.mark.slow
def test_a_project_made_from_the_template_trains_keeps_its_code_through_updates_and_shows_conflicts(tmp_path: Path):
    # 1. Template v1.0.0 -> a project, committed; it trains, its tests collect.
    template = make_template(tmp_path)
    project = tmp_path / "my-project"
    copier_copy(template, project, "wandb_entity=my-team", "default_cluster=hec", "hec_account=proj-123")
    for name in TEMPLATE_ONLY:
        assert not (project / name).exists(), f"{name} is the template's own and must stay out of projects"
    for name in ["model.py", "datamodule.py", "train.py", "sweep.py", "Makefile", "CHANGELOG.md"]:
        assert (project / name).read_bytes() == (template / name).read_bytes(), name
    assert (project / "README.md").read_text().startswith("# my-project\n")
    assert (project / "README.md").read_text().endswith((template / "README.md").read_text().split("\n", 1)[1])
    clusters = tomllib.loads((project / "clusters.toml").read_text())
    assert (clusters["default_cluster"], clusters["clusters"]["hec"]["default_account"]) == ("hec", "proj-123")
    assert (project / "clusters.toml").read_text().count("\n") == (template / "clusters.toml").read_text().count("\n")
    wandb_defaults = ok(project, sys.executable, "-c", "from support.training.wandb_access import default_entity, "
                        "default_project; print(default_entity(), default_project())")
    assert wandb_defaults.split() == ["my-team", "my-project"]
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["_commit"] == "v1.0.0" and answers["keep_example"] is True
    ok(project, "git", "init", "-q")
    commit_all(project, "my-project from the template v1.0.0")
    assert "final metrics:" in train(project)
    collected = ok(project, sys.executable, "-m", "pytest", "--collect-only", "-q", timeout=600)
    # Its tests run with the template's defaults (the Slurm tests submit without --cluster), its file untouched.
    assert ok(project, sys.executable, "-c", TEST_DEFAULTS).split() == ["generic", "''"]
    assert tomllib.loads((project / "clusters.toml").read_text())["default_cluster"] == "hec"
    assert re.search(r"\d+ tests collected", collected) and "test_copier" not in collected

    # 2. The researcher's own model, dataset, metric and sweep, in the four places.
    mine = four_places(project, '"model.hidden_dim": {"values": [16, 32]},\n'
                                 '        "data.dataset": {"value": "blobs"},')
    edit(project / "README.md", "# my-project\n", "# my-project\n\nBlobs, classified by an MLP.\n")
    commit_all(project, "My model and data")

    # 3. The template's v1.1.0: a machinery fix, a line of train.py outside "What you change", a README comment.
    edit(template / "support/atomic.py", "from __future__ import annotations\n",
         "from __future__ import annotations\n\nTEMPLATE_FIX = 1  # v1.1.0\n")
    old_line = 'RUN_DIR_ENV = "TRAIN_RUN_DIR"  # hands the run directory'
    new_line = 'RUN_DIR_ENV = "TRAIN_RUN_DIR"  # (v1.1.0) hands the run directory'
    edit(template / "train.py", old_line, new_line)
    old_comment = "(Inside the environment: "
    edit(template / "README.md", old_comment, "(v1.1.0. Inside the environment: ")
    release(template, "v1.1.0")

    # 4. make update: the template's changes arrive, every line of the researcher's stays as it was, no conflicts.
    refused = make_update(template)  # the template itself has no answers to update with
    assert refused.returncode != 0 and "error: no .copier-answers.yml here: make update works in a project made by " \
        "copier copy" in refused.stderr
    (project / "stray.txt").write_text("not committed")
    refused = make_update(project)
    assert refused.returncode != 0 and "error: uncommitted changes" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 2  # the one line, then make's own
    (project / "stray.txt").unlink()
    updated = make_update(project)
    assert updated.returncode == 0, updated.stdout[-3000:] + updated.stderr[-3000:]
    assert "from the template version v1.0.0 to v1.1.0" in updated.stdout and "No conflicts" in updated.stdout
    assert "TEMPLATE_FIX = 1" in (project / "support/atomic.py").read_text()
    for name in ["model.py", "datamodule.py", "sweep.py"]:
        assert (project / name).read_text() == mine[name], f"make update changed {name}, the researcher's"
    assert (project / "train.py").read_text() == mine["train.py"].replace(old_line, new_line)
    readme = (project / "README.md").read_text()
    assert "Blobs, classified by an MLP." in readme and "(v1.1.0. Inside the environment: " in readme
    assert yaml.safe_load((project / ".copier-answers.yml").read_text())["_commit"] == "v1.1.0"
    assert not conflicted(project)
    commit_all(project, "Template v1.1.0")
    trained = train(project, "--data.dataset=blobs")
    assert "test/acc=" in trained

    # 5. The template changes a line the researcher changed too: both versions are in the file, listed.
    edit(template / "train.py", 'MONITOR, MONITOR_MODE = "val/loss", "min"',
         'MONITOR, MONITOR_MODE = "val/loss", "min"  # v1.2.0')
    release(template, "v1.2.0")
    updated = make_update(project)
    assert updated.returncode == 0, updated.stdout[-3000:] + updated.stderr[-3000:]
    assert "Conflicts, where the template changed lines that you changed too: train.py" in updated.stdout
    assert conflicted(project) == ["train.py"]
    text = (project / "train.py").read_text()
    assert re.search(r'<<<<<<< .*\nMONITOR, MONITOR_MODE = "val/acc", "max"\n=======\n'
                     r'MONITOR, MONITOR_MODE = "val/loss", "min"  # v1.2.0\n>>>>>>> ', text)
    for line in mine["train.py"].replace(old_line, new_line).splitlines():  # nothing else lost
        assert line in text.splitlines()


def conflicted(project: Path) -> list[str]:
    """The project's files with conflict markers, and its .rej files."""
    found = [path for path in project.rglob("*") if path.is_file() and ".git" not in path.parts and (
        path.suffix == ".rej" or re.search(r"^(<<<<<<<|>>>>>>>) ", path.read_text(errors="replace"), re.M))]
    return sorted(str(path.relative_to(project)) for path in found)


OWN_DATAMODULE = '''"""My data: 8x8 images of 4 classes, each class brighter in its own quarter."""

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class BlobsData(pl.LightningDataModule):
    num_classes = 4

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str | None = None) -> None:
        generator = torch.Generator().manual_seed(0)
        y = torch.randint(0, 4, (400,), generator=generator)
        x = torch.rand(400, 1, 8, 8, generator=generator) / 2
        for label, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
            x[y == label, :, r:r + 4, c:c + 4] += 0.5
        self.data = TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)
'''

# One process: train.py trains, then sweep.py checks SWEEP_CONFIG against the model and data in use.
TRAIN_AND_CHECK_SWEEP = f"""import sys, train, sweep
train.main({TINY!r})
sys.exit(sweep.main(["--dry-run"]))
"""


@pytest.mark.slow
def test_a_project_without_the_example_trains_from_its_skeleton_and_then_with_its_own_code(tmp_path: Path):
    template = make_template(tmp_path)
    project = tmp_path / "skeleton-project"
    copier_copy(template.name, project, "keep_example=false")  # a relative path: recorded as given
    assert (project / "model.py").read_text() == (REPO / "skeleton/model.py").read_text()
    assert (project / "datamodule.py").read_text() == (REPO / "skeleton/datamodule.py").read_text()
    assert (project / "train.py").read_bytes() == (REPO / "train.py").read_bytes()
    clusters = tomllib.loads((project / "clusters.toml").read_text())
    assert (clusters["default_cluster"], clusters["clusters"]["generic"]["default_account"]) == ("generic", "")
    ok(project, "git", "init", "-q")
    commit_all(project, "skeleton-project from the template v1.0.0")
    refused = make_update(project)  # the recorded relative path means nothing from the project's directory
    assert refused.returncode != 0 and "error: the template (template, _src_path in .copier-answers.yml) is not a " \
        "directory from here: write its git URL or absolute path there" in refused.stderr
    out = ok(project, sys.executable, "-c", TRAIN_AND_CHECK_SWEEP)  # the skeleton as it comes
    assert "final metrics:" in out and "test/acc=" in out

    (project / "model.py").write_text(OWN_MODEL)
    (project / "datamodule.py").write_text(OWN_DATAMODULE)
    edit(project / "train.py", "MODEL_CLASS = model.ImageClassifier", "MODEL_CLASS = model.FlatMLP")
    edit(project / "train.py", "DATAMODULE_CLASS = datamodule.DataModule", "DATAMODULE_CLASS = datamodule.BlobsData")
    edit(project / "train.py", 'MONITOR, MONITOR_MODE = "val/loss", "min"', 'MONITOR, MONITOR_MODE = "val/acc", "max"')
    edit(project / "sweep.py", '"data.batch_size": {"values": [32, 64, 128]},', '"data.batch_size": {"values": [16]},')
    shutil.rmtree(project / "runs")  # a new run: one run per run directory
    out = ok(project, sys.executable, "-c", TRAIN_AND_CHECK_SWEEP)
    assert "test/acc=" in out and "maximize val/acc" in out


# The template as v0.1.0 landed (the last commit of the session that wrote CHANGELOG.md's v0.1.0): the flat support/
# of 28 modules that v0.3.0 grouped into packages. Read from this repository's history (tags do not survive here).
V0_1_0 = "2a45c6a3dae1b97ff3c0b8af4f1f92e3dc472e84"
# A module of the researcher's own, beside the template's files, written against v0.1.0's layout.
OWN_MODULE = "from support.downloads import RemoteFile\n"


def replace_files(template: Path, commit: str | None = None) -> None:
    """`template`'s files (its .git kept) replaced by this repository's: as they were at `commit`, or as they are."""
    for path in template.iterdir():
        if path.name != ".git":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if commit is None:
        copy_of_repo(template)
        return
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, timeout=120)
    assert archive.returncode == 0, f"this test needs the repository's history (a full clone): {archive.stderr}"
    subprocess.run(["tar", "-x", "-C", str(template)], input=archive.stdout, check=True, timeout=120)


@pytest.mark.slow
def test_a_project_made_at_v0_1_0_takes_the_packaged_support_with_make_update(tmp_path: Path):
    """Issue 30: v0.3.0 moved support/'s modules into packages, which Copier sees as deletions plus additions. A
    project made at v0.1.0, with its researcher's model, data, metric, sweep and a module of their own, runs
    `make update`: every template file arrives as the template has it, without a conflict, the old modules are
    gone, the researcher's lines are kept, it trains, and their own old import gets one line naming the new place."""
    template = tmp_path / "template"
    template.mkdir()
    ok(template, "git", "init", "-q")
    replace_files(template, V0_1_0)
    release(template, "v0.1.0")
    old_files = set(ok(template, "git", "ls-files").split())
    project = tmp_path / "old-project"
    copier_copy(template, project, version="v0.1.0")
    ok(project, "git", "init", "-q")
    commit_all(project, "old-project from the template v0.1.0")
    mine = four_places(project, '"model.hidden_dim": {"values": [16]},')
    (project / "my_data.py").write_text(OWN_MODULE)
    commit_all(project, "My model, data and sweep")

    replace_files(template)  # this version
    release(template, "v0.3.0")
    new_files = set(ok(template, "git", "ls-files").split())
    updated = make_update(project)
    assert updated.returncode == 0, updated.stdout[-3000:] + updated.stderr[-3000:]
    assert "from the template version v0.1.0 to v0.3.0" in updated.stdout and "No conflicts" in updated.stdout
    assert not conflicted(project)

    gone = sorted(name for name in old_files - new_files if name.startswith("support/"))
    assert "support/downloads.py" in gone and "support/training.py" in gone and len(gone) >= 20
    assert not [name for name in gone if (project / name).exists()], "make update left v0.1.0's modules behind"
    ours = {*TEMPLATE_ONLY, "README.md", "clusters.toml", "project.toml", *mine}  # template-only, rendered, edited
    for name in sorted(new_files):
        if not name.endswith(".jinja") and not any(name == o or name.startswith(o + "/") for o in ours):
            assert (project / name).read_bytes() == (template / name).read_bytes(), f"{name} differs from v0.3.0's"
    assert (project / "model.py").read_text() == mine["model.py"]
    datamodule = (project / "datamodule.py").read_text()
    assert OWN_DATASET in datamodule and '"blobs": DatasetSpec(1, 4, 255, build_blobs)' in datamodule
    assert "from support.data.downloads import" in datamodule and "from support.downloads" not in datamodule
    train_py = (project / "train.py").read_text()
    assert "MODEL_CLASS = model.FlatMLP" in train_py and 'MONITOR, MONITOR_MODE = "val/acc", "max"' in train_py
    assert "from support.run_dir import checks, writer" in train_py
    assert '"model.hidden_dim": {"values": [16]},' in (project / "sweep.py").read_text()

    commit_all(project, "Template v0.3.0")
    assert "test/acc=" in train(project, "--data.dataset=blobs")
    layers = ok(project, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_layers.py")
    assert " passed" in layers and "failed" not in layers
    moved = run(project, sys.executable, "-c", "import my_data")
    assert moved.returncode == 1 and moved.stderr.strip().splitlines()[-1] == (
        "ModuleNotFoundError: support.downloads moved to support.data.downloads in the template's v0.3.0 "
        "(CHANGELOG.md): change the import")
