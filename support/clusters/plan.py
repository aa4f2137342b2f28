"""A Slurm job's resources on one cluster: the profile's defaults, then the options given, checked against the
partition before anything is written or submitted; and how the job is submitted there.

    plan = plan_job(load_clusters().get("bede"), {"account": "proj", "partition": "gh"})
    plan.res            # what sbatch_header writes: partition, account, nodes, tasks, GPUs, (memory), time
    plan.submit         # "sbatch", or "ghbatch" for Bede's gh partition from a ppc64le login node

Refused, each with one line naming the limit and the fix: a --time over the partition's maximum, more GPUs per node
than its nodes have (or than one user may hold), a missing account where every job names one, a GPU type the
partition does not have, --mem or --cpus-per-task where each GPU brings its share of the node, no environment
for the partition's architecture, and a torch in that environment that cannot drive the partition's GPUs (the last
two are notes for a dry run: any partition's script can be seen from any machine). The account is the cluster's own
(job_account); --local rows run on this machine under no cluster's queue rules (local_plan).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from support.clusters.environments import (
    MAKE_ENV,
    current_home,
    find_environment,
    job_preamble,
    machine_arch,
    missing_environment,
    torch_version,
)
from support.clusters.profiles import Cluster, Clusters, NodeType, Partition, duration, time_seconds
from support.data.local_copy import LOCAL_DATA_ENV
from support.errors import LaunchError
from support.gpu_check import TORCH_CUDA_BUILDS

TEMPLATE_TIME = "08:00:00"  # a job's --time where none is given, or the partition's maximum if that is shorter
# What an #SBATCH --account line can carry unquoted (sbatch reads those lines itself, no shell): Slurm's account names.
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*")
RESOURCES = ["partition", "account", "nodes", "ntasks_per_node", "gpus_per_node", "gpu_type", "cpus_per_task", "mem",
             "time"]


@dataclass
class JobPlan:
    cluster: Cluster
    partition: Partition | None
    res: dict[str, Any]
    submit: str = "sbatch"
    environment: Path | None = None  # the environment of the partition's architecture
    notes: list[str] = field(default_factory=list)  # printed, not refused
    local_data: bool = True  # read datasets from a copy on the node's local scratch, where the cluster has one


def job_account(clusters: Clusters, cluster: Cluster, given: str | None) -> tuple[str | None, list[str]]:
    """The account a job on `cluster` names: --account's (`given`), else that cluster's own default_account, never
    another cluster's; with a note when --account is another cluster's code. LaunchError for a value that is no
    Slurm account name."""
    account, source = (given, "--account") if given else (cluster.default_account,
                                                          f"{clusters.path} [clusters.{cluster.key}] default_account")
    if not account:
        return None, []
    if not ACCOUNT_NAME.fullmatch(account):
        raise LaunchError(f"{source} = {account!r} is not a Slurm account name (letters, numerals, '.', '_', '-', '@', "
                          f"'+'): give the project code as `sacctmgr show assoc user=$USER` lists it")
    owners = [other.name for other in clusters.clusters.values() if other is not cluster and
              other.default_account == account and account != cluster.default_account]
    return account, [f"note: --account {account} is {' and '.join(owners)}'s account in clusters.toml, given here for "
                     f"{cluster.name}"] if owners else []


def local_plan(cluster: Cluster, given: dict[str, Any]) -> JobPlan:
    """--local: the rows run on this machine, so no queue rule of any cluster applies (a Bede project's --local
    --gpus-per-node 0 was refused by Bede's "GPUs bring the CPUs" rule): the cluster's profile without partitions,
    account policy, memory policy, set-up or time limits; only the rows' tasks and devices are checked."""
    free = replace(cluster, partitions={}, account="optional", memory="per-job", mem="", cpus_per_task=0, setup=(),
                   local_scratch="", default_partition="")
    return plan_job(free, given, check_environment=False)


def plan_job(cluster: Cluster, given: dict[str, Any], check_environment: bool = True,
             preview: bool = False) -> JobPlan:
    """The resources of a job on `cluster` from the options `given` (None: not given), checked; LaunchError else.
    `preview` (--dry-run): no environment for the partition's architecture, or one whose torch cannot drive its
    GPUs, is a note, not a refusal, so any partition's script can be seen from any machine (a laptop's has neither)."""
    given = {k: v for k, v in given.items() if v is not None}
    partition = cluster.partition(given.get("partition", cluster.default_partition))
    res: dict[str, Any] = {"partition": partition.name if partition else given.get("partition"),
                           "account": given.get("account") or None, "nodes": given.get("nodes", 1),
                           "gpus_per_node": given.get("gpus_per_node", 1), "gpu_type": given.get("gpu_type"),
                           "gpu_request": cluster.gpu_request}
    res["ntasks_per_node"] = given.get("ntasks_per_node", res["gpus_per_node"] or 1)  # one srun task per device
    plan = JobPlan(cluster, partition, res)
    if cluster.account == "required" and not res["account"]:
        raise LaunchError(f"{cluster.name} needs --account PROJECT on every job ({cluster.docs}): add --account with "
                          f"your project's code (or default_account in clusters.toml's [clusters.{cluster.key}])")
    _memory(plan, given)
    _time(plan, given.get("time"))
    if partition is not None:
        _gpus(plan)
        arch = partition.arch
        plan.environment = find_environment(arch, current_home())
        if check_environment and plan.environment is None:
            missing = missing_environment(arch, current_home(), _login(cluster, arch, res["account"]))
            if not preview:
                raise LaunchError(missing)
            plan.notes.append(f"note: {missing} (a submission is refused until then; this dry run only shows it)")
        elif check_environment and res["gpus_per_node"] and (problem := _torch_problem(plan)):
            if not preview:
                raise LaunchError(problem)
            plan.notes.append(f"note: {problem} (a submission is refused until then)")
        plan.submit = _submit_command(partition)
    return plan


def _login(cluster: Cluster, arch: str, account: str | None) -> str:
    return cluster.login.get(arch, "").replace("{account}", account or "<project>")


def _memory(plan: JobPlan, given: dict[str, Any]) -> None:
    cluster = plan.cluster
    if cluster.memory == "by-gpu":
        if extra := [f"--{k.replace('_', '-')}" for k in ("mem", "cpus_per_task") if k in given]:
            raise LaunchError(f"{cluster.name} gives each GPU its share of a node's CPUs and memory and documents no "
                              f"{' or '.join(extra)} ({cluster.docs}): drop {' and '.join(extra)}; ask for more GPUs "
                              "(--gpus-per-node) for more of a node")
        if plan.partition is not None and not plan.res["gpus_per_node"]:
            raise LaunchError(f"{cluster.name} gives a job CPUs and memory with its GPUs: a job of 0 GPUs gets none; "
                              "use --gpus-per-node 1 or more")
        return
    plan.res["mem"] = given.get("mem", cluster.mem)
    plan.res["cpus_per_task"] = given.get("cpus_per_task", cluster.cpus_per_task)


def _time(plan: JobPlan, time: str | None) -> None:
    partition = plan.partition
    limit = partition.max_time_s if partition else None
    if time is None:
        plan.res["time"] = partition.max_time if limit and limit < time_seconds(TEMPLATE_TIME) else TEMPLATE_TIME
        return
    plan.res["time"] = time
    if limit and (time_seconds(time) or 0) > limit:
        raise LaunchError(f"--time {time} is over the limit of {plan.cluster.name}'s {partition.name} partition, "
                          f"{duration(limit)} ({partition.max_time}; {plan.cluster.docs}), which refuses the job: "
                          f"give --time {partition.max_time} or less, or a partition with longer jobs "
                          f"({_longer(plan.cluster, partition)})")


def _longer(cluster: Cluster, partition: Partition) -> str:
    longer = [p for p in cluster.partitions.values()
              if p.max_time_s > partition.max_time_s and p.arch == partition.arch]
    return ", ".join(f"{p.name}: {duration(p.max_time_s)}" for p in longer) or "none on this architecture"


def _candidates(plan: JobPlan) -> list[NodeType]:
    """The node types the job may land on: the partition's, or those of the asked-for GPU type."""
    partition, wanted = plan.partition, plan.res["gpu_type"]
    assert partition is not None
    if wanted is None:
        return list(partition.nodes)
    types = sorted({n.gres_type for n in partition.nodes if n.gres_type})
    if not types:
        raise LaunchError(f"--gpu-type {wanted}: {plan.cluster.name}'s {partition.name} partition documents no GPU "
                          f"types to ask for (its nodes: {_models(partition.nodes)}): drop --gpu-type")
    if wanted not in types:
        raise LaunchError(f"--gpu-type {wanted}: {plan.cluster.name}'s {partition.name} partition has "
                          f"{', '.join(types)}: give one of those (docs/clusters.md)")
    return [n for n in partition.nodes if n.gres_type == wanted]


def _models(nodes: list[NodeType] | tuple[NodeType, ...]) -> str:
    return ", ".join(f"{n.gpus}x {n.gpu.model if n.gpu else 'no GPU'}" for n in nodes)


def _gpus(plan: JobPlan) -> None:
    partition, gpus, nodes = plan.partition, plan.res["gpus_per_node"], plan.res["nodes"]
    assert partition is not None
    candidates = _candidates(plan)
    most = max(n.gpus for n in candidates)
    if gpus > most:
        raise LaunchError(f"--gpus-per-node {gpus}: the nodes of {plan.cluster.name}'s {partition.name} partition "
                          f"have at most {most} ({_models(candidates)}), so the job would never start: use "
                          f"--gpus-per-node {most} or fewer, and --nodes N with -- --trainer.num_nodes=N for more")
    if partition.max_gpus_per_user and gpus * nodes > partition.max_gpus_per_user:
        raise LaunchError(f"{gpus * nodes} GPUs per job: {plan.cluster.name}'s {partition.name} partition lets one "
                          f"user hold {partition.max_gpus_per_user} at once, so the job would never start: use fewer "
                          f"GPUs or nodes, or another partition")
    fits = [n for n in candidates if n.gpus >= gpus]
    if len(fits) < len(candidates):
        plan.notes.append(f"note: {gpus} GPUs per node only fit the {_models(fits)} nodes of {partition.name}")


def _build_name(cuda: str) -> str:
    return "cu" + "".join(cuda.split(".")[:2])


def _torch_problem(plan: JobPlan) -> str | None:
    """Why the torch of the partition's environment cannot drive a GPU the job may land on; None if it can (or if
    that cannot be told: a torch whose build torch 2.14.1's table does not list is checked for CUDA alone)."""
    partition, env = plan.partition, plan.environment
    assert partition is not None and env is not None
    found = torch_version(env)
    if found is None:
        plan.notes.append(f"note: no torch found in {env}; the job's GPU check will tell")
        return None
    version, cuda = found
    unusable = []
    for node in _candidates(plan):
        gpu = node.gpu
        if gpu is None:
            continue
        if cuda is None:
            unusable.append((node, "a build without CUDA"))
        elif gpu.max_cuda and tuple(int(p) for p in cuda.split(".")[:2]) > gpu.max_cuda:
            unusable.append((node, f"its CUDA {cuda} is newer than {gpu.model}s run (up to "
                                   f"{'.'.join(map(str, gpu.max_cuda))})"))
        elif (kernels := TORCH_CUDA_BUILDS.get(_build_name(cuda), {}).get(partition.arch)) is not None and \
                gpu.compute_capability not in kernels:
            unusable.append((node, f"it has no kernels for compute capability {gpu.compute_capability / 10:.1f}"))
    if not unusable:
        return None
    bad = ", ".join(f"{n.gpu.model} ({n.gres_type or 'compute capability ' + str(n.gpu.compute_capability / 10)})"
                    for n, _ in unusable if n.gpu)
    good = sorted({n.gres_type for n in _candidates(plan) if n not in [u for u, _ in unusable] and n.gres_type})
    if partition.arch in MAKE_ENV:  # no PyPI torch there: the cluster's own, built for a CUDA these GPUs run
        fix = f"load a PyTorch built for CUDA 12 or older on an {partition.arch} machine, then " \
              f"{MAKE_ENV[partition.arch]}"
    else:
        fix = f"build that environment with make env TORCH_CUDA=cu126 on an {partition.arch} machine (docs/gpus.md)"
    return (f"{plan.cluster.name}'s {partition.name} partition may run this job on {bad}, which torch {version} in "
            f"{env} cannot drive ({unusable[0][1]}): {fix}"
            + (f", or ask for the other GPUs: --gpu-type {good[0]}" if good else ""))


def _submit_command(partition: Partition) -> str:
    """sbatch; for a partition submitted with ghbatch (Bede's gh): sbatch from a machine of its architecture (a
    ghlogin session), else ghbatch."""
    return "sbatch" if partition.submit == "sbatch" or machine_arch() == partition.arch else partition.submit


def missing_submit_command(plan: JobPlan) -> str:
    """The one line when plan.submit is not on PATH."""
    partition = plan.partition
    if partition is None or plan.submit == "sbatch":
        return "sbatch not found: no Slurm here; run the rows on this machine with --local"
    where = _login(plan.cluster, partition.arch, plan.res["account"]) or f"on an {partition.arch} machine"
    return (f"{plan.cluster.name}'s {partition.name} partition ({partition.arch}) takes jobs from a machine of its own "
            f"architecture or through {plan.submit} ({plan.cluster.docs}), and {plan.submit} is not on PATH here: run "
            f"this command {where}, or on a login node where {plan.submit} is")


def storage_notes(plan: JobPlan, runs_dir: Path, environment: Path) -> list[str]:
    """Where a site keeps small homes (its profile puts environments and runs elsewhere), a note for each that is
    in the home directory: the environment (6 GB) and checkpoints fill a 10 or 20 GB quota, and jobs then fail."""
    cluster, home, notes = plan.cluster, Path.home().resolve(), []
    account = plan.res["account"] or "<project>"
    for what, path, hint, fix in [("the environment", environment, cluster.envs, "set MLMODELDEV_HOME={} and make env"),
                                  ("runs", runs_dir, cluster.runs, "use --runs-dir {}")]:
        if hint.startswith(("~", ".")) or "/" not in hint or not path.resolve().is_relative_to(home):
            continue
        notes.append(f"note: {what} ({path.resolve()}) is in your home directory, which is small on {cluster.name}; "
                     + fix.format(hint.replace("{account}", account)))
    return notes


def script_values_problem(plan: JobPlan) -> str | None:
    """Why a clusters.toml value cannot go into a job script, or None (job_start and slurm_train.py ask before the
    rows' checks). The set-up entries are shell lines by design, one each; local_scratch is written inside double
    quotes, so its shell variables expand ($TMPDIR) but a `$(...)`, a backtick or a quote would run or end it; the
    submit command and the architecture are written into a comment line."""
    cluster = plan.cluster
    for what, value in [("submit", plan.submit), ("arch", plan.partition.arch if plan.partition else "")]:
        if not re.fullmatch(r"[\w.+-]*", value):
            return (f"clusters.toml: {cluster.name}'s {what} = {value!r} is not a command or architecture name "
                    "(letters, numerals, . _ + -): correct it in clusters.toml")
    if any(ord(c) < 32 for c in cluster.name):  # written into a comment line, which a newline would end
        return f"clusters.toml: the cluster name {cluster.name!r} holds a control character: give it on one line"
    if bad := next((line for line in cluster.setup if "\n" in line or "\r" in line), None):
        return (f"clusters.toml: {cluster.name}'s setup entry {bad!r} holds a newline: give each shell line as its "
                "own entry")
    if not re.fullmatch(r"(?:[\w./@:+,~-]|\$\w+|\$\{\w+\})*", cluster.local_scratch or ""):
        return (f"clusters.toml: {cluster.name}'s local_scratch = {cluster.local_scratch!r} is not a path: give a "
                "directory, with shell variables as $NAME or ${NAME} (e.g. \"$TMPDIR\")")
    return None


def job_start(plan: JobPlan, local: bool = False) -> str:
    """A job script's first lines after its header: the cluster's set-up (not for --local rows on this machine),
    `set -euo pipefail`, and $python, the environment of the node's architecture (environments.job_preamble)."""
    cluster = plan.cluster
    if problem := script_values_problem(plan):
        raise LaunchError(problem)
    setup = "" if local or not cluster.setup else \
        f"# {cluster.name}'s set-up (clusters.toml), before set -u: module scripts read unset variables\n" + \
        "\n".join(cluster.setup) + "\n"
    if cluster.local_scratch and plan.local_data and not local:  # before set -u: a node without it stages nothing
        setup += (f"# Datasets are read from a copy on the node's own disk (clusters.toml local_scratch; "
                  f"--no-local-data: off)\nexport {LOCAL_DATA_ENV}=\"{cluster.local_scratch}\"\n")
    login = {arch: _login(cluster, arch, plan.res["account"]) for arch in cluster.login}
    return f"{setup}set -euo pipefail\n{job_preamble(current_home(), login)}"
