"""Does my model work with everything? The template's promises checked on YOUR model and data (train.py's "What you
change": MODEL_CLASS, DATAMODULE_CLASS, MONITOR), on the CPU, on a few batches, in about a minute:

    make check                                    # or: python check.py
    make check ARGS="--data.dataset=blobs"        # the arguments you train with: every run here gets them
    python check.py --only resume,metric          # some of the contracts

The contracts, each one line in the table at the end, a failure with its likely cause and the fix:
    builds     the model and DataModule build from train.py's settings (constructors, LINKED names)
    metric     MONITOR is logged by the model (the best checkpoint, early stopping and sweeps read it)
    fit+test   a short fit and a test of the best checkpoint end with finite metrics
    resume     a run stopped mid-epoch and resumed ends with exactly the weights of an uninterrupted one
    evaluate   evaluate.py on the run gives the end-of-training test metrics
    ddp        2 DDP processes (CPU) train, and their test metrics equal one process's evaluation
    sweep      SWEEP_CONFIG validates, and its grid (or 3 draws) passes slurm_train.py's dry run
    cka        the layers CKA compares exist once the model's setup() has run (CKA on), or CKA is cleanly off
Runs go to a temporary directory (--keep DIR keeps them); nothing is logged to wandb. Exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent
CONTRACTS = ("builds", "metric", "fit+test", "resume", "evaluate", "ddp", "sweep", "cka")
EPOCHS, BATCHES, STOP_AT = 2, 6, 9  # 2 epochs of 6 batches; the stopped run saves at step 9, mid-epoch 1
SHORT = [f"--trainer.max_epochs={EPOCHS}", f"--trainer.limit_train_batches={BATCHES}",
         "--trainer.limit_val_batches=3", "--trainer.limit_test_batches=3", "--trainer.accelerator=cpu",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--early_stopping.patience=100", "--trainer.log_every_n_steps=1",
         "--trainer.logger=pytorch_lightning.loggers.CSVLogger"]  # not wandb (nothing to sync); LR monitor needs one
WHOLE_TEST = ["--trainer.limit_test_batches=1.0"]  # DDP against one process: the same samples, all of them


@dataclass
class Outcome:
    contract: str
    passed: bool | None  # None: not run (skipped, with the reason)
    detail: str


def finite(metrics: dict[str, Any]) -> list[str]:
    return [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]


def plain_state(model: Any) -> dict[str, Any]:
    """The model's own attributes of plain types (counters, flags, lists of numbers): state a checkpoint does not
    hold unless the model saves it."""
    skip = {"training", "prepare_data_per_node", "allow_zero_length_dataloader_with_multiple_devices"}
    return {k: v for k, v in vars(model).items() if not k.startswith("_") and k not in skip
            and isinstance(v, (int, float, bool, str, list, tuple))}


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    for key, value in a.items():
        other = b.get(key)
        if other is None or other.shape != value.shape:
            return f"{key} missing or reshaped"
        if not bool((value == other).all()):
            return f"{key} differs by up to {float((value.double() - other.double()).abs().max()):.3g}"
    return None


class Checker:
    def __init__(self, args: list[str], work: Path, only: set[str]) -> None:
        self.args, self.work, self.only = [*args, *SHORT, f"--trainer.logger.save_dir={work / 'logs'}"], work, only
        self.outcomes: list[Outcome] = []

    def record(self, contract: str, passed: bool | None, detail: str) -> None:
        if contract in self.only:
            self.outcomes.append(Outcome(contract, passed, detail))
            mark = {True: "passed", False: "FAILED", None: "skipped"}[passed]
            print(f"[check] {contract}: {mark}: {detail}", flush=True)

    def skip_rest(self, contracts: tuple[str, ...], why: str) -> None:
        for contract in contracts:
            self.record(contract, None, why)

    def run(self) -> None:
        import torch
        from pytorch_lightning import Callback

        import train
        from support.errors import one_line
        from support.training.callbacks import stopped_by_signal

        class SaveAtStep(Callback):  # between two batches, where train.py's Slurm requeue saves
            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                if trainer.global_step == STOP_AT and not Path(mid).exists():
                    trainer.save_checkpoint(mid)

        mid, full, resumed = str(self.work / "mid.ckpt"), self.work / "full", self.work / "resumed"
        name = f"{train.MODEL_CLASS.__name__} with {train.DATAMODULE_CLASS.__name__}"
        try:
            cli = train.build_cli([*self.args, f"--run_dir={full}"])
        except Exception as err:  # a constructor, a bad argument, a LINKED name
            self.record("builds", False, f"{name}: {one_line(err)}. Fix the constructor or the arguments given")
            return self.skip_rest(CONTRACTS[1:], "the model and data do not build")
        self.record("builds", True, name)
        cli.trainer.callbacks.append(SaveAtStep())
        try:
            with stopped_by_signal():
                ended = train.fit_and_test(cli)
        except Exception as err:
            logged = sorted(cli.trainer.callback_metrics)
            if train.MONITOR not in logged and train.MONITOR in str(err):  # the checkpoint or early stopping asked
                self.record("metric", False, f"MONITOR {train.MONITOR!r} is never logged by "
                            f"{train.MODEL_CLASS.__name__} (it logs: {', '.join(logged) or 'nothing'}): log it with "
                            f"self.log({train.MONITOR!r}, ...) in validation_step, or set MONITOR in train.py")
            else:
                self.record("fit+test", False, f"{one_line(err)}")
            return self.skip_rest(("fit+test", "resume", "evaluate", "ddp", "cka"), "the short fit failed")
        self.check_cka(cli)  # after the fit: the layers the model's setup() builds exist now
        best = cli.config_init.checkpoint.best_model_score  # by MONITOR (the test has replaced the logged metrics)
        self.record("metric", True, f"{train.MONITOR} logged; best {float(best):.4g} ({train.MONITOR_MODE})"
                    if best is not None else f"{train.MONITOR} logged")
        if bad := finite(ended):
            self.record("fit+test", False, f"{', '.join(bad)} not finite after {EPOCHS} epochs: lower the learning "
                                           "rate or check the loss")
        else:
            self.record("fit+test", True, "  ".join(f"{k}={v:.4g}" for k, v in ended.items() if isinstance(v, float)))
        for contract, check in [("resume", lambda: self.check_resume(train, torch, cli, mid, full, resumed)),
                                ("evaluate", lambda: self.check_evaluate(ended, full)), ("ddp", self.check_ddp)]:
            try:
                check()
            except (Exception, SystemExit) as err:  # train.py and evaluate.py stop bad settings with SystemExit
                self.record(contract, False, one_line(err) if isinstance(err, Exception) else str(err))

    def check_cka(self, cli: Any) -> None:
        """What the fit's CKA monitor found when fitting started, after the model's setup() and configure_model()."""
        from support.cka.monitor import CKAMonitor

        monitor = next((c for c in cli.trainer.callbacks if isinstance(c, CKAMonitor)), None)
        if monitor is None or monitor.every_n_epochs <= 0:
            return self.record("cka", True, "off (--cka.every_n_epochs=0)")
        if monitor.layer_problem:  # the run went on without these layers: a name to fix, not a reason to stop
            return self.record("cka", False, f"{monitor.layer_problem}: fix the name(s)")
        if monitor.off:
            return self.record("cka", True, f"off: {monitor.off_reason}")
        self.record("cka", True, f"on, every {monitor.every_n_epochs} epoch(s): {', '.join(monitor.names)} "
                                 f"({monitor.chosen_by})")

    def check_resume(self, train: Any, torch: Any, cli: Any, mid: str, full: Path, resumed: Path) -> None:
        if "resume" not in self.only:
            return
        if not Path(mid).exists():
            return self.record("resume", None, f"fewer than {STOP_AT} training steps: nothing to stop mid-epoch")
        from support.training.callbacks import stopped_by_signal

        again = train.build_cli([*self.args, f"--run_dir={resumed}", f"--ckpt_path={mid}"])
        with stopped_by_signal():
            train.fit_and_test(again)
        a, b = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
                for d in (full, resumed))
        difference = first_difference(a["state_dict"], b["state_dict"])
        if difference is None and a["global_step"] == b["global_step"]:
            return self.record("resume", True, f"stopped at step {STOP_AT} (epoch 1, mid-epoch), resumed: weights "
                                               f"equal bit for bit at step {a['global_step']}")
        drift = [f"{k} ends {v!r} uninterrupted but {plain_state(again.model).get(k)!r} resumed"
                 for k, v in plain_state(cli.model).items() if plain_state(again.model).get(k) != v]
        cause = (f"model attribute {drift[0]}: state outside state_dict. Fix: keep it in a buffer "
                 "(self.register_buffer) or save and load it in on_save_checkpoint / on_load_checkpoint") \
            if drift else ("state outside state_dict (a plain attribute the forward reads), or a random source the "
                           "checkpoint does not restore (numpy, random, an unseeded Generator): draw from torch's")
        self.record("resume", False, f"after a stop at step {STOP_AT} and a resume, {difference or 'the step'}; "
                                     f"likely {cause}")

    def check_evaluate(self, ended: dict[str, Any], full: Path) -> None:
        if "evaluate" not in self.only:
            return
        import evaluate

        with contextlib.redirect_stdout(io.StringIO()):
            again = evaluate.evaluate(full)
        wrong = {k: (v, again.get(k)) for k, v in ended.items() if k.startswith("test") and again.get(k) != v}
        if wrong:
            return self.record("evaluate", False, f"evaluate.py gives {wrong} (training, evaluate.py): the test data "
                                                  "or the model depends on something outside the run's config")
        self.record("evaluate", True, f"evaluate.py equals the end of training ({len(ended) - 2} metrics)")

    def check_ddp(self) -> None:
        if "ddp" not in self.only:
            return
        out, run_dir = self.work / "ddp.json", self.work / "ddp"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        result = subprocess.run([sys.executable, __file__, "--ddp-run", str(out), *self.args,
                                 "--trainer.devices=2", "--trainer.strategy=ddp", *WHOLE_TEST, f"--run_dir={run_dir}"],
                                capture_output=True, text=True, env=env, timeout=600)
        if result.returncode != 0 or not out.is_file():
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            last = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1:] or [""])
            last = last if isinstance(last, str) else last[0]
            hint = ("lazy layers (nn.LazyLinear ...) must be built by a batch before DDP wraps the model"
                    if "uninitialized parameters" in last else
                    "a parameter unused in forward: --trainer.strategy=ddp_find_unused_parameters_true"
                    if "unused" in last or "find_unused_parameters" in last else
                    "run the same with --trainer.devices=2 --trainer.strategy=ddp to see it whole")
            return self.record("ddp", False, f"2 processes failed: {last.strip()[:300]}; {hint}")
        trained = json.loads(out.read_text())
        import evaluate

        with contextlib.redirect_stdout(io.StringIO()):
            single = evaluate.evaluate(run_dir, overrides=WHOLE_TEST)
        wrong = {k: (v, single.get(k)) for k, v in trained.items()
                 if k.startswith("test") and not math.isclose(v, single.get(k, math.nan), rel_tol=1e-6)}
        if wrong:
            return self.record("ddp", False, f"test metrics under DDP differ from one process {wrong}: a metric "
                                             "averaged per batch over uneven shards; log it with a torchmetrics Metric")
        self.record("ddp", True, "2 processes trained; their test metrics equal one process's evaluation")

    def check_sweep(self) -> None:
        if "sweep" not in self.only:
            return
        import slurm_train
        import sweep

        method = sweep.SWEEP_CONFIG.get("method")
        argv = ["--dry-run", "--local", *(["--sample", "3"] if method != "grid" else []), "--", *self.args]
        errors = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
            code = slurm_train.main(argv)
        if code != 0:
            return self.record("sweep", False, errors.getvalue().strip().removeprefix("error: ") +
                               " (sweep.py's SWEEP_CONFIG)")
        self.record("sweep", True, f"SWEEP_CONFIG ({method}) validates; "
                                   f"{'its grid' if method == 'grid' else '3 draws'} pass the dry run")


def ddp_run(out: str, args: list[str]) -> None:
    """One rank of the ddp contract (Lightning starts the second by running this command again)."""
    import train

    results = train.main(args)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        Path(out).write_text(json.dumps({k: v for k, v in results.items() if isinstance(v, float)}))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--ddp-run"]:
        ddp_run(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="python check.py [--only C1,C2] [--keep DIR] [train.py arguments]")
    parser.add_argument("--only", help=f"comma-separated contracts (default: all of {', '.join(CONTRACTS)})")
    parser.add_argument("--keep", help="keep the runs in this directory")
    options, args = parser.parse_known_args(argv)
    only = set(options.only.split(",")) if options.only else set(CONTRACTS)
    if unknown := sorted(only - set(CONTRACTS)):
        parser.error(f"--only {','.join(unknown)}: no such contract; choose from {', '.join(CONTRACTS)}")
    started = time.monotonic()
    os.environ.setdefault("WANDB_MODE", "offline")
    with (contextlib.nullcontext(options.keep) if options.keep else tempfile.TemporaryDirectory()) as work:
        Path(work).mkdir(parents=True, exist_ok=True)
        checker = Checker(args, Path(work).resolve(), only)
        checker.run()
        checker.check_sweep()
    width = max(len(c) for c in CONTRACTS)
    print(f"\n{'contract':<{width}}  result   detail")
    for outcome in sorted(checker.outcomes, key=lambda o: CONTRACTS.index(o.contract)):
        mark = {True: "passed", False: "FAILED", None: "skipped"}[outcome.passed]
        print(f"{outcome.contract:<{width}}  {mark:<7}  {outcome.detail}")
    failed = [o.contract for o in checker.outcomes if o.passed is False]
    passed = sum(o.passed is True for o in checker.outcomes)
    print(f"\nmake check: {passed} of {len(checker.outcomes)} contracts passed in {time.monotonic() - started:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
