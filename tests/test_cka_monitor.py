"""support/cka/monitor.py: layer recording, layer choice, the heatmap, CKAMonitor in validation and training, the
checkpoints' class-path record and `python cka.py A.ckpt B.ckpt`, on the tests' own toy model and data (tests/toy.py)
and small variants of it; one test runs train.py's example model."""

from __future__ import annotations

import glob
import os
import re
import warnings
from pathlib import Path

import matplotlib.image
import pytest
import torch
from conftest import QUICK, REPO, run_script
from pytorch_lightning import Trainer
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import Metric
from toy import ToyClassifier, ToyData
from wandb_records import wait_for_logged

from support.cka.monitor import (
    CKAMonitor,
    LayerOutputError,
    LayerRecorder,
    choose_layers,
    main,
    pick_layers,
    plot_cka_heatmap,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ LayerRecorder, layer choice, heatmap
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        self.rnn = nn.GRU(4, 5, batch_first=True)
        self.heads = nn.ModuleList([nn.Linear(5, 3)])
        self.named = nn.ModuleDict({"out": nn.Identity()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        seq, _ = self.rnn(h.unsqueeze(1))
        return self.named["out"](self.heads[0](seq[:, -1]))


def test_layer_recorder_records_and_removes_hooks() -> None:
    torch.manual_seed(0)
    model, x = Net(), torch.randn(10, 6)
    names = ["body.0", "body.1", "rnn", "heads.0"]
    with LayerRecorder(model, names) as rec:
        out = model(x)
        acts = rec.collect()
        with pytest.raises(RuntimeError, match="no output recorded for layer"):
            rec.collect()  # cleared after collecting, so a stale batch is never returned
    first = model.body[0](x)
    seq, _ = model.rnn(model.body(x).unsqueeze(1))  # a tuple output: its first tensor is recorded
    for got, want in zip(acts, [first, torch.relu(first), seq, model.heads[0](seq[:, -1])], strict=True):
        torch.testing.assert_close(got, want)
        assert not got.requires_grad
    torch.testing.assert_close(acts[-1], out)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ZeroDivisionError), LayerRecorder(model, ["rnn"]):
        raise ZeroDivisionError  # hooks are removed on errors too
    assert all(not m._forward_hooks for m in model.modules())


def test_layer_recorder_rejects_containers_and_unknown_names() -> None:
    model = Net()
    for container in ("heads", "named"):  # no forward of their own
        with pytest.raises(ValueError, match="container"):
            LayerRecorder(model, [container])
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['bdy.0'\]; valid names: .*'body.2'"):
        LayerRecorder(model, ["body.0", "bdy.0"])
    assert all(not m._forward_hooks for m in model.modules())
    x = torch.randn(10, 6)
    with LayerRecorder(model, ["body", "body.2"]) as rec:  # a Sequential has a forward: its output is a block's
        model(x)
        block, last = rec.collect()
    assert torch.equal(block, last) and torch.equal(block, model.body(x).detach())


def test_layer_recorder_says_which_outputs_cannot_be_compared() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.spare = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> dict:
            return {"mean": self.b(self.a(x).mean(0)), "all": self.a(x)}

    model, x = Odd(), torch.randn(8, 3)
    for names, message in ((["a", "spare"], r"no output recorded for layer\(s\) \['spare'\]"),
                           (["a", "b"], r"first \(batch\) dimension: \{'a': 8, 'b': 3\}")):
        with LayerRecorder(model, names) as rec, pytest.raises(LayerOutputError, match=message):
            model(x)
            rec.collect()
    with LayerRecorder(model, [""]) as rec, pytest.raises(LayerOutputError, match=r"no batch dimension.*'dict'"):
        model(x)  # "" is the model itself, whose output is a dict
        rec.collect()


class FeatureMetric(Metric):  # a metric holding a network (as FID's Inception), which is no layer of the model
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 2)
        self.add_state("total", torch.zeros(()), "sum")

    def update(self, x: torch.Tensor) -> None:
        self.total += self.net(x).sum()

    def compute(self) -> torch.Tensor:
        return self.total


def test_layers_are_named_or_picked() -> None:
    model = Net()
    model.metric, model.dropout = FeatureMetric(), nn.Dropout()
    model.blocks = nn.ModuleList([nn.ModuleDict({"a": nn.Linear(1, 1), "b": nn.ReLU()}), nn.ReLU(), nn.Linear(1, 1)])
    picked = ["body", "rnn", "heads.0", "blocks.0.a", "blocks.2"]  # parameters only, containers opened, no metric
    assert pick_layers(model) == picked
    assert choose_layers(model) == (picked, False)
    assert choose_layers(model, ["rnn", "body.0"]) == (["rnn", "body.0"], True)
    model.cka_layers = ["body.2", "rnn"]
    assert choose_layers(model) == (["body.2", "rnn"], True)
    assert choose_layers(model, ["rnn"]) == (["rnn"], True)
    assert pick_layers(ToyClassifier()) == ["body", "head"]


def test_plot_heatmap_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "cka.png"
    matrix = torch.tensor([[1.0, 0.5, 0.2, 0.0], [0.3, 0.9, 0.1, 0.7], [0.0, 0.2, 0.4, 1.0]])
    fig = plot_cka_heatmap(matrix, ["a", "b", "c"], ["w", "x", "y", "z"], path=str(path), title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    width, height = (fig.get_size_inches() * 120).round().astype(int)
    assert image.shape[:2] == (height, width)
    assert os.listdir(path.parent) == ["cka.png"]  # the temporary file was renamed, not left behind
    ax = fig.axes[0]
    assert ax.images[0].get_clim() == (0.0, 1.0) and len(fig.axes) == 2  # fixed colour range, colour bar
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert len(ax.texts) == 12 and ax.texts[1].get_text() == "0.50"
    big = plot_cka_heatmap(torch.rand(13, 13), [str(i) for i in range(13)], [str(i) for i in range(13)])
    assert len(big.axes[0].texts) == 0  # no annotations beyond 12 x 12
    with pytest.raises(ValueError, match="does not match"):
        plot_cka_heatmap(matrix, ["a"], ["w"])


# ------------------------------------------------------------------ CKAMonitor on the toy model and variants of it
class Named(ToyClassifier):
    cka_layers = ["body.0", "head"]


class Listed(ToyClassifier):  # a ModuleList whose layer the forward never calls
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.ModuleList([nn.Linear(2, 2)])


class OneLayer(ToyClassifier):  # a single layer with parameters: nothing to compare it with
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Identity()
        self.body = nn.Linear(8, 3)  # (an nn.Sequential would be opened: test_cka_layers.py)


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": self.linear(h)}


class DictOutput(ToyClassifier):  # a layer whose output is a dict
    def __init__(self) -> None:
        super().__init__()
        self.split = Split()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.split(self.body(x))["h"])


class Unbatched(ToyClassifier):  # a layer that sees the batch's mean, not the batch
    def __init__(self) -> None:
        super().__init__()
        self.stats = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(h) + 0 * self.stats(h.mean(0)).sum()


class DictData(ToyData):  # validation batches are dicts
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.hparams.batch_size,
                          collate_fn=lambda rows: {"x": torch.stack([r[0] for r in rows]),
                                                   "y": torch.stack([r[1] for r in rows])})


