"""check.py's measurements: what `make check` looks at to name why a contract failed, rather than guess.

    probes.py   fingerprints of the batches each run (and each DDP rank) trained on, a model's state outside its
                state_dict, the first weight that differs, and a clean process state around each contract

Imports: nothing of support/ but support.errors. Must not import a script of the repository's root.
"""
