"""Exact, fast Centered Kernel Alignment (CKA) between layer activations.

Linear CKA (Kornblith et al. 2019), RBF CKA with the reference notebook's median-distance bandwidth, debiased CKA
(unbiased HSIC of Song et al. 2012) and minibatch CKA (Nguyen, Raghu & Kornblith 2021, eq. 3) as a torchmetrics
``Metric`` that sums over DDP ranks. Depends on torch, torchmetrics and (for the heatmap only) matplotlib.

    python -c "import torch, cka; x = torch.randn(500, 64); print(cka.linear_cka(x, x @ torch.randn(64, 32)))"
    python -c "import torch, cka; xs = [torch.randn(256, 3, 8, 8), torch.randn(256, 10)]; print(cka.cka_matrix(xs, xs))"
    python -m pytest tests/test_cka.py -q
    python benchmarks/cka.py --quick

Validation-loop use (states live on the model's device and are summed across ranks by ``compute()``)::

    metric = MinibatchCKA(num_layers_x=len(names))               # ys=None: compare the model with itself
    with LayerRecorder(model, names) as rec:
        for x, _ in loader:
            model(x)
            metric.update(rec.collect())
    matrix = metric.compute(); metric.reset()
    plot_cka_heatmap(matrix, names, names, path="cka.png")

Numerics: inputs are flattened to (n, features), upcast from fp16/bf16 to float32 (float64 stays float64) and centred
before any product, all under disabled autocast and forced IEEE fp32 matmuls (no TF32 / bf16 shortcuts). Products use
the feature form (X'Y, n*p*q flops) when it is cheaper than the Gram form (XX', n^2*p flops); HSIC terms are combined
in float64 because the unbiased estimator subtracts nearly equal terms. No ``.item()`` / host syncs except the RBF
median on CPU tensors (numpy, no device involved). Results carry no gradient (inputs are detached).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torchmetrics import Metric

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["LayerRecorder", "MinibatchCKA", "cka_matrix", "debiased_cka", "linear_cka", "plot_cka_heatmap", "rbf_cka"]


@contextlib.contextmanager
def _exact(device: torch.device) -> Iterator[None]:
    """Disable autocast and TF32/bf16 fp32-matmul shortcuts for our products, restoring the caller's settings.

    TF32 (cuBLAS) or bf16 (oneDNN after ``set_float32_matmul_precision("medium")``) keeps 10 or 7 mantissa bits and
    puts ~1e-3 relative error into a Gram matrix. Only the per-backend new-style flag is touched when it exists:
    mixing it with the legacy ``allow_tf32`` makes torch raise on later reads. Process-global, like torch's own flags.
    """
    backends = [torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)]
    saved: list[tuple[object, str, object]] = []
    for backend in backends:
        if backend is None:
            continue
        try:
            saved.append((backend, "fp32_precision", backend.fp32_precision))
            backend.fp32_precision = "ieee"
        except (AttributeError, RuntimeError):  # torch < 2.9: only the legacy switch exists
            if hasattr(backend, "allow_tf32"):
                saved.append((backend, "allow_tf32", backend.allow_tf32))
                backend.allow_tf32 = False
    available = getattr(torch.amp, "is_autocast_available", lambda _: device.type in ("cpu", "cuda"))
    autocast = torch.autocast(device.type, enabled=False) if available(device.type) else contextlib.nullcontext()
    try:
        with autocast, torch.no_grad():
            yield
    finally:
        for backend, name, value in reversed(saved):
            setattr(backend, name, value)


def _dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    # Never fp16/bf16: float64 if any input is float64, else float32 (exact enough once features are centred).
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _acc(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _centred(x: Tensor, dtype: torch.dtype) -> Tensor:
    x = x.detach().reshape(x.shape[0], -1).to(dtype)
    return x - x.mean(0, keepdim=True)  # centring first keeps float32 Grams accurate and makes K = HKH exact


def _check(xs: Sequence[Tensor], ys: Sequence[Tensor], debiased: bool) -> int:
    if len(xs) == 0 or len(ys) == 0:
        raise ValueError("need at least one activation tensor on each side")
    sizes = {t.shape[0] if t.dim() else 0 for t in [*xs, *ys]}
    if len(sizes) != 1:
        raise ValueError(f"all activations must have the same number of samples (dim 0), got sizes {sorted(sizes)}")
    n = sizes.pop()
    if debiased and n < 4:
        raise ValueError(f"debiased CKA needs at least 4 samples per batch, got {n}: "
                         "use a larger validation batch_size")
    if n < 2:
        raise ValueError(f"CKA needs at least 2 samples, got {n}")
    return n


def _layout(m: int) -> list[tuple[int, int, int, int, int, float]]:
    """Upper-triangular blocks (s0, s1, t0, t1, offset, weight) of a symmetric m x m product, packed in a vector.

    A symmetric product needs only its upper blocks: with 8 row blocks that is 36 of 64 block products (~0.6 of the
    time of a full GEMM), and <A, B> of two such matrices is the weighted sum of their blocks' inner products.
    """
    k = min(8, -(-m // 256))
    cut = [round(i * m / k) for i in range(k + 1)]
    blocks, offset = [], 0
    for i, j in [(i, i) for i in range(k)] + [(i, j) for i in range(k) for j in range(i + 1, k)]:
        blocks.append((cut[i], cut[i + 1], cut[j], cut[j + 1], offset, 1.0 if i == j else 2.0))
        offset += (cut[i + 1] - cut[i]) * (cut[j + 1] - cut[j])
    return blocks


def _sym_product(a: Tensor, layout: list, acc: torch.dtype, out: Tensor | None, zero_diag: bool) -> tuple[Tensor, Tensor]:
    """Upper blocks of a @ a.T (into the packed ``out`` if given); returns its diagonal and sum of squares."""
    diag, sumsq = a.new_empty(a.shape[0]), []
    for s0, s1, t0, t1, offset, weight in layout:
        dst = None if out is None else out[offset:offset + (s1 - s0) * (t1 - t0)].view(s1 - s0, t1 - t0)
        block = torch.mm(a[s0:s1], a[t0:t1].T, out=dst)
        if s0 == t0:
            diag[s0:s1] = block.diagonal()
            if zero_diag:  # K~: zeroing (not subtracting) the diagonal avoids cancellation when p >> n
                block.diagonal().zero_()
        # Row-wise dots then a float64 sum: one float32 dot over millions of entries is off by ~1e-4.
        sumsq.append(torch.einsum("ij,ij->i", block, block).sum(dtype=acc) * weight)
    return diag, torch.stack(sumsq).sum()


def _hsic_parts(xs: Sequence[Tensor], ys: Sequence[Tensor] | None) -> tuple[int, list[Tensor], list[Tensor]]:
    """Sufficient statistics of the linear-kernel HSIC for every layer pair, from centred features.

    Returns n, [t, r, sx, sy] for the cross pairs and [txx, rxx, tyy, ryy] for the self pairs, where for Grams
    K = XX', L = YY' (row sums are 0 after centring) with diagonals d, e and zero-diagonal K~, L~:
    t = tr(K~L~) (elementwise sum, never a product of n x n matrices), r = d.e = 1'K~L~1 (a dot of row sums, since
    K~1 = -d) and s = sum(d) = -1'K~1. Every estimator below is a closed form in these.
    """
    same = ys is None or ys is xs
    ys = xs if ys is None else ys
    n = _check(xs, ys, debiased=False)
    dtype, acc = _dtype([*xs, *ys]), _acc(xs[0].device)
    fx = [_centred(x, dtype) for x in xs]
    fy = fx if same else [_centred(y, dtype) for y in ys]
    px, qy = [f.shape[1] for f in fx], [f.shape[1] for f in fy]
    # Multiply-adds of both forms: Gram form ~0.6 n^2 p per layer (packed) + n^2/2 per pair, feature form n p q per
    # pair + min(n, p) n p per layer for the self terms.
    sides = [px] if same else [px, qy]
    gram_cost = sum(0.6 * n * n * sum(w) for w in sides) + n * n / 2 * len(px) * len(qy)
    feature_cost = n * sum(px) * sum(qy) + sum(0.6 * n * p * min(n, p) for w in sides for p in w)
    gram_form = gram_cost < feature_cost
    layout = _layout(n)
    packed = layout[-1][4] + (layout[-1][1] - layout[-1][0]) * (layout[-1][3] - layout[-1][2])

    def layer_stats(fs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        grams = torch.empty(len(fs), packed, dtype=dtype, device=fs[0].device) if gram_form else None
        d = torch.empty(len(fs), n, dtype=dtype, device=fs[0].device)
        t_self = torch.empty(len(fs), dtype=acc, device=fs[0].device)
        for i, f in enumerate(fs):  # a loop over layers (Gram/feature stats), never over pairs
            if grams is not None or f.shape[1] >= n:
                d[i], t_self[i] = _sym_product(f, layout, acc, None if grams is None else grams[i], zero_diag=True)
            else:  # ||X'X||^2 = ||XX'||^2 = tr(K~K~) + |d|^2, the p x p product being the cheaper one
                d[i] = f.square().sum(1)
                t_self[i] = _sym_product(f.T, _layout(f.shape[1]), acc, None, False)[1] - d[i].to(acc).square().sum()
        return d, t_self, grams

    dx, txx, gx = layer_stats(fx)
    dy, tyy, gy = (dx, txx, gx) if same else layer_stats(fy)
    r = dx.to(acc) @ dy.to(acc).T
    if gram_form:  # every pair at once from the stacked packed Grams, one matmul per block (float64 accumulation)
        t = sum(weight * (gx[:, o:o + (s1 - s0) * (t1 - t0)] @ gy[:, o:o + (s1 - s0) * (t1 - t0)].T).to(acc)
                for s0, s1, t0, t1, o, weight in layout)
    else:  # every pair from one cross-covariance X_cat'Y_cat: block sums of its squares are ||X_i'Y_j||^2
        cat_x = torch.cat(fx, 1)
        m = (cat_x.T @ (cat_x if same else torch.cat(fy, 1))).square_()
        rows = torch.stack([b.sum(0, dtype=acc) for b in m.split(px)])
        t = torch.stack([c.sum(1) for c in rows.split(qy, 1)], 1) - r
    sx, sy = dx.sum(1, dtype=acc), dy.sum(1, dtype=acc)
    return n, [t, r, sx, sy], [txx, dx.to(acc).square().sum(1), tyy, dy.to(acc).square().sum(1)]


def _hsic(n: int, t: Tensor, r: Tensor, sa: Tensor, sb: Tensor, debiased: bool) -> Tensor:
    if not debiased:  # tr(KHLH) / (n-1)^2 with K = HKH for centred features
        return (t + r) / (n - 1) ** 2
    # Song et al. (2012): [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))
    return (t + sa * sb / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * r) / (n * (n - 3))


def _cka(xs: Sequence[Tensor], ys: Sequence[Tensor] | None, debiased: bool) -> Tensor:
    _check(xs, xs if ys is None else ys, debiased)
    with _exact(xs[0].device):
        n, (t, r, sx, sy), (txx, rxx, tyy, ryy) = _hsic_parts(xs, ys)
        hxy = _hsic(n, t, r, sx[:, None], sy[None, :], debiased)
        hxx, hyy = _hsic(n, txx, rxx, sx, sx, debiased), _hsic(n, tyy, ryy, sy, sy, debiased)
        return hxy / torch.sqrt(hxx[:, None] * hyy[None, :])


def cka_matrix(xs: Sequence[Tensor], ys: Sequence[Tensor] | None = None, debiased: bool = False) -> Tensor:
    """Linear CKA of every pair (xs[i], ys[j]) as a (len(xs), len(ys)) float64 tensor; ``ys=None`` means xs."""
    return _cka(xs, ys, debiased)


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA of activations of shape (n, ...) (flattened to (n, features)); a 0-dim float64 tensor."""
    return _cka([x], [y], debiased=False)[0, 0]


