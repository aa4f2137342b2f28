"""Evaluate a trained run: test (or validate) one of its checkpoints with the settings the run was trained with,
and print the metrics. Nothing is trained, nothing is written into the run directory, no wandb run is made.

    python evaluate.py runs/my-run                          # its best checkpoint (by MONITOR) on the test split
    python evaluate.py runs/my-run --checkpoint last        # its last.ckpt
    python evaluate.py runs/my-run/checkpoints/best-epoch007-step160.ckpt
    python evaluate.py runs/my-run --split val --json metrics.json
    python evaluate.py runs/my-run -- --data.batch_size=512 --trainer.devices=2 --trainer.strategy=ddp
    python evaluate.py runs/my-run --own-code               # with the frozen copy of the code the run trained with

The settings are the run's config.yaml, on one process of this machine; train.py arguments after `--` override
them (batch size, devices and nodes, another dataset with the same classes). The metrics are those the model logs
in its test_step (validation_step for --split val): the numbers train.py printed at the end of training for that
checkpoint. When the code here differs from the code the run trained with (its provenance.json), one line says so
and where; --own-code runs this evaluation with the run's own frozen copy of the code, when a job made one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_only

import train
from support import REPO_DIR
from support.atomic import write_atomic
from support.errors import SettingError, warn
from support.provenance.record import code_hash, trained_with
from support.provenance.snapshot import describe, differing_files
from support.run_dir.checks import require_checkpoint
from support.run_dir.config import CONFIG_FILE, require_fit
from support.training.callbacks import stopped_by_signal
from support.training.cli import quiet_known_warnings

ONE_PROCESS = ["--trainer.num_nodes=1", "--trainer.devices=1", "--trainer.strategy=auto"]


def best_checkpoint(run_dir: Path) -> Path:
    """The run's best checkpoint by its monitored metric: the one best-*.ckpt, or, where several are kept
    (--checkpoint.save_top_k), the one that last.ckpt's ModelCheckpoint state names as best."""
    folder = run_dir / "checkpoints"
    candidates = sorted(folder.glob("best-*.ckpt"))
    if len(candidates) == 1:
        return candidates[0]
    if candidates and (folder / "last.ckpt").is_file():
        states = torch.load(folder / "last.ckpt", map_location="cpu", mmap=True, weights_only=False)["callbacks"]
        for key, state in states.items():
            named = Path(str(state.get("best_model_path") or "")).name
            if key.startswith("ModelCheckpoint") and named.startswith("best-") and (folder / named).is_file():
                return folder / named
    raise SettingError(f"{folder} has no best-*.ckpt to choose: give --checkpoint last, or a checkpoint's path")


def run_dir_of(target: Path) -> Path:
    """The run directory of a run directory or of one of its checkpoint files."""
    if target.is_file():
        return target.parent.parent if target.parent.name == "checkpoints" else target.parent
    return target


def checkpoint_and_run(target: Path, which: str) -> tuple[Path, Path, str]:
    """(checkpoint, run directory, where to read the checkpoint) for a run directory (best or last checkpoint) or a
    checkpoint file. The checkpoint is read through a descriptor opened now (/dev/fd/N): a run still training
    replaces its best-*.ckpt, and the file chosen was gone by the time the test loaded it (FileNotFoundError in 1 of
    4 tries); an open file stays readable, whole (checkpoints are written to a temporary name, then renamed)."""
    for attempt in range(3):  # chosen, then replaced before it was opened: choose again
        if target.is_file():
            run_dir, checkpoint = run_dir_of(target), target
        elif target.is_dir():
            run_dir = target
            checkpoint = best_checkpoint(run_dir) if which == "best" else run_dir / "checkpoints" / f"{which}.ckpt"
        else:
            raise SettingError(f"{target} does not exist: give a run directory (runs/...) or a .ckpt file")
        try:
            descriptor = os.open(checkpoint, os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError):
            if attempt < 2 and target.is_dir():
                continue
            break  # require_checkpoint names the problem
        _OPEN_CHECKPOINTS.append(descriptor)  # open for the process's life: what `pinned` reads
        pinned = f"/dev/fd/{descriptor}"
        if Path(pinned).exists():  # Linux and macOS
            with reading_as(pinned, checkpoint):
                require_checkpoint(pinned, "checkpoint ")
            return checkpoint, run_dir, pinned
    require_checkpoint(checkpoint, "checkpoint ")
    return checkpoint, run_dir, str(checkpoint)


_OPEN_CHECKPOINTS: list[int] = []


@contextlib.contextmanager
def reading_as(pinned: str, checkpoint: Path) -> Iterator[None]:
    """A SettingError about the pinned path names the checkpoint instead."""
    try:
        yield
    except SettingError as err:
        raise SettingError(str(err).replace(pinned, str(checkpoint))) from None


