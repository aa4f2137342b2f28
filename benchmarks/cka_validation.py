"""What does CKAMonitor (on by default) add to a validation epoch? Prints times with and without it, and the ratio.

    python benchmarks/cka_validation.py                 # MNIST-sized validation: 10,000 1x28x28 images, batch 128
    python benchmarks/cka_validation.py --dataset digits --batch_size 64     # the default digits (270 images)

Same model and data as train.py trains (train.MODEL_CLASS and train.DATAMODULE_CLASS, with their defaults; the
synthetic dataset is declared in the DataModule's DATASETS, as the example's datamodule.py has it), same
validation loader, one torch thread. Three variants, alternating over
--repeats epochs each: no CKA; CKA accumulated over the epoch (hooks + MinibatchCKA updates, the per-batch
cost, on CKAMonitor's default max_batches); and CKA with the epoch-end heatmap written as PNG (a fixed cost,
independent of the data). `trainer.validate` computes CKA every time; during training it runs every
every_n_epochs-th epoch, so the last line spreads its cost over those epochs.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from pytorch_lightning import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from support.cka.monitor import CKAMonitor  # noqa: E402


class AccumulateOnly(CKAMonitor):
    def _publish(self, trainer, name, matrix) -> None:  # compute the matrix, skip the heatmap
        pass


def register_synthetic(samples: int) -> None:
    def build(_raw: Path) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        return {"x": torch.randint(0, 256, (samples, 1, 28, 28), generator=generator, dtype=torch.uint8),
                "y": torch.randint(0, 10, (samples,), generator=generator)}

    datamodule = importlib.import_module(train.DATAMODULE_CLASS.__module__)  # where the DataModule declares datasets
    datamodule.DATASETS["bench_val"] = datamodule.DatasetSpec(1, 10, 255, build)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="bench_val")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    register_synthetic(60_000)  # val_fraction 1/6: 10,000 validation images
    times: dict[str, list[float]] = {"no CKA": [], "CKA accumulated": [], "CKA + heatmap PNG": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = train.DATAMODULE_CLASS(dataset=args.dataset, data_dir=tmp, batch_size=args.batch_size,
                                      val_fraction=0.1667 if args.dataset == "bench_val" else 0.15)
        data.prepare_data()
        data.setup("validate")  # so the DataModule's properties (in_channels, ...) are known
        model = train.MODEL_CLASS(**{name: getattr(data, name) if hasattr(data, name) else data.hparams[name]
                                     for name, _ in train.linked_arguments()})  # as train.py links them
        for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
            for name, callbacks in (("no CKA", []), ("CKA accumulated", [AccumulateOnly()]),
                                    ("CKA + heatmap PNG", [CKAMonitor()])):
                trainer = Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False, accelerator="cpu",
                                  enable_model_summary=False, default_root_dir=tmp)
                start = time.perf_counter()
                trainer.validate(model, datamodule=data, verbose=False)
                if repeat:
                    times[name].append(time.perf_counter() - start)
    base = statistics.median(times["no CKA"])
    print(f"validation epoch, {args.dataset}, batch {args.batch_size}, 1 torch thread (median of {args.repeats}):")
    for name, values in times.items():
        print(f"  {name:18s} {statistics.median(values) * 1000:8.1f} ms   {statistics.median(values) / base:.3f}x")
    every = CKAMonitor().every_n_epochs
    extra = statistics.median(times["CKA + heatmap PNG"]) / base - 1
    print(f"during training, with the default every_n_epochs={every}: +{100 * extra / every:.1f}% per validation epoch")


if __name__ == "__main__":
    main()
