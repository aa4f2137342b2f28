"""wandb as a logged-in researcher meets it: credentials found the way the installed wandb finds them, and a run
that cannot reach the server (a compute node without internet, a server that refuses) logs offline and finishes."""

from __future__ import annotations

import glob
import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import wandb
from conftest import QUICK, REPO, script_env

from support.training import wandb_access
from support.training.wandb_access import agent_problem, choose_mode, has_wandb_credentials, server_problem

KEY = "0123456789abcdef0123456789abcdef01234567"  # key-shaped: 40 characters


@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home without netrc or wandb settings, and no WANDB_* credentials in the environment."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    return home


def test_entity_and_project_default_to_the_projects_settings_below_the_environment(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch):
    """project.toml: what `copier copy` writes from its answers (copier.yml); WANDB_ENTITY / WANDB_PROJECT win."""
    settings = tmp_path / "project.toml"
    monkeypatch.setattr(wandb_access, "PROJECT_SETTINGS", settings)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert wandb_access.default_entity() is None and wandb_access.default_project() == REPO.name  # no file
    settings.write_text('[wandb]\nentity = "team"\nproject = "proj"\n')
    assert (wandb_access.default_entity(), wandb_access.default_project()) == ("team", "proj")
    monkeypatch.setenv("WANDB_ENTITY", "other-team")
    monkeypatch.setenv("WANDB_PROJECT", "other-proj")
    assert (wandb_access.default_entity(), wandb_access.default_project()) == ("other-team", "other-proj")
    settings.write_text("[wandb\n")
    monkeypatch.delenv("WANDB_PROJECT")
    with pytest.raises(ValueError, match=r"project.toml: .*: correct the file") as error:
        wandb_access.default_project()
    assert "\n" not in str(error.value)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_netrc_entry_for_wandbs_default_host_is_seen_as_logged_in(no_credentials: Path):
    assert not has_wandb_credentials()
    host = urlparse(wandb.Settings().base_url).hostname  # the installed wandb's default server, whatever it is
    netrc = no_credentials / ".netrc"
    netrc.write_text(f"machine {host}\n  login user\n  password {KEY}\n")
    netrc.chmod(0o600)
    assert has_wandb_credentials()


def test_a_netrc_entry_for_another_host_is_not_credentials(no_credentials: Path):
    netrc = no_credentials / ".netrc"
    netrc.write_text(f"machine example.org\n  login user\n  password {KEY}\n")
    netrc.chmod(0o600)
    assert not has_wandb_credentials()


def test_the_server_setting_follows_wandbs_own_sources(no_credentials: Path, monkeypatch: pytest.MonkeyPatch):
    """`wandb login --host` keeps the server in wandb's settings file: the key for that host counts, not others."""
    settings_dir = no_credentials / ".config" / "wandb"
    settings_dir.mkdir(parents=True)
    (settings_dir / "settings").write_text("[default]\nbase_url = https://wandb.example.org\n")
    netrc = no_credentials / ".netrc"
    netrc.write_text(f"machine wandb.example.org\n  login user\n  password {KEY}\n")
    netrc.chmod(0o600)
    assert has_wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://other.example.org")  # the environment wins, as in wandb
    assert not has_wandb_credentials()


def test_credentials_with_an_unreachable_server_choose_offline_with_a_reason(no_credentials: Path,
                                                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_BASE_URL", closed_port_url())
    mode, reason = choose_mode("auto", init_timeout=5)
    assert mode == "offline" and "cannot reach the wandb server" in reason
    monkeypatch.delenv("WANDB_API_KEY")
    assert choose_mode("auto", init_timeout=5) == ("offline", None)  # no credentials: offline, not a problem
    with pytest.raises(ValueError, match="wandb login"):
        choose_mode("online", init_timeout=5)


def test_offline_for_want_of_credentials_says_so_once(no_credentials: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture, tmp_path: Path):
    from support.training.wandb_logger import WandbOptions, wandb_logger

    monkeypatch.delenv("WANDB_MODE")
    wandb_logger(WandbOptions(), tmp_path / "run")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"note: wandb logs offline into {tmp_path / 'run'}/wandb: no credentials (`wandb login` or "
                     f"WANDB_API_KEY) to log online. Upload it later with `wandb sync {tmp_path / 'run'}/wandb/"
                     "offline-run-*`."], lines
    monkeypatch.setenv("WANDB_MODE", "offline")  # asked for: nothing to say
    wandb_logger(WandbOptions(), tmp_path / "run")
    assert capsys.readouterr().err == ""