class DictModel(ToyClassifier):
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate((batch["x"], batch["y"]), "val")


def make_trainer(tmp_path: Path, *callbacks: object, **options: object) -> Trainer:
    return Trainer(callbacks=list(callbacks), logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path), accelerator="cpu", **options)


def validate_with(callback: CKAMonitor, model: ToyClassifier, tmp_path: Path, data: ToyData | None = None) -> Trainer:
    trainer = make_trainer(tmp_path, callback)
    trainer.validate(model, datamodule=data or ToyData(), verbose=False)  # 36 samples: batches of 16, 16 and 4
    return trainer


def cka_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "CKA" in str(w.message)]


def save_reference(model: ToyClassifier, path: Path) -> None:
    trainer = Trainer(logger=False, max_steps=0, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)


@pytest.mark.parametrize(("model_class", "layers"), [(ToyClassifier, ["body", "head"]), (Named, Named.cka_layers)])
def test_any_model_validates_with_its_picked_or_named_layers(model_class: type, layers: list[str], tmp_path: Path):
    callback = CKAMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate_with(callback, model_class(), tmp_path)
    assert cka_warnings(caught) == [] and callback.names == layers and callback.batches == 3
    matrix = callback.self_cka.compute()
    assert matrix.shape == (2, 2) and torch.allclose(matrix.diagonal(), torch.ones(2, dtype=matrix.dtype))
    assert (tmp_path / "cka" / "self-epoch000.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_reference_checkpoint_equal_to_the_model_gives_the_self_matrix(precision: str, tmp_path: Path):
    """While training, in the model's precision: a reference left in float32 stopped the first CKA epoch under
    bf16-true (dtype mismatch) and, run outside autocast under bf16-mixed, differed from the model's activations."""
    torch.manual_seed(0)
    model = ToyClassifier(lr=0.0)  # one epoch of training leaves the weights as the reference has them
    save_reference(model, tmp_path / "ref.ckpt")
    callback = CKAMonitor(reference_checkpoint=str(tmp_path / "ref.ckpt"), every_n_epochs=1)
    make_trainer(tmp_path, callback, precision=precision, max_epochs=1).fit(model, datamodule=ToyData())
    self_matrix, cross = callback.self_cka.compute(), callback.cross_cka.compute()
    assert torch.allclose(cross, self_matrix, atol=1e-10)
    assert torch.allclose(torch.diagonal(cross), torch.ones(2, dtype=cross.dtype), atol=1e-4)
    assert (tmp_path / "cka" / "reference-epoch000.png").is_file()


def test_cka_can_be_turned_off_limited_and_tiny_batches_are_skipped(tmp_path: Path):
    validate_with(CKAMonitor(every_n_epochs=0), ToyClassifier(), tmp_path)
    assert not (tmp_path / "cka").exists()
    limited = CKAMonitor(max_batches=2)
    validate_with(limited, ToyClassifier(), tmp_path)
    assert limited.batches == 2 and not limited.recorders  # hooks removed after the second batch
    with pytest.warns(UserWarning, match="skipped 1 validation batch"):
        validate_with(CKAMonitor(), ToyClassifier(), tmp_path / "tiny", ToyData(batch_size=11))  # 36 = 3 * 11 + 3
    assert (tmp_path / "tiny" / "cka" / "self-epoch000.png").is_file()


def test_a_missing_reference_checkpoint_fails_before_training(tmp_path: Path):
    """The one CKA setting that stops a run: a path that can never work (layers never do: test_cka_layers.py)."""
    with pytest.raises(ValueError, match="nowhere.ckpt") as error:
        validate_with(CKAMonitor(reference_checkpoint="nowhere.ckpt"), ToyClassifier(), tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("model_class", "why"), [(OneLayer, r"1 top-level layer\(s\) with parameters \['body'\]"),
                                                  (Listed, r"no output recorded for layer\(s\) \['extra.0'\]"),
                                                  (DictOutput, r"no batch dimension to compare: \{'split': 'dict'\}"),
                                                  (Unbatched, r"\{'body': 16, 'head': 16, 'stats': 2\}")])
def test_unusable_picked_layers_turn_the_monitor_off_with_one_warning(model_class: type, why: str, tmp_path: Path):
    callback = CKAMonitor(every_n_epochs=1)
    trainer = make_trainer(tmp_path, callback, max_epochs=2, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model_class(), datamodule=ToyData())
        trainer.validate(trainer.model, datamodule=ToyData(), verbose=False)
    assert trainer.current_epoch == 2 and trainer.state.finished
    messages = cka_warnings(caught)
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert messages[0].startswith("CKAMonitor is off for this run: ") and "--cka.layers='[a, b]'" in messages[0]
    assert re.search(why, messages[0]), messages[0]  # the reason is named
    assert callback.off and not callback.recorders and not (tmp_path / "cka").exists()
    assert all(not m._forward_hooks for m in trainer.model.modules())


def test_dict_batches_skip_the_reference_comparison_with_one_warning(tmp_path: Path):
    model = DictModel()
    save_reference(model, tmp_path / "ref.ckpt")
    callback = CKAMonitor(reference_checkpoint=str(tmp_path / "ref.ckpt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            validate_with(callback, model, tmp_path, DictData())
    messages = cka_warnings(caught)
    assert len(messages) == 1 and "skips the reference comparison: a validation batch is a dict" in messages[0]
    assert sorted(p.name for p in (tmp_path / "cka").iterdir()) == ["self-epoch000.png"]
    assert callback.batches == 3 and not callback.off


# ------------------------------------------------------------------ class-path record and python cka.py A B
class TwoHeads(ToyClassifier):
    """Another model: layers body, head and extra, so its checkpoint's layers differ from ToyClassifier's."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(super().forward(x))


def train_toy(run_dir: Path, seed: int, callback: CKAMonitor, model_class: type = ToyClassifier) -> Path:
    torch.manual_seed(seed)
    trainer = make_trainer(run_dir, callback, max_epochs=2, enable_checkpointing=False)
    trainer.fit(model_class(), datamodule=ToyData())
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_command_line_compares_two_trained_checkpoints(tmp_path: Path, capsys):
    a = train_toy(tmp_path / "a", 1, CKAMonitor())
    b = train_toy(tmp_path / "b", 2, CKAMonitor(every_n_epochs=0))  # recorded with CKA off too
    for path in (a, b):
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        assert checkpoint["class_paths"] == {"model": "toy.ToyClassifier", "datamodule": "toy.ToyData"}
    tests = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))}
    result = run_script("cka.py", str(a), str(b), "--out", "ab.png", **tests)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("CKA, heatmap written to ab.png; rows: layers of A")
    assert lines[1].split() == ["B", "body", "B", "head"]  # the matrix comes with its labels
    assert [line.split()[:2] for line in lines[2:]] == [["A", "body"], ["A", "head"]]
    rows = [[float(v) for v in line.split()[2:]] for line in lines[2:]]
    assert len(rows) == 2 and all(len(row) == 2 and all(-0.1 < v <= 1.0 + 1e-9 for v in row) for row in rows)
    assert Path("ab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unimportable = run_script("cka.py", str(a), str(b), **{"PYTHONPATH": ""})
    assert unimportable.returncode == 2 and unimportable.stderr.count("\n") == 1
    assert "class toy.ToyClassifier cannot be imported here" in unimportable.stderr
    # the same command line in process (toy is importable here; importing Lightning costs a child ~15 s)
    assert main([str(a), str(a), "--out", "aa.png"]) == 0
    diagonal = [float(line.split()[2 + i]) for i, line in enumerate(capsys.readouterr().out.splitlines()[2:])]
    assert diagonal == pytest.approx([1.0] * 2, abs=1e-9)  # a model compared with itself
    assert main([str(a), "nowhere.ckpt"]) == 2
    assert capsys.readouterr().err.strip() == "error: checkpoint nowhere.ckpt does not exist"
    assert main([str(a), str(b), "--out", "one.png", "--layers", "body.0"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3 and Path("one.png").is_file()
    assert main([str(a), str(b), "--data_dir", "elsewhere"]) == 2
    assert capsys.readouterr().err.strip() == "error: --data_dir given, but ToyData takes no data_dir"
    # Models whose layers differ: each compared with all of its own layers, and the output says which are which.
    c = train_toy(tmp_path / "c", 3, CKAMonitor(every_n_epochs=0), TwoHeads)
    assert main([str(a), str(c), "--out", "ac.png"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["B", "body", "B", "head", "B", "extra"] and len(lines) == 4
    # What is not a checkpoint, or where the heatmap cannot go, is one line saying so.
    Path("config.yaml").write_text("model:\n  depth: 2\n")
    assert main([str(a), "config.yaml"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml is not a checkpoint" in err and "weights_only" not in err and err.count("\n") == 1
    Path("afile").write_text("a file")
    assert main([str(a), str(b), "--out", "afile/heatmap.png"]) == 2
    err = capsys.readouterr().err
    assert "afile is not a directory this user can write" in err and err.count("\n") == 1


# ------------------------------------------------------------------ the example model, through train.py
@pytest.mark.example_model
def test_training_with_cka_saves_and_logs_heatmaps():
    import train

    results = train.main(QUICK + ["--trainer.max_epochs=5"])  # by default every 5th epoch
    run_dir = Path(results["run_dir"])
    pngs = sorted(p.name for p in (run_dir / "cka").iterdir())
    assert pngs == ["self-epoch004.png"]
    assert (run_dir / "cka" / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wandb_file = glob.glob(str(run_dir / "wandb/offline-run-*/run-*.wandb"))[0]
    logged, _ = wait_for_logged(wandb_file, {"cka/self/_type"})  # a wandb image is logged as a nested record
    assert "cka/self/_type" in logged
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["class_paths"] == {key: f"{cls.__module__}.{cls.__qualname__}" for key, cls in
                                         (("model", train.MODEL_CLASS), ("datamodule", train.DATAMODULE_CLASS))}
