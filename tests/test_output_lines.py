"""What train.py, evaluate.py and sweep.py --status print: a line when early stopping ends a run, no LightningCLI
warning about args=, no "Checkpoint directory ... exists" on a resume, the first epoch line after a resume timing
that epoch, and --status saying which setting applied when the arguments after -- override the sweep's."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import pytest
from conftest import QUICK
from test_search_status import make_search, run

import train
from support.search.status import status_lines

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LOG_LINES = ["--trainer.enable_model_summary=false", "--cka.every_n_epochs=0"]  # progress on: plain lines here


def test_a_run_ended_by_early_stopping_says_so(toy_in_train: None, capsys: pytest.CaptureFixture) -> None:
    train.main(QUICK + ["--trainer.max_epochs=5", "--run_dir=run", "--early_stopping.stopping_threshold=100"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("early stopping")]
    assert len(lines) == 1 and re.match(r"early stopping ended the run after epoch 1: Stopping threshold reached: "
                                        r"val/loss = \S+ < 100", lines[0]), lines
    # Resumed and ended by max_epochs: the early stop that its checkpoint recorded is not this run's.
    train.main(QUICK + ["--trainer.max_epochs=2", "--run_dir=run", "--ckpt_path=last",
                        "--early_stopping.stopping_threshold=0"])
    assert "early stopping" not in capsys.readouterr().out


def test_a_resume_is_quiet_about_its_own_checkpoints_and_times_its_first_epoch(toy_in_train: None,
                                                                              capsys: pytest.CaptureFixture) -> None:
    train.main(LOG_LINES + ["--trainer.max_epochs=1", "--run_dir=run"])
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main(LOG_LINES + ["--trainer.max_epochs=2", "--run_dir=run", "--ckpt_path=last"])
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    seconds = [float(s) for s in re.findall(r"epoch 2/2 done in ([\d.]+)s", capsys.readouterr().out)]
    assert len(seconds) == 1 and seconds[0] < 60, seconds  # was the time since the machine's boot


def test_a_cli_built_with_args_does_not_warn_about_sys_argv(monkeypatch: pytest.MonkeyPatch,
                                                            toy_in_train: None) -> None:
    """evaluate.py builds train.py's CLI with args= while its own sys.argv has a run directory."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "runs/some-run"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.build_cli(QUICK + ["--run_dir=run"], record=False)
    assert not [w for w in caught if "args parameter" in str(w.message)], [str(w.message) for w in caught]


def test_status_says_which_setting_applied(tmp_path: Path) -> None:
    records = [run(1, {"optimizer.lr": 0.1, "trainer.max_epochs": 30}, [0.5, 0.4]),
               run(2, {"optimizer.lr": 0.01, "trainer.max_epochs": 30}, [0.6, 0.3])]
    search_dir = make_search(tmp_path / "search", records)
    search = json.loads((search_dir / "search.json").read_text())
    search["sweep"]["parameters"]["trainer.max_epochs"] = {"value": 30}
    search["extra"] = ["--trainer.max_epochs=2", "--data.batch_size=32"]
    (search_dir / "search.json").write_text(json.dumps(search))
    lines = status_lines(search_dir)
    assert "applied: trainer.max_epochs=2 (given after --, it overrides the sweep's 30 in every run)" in lines
    assert not any("trainer.max_epochs=30" in line for line in lines), lines  # the sweep's value never applied
