"""Exact, fast Centered Kernel Alignment (CKA) between layer activations: the numerics, nothing of the project.

Linear CKA (Kornblith et al. 2019), RBF CKA with the reference notebook's median-distance bandwidth, debiased CKA
(unbiased HSIC of Song et al. 2012) and minibatch CKA (Nguyen, Raghu & Kornblith 2021, eq. 3) as a torchmetrics
``Metric`` that sums over DDP ranks. Depends on torch and torchmetrics only.

The root's cka.py re-exports these (``import cka; cka.linear_cka(x, y)``) and compares two checkpoints; the
machinery around the numerics is support/cka/monitor.py: the forward hooks (``LayerRecorder``), the heatmap, the
checkpoint comparison and ``CKAMonitor``, the Lightning callback that train.py uses. By hand:
``metric = MinibatchCKA(len(acts))``, ``metric.update(acts)`` for each batch's list of layer activations, then
``metric.compute()``.

Numerics: activations are flattened to (n, features), upcast from fp16/bf16 to float32 (float64 stays float64) and
centred before any product, under disabled autocast and IEEE fp32 matmuls (no TF32/bf16), in the feature form (X'Y)
or the Gram form (XX', upper blocks only), whichever is cheaper; HSIC terms are summed in float64. No host syncs
(``.item()``), so it stays cheap on a GPU. Results carry no gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["MIN_SAMPLES", "MinibatchCKA", "cka_matrix", "debiased_cka", "linear_cka", "rbf_cka"]

MIN_SAMPLES = 4  # the unbiased HSIC estimator's minimum batch size (its n(n-3) normaliser)


@contextlib.contextmanager
def _exact(device: torch.device) -> Iterator[None]:
    """Disable autocast and TF32/bf16 fp32-matmul shortcuts (10/7 mantissa bits: ~1e-3 error in a Gram), then
    restore the caller's flags. Only the new per-backend flag is touched where it exists: mixing it with the legacy
    ``allow_tf32`` makes torch raise on later reads. Process-global, like torch's own flags."""
    saved: list[tuple[object, str, object]] = []
    for backend in filter(None, (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))):
        # torch < 2.9 has neither fp32_precision nor torch.backends.mkldnn.matmul, only cuBLAS's allow_tf32
        name, value = ("fp32_precision", "ieee") if hasattr(backend, "fp32_precision") else ("allow_tf32", False)
        saved.append((backend, name, getattr(backend, name)))
        setattr(backend, name, value)
    available = getattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))
    autocast = torch.autocast(device.type, enabled=False) if available(device.type) else contextlib.nullcontext()
    try:
        with autocast, torch.no_grad():
            yield
    finally:
        for backend, name, value in reversed(saved):
            setattr(backend, name, value)


def _buffer(scratch: dict[str, Tensor] | None, key: str, shape: tuple[int, int], dtype: torch.dtype,
            device: torch.device) -> Tensor:
    """An uninitialised tensor: ``scratch[key]`` (grown or replaced as needed) viewed as ``shape``, or a new one. On
    CPU a fresh multi-MB tensor per batch costs more in page faults than the arithmetic it holds (4 of 26 ms at
    n = 256)."""
    if scratch is None:
        return torch.empty(shape, dtype=dtype, device=device)
    numel, old = shape[0] * shape[1], scratch.get(key)
    if old is None or old.numel() < numel or old.dtype != dtype or old.device != device:
        scratch[key] = old = torch.empty(numel, dtype=dtype, device=device)
    return old[:numel].view(shape)


def _centred(xs: Sequence[Tensor], dtype: torch.dtype, scratch: dict[str, Tensor] | None = None,
             key: str = "x") -> tuple[Tensor, list[Tensor]]:
    """Activations flattened to (n, p_i) and centred, as column blocks of one (n, sum p_i) matrix (the feature form's
    concatenation, without a copy), held in ``scratch[key]`` when a scratch dict is given (see MinibatchCKA)."""
    flat = [x.detach().reshape(x.shape[0], -1) for x in xs]
    widths = [f.shape[1] for f in flat]
    out = _buffer(scratch, key, (len(flat[0]), sum(widths)), dtype, flat[0].device)
    # Centring first keeps float32 Grams accurate and makes K = HKH exact; fp16/bf16 are upcast by type promotion.
    for f, block in zip(flat, out.split(widths, 1), strict=True):
        torch.sub(f, f.mean(0, keepdim=True, dtype=dtype), out=block)
    return out, list(out.split(widths, 1))


