"""wandb around a training run: the logger train.py gives the Trainer (online when it can be, else offline with one
line saying why), its settings (`--wandb.*`), and closing the run when the service has already gone."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment

from support import REPO_DIR
from support.errors import warn
from support.run_dir.checks import wandb_run_id
from support.training.wandb_access import choose_mode, default_entity, default_project, plain_reason


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

    # git_root: wandb records the commit of this repository, not of the run directory it writes into. A job's frozen
    # copy has no .git: there the config's git_commit and code_hash (support/training/cli.py) say what ran.
    return wandb.Settings(init_timeout=init_timeout, silent=True, git_root=str(REPO_DIR))
