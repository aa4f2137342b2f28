"""A run directory you can trust (support/run_dir/, evaluate.py): a resume continues with the run's own
config.yaml, the first config is never overwritten, one run writes at a time, checkpoints are whole or absent,
a run can be evaluated again, and plain-log progress shows every logged metric."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import QUICK, REPO, run_script, script_env
from pytorch_lightning.callbacks import Callback
from toy import ToyClassifier, ToyData
from wandb_records import wait_for_logged

import evaluate
import train
from support.run_dir.config import changes, rerunnable
from support.run_dir.writer import AtomicCheckpointIO
from support.training.callbacks import LogLineProgress

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BASE = QUICK + ["--cka.every_n_epochs=0", "--early_stopping.patience=100"]
# Not the defaults: a resume that forgot them would build another model or train differently.
OWN_SETTINGS = ["--model.hidden_dim=32", "--model.dropout=0.3", "--data.batch_size=32", "--optimizer=SGD",
                "--optimizer.lr=0.05", "--optimizer.momentum=0.9"]


def files_of(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes, but wandb's: its service appends to its logs after the run."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.relative_to(run_dir).parts[0] != "wandb"}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


class StopAfterEpochs(Callback):
    """Ends fit after `epochs` epochs, as a run cut short by its time limit, without changing its settings."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.slow
def test_a_resume_with_no_arguments_continues_with_the_runs_own_settings_exactly(capsys):
    """Before: `--run_dir X --ckpt_path last` ignored X/config.yaml, so every non-default argument had to be typed
    again and a forgotten one failed with a state_dict size error."""
    args = BASE + OWN_SETTINGS + ["--trainer.max_epochs=3"]
    train.main(args + ["--run_dir=full"])
    cli = train.build_cli(args + ["--run_dir=stopped"])
    cli.trainer.callbacks.append(StopAfterEpochs(2))
    with train.writer.one_writer(cli.run_dir):
        train.fit_and_test(cli)
    first_config = Path("stopped/config.yaml").read_bytes()
    capsys.readouterr()
    train.main(QUICK + ["--run_dir=stopped", "--ckpt_path=last"])  # nothing else typed again
    assert "resuming" in capsys.readouterr().out
    full, resumed = weights(Path("full/checkpoints/last.ckpt")), weights(Path("stopped/checkpoints/last.ckpt"))
    for key, value in full.items():
        assert torch.equal(value, resumed[key]), key
    assert Path("stopped/config.yaml").read_bytes() == first_config
    assert not list(Path("stopped").glob("config.resume-*"))  # nothing changed, nothing to record
    assert len(list(Path("stopped/checkpoints").glob("best-*.ckpt"))) == 1


