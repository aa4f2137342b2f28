"""What only GPUs exercise, checked without one: the torch build against the job's GPUs (support/gpu_check.py, with a
fake nvidia-smi), each DDP rank's random state on resume, slurm_train.py --local inside an allocation, and
benchmarks/gpu_check.py where there is no GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import QUICK, REPO, run_script

import slurm_train
from support.errors import SettingError
from support.gpu_check import TORCH_CUDA_BUILDS, TorchBuild, gather_facts, problem, require_usable_gpus
from support.run_dir.rng_state import ResumeRNGState

CU130 = TorchBuild("2.14.1+cu130", "13.0", ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"), device_count=4)


def fake_nvidia_smi(folder: Path, gpus: list[tuple[str, str]], driver: str, cuda: str) -> Path:
    """An nvidia-smi that answers as a real one does (its GPU query, its header), and records that it was asked."""
    folder.mkdir(exist_ok=True)
    rows = "\n".join(f"{name}, {driver}, {capability}" for name, capability in gpus)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho \"$*\" >> {folder}/asked\n"
                      f"case \"$1\" in --query-gpu=*) cat <<'EOF'\n{rows}\nEOF\n;;\n"
                      f"*) echo '| NVIDIA-SMI {driver}   Driver Version: {driver}   CUDA Version: {cuda}   |';; esac\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.mark.parametrize("gpu, driver, cuda, words", [
    (("Tesla V100-SXM2-32GB", "7.0"), "580.65.06", "13.0",
     ["Tesla V100-SXM2-32GB, compute capability 7.0", "driver 580.65.06 for CUDA 13.0",
      "torch 2.14.1+cu130 (CUDA 13.0)", "no kernels for compute capability 7.0 (it has sm_75",
      "make env TORCH_CUDA=cu126"]),
    (("NVIDIA A100-SXM4-80GB", "8.0"), "535.104.05", "12.2",
     ["NVIDIA A100-SXM4-80GB", "driver 535.104.05 for CUDA 12.2", "needs a driver for CUDA 13.0 or newer",
      "make env TORCH_CUDA=cu126"]),
    (None, "", "", ["SLURM_GPUS_ON_NODE=4", "it sees no GPU, and there is no nvidia-smi that lists one"]),
], ids=["V100 with the cu130 build", "a driver older than CUDA 13", "Slurm's GPUs without a driver"])
def test_gpus_the_torch_build_cannot_use_stop_the_run_with_the_fix(gpu, driver: str, cuda: str, words: list[str],
                                                                   tmp_path: Path):
    folder = fake_nvidia_smi(tmp_path / "bin", [gpu] * 4, driver, cuda) if gpu else tmp_path
    environ = {"PATH": str(folder), "SLURM_GPUS_ON_NODE": "4"}
    torch_build = CU130 if gpu else TorchBuild("2.14.1+cu130", "13.0", CU130.arch_list, device_count=0)
    with pytest.raises(SettingError) as refused:
        require_usable_gpus("auto", environ, torch_build)
    message = str(refused.value)
    assert "\n" not in message and "or train on the CPU with --trainer.accelerator=cpu" in message
    assert [word for word in words if word not in message] == [], message
    asked = tmp_path / "bin" / "asked"
    queries = asked.read_text().count("--query-gpu") if asked.exists() else 0
    require_usable_gpus("cpu", environ, torch_build)  # an explicit CPU accelerator is never refused, nor even checked
    assert queries == (1 if gpu else 0) and (asked.read_text().count("--query-gpu") if asked.exists() else 0) == queries


@pytest.mark.parametrize("gpus, environ", [
    ([("NVIDIA H100 80GB HBM3", "9.0")] * 2, {"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}),
    ([("Tesla V100-SXM2-32GB", "7.0")], {"CUDA_VISIBLE_DEVICES": ""}),  # the job was given none of the node's GPUs
    ([], {}),  # a laptop: no nvidia-smi answers, nothing says there are GPUs
], ids=["a matching setup", "GPUs hidden from the job", "no GPU"])
def test_a_build_that_fits_or_a_job_without_gpus_is_not_refused(gpus: list, environ: dict[str, str], tmp_path: Path):
    folder = fake_nvidia_smi(tmp_path / "bin", gpus, "580.65.06", "13.0") if gpus else tmp_path
    facts = gather_facts({"PATH": str(folder), **environ}, torch_build=CU130)
    assert problem(facts) is None, problem(facts)
    assert (facts.visible_by is not None) == (bool(gpus) and environ.get("CUDA_VISIBLE_DEVICES") != "")


def test_train_py_stops_before_training_with_one_line_unless_the_accelerator_is_cpu(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch):
    import train

    folder = fake_nvidia_smi(tmp_path / "bin", [("Tesla V100-SXM2-32GB", "7.0")] * 4, "550.54.15", "12.4")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    with pytest.raises(SystemExit) as stopped:
        train.build_cli_or_exit(QUICK + ["--run_dir=refused"])  # the installed torch, accelerator "auto"
    assert str(stopped.value).startswith("error: this job has Tesla V100-SXM2-32GB") and "\n" not in str(stopped.value)
    assert "make env TORCH_CUDA=cu126" in str(stopped.value) and not Path("refused").exists()
    cli = train.build_cli_or_exit(QUICK + ["--run_dir=cpu", "--trainer.accelerator=cpu"])
    assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"


def test_the_builds_are_those_torch_itself_lists():
    """TORCH_CUDA_BUILDS copies torch's own table of its release builds: an upgrade of torch that changes it fails here
    (then update the table and docs/gpus.md)."""
    releases = torch.cuda.PYTORCH_RELEASES_CODE_CC  # {"12.6": {"x86_64": {50, ...}, "aarch64": {...}}, ...}
    assert {f"cu{version.replace('.', '')}": {arch: frozenset(codes) for arch, codes in by_arch.items()}
            for version, by_arch in releases.items()} == TORCH_CUDA_BUILDS


# ------------------------------------------------------------------ each rank's random state
def weights(path: str | Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return {**checkpoint["state_dict"], "global_step": torch.tensor(checkpoint["global_step"])}


@pytest.mark.slow
def test_each_ddp_rank_resumes_its_own_random_state():
    """Two ranks whose random streams differ (as each GPU's generator does): resumed mid-epoch, they end with the
    weights of the uninterrupted run; given rank 0's states on both ranks (what was saved before), they do not."""
    full = run_script("tests/toy_train.py", "full", "--devices=2", "--save_at_step=15", "--rank_draws", timeout=240)
    assert full.returncode == 0, full.stderr[-3000:]
    mid = torch.load("full/mid.ckpt", map_location="cpu", weights_only=False)
    key = next(key for key in mid["callbacks"] if "ResumeRNGState" in key)
    ranks = mid["callbacks"][key]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    resumed = run_script("tests/toy_train.py", "resumed", "--devices=2", "--ckpt_path=full/mid.ckpt", "--rank_draws",
                         timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = weights("full/last.ckpt"), weights("resumed/last.ckpt")
    assert all(torch.equal(expected[key], got[key]) for key in expected) and expected["global_step"] == 18
    mid["callbacks"][key]["ranks"] = [ranks[0], ranks[0]]
    torch.save(mid, "rank0.ckpt")
    control = run_script("tests/toy_train.py", "control", "--devices=2", "--ckpt_path=rank0.ckpt", "--rank_draws",
                         timeout=240)
    assert control.returncode == 0, control.stderr[-3000:]
    assert any(not torch.equal(expected[key], value) for key, value in weights("control/last.ckpt").items())


def test_a_resume_on_other_ranks_restores_what_matches_and_says_so_in_one_line():
    torch.manual_seed(1)
    rank0 = ResumeRNGState.own_states()
    torch.manual_seed(2)
    rank1 = ResumeRNGState.own_states()
    callback = ResumeRNGState()
    callback.load_state_dict({"ranks": [rank0, rank1]})
    with pytest.warns(UserWarning) as caught:
        callback.on_train_start(SimpleNamespace(global_rank=0, world_size=1), None)
    assert torch.equal(torch.get_rng_state(), rank0["torch"])
    assert [str(w.message) for w in caught] == ["the checkpoint holds the random states of 2 process(es) and this run "
                                                "has 1: rank 0 took back its own, those of rank 1 are left unused"]
    torch.manual_seed(3)
    seeded = torch.get_rng_state()
    callback.load_state_dict({"ranks": [rank0]})
    with pytest.warns(UserWarning, match="has 3: rank 0 took back its own, ranks 1-2 keep their seeded states"):
        callback.on_train_start(SimpleNamespace(global_rank=2, world_size=3), None)
    assert torch.equal(torch.get_rng_state(), seeded)


# ------------------------------------------------------------------ slurm_train.py --local inside an allocation
def test_local_rows_inside_a_slurm_allocation_get_a_gpu_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An srun step gets every GPU of the allocation (Slurm sets its CUDA_VISIBLE_DEVICES), so rows launched with
    srun all trained on GPU 0: under --local a row is a plain process, pinned to its own GPU."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\necho \"$*\" >> {log}/srun\nwhile [[ $1 == -* ]]; do shift; done\n"
                                  "CUDA_VISIBLE_DEVICES=0,1 exec \"$@\"\n")  # as Slurm starts a step
    # The job script's interpreter: the real one reads grid.json; in train.py's place, a record of what it was given.
    (bin_dir / "python").write_text(f"#!/bin/bash\nif [ \"$1\" = -c ]; then exec {sys.executable} \"$@\"; fi\n"
                                    f"echo \"$CUDA_VISIBLE_DEVICES ${{SLURM_JOB_ID:-none}}\" > {log}/row-$GRID_ROW\n")
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    grid = tmp_path / "grid"
    grid.mkdir()
    rows = [{"row": i, "config": {}, "argv": [f"--seed_everything={i}"]} for i in range(2)]
    (grid / "grid.json").write_text(json.dumps({"rows": rows}))
    with monkeypatch.context() as patched:  # the job script's python (--local's row guard runs the real one)
        patched.setattr(sys, "executable", str(bin_dir / "python"))
        plan = slurm_train.job_plan(slurm_train.parse_args(["--local"])[0])
        (grid / "job.sbatch").write_text(slurm_train.render_script(grid, 2, 2, plan, "grid", REPO, local=True))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    allocation = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "outer", "SLURM_NTASKS": "1",
                  "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}
    for name, value in allocation.items():
        monkeypatch.setenv(name, value)
    assert slurm_train.run_local(grid, [0, 1], 2) == 0
    seen = sorted((log / f"row-{i}").read_text().split() for i in range(2))
    assert seen == [["0", "none"], ["1", "none"]] and not (log / "srun").exists()
    assert all((grid / f"row-{i}" / "done").is_file() for i in range(2))


# ------------------------------------------------------------------ benchmarks/gpu_check.py without a GPU
def gpu_check_script():
    spec = importlib.util.spec_from_file_location("gpu_check_script", REPO / "benchmarks" / "gpu_check.py")
    script = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(script)
    return script


CHECKS = ("torch build", "bf16 training", "CKA reference", "CKA exactness", "CKA speed", "DDP resume")


def test_the_gpu_check_without_a_gpu_skips_every_check_and_exits_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture):
    monkeypatch.setenv("PATH", os.pathsep.join(folder for folder in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(folder) / "nvidia-smi").exists()))
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert gpu_check_script().main([]) == 3
    out = capsys.readouterr().out
    assert [name for name in CHECKS if not re.search(rf"^{name} +skipped .*no GPU", out, re.M)] == [], out
    assert f"skipped (6 of 6): {', '.join(CHECKS)}" in out and "no GPU here: nothing was checked" in out


def test_the_gpu_check_fails_where_torch_cannot_use_the_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture):
    folder = fake_nvidia_smi(tmp_path / "bin", [("Tesla V100-SXM2-32GB", "7.0")] * 2, "550.54.15", "12.4")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    assert gpu_check_script().main([]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^torch build +FAIL .*make env TORCH_CUDA=cu126", out, re.M), out
    assert all(re.search(rf"^{name} +skipped .*torch cannot use the GPUs", out, re.M) for name in CHECKS[1:]), out
