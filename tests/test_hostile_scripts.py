"""Hostile values on their way into job scripts and grid directories, table-driven (tests/test_hostile_inputs.py holds
the training scripts' table): every slurm_train.py option and clusters.toml field that reaches a generated script is
fed a newline, a quote, a `$()`, a backtick and a semicolon, and is refused in one line before anything is written,
or quoted so the job runs it as data. The job script itself is run (bash, a stand-in train.py that records its
argv): arguments after `--` reach every row whole, a moved or copied grid resumes where it is, and --local counts
a row finished only by its done marker. Damaged grid.json and search.json are one line on --resume. No torch."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

import slurm_train
from support.clusters.plan import job_start, plan_job
from support.clusters.profiles import load_clusters
from support.errors import LaunchError
from support.slurm.local_rows import LOCAL_TASK_ENV, run_local
from support.slurm.resume import relocate
from support.slurm.scripts import render_script

# Each would run `touch PWNED` (in the job's directory) if it reached a shell unquoted.
PAYLOADS = {"newline": "x\ntouch PWNED", "quote": "x'\"touch PWNED", "dollar-paren": "x$(touch PWNED)",
            "backtick": "x`touch PWNED`", "semicolon": "x;touch PWNED"}
# Options whose values go into the #SBATCH header or a comment line of the job script, with the words its error
# names. --time and --agents are refused by the option parser (exit 2), the others by the header's check (exit 1).
OPTIONS = {"--job-name": "--job-name", "--account": "--account", "--partition": "--partition", "--mem": "--mem",
           "--gpu-type": "--gpu-type", "--time": "--time", "--agents": "--agents"}


def launch(argv: list[str]) -> tuple[int, str, str]:
    """slurm_train.main in this process: exit status (argparse's SystemExit included), stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = slurm_train.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def assert_one_line(code: int, err: str, words: str) -> None:
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code in (1, 2) and len(errors) == 1 and words in errors[0], (code, err)
    assert "Traceback" not in err


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
@pytest.mark.parametrize("option", OPTIONS)
def test_a_hostile_option_value_is_refused_in_one_line(option: str, payload: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--count", "1"] if option == "--agents" else []
    code, _, err = launch(["--dry-run", "--gpus-per-node", "0", "--runs-dir", "runs", *extra, option, payload])
    assert_one_line(code, err, OPTIONS[option])
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "runs").exists()


def clusters_file(tmp_path: Path, old: str, new: str) -> Path:
    """clusters.toml with texts replaced (`old` and `new`: |-separated, the first match of each), for
    MLMODELDEV_CLUSTERS."""
    # The file the tests see: a project made with its own default cluster or account reads a reset copy (conftest).
    text = Path(os.environ.get("MLMODELDEV_CLUSTERS") or REPO / "clusters.toml").read_text()
    for before, after in zip(old.split("|"), new.split("|"), strict=True):
        assert before in text, before
        text = text.replace(before, after, 1)
    path = tmp_path / "clusters.toml"
    path.write_text(text)
    return path


# clusters.toml field -> (the text it replaces in the generic cluster, how the payload is written in TOML)
FIELDS = {"default_account": ('default_account = ""', "default_account = {}"),
          "mem": ('mem = "16G"', "mem = {}"),
          "local_scratch": ('local_scratch = ""  # no node-local', "local_scratch = {}  # no node-local"),
          "name": ('name = "any Slurm cluster"', "name = {}")}


# A cluster's name goes into a comment line only (spaces are normal there: "any Slurm cluster"): only a newline could
# end it.
FIELD_CASES = [(field, kind) for field in FIELDS for kind in PAYLOADS if field != "name" or kind == "newline"]


@pytest.mark.parametrize("field, kind", FIELD_CASES, ids=[f"{field}-{kind}" for field, kind in FIELD_CASES])
def test_a_hostile_clusters_toml_value_is_refused_in_one_line(field: str, kind: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    old, new, payload = *FIELDS[field], PAYLOADS[kind]
    monkeypatch.setenv("MLMODELDEV_CLUSTERS", str(clusters_file(tmp_path, old, new.format(json.dumps(payload)))))
    monkeypatch.chdir(tmp_path)
    # A submission's preview: --local rows follow no cluster's values (issue 35), so these never reach its script.
    code, _, err = launch(["--dry-run", "--gpus-per-node", "0", "--runs-dir", "runs"])
    assert_one_line(code, err, field if field != "name" else "cluster name")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("field, old, new", [
    ("partition name", '[clusters.hec.partitions.gpu-short]|default_partition = "gpu-short"',
     '[clusters.hec.partitions."gpu;touch PWNED"]|default_partition = "gpu;touch PWNED"'),
    ("submit", 'submit = "ghbatch"  # usage', 'submit = "ghbatch;touch PWNED"  # usage'),
    ("setup", "setup = []", 'setup = ["module load x\\ntouch PWNED"]')])
def test_other_clusters_toml_fields_written_into_scripts_are_checked(field: str, old: str, new: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLMODELDEV_CLUSTERS", str(clusters_file(tmp_path, old, new)))
    monkeypatch.chdir(tmp_path)
    cluster = {"partition name": ["--cluster", "hec"],
               "submit": ["--cluster", "bede", "--partition", "gh", "--account", "p"], "setup": []}[field]
    code, _, err = launch(["--dry-run", "--gpus-per-node", "1", "--runs-dir", "runs", *cluster])
    assert_one_line(code, err, {"partition name": "a partition of clusters.toml", "submit": "submit",
                                "setup": "setup entry"}[field])
    assert not (tmp_path / "runs").exists()


def test_setup_lines_are_written_as_the_shell_lines_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A set-up entry is shell by design (`module load ...`): written verbatim, one line each, not quoted."""
    lines = ['module load "cuda/12.1"', "export X=$(hostname); echo `date`"]
    clusters = clusters_file(tmp_path, "setup = []", f"setup = {json.dumps(lines)}")
    monkeypatch.setenv("MLMODELDEV_CLUSTERS", str(clusters))
    plan = plan_job(load_clusters().get("generic"), {"gpus_per_node": 0}, check_environment=False)
    assert [line for line in job_start(plan).splitlines() if line in lines] == lines


# A stand-in for train.py in a frozen copy of the code: records its arguments, exits with $FAKE_EXIT (default 0).
FAKE_TRAIN = """import json, os, sys
with open(os.environ["ARGV_OUT"], "a") as out:
    out.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def grid(grid_dir: Path, argvs: list[list[str]], code: Path) -> Path:
    """A grid directory as slurm_train.py writes it (grid.json, job.sbatch for --local), running `code`/train.py."""
    code.mkdir(parents=True, exist_ok=True)
    (code / "train.py").write_text(FAKE_TRAIN)
    grid_dir.mkdir(parents=True)
    plan = plan_job(load_clusters().get("generic"), {"gpus_per_node": 0}, check_environment=False)
    (grid_dir / "grid.json").write_text(json.dumps({"runs_per_gpu": 1, "rows": [
        {"row": i, "config": {}, "argv": argv} for i, argv in enumerate(argvs)]}))
    (grid_dir / "job.sbatch").write_text(render_script(grid_dir, len(argvs), 1, plan, "grid", code, local=True))
    return grid_dir


def run_task(grid_dir: Path, task: int, argv_out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(grid_dir / "job.sbatch")], capture_output=True, text=True, cwd=grid_dir,
                          env={**os.environ, LOCAL_TASK_ENV: str(task), "ARGV_OUT": str(argv_out), **env}, timeout=60)


def test_arguments_after_the_separator_reach_every_row_whole_and_unrun(tmp_path: Path):
    """A newline in an argument after `--` split it in two in every row; quotes and `$()` stay data."""
    extra = [f"--wandb.name={payload}" for payload in PAYLOADS.values()] + ["--trainer.max_epochs=1", ""]
    # The grid's own path holds every character a shell would act on but a newline (refused: support/slurm/jobs.py).
    grid_dir = grid(tmp_path / "runs x'$(touch PWNED)`touch PWNED`;" / "grid-1", [extra, ["--seed=1", *extra]],
                    tmp_path / "code")
    for task in (0, 1):
        result = run_task(grid_dir, task, tmp_path / "argv.jsonl")
        assert result.returncode == 0, result.stdout + result.stderr
    seen = [json.loads(line) for line in (tmp_path / "argv.jsonl").read_text().splitlines()]
    assert seen == [[*extra, f"--run_dir={grid_dir}/row-0"], ["--seed=1", *extra, f"--run_dir={grid_dir}/row-1"]]
    assert (grid_dir / "row-0" / "done").is_file() and (grid_dir / "row-1" / "done").is_file()
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize("how", ["copied", "moved"])
def test_a_moved_or_copied_grid_resumes_where_it_is_and_never_touches_the_original(how: str, tmp_path: Path):
    original = grid(tmp_path / "runs" / "grid-1", [["--seed=0"], ["--seed=1"]], tmp_path / "runs" / "code")
    (original / "row-0").mkdir()
    (original / "row-0" / "done").write_text("{}")  # row 0 finished before the copy; row 1 did not
    elsewhere = tmp_path / "elsewhere" / "grid-copy"
    elsewhere.parent.mkdir()
    (shutil.copytree if how == "copied" else shutil.move)(original, elsewhere)
    before = {p: p.read_bytes() for p in original.rglob("*") if p.is_file()} if how == "copied" else {}
    relocate(elsewhere, local=True, dry_run=False)
    script = (elsewhere / "job.sbatch").read_text()
    assert str(original) not in script and f"grid_dir={elsewhere}" in script
    result = run_task(elsewhere, 1, tmp_path / "argv.jsonl")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "argv.jsonl").read_text()) == ["--seed=1", f"--run_dir={elsewhere}/row-1"]
    assert (elsewhere / "row-1" / "done").is_file() and not (original / "row-1").exists()
    assert {p: p.read_bytes() for p in original.rglob("*") if p.is_file()} == before  # the original: untouched


