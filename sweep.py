"""Hyperparameter sweeps: one definition, SWEEP_CONFIG, run by wandb agents (here or on SLURM) or enumerated offline.

    python sweep.py --dry-run                      # check SWEEP_CONFIG offline: wandb's schema, every key and value
    python sweep.py                                # check, create the sweep on wandb, print the agent commands
    python sweep.py --entity me --project proj     # where (default WANDB_ENTITY / WANDB_PROJECT, else project.toml's)
    python sweep.py --list                         # every run of the grid as a train.py command, no server needed
    python sweep.py --list --samples 20 --seed 0   # 20 random draws instead, the same ones on every call
    python slurm_train.py --search --count 40 --max-concurrent 8   # no wandb server: bayes, hyperband, offline
    python sweep.py --status runs/search-20261202-140000-abc123     # that search's runs, best first; status.png
    python sweep.py --status runs/grid-20261202-140000-abc123 --csv grid.csv   # any grid, job, run or runs/
    ./run_sweep.sh ENTITY/PROJECT/SWEEP_ID [COUNT]                  # agents on this machine, one per GPU
    sbatch --array=0-19%4 sbatch_agent.sh ENTITY/PROJECT/SWEEP_ID   # 20 agent tasks on SLURM, 4 at a time

Make it your own: SWEEP_CONFIG below is the one thing to edit (parameters are train.py's dotted keys). Its metric
defaults to train.py's MONITOR / MONITOR_MODE; name another one in "metric" to rank the sweep's runs by it.

The agent starts `python train.py --key=value ...` as a new process for every run (command mode), so each run
parses its own settings like any other train.py run, and every DDP rank gets the same argv. From Python
(slurm_train.py, tests): validate(), grid_configs(), random_configs(n, seed) and to_argv(run), which builds
train.py's arguments exactly as a wandb agent does.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from support.errors import one_line
from support.search import space as sweep_space
from support.training import logged_metrics
from support.training.class_choice import same_class
from support.training.wandb_access import agent_problem, default_entity, default_project, has_wandb_credentials

SWEEP_CONFIG: dict[str, Any] = {
    "name": "mlmodeldev-example",
    "program": "train.py",
    # ${args} becomes one `--key=value` element per parameter (Python str() of the value): train.py's syntax.
    "command": ["${env}", "${interpreter}", "${program}", "${args}"],
    "method": "random",  # grid | random | bayes
    # "metric": {"name": "val/acc", "goal": "maximize"},  # default: train.py's MONITOR, MONITOR_MODE
    # Hyperband stops runs whose metric trails the others' at bands 3, 9, 27 (min_iter * eta**k), each judged once a
    # run has more validation epochs than the band (sweeps 0.2.0): after the 4th, 10th, 28th.
    "early_terminate": {"type": "hyperband", "min_iter": 3, "eta": 3},
    # Full dotted train.py keys (see `python train.py --help`). Lists of values keep the grid enumerable;
    # random and bayes also take distributions: {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}.
    # A class with its own arguments, as in train.py's config (each class starts from its own defaults):
    # "optimizer": {"values": [{"class_path": "torch.optim.Adam"},
    #                          {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}}]},
    "parameters": {
        "model.hidden_dim": {"values": [64, 128, 256]},
        "model.dropout": {"values": [0.0, 0.1, 0.3]},
        "optimizer.lr": {"values": [0.001, 0.003, 0.01]},
        "data.batch_size": {"values": [32, 64, 128]},
        "trainer.max_epochs": {"value": 30},
    },
}

class SweepConfigError(ValueError):
    """A sweep config that wandb or train.py would reject; the message names every offending key, one per line."""


def engine() -> Any:
    """wandb's sweep engine (the `sweeps` package), imported on first use: it loads scipy, half a second that
    `--status` (login nodes, large tables) does without."""
    with warnings.catch_warnings():  # sweeps 0.2.0 declares pydantic-v1 settings, which pydantic 2 warns about
        warnings.simplefilter("ignore", UserWarning)
        import sweeps
        import sweeps.config
        import sweeps.params
    return sweeps


def as_agent_value(value: Any) -> Any:
    """numpy scalars and tuples as the JSON values a wandb agent receives from the server."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def _check_values(name: str, spec: dict[str, Any]) -> list[Any]:
    """The values of one parameter worth parsing: all listed ones, or the ends and middle of a distribution."""
    hyper = engine().params.HyperParameter
    param = hyper(name, spec)
    if param.type == hyper.CONSTANT:
        return [param.config["value"]]
    if param.type in (hyper.CATEGORICAL, hyper.CATEGORICAL_PROB):
        return list(param.config["values"])
    return [as_agent_value(param.ppf(q)) for q in (0.01, 0.5, 0.99)]  # ppf(0) or ppf(1) is infinite for some


