"""The environment is the lock: every installed distribution at the lock's version, and the Makefile builds a
working environment from a lock with pip when uv cannot be had (and with uv when it can)."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name
from slurm_fixtures import skip_or_fail

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
# What `make env TORCH=system` (POWER9) leaves to the cluster's torch instead of installing it from the lock.
TORCH_FROM_SYSTEM = re.compile(r"^(torch|torchvision|triton|nvidia-.+|cuda-.+)$")


def locked_versions(lock: Path) -> dict[str, str]:
    """name -> version for each line of a `uv pip compile` lock whose marker holds for this interpreter."""
    versions = {}
    for line in lock.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pin, _, marker = line.partition(";")
        name, version = pin.strip().split("==")
        if not marker.strip() or Marker(marker).evaluate():
            versions[canonicalize_name(name)] = version
    return versions


def installed_versions() -> dict[str, str]:
    """name -> version of the distributions installed in this environment. Those it only sees from outside (the
    cluster's torch in a TORCH=system environment) and those conda installed (a conda env's python and its
    friends, environment.yml) did not come from the lock."""
    prefix = Path(sys.prefix).resolve()
    versions = {}
    for dist in importlib.metadata.distributions():
        inside = Path(dist.locate_file("")).resolve().is_relative_to(prefix)
        if inside and (dist.read_text("INSTALLER") or "").strip() != "conda":
            versions.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    return versions


def test_installed_environment_is_the_lock() -> None:
    locked, installed = locked_versions(LOCK), installed_versions()
    if (Path(sys.prefix) / ".torch-from-system").exists():
        locked = {name: version for name, version in locked.items() if not TORCH_FROM_SYSTEM.match(name)}
    if (build_file := Path(sys.prefix) / ".torch-cuda").exists():  # make env TORCH_CUDA=cu126: torch, torchvision
        build = build_file.read_text().strip()  # in that build, with its CUDA libraries instead of the lock's
        locked = {name: version + (f"+{build}" if name in ("torch", "torchvision") else "")
                  for name, version in locked.items() if name in ("torch", "torchvision") or not
                  TORCH_FROM_SYSTEM.match(name)}
        installed = {name: version for name, version in installed.items() if name in locked or not
                     TORCH_FROM_SYSTEM.match(name)}
    not_locked = sorted(f"{name}=={version}" for name, version in installed.items() if locked.get(name) != version)
    not_installed = sorted(f"{name}=={version}" for name, version in locked.items() if installed.get(name) != version)
    assert not not_locked and not not_installed, (
        f"{sys.prefix} is not {LOCK.name}: installed but not locked {not_locked}, locked but not installed "
        f"{not_installed}; build the environment from the lock with `make env` (a new lock gets a new environment)")


def test_lock_holds_every_pin_of_the_requirements() -> None:
    result = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "lock-is-current"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_pin_changed_but_not_locked_stops_make_with_the_fix(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text((REPO / "requirements.txt").read_text().replace("torch==2.14.1", "torch==2.14.2"))
    result = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "lock-is-current",
                             f"REQUIREMENTS={requirements}"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "pins torch==2.14.2 but requirements.lock does not: run make lock" in result.stderr


def write_wheel(directory: Path, name: str, version: str) -> None:
    """A pure-Python wheel whose module holds VERSION, zipped by hand: no build backend, no network."""
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join([*record, f"{name}-{version}.dist-info/RECORD,,"]) + "\n"
    with zipfile.ZipFile(directory / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


@pytest.fixture
def tiny_lock(tmp_path: Path) -> Path:
    """A lock of two packages whose wheels lie in tmp_path/wheels, one line with a marker as uv writes them."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels, "lockprobe_a", "1.0")
    write_wheel(wheels, "lockprobe_b", "2.0")
    lock = tmp_path / "tiny.lock"
    lock.write_text("# This file was autogenerated by uv via the following command:\n#    make lock\n"
                    "lockprobe-a==1.0\n    # via -r requirements.txt\n"
                    "lockprobe-b==2.0 ; sys_platform != 'win32'\n    # via lockprobe-a\n")
    return lock


def make_env(lock: Path, venv: Path, path: str, *options: str) -> subprocess.CompletedProcess:
    """`make env` from the repository's Makefile for a lock of local wheels only (pip's offline settings, which the
    Makefile hands to uv too), into venv, with PATH as given and a cache directory of its own."""
    environment = {**os.environ, "PATH": path, "XDG_CACHE_HOME": str(lock.parent / "cache"),
                   "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(lock.parent / "wheels")}
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "env", f"LOCK={lock}", f"VENV={venv}",
                           f"PYTHON={sys.executable}", "REQUIREMENTS=", *options],
                          env=environment, capture_output=True, text=True, timeout=120)


def imported_versions(venv: Path) -> str:
    probe = "import lockprobe_a, lockprobe_b; print(lockprobe_a.VERSION, lockprobe_b.VERSION)"
    return subprocess.run([venv / "bin" / "python", "-c", probe], capture_output=True, text=True, timeout=60).stdout


