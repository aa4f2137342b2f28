"""The results table of `sweep.py --status DIR`: what ran, what it gave and what it cost, read from the files the
runs left (no wandb server, no torch), for a grid, a search, an agents' job, a run, or runs/ itself.

    files.py    one run directory read into a Run (metrics.jsonl, cost.json, provenance.json, config.yaml, done)
    states.py   each run's state and cause (its records, its log's last lines, sacct and squeue)
    collect.py  which runs a directory holds, grouped
    table.py    the table, repeats as mean ± std, totals; CSV, Markdown and PNG exports

The writer of metrics.jsonl and cost.json is support/training/run_record.py (train.py's side, with torch).
Imports: support.search (a search's records and table helpers), support.provenance, support.atomic. Must not import
support.training (which imports this package's file names) or a script of the repository's root; no torch.
"""
