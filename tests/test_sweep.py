"""sweep.py, run_sweep.sh and sbatch_agent.sh: the sweep config against wandb's schema and train.py, the agent's
argv, offline enumeration, and the agent scripts up to the wandb agent (which needs wandb's server: a fake
`wandb` on PATH stands in for it and starts runs the way the real agent does)."""

from __future__ import annotations

import copy
import http.server
import itertools
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, script_env
from slurm_fixtures import SlurmCluster, in_ci, skip_or_fail, slurm, slurm_cluster  # noqa: F401  (fixtures)
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

import sweep
import train


def variant(params: dict | None = None, **top) -> dict:
    config = copy.deepcopy(sweep.SWEEP_CONFIG)
    config["parameters"].update(params or {})
    config.update(top)
    return config


def agent_args(run: dict) -> list[str]:
    """${args} as the wandb agent computes it (wandb's own function), from the run's config as the server sends it."""
    return create_sweep_command_args({"args": {k: {"value": v} for k, v in sorted(run.items())}})["args"]


# --- the config --------------------------------------------------------------------------------------------


def test_shipped_config_validates_offline(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    def no_network(*args, **kwargs):
        raise AssertionError("--dry-run touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    config = sweep.validate()
    assert config["metric"]["name"] == train.MONITOR  # SWEEP_CONFIG names no metric: train.py's MONITOR
    assert config["method"] in ("grid", "random", "bayes") and config["early_terminate"]["type"] == "hyperband"
    assert config["program"] == "train.py" and "${args}" in config["command"]
    assert all("." in name for name in config["parameters"])  # full dotted train.py keys
    assert sweep.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep config OK" in out and "run_sweep.sh" in out and "sbatch --array=0-" in out


def test_create_hands_the_config_to_wandb_and_prints_the_agent_commands(monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture):
    import wandb

    created = []
    monkeypatch.setattr(wandb, "sweep", lambda **kwargs: created.append(kwargs) or "abc123")
    monkeypatch.setattr(sweep, "agent_problem", lambda timeout=10.0: None)  # as if online
    monkeypatch.setattr(sweep, "has_wandb_credentials", lambda: False)
    with pytest.raises(SystemExit, match="wandb login"):  # never wandb's login prompt
        sweep.main(["--entity", "me"])
    monkeypatch.setattr(sweep, "has_wandb_credentials", lambda: True)
    assert sweep.main(["--entity", "me", "--project", "proj"]) == 0
    # SWEEP_CONFIG as written, with its metric from train.py's MONITOR when it names none
    assert created == [{"sweep": sweep.with_default_metric(sweep.SWEEP_CONFIG), "entity": "me", "project": "proj"}]
    assert created[0]["sweep"]["metric"]["name"] == train.MONITOR
    out = capsys.readouterr().out
    assert "./run_sweep.sh me/proj/abc123" in out and "sbatch_agent.sh me/proj/abc123" in out


BROKEN = {
    "unknown method": (variant(method="gird"), "method"),
    "min > max": (variant({"optimizer.lr": {"distribution": "log_uniform_values", "min": 0.1, "max": 0.001}}),
                  "optimizer.lr"),
    "unknown parameter": (variant({"model.widht": {"values": [8, 16]}}), "model.widht"),
    "unparseable value": (variant({"model.hidden_dim": {"values": [64.0, 128]}}), "model.hidden_dim"),
    "None it cannot parse": (variant({"trainer.max_epochs": {"values": [None, 3]}}), "trainer.max_epochs"),
    "None that becomes 'None'": (variant({"wandb.name": {"values": [None]}}), "wandb.name"),
    "argument of another class": (variant({"optimizer.momentum": {"values": [0.9]}}), "optimizer.momentum"),
    "metric never logged": (variant(metric={"name": "val_loss", "goal": "minimize"}), "metric"),
    "the model's constructor refuses": (variant({"model.dropout": {"values": [0.1, 1.5]}}), "model.dropout"),
    "the DataModule's constructor refuses": (variant({"data.batch_size": {"values": [64, -64]}}), "data.batch_size"),
    "args without hyphens": (variant(command=["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]),
                             "command"),
    "nested parameters": (variant({"model": {"parameters": {"depth": {"values": [1, 2]}}}}), "parameters/model"),
}


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.parametrize("config, key", BROKEN.values(), ids=BROKEN.keys())
@pytest.mark.slow
def test_broken_config_is_rejected_before_anything_is_created(config: dict, key: str, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch):
    import wandb

    with pytest.raises(sweep.SweepConfigError, match=key.replace(".", r"\.")):
        sweep.validate(config)
    created = []
    monkeypatch.setattr(wandb, "sweep", lambda *args, **kwargs: created.append(args) or "nope")
    monkeypatch.setattr(sweep, "SWEEP_CONFIG", config)
    assert sweep.main([]) == 1  # not --dry-run: it would create the sweep if the config passed
    assert not created
    assert key in capsys.readouterr().err


@pytest.mark.example_model
@pytest.mark.example_data
def test_a_dependent_parameter_is_accepted_with_its_class():
    sweep.validate(variant({"optimizer": {"values": ["SGD"]}, "optimizer.momentum": {"values": [0.0, 0.9]}}))


# --- what the agent passes ---------------------------------------------------------------------------------

TYPED = variant({"trainer.enable_progress_bar": {"values": [True, False]}, "wandb.tags": {"values": [["a", "b"], []]},
                 "model.depth": {"min": 1, "max": 3},
                 "optimizer.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2}})


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.filterwarnings("ignore:.*args parameter is intended")  # pytest's own sys.argv, not a mistake
@pytest.mark.slow
def test_agent_argv_is_accepted_and_every_setting_arrives():
    sweep.validate(TYPED)
    runs = sweep.grid_configs()[::10] + sweep.random_configs(5, seed=3) + sweep.random_configs(6, 1, TYPED)
    for run in runs:
        argv = sweep.to_argv(run)
        assert argv == agent_args(run)  # exactly what the agent builds: one --key=str(value) element each
        parsed = train.parse_config(argv)
        assert parsed.model.hidden_dim == run["model.hidden_dim"]
        assert parsed.model.dropout == run["model.dropout"]
        assert parsed.optimizer.init_args.lr == run["optimizer.lr"]
        assert parsed.data.batch_size == run["data.batch_size"]
        assert parsed.trainer.max_epochs == run["trainer.max_epochs"]
        if "wandb.tags" in run:
            assert parsed.trainer.enable_progress_bar is run["trainer.enable_progress_bar"]
            assert parsed.wandb.tags == run["wandb.tags"] and parsed.model.depth == run["model.depth"]


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.slow
def test_a_run_started_like_the_agent_trains_with_its_settings(tmp_path: Path):
    run = {**sweep.random_configs(1, seed=5)[0], "trainer.max_epochs": 1}
    # The agent runs ["/usr/bin/env", "python", "train.py", *${args}] in the repository ("python" from PATH).
    command = ["/usr/bin/env", "python", str(REPO / "train.py"), *agent_args(run)]
    env = script_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", WANDB_MODE="offline")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 1 and saved["optimizer"]["init_args"]["lr"] == run["optimizer.lr"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["hyper_parameters"]["hidden_dim"] == run["model.hidden_dim"]  # reached the model
    assert checkpoint["hyper_parameters"]["dropout"] == run["model.dropout"]
    assert checkpoint["datamodule_hyper_parameters"]["batch_size"] == run["data.batch_size"]  # and the data
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == run["optimizer.lr"]  # and the optimizer
    assert checkpoint["epoch"] == 0  # one epoch: the trainer's max_epochs


# --- enumeration without a server --------------------------------------------------------------------------


@pytest.mark.example_model
@pytest.mark.example_data
def test_grid_is_the_product_of_the_values():
    runs = sweep.grid_configs()
    params = sweep.SWEEP_CONFIG["parameters"]
    names = sorted(params)
    expected = set(itertools.product(*[spec.get("values", [spec.get("value")]) for _, spec in sorted(params.items())]))
    assert len(runs) == len(expected) == sweep.grid_size() == 81
    assert {tuple(run[name] for name in names) for run in runs} == expected
    small = {"method": "grid", "metric": {"name": "val/loss"},
             "parameters": {"model.depth": {"min": 1, "max": 3}, "model.channels": {"values": [8, 16]}}}
    assert len(sweep.grid_configs(small)) == 6
    with pytest.raises(sweep.SweepConfigError, match=r"optimizer\.lr"):  # a continuous one has no grid
        sweep.grid_configs(TYPED)


@pytest.mark.example_model
@pytest.mark.example_data
def test_random_draws_are_seeded_and_leave_the_global_rngs_alone():
    random.seed(123)
    np.random.seed(123)
    expected_next = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    first = sweep.random_configs(7, seed=1, config=TYPED)
    assert (random.random(), np.random.rand()) == expected_next
    assert first == sweep.random_configs(7, seed=1, config=TYPED) and len(first) == 7
    assert first != sweep.random_configs(7, seed=2, config=TYPED)
    assert all(1e-5 <= run["optimizer.lr"] <= 1e-2 and run["model.depth"] in (1, 2, 3) for run in first)
    assert len({run["optimizer.lr"] for run in first}) == 7


def test_list_prints_the_runs_as_train_commands(capsys: pytest.CaptureFixture):
    assert sweep.main(["--list", "--samples", "3", "--seed", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [" ".join(["python", "train.py", *sweep.to_argv(run)]) for run in sweep.random_configs(3, 2)]


# --- the agent scripts, up to the wandb agent --------------------------------------------------------------


@pytest.fixture
def fake_server() -> Iterator[str]:
    """A local HTTP server standing in for the wandb server's address (the agent check only needs an answer)."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *args: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_check_agent_explains_why_an_agent_cannot_work(fake_server: str, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture):
    assert sweep.main(["--check-agent"]) == 1  # the tests run with WANDB_MODE=offline
    err = capsys.readouterr().err
    assert "WANDB_MODE=offline" in err and "sweep.py --list" in err and len(err.splitlines()) == 1
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_BASE_URL", closed_port_url())
    assert sweep.main(["--check-agent", "--timeout", "2"]) == 1
    assert "cannot reach the wandb server" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_BASE_URL", fake_server)
    assert sweep.main(["--check-agent"]) == 0


FAKE_WANDB = """#!{python}
# Stands in for `wandb agent`: records how it was started, then (like the agent) runs one command
# "/usr/bin/env python PROGRAM ARGS" per run, or waits for SIGINT with FAKE_WAIT_FOR_SIGINT=1.
import json, os, signal, subprocess, sys, time
signals = []
sigint_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # then Python's Ctrl-C handling is off
signal.signal(signal.SIGINT, lambda signum, frame: signals.append(signum))
record = {{"argv": sys.argv[1:], "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
          "sigint_ignored": sigint_ignored,
          "pgid": os.getpgid(0), "task": os.environ.get("SLURM_ARRAY_TASK_ID"), "start": time.time()}}
open(os.path.join(os.environ["FAKE_LOG"], f"agent-started-{{os.getpid()}}"), "w").close()
if os.environ.get("FAKE_WAIT_FOR_SIGINT"):
    deadline = time.time() + 30
    while not signals and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a second Ctrl-C would arrive now
else:
    if os.environ.get("FAKE_GO"):  # the run starts once this file exists (a test edits the project meanwhile)
        deadline = time.time() + 60
        while not os.path.exists(os.environ["FAKE_GO"]) and time.time() < deadline:
            time.sleep(0.05)
    record["run_rc"] = subprocess.call(["/usr/bin/env", "python", os.environ["FAKE_PROGRAM"], "--model.hidden_dim=64",
                                        "--optimizer.lr=0.001"])
record.update(end=time.time(), sigints=len(signals))
with open(os.path.join(os.environ["FAKE_LOG"], f"agent-{{os.getpid()}}.json"), "w") as f:
    json.dump(record, f)
"""

FAKE_RUN = """import json, os, signal, sys, time
# Stands in for train.py: records its argv and Slurm task, waits for SIGUSR1 when asked to.
got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
record = {"argv": sys.argv[1:], "procid": os.environ.get("SLURM_PROCID"), "ntasks": os.environ.get("SLURM_NTASKS"),
          "step": os.environ.get("SLURM_STEP_ID"), "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "python": sys.executable, "path": os.environ["PATH"], "job": os.environ.get("SLURM_JOB_ID")}
log = os.environ["FAKE_LOG"]
open(os.path.join(log, f"started-{record['job']}-{record['procid']}"), "w").close()
deadline = time.time() + (30 if os.environ.get("FAKE_WAIT_FOR_USR1") else 1)
while time.time() < deadline and not got:
    time.sleep(0.05)
record["usr1"] = len(got)
with open(os.path.join(log, f"run-{record['job']}-{record['procid']}.json"), "w") as f:
    json.dump(record, f)
"""


def make_checkout(tmp_path: Path, fake_server: str) -> tuple[Path, dict[str, str], Path]:
    """A copy of the scripts (runs/ and logs land in tmp_path) and an environment whose `wandb` is the fake."""
    repo, bin_dir, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "log"
    for directory in (repo, bin_dir, log):
        directory.mkdir()
    for name in ("sweep.py", "train.py", "run_sweep.sh", "sbatch_agent.sh"):
        shutil.copy2(REPO / name, repo / name)
    shutil.copytree(REPO / "support", repo / "support", ignore=shutil.ignore_patterns("__pycache__"))
    (bin_dir / "wandb").write_text(FAKE_WANDB.format(python=sys.executable))
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n[ -n \"$FAKE_GPUS\" ] || exit 9\nprintf '%s\\n' $FAKE_GPUS\n")
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "fake_run.py").write_text(FAKE_RUN)
    env = script_env(PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
                     WANDB_BASE_URL=fake_server, FAKE_LOG=str(log), FAKE_PROGRAM=str(tmp_path / "fake_run.py"))
    env.pop("WANDB_MODE", None)  # agents need the server; the fake server answers
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return repo, env, log


def records(log: Path, pattern: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(log.glob(pattern))]


@pytest.mark.parametrize("shell_script", ["run_sweep.sh", "sbatch_agent.sh"])
def test_scripts_pass_bash_n_and_shellcheck(shell_script: str):
    assert subprocess.run(["bash", "-n", str(REPO / shell_script)]).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None and in_ci() and os.geteuid() == 0 and shutil.which("apt-get"):
        for step in (["update", "-qq"], ["install", "-y", "-qq", "shellcheck"]):  # CI: install it, never skip
            subprocess.run(["apt-get", *step], capture_output=True, timeout=300)
        shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if in_ci():
            pytest.fail("shellcheck is missing and could not be installed (apt-get install shellcheck)")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, str(REPO / shell_script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.slow
def test_run_sweep_starts_one_agent_per_gpu_and_stops_them_on_ctrl_c(tmp_path: Path, fake_server: str):
    repo, env, log = make_checkout(tmp_path, fake_server)
    env.update(FAKE_WAIT_FOR_SIGINT="1", CUDA_VISIBLE_DEVICES="0,1")
    # Ctrl-C as in a terminal: a test runner started in the background (`cmd &` in a script) ignores SIGINT, and a
    # shell started with it ignored cannot trap it; measured here, every agent then waited out its 30 s.
    proc = subprocess.Popen([str(repo / "run_sweep.sh"), "me/proj/abc123", "3"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=interruptible)
    deadline = time.monotonic() + 120  # generous: under load the agents' check alone took over a minute here
    while len(list(log.glob("agent-started-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(log.glob("agent-started-*"))) == 2, "the two agents never started"
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    output = proc.communicate(timeout=90)[0]
    assert proc.returncode == 0, output
    agents = records(log, "agent-*.json")
    assert sorted(agent["cvd"] for agent in agents) == ["0", "1"], output  # one per GPU, pinned
    assert all(agent["argv"] == ["agent", "--forward-signals", "--count", "3", "me/proj/abc123"] for agent in agents)
    assert all(agent["sigints"] == 1 for agent in agents)  # each got Ctrl-C exactly once, to pass to its run
    assert not any(agent["sigint_ignored"] for agent in agents)  # as a real agent, it can handle Ctrl-C
    assert len({agent["pgid"] for agent in agents}) == 2 and proc.pid not in {agent["pgid"] for agent in agents}


@pytest.mark.parametrize("gpus, devices", [("0 1 2", ["0", "1", "2"]), ("", [""])], ids=["nvidia-smi", "cpu"])
def test_run_sweep_without_cuda_visible_devices_asks_nvidia_smi(gpus: str, devices: list[str], tmp_path: Path,
                                                                 fake_server: str):
    repo, env, log = make_checkout(tmp_path, fake_server)
    result = subprocess.run([str(repo / "run_sweep.sh"), "me/proj/abc123"], env={**env, "FAKE_GPUS": gpus},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    agents = records(log, "agent-*.json")
    assert sorted(agent["cvd"] for agent in agents) == devices
    assert all(agent["argv"] == ["agent", "--forward-signals", "me/proj/abc123"] for agent in agents)


@pytest.mark.parametrize("mode", ["offline", "unreachable"])
def test_sbatch_agent_refuses_to_start_without_the_server(mode: str, tmp_path: Path, fake_server: str):
    repo, env, log = make_checkout(tmp_path, fake_server)
    env.update({"SLURM_JOB_ID": "123"} | ({"WANDB_MODE": "offline"} if mode == "offline" else
                                         {"WANDB_BASE_URL": closed_port_url()}))
    result = subprocess.run(["bash", "sbatch_agent.sh", "me/proj/abc123"], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert ("WANDB_MODE=offline" if mode == "offline" else "cannot reach") in result.stderr
    assert "sweep.py --list" in result.stderr and not records(log, "agent-*.json")  # no agent started


@pytest.mark.slow
def test_sbatch_agent_runs_a_throttled_array_of_agents(slurm: SlurmCluster, tmp_path: Path,  # noqa: F811
                                                       fake_server: str):
    gres = slurm.run("sinfo", "-h", "-o", "%G").stdout
    if not any(f"gpu:{n}" in gres for n in range(2, 9)):  # the header asks for a GPU, the DDP case for two
        skip_or_fail(f"the local cluster has no 2 (fake) GPUs (Gres {gres.strip()}): restart it with "
                     "LOCAL_SLURM_GPUS=2 tests/slurm/local_slurm.sh start (its default)")
    repo, env, log = make_checkout(tmp_path, fake_server)
    out = str(tmp_path / "slurm-%A_%a.out")
    array = slurm.sbatch("--array=0-3%2", f"--output={out}", "sbatch_agent.sh", "me/proj/abc123", cwd=repo, env=env)
    # Two devices per run: two Slurm tasks (DDP ranks) with the same argv, that wait for SIGUSR1.
    ddp = slurm.sbatch("--ntasks-per-node=2", "--gpus-per-node=2", f"--output={tmp_path}/ddp-%j.out",
                       "sbatch_agent.sh", "me/proj/ddp", cwd=repo, env={**env, "FAKE_WAIT_FOR_USR1": "1"})
    deadline = time.monotonic() + 90
    while len(list(log.glob(f"started-{ddp}-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert slurm.run("scancel", "--signal=USR1", ddp).returncode == 0  # what --signal=SIGUSR1@90 sends
    slurm.wait([array, ddp])
    logs = "\n".join(path.read_text() for path in tmp_path.glob("*.out"))

    agents = [agent for agent in records(log, "agent-*.json") if agent["task"] is not None]
    assert sorted(agent["task"] for agent in agents) == ["0", "1", "2", "3"], logs
    assert all(agent["argv"] == ["agent", "--forward-signals", "--count", "1", "me/proj/abc123"] for agent in agents)
    assert all(agent["run_rc"] == 0 for agent in agents), logs
    spans = [(agent["start"], agent["end"]) for agent in agents]
    most_at_once = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    assert most_at_once <= 2 and slurm.job_field(f"{array}_0", "ArrayTaskThrottle") == "2"
    assert all(slurm.job_field(f"{array}_{task}", "ExitCode") == "0:0" for task in range(4))

    runs = records(log, "run-*.json")
    array_runs = [run for run in runs if run["job"] != ddp]
    assert len(array_runs) == 4 and all(run["ntasks"] == "1" and run["procid"] == "0" for run in array_runs)
    assert all(run["argv"] == ["--model.hidden_dim=64", "--optimizer.lr=0.001"] for run in runs)
    assert all(run["python"] == sys.executable and "sweep-agent." not in run["path"] for run in runs)  # the real one
    ddp_runs = [run for run in runs if run["job"] == ddp]
    assert sorted(run["procid"] for run in ddp_runs) == ["0", "1"] and {run["ntasks"] for run in ddp_runs} == {"2"}
    assert len({run["step"] for run in ddp_runs}) == 1 and {run["cvd"] for run in ddp_runs} == {"0,1"}
    assert all(run["usr1"] == 1 for run in ddp_runs), logs  # the run's tasks got SIGUSR1 ...
    assert slurm.job_field(ddp, "ExitCode") == "0:0", logs  # ... and the agent in the batch shell lived on


def test_slurm_fixture_skips_on_a_laptop_but_fails_under_ci(tmp_path: Path):
    foreign = tmp_path / "slurm.conf"
    foreign.write_text("ClusterName=somebody-elses\n")  # a real site's Slurm: never submit test jobs to it
    (tmp_path / "test_uses_slurm.py").write_text("from slurm_fixtures import slurm, slurm_cluster  # noqa\n\n"
                                                 "def test_it(slurm):\n    pass\n")
    env = script_env(SLURM_CONF=str(foreign), PYTHONPATH=str(REPO / "tests"))
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_uses_slurm.py"]
    for ci, outcome in (("", "1 skipped"), ("true", "1 error")):
        result = subprocess.run(command, cwd=tmp_path, env={**env, "CI": ci}, capture_output=True, text=True,
                                timeout=120)
        assert outcome in result.stdout and "not local_slurm.sh's" in result.stdout, result.stdout
