"""check.py (`make check`) on models unlike the example: manual optimization with two optimizers passes every
contract it runs in this process (the resume contract counts batches, not optimizer steps), and each planted cause
of a failed contract is named by what the check measured (support/contracts/probes.py): a stream restarted by a
resume, randomness the checkpoint does not restore, a tensor attribute outside the state_dict, noise in the test
step. The 2-process contract, which runs a copy of the project, is in tests/test_check.py."""

from __future__ import annotations

import re

import pytest
from any_models import GAN, BlobData, CharData, HiddenTensor, NoisyTest, OwnRandom, StreamData, StreamModel
from test_any_model import use
from test_check import table

import check

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IN_PROCESS = "builds,metric,fit+test,resume,evaluate"


def run_check(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict[str, tuple[str, str]]]:
    code = check.main(["--only", IN_PROCESS, "--cka.every_n_epochs=0", *args])
    return code, table(capsys.readouterr().out)


def test_a_gan_with_two_optimizers_passes_and_resumes_at_a_batch(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    use(monkeypatch, GAN, BlobData)
    code, rows = run_check(capsys)
    assert code == 0 and all(state == "passed" for state, _ in rows.values()), rows
    # 2 epochs of 6 batches, each stepping 2 optimizers: 24 steps. The stop came before batch 3 of epoch 1.
    assert rows["resume"][1] == ("after a stop before batch 3 of epoch 1 and a resume: weights equal bit for bit at "
                                 "the end (24 optimizer steps)")


@pytest.mark.parametrize(("model", "data", "contract", "cause"), [
    (StreamModel, StreamData, "resume", r"cause: the training data is a stream \(IterableDataset\), which starts "
                                        r"again from its beginning"),
    (OwnRandom, CharData, "resume", r"cause: randomness the checkpoint does not restore: two resumes from the same "
                                    r"checkpoint differ \(.*\)"),
    (HiddenTensor, CharData, "resume", r"cause: model attribute scale is tensor \[[\d.]+\] uninterrupted but "
                                       r"tensor \[[\d.]+\] resumed: state outside state_dict"),
    (HiddenTensor, CharData, "evaluate", r"cause: model attribute scale is tensor \[[\d.]+\] after training but "
                                         r"tensor \[1.0\] when loaded: state outside state_dict"),
    (NoisyTest, CharData, "evaluate", r"cause: two evaluations of the same checkpoint differ"),
])
def test_each_planted_cause_is_named(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, model: type,
                                     data: type, contract: str, cause: str) -> None:
    use(monkeypatch, model, data)
    code, rows = run_check(capsys)
    assert code == 1, rows
    failed = {name for name, (state, _) in rows.items() if state == "FAILED"}
    assert contract in failed and failed <= {"resume", "evaluate"}, rows
    assert re.search(cause, rows[contract][1]), rows[contract][1]
