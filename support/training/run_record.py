"""What a run logged and what it cost, in its directory, for `sweep.py --status` (support/results/) to read without
wandb's server or torch:

    RUN_DIR/metrics.jsonl  {"monitor": "val/loss", "mode": "min"} at each start, then one line per validation epoch
                           ({"epoch", "step", "time", "metrics"}) and one with the test metrics ({"test", "time"})
    RUN_DIR/cost.json      per start: wall time (from the process's start), processes, GPUs and their model,
                           GPU-hours, peak GPU memory per device (torch.cuda's own statistics), peak CPU memory of
                           rank 0; rewritten at every checkpoint and at the end, so a killed run keeps what it had
                           at its last checkpoint

Rank 0 writes; under DDP the peak GPU memory of every device is gathered at each validation. The totals also go
into wandb's summary (cost/*), so the online UI shows them. GPU utilisation and energy need NVML, which the lock
does not hold: those fields stay empty (shown as "–").
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import Callback

from support.atomic import write_atomic
from support.results.files import COST_FILE, METRICS_FILE
from support.training.wandb_logger import FallbackWandbLogger


def process_start() -> float:
    """When this process started (Linux: /proc), else now: a run's wall time and GPU-hours include its start-up
    (imports, data loading), during which its GPUs are held all the same."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()
            if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)}


class RunRecord(Callback):
    """Writes RUN_DIR/metrics.jsonl and RUN_DIR/cost.json (rank 0)."""

    def __init__(self, monitor: str | None, mode: str) -> None:
        self.monitor, self.mode = monitor, mode
        self.run_dir: Path | None = None
        self.started = time.time()
        self.gpu_peaks_mb: list[float] = []
        self.attempt = 0
        self.fitting = False  # only a fit writes: evaluate.py's test or validation writes nothing into the run

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.run_dir = Path(trainer.default_root_dir)
        if not trainer.is_global_zero or stage != "fit":
            return
        self.fitting = True
        self.started = process_start()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.append({"monitor": self.monitor, "mode": self.mode, "time": time.time()})
        self.attempt = len(self.read_cost()["attempts"])
        self.write_cost(trainer, final=False)

    def append(self, line: dict[str, Any]) -> None:
        assert self.run_dir is not None
        with open(self.run_dir / METRICS_FILE, "a") as f:  # one short line, appended: a killed run keeps the rest
            f.write(json.dumps(line) + "\n")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":  # every rank: one small all_gather
            peak = torch.tensor(torch.cuda.max_memory_allocated(pl_module.device) / 2**20, device=pl_module.device)
            self.gpu_peaks_mb = [round(float(v), 1) for v in trainer.strategy.all_gather(peak).reshape(-1)]

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.fitting:
            return
        self.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "time": time.time(),
                     "metrics": scalars(trainer.callback_metrics)})

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and self.fitting:  # the test train.py runs after its fit
            self.append({"test": scalars(trainer.callback_metrics), "time": time.time()})

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero and self.fitting:
            self.write_cost(trainer, final=False)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero and self.fitting and self.run_dir is not None and self.run_dir.is_dir():
            with contextlib.suppress(OSError):  # best effort: the disk may be what failed
                self.write_cost(trainer, final=False)  # a failed or stopped run keeps its cost up to now

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        cost = self.write_cost(trainer, final=True)
        if isinstance(trainer.logger, FallbackWandbLogger):  # nothing once wandb's service has gone
            trainer.logger.update_summary({f"cost/{key}": value for key, value in cost.items()
                                           if isinstance(value, (int, float)) and value is not None})

    def read_cost(self) -> dict[str, Any]:
        assert self.run_dir is not None
        try:
            cost = json.loads((self.run_dir / COST_FILE).read_text())
            return cost if isinstance(cost.get("attempts"), list) else {"attempts": []}
        except (OSError, ValueError, AttributeError):
            return {"attempts": []}

    def write_cost(self, trainer: Trainer, final: bool) -> dict[str, Any]:
        cuda = torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda"
        gpus = trainer.num_devices * trainer.num_nodes if cuda else 0
        wall = time.time() - self.started
        entry = {"start": self.started, "updated": time.time(), "wall_s": round(wall, 1), "final": final,
                 "processes": trainer.world_size, "gpus": gpus,
                 "gpu_model": torch.cuda.get_device_name(trainer.strategy.root_device) if cuda else None,
                 "gpu_hours": round(wall * gpus / 3600, 4) if cuda else None,
                 "peak_gpu_mem_mb": self.gpu_peaks_mb or None,
                 "peak_cpu_mem_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                 "gpu_util_mean": None, "energy_kwh": None}  # NVML (nvidia-ml-py) is not in the lock
        cost = self.read_cost()
        cost["attempts"] = cost["attempts"][:self.attempt] + [entry]
        write_atomic(self.run_dir / COST_FILE, json.dumps(cost, indent=1) + "\n")
        return entry
