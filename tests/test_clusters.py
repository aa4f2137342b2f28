"""Cluster profiles (clusters.toml): each site's #SBATCH header, line by line, against what its documentation shows;
the limits refused before anything is submitted; Bede's gh partition submitted through ghbatch; one environment per
architecture, found by the job on its node; sbatch_agent.sh's header and the README's table from the same data; and
a made-up cluster, added as one entry, run end to end on the local Slurm."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, script_env
from slurm_fixtures import SlurmCluster, slurm, slurm_cluster  # noqa: F401  (fixtures)

import slurm_train
from support.clusters import environments, plan
from support.clusters.profiles import load_clusters, partition_table
from support.errors import LaunchError
from support.slurm.jobs import sbatch_header

AGENTS = ["--agents", "me/project/abc123", "--count", "4", "--max-concurrent", "2", "--dry-run"]
OURS = ["--signal=SIGUSR1@90", "--requeue", "--open-mode=append"]  # the template's, on every cluster


@pytest.fixture
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Environments of this lock for ppc64le (an Open-CE torch) and aarch64 (the lock's torch, CUDA 12.6 build) in
    a home of their own; this machine's own environment stays the running one."""
    home = tmp_path / "envs"
    for arch, version, cuda in [("ppc64le", "2.1.2", "12.2"), ("aarch64", "2.14.1+cu126", "12.6")]:
        env = home / arch / f"venv-{environments.lock_hash()}"
        version_file = env / "lib" / "python3.11" / "site-packages" / "torch" / "version.py"
        version_file.parent.mkdir(parents=True)
        version_file.write_text(f"__version__ = '{version}'\ncuda: Optional[str] = '{cuda}'\n")
        (env / "bin").mkdir()
        (env / "bin" / "python").write_text("#!/bin/sh\n")
        (env / "bin" / "python").chmod(stat.S_IRWXU)
        (env / ".complete").touch()
    monkeypatch.setattr(plan, "current_home", lambda: home)
    monkeypatch.delenv("MLMODELDEV_ARCH", raising=False)
    return home


