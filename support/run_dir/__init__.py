"""Run directories (runs/<name>/): what one holds, who may write it, and what makes resuming from it exact.

    checks.py      run names, checks before a run starts (one run per directory, a checkpoint that is one)
    config.py      config.yaml and config.resume-N.yaml; the settings must fit the checkpoint
    writer.py      one writer at a time (a kernel lock), checkpoints written whole or not at all
    rng_state.py   every process's random states in each checkpoint
    resumable.py   the training data's order and position in each checkpoint; exact epoch means
    streams.py     streaming data (IterableDataset) shared out between DDP processes and DataLoader workers

Imports: support.atomic and support.errors only. Must not import any other package of support/ or a script of the
repository's root.
"""
