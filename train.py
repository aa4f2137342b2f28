"""Train the model: wires a LightningModule and a DataModule to a Lightning Trainer and a wandb logger (LightningCLI).

    python train.py                                          # train, test the best checkpoint, print the metrics
    python train.py --model.hidden_dim=64 --data.batch_size=32 --trainer.max_epochs=3 --seed_everything=1
    python train.py --optimizer.lr=3e-3 --trainer.gradient_clip_val=1.0 --trainer.precision=bf16-mixed
    python train.py --print_config > my.yaml && python train.py --config my.yaml
    python train.py --run_dir runs/my-run --ckpt_path last   # resume a stopped run, with its own config.yaml
    python train.py --run_dir runs/my-run --ckpt_path last --trainer.max_epochs=60      # ... changing a setting
    python evaluate.py runs/my-run                           # test its best checkpoint again, print the metrics
    python train.py --help                                   # every option, with its default

Make it your own: the section "What you change" below names your model, your data, the metric that picks the
best checkpoint, and how long to train. Nothing else in the template names them: sweep.py, slurm_train.py, the
benchmarks and the tests take them from here.

Every run writes to its own directory (default runs/<time>-<random>; under SLURM runs/slurm-<job>[_<task>]), one
run at a time: config.yaml (written once; a resume that changes settings records them in config.resume-N.yaml),
checkpoints/ (best by MONITOR, last at every validation; each written whole or not at all) and the wandb run.
wandb logs online when you have credentials (`wandb login` or WANDB_API_KEY) and its server answers, offline
otherwise (upload later with `wandb sync DIR/wandb/...`); WANDB_MODE or --wandb.mode override that. It never
prompts and never hangs.

From another script: `import train; train.main(["--trainer.max_epochs=2"])` or
`train.main({"trainer": {"max_epochs": 2}})` trains and returns the final metrics as a dict.
"""

from __future__ import annotations

import contextlib
import errno
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.model_helpers import is_overridden

import datamodule
import model
from support import gpu_check
from support.cka.monitor import CKAMonitor
from support.data.downloads import DownloadError
from support.errors import SettingError, one_line
from support.provenance import record as provenance
from support.run_dir import checks, writer
from support.run_dir.config import require_fit, with_saved_settings
from support.slurm import packing
from support.training import class_choice, linking, optimizers
from support.training.callbacks import LatestCheckpoint, machinery_callbacks, stopped_by_signal
from support.training.cli import SaveConfigAndLog, parse_only, quiet_known_warnings
from support.training.wandb_logger import WandbOptions, finish_wandb, wandb_logger

# ---- What you change ------------------------------------------------------------------------------------------
MODEL_CLASS = model.ImageClassifier  # your LightningModule
DATAMODULE_CLASS = datamodule.DataModule  # your LightningDataModule
# The metric that picks the best checkpoint (the one tested at the end), stops training early, and that sweeps
# optimise unless SWEEP_CONFIG names another: a name your model logs with self.log, and "min" or "max".
MONITOR, MONITOR_MODE = "val/loss", "min"
MAX_EPOCHS = 40  # default of --trainer.max_epochs
PATIENCE = 8  # validation epochs without improvement before early stopping (--early_stopping.patience)
# DataModule attributes handed to the model's constructor argument of the same name, wherever both exist.
LINKED = ("num_classes", "in_channels")
# ----------------------------------------------------------------------------------------------------------------

RUN_DIR_ENV = "TRAIN_RUN_DIR"  # hands the run directory to DDP worker processes, which re-run this script


