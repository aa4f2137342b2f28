"""The template's machinery: what train.py, datamodule.py, sweep.py and slurm_train.py build on.

Nothing here names the example model or data, and nothing here imports model.py or datamodule.py: a researcher
who makes the template their own edits the scripts at the repository root and never needs to read this folder.
"""
