"""Models and data unlike the example and tests/toy.py, each built a way Lightning documents: layers made in setup()
or configure_model() from the data, a vocabulary the DataModule makes in setup(), streaming data (IterableDataset),
manual optimization with two optimizers (a GAN). Small enough to train in seconds on one CPU thread."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "


class TrainAndValidation(pl.LightningDataModule):
    """Loaders of the train_set and val_set that setup() makes (the validation set also tests)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class CharData(TrainAndValidation):
    """Character sequences labelled by whether they hold more vowels than the mean. The vocabulary, and so its size,
    exists only after setup(): `vocab_size` is a property reading it."""

    def __init__(self, batch_size: int = 8, length: int = 12, samples: int = 128) -> None:
        super().__init__()
        self.batch_size, self.length, self.samples = batch_size, length, samples

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def setup(self, stage: str) -> None:
        self.vocab = sorted(set(TEXT))
        codes = torch.tensor([self.vocab.index(c) for c in TEXT * 8])
        starts = torch.randint(0, len(codes) - self.length, (self.samples,), generator=torch.Generator().manual_seed(0))
        x = torch.stack([codes[s:s + self.length] for s in starts])
        vowels = torch.tensor([self.vocab.index(c) for c in "aeiou"])
        counts = torch.isin(x, vowels).sum(1).float()
        y = (counts > counts.mean()).long()
        split = self.samples * 3 // 4
        self.train_set, self.val_set = TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])



class Classifies(pl.LightningModule):
    """The steps shared by the models below: cross-entropy, logged as train/loss, val/loss and test/loss."""

    def step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=stage != "train")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.step(batch, "test")


class EmbeddingInSetup(Classifies):
    """A character model whose embedding is sized by the data's vocabulary, so it is built in setup(), where
    Lightning's documentation puts such layers."""

    def __init__(self, dim: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.head = nn.Linear(dim, 2)

    def setup(self, stage: str) -> None:
        if not hasattr(self, "embed"):
            self.embed = nn.Embedding(self.trainer.datamodule.vocab_size, self.hparams.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).mean(1))


class EmbeddingInConfigureModel(EmbeddingInSetup):
    """The same, built in configure_model() (Lightning's hook for layers made on the device, sharded)."""

    def setup(self, stage: str) -> None:
        pass

    def configure_model(self) -> None:
        if not hasattr(self, "embed"):
            self.embed = nn.Embedding(self.trainer.datamodule.vocab_size, self.hparams.dim)


class LinkedVocabulary(Classifies):
    """Takes the vocabulary size in its constructor: train.py's LINKED hands it over from the DataModule, whose
    setup() makes it."""

    def __init__(self, vocab_size: int = 2, dim: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed, self.head = nn.Embedding(vocab_size, dim), nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).mean(1))


class Stream(IterableDataset):
    """`samples` points of two Gaussian blobs, generated as a stream (no length, no index)."""

    def __init__(self, samples: int, seed: int) -> None:
        self.samples, self.seed = samples, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        for index in range(self.samples):
            label = index % 2
            yield torch.randn(4, generator=generator) + 2.0 * label, torch.tensor(label)


