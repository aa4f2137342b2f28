"""The machinery train.py wires in: wandb logging that falls back to offline, progress lines for log files, exact
resume (random states), requeue at a batch boundary, run directories, the git commit, one-line errors.

None of it names the example model or data; train.py's first lines choose those.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, ProgressBar, TQDMProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from support.atomic import write_atomic
from support.divergence import StopOnNonFinite
from support.errors import SettingError
from support.lazy_layers import MaterializeLazyLayers
from support.resumable import ExactEpochMeans, ResumableTrainingData
from support.rng_state import ResumeRNGState
from support.run_directory import CONFIG_FILE, record_config, rerunnable
from support.runs import wandb_run_id
from support.search_records import RECORD_ENV
from support.search_report import SearchReport
from support.wandb_access import choose_mode, default_entity, default_project, plain_reason

REPO_DIR = Path(__file__).resolve().parent.parent


@rank_zero_only
def warn(message: str) -> None:
    """One plain line on stderr, from rank 0 only: what a researcher reads in a SLURM log (Python's warnings add the
    file, line and source line, which say nothing to them)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class FallbackWandbLogger(WandbLogger):
    """A WandbLogger that falls back to offline logging, with one warning, when wandb cannot start online."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Private: WandbLogger keeps wandb.init's arguments in _wandb_init and the run in _experiment; the fallback
        # changes the mode and starts again. tests/test_private_names.py fails clearly if an upgrade renames them.
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb: passing it only prints a warning

    @property
    @rank_zero_experiment
    def experiment(self):  # type: ignore[override]
        import wandb

        try:
            return super().experiment
        except Exception as err:  # wandb.Error, or the service's own errors (timeouts, refused credentials)
            if self._wandb_init.get("mode") == "offline":
                raise
            warn(f"wandb could not start online ({type(err).__name__}: {plain_reason(err)}); logging "
                 f"offline instead. Upload later with `wandb sync {self.save_dir}/wandb/offline-run-*`.")
            # The failed online run stays registered in wandb's service, which then refuses the same run id
            # ("run ID ... is in use"): stop the service, so the offline run starts a fresh one.
            wandb.teardown()
            self._wandb_init["mode"] = "offline"
            self._experiment = None
            return super().experiment


@dataclass
class WandbOptions:
    """wandb settings (entity and project also follow WANDB_ENTITY / WANDB_PROJECT)."""

    project: str = field(default_factory=default_project)  # WANDB_PROJECT, else project.toml's, else the directory's
    entity: str | None = field(default_factory=default_entity)  # WANDB_ENTITY, else project.toml's, else wandb's
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None  # runs shown together (an offline search puts its runs in the search's group)
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: WANDB_MODE, else online iff logged in
    init_timeout: float = 60.0  # seconds to wait for the server before falling back to offline


def wandb_logger(options: WandbOptions, run_dir: Path) -> FallbackWandbLogger:
    """The run's wandb logger: online when there are credentials and the server answers, else offline (one warning
    saying why); the run id kept in the run directory, so a resumed run continues the same wandb run."""
    if os.environ.get("WANDB_MODE") == "":  # wandb's own settings reject an empty one ("1 validation error")
        os.environ.pop("WANDB_MODE")
    mode, problem = choose_mode(options.mode, options.init_timeout)
    if os.environ.get("WANDB_RUN_ID") and not os.environ.get("WANDB_SWEEP_ID"):  # a sweep agent's is meant
        warn(f"WANDB_RUN_ID={os.environ['WANDB_RUN_ID']} is set outside a wandb sweep: this run logs into that wandb "
             "run, as does every other run started with it; unset WANDB_RUN_ID unless that is meant")
    if problem:
        warn(f"wandb: {problem}; logging offline into {run_dir}/wandb instead. Upload later with "
             f"`wandb sync {run_dir}/wandb/offline-run-*`.")
    return FallbackWandbLogger(
        project=options.project, entity=options.entity, name=options.name or run_dir.name, tags=options.tags or None,
        group=options.group,
        save_dir=str(run_dir), id=wandb_run_id(run_dir), resume="allow", mode=mode,
        settings=init_settings(options.init_timeout))


def finish_wandb(exit_code: int | None = None) -> None:
    """Closes this process's wandb run, if any. When wandb's service has already gone (Slurm's scancel or requeue
    signals every process of the job step at once: wandb-core may end before train.py has saved), one line says so
    instead of a traceback that would hide how the run ended; what was logged is in the run's wandb/ directory."""
    import wandb

    if wandb.run is None:
        return
    directory = wandb.run.dir
    try:
        wandb.finish(exit_code=exit_code)
    except Exception as err:  # ConnectionResetError, BrokenPipeError: the service process is gone
        warn(f"wandb could not close the run ({type(err).__name__}: {plain_reason(err)}); what it logged is in "
             f"{Path(directory).parent}")
        wandb.run = None  # the next main() in this process starts its own run