class Refusing(http.server.BaseHTTPRequestHandler):
    """A server that answers every request with an error: reachable, but wandb cannot start a run there. Its error
    page is HTML, as a proxy's is: the warning must give its text, not escaped markup."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self.send_error(501)  # Not Implemented, as a proxy in front of no wandb server answers

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def answering(status: int) -> type[http.server.BaseHTTPRequestHandler]:
    class Answering(Refusing):
        def do_GET(self) -> None:  # noqa: N802
            self.send_error(status)

        do_POST = do_GET

    return Answering


@pytest.mark.parametrize("status", [200, 401, 404, 500, 501])
def test_a_server_that_answers_any_status_is_reachable_and_one_that_does_not_is_not(
        status: int, no_credentials: Path, monkeypatch: pytest.MonkeyPatch):
    """A server that answers, whatever the status (wandb's root answers 404, a proxy 501), is reachable: the run
    starts online and wandb itself says what is wrong, rather than the run quietly going offline; an agent is let
    start. Only silence (no route, a closed port) makes a run offline up front and stops an agent."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), answering(status))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("WANDB_API_KEY", KEY)
        monkeypatch.delenv("WANDB_MODE")
        assert server_problem(5) is None and agent_problem(5) is None
        assert choose_mode("auto", init_timeout=5) == ("online", None)
        if status == 500:  # the agents' check, as sbatch_agent.sh runs it
            checked = subprocess.run([sys.executable, str(REPO / "sweep.py"), "--check-agent"], capture_output=True,
                                     text=True, timeout=120, env={**script_env(), "WANDB_BASE_URL": os.environ[
                                         "WANDB_BASE_URL"], "WANDB_API_KEY": KEY, "HOME": str(no_credentials)})
            assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    finally:
        server.shutdown()
    monkeypatch.setenv("WANDB_BASE_URL", closed_port_url())
    assert "cannot reach the wandb server" in (server_problem(5) or "") and agent_problem(5) is not None


@pytest.mark.parametrize("server", ["unreachable", "refusing"])
@pytest.mark.slow
def test_a_logged_in_run_without_a_server_trains_to_the_end_offline(server: str, no_credentials: Path,
                                                                    refusing_server: str):
    """The common case on compute nodes: a key, and no route to the server (or one that fails). One warning, offline
    logging into the run directory, exit 0, a run that `wandb sync` can upload later."""
    url = closed_port_url() if server == "unreachable" else refusing_server
    env = script_env(WANDB_API_KEY=KEY, WANDB_BASE_URL=url, HOME=str(no_credentials))
    env.pop("WANDB_MODE")  # the tests' offline mode: this run decides for itself
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *QUICK, "--trainer.max_epochs=1",
                             "--wandb.init_timeout=20", "--run_dir=run"], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final metrics" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "logging offline" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert not any(markup in warnings[0] for markup in ("\\u003c", "&lt;", "<", ">")), warnings[0]
    assert "Traceback" not in result.stderr
    assert len(glob.glob("run/wandb/offline-run-*/run-*.wandb")) == 1
    assert KEY not in result.stdout + result.stderr


def test_a_wandb_service_that_is_gone_does_not_hide_how_the_run_ended(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture):
    """scancel and requeue signal every process of the step: wandb-core can end before train.py closes its run. The
    close then says so in one line instead of raising over the run's own exit (measured: a requeued packed run ended
    with exit 1 and a ConnectionResetError traceback instead of 143)."""
    import wandb

    from support.training import wandb_logger

    class GoneRun:
        dir = str(tmp_path / "wandb" / "offline-run-x" / "files")

    def finish(exit_code: int | None = None) -> None:
        raise ConnectionResetError("Connection lost")

    monkeypatch.setattr(wandb, "run", GoneRun())
    monkeypatch.setattr(wandb, "finish", finish)
    wandb_logger.finish_wandb(exit_code=1)
    assert wandb.run is None
    err = capsys.readouterr().err
    assert "wandb's service has gone (ConnectionResetError: Connection lost)" in err
    assert "wandb could not close the run" in err
    assert str(tmp_path / "wandb" / "offline-run-x") in err and len(err.strip().splitlines()) == 1


def test_a_logger_whose_service_has_gone_warns_once_and_stops_logging(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture):
    """The step's SIGTERM reaches wandb-core too: its death must not end the run at the next log call (measured:
    exit 1 and a ConnectionResetError traceback, the stop-time checkpoint never saved)."""
    from support.training.wandb_logger import FallbackWandbLogger

    calls = []

    class GoneExperiment:
        dir = str(tmp_path / "wandb" / "offline-run-x" / "files")

        def log(self, metrics: dict) -> None:
            calls.append(metrics)
            raise ConnectionResetError("Connection lost")

    logger = FallbackWandbLogger(save_dir=str(tmp_path), mode="offline")
    logger._experiment = GoneExperiment()
    monkeypatch.setattr(wandb, "run", logger._experiment)
    monkeypatch.setattr(wandb, "teardown", lambda: None)
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0}, step=step)
    logger.log_hyperparams({"lr": 0.1})
    logger.update_summary({"cost/wall_s": 1.0})
    assert len(calls) == 1 and logger.service_gone and wandb.run is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wandb's service has gone (ConnectionResetError" in err[0], err
    assert "the run goes on" in err[0] and str(tmp_path / "wandb" / "offline-run-x") in err[0]


def wandb_core_of(pid: int) -> int | None:
    children = [int(child) for task in os.listdir(f"/proc/{pid}/task")
                for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return next((child for child in children if "wandb" in Path(f"/proc/{child}/comm").read_text()), None)


@pytest.mark.example_model
@pytest.mark.example_data
@pytest.mark.slow
def test_sigterm_saves_and_exits_143_when_wandbs_service_died_first(tmp_path: Path):
    """scancel signals the whole step and wandb-core often dies first (4 of 6 runs on the local Slurm): the run still
    saves at its next batch and exits 143, with one line about wandb and no traceback."""
    import signal
    import time

    import torch

    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *QUICK, "--trainer.max_epochs=500",
                             "--run_dir=run", "--cka.every_n_epochs=0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=script_env(WANDB_MODE="offline"), cwd=tmp_path)
    deadline = time.monotonic() + 180
    while not (tmp_path / "run/checkpoints/last.ckpt").exists():  # training has started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    first = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    core = wandb_core_of(proc.pid)
    assert core is not None
    os.kill(core, signal.SIGTERM)
    time.sleep(1.0)  # train.py logs at least once more before its own signal
    proc.terminate()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "stopped by SIGTERM" in stderr, stderr[-3000:]
    assert len([line for line in stderr.splitlines() if "wandb's service has gone" in line]) == 1, stderr[-3000:]
    last = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] > first  # saved at the stop, not only at the last validation
    assert glob.glob(str(tmp_path / "run/wandb/offline-run-*/run-*.wandb"))  # what was logged stays