@pytest.mark.example_model
@pytest.mark.example_data
def test_a_changed_resume_is_recorded_beside_the_first_config_and_in_wandb(capsys):
    train.main(BASE + ["--trainer.max_epochs=1", "--run_dir=run"])
    first_config = Path("run/config.yaml").read_bytes()
    assert "run_dir" not in rerunnable(first_config.decode()) and b"ckpt_path" not in first_config
    capsys.readouterr()
    train.main(BASE + ["--trainer.max_epochs=2", "--run_dir=run", "--ckpt_path=last"])
    assert "changed by the arguments: trainer.max_epochs 1 -> 2" in capsys.readouterr().out
    assert Path("run/config.yaml").read_bytes() == first_config
    record = Path("run/config.resume-1.yaml").read_text()
    assert record.splitlines()[1] == "# changed from config.yaml: trainer.max_epochs 1 -> 2"
    assert changes(rerunnable(first_config.decode()), rerunnable(record)) == {"trainer.max_epochs": (1, 2)}
    last = torch.load("run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2 * 20
    # The best checkpoint's state saved in last.ckpt is this epoch's, so a later resume still finds its best file.
    best_states = [s for k, s in last["callbacks"].items() if k.startswith("ModelCheckpoint{'monitor': 'val/loss'")]
    assert [Path(s["best_model_path"]).name for s in best_states] == [p.name for p in Path("run/checkpoints").glob(
        "best-*.ckpt")]
    segments = sorted(Path("run/wandb").glob("offline-run-*/run-*.wandb"))
    _, config = wait_for_logged(segments[-1], set())
    assert config["resumed_with"] == '"config.resume-1.yaml"' and json.loads(config["trainer"])["max_epochs"] == 2


@pytest.mark.example_model
@pytest.mark.example_data
def test_a_resume_that_cannot_load_stops_in_one_line_and_keeps_the_record():
    """Before: that resume overwrote config.yaml with the wrong settings, then failed with a state_dict error."""
    train.main(BASE + ["--trainer.max_epochs=1", "--run_dir=run"])
    before = files_of(Path("run"))
    with pytest.raises(SystemExit) as stopped:
        train.main(BASE + ["--run_dir=run", "--ckpt_path=last", "--model.hidden_dim=64", "--model.depth=3"])
    message = str(stopped.value.code)
    assert message.count("\n") == 0 and "does not fit the model" in message
    assert "model.depth 2 -> 3; model.hidden_dim 128 -> 64" in message, message
    assert files_of(Path("run")) == before  # byte for byte; nothing added


@pytest.mark.example_data
def test_a_saved_config_reruns_as_a_new_run():
    train.main(BASE + ["--trainer.max_epochs=1", "--run_dir=first"])
    results = train.main(["--config", "first/config.yaml"])
    assert Path(results["run_dir"]).parent == Path.cwd() / "runs"


@pytest.mark.slow
def test_a_second_run_on_a_directory_in_use_stops_and_a_killed_one_leaves_no_lock():
    """Before: two runs on one --run_dir both 'succeeded', mixing config.yaml, checkpoints and wandb runs."""
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *BASE, "--trainer.max_epochs=1000",
                              "--run_dir=run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=script_env())
    deadline = time.monotonic() + 180
    while not Path("run/checkpoints/last.ckpt").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.1)
    second = run_script("train.py", *BASE, "--run_dir=run", "--ckpt_path=last")
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1].startswith("error: --run_dir ")
    assert f"is in use by a run that is still going (pid {first.pid} on " in second.stderr
    first.send_signal(signal.SIGKILL)  # dies without a word: the kernel drops its lock
    first.wait(timeout=30)
    done = torch.load("run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    assert train.main(BASE + ["--run_dir=run", "--ckpt_path=last", f"--trainer.max_epochs={done + 1}"])  # not stuck
    with pytest.raises(SystemExit, match=r"max_epochs=0 is below the \d+ epochs last.ckpt has done"):
        train.main(BASE + ["--run_dir=run", "--ckpt_path=last", "--trainer.max_epochs=0"])


def test_a_checkpoint_save_that_fails_part_way_leaves_the_previous_one_loadable(monkeypatch: pytest.MonkeyPatch):
    """Before: a save on a full disk left a truncated last.ckpt (measured 409,600 bytes on a 400 kB tmpfs) that
    no resume could load."""
    writer = AtomicCheckpointIO()
    writer.save_checkpoint({"step": torch.tensor(1)}, "checkpoints/last.ckpt")
    real_save = torch.save

    def full_disk(obj: object, f: object) -> None:
        real_save({"step": torch.zeros(10_000)}, f)  # part of the file reaches the disk, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched, pytest.raises(OSError, match="No space left"):
        patched.setattr(torch, "save", full_disk)
        writer.save_checkpoint({"step": torch.tensor(2)}, "checkpoints/last.ckpt")
    assert torch.load("checkpoints/last.ckpt", weights_only=True)["step"] == 1
    assert [p.name for p in Path("checkpoints").iterdir()] == ["last.ckpt"]  # no partial file under any name


def test_the_trainer_writes_checkpoints_through_the_atomic_writer():
    cli = train.build_cli(BASE)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.slow
def test_evaluate_gives_the_end_of_training_metrics_and_writes_nothing():
    trained = train.main(BASE + ["--trainer.max_epochs=2", "--run_dir=run"])
    before = files_of(Path("run"))
    again = evaluate.main(["run", "--json", "metrics.json"])
    assert again["test/acc"] == trained["test/acc"] and again["test/loss"] == trained["test/loss"]
    assert again["checkpoint"] == trained["best_checkpoint"]
    assert json.loads(Path("metrics.json").read_text())["test/acc"] == trained["test/acc"]
    assert files_of(Path("run")) == before
    # Two DDP processes give the same numbers, also for a test split of 271 samples that 2 ranks cannot share
    # equally (Lightning's sampler pads it to 272: one sample counted twice).
    odd = ["--data.test_fraction=0.1506"]
    single = evaluate.main(["run", "--"] + odd)
    result = run_script("evaluate.py", "run", "--json", "ddp.json", "--", "--trainer.devices=2",
                        "--trainer.strategy=ddp", "--trainer.accelerator=cpu", *odd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "padded" not in result.stderr
    ddp = json.loads(Path("ddp.json").read_text())
    assert ddp["test/acc"] == pytest.approx(single["test/acc"], abs=1e-7)
    assert ddp["test/loss"] == pytest.approx(single["test/loss"], rel=1e-6)


@pytest.mark.example_model
@pytest.mark.example_data
def test_evaluate_names_what_is_missing_in_one_line():
    train.main(BASE + ["--trainer.max_epochs=1", "--run_dir=run", "--checkpoint.save_top_k=0"])
    for argv, expected in [(["run"], "has no best-*.ckpt to choose"), (["nowhere"], "nowhere does not exist"),
                           (["run", "--checkpoint", "epoch9"], "epoch9.ckpt does not exist")]:
        with pytest.raises(SystemExit) as stopped:
            evaluate.main(argv)
        assert str(stopped.value.code).startswith("error: ") and expected in str(stopped.value.code)
    assert evaluate.main(["run", "--checkpoint", "last"])["test/acc"] > 0


def test_plain_log_epoch_lines_show_metrics_logged_without_prog_bar(capsys):
    """Before: the tests' model (which logs without prog_bar=True) printed only 'epoch 1/2 done in 0.1s'."""
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[LogLineProgress()])
    trainer.fit(ToyClassifier(), ToyData())
    lines = [line for line in capsys.readouterr().out.splitlines() if " done in " in line]
    assert len(lines) == 2 and all(f"{name} " in lines[-1] for name in ("train/loss", "val/loss", "val/acc"))
