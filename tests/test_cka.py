"""Tests for cka.py's numerics against independent float64 implementations written straight from the papers'
formulas (the machinery around them, support/cka/monitor.py, is tested in test_cka_monitor.py).

References: explicit centring matrix H = I - 11'/n and HSIC = tr(KHLH)/(n-1)^2 (Gretton et al. 2005; Kornblith et
al. 2019); unbiased HSIC of Song et al. (2012) with zero-diagonal K~, L~; RBF kernel with sigma = frac x median
distance as in Kornblith et al.'s notebook (numpy median over the full n x n matrix of squared distances).
"""

from __future__ import annotations

import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from support.cka import numerics as cka  # noqa: E402  (the private helpers are tested too)

make_batches = runpy.run_path(str(ROOT / "tests" / "cka_ddp_worker.py"))["make_batches"]  # shared with the worker


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ float64 references, straight from the papers
def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().reshape(len(x), -1).numpy()


def ref_linear_gram(x: torch.Tensor) -> np.ndarray:
    f = _np(x)
    return f @ f.T


def ref_rbf_gram(x: torch.Tensor, frac: float = 0.5) -> np.ndarray:
    f = _np(x)
    g = f @ f.T
    sq = np.diag(g)
    d2 = sq[:, None] + sq[None, :] - 2 * g
    return np.exp(-d2 / (2 * frac**2 * np.median(d2)))


def ref_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 - the papers' L
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def ref_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = len(k)
    kt, lt, one = k - np.diag(np.diag(k)), l - np.diag(np.diag(l)), np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))


def ref_cka(k: np.ndarray, l: np.ndarray, hsic=ref_hsic) -> float:  # noqa: E741
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def ref_all(x: torch.Tensor, y: torch.Tensor, frac: float = 0.5) -> dict[str, float]:
    k, l = ref_linear_gram(x), ref_linear_gram(y)  # noqa: E741
    return {"linear": ref_cka(k, l), "debiased": ref_cka(k, l, ref_hsic_unbiased),
            "rbf": ref_cka(ref_rbf_gram(x, frac), ref_rbf_gram(y, frac))}


def ours_all(x: torch.Tensor, y: torch.Tensor, frac: float = 0.5) -> dict[str, float]:
    return {"linear": cka.linear_cka(x, y).item(), "debiased": cka.debiased_cka(x, y).item(),
            "rbf": cka.rbf_cka(x, y, sigma_frac=frac).item()}