def test_a_moved_grid_cannot_resume_on_slurm_under_a_path_slurm_cannot_log_to(tmp_path: Path):
    original = grid(tmp_path / "runs" / "grid-1", [["--seed=0"]], tmp_path / "code")
    shutil.move(original, tmp_path / "a space")
    with pytest.raises(LaunchError, match="moved or copied from .*spaces"):
        relocate(tmp_path / "a space", local=False, dry_run=False)


def test_local_counts_a_row_finished_by_its_done_marker_not_its_exit_status(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture):
    """An emptied job.sbatch exits 0 having run nothing: it was reported "row 0 finished"."""
    grid_dir = grid(tmp_path / "grid-1", [["--seed=0"], ["--seed=1"]], tmp_path / "code")
    script = (grid_dir / "job.sbatch").read_text()
    (grid_dir / "job.sbatch").write_text("")
    assert run_local(grid_dir, [0], 1) == 1
    out = capsys.readouterr()
    assert "row 0 FAILED (exit 0, but no done marker for row(s) 0)" in out.out and "1 row(s) failed" in out.err
    (grid_dir / "job.sbatch").write_text(script)
    os.environ["ARGV_OUT"] = str(tmp_path / "argv.jsonl")
    try:
        assert run_local(grid_dir, [0, 1], 2) == 0
    finally:
        del os.environ["ARGV_OUT"]
    assert "row 0 finished" in capsys.readouterr().out


