"""CKA on layers that exist only after the model's setup() or configure_model() (Lightning's places for layers that
depend on the data), and CKA that never stops a run: named layers a model does not have give one warning naming
CKA and the others are compared. On models and data of this file's own (a character model whose embedding is built
from the data's vocabulary in setup(), a model built in configure_model(), models with a ModuleList), the
skeleton's model.py, and train.py and check.py run in-process with them."""

from __future__ import annotations

import glob
import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from any_models import EmbeddingInSetup
from conftest import QUICK, REPO
from pytorch_lightning import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from toy import ToyData
from wandb_records import wait_for_logged

from support.cka.layers import choose_layers, find_layers, pick_layers
from support.cka.monitor import CKAMonitor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CharData(pl.LightningDataModule):
    """Sequences of 6 character ids; the label is whether the first id is odd. The vocabulary is known only once
    setup() has read the data, as for a text dataset."""

    def __init__(self, samples: int = 96, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        generator = torch.Generator().manual_seed(0)
        x = torch.randint(0, 11, (self.hparams.samples, 6), generator=generator)
        self.vocab_size = int(x.max()) + 1  # from the data: setup() is the first place it is known
        third = self.hparams.samples // 3
        self.splits = {name: TensorDataset(x[a:b], x[a:b, 0] % 2) for name, (a, b) in
                       {"train": (0, third), "val": (third, 2 * third), "test": (2 * third, None)}.items()}

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.hparams.batch_size, shuffle=split == "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class CharModel(EmbeddingInSetup):
    """An embedding built in setup() from the DataModule's vocabulary, then a linear head (tests/any_models.py),
    naming both for CKA."""

    cka_layers = ["embed", "head"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PickedCharModel(CharModel):
    """The same, naming no layers: the monitor picks them, the embedding among them."""

    cka_layers = None


class ConfiguredModel(CharModel):
    """Every layer built in configure_model(), none named; `blocks` is a ModuleList (a container: no output)."""

    cka_layers = None

    def __init__(self, dim: int = 8) -> None:
        pl.LightningModule.__init__(self)  # not CharModel's: no layer here
        self.dim = dim

    def setup(self, stage: str) -> None:
        pass

    def configure_model(self) -> None:
        if not hasattr(self, "head"):
            self.embed = nn.Embedding(11, self.dim)
            self.blocks = nn.ModuleList([nn.Linear(self.dim, self.dim)])
            self.head = nn.Linear(self.dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.blocks[0](self.embed(x).mean(1))))


def fit(model: pl.LightningModule, callback: CKAMonitor, tmp_path: Path, epochs: int = 2) -> list[str]:
    """Fits, then validates; returns the warnings that name CKA."""
    trainer = Trainer(callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=str(tmp_path), accelerator="cpu", max_epochs=epochs)
    data = CharData()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=data)
        trainer.validate(model, datamodule=data, verbose=False)
    assert trainer.state.finished and trainer.current_epoch == epochs
    return [str(w.message) for w in caught if "CKA" in str(w.message)]


FIT_AND_VALIDATE = ["self-epoch000.png", "self-epoch001.png", "self-epoch002.png"]  # 2 epochs, then validate()


def heatmaps(tmp_path: Path) -> list[str]:
    return sorted(path.name for path in (tmp_path / "cka").glob("*.png"))


@pytest.mark.parametrize(("model_class", "names"), [(CharModel, ["embed", "head"]),
                                                    (PickedCharModel, ["head", "embed"]),
                                                    (ConfiguredModel, ["embed", "blocks.0", "head"])])
def test_layers_built_in_setup_or_configure_model_are_compared(model_class: type, names: list[str], tmp_path: Path):
    """Issue 33: a named layer built in setup() stopped the run ("unknown layer name(s) ['embed']"); picked layers
    were looked up before setup(), so the embedding was never compared (and configure_model()'s model had none)."""
    callback = CKAMonitor(every_n_epochs=1)
    assert fit(model_class(), callback, tmp_path) == []
    assert callback.names == names and not callback.off and callback.batches == 2  # 32 samples in batches of 16
    matrix = callback.self_cka.compute()
    assert matrix.shape == (len(names), len(names)) and torch.isfinite(matrix).all()
    assert torch.allclose(matrix.diagonal(), torch.ones(len(names), dtype=matrix.dtype))
    assert heatmaps(tmp_path) == FIT_AND_VALIDATE


