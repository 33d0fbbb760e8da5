"""The ``engine`` command line (also ``python -m engine``): a table of contents.

Each command group is one module in ``engine/commands/`` with a
``register(subparsers)`` function; :data:`COMMAND_MODULES` lists them in the
order ``engine --help`` shows them. This file only builds the top-level
parser, loads the config once (``--config`` wins over ``ENGINE_CONFIG``) and
maps errors to exit codes: 2 for a bad config, an address already in use or a
database schema newer than this code (the node must not run as it is), 1 for
any other engine error, 130 for Ctrl-C, 141 when the reader of stdout went away
(``| head``), each with one line on stderr and never a traceback. A command
may return its status or a coroutine (run here).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from engine.config import load_settings
from engine.errors import ConfigError, EngineError, SchemaTooNew
from engine.runtime import run_async

COMMAND_MODULES: tuple[str, ...] = (
    "engine.commands.server",
    "engine.commands.apikey",
    "engine.commands.queue",
    "engine.commands.dns",
    "engine.commands.dkim",
    "engine.commands.templates",
    "engine.commands.tracking",
    "engine.commands.feedback",
    "engine.commands.suppress",
    "engine.commands.consent",
    "engine.commands.reputation",
    "engine.commands.shaping",
    "engine.commands.webhooks",
    "engine.commands.export",
    "engine.commands.audit",
    "engine.commands.retention",
    "engine.commands.sink",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description="Self-hosted email sending engine.")
    parser.add_argument("--config", help="TOML config file (default: $ENGINE_CONFIG, else built-in defaults)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = _dispatch(args)
        sys.stdout.flush()  # inside the try: a reader gone by now is the same broken pipe
        return status
    except BrokenPipeError:
        # The reader went away (`engine queue list | head`): not an error of ours, and no traceback.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # what a shell reports for a process ended by SIGPIPE (128 + 13)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        args.settings = load_settings(args.config)
        func: Callable[[argparse.Namespace], Any] = args.func
        result = func(args)
        if asyncio.iscoroutine(result):
            result = run_async(result)
        return int(result or 0)
    except (ConfigError, SchemaTooNew) as exc:
        print(f"engine: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"engine: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
