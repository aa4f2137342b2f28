"""A stand-in for train.py in search tests: its metric is a known function of the settings, one value per "epoch",
reported into the run's record as train.py's SearchReport does, so the tests see what the engine makes of it in
milliseconds instead of minutes of training.

    python tests/search_objective.py --optimizer.lr=0.01 --model.dropout=0.3 --epochs=9 --seconds_per_epoch=0.1

val/loss at epoch e = (log10(lr) + 2.5)^2 + 4 (dropout - 0.2)^2 + 1 / (e + 1): best at lr 10^-2.5, dropout 0.2, and
a run's rank is the same at every epoch, so hyperband's verdict is known. Other --key=value arguments are ignored
(--run_dir, --wandb.group). It writes RUN_DIR/epochs (one line per epoch run) to show where a resumed run started.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support.search.records import RECORD_ENV, report_epoch, report_test  # noqa: E402


def objective(settings: dict[str, str], epoch: int) -> float:
    lr, dropout = float(settings.get("optimizer.lr", 10 ** -2.5)), float(settings.get("model.dropout", 0.2))
    return (math.log10(lr) + 2.5) ** 2 + 4 * (dropout - 0.2) ** 2 + 1 / (epoch + 1)


def main(argv: list[str]) -> int:
    settings = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
    if settings.get("fail") == "1":
        print("failing on purpose", file=sys.stderr)
        return 3
    run_dir = Path(settings["run_dir"])
    done = run_dir / "epochs"
    start = len(done.read_text().splitlines()) if "ckpt_path" in settings and done.exists() else 0
    record = os.environ.get(RECORD_ENV)
    for epoch in range(start, int(settings.get("epochs", 9))):
        time.sleep(float(settings.get("seconds_per_epoch", 0)))
        value = objective(settings, epoch)
        with open(done, "a") as f:
            f.write(f"{epoch} {value}\n")
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / "last.ckpt").write_text(str(epoch))  # what the worker resumes from
        if record and report_epoch(Path(record), epoch, value):
            break
    if record:
        report_test(Path(record), {"test/loss": objective(settings, 99)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
