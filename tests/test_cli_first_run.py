"""The command line as a new user meets it (issue 16, first run 4, 6 and 11), over real subprocesses.

One state directory wherever a command runs from; an address already in use is one line and exit
2; a reader that goes away (``| head``) is no traceback; every list command has a table and
``--json`` (JSON Lines); ``make run`` installs only what running needs and says what it does.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.devsink import store

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENGINE_HOME", "ENGINE_CONFIG", "DATABASE_URL")}
    return {**env, **extra}


@pytest.mark.timeout(600)
def test_commands_from_another_directory_use_the_same_home(db_dsn, tmp_path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "engine.toml").write_text('[server]\nhome = "state"\n[smtp]\nenabled = false\n')
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    env = _env(DATABASE_URL=db_dsn)
    made = cli("--config", "../conf/engine.toml", "dkim", "keygen", "--domain", "example.com", "--selector", "s1",
               cwd=a, env=env)
    assert made.returncode == 0, made.stderr
    home = conf / "state"
    assert (home / "dkim").is_dir() and not (a / "var").exists()  # not ./var of wherever the command ran
    # The same config named from elsewhere: the same home, and every database command says which.
    for cwd, path in ((b, str(conf / "engine.toml")), (conf, "engine.toml")):
        out = cli("--config", path, "queue", "stats", cwd=cwd, env=env)
        assert out.returncode == 0, out.stderr
        assert f"engine: home {home} (external database)" in out.stderr
    store(home / "sink", "a@example.com", ["b@example.test"], b"Subject: x\r\n\r\nbody\r\n", None)
    listed = cli("--config", str(conf / "engine.toml"), "sink", "list", "--json", cwd=b, env=env)
    assert [r["rcpt_to"] for r in map(json.loads, listed.stdout.splitlines())] == [["b@example.test"]]


def test_port_already_in_use_is_one_line_and_exit_2(db_dsn, tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "engine.toml"
        cfg.write_text(f'[http]\nlisten = "127.0.0.1:{port}"\n[smtp]\nenabled = false\n[logging]\nformat = "console"\n')
        out = cli("--config", str(cfg), "run", "--workers", "0", cwd=tmp_path,
                  env=_env(DATABASE_URL=db_dsn, ENGINE_HOME=str(tmp_path / "home")))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "Errno" not in out.stderr, out.stderr
    assert f"engine: cannot listen: address already in use ([http] listen 127.0.0.1:{port})" in out.stderr


def test_a_reader_going_away_is_no_traceback(tmp_path) -> None:
    home = tmp_path / "home"
    for i in range(3000):  # far more than a pipe buffer holds
        store(home / "sink", f"sender{i}@example.com", [f"rcpt{i}@example.test"], b"Subject: s\r\n\r\nb\r\n", None)
    proc = subprocess.Popen([sys.executable, "-m", "engine", "sink", "list"], cwd=tmp_path,
                            env=_env(ENGINE_HOME=str(home)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"ID ")  # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=90) == 141 and err == "", err


@pytest.mark.timeout(600)  # a dozen interpreters starting on a loaded machine
async def test_list_commands_print_a_table_or_json_lines(db_dsn, pool, tmp_path) -> None:
    from engine.apikeys import ApiKeys
    from engine.config import load_settings
    from engine.suppression import Suppressions
    from engine.webhooks.endpoints import Endpoints

    env = _env(DATABASE_URL=db_dsn, ENGINE_HOME=str(tmp_path / "home"))
    (tmp_path / "engine.toml").write_text("[webhooks]\nallow_private_targets = true\n")
    settings = load_settings(tmp_path / "engine.toml", env=env)
    await ApiKeys(pool).create("crm", ["send"])
    await Suppressions(pool).suppress("Ann@Example.net", "*", "asked", "cli")
    for path in ("hook", "other"):
        await Endpoints(pool, settings).create(f"http://127.0.0.1:9/{path}")

    async def ok(*args: str) -> str:
        out = await asyncio.to_thread(cli, "--config", "engine.toml", *args, cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout

    for cmd, key, want in ((("apikey", "list"), "name", ["crm"]),
                           (("suppress", "list"), "address", ["ann@example.net"]),
                           (("webhooks", "list"), "url", ["http://127.0.0.1:9/hook", "http://127.0.0.1:9/other"])):
        rows = [json.loads(line) for line in (await ok(*cmd, "--json")).splitlines()]
        assert sorted(r[key] for r in rows) == want, cmd
        table = (await ok(*cmd)).splitlines()
        assert table[0].split()[0].isupper() and len(table) == 1 + len(want), table  # a header, then one line a row
        assert all(w in "\n".join(table) for w in want)
    assert await ok("queue", "list", "--json") == ""  # nothing queued: nothing on stdout


def _make_dry_run(target: str, venv: Path) -> str:
    out = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_run_installs_only_the_runtime_and_shows_progress(tmp_path) -> None:
    venv = tmp_path / "venv"
    run = _make_dry_run("run", venv)
    installs = [line for line in run.splitlines() if "pip install" in line]
    assert installs[-1].endswith("pip install -e .") and not any(" -q" in line for line in installs), run
    # After `make run`, `make test` still installs the test extras.
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".installed-run").touch()
    assert "pip install -e '.[test]'" in _make_dry_run("test", venv)
    (venv / ".installed").touch()
    assert "pip install" not in _make_dry_run("test", venv)  # ... and only once
