"""The offline search: wandb's own sweep engine (bayes, random, grid, hyperband) run from files, without a server,
so that workers on compute nodes without internet propose, train and report runs.

    space.py    the sweep's parameter space: grid sizes, seeded random draws (sweep.py uses it for grids too)
    records.py  search.json and one run-NNNN.json per run: claims under a lease lock, the engine's proposals
    launch.py   a new search directory and its job script (slurm_train.py --search)
    worker.py   one worker: claim or propose a run, train it (`python -m support.search.worker`)
    report.py   the callback that writes a run's epochs and test metrics into its record
    status.py   `sweep.py --status`: the table and the plot

Imports: support.slurm (packing, local rows), support.atomic, support.errors. Must not import support.training (which
imports this package for the report callback) or any script of the repository's root.
"""
