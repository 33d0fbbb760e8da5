"""``/v1/consent``, ``/v1/contacts`` and the bulk sync imports.

The CRM is the system of record for consent: it pushes changes one at a time
(``POST /v1/consent``) or in bulk (``POST /v1/consent/import``, NDJSON, gzip allowed,
streamed, idempotent), and reads them back page by page (``GET /v1/consent``, or the whole
set as NDJSON). ``GET /v1/contacts/{address}`` shows one address: consent per purpose,
suppressions and history; ``DELETE`` erases it. Writing consent needs the ``consent`` scope
(or admin), reading ``read``, erasing and suppression imports ``admin``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import orjson
import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from engine.api import ndjson
from engine.api.deps import Audit, ConsentDeps, get_audit, get_consent, require_admin, require_read, require_scope_consent
from engine.api.responses import ApiError
from engine.apikeys import ApiKey
from engine.consent.erasure import erase_contact, is_erased
from engine.consent.imports import BATCH, empty_totals, parse_document, parse_record
from engine.consent.models import ConsentIn, ConsentRecord, field_of
from engine.consent.store import apply_changes, check_purpose
from engine.errors import ValidationFailed
from engine.suppression import configured_scope, normalize_address

log = structlog.get_logger(__name__)

router = APIRouter(tags=["consent"])


def encode_after(*parts: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(parts))).decode().rstrip("=")


def decode_after(text: str, n: int) -> tuple[str, ...]:
    try:
        parts = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError):
        raise ValidationFailed("not a cursor this engine issued (use 'next' from a previous page)", field="after") from None
    if not isinstance(parts, list) or len(parts) != n or not all(isinstance(p, str) for p in parts):
        raise ValidationFailed("not a cursor this engine issued (use 'next' from a previous page)", field="after")
    return tuple(parts)


def _json(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


# Parsed by post_consent itself (one object or a list): its schema goes into the OpenAPI document by hand.
SELF_PARSED_MODELS: tuple[type[BaseModel], ...] = (ConsentIn,)
_CONSENT_REF = {"$ref": "#/components/schemas/ConsentIn"}


@router.post(
    "/v1/consent", summary="Record consent changes (one object or a list of up to 1000)",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "anyOf": [_CONSENT_REF, {"type": "array", "items": _CONSENT_REF, "minItems": 1, "maxItems": 1000}],
    }}}}},
)
async def post_consent(
    request: Request, key: ApiKey = Depends(require_scope_consent), c: ConsentDeps = Depends(get_consent),
    audit: Audit = Depends(get_audit),
) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise ApiError(400, "request body is not valid JSON", field="body") from None
    items = body if isinstance(body, list) else [body]
    if not 1 <= len(items) <= 1000:
        raise ValidationFailed("send 1 to 1000 records (use /v1/consent/import for more)", field="body")
    changes = []
    for i, item in enumerate(items):
        prefix = f"[{i}]." if isinstance(body, list) else ""
        try:
            change = ConsentIn.model_validate(item)
        except ValidationError as exc:
            where, msg = field_of(exc.errors())
            raise ValidationFailed(f"{prefix}{where}: {msg}", field=f"{prefix}{where}") from None
        check_purpose(c.store.policy, change.purpose, f"{prefix}purpose")
        changes.append(change)
    addresses = sorted({ch.address for ch in changes})
    before = None
    if len(changes) == 1:  # one change by hand: what it replaced
        current = [r for r in await c.store.current(changes[0].address) if r["purpose"] == changes[0].purpose]
        before = {"purpose": changes[0].purpose, "status": current[0]["status"] if current else None}
    async with audit.transaction() as conn:  # the change and its audit row commit together
        applied = await apply_changes(conn, changes, f"api:{key.name}", c.store.policy)
        await audit(
            "consent.change", None if len(addresses) == 1 else f"{len(addresses)} addresses",
            address=addresses[0] if len(addresses) == 1 else None, before=before,
            after={
                "records": len(changes), "purposes": sorted({ch.purpose for ch in changes}),
                "statuses": sorted({ch.status for ch in changes}), "outcomes": applied.counts,
                "pending_stopped": applied.stopped,
            },
            conn=conn,
        )
    return {
        "results": [{"address": ch.address, "purpose": ch.purpose, "outcome": o} for ch, o in zip(changes, applied.outcomes)],
        "pending_stopped": applied.stopped,
    }


IN_FLIGHT = 2
"""Batches applied at once (each on its own connection) when their keys are disjoint: Postgres's
side of a batch (the writes and their indexes) costs more than the engine's, and two backends
use both cores while the engine parses the next batch."""


async def _import(
    request: Request, parse: Callable[[dict[str, Any]], Any], apply: Callable[[list[Any]], Coroutine[Any, Any, dict[str, int]]],
    max_errors: int, totals: dict[str, int], keys: Callable[[list[Any]], frozenset[str]] | None = None,
) -> dict[str, Any]:
    """Stream NDJSON lines, validate each whole, apply in batches; per-line errors, never a half line.

    Batches are applied while the next one is read and validated: the engine's parsing and
    Postgres's writing overlap instead of taking turns. With ``keys`` (what a batch touches,
    e.g. its addresses) up to :data:`IN_FLIGHT` batches run at once, but only batches with no
    key in common: one that shares a key with a running batch waits for it, so every address
    still sees its lines applied in file order. Without ``keys``, one batch at a time.
    """
    errors: list[dict[str, Any]] = []
    batch: list[Any] = []
    running: list[tuple[asyncio.Task[dict[str, int]], frozenset[str]]] = []

    async def settle_oldest() -> None:
        task, _ = running.pop(0)
        for k, v in (await task).items():
            totals[k] = totals.get(k, 0) + v

    async def flush() -> None:
        nonlocal batch
        if not batch:
            return
        touched = keys(batch) if keys is not None else frozenset()
        while running and (keys is None or len(running) >= IN_FLIGHT
                           or any(not touched.isdisjoint(other) for _, other in running)):
            await settle_oldest()
        running.append((asyncio.create_task(apply(batch)), touched))
        batch = []

    try:
        async for chunk in ndjson.lines(request):
            for n, line in chunk:
                totals["lines"] += 1
                try:
                    if line == ndjson.TOO_LONG:
                        raise ValidationFailed(f"line longer than {ndjson.MAX_LINE} bytes", field="line")
                    batch.append(parse(parse_document(line)))
                except ValidationFailed as exc:
                    totals["invalid"] += 1
                    if len(errors) < max_errors:
                        errors.append({"line": n, "field": exc.field, "error": exc.message})
                    continue
                if len(batch) >= BATCH:
                    await flush()
        await flush()
        while running:
            await settle_oldest()
    finally:
        # The client went away or a batch failed: do not leave a write behind.
        for task, _ in running:
            task.cancel()
        if running:
            await asyncio.wait([task for task, _ in running])
            for task, _ in running:
                if not task.cancelled():
                    task.exception()  # retrieved: the error that matters is the one already raised
    return {**totals, "errors": errors, "errors_truncated": totals["invalid"] > len(errors)}


def _addresses(batch: list[ConsentRecord | ConsentIn]) -> frozenset[str]:
    """What a consent batch touches: its addresses (consent rows, and the queued mail a revocation stops)."""
    return frozenset([c.address for c in batch])


def _consent_line(c: ConsentDeps) -> Callable[[Any], ConsentRecord | ConsentIn]:
    policy = c.store.policy

    def parse(doc: Any) -> ConsentRecord | ConsentIn:
        return parse_record(doc, policy)

    return parse


@router.post("/v1/consent/import", summary="Bulk consent sync: NDJSON (gzip allowed), streamed, idempotent")
async def import_consent(
    request: Request, key: ApiKey = Depends(require_scope_consent), c: ConsentDeps = Depends(get_consent),
    audit: Audit = Depends(get_audit),
) -> dict[str, Any]:
    actor = f"import:{key.name}"

    async def apply(batch: list[Any]) -> dict[str, int]:
        applied = await c.store.record(batch, actor)
        return {**applied.counts, "pending_stopped": applied.stopped}

    result = await _import(request, _consent_line(c), apply, c.max_errors, empty_totals(), keys=_addresses)
    totals = {k: v for k, v in result.items() if k != "errors"}
    log.info("consent_imported", **totals)
    await audit("consent.import", None, after=totals)
    return result


@router.post("/v1/suppressions/import", summary="Bulk suppression sync: NDJSON {address, scope, reason} (gzip allowed)")
async def import_suppressions(
    request: Request, key: ApiKey = Depends(require_admin), c: ConsentDeps = Depends(get_consent),
    audit: Audit = Depends(get_audit),
) -> dict[str, Any]:
    streams = c.streams

    def parse(doc: Any) -> tuple[str, str, str, str]:
        unknown = set(doc) - {"address", "scope", "reason"}
        if unknown:
            raise ValidationFailed("unknown field", field=sorted(unknown)[0])
        address = doc.get("address")
        if not isinstance(address, str) or len(address) > 320:
            raise ValidationFailed("address must be a string of at most 320 characters", field="address")
        scope = doc.get("scope", "*")
        reason = doc.get("reason", "import")
        if not isinstance(scope, str):
            raise ValidationFailed("scope must be a string", field="scope")
        if not isinstance(reason, str) or not 1 <= len(reason) <= 200 or any(ord(ch) < 32 for ch in reason):
            raise ValidationFailed("reason must be 1-200 printable characters", field="reason")
        return normalize_address(address), configured_scope(scope, streams), reason, f"import:{key.name}"[:200]

    async def apply(batch: list[Any]) -> dict[str, int]:
        new, moved = await c.suppressions.add_batch(batch)
        return {"new": new, "pending_stopped": moved}

    result = await _import(request, parse, apply, c.max_errors, {"lines": 0, "invalid": 0, "new": 0, "pending_stopped": 0})
    await audit("suppression.import", None, after={k: v for k, v in result.items() if k != "errors"})
    return result


@router.get("/v1/consent", summary="Current consent records, by cursor (or all as NDJSON with format=ndjson)")
async def list_consent(
    after: str | None = Query(default=None, max_length=2000),
    purpose: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=1000, ge=1, le=10000),
    format: str = Query(default="json", pattern="^(json|ndjson)$"),
    key: ApiKey = Depends(require_read), c: ConsentDeps = Depends(get_consent),
) -> Any:
    if purpose is not None:
        check_purpose(c.store.policy, purpose)
    start = decode_after(after, 2) if after else None
    if format == "ndjson":
        async def stream() -> AsyncIterator[bytes]:
            pos = start
            while True:
                rows = await c.store.page(pos, 5000, purpose)  # type: ignore[arg-type]
                if not rows:
                    return
                yield b"".join(orjson.dumps(_json(r)) + b"\n" for r in rows)
                pos = (rows[-1]["address"], rows[-1]["purpose"])
        return StreamingResponse(stream(), media_type="application/x-ndjson")
    rows = await c.store.page(start, limit, purpose)  # type: ignore[arg-type]
    nxt = encode_after(rows[-1]["address"], rows[-1]["purpose"]) if len(rows) == limit else None
    return {"records": [_json(r) for r in rows], "next": nxt}


@router.get("/v1/contacts/{address}", summary="One address: consent per purpose, suppressions, history")
async def get_contact(address: str, key: ApiKey = Depends(require_read), c: ConsentDeps = Depends(get_consent)) -> dict[str, Any]:
    if len(address) > 320:
        raise ValidationFailed("address is longer than 320 characters", field="address")
    addr = normalize_address(address)
    consent = await c.store.current(addr)
    history = await c.store.history(addr)
    suppressions = await c.suppressions.list(addr, 1000)
    return {
        "address": addr,
        "erased": await is_erased(c.store.pool, addr),
        "consent": {r["purpose"]: _json({k: v for k, v in r.items() if k not in ("address", "purpose")}) for r in consent},
        "suppressions": [
            {"scope": s.scope, "reason": s.reason, "source": s.source, "created_at": s.created_at.isoformat()} for s in suppressions
        ],
        "history": [_json(h) for h in history],
    }


@router.delete("/v1/contacts/{address}", summary="Erase an address everywhere; it is never mailed again")
async def delete_contact(
    address: str, key: ApiKey = Depends(require_admin), c: ConsentDeps = Depends(get_consent),
    audit: Audit = Depends(get_audit),
) -> dict[str, Any]:
    if len(address) > 320:
        raise ValidationFailed("address is longer than 320 characters", field="address")
    report = await erase_contact(c.store.pool, address, f"api:{key.name}")
    # Never the address itself: the audit log outlives the erasure. The hash finds the row again.
    await audit("contact.erase", f"sha256:{report.address_hash}", after={
        "recipients": report.recipients, "messages_blanked": report.messages_blanked, "events": report.events,
        "suppressions": report.suppressions, "consent_rows": report.consent_rows,
        "idempotency_keys": report.idempotency_keys,
    })
    log.info("contact_erased", address_hash=report.address_hash, recipients=report.recipients, events=report.events)
    return {
        "erased": True, "address_hash": report.address_hash, "recipients": report.recipients,
        "messages_blanked": report.messages_blanked, "events": report.events, "suppressions": report.suppressions,
        "consent_rows": report.consent_rows, "idempotency_keys": report.idempotency_keys,
    }
