"""What a run directory holds and who may write it: the run's first config and a record of every resume that
changed it, one writer at a time, checkpoints written whole or not at all, and the checks that make resuming from
it safe (the settings must build a model the checkpoint loads into).

    RUN_DIR/config.yaml            how the run was made; written once, never overwritten
    RUN_DIR/config.resume-N.yaml   the settings of the N-th resume whose settings differed, with what changed
    RUN_DIR/checkpoints/           best-*.ckpt by the monitored metric, last.ckpt the latest validation
    RUN_DIR/.writer.lock           held by the run writing here (released by the kernel if that process dies)

None of it names the example model or data.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from filelock import FileLock, Timeout
from jsonargparse import Namespace
from lightning_fabric.plugins import CheckpointIO
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch.nn.parameter import is_lazy

from support.atomic import write_atomic
from support.errors import SettingError

CONFIG_FILE = "config.yaml"
NOT_SAVED = ("run_dir", "ckpt_path", "config", "__path__")  # which run, from where: not how; kept out of configs
LOCK_FILE = ".writer.lock"
OWNER_FILE = ".writer"  # who holds the lock (the lock file itself is truncated by every process that tries it)


# ---- settings: the run's first config, and what a resume changed ------------------------------------------------
def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"trainer": {"max_epochs": 3}} -> {"trainer.max_epochs": 3}; class_path/init_args stay dotted keys too."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def rerunnable(dumped_yaml: str) -> dict[str, Any]:
    """The parsed settings without the keys that say which run this is rather than how it runs."""
    config = yaml.safe_load(dumped_yaml) or {}
    for key in NOT_SAVED:
        config.pop(key, None)
    return config


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (before, after) for each setting that differs (missing on one side: None)."""
    old, new = flatten(before), flatten(after)
    keys = sorted(old.keys() | new.keys())
    return {key: (old.get(key), new.get(key)) for key in keys if old.get(key) != new.get(key)}


def describe_changes(changed: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
    shown = [f"{key} {old!r} -> {new!r}" for key, (old, new) in list(changed.items())[:limit]]
    return "; ".join(shown) + (f"; and {len(changed) - limit} more" if len(changed) > limit else "")


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CONFIG_FILE
    return rerunnable(path.read_text()) if path.is_file() else None


def record_config(run_dir: Path, dumped_yaml: str, note: str = "") -> Path | None:
    """Writes the run's settings: config.yaml the first time; afterwards config.resume-N.yaml (N = 1, 2, ...) when they
    differ from config.yaml, headed by what changed, and nothing when they are the same. Returns the file written."""
    settings = rerunnable(dumped_yaml)
    text = yaml.safe_dump(settings, sort_keys=False, default_flow_style=False)
    first = saved_config(run_dir)
    if first is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / CONFIG_FILE, text)
        return run_dir / CONFIG_FILE
    changed = changes(first, settings)
    if not changed:
        return None
    number = 1
    while (path := run_dir / f"config.resume-{number}.yaml").exists():
        number += 1
    header = f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {note}\n# changed from {CONFIG_FILE}: " if note else \
        f"# changed from {CONFIG_FILE}: "
    write_atomic(path, header + describe_changes(changed, limit=len(changed)) + "\n" + text)
    return path


def with_saved_settings(parser: LightningArgumentParser, config: Namespace, args: Any, run_dir: Path
                        ) -> tuple[Namespace, dict[str, tuple[Any, Any]]]:
    """The settings a run continues with: when it resumes (--ckpt_path) into a run directory that has a config.yaml,
    that file's settings with the arguments given on top, and which of them changed; otherwise `config` as parsed.
    Before, a resume took only what was typed again: a forgotten argument meant another model (a state_dict size
    error) or, worse, other data or optimizer settings without a word."""
    saved_path = run_dir / CONFIG_FILE
    if not config.ckpt_path or not saved_path.is_file():
        return config, {}
    if isinstance(args, (dict, Namespace)):
        resumed = parser.parse_object(args, cfg_base=parser.parse_path(saved_path))
    else:
        resumed = parser.parse_args(["--config", str(saved_path), *(sys.argv[1:] if args is None else args)])
    changed = changes(saved_config(run_dir) or {}, rerunnable(parser.dump(resumed, skip_none=False)))
    rank_zero_only(print)(f"resuming {run_dir} with its {CONFIG_FILE}" +
                          (f"; changed by the arguments: {describe_changes(changed)}" if changed else ""), flush=True)
    return resumed, changed


