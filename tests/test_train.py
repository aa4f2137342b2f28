"""train.py end to end with the example model and data: learning, wandb offline logging, the CLI, resuming, DDP,
the model's structures. Tests that depend on the example itself (its accuracy, its arguments) are marked
example_model / example_data: conftest.py skips them once a researcher has replaced the example."""

from __future__ import annotations

import glob
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, REPO, run_script, script_env
from wandb_records import wait_for_logged

import train
from support.provenance.snapshot import tree_hash
from support.training.callbacks import SignalsAtBatchBoundary


def wandb_file(run_dir: str | Path) -> str:
    files = glob.glob(str(Path(run_dir) / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.slow
def test_short_run_learns_and_logs_to_offline_wandb(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-" + "0" * 29)  # never written anywhere (offline: never sent)
    results = train.main(QUICK + ["--trainer.max_epochs=3"])
    assert results["test/acc"] > 0.8  # chance is 0.1
    run_dir = Path(results["run_dir"])
    assert run_dir.parent == Path.cwd() / "runs"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert Path(results["best_checkpoint"]).parent == run_dir / "checkpoints"
    expected = {"train/loss", "val/loss", "val/acc", "test/acc", "test/loss"}
    logged, config = wait_for_logged(wandb_file(run_dir), expected)
    assert expected <= logged, sorted(logged)
    assert config["seed_everything"] == "42"
    assert len(config["git_commit"].strip('"')) >= 40 or config["git_commit"] == '"unknown"'
    assert json.loads(config["model"])["hidden_dim"] == 128
    assert (run_dir / "wandb_id").read_text().strip() in wandb_file(run_dir)
    # What it ran (support/provenance/record.py): the working tree, since no job froze a copy for it.
    (attempt,) = json.loads((run_dir / "provenance.json").read_text())["attempts"]
    assert attempt["code"]["hash"] == tree_hash(REPO) == config["code_hash"].strip('"') and attempt["exit"] == 0
    assert attempt["code"]["commit"] in config["git_commit"] and attempt["code"]["dir"] is None
    assert attempt["code"]["dirty"] or not attempt["code"]["patch"]  # a clean clone (CI) has no patch
    assert attempt["torch"] == torch.__version__ and attempt["devices"]["cpu"] and attempt["end"] >= attempt["start"]
    assert not [path for path in run_dir.rglob("*") if path.is_file() and b"secret-key-" in path.read_bytes()]


def test_concurrent_runs_get_their_own_directories():
    a = train.build_cli(QUICK)
    b = train.build_cli(QUICK)
    assert a.run_dir != b.run_dir and a.run_dir.parent == b.run_dir.parent


@pytest.mark.slow
def test_no_credentials_in_a_terminal_trains_offline_without_prompting(tmp_path: Path):
    """wandb's login prompt waits forever on a terminal; the template must pick offline mode instead."""
    env = script_env(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"))
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        env.pop(key, None)
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--trainer.max_epochs=1"], stdin=child,
                            stdout=child, stderr=child, env=env, close_fds=True)
    os.close(child)
    output, deadline = b"", time.monotonic() + 240
    while time.monotonic() < deadline:
        if select.select([main], [], [], 1)[0]:
            try:
                output += os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
        elif proc.poll() is not None:
            break
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("train.py hung in a terminal (waiting at wandb's login prompt?):\n" + output.decode()[-2000:])
    finally:
        os.close(main)
    assert proc.returncode == 0, output.decode()[-3000:]
    assert b"final metrics" in output
    assert glob.glob("runs/*/wandb/offline-run-*/run-*.wandb")


@pytest.mark.example_model
@pytest.mark.example_data
def test_dotted_overrides_and_config_file_take_effect(tmp_path: Path):
    cli = train.build_cli(QUICK + ["--model.hidden_dim=64", "--data.batch_size=32", "--trainer.max_epochs=3",
                                   "--seed_everything=1", "--optimizer.lr=0.01", "--early_stopping.patience=2"])
    assert cli.model.hparams.hidden_dim == 64 and cli.model.fc.out_features == 64
    assert cli.datamodule.hparams.batch_size == 32
    assert cli.trainer.max_epochs == 3
    assert cli.config.seed_everything == 1 and os.environ["PL_GLOBAL_SEED"] == "1"
    assert cli.config.optimizer.init_args.lr == 0.01
    assert cli.trainer.early_stopping_callback.patience == 2
    config = tmp_path / "exp.yaml"
    config.write_text("model:\n  depth: 3\n  channels: 8\ndata:\n  batch_size: 16\ntrainer:\n  max_epochs: 5\n")
    cli = train.build_cli(["--config", str(config), "--model.channels=4"])  # later arguments win
    assert len(cli.model.blocks) == 3 and cli.model.hparams.channels == 4
    assert cli.datamodule.hparams.batch_size == 16 and cli.trainer.max_epochs == 5
    # The same settings as a nested dict, the way other scripts call it.
    cli = train.build_cli({"model": {"hidden_dim": 16}, "trainer": {"max_epochs": 1}})
    assert cli.model.hparams.hidden_dim == 16 and cli.trainer.max_epochs == 1


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.parametrize("args, names", [
    (["--model.hiden_dim=3"], "model.hiden_dim"),
    (["--model.hidden_dim=abc"], "model.hidden_dim"),
    (["--optimizer.lr=fast"], "optimizer.lr"),
    (["--config", "missing.yaml"], "missing.yaml"),
    (["--model.depth=0"], "depth"),
    (["--wandb.mode=online"], "wandb login"),  # no credentials: wandb would prompt forever
    (["--data.dataset=mnist", "--data.mirror=http://127.0.0.1:9/"], "could not download"),  # nothing listens
])
@pytest.mark.slow
def test_bad_input_exits_nonzero_with_one_line_and_writes_nothing(args: list[str], names: str, tmp_path: Path):
    result = run_script("train.py", *args, timeout=120, NETRC=str(tmp_path / "none"))
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and names in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert list(Path.cwd().iterdir()) == [] or not (Path.cwd() / "runs").exists()


@pytest.mark.example_model
@pytest.mark.example_data
def test_resumed_run_ends_like_an_uninterrupted_one():
    args = QUICK + ["--model.dropout=0.3", "--early_stopping.patience=100"]  # dropout: the RNG must be restored
    full = train.main(args + ["--trainer.max_epochs=4", "--run_dir=full"])
    train.main(args + ["--trainer.max_epochs=2", "--run_dir=stopped"])
    resumed = train.main(args + ["--trainer.max_epochs=4", "--run_dir=stopped", "--ckpt_path=last"])
    a = torch.load("full/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load("stopped/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4 * 20
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert resumed["test/acc"] == full["test/acc"] and resumed["test/loss"] == full["test/loss"]
    # The resumed run continued the same wandb run.
    assert len(glob.glob("stopped/wandb/offline-run-*")) == 2
    assert len({Path(p).name for p in glob.glob("stopped/wandb/offline-run-*/run-*.wandb")}) == 1


@pytest.mark.slow
def test_ddp_two_cpu_processes_complete_a_fit():
    result = run_script("train.py", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
                        "--trainer.max_epochs=2", "--trainer.enable_model_summary=false", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final metrics" in result.stdout and result.stdout.count("final metrics") == 1  # printed by rank 0
    assert len(list(Path("runs").iterdir())) == 1  # both ranks wrote into one run directory
    # stdout is a pipe here, as in a SLURM log: plain lines, no carriage-return progress bar.
    assert "\r" not in result.stdout and "epoch 2/2 done" in result.stdout


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.parametrize("structure", [
    dict(channels=4, depth=1, hidden_dim=8, dropout=0.0),
    dict(channels=16, depth=3, hidden_dim=32, dropout=0.5),
    dict(channels=8, depth=5, hidden_dim=16, dropout=0.1),
])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_model_builds_and_runs_forward(structure: dict, shape: tuple[int, int, int]):
    model = train.MODEL_CLASS(in_channels=shape[0], num_classes=7, **structure)
    logits = model(torch.randn(5, *shape))
    assert logits.shape == (5, 7) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_sweep_agents_run_gets_its_own_directory_and_keeps_the_agents_run_id(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw33p")
    monkeypatch.setenv("WANDB_RUN_ID", "run42")
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # an agent in a SLURM task runs several sweep runs one after another
    cli = train.build_cli(QUICK)
    assert cli.run_dir.name == "sweep-sw33p-run42"
    assert cli.trainer.logger.version == "run42"  # the sweep knows the run by the id its agent chose


def test_the_requeue_signal_is_handled_at_a_batch_boundary_and_marks_sweep_runs(monkeypatch: pytest.MonkeyPatch):
    import signal
    from types import SimpleNamespace

    import wandb

    calls = []
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw33p")
    monkeypatch.setattr(wandb, "run", SimpleNamespace(mark_preempting=lambda: calls.append("preempting")))
    original = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append("lightning requeue"))
    trainer = SimpleNamespace(is_global_zero=True, world_size=1)
    try:
        callback = SignalsAtBatchBoundary()
        callback.on_train_start(trainer, None)
        signal.raise_signal(signal.SIGUSR1)
        assert calls == []  # nothing happens in the middle of a step
        callback.on_train_batch_start(trainer, None, None, 0)
        assert calls == ["preempting", "lightning requeue"]
        # DDP: a rank acts when any rank got the signal, so all save the (collective) checkpoint at the same batch.
        decisions = []
        other_rank_got_it = SimpleNamespace(reduce_boolean_decision=lambda mine, all: decisions.append(mine) or True)
        rank1 = SimpleNamespace(is_global_zero=False, world_size=2, strategy=other_rank_got_it)
        callback.on_train_batch_start(rank1, None, None, 1)  # ranks agree only every 10th batch
        assert decisions == [] and len(calls) == 2
        callback.on_train_batch_start(rank1, None, None, 10)
        assert decisions == [False] and calls[-1] == "lightning requeue" and len(calls) == 3
    finally:
        signal.signal(signal.SIGUSR1, original)


@pytest.mark.example_model
@pytest.mark.example_data
def test_a_run_resumed_from_a_mid_epoch_checkpoint_ends_like_an_uninterrupted_one():
    """What a requeued SLURM job does (tested for real in test_slurm_training.py), here without Slurm: a
    checkpoint taken between two batches of epoch 1, then a new run resumed from it."""
    from pytorch_lightning import Callback

    class SaveAtStep30(Callback):  # at a batch boundary, like SignalsAtBatchBoundary
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 30:
                trainer.save_checkpoint("mid.ckpt")

    args = QUICK + ["--model.dropout=0.3", "--early_stopping.patience=100", "--trainer.max_epochs=3",
                    "--cka.every_n_epochs=0"]
    cli = train.build_cli(args + ["--run_dir=full"])
    cli.trainer.callbacks.append(SaveAtStep30())
    train.fit_and_test(cli)
    train.main(args + ["--run_dir=resumed", "--ckpt_path=mid.ckpt"])
    full = torch.load("full/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    resumed = torch.load("resumed/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    mid = torch.load("mid.ckpt", map_location="cpu", weights_only=False)
    assert mid["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 10  # mid-epoch 1
    assert resumed["global_step"] == full["global_step"] == 60
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


@pytest.mark.example_model
@pytest.mark.example_data
def test_last_checkpoint_is_the_latest_epoch_when_the_monitored_metric_stops_improving():
    """Lightning's save_last rewrites last.ckpt only beside a new best; here the best is epoch 0 and stays so."""
    results = train.main(QUICK + ["--trainer.max_epochs=3", "--checkpoint.monitor=val/acc", "--checkpoint.mode=min",
                                  "--early_stopping.patience=100", "--cka.every_n_epochs=0"])
    assert Path(results["best_checkpoint"]).name == "best-epoch000-step20.ckpt"
    last = torch.load(Path(results["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3 * 20 and last["epoch"] == 2
    assert sorted(p.name for p in (Path(results["run_dir"]) / "checkpoints").iterdir()) == [
        "best-epoch000-step20.ckpt", "last.ckpt"]


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.slow
def test_sigterm_stops_the_run_with_status_143_and_a_checkpoint_to_resume_from():
    """Lightning alone ends a run stopped by SIGTERM with status 0, so a grid row was marked done at epoch 5 of 40."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *QUICK, "--trainer.max_epochs=500",
                             "--run_dir=run", "--cka.every_n_epochs=0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=script_env())
    deadline = time.monotonic() + 180
    while not Path("run/checkpoints/last.ckpt").exists():  # training has started: stop it mid-run
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    time.sleep(0.5)
    proc.terminate()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    last = torch.load("run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] > 20  # saved at the batch where it stopped, after the first epoch's
