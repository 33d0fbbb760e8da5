"""The published JSON Schemas of the public event types, and their place in the OpenAPI document.

Each public type (``email.delivered`` ...) has one JSON Schema (draft 2020-12) per version,
shipped as package data under ``engine/events/schemas/<type>.v<N>.json`` so that the engine,
its OpenAPI document and a consumer reading the repository all see the same contract.
Within a version new fields may appear (every ``data`` allows unknown properties); a changed
field makes a new version. The files are the source: this module only reads them.

The OpenAPI document (``/openapi.json``) carries them under ``components/schemas`` and
describes each delivery as an OpenAPI 3.1 ``webhooks`` entry (:func:`openapi_parts`), so a
client generator sees the webhook payloads next to the REST API.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib import resources
from typing import Any

from engine.events.public import PUBLIC_TYPES, SCHEMA_VERSION

VERSION = SCHEMA_VERSION
"""The version of the payloads the engine writes today (``<type>.v<VERSION>.json``)."""
BASE_URI = "https://engine.dev/schemas/events/"
"""Prefix of every schema's ``$id``."""
BATCH = "email.batch"
"""The ``webhooks`` entry of a batched endpoint's request (an array of events)."""

_SIGNATURE_HEADERS: tuple[tuple[str, str], ...] = (
    ("webhook-id", "The event id (evt_<n>) of an unbatched request, or batch_<hex> for a batch. The same on every "
                   "retry and replay of the same content: deduplicate on it (or on each event's id)."),
    ("webhook-timestamp", "When this request was signed, in unix seconds. Refuse requests more than a few minutes "
                          "old or ahead (replay protection)."),
    ("webhook-signature", "Standard Webhooks signature: v1,<base64 of HMAC-SHA256 over \"<webhook-id>.<webhook-"
                          "timestamp>.<body>\">, keyed with the base64-decoded part of the endpoint's whsec_ secret. "
                          "During a secret rotation two signatures are sent, separated by a space; accept the request "
                          "when any one matches."),
)
_RESPONSES: dict[str, Any] = {
    "2XX": {"description": "Received. Any 2xx counts as delivered; the body is ignored."},
    "410": {"description": "Gone: the endpoint is disabled (with the reason recorded) and receives nothing more."},
    "429": {"description": "Too many requests (likewise 503): retried later, honouring Retry-After."},
    "default": {"description": "Anything else (including a redirect, which is not followed, or no answer within the "
                               "timeout) is a failure: retried on the [webhooks] retry_schedule, then kept as a dead "
                               "letter that can be replayed."},
}


def public_types() -> list[str]:
    """Every public event type, in the engine's order."""
    return list(PUBLIC_TYPES.values())


def file_name(public_type: str, version: int = VERSION) -> str:
    """``email.delivered`` -> ``email.delivered.v1.json``."""
    return f"{public_type}.v{version}.json"


def schema_id(public_type: str, version: int = VERSION) -> str:
    """The ``$id`` of a type's schema."""
    return BASE_URI + file_name(public_type, version)


def component_name(public_type: str) -> str:
    """``email.delivered`` -> ``EmailDeliveredEvent``, its name under the OpenAPI ``components/schemas``."""
    return "".join(part.capitalize() for part in public_type.split(".")) + "Event"


@cache
def _load(public_type: str, version: int) -> dict[str, Any]:
    if public_type not in PUBLIC_TYPES.values():
        raise KeyError(f"unknown event type {public_type!r}; known: {', '.join(public_types())}")
    path = resources.files("engine.events").joinpath("schemas", file_name(public_type, version))
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def schema(public_type: str, version: int = VERSION) -> dict[str, Any]:
    """The JSON Schema of one public type (a copy: the caller may change it)."""
    return copy.deepcopy(_load(public_type, version))


def all_schemas(version: int = VERSION) -> dict[str, dict[str, Any]]:
    """Public type -> its JSON Schema, for every public type."""
    return {t: schema(t, version) for t in public_types()}


def openapi_parts() -> tuple[dict[str, Any], dict[str, Any]]:
    """(component schemas, ``webhooks`` section) for an OpenAPI 3.1 document.

    Components drop ``$schema`` and ``$id``: inside an OpenAPI document the dialect is the
    document's own, and an ``$id`` would give the component a base URI of its own (the
    published ``$id`` stays in the files and in :func:`schema`).
    """
    components: dict[str, Any] = {}
    webhooks: dict[str, Any] = {}
    headers = [
        {"name": name, "in": "header", "required": True, "schema": {"type": "string"}, "description": text}
        for name, text in _SIGNATURE_HEADERS
    ]
    refs: dict[str, str] = {}
    for public_type, js in all_schemas().items():
        js.pop("$schema", None)
        js.pop("$id", None)
        name = component_name(public_type)
        components[name] = js
        refs[public_type] = f"#/components/schemas/{name}"
        webhooks[public_type] = {
            "post": {
                "summary": js.get("title", public_type),
                "description": f"{js.get('description', '')} Sent to every enabled endpoint subscribed to "
                               f"{public_type} (and to its stream), one event per request unless the endpoint "
                               f"batches (see {BATCH}). Schema: {schema_id(public_type)}",
                "operationId": "webhook_" + public_type.replace(".", "_"),
                "tags": ["webhook events"],
                "parameters": copy.deepcopy(headers),
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": refs[public_type]}}}},
                "responses": copy.deepcopy(_RESPONSES),
            }
        }
    webhooks[BATCH] = {
        "post": {
            "summary": "A batch of events (endpoints created with batch.max_events > 1)",
            "description": "A JSON array of events of any subscribed types, each exactly as in its own entry, in the "
                           "order they happened per recipient. The webhook-id names the batch; deduplicate on each "
                           "event's id.",
            "operationId": "webhook_email_batch",
            "tags": ["webhook events"],
            "parameters": copy.deepcopy(headers),
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "oneOf": [{"$ref": ref} for ref in refs.values()],
                        "discriminator": {"propertyName": "type", "mapping": dict(refs)},
                    },
                }}},
            },
            "responses": copy.deepcopy(_RESPONSES),
        }
    }
    return components, webhooks
