"""Whether the installed torch can use the GPUs this job was given, checked before training starts: without it, a
job with accelerator="auto" whose torch cannot use its GPUs trains on the CPU without a word, for hours.

    require_usable_gpus("auto")    # train.py, before the Trainer exists: raises SettingError with the fix, one line

The facts come from nvidia-smi (GPU models, compute capabilities, the driver and the CUDA version it supports), the
environment (CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE) and torch's build (torch.version.cuda, the architectures it
was compiled for). None of it initialises CUDA (torch.cuda.device_count asks NVML, the driver's library), so a
strategy that forks afterwards still can. An explicit CPU accelerator is never checked.

Refused: GPUs are visible but torch cannot use them (a CPU-only build; a driver older than torch's CUDA major
version; torch seeing no device), or a GPU's compute capability has no kernels in the build (a V100, sm_70, under
the cu130 build). The message names the GPU, the driver's CUDA version, torch's, and `make env TORCH_CUDA=...`.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

from support.errors import SettingError

# The CUDA builds of torch 2.14.1 on the PyTorch index and the compute capabilities each has kernels for (x86-64,
# aarch64), as torch.cuda.PYTORCH_RELEASES_CODE_CC lists them (tests/test_gpu_readiness.py compares the two).
# PyPI's torch is the cu130 build. CUDA 13 dropped Maxwell, Pascal and Volta: a V100 (7.0) needs cu126.
TORCH_CUDA_BUILDS: dict[str, dict[str, frozenset[int]]] = {
    "cu126": {"x86_64": frozenset({50, 60, 70, 75, 80, 86, 90}), "aarch64": frozenset({80, 90})},
    "cu130": {"x86_64": frozenset({75, 80, 86, 90, 100, 120}), "aarch64": frozenset({80, 90, 100, 110, 120})},
    "cu132": {"x86_64": frozenset({75, 80, 86, 90, 100, 120}), "aarch64": frozenset({80, 90, 100, 110, 120})},
    "cu134": {"x86_64": frozenset({75, 80, 86, 90, 100, 120}), "aarch64": frozenset({80, 90, 100, 110, 120})},
}
PYPI_BUILD = "cu130"  # the build PyPI serves, which the lock installs
HOW_TO_INSTALL = "docs/gpus.md"


@dataclass(frozen=True)
class TorchBuild:
    """What the installed torch was built for, and how many devices it sees."""

    version: str  # "2.14.1+cu130"
    cuda: str | None  # "13.0"; None for a CPU-only build
    arch_list: tuple[str, ...]  # ("sm_75", "sm_80", ...): the compute capabilities it has kernels (sm) or PTX for
    device_count: int

    @staticmethod
    def installed() -> TorchBuild:
        import torch

        # get_arch_list reads the build's flags and device_count asks NVML (the CUDA runtime only where there is
        # no NVML, hence no driver): neither initialises CUDA.
        return TorchBuild(torch.__version__, torch.version.cuda, tuple(torch.cuda.get_arch_list()),
                          torch.cuda.device_count())


@dataclass(frozen=True)
class GpuFacts:
    """The GPUs this job was given, and the torch that should use them."""

    visible_by: str | None  # what says the job has GPUs ("nvidia-smi", "CUDA_VISIBLE_DEVICES=0,1", ...); None: none
    gpus: tuple[tuple[str, int | None], ...]  # (model, compute capability as 70 for 7.0, or None) per nvidia-smi row
    driver: str | None  # "550.54.15"
    driver_cuda: str | None  # the newest CUDA the driver supports, "12.4"
    torch: TorchBuild
    machine: str = field(default_factory=platform.machine)


def _version(text: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text or "")[:2])


def _run(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def query_nvidia_smi(nvidia_smi: str) -> tuple[list[tuple[str, int | None]], str | None, str | None]:
    """(gpus, driver version, driver's CUDA version) from nvidia-smi; nothing where it fails (no GPU, no driver)."""
    rows = _run([nvidia_smi, "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"])
    if rows is None:  # drivers before 510 know no compute_cap
        rows = _run([nvidia_smi, "--query-gpu=name,driver_version", "--format=csv,noheader"])
    gpus, driver = [], None
    for row in (rows or "").splitlines():
        name, driver, *cap = [part.strip() for part in row.split(",")]
        gpus.append((name, int(cap[0].replace(".", "")) if cap and re.fullmatch(r"\d+\.\d", cap[0]) else None))
    header = _run([nvidia_smi]) if gpus else None  # "... Driver Version: 550.54.15   CUDA Version: 12.4 ..."
    cuda = re.search(r"CUDA Version\s*:\s*(\d+\.\d+)", header or "")
    return gpus, driver, cuda.group(1) if cuda else None


def gather_facts(environ: Mapping[str, str] | None = None, nvidia_smi: str | None = None,
                 torch_build: TorchBuild | None = None) -> GpuFacts:
    """The facts of this process (or those given: the tests' fake nvidia-smi, environment and torch build)."""
    environ = os.environ if environ is None else environ
    nvidia_smi = nvidia_smi or shutil.which("nvidia-smi", path=environ.get("PATH"))
    gpus, driver, driver_cuda = query_nvidia_smi(nvidia_smi) if nvidia_smi else ([], None, None)
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # what the job was given, even if the node has more ("" or -1: none at all)
        ids = [part for part in visible.split(",") if part.strip()]
        visible_by = f"CUDA_VISIBLE_DEVICES={visible}" if ids and ids[0] not in ("-1", "NoDevFiles") else None
    elif environ.get("SLURM_GPUS_ON_NODE", "0").isdigit() and int(environ.get("SLURM_GPUS_ON_NODE", "0")) > 0:
        visible_by = f"SLURM_GPUS_ON_NODE={environ['SLURM_GPUS_ON_NODE']}"
    else:
        visible_by = "nvidia-smi" if gpus else None
    return GpuFacts(visible_by, tuple(gpus), driver, driver_cuda, torch_build or TorchBuild.installed())


def runs_on(capability: int, arch_list: tuple[str, ...]) -> bool:
    """Whether a build with these architectures runs on a GPU of this compute capability: kernels (sm_XY) run on the
    same major version with an equal or higher minor one; PTX (compute_XY) is compiled for any newer GPU."""
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        code = int(re.sub(r"\D", "", number) or 0)
        if (kind == "sm" and code // 10 == capability // 10 and code <= capability) or (
                kind == "compute" and code <= capability):
            return True
    return False


def build_cuda(build: str) -> tuple[int, int]:
    """The CUDA version of a build's name: cu126 -> (12, 6)."""
    return int(build[2:4]), int(build[4:])


def fitting_build(driver_cuda: str | None, capabilities: set[int], machine: str) -> str | None:
    """The torch build (cu126, ...) for this driver and these GPUs: kernels for every GPU and a CUDA major version the
    driver supports (CUDA's minor-version compatibility covers the rest); the newest not newer than the driver's
    CUDA, else the oldest of its major version. Without the driver's version: PyPI's build if it fits, else the
    newest that does. None when no build fits."""
    arch = "aarch64" if machine.lower() in ("aarch64", "arm64") else "x86_64"
    driver = _version(driver_cuda)
    fits = [build for build, codes in TORCH_CUDA_BUILDS.items()
            if all(runs_on(cap, tuple(f"sm_{code}" for code in codes[arch])) for cap in capabilities)
            and (not driver or build_cuda(build)[0] <= driver[0])]
    if not driver:
        return PYPI_BUILD if PYPI_BUILD in fits else max(fits, key=build_cuda, default=None)
    older = [build for build in fits if build_cuda(build) <= driver]
    return max(older, key=build_cuda) if older else min(fits, key=build_cuda, default=None)


def problem(facts: GpuFacts) -> str | None:
    """Why the installed torch cannot use the job's GPUs, and the fix, in one line; None when it can (or when the
    job has no GPU)."""
    build = facts.torch
    if facts.visible_by is None or "rocm" in build.version:  # AMD GPUs (Slurm counts them too): not ours to judge
        return None
    capabilities = {cap for _, cap in facts.gpus if cap is not None}
    reasons = []  # what is wrong with the build for these GPUs
    if build.cuda is None:
        reasons.append("it is a build without CUDA")
    elif facts.driver_cuda and _version(facts.driver_cuda)[0] < _version(build.cuda)[0]:
        reasons.append(f"its CUDA {build.cuda} needs a driver for CUDA {_version(build.cuda)[0]}.0 or newer")
    if build.cuda is not None and build.arch_list and (missing := [
            cap for cap in sorted(capabilities) if not runs_on(cap, build.arch_list)]):
        reasons.append(f"it has no kernels for compute capability {_capabilities(missing)} (it has "
                       f"{' '.join(build.arch_list)})")
    if reasons:
        fix = fitting_build(facts.driver_cuda, capabilities, facts.machine)
        how = (f"make env TORCH_CUDA={fix} and train in that environment ({HOW_TO_INSTALL})" if fix else
               f"update the NVIDIA driver (no CUDA build of torch {build.version.split('+')[0]} fits this one and "
               f"these GPUs), or load the cluster's PyTorch and make env TORCH=system ({HOW_TO_INSTALL})")
    elif build.device_count == 0 and facts.gpus:
        reasons.append("it sees none of them")
        how = f"check which GPUs the job may use ({facts.visible_by}, the container's devices)"
    elif build.device_count == 0:
        reasons.append("it sees no GPU, and there is no nvidia-smi that lists one")
        how = "run on a node whose NVIDIA driver works (nvidia-smi lists its GPUs)"
    else:
        return None
    names = "/".join(sorted({name for name, _ in facts.gpus})) or "GPUs"
    gpus = f"{names}, compute capability {_capabilities(sorted(capabilities))}" if capabilities else names
    driver = f"driver {facts.driver} for CUDA {facts.driver_cuda or '?'}" if facts.driver else "driver unknown"
    return (f"this job has {gpus} ({facts.visible_by}; {driver}) but torch {build.version} (CUDA "
            f"{build.cuda or 'none'}) cannot use them: {'; '.join(reasons)}. Fix: {how}, or train on the CPU with "
            "--trainer.accelerator=cpu")


def _capabilities(codes: list[int]) -> str:
    return ", ".join(f"{code // 10}.{code % 10}" for code in codes)


def wants_cuda(accelerator: object) -> bool:
    """Whether a Trainer with this accelerator would use CUDA GPUs where there are some: "auto", "gpu", "cuda" or
    a CUDAAccelerator; never "cpu" (nor "mps", "tpu", ...)."""
    if isinstance(accelerator, str) or accelerator is None:
        return (accelerator or "auto").lower() in ("auto", "gpu", "cuda")
    return type(accelerator).__name__ == "CUDAAccelerator"


def require_usable_gpus(accelerator: object, environ: Mapping[str, str] | None = None,
                        torch_build: TorchBuild | None = None) -> None:
    """Raises SettingError (one line, naming the fix) when the job has GPUs that the installed torch cannot use;
    an accelerator that is not CUDA's (--trainer.accelerator=cpu) is never refused, nor even checked."""
    if wants_cuda(accelerator) and (why := problem(gather_facts(environ, torch_build=torch_build))):
        raise SettingError(why)