def header_of(argv: list[str], capsys: pytest.CaptureFixture) -> list[str]:
    """The options of the #SBATCH lines `slurm_train.py ARGV --agents ... --dry-run` writes, comments dropped."""
    assert slurm_train.main([*argv, *AGENTS]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    return [line.split()[1] for line in out.splitlines() if line.startswith("#SBATCH ")]


def expected(*site: str, name: str = "sweep-agent") -> list[str]:
    return [f"--job-name={name}", "--array=0-3%2", *site, *OURS]


def site_lines(header: list[str]) -> list[str]:
    return [line for line in header if not line.startswith(("--job-name", "--array", "--output")) and line not in OURS]


@pytest.mark.parametrize("argv, site", [
    # Bede's usage page: --account, --partition, --nodes, --gres=gpu:N (1-4), tasks = GPUs; no --mem, no --cpus.
    (["--cluster", "bede", "--account", "proj", "--partition", "gpu", "--gpus-per-node", "4"],
     ["--partition=gpu", "--account=proj", "--nodes=1", "--ntasks-per-node=4", "--gres=gpu:4", "--time=08:00:00"]),
    (["--cluster", "bede", "--account", "proj", "--partition", "gh"],  # GH200: exactly one GPU per node
     ["--partition=gh", "--account=proj", "--nodes=1", "--ntasks-per-node=1", "--gres=gpu:1", "--time=08:00:00"]),
    (["--cluster", "bede", "--account", "proj", "--partition", "test"],  # at most 30 minutes: the default is cut
     ["--partition=test", "--account=proj", "--nodes=1", "--ntasks-per-node=1", "--gres=gpu:1", "--time=00:30:00"]),
    # HEC's gpu page: -p, --gres=gpu:[type:]N, --mem (default 500M otherwise), --time, --cpus-per-task.
    (["--cluster", "hec", "--gpu-type", "nvidia_h200_nvl", "--gpus-per-node", "2"],
     ["--partition=gpu-short", "--nodes=1", "--ntasks-per-node=2", "--gres=gpu:nvidia_h200_nvl:2",
      "--cpus-per-task=4", "--mem=16G", "--time=08:00:00"]),
    (["--cluster", "hec", "--partition", "gpu-long", "--gpu-type", "nvidia_h200_nvl", "--time", "6-00:00:00"],
     ["--partition=gpu-long", "--nodes=1", "--ntasks-per-node=1", "--gres=gpu:nvidia_h200_nvl:1",
      "--cpus-per-task=4", "--mem=16G", "--time=6-00:00:00"]),
    (["--cluster", "generic"],
     ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=4", "--mem=16G", "--time=08:00:00"]),
])
def test_each_sites_header_has_exactly_what_its_documentation_shows(argv: list[str], site: list[str], homes: Path,
                                                                    capsys: pytest.CaptureFixture):
    header = header_of(argv, capsys)
    assert header[:2] == expected()[:2] and header[-1] == f"--output={header[-1].split('=', 1)[1]}"
    assert site_lines(header) == site
    assert [line for line in header if line in OURS] == OURS


def test_hec_without_a_gpu_type_takes_any_gpu_when_the_torch_can_drive_a_v100(homes: Path,
                                                                              monkeypatch: pytest.MonkeyPatch,
                                                                              capsys: pytest.CaptureFixture):
    monkeypatch.setattr(plan, "torch_version", lambda env: ("2.14.1+cu126", "12.6"))  # make env TORCH_CUDA=cu126
    assert site_lines(header_of(["--cluster", "hec"], capsys)) == [
        "--partition=gpu-short", "--nodes=1", "--ntasks-per-node=1", "--gres=gpu:1", "--cpus-per-task=4", "--mem=16G",
        "--time=08:00:00"]


@pytest.mark.parametrize("argv, words", [
    (["--cluster", "bede", "--account", "proj", "--partition", "test", "--time", "01:00:00"],
     "over the limit of N8 CIR Bede's test partition, 30 minutes (00:30:00"),
    (["--cluster", "bede", "--account", "proj", "--partition", "gpu", "--gpus-per-node", "5"],
     "have at most 4 (4x V100)"),
    (["--cluster", "bede"], "N8 CIR Bede needs --account PROJECT"),
    (["--cluster", "bede", "--account", "proj", "--mem", "8G"], "drop --mem"),
    (["--cluster", "bede", "--account", "proj", "--gpu-type", "v100"], "documents no GPU types"),
    (["--cluster", "bede", "--account", "proj", "--gpus-per-node", "0"], "a job of 0 GPUs gets none"),
    (["--cluster", "hec", "--gpu-type", "a100"], "has nvidia_h200_nvl, tesla_v100-pcie-32gb"),
    (["--cluster", "hec", "--partition", "gpu-long", "--gpus-per-node", "2", "--nodes", "2"],
     "lets one user hold 2 at once"),
    (["--cluster", "hec", "--partition", "gpu-xl"], "has no such partition"),
    (["--cluster", "jade"], "not in"),
    # The running torch here is PyPI's CUDA 13.0 build, which a V100 cannot run (HEC: "no CUDA 13").
    (["--cluster", "hec"], "make env TORCH_CUDA=cu126 on an x86_64 machine (docs/gpus.md), or ask for the other "
                           "GPUs: --gpu-type nvidia_h200_nvl"),
])
def test_limits_are_refused_in_one_line_before_anything_is_written(argv: list[str], words: str, homes: Path,
                                                                   tmp_path: Path, capsys: pytest.CaptureFixture):
    if "TORCH_CUDA" in words and environments.torch_version(Path(sys.prefix))[1] != "13.0":
        pytest.fail("this test expects the lock's torch (CUDA 13.0) in the running environment")
    assert slurm_train.main([*argv, *AGENTS[:-1]]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "runs").exists()


def fake_tool(folder: Path, name: str, calls: Path) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\necho "Submitted batch job 777"\n')
    (folder / name).chmod(stat.S_IRWXU)


def test_bedes_gh_partition_is_submitted_the_way_bede_requires(homes: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture):
    gh = ["--cluster", "bede", "--account", "proj", "--partition", "gh", *AGENTS[:-1]]
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(p) / "ghbatch").exists()))
    fake_tool(tmp_path / "bin", "sbatch", calls := tmp_path / "calls")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert slurm_train.main(gh) == 1  # from an x86-64 (or ppc64le) machine without ghbatch
    err = capsys.readouterr().err
    assert "takes jobs from a machine of its own architecture or through ghbatch" in err, err
    assert "run this command in a ghlogin session (ghlogin -A proj)" in err and len(err.strip().splitlines()) == 1
    assert not calls.exists() and not (tmp_path / "runs").exists()

    fake_tool(tmp_path / "bin", "ghbatch", calls)  # a login node, where Bede's ghbatch is on PATH
    assert slurm_train.main(gh) == 0
    out = capsys.readouterr().out
    assert "submitted job 777 with ghbatch" in out and calls.read_text().startswith("ghbatch --parsable --array=0-3%2")
    agents_dir = Path(re.search(r"run directory: (\S+)", out).group(1))
    assert "# submit with: ghbatch (sbatch on aarch64)" in (agents_dir / "job.sbatch").read_text()

    monkeypatch.setenv("MLMODELDEV_ARCH", "aarch64")  # inside a ghlogin session: plain sbatch
    calls.unlink()
    assert slurm_train.main(gh) == 0
    assert "with sbatch" in capsys.readouterr().out and calls.read_text().startswith("sbatch ")


