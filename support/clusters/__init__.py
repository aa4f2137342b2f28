"""Cluster profiles (clusters.toml at the repository root): what a Slurm job may ask for on each cluster, the
#SBATCH header and set-up lines it gets there, and the environment built for the architecture it runs on."""
