"""Cluster profiles (clusters.toml at the repository root): what a Slurm job may ask for on each cluster, the
#SBATCH header and set-up lines it gets there, and the environment built for the architecture it runs on.

    profiles.py      clusters.toml read and checked: clusters, partitions, node types, GPUs, time limits
    plan.py          one job checked against its partition: resources, time, memory, GPUs, the torch build it needs
    environments.py  the environment per CPU architecture under MLMODELDEV_HOME, and the job's set-up lines

Imports: support.data (the node-local data variable), support.gpu_check, support.errors. Must not import
support.slurm, support.search or support.training (they import this package), nor a script of the repository's root.
No torch: it is used before anything heavy loads.
"""
