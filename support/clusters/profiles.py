"""clusters.toml read and checked: each cluster's partitions, node types and GPUs, its memory and account policy,
and where its environments, data and runs belong. Light on purpose (no torch): used before anything heavy.

    clusters = load_clusters()           # every cluster of clusters.toml (or of $MLMODELDEV_CLUSTERS)
    clusters.get("bede").partition("gh") # -> Partition(arch="aarch64", max_time_s=172800, submit="ghbatch", ...)

A mistake in the file (an unknown key, a wrong type, a partition naming a node type that is not there) is one line
naming the key, so adding a cluster is editing one table and running `python slurm_train.py --clusters`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from support import REPO_DIR
from support.errors import LaunchError

CLUSTERS_FILE = REPO_DIR / "clusters.toml"
SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?")  # MM, MM:SS, H:M:S, D-H, D-H:M, D-H:M:S


def time_seconds(text: str) -> int | None:
    """Seconds in one of sbatch's --time formats; None when it is not one."""
    match = SLURM_TIME.fullmatch(text.strip())
    if not match:
        return None
    days, first, second, third = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
    if third is not None:  # H:M:S
        return int(first) * 3600 + int(second) * 60 + int(third)
    return int(first) * 60 + int(second or 0)  # M, M:S


def duration(seconds: int) -> str:
    """'30 minutes', '12 hours', '2 days', '1 day 12 hours': how a time limit reads in a message."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    parts = [(days, "day"), (hours, "hour"), (rest // 60, "minute")]
    return " ".join(f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in parts if n) or f"{seconds} seconds"


@dataclass(frozen=True)
class Gpu:
    model: str
    compute_capability: int  # 70 for 7.0
    max_cuda: tuple[int, int] | None  # the newest CUDA it runs, where limited: (12, 9) for a V100


@dataclass(frozen=True)
class NodeType:
    name: str
    gpu: Gpu | None
    gres_type: str  # the name --gres=gpu:<type>:N takes; "" where none is documented
    gpus: int
    count: int


@dataclass(frozen=True)
class Partition:
    name: str
    arch: str
    nodes: tuple[NodeType, ...]
    max_time: str
    default_time: str
    max_gpus_per_user: int | None
    submit: str  # "sbatch" or "ghbatch"
    source: str

    @property
    def max_time_s(self) -> int:
        return time_seconds(self.max_time) or 0


@dataclass(frozen=True)
class Cluster:
    key: str
    name: str
    docs: str
    read: str
    gpu_request: str  # "gres" or "gpus-per-node"
    memory: str  # "per-job" or "by-gpu"
    mem: str
    cpus_per_task: int
    account: str  # "required" or "optional"
    default_partition: str
    setup: tuple[str, ...]
    envs: str
    data: str
    runs: str
    login: dict[str, str]
    partitions: dict[str, Partition] = field(default_factory=dict)
    # A node-local disk for each job, as the job's shell writes it ("$TMPDIR"); "" where the site has none.
    local_scratch: str = ""
    # This cluster's own account (project code), --account's default here and nowhere else: a code of one site is
    # refused or meaningless at another (issue 35: a Bede code was written into HEC jobs).
    default_account: str = ""
    # Slurm's MaxArraySize: array indices run 0 to max_array_size - 1. None: ask `scontrol show config`.
    max_array_size: int | None = None

    def partition(self, name: str) -> Partition | None:
        """The named partition; None for a cluster without a partition table (generic) or an unnamed default."""
        if not self.partitions or not name:
            return None
        if name not in self.partitions:
            raise LaunchError(f"--partition {name}: {self.name} has no such partition in clusters.toml (it has "
                              f"{', '.join(self.partitions)}); check `sinfo -s` and add it to clusters.toml")
        return self.partitions[name]


@dataclass(frozen=True)
class Clusters:
    clusters: dict[str, Cluster]
    default_cluster: str
    path: Path

    def get(self, key: str) -> Cluster:
        if key not in self.clusters:
            raise LaunchError(f"--cluster {key}: not in {self.path} (it has {', '.join(self.clusters)}); add a "
                              f"[clusters.{key}] table there (docs/clusters.md, \"Add your cluster\")")
        return self.clusters[key]


CLUSTER_KEYS: dict[str, type] = {
    "name": str, "docs": str, "read": str, "gpu_request": str, "memory": str, "mem": str, "cpus_per_task": int,
    "account": str, "default_partition": str, "setup": list, "envs": str, "data": str, "runs": str, "login": dict,
    "nodes": dict, "partitions": dict, "local_scratch": str, "default_account": str, "max_array_size": int}
CHOICES = {"gpu_request": ("gres", "gpus-per-node"), "memory": ("per-job", "by-gpu"),
           "account": ("required", "optional"), "submit": ("sbatch", "ghbatch")}
PARTITION_KEYS: dict[str, type] = {"arch": str, "nodes": list, "max_time": str, "default_time": str,
                                   "max_gpus_per_user": int, "submit": str, "source": str}
NODE_KEYS: dict[str, type] = {"gpu": str, "gres_type": str, "gpus": int, "count": int}
OPTIONAL = {"nodes", "partitions", "local_scratch", "default_time", "max_gpus_per_user", "submit", "source", "count",
            "max_cuda", "default_account", "max_array_size"}
# The keys whose integer must be at least 1 (0 or less would refuse every job). A node type may have 0 GPUs.
POSITIVE = {"max_gpus_per_user", "max_array_size"}
# Lists whose items are names (strings): node types of a partition, shell lines of the set-up.
LIST_OF_STR = {"nodes", "setup"}


def _checked(table: Any, keys: dict[str, type], where: str) -> dict[str, Any]:
    """The table, after checking that it is one, with exactly the known keys of the right types and choices."""
    if not isinstance(table, dict):
        raise LaunchError(f"clusters.toml: {where} is a {type(table).__name__}, not a table")
    if unknown := sorted(set(table) - set(keys)):
        raise LaunchError(f"clusters.toml: {where} has unknown key(s) {', '.join(unknown)} (known: {', '.join(keys)})")
    if missing := [key for key in keys if key not in table and key not in OPTIONAL]:
        raise LaunchError(f"clusters.toml: {where} lacks {', '.join(missing)}: add it (the comments at the top of the "
                          "template's clusters.toml say what each key means)")
    for key, value in table.items():
        if not isinstance(value, keys[key]) or isinstance(value, bool):
            raise LaunchError(f"clusters.toml: {where}.{key} = {value!r} should be a {keys[key].__name__}: write it "
                              f"as one ({_EXAMPLES[keys[key]]})")
        if key in CHOICES and value not in CHOICES[key]:
            raise LaunchError(f"clusters.toml: {where}.{key} = {value!r}: one of {', '.join(CHOICES[key])}")
        if key in POSITIVE and keys[key] is int and value < 1:
            raise LaunchError(f"clusters.toml: {where}.{key} = {value}: give 1 or more")
        if key in LIST_OF_STR and keys[key] is list and not all(isinstance(item, str) for item in value):
            raise LaunchError(f"clusters.toml: {where}.{key} = {value!r}: give a list of strings, [\"a\", \"b\"]")
        if key == "login" and not all(isinstance(item, str) for item in value.values()):
            raise LaunchError(f"clusters.toml: {where}.login = {value!r}: give each architecture a string, "
                              "{ aarch64 = \"in a ghlogin session\" }")
    return table


_EXAMPLES = {str: 'a quoted string, "text"', int: "a whole number without quotes, 4", list: 'a list, ["a", "b"]',
             dict: "a table, { key = 1 } or [section]"}


def _capability(text: str, where: str) -> int:
    if not re.fullmatch(r"\d+\.\d", text):
        raise LaunchError(f"clusters.toml: {where} = {text!r} should read like \"7.0\"")
    return int(text.replace(".", ""))


def _gpus(table: Any) -> dict[str, Gpu]:
    gpus = {}
    for model, facts in table.items():
        facts = _checked(facts, {"compute_capability": str, "max_cuda": str}, f"gpus.{model}")
        cap = _capability(facts["compute_capability"], f"gpus.{model}.compute_capability")
        limit = facts.get("max_cuda")
        gpus[model] = Gpu(model, cap, divmod(_capability(limit, f"gpus.{model}.max_cuda"), 10) if limit else None)
    return gpus


def _cluster(key: str, table: Any, gpus: dict[str, Gpu]) -> Cluster:
    where = f"clusters.{key}"
    table = _checked(table, CLUSTER_KEYS, where)
    nodes = {}
    for name, node in table.get("nodes", {}).items():
        node = _checked(node, NODE_KEYS, f"{where}.nodes.{name}")
        if node["gpu"] and node["gpu"] not in gpus:
            raise LaunchError(f"clusters.toml: {where}.nodes.{name}.gpu = {node['gpu']!r} is not in [gpus] "
                              f"({', '.join(gpus)}): add it there with its compute capability")
        nodes[name] = NodeType(name, gpus.get(node["gpu"]), node["gres_type"], node["gpus"], node.get("count", 0))
    partitions = {}
    for name, part in table.get("partitions", {}).items():
        part = _checked(part, PARTITION_KEYS, f"{where}.partitions.{name}")
        if not part["nodes"]:  # a partition of no node type would plan every job against nothing
            raise LaunchError(f"clusters.toml: {where}.partitions.{name}.nodes = []: name its node types, keys of "
                              f"[{where}.nodes] ({', '.join(nodes) or 'empty: add them there'})")
        if unknown := [n for n in part["nodes"] if n not in nodes]:
            raise LaunchError(f"clusters.toml: {where}.partitions.{name}.nodes names {', '.join(unknown)}, not in "
                              f"[{where}.nodes] ({', '.join(nodes) or 'empty'})")
        for time_key in ("max_time", "default_time"):
            if time_key in part and time_seconds(part[time_key]) is None:
                raise LaunchError(f"clusters.toml: {where}.partitions.{name}.{time_key} = {part[time_key]!r} is not "
                                  "a Slurm time (HH:MM:SS, D-HH:MM:SS)")
        partitions[name] = Partition(name, part["arch"], tuple(nodes[n] for n in part["nodes"]), part["max_time"],
                                     part.get("default_time", ""), part.get("max_gpus_per_user"),
                                     part.get("submit", "sbatch"), part.get("source", ""))
    if partitions and table["default_partition"] not in partitions:
        raise LaunchError(f"clusters.toml: {where}.default_partition = {table['default_partition']!r} is not one of "
                          f"its partitions ({', '.join(partitions)})")
    values = {k: v for k, v in table.items() if k not in ("nodes", "partitions")}
    values["setup"] = tuple(values["setup"])
    return Cluster(key=key, partitions=partitions, **values)


def load_clusters(path: str | Path | None = None) -> Clusters:
    """clusters.toml (or $MLMODELDEV_CLUSTERS), checked; LaunchError (one line) on a mistake."""
    path = Path(path or os.environ.get("MLMODELDEV_CLUSTERS") or CLUSTERS_FILE)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise LaunchError(f"{path}: {err.strerror}; MLMODELDEV_CLUSTERS names the cluster profiles file") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise LaunchError(f"{path} line {line}: bytes that are not UTF-8 ({err.object[err.start:err.end]!r}); TOML "
                          "is UTF-8: save the file as UTF-8 or retype that line") from None
    except tomllib.TOMLDecodeError as err:
        raise LaunchError(f"{path} is not valid TOML: {err}: correct it there (in a quoted string, write \\ as "
                          "\\\\ and \" as \\\")") from None
    try:
        return _clusters(data, path)
    except LaunchError as err:  # every message of the checks names the key; here it names the file too
        raise LaunchError(str(err).replace("clusters.toml: ", f"{path}: ", 1)) from None


def _clusters(data: dict[str, Any], path: Path) -> Clusters:
    if "default_account" in data:  # templates up to v0.3.0: one account for every cluster
        raise LaunchError(f"clusters.toml: default_account at the top of the file would go to every cluster: move "
                          f"it into the table of the cluster it belongs to, [clusters.<name>] default_account = "
                          f"{_toml_string(data['default_account'])}, and delete the top line")
    top = _checked(data, {"default_cluster": str, "gpus": dict, "clusters": dict}, "the file")
    gpus = _gpus(top["gpus"])
    clusters = {key: _cluster(key, table, gpus) for key, table in top["clusters"].items()}
    if top["default_cluster"] not in clusters:
        raise LaunchError(f"clusters.toml: default_cluster = {top['default_cluster']!r} is not one of its clusters "
                          f"({', '.join(clusters)}): name one of them")
    return Clusters(clusters, top["default_cluster"], path)


def _toml_string(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else "\"<your project code>\""


def partition_table(clusters: Clusters) -> str:
    """The known partitions as a Markdown table (docs/clusters.md, "The partitions", is this table: a test compares
    them)."""
    rows = ["| cluster | partition | arch | GPUs per node | default / max time | per user | submit | source |",
            "|---|---|---|---|---|---|---|---|"]
    for cluster in clusters.clusters.values():
        for part in cluster.partitions.values():
            gpus = ", ".join(f"{n.gpus}x {n.gpu.model if n.gpu else 'none'}"
                             + (f" (`{n.gres_type}`)" if n.gres_type else "") for n in part.nodes)
            times = f"{part.default_time or '-'} / {part.max_time}"
            per_user = f"{part.max_gpus_per_user} GPUs" if part.max_gpus_per_user else "-"
            source = f"[{part.source}]({cluster.docs}), {cluster.read}"
            rows.append(f"| {cluster.name} | `{part.name}` | {part.arch} | {gpus} | {times} | {per_user} | "
                        f"{part.submit} | {source} |")
    return "\n".join(rows)