def _lookup(tree: dict[str, Any], key: str) -> Any:
    """The value of a dotted key in a parsed config; class groups keep their arguments under init_args."""
    node: Any = tree
    for part in key.split("."):
        if isinstance(node, dict) and part not in node and "init_args" in node:
            node = node["init_args"]
        node = node[part]
    return node


def reaches_unchanged(parsed: Any, value: Any) -> bool:
    """Whether the value train.py parsed is the value the sweep gave. A class (--optimizer=SGD, or a value
    {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}}) arrives with all of its init_args: it reaches
    train.py unchanged when the class is the one named and each init_arg given has the value given."""
    if isinstance(parsed, dict) and "class_path" in parsed:
        given = value if isinstance(value, dict) else {"class_path": value}
        init_args = parsed.get("init_args") or {}
        return (isinstance(given.get("class_path"), str) and same_class(given["class_path"], parsed["class_path"])
                and all(name in init_args and reaches_unchanged(init_args[name], arg)
                        for name, arg in (given.get("init_args") or {}).items()))
    return as_agent_value(parsed) == as_agent_value(value)


def metric_problem(metric: str) -> tuple[str, bool] | None:
    """Why `metric` may never be logged by train.py's MODEL_CLASS, and whether that is certain (an error) or only
    unverifiable (a warning); read from the class's own source (support/training/logged_metrics.py)."""
    import train

    return logged_metrics.metric_problem(metric, train.MODEL_CLASS)


def train_config(argv: list[str]) -> Any:
    """The config (a jsonargparse Namespace) train.py would run with this argv; raises what train.py would reject
    it with. The one way sweep.py and slurm_train.py read train.py's settings."""
    import train  # imported here, not at the top: --check-agent runs on login nodes and should not load torch

    return train.parse_config(argv)


def _parse(run: dict[str, Any]) -> dict[str, Any]:
    return train_config(to_argv(run)).as_dict()


def _culprit(run: dict[str, Any], message: str) -> str:
    """The parameter a train.py error is about: the one it names, else the one without which the rest parses
    ('Parser key "optimizer"' for --optimizer.momentum=0.9 without --optimizer=SGD). An argument of a class
    (optimizer.momentum) is blamed before its class when the class alone parses: --optimizer=Adam is fine, it is the
    momentum that Adam lacks."""
    named = [name for name in run if f"--{name}=" in message or f'"{name}"' in message]
    suspects = [arg for name in named for arg in run if arg.startswith(f"{name}.")] + list(run)
    for name in suspects if named else run:
        try:
            _parse({k: v for k, v in run.items() if k != name})
            return name
        except Exception:
            continue
    return named[0] if named else "parameters"


def _class_hint(name: str, run: dict[str, Any]) -> str:
    """For an argument that only some of a class parameter's classes take: how to write it per class."""
    owner, _, arg = name.rpartition(".")
    if owner not in run:
        return ""
    chosen = run[owner].get("class_path") if isinstance(run[owner], dict) else run[owner]
    return (f"; {chosen} takes no {arg}: give each class its own arguments in the values of {owner}, e.g. "
            f'{{"values": [{{"class_path": "{chosen}"}}, {{"class_path": "<a class with {arg}>", '
            f'"init_args": {{"{arg}": {json.dumps(run[name])}}}}}]}}, and drop parameters/{name}')