@pytest.mark.slow
def test_without_uv_pip_builds_the_environment_from_the_lock(tiny_lock: Path) -> None:
    venv = tiny_lock.parent / "venv"
    path_without_uv = os.pathsep.join(folder for folder in os.environ["PATH"].split(os.pathsep)
                                      if not (Path(folder) / "uv").exists())
    result = make_env(tiny_lock, venv, path_without_uv, "BOOTSTRAP_UV=0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Installing {tiny_lock} into {venv} with pip (uv is not on PATH and BOOTSTRAP_UV=0" in result.stdout
    assert "with uv" not in result.stdout and "Installing uv" not in result.stdout
    assert imported_versions(venv) == "1.0 2.0\n"
    assert (venv / ".complete").exists() and not (venv / ".installing").exists()
    again = make_env(tiny_lock, venv, path_without_uv, "BOOTSTRAP_UV=0")
    assert again.returncode == 0 and "Installing" not in again.stdout, again.stdout + again.stderr


def test_with_uv_on_path_uv_builds_the_environment_from_the_lock(tiny_lock: Path) -> None:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlmodeldev"
    uv_folders = [folder for folder in os.environ["PATH"].split(os.pathsep) if (Path(folder) / "uv").exists()]
    uv_folders += [str(uv.parent) for uv in sorted(cache.glob("*/uv-*/bin/uv"))  # <arch>/uv-<version>
                   if (uv.parent.parent / ".complete").exists()]
    if not uv_folders:  # under CI=true make env has just installed it: its absence is a failure there
        skip_or_fail(f"no uv on PATH nor in {cache}/<arch>/uv-*/ (make env installs it there)")
    venv = tiny_lock.parent / "venv"
    result = make_env(tiny_lock, venv, os.pathsep.join([uv_folders[0], os.environ["PATH"]]), "BOOTSTRAP_UV=0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Installing {tiny_lock} into {venv} with uv (on PATH" in result.stdout
    assert imported_versions(venv) == "1.0 2.0\n"


@pytest.mark.slow
def test_torch_cuda_installs_the_locks_torch_in_that_build(tiny_lock: Path) -> None:
    """make env TORCH_CUDA=cu126 (V100s, older drivers): the lock's torch version in the cu126 build, from the PyTorch
    index (here a local wheel stands in for its file), the rest of the lock as it is, in an environment of its own."""
    wheels = tiny_lock.parent / "wheels"
    write_wheel(wheels, "torch", "2.14.1")  # what a plain install of the lock would take
    write_wheel(wheels, "torch", "2.14.1+cu126")
    lock = tiny_lock.parent / "torch.lock"
    lock.write_text(tiny_lock.read_text() + "torch==2.14.1 ; sys_platform == 'linux'\n    # via lockprobe-a\n")
    venv = tiny_lock.parent / "venv"
    path_without_uv = os.pathsep.join(folder for folder in os.environ["PATH"].split(os.pathsep)
                                      if not (Path(folder) / "uv").exists())
    result = make_env(lock, venv, path_without_uv, "BOOTSTRAP_UV=0", "TORCH_CUDA=cu126")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("Installing torch==2.14.1+cu126 from https://download.pytorch.org/whl/cu126 with pip (TORCH_CUDA=cu126)"
            in result.stdout)
    probe = "import lockprobe_a, lockprobe_b, torch; print(lockprobe_a.VERSION, lockprobe_b.VERSION, torch.VERSION)"
    versions = subprocess.run([venv / "bin" / "python", "-c", probe], capture_output=True, text=True, timeout=60)
    assert versions.stdout == "1.0 2.0 2.14.1+cu126\n", versions.stderr
    assert (venv / ".torch-cuda").read_text() == "cu126\n" and (venv / ".complete").exists()
    named = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(REPO), "venv-path", "TORCH_CUDA=cu126"],
                           capture_output=True, text=True, timeout=60).stdout.strip()
    assert named.endswith("-torch-cu126") and named != subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(REPO), "venv-path"], capture_output=True, text=True).stdout
    refused = make_env(lock, tiny_lock.parent / "other", path_without_uv, "TORCH_CUDA=12.6")
    assert refused.returncode != 0 and "error: TORCH_CUDA=12.6: give a build of torch (cu126" in refused.stderr
    assert not (tiny_lock.parent / "other").exists()


@pytest.mark.parametrize("variable", ["MLMODELDEV_HOME", "VENV"])
def test_a_path_with_a_space_stops_make_in_one_line_and_makes_nothing(variable: str, tmp_path: Path) -> None:
    """make splits file names at spaces: `make env` failed with a cryptic flock error and left a stray folder named
    after the path's second word in the clone."""
    clone_before = sorted(path.name for path in REPO.iterdir())
    result = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "env", f"{variable}={tmp_path}/a space"],
                            capture_output=True, text=True, env={**os.environ, "BOOTSTRAP_UV": "0"})
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds whitespace" in lines[0] and "MLMODELDEV_HOME" in lines[0], result.stderr
    assert sorted(path.name for path in REPO.iterdir()) == clone_before and not list(tmp_path.iterdir())
