"""The default dataset is chosen where the datasets are declared (datamodule.py's DEFAULT_DATASET), and it is what
train.py, sweeps and grids train on; sweep.py --dry-run says which data every run uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_of_repo, script_env
from test_make_it_your_own import OWN_DATASET, edit

pytestmark = pytest.mark.example_data  # the example DataModule's DATASETS and DEFAULT_DATASET


@pytest.mark.slow
def test_a_new_default_dataset_is_what_sweeps_and_grids_train_on(tmp_path: Path) -> None:
    copy = copy_of_repo(tmp_path / "my-project", suffix=".py")
    # Add a dataset the README's way and make it the default, in the lines the README names.
    edit(copy / "datamodule.py", "\n\n# Checksums and mirrors", OWN_DATASET + "# Checksums and mirrors")
    edit(copy / "datamodule.py", 'DATASETS: dict[str, DatasetSpec] = {\n',
         'DATASETS: dict[str, DatasetSpec] = {\n    "blobs": DatasetSpec(1, 4, 255, build_blobs),\n')
    edit(copy / "datamodule.py", 'DEFAULT_DATASET = "digits"', 'DEFAULT_DATASET = "blobs"')

    def run(*args: str) -> str:
        result = subprocess.run([sys.executable, *args], cwd=copy, capture_output=True, text=True, timeout=300,
                                env=script_env())
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    assert "every run trains on train.py's default data settings: data.dataset=blobs" in run("sweep.py", "--dry-run")
    rows = ("import sweep; rows = sweep.grid_configs()[:1] + sweep.random_configs(1); "
            "print(*(sweep.train_config(sweep.to_argv(row)).data.dataset for row in rows))")
    assert run("-c", rows).split() == ["blobs", "blobs"]
