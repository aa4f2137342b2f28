"""Bad input to train.py, as a new user makes it: one line that names the problem and the fix, a non-zero exit,
and no traceback. (In-process: train.main raises SystemExit with that line; test_train.py checks the real command
line for a few cases.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import QUICK

import train

pytestmark = [pytest.mark.example_model, pytest.mark.example_data]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("a file, not a directory")
    (tmp_path / "config.yaml").write_text("model:\n  depth: 2\n")
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04" + bytes(200))  # a zip cut short, as a full disk leaves
    return tmp_path


@pytest.mark.parametrize("args, words", [
    (["--ckpt_path=missing.ckpt"], "--ckpt_path missing.ckpt does not exist"),
    (["--ckpt_path=truncated.ckpt"], "is not a checkpoint"),
    (["--ckpt_path=config.yaml"], "is not a checkpoint"),
    (["--ckpt_path=last", "--run_dir=mistyped"], "has no last.ckpt"),
    (["--run_dir=afile"], "is a file"),
    (["--run_dir=afile/run"], "is not a directory this user can write"),
    (["--cka.reference_checkpoint=missing.ckpt"], "--cka.reference_checkpoint"),
    (["--data.num_workers=-1"], "num_workers must be at least 0"),
    (["--data.data_dir=afile/data"], "cannot create data directory"),
    (["--optimizer=NoSuchOptimizer"], "--optimizer=NoSuchOptimizer: no such class"),
    (["--checkpoint.monitor=val/nosuch"], "--checkpoint.monitor=val/nosuch is never logged"),
])
def test_bad_input_is_one_line_naming_it(args: list[str], words: str, files: Path):
    with pytest.raises(SystemExit) as stopped:
        train.main(QUICK + ["--trainer.max_epochs=1", *args])
    message = str(stopped.value.code)
    assert message.startswith("error: ") and words in message.splitlines()[0], message
    assert len(message.splitlines()) <= 2  # the line, and for a command-line mistake a pointer to --help
    # Nothing that looks like a finished run: no checkpoint anywhere (the monitor is checked at the sanity check).
    assert not [path for path in Path(".").glob("**/*.ckpt") if path.name != "truncated.ckpt"]


def test_a_corrupt_prepared_dataset_is_named_with_the_fix(files: Path):
    train.main(QUICK + ["--trainer.max_epochs=1", "--data.data_dir=data", "--cka.every_n_epochs=0"])
    Path("data/digits/data.pt").write_bytes(b"\0" * 100)  # under its COMPLETE marker
    with pytest.raises(SystemExit) as stopped:
        train.main(QUICK + ["--trainer.max_epochs=1", "--data.data_dir=data"])
    message = str(stopped.value.code)
    assert "data/digits/data.pt cannot be read" in message and "delete" in message and len(message.splitlines()) == 1
