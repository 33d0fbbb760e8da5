"""``engine templates check|render``: validate and preview the file templates.

``check`` holds every folder to the rules an upload must pass (and lists the
variables it requires), so a broken template fails in CI rather than at send
time; ``render`` shows subject, text and HTML for given JSON variables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.commands import Subparsers
from engine.compose.render import PARTS, Renderer, TemplateConfig, TemplateError


def register(sub: Subparsers) -> None:
    """``engine templates check|render``."""
    grp = sub.add_parser("templates", help="check and preview file templates").add_subparsers(
        dest="templates_cmd", required=True
    )
    p = grp.add_parser("check", help="validate every template folder and list required variables")
    p.add_argument("--dir", help="templates folder (default: [templates] directory)")
    p.set_defaults(func=cmd_templates_check)
    p = grp.add_parser("render", help="render a template with JSON variables")
    p.add_argument("name", help="template name, e.g. welcome")
    p.add_argument("--vars", default="{}", help="JSON object, or @file.json")
    p.add_argument("--dir", help="templates folder (default: [templates] directory)")
    p.add_argument("--no-html", action="store_true", help="print only subject and text")
    p.set_defaults(func=cmd_templates_render)


def _cli_renderer(args: argparse.Namespace) -> Renderer:
    cfg = getattr(getattr(args, "settings", None), "templates", None)
    if not isinstance(cfg, TemplateConfig):
        cfg = TemplateConfig()
    if getattr(args, "dir", None):
        cfg = cfg.model_copy(update={"directory": Path(args.dir)})
    return Renderer(cfg)


def cmd_templates_check(args: argparse.Namespace) -> int:
    """Validate every file template (as an upload would be) and print its required variables."""
    r = _cli_renderer(args)
    root = Path(r.config.directory)
    failed = 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        parts = {p: (folder / f).read_text(encoding="utf-8") for p, f in PARTS.items() if (folder / f).is_file()}
        if "subject" not in parts:
            continue  # a layout, not a message template
        try:
            r.validate_template(folder.name, parts)
            print(f"ok    {folder.name}: {', '.join(sorted(r.required_variables(folder.name))) or '(no variables)'}")
        except TemplateError as exc:
            failed += 1
            print(f"FAIL  {exc}")
    return 1 if failed else 0


def cmd_templates_render(args: argparse.Namespace) -> int:
    """Render a file template with JSON variables, to eyeball subject, text and HTML."""
    raw = args.vars
    if raw.startswith("@"):
        raw = Path(raw[1:]).read_text(encoding="utf-8")
    try:
        variables = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"--vars is not valid JSON: {exc}") from None
    if not isinstance(variables, dict):
        raise TemplateError("--vars must be a JSON object")
    out = _cli_renderer(args).render(args.name, variables)
    print(f"Subject: {out.subject}\n\n--- text ---\n{out.text}")
    if out.html is not None and not args.no_html:
        print(f"--- html ---\n{out.html}")
    return 0
