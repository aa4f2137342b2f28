"""CKAMonitor in validation: heatmaps from a real training run, reference checkpoints, clear errors."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
from conftest import QUICK, run_script
from pytorch_lightning import Trainer
from wandb_records import wait_for_logged

import train
from datamodule import DataModule
from model import CKAMonitor, ImageClassifier


def test_training_with_cka_saves_and_logs_heatmaps():
    results = train.main(QUICK + ["--trainer.max_epochs=5"])  # by default every 5th epoch
    run_dir = Path(results["run_dir"])
    pngs = sorted(p.name for p in (run_dir / "cka").iterdir())
    assert pngs == ["self-epoch004.png"]
    assert (run_dir / "cka" / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wandb_file = glob.glob(str(run_dir / "wandb/offline-run-*/run-*.wandb"))[0]
    logged, _ = wait_for_logged(wandb_file, {"cka/self/_type"})  # a wandb image is logged as a nested record
    assert "cka/self/_type" in logged
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["class_paths"] == {"model": "model.ImageClassifier", "datamodule": "datamodule.DataModule"}


def validate_with(callback: CKAMonitor, model: ImageClassifier, tmp_path: Path) -> Trainer:
    trainer = Trainer(callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.validate(model, datamodule=DataModule(batch_size=50))  # 270 samples: a ragged last batch of 20
    return trainer


def test_reference_checkpoint_equal_to_the_model_gives_the_self_matrix(tmp_path: Path):
    torch.manual_seed(0)
    model = ImageClassifier()
    trainer = Trainer(logger=False, max_steps=0, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "ref.ckpt")
    callback = CKAMonitor(reference_checkpoint=str(tmp_path / "ref.ckpt"))
    validate_with(callback, model, tmp_path)
    self_matrix, cross = callback.self_cka.compute(), callback.cross_cka.compute()
    assert torch.allclose(cross, self_matrix, atol=1e-10)
    assert torch.allclose(torch.diagonal(self_matrix), torch.ones(4, dtype=self_matrix.dtype), atol=1e-10)
    assert (tmp_path / "cka" / "reference-epoch000.png").is_file()


def test_cka_can_be_turned_off_limited_and_tiny_batches_are_skipped(tmp_path: Path):
    validate_with(CKAMonitor(every_n_epochs=0), ImageClassifier(), tmp_path)
    assert not (tmp_path / "cka").exists()
    limited = CKAMonitor(max_batches=2)
    validate_with(limited, ImageClassifier(), tmp_path)
    assert limited.batches == 2 and not limited.recorders  # hooks removed after the second batch
    trainer = Trainer(callbacks=[CKAMonitor()], logger=False, enable_progress_bar=False, accelerator="cpu",
                      default_root_dir=str(tmp_path), enable_model_summary=False)
    with pytest.warns(UserWarning, match="skipped 1 validation batch"):
        trainer.validate(ImageClassifier(), datamodule=DataModule(batch_size=89))  # 270 = 3 * 89 + 3
    assert (tmp_path / "cka" / "self-epoch000.png").is_file()


@pytest.mark.parametrize("callback, message", [
    (CKAMonitor(layers=["blocks.7"]), "unknown layer name"),
    (CKAMonitor(layers=["blocks"]), "container"),
    (CKAMonitor(reference_checkpoint="nowhere.ckpt"), "nowhere.ckpt"),
])
def test_bad_cka_settings_fail_before_training(callback: CKAMonitor, message: str, tmp_path: Path):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        validate_with(callback, ImageClassifier(), tmp_path)


def test_command_line_compares_two_trained_checkpoints(tmp_path: Path):
    for run, seed in (("a", "1"), ("b", "2")):
        train.main(QUICK + ["--trainer.max_epochs=2", f"--run_dir={run}", f"--seed_everything={seed}"])
    result = run_script("cka.py", "a/checkpoints/last.ckpt", "b/checkpoints/last.ckpt", "--out", "ab.png")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [[float(v) for v in line.split()] for line in result.stdout.splitlines()[1:]]
    assert len(rows) == 4 and all(len(row) == 4 and all(-0.1 < v <= 1.0 + 1e-9 for v in row) for row in rows)
    assert Path("ab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    same = run_script("cka.py", "a/checkpoints/last.ckpt", "a/checkpoints/last.ckpt", "--out", "aa.png")
    diagonal = [float(line.split()[i]) for i, line in enumerate(same.stdout.splitlines()[1:])]
    assert diagonal == pytest.approx([1.0] * 4, abs=1e-9)  # a model compared with itself
    missing = run_script("cka.py", "a/checkpoints/last.ckpt", "nowhere.ckpt")
    assert missing.returncode != 0 and missing.stderr.strip() == "error: checkpoint nowhere.ckpt does not exist"