def _check(xs: Sequence[Tensor], ys: Sequence[Tensor], debiased: bool) -> int:
    sizes = {t.shape[0] if t.dim() else 0 for t in [*xs, *ys]}
    if len(xs) == 0 or len(ys) == 0 or len(sizes) != 1:
        raise ValueError(f"need activations on both sides, all with the same number of samples; got sizes {sizes}")
    if (n := sizes.pop()) < MIN_SAMPLES and debiased:
        raise ValueError(f"debiased CKA needs at least {MIN_SAMPLES} samples per batch, got {n}: use a larger "
                         "validation batch_size")
    if n < 2:
        raise ValueError(f"CKA needs at least 2 samples, got {n}")
    return n


def _layout(m: int, cpu: bool) -> list[tuple[int, int, int, int, int, float]]:
    """Upper blocks (s0, s1, t0, t1, offset, weight) of a symmetric m x m product, packed in a vector; <A, B> is the
    weighted sum of the blocks' inner products. The product halves recursively into two diagonal blocks and one
    off-diagonal block (weight 2), down to 64..127 rows on CPU (small GEMMs stay efficient) or 1024..2047 on GPUs
    (few large kernels): ~0.51-0.56 of a full GEMM's time on CPU, most of it in the large off-diagonal GEMMs."""
    leaf, spans, blocks, offset = 64 if cpu else 1024, [(0, m)], [], 0
    while spans:
        s, e = spans.pop()
        if e - s < 2 * leaf:
            blocks.append((s, e, s, e, offset, 1.0))
            offset += (e - s) ** 2
            continue
        mid = s + (e - s + leaf) // (2 * leaf) * leaf  # halves at a multiple of leaf rows
        blocks.append((s, mid, mid, e, offset, 2.0))
        offset += (mid - s) * (e - mid)
        spans += [(mid, e), (s, mid)]
    return blocks


def _sumsq(a: Tensor, layout: list, acc: torch.dtype, zero_diag: bool) -> Tensor:
    """||a a'||_F^2 (without its diagonal if zero_diag) from the upper blocks of a a' only."""
    parts = []
    for s0, s1, t0, t1, _, weight in layout:
        block = a[s0:s1] @ a[t0:t1].T
        if zero_diag and s0 == t0:
            block.diagonal().zero_()
        # Row-wise dots then a float64 sum: one float32 dot over millions of entries is off by ~1e-4.
        parts.append(torch.einsum("ij,ij->i", block, block).sum(dtype=acc) * weight)
    return torch.stack(parts).sum()


def _gram_form(n: int, wx: list[int], wy: list[int]) -> bool:
    """Whether the Gram form (~0.55 n^2 p per layer + n^2/2 per pair) needs less time than the feature form (n p q
    per pair + ~0.65 n p^2 per layer, its extra pass included; the Gram side's 0.55 n^2 p when p >= n), in
    multiply-adds weighted as measured on CPU: the two cross at p ~ 0.48 n. Counted as if xs and ys differ, so the
    same activations given as ys=None or as a copy take the same path and give bit-identical results."""
    gram = 0.55 * n * n * (sum(wx) + sum(wy)) + n * n / 2 * (len(wx) * len(wy) + len(wx) + len(wy))
    return gram < n * sum(wx) * sum(wy) + sum(n * p * (0.65 * p if p < n else 0.55 * n) for p in wx + wy)


