"""How much does the template cost over a plain PyTorch loop? Prints throughput of both and their ratio.

    python benchmarks/overhead.py                     # MNIST-sized: 60,000 1x28x28 images, batch 128 (~4 min)
    python benchmarks/overhead.py --samples 12800 --repeats 2      # a quick look (~1 min)

Both sides train the same model (model.py's defaults) on the same data through the same DataModule loaders,
with the same optimizer, batch size and one torch thread, and both run a validation pass after each epoch.
The template side is train.py's Trainer exactly as `python train.py` builds it: wandb logger (offline here),
checkpointing, early stopping, learning-rate monitor, progress reporting. Time is measured from the start of the
first training epoch to the end of the last (so one-off start-up is excluded on both sides), alternating the
two sides `--repeats` times; the ratio compares medians. Goal: template / plain >= 0.97.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["WANDB_MODE"] = "offline"  # never create online runs from a benchmark

from pytorch_lightning import Callback  # noqa: E402

import train  # noqa: E402

EXAMPLE_DATA = inspect.getmodule(train.DATAMODULE_CLASS)  # datamodule.py, found through train.py's one place


def register_synthetic_mnist(samples: int) -> None:
    """An MNIST-shaped dataset declared the way a user declares their own (see datamodule.py)."""

    def build(_raw_dir: Path) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (samples,), generator=generator)
        x = torch.randint(0, 256, (samples, 1, 28, 28), generator=generator, dtype=torch.uint8)
        return {"x": x, "y": y}

    EXAMPLE_DATA.DATASETS["bench_mnist"] = EXAMPLE_DATA.DatasetSpec(in_channels=1, num_classes=10, max_value=255,
                                                                    build=build)


class EpochTimer(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


# val_fraction 1/6 and no test split: a 60,000-image set gives 50,000 training and 10,000 validation images.
DATA = dict(dataset="bench_mnist", batch_size=128, val_fraction=0.1667, test_fraction=0.0)
LR = 1e-3


def template_args(work: Path, epochs: int) -> list[str]:
    return [f"--data.{key}={value}" for key, value in DATA.items()] + [
        f"--data.data_dir={work / 'data'}", f"--trainer.max_epochs={epochs}", "--trainer.num_sanity_val_steps=0",
        "--early_stopping.patience=1000", f"--optimizer.lr={LR}"]


def time_template(work: Path, epochs: int, run: int) -> tuple[float, int]:
    cli = train.build_cli(template_args(work, epochs) + [f"--run_dir={work / f'run{run}'}"])
    timer = EpochTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    import wandb

    wandb.finish()
    return timer.seconds, cli.trainer.global_step


def time_plain(work: Path, epochs: int) -> tuple[float, int]:
    dm = train.DATAMODULE_CLASS(data_dir=str(work / "data"), **DATA)
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)
    model = train.MODEL_CLASS()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)  # the template's default optimizer
    steps, start = 0, time.perf_counter()
    for _epoch in range(epochs):
        model.train()
        for x, y in dm.train_dataloader():
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
        model.eval()
        with torch.inference_mode():
            correct = total = 0
            for x, y in dm.val_dataloader():
                logits = model(x)
                F.cross_entropy(logits, y)
                correct += int((logits.argmax(1) == y).sum())
                total += len(y)
    return time.perf_counter() - start, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    register_synthetic_mnist(args.samples)
    plain, template = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train.DATAMODULE_CLASS(data_dir=str(work / "data"), **DATA).prepare_data()
        time_plain(work, 1)  # warm-up: first-touch allocations and caches, measured by neither side
        for run in range(args.repeats):
            seconds, steps = time_plain(work, args.epochs)
            plain.append(steps / seconds)
            seconds, lightning_steps = time_template(work, args.epochs, run)
            assert lightning_steps == steps, (lightning_steps, steps)
            template.append(steps / seconds)
            print(f"repeat {run + 1}: plain {plain[-1]:.2f} steps/s, template {template[-1]:.2f} steps/s "
                  f"({steps} steps of batch 128)", flush=True)
    ratio = statistics.median(template) / statistics.median(plain)
    progress = "tqdm bar" if sys.stdout.isatty() else "log lines"
    print(f"\nthroughput, 1 torch thread, progress as {progress}: plain loop {statistics.median(plain):.2f} steps/s, "
          f"template {statistics.median(template):.2f} steps/s")
    print(f"template / plain = {ratio:.3f}  (goal >= 0.97)")


if __name__ == "__main__":
    main()