def pair(n: int, shape_x: tuple, shape_y: tuple, seed: int = 0, dtype: torch.dtype = torch.float64):
    """Related (not identical) activations with a non-zero mean, so centring matters."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape_x, generator=gen, dtype=torch.float64) + 0.5
    mix = torch.randn(x[0].numel(), int(np.prod(shape_y)), generator=gen, dtype=torch.float64)
    y = torch.relu(x.reshape(n, -1) @ mix).reshape(n, *shape_y) + torch.randn(n, *shape_y, generator=gen,
                                                                               dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


# n > features (feature form), n < features (Gram form), 3D/4D activations, n or p > 256 (several packed blocks,
# the last one ragged) and a narrow layer with a wide one.
SHAPES = [(200, (10,), (25,)), (40, (300,), (500,)), (60, (3, 4, 5), (2, 2, 2, 3)), (50, (6, 5, 4, 3), (7,)),
          (300, (2000,), (1500,)), (300, (4,), (700,)), (400, (150,), (90,))]


def test_form_choice_follows_the_cost() -> None:
    assert not cka._gram_form(1000, [64], [64]) and not cka._gram_form(4000, [512, 256], [2048])
    assert cka._gram_form(256, [4096, 2048], [1024]) and cka._gram_form(100, [300], [5000])


@pytest.mark.parametrize("form", ["auto", "gram", "feature"])
@pytest.mark.parametrize(("n", "shape_x", "shape_y"), SHAPES)
def test_matches_float64_reference(n: int, shape_x: tuple, shape_y: tuple, form: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if form != "auto":  # force each form on every shape: both must be exact everywhere, only speed differs
        monkeypatch.setattr(cka, "_gram_form", lambda *_: form == "gram")
    x, y = pair(n, shape_x, shape_y)
    ref = ref_all(x, y)
    assert ours_all(x, y) == pytest.approx(ref, abs=1e-6)
    x32, y32 = x.float(), y.float()  # float32 inputs: compare with the reference on the same float32 values
    assert ours_all(x32, y32) == pytest.approx(ref_all(x32, y32), abs=1e-4)
    assert ref["linear"] != pytest.approx(ref["debiased"], abs=1e-3)  # the two estimators really differ here


def test_float32_inputs_are_accurate_to_1e6(monkeypatch: pytest.MonkeyPatch) -> None:
    """Float32 activations against the float64 path on the same values (itself checked against the papers above):
    sums over n^2 or p*q terms must not lose the ~1e-6 that a flat float32 reduction would."""
    gen = torch.Generator().manual_seed(9)
    n = 1500
    base = torch.relu(torch.randn(n, 64, generator=gen)) + 1
    xs = [base @ torch.randn(64, 2000, generator=gen), torch.relu(base @ torch.randn(64, 300, generator=gen)),
          base[:, :20] ** 2]
    ys = [torch.tanh(x + torch.randn(x.shape, generator=gen)) for x in xs]
    for got, want in [(cka.cka_matrix(xs, ys), cka.cka_matrix(*[[a.double() for a in s] for s in (xs, ys)])),
                      (cka.cka_matrix(xs, ys, debiased=True),
                       cka.cka_matrix([a.double() for a in xs], [a.double() for a in ys], debiased=True)),
                      (cka.rbf_cka(xs[1], ys[1]), cka.rbf_cka(xs[1].double(), ys[1].double()))]:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for form in (True, False):  # both forms on the same data
        monkeypatch.setattr(cka, "_gram_form", lambda *_, gram=form: gram)
        torch.testing.assert_close(cka.cka_matrix(xs[1:], ys[1:], debiased=True),
                                   cka.cka_matrix([a.double() for a in xs[1:]], [a.double() for a in ys[1:]],
                                                  debiased=True), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("gram", "n", "p"), [(True, 4000, 4), (False, 3000, 1500)])
def test_float32_sums_stay_short(gram: bool, n: int, p: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sums over millions of terms (Gram inner products, ||X'X||^2) are split into short float32 partial sums added
    in float64: ~3e-9 here, where a single float32 GEMM or norm over all terms is off by 2e-7 to 6e-7."""
    gen = torch.Generator().manual_seed(10)
    x = torch.relu(torch.randn(n, p, generator=gen)) + 2
    y = torch.relu(x @ torch.randn(p, p, generator=gen) + torch.randn(n, p, generator=gen))
    want = [cka.linear_cka(x.double(), y.double()), cka.debiased_cka(x.double(), y.double())]  # auto: feature form
    monkeypatch.setattr(cka, "_gram_form", lambda *_: gram)
    for got, ref in zip([cka.linear_cka(x, y), cka.debiased_cka(x, y)], want, strict=True):
        assert abs(got.item() - ref.item()) < 3e-8