def code_difference(run_dir: Path) -> tuple[str, Path | None] | None:
    """None when this code is the code the run trained with (or the run has no record of it); else one line saying
    how they differ, and the run's frozen copy if it still exists."""
    trained = trained_with(run_dir)
    if trained is None or trained.get("hash") == code_hash():
        return None
    copy = Path(trained["dir"]) if trained.get("dir") and Path(trained["dir"]).is_dir() else None
    where = f"commit {trained.get('commit') or 'unknown'}{' with uncommitted changes' if trained.get('dirty') else ''}"
    if copy is not None:
        changed = differing_files(copy, REPO_DIR)
        return (f"this code differs from the code {run_dir.name} trained with (its frozen copy {copy}) in "
                f"{describe(changed)}: --own-code evaluates with that copy", copy)
    patch = f", patch {trained['patch']}" if trained.get("patch") else ""
    return (f"this code differs from the code {run_dir.name} trained with ({where}, code hash {trained.get('hash')}"
            f"{patch}; no frozen copy was made for it): the metrics may differ from the run's", None)


def evaluate(target: str | Path, which: str = "best", split: str = "test", overrides: list[str] | None = None
             ) -> dict[str, Any]:
    """Tests (or validates) the checkpoint with its run's settings; returns the metrics (and which checkpoint)."""
    checkpoint, run_dir, pinned = checkpoint_and_run(Path(target).expanduser().resolve(), which)
    if (difference := code_difference(run_dir)) is not None and rank_zero_only.rank == 0:
        print(f"note: {difference[0]}", file=sys.stderr, flush=True)
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        warn(f"{run_dir} has no {config.name}: evaluating with train.py's defaults and the arguments given")
    # The run's settings, but one process on this machine (a run trained on 2 nodes x 4 GPUs is evaluated anywhere)
    # unless the arguments say otherwise; the run's own directory, without a logger or a saved config: nothing is
    # written there. CKA (a validation extra) is off, so --split val gives exactly the validation metrics.
    cli = train.build_cli_or_exit([*(["--config", str(config)] if config.is_file() else []), *ONE_PROCESS,
                                   *(overrides or []), f"--run_dir={run_dir}", "--trainer.logger=false",
                                   "--cka.every_n_epochs=0"], record=False)
    with reading_as(pinned, checkpoint):
        require_fit(cli.model, Path(pinned), {}, run_dir)
    trainer = cli.trainer
    run = trainer.test if split == "test" else trainer.validate
    with stopped_by_signal():
        outputs = run(cli.model, datamodule=cli.datamodule, ckpt_path=pinned, verbose=False)
    metrics: dict[str, Any] = {key: float(value) for key, value in (outputs[0] if outputs else {}).items()}
    if trainer.is_global_zero:
        print(f"checkpoint:      {checkpoint}")
        print(f"{split} metrics:    " + "  ".join(f"{key}={value:.4f}" for key, value in metrics.items()))
    return {**metrics, "checkpoint": str(checkpoint)}


def unwritable(path: Path) -> str | None:
    """Why a file cannot be written at `path` (tried with a temporary file beside it: permissions, a read-only
    filesystem, a missing folder), or None."""
    if path.is_dir():
        return "is a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent or "."):
            return None
    except OSError as err:
        return f"cannot write there ({err.strerror})"


def run_own_code(target: str, argv: list[str]) -> None:
    """Runs this command again from the run's frozen copy of its code (here: the data and runs stay this project's);
    returns only where this code already is that copy."""
    run_dir = run_dir_of(Path(target).expanduser().resolve())
    trained = trained_with(run_dir)
    copy = Path(trained["dir"]) if trained and trained.get("dir") else None
    if copy is None or not (copy / "evaluate.py").is_file():
        why = "it trained from a working tree" if trained else "it has no provenance.json"
        raise SystemExit(f"error: --own-code: {run_dir} has no frozen copy of its code ({why}); evaluate without it")
    if copy.resolve() == REPO_DIR:
        return
    argv = [arg for arg in argv if arg != "--own-code"]
    env = {**os.environ, "PYTHONPATH": str(copy) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"evaluating with the run's own code: {copy}", file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, str(copy / "evaluate.py"), *argv], env)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    ours, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description="Test a run's checkpoint with its own settings (see the docstring).")
    parser.add_argument("target", help="a run directory (runs/...) or a checkpoint file")
    parser.add_argument("--checkpoint", default="best",
                        help="for a run directory: best (by the monitored metric), last, or another name in "
                             "checkpoints/ without .ckpt (default: best)")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    parser.add_argument("--own-code", action="store_true",
                        help="evaluate with the frozen copy of the code the run trained with (a job's runs have one)")
    options = parser.parse_args(ours)
    if options.own_code:
        run_own_code(options.target, argv)
    output = Path(options.json) if options.json else None
    if output is not None and (problem := unwritable(output)):  # said before the work, not after it
        raise SystemExit(f"error: --json {output}: {problem}; give a file path this user can write")
    try:
        results = evaluate(options.target, options.checkpoint, options.split, overrides)
    except SettingError as err:
        raise SystemExit(f"error: {err}") from None
    if output is not None and rank_zero_only.rank == 0:  # under DDP every rank has the same (synchronised) metrics
        try:
            write_atomic(output, json.dumps(results, indent=2) + "\n")
        except OSError as err:
            raise SystemExit(f"error: --json {output}: cannot write it ({err.strerror}); the metrics are above") \
                from None
    return results


if __name__ == "__main__":
    quiet_known_warnings()
    main()
