"""The callbacks train.py adds to every Trainer (`machinery_callbacks`): progress lines for log files, signals acted
on at a batch boundary (requeue, SIGTERM), an early check that the monitored metrics are logged, last.ckpt at every
validation, plus the ones of the other concerns (random states and data position for exact resume, lazy layers,
the stop at a non-finite value, an offline search's report).

None of it names the example model or data; train.py's first lines choose those.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, ProgressBar, TQDMProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

from support.errors import SettingError, warn
from support.run_dir.resumable import ExactEpochMeans, ResumableTrainingData
from support.run_dir.rng_state import ResumeRNGState
from support.search.records import RECORD_ENV
from support.search.report import SearchReport
from support.training.divergence import StopOnNonFinite
from support.training.lazy_layers import MaterializeLazyLayers
from support.training.optimizers import OptimizerChecks
from support.training.run_record import RunRecord


class LogLineProgress(ProgressBar):
    """Progress for log files (SLURM output, pipes): a plain line every `interval` seconds and at each epoch end,
    instead of a stream of carriage returns. Mid-epoch lines show the progress-bar metrics; epoch lines show every
    metric the model logged (a model that logs without prog_bar=True printed only "epoch 1/2 done in 0.1s").
    Reads metrics only when it prints, so it adds no per-step sync."""

    def __init__(self, interval: float = 30.0) -> None:
        super().__init__()
        self.interval, self.enabled, self.last_print, self.epoch_start = interval, True, 0.0, 0.0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _print(self, trainer: Trainer, pl_module: LightningModule, what: str, every_metric: bool = False) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        metrics = dict(self.get_metrics(trainer, pl_module))
        if every_metric:
            metrics.update({k: float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v
                            for k, v in trainer.callback_metrics.items()})
        metrics.pop("v_num", None)
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(metrics.items())]
        print(" | ".join([what, *parts]), flush=True)
        self.last_print = time.monotonic()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A run resumed mid-epoch gets no on_train_epoch_start for that epoch: its first epoch line timed the epoch
        # from 0.0, i.e. from the machine's boot (7775.2s for a sub-second epoch); now from the resume.
        self.epoch_start = time.monotonic()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch_start = time.monotonic()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if time.monotonic() - self.last_print >= self.interval:
            total = self.total_train_batches  # a stream has no length: Lightning counts it as inf
            self._print(trainer, pl_module, f"epoch {trainer.current_epoch} batch {batch_idx + 1}"
                                            + (f"/{total}" if total != float("inf") else ""))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        seconds = time.monotonic() - self.epoch_start
        done = f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} done in {seconds:.1f}s"
        self._print(trainer, pl_module, done, every_metric=True)


class SignalsAtBatchBoundary(Callback):
    """Slurm's requeue signal (SIGUSR1) and SIGTERM (scancel, a user's kill, a node going down), acted on between
    two training batches, where weights, loop position, data position and RNG states agree, so the run continues
    exactly from the checkpoint it saves:

    - SIGUSR1 (only under Slurm with auto-requeue, where Lightning installed its handler): Lightning's handler saves
      the hpc checkpoint and requeues the job; run at once, it could save halfway through an optimizer step. In a
      wandb sweep the run is also marked as preempting, so the sweep hands it to an agent again.
    - SIGTERM: last.ckpt is saved in `checkpoint_dir` (atomically, by the Trainer's checkpoint writer) and the run stops
      with exit status 143 (128 + 15; see `stopped_by_signal`). Lightning alone stops with status 0, so a grid row
      or a script that checks the status took a stopped run for a finished one.

    Under DDP all ranks act at the same batch, as saving is collective: they agree with one all-reduce and a host
    sync (~0.2 ms on CPU) every 10th batch, so a signal waits at most 9 batches. Lightning restores the original
    handlers on teardown."""

    def __init__(self, checkpoint_dir: str | None = None) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.pending: dict[int, Any] = {}  # signal number -> frame, until acted on
        self.handlers: dict[int, Any] = {}  # the handlers replaced while training

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.handlers, self.pending = {}, {}
        if hasattr(signal, "SIGUSR1") and callable(requeue := signal.getsignal(signal.SIGUSR1)):
            self.handlers[signal.SIGUSR1] = requeue  # installed by Lightning under Slurm auto-requeue
        if self.checkpoint_dir is not None:
            self.handlers[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)
        for signum in self.handlers:
            signal.signal(signum, lambda got, frame: self.pending.setdefault(got, frame))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.handlers:
            return
        if trainer.world_size > 1:
            if batch_idx % 10:
                return
            got = [s for s in self.handlers if trainer.strategy.reduce_boolean_decision(s in self.pending, all=False)]
        else:
            got = [s for s in self.handlers if s in self.pending]
        if signal.SIGTERM in got:
            self.pending.clear()
            self._save_last(trainer)
            raise SIGTERMException()
        if hasattr(signal, "SIGUSR1") and signal.SIGUSR1 in got:
            frame = self.pending.pop(signal.SIGUSR1, None)
            if os.environ.get("WANDB_SWEEP_ID") and trainer.is_global_zero:
                import wandb

                if wandb.run is not None:
                    wandb.run.mark_preempting()
            self.handlers[signal.SIGUSR1](signal.SIGUSR1, frame)

    def _save_last(self, trainer: Trainer) -> None:
        path = Path(self.checkpoint_dir) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        # Collective under DDP; rank 0 writes, through the Trainer's AtomicCheckpointIO (support/run_dir/writer.py),
        # so a kill during the save leaves the previous last.ckpt whole.
        trainer.save_checkpoint(path)
        warn(f"stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}; saved {path}: "
             "resume with --ckpt_path last")


@contextmanager
def stopped_by_signal() -> Iterator[None]:
    """Turns Lightning's SIGTERMException (a SystemExit without a code: exit status 0) into exit status 143."""
    try:
        yield
    except SIGTERMException:
        raise SystemExit(128 + signal.SIGTERM) from None


class MonitoredMetricCheck(Callback):
    """Stops the run with one line at its first validation (the sanity check, if any) when a monitored metric was not
    logged there. Without it ModelCheckpoint fails only at the end of the first training epoch, hours in."""

    def __init__(self, monitors: dict[str, str | None]) -> None:
        self.monitors = {option: metric for option, metric in monitors.items() if metric}  # --option -> metric
        self.checked = False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.checked:
            return
        self.checked = True
        logged = sorted(trainer.callback_metrics)
        for option, metric in self.monitors.items():
            if metric not in logged:
                raise SettingError(f"{option}={metric} is never logged: validation logged "
                                   f"{', '.join(logged) or 'nothing'}; set MONITOR in train.py (or the option) to one "
                                   "of them, or log it with self.log")


class LatestCheckpoint(ModelCheckpoint):
    """Rewrites DIRPATH/last.ckpt at every validation (or epoch end without one), whatever the monitored metric did.
    Lightning 2.6's `save_last` rewrites last.ckpt only when it also saved a top-k checkpoint, so with a metric that
    stops improving last.ckpt lagged behind the run (measured: a run stopped at step 60 resumed from step 22) and a
    resumed run repeated work."""

    def __init__(self, dirpath: str) -> None:
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         enable_version_counter=False)

    @staticmethod
    def after_the_others(trainer: Trainer) -> None:
        """Moves this callback to the end of the trainer's: Lightning runs checkpoint callbacks last in the order
        given, and LightningCLI adds --checkpoint's after ours, so last.ckpt held the best checkpoint's state of the
        epoch before; a run resumed from it lost track of its best file (two best-*.ckpt left, measured)."""
        latest = [callback for callback in trainer.callbacks if isinstance(callback, LatestCheckpoint)]
        trainer.callbacks = [callback for callback in trainer.callbacks if callback not in latest] + latest


