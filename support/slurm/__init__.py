"""Slurm submission: what slurm_train.py writes and submits for grids, searches and wandb agents, and runs with
--local without Slurm.

    jobs.py        the #SBATCH header, --array values, sbatch, the jobs Slurm still lists
    scripts.py     the job scripts of grids and agents (one array task runs one row, or K rows with --runs-per-gpu)
    packing.py     several runs per GPU: rows per task, a free DDP port per run, out-of-memory as one line
    grid_rows.py   a grid's rows: distinct values parsed once, devices per row, arguments after -- winning
    array_limit.py the cluster's MaxArraySize (clusters.toml, or scontrol), checked before anything is written
    local_rows.py  --local: the rows run on this machine, stopped together, no orphans, finished by their marker
    resume.py      --resume: grid.json checked, the unfinished rows, a moved or copied directory's script rewritten
    options.py     slurm_train.py's command line

Imports: support.clusters (the profile a job is checked against), support.errors. Must not import support.search or
support.training (both import this package), or any script of the repository's root. No torch: it is used before
anything heavy loads.
"""
