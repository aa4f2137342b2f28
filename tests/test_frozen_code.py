"""What you submitted is what runs (support/provenance/): every grid row, search worker, agent, requeue and resume
runs the frozen copy of the code made at submission, whatever the project holds by then, and every run records what
it ran (RUN_DIR/provenance.json). The integration tests break model.py and train.py in a project right after it
submitted, and check that the runs trained anyway, with the code they name."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import copy_of_repo, script_env
from slurm_fixtures import SlurmCluster, slurm, slurm_cluster  # noqa: F401  (fixtures)
from test_sweep import fake_server, make_checkout, records  # noqa: F401  (fake_server: a fixture)

from support.errors import LaunchError
from support.provenance import snapshot
from support.provenance.record import PROVENANCE_FILE
from support.provenance.snapshot import CODE_RECORD, PATCH_FILE, code_files, differing_files, freeze

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.org", "GIT_COMMITTER_NAME": "Test",
                "GIT_COMMITTER_EMAIL": "test@example.org"}
BREAK = '\nraise SystemExit("broken after the submission")\n'
DIRTY = "\n# an uncommitted change, made before the submission\n"
# Each row: one quick epoch of the example on the embedded digits, one thread.
EXTRA = ["--", "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2",
         "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false", "--cka.every_n_epochs=0"]
SMALL = ["--gpus-per-node", "0", "--cpus-per-task", "1", "--mem", "1G", "--time", "00:10:00"]


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env=script_env(**GIT_IDENTITY))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def small_project(root: Path) -> Path:
    """A git project unlike the template: its own train.py, an ignored data/ and runs/, an untracked new file, a
    stray checkpoint git does not ignore, and an uncommitted change."""
    root.mkdir()
    (root / ".gitignore").write_text("data/\nruns/\n")
    (root / "train.py").write_text("VERSION = 1\n")
    (root / "lib").mkdir()
    (root / "lib" / "net.py").write_text("WIDTH = 8\n")
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "first")
    (root / "lib" / "net.py").write_text("WIDTH = 16\n")  # uncommitted
    (root / "notes.md").write_text("new, untracked, not ignored\n")
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_bytes(b"x" * 1000)
    (root / "stray.ckpt").write_bytes(b"weights")
    return root


def test_the_copy_holds_the_tree_as_it_is_read_only_and_is_shared_by_identical_submissions(tmp_path: Path):
    project = small_project(tmp_path / "project")
    first = freeze(project, project / "runs")
    copy = first.dir
    names = sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file())
    assert names == sorted([".gitignore", "train.py", "lib/net.py", "run.sh", "notes.md", CODE_RECORD, PATCH_FILE])
    assert (copy / "lib" / "net.py").read_text() == "WIDTH = 16\n"  # the uncommitted change is what runs
    record = json.loads((copy / CODE_RECORD).read_text())
    assert record["commit"] == git(project, "rev-parse", "HEAD") and record["dirty"] is True
    assert record["untracked"] == ["notes.md"] and "+WIDTH = 16" in (copy / PATCH_FILE).read_text()
    assert all(not (p.stat().st_mode & 0o222) for p in copy.rglob("*") if p.is_file())  # read-only
    assert os.access(copy / "run.sh", os.X_OK) and copy.parent == project / "runs" / ".code"
    again = freeze(project, project / "runs")
    assert again.dir == copy and again.reused and not first.reused
    (project / "train.py").write_text("VERSION = 2\n")
    edited = freeze(project, project / "runs")
    assert edited.dir != copy and differing_files(copy, project) == ["train.py"]
    assert not list((project / "runs" / ".code").glob(".partial-*"))


def test_a_project_outside_git_gets_its_copy_without_runs_data_caches_or_checkpoints(tmp_path: Path):
    project = tmp_path / "plain"
    for name in ("train.py", "model.py", "runs/x/last.ckpt", "data/d.pt", ".venv/bin/python", "__pycache__/m.pyc",
                 "sub/__pycache__/n.pyc", "sub/util.py", "w.ckpt", "sub/data/loader.py", "sub/wandb/run-1.wandb"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(name)
    snap = freeze(project, project / "runs")
    assert code_files(snap.dir, ask_git=False) == [CODE_RECORD, "model.py", "sub/data/loader.py", "sub/util.py",
                                                    "train.py"]  # data/ at the root is data; sub/data/ is code
    assert snap.commit is None and snap.dirty  # no commit to name: the copy's hash is its identity


def test_a_copy_into_a_runs_directory_inside_the_tree_never_copies_the_store(tmp_path: Path):
    project = small_project(tmp_path / "project")
    inside = project / "experiments"  # not ignored by git: earlier copies must not be copied again
    first = freeze(project, inside)
    (project / "train.py").write_text("VERSION = 3\n")
    second = freeze(project, inside)
    assert not [name for name in code_files(second.dir, ask_git=False) if "experiments" in name or ".code" in name]
    assert first.dir != second.dir


@pytest.mark.parametrize("case", ["large", "conflict", "no train.py", "unreadable"])
def test_a_tree_that_cannot_be_frozen_is_refused_in_one_line_before_anything_is_written(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    project = small_project(tmp_path / "project")
    if case == "large":
        (project / "notebooks").mkdir()
        (project / "notebooks" / "results.npy").write_bytes(b"0" * 3 * 2**20)
        monkeypatch.setenv(snapshot.MAX_MB_ENV, "2")
        expected = "biggest: notebooks/results.npy (3.0 MB)"
    elif case == "conflict":
        (project / "lib" / "net.py").write_text("<<<<<<< HEAD\nWIDTH = 16\n=======\nWIDTH = 32\n>>>>>>> other\n")
        expected = "lib/net.py holds merge conflict markers"
    elif case == "no train.py":
        (project / "train.py").unlink()
        expected = "no train.py in"
    else:
        real = Path.read_bytes

        def read_bytes(path: Path) -> bytes:  # as root, a chmod 000 file is still readable: refuse it this way
            if path.name == "net.py":
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        expected = "cannot read lib/net.py to freeze the code (Permission denied)"
    with pytest.raises(LaunchError) as raised:
        freeze(project, project / "runs")
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    assert not (project / "runs").exists()


def test_an_interrupted_copy_is_never_used_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    project = small_project(tmp_path / "project")
    store = project / "runs" / ".code"
    real, written = Path.write_bytes, []

    def write_bytes(path: Path, data: bytes) -> int:  # the disk fills up at the third file
        written.append(path)
        if len(written) % 3 == 0:
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(OSError):
        freeze(project, project / "runs")
    assert list(store.iterdir()) == []  # no copy, and the partial one removed
    monkeypatch.setattr(snapshot, "_remove", lambda path: None)  # as if killed before it could clean up
    with pytest.raises(OSError):
        freeze(project, project / "runs")
    # What a job could be pointed at (a directory named by a hash) does not exist: only the temporary name does.
    assert [path.name.startswith(".partial-") for path in store.iterdir()] == [True]
    monkeypatch.setattr(Path, "write_bytes", real)
    snap = freeze(project, project / "runs")  # the next submission makes a complete copy beside the leftover
    assert (snap.dir / CODE_RECORD).is_file() and not snap.reused and not snap.dir.name.startswith(".partial-")


def test_two_submissions_at_once_each_get_a_complete_copy(tmp_path: Path):
    project = small_project(tmp_path / "project")
    got: list[snapshot.Snapshot] = []
    threads = [threading.Thread(target=lambda: got.append(freeze(project, project / "runs"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 4 and len({snap.dir for snap in got}) == 1
    assert (got[0].dir / CODE_RECORD).is_file() and (got[0].dir / "lib" / "net.py").read_text() == "WIDTH = 16\n"
    assert not list((project / "runs" / ".code").glob(".partial-*"))


# ---- the template's own jobs -------------------------------------------------------------------------------------
def project_copy(tmp_path: Path) -> Path:
    """This project's files as a researcher's clone: committed, then changed without committing."""
    project = copy_of_repo(tmp_path / "project")
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "the project")
    with open(project / "model.py", "a") as f:
        f.write(DIRTY)
    return project


def break_code(project: Path) -> None:
    for name in ("model.py", "train.py"):
        with open(project / name, "a") as f:
            f.write(BREAK)


def sweep_file(tmp_path: Path) -> str:
    config = {"name": "frozen", "program": "train.py", "method": "grid", "metric": {"name": "val/loss",
              "goal": "minimize"}, "parameters": {"model.hidden_dim": {"values": [16, 32]}}}
    (tmp_path / "sweep.json").write_text(json.dumps(config))
    return str(tmp_path / "sweep.json")


def slurm_train(project: Path, *args: str, env: dict[str, str], timeout: float = 300) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "slurm_train.py", *args], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert path.exists(), f"{path} never appeared"


def trained_code(run_dir: Path) -> list[dict]:
    return [attempt["code"] for attempt in json.loads((run_dir / PROVENANCE_FILE).read_text())["attempts"]]


def assert_ran_the_submission(run_dir: Path, project: Path, head: str) -> dict:
    code = trained_code(run_dir)[-1]
    assert code["commit"] == head and code["dirty"] is True, code
    assert Path(code["dir"]).parent == project / "runs" / ".code"
    assert DIRTY.strip() in Path(code["patch"]).read_text() and BREAK.strip() not in (Path(code["dir"]) /
                                                                                         "model.py").read_text()
    return code


@pytest.mark.slow
def test_local_rows_and_search_workers_started_after_an_edit_run_the_submitted_code(tmp_path: Path):
    project, env = project_copy(tmp_path), script_env()
    head = git(project, "rev-parse", "HEAD")
    grid = slurm_train(project, "--sweep-config", sweep_file(tmp_path), "--local", "--max-concurrent", "1", *SMALL,
                       *EXTRA, env=env)
    grid_dir = project / "runs"
    wait_for(grid_dir)
    wait_for(next(grid_dir.glob("grid-*")) / "row-0" / PROVENANCE_FILE)  # row 0 trains; row 1 starts later
    break_code(project)
    output = grid.communicate(timeout=300)[0]
    assert grid.returncode == 0, output
    rows = [next(grid_dir.glob("grid-*")) / f"row-{i}" for i in (0, 1)]
    assert all((row / "done").is_file() for row in rows) and "code: frozen into" in output
    codes = [assert_ran_the_submission(row, project, head) for row in rows]
    assert codes[0] == codes[1]

    (project / "train.py").write_text((project / "train.py").read_text().replace(BREAK, ""))
    (project / "model.py").write_text((project / "model.py").read_text().replace(BREAK, "") + "# later\n")
    # evaluate.py: one line when the code here is not the run's; --own-code evaluates with the run's copy.
    evaluated = subprocess.run([sys.executable, "evaluate.py", str(rows[0])], cwd=project, env=env,
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0 and "test metrics:" in evaluated.stdout, evaluated.stderr
    assert f"note: this code differs from the code row-0 trained with (its frozen copy {codes[0]['dir']}) in " \
           "model.py: --own-code evaluates with that copy" in evaluated.stderr, evaluated.stderr
    own = subprocess.run([sys.executable, "evaluate.py", str(rows[0]), "--own-code"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=300)
    assert own.returncode == 0 and "test metrics:" in own.stdout, own.stderr
    assert f"evaluating with the run's own code: {codes[0]['dir']}" in own.stderr and "note:" not in own.stderr
    (project / "model.py").write_text((project / "model.py").read_text().replace("# later\n", ""))  # as submitted
    search = slurm_train(project, "--sweep-config", sweep_file(tmp_path), "--search", "--count", "2", "--local",
                         "--max-concurrent", "1", *SMALL, *EXTRA, env=env)
    wait_for(project / "runs", 60)
    deadline = time.monotonic() + 120
    while not list(project.glob("runs/search-*/run-0000/" + PROVENANCE_FILE)) and time.monotonic() < deadline:
        time.sleep(0.2)
    break_code(project)
    output = search.communicate(timeout=300)[0]
    assert search.returncode == 0, output
    search_dir = next(project.glob("runs/search-*"))
    states = [json.loads(path.read_text())["state"] for path in sorted(search_dir.glob("run-*.json"))]
    assert states == ["finished", "finished"], output
    search_codes = [assert_ran_the_submission(run, project, head) for run in sorted(search_dir.glob("run-????"))]
    # The same code as the grid's submission: the same copy, shared (content-addressed), not a second one.
    assert len(search_codes) == 2 and search_codes[0] == search_codes[1] == codes[0]
    assert "code: the identical copy" in output and len(list((project / "runs" / ".code").iterdir())) == 1


@pytest.mark.slow
def test_a_slurm_grid_runs_its_submission_through_edits_requeue_and_resume(slurm: SlurmCluster,  # noqa: F811
                                                                            tmp_path: Path):
    project = project_copy(tmp_path)
    env = slurm.env(script_env())
    head = git(project, "rev-parse", "HEAD")
    submit = slurm_train(project, "--sweep-config", sweep_file(tmp_path), "--max-concurrent", "1", *SMALL, *EXTRA,
                         env=env)
    output = submit.communicate(timeout=300)[0]
    assert submit.returncode == 0, output
    break_code(project)  # right after the submission, before any row started
    job = re.search(r"submitted job (\d+)", output).group(1)
    slurm.submitted.append(job)
    grid = Path(re.search(r"run directory: (\S+)", output).group(1))
    assert "code: frozen into" in output

    # Row 0 requeued while it trains: it runs the same copy again (Slurm counts the restart).
    wait_for(grid / "row-0" / PROVENANCE_FILE, 150)
    assert slurm.run("scontrol", "requeue", f"{job}_0").returncode == 0
    slurm.wait([job], timeout=240)
    logs = "\n".join(path.read_text() for path in grid.glob("row-*.out"))
    assert all((grid / f"row-{i}" / "done").is_file() for i in (0, 1)), logs
    requeued = trained_code(grid / "row-0")
    assert len(requeued) >= 2 and len({code["hash"] for code in requeued}) == 1, requeued
    attempts = json.loads((grid / "row-0" / PROVENANCE_FILE).read_text())["attempts"]
    assert attempts[-1]["slurm"]["restarts"] == "1" and attempts[-1]["exit"] == 0
    codes = [assert_ran_the_submission(grid / f"row-{i}", project, head) for i in (0, 1)]

    # --resume after the edit: the frozen copy, said in one line with what differs now.
    (grid / "row-1" / "done").unlink()
    resume = subprocess.run([sys.executable, "slurm_train.py", "--resume", str(grid)], cwd=project, env=env,
                            capture_output=True, text=True, timeout=120)
    assert resume.returncode == 0, resume.stdout + resume.stderr
    assert f"code: the rows run the code they were submitted with ({codes[0]['dir']}); the project's differs in " \
           "model.py, train.py (--current-code takes it)" in resume.stderr
    again = re.search(r"submitted job (\d+)", resume.stdout).group(1)
    slurm.submitted.append(again)
    slurm.wait([again], timeout=150)
    assert (grid / "row-1" / "done").is_file() and trained_code(grid / "row-1")[-1] == codes[1]

    # --resume --current-code: the project's code as it is now (here: broken), after listing what differs.
    (grid / "row-1" / "done").unlink()
    current = subprocess.run([sys.executable, "slurm_train.py", "--resume", str(grid), "--current-code"],
                             cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert current.returncode == 0, current.stdout + current.stderr
    assert "code: the resumed tasks run the project's code as it is now; it differs from the submitted in " \
           "model.py, train.py" in current.stderr
    last = re.search(r"submitted job (\d+)", current.stdout).group(1)
    slurm.submitted.append(last)
    slurm.wait([last], timeout=150)
    assert not (grid / "row-1" / "done").exists()
    assert "broken after the submission" in (grid / "row-1.out").read_text()
    assert f"code={codes[0]['dir']}" not in (grid / "job.sbatch").read_text()


AGENT_TRAIN = """import json, os, sys
VERSION = 1
with open(os.path.join(os.environ["FAKE_LOG"], "train.json"), "w") as f:
    json.dump({"version": VERSION, "file": os.path.abspath(__file__), "cwd": os.getcwd(), "argv": sys.argv[1:]}, f)
