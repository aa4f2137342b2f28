"""The PyPI CKA packages that benchmarks/cka.py compares ours with: how to load each from a separate folder, and
how to call it through its fastest documented API for each job.

    pip install --no-deps --target /tmp/cka-peers -r requirements-bench.txt
    python benchmarks/cka.py --quick

Each peer package is loaded from its ``__init__.py`` under the peers folder by file path (pytorch-cka's ``cka`` under
the private name ``peer_pytorch_cka``), so ``import cka`` always means ours. Imports used only by the peers' plotting,
saving or Lightning-unwrapping code (seaborn, safetensors, lightning) are replaced by inert stubs when missing. Peers
with a model-level API get "replay" models whose layers emit the prepared activations, so the forward pass costs
nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")  # some peers import pyplot at import time
os.environ.setdefault("TQDM_DISABLE", "1")  # and draw progress bars
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ours first: this folder holds a cka.py too

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import cka  # noqa: E402  (ours: imported before any peer directory is on sys.path)


# ---------------------------------------------------------------- peers
class _Emit(nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a


class Replay(nn.Module):
    """A stand-in model: input row 0 holds a batch index, layer i emits that batch's prepared activation i."""

    def __init__(self, batches: list[list[torch.Tensor]]) -> None:
        super().__init__()
        self.batches = batches
        self.layers = nn.ModuleList(_Emit() for _ in batches[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.batches[int(x.reshape(-1)[0])]
        for layer, a in zip(self.layers, acts, strict=True):
            layer(a)
        return acts[-1]


def _names(k: int) -> list[str]:
    return [f"layers.{i}" for i in range(k)]


def _index_batches(batches: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.full((len(b[0]),), i, dtype=torch.float32) for i, b in enumerate(batches)]


class _Loader:
    """An iterable with a length that is not a list (pytorch-cka's compute_cka takes a list as several loaders)."""

    def __init__(self, items: list[torch.Tensor]) -> None:
        self.items = items

    def __iter__(self):  # noqa: ANN204
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _flat(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.reshape(len(x), -1) for x in xs]


def _stub(name: str, **attrs: object) -> None:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)


def _load(alias: str, package_dir: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(alias, package_dir / "__init__.py",
                                                  submodule_search_locations=[str(package_dir)])
    if spec is None or spec.loader is None:
        raise ImportError(f"no package at {package_dir}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[alias]
        raise
    return module


@dataclass
class Peer:
    """How to call one package. Each job returns a zero-argument callable (set-up done outside the timing), or a
    string saying why the package cannot do that job. ``cost`` gives the dominant multiply-add count per job."""

    name: str
    folder: str
    alias: str
    api: str
    jobs: dict[str, Callable] = field(default_factory=dict)
    cost: Callable[[str, int, list[int], list[int], int], float] = lambda *_: 0.0
    module: types.ModuleType | None = None
    version: str = "?"
    why: str = ""


def _torch_cka_jobs(m: types.ModuleType) -> dict[str, Callable]:
    def run(bx: list[list[torch.Tensor]], by: list[list[torch.Tensor]]) -> Callable:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.stack(_index_batches(bx))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calc = m.CKA(Replay(bx), Replay(by), "a", "b", _names(len(bx[0])), _names(len(by[0])))

        def go() -> np.ndarray:
            calc.compare(loader)  # unbiased HSIC per batch (Nguyen et al. eq. 3), Grams then trace(K @ L)
            return calc.hsic_matrix.numpy()
        return go

    return {"pair/debiased": lambda x, y: run([[x]], [[y]]), "matrix/debiased": lambda xs, ys: run([xs], [ys]),
            "minibatch": run}


def _cka_pytorch_jobs(m: types.ModuleType) -> dict[str, Callable]:
    def run(bx: list[list[torch.Tensor]], by: list[list[torch.Tensor]]) -> Callable:
        loader = [(i, 0) for i in _index_batches(bx)]

        def go() -> np.ndarray:  # a fresh calculator per call: its accumulators only reset together with its hooks
            calc = m.CKACalculator(Replay(bx), Replay(by), _names(len(bx[0])), _names(len(by[0])), verbose=False,
                                   device=torch.device("cpu"))
            return calc.calculate_cka_matrix(loader, num_epochs=1).numpy()  # default epsilon=1e-4
        return go

    return {"pair/debiased": lambda x, y: run([[x]], [[y]]), "matrix/debiased": lambda xs, ys: run([xs], [ys]),
            "minibatch": run}


def _pytorch_cka_jobs(m: types.ModuleType) -> dict[str, Callable]:
    def minibatch(bx: list[list[torch.Tensor]], by: list[list[torch.Tensor]]) -> Callable:
        names = _names(len(bx[0]))
        inputs = _Loader(_index_batches(bx))
        return lambda: m.compute_cka(Replay(bx), Replay(by), inputs, layers=names, model2_layers=names,
                                     device="cpu", progress=False)[0].numpy()

    return {"pair/debiased": lambda x, y: lambda: m.cka_from_features(x, y).numpy(),
            "matrix/debiased": lambda xs, ys: lambda: m.cka_from_features(_flat(xs), _flat(ys)).numpy(),
            "minibatch": minibatch}


def _ckatorch_jobs(m: types.ModuleType) -> dict[str, Callable]:
    def matrix(unbiased: bool) -> Callable:
        return lambda xs, ys: lambda: np.array([[m.cka_base(x, y, unbiased=unbiased).item() for y in _flat(ys)]
                                                for x in _flat(xs)])

    def minibatch(bx: list[list[torch.Tensor]], by: list[list[torch.Tensor]]) -> Callable:
        # ckatorch.CKA.__call__ needs (batch, tokens, dim) activations and overwrites its matrix at every batch,
        # so for Nguyen et al.'s estimator we sum its exported batched hsic1 over batches ourselves.
        def go() -> np.ndarray:
            hxy, hxx, hyy = 0, 0, 0
            for xs, ys in zip(bx, by, strict=True):
                gx = torch.stack([m.linear_kernel(x) for x in _flat(xs)])
                gy = torch.stack([m.linear_kernel(y) for y in _flat(ys)])
                i, j = torch.meshgrid(torch.arange(len(gx)), torch.arange(len(gy)), indexing="ij")
                hxy = hxy + m.hsic1(gx[i.flatten()], gy[j.flatten()]).view(len(gx), len(gy))
                hxx, hyy = hxx + m.hsic1(gx, gx), hyy + m.hsic1(gy, gy)
            return (hxy / torch.sqrt(torch.outer(hxx, hyy))).numpy()
        return go

    return {"pair/linear": lambda x, y: lambda: m.cka_base(x, y).item(),
            "pair/debiased": lambda x, y: lambda: m.cka_base(x, y, unbiased=True).item(),
            "matrix/linear": matrix(False), "matrix/debiased": matrix(True), "minibatch": minibatch}


def _repsim_jobs(m: types.ModuleType) -> dict[str, Callable]:
    # repsim.cka(estimator="song") normalises the unbiased cross HSIC by *biased* self HSICs, so debiased CKA is
    # built from repsim.hsic(estimator="song"), which returns every pair's unbiased HSIC in one call.
    def hsic(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> np.ndarray:
        h = m.hsic([a.numpy() for a in _flat(xs) + _flat(ys)], "linear", "song")
        return h

    def debiased(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> Callable:
        def go() -> np.ndarray:
            h, k = hsic(xs, ys), len(xs)
            return h[:k, k:] / np.sqrt(np.outer(np.diag(h)[:k], np.diag(h)[k:]))
        return go

    def minibatch(bx: list[list[torch.Tensor]], by: list[list[torch.Tensor]]) -> Callable:
        def go() -> np.ndarray:
            h, k = sum(hsic(xs, ys) for xs, ys in zip(bx, by, strict=True)), len(bx[0])
            return h[:k, k:] / np.sqrt(np.outer(np.diag(h)[:k], np.diag(h)[k:]))
        return go

    def linear(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> Callable:
        return lambda: m.cka([a.numpy() for a in _flat(xs) + _flat(ys)], "linear", "gretton")[:len(xs), len(xs):]

    return {"pair/linear": lambda x, y: linear([x], [y]), "pair/debiased": lambda x, y: debiased([x], [y]),
            "matrix/linear": linear, "matrix/debiased": debiased, "minibatch": minibatch}


def _cost(kind: str) -> Callable[[str, int, list[int], list[int], int], float]:
    """Dominant multiply-adds of a job for n samples, widths ps/qs and b batches, read off each peer's source."""
    def f(job: str, n: int, ps: list[int], qs: list[int], b: int) -> float:
        pairs, grams = len(ps) * len(qs), n * n * (sum(ps) + sum(qs))
        if kind == "n3-per-hsic-x3":  # torch-cka: trace(K @ L) for xy, xx and yy of every pair
            return b * (3 * pairs * n**3 + n * n * (sum(ps) + len(ps) * sum(qs)))
        if kind == "n3-per-hsic":  # cka-pytorch / ckatorch hsic1: a batched K @ L per pair and per self pair
            return b * ((pairs + len(ps) + len(qs)) * n**3 + grams)
        if kind == "gram-per-pair":  # ckatorch cka_base: float64 Grams per pair, ~10 float64 n^2 passes each
            if job == "minibatch":  # ckatorch.hsic1 per batch, as cka-pytorch
                return b * ((pairs + len(ps) + len(qs)) * n**3 + grams)
            return n * n * (len(qs) * sum(ps) + len(ps) * sum(qs) + 600 * pairs)
        if kind == "repsim":  # Eigen float64: centred linear kernels, then H K H L products (gretton) per pair
            k = len(ps) + len(qs)
            per = 3 * n**3 if job.endswith("linear") else 4 * n * n
            return b * (2.5 * grams + k * (k + 1) / 2 * per)
        return b * (grams + pairs * n * n)  # pytorch-cka: Grams once, then einsum over them
    return f


PEERS = [
    Peer("torch-cka", "torch_cka", "torch_cka", "CKA(model1, model2, layers).compare(loader)",
         cost=_cost("n3-per-hsic-x3")),
    Peer("ckatorch", "ckatorch", "ckatorch", "cka_base(x, y, unbiased) per pair; hsic1 per batch",
         cost=_cost("gram-per-pair")),
    Peer("cka-pytorch", "cka_pytorch", "cka_pytorch", "CKACalculator(...).calculate_cka_matrix(loader)",
         cost=_cost("n3-per-hsic")),
    Peer("pytorch-cka", "cka", "peer_pytorch_cka", "cka_from_features(xs, ys); compute_cka(models, loader)",
         cost=_cost("grams")),
    Peer("repsim", "repsim", "repsim", "cka(mats, 'linear', 'gretton'); hsic(mats, 'linear', 'song')",
         cost=_cost("repsim")),
]
JOBS = {"torch-cka": _torch_cka_jobs, "ckatorch": _ckatorch_jobs, "cka-pytorch": _cka_pytorch_jobs,
        "pytorch-cka": _pytorch_cka_jobs, "repsim": _repsim_jobs}


def load_peers(peers_dir: Path) -> None:
    sys.path.append(str(peers_dir))  # for the peers' own dependencies installed there; ours is already imported
    stubs = {"seaborn": {}, "safetensors.torch": {"save_file": None, "save_model": None},
             "lightning.fabric.wrappers": {"_FabricModule": type("_FabricModule", (), {})}}
    for name, attrs in stubs.items():
        try:
            importlib.import_module(name)
        except ImportError:
            _stub(name, **attrs)
            print(f"note: {name} is not installed; stubbed (peers use it only to plot, save or unwrap Lightning)")
    for peer in PEERS:
        folder = peers_dir / peer.folder
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peer.module = _load(peer.alias, folder)
            peer.jobs = JOBS[peer.name](peer.module)
            dist = sorted(peers_dir.glob(f"{peer.name.replace('-', '_')}-*.dist-info"))
            peer.version = (dist[-1].name.removesuffix(".dist-info").split("-")[1] if dist
                            else getattr(peer.module, "__version__", "?"))
        except FileNotFoundError:
            peer.why = f"not installed: pip install --no-deps --target {peers_dir} -r requirements-bench.txt"
        except Exception as exc:  # noqa: BLE001 - report any failure and carry on without this peer
            peer.why = f"cannot be loaded from {folder}: {type(exc).__name__}: {exc}"
    if sys.modules.get("cka") is not cka:
        raise RuntimeError("a peer replaced our cka module")
