"""Runs per hour with K runs packed on one GPU (slurm_train.py --runs-per-gpu K), for K = 1, 2, 4: one table.

    python benchmarks/packing.py                    # on the CPU: one core stands for the GPU (runs per core-hour)
    python benchmarks/packing.py --accelerator gpu  # on GPU 0: runs per GPU-hour and each run's peak GPU memory
    python benchmarks/packing.py --runs 8 --epochs 5

Each K trains the same --runs rows of the example (a grid over seed_everything) with `slurm_train.py --local
--max-concurrent 1 --runs-per-gpu K`: one task slot, as one GPU of an array task, so K runs share it. On the CPU
the slot is one core (the launcher and every run are pinned to core 0 with one thread each), which measures what the
machinery costs and what overlapping the runs' start-up and data loading gains; on a GPU the runs share GPU 0. The
ratio is against K = 1 measured in the same call. Peak memory per run (GPU) is the most nvidia-smi reported for one
run's process, sampled every 0.2 s (where it lists no processes: the GPU's peak use above idle, divided by K).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--cka.every_n_epochs=0"]


def gpu_memory_used() -> int:
    """MiB in use on the GPU, all processes together (nvidia-smi)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True).stdout
    return int(out.split()[0]) if out.split() else 0


def peak_memory_sampler(stop: threading.Event, peaks: dict[int, int]) -> None:
    """Samples nvidia-smi's per-process GPU memory (MiB) until `stop`; keeps each pid's largest, and under -1 the
    largest total (where a container hides the processes, per-process figures are empty)."""
    while not stop.is_set():
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        for pid, used in re.findall(r"(\d+),\s*(\d+)", out):
            peaks[int(pid)] = max(peaks.get(int(pid), 0), int(used))
        peaks[-1] = max(peaks.get(-1, 0), gpu_memory_used())
        stop.wait(0.2)


def measure(k: int, runs: int, epochs: int, accelerator: str, work: Path) -> dict[str, float]:
    """Trains `runs` rows packed k per slot; returns the wall time, runs per hour and the peak memory of a run."""
    sweep = {"name": f"packing-{k}", "program": "train.py", "method": "grid",
             "metric": {"name": "val/loss", "goal": "minimize"},
             "parameters": {"seed_everything": {"values": list(range(runs))}}}
    config = work / f"sweep-{k}.json"
    config.write_text(json.dumps(sweep))
    command = [sys.executable, str(REPO / "slurm_train.py"), "--local", "--sweep-config", str(config), "--runs-dir",
               str(work / f"k{k}"), "--max-concurrent", "1", "--runs-per-gpu", str(k),
               "--gpus-per-node", "1" if accelerator == "gpu" else "0", "--",
               f"--trainer.max_epochs={epochs}", f"--trainer.accelerator={accelerator}", "--trainer.devices=1",
               "--early_stopping.patience=100", *QUICK]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    if accelerator == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    else:
        command = ["taskset", "-c", "0", *command]  # one core: the "GPU" the k runs share
    peaks: dict[int, int] = {}
    idle = gpu_memory_used() if accelerator == "gpu" else 0
    stop = threading.Event()
    sampler = threading.Thread(target=peak_memory_sampler, args=(stop, peaks), daemon=True)
    if accelerator == "gpu":
        sampler.start()
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    stop.set()
    if done.returncode != 0:
        raise SystemExit(f"K={k}: slurm_train.py --local failed (exit {done.returncode}): "
                         f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}; logs in {work / f'k{k}'}")
    per_run = [used for pid, used in peaks.items() if pid != -1]
    peak = max(per_run) if per_run else (peaks.get(-1, idle) - idle) / k if peaks else float("nan")
    return {"seconds": seconds, "runs_per_hour": runs / seconds * 3600, "peak_mib": peak}


def table(results: dict[int, dict[str, float]], accelerator: str) -> str:
    base = results[min(results)]["runs_per_hour"]
    per = "GPU-hour" if accelerator == "gpu" else "core-hour"
    lines = [f"| runs per {'GPU' if accelerator == 'gpu' else 'core'} (K) | wall time | runs per {per} | vs K=1 |"
             + (" peak GPU memory per run |" if accelerator == "gpu" else ""),
             "|---|---|---|---|" + ("---|" if accelerator == "gpu" else "")]
    for k, r in results.items():
        lines.append(f"| {k} | {r['seconds']:.0f} s | {r['runs_per_hour']:.0f} | {r['runs_per_hour'] / base:.2f}x |"
                     + (f" {r['peak_mib']:.0f} MiB |" if accelerator == "gpu" else ""))
    return "\n".join(lines)


def run(accelerator: str, runs: int, epochs: int, ks: tuple[int, ...] = (1, 2, 4)) -> str:
    work = Path(tempfile.mkdtemp(prefix="packing-"))
    try:
        results = {k: measure(k, runs, epochs, accelerator, work) for k in ks}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return table(results, accelerator)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--runs", type=int, default=4, help="rows per K (default 4)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3)")
    args = parser.parse_args(argv)
    if args.accelerator == "cpu" and shutil.which("taskset") is None:
        raise SystemExit("taskset not found (util-linux): it pins the runs to one core")
    print(f"packing: {args.runs} runs of the example, {args.epochs} epochs each, per K; on "
          f"{'GPU 0' if args.accelerator == 'gpu' else 'one CPU core'}")
    print(run(args.accelerator, args.runs, args.epochs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
