"""Errors that a researcher causes and can fix, and how they are shown: one line naming the problem and the fix;
and `warn`, the one-line warning. Every package of support/ may import this module; it imports none of them.

Light on purpose (no torch, no Lightning): sweep.py and slurm_train.py use it before they load anything heavy.
"""

from __future__ import annotations

import re
import sys


class SettingError(ValueError):
    """A setting that cannot work (a checkpoint that is not one, a layer that does not exist, a metric never logged):
    train.py prints its message as one line and exits 1, without a traceback."""


class LaunchError(ValueError):
    """A problem with a Slurm submission found before anything was written or submitted; the message is one line."""


def warn(message: str, prefix: str = "warning") -> None:
    """One plain line on stderr, from rank 0 only: what a researcher reads in a SLURM log (Python's warnings add the
    file, line and source line, which say nothing to them)."""
    # Lightning's record of this process's rank: set when Lightning loads, updated by its strategies. This small
    # package loads in milliseconds, so the module stays light; a process without Lightning is rank 0.
    from lightning_utilities.core.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"{prefix}: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """As warn, for what is as meant but worth knowing (`note: ...`)."""
    warn(message, prefix="note")


def one_line(err: BaseException) -> str:
    """jsonargparse errors span many lines; keep the key path, what was expected and the value given."""
    unknown_class = r'Parser key "(optimizer|lr_scheduler)":\s*-? *Expected a path but (\S+) either not'
    if match := re.search(unknown_class, str(err)):
        group, name = match.groups()
        examples = "AdamW, Adam, SGD, RMSprop" if group == "optimizer" else "StepLR, CosineAnnealingLR, OneCycleLR"
        return (f"--{group}={name}: no such class; give a torch.optim{'.lr_scheduler' if group != 'optimizer' else ''}"
                f" class ({examples}) or the full path of your own (mypackage.MyOptimizer)")
    lines = [line.strip(" -") for line in str(err).splitlines() if line.strip(" -")]
    keys = re.findall(r'Parser key "([^"]+)"', str(err))
    if len(keys) > 1:  # a nested key such as optimizer.lr: the useful part is deep inside
        expected = next((line for line in lines if line.startswith("Expected a <")), lines[-1])
        given = next((line for line in lines if line.startswith("Given value:")), "")
        return f'Parser key "{".".join(keys)}": {expected}. {given}'.strip()
    return " ".join(lines[:2]) if lines else type(err).__name__
