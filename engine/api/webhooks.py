"""``/v1/webhooks``: endpoints that receive signed events (admin scope).

Create with one call (``{"url": ...}``: all types, all streams, unbatched); the answer
carries the secret, once. ``GET`` of one endpoint includes its backlog, dead letters and
lag; ``/deliveries`` lists what was sent (``?state=failed`` for dead letters);
``/replay`` sends again by event id, time range or dead letters, under the original ids.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Response

from engine.api.deps import Audit, WebhookDeps, get_audit, get_webhooks, require_admin
from engine.api.models import (
    WebhookCreated,
    WebhookDeliveryList,
    WebhookIn,
    WebhookList,
    WebhookOut,
    WebhookPatch,
    WebhookReplayIn,
    WebhookReplayOut,
)
from engine.apikeys import ApiKey
from engine.audit import replay_view, webhook_view
from engine.errors import ValidationFailed
from engine.events.public import event_id, parse_event_id
from engine.webhooks.endpoints import UNSET, Endpoint

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.post("", status_code=201, response_model=WebhookCreated, summary="Create an endpoint (the secret is shown once)")
async def create_webhook(
    body: WebhookIn, key: ApiKey = Depends(require_admin), wh: WebhookDeps = Depends(get_webhooks),
    audit: Audit = Depends(get_audit),
) -> dict[str, Any]:
    batch = body.batch
    ep, secret = await wh.endpoints.create(
        body.url, events=body.events, streams=body.streams, description=body.description, enabled=body.enabled,
        batch_max=batch.max_events if batch else 1, batch_wait=(batch.max_wait_ms if batch else 1000) / 1000.0,
    )
    await audit("webhook.create", str(ep.id), after=webhook_view(ep.as_json()))
    if wh.wake is not None:
        wh.wake()
    return {**ep.as_json(), "secret": secret}


@router.get("", response_model=WebhookList, summary="Every endpoint (without secrets)")
async def list_webhooks(key: ApiKey = Depends(require_admin), wh: WebhookDeps = Depends(get_webhooks)) -> dict[str, Any]:
    return {"webhooks": [ep.as_json() for ep in await wh.endpoints.list()]}


@router.get("/{endpoint_id}", response_model=WebhookOut, summary="One endpoint, with its backlog, dead letters and lag")
async def get_webhook(
    endpoint_id: uuid.UUID, key: ApiKey = Depends(require_admin), wh: WebhookDeps = Depends(get_webhooks),
) -> dict[str, Any]:
    ep = await wh.endpoints.get(endpoint_id)
    status = await wh.deliveries.status(datetime.now(UTC), endpoint_id)
    return {**ep.as_json(), "status": _status_json(status[0]) if status else None}


def _status_json(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "pending": s["pending"], "retrying": s["retrying"], "dead_letters": s["failed"],
        "oldest_pending_seconds": s["oldest_pending_seconds"], "delivered_last_hour": s["delivered_recent"],
        "lag_p50_seconds": s["lag_p50_seconds"], "lag_p95_seconds": s["lag_p95_seconds"],
        "last_delivered_at": s["last_delivered_at"].isoformat() if s["last_delivered_at"] else None,
    }


@router.patch("/{endpoint_id}", response_model=WebhookOut, summary="Change an endpoint (only the fields given)")
async def patch_webhook(
    endpoint_id: uuid.UUID, body: WebhookPatch, key: ApiKey = Depends(require_admin), wh: WebhookDeps = Depends(get_webhooks),
    audit: Audit = Depends(get_audit),
) -> dict[str, Any]:
    given = body.model_fields_set
    for name in ("url", "enabled", "description"):
        if name in given and getattr(body, name) is None:
            raise ValidationFailed(f"{name} cannot be null", field=name)
    before = await wh.endpoints.get(endpoint_id)
    ep = await wh.endpoints.update(
        endpoint_id,
        url=body.url if body.url is not None else UNSET,
        events=body.events if "events" in given else UNSET,
        streams=body.streams if "streams" in given else UNSET,
        description=body.description if body.description is not None else UNSET,
        enabled=body.enabled if body.enabled is not None else UNSET,
        batch_max=body.batch.max_events if body.batch is not None else UNSET,
        batch_wait=body.batch.max_wait_ms / 1000.0 if body.batch is not None else UNSET,
    )
    await audit("webhook.update", str(ep.id), before=webhook_view(before.as_json()), after=webhook_view(ep.as_json()))
    if wh.wake is not None:
        wh.wake()
    return ep.as_json()


@router.delete("/{endpoint_id}", status_code=204, summary="Delete an endpoint and its deliveries")
async def delete_webhook(
    endpoint_id: uuid.UUID, key: ApiKey = Depends(require_admin), wh: WebhookDeps = Depends(get_webhooks),
    audit: Audit = Depends(get_audit),
) -> Response:
    before: Endpoint = await wh.endpoints.get(endpoint_id)
    await wh.endpoints.delete(endpoint_id)
    await audit("webhook.delete", str(endpoint_id), before=webhook_view(before.as_json()))
    return Response(status_code=204)


@router.post("/{endpoint_id}/rotate-secret", response_model=WebhookCreated, summary="A new secret; the old one also signs for a while")
async def rotate_secret(
    endpoint_id: uuid.UUID, key: ApiKey = Depends(require_admin), wh: WebhookDeps = Depends(get_webhooks),
    audit: Audit = Depends(get_audit),
) -> dict[str, Any]:
    ep, secret = await wh.endpoints.rotate(endpoint_id)
    await audit("webhook.rotate", str(ep.id), after={"secret_rotation_ends_at": ep.rotating_until})
    if wh.wake is not None:
        wh.wake()
    return {**ep.as_json(), "secret": secret}


@router.get("/{endpoint_id}/deliveries", response_model=WebhookDeliveryList, summary="Deliveries, newest first")
async def list_deliveries(
    endpoint_id: uuid.UUID,
    state: str | None = Query(default=None, description="pending, sending, delivered or failed (dead letters)."),
    before: int | None = Query(default=None, ge=1, le=2**63 - 1),
    limit: int = Query(default=100, ge=1, le=1000),
    key: ApiKey = Depends(require_admin), wh: WebhookDeps = Depends(get_webhooks),
) -> dict[str, Any]:
    await wh.endpoints.get(endpoint_id)  # 404 for an unknown endpoint
    rows = await wh.deliveries.list(endpoint_id, state=state, before=before, limit=limit)
    out = []
    for r in rows:
        d = dict(r)
        d["event_id"] = event_id(d["event_id"])
        if d["state"] in ("delivered", "failed"):
            d["next_attempt_at"] = None
        out.append(d)
    return {"deliveries": out, "next_before": rows[-1]["id"] if len(rows) == limit else None}


@router.post("/{endpoint_id}/replay", response_model=WebhookReplayOut, status_code=202,
             summary="Send again: by event id, time range, or dead letters (same webhook-id)")
async def replay(
    endpoint_id: uuid.UUID, body: WebhookReplayIn, key: ApiKey = Depends(require_admin), wh: WebhookDeps = Depends(get_webhooks),
    audit: Audit = Depends(get_audit),
) -> dict[str, Any]:
    await wh.endpoints.get(endpoint_id)
    ids = [parse_event_id(t) for t in body.event_ids] if body.event_ids is not None else None
    n = await wh.deliveries.replay(
        endpoint_id, datetime.now(UTC), dead_letters=body.dead_letters, event_ids=ids, since=body.since, until=body.until,
    )
    await audit("webhook.replay", str(endpoint_id), after=replay_view(body.dead_letters, body.event_ids, body.since, body.until, n))
    if wh.wake is not None:
        wh.wake()
    return {"queued": n}
