"""wandb around a training run: the logger train.py gives the Trainer (online when it can be, else offline with one
line saying why), its settings (`--wandb.*`), and a run that goes on, and closes, when wandb's service has gone."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment

from support import REPO_DIR
from support.errors import note, warn
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

    # scancel, a preemption and a time limit signal every process of the job step, wandb's service (wandb-core)
    # included: it died before train.py's next log call in 4 of 6 runs on the local Slurm, and that call raised
    # ConnectionResetError, so the run crashed (exit 1) instead of saving at its next batch and exiting 143. wandb
    # already starts the service in its own session, which does not shield it (Slurm signals the step's processes by
    # descent or cgroup, not by process group), and wandb-core 0.31 exits on SIGTERM even when started with it ignored
    # (measured: its /proc status shows SigIgn 0; Go's runtime keeps an inherited SIG_IGN for SIGHUP and SIGINT only).
    # So the logger survives the loss: once the service is gone, logging to wandb stops with one warning, the run goes
    # on and saves at its next batch (measured, wandb-core killed 1 s before train.py's SIGTERM: exit 143 and the
    # save; before, a ConnectionResetError traceback), and what was logged before is in the run's offline files.
    service_gone = False

    def unless_service_gone(self, call: Callable[[], Any]) -> None:
        """Runs a call into wandb's service; if the service has gone, says so once and skips wandb from then on."""
        if self.service_gone:
            return
        try:
            call()
        except ConnectionError as err:  # ConnectionResetError, BrokenPipeError: wandb-core's socket closed
            self.service_gone = True
            forget_lost_service(err, "logging to wandb stops here and the run goes on")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.unless_service_gone(lambda: super(FallbackWandbLogger, self).log_metrics(metrics, step))

    def log_hyperparams(self, params: Any) -> None:
        self.unless_service_gone(lambda: super(FallbackWandbLogger, self).log_hyperparams(params))

    def update_summary(self, values: Mapping[str, Any]) -> None:
        """Adds `values` to the wandb run's summary (nothing once the service has gone)."""
        self.unless_service_gone(lambda: self.experiment.summary.update(dict(values)))


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
    elif mode == "offline" and options.mode == "auto" and not os.environ.get("WANDB_MODE"):
        note(f"wandb logs offline into {run_dir}/wandb: no credentials (`wandb login` or WANDB_API_KEY) to log online. "
             f"Upload it later with `wandb sync {run_dir}/wandb/offline-run-*`.")
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
        forget_lost_service(err, "wandb could not close the run", Path(directory).parent)


def forget_lost_service(err: BaseException, what: str, directory: Path | None = None) -> None:
    """One line for wandb's service gone (`what` happens now; what was logged is in the run's offline files), then
    this process forgets the run and the service, so neither the next main() nor the exit hook calls it again: the
    exit hook's teardown printed a 30-line 'Exception ignored in atexit callback' after the run's own last line."""
    import wandb

    if directory is None and wandb.run is not None:
        directory = Path(wandb.run.dir).parent
    warn(f"wandb's service has gone ({type(err).__name__}: {plain_reason(err)}), as when Slurm signals every process "
         f"of a job step: {what}; what it logged is in {directory} (`wandb sync` uploads it)")
    wandb.run = None  # the next main() in this process starts its own run
    with contextlib.suppress(Exception):  # unregisters the exit hook first, then fails to reach the service
        wandb.teardown()


def init_settings(init_timeout: float) -> Any:
    import wandb

    # git_root: wandb records the commit of this repository, not of the run directory it writes into. A job's frozen
    # copy has no .git: there the config's git_commit and code_hash (support/training/cli.py) say what ran.
    return wandb.Settings(init_timeout=init_timeout, silent=True, git_root=str(REPO_DIR))
