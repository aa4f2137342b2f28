"""Train the model: wires model.py and datamodule.py to a Lightning Trainer and a wandb logger (LightningCLI).

    python train.py                                          # train, test the best checkpoint, print the metrics
    python train.py --model.hidden_dim=64 --data.batch_size=32 --trainer.max_epochs=3 --seed_everything=1
    python train.py --optimizer.lr=3e-3 --trainer.gradient_clip_val=1.0 --trainer.precision=bf16-mixed
    python train.py --print_config > my.yaml && python train.py --config my.yaml
    python train.py --run_dir runs/my-run --ckpt_path last   # resume a stopped run from its last checkpoint
    python train.py --help                                   # every option, with its default

Every run writes to its own directory (default runs/<time>-<random>; under SLURM runs/slurm-<job>[_<task>]):
the saved config.yaml, checkpoints/ (best and last) and the wandb run. wandb logs online when you have
credentials (`wandb login` or WANDB_API_KEY), offline otherwise (upload later with `wandb sync DIR/wandb/...`);
WANDB_MODE or --wandb.mode override that. It never prompts and never hangs on a missing network.

From another script: `import train; train.main(["--trainer.max_epochs=2"])` or
`train.main({"trainer": {"max_epochs": 2}})` trains and returns the final metrics as a dict.
"""

from __future__ import annotations

import netrc
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import torch
from jsonargparse import ArgumentError
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    TQDMProgressBar,
)
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_warn

from datamodule import DataModule, DownloadError
from model import CKAMonitor, ImageClassifier

REPO_DIR = Path(__file__).resolve().parent
RUN_DIR_ENV = "TRAIN_RUN_DIR"  # hands the run directory to DDP worker processes, which re-run this script


@dataclass
class WandbOptions:
    """wandb settings (entity and project also follow WANDB_ENTITY / WANDB_PROJECT)."""

    project: str = field(default_factory=lambda: os.environ.get("WANDB_PROJECT", "mlmodeldev"))
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: WANDB_MODE, else online iff logged in
    init_timeout: float = 60.0  # seconds to wait for the server before falling back to offline


def has_wandb_credentials() -> bool:
    """True when wandb would find an API key without prompting (environment or ~/.netrc), as wandb looks."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_mode(requested: str) -> str:
    mode = requested if requested != "auto" else os.environ.get("WANDB_MODE") or "auto"
    if mode == "auto":
        return "online" if has_wandb_credentials() else "offline"
    if mode == "online" and not has_wandb_credentials():  # wandb would prompt for a key, forever in a terminal
        raise ValueError("wandb mode 'online' needs credentials: run `wandb login` or set WANDB_API_KEY, "
                         "or use --wandb.mode=offline")
    return mode


class FallbackWandbLogger(WandbLogger):
    """A WandbLogger that falls back to offline logging, with one warning, when the server cannot be reached."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb: passing it only prints a warning

    @property
    @rank_zero_experiment
    def experiment(self):  # type: ignore[override]
        import wandb

        try:
            return super().experiment
        except wandb.Error as err:
            if self._wandb_init.get("mode") == "offline":
                raise
            rank_zero_warn(f"wandb could not start online ({type(err).__name__}: {err}); logging offline instead. "
                           f"Upload later with `wandb sync {self.save_dir}/wandb/offline-run-*`.")
            self._wandb_init["mode"] = "offline"
            self._experiment = None
            return super().experiment


class LogLineProgress(ProgressBar):
    """Progress for log files (SLURM output, pipes): a plain line every `interval` seconds and at each epoch end,
    instead of a stream of carriage returns. Reads metrics only when it prints, so it adds no per-step sync."""

    def __init__(self, interval: float = 30.0) -> None:
        super().__init__()
        self.interval, self.enabled, self.last_print, self.epoch_start = interval, True, 0.0, 0.0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _print(self, trainer: Trainer, pl_module: LightningModule, what: str) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(metrics.items())]
        print(" | ".join([what, *parts]), flush=True)
        self.last_print = time.monotonic()

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
        self._print(trainer, pl_module, done)


