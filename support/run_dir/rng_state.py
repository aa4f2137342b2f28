"""The random number generators' states in every checkpoint, per process, for exact resume (`ResumeRNGState`)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_warn


class ResumeRNGState(Callback):
    """Saves the random number generators' states in every checkpoint and puts them back when training resumes,
    so a resumed run draws the same dropout masks and loader seeds as an uninterrupted one (Lightning restores
    weights, optimizer and loops, but not these). Applied when training starts, after the sanity check; the
    training loader has its own generator (support/run_dir/resumable.py), so only training steps draw from these.

    Each process has its own states (torch's CPU generator, numpy's, Python's, and its current GPU's), and its own
    dropout draws: under DDP they are gathered into the checkpoint, one entry per rank (saving a checkpoint is
    collective in Lightning, so every rank is there to gather), and each rank takes back its own. Restoring rank 0's
    on every rank made rank 1's draws differ from an uninterrupted run's (tests/test_gpu_readiness.py). A resume
    on fewer or more ranks restores those that exist on both sides and says so in one line."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None
        self.trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.trainer = trainer  # state_dict() is given no trainer, and needs its ranks

    @staticmethod
    def own_states() -> dict[str, Any]:
        """This process's states, as tensors and numbers (what a weights_only load accepts)."""
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
        state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # a run that never used CUDA drew nothing there
            state["cuda"] = torch.cuda.get_rng_state()  # the current device's: the one this rank trains on
        return state

    def state_dict(self) -> dict[str, Any]:
        own, world = self.own_states(), self.trainer.world_size if self.trainer is not None else 1
        if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return {"ranks": [own]}
        ranks: list[Any] = [None] * world
        torch.distributed.all_gather_object(ranks, own)  # gloo or NCCL (pickled, on the current device)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.pending is None:
            return
        # A checkpoint from before the states were per rank holds rank 0's, which every rank took back then.
        ranks = self.pending["ranks"] if "ranks" in self.pending else [self.pending] * trainer.world_size
        if trainer.global_rank < len(ranks):
            self.restore(ranks[trainer.global_rank])
        saved, now = len(ranks), trainer.world_size
        if saved != now:
            rest = (f"{_ranks(saved, now)} keep their seeded states, so their random draws differ from an "
                    "uninterrupted run's" if now > saved else f"those of {_ranks(now, saved)} are left unused")
            rank_zero_warn(f"the checkpoint holds the random states of {saved} process(es) and this run has {now}: "
                           f"{_ranks(0, min(saved, now))} took back {'its' if min(saved, now) == 1 else 'their'} own, "
                           f"{rest}")
        self.pending = None

    @staticmethod
    def restore(state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python"])
        if (cuda := state.get("cuda")) is not None and torch.cuda.is_initialized():  # else this run draws no CUDA
            device = torch.cuda.current_device()
            if isinstance(cuda, list):  # saved before the states were per rank: one per device
                cuda = cuda[device] if device < len(cuda) else None
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, device)


def _ranks(first: int, end: int) -> str:
    """'rank 0' or 'ranks 2-3' for the ranks first .. end - 1."""
    return f"rank {first}" if end - first == 1 else f"ranks {first}-{end - 1}"