def init_settings(init_timeout: float) -> Any:
    import wandb

    # git_root: wandb records the commit of this repository, not of the run directory it writes into.
    return wandb.Settings(init_timeout=init_timeout, silent=True, git_root=str(REPO_DIR))


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
            self._print(trainer, pl_module, f"epoch {trainer.current_epoch} batch {batch_idx + 1}/"
                                            f"{self.total_train_batches}")

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
        # Collective under DDP; rank 0 writes, through the Trainer's AtomicCheckpointIO (support/run_directory.py),
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


def machinery_callbacks(checkpoint_dir: str, monitors: dict[str, str | None], progress: bool) -> list[Callback]:
    """What train.py adds to the Trainer besides Lightning's own callbacks: random states and data position in every
    checkpoint, signals acted on at a batch boundary, last.ckpt at every validation, an early check of the monitored
    metrics, lazy layers given their shapes before DDP wraps the model, a stop at the first non-finite loss or
    metric, and progress for a terminal (Lightning's bar) or a log file (plain lines)."""
    callbacks = [ResumeRNGState(), SignalsAtBatchBoundary(checkpoint_dir), ResumableTrainingData(), ExactEpochMeans(),
                 LatestCheckpoint(checkpoint_dir), MonitoredMetricCheck(monitors), MaterializeLazyLayers(),
                 StopOnNonFinite([*monitors.values()])]
    if record := os.environ.get(RECORD_ENV):  # a run of an offline search (support/search_worker.py)
        callbacks.append(SearchReport(Path(record)))
    if progress:
        callbacks.append(TQDMProgressBar() if sys.stdout.isatty() else LogLineProgress())
    return callbacks


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


class SaveConfigAndLog(SaveConfigCallback):
    """Records the run's settings in its directory (config.yaml once; a resume that changed them adds
    config.resume-N.yaml, see support/run_directory.py) and in the logger, with the seed and the git commit, so every
    wandb run says exactly what produced it. Lightning's own saving (save_to_log_dir) is off: it overwrote
    config.yaml at every start, so a failed resume with the wrong settings destroyed the run's only record."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:  # rank 0 only
        run_dir = Path(trainer.default_root_dir)
        dumped = self.parser.dump(self.config, skip_none=False)
        resumed_from = self.config.get("ckpt_path")
        written = record_config(run_dir, dumped, f"resumed from {resumed_from}" if resumed_from else
                                "started again in this directory")
        if isinstance(trainer.logger, WandbLogger):
            id_file = run_dir / "wandb_id"
            if not id_file.exists():
                write_atomic(id_file, trainer.logger.version + "\n")
        if trainer.logger is not None:
            extra = {"git_commit": git_commit(), "run_dir": str(run_dir)}
            if written is not None and written.name != CONFIG_FILE:  # the wandb config says what the resume changed
                extra["resumed_with"] = written.name
            trainer.logger.log_hyperparams({**rerunnable(dumped), **extra})


class _Parsed(Exception):  # noqa: N818 (not an error: how the parse-only CLI hands its config back)
    def __init__(self, config: Any) -> None:
        self.config = config


def parse_only(cli_class: type[LightningCLI], args: Any, **setup: Any) -> Any:
    """The config that `cli_class(args=args, **setup)` would run with, after all of its checks, the constructors'
    own included (dropout 1.5, batch size -64), without training, data or memory: LightningCLI's public
    parse_arguments hook hands the config back after the model, DataModule and callbacks were built on the meta
    device (their constructors load no data by Lightning's convention: that is prepare_data's and setup's job)."""

    class ParseOnly(cli_class):  # type: ignore[valid-type, misc]
        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            super().parse_arguments(parser, args)
            with torch.device("meta"):
                parser.instantiate_classes(self.config)
            raise _Parsed(self.config)

    try:
        ParseOnly(args=args, **setup)
    except _Parsed as parsed:
        return parsed.config
    raise AssertionError("unreachable: parse_arguments always raises _Parsed")


def quiet_known_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # in-memory data needs none
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")  # Lightning's, not yours