def _cli_errors(parameters: dict[str, dict[str, Any]]) -> list[str]:
    """Parse every value of every parameter as train.py would and check that it arrives unchanged: `--key=None`
    or `--key=1e-05` must mean what the sweep says. Parse j gives every parameter its j-th value (a shorter list
    starts again): values 10x10x4x4 take 10 parses, not 1 + 9 + 9 + 3 + 3. A parse that fails is parsed again value
    by value, each with the others at their first value, to name the parameter."""
    values = {name: _check_values(name, spec) for name, spec in parameters.items()}
    base = {name: vals[0] for name, vals in values.items()}
    errors: dict[str, str] = {}
    culprits: dict[str, str] = {}  # the same error recurs in every later trial: find its parameter once
    width = max((len(vals) for vals in values.values()), default=1)
    trials = [({name: vals[j % len(vals)] for name, vals in values.items()}, j) for j in range(width)]
    while trials:
        run, j = trials.pop(0)
        try:
            parsed = _parse(run)
        except Exception as err:  # jsonargparse's ArgumentError, or TypeError/ValueError from a constructor
            if j > 0:  # values together: each alone on the first values (j = -1: not split again)
                trials[:0] = [({**base, name: value}, -1) for name, value in run.items()
                              if j % len(values[name]) != 0]
                continue
            message = one_line(err)
            if message not in culprits:
                culprits[message] = _culprit(run, message)
            name = culprits[message]
            owner = name.rpartition(".")[0]
            given = " ".join(f"--{key}={run[key]}" for key in (owner, name) if key in run) or " ".join(to_argv(run))
            hint = "; None cannot be given on the command line: leave the key out" if run.get(name, 0) is None else \
                _class_hint(name, run)
            errors.setdefault(name, f"parameters/{name}: train.py rejects {given}: {message}{hint}")
            continue
        for name, value in run.items():
            try:
                got = _lookup(parsed, name)
            except (KeyError, TypeError):
                errors.setdefault(name, f"parameters/{name}: not a train.py key")
                continue
            if not reaches_unchanged(got, value):
                fix = (f"give it as a number, {value} without quotes (in YAML {got!r}: YAML 1.1 reads 1e-3 as a "
                       "string)" if isinstance(value, str) and isinstance(got, (int, float)) else
                       "leave it out to get the default")
                errors.setdefault(name, f"parameters/{name}: value {value!r} reaches train.py as {got!r} "
                                        f"(the agent passes --{name}={value}); {fix}")
    return list(errors.values())


def with_default_metric(config: dict[str, Any]) -> dict[str, Any]:
    """The config with "metric" filled from train.py's MONITOR / MONITOR_MODE when it names none."""
    if "metric" in config:
        return config
    import train

    goal = {"min": "minimize", "max": "maximize"}[train.MONITOR_MODE]
    return {**config, "metric": {"name": train.MONITOR, "goal": goal}}


def notes(config: dict[str, Any]) -> list[str]:
    """One-line warnings about a valid config: a metric other than train.py's MONITOR, or one that only a run can
    show is logged."""
    import train

    found, metric = [], with_default_metric(config)["metric"]["name"]
    if metric != train.MONITOR:
        found.append(f"the sweep ranks runs by {metric!r}, but train.py's checkpoints and early stopping follow "
                     f"MONITOR={train.MONITOR!r}: set MONITOR in train.py, or drop SWEEP_CONFIG's metric")
    if (problem := metric_problem(metric)) and not problem[1]:
        found.append(f"metric/name: {problem[0]}")
    return found


def data_defaults(config: dict[str, Any]) -> str:
    """The data settings every run takes from train.py's defaults (the sweep sets none of them): which dataset and
    data the rows train on, said before anything runs."""
    data = train_config([]).as_dict()["data"]
    data = data.get("init_args", data) if "class_path" in data else data  # a DataModule given by class_path
    left = {key: value for key, value in data.items() if f"data.{key}" not in config["parameters"]}
    return ("every run trains on train.py's default data settings: "
            + " ".join(f"data.{key}={value}" for key, value in left.items())) if left else ""


