"""Lazy layers (torch.nn.LazyLinear) train under DDP through train.py and resume exactly: the template gives them
their shapes from one real batch before DDP wraps the model (support/training/lazy_layers.py); torch's DDP refuses a
module with uninitialized parameters, and Lightning leaves that to the user."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import QUICK, REPO, run_script
from torch import nn
from toy import ToyClassifier, ToyData

from support.training.lazy_layers import MaterializeLazyLayers, has_lazy_layers

DRIVER = f'''
import sys
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
from torch import nn
from toy import ToyClassifier, ToyData
import train


class LazyToy(ToyClassifier):
    """The toy MLP with its first layer lazy: its input size comes from the first batch."""

    def __init__(self, features: int = 8, num_classes: int = 3, hidden: int = 16, dropout: float = 0.2,
                 lr: float = 0.1) -> None:
        super().__init__(features, num_classes, hidden, dropout, lr)
        self.body = nn.Sequential(nn.LazyLinear(hidden), nn.ReLU(), nn.Dropout(dropout))


train.MODEL_CLASS = train.CLI_SETUP["model_class"] = LazyToy
train.DATAMODULE_CLASS = train.CLI_SETUP["datamodule_class"] = ToyData
train.main()
'''
DDP = ["--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--cka.every_n_epochs=0",
       "--early_stopping.patience=100", *QUICK]


@pytest.mark.slow
def test_a_lazy_model_trains_on_two_ddp_processes_and_resumes_exactly(tmp_path: Path) -> None:
    (tmp_path / "lazy_train.py").write_text(DRIVER)

    def train(*args: str) -> None:
        result = run_script(str(tmp_path / "lazy_train.py"), *DDP, *args, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    train("--run_dir=full", "--trainer.max_epochs=3")
    train("--run_dir=part", "--trainer.max_epochs=2")
    train("--run_dir=part", "--ckpt_path=last", "--trainer.max_epochs=3")
    full, resumed = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
                     for run in ("full", "part"))
    assert full["global_step"] == resumed["global_step"] > 0 and full["epoch"] == resumed["epoch"] == 2
    assert full["state_dict"]["body.0.weight"].shape == (16, 8)  # the lazy layer, materialized
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


class NeverCalled(ToyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.LazyLinear(2)  # no step calls it: it can get no shape


def test_a_lazy_layer_no_step_calls_is_named(tmp_path: Path) -> None:
    from pytorch_lightning import Trainer

    from support.errors import SettingError

    data, model = ToyData(), NeverCalled()
    data.setup()
    trainer = Trainer(logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.datamodule = data  # what fit(model, datamodule=...) sets before the setup hooks
    with pytest.raises(SettingError, match="NeverCalled still has uninitialized lazy layers"):
        MaterializeLazyLayers().setup(trainer, model, "fit")
    assert has_lazy_layers(model) and model.training  # back in training mode


def test_the_shape_pass_leaves_no_trace_in_the_models_torchmetrics():
    """The shape pass runs a step, which updates torchmetrics accumulators: found by `make check` (evaluate.py's
    accuracy differed from training's on a model with a LazyLinear head), they are reset afterwards."""
    import torch
    from pytorch_lightning import LightningModule
    from torchmetrics.classification import MulticlassAccuracy

    from support.training.lazy_layers import shapes_only

    class Lazy(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.head, self.acc = torch.nn.LazyLinear(3), MulticlassAccuracy(3)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.acc(self.head(x).argmax(1), y)

    model = Lazy()
    with shapes_only(model):
        model.validation_step((torch.randn(4, 5), torch.tensor([0, 1, 2, 0])), 0)
    assert model.head.weight.shape == (3, 5) and model.acc.update_count == 0
