"""A run directory's settings: the run's first config and a record of every resume that changed it, and the checks
that make resuming from it safe (the settings must build a model the checkpoint loads into). Who may write the
directory, and how checkpoints are written: support/run_dir/writer.py.

    RUN_DIR/config.yaml            how the run was made; written once, never overwritten
    RUN_DIR/config.resume-N.yaml   the settings of the N-th resume whose settings differed, with what changed
    RUN_DIR/checkpoints/           best-*.ckpt by the monitored metric, last.ckpt the latest validation

None of it names the example model or data.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch.nn.parameter import is_lazy

from support.atomic import write_atomic
from support.errors import SettingError

CONFIG_FILE = "config.yaml"
NOT_SAVED = ("run_dir", "ckpt_path", "config", "__path__")  # which run, from where: not how; kept out of configs


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
    names and shapes are compared. A model that builds layers later (in setup() or configure_model(), after these
    settings are parsed) is checked for the parameters it already has: their shapes, and that the checkpoint holds
    them; the checkpoint's other weights may belong to the layers built later."""
    saved = {key: tuple(value.shape) for key, value in checkpoint.get("state_dict", {}).items()
             if isinstance(value, torch.Tensor)}
    state = model.state_dict()
    lazy = {key for key, value in state.items() if is_lazy(value)}  # shaped by the checkpoint when it loads
    built = {key: tuple(value.shape) for key, value in state.items() if key not in lazy}
    problems = [f"{key}: checkpoint {saved[key]}, settings {shape}" for key, shape in built.items()
                if key in saved and saved[key] != shape]
    builds_later = any(is_overridden(hook, model, LightningModule) for hook in ("setup", "configure_model"))
    if model.strict_loading:
        problems += [f"{key} missing from the checkpoint" for key in built if key not in saved]
        if not builds_later:
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
        if path.name.startswith("hpc_ckpt_"):  # resumed by Lightning itself, not asked for
            raise SettingError(f"{path} does not fit the model these settings build ({problem}): Lightning resumes a "
                               "Slurm job's hpc_ckpt_N from its run directory, and this is another run's (a directory "
                               "left by an earlier job of the same SLURM_JOB_ID?): give another --run_dir")
        raise SettingError(f"{path} does not fit the model these settings build ({problem}): give the settings it "
                           "was trained with (--config with its run's config.yaml)")
    epoch = checkpoint.get("epoch", 0)
    if max_epochs is not None and max_epochs >= 0 and epoch > max_epochs:
        raise SettingError(f"--trainer.max_epochs={max_epochs} is below the {epoch} epochs {path.name} has done: give "
                           "a larger --trainer.max_epochs to train on")
