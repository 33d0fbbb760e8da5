"""``/v1/templates``: upload (admin scope), list and read (read scope) template versions.

An upload is configuration, so it needs ``admin``. It is validated exactly as
the renderer will use it (syntax, sandbox escapes, references, sizes) before
anything is stored; each upload becomes a new immutable version, so mail
already accepted with ``name@N`` renders the same forever.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from engine.api.deps import Audit, get_audit, get_renderer, get_template_store, require_admin, require_read
from engine.api.models import TemplateCreated, TemplateIn
from engine.apikeys import ApiKey
from engine.compose.render import PARTS, Renderer, TemplateError
from engine.errors import NotFound, ValidationFailed
from engine.templates_db import NAME_RE, DbTemplateStore, check_name

router = APIRouter(prefix="/v1/templates", tags=["templates"])


def _field(exc: TemplateError) -> str:
    return f"parts.{exc.part}" if exc.part else "parts"


def _file_templates(renderer: Renderer) -> list[str]:
    """Folders under ``templates/`` that are whole message templates (have a subject)."""
    root = Path(renderer.config.directory)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / PARTS["subject"]).is_file())


@router.post("", status_code=201, response_model=TemplateCreated, summary="Upload a new version of a template")
async def upload(
    body: TemplateIn,
    key: ApiKey = Depends(require_admin),
    store: DbTemplateStore = Depends(get_template_store),
    renderer: Renderer = Depends(get_renderer),
    audit: Audit = Depends(get_audit),
) -> JSONResponse:
    name = check_name(body.name)
    # Layouts this upload extends may have been uploaded through another process.
    await store.refresh()
    try:
        # Compiling a large template is CPU work: keep it off the event loop.
        await asyncio.to_thread(renderer.validate_template, name, body.parts)
    except TemplateError as exc:
        raise ValidationFailed(exc.message, _field(exc)) from None
    version, _ = await store.create(name, body.parts, key.id)
    await audit(
        "template.upload", f"{name}@{version}",
        before={"latest_version": version - 1} if version > 1 else None,
        after={"name": name, "version": version, "parts": {p: len(t) for p, t in sorted(body.parts.items())}},
    )
    required = sorted(await asyncio.to_thread(renderer.required_variables, f"{name}@{version}"))
    return JSONResponse({"name": name, "version": version, "required_variables": required}, status_code=201)


@router.get("", summary="Template names with their latest version")
async def list_templates(
    _: ApiKey = Depends(require_read),
    store: DbTemplateStore = Depends(get_template_store),
    renderer: Renderer = Depends(get_renderer),
) -> dict[str, Any]:
    rows = await store.list()
    uploaded = {r["name"] for r in rows}
    out: list[dict[str, Any]] = [
        {
            "name": r["name"],
            "source": "upload",
            "latest_version": r["latest_version"],
            "versions": r["versions"],
            "updated_at": r["updated_at"].isoformat(),
        }
        for r in rows
    ]
    # File templates, unless an upload of the same name shadows them.
    out += [
        {"name": n, "source": "file", "latest_version": None, "versions": 0, "updated_at": None}
        for n in _file_templates(renderer)
        if n not in uploaded
    ]
    out.sort(key=lambda t: t["name"])
    return {"templates": out}


@router.get("/{name}", summary="Versions of one template")
async def get_versions(
    name: str,
    _: ApiKey = Depends(require_read),
    store: DbTemplateStore = Depends(get_template_store),
    renderer: Renderer = Depends(get_renderer),
) -> dict[str, Any]:
    # A name that could never have been uploaded (NUL, too long, ...) is not looked up: 404.
    rows = await store.versions(name) if NAME_RE.match(name) else []
    if not rows:
        if name in _file_templates(renderer):
            return {"name": name, "source": "file", "versions": []}
        raise NotFound(f"no template named {name!r}")
    return {
        "name": name,
        "source": "upload",
        "versions": [
            {"version": r["version"], "created_at": r["created_at"].isoformat(), "created_by_key": r["created_by_key"]}
            for r in rows
        ],
    }


@router.get("/{name}/{version}", summary="The parts of one template version")
async def get_version(
    name: str,
    version: int,
    _: ApiKey = Depends(require_read),
    store: DbTemplateStore = Depends(get_template_store),
    renderer: Renderer = Depends(get_renderer),
) -> dict[str, Any]:
    row = await store.fetch(name, version) if NAME_RE.match(name) and 1 <= version < 2**31 else None
    if row is None:
        raise NotFound(f"no template {name}@{version}")
    required = sorted(await asyncio.to_thread(renderer.required_variables, f"{name}@{version}"))
    return {
        "name": name,
        "version": version,
        "parts": row["parts"],
        "created_at": row["created_at"].isoformat(),
        "created_by_key": row["created_by_key"],
        "required_variables": required,
    }
