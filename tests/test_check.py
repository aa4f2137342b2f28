"""check.py (`make check`): the template's contracts on the configured model and data. The repository's own model
passes them all; in copies made the researcher's way, a model whose forward reads a plain-attribute counter fails
the resume contract naming the attribute, and a MONITOR the model never logs fails the metric contract."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, copy_of_repo, script_env

COUNTING_MODEL = '''

class CountingClassifier(ImageClassifier):
    """Counts its forward calls in a plain attribute and scales its output by it: a checkpoint does not hold it."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x) * (1.0 + 0.001 * self.calls)
'''


def copy_with(tmp_path: Path, model_class: str, monitor: str = "val/loss", model_extra: str = "") -> Path:
    """The repository's tracked files, with train.py's "What you change" (and model.py) edited as a researcher does."""
    copy = copy_of_repo(tmp_path / "project")
    (copy / "model.py").write_text((copy / "model.py").read_text() + model_extra)
    train = (copy / "train.py").read_text()
    train = train.replace("MODEL_CLASS = model.ImageClassifier", f"MODEL_CLASS = model.{model_class}", 1)
    (copy / "train.py").write_text(train.replace('MONITOR, MONITOR_MODE = "val/loss", "min"',
                                                 f'MONITOR, MONITOR_MODE = "{monitor}", "min"', 1))
    return copy


def check(where: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(where / "check.py"), *args], cwd=where, capture_output=True,
                          text=True, timeout=600, env=script_env())


def table(out: str) -> dict[str, tuple[str, str]]:
    rows = out[out.index("\ncontract  "):].splitlines()[2:]
    return {m.group(1): (m.group(2), m.group(3)) for row in rows
            if (m := re.match(r"(\S+)\s+(passed|FAILED|skipped)\s+(.*)", row))}


@pytest.mark.slow
def test_the_configured_model_passes_every_contract():
    result = check(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table(result.stdout)
    assert list(rows) == ["builds", "metric", "fit+test", "resume", "evaluate", "ddp", "sweep", "cka"]
    assert all(state == "passed" for state, _ in rows.values()), rows
    assert "weights equal bit for bit" in rows["resume"][1]
    assert re.search(r"make check: 8 of 8 contracts passed in \d+ s\n", result.stdout)


@pytest.mark.slow
def test_state_outside_the_state_dict_fails_the_resume_contract_naming_it(tmp_path: Path):
    copy = copy_with(tmp_path, "CountingClassifier", model_extra=COUNTING_MODEL)
    result = check(copy, "--only", "resume")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    state, detail = table(result.stdout)["resume"]
    assert state == "FAILED" and "model attribute calls is" in detail and "register_buffer" in detail, detail
    assert "FAILED: resume" in result.stdout


@pytest.mark.slow
def test_a_monitor_the_model_never_logs_fails_the_metric_contract(tmp_path: Path):
    copy = copy_with(tmp_path, "ImageClassifier", monitor="val/f1")
    result = check(copy, "--only", "metric,fit+test")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table(result.stdout)
    assert rows["metric"][0] == "FAILED" and "'val/f1'" in rows["metric"][1], rows
    assert "FAILED: metric" in result.stdout


@pytest.mark.parametrize("argv, words", [(["--only", "speed"], "no such contract")])
def test_bad_options_are_one_line(argv: list[str], words: str):
    result = subprocess.run([sys.executable, str(REPO / "check.py"), *argv], capture_output=True, text=True,
                            timeout=60, env=script_env())
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


def copy_using(tmp_path: Path, model_class: str, data_class: str) -> Path:
    """A copy of the project whose train.py trains tests/any_models.py's classes (copied beside it)."""
    copy = copy_of_repo(tmp_path / "project")
    (copy / "any_models.py").write_text((REPO / "tests" / "any_models.py").read_text())
    train = (copy / "train.py").read_text().replace("import model\n", "import any_models\nimport model\n", 1)
    train = train.replace("MODEL_CLASS = model.ImageClassifier", f"MODEL_CLASS = any_models.{model_class}", 1)
    train = train.replace("DATAMODULE_CLASS = datamodule.DataModule", f"DATAMODULE_CLASS = any_models.{data_class}", 1)
    (copy / "train.py").write_text(train.replace('LINKED = ("num_classes", "in_channels")', "LINKED = ()", 1))
    return copy


@pytest.mark.slow
def test_a_gan_passes_the_ddp_contract_with_the_strategy_it_needs(tmp_path: Path):
    """Manual optimization of two optimizers leaves the generator's parameters out of the discriminator's backward:
    plain DDP refuses that, and the contract's hint names the strategy that works; given in ARGS, it is kept (it
    was overwritten), and the in-process contracts before it leave no process group or port behind (EADDRINUSE)."""
    copy = copy_using(tmp_path, "GAN", "BlobData")
    plain = table(check(copy, "--only", "ddp", "--cka.every_n_epochs=0").stdout)
    assert plain["ddp"][0] == "FAILED" and "--trainer.strategy=ddp_find_unused_parameters_true" in plain["ddp"][1]
    result = check(copy, "--only", "builds,metric,fit+test,resume,evaluate,ddp", "--cka.every_n_epochs=0",
                   "--trainer.strategy=ddp_find_unused_parameters_true")  # not sweep: SWEEP_CONFIG is the example's
    rows = table(result.stdout)
    assert result.returncode == 0 and all(state == "passed" for state, _ in rows.values()), result.stdout[-3000:]
    assert "24 optimizer steps" in rows["resume"][1]


@pytest.mark.slow
def test_processes_that_train_on_the_same_batches_fail_the_ddp_contract(tmp_path: Path):
    copy = copy_using(tmp_path, "StreamModel", "UnshardedStreamData")
    state, detail = table(check(copy, "--only", "ddp", "--cka.every_n_epochs=0").stdout)["ddp"]
    assert state == "FAILED", detail
    assert detail.startswith("the 2 processes trained on the same batches (6 of 6 distinct batches alike)"), detail