def test_gpu_block_layout_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPUs get few large Gram blocks (1024 rows): the same estimates, checked here on CPU tensors."""
    x, y = pair(2500, (40,), (30,), seed=12)
    want = [cka.linear_cka(x, y), cka.debiased_cka(x, y)]  # feature form
    layout = cka._layout
    monkeypatch.setattr(cka, "_layout", lambda m, cpu: layout(m, cpu=False))
    monkeypatch.setattr(cka, "_gram_form", lambda *_: True)
    assert len(cka._layout(2500, True)) == 3  # two halves and the block between them
    torch.testing.assert_close(torch.stack([cka.linear_cka(x, y), cka.debiased_cka(x, y)]), torch.stack(want),
                               atol=1e-12, rtol=0)


def test_rbf_sigma_frac_and_median_both_paths() -> None:
    x, y = pair(81, (7,), (9,), seed=3)
    assert cka.rbf_cka(x, y, sigma_frac=0.8).item() == pytest.approx(ref_cka(ref_rbf_gram(x, 0.8),
                                                                               ref_rbf_gram(y, 0.8)), abs=1e-6)
    with pytest.raises(ValueError, match="sigma_frac"):
        cka.rbf_cka(x, y, sigma_frac=0)
    for size in (7, 8, 81, 100):  # odd and even counts, CPU (numpy) and device (kthvalue) paths
        v = torch.randn(size, dtype=torch.float64)
        for use_numpy in (True, False):
            assert cka._median(v, use_numpy).item() == pytest.approx(np.median(v.numpy()), abs=1e-12)


@pytest.mark.parametrize("fn", [cka.linear_cka, cka.debiased_cka, cka.rbf_cka])
def test_invariances_identity_and_symmetry(fn) -> None:
    x, y = pair(120, (12,), (9,), seed=1)
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    base = fn(x, y).item()
    assert fn(x @ q, y).item() == pytest.approx(base, abs=1e-9)  # orthogonal transform
    assert fn(3.7 * x, y).item() == pytest.approx(base, abs=1e-9)  # isotropic scaling
    assert fn(x + torch.randn(12, generator=gen, dtype=torch.float64) * 5, y).item() == pytest.approx(base, abs=1e-9)
    assert fn(x, x).item() == pytest.approx(1.0, abs=1e-12)
    assert fn(y, x).item() == pytest.approx(base, abs=1e-12)


def test_general_invertible_map_changes_linear_cka() -> None:
    x, _ = pair(200, (10,), (3,), seed=2)
    gen = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
    a = u @ torch.diag(torch.logspace(0, 3, 10, dtype=torch.float64)) @ v.T  # invertible, condition number 1e3
    value = cka.linear_cka(x, x @ a).item()
    assert value < 0.9  # CKA is not invariant to non-orthogonal invertible maps (unlike CCA)
    assert value == pytest.approx(ref_cka(ref_linear_gram(x), ref_linear_gram(x @ a)), abs=1e-6)


@pytest.mark.parametrize("form", ["auto", "gram", "feature"])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_equals_pairwise(debiased: bool, form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if form != "auto":
        monkeypatch.setattr(cka, "_gram_form", lambda *_: form == "gram")
    fn = cka.debiased_cka if debiased else cka.linear_cka
    gen = torch.Generator().manual_seed(11)
    for n, widths in ((90, [(5,), (3, 4, 2), (40,)]), (70, [(300,), (2, 80), (9,)])):  # feature form, Gram form
        xs = [torch.randn(n, *w, generator=gen, dtype=torch.float64) for w in widths]
        ys = [xs[0] @ torch.randn(xs[0].shape[1], 6, generator=gen, dtype=torch.float64), torch.tanh(xs[2]), xs[1] ** 2,
              torch.randn(n, 11, generator=gen, dtype=torch.float64)]
        matrix = cka.cka_matrix(xs, ys, debiased=debiased)
        assert matrix.shape == (3, 4)
        expected = torch.tensor([[fn(x, y).item() for y in ys] for x in xs], dtype=torch.float64)
        torch.testing.assert_close(matrix, expected, atol=1e-9, rtol=0)
        own = cka.cka_matrix(xs, debiased=debiased)  # ys=None: every pair within xs
        torch.testing.assert_close(own, torch.tensor([[fn(a, b).item() for b in xs] for a in xs],
                                                     dtype=torch.float64), atol=1e-9, rtol=0)


def minibatch_reference(batches: list) -> np.ndarray:
    """Per-batch unbiased HSIC (Song et al.), each with its own n(n-3), summed by hand over batches."""
    lx, ly = len(batches[0][0]), len(batches[0][1])
    hxy, hxx, hyy = np.zeros((lx, ly)), np.zeros(lx), np.zeros(ly)
    for xs, ys in batches:
        kx, ky = [ref_linear_gram(x) for x in xs], [ref_linear_gram(y) for y in ys]
        hxy += [[ref_hsic_unbiased(k, l) for l in ky] for k in kx]  # noqa: E741
        hxx += [ref_hsic_unbiased(k, k) for k in kx]
        hyy += [ref_hsic_unbiased(l, l) for l in ky]  # noqa: E741
    return hxy / np.sqrt(np.outer(hxx, hyy))


def test_minibatch_ragged_batches_match_hand_sum() -> None:
    batches = make_batches()  # sizes 24, 24, 24, 24 and a ragged 11
    expected = minibatch_reference(batches)
    metric = cka.MinibatchCKA(num_layers_x=2, num_layers_y=3)
    for xs, ys in batches:
        metric.update(xs, ys)
    np.testing.assert_allclose(metric.compute().numpy(), expected, atol=1e-6, rtol=0)
    all_xs = [torch.cat([xs[i] for xs, _ in batches]) for i in range(2)]  # one big batch is a different estimate
    all_ys = [torch.cat([ys[i] for _, ys in batches]) for i in range(3)]
    assert not np.allclose(expected, cka.cka_matrix(all_xs, all_ys, debiased=True).numpy(), atol=1e-3)
    metric32 = cka.MinibatchCKA(2, 3)
    for xs, ys in batches:
        metric32.update([x.float() for x in xs], [y.float() for y in ys])
    np.testing.assert_allclose(metric32.compute().numpy(), expected, atol=1e-4, rtol=0)

    assert {"hsic_xy", "hsic_xx", "hsic_yy"} <= set(metric._defaults)
    metric.reset()
    assert not metric.hsic_xy.any() and not metric.hsic_xx.any() and not metric.hsic_yy.any()
    same = cka.MinibatchCKA(2)  # ys=None compares the layers with themselves
    for xs, _ in batches:
        same.update(xs)
    np.testing.assert_allclose(same.compute().numpy(), minibatch_reference([(xs, xs) for xs, _ in batches]),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="expected 2 x-layers"):
        same.update(batches[0][1])


@pytest.mark.parametrize("shapes", [[(30,), (2, 5)], [(500,), (3, 9, 9)]])  # feature form, Gram form
def test_identical_inputs_give_identical_self_and_cross_results(shapes: list[tuple]) -> None:
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(300, *s, generator=gen) + 1 for s in shapes]  # float32, several packed blocks
    copies = [x.clone() for x in xs]
    assert torch.equal(cka.cka_matrix(xs), cka.cka_matrix(xs, copies))
    own, cross = cka.MinibatchCKA(2), cka.MinibatchCKA(2, 2)
    for rows in (slice(0, 100), slice(100, 300)):
        own.update([x[rows] for x in xs])
        cross.update([x[rows] for x in xs], [c[rows] for c in copies])
    assert torch.equal(own.compute(), cross.compute())


@pytest.mark.parametrize("shapes", [[(30,), (2, 5)], [(500,), (3, 9, 9)]])  # feature form, Gram form
def test_minibatch_reused_buffers_carry_nothing_between_batches(shapes: list[tuple]) -> None:
    """MinibatchCKA reuses its CPU buffers from batch to batch: batches that grow, shrink or change dtype each still
    add exactly what they add alone, and compute() gives the buffers back."""
    gen = torch.Generator().manual_seed(9)
    batches = [[torch.randn(n, *s, generator=gen, dtype=dtype) + 1 for s in shapes]
               for n, dtype in [(40, torch.float32), (120, torch.float32), (7, torch.float32), (60, torch.float64),
                                (80, torch.float32)]]
    metric, sums = cka.MinibatchCKA(2), [torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)]
    for i, xs in enumerate(batches):
        metric.update(xs)
        alone = cka.MinibatchCKA(2)
        alone.update(xs)
        sums[0] += alone.hsic_xy
        sums[1] += alone.hsic_xx
        assert torch.equal(metric.hsic_xy, sums[0]) and torch.equal(metric.hsic_xx, sums[1])
        if i == 1:
            buffer = metric._scratch["x"].data_ptr()
        if i == 2:  # the smaller batch ran in the larger one's buffer
            assert metric._scratch["x"].data_ptr() == buffer
    metric.compute()
    assert metric._scratch == {}


def test_minibatch_states_stay_float64_under_module_casts() -> None:
    metric = cka.MinibatchCKA(2, 3)
    metric.to(torch.bfloat16)  # what Lightning's "bf16-true" precision does to the LightningModule
    metric.half()
    assert {metric.hsic_xy.dtype, metric.hsic_xx.dtype, metric.hsic_yy.dtype} == {torch.float64}
    xs, ys = make_batches()[0]
    metric.update([x.to(torch.bfloat16) for x in xs], [y.to(torch.bfloat16) for y in ys])
    assert metric.compute().dtype == torch.float64


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    expected = cka.MinibatchCKA(2, 3)
    for xs, ys in make_batches():
        expected.update(xs, ys)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "cka_ddp_worker.py"), str(rank), "2", str(port),
                               str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    torch.testing.assert_close(torch.load(out), expected.compute(), atol=1e-6, rtol=0)


def test_half_precision_inputs_under_autocast_match_float32() -> None:
    x, y = pair(64, (40,), (30,), seed=4, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        xq, yq = x.to(dtype), y.to(dtype)  # quantised once; the float32 copies hold exactly the same values
        xf, yf = xq.float(), yq.float()
        expected = [*ours_all(xf, yf).values(), cka.cka_matrix([xf, yf], [yf], debiased=True)]
        metric = cka.MinibatchCKA(1)
        metric.update([xf])
        expected.append(metric.compute())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = [*ours_all(xq, yq).values(), cka.cka_matrix([xq, yq], [yq], debiased=True)]
            metric.reset()
            metric.update([xq])
            got.append(metric.compute())
            assert cka.linear_cka(xf, yf).item() == pytest.approx(expected[0], abs=1e-6)  # float32 in autocast
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64),
                                       torch.as_tensor(b, dtype=torch.float64), atol=1e-6, rtol=0)


def test_reduced_precision_matmul_settings_are_overridden_and_restored() -> None:
    x, y = pair(300, (500,), (400,), seed=6, dtype=torch.float32)
    exact = [cka.linear_cka(x, y), cka.debiased_cka(x, y), cka.cka_matrix([x, y], [y, x])]
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # TF32 on CUDA, bf16 on oneDNN CPUs
        state = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        got = [cka.linear_cka(x, y), cka.debiased_cka(x, y), cka.cka_matrix([x, y], [y, x])]
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == state
        assert state == ("tf32", "bf16")
    finally:
        torch.set_float32_matmul_precision(before)
    for a, b in zip(got, exact, strict=True):
        assert torch.equal(a, b)


def test_small_batch_raises_clear_error() -> None:
    xs, ys = [torch.randn(3, 5)], [torch.randn(3, 2)]
    assert cka.MIN_SAMPLES == 4
    match = "debiased CKA needs at least 4 samples per batch, got 3"
    with pytest.raises(ValueError, match=match):
        cka.debiased_cka(xs[0], ys[0])
    with pytest.raises(ValueError, match=match):
        cka.cka_matrix(xs, ys, debiased=True)
    with pytest.raises(ValueError, match=match + ": use a larger validation batch_size"):
        cka.MinibatchCKA(1).update(xs, ys)
    assert 0.0 <= cka.linear_cka(xs[0], ys[0]).item() <= 1.0  # the biased estimator is defined for n = 3
    with pytest.raises(ValueError, match="same number of samples"):
        cka.linear_cka(torch.randn(5, 2), torch.randn(6, 2))


class _NoHostSync(TorchFunctionMode):
    """Fails on any call that copies a value to the host (a GPU synchronisation)."""

    BANNED = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero",
              "masked_select", "unique"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.BANNED:
            raise AssertionError(f"host synchronisation: {func.__name__}")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_in_update_and_linear_functions() -> None:
    xs, ys = make_batches()[0]
    wide = [torch.randn(24, 400, dtype=torch.float64)]  # Gram form
    metric = cka.MinibatchCKA(2, 3)
    with _NoHostSync():
        metric.update(xs, ys)
        metric.update([x.float() for x in xs], [y.float() for y in ys])
        cka.linear_cka(xs[0], ys[0])
        cka.debiased_cka(wide[0], ys[1])
        cka.cka_matrix(xs + wide, ys, debiased=True)
    with pytest.raises(AssertionError, match="host synchronisation"), _NoHostSync():
        cka.linear_cka(xs[0], ys[0]).item()  # the guard itself works


@pytest.mark.slow
def test_importing_cka_loads_no_lightning() -> None:
    """cka.py names the standalone numerics (support/cka/numerics.py): its command line imports support/cka/monitor.py
    (and Lightning) lazily, and nothing else of support/ loads."""
    code = "import sys, cka; print(sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', " \
           "'lightning', 'support')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['support', 'support.cka', 'support.cka.numerics']"
