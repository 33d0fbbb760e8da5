"""Config is validated at load: errors name the key, the bad value and what is allowed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import FROM_ENVIRONMENT, load_settings
from engine.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _load(tmp_path: Path, text: str):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_settings(p, env={})


def test_shipped_configs_are_valid() -> None:
    for name in ("engine.example.toml", "engine.dev.toml"):
        s = load_settings(REPO / "deploy" / name, env={})
        assert s.smtp.listeners


def test_defaults_without_a_file() -> None:
    s = load_settings(None, env={"HOME": "/home/ann"})
    assert s.queue.max_age == 3 * 86400 and s.database.url is None and s.home == Path("/home/ann/.local/state/engine")
    assert load_settings(None, env={"XDG_STATE_HOME": "/st"}).home == Path("/st/engine")


def test_home_is_relative_to_the_config_file_and_absolute(tmp_path: Path, monkeypatch) -> None:
    """A command run from another directory must find the same state (issue 16, first run 4)."""
    (tmp_path / "conf").mkdir()
    p = tmp_path / "conf" / "engine.toml"
    p.write_text('[server]\nhome = "../state"\n')
    for cwd in (tmp_path, tmp_path / "conf"):
        monkeypatch.chdir(cwd)
        assert load_settings(os.path.relpath(p, cwd), env={}).home == tmp_path / "state"
    monkeypatch.chdir(tmp_path)
    assert load_settings(p, env={"ENGINE_HOME": "rel"}).home == tmp_path / "rel"  # relative to where you are


def test_env_database_url_and_home_win(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[database]\nurl = "postgresql://file/db"\n')
    s = load_settings(p, env={"DATABASE_URL": "postgresql://env/db", "ENGINE_HOME": "/srv/engine"})
    assert s.database.url == "postgresql://env/db" and s.home == Path("/srv/engine")


def test_secrets_from_files(tmp_path: Path) -> None:
    """``<NAME>_FILE`` (Docker/Kubernetes secrets): the value is read from the file; the plain variable wins."""
    from cryptography.fernet import Fernet

    key = Fernet.generate_key().decode()
    (tmp_path / "db").write_text("postgresql://engine:s3cret@db.internal/engine\n")
    (tmp_path / "key").write_text(key + "\n")
    env = {"DATABASE_URL_FILE": str(tmp_path / "db"), "ENGINE_SECRET_KEY_FILE": str(tmp_path / "key")}
    s = load_settings(None, env=env)
    assert s.database.url == "postgresql://engine:s3cret@db.internal/engine"
    assert s.webhooks.secret_key is not None and s.webhooks.secret_key.get_secret_value() == key
    s = load_settings(None, env={**env, "DATABASE_URL": "postgresql://env/db"})
    assert s.database.url == "postgresql://env/db"
    with pytest.raises(ConfigError, match="DATABASE_URL_FILE: cannot read .*nope"):
        load_settings(None, env={"DATABASE_URL_FILE": str(tmp_path / "nope")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="ENGINE_SECRET_KEY_FILE: .* is empty"):
        load_settings(None, env={"ENGINE_SECRET_KEY_FILE": str(tmp_path / "empty")})


def test_engine_config_env_is_used(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[server]\nhostname = "mx.example.org"\n')
    assert load_settings(None, env={"ENGINE_CONFIG": str(p)}).server.hostname == "mx.example.org"


@pytest.mark.parametrize(
    "text,needles",
    [
        ('[queue]\nmax_age = "three days"\n', ["queue.max_age", "three days", "duration"]),
        ('[http]\nlisten = "localhost"\n', ["http.listen", "host:port"]),
        ('[http]\nlisten = "127.0.0.1:99999"\n', ["http.listen", "out of range"]),
        ('[http]\nmax_batch = 0\n', ["http.max_batch", "greater than or equal to 1"]),
        ('[smtp]\ntrusted_networks = ["10.0.0.0/33"]\n', ["smtp.trusted_networks", "10.0.0.0/33"]),
        ('[smtp]\nmax_message_size = "lots"\n', ["smtp.max_message_size", "lots"]),
        ('[server]\nhostnme = "x"\n', ["server.hostnme", "unknown key"]),
        ('[nonsense]\na = 1\n', ["nonsense", "unknown key"]),
        ('[database]\npool_min = 5\npool_max = 2\n', ["pool_max", "pool_min"]),
        ('[queue]\nstreams = { "Bad Name" = 1 }\n', ["queue.streams", "Bad Name"]),
        ('[[smtp.listeners]]\nname = "s"\nlisten = "127.0.0.1:587"\ntls = "starttls"\n', ["cert_file", "self_signed"]),
        ('[[smtp.listeners]]\nname = "s"\nlisten = "127.0.0.1:587"\ntls = "ssl"\n', ["tls", "'none' or 'starttls'"]),
        ('[[smtp.listeners]]\nname = "a"\nlisten = "127.0.0.1:1"\n[[smtp.listeners]]\nname = "a"\nlisten = "127.0.0.1:2"\n', ["unique", "a"]),
    ],
)
def test_bad_values_name_key_and_value(tmp_path: Path, text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, text)
    msg = str(exc.value)
    for n in needles:
        assert n in msg, msg


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        _load(tmp_path, "[server\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_engine_refuses_to_start_on_bad_config(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[queue]\nmax_age = -5\n')
    out = subprocess.run([sys.executable, "-m", "engine", "--config", str(p), "run"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "queue.max_age" in out.stderr and "negative" in out.stderr


def _leaf_keys(model: type, prefix: str = "") -> list[str]:
    import typing

    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        if name in FROM_ENVIRONMENT:
            continue
        sub = None
        for t in (field.annotation, *typing.get_args(field.annotation)):
            for cand in (t, *typing.get_args(t)):
                if isinstance(cand, type) and issubclass(cand, BaseModel):
                    sub = cand
        keys += _leaf_keys(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return keys


def test_example_config_documents_every_key() -> None:
    import re

    from engine.config import Settings

    text = (REPO / "deploy" / "engine.example.toml").read_text()
    missing = [k for k in _leaf_keys(Settings)
               if not re.search(rf"^\s*#?\s*\[*{re.escape(k.rsplit('.', 1)[-1])}\]*\s*(=|$)", text, re.M)
               and not re.search(rf"^\s*\[+{re.escape(k)}\]+", text, re.M)]
    assert not missing, f"deploy/engine.example.toml does not document: {missing}"