def test_a_partition_of_an_architecture_without_an_environment_is_refused_naming_the_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setattr(plan, "current_home", lambda: tmp_path / "empty")
    monkeypatch.delenv("MLMODELDEV_ARCH", raising=False)
    assert slurm_train.main(["--cluster", "bede", "--account", "proj", "--partition", "gh", *AGENTS[:-1]]) == 1
    err = capsys.readouterr().err
    assert f"no environment for aarch64 under {tmp_path / 'empty'}/aarch64" in err
    assert "in a ghlogin session (ghlogin -A proj), in this repository, run: MLMODELDEV_HOME=" in err
    assert err.rstrip().endswith("make env") and len(err.strip().splitlines()) == 1
    assert slurm_train.main(["--cluster", "bede", "--account", "proj", "--partition", "gpu", *AGENTS[:-1]]) == 1
    assert capsys.readouterr().err.rstrip().endswith("run: MLMODELDEV_HOME=" + str(tmp_path / "empty") +
                                                     " make env TORCH=system")
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the case of issue 35: a preview from an x86-64 machine")
def test_a_dry_run_previews_every_partition_of_every_cluster_from_a_machine_without_their_environments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Issue 35: a dry run for Bede's gpu (ppc64le) or gh (aarch64) from an x86-64 laptop printed no script. Every
    partition's script is shown; what a submission would lack (an environment, a torch for its GPUs) is a note."""
    monkeypatch.setattr(plan, "current_home", lambda: tmp_path / "empty")
    monkeypatch.delenv("MLMODELDEV_ARCH", raising=False)
    clusters = load_clusters()
    previewed = []
    for cluster in clusters.clusters.values():
        for partition in cluster.partitions.values():
            argv = ["--cluster", cluster.key, "--partition", partition.name, "--account", "proj", *AGENTS]
            assert slurm_train.main(argv) == 0, capsys.readouterr().err
            out, err = capsys.readouterr()
            assert f"#SBATCH --partition={partition.name}" in out and "sbatch_agent.sh" in out
            assert not [line for line in err.splitlines() if line.startswith("error")], err
            if partition.arch != "x86_64":
                assert f"note: no environment for {partition.arch}" in err and "make env" in err, err
            previewed.append(f"{cluster.key}/{partition.name}")
    assert len(previewed) == 9 and "bede/gh" in previewed and "bede/gpu" in previewed


