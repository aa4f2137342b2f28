"""Centered Kernel Alignment (CKA) between layers: the numerics and the monitor that train.py registers as --cka.

    numerics.py  linear, RBF, debiased and minibatch CKA (torch and torchmetrics only); the root's cka.py names them
    monitor.py   CKAMonitor (the callback), the forward hooks, the heatmap, the comparison of two checkpoints

Imports: support.run_dir (checkpoint checks), support.errors, support.atomic. Must not import support.training,
support.search or support.slurm, nor a script of the repository's root (cka.py imports this package, not the other
way round).
"""