# ---- checkpoints: the settings must fit, and a save is whole or absent -------------------------------------------
def checkpoint_mismatch(model: LightningModule, checkpoint: dict[str, Any]) -> str | None:
    """Why the checkpoint's weights would not load into `model` (the first differing parameters), or None. Only
    names and shapes are compared. A model that builds layers later (configure_model) is checked for the shapes of
    the parameters it already has."""
    saved = {key: tuple(value.shape) for key, value in checkpoint.get("state_dict", {}).items()
             if isinstance(value, torch.Tensor)}
    state = model.state_dict()
    lazy = {key for key, value in state.items() if is_lazy(value)}  # shaped by the checkpoint when it loads
    built = {key: tuple(value.shape) for key, value in state.items() if key not in lazy}
    problems = [f"{key}: checkpoint {saved[key]}, settings {shape}" for key, shape in built.items()
                if key in saved and saved[key] != shape]
    if model.strict_loading and not is_overridden("configure_model", model, LightningModule):
        problems += [f"{key} missing from the checkpoint" for key in built if key not in saved]
        problems += [f"{key} not in the model" for key in saved if key not in built and key not in lazy]
    if not problems:
        return None
    return "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


def require_fit(model: LightningModule, path: Path, changed: dict[str, tuple[Any, Any]], run_dir: Path,
                max_epochs: int | None = None) -> None:
    """Stops, before anything is written, a resume whose settings build a model the checkpoint does not load into,
    naming the settings that differ from the run's config.yaml (another architecture, another dataset), or whose
    --trainer.max_epochs is below the checkpoint's epoch (Lightning raises that only inside fit, as a traceback).
    The checkpoint is read with mmap: however large, only what is looked at is read."""
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if problem := checkpoint_mismatch(model, checkpoint):
        if changed:
            raise SettingError(f"{path} does not fit the model these settings build ({problem}): they differ from "
                               f"{run_dir / CONFIG_FILE} in {describe_changes(changed)}; drop those arguments, or "
                               "start a new --run_dir")
        raise SettingError(f"{path} does not fit the model these settings build ({problem}): give the settings it "
                           "was trained with (--config with its run's config.yaml)")
    epoch = checkpoint.get("epoch", 0)
    if max_epochs is not None and max_epochs >= 0 and epoch > max_epochs:
        raise SettingError(f"--trainer.max_epochs={max_epochs} is below the {epoch} epochs {path.name} has done: give "
                           "a larger --trainer.max_epochs to train on")


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """The Trainer's plugins, with AtomicCheckpointIO unless a CheckpointIO of the user's is among them."""
    given = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins] if plugins is not None else []
    return given if any(isinstance(p, CheckpointIO) for p in given) else [*given, AtomicCheckpointIO()]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic for local files: written under a temporary name, synced, then
    renamed. Lightning's own writes in place: on a full disk it left a truncated last.ckpt (measured: 409,600 bytes
    on a 400 kB tmpfs) that no resume could load, and a grid row failed at every rerun until someone deleted it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:  # remote storage: fsspec's transaction applies
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(checkpoint, f), durable=True)


# ---- one writer ------------------------------------------------------------------------------------------------------
@contextmanager
def one_writer(run_dir: Path, untrained: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Holds RUN_DIR/.writer.lock while the run writes there: a second run started on the same directory stops with
    one line naming the first. The lock is the kernel's (flock; on NFS a byte-range lock), so a run that dies, even by
    kill -9 or with its node, leaves nothing stuck. A run that made the directory and ends having written nothing, or
    fails while `untrained()` and without a checkpoint (a bad setting found in setup, data that could not be had),
    takes the directories it made away again: no half-made run, lock or wandb run is left looking like one.
    Filesystems without locks: a warning, and no check."""
    made = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE), blocking=False)
    owner = run_dir / OWNER_FILE
    try:
        lock.acquire()
    except Timeout:
        holder = owner.read_text().strip() if owner.is_file() else "another process"
        raise SettingError(f"--run_dir {run_dir} is in use by a run that is still going ({holder}): wait for it, "
                           "stop it, or give another --run_dir") from None
    except OSError as err:
        if err.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        from support.training import warn

        warn(f"{run_dir}'s filesystem has no file locks: a second run on this directory would not be stopped")
        yield
        return
    failed = False
    try:
        write_atomic(owner, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                            f"{', Slurm job ' + os.environ['SLURM_JOB_ID'] if 'SLURM_JOB_ID' in os.environ else ''}\n")
        yield
    except BaseException:
        failed = True
        raise
    finally:
        owner.unlink(missing_ok=True)
        lock.release()
        nothing = [path.name for path in run_dir.iterdir()] == [LOCK_FILE]
        if made and (nothing or (failed and untrained() and not any(run_dir.rglob("*.ckpt")))):
            shutil.rmtree(run_dir, ignore_errors=True)
            for folder in made[1:]:
                try:
                    folder.rmdir()
                except OSError:  # another run wrote there meanwhile
                    break