def linked_arguments() -> list[tuple[str, str]]:
    """(name, when) for each LINKED name that the model's constructor takes and the DataModule provides (as a
    constructor argument: at parsing; as a property, class attribute or attribute set in __init__, prepare_data() or
    setup(): once it exists, after its prepare_data() and setup("fit") if it is not there before). One that it does
    not provide gets one warning saying why (support/training/linking.py)."""
    return linking.links(LINKED, MODEL_CLASS, DATAMODULE_CLASS)


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Directory of this run (default: runs/<time>-<random>, or runs/slurm-<job> under "
                                 "SLURM). Reusing one continues it: pair with --ckpt_path last.")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Checkpoint to resume training from; 'last' means the run's last.ckpt.")
        parser.add_class_arguments(WandbOptions, "wandb")
        if not is_overridden("configure_optimizers", parent=LightningModule, instance=MODEL_CLASS):
            # The optimizer lives in the CLI: --optimizer=SGD --optimizer.lr=0.1 --optimizer.momentum=0.9. A model
            # with its own configure_optimizers keeps it (its --optimizer then has no default).
            parser.add_optimizer_args((torch.optim.Optimizer,))
            parser.set_defaults({"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}}})
        for name, when in linked_arguments():
            linking.link(parser, name, when)
        # Lightning's own callbacks, each configurable from the command line (--early_stopping.patience=10).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # The best checkpoint(s) by MONITOR; last.ckpt has a callback of its own (instantiate_trainer).
        parser.set_defaults({"checkpoint.monitor": MONITOR, "checkpoint.mode": MONITOR_MODE,
                             "checkpoint.filename": "best-epoch{epoch:03d}-step{step}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        # Checked after validation only, so a run stopped mid-epoch (--trainer.max_steps) has nothing to miss.
        parser.set_defaults({"early_stopping.monitor": MONITOR, "early_stopping.mode": MONITOR_MODE,
                             "early_stopping.patience": PATIENCE, "early_stopping.check_on_train_epoch_end": False})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(CKAMonitor, "cka")  # layer similarity heatmaps; --cka.every_n_epochs=0: off

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        class_choice.start_switched_classes_from_their_defaults(parser, args)  # --optimizer=SGD: SGD's defaults
        with warnings.catch_warnings():  # Lightning warns when args= comes with a sys.argv: meant here (evaluate.py)
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
            super().parse_arguments(parser, args)
        chosen = self.config.run_dir or self.config.trainer.default_root_dir or os.environ.get(RUN_DIR_ENV)
        self.run_dir = Path(chosen or Path("runs") / checks.default_run_name()).resolve()
        # Before anything is written; a CLI that records nothing (evaluate.py) only reads the run directory.
        checks.check_run_dir_and_checkpoint(self.run_dir, self.config.ckpt_path, self.save_config_callback is not None)
        if self.save_config_callback is not None and not self.config.ckpt_path:  # a resume's is checked on loading
            checks.require_training(self.config.trainer)
        # A resume continues with the run's own config.yaml, the arguments given on top (support/run_dir/config.py).
        self.config, self.changed = with_saved_settings(parser, self.config, args, self.run_dir)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # jsonargparse wraps what a LINKED name's reading raised (the data's setup())
            if err.__cause__ is None or not str(err).startswith("Call to compute_fn"):
                raise
            raise err.__cause__ from None
        if optimizer_init := self.config_init.get("optimizer"):  # built when fit asks: after setup()'s layers
            optimizers.build_when_fit_starts(self.model, optimizer_init)
        if checkpoint := checks.checkpoint_file(self.run_dir, self.config.ckpt_path):  # it must load: checked now
            require_fit(self.model, checkpoint, self.changed, self.run_dir,
                                      self.config.trainer.max_epochs)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        init = self.config_init
        gpu_check.require_usable_gpus(init.trainer.accelerator)  # GPUs this torch cannot use: one line, the fix
        if init.checkpoint.dirpath is None:
            init.checkpoint.dirpath = str(self.run_dir / "checkpoints")
        given = init.trainer.callbacks
        callbacks = [*(given if isinstance(given, list) else [given] if given else [])] + machinery_callbacks(
            init.checkpoint.dirpath, {"--checkpoint.monitor": init.checkpoint.monitor,
                                      "--early_stopping.monitor": init.early_stopping.monitor},
            progress=init.trainer.enable_progress_bar is not False,
            best=(init.checkpoint.monitor, init.checkpoint.mode) if self.save_config_callback is not None else None)
        if init.trainer.logger in (None, True):  # not set by the user: our default wandb logger
            kwargs["logger"] = wandb_logger(self.config.wandb, self.run_dir)
        kwargs["plugins"] = writer.with_atomic_checkpoints(init.trainer.plugins)
        try:
            trainer = super().instantiate_trainer(callbacks=callbacks, default_root_dir=str(self.run_dir), **kwargs)
        except RuntimeError as err:  # Lightning's check of the SLURM_* variables, before ours below could run
            if "SLURM" not in str(err):
                raise
            raise SettingError(f"{str(err).splitlines()[0]} (SLURM_NTASKS={os.environ.get('SLURM_NTASKS')}; outside "
                               "a Slurm job, unset the SLURM_* variables)") from None
        LatestCheckpoint.after_the_others(trainer)
        if SLURMEnvironment.detect() and (problem := checks.slurm_job_mismatch(trainer.num_devices, trainer.num_nodes)):
            raise ValueError(problem)
        return trainer


# What both the training CLI and the parse-only CLI are built from, so the two can never disagree.
CLI_SETUP: dict[str, Any] = dict(
    model_class=MODEL_CLASS, datamodule_class=DATAMODULE_CLASS, run=False, seed_everything_default=42,
    trainer_defaults={"max_epochs": MAX_EPOCHS, "log_every_n_steps": 10},
    parser_kwargs={"exit_on_error": False, "description": "Train the model (see train.py's docstring)."})


def build_cli(args: list[str] | dict[str, Any] | None = None, record: bool = True) -> TrainCLI:
    """Parse the settings and build model, data and trainer; raises ArgumentError/ValueError on bad settings.
    record=False: the run's config is neither saved nor logged (evaluate.py)."""
    return TrainCLI(args=args, save_config_callback=SaveConfigAndLog if record else None,
                    save_config_kwargs={"save_to_log_dir": False}, **CLI_SETUP)


def build_cli_or_exit(args: list[str] | dict[str, Any] | None = None, record: bool = True) -> TrainCLI:
    """build_cli, with bad settings turned into one line (SystemExit) that names the option."""
    try:
        return build_cli(args, record)
    except (SettingError, DownloadError) as err:  # one line already (data a LINKED name's setup() could not get)
        raise SystemExit(f"error: {err}") from None
    except (ArgumentError, ValueError, TypeError, MisconfigurationException) as err:
        raise SystemExit(f"error: {one_line(err)}\nSee `python train.py --help` for the options.") from None


def parse_config(args: list[str] | dict[str, Any]) -> Any:
    """The config (a jsonargparse Namespace) that train.py would run with these arguments, checked by the model's
    and DataModule's constructors (on the meta device: no data, no memory), without training. Raises ArgumentError
    naming the key when an argument is unknown or invalid, or what a constructor raises."""
    return parse_only(TrainCLI, args, **CLI_SETUP)


def fit_and_test(cli: TrainCLI) -> dict[str, Any]:
    """Train, then test the best checkpoint (by MONITOR, or --checkpoint.monitor); returns the final metrics."""
    trainer, config = cli.trainer, cli.config
    with warnings.catch_warnings():
        if config.ckpt_path:  # a resume continues in its own checkpoint directory: of course it is not empty
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=config.ckpt_path)
    stopper = trainer.early_stopping_callback
    # Lightning prints a line for max_epochs, none for early stopping. should_stop: this fit stopped, not one whose
    # checkpoint (and EarlyStopping's state) a resume loaded.
    if trainer.is_global_zero and trainer.should_stop and stopper is not None and stopper.stopping_reason_message:
        print(f"early stopping ended the run after epoch {stopper.stopped_epoch + 1}: "
              f"{one_line(stopper.stopping_reason_message)}", flush=True)
    best = cli.config_init.checkpoint.best_model_path  # the callback that monitors MONITOR
    results: dict[str, Any] = {}
    if is_overridden("test_step", cli.model) and is_overridden("test_dataloader", cli.datamodule):
        tested = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None, verbose=False)
        results = {k: float(v) for k, v in tested[0].items()} if tested else {}
    elif trainer.is_global_zero:
        print("no test: the model has no test_step or the DataModule no test_dataloader")
    results.update(run_dir=str(cli.run_dir), best_checkpoint=best)
    if trainer.is_global_zero:
        print(f"run directory:   {cli.run_dir}\nbest checkpoint: {best or '(none)'}")
        print("final metrics:   " + "  ".join(f"{k}={v:.4f}" for k, v in results.items() if isinstance(v, float)))
    return results


def main(args: list[str] | dict[str, Any] | None = None) -> dict[str, Any]:
    set_here = RUN_DIR_ENV not in os.environ
    try:
        cli = build_cli_or_exit(args)
        os.environ[RUN_DIR_ENV] = str(cli.run_dir)  # DDP workers started by Lightning inherit it
        try:
            # One run writes into a run directory at a time: the first process holds it (DDP ranks share it). A run
            # that fails before its first training step takes the directory it made away again, wandb run included.
            with writer.one_writer(cli.run_dir, untrained=lambda: cli.trainer.global_step == 0) \
                    if cli.trainer.is_global_zero else contextlib.nullcontext():
                # What this start runs (code, versions, host, Slurm ids, devices): RUN_DIR/provenance.json.
                recording = cli.trainer.is_global_zero and bool(provenance.record_start(cli.run_dir))
                try:
                    with stopped_by_signal():  # SIGTERM: last.ckpt saved, exit status 143
                        results = fit_and_test(cli)
                except BaseException as err:
                    if recording:
                        provenance.record_end(cli.run_dir, provenance.exit_status(err), provenance.failure_reason(err))
                    finish_wandb(exit_code=1)  # marks the run as failed, and closes its files first
                    raise
                if recording:
                    provenance.record_end(cli.run_dir, 0)
        except (DownloadError, SettingError) as err:  # raised inside fit: data that cannot be had, a bad setting
            # Said once: under DDP every rank raises it.
            raise SystemExit(f"error: {err}" if cli.trainer.is_global_zero else 1) from None
        except torch.cuda.OutOfMemoryError as err:  # one line, naming --runs-per-gpu when runs share the GPU
            raise SystemExit(packing.out_of_memory_line(err)) from None
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise SystemExit(f"error: no space left on the disk of {cli.run_dir} ({err.strerror}): the checkpoints "
                             f"saved before are whole; free space, then resume with --run_dir {cli.run_dir} "
                             "--ckpt_path last") from None
        finish_wandb()  # so the next main() in this process starts its own wandb run
        return results
    except BaseException:
        finish_wandb(exit_code=1)  # marks the run as failed rather than leaving it open
        raise
    finally:
        if set_here:
            os.environ.pop(RUN_DIR_ENV, None)


if __name__ == "__main__":
    quiet_known_warnings()
    main()
