"""Whether wandb can log online here, decided the way the installed wandb decides it, without prompting or hanging.

Light on purpose (no torch, no Lightning): sweep.py's agent check runs it on login nodes.
"""

from __future__ import annotations

import html
import os
import re
import urllib.error
import urllib.request
from typing import Any

import tomllib

from support import REPO_DIR
from support.errors import SettingError

WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")  # what wandb's settings accept
OFFLINE_HINT = ("on machines without internet, run the sweep offline instead: `python sweep.py --list` (or "
                "slurm_train.py) enumerates the same SWEEP_CONFIG, then `wandb sync` the runs")


def current_settings() -> Any:
    """wandb's settings as `wandb.init` would load them now: environment variables, the settings file that
    `wandb login --host` writes, and wandb's own default server (which changes between releases: 0.31's is
    api.forge.coreweave.com, not api.wandb.ai)."""
    # Private class: wandb's public singleton caches the environment of its first use, and tests (or a process
    # that changes WANDB_* variables) need the current one. tests/test_private_names.py watches it.
    from wandb.sdk.wandb_setup import _WandbSetup

    return _WandbSetup(pid=os.getpid()).settings


PROJECT_SETTINGS = REPO_DIR / "project.toml"  # made by `copier copy` (copier.yml)


def project_settings() -> dict[str, Any]:
    """The [wandb] table of the project's project.toml, which `copier copy` writes from its answers; {} where
    there is none (the template itself, or a plain clone of it)."""
    if not PROJECT_SETTINGS.is_file():
        return {}
    try:
        with PROJECT_SETTINGS.open("rb") as file:
            return tomllib.load(file).get("wandb", {})
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{PROJECT_SETTINGS}: {err}: correct the file (its keys: [wandb] entity, project)") from None


def default_project() -> str:
    """WANDB_PROJECT, else project.toml's, else the name of this clone's directory: each project a researcher
    makes of the template logs to its own wandb project without configuring one."""
    return (os.environ.get("WANDB_PROJECT") or project_settings().get("project")
            or REPO_DIR.name)


def default_entity() -> str | None:
    """WANDB_ENTITY, else project.toml's, else None (wandb's default: the user's own entity)."""
    return os.environ.get("WANDB_ENTITY") or project_settings().get("entity") or None


def has_wandb_credentials() -> bool:
    """True when wandb would find an API key without prompting: WANDB_API_KEY, an identity token, or a netrc entry
    for the server it will use (looked up by wandb's own netrc reader, which also knows its hosts' aliases)."""
    from wandb.sdk.lib import wbauth  # what `wandb login` writes, wandb reads here; watched by test_private_names

    settings = current_settings()
    if settings.api_key or settings.identity_token_file:
        return True
    try:
        return wbauth.read_netrc_auth(host=settings.base_url) is not None
    except Exception:  # an unreadable netrc or a malformed key: wandb would not log in with it either
        return False


def server_problem(timeout: float) -> str | None:
    """Why the wandb server that wandb will use cannot be reached within `timeout` seconds (one line), or None."""
    url = current_settings().base_url
    try:
        urllib.request.urlopen(url, timeout=timeout).close()  # honours https_proxy like wandb does
    except urllib.error.HTTPError:
        return None  # it answered: reachable, whatever the status
    except (urllib.error.URLError, OSError, ValueError) as err:
        return f"cannot reach the wandb server {url} within {timeout:g} s ({getattr(err, 'reason', err)})"
    return None


def choose_mode(requested: str, init_timeout: float) -> tuple[str, str | None]:
    """The wandb mode for a run and, when online was wanted but cannot work, why (one line, for a warning).
    auto: WANDB_MODE if set, else online with credentials, offline without. Online without credentials is an
    error (wandb would prompt, forever in a terminal); online with an unreachable server becomes offline."""
    mode = requested if requested != "auto" else os.environ.get("WANDB_MODE") or "auto"
    if os.environ.get("WANDB_MODE", "") not in ("", *WANDB_MODES):  # wandb itself fails later with 60 lines
        raise SettingError(f"WANDB_MODE={os.environ['WANDB_MODE']} is not a wandb mode: set it to one of "
                           f"{', '.join(WANDB_MODES)}, or unset it")
    if mode == "auto":
        if not has_wandb_credentials():
            return "offline", None
        mode = "online"
    elif mode == "online" and not has_wandb_credentials():
        raise ValueError("wandb mode 'online' needs credentials: run `wandb login` or set WANDB_API_KEY, "
                         "or use --wandb.mode=offline")
    if mode == "online" and (problem := server_problem(min(init_timeout, 10.0))):
        return "offline", problem
    return mode, None


def plain_reason(err: BaseException, limit: int = 200) -> str:
    """An error's message as one line of text. A server's HTML error page (a proxy's 501, say), which wandb passes on
    inside JSON (<!DOCTYPE HTML>\\n<html ...), becomes its title: "returned error 501 (an HTML page: Error
    response)"."""
    text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda match: chr(int(match.group(1), 16)), str(err))
    text = html.unescape(text.replace("\\n", " ").replace('\\"', '"'))
    if markup := re.search(r"<(!doctype|html|head|body)\b", text, re.IGNORECASE):
        title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        status = re.search(r".*?returned error \d+", text[:markup.start()], re.DOTALL)
        text = (status.group(0) if status else text[:markup.start()]) + \
            f" (an HTML page{': ' + title.group(1).strip() if title else ''})"
    return " ".join(text.split())[:limit]


def agent_problem(timeout: float = 10.0) -> str | None:
    """Why a wandb agent cannot work here (one line), or None. Agents get every run's settings from the server."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        return f"WANDB_MODE={mode}, but a wandb agent needs the wandb server for every run; {OFFLINE_HINT}"
    if problem := server_problem(timeout):
        return f"{problem}; {OFFLINE_HINT}"
    return None
