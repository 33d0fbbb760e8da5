"""``/v1/messages``: submit one message or a batch (send scope), read a message's state (read scope).

Handlers are thin: authenticate, let pydantic validate, hand over to
:class:`engine.accept.Acceptor`, translate errors. The request bodies are parsed
here from bytes (:func:`parse_json`) rather than declared as FastAPI body
parameters, which is why the OpenAPI document adds their schemas by hand
(:data:`SELF_PARSED_MODELS`, used by :mod:`engine.api.app`).
"""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from engine.api.deps import HttpContext, context, get_ctx, require_read, require_send
from engine.api.responses import ApiError
from engine.apikeys import ApiKey
from engine.submit.models import AcceptedOut, BatchIn, BatchOut, ErrorOut, MessageIn, MessageStatus

ModelT = TypeVar("ModelT", bound=BaseModel)

# Request models parsed by parse_json, not by FastAPI: their schemas go into the OpenAPI document by hand.
SELF_PARSED_MODELS: tuple[type[BaseModel], ...] = (MessageIn, BatchIn)

router = APIRouter()


async def parse_json(request: Request, model: type[ModelT]) -> tuple[ModelT, bytes]:
    """Validate the body straight from bytes with pydantic-core's JSON parser.

    Declaring the model as a FastAPI body parameter costs json.loads plus a Python-level
    validation pass; parsing bytes in one step was about a fifth of batch submission.
    Errors go through the same handler (400 for bad JSON, 422 naming the field).
    """
    body = await request.body()
    try:
        literals = context(request).settings.routing.allow_address_literals
        return model.model_validate_json(body, context={"allow_address_literals": literals}), body
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


def _replay_header(replayed: bool) -> dict[str, str] | None:
    return {"Idempotent-Replayed": "true"} if replayed else None


_SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut}, 409: {"model": ErrorOut}, 413: {"model": ErrorOut}, 422: {"model": ErrorOut},
}


@router.post(
    "/v1/messages",
    status_code=202,
    response_model=AcceptedOut,
    responses=_SUBMIT_ERRORS,
    summary="Submit one message",
    openapi_extra=_json_request_body(MessageIn),
)
async def submit_message(
    request: Request,
    key: ApiKey = Depends(require_send),
    idempotency_key: str | None = Header(default=None, alias="Idempotency-Key"),
) -> Response:
    ctx = context(request)
    message, body = await parse_json(request, MessageIn)
    result = await ctx.acceptor.accept_http(key, [message], batch=False, idempotency_key=idempotency_key, request_body=body)
    return Response(result.body, status_code=result.status, headers=_replay_header(result.replayed),
                    media_type="application/json")


@router.post(
    "/v1/messages/batch",
    status_code=202,
    response_model=BatchOut,
    responses=_SUBMIT_ERRORS,
    summary="Submit up to [http] max_batch messages in one call (all or nothing)",
    openapi_extra=_json_request_body(BatchIn),
)
async def submit_batch(
    request: Request,
    key: ApiKey = Depends(require_send),
    idempotency_key: str | None = Header(default=None, alias="Idempotency-Key"),
) -> Response:
    ctx = context(request)
    batch, body = await parse_json(request, BatchIn)
    limit = ctx.settings.http.max_batch
    if len(batch.messages) > limit:
        raise ApiError(422, f"too many messages in one batch: {len(batch.messages)} > {limit}", "messages")
    result = await ctx.acceptor.accept_http(
        key, batch.messages, batch=True, idempotency_key=idempotency_key, request_body=body
    )
    return Response(result.body, status_code=result.status, headers=_replay_header(result.replayed),
                    media_type="application/json")


@router.get("/v1/messages/{message_id}", response_model=MessageStatus, summary="Per-recipient state of a message")
async def get_message(
    message_id: str, key: ApiKey = Depends(require_read), ctx: HttpContext = Depends(get_ctx)
) -> dict[str, Any]:
    try:
        mid = uuid.UUID(message_id)
    except ValueError:
        raise ApiError(404, f"no message with id {message_id!r}", "message_id") from None
    found = await ctx.outbox.get_message(mid)
    if found is None:
        raise ApiError(404, f"no message with id {message_id!r}", "message_id")
    msg, rcpts = found
    history: dict[int, list[dict[str, Any]]] = {}
    for a in await ctx.outbox.attempts(mid):
        entry = dict(a)
        history.setdefault(entry.pop("recipient_id"), []).append(entry)
    return {
        "id": str(msg["id"]),
        "created_at": msg["created_at"],
        "source": msg["source"],
        "mail_from": msg["mail_from"],
        "stream": msg["stream"],
        "metadata": msg["metadata"],
        "send_at": msg["send_at"],
        "raw_size": msg["raw_size"],
        "recipients": [
            {
                "id": r["id"],
                "email": r["address"],
                "kind": r["kind"],
                "state": r["state"],
                "attempts": r["attempts"],
                "next_attempt_at": r["next_attempt_at"] if r["state"] in ("queued", "deferred") else None,
                "last_code": r["last_code"],
                "last_status": r["last_status"],
                "last_reply": r["last_reply"],
                "updated_at": r["updated_at"],
                "history": history.get(r["id"], []),
            }
            for r in rcpts
        ],
    }
