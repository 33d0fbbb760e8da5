"""The command line sits on top of the house: nothing below it imports upwards.

Only ``engine/cli.py``, ``engine/runtime.py`` and ``engine/commands/`` may import
argparse or the CLI layer (``engine.cli``, ``engine.runtime``, ``engine.commands``).
Imports are read with :mod:`ast`, so one inside a function counts as much as one
at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"
FORBIDDEN = ("argparse", "engine.cli", "engine.runtime", "engine.commands")
ALLOWED = {
    "cli.py",
    "runtime.py",
    "__main__.py",  # ``python -m engine``: the command line's own entry point
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ENGINE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports, relative imports resolved against ``module``."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # ``from engine import cli`` imports engine.cli.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def forbidden_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    return sorted(
        name
        for name in imported_modules(source, module, is_package)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    )


def test_checker_sees_every_form_of_import() -> None:
    source = (
        "import argparse\n"
        "def f():\n    from engine.runtime import database\n"
        "from engine import cli\n"
        "from ..commands import dns\n"
        "from engine.compose import render\n"
    )
    assert forbidden_imports(source, "engine.deliver.routing") == [
        "argparse", "engine.cli", "engine.commands", "engine.commands.dns", "engine.runtime", "engine.runtime.database",
    ]


def test_only_the_command_line_imports_argparse_or_the_cli_layer() -> None:
    offenders: dict[str, list[str]] = {}
    checked = 0
    for path in sorted(ENGINE.rglob("*.py")):
        rel = path.relative_to(ENGINE).as_posix()
        if rel in ALLOWED or rel.startswith("commands/"):
            continue
        checked += 1
        bad = forbidden_imports(path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py")
        if bad:
            offenders[rel] = bad
    assert checked > 20
    assert offenders == {}, f"domain modules importing the command line layer: {offenders}"