@pytest.mark.parametrize(("layers", "found", "words"), [
    (["embed", "nosuch", "head"], ["embed", "head"], r"--cka.layers names \['nosuch'\], which CharModel does not "
                                                     r"have after its setup\(\) and configure_model\(\) \(its "
                                                     r"layers: head, embed\)"),
    (["head", "head", "embed.weight"], ["head"], r"\['embed.weight'\], which CharModel does not have"),
])
def test_names_the_model_lacks_give_one_warning_and_the_others_are_compared(layers: list[str], found: list[str],
                                                                           words: str, tmp_path: Path):
    callback = CKAMonitor(layers=layers, every_n_epochs=1)
    messages = fit(CharModel(), callback, tmp_path)
    assert len(messages) == 1 and "\n" not in messages[0], messages  # fit, then validate: said once
    assert messages[0].startswith(f"CKAMonitor compares {found} only: ") and re.search(words, messages[0])
    assert "--cka.layers='[a, b]'" in messages[0]  # the fix
    assert callback.names == found and not callback.off and heatmaps(tmp_path) == FIT_AND_VALIDATE


@pytest.mark.parametrize(("model_class", "layers", "words"), [
    (CharModel, ["nosuch", "embedd"], r"--cka.layers names \['nosuch', 'embedd'\], which CharModel does not"),
    (ConfiguredModel, ["blocks"], r"\['blocks'\], a ModuleList/ModuleDict, which has no output"),
    (type("Misnamed", (CharModel,), {"cka_layers": ["embedding"]}), None, r"Misnamed.cka_layers names "
                                                                          r"\['embedding'\], which Misnamed"),
    (type("Raises", (CharModel,), {"cka_layers": property(lambda self: {}["embed"])}), None,
     r"Raises.cka_layers raised KeyError: 'embed'"),
])
def test_no_layer_found_turns_cka_off_with_one_warning_and_the_run_goes_on(model_class: type, layers: list | None,
                                                                           words: str, tmp_path: Path):
    callback = CKAMonitor(layers=layers, every_n_epochs=1)
    messages = fit(model_class(), callback, tmp_path)
    assert len(messages) == 1 and messages[0].startswith("CKAMonitor is off for this run: "), messages
    assert re.search(words, messages[0]), messages[0]
    assert callback.off and not (tmp_path / "cka").exists()


def test_a_long_list_of_layers_is_cut_in_the_warning() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)])
    problem = find_layers(model, ["0", "99"]).problem(model, "--cka.layers")
    assert problem.endswith("(its layers: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ... (30 in all))"), problem


def skeleton_model() -> type:
    spec = importlib.util.spec_from_file_location("skeleton_model", REPO / "skeleton" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model


def test_a_model_in_one_sequential_compares_its_layers_the_skeleton_without_a_warning(tmp_path: Path):
    """Issue 33: a fresh skeleton project's first `make train` warned that CKA was off (its MLP is one nn.Sequential,
    one top-level layer): the layers inside it are compared instead."""
    with_optimizer = {"configure_optimizers": lambda self: torch.optim.SGD(self.parameters(), lr=0.1)}  # train.py's
    model = type("Skeleton", (skeleton_model(),), with_optimizer)(num_classes=3, in_features=8)  # as ToyData
    assert pick_layers(model) == ["net.0", "net.3"]
    assert pick_layers(nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2))))) == ["0.0", "0.1"]
    assert pick_layers(nn.Sequential(nn.Sequential(nn.Sequential(nn.Linear(2, 2))))) == ["0.0.0"]  # then off
    callback = CKAMonitor(every_n_epochs=1)
    trainer = Trainer(callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=str(tmp_path), accelerator="cpu", max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=ToyData())
    assert [str(w.message) for w in caught if "CKA" in str(w.message)] == []
    assert callback.names == ["net.0", "net.3"] and heatmaps(tmp_path) == ["self-epoch000.png"]