def _hsic_parts(xs: Sequence[Tensor], ys: Sequence[Tensor] | None, scratch: dict[str, Tensor] | None = None
                ) -> tuple[int, list[Tensor], list[Tensor]]:
    """Sufficient statistics of the linear-kernel HSIC of every layer pair. With Grams K = XX', L = YY' of centred
    features (row sums 0), diagonals d, e and zero-diagonal K~, L~: n, [t, r, sx, sy] (cross pairs) and [txx, rxx,
    tyy, ryy] (self pairs), where t = tr(K~L~) (an elementwise sum, never an n x n product), r = d.e = 1'K~L~1 (a dot
    of row sums, as K~1 = -d) and s = sum(d) = -1'K~1. ``scratch`` keeps the large buffers for the next call."""
    same = ys is None or ys is xs
    n = _check(xs, xs if same else ys, debiased=False)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in [*xs, *(ys or [])]) else torch.float32  # no fp16
    dev, acc = xs[0].device, torch.float32 if xs[0].device.type == "mps" else torch.float64  # MPS has no float64
    cat_x, fx = _centred(xs, dtype, scratch, "x")
    cat_y, fy = (cat_x, fx) if same else _centred(ys, dtype, scratch, "y")
    wx, wy = [f.shape[1] for f in fx], [f.shape[1] for f in fy]
    cpu = dev.type == "cpu"
    layout = _layout(n, cpu)  # the packed Grams' blocks
    if _gram_form(n, wx, wy):  # packed zero-diagonal Grams, then every pair from one matmul per block
        size = layout[-1][4] + (layout[-1][1] - layout[-1][0]) * (layout[-1][3] - layout[-1][2])

        def grams(fs: list[Tensor], key: str) -> tuple[Tensor, Tensor]:  # packed zero-diagonal Grams, diagonals
            g, d = _buffer(scratch, key, (len(fs), size), dtype, dev), torch.empty(len(fs), n, dtype=dtype, device=dev)
            for i, f in enumerate(fs):  # loops over layers and row blocks, never over layer pairs
                for s0, s1, t0, t1, o, _ in layout:
                    block = torch.mm(f[s0:s1], f[t0:t1].T, out=g[i, o:o + (s1 - s0) * (t1 - t0)].view(s1 - s0, -1))
                    if s0 == t0:
                        d[i, s0:s1] = block.diagonal()
                        block.diagonal().zero_()  # K~: zeroing, not subtracting, avoids cancellation when p >> n
            return g, d

        def inner(a: Tensor, b: Tensor) -> Tensor:  # <A_i, B_j> for all i, j, one batched matmul per block
            out = torch.zeros(len(a), len(b), dtype=acc, device=dev)
            for s0, s1, t0, t1, o, w in layout:  # per-row float32 partials (short sums) added in float64:
                rows = [g[:, o:o + (s1 - s0) * (t1 - t0)].view(len(g), s1 - s0, -1).transpose(0, 1) for g in (a, b)]
                out += w * torch.bmm(rows[0], rows[1].transpose(1, 2)).sum(0, dtype=acc)  # a flat one is off ~1e-6
            return out

        gx, dx = grams(fx, "gx")
        gy, dy = (gx, dx) if same else grams(fy, "gy")
        t = inner(gx, gy)
        txx = t.diagonal() if same else inner(gx, gx).diagonal()
        tyy = txx if same else inner(gy, gy).diagonal()
    else:  # every pair from one cross-covariance X_cat'Y_cat: block sums of its squares are ||X_i'Y_j||^2
        dx = torch.stack([f.square().sum(1) for f in fx])
        dy = dx if same else torch.stack([f.square().sum(1) for f in fy])
        m = (cat_x.T @ cat_y).square_()
        rows = torch.stack([b.sum(0, dtype=acc) for b in m.split(wx)])
        t = torch.stack([c.sum(1) for c in rows.split(wy, 1)], 1) - dx.to(acc) @ dy.to(acc).T

        def self_terms(fs: list[Tensor], d: Tensor) -> Tensor:  # tr(K~K~) = ||X'X||^2 - |d|^2, on the cheaper side
            return torch.stack([_sumsq(f.T, _layout(f.shape[1], cpu), acc, False) - di.to(acc).square().sum()
                                if f.shape[1] < n else _sumsq(f, layout, acc, True)
                                for f, di in zip(fs, d, strict=True)])

        txx = self_terms(fx, dx)
        tyy = txx if same else self_terms(fy, dy)
    dx, dy = dx.to(acc), dy.to(acc)
    return n, [t, dx @ dy.T, dx.sum(1), dy.sum(1)], [txx, dx.square().sum(1), tyy, dy.square().sum(1)]


def _hsic(n: int, t: Tensor, r: Tensor, sa: Tensor, sb: Tensor, debiased: bool) -> Tensor:
    if not debiased:  # tr(KHLH) / (n-1)^2, and HKH = K for centred features
        return (t + r) / (n - 1) ** 2
    # Song et al. (2012): [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))
    return (t + sa * sb / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * r) / (n * (n - 3))


