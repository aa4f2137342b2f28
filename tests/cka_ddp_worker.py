"""One rank of the 2-process DDP check in tests/test_cka.py: ``python tests/cka_ddp_worker.py RANK WORLD PORT OUT``.

Both ranks build the same deterministic batches (``make_batches``, also used by the test for the single-process
result), each updates a MinibatchCKA with its share (batch i goes to rank i % WORLD) and ``compute()`` sums the
states across the gloo group on 127.0.0.1; rank 0 saves the matrix to OUT.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cka  # noqa: E402


def make_batches() -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Five float64 batches, the last one ragged: 2 layers on one side (one 4D), 3 on the other."""
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for n in (24, 24, 24, 24, 11):
        x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
        xs = [x, torch.tanh(x @ torch.randn(6, 2 * 3 * 4, generator=gen, dtype=torch.float64)).view(n, 2, 3, 4)]
        ys = [x[:, :3] ** 2, torch.randn(n, 40, generator=gen, dtype=torch.float64), x + 0.1]
        batches.append((xs, ys))
    return batches


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)  # two processes on two cores: more threads each would thrash (~15x slower)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=60))
    try:
        metric = cka.MinibatchCKA(num_layers_x=2, num_layers_y=3)
        for i, (xs, ys) in enumerate(make_batches()):
            if i % world == rank:
                metric.update(xs, ys)
        result = metric.compute()  # torchmetrics all-gathers and sums the states (dist_reduce_fx="sum")
        if rank == 0:
            torch.save(result, out)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
