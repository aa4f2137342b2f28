"""What a job runs and what a run ran: the frozen copy of the code made once per submission, and each run's record
of its code, versions, host, Slurm ids and devices.

    snapshot.py  the frozen copy (RUNS/.code/<hash>/): checked, content-addressed, complete or absent, read-only
    record.py    RUN_DIR/provenance.json, written by train.py at each start and end

Imports: support.atomic and support.errors only. Must not import any other package of support/ or a script of the
repository's root. No torch at import: slurm_train.py and the agents' scripts freeze code before anything heavy.
"""
