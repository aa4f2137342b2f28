"""check.py (`make check`) on models unlike the example: manual optimization with two optimizers passes every
contract it runs in this process (the resume contract counts batches, not optimizer steps), and each planted cause
of a failed contract is named by what the check measured (support/contracts/probes.py): a stream restarted by a
resume, randomness the checkpoint does not restore, a tensor attribute outside the state_dict, noise in the test
step. The 2-process contract, which runs a copy of the project, is in tests/test_check.py."""

from __future__ import annotations

import re

import pytest
from any_models import (
    GAN,
    BlobData,
    CharData,
    EmbeddingInSetup,
    HiddenTensor,
    LinkedVocabulary,
    NoisyTest,
    OwnRandom,
    OwnSamplerData,
    StreamData,
    StreamModel,
)
from test_any_model import use
from test_check import table

import check

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IN_PROCESS = "builds,metric,fit+test,resume,evaluate"


def run_check(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict[str, tuple[str, str]]]:
    code = check.main(["--only", IN_PROCESS, "--cka.every_n_epochs=0", *args])
    return code, table(capsys.readouterr().out)


@pytest.mark.parametrize(("model", "data", "linked", "steps"), [
    (GAN, BlobData, (), 24),  # 2 epochs of 6 batches, each stepping 2 optimizers
    (EmbeddingInSetup, CharData, (), 12),
    (LinkedVocabulary, CharData, ("vocab_size",), 12),
])
def test_models_built_the_ways_lightning_documents_pass(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture, model: type, data: type,
                                                        linked: tuple[str, ...], steps: int) -> None:
    use(monkeypatch, model, data, linked)
    code, rows = run_check(capsys)
    assert code == 0 and all(state == "passed" for state, _ in rows.values()), rows
    assert rows["resume"][1] == ("after a stop before batch 3 of epoch 1 and a resume: weights equal bit for bit at "
                                 f"the end ({steps} optimizer steps)")


@pytest.mark.parametrize(("model", "data", "contract", "cause"), [
    (StreamModel, StreamData, "resume", r"cause: the training data is a stream \(IterableDataset\), which starts "
                                        r"again from its beginning"),
    (EmbeddingInSetup, OwnSamplerData, "resume", r"cause: the resumed run's batch 3 of epoch 1 is not the "
                                                 r"uninterrupted run's: the data order is not restored"),
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
