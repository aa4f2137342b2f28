"""How long does freezing this repository's code for a job take, and how big is the copy? Against a baseline
measured in the same run: `git archive HEAD | tar -x` (what NVIDIA NeMo-Run's GitArchivePackager does, without
the uncommitted changes that the frozen copy keeps). Goal (issue 31): well under a second and a few MB.

    python benchmarks/code_copy.py             # 5 repeats of each
    python benchmarks/code_copy.py --repeats 20

Printed: the median time of a fresh copy (checks, content hash, copy, read-only, CODE.json, rename), of a repeated
submission that finds its identical copy (checks and hash only), of the baseline, the ratio to the baseline, the
copy's files and MB; then the time to refuse a tree holding a 30 MB untracked file (one line, nothing copied).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from support.errors import LaunchError  # noqa: E402
from support.provenance.snapshot import freeze  # noqa: E402


def timed(function, repeats: int) -> float:  # noqa: ANN001 (any callable)
    return statistics.median(timeit.repeat(function, number=1, repeat=repeats))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stores = iter(range(10**6))

        def fresh() -> None:
            freeze(ROOT, Path(tmp) / f"runs-{next(stores)}")

        fresh_s = timed(fresh, args.repeats)
        shared = freeze(ROOT, Path(tmp) / "shared")
        reused_s = timed(lambda: freeze(ROOT, Path(tmp) / "shared"), args.repeats)
        archives = iter(range(10**6))

        def git_archive() -> None:
            dest = Path(tmp) / f"archive-{next(archives)}"
            dest.mkdir()
            archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)

        baseline_s = timed(git_archive, args.repeats)
        print(f"frozen copy of {ROOT.name}: {shared.files} files, {shared.bytes / 2**20:.2f} MB")
        print(f"  fresh copy:                 {fresh_s * 1000:7.1f} ms (median of {args.repeats})")
        print(f"  identical copy found:       {reused_s * 1000:7.1f} ms")
        print(f"  git archive HEAD | tar -x:  {baseline_s * 1000:7.1f} ms (baseline: committed files only)")
        print(f"  fresh copy / baseline:      {fresh_s / baseline_s:7.2f}x")

        project = Path(tmp) / "with-data"
        shutil.copytree(shared.dir, project, ignore=shutil.ignore_patterns("CODE.json", "uncommitted.patch"))
        for path in project.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (project / "notebooks").mkdir()
        (project / "notebooks" / "activations.npy").write_bytes(os.urandom(30 * 2**20))
        start = time.perf_counter()
        try:
            freeze(project, Path(tmp) / "refused")
            print("  a 30 MB untracked file: NOT refused")
            return 1
        except LaunchError as err:
            print(f"  a 30 MB untracked file:     {(time.perf_counter() - start) * 1000:7.1f} ms to refuse: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
