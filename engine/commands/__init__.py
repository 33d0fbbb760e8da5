"""The ``engine`` command line, one module per command group.

Each module exposes ``register(subparsers)``; ``engine/cli.py`` lists them in
order. Commands work over :mod:`engine.runtime` and the domain modules; no
domain module imports argparse or anything in this package.
"""

from __future__ import annotations

import argparse
from typing import TypeAlias

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What ``register`` receives: the top-level parser's subcommand collection."""