def validate(config: dict[str, Any] = SWEEP_CONFIG) -> dict[str, Any]:
    """Check a sweep config against wandb's own schema and against train.py's command line, before anything is
    created. Returns the config with wandb's defaults filled in (its metric, if none, from train.py's MONITOR);
    raises SweepConfigError naming each bad key."""
    config = with_default_metric(config)
    errors = [f"{'/'.join(map(str, err.absolute_path)) or 'config'}: {err.message}"
              for err in engine().config.schema.validator.iter_errors(config)]
    parameters = config.get("parameters", {})
    if not errors:
        try:  # what the schema cannot express (min < max, probabilities summing to 1), as wandb checks it
            config = engine().SweepConfig(config)
        except Exception as err:
            errors += dict.fromkeys(str(getattr(err, "message", err)).splitlines())  # each once, in order
    if errors:
        raise SweepConfigError("\n".join(errors))
    if config.get("program") != "train.py":
        errors.append(f"program: must be train.py, whose arguments this file checks, not {config.get('program')!r}")
    command = config.get("command", ["${env}", "${interpreter}", "${program}", "${args}"])
    if "${args}" not in command:
        errors.append(f"command: must pass ${{args}} (--key=value, what train.py parses); got {command}")
    if (problem := metric_problem(config["metric"]["name"])) and problem[1]:
        errors.append(f"metric/name: {problem[0]}")
    for name, spec in parameters.items():  # as given: wandb's filling silently drops nested ones
        if "parameters" in spec:  # a nested dict would reach train.py as --name={'a': 1}
            errors.append(f"parameters/{name}: nested parameters are not supported; use dotted keys ({name}.x)")
    flat = {name: spec for name, spec in parameters.items() if "parameters" not in spec}
    errors += _cli_errors(flat)
    if errors:
        raise SweepConfigError("\n".join(errors))
    return config


def _runs_to_dicts(runs: list[Any]) -> list[dict[str, Any]]:
    return [{name: as_agent_value(item["value"]) for name, item in sorted(run.config.items())} for run in runs if run]


def grid_configs(config: dict[str, Any] = SWEEP_CONFIG) -> list[dict[str, Any]]:
    """Every combination of the parameters' values (the product), in the order wandb's grid search uses."""
    config = with_default_metric(config)  # every engine call sees the metric the sweep ranks by
    try:
        runs = engine().next_runs({**config, "method": "grid"}, [], validate=True, n=grid_size(config) + 1)
    except ValueError as err:  # "Parameter X is a disallowed type with grid search ..."
        raise SweepConfigError(str(err)) from None
    return _runs_to_dicts(runs)


def grid_size(config: dict[str, Any] = SWEEP_CONFIG) -> int:
    """The number of runs in the grid, or 0 when a parameter is a continuous distribution."""
    return sweep_space.grid_size(config["parameters"])


def random_configs(n: int, seed: int = 0, config: dict[str, Any] = SWEEP_CONFIG) -> list[dict[str, Any]]:
    """n random draws from the parameters' distributions, as wandb's random search draws them but repeating no
    point while the space has unseen ones (support/search/space.py); the same for the same seed. The draws come from
    Python's global `random` (and numpy for some): both are seeded, then restored."""
    filled = engine().SweepConfig(with_default_metric(config))  # wandb's checks and defaults, as its engine has them
    states = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        draws = sweep_space.random_draws(filled["parameters"], n)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    return [{name: as_agent_value(value) for name, value in run.items()} for run in draws]


def to_argv(run: dict[str, Any]) -> list[str]:
    """train.py's arguments for one run, as a wandb agent builds ${args}: `--key=str(value)`, one element each,
    sorted by name as the sweep engine orders a run's parameters. Order matters to train.py: a class
    (--optimizer=SGD) must come before its arguments (--optimizer.momentum=0.9), and sorting puts it there."""
    return [f"--{name}={value}" for name, value in sorted(run.items())]