class ResumeRNGState(Callback):
    """Saves the random number generators' states in every checkpoint and puts them back when training resumes,
    so a resumed run draws the same dropout masks and loader seeds as an uninterrupted one (Lightning restores
    weights, optimizer and loops, but not these). Applied when training starts, after the sanity check; the
    DataModule's loaders have their own generators, so only training steps draw from these."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # as tensors and numbers: weights_only loads
        numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
        state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.pending is None:
            return
        torch.set_rng_state(self.pending["torch"])
        kind, keys, pos, has_gauss, gauss = self.pending["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(self.pending["python"])
        if "cuda" in self.pending and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.pending["cuda"])
        self.pending = None


class RequeueAtBatchBoundary(Callback):
    """SLURM's requeue signal (SIGUSR1), handled between two training batches. Lightning's handler saves the
    hpc checkpoint and requeues the job at once, possibly halfway through an optimizer step; run at a batch
    boundary instead, it saves weights, loop position, data position and RNG states that agree, so the
    requeued run continues exactly. In a wandb sweep the run is also marked as preempting, so the sweep hands
    it to an agent again instead of counting it as crashed. Lightning restores the original handler on teardown."""

    def __init__(self) -> None:
        self.pending: tuple[Any, Any] | None = None
        self.lightning_handler: Any = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.lightning_handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if callable(self.lightning_handler):
            signal.signal(signal.SIGUSR1, lambda signum, frame: setattr(self, "pending", (signum, frame)))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not callable(self.lightning_handler):
            return  # not under Slurm with auto-requeue: Lightning installed no handler
        pending = self.pending is not None
        if trainer.world_size > 1:  # DDP: all ranks act at the same batch, as saving is collective. Agreeing costs an
            if batch_idx % 10:  # all-reduce and a host sync (~0.2 ms on CPU), so only every 10th batch
                return
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if not pending:
            return
        signum, frame = self.pending or (signal.SIGUSR1, None)
        self.pending = None
        if os.environ.get("WANDB_SWEEP_ID") and trainer.is_global_zero:
            import wandb

            if wandb.run is not None:
                wandb.run.mark_preempting()
        self.lightning_handler(signum, frame)


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
    """Saves config.yaml in the run directory (Lightning's default) and records it, the seed and the git commit
    in the logger, so every wandb run says exactly what produced it."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, WandbLogger):
            id_file = Path(trainer.default_root_dir) / "wandb_id"
            if not id_file.exists():
                tmp = id_file.with_name(f".wandb_id.{os.getpid()}")
                tmp.write_text(trainer.logger.version + "\n")
                os.replace(tmp, id_file)
        if trainer.logger is not None:
            extra = {"git_commit": git_commit(), "run_dir": trainer.default_root_dir}
            trainer.logger.log_hyperparams({**self.config.as_dict(), **extra})


def default_run_name() -> str:
    sweep, sweep_run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep and sweep_run:  # started by a wandb sweep agent: one directory per sweep run, found again on resume
        return f"sweep-{sweep}-{sweep_run}"
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if slurm_job and SLURMEnvironment.job_name() not in ("bash", "interactive"):  # a batch job, not srun --pty
        array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        # Stable across requeues of the same job, so a requeued task resumes its own checkpoints.
        return f"slurm-{array_job}_{task}" if array_job and task else f"slurm-{slurm_job}"
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of a run directory: made once and kept in the directory (SaveConfigAndLog writes it when
    training starts), so a resumed or requeued run continues the same wandb run, while two clusters' job 123
    never share one. A sweep agent's run id (WANDB_RUN_ID) wins: the sweep knows its run by that id."""
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    id_file = run_dir / "wandb_id"
    if id_file.exists():
        return id_file.read_text().strip()
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)[:50] + "-" + uuid.uuid4().hex[:8]


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Directory of this run (default: runs/<time>-<random>, or runs/slurm-<job> under "
                                 "SLURM). Reusing one continues it: pair with --ckpt_path last.")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Checkpoint to resume training from; 'last' means the run's last.ckpt.")
        parser.add_class_arguments(WandbOptions, "wandb")
        # The optimizer lives in the CLI, not in the model: --optimizer=SGD --optimizer.lr=0.1 --optimizer.momentum=.9
        parser.add_optimizer_args((torch.optim.Optimizer,))
        parser.set_defaults({"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}}})
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        # Lightning's own callbacks, each configurable from the command line (--early_stopping.patience=10).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/loss", "checkpoint.save_last": True,
                             "checkpoint.filename": "best-epoch{epoch:03d}-step{step}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        # Checked after validation only, so a run stopped mid-epoch (--trainer.max_steps) has nothing to miss.
        parser.set_defaults({"early_stopping.monitor": "val/loss", "early_stopping.patience": 8,
                             "early_stopping.check_on_train_epoch_end": False})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(CKAMonitor, "cka")  # layer similarity heatmaps; --cka.every_n_epochs=0: off

    def before_instantiate_classes(self) -> None:
        # Kept out of the saved config on purpose: re-running a saved config.yaml starts a new run.
        config = self.config
        chosen = config.run_dir or config.trainer.default_root_dir or os.environ.get(RUN_DIR_ENV)
        self.run_dir = Path(chosen or Path("runs") / default_run_name()).resolve()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        callbacks += [ResumeRNGState(), RequeueAtBatchBoundary()]
        for callback in callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(self.run_dir / "checkpoints")
        if trainer_config.get("enable_progress_bar", True) is not False:
            # A terminal gets Lightning's bar; log files get plain lines.
            callbacks.append(TQDMProgressBar() if sys.stdout.isatty() else LogLineProgress())
        if trainer_config.get("logger") in (None, True):  # not set by the user: our default wandb logger
            options = self.config.wandb
            kwargs["logger"] = FallbackWandbLogger(
                project=options.project, entity=options.entity, name=options.name or self.run_dir.name,
                tags=options.tags or None, save_dir=str(self.run_dir), id=wandb_run_id(self.run_dir),
                resume="allow", mode=wandb_mode(options.mode), settings=_wandb_settings(options.init_timeout))
        kwargs["default_root_dir"] = str(self.run_dir)
        trainer = self._instantiate_trainer({**trainer_config, **kwargs}, callbacks)
        tasks, devices = int(os.environ.get("SLURM_NTASKS", 1)), trainer.num_devices * trainer.num_nodes
        if SLURMEnvironment.detect() and tasks != devices:  # each task would train alone, or DDP would hang
            raise ValueError(f"SLURM started {tasks} tasks but the Trainer runs {trainer.num_devices} device(s) x "
                             f"{trainer.num_nodes} node(s); Lightning needs one task per device: set --ntasks-per-node="
                             f"{trainer.num_devices} --nodes={trainer.num_nodes} (or --trainer.devices)")
        return trainer


def _wandb_settings(init_timeout: float) -> Any:
    import wandb

    # git_root: wandb records the commit of this repository, not of the run directory it writes into.
    return wandb.Settings(init_timeout=init_timeout, silent=True, git_root=str(REPO_DIR))


# What both the training CLI and the parse-only CLI are built from, so the two can never disagree.
CLI_SETUP: dict[str, Any] = dict(
    model_class=ImageClassifier, datamodule_class=DataModule, run=False, seed_everything_default=42,
    trainer_defaults={"max_epochs": 40, "log_every_n_steps": 10},
    parser_kwargs={"exit_on_error": False, "description": "Train the template's model (see train.py's docstring)."})


def build_cli(args: list[str] | dict[str, Any] | None = None) -> TrainCLI:
    """Parse the settings and build model, data and trainer; raises ArgumentError/ValueError on bad settings."""
    return TrainCLI(args=args, save_config_callback=SaveConfigAndLog, save_config_kwargs={"overwrite": True},
                    **CLI_SETUP)


class _ParseOnlyCLI(TrainCLI):
    """Parses and validates like train.py, but builds nothing and sets no seed (for sweep.py's key checks)."""

    def _set_seed(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parse_config(args: list[str] | dict[str, Any]) -> Any:
    """The config (a jsonargparse Namespace) that train.py would run with these arguments, without building
    the model, data or trainer. Raises ArgumentError naming the key when an argument is unknown or invalid."""
    return _ParseOnlyCLI(args=args, **CLI_SETUP).config


def fit_and_test(cli: TrainCLI) -> dict[str, Any]:
    """Train, then test the best checkpoint; returns the final metrics."""
    trainer, config = cli.trainer, cli.config
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=config.ckpt_path)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    tested = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None, verbose=False)
    results: dict[str, Any] = {k: float(v) for k, v in tested[0].items()} if tested else {}
    results.update(run_dir=str(cli.run_dir), best_checkpoint=best)
    if trainer.is_global_zero:
        print(f"run directory:   {cli.run_dir}\nbest checkpoint: {best or '(none)'}")
        print("final metrics:   " + "  ".join(f"{k}={v:.4f}" for k, v in results.items() if isinstance(v, float)))
    return results


def one_line(err: BaseException) -> str:
    """jsonargparse errors span many lines; keep the key path, what was expected and the value given."""
    lines = [line.strip(" -") for line in str(err).splitlines() if line.strip(" -")]
    keys = re.findall(r'Parser key "([^"]+)"', str(err))
    if len(keys) > 1:  # a nested key such as optimizer.lr: the useful part is deep inside
        expected = next((line for line in lines if line.startswith("Expected a <")), lines[-1])
        given = next((line for line in lines if line.startswith("Given value:")), "")
        return f'Parser key "{".".join(keys)}": {expected}. {given}'.strip()
    return " ".join(lines[:2]) if lines else type(err).__name__


def main(args: list[str] | dict[str, Any] | None = None) -> dict[str, Any]:
    import wandb

    set_here = RUN_DIR_ENV not in os.environ
    try:
        try:
            cli = build_cli(args)
        except (ArgumentError, ValueError, TypeError, MisconfigurationException) as err:
            raise SystemExit(f"error: {one_line(err)}\nSee `python train.py --help` for the options.") from None
        os.environ[RUN_DIR_ENV] = str(cli.run_dir)  # DDP workers started by Lightning inherit it
        try:
            results = fit_and_test(cli)
        except DownloadError as err:  # prepare_data runs inside fit: the data could not be fetched
            raise SystemExit(f"error: {err}") from None
        if wandb.run is not None:
            wandb.finish()  # so the next main() in this process starts its own wandb run
        return results
    except BaseException:
        if wandb.run is not None:
            wandb.finish(exit_code=1)  # marks the run as failed rather than leaving it open
        raise
    finally:
        if set_here:
            os.environ.pop(RUN_DIR_ENV, None)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # in-memory data needs none
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")  # Lightning's, not yours
    main()
