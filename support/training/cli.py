"""train.py's LightningCLI pieces: the config record of each run (config.yaml, and the logger's hyperparameters with
the code it ran: commit, uncommitted changes, the frozen copy's hash), a parse that runs every check without
training (`parse_only`, used by sweep.py and check.py), and the known warnings that say nothing to a researcher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

from support.atomic import write_atomic
from support.provenance.record import code_identity, trained_with
from support.run_dir.config import CONFIG_FILE, record_config, rerunnable


class SaveConfigAndLog(SaveConfigCallback):
    """Records the run's settings in its directory (config.yaml once; a resume that changed them adds
    config.resume-N.yaml, see support/run_dir/config.py) and in the logger, with the seed and the git commit, so every
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
            code = trained_with(run_dir) or code_identity()  # what train.py recorded in provenance.json
            extra = {"git_commit": f"{code['commit'] or 'unknown'}{'+dirty' if code['dirty'] else ''}",
                     "code_hash": code["hash"], "code_dir": code["dir"], "run_dir": str(run_dir)}
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
    # Twice per run on any machine with Slurm's commands (a login node, the tests' cluster): the job scripts start
    # every Slurm run with srun, and a run started without it on purpose (a login node) needs no hint.
    warnings.filterwarnings("ignore", message=".*`srun` command is available on your system but is not used.*")
