"""Trains tests/toy.py's model and data with the template's resume machinery but without train.py, on one process
or under DDP (Lightning re-runs this script for each rank), for the resume tests:

    python tests/toy_train.py OUT_DIR [--devices 2] [--max_epochs 3] [--save_at_step 15] [--ckpt_path CKPT]
    python tests/toy_train.py OUT_DIR --sigterm_at_step 15     # rank 0 sends itself SIGTERM after that step
    python tests/toy_train.py OUT_DIR --devices 2 --rank_draws  # the ranks' random streams differ
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.callbacks import Callback, ModelCheckpoint  # noqa: E402
from toy import ToyClassifier, ToyData  # noqa: E402

from support.run_dir.resumable import ResumableTrainingData  # noqa: E402
from support.run_dir.writer import AtomicCheckpointIO  # noqa: E402
from support.training.callbacks import ResumeRNGState, SignalsAtBatchBoundary, stopped_by_signal  # noqa: E402


class SaveAtStep(Callback):
    """Saves a checkpoint between two batches, like RequeueAtBatchBoundary does when Slurm's signal comes."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class SigtermAtStep(Callback):
    """Rank 0 sends itself SIGTERM after a step, as `kill PID` (or scancel) would; other ranks get no signal."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 0:
            (Path(trainer.default_root_dir) / "sigterm_sent_at").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGTERM)


class RankDependentDraws(Callback):
    """Draws rank + 1 numbers from torch's generator after each step, so that the ranks' random streams (and the
    dropout masks drawn from them) differ, as they do wherever ranks draw differently (a GPU each, uneven work)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        torch.rand(trainer.global_rank + 1)


def fit(out: str, devices: int = 1, max_epochs: int = 3, save_at_step: int | None = None,
        ckpt_path: str | None = None, resumable: bool = True, sigterm_at_step: int | None = None,
        rank_draws: bool = False) -> pl.Trainer:
    pl.seed_everything(0, workers=True, verbose=False)
    callbacks: list[Callback] = [ResumeRNGState(), ModelCheckpoint(dirpath=out, save_last=True),
                                 SignalsAtBatchBoundary(out)]
    callbacks += [ResumableTrainingData()] if resumable else []
    callbacks += [SaveAtStep(save_at_step, f"{out}/mid.ckpt")] if save_at_step is not None else []
    callbacks += [SigtermAtStep(sigterm_at_step)] if sigterm_at_step is not None else []
    callbacks += [RankDependentDraws()] if rank_draws else []
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=devices,
                         strategy="ddp" if devices > 1 else "auto", callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                         plugins=[AtomicCheckpointIO()])  # as train.py's Trainer writes checkpoints
    trainer.fit(ToyClassifier(), ToyData(), ckpt_path=ckpt_path)
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max_epochs", type=int, default=3)
    parser.add_argument("--save_at_step", type=int)
    parser.add_argument("--ckpt_path")
    parser.add_argument("--sigterm_at_step", type=int)
    parser.add_argument("--rank_draws", action="store_true", help="make the ranks' random streams differ")
    args = parser.parse_args()
    with stopped_by_signal():
        fit(args.out, args.devices, args.max_epochs, args.save_at_step, args.ckpt_path,
            sigterm_at_step=args.sigterm_at_step, rank_draws=args.rank_draws)
