"""Benchmark cka.py against the PyPI CKA packages, side by side, on the same CPU, threads and inputs.

The peers (pinned in requirements-bench.txt) must not be installed into the project's environment: pytorch-cka
installs a top-level module named ``cka`` that would shadow ours. Install them into a separate folder, which is
also this script's default ``--peers-dir``, and run from the repository root:

    pip install --no-deps --target /tmp/cka-peers -r requirements-bench.txt
    python benchmarks/cka.py --quick          # ~30 s
    python benchmarks/cka.py                  # full run, ~3.5 min on 2 CPU cores
    python benchmarks/cka.py --peers-dir DIR --threads 2 --cap 60

How each peer is loaded (by file path, so ``import cka`` always means ours) and called lives in cka_peers.py. A peer
that cannot be loaded or used is reported with the reason, and the run goes on.

Workloads (float32 activations; "linear" = Kornblith et al.'s CKA, "debiased" = unbiased HSIC of Song et al.):
  pair       one pair x, y of shape (n, p), n in {1000, 4000}, p in {64, 512, 2048}   (--quick: n 1000, p 64, 512)
  matrix     the 8 x 8 matrix between two "models" of 8 layers (CNN-like widths 4096..10) on n = 2048 (--quick: 512)
  minibatch  minibatch CKA (Nguyen et al. 2021) of the same 8 x 8 layers over 20 batches of 256 (--quick: 5)
Each peer is called through its fastest documented API for the job (``PEERS`` in cka_peers.py); peers with a
model-level API get "replay" models whose layers emit the prepared activations, so the forward pass costs nothing.
Each workload also gets a floor: the float32 GEMM time of the cheaper exact form (the symmetric half of every layer's
XX', or X_cat'Y_cat plus half of every X'X), at full BLAS speed with nothing else. No exact classical float32 method
goes below it, so the fastest peer's time over the floor ("at most" in the summary) bounds every possible speed-up.
Times are process CPU seconds at one thread (wall-clock with --wall or more threads: the same on an idle machine, but
CPU time is not inflated by other jobs on a shared one), the median of a few runs after a warm-up (fewer runs for slow
calls), with the same thread count for every method (--threads, default 1: on this 2-core box a second OpenMP thread
stalls small ops for ~60 ms at random, which would swamp the comparison). A call whose predicted time, from the
peer's own complexity and its first measured speed, exceeds --cap seconds is skipped and says so.
Errors are the max |value - reference| over all entries, where the reference is an independent float64 numpy
implementation of the reference notebook's formulas on the same float32 values.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from cka_peers import PEERS, load_peers  # noqa: E402

import cka  # noqa: E402  (ours: imported before any peer directory is on sys.path)

DEFAULT_PEERS_DIR = "/tmp/cka-peers"
SHAPES = [(16, 16, 16), (32, 8, 8), (64, 4, 4), (512,), (256,), (128,), (64,), (10,)]  # 8 layers, 4096..10 wide


# ---------------------------------------------------------------- float64 reference (Kornblith et al.'s notebook)
def _gram(x: torch.Tensor) -> np.ndarray:
    f = x.reshape(len(x), -1).double().numpy()
    return f @ f.T


def _center(gram: np.ndarray, unbiased: bool) -> np.ndarray:
    gram = gram.copy()
    n = gram.shape[0]
    if unbiased:  # U-centring: <centred K, centred L> / (n(n-3)) is the unbiased HSIC of Song et al. (2012)
        np.fill_diagonal(gram, 0)
        means = gram.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        gram -= means[:, None] + means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = gram.mean(0)
        means -= means.mean() / 2
        gram -= means[:, None] + means[None, :]
    return gram


def ref_matrix(xs: list[torch.Tensor], ys: list[torch.Tensor], unbiased: bool) -> np.ndarray:
    gx = [_center(_gram(x), unbiased) for x in xs]
    gy = [_center(_gram(y), unbiased) for y in ys]
    hxy = np.array([[np.vdot(a, b) for b in gy] for a in gx])
    return hxy / np.sqrt(np.outer([np.vdot(a, a) for a in gx], [np.vdot(b, b) for b in gy]))


def ref_minibatch(bx: list[list[torch.Tensor]], by: list[list[torch.Tensor]]) -> np.ndarray:
    hxy, hxx, hyy = 0.0, 0.0, 0.0
    for xs, ys in zip(bx, by, strict=True):
        n = len(xs[0])
        gx = [_center(_gram(x), True) for x in xs]
        gy = [_center(_gram(y), True) for y in ys]
        hxy = hxy + np.array([[np.vdot(a, b) for b in gy] for a in gx]) / (n * (n - 3))
        hxx = hxx + np.array([np.vdot(a, a) for a in gx]) / (n * (n - 3))
        hyy = hyy + np.array([np.vdot(b, b) for b in gy]) / (n * (n - 3))
    return hxy / np.sqrt(np.outer(hxx, hyy))


# ---------------------------------------------------------------- timing and report
CLOCK = time.process_time  # CPU seconds of this process: robust to other jobs on a shared machine (see --wall)


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, object, int]:
    """Median seconds of ``repeats`` runs after a warm-up; slow calls get fewer runs (the warm-up counts alone)."""
    start = CLOCK()
    value = fn()
    first = CLOCK() - start
    runs = repeats if first < 0.5 else (1 if first < 5 else 0)
    times = []
    for _ in range(runs):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return (statistics.median(times) if times else first), value, max(runs, 1)


@dataclass
class Bench:
    repeats: int
    cap: float
    speed: dict[str, float] = field(default_factory=dict)  # seconds per multiply-add, per peer and estimator
    rows: list[tuple[str, str, str, float | None, float | None, str]] = field(default_factory=list)
    predicted: dict[tuple[str, str], list[tuple[str, float]]] = field(default_factory=dict)  # skipped peers' seconds
    floors: dict[str, float] = field(default_factory=dict)  # seconds, per workload

    def floor(self, workload: str, bx: list[list[torch.Tensor]], by: list[list[torch.Tensor]]) -> None:
        """The float32 GEMM time that no exact classical (non-Strassen) method goes below, at the same thread count:
        for each batch, the cheaper (in multiply-adds) of the two known forms, the Gram form (the symmetric half of
        every layer's XX') or the feature form (X_cat'Y_cat plus the symmetric half of every X'X). The fastest peer's
        time over the floor bounds the speed-up that any such method can show on the workload."""
        total = 0.0
        for xs, ys in zip(bx, by, strict=True):
            fx, fy = [a.reshape(len(a), -1) for a in xs], [a.reshape(len(a), -1) for a in ys]
            n, px, py = len(fx[0]), sum(f.shape[1] for f in fx), sum(f.shape[1] for f in fy)
            if n * n * (px + py) / 2 <= n * px * py + n * sum(f.shape[1] ** 2 for f in fx + fy) / 2:
                total += measure(lambda fs=fx + fy: [f @ f.T for f in fs], self.repeats)[0] / 2
            else:
                cat_x, cat_y = torch.cat(fx, 1), torch.cat(fy, 1)
                total += measure(lambda a=cat_x, b=cat_y: a.T @ b, self.repeats)[0]
                total += measure(lambda fs=fx + fy: [f.T @ f for f in fs], self.repeats)[0] / 2
        self.floors[workload] = total
        print(f"\n{workload}: floor {total * 1e3:.1f}ms (the cheaper exact form's float32 GEMMs, symmetric halves)")

    def run(self, workload: str, job: str, ours: dict[str, Callable[[], object]], args: tuple, ref: np.ndarray,
            shape: tuple[int, list[int], list[int], int]) -> None:
        results: list[tuple[str, float | None, float | None, str]] = []
        self.predicted[workload, job] = []
        for label, fn in ours.items():
            seconds, value, runs = measure(fn, self.repeats)
            results.append((label, seconds, float(np.abs(np.asarray(value, dtype=np.float64) - ref).max()), ""))
        for peer in PEERS:
            if peer.why:
                results.append((peer.name, None, None, "unavailable"))
                continue
            make = peer.jobs.get(job)
            if make is None:
                results.append((peer.name, None, None, "no such mode"))
                continue
            units, key = peer.cost(job, *shape), f"{peer.name}/{job.split('/')[-1]}"
            if key in self.speed and units * self.speed[key] > self.cap:
                est = units * self.speed[key]
                self.predicted[workload, job].append((peer.name, est))
                results.append((peer.name, None, None, f"skipped: predicted {est:.0f} s > --cap {self.cap:.0f} s"))
                continue
            try:
                with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    seconds, value, runs = measure(make(*args), self.repeats)
            except Exception as exc:  # noqa: BLE001 - a peer failing on a workload is a result, not a crash
                results.append((peer.name, None, None, f"failed: {type(exc).__name__}: {str(exc)[:80]}"))
                continue
            if units:  # the slowest speed seen so far predicts the next, larger calls
                self.speed[key] = max(self.speed.get(key, 0.0), seconds / units)
            err = float(np.abs(np.asarray(value, dtype=np.float64).reshape(ref.shape) - ref).max())
            results.append((peer.name, seconds, err, f"{runs} run" + ("s" if runs > 1 else "")))
        ours_t = results[0][1]
        print(f"\n{workload} [{job}]")
        print(f"  {'method':<22}{'time':>12}{'peer/ours':>11}{'max |err|':>12}  note")
        for label, seconds, err, note in results:
            t_txt = f"{seconds * 1e3:10.1f}ms" if seconds is not None else f"{'-':>12}"
            r_txt = f"{seconds / ours_t:10.1f}x" if seconds is not None and not label.startswith("ours") else " " * 11
            e_txt = f"{err:12.1e}" if err is not None else f"{'-':>12}"
            print(f"  {label:<22}{t_txt}{r_txt}{e_txt}  {note}")
            self.rows.append((workload, job, label, seconds, err, note))

    def summary(self) -> None:
        print("\nsummary: ours (float32) vs the fastest peer that ran, per workload")
        keys = dict.fromkeys((w, j) for w, j, *_ in self.rows)
        for w, j in keys:
            rows = [r for r in self.rows if r[0] == w and r[1] == j]
            ours = rows[0]
            peers = [r for r in rows if not r[2].startswith("ours") and r[3] is not None]
            if not peers:
                guess = min(self.predicted.get((w, j), []), key=lambda p: p[1], default=None)
                tail = f"fastest skipped peer {guess[0]} predicted {guess[1]:.0f} s" if guess else "none available"
                print(f"  {w:<34}{j:<18}ours {ours[3] * 1e3:9.1f}ms err {ours[4]:.1e} | no peer ran: {tail}")
                continue
            best = min(peers, key=lambda r: r[3])
            print(f"  {w:<34}{j:<18}ours {ours[3] * 1e3:9.1f}ms err {ours[4]:.1e} | fastest peer {best[2]:<12} "
                  f"{best[3] * 1e3:9.1f}ms err {best[4]:.1e} | {best[3] / ours[3]:5.1f}x of at most "
                  f"{best[3] / self.floors[w]:5.1f}x")
        print("(at most: the fastest peer's time over the floor, which no exact classical float32 method goes below)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers-dir", default=DEFAULT_PEERS_DIR, help="pip --target folder holding the peers")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, ~30 s")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for every method")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (fast calls)")
    parser.add_argument("--cap", type=float, default=None, help="skip a peer call predicted to take longer (s)")
    parser.add_argument("--wall", action="store_true", help="time wall-clock seconds instead of process CPU seconds")
    args = parser.parse_args()
    global CLOCK
    wall = args.wall or args.threads > 1  # CPU time would add up the threads
    CLOCK = time.perf_counter if wall else time.process_time
    cap = args.cap if args.cap is not None else (4.0 if args.quick else 25.0)

    torch.set_num_threads(args.threads)
    with contextlib.suppress(ImportError):  # numpy's BLAS (reference, repsim's inputs) gets the same thread count
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    load_peers(Path(args.peers_dir))
    clock, mode = "wall-clock" if wall else "process CPU", "quick" if args.quick else "full"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) for every method, {clock} seconds, "
          f"cap {cap:.0f} s, {mode} run")
    for peer in PEERS:
        state = f"{peer.version}: {peer.api}" if not peer.why else peer.why
        print(f"  {peer.name:<12} {state}")

    bench = Bench(args.repeats, cap)
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731

    sizes = [(1000, p) for p in (64, 512, 2048)] + ([] if args.quick else [(4000, p) for p in (64, 512, 2048)])
    sizes = sizes[:2] if args.quick else sizes
    for n, p in sizes:
        x = rand(n, p)
        y = torch.relu(x @ rand(p, p) / p**0.5) + 0.5 * rand(n, p)
        x64, y64 = x.double(), y.double()
        bench.floor(f"pair n={n} p={p}", [[x]], [[y]])
        for kind, fn in (("linear", cka.linear_cka), ("debiased", cka.debiased_cka)):
            ref = ref_matrix([x], [y], kind == "debiased")
            ours = {"ours (float32)": lambda fn=fn, x=x, y=y: fn(x, y),
                    "ours (float64 inputs)": lambda fn=fn, x=x64, y=y64: fn(x, y)}
            bench.run(f"pair n={n} p={p}", f"pair/{kind}", ours, (x, y), ref, (n, [p], [p], 1))

    n = 512 if args.quick else 2048
    xs = [rand(n, *s) for s in SHAPES]
    ys = [torch.tanh(x + 0.7 * rand(*x.shape)) for x in xs]
    widths = [int(np.prod(s)) for s in SHAPES]
    xs64, ys64 = [a.double() for a in xs], [a.double() for a in ys]
    bench.floor(f"matrix 8x8 n={n}", [xs], [ys])
    for kind in ("linear", "debiased"):
        ref = ref_matrix(xs, ys, kind == "debiased")
        ours = {"ours (float32)": lambda k=kind: cka.cka_matrix(xs, ys, debiased=k == "debiased"),
                "ours (float64 inputs)": lambda k=kind: cka.cka_matrix(xs64, ys64, debiased=k == "debiased")}
        bench.run(f"matrix 8x8 n={n}", f"matrix/{kind}", ours, (xs, ys), ref, (n, widths, widths, 1))

    batches, size = (5, 256) if args.quick else (20, 256)
    bx = [[rand(size, *s) for s in SHAPES] for _ in range(batches)]
    by = [[torch.tanh(x + 0.7 * rand(*x.shape)) for x in xs] for xs in bx]

    def ours_minibatch(bx: list[list[torch.Tensor]], by: list[list[torch.Tensor]]) -> np.ndarray:
        metric = cka.MinibatchCKA(len(SHAPES))
        for xs_, ys_ in zip(bx, by, strict=True):
            metric.update(xs_, ys_)
        return metric.compute().numpy()

    bench.floor(f"minibatch {batches}x{size} 8x8", bx, by)
    bx64, by64 = ([[a.double() for a in b] for b in batches_] for batches_ in (bx, by))
    ours = {"ours (float32)": lambda: ours_minibatch(bx, by),
            "ours (float64 inputs)": lambda: ours_minibatch(bx64, by64)}
    bench.run(f"minibatch {batches}x{size} 8x8", "minibatch", ours, (bx, by), ref_minibatch(bx, by),
              (size, widths, widths, batches))
    bench.summary()


if __name__ == "__main__":
    main()
