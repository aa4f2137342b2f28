"""What only GPUs exercise, checked on this machine's GPUs in a few minutes: one table, and an exit status.

    make gpu-check                                         # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --keep /scratch/gpu-check   # keep the runs' directories there
    python benchmarks/gpu_check.py --accelerator cpu       # rehearse every check on the CPU: tests this script only

check                  passes when
torch build            support/gpu_check.py finds nothing wrong: the driver runs torch's CUDA, and torch has kernels
                       for every GPU (what train.py checks before training)
bf16 training          train.py trains the example 5 epochs on one GPU under bf16-mixed (16-mixed where the GPU has
                       no bf16), test accuracy >= 0.9
CKA reference          an epoch under bf16-true with --cka.reference_checkpoint runs (it died at the first CKA epoch)
CKA exactness          cka.cka_matrix of float32 activations on the GPU equals float64 on the CPU to 1e-6
CKA speed              the same matrix is faster on the GPU than on the CPU (the ratio is printed)
DDP resume             2 GPUs, DDP, --trainer.deterministic=true: a run stopped by SIGTERM mid-epoch and resumed ends
                       with the weights of an uninterrupted run, bit for bit
Then, on a GPU, benchmarks/packing.py's table: runs per GPU-hour and peak memory per run with K = 1, 2, 4 runs packed
on GPU 0 (--no-packing: skip it).

Exit status: 0 when every check that ran passed (the table says which were skipped, and why: DDP needs 2 GPUs); 1
when a check failed; 3 when there is no GPU, so that every check was skipped and nothing was checked.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import cka  # noqa: E402
from support import gpu_check  # noqa: E402

NO_GPU = 3  # exit status: every check skipped, as there is no GPU
QUICK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# The resume check: 4-sample batches (~158 per rank and epoch on the example's digits) validated every quarter epoch,
# so the first last.ckpt appears early in epoch 0 and the SIGTERM sent then stops the run mid-epoch.
DDP = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.deterministic=true", "--trainer.max_epochs=2",
       "--data.batch_size=4", "--trainer.val_check_interval=0.25", "--model.dropout=0.3",
       "--early_stopping.patience=100", "--cka.every_n_epochs=0"]


@dataclass
class Result:
    check: str
    status: str  # "pass", "FAIL" or "skipped"
    detail: str
    seconds: float = 0.0


class Checks:
    """The checks, run on `accelerator` ("gpu", or "cpu" to rehearse them) in the directory `work`."""

    def __init__(self, work: Path, accelerator: str) -> None:
        self.work, self.accelerator = work, accelerator
        self.device = torch.device("cuda" if accelerator == "gpu" else "cpu")
        self.bf16 = accelerator == "cpu" or torch.cuda.is_bf16_supported(including_emulation=False)
        self.checkpoint: Path | None = None  # the bf16 run's, the CKA reference check's reference

    def train(self, run_dir: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(run_dir, *args), capture_output=True, text=True, timeout=900,
                              env={**os.environ, "WANDB_MODE": "offline"})  # the checks' runs are nobody's experiments

    def command(self, run_dir: str, *args: str) -> list[str]:
        return [sys.executable, str(REPO / "train.py"), *QUICK, f"--trainer.accelerator={self.accelerator}",
                f"--run_dir={self.work / run_dir}", *args]

    def bf16_training(self) -> Result:
        precision = "bf16-mixed" if self.bf16 else "16-mixed"
        run = self.train("bf16", "--trainer.devices=1", f"--trainer.precision={precision}", "--trainer.max_epochs=5")
        accuracy = re.search(r"test/acc=([\d.]+)", run.stdout)
        if run.returncode != 0 or accuracy is None:
            return Result("bf16 training", "FAIL", f"{precision}: exit {run.returncode}: {last_line(run)}")
        self.checkpoint = self.work / "bf16" / "checkpoints" / "last.ckpt"
        passed = float(accuracy.group(1)) >= 0.9
        return Result("bf16 training", "pass" if passed else "FAIL",
                      f"{precision}, 5 epochs: test accuracy {accuracy.group(1)} (at least 0.9)")

    def cka_reference(self) -> Result:
        if self.checkpoint is None:
            return Result("CKA reference", "skipped", "no checkpoint: bf16 training failed")
        precision = "bf16-true" if self.bf16 else "16-true"
        run = self.train("reference", "--trainer.devices=1", f"--trainer.precision={precision}",
                         "--trainer.max_epochs=1", "--cka.every_n_epochs=1",
                         f"--cka.reference_checkpoint={self.checkpoint}")
        heatmap = self.work / "reference" / "cka" / "reference-epoch000.png"
        if run.returncode != 0 or not heatmap.is_file():
            return Result("CKA reference", "FAIL", f"{precision}: exit {run.returncode}: {last_line(run)}")
        return Result("CKA reference", "pass", f"{precision}, an epoch against the bf16 run's checkpoint: drawn")

    def cka_exactness(self) -> Result:
        activations = layer_activations(2048)
        worst = 0.0
        for debiased in (False, True):
            exact = cka.cka_matrix([x.double() for x in activations], debiased=debiased)
            here = cka.cka_matrix([x.to(self.device) for x in activations], debiased=debiased).cpu()
            worst = max(worst, (here - exact).abs().max().item())
        return Result("CKA exactness", "pass" if worst <= 1e-6 else "FAIL",
                      f"float32 on {self.device.type} vs float64 on the CPU, 4 layers x 2048 samples, linear and "
                      f"debiased: largest difference {worst:.1e} (at most 1e-6)")

    def cka_speed(self) -> Result:
        if self.device.type == "cpu":
            return Result("CKA speed", "skipped", "the CPU against itself")
        activations = layer_activations(8192)
        on_gpu = [x.to(self.device) for x in activations]
        gpu = best_time(lambda: cka.cka_matrix(on_gpu), synchronize=torch.cuda.synchronize)
        cpu = best_time(lambda: cka.cka_matrix(activations), repeats=1)
        return Result("CKA speed", "pass" if cpu > gpu else "FAIL",
                      f"4 layers x 8192 samples: {gpu * 1000:.1f} ms on the GPU, {cpu * 1000:.0f} ms on "
                      f"{torch.get_num_threads()} CPU threads ({cpu / gpu:.0f}x)")

    def ddp_resume(self) -> Result:
        full = self.train("ddp-full", *DDP)
        if full.returncode != 0:
            return Result("DDP resume", "FAIL", f"the uninterrupted run: exit {full.returncode}: {last_line(full)}")
        last, log = self.work / "ddp-stopped" / "checkpoints" / "last.ckpt", self.work / "ddp-stopped.log"
        with open(log, "w") as output:
            stopped = subprocess.Popen(self.command("ddp-stopped", *DDP), stdout=output, stderr=subprocess.STDOUT,
                                       env={**os.environ, "WANDB_MODE": "offline"})
            while not last.exists() and stopped.poll() is None:  # the first validation: training is under way
                time.sleep(0.02)
            stopped.send_signal(signal.SIGTERM)  # to rank 0 only, as from `kill`: every rank stops at one batch
            stopped.wait(timeout=600)
        if stopped.returncode != 128 + signal.SIGTERM:
            lines = log.read_text().strip().splitlines() or ["no output"]
            return Result("DDP resume", "FAIL", f"the stopped run exited {stopped.returncode}, not 143: {lines[-1]}")
        position = torch.load(last, map_location="cpu", weights_only=False)["loops"]["fit_loop"]
        epoch, batch = position["epoch_progress"]["current"]["completed"], \
            position["epoch_loop.batch_progress"]["current"]["completed"]
        resumed = self.train("ddp-stopped", *DDP, "--ckpt_path=last")
        if resumed.returncode != 0:
            return Result("DDP resume", "FAIL", f"the resumed run: exit {resumed.returncode}: {last_line(resumed)}")
        a, b = (torch.load(self.work / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
                for run in ("ddp-full", "ddp-stopped"))
        differ = [key for key, value in a["state_dict"].items() if not torch.equal(value, b["state_dict"][key])]
        same_step = a["global_step"] == b["global_step"]
        where = f"stopped by SIGTERM in epoch {epoch}, after batch {batch}"
        if differ or not same_step:
            return Result("DDP resume", "FAIL", f"{where}; resumed, it ends with other weights ({len(differ)} of "
                                                f"{len(a['state_dict'])} tensors differ, steps {a['global_step']} vs "
                                                f"{b['global_step']})")
        return Result("DDP resume", "pass", f"{where}; resumed, it ends with the uninterrupted run's weights, bit for "
                                            f"bit ({len(a['state_dict'])} tensors, step {a['global_step']})")


def layer_activations(samples: int) -> list[torch.Tensor]:
    """Four layers' float32 activations, correlated as a network's are (each a map of the one before)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 256, generator=generator)
    layers = []
    for width in (512, 1024, 256, 64):
        x = torch.relu(x @ torch.randn(x.shape[1], width, generator=generator) / x.shape[1] ** 0.5)
        layers.append(x)
    return layers


