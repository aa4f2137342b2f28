"""What train.py adds to a LightningCLI and its Trainer, and the checks of a run's settings.

    callbacks.py       the callbacks every run gets (progress lines, signals at a batch boundary, last.ckpt, ...)
    cli.py             the run's config record, a parse that checks without training, known warnings
    wandb_logger.py    the wandb logger (online, else offline with one line), closing the run
    wandb_access.py    wandb's settings, credentials and server, without starting a run (sweep.py uses it too)
    divergence.py      a stop at the first non-finite loss or metric
    lazy_layers.py     lazy layers given their shapes before DDP wraps the model
    linking.py         LINKED: DataModule attributes handed to the model's constructor
    class_choice.py    a switched optimizer or scheduler class starts from its own defaults
    logged_metrics.py  which metric names a model logs (MONITOR and sweep metrics are checked against them)

Imports: support.search (a search run's report), support.run_dir, support.errors, support.atomic. The top of
support/: nothing in support/ imports it. Must not import a script of the repository's root.
"""