def create(config: dict[str, Any], entity: str | None, project: str) -> str:
    """Create the sweep on wandb; returns ENTITY/PROJECT/SWEEP_ID."""
    import wandb

    if problem := agent_problem():
        raise SystemExit(f"error: {problem}")
    if not has_wandb_credentials():  # wandb would wait at its login prompt
        raise SystemExit("error: no wandb credentials: run `wandb login` or set WANDB_API_KEY (or use --dry-run)")
    sweep_id = wandb.sweep(sweep=config, entity=entity, project=project)
    return f"{entity or wandb.Api().default_entity}/{project}/{sweep_id}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check, create or enumerate the sweep in SWEEP_CONFIG.")
    parser.add_argument("--dry-run", action="store_true", help="check everything, create nothing (no network)")
    parser.add_argument("--entity", default=default_entity())
    parser.add_argument("--project", default=default_project())
    parser.add_argument("--list", action="store_true", help="print each run's train.py command (grid, or --samples)")
    parser.add_argument("--samples", type=int, help="with --list: this many random draws instead of the grid")
    parser.add_argument("--seed", type=int, default=0, help="with --samples: seed of the draws")
    parser.add_argument("--status", metavar="DIR",
                        help="the results table of a grid, a search, an agents' job, a run, or runs/ itself: each "
                             "run's state (and why it failed), settings, best metric, test metrics and cost")
    parser.add_argument("--csv", type=Path, help="with --status: also write every run's recorded fields as CSV")
    parser.add_argument("--markdown", type=Path, help="with --status: the same as a Markdown table")
    parser.add_argument("--plot", type=Path, help="with --status: a PNG of the metric against each varying setting "
                                                  "and the learning curves of the best runs")
    parser.add_argument("--check-agent", action="store_true",
                        help="exit 1 with one line if a wandb agent cannot work here (used by the agent scripts)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the wandb server")
    args = parser.parse_args(argv)
    if args.samples is not None and args.samples < 1:
        parser.error(f"--samples must be at least 1, got {args.samples} (leave it out for the whole grid)")

    if args.status:  # no torch: the table comes from the files the runs wrote
        from support.results.table import show
        from support.search.records import SEARCH_FILE
        from support.search.status import show_status

        if (Path(args.status) / SEARCH_FILE).is_file() and not (args.csv or args.markdown or args.plot):
            return show_status(Path(args.status))  # a search's own view: its engine's states, folds, progress plot
        return show(Path(args.status), args.csv, args.markdown, args.plot)
    if args.csv or args.markdown or args.plot:
        parser.error("--csv, --markdown and --plot go with --status DIR")
    if args.check_agent:
        if problem := agent_problem(args.timeout):
            print(f"error: {problem}", file=sys.stderr)
            return 1
        return 0
    try:
        config = validate(SWEEP_CONFIG)
        if args.list:
            runs = (random_configs(args.samples, args.seed, SWEEP_CONFIG) if args.samples is not None
                    else grid_configs(SWEEP_CONFIG))
            print("\n".join(shlex.join(["python", "train.py", *to_argv(run)]) for run in runs))
            return 0
    except SweepConfigError as err:
        print(f"error: the sweep config is invalid:\n{err}", file=sys.stderr)
        return 1
    grid, metric = grid_size(config), config["metric"]
    print(f"sweep config OK: {config['method']} search over {len(config['parameters'])} parameters "
          f"({f'grid of {grid} runs' if grid else 'continuous'}), {metric['goal']} {metric['name']}")
    for note in notes(SWEEP_CONFIG):
        print(f"warning: {note}")
    if defaults := data_defaults(config):
        print(defaults)
    size = grid if config["method"] == "grid" else 20
    if args.dry_run:
        path = f"{args.entity or '<your entity>'}/{args.project}/<sweep id>"
        print("dry run: nothing created. Without --dry-run the sweep is created and its agents start with:")
    else:
        path = create(with_default_metric(SWEEP_CONFIG), args.entity, args.project)
        print(f"created sweep {path}")
    print(f"Agents on this machine, one per GPU:  ./run_sweep.sh {path} [COUNT]\n"
          f"Agents on SLURM, {size}, 4 at a time:  sbatch --array=0-{size - 1}%4 sbatch_agent.sh {path}\n"
          "Without a wandb server:  python slurm_train.py --search --count 20  (the same search, from run records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