class MovedRunCheckpoints(Callback):
    """A run directory moved or copied (a grid resumed where it is now) tests its own best checkpoint: Lightning
    restores ModelCheckpoint's best_model_path as the old directory's absolute path ("The dirpath has changed"), so a
    copied row's test read the original's file (measured) and a moved row's would find none. Rebased here to the file
    of that name in the checkpoint's directory now, when it is there: at the fit's start, and at its end too (some
    strategies restore after on_fit_start; a run resumed at its last epoch
    trains nothing and gets no on_train_start)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_fit_end(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.best_model_path or not callback.dirpath:
                continue
            best, here = Path(callback.best_model_path), Path(callback.dirpath)
            if best.parent != here and (here / best.name).is_file():
                callback.best_model_path = str(here / best.name)


def machinery_callbacks(checkpoint_dir: str, monitors: dict[str, str | None], progress: bool,
                        best: tuple[str | None, str] | None = None) -> list[Callback]:
    """What train.py adds to the Trainer besides Lightning's own callbacks: random states and data position in every
    checkpoint, signals acted on at a batch boundary, last.ckpt at every validation, an early check of the monitored
    metrics, lazy layers given their shapes before DDP wraps the model, a stop at the first non-finite loss or
    metric, the run's metrics and cost in its directory (`best`: the metric and mode that rank it; None for a run
    that records nothing, such as evaluate.py's), and progress for a terminal (Lightning's bar) or a log file."""
    callbacks = [ResumeRNGState(), SignalsAtBatchBoundary(checkpoint_dir), ResumableTrainingData(), ExactEpochMeans(),
                 LatestCheckpoint(checkpoint_dir), MonitoredMetricCheck(monitors), MaterializeLazyLayers(),
                 OptimizerChecks(), StopOnNonFinite([*monitors.values()]), MovedRunCheckpoints(),
                 *([RunRecord(*best)] if best else [])]
    if record := os.environ.get(RECORD_ENV):  # a run of an offline search (support/search/worker.py)
        callbacks.append(SearchReport(Path(record)))
    if progress:
        callbacks.append(TQDMProgressBar() if sys.stdout.isatty() else LogLineProgress())
    return callbacks
