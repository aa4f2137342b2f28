"""What a sweep's parameters span, apart from train.py: the size of their grid, and random draws that repeat no point
while the space has unseen ones. sweep.py (--list --samples) and the offline search (support/search/records.py) both
draw through random_draws, so the two cannot disagree."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from typing import Any


def params_module() -> Any:
    """sweeps.params, imported when first needed: the engine brings numpy, scipy and scikit-learn (0.3 s), which a
    run reporting an epoch to its search record does without."""
    with warnings.catch_warnings():  # sweeps 0.2.0 declares pydantic-v1 settings, which pydantic 2 warns about
        warnings.simplefilter("ignore", UserWarning)
        from sweeps import params
    return params


def plain(value: Any) -> Any:
    """The engine's numpy scalars as JSON values (np.int64(64) -> 64), as a wandb agent would receive them."""
    return value.item() if hasattr(value, "item") else value


def grid_size(parameters: dict[str, dict[str, Any]]) -> int:
    """The number of points of the parameters' grid, or 0 when a parameter is a continuous distribution."""
    import numpy as np

    HyperParameter = params_module().HyperParameter  # noqa: N806 (a class)
    sizes = []
    for name, spec in parameters.items():
        param = HyperParameter(name, spec)
        if param.type == HyperParameter.CONSTANT:
            sizes.append(1)
        elif param.type in (HyperParameter.CATEGORICAL, HyperParameter.CATEGORICAL_PROB):
            sizes.append(len(param.config["values"]))
        elif param.type == HyperParameter.INT_UNIFORM:
            sizes.append(param.config["max"] - param.config["min"] + 1)
        elif param.type == HyperParameter.Q_UNIFORM:  # as the grid search expands it
            sizes.append(len(np.arange(param.config["min"], param.config["max"], param.config["q"])))
        else:
            return 0
    return math.prod(sizes)


def _key(run: dict[str, Any]) -> str:
    return json.dumps({name: plain(value) for name, value in run.items()}, sort_keys=True, default=str)


def random_draws(parameters: dict[str, dict[str, Any]], n: int,
                 seen: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """n draws from the parameters' distributions, as wandb's random search draws them (each parameter's sample(),
    from Python's and numpy's global generators), skipping any point already drawn or in `seen` while the space has
    unseen points: wandb's engine draws with replacement, so two runs of a 27-point grid's random search share their
    settings with probability 1/27, and 10 runs repeat one with probability 1 - 27!/(17! 27^10) = 0.84."""
    params = params_module().HyperParameterSet.from_config(parameters)
    size = grid_size(parameters)  # 0: a continuous parameter, where a repeat is as good as impossible
    taken = {_key(run) for run in seen}
    drawn: set[str] = set()  # every point drawn so far: once it holds the whole space, nothing unseen is left
    draws: list[dict[str, Any]] = []
    while len(draws) < n:
        for param in params:
            param.value = param.sample()
        run = {name: plain(item["value"]) for name, item in sorted(params.to_config().items())}
        key = _key(run)
        drawn.add(key)
        if key in taken and (size == 0 or len(drawn) < size):
            continue
        taken.add(key)
        draws.append(run)
    return draws