def best_time(work: Callable[[], object], repeats: int = 5, synchronize: Callable[[], None] = lambda: None) -> float:
    work()  # warm-up: kernels, allocations
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def last_line(run: subprocess.CompletedProcess) -> str:
    lines = [line for line in (run.stderr or run.stdout).splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_checks(work: Path, accelerator: str) -> tuple[list[Result], str]:
    """Every check's result, and a line describing the machine."""
    started = time.perf_counter()
    facts = gpu_check.gather_facts()
    problem = gpu_check.problem(facts)
    if facts.visible_by is None:
        build = Result("torch build", "skipped", "no GPU: nvidia-smi, CUDA_VISIBLE_DEVICES and SLURM_GPUS_ON_NODE "
                                                  "show none")
    else:
        build = Result("torch build", "FAIL" if problem else "pass", problem or (
            f"torch {facts.torch.version} (CUDA {facts.torch.cuda}) runs on every GPU (driver {facts.driver or '?'} "
            f"for CUDA {facts.driver_cuda or '?'})"))
    build.seconds = time.perf_counter() - started
    gpus = facts.torch.device_count if build.status == "pass" else 0
    names = sorted({f"{name} ({cap // 10}.{cap % 10})" if cap else name for name, cap in facts.gpus})
    machine = f"{gpus} GPU(s): {', '.join(names) or 'none'}; torch {facts.torch.version}"
    if accelerator == "gpu" and gpus == 0:
        why = "no GPU" if build.status == "skipped" else "torch cannot use the GPUs (torch build)"
        return [build] + [Result(name, "skipped", why) for name in
                          ("bf16 training", "CKA reference", "CKA exactness", "CKA speed", "DDP resume")], machine
    checks = Checks(work, accelerator)
    results = [build]
    for name, check in (("bf16 training", checks.bf16_training), ("CKA reference", checks.cka_reference),
                        ("CKA exactness", checks.cka_exactness), ("CKA speed", checks.cka_speed),
                        ("DDP resume", checks.ddp_resume)):
        if name == "DDP resume" and accelerator == "gpu" and gpus < 2:
            results.append(Result(name, "skipped", f"it needs 2 GPUs; torch sees {gpus}"))
            continue
        started = time.perf_counter()
        try:
            result = check()
        except Exception as err:  # a check that breaks is a failed check; the others still run
            result = Result(name, "FAIL", f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}")
        result.seconds = time.perf_counter() - started
        results.append(result)
    return results, machine


def table(results: list[Result]) -> str:
    width = max(len(result.check) for result in results)
    rows = [f"{'check':<{width}}  {'result':<7}  {'time':>6}  details"]
    rows += [f"{r.check:<{width}}  {r.status:<7}  {r.seconds:5.1f}s  {r.detail}" for r in results]
    return "\n".join(rows)


def exit_status(results: list[Result]) -> int:
    if any(result.status == "FAIL" for result in results):
        return 1
    return NO_GPU if all(result.status == "skipped" for result in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu",
                        help="cpu: rehearse the checks on the CPU (DDP over gloo); it says nothing of GPUs")
    parser.add_argument("--keep", metavar="DIR", help="write the runs into DIR and keep them (default: a temporary "
                                                      "directory, removed at the end)")
    parser.add_argument("--no-packing", action="store_true", help="skip the packing table (benchmarks/packing.py)")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        results, machine = run_checks(work, args.accelerator)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    status = exit_status(results)
    rehearsal = " (a rehearsal on the CPU: it says nothing of GPUs)" if args.accelerator == "cpu" else ""
    print(f"GPU check{rehearsal}: {machine}; {time.perf_counter() - started:.0f} s in all")
    print(table(results))
    if skipped := [r.check for r in results if r.status == "skipped"]:
        print(f"skipped ({len(skipped)} of {len(results)}): {', '.join(skipped)}")
    print({0: "every check that ran passed", 1: "FAILED: see the table",
           NO_GPU: f"no GPU here: nothing was checked (exit status {NO_GPU})"}[status])
    if args.accelerator == "gpu" and status == 0 and not args.no_packing:  # GPUs that train: how many runs fit
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import packing  # benchmarks/packing.py, beside this script

        print(f"packing (benchmarks/packing.py): 4 runs of the example, 3 epochs each, per K, on GPU 0\n"
              f"{packing.run('gpu', runs=4, epochs=3)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
