"""structlog, configured once: JSON lines in production, a console renderer on a terminal.

Context (message_id, provider, ...) is bound with contextvars so every line a
task logs carries it without passing loggers around. ``[logging]`` sets the
level, the format and whether addresses may be written: by default every
e-mail address in a line at info level or above is written as ``***@domain``
(the domain stays, it is what operators need to see), so log files and
log shippers never hold who was mailed. Library loggers (uvicorn, aiosmtpd,
asyncpg) go through the same renderer and the same redaction.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import structlog
from pydantic import Field, field_validator

from engine.configtypes import _Section

Level = Literal["debug", "info", "warning", "error"]

# local@domain, local@[literal]: the local part is what identifies a person.
_ADDRESS_RE = re.compile(r"""[^\s<>"'(),;:@\[\]\\]+@(?=(?:[A-Za-z0-9-]+\.)+[A-Za-z0-9-]+|\[[0-9A-Fa-f.:v]+\])""")
_REDACTED = "***@"


class LoggingConfig(_Section):
    level: Level = Field(default="info", description="debug | info | warning | error.")
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="json: one JSON object per line; console: for people; auto: console on a terminal, else json.",
    )
    log_addresses: bool = Field(
        default=False,
        description="Write e-mail addresses in full at info level and above (otherwise ***@domain; debug lines always have them).",
    )

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


def redact(value: Any) -> Any:
    """``value`` with the local part of every e-mail address in its strings replaced by ``***``."""
    if isinstance(value, str):
        return _ADDRESS_RE.sub(_REDACTED, value) if "@" in value else value
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def redact_addresses(_: Any, method_name: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """structlog processor: addresses out of every line above debug (debug is for a person at a console)."""
    if method_name == "debug":
        return event_dict
    for key, value in event_dict.items():
        if isinstance(value, (str, Mapping, list, tuple)):
            event_dict[key] = redact(value)
    return event_dict


def configure(config: LoggingConfig | None = None, *, stream: TextIO | None = None) -> None:
    """Set up structlog (and the standard library's loggers) once per process, from ``[logging]``."""
    cfg = config or LoggingConfig()
    out = stream if stream is not None else sys.stderr
    json = cfg.format == "json" or (cfg.format == "auto" and not out.isatty())
    level = logging.getLevelName(cfg.level.upper())
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    tail: list[structlog.typing.Processor] = [structlog.processors.StackInfoRenderer(), structlog.processors.format_exc_info]
    if not cfg.log_addresses:
        tail.append(redact_addresses)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, stamp, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    # Library loggers (uvicorn, aiosmtpd, asyncpg): warnings and up, in the same format.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, stamp],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(level, logging.WARNING))
