"""CKA around training: `CKAMonitor` (the Lightning callback train.py registers as --cka), its heatmap
(`plot_cka_heatmap`), the class-path record every checkpoint carries, and the comparison of two checkpoints behind
`python cka.py A.ckpt B.ckpt` (`compare_checkpoints`, `main`). Which layers and their forward hooks live in
support/cka/layers.py, the numerics in support/cka/numerics.py; neither imports this.

Which layers: --cka.layers if given, else the model's `cka_layers` attribute if it has one, else `pick_layers`: the
model's top-level children that hold parameters (a ModuleList / ModuleDict replaced by its own such children,
torchmetrics metrics left out). They are looked up when fitting or validating starts, after the model's setup() and
configure_model(), Lightning's places for layers that depend on the data: layers built there are compared. CKA never
stops a run: named layers the model does not have are left out with one warning (the others are compared), and when
nothing can be compared (no layer found, fewer than two picked, a layer the forward never calls, an output that is
no tensor with the batch's size first), the monitor turns itself off with one warning and the run goes on.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from support import REPO_DIR
from support.atomic import write_atomic
from support.cka.layers import (
    HOW_TO_CHOOSE,
    LayerOutputError,
    LayerRecorder,
    choose_layers,
    find_layers,
    model_input,
    pick_layers,
)
from support.cka.numerics import MIN_SAMPLES, MinibatchCKA
from support.errors import SettingError
from support.run_dir.checks import require_checkpoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CKAMonitor", "LayerOutputError", "LayerRecorder", "choose_layers", "compare_checkpoints",
           "load_recorded", "main", "pick_layers", "plot_cka_heatmap", "record_class_paths"]

CLASS_PATHS = "class_paths"  # the checkpoint key of the class-path record


def plot_cka_heatmap(matrix: Tensor, x_names: Sequence[str], y_names: Sequence[str], path: str | None = None,
                     title: str = "CKA") -> Figure:
    """Heatmap of ``matrix[i, j]`` = CKA(x_names[i], y_names[j]) (rows on the vertical axis); returns the Figure.
    Uses the Agg canvas directly (no pyplot, never a display). With ``path`` the PNG is written atomically (a
    reader never sees a half-written image), its directory created if needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = torch.as_tensor(matrix).detach().cpu().double().numpy()
    if values.shape != (len(x_names), len(y_names)):
        raise ValueError(f"matrix shape {values.shape} does not match {len(x_names)} x names, {len(y_names)} y names")
    rows, cols = values.shape
    fig = Figure(figsize=(max(4.0, 0.6 * cols + 2.5), max(3.5, 0.5 * rows + 2.0)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    fig.colorbar(ax.imshow(values, vmin=0.0, vmax=1.0, cmap="magma", origin="lower", aspect="auto"), ax=ax, label="CKA")
    ax.set_xticks(range(cols), labels=list(y_names), rotation=45, ha="right")
    ax.set_yticks(range(rows), labels=list(x_names))
    ax.set_title(title)
    for i, j in [(i, j) for i in range(rows) for j in range(cols)] if rows <= 12 and cols <= 12 else []:
        ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,  # readable on small matrices
                color="black" if values[i, j] > 0.6 else "white")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    return fig


class CKAMonitor(pl.Callback):
    """Minibatch CKA between layers, accumulated over each validation epoch without storing activations.

    Records the outputs of the layers (see the module's docstring for which) with forward hooks during validation,
    adds each batch to an unbiased-HSIC accumulator (summed over DDP ranks), and at the epoch's end saves the
    layer-by-layer heatmap as RUN_DIR/cka/<name>-epochNNN.png and logs it to wandb as `cka/<name>`. With
    `reference_checkpoint` (a local .ckpt of the same model class; nothing is downloaded) it also compares the
    model's layers with the reference's, feeding the reference the first element of each (input, ...) batch, in the
    model's precision (--trainer.precision: the reference converted as the model is, run inside the same autocast
    or dtype context), so a model compared with its own checkpoint gets exactly its self matrix. It writes the
    model and DataModule class paths into every checkpoint, even when off, so `python cka.py CKPT_A CKPT_B` can
    rebuild both without knowing their modules.

    The defaults keep it cheap enough to leave on (benchmarks/cka_validation.py): a few batches estimate the
    matrix well, and a heatmap costs ~0.1 s to draw, so it runs every 5th epoch on the first 8 batches.

    Args:
        layers: module names as in `model.named_modules()`, looked up once the model's setup() has run (a name
            it lacks, or a ModuleList / ModuleDict, is left out with one warning); default: the model's
            `cka_layers`, else the top-level layers that hold parameters.
        reference_checkpoint: path of a checkpoint to compare against, or None.
        every_n_epochs: compute every n-th training epoch's validation (always in `trainer.validate`); 0: off.
        max_batches: validation batches per computation (None: all of them).
    """

    def __init__(self, layers: list[str] | None = None, reference_checkpoint: str | None = None,
                 every_n_epochs: int = 5, max_batches: int | None = 8) -> None:
        self.layers, self.reference_checkpoint, self.every_n_epochs = layers, reference_checkpoint, every_n_epochs
        self.max_batches = max_batches
        self.reference: pl.LightningModule | None = None
        self.recorders: list[LayerRecorder] = []
        self.names: list[str] = []
        self.batches = self.skipped = 0
        self.off = False  # turned off for good: the layers cannot be compared (warned once)
        self.off_reason = self.layer_problem = ""  # why it is off; named layers it left out (for make check)
        self.chosen_by = ""  # who chose self.names: "--cka.layers", "<Model>.cka_layers" or the picking
        self.warned: set[str] = set()
        self.reference_off = False  # batches give no input to feed the reference (warned once)

    def _turn_off(self, why: str) -> None:
        self.off, self.off_reason = True, why
        self._stop_recording()
        self._warn_once(f"CKAMonitor is off for this run: {why}; {HOW_TO_CHOOSE}")

    def _warn_once(self, message: str) -> None:  # a fit then a validate on one monitor: said once, not twice
        if message not in self.warned:
            self.warned.add(message)
            rank_zero_warn(message)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The layers are looked up later (on_fit_start, on_validation_start): the model's setup() runs after this.
        if self.every_n_epochs <= 0 or self.off or not self.reference_checkpoint:
            return
        path = Path(self.reference_checkpoint).expanduser()
        if not path.is_file():  # a setting that can never work: before any training, not after an epoch
            raise SettingError(f"--cka.reference_checkpoint {path} is not a file: give a local checkpoint")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._find_layers(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":  # trainer.validate(); a fit's validation uses on_fit_start's layers
            self._find_layers(trainer, pl_module)

    def _find_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The layers to compare, looked up after the model's setup() and configure_model(): the named ones the
        model has (one warning names the others), else the picked ones; and the reference model, loaded once."""
        if self.every_n_epochs <= 0 or self.off:
            return
        try:
            names, named = choose_layers(pl_module, self.layers)
        except Exception as err:  # a cka_layers property with a bug of its own: CKA is no reason to stop the run
            return self._turn_off(f"{type(pl_module).__name__}.cka_layers raised {type(err).__name__}: {err}")
        self.chosen_by = ("--cka.layers" if self.layers else f"{type(pl_module).__name__}.cka_layers") if named \
            else "picked: its layers with parameters"
        if named:
            layers = find_layers(pl_module, names)
            self.layer_problem = layers.problem(pl_module, self.chosen_by) or ""
            if self.layer_problem and not layers.found:
                return self._turn_off(self.layer_problem)
            if self.layer_problem:
                self._warn_once(f"CKAMonitor compares {layers.found} only: {self.layer_problem}; {HOW_TO_CHOOSE}")
            names = layers.found
        elif len(names) < 2:
            return self._turn_off(f"it compares layers, and the model has {len(names)} top-level layer(s) "
                                  f"with parameters {names}")
        self.names = names
        self.self_cka = MinibatchCKA(len(self.names))
        if self.reference_checkpoint and self.reference is None and not self.reference_off:
            self.reference = self._load_reference(trainer, pl_module)
        if self.reference is not None and (missing := find_layers(self.reference, self.names).unknown):
            self.reference_off = True  # built in setup(), which a loaded checkpoint never ran: self CKA only
            self._warn_once(f"CKAMonitor skips the reference comparison: the model loaded from "
                            f"{self.reference_checkpoint} has no layer(s) {missing}")
        elif self.reference is not None:
            self.cross_cka = MinibatchCKA(len(self.names))

    def _load_reference(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> pl.LightningModule | None:
        """The reference model in the dtype the model runs in (bf16-true, 64-true: the precision plugin converts
        the model too), or None with one warning when the checkpoint is not one of this model class."""
        path = Path(self.reference_checkpoint).expanduser()
        try:
            reference = type(pl_module).load_from_checkpoint(path, map_location="cpu")
        except Exception as err:  # another model's checkpoint, or weights of layers setup() builds: never a stop
            self.reference_off = True
            first_line = next(iter(str(err).strip().splitlines()), "")[:300]
            self._warn_once(f"CKAMonitor skips the reference comparison: {path} does not load as a "
                            f"{type(pl_module).__name__} ({type(err).__name__}: {first_line})")
            return None
        return trainer.precision_plugin.convert_module(reference.eval().requires_grad_(False))

    def _due(self, trainer: pl.Trainer) -> bool:
        if self.every_n_epochs <= 0 or self.off or not self.names or trainer.sanity_checking:
            return False
        return trainer.state.fn != "fit" or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _stop_recording(self) -> None:
        for recorder in self.recorders:
            recorder.__exit__(None, None, None)
        self.recorders = []

    def _compares_reference(self) -> bool:
        return self.reference is not None and not self.reference_off

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        self.batches = self.skipped = 0
        self.self_cka.to(pl_module.device).reset()
        self.recorders = [LayerRecorder(pl_module, self.names).__enter__()]
        if self._compares_reference():
            self.reference.to(pl_module.device)
            self.cross_cka.to(pl_module.device).reset()
            self.recorders.append(LayerRecorder(self.reference, self.names).__enter__())

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object,
                                batch: object, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.recorders:
            return
        try:
            acts = self.recorders[0].collect()
        except LayerOutputError as err:
            return self._turn_off(f"the layers {self.names} cannot be compared: {err}")
        if acts[0].shape[0] < MIN_SAMPLES:  # the unbiased estimator's minimum: skip a tiny ragged last batch
            self.skipped += 1
            return
        self.self_cka.update(acts)
        if len(self.recorders) > 1 and (inputs := model_input(batch)) is None:
            self.reference_off = True
            self.recorders.pop().__exit__(None, None, None)
            rank_zero_warn(f"CKAMonitor skips the reference comparison: a validation batch is a "
                           f"{type(batch).__name__}, not an (input, ...) tuple or list, so the reference model's "
                           "input is unknown")
        elif len(self.recorders) > 1:
            precision = trainer.precision_plugin  # the reference runs as the model's validation_step ran: its input
            with torch.no_grad(), precision.forward_context():  # converted, inside autocast under *-mixed
                self.reference(precision.convert_input(inputs))
            try:
                self.cross_cka.update(acts, self.recorders[1].collect())
            except LayerOutputError as err:
                return self._turn_off(f"the reference's layers {self.names} cannot be compared: {err}")
        self.batches += 1
        if self.max_batches is not None and self.batches >= self.max_batches:
            self._stop_recording()  # enough for this epoch: the remaining batches run without hooks

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        self._stop_recording()
        if self.skipped:
            rank_zero_warn(f"CKA skipped {self.skipped} validation batch(es) of fewer than {MIN_SAMPLES} samples")
        if self.batches == 0:
            return
        n = len(self.names)  # torchmetrics squeezes a 1 x 1 result to 0-dim: reshape
        results = {"self": self.self_cka.compute().reshape(n, n)}  # compute() sums the accumulators across ranks
        if self._compares_reference():
            results["reference"] = self.cross_cka.compute().reshape(n, n)
        if trainer.is_global_zero:
            for name, matrix in results.items():
                self._publish(trainer, name, matrix)

    def _publish(self, trainer: pl.Trainer, name: str, matrix: torch.Tensor) -> None:
        path = Path(trainer.default_root_dir) / "cka" / f"{name}-epoch{trainer.current_epoch:03d}.png"
        y_names = self.names if name == "self" else [f"ref {n}" for n in self.names]
        figure = plot_cka_heatmap(matrix, self.names, y_names, path=str(path),
                                  title=f"CKA {name}, epoch {trainer.current_epoch}")
        figure.clear()
        if isinstance(trainer.logger, WandbLogger):
            trainer.logger.log_image(key=f"cka/{name}", images=[str(path)], step=trainer.global_step)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        record_class_paths(checkpoint, pl_module, trainer.datamodule)  # whether CKA is on or off


# ---------------------------------------------------------------- the class-path record: writer and reader
def record_class_paths(checkpoint: dict, model: nn.Module, datamodule: object | None = None) -> None:
    """Store "module.Class" of the model (and DataModule) in a checkpoint dict, for `load_recorded`."""
    classes = {"model": type(model)} | ({} if datamodule is None else {"datamodule": type(datamodule)})
    checkpoint[CLASS_PATHS] = {key: f"{cls.__module__}.{cls.__qualname__}" for key, cls in classes.items()}


def load_recorded(checkpoint: str, key: str) -> object:
    """Rebuild the "model" or "datamodule" of a checkpoint from its class-path record (`load_from_checkpoint`),
    importing its module by the recorded name: the repository root is on the path, so its scripts' modules are."""
    require_checkpoint(checkpoint)  # not torch's advice to unpickle with weights_only=False, for a YAML file say
    paths = torch.load(checkpoint, map_location="cpu", weights_only=True).get(CLASS_PATHS, {})
    if key not in paths:
        raise ValueError(f"{checkpoint} names no {key} class: use a checkpoint written by train.py")
    module, _, name = paths[key].rpartition(".")
    if str(REPO_DIR) not in sys.path:
        sys.path.insert(0, str(REPO_DIR))
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{checkpoint}'s {key} class {paths[key]} cannot be imported here ({err}): put its folder "
                         "on PYTHONPATH") from err
    return cls.load_from_checkpoint(checkpoint, map_location="cpu")


# ---------------------------------------------------------------- two checkpoints: python cka.py A.ckpt B.ckpt
def compare_checkpoints(ckpt_a: str, ckpt_b: str, out: str, layers: list[str] | None = None,
                        data_dir: str | None = None) -> tuple[Tensor, list[str], list[str]]:
    """Minibatch CKA between the layers of two trained models over A's validation data; writes the heatmap. Returns
    the matrix and the layers of A (its rows) and of B (its columns)."""
    model_a, model_b = (load_recorded(path, "model").eval() for path in (ckpt_a, ckpt_b))
    data = load_recorded(ckpt_a, "datamodule")
    if data_dir is not None:
        if "data_dir" not in data.hparams:
            raise ValueError(f"--data_dir given, but {type(data).__name__} takes no data_dir")
        data.hparams.data_dir = data_dir
    # Each model's own layers (rows: A's, columns: B's): two checkpoints of different models compare fully.
    (names_a, _), (names_b, _) = choose_layers(model_a, layers), choose_layers(model_b, layers)
    if not names_a or not names_b:
        raise ValueError("a model has no layers with parameters: name the layers with --layers")
    data.prepare_data()
    data.setup("validate")
    metric = MinibatchCKA(len(names_a), len(names_b))
    with LayerRecorder(model_a, names_a) as rec_a, LayerRecorder(model_b, names_b) as rec_b, torch.no_grad():
        for batch in data.val_dataloader():
            if (x := model_input(batch)) is None:
                raise ValueError(f"the validation batches are {type(batch).__name__}s, not (input, ...) tuples")
            model_a(x)
            model_b(x)
            acts_a, acts_b = rec_a.collect(), rec_b.collect()
            if len(x) >= MIN_SAMPLES:  # the unbiased estimator's minimum; only a tiny ragged last batch is left out
                metric.update(acts_a, acts_b)
    matrix = metric.compute().reshape(len(names_a), len(names_b))  # 0-dim for 1 x 1 (torchmetrics squeezes it)
    run_a, run_b = (Path(os.path.abspath(path)).parent.parent.name for path in (ckpt_a, ckpt_b))  # runs/<run>/
    plot_cka_heatmap(matrix, [f"A {n}" for n in names_a], [f"B {n}" for n in names_b], path=out,
                     title=f"CKA: {run_a} vs {run_b}").clear()
    return matrix, names_a, names_b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cka.py",
                                     description="Compare the layers of two trained checkpoints by minibatch CKA.")
    parser.add_argument("ckpt_a")
    parser.add_argument("ckpt_b")
    parser.add_argument("--out", default="cka_heatmap.png", help="PNG to write")
    parser.add_argument("--layers", nargs="+",
                        help="module names (default: the model's cka_layers, else its top-level layers that hold "
                        "parameters)")
    parser.add_argument("--data_dir", help="where the validation data lives, if not where A was trained")
    args = parser.parse_args(argv)
    for path in (args.ckpt_a, args.ckpt_b):
        if not os.path.isfile(path):
            print(f"error: checkpoint {path} does not exist", file=sys.stderr)
            return 2
    out_dir = Path(args.out).resolve().parent
    existing = next(path for path in [out_dir, *out_dir.parents] if path.exists())  # what mkdir would start from
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        print(f"error: --out {args.out}: {existing} is not a directory this user can write; choose another --out",
              file=sys.stderr)
        return 2
    try:
        matrix, names_a, names_b = compare_checkpoints(args.ckpt_a, args.ckpt_b, args.out, args.layers, args.data_dir)
    except (ValueError, OSError, LayerOutputError) as err:
        print(f"error: {getattr(err, 'strerror', None) and f'{err.filename}: {err.strerror}' or err}", file=sys.stderr)
        return 2
    print(f"CKA, heatmap written to {args.out}; rows: layers of A ({args.ckpt_a}), columns: layers of B "
          f"({args.ckpt_b})")
    width = max(len(name) for name in names_a) + 4  # "A <name>" and two spaces
    print(" " * width + "  ".join(f"B {name}" for name in names_b))
    for name, row in zip(names_a, matrix.tolist(), strict=True):
        print(f"A {name}".ljust(width) + "  ".join(f"{value:.4f}".rjust(len(b) + 2) for value, b in zip(row, names_b,
                                                                                                     strict=True)))
    return 0
