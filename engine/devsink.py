"""A development capture sink: a tiny SMTP server that keeps every message it receives as a file.

The quick start has to deliver somewhere a new user can see without a real mailbox or a DNS name:
the dev config routes ``example.test`` to this sink (``[dev] capture_sink``), ``engine run`` starts
it next to the engine, and ``engine sink list|show`` reads what arrived. Each message is two files
under ``$ENGINE_HOME/sink/``: ``<id>.eml`` (the bytes exactly as received) and ``<id>.json`` (the
envelope), written to a temporary name and renamed, so a reader never sees half a message.

Never for production: it accepts mail for anyone from anyone, on the address it is given.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

from pydantic import Field

from engine.configtypes import HostPort, _Section


class DevConfig(_Section):
    """``[dev]``: conveniences for a laptop, all off by default."""

    capture_sink: HostPort | None = Field(
        default=None,
        description="host:port of a capture SMTP sink that `engine run` starts; mail to it lands in $ENGINE_HOME/sink.",
    )


def sink_dir(home: Path) -> Path:
    return home / "sink"


@dataclass(frozen=True)
class Captured:
    """One message the sink kept: its id, envelope and a few headers for a listing."""

    id: str
    received_at: str
    mail_from: str
    rcpt_to: list[str]
    subject: str
    size: int
    path: Path

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "received_at": self.received_at, "mail_from": self.mail_from,
                "rcpt_to": self.rcpt_to, "subject": self.subject, "size": self.size, "path": str(self.path)}


_seq = itertools.count()


def store(directory: Path, mail_from: str, rcpt_to: list[str], data: bytes, peer: str | None) -> str:
    """Keep one message (bytes as received) and its envelope; return its id (sortable by arrival)."""
    directory.mkdir(parents=True, exist_ok=True)
    msg_id = f"{time.time_ns() // 1000:013x}{next(_seq) % 4096:03x}"  # microseconds, then a counter: sorts by arrival
    envelope = {"mail_from": mail_from, "rcpt_to": rcpt_to, "peer": peer,
                "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for suffix, payload in ((".eml", data), (".json", json.dumps(envelope).encode())):
        tmp = directory / f".{msg_id}{suffix}.tmp"
        tmp.write_bytes(payload)
        tmp.rename(directory / f"{msg_id}{suffix}")  # the .json last: a listed id always has its .eml
    return msg_id


def captured(home: Path) -> list[Captured]:
    """Everything the sink kept, oldest first."""
    directory = sink_dir(home)
    out: list[Captured] = []
    for env_file in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        eml = env_file.with_suffix(".eml")
        try:
            envelope = json.loads(env_file.read_text())
            with eml.open("rb") as fh:
                headers = BytesHeaderParser(policy=default_policy).parse(fh)
            size = eml.stat().st_size
        except (OSError, ValueError):
            continue  # removed while we looked
        out.append(Captured(env_file.stem, envelope["received_at"], envelope["mail_from"], envelope["rcpt_to"],
                            str(headers.get("Subject", "")), size, eml))
    return out


class _Handler:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data: bytes = envelope.original_content or envelope.content
        peer = f"{session.peer[0]}:{session.peer[1]}" if session.peer else None
        await asyncio.to_thread(store, self.directory, envelope.mail_from or "", list(envelope.rcpt_tos), data, peer)
        return "250 2.0.0 captured"


async def start_sink(listen: tuple[str, int], home: Path) -> asyncio.Server:
    """Listen on ``listen`` (raises ``OSError`` when the address is taken) and keep what arrives."""
    from aiosmtpd.smtp import SMTP

    handler = _Handler(sink_dir(home))
    loop = asyncio.get_running_loop()
    host, port = listen
    return await loop.create_server(
        lambda: SMTP(handler, hostname="capture-sink.localhost", decode_data=False, enable_SMTPUTF8=True,
                     ident="engine dev capture sink"),
        host, port, reuse_address=True,
    )