def test_each_architecture_gets_its_own_environment_path_from_make():
    paths = {arch: subprocess.run(["make", "-s", "venv-path", f"MLMODELDEV_ARCH={arch}", "MLMODELDEV_HOME=/shared"],
                                  cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
             for arch in ("ppc64le", "aarch64")}
    lock = environments.lock_hash()
    assert paths == {"ppc64le": f"/shared/ppc64le/venv-{lock}", "aarch64": f"/shared/aarch64/venv-{lock}"}


def run_preamble(home: Path, arch: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    """A job script of the template's first lines only, run as on a node of `arch`; prints the $python it chose."""
    script = tmp_path / f"job-{arch}.sh"
    script.write_text("#!/usr/bin/env bash\n" + plan.job_start(plan.plan_job(
        load_clusters().get("bede"), {"account": "proj"}, check_environment=False)) + '\necho "python=$python"\n')
    started = time.monotonic()
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30,
                            env={**script_env(), "MLMODELDEV_ARCH": arch})
    return result, time.monotonic() - started


def test_a_job_finds_the_environment_of_its_nodes_architecture_or_stops_at_once(homes: Path, tmp_path: Path):
    on_aarch64, _ = run_preamble(homes, "aarch64", tmp_path)
    assert on_aarch64.returncode == 0 and \
        on_aarch64.stdout.strip() == f"python={homes}/aarch64/venv-{environments.lock_hash()}/bin/python"
    here, _ = run_preamble(homes, platform.machine(), tmp_path)  # the interpreter that checked the job
    assert here.stdout.strip() == f"python={sys.executable}"
    shutil.rmtree(homes / "aarch64")
    missing, seconds = run_preamble(homes, "aarch64", tmp_path)
    assert missing.returncode == 1 and seconds < 5 and missing.stdout == ""
    assert missing.stderr.strip() == environments.missing_environment("aarch64", homes,
                                                                      "in a ghlogin session (ghlogin -A proj)")
    unknown, _ = run_preamble(homes, "riscv64", tmp_path)
    assert unknown.returncode == 1 and "no environment for riscv64 under" in unknown.stderr
    assert f"{homes}/riscv64" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1


def test_agents_run_sbatch_agent_sh_with_the_jobs_environment_on_the_local_slurm(
        slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture):
    """slurm_train.py --agents: the cluster's header, then sbatch_agent.sh run in the repository with the job's
    $python first on PATH; offline, each agent stops at once with sweep.py --check-agent's one line."""
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    ours = str(Path(sys.executable).parent)  # no other python on PATH: the agent must find the job's
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                               if not Path(p, "python").exists() or p == ours))
    argv = ["--agents", "me/project/abc123", "--count", "2", "--max-concurrent", "2", "--gpus-per-node", "0",
            "--cpus-per-task", "1", "--mem", "1G", "--time", "00:05:00"]
    assert slurm_train.main(argv) == 0
    out = capsys.readouterr().out
    job = re.search(r"submitted job (\d+) with sbatch: 2 agent\(s\), at most 2 at a time", out).group(1)
    slurm.submitted.append(job)
    agents = Path(re.search(r"run directory: (\S+)", out).group(1))
    assert agents.name.startswith("agents-") and "exec bash " in (agents / "job.sbatch").read_text()
    slurm.wait([job], timeout=90)
    for task in (0, 1):
        log = (agents / f"agent-{task}.out").read_text()
        assert "error: WANDB_MODE=offline, but a wandb agent needs the wandb server" in log, log
        assert slurm.job_field(f"{job}_{task}", "ExitCode") == "1:0"


