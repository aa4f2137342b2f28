"""Projects made by `copier copy` as a new user makes them (issue 35), offline: the template is this repository's
files committed, WITHOUT tags (a fresh clone, a fork or a download has none), copied with the README's command
(no --vcs-ref). A Bede project and a HEC project: each cluster's jobs take that cluster's account and never the
other's, --local runs without any queue's rules; every answer of a hostile list renders valid files; `make update`
says once which commit it takes, and refuses a VERSION the template lacks or an unknown option in one line.
Template-only (copier.yml leaves it out of projects), like tests/test_copier.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import REPO, copy_of_repo, script_env

from support.clusters.plan import job_account
from support.clusters.profiles import load_clusters
from support.errors import LaunchError

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.org", "GIT_COMMITTER_NAME": "Test",
                "GIT_COMMITTER_EMAIL": "test@example.org"}
AGENTS = ["--agents", "me/project/abc123", "--count", "2", "--dry-run"]  # no rows to parse: no torch, ~1 s
# Answers that broke the project before (issue 35): a regex replacement read "\u" as an escape and crashed, a
# backslash or a newline rendered invalid TOML; and more nobody named: quotes, TOML's own syntax, DEL, an emoji
# (JSON would write it as a surrogate pair, which TOML refuses), Jinja's syntax, leading spaces.
HOSTILE = ["bdé", "a\\b", "\\u0041", "line\nbreak", 'say "hi"', "it's", "x]\n[clusters.evil]", "# comment",
           "del\x7f", "emoji\U0001f600", "{{ 7 * 7 }}", "  spaced  ", "tab\there", "cr\rlf"]


def env() -> dict[str, str]:
    """A new user's environment: the project's own clusters.toml, this machine's architecture."""
    child = script_env(**GIT_IDENTITY)
    for name in ("MLMODELDEV_CLUSTERS", "MLMODELDEV_ARCH"):
        child.pop(name, None)
    return child


def run(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env())


