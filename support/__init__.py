"""The template's machinery: what train.py, datamodule.py, sweep.py and slurm_train.py build on.

Nothing here names the example model or data, and nothing here imports a script of the repository's root
(train.py, model.py, datamodule.py, ...): a researcher who makes the template their own edits those scripts and
never needs to read this folder. One package per concern, each importing only the ones below it:

    training/   what train.py adds to a Trainer: callbacks, checks of the settings, the CLI's record, wandb
    search/     the offline search (wandb's engine without a server): records, workers, status table
    slurm/      job arrays: the job scripts, sbatch, packing runs onto GPUs, `--local` rows
    clusters/   cluster profiles (clusters.toml): partitions, #SBATCH headers, environments per architecture
    data/       datasets: declared downloads, checksums, the node-local copy
    cka/        CKA: the numerics and the monitor train.py registers
    run_dir/    run directories: checks, the saved config, the one-writer lock, exact resume
    gpu_check.py, errors.py, atomic.py: shared by all; errors.py and atomic.py import nothing of the project

tests/test_layers.py fails on an import circle or an upward import.
"""

from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent  # the project: train.py, clusters.toml, requirements.lock, runs/