# grid.json as damaged on disk or by hand -> the words of its one line
DAMAGED_GRIDS = {"truncated": ('{"rows": [{"argv": ["--seed=0"', "not JSON"),
                 "a-list": ("[]", "a JSON list"), "no-rows": ('{"runs_per_gpu": 1}', '"rows" is missing'),
                 "rows-empty": ('{"rows": []}', '"rows" is empty'),
                 "argv-not-a-list": ('{"rows": [{"argv": "--seed=0"}]}', 'row 0 has no "argv"'),
                 "runs-per-gpu-0": ('{"runs_per_gpu": 0, "rows": [{"argv": []}]}', '"runs_per_gpu" is 0'),
                 "runs-per-gpu-string": ('{"runs_per_gpu": "2", "rows": [{"argv": []}]}', "\"runs_per_gpu\" is '2'"),
                 "runs-per-gpu-true": ('{"runs_per_gpu": true, "rows": [{"argv": []}]}', '"runs_per_gpu" is True'),
                 "not-utf-8": (b'{"rows": "\xff"}', "not UTF-8"), "a-directory": (None, "neither a grid")}


@pytest.mark.parametrize("text, words", DAMAGED_GRIDS.values(), ids=DAMAGED_GRIDS.keys())
def test_a_damaged_grid_json_is_one_line_on_resume(text: str | bytes | None, words: str, tmp_path: Path):
    grid_dir = grid(tmp_path / "grid-1", [["--seed=0"]], tmp_path / "code")
    path = grid_dir / "grid.json"
    path.unlink()
    if text is None:
        path.mkdir()
    else:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = sorted(p.name for p in grid_dir.iterdir())
    for local in ([], ["--local"]):
        code, _, err = launch(["--resume", str(grid_dir), *local])
        assert_one_line(code, err, words)
        assert sorted(p.name for p in grid_dir.iterdir()) == before