@pytest.fixture
def char_model_in_train(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.py as it reads after MODEL_CLASS = CharModel and DATAMODULE_CLASS = CharData."""
    import train

    for name, cls in (("MODEL_CLASS", CharModel), ("DATAMODULE_CLASS", CharData)):
        monkeypatch.setattr(train, name, cls)
        monkeypatch.setitem(train.CLI_SETUP, name.lower(), cls)


@pytest.mark.usefixtures("char_model_in_train")
def test_train_py_with_a_layer_built_in_setup_and_a_wrong_name_exits_0_with_one_warning(capfd):
    """The issue's run: --cka.layers naming an embedding built in setup() (and one name the model lacks) trains,
    logs CKA to wandb, and says one thing about CKA."""
    import train

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = train.main([*QUICK, "--trainer.max_epochs=1", "--cka.every_n_epochs=1", "--run_dir=run",
                              "--cka.layers=[embed, head, nosuch]"])
    messages = [str(w.message) for w in caught if "CKA" in str(w.message)]
    assert len(messages) == 1 and "CKAMonitor compares ['embed', 'head'] only" in messages[0], messages
    assert "error" not in capfd.readouterr().err.lower()
    assert "test/loss" in results and Path("run/cka/self-epoch000.png").is_file()
    logged, _ = wait_for_logged(glob.glob("run/wandb/offline-run-*/run-*.wandb")[0], {"cka/self/_type"})
    assert "cka/self/_type" in logged


@pytest.mark.usefixtures("char_model_in_train")
@pytest.mark.parametrize(("args", "state", "words"), [
    ([], "passed", "on, every 5 epoch(s): embed, head (CharModel.cka_layers)"),
    (["--cka.layers=[head, embedd]"], "FAILED", "--cka.layers names ['embedd'], which CharModel does not have"),
    (["--cka.every_n_epochs=0"], "passed", "off (--cka.every_n_epochs=0)"),
])
def test_make_check_says_what_the_monitor_found_after_setup(args: list[str], state: str, words: str, capsys):
    """Issue 33: make check said "cka off: no cka_layers" while training computed CKA on picked layers, and looked
    the layers up before setup(), so it could not see one built there."""
    import check

    check.main(["--only", "cka", *args])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[check] cka: ")]
    assert len(rows) == 1 and rows[0].startswith(f"[check] cka: {state}: ") and words in rows[0], rows


def test_a_reference_checkpoint_that_does_not_load_skips_the_comparison_with_one_warning(tmp_path: Path):
    """A CharModel's own checkpoint holds embed.weight, which a fresh CharModel (no setup() run) refuses to load:
    that once stopped the run; now self CKA goes on and one warning names the checkpoint and why."""
    trained = CharModel()
    fit(trained, CKAMonitor(every_n_epochs=0), tmp_path / "first", epochs=1)
    Trainer(logger=False, max_steps=0, enable_progress_bar=False).strategy.connect(trained)
    trained.trainer.save_checkpoint(tmp_path / "ref.ckpt")
    callback = CKAMonitor(reference_checkpoint=str(tmp_path / "ref.ckpt"), every_n_epochs=1)
    messages = fit(CharModel(), callback, tmp_path)
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert messages[0].startswith(f"CKAMonitor skips the reference comparison: {tmp_path / 'ref.ckpt'} does not load "
                                  "as a CharModel (RuntimeError: Error(s) in loading state_dict"), messages[0]
    assert callback.names == ["embed", "head"] and heatmaps(tmp_path) == FIT_AND_VALIDATE  # no reference-*.png


def test_a_cka_layers_string_names_one_layer() -> None:
    assert choose_layers(type("OneName", (CharModel,), {"cka_layers": "head"})()) == (["head"], True)
