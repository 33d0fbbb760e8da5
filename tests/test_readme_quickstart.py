"""The README quick start, run as written, against a real ``engine run`` with the dev config.

The block marked ``<!-- quickstart -->`` in README.md is executed by bash, line for line. Only
what cannot be the same on a shared test machine is substituted, and nothing else:
``.venv/bin/engine`` becomes this interpreter's ``-m engine``, the dev config becomes a copy whose
loopback ports are free ones, the database is this test's (``DATABASE_URL``, as for every
subprocess test) and the state directory a temporary one (``ENGINE_HOME``).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEV_PORTS = (8025, 5870, 2525, 2600)


def quickstart_script() -> str:
    """The shell block right after ``<!-- quickstart -->`` in README.md."""
    m = re.search(r"<!-- quickstart -->\n```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert m, "README.md has no <!-- quickstart --> shell block"
    return m.group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_make_run_uses_the_dev_config_and_engine_run() -> None:
    """What the test starts below is what ``make run`` starts."""
    make = (REPO / "Makefile").read_text()
    assert "CONFIG ?= deploy/engine.dev.toml" in make
    assert "$(VENV)/bin/engine --config $(CONFIG) run\n" in make


def test_readme_quickstart_delivers_to_the_capture_sink(db_dsn, tmp_path) -> None:
    ports = {old: _free_port() for old in DEV_PORTS}
    config = (REPO / "deploy" / "engine.dev.toml").read_text()
    for old, new in ports.items():
        config = config.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    cfg = tmp_path / "engine.dev.toml"
    cfg.write_text(config)
    env = {**os.environ, "DATABASE_URL": db_dsn, "ENGINE_HOME": str(tmp_path / "home")}
    env.pop("ENGINE_CONFIG", None)
    engine = f"{shlex.quote(sys.executable)} -m engine"
    log = (tmp_path / "engine.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "engine", "--config", str(cfg), "run"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "engine.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "engine run did not become healthy"
            try:
                if httpx.get(f"http://127.0.0.1:{ports[8025]}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

        script = quickstart_script().replace(".venv/bin/engine", engine).replace("deploy/engine.dev.toml", str(cfg))
        for old, new in ports.items():
            script = script.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
        # The 202, the sink's listing and the message exactly as it arrived.
        assert '"state":"queued"' in out.stdout.replace(" ", ""), out.stdout
        assert re.search(r"app@example\.com\s+someone@example\.test\s+\d+\s+Hi", out.stdout), out.stdout
        assert "Subject: Hi" in out.stdout and "Hello" in out.stdout
        assert "Traceback" not in out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
