"""Exact, fast Centered Kernel Alignment (CKA) between layer activations, and the comparison of two trained models.

Linear CKA (Kornblith et al. 2019), RBF CKA with the reference notebook's median-distance bandwidth, debiased CKA
(unbiased HSIC of Song et al. 2012) and minibatch CKA (Nguyen, Raghu & Kornblith 2021, eq. 3) as a torchmetrics
``Metric`` that sums over DDP ranks. The numerics live in support/cka/numerics.py (torch and torchmetrics only);
this script names them for you and, run as a script, compares the layers of two checkpoints.

    python -c "import torch, cka; x = torch.randn(500, 64); print(cka.linear_cka(x, x @ torch.randn(64, 32)))"
    python -c "import torch, cka; xs = [torch.randn(256, 3, 8, 8), torch.randn(256, 10)]; print(cka.cka_matrix(xs))"
    python -m pytest tests/test_cka.py -q && python benchmarks/cka.py --quick
    python cka.py runs/A/checkpoints/last.ckpt runs/B/checkpoints/last.ckpt --out heatmap.png   # two trained models

During training, train.py's --cka (support/cka/monitor.py's ``CKAMonitor``) records the same numbers every few
epochs; ``model.cka_layers`` or --cka.layers chooses the layers.
"""

from __future__ import annotations

import sys

from support.cka.numerics import MIN_SAMPLES, MinibatchCKA, cka_matrix, debiased_cka, linear_cka, rbf_cka

__all__ = ["MIN_SAMPLES", "MinibatchCKA", "cka_matrix", "debiased_cka", "linear_cka", "rbf_cka"]

if __name__ == "__main__":  # the checkpoint comparison; imported here only, so `import cka` never loads Lightning
    from support.cka.monitor import main

    sys.exit(main())