def debiased_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA from the unbiased HSIC estimator (Song et al. 2012); needs n >= 4. A 0-dim float64 tensor."""
    return _cka([x], [y], debiased=True)[0, 0]


def _median(v: Tensor) -> Tensor:
    """``numpy.median`` of all entries (mean of the two middle values for an even count), without a device sync."""
    flat = v.reshape(-1)
    k_lo, k_hi = (flat.numel() - 1) // 2, flat.numel() // 2
    if flat.device.type == "cpu":  # numpy's introselect is ~10x faster than torch.kthvalue on CPU
        import numpy as np

        return torch.from_numpy(np.partition(flat.numpy(), [k_lo, k_hi])[[k_lo, k_hi]]).mean()
    return (torch.kthvalue(flat, k_lo + 1).values + torch.kthvalue(flat, k_hi + 1).values) / 2


def _centred_rbf_gram(f: Tensor, sigma_frac: float) -> Tensor:
    g = f @ f.T
    sq = g.diagonal().clone()
    d2 = g.mul_(-2).add_(sq[:, None]).add_(sq[None, :]).clamp_(min=0)  # squared distances, in place
    d2.diagonal().zero_()
    # Kornblith et al.'s notebook: exp(-d^2 / (2 frac^2 median(d^2))), median over the full n x n matrix.
    k = d2.div_(-2 * sigma_frac**2 * _median(d2)).exp_()
    mean = k.mean(1)  # HKH without H: subtract row and column means, add back the grand mean (K is symmetric)
    return k.sub_(mean[:, None]).sub_(mean[None, :]).add_(mean.mean())


def rbf_cka(x: Tensor, y: Tensor, sigma_frac: float = 0.5) -> Tensor:
    """RBF-kernel CKA with sigma = sigma_frac x median pairwise distance (Kornblith et al.'s convention)."""
    if sigma_frac <= 0:
        raise ValueError(f"sigma_frac must be positive, got {sigma_frac}")
    _check([x], [y], debiased=False)
    with _exact(x.device):
        dtype = _dtype([x, y])
        kx, ky = (_centred_rbf_gram(_centred(a, dtype), sigma_frac).view(-1) for a in (x, y))
        acc, n = _acc(x.device), x.shape[0]  # row-wise dots, float64 sum (a flat float32 dot is off by ~1e-4)
        xy, xx, yy = (torch.einsum("ij,ij->i", a.view(n, n), b.view(n, n)).sum(dtype=acc)
                      for a, b in ((kx, ky), (kx, kx), (ky, ky)))
        return xy / torch.sqrt(xx * yy)


class MinibatchCKA(Metric):
    """Minibatch linear CKA (Nguyen, Raghu & Kornblith 2021, eq. 3) accumulated without storing activations.

    Each ``update`` adds every layer pair's unbiased HSIC of that batch (normalised by its own n(n-3), so a ragged
    last batch is weighted correctly) to float64 sums; ``compute()`` returns HSIC_xy / sqrt(HSIC_xx HSIC_yy) of the
    sums as a (num_layers_x, num_layers_y) tensor, after summing the states across DDP ranks. Float64 states because
    the sum runs over hundreds of batches and ranks and a batch's HSIC is a small difference of large terms; they
    are a few hundred numbers, so the cost is nil (pass ``state_dtype=torch.float32`` on MPS).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_layers_x: int, num_layers_y: int | None = None, state_dtype: torch.dtype = torch.float64,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.num_layers_x = num_layers_x
        self.num_layers_y = num_layers_x if num_layers_y is None else num_layers_y
        self.state_dtype = state_dtype
        self.add_state("hsic_xy", torch.zeros(self.num_layers_x, self.num_layers_y, dtype=state_dtype), "sum")
        self.add_state("hsic_xx", torch.zeros(self.num_layers_x, dtype=state_dtype), "sum")
        self.add_state("hsic_yy", torch.zeros(self.num_layers_y, dtype=state_dtype), "sum")

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = "") -> MinibatchCKA:
        # Module.to(dtype) (e.g. Lightning's "bf16-true" precision) would cast the sums to bf16: keep state_dtype.
        this = super()._apply(fn, exclude_state)
        for key in this._defaults:
            this._defaults[key] = this._defaults[key].to(this.state_dtype)
            setattr(this, key, getattr(this, key).to(this.state_dtype))
        return this

    def update(self, xs: Sequence[Tensor], ys: Sequence[Tensor] | None = None) -> None:
        """Add one batch: xs/ys are lists of activations (n, ...) of the same n samples; ys=None means ys = xs."""
        if len(xs) != self.num_layers_x or (ys if ys is not None else xs).__len__() != self.num_layers_y:
            raise ValueError(f"expected {self.num_layers_x} x-layers and {self.num_layers_y} y-layers, got "
                             f"{len(xs)} and {len(ys if ys is not None else xs)}")
        _check(xs, xs if ys is None else ys, debiased=True)
        with _exact(xs[0].device):
            n, (t, r, sx, sy), (txx, rxx, tyy, ryy) = _hsic_parts(xs, ys)
            self.hsic_xy += _hsic(n, t, r, sx[:, None], sy[None, :], True).to(self.state_dtype)
            self.hsic_xx += _hsic(n, txx, rxx, sx, sx, True).to(self.state_dtype)
            self.hsic_yy += _hsic(n, tyy, ryy, sy, sy, True).to(self.state_dtype)

    def compute(self) -> Tensor:
        return self.hsic_xy / torch.sqrt(self.hsic_xx[:, None] * self.hsic_yy[None, :])


class LayerRecorder:
    """Context manager recording the outputs of named submodules (names as in ``model.named_modules()``).

    ``with LayerRecorder(model, ["layer1", "fc"]) as rec: model(x); acts = rec.collect()`` gives the detached outputs
    (first element of a tuple output) of the last forward, in the order of ``names``. Hooks are removed on exit.
    """

    _CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        unknown = [name for name in names if name not in modules]
        if unknown:
            valid = [k for k, m in modules.items() if k and not isinstance(m, self._CONTAINERS)]
            raise ValueError(f"unknown layer name(s) {unknown}; valid names: {valid}")
        containers = [name for name in names if isinstance(modules[name], self._CONTAINERS)]
        if containers:
            raise ValueError(f"layer(s) {containers} are containers (Sequential/ModuleList/ModuleDict) whose output "
                             "is just their last child's (or that have no forward): name a child module instead")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate layer names in {list(names)}")
        self.names = list(names)
        self._modules = [modules[name] for name in self.names]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.activations: dict[str, Tensor] = {}

    def _hook(self, name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not isinstance(output, Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a tensor (or tuple of them)")
            self.activations[name] = output.detach()

        return hook

    def __enter__(self) -> LayerRecorder:
        if self._handles:
            raise RuntimeError("LayerRecorder is already active")
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in zip(self.names, self._modules, strict=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.activations = {}

    def collect(self) -> list[Tensor]:
        """The recorded activations in ``names`` order; clears them so a stale batch is never returned twice."""
        missing = [name for name in self.names if name not in self.activations]
        if missing:
            raise RuntimeError(f"no output recorded for layer(s) {missing}: did the forward pass run through them?")
        out, self.activations = [self.activations[name] for name in self.names], {}
        return out


def plot_cka_heatmap(matrix: Tensor, x_names: Sequence[str], y_names: Sequence[str], path: str | None = None,
                     title: str = "CKA") -> Figure:
    """Heatmap of ``matrix[i, j]`` = CKA(x_names[i], y_names[j]) (rows on the vertical axis); returns the Figure.

    Uses the Agg canvas directly (no pyplot, never a display). With ``path`` the PNG is written to a temporary file
    in the same directory and renamed, so a reader never sees a half-written image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = torch.as_tensor(matrix).detach().cpu().double().numpy()
    if values.shape != (len(x_names), len(y_names)):
        raise ValueError(f"matrix shape {values.shape} does not match {len(x_names)} x names, {len(y_names)} y names")
    rows, cols = values.shape
    fig = Figure(figsize=(max(4.0, 0.6 * cols + 2.5), max(3.5, 0.5 * rows + 2.0)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="magma", origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label="CKA")
    ax.set_xticks(range(cols), labels=list(y_names), rotation=45, ha="right")
    ax.set_yticks(range(rows), labels=list(x_names))
    ax.set_title(title)
    if rows <= 12 and cols <= 12:  # annotations stay readable only on small matrices
        for i in range(rows):
            for j in range(cols):
                v = values[i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="black" if v > 0.6 else "white")
    if path is not None:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")  # open() honours umask
        try:
            with open(tmp, "xb") as fh:
                fig.savefig(fh, format="png", dpi=120)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return fig
