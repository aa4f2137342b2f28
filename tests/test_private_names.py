"""The private names of Lightning and wandb that the template still uses, each where no public API does the job.
When an upgrade renames or changes one, its test here fails with a message saying what broke, instead of a run
failing somewhere deep inside. Each use in the code carries a comment pointing here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_wandb_setup_loads_the_current_environment(monkeypatch: pytest.MonkeyPatch):
    """support/training/wandb_access.py: wandb's settings as wandb.init would load them now (the public singleton
    caches the environment of its first use)."""
    from wandb.sdk.wandb_setup import _WandbSetup

    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    settings = _WandbSetup(pid=os.getpid()).settings
    assert settings.base_url == "http://127.0.0.1:9", "wandb's _WandbSetup no longer reads WANDB_BASE_URL"
    assert settings.api_key == "k" * 40, "wandb's _WandbSetup no longer reads WANDB_API_KEY"


def test_wandb_reads_the_netrc_entry_for_its_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """support/training/wandb_access.py: wandb's own netrc reader, the one `wandb login` pairs with."""
    from wandb.sdk.lib import wbauth

    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine example.org\n  login user\n  password {'p' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wbauth.read_netrc_auth(host="https://example.org") == "p" * 40, "wbauth.read_netrc_auth changed"


def test_wandb_logger_keeps_init_arguments_and_run_where_the_fallback_changes_them(tmp_path: Path):
    """support/training/callbacks.py FallbackWandbLogger: switches _wandb_init["mode"] and clears _experiment."""
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), mode="offline", id="abc")
    assert isinstance(logger._wandb_init, dict) and logger._wandb_init.get("mode") == "offline", \
        "WandbLogger no longer keeps wandb.init's arguments in _wandb_init"
    assert hasattr(logger, "_experiment") and logger._experiment is None, "WandbLogger no longer has _experiment"


def test_lightning_rebuilds_a_dataloader_subclass_with_another_sampler():
    """support/run_dir/resumable.py: a DataLoader subclass gets the resumable sampler the way Lightning puts in its
    own."""
    from pytorch_lightning.trainer.states import RunningStage
    from pytorch_lightning.utilities.data import _update_dataloader
    from torch.utils.data import DataLoader, SequentialSampler

    class MyLoader(DataLoader):
        def __init__(self, dataset: list, extra: int, **kwargs: object) -> None:
            self.extra = extra
            super().__init__(dataset, **kwargs)

    loader = MyLoader(list(range(6)), extra=3, batch_size=2, shuffle=True)
    sampler = SequentialSampler(range(6))
    rebuilt = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
    assert type(rebuilt) is MyLoader and rebuilt.sampler is sampler and rebuilt.extra == 3, \
        "pytorch_lightning.utilities.data._update_dataloader no longer rebuilds loaders with a new sampler"


def test_torchmetrics_keeps_reset_values_where_minibatch_cka_keeps_them_float64():
    """cka.py MinibatchCKA._apply: a model cast to bf16 must not cast the CKA sums, nor their reset values."""
    import torch

    from cka import MinibatchCKA

    metric = MinibatchCKA(2).to(torch.bfloat16)
    assert set(metric._defaults) == {"hsic_xy", "hsic_xx", "hsic_yy"}, "torchmetrics renamed Metric._defaults"
    metric.reset()
    assert metric.hsic_xy.dtype == torch.float64, "MinibatchCKA's sums no longer stay float64 under .to(bf16)"


def test_lightning_keeps_the_sample_count_of_logged_means_where_exact_epoch_means_converts_it():
    """support/run_dir/resumable.py ExactEpochMeans: the count of a mean logged with self.log is
    `cumulated_batch_size` of each value in trainer._results, an integer tensor."""
    import torch
    from pytorch_lightning import LightningModule, Trainer

    seen: list[object] = []

    class Logs(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
            self.log("loss", self.layer(batch[0]).mean())

        def on_test_batch_end(self, *args: object) -> None:
            seen[:] = [getattr(result, "cumulated_batch_size", None) for result in self.trainer._results.values()]

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(6, 1)), batch_size=4)
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(Logs(), data)
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor) and seen[0].item() == 6 and \
        not seen[0].is_floating_point(), "Lightning no longer keeps the count in _results' cumulated_batch_size"