def test_a_small_home_gets_a_note_for_the_environment_and_runs_kept_there(homes: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    job = plan.plan_job(load_clusters().get("hec"), {"gpu_type": "nvidia_h200_nvl"})
    monkeypatch.setenv("HOME", str(homes.parent))
    notes = plan.storage_notes(job, homes.parent / "runs", homes.parent / "venv")
    assert notes == [f"note: the environment ({homes.parent / 'venv'}) is in your home directory, which is small on "
                     "Lancaster HEC; set MLMODELDEV_HOME=$global_storage/mlmodeldev and make env",
                     f"note: runs ({homes.parent / 'runs'}) is in your home directory, which is small on Lancaster "
                     "HEC; use --runs-dir $global_scratch/runs"]
    assert plan.storage_notes(job, Path("/elsewhere/runs"), Path("/elsewhere/venv")) == []
    generic = plan.plan_job(load_clusters().get("generic"), {})
    assert plan.storage_notes(generic, homes.parent / "runs", homes.parent / "venv") == []


def test_sbatch_agent_sh_header_is_the_generic_clusters():
    res = plan.plan_job(load_clusters().get("generic"), {}).res
    rendered = sbatch_header("sweep-agent", None, "", res, "sweep-agent-%A_%a.out")
    in_script = [line for line in (REPO / "sbatch_agent.sh").read_text().splitlines() if line.startswith("#SBATCH")]
    assert in_script == rendered


def test_the_readmes_partition_table_is_clusters_toml():
    assert partition_table(load_clusters()) in (REPO / "docs" / "clusters.md").read_text()


@pytest.mark.parametrize("edit, words", [
    (('max_time = "12:00:00"', 'max_time = "12 hours"'), "max_time = '12 hours' is not a Slurm time"),
    (('gpus = 3, count = 8', 'gpus = "3", count = 8'), "clusters.hec.nodes.v100.gpus = '3' should be a int"),
    (('memory = "by-gpu"', 'memory = "some"'), "clusters.bede.memory = 'some': one of per-job, by-gpu"),
    (('nodes = ["gh200"]', 'nodes = ["gh100"]'), "nodes names gh100, not in [clusters.bede.nodes]"),
    (('source = "gpu.rst"', 'sauce = "gpu.rst"'), "unknown key(s) sauce"),
])
def test_a_mistake_in_clusters_toml_is_one_line_naming_the_key(edit: tuple[str, str], words: str, tmp_path: Path):
    path = tmp_path / "clusters.toml"
    path.write_text((REPO / "clusters.toml").read_text().replace(*edit, 1))
    with pytest.raises(LaunchError, match=re.escape(words)):
        load_clusters(path)


@pytest.mark.parametrize("edit, words", [
    # Issue 34 item 10, and damage nobody named: each is one line naming the file, the key and the fix.
    (('nodes = ["gh200"]', "nodes = []"), "clusters.bede.partitions.gh.nodes = []: name its node types, keys of "
                                          "[clusters.bede.nodes] (v100, t4, gh200)"),
    (('nodes = ["gh200"]', "nodes = [1]"), "clusters.bede.partitions.gh.nodes = [1]: give a list of strings"),
    (('nodes = ["gh200"]', 'nodes = "gh200"'), "clusters.bede.partitions.gh.nodes = 'gh200' should be a list: "
                                               'write it as one (a list, ["a", "b"])'),
    (('arch = "aarch64"\n', ""), "clusters.bede.partitions.gh lacks arch: add it"),
    (("cpus_per_task = 4\n", 'cpus_per_task = "4"\n'), "clusters.generic.cpus_per_task = '4' should be a int: "
                                                      "write it as one (a whole number without quotes, 4)"),
    (('default_cluster = "generic"', 'default_cluster = "jade"'), "default_cluster = 'jade' is not one of its "
                                                                 "clusters (generic, hec, bede): name one of them"),
    (('default_cluster = "generic"', 'default_cluster = "generic"\ndefault_account = "bd01"'),
     "default_account at the top of the file would go to every cluster: move it into the table of the cluster it "
     'belongs to, [clusters.<name>] default_account = "bd01"'),
    (("max_array_size = 1001    # UNCONFIRMED: jobarrays", "max_array_size = 0    # UNCONFIRMED: jobarrays"),
     "clusters.hec.max_array_size = 0: give 1 or more"),
    (('default_account = ""     # --account', 'default_account = 7     # --account'),
     "clusters.hec.default_account = 7 should be a str"),
    (("[clusters.hec.nodes]", "[clusters.hec.nodes]\n[clusters.hec.nodes]"), "is not valid TOML"),
    (('aarch64 = "in a ghlogin', 'aarch64 = 5, x = "in a ghlogin'),
     "clusters.bede.login = {'ppc64le': 'on a Bede login node', 'aarch64': 5, "),
    (('name = "Lancaster HEC"', 'name = "Lancaster \\HEC"'), "is not valid TOML"),
    (('[gpus]', 'gpus = 3\n[gpus]'), "is not valid TOML"),
])
def test_damage_in_clusters_toml_is_one_line_naming_the_file_the_key_and_the_fix(
        edit: tuple[str, str], words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture):
    path = tmp_path / "clusters.toml"
    text = (REPO / "clusters.toml").read_text()
    assert edit[0] in text, edit
    path.write_text(text.replace(*edit, 1))
    monkeypatch.setenv("MLMODELDEV_CLUSTERS", str(path))
    assert slurm_train.main(AGENTS) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {path}") and words in err, err


def test_clusters_toml_with_bytes_that_are_not_utf8_is_one_line_naming_the_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    path = tmp_path / "clusters.toml"
    lines = (REPO / "clusters.toml").read_bytes().split(b"\n")
    lines[40] += b"  # caf\xe9 (Latin-1)"
    path.write_bytes(b"\n".join(lines))
    monkeypatch.setenv("MLMODELDEV_CLUSTERS", str(path))
    assert slurm_train.main(["--clusters"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {path} line 41: bytes that are not UTF-8 (b'\\xe9'); TOML is UTF-8: save the file as " \
                  "UTF-8 or retype that line\n"


def test_the_readmes_example_cluster_is_one_entry_that_works(homes: Path, tmp_path: Path):
    entry = re.search(r"```toml\n(.*?)```", (REPO / "docs" / "clusters.md").read_text(), re.S).group(1)
    (tmp_path / "clusters.toml").write_text((REPO / "clusters.toml").read_text() + entry)
    lab = load_clusters(tmp_path / "clusters.toml").get("lab")
    job = plan.plan_job(lab, {"gpus_per_node": 4, "gpu_type": "a100", "time": "2-00:00:00"})
    assert site_lines([line.split()[1] for line in sbatch_header("x", None, "", job.res, "log")]) == [
        "--partition=gpu", "--nodes=1", "--ntasks-per-node=4", "--gres=gpu:a100:4", "--cpus-per-task=8",
        "--mem=32G", "--time=2-00:00:00"]
    assert "module load cuda/12.4" in plan.job_start(job)
    with pytest.raises(LaunchError, match="have at most 4"):
        plan.plan_job(lab, {"gpus_per_node": 8})


LAB = f"""
[clusters.lab]
name = "the lab's cluster"
docs = "https://example.org/lab"
read = "2026-12-04"
gpu_request = "gres"
memory = "per-job"
mem = "1G"
cpus_per_task = 1
account = "optional"
default_partition = "debug"
setup = ["echo \\"the lab's set-up ran\\""]
envs = "~/.cache/mlmodeldev"
data = "data"
runs = "runs"
login = {{}}
[clusters.lab.nodes]
cpu = {{ gpu = "", gres_type = "", gpus = 0, count = 2 }}
[clusters.lab.partitions.debug]
arch = "{platform.machine()}"
nodes = ["cpu"]
max_time = "00:20:00"
"""


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.slow
def test_a_cluster_added_as_one_entry_runs_a_grid_on_the_local_slurm(
        slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture):
    (tmp_path / "clusters.toml").write_text((REPO / "clusters.toml").read_text() + LAB)
    monkeypatch.setenv("MLMODELDEV_CLUSTERS", str(tmp_path / "clusters.toml"))
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    for name, value in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    sweep = {"program": "train.py", "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
             "parameters": {"model.hidden_dim": {"values": [16, 32]}}}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    argv = ["--cluster", "lab", "--gpus-per-node", "0", "--sweep-config", str(tmp_path / "sweep.json"), "--",
            "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--data.batch_size=256"]
    assert slurm_train.main([*argv[:4], "--time", "00:30:00", *argv[4:]]) == 1
    assert "the lab's cluster's debug partition, 20 minutes" in capsys.readouterr().err
    assert slurm_train.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    job = re.search(r"submitted job (\d+) with sbatch", out).group(1)
    slurm.submitted.append(job)
    grid = Path(re.search(r"run directory: (\S+)", out).group(1))
    script = (grid / "job.sbatch").read_text()
    assert "#SBATCH --partition=debug" in script and "#SBATCH --mem=1G" in script and "--gres" not in script
    assert "#SBATCH --time=00:20:00" in script  # the template's 8 hours, cut to the partition's maximum
    slurm.wait([job], timeout=150)
    for row in (0, 1):
        log = (grid / f"row-{row}.out").read_text()
        assert "the lab's set-up ran" in log and f"({platform.machine()}, {sys.executable})" in log, log
        assert (grid / f"row-{row}" / "done").is_file(), log


@pytest.mark.parametrize("time, margin", [("08:00:00", 90), ("00:06:00", 90), ("00:05:00", 75), ("00:01:00", 15),
                                          ("1", 15), ("00:00:10", 5)])
def test_the_requeue_signal_comes_before_the_limit_even_for_short_jobs(time: str, margin: int):
    """--signal=SIGUSR1@90 on a job of under 90 s is sent as soon as it starts: Lightning then requeues it at once,
    forever. A short limit gets a quarter of itself."""
    header = sbatch_header("x", None, "", {"nodes": 1, "ntasks_per_node": 1, "gpus_per_node": 0, "time": time},
                           "x.out")
    assert f"#SBATCH --signal=SIGUSR1@{margin}" in "\n".join(header)


def accounts_file(tmp_path: Path, **accounts: str) -> Path:
    """clusters.toml with these clusters' default_account set (what `copier copy` writes from the answers)."""
    lines = (REPO / "clusters.toml").read_text().splitlines(keepends=True)
    cluster = None
    for i, line in enumerate(lines):
        if match := re.match(r"\[clusters\.(\w+)\]", line):
            cluster = match.group(1)
        elif line.startswith("default_account = ") and cluster in accounts:
            lines[i] = f"default_account = {json.dumps(accounts[cluster])}\n"
    path = tmp_path / "accounts.toml"
    path.write_text("".join(lines))
    return path


def test_each_cluster_takes_its_own_account_and_never_anothers(homes: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture):
    """Issue 35: one default_account went to whichever cluster was used (a Bede code into HEC jobs; HEC's code
    passing Bede's account check)."""
    def header(*argv: str) -> list[str]:
        assert slurm_train.main([*argv, *AGENTS]) == 0, capsys.readouterr().err
        return [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("#SBATCH ")]

    monkeypatch.setenv("MLMODELDEV_CLUSTERS", str(accounts_file(tmp_path, bede="bdbede01")))  # a Bede project
    assert not [line for line in header("--cluster", "hec", "--gpu-type", "nvidia_h200_nvl") if "account" in line]
    assert "--account=bdbede01" in header("--cluster", "bede")
    assert "--account=other01" in header("--cluster", "bede", "--account", "other01")
    monkeypatch.setenv("MLMODELDEV_CLUSTERS", str(accounts_file(tmp_path, hec="hecacct01")))  # a HEC project
    assert "--account=hecacct01" in header("--cluster", "hec", "--gpu-type", "nvidia_h200_nvl")
    assert slurm_train.main(["--cluster", "bede", *AGENTS]) == 1
    err = capsys.readouterr().err
    assert "N8 CIR Bede needs --account PROJECT" in err and "hecacct01" not in err
    assert "--account=hecacct01" in header("--cluster", "bede", "--account", "hecacct01")  # given: said, not silent
    monkeypatch.setenv("MLMODELDEV_CLUSTERS", str(accounts_file(tmp_path, hec="hecacct01")))
    assert slurm_train.main(["--cluster", "bede", "--account", "hecacct01", *AGENTS]) == 0
    assert "note: --account hecacct01 is Lancaster HEC's account in clusters.toml, given here for N8 CIR Bede" in \
        capsys.readouterr().err


@pytest.mark.parametrize("account", ["bd\u00e9", "a b", "a\nb", 'a"b', "a\\b", "-x", "$(id)", "a;b", ""])
def test_an_account_that_is_no_slurm_account_name_is_refused_in_one_line(account: str, homes: Path,
                                                                        tmp_path: Path, capsys: pytest.CaptureFixture):
    code = slurm_train.main(["--cluster", "bede", f"--account={account}", *AGENTS])
    err = capsys.readouterr().err
    if not account:  # --account "": none given, and Bede needs one
        assert code == 1 and "needs --account PROJECT" in err
        return
    assert code == 1 and len(err.strip().splitlines()) == 1 and "is not a Slurm account name" in err, err
    assert err.startswith(f"error: --account = {account!r}")


def test_local_rows_follow_no_queue_rule_of_any_cluster(homes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Issue 35: `--local --gpus-per-node 0` in a Bede project was refused by Bede's rule that GPUs bring a job's
    CPUs. This machine is no node of Bede: its account, memory, partition and time rules do not apply."""
    from support.slurm.options import parse_args

    monkeypatch.setenv("MLMODELDEV_CLUSTERS", str(accounts_file(tmp_path)))
    for argv in (["--cluster", "bede", "--gpus-per-node", "0"], ["--cluster", "bede", "--mem", "4G", "--time", "9-00"],
                 ["--cluster", "hec", "--partition", "gpu-xl", "--gpus-per-node", "8"]):
        args, _ = parse_args([*argv, "--local", "--dry-run"])
        local = slurm_train.job_plan(args)
        assert local.res["account"] is None and local.partition is None and not local.notes, argv
        with pytest.raises(LaunchError):  # the same options for a submission: the cluster's rules
            slurm_train.job_plan(parse_args([*argv, "--account", "proj", "--dry-run"])[0])