"""


@pytest.mark.slow
def test_local_agents_run_the_program_frozen_when_they_started(tmp_path: Path, fake_server: str):  # noqa: F811
    repo, env, log = make_checkout(tmp_path, fake_server)
    (repo / "train.py").write_text(AGENT_TRAIN)  # the sweep's program, as the agent starts it: `python train.py`
    go = tmp_path / "go"
    env.update(FAKE_PROGRAM="train.py", FAKE_GO=str(go))
    agent = subprocess.Popen([str(repo / "run_sweep.sh"), "me/proj/abc123"], cwd=repo, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(repo / "runs" / ".code", 60)
    deadline = time.monotonic() + 60
    while not list(log.glob("agent-started-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    (repo / "train.py").write_text(AGENT_TRAIN.replace("VERSION = 1", "VERSION = 2"))  # edited after the start
    go.touch()
    output = agent.communicate(timeout=120)[0]
    assert agent.returncode == 0, output
    ran = json.loads((log / "train.json").read_text())
    copy = next((repo / "runs" / ".code").iterdir())
    assert ran["version"] == 1 and ran["file"] == str(copy / "train.py") and ran["cwd"] == str(repo), ran
    assert f"run_sweep.sh: code frozen into {copy}" in output
    assert records(log, "agent-*.json")[0]["run_rc"] == 0
