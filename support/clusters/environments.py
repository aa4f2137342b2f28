"""One Python environment per CPU architecture, found by the job on the node it runs on.

Bede's ppc64le and aarch64 (GH200) nodes share /users and /nobackup, and a package built for one does not run on the
other (Bede's python and conda pages), so `make env` builds each architecture's environment in a folder of its own:
    $MLMODELDEV_HOME/<uname -m>/venv-<hash of requirements.lock>[-system-torch | -torch-cu126]
(MLMODELDEV_HOME defaults to ~/.cache/mlmodeldev; on HEC put it on $global_storage, on Bede on /nobackup: the homes
hold 10 and 20 GB and the environment 6 GB). A job script does not name the submitting machine's interpreter: its
first lines (job_preamble) pick the environment of the architecture it runs on, and stop with one line naming the
command to run where there is none. Light on purpose: no torch (torch's version is read from its files).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
import sys
from pathlib import Path

from support import REPO_DIR

# PyPI has no torch for ppc64le: there the environment takes the cluster's own (docs/clusters.md, "POWER9").
MAKE_ENV = {"ppc64le": "make env TORCH=system"}


def machine_arch() -> str:
    """This machine's architecture as `uname -m` prints it; MLMODELDEV_ARCH overrides it (tests, and the Makefile's
    variable of the same name)."""
    return os.environ.get("MLMODELDEV_ARCH") or platform.machine()


def environments_home() -> Path:
    """Where `make env` puts environments: $MLMODELDEV_HOME, else ~/.cache/mlmodeldev (as the Makefile)."""
    if home := os.environ.get("MLMODELDEV_HOME"):
        return Path(home).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlmodeldev"


def lock_hash() -> str:
    """The first 12 hex digits of requirements.lock's sha256, which names its environments (as the Makefile)."""
    return hashlib.sha256((REPO_DIR / "requirements.lock").read_bytes()).hexdigest()[:12]


def current_home() -> Path:
    """The environments' home this interpreter's own environment lives in (<home>/<arch>/venv-...), else the
    default: other architectures' environments are looked for beside this one."""
    prefix = Path(sys.prefix)
    return prefix.parent.parent if prefix.parent.name == machine_arch() else environments_home()


def find_environment(arch: str, home: Path | None = None) -> Path | None:
    """The environment `make env` completed last for this lock on `arch`; the running one for this machine's."""
    if arch == machine_arch():
        return Path(sys.prefix)
    found = sorted((home or current_home()).joinpath(arch).glob(f"venv-{lock_hash()}*/.complete"),
                   key=lambda marker: marker.stat().st_mtime)
    return found[-1].parent if found else None


def torch_version(env: Path) -> tuple[str, str | None] | None:
    """(torch's version, its CUDA version or None for a CPU build) as the environment's torch/version.py says, read
    as text (it cannot be imported on another architecture); None where no torch is found. A TORCH=system
    environment sees the torch of the Python it was made from (pyvenv.cfg's home)."""
    places = [env]
    config = env / "pyvenv.cfg"
    if config.is_file() and (home := re.search(r"^home\s*=\s*(.+)$", config.read_text(), re.M)):
        places.append(Path(home.group(1).strip()).parent)
    if env == Path(sys.prefix) and (found := _imported_from()):
        places.insert(0, found)
    for place in places:
        for version_file in [*place.glob("lib/python3*/site-packages/torch/version.py"), place / "torch/version.py"]:
            if version_file.is_file():
                text = version_file.read_text()
                version = re.search(r"^__version__\s*=\s*'([^']+)'", text, re.M)
                cuda = re.search(r"^cuda\s*(?::[^=]*)?=\s*'([^']+)'", text, re.M)
                if version:
                    return version.group(1), cuda.group(1) if cuda else None
    return None


def _imported_from() -> Path | None:
    from importlib.util import find_spec

    spec = find_spec("torch")
    return Path(spec.origin).parent.parent if spec and spec.origin else None


def missing_environment(arch: str, home: Path, login: str) -> str:
    """The one line for a job (or a submission) that has no environment for `arch`."""
    where = login or f"on a login node of that architecture ({arch})"
    setting = "" if home == environments_home() else f"MLMODELDEV_HOME={shlex.quote(str(home))} "
    return (f"no environment for {arch} under {home}/{arch} (for this requirements.lock, venv-{lock_hash()}): {where}, "
            f"in this repository, run: {setting}{MAKE_ENV.get(arch, 'make env')}")


def job_preamble(home: Path, login: dict[str, str]) -> str:
    """Bash lines that set $python to the environment of the node's architecture: the interpreter that checked the
    job for this machine's architecture, else the newest complete one under home/<arch>; else one line and exit 1."""
    q = shlex.quote
    arch, pattern = machine_arch(), f"{q(str(home))}/\"$arch\"/venv-{lock_hash()}*/.complete"
    cases = "\n".join(f"  {q(a)}) echo {q(missing_environment(a, home, where))} >&2; exit 1 ;;"
                      for a, where in sorted(login.items()) if a != arch)
    fallback = q(missing_environment("ARCH", home, "")).replace("ARCH", "'\"$arch\"'")
    return f"""# The environment for this node's architecture (docs/clusters.md): a job may run on another than the
# machine that submitted it (Bede: ppc64le and aarch64 nodes share the filesystem).
arch=${{MLMODELDEV_ARCH:-$(uname -m)}}
python=
if [ "$arch" = {q(arch)} ]; then python={q(sys.executable)}; fi  # the interpreter that checked this job
if [ -z "$python" ]; then
  marker=$(ls -dt {pattern} 2>/dev/null | head -n 1 || true)
  if [ -n "$marker" ]; then python=${{marker%/.complete}}/bin/python; fi
fi
if [ -z "$python" ] || [ ! -x "$python" ]; then
  case "$arch" in
{cases or '  "") ;;'}
  *) echo {fallback} >&2; exit 1 ;;
  esac
fi"""