def _hsics(xs: Sequence[Tensor], ys: Sequence[Tensor] | None, debiased: bool,
           scratch: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    n, (t, r, sx, sy), (txx, rxx, tyy, ryy) = _hsic_parts(xs, ys, scratch)
    return (_hsic(n, t, r, sx[:, None], sy[None, :], debiased), _hsic(n, txx, rxx, sx, sx, debiased),
            _hsic(n, tyy, ryy, sy, sy, debiased))


def cka_matrix(xs: Sequence[Tensor], ys: Sequence[Tensor] | None = None, debiased: bool = False) -> Tensor:
    """Linear CKA of every pair (xs[i], ys[j]) as a (len(xs), len(ys)) float64 tensor; ``ys=None`` means xs."""
    _check(xs, xs if ys is None else ys, debiased)
    with _exact(xs[0].device):
        hxy, hxx, hyy = _hsics(xs, ys, debiased)
        return hxy / torch.sqrt(hxx[:, None] * hyy[None, :])


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA of activations of shape (n, ...) (flattened to (n, features)); a 0-dim float64 tensor."""
    return cka_matrix([x], [y])[0, 0]


def debiased_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA from the unbiased HSIC (Song et al. 2012), for n >= MIN_SAMPLES; a 0-dim float64 tensor."""
    return cka_matrix([x], [y], debiased=True)[0, 0]


def _median(v: Tensor, use_numpy: bool | None = None) -> Tensor:
    """``numpy.median`` of all entries (mean of the two middle values for an even count), without a device sync."""
    flat = v.reshape(-1)
    k_lo, k_hi = (flat.numel() - 1) // 2, flat.numel() // 2
    if flat.device.type == "cpu" if use_numpy is None else use_numpy:  # numpy's select: ~10x torch.kthvalue on CPU
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
        dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
        kx, ky = (_centred_rbf_gram(_centred([a], dtype)[0], sigma_frac) for a in (x, y))
        acc = torch.float32 if x.device.type == "mps" else torch.float64  # row dots summed in float64: one flat
        xy, xx, yy = (torch.einsum("ij,ij->i", a, b).sum(dtype=acc) for a, b in ((kx, ky), (kx, kx), (ky, ky)))
        return xy / torch.sqrt(xx * yy)  # float32 dot over n^2 entries is off by ~1e-4


class MinibatchCKA(Metric):
    """Minibatch linear CKA (Nguyen, Raghu & Kornblith 2021, eq. 3) accumulated without storing activations.

    ``update`` adds each layer pair's unbiased HSIC of one batch (normalised by its own n(n-3), so a ragged last batch
    counts right) to sums; ``compute()`` sums them across DDP ranks and returns HSIC_xy / sqrt(HSIC_xx HSIC_yy) as a
    (num_layers_x, num_layers_y) tensor (0-dim for 1 x 1: torchmetrics squeezes single values). States are float64:
    the sums run over many batches and ranks and a batch's HSIC is a small difference of large terms, yet they are a
    few hundred numbers (MPS: ``state_dtype=float32``).
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
        # CPU buffers reused batch after batch, freed by compute() (not states: never synced or saved). GPUs need none:
        # their caching allocator already reuses memory.
        self._scratch: dict[str, Tensor] = {}
        self.add_state("hsic_xy", torch.zeros(self.num_layers_x, self.num_layers_y, dtype=state_dtype), "sum")
        self.add_state("hsic_xx", torch.zeros(self.num_layers_x, dtype=state_dtype), "sum")
        self.add_state("hsic_yy", torch.zeros(self.num_layers_y, dtype=state_dtype), "sum")

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = "") -> MinibatchCKA:
        # Module.to(dtype) (e.g. Lightning's "bf16-true" precision) would cast the sums to bf16: keep state_dtype.
        # Private: torchmetrics keeps the states' reset values in _defaults (tests/test_private_names.py watches it).
        this = super()._apply(fn, exclude_state)
        for key in this._defaults:
            this._defaults[key] = this._defaults[key].to(this.state_dtype)
            setattr(this, key, getattr(this, key).to(this.state_dtype))
        return this

    def update(self, xs: Sequence[Tensor], ys: Sequence[Tensor] | None = None) -> None:
        """Add one batch: lists of activations (n, ...) of the same n samples; ``ys=None`` compares xs with xs."""
        if (len(xs), len(xs if ys is None else ys)) != (self.num_layers_x, self.num_layers_y):
            raise ValueError(f"expected {self.num_layers_x} x-layers and {self.num_layers_y} y-layers, got "
                             f"{len(xs)} and {len(xs if ys is None else ys)}")
        _check(xs, xs if ys is None else ys, debiased=True)
        scratch = self._scratch if xs[0].device.type == "cpu" else None
        with _exact(xs[0].device):
            states, values = (self.hsic_xy, self.hsic_xx, self.hsic_yy), _hsics(xs, ys, True, scratch)
            for state, value in zip(states, values, strict=True):
                state += value.to(self.state_dtype)  # in place: the registered states themselves

    def compute(self) -> Tensor:
        self._scratch.clear()  # the accumulation is over: give the buffers back until the next one
        return self.hsic_xy / torch.sqrt(self.hsic_xx[:, None] * self.hsic_yy[None, :])