def ok(cwd: Path, *args: str, timeout: float = 300) -> str:
    result = run(cwd, *args, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def copy(template: Path, project: Path, *answers: str) -> str:
    """The README's command: no --vcs-ref (the template has no tags)."""
    return ok(project.parent, sys.executable, "-m", "copier", "copy", "--defaults",
              *[f"--data={answer}" for answer in answers], str(template), project.name)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    template = copy_of_repo(tmp_path_factory.mktemp("untagged") / "MLModelDev")
    ok(template, "git", "init", "-q")
    ok(template, "git", "add", "-A")
    ok(template, "git", "commit", "-qm", "The template, never tagged")
    assert not ok(template, "git", "tag").strip()
    return template


@pytest.fixture(scope="module")
def bede_project(template: Path) -> Path:
    project = template.parent / "bede-project"
    out = copy(template, project, "default_cluster=bede", "bede_account=bdbede01")
    assert "No git tags found in template; using HEAD as ref" in out and "bede-project is ready" in out
    return project


@pytest.fixture(scope="module")
def hec_project(template: Path) -> Path:
    project = template.parent / "hec-project"
    copy(template, project, "default_cluster=hec", "hec_account=hecacct01")
    return project


def slurm_train(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run(project, sys.executable, "slurm_train.py", *args)


def sbatch_lines(out: str) -> list[str]:
    return [line.split()[1] for line in out.splitlines() if line.startswith("#SBATCH ")]


def render(name: str, **answers: str) -> str:
    """A *.jinja file of the template as Copier renders it (its Jinja environment: a sandbox with Ansible's filters,
    trailing newlines kept), in milliseconds instead of a 2-second `copier copy`."""
    from jinja2 import FileSystemLoader
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(loader=FileSystemLoader(str(REPO)), keep_trailing_newline=True,
                               extensions=["jinja2_ansible_filters.AnsibleCoreFiltersExtension"])
    return env.get_template(name).render(**answers)


@pytest.mark.parametrize("answer", HOSTILE)
def test_every_hostile_answer_in_every_question_renders_valid_toml(answer: str, tmp_path: Path):
    keys = ["hec_account", "bede_account", "generic_account"]
    # default_cluster has no `choices` (a --data value outside them was Copier's traceback): any name renders, and
    # the project's first slurm_train.py command names the file and the clusters in one line.
    path = tmp_path / "clusters.toml"
    path.write_text(render("clusters.toml.jinja", default_cluster=answer, **dict.fromkeys(keys, "")))
    assert tomllib.loads(path.read_text())["default_cluster"] == answer
    with pytest.raises(LaunchError) as refused:
        load_clusters(path)
    assert str(refused.value).startswith(f"{path}: default_cluster = {answer!r} is not one of its clusters (generic, "
                                         "hec, bede): name one of them") and "\n" not in str(refused.value)
    text = render("clusters.toml.jinja", default_cluster="bede", **dict.fromkeys(keys, answer))
    clusters = tomllib.loads(text)
    assert clusters["default_cluster"] == "bede"
    assert [table["default_account"] for table in clusters["clusters"].values()] == [answer] * 3
    assert text.count("\n") == (REPO / "clusters.toml").read_text().count("\n")  # nothing else moved
    settings = tomllib.loads(render("project.toml.jinja", project_name=answer, wandb_entity=answer,
                                    wandb_project=answer))["wandb"]
    assert settings == {"entity": answer, "project": answer}
    title = render("README.md.jinja", project_name=answer).split("\n", 1)[0]
    assert title.startswith("# ") and "\r" not in title


@pytest.mark.slow  # two `copier copy` (5-7 s each)
def test_a_bede_projects_hec_job_names_no_bede_account(bede_project: Path):
    clusters = tomllib.loads((bede_project / "clusters.toml").read_text())
    assert clusters["default_cluster"] == "bede"
    assert {k: v["default_account"] for k, v in clusters["clusters"].items()} == {
        "generic": "", "hec": "", "bede": "bdbede01"}
    hec = slurm_train(bede_project, "--cluster", "hec", "--gpu-type", "nvidia_h200_nvl", *AGENTS)
    assert hec.returncode == 0, hec.stderr
    assert not [line for line in sbatch_lines(hec.stdout) if line.startswith("--account")], hec.stdout
    bede = slurm_train(bede_project, *AGENTS)  # the default cluster, its default partition (gh: PyPI's torch)
    assert bede.returncode == 0, bede.stderr
    assert "--account=bdbede01" in sbatch_lines(bede.stdout) and "--partition=gh" in sbatch_lines(bede.stdout)
    once = slurm_train(bede_project, "--account", "other01", *AGENTS)  # --account: for this submission
    assert "--account=other01" in sbatch_lines(once.stdout)


@pytest.mark.slow
def test_a_hec_projects_bede_job_is_refused_without_a_bede_account(hec_project: Path):
    bede = slurm_train(hec_project, "--cluster", "bede", "--partition", "gh", *AGENTS)
    assert bede.returncode == 1 and "hecacct01" not in bede.stdout + bede.stderr
    assert len(bede.stderr.strip().splitlines()) == 1 and "N8 CIR Bede needs --account PROJECT" in bede.stderr
    assert "default_account in clusters.toml's [clusters.bede]" in bede.stderr
    given = slurm_train(hec_project, "--cluster", "bede", "--account", "hecacct01", *AGENTS)  # said, not silent
    assert given.returncode == 0 and "note: --account hecacct01 is Lancaster HEC's account in clusters.toml, " \
        "given here for N8 CIR Bede" in given.stderr
    hec = slurm_train(hec_project, "--gpu-type", "nvidia_h200_nvl", *AGENTS)
    assert "--account=hecacct01" in sbatch_lines(hec.stdout)


@pytest.mark.slow  # one torch process: the rows are parsed as train.py would
def test_local_runs_in_a_bede_project_follow_no_queue_rule(bede_project: Path):
    """Issue 35: `--local --gpus-per-node 0` in a Bede project was refused by Bede's rule that GPUs bring a job's
    CPUs: this machine is no Bede node. Neither the account nor Bede's time limits apply either."""
    sweep = bede_project / "tiny-sweep.json"
    sweep.write_text(json.dumps({"method": "grid", "program": "train.py",
                                 "parameters": {"trainer.max_epochs": {"value": 1}}}))
    local = slurm_train(bede_project, "--local", "--gpus-per-node", "0", "--time", "3-00:00:00", "--mem", "4G",
                        "--sweep-config", sweep.name, "--dry-run")
    assert local.returncode == 0, local.stderr
    assert "# row 0: python train.py --trainer.max_epochs=1" in local.stdout
    assert "--account" not in local.stdout and "Bede" not in local.stderr, local.stderr


@pytest.mark.slow  # a `copier copy` per answer: 60 s
def test_every_hostile_answer_renders_valid_files_or_is_refused_in_one_line(template: Path):
    """Each hostile answer, in every question that writes text: the project's clusters.toml and project.toml are
    valid TOML holding the answer as given, and an account that is no Slurm account name is refused in one line
    naming the cluster's key (nothing reaches an #SBATCH line)."""
    for i, answer in enumerate(HOSTILE):
        project = template.parent / f"hostile-{i}"
        copy(template, project, f"project_name={answer}", f"wandb_entity={answer}", "default_cluster=bede",
             f"hec_account={answer}", f"bede_account={answer}", f"generic_account={answer}")
        clusters = tomllib.loads((project / "clusters.toml").read_text())
        assert [table["default_account"] for table in clusters["clusters"].values()] == [answer] * 3, answer
        settings = tomllib.loads((project / "project.toml").read_text())["wandb"]
        assert settings["entity"] == answer and settings["project"], answer
        assert (project / "README.md").read_text().startswith("# "), answer
        loaded = load_clusters(project / "clusters.toml")
        if answer.strip() == answer and answer.isascii() and answer.replace("\\", "").isalnum():
            continue
        with pytest.raises(LaunchError) as refused:
            job_account(loaded, loaded.get("bede"), None)
        assert "[clusters.bede] default_account" in str(refused.value) and "\n" not in str(refused.value), answer


@pytest.mark.slow  # make update four times: 25 s
def make_errors(result: subprocess.CompletedProcess) -> list[str]:
    """stderr less make's own "*** [...] Error" line: `make:` on a terminal, `make[1]:` under `make test` (CI)."""
    return [line for line in result.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]


def test_make_update_takes_the_latest_commit_of_a_template_without_tags(template: Path, tmp_path: Path):
    project = template.parent / "updated-project"
    copy(template, project)
    ok(project, "git", "init", "-q")
    ok(project, "git", "add", "-A")
    ok(project, "git", "commit", "-qm", "updated-project from the template's HEAD")
    with open(template / "CHANGELOG.md", "a") as changelog:
        changelog.write("\n- A later commit of the template.\n")
    ok(template, "git", "commit", "-qam", "A later commit")
    after = ok(template, "git", "rev-parse", "--short", "HEAD").strip()

    def make_update(*variables: str) -> subprocess.CompletedProcess:
        return run(project, "make", "--no-print-directory", "update", f"VENV={sys.prefix}", *variables)

    for variables, words in [(["VERSION=v9.9.9"], "error: VERSION=v9.9.9 is no tag, branch or commit of the template"),
                             (["UPDATE_OPTIONS=--bogus"], "error: copier update refused: Unknown switch --bogus"),
                             (["UPDATE_OPTIONS=--data-file /nonexistent.yml"],
                              "error: copier update refused: Argument of data-file expected to be ExistingFile")]:
        refused = make_update(*variables)
        errors = make_errors(refused)
        assert refused.returncode != 0 and len(errors) == 1 and errors[0].startswith(words), refused.stderr
        assert "Traceback" not in refused.stdout + refused.stderr
        assert not ok(project, "git", "status", "--porcelain").strip(), variables
    updated = make_update()
    assert updated.returncode == 0, updated.stdout + updated.stderr
    lines = updated.stdout.splitlines()
    assert lines[0] == (f"Taking the template's latest commit, {after}: it has no version tags (a clone without "
                        f"them: git fetch --tags in {template} brings them).")
    assert "Updated from the template version " in updated.stdout, updated.stdout
    recorded = yaml.safe_load((project / ".copier-answers.yml").read_text())["_commit"]  # Copier's abbreviation
    assert ok(template, "git", "rev-parse", f"{recorded}^{{commit}}") == ok(template, "git", "rev-parse", "HEAD")
    assert "No git tags" not in updated.stdout + updated.stderr
    assert "A later commit of the template." in (project / "CHANGELOG.md").read_text()
    assert os.environ.get("MLMODELDEV_CLUSTERS") != str(project / "clusters.toml")

    # A template copy that lacks the project's own version (a clone without that tag or history): one line.
    ok(project, "git", "add", "-A")
    ok(project, "git", "commit", "-qm", "Template update")
    ok(template, "git", "reset", "-q", "--hard", "HEAD~1")
    ok(template, "git", "reflog", "expire", "--expire=now", "--all")
    ok(template, "git", "gc", "-q", "--prune=now")
    lost = make_update()
    errors = make_errors(lost)
    assert lost.returncode != 0 and errors == [
        f"error: this project's template version {recorded} (_commit in .copier-answers.yml) is not in the template "
        f"({template}): a clone without its tags or history? git fetch --tags there, then make update"], lost.stderr


# The template before accounts per cluster (one default_account for every cluster, asked for the default cluster).
ONE_ACCOUNT = "4f54dd11001ca313d62a18bd294139646fb8d1e7"


@pytest.mark.slow  # two copies of the template, a copy and an update: 20 s
def test_make_update_gives_an_old_projects_one_account_to_its_default_cluster_alone(tmp_path: Path):
    from test_copier import replace_files

    template = tmp_path / "template"
    template.mkdir()
    ok(template, "git", "init", "-q")
    replace_files(template, ONE_ACCOUNT)
    ok(template, "git", "add", "-A")
    ok(template, "git", "commit", "-qm", "one account for every cluster")
    project = tmp_path / "old-bede-project"
    copy(template, project, "default_cluster=bede", "default_account=bdold01")
    assert tomllib.loads((project / "clusters.toml").read_text())["default_account"] == "bdold01"
    ok(project, "git", "init", "-q")
    ok(project, "git", "add", "-A")
    ok(project, "git", "commit", "-qm", "old-bede-project")
    replace_files(template)  # this version
    ok(template, "git", "add", "-A")
    ok(template, "git", "commit", "-qm", "accounts per cluster")
    updated = run(project, "make", "--no-print-directory", "update", f"VENV={sys.prefix}")
    assert updated.returncode == 0 and "No conflicts" in updated.stdout, updated.stdout + updated.stderr
    clusters = tomllib.loads((project / "clusters.toml").read_text())
    assert "default_account" not in clusters and clusters["default_cluster"] == "bede"
    assert {k: v["default_account"] for k, v in clusters["clusters"].items()} == {
        "generic": "", "hec": "", "bede": "bdold01"}
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["bede_account"] == "bdold01" and answers["hec_account"] == "" and "default_account" not in answers
    assert load_clusters(project / "clusters.toml").get("bede").default_account == "bdold01"
