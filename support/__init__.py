"""The template's machinery: what train.py, datamodule.py, sweep.py and slurm_train.py build on.

Nothing here names the example model or data, and nothing here imports a script of the repository's root
(train.py, model.py, datamodule.py, ...): a researcher who makes the template their own edits those scripts and
never needs to read this folder. One package per concern, each importing only the ones below it:

    contracts/  what `make check` (check.py) measures to name why a contract failed
    training/   what train.py adds to a Trainer: callbacks, checks of the settings, the CLI's record, wandb
    results/    `sweep.py --status`: every run's state, cause, metrics and cost, from the files runs write
    search/     the offline search (wandb's engine without a server): records, workers, status table
    slurm/      job arrays: the job scripts, sbatch, packing runs onto GPUs, `--local` rows
    clusters/   cluster profiles (clusters.toml): partitions, #SBATCH headers, environments per architecture
    data/       datasets: declared downloads, checksums, the node-local copy
    cka/        CKA: the numerics and the monitor train.py registers
    run_dir/    run directories: checks, the saved config, the one-writer lock, exact resume
    provenance/ what runs: the frozen copy of the code per submission, each run's record of what it ran
    gpu_check.py, errors.py, atomic.py: shared by all; errors.py and atomic.py import nothing of the project

tests/test_layers.py fails on an import circle or an upward import.
"""

import sys
from importlib.abc import MetaPathFinder
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent  # the project: train.py, clusters.toml, requirements.lock, runs/

# Where v0.3.0 moved the modules of the flat support/ (CHANGELOG.md, v0.3.0). A researcher's own code that still
# imports an old name gets one line naming the new one, instead of "No module named ...".
MOVED = {
    "support.sweep_space": "support.search.space", "support.search_records": "support.search.records",
    "support.search_launch": "support.search.launch", "support.search_worker": "support.search.worker",
    "support.search_report": "support.search.report", "support.search_status": "support.search.status",
    "support.slurm_jobs": "support.slurm.jobs", "support.job_scripts": "support.slurm.scripts",
    "support.packing": "support.slurm.packing", "support.local_rows": "support.slurm.local_rows",
    "support.launch_options": "support.slurm.options", "support.downloads": "support.data.downloads",
    "support.local_data": "support.data.local_copy", "support.runs": "support.run_dir.checks",
    "support.run_directory": "support.run_dir.config and support.run_dir.writer",
    "support.rng_state": "support.run_dir.rng_state", "support.resumable": "support.run_dir.resumable",
    "support.wandb_access": "support.training.wandb_access", "support.divergence": "support.training.divergence",
    "support.lazy_layers": "support.training.lazy_layers", "support.linking": "support.training.linking",
    "support.class_choice": "support.training.class_choice",
    "support.logged_metrics": "support.training.logged_metrics", "support.cka_monitor": "support.cka.monitor",
}


class MovedModules(MetaPathFinder):
    """Asked last, only for a name no other finder knows: an old name of MOVED is one line, not a traceback."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname in MOVED:
            raise ModuleNotFoundError(f"{fullname} moved to {MOVED[fullname]} in the template's v0.3.0 (CHANGELOG.md): "
                                      "change the import", name=fullname)


if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(MovedModules())
