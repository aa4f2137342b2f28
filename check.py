"""Does my model work with everything? The template's promises checked on YOUR model and data (train.py's "What you
change": MODEL_CLASS, DATAMODULE_CLASS, MONITOR), on the CPU, on a few batches, in about a minute:

    make check                                    # or: python check.py
    make check ARGS="--data.dataset=blobs"        # the arguments you train with: every run here gets them
    python check.py --only resume,metric          # some of the contracts

The contracts, each one line in the table at the end, a failure with its likely cause and the fix:
    builds     the model and DataModule build from train.py's settings (constructors, LINKED names)
    metric     MONITOR is logged by the model (the best checkpoint, early stopping and sweeps read it)
    fit+test   a short fit and a test of the best checkpoint end with finite metrics
    resume     a run stopped mid-epoch (at a batch: manual optimization steps several optimizers a batch) and resumed
               ends with exactly the weights of an uninterrupted one
    evaluate   evaluate.py on the run gives the end-of-training test metrics
    ddp        2 DDP processes (CPU) train, and their test metrics equal one process's evaluation
    sweep      SWEEP_CONFIG validates, and its grid (or 3 draws) passes slurm_train.py's dry run
    cka        the layers CKA compares exist once the model's setup() has run (CKA on), or CKA is cleanly off
A failed contract names the cause the check measured (support/contracts/probes.py): the batches a resumed run or
each DDP process trained on, the model's state outside its state_dict, a second resume or evaluation; where none of
them shows it, it says so and lists what is left. Each contract starts from a clean process state (no process group
or MASTER_PORT left by the one before), and the 2-process contract keeps a --trainer.strategy you give in ARGS.
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
EPOCHS, BATCHES, STOP_AT = 2, 6, 3  # 2 epochs of 6 batches; the stopped run saves before batch 3 of epoch 1
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
        from support.contracts.probes import BatchFingerprints, clean_process_state
        from support.errors import one_line
        from support.training.callbacks import stopped_by_signal

        class SaveMidEpoch(Callback):  # before a batch, where train.py's Slurm requeue saves
            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                if trainer.current_epoch == 1 and batch_idx == STOP_AT and not Path(mid).exists():
                    trainer.save_checkpoint(mid)

        mid, full, resumed = str(self.work / "mid.ckpt"), self.work / "full", self.work / "resumed"
        name = f"{train.MODEL_CLASS.__name__} with {train.DATAMODULE_CLASS.__name__}"
        with clean_process_state():
            try:
                cli = train.build_cli([*self.args, f"--run_dir={full}"])
            except Exception as err:  # a constructor, a bad argument, a LINKED name
                self.record("builds", False, f"{name}: {one_line(err)}. Fix the constructor or the arguments given")
                return self.skip_rest(CONTRACTS[1:], "the model and data do not build")
            self.record("builds", True, name)
            self.trained = cli.model
            self.batches = BatchFingerprints()
            cli.trainer.callbacks.extend([SaveMidEpoch(), self.batches])
            try:
                with stopped_by_signal():
                    ended = train.fit_and_test(cli)
            except Exception as err:
                logged = sorted(cli.trainer.callback_metrics)
                if train.MONITOR not in logged and train.MONITOR in str(err):  # the checkpoint or early stopping
                    self.record("metric", False, f"MONITOR {train.MONITOR!r} is never logged by "
                                f"{train.MODEL_CLASS.__name__} (it logs: {', '.join(logged) or 'nothing'}): log it "
                                f"with self.log({train.MONITOR!r}, ...) in validation_step, or set MONITOR in train.py")
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
                with clean_process_state():
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

    def resumed_run(self, train: Any, run_dir: Path, mid: str) -> tuple[Any, Any]:
        """A run resumed from `mid` in `run_dir`: its CLI and the fingerprints of the batches it trained on."""
        from support.contracts.probes import BatchFingerprints
        from support.training.callbacks import stopped_by_signal

        again, batches = train.build_cli([*self.args, f"--run_dir={run_dir}", f"--ckpt_path={mid}"]), \
            BatchFingerprints()
        again.trainer.callbacks.append(batches)
        with stopped_by_signal():
            train.fit_and_test(again)
        return again, batches

    def check_resume(self, train: Any, torch: Any, cli: Any, mid: str, full: Path, resumed: Path) -> None:
        if "resume" not in self.only:
            return
        if not Path(mid).exists():
            return self.record("resume", None, f"fewer than {STOP_AT + 1} batches in epoch 1: nothing to stop "
                                               "mid-epoch")
        from support.contracts.probes import first_difference

        again, batches = self.resumed_run(train, resumed, mid)

        def last(run_dir: Path) -> dict[str, Any]:
            return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)

        a, b = last(full), last(resumed)
        difference = first_difference(a["state_dict"], b["state_dict"])
        where = f"a stop before batch {STOP_AT} of epoch 1 and a resume"
        if difference is None and a["global_step"] == b["global_step"]:
            return self.record("resume", True, f"after {where}: weights equal bit for bit at the end "
                                               f"({a['global_step']} optimizer steps)")
        self.record("resume", False, f"after {where}, {difference or 'the step count differs'}; "
                                     f"{self.resume_cause(train, cli, again, batches, resumed, mid)}")

    def resume_cause(self, train: Any, cli: Any, again: Any, batches: Any, resumed: Path, mid: str) -> str:
        """The cause of a resume that ended elsewhere, measured in this order: the batches trained after the
        resume, the model's state outside its state_dict, a second resume from the same checkpoint."""
        from support.contracts.probes import drifted, first_difference, hidden_state

        first = f"1/{STOP_AT}"
        if batches.seen.get(first) != self.batches.seen.get(first):
            if self.batches.stream:
                return ("cause: the training data is a stream (IterableDataset), which starts again from its "
                        f"beginning, so the resumed run's batch {STOP_AT} of epoch 1 is not the uninterrupted run's. "
                        "Fix: give its DataLoader state_dict()/load_state_dict() (Lightning saves them in each "
                        "checkpoint), or accept that a resume trains on part of an epoch again")
            return (f"cause: the resumed run's batch {STOP_AT} of epoch 1 is not the uninterrupted run's: the data "
                    "order is not restored (a sampler of your own, or data drawn anew in setup() without a seed)")
        if drift := drifted(hidden_state(cli.model), hidden_state(again.model)):
            return (f"cause: model attribute {drift[0]}: state outside state_dict. Fix: keep it in a buffer "
                    "(self.register_buffer) or save and load it in on_save_checkpoint / on_load_checkpoint")
        import torch

        self.resumed_run(train, resumed.with_name(resumed.name + "-again"), mid)
        twice = [torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
                 for run in (resumed, resumed.with_name(resumed.name + "-again"))]
        if difference := first_difference(*twice):
            return (f"cause: randomness the checkpoint does not restore: two resumes from the same checkpoint differ "
                    f"({difference}). Fix: draw from torch's global generator (numpy, random or a torch.Generator "
                    "of your own are not in the checkpoint), or a nondeterministic operation")
        return ("cause not found: the batches, the model's attributes and a second resume agree; left: state the "
                "check cannot see (an optimizer or scheduler changed outside configure_optimizers, a module's own "
                "counter, a file the model reads)")

    def check_evaluate(self, ended: dict[str, Any], full: Path) -> None:
        if "evaluate" not in self.only:
            return
        import evaluate

        def tested(*overrides: str) -> dict[str, Any]:
            with contextlib.redirect_stdout(io.StringIO()):
                return evaluate.evaluate(full, overrides=list(overrides))

        again = tested()
        wrong = {k: (v, again.get(k)) for k, v in ended.items() if k.startswith("test") and again.get(k) != v}
        if not wrong:
            return self.record("evaluate", True, f"evaluate.py equals the end of training ({len(ended) - 2} metrics)")
        from support.contracts.probes import drifted, hidden_state

        metric, repeated = next(iter(wrong)), tested()
        import train

        loaded = train.build_cli([*self.args, f"--run_dir={self.work / 'loaded'}"], record=False).model
        if repeated.get(metric) != again.get(metric):
            cause = ("cause: two evaluations of the same checkpoint differ: the test step or data draws random "
                     "numbers that the checkpoint's random states do not give (a torch.Generator or random.Random of "
                     "its own, seeded by the clock); seed them, or leave them out of testing")
        elif drift := drifted(hidden_state(self.trained), hidden_state(loaded), ("after training", "when loaded")):
            cause = (f"cause: model attribute {drift[0]}: state outside state_dict, which evaluate.py cannot load. "
                     "Fix: keep it in a buffer (self.register_buffer) or save it in on_save_checkpoint")
        else:
            cause = ("cause not found: two evaluations agree and the model's attributes load; left: test data that "
                     "changed since training, or state the check cannot see (a module's own counter, a file read)")
        self.record("evaluate", False, f"evaluate.py gives {wrong} (training, evaluate.py); {cause}")

    def check_ddp(self) -> None:
        if "ddp" not in self.only:
            return
        from support.contracts.probes import ranks_fingerprints

        out, run_dir = self.work / "ddp.json", self.work / "ddp"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        # A --trainer.strategy given in ARGS (ddp_find_unused_parameters_true) is kept: later arguments win.
        strategy = [] if any(a.startswith("--trainer.strategy") for a in self.args) else ["--trainer.strategy=ddp"]
        result = subprocess.run([sys.executable, __file__, "--ddp-run", str(out), *self.args,
                                 "--trainer.devices=2", *strategy, *WHOLE_TEST, f"--run_dir={run_dir}"],
                                capture_output=True, text=True, env=env, timeout=600)
        if result.returncode != 0 or not out.is_file():
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            last = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1:] or [""])
            last = last if isinstance(last, str) else last[0]
            hint = ("lazy layers (nn.LazyLinear ...) must be built by a batch before DDP wraps the model"
                    if "uninitialized parameters" in last else
                    "a parameter unused in forward: make check ARGS=--trainer.strategy=ddp_find_unused_parameters_true"
                    if "unused" in last or "find_unused_parameters" in last else
                    "run the same with --trainer.devices=2 --trainer.strategy=ddp to see it whole")
            return self.record("ddp", False, f"2 processes failed: {last.strip()[:300]}; {hint}")
        ranks = ranks_fingerprints(str(out), 2)
        first, shared = set(ranks[0].values()), set(ranks[0].values()) & set(ranks[1].values())
        if first and len(shared) * 2 >= len(first):
            return self.record("ddp", False, f"the 2 processes trained on the same batches ({len(shared)} of "
                                             f"{len(first)} distinct batches alike): each should get its share. "
                                             "Cause: a sampler or stream that ignores the process's rank (a dataset "
                                             "that says shards_by_rank = True must take only its rank's share)")
        trained = json.loads(out.read_text())
        import evaluate

        with contextlib.redirect_stdout(io.StringIO()):
            single = evaluate.evaluate(run_dir, overrides=WHOLE_TEST)
        wrong = {k: (v, single.get(k)) for k, v in trained.items()
                 if k.startswith("test") and not math.isclose(v, single.get(k, math.nan), rel_tol=1e-6)}
        if wrong:
            return self.record("ddp", False, f"test metrics under DDP differ from one process {wrong}; cause not "
                                             "measured, likely: a metric averaged per batch over uneven shards (log "
                                             "it with a torchmetrics Metric), or a test step that draws random numbers")
        self.record("ddp", True, "2 processes trained, each on its own batches; their test metrics equal one "
                                 "process's evaluation")

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
    """One rank of the ddp contract (Lightning starts the second by running this command again); each rank records
    the batches it trained on next to `out`."""
    import train
    from support.contracts.probes import BatchFingerprints

    cli = train.build_cli(args)
    cli.trainer.callbacks.append(BatchFingerprints(out))
    os.environ[train.RUN_DIR_ENV] = str(cli.run_dir)  # the second rank, started by Lightning, writes there too
    results = train.fit_and_test(cli)
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