class StreamData(pl.LightningDataModule):
    """Training, validation and test data as streams; `wrap` (for example support.data.streams.shard) is applied
    to each stream."""

    wrap: Any = staticmethod(lambda dataset: dataset)

    def __init__(self, batch_size: int = 8, samples: int = 96) -> None:
        super().__init__()
        self.batch_size, self.samples = batch_size, samples

    def loader(self, seed: int) -> DataLoader:
        return DataLoader(type(self).wrap(Stream(self.samples, seed)), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self.loader(1)

    def val_dataloader(self) -> DataLoader:
        return self.loader(2)

    def test_dataloader(self) -> DataLoader:
        return self.loader(3)


class StreamModel(Classifies):
    """A linear classifier of StreamData's points, counting the samples it trains on (in a buffer: checkpointed)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.linear = nn.Linear(4, 2)
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.samples_seen += len(batch[0])
        return super().training_step(batch, batch_idx)


class BlobData(TrainAndValidation):
    """Map-style 4-feature points of two blobs, for the GAN (it learns their distribution)."""

    def __init__(self, batch_size: int = 8, samples: int = 96) -> None:
        super().__init__()
        self.batch_size, self.samples = batch_size, samples

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(0)
        y = torch.arange(self.samples) % 2
        x = torch.randn(self.samples, 4, generator=generator) + 2.0 * y[:, None]
        split = self.samples * 3 // 4
        self.train_set, self.val_set = TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])



class GAN(pl.LightningModule):
    """A generator and a discriminator trained by manual optimization, with an optimizer each: every batch steps
    both, so Lightning's global_step moves twice per batch. val/loss is the discriminator's loss on real and made
    points (made from noise that each real point gives, so it is the same on any number of processes)."""

    def __init__(self, noise: int = 3, hidden: int = 16, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(noise, hidden), nn.ReLU(), nn.Linear(hidden, 4))
        self.discriminator = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.hparams.noise)

    def discriminator_loss(self, real: torch.Tensor, made: torch.Tensor) -> torch.Tensor:
        bce = nn.functional.binary_cross_entropy_with_logits
        return bce(self.discriminator(real), torch.ones(len(real), 1)) + \
            bce(self.discriminator(made), torch.zeros(len(made), 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0]
        g_opt, d_opt = self.optimizers()
        made = self.generator(self.noise(len(real)))
        d_loss = self.discriminator_loss(real, made.detach())
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = nn.functional.binary_cross_entropy_with_logits(self.discriminator(made), torch.ones(len(real), 1))
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        self.log_dict({"train/d_loss": d_loss, "train/g_loss": g_loss})

    def evaluation_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        real = batch[0]
        made = self.generator(real[:, :self.hparams.noise].flip(1))  # noise given by each point: any batching
        self.log(f"{stage}/loss", self.discriminator_loss(real, made), sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluation_step(batch, batch_idx, "test")

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr),
                torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr)]


class NoisyTest(EmbeddingInSetup):
    """Adds noise to its inputs' embedding at test time, from a generator of its own seeded by the clock: no
    checkpoint's random states give it, so its test metrics change from one evaluation to the next."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        noise = torch.randn(len(x), self.hparams.dim, generator=torch.Generator().manual_seed(time.time_ns()))
        self.log("test/loss", nn.functional.cross_entropy(self.head(self.embed(x).mean(1) + noise), y))


class OwnRandom(EmbeddingInSetup):
    """Scales its loss by a draw from a random.Random of its own (seeded by the OS): no checkpoint restores it."""

    def __init__(self, dim: int = 8, lr: float = 0.05) -> None:
        super().__init__(dim, lr)
        import random

        self.draws = random.Random()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * (1.0 + self.draws.random())


class HiddenTensor(EmbeddingInSetup):
    """Keeps a running scale in a tensor attribute that is not a registered buffer: no checkpoint holds it."""

    def __init__(self, dim: int = 8, lr: float = 0.05) -> None:
        super().__init__(dim, lr)
        self.scale = torch.ones(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.scale = self.scale * 1.01
        return super().forward(x) * self.scale


class SameStreamEverywhere(Stream):
    """Says it takes its rank's share (shards_by_rank) but gives every rank the whole stream: a broken shard."""

    shards_by_rank = True


class UnshardedStreamData(StreamData):
    wrap = staticmethod(lambda dataset: SameStreamEverywhere(dataset.samples, dataset.seed))


class ClockShuffled(torch.utils.data.Sampler):
    """A sampler of its own that shuffles with a generator seeded by the clock: no checkpoint restores its order."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(time.time_ns())).tolist())


class OwnSamplerData(CharData):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=ClockShuffled(len(self.train_set)))
