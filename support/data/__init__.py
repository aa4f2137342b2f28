"""Datasets: prepared once per data directory from declared downloads (datamodule.py's DATASETS), verified by their
checksums, and read from a node-local copy where the job's cluster has local scratch.

    downloads.py   prepare_dataset: download (pySmartDL), verify, build, mark complete, under a lock
    checksums.py   file checksums ("sha256:<hex>")
    local_copy.py  the verified node-local copy of a prepared dataset

Imports: support.atomic only. Must not import any other package of support/ or a script of the repository's root.
"""