@pytest.mark.parametrize("settings, words", [("[]", "count is None"), ('{"count": "40"}', "count is '40'"),
                                             ('{"count": 4, "runs_per_gpu": 0}', "runs_per_gpu is 0"),
                                             ('{"count"', "cannot read")])
def test_a_damaged_search_json_is_one_line_on_resume(settings: str, words: str, tmp_path: Path):
    search_dir = tmp_path / "search-1"
    search_dir.mkdir()
    (search_dir / "search.json").write_text(settings)
    (search_dir / "job.sbatch").write_text("#!/usr/bin/env bash\n#SBATCH --array=0-1\n")
    code, _, err = launch(["--resume", str(search_dir), "--local"])
    assert_one_line(code, err, words)


@pytest.mark.parametrize("limit", ["0", "00:00:00", "0-0"])
def test_time_zero_slurms_no_limit_is_refused(limit: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Slurm reads --time 0 as no limit at all, which passed every partition's maximum."""
    monkeypatch.chdir(tmp_path)
    code, _, err = launch(["--dry-run", "--gpus-per-node", "0", "--time", limit])
    assert_one_line(code, err, "Slurm's 'no limit'")


@pytest.mark.example_model  # its sweep sets the example's model.hidden_dim
def test_a_search_starts_no_more_workers_than_it_has_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """12 workers were started for a 2-run search: 10 ended at once, each having held a GPU."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.json").write_text(json.dumps({
        "name": "s", "program": "train.py", "method": "random", "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"model.hidden_dim": {"values": [16, 32]}}}))
    code, out, err = launch(["--search", "--count", "2", "--max-concurrent", "12", "--dry-run", "--local",
                             "--sweep-config", "sweep.json", "--gpus-per-node", "0"])
    assert code == 0, err
    assert "#SBATCH --array=0-1 " in out and "search of 2 runs by 2 workers" in out, out
    assert "note: 2 array task(s) of 1 worker(s): no more than the 2 runs" in err


def test_a_slurm_resume_of_a_grid_a_local_run_holds_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Slurm's --resume beside a running --local resubmitted every row it was running: each would train twice."""
    bin_dir = tmp_path / "bin"  # an sbatch that only records a call: nothing reaches the real Slurm
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho called >> {tmp_path / 'sbatch-calls'}\necho 999\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    grid_dir = grid(tmp_path / "grid-1", [["--seed=0"]], tmp_path / "code")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(grid_dir / ".local.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = launch(["--resume", str(grid_dir)])
    finally:
        holder.kill()
        holder.wait()
    assert_one_line(code, err, "is running on this machine (slurm_train.py --local)")
    assert not (tmp_path / "sbatch-calls").exists()


def test_a_copied_search_directory_resumes_where_it_is(tmp_path: Path):
    """A search's job script names its directory in its workers' command line and logs: rewritten like a grid's."""
    from support.search.launch import render_search_script

    generic = plan_job(load_clusters().get("generic"), {"gpus_per_node": 0}, check_environment=False)
    original = tmp_path / "runs" / "search-1"
    original.mkdir(parents=True)
    (original / "job.sbatch").write_text(render_search_script(
        original, "#SBATCH --array=0-1\n" + job_start(generic, local=True), tmp_path / "code", runs_per_gpu=2))
    copy = tmp_path / "copy of it" / "search-1"  # a space: fine for --local, quoted where the shell reads it
    shutil.copytree(original, copy)
    relocate(copy, local=True, dry_run=False)
    script = (copy / "job.sbatch").read_text()
    assert str(original) not in script and f'worker.py" {shlex.quote(str(copy))} --worker' in script, script
    assert subprocess.run(["bash", "-n", str(copy / "job.sbatch")]).returncode == 0
