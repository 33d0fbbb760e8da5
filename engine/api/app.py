"""The REST application: assemble the routers, translate errors, serve OpenAPI at ``/openapi.json``.

The handlers live in one module per resource (:mod:`engine.api.messages`,
:mod:`~engine.api.templates`, :mod:`~engine.api.suppressions`, :mod:`~engine.api.tracking`,
:mod:`~engine.api.health`); this module only wires them up, turns every error into JSON
``{"error": ..., "field": ...}`` with the right status, and adds the body-size limit
around the whole app (:func:`wrap`).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import __version__
from engine.accept import IdempotencyConflict
from engine.api import audit, consent, events, health, messages, metrics, suppressions, templates, tracking, webhooks
from engine.api.deps import HttpContext
from engine.api.responses import RETRY_AFTER_SECONDS, ApiError, error_response
from engine.config import Settings
from engine.dashboard import routes as dashboard
from engine.errors import DatabaseUnavailable, NotFound, ValidationFailed
from engine.events import catalog
from engine.submit.models import UNSTORABLE, ErrorOut

log = structlog.get_logger(__name__)


STREAMED_PATHS = frozenset({"/v1/consent/import", "/v1/suppressions/import"})
"""Bulk imports read their body line by line (each line limited, never the whole body in memory):
millions of lines are their purpose, so the body limit does not apply to them."""


class BodyLimit:
    """Refuse request bodies over the limit with 413, whether announced or streamed."""

    def __init__(self, app: ASGIApp, limit: int, exempt: frozenset[str] = frozenset()) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = JSONResponse(
            {"error": f"request body is larger than {self.limit} bytes", "field": None}, status_code=413
        )
        await body({"type": "http"}, _empty_receive, send)


class _TooLarge(Exception):
    pass


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}


def wrap(app: FastAPI, settings: Settings) -> ASGIApp:
    """The ASGI stack actually served: body limit outermost."""
    return BodyLimit(app, settings.http.max_body_size, exempt=STREAMED_PATHS)


# ---- errors: every one becomes {"error", "field"} with its status

_BRANCH_NOISE = frozenset({"string_type", "model_type", "dict_type", "model_attributes_type"})


def _loc_to_field(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p not in ("body",)]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            # Union branches show up as type names in the location; they are noise for users.
            if p in ("str", "Mailbox", "constrained-str") or str(p).startswith("function-"):
                continue
            out += ("." if out else "") + str(p)
    return out.replace("from_", "from")


def _error_field(error: Any) -> str:
    """The field an error names; a :func:`~engine.submit.models.storable` error adds its path inside it."""
    field = _loc_to_field(tuple(error.get("loc", ())))
    if error.get("type") == UNSTORABLE:
        path = str((error.get("ctx") or {}).get("path", ""))
        if path:
            field += path if path.startswith("[") or not field else f".{path}"
    return field


async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    # For "address or object" unions pydantic reports every branch; the wrong-type branch is noise.
    specific = [e for e in errors if e.get("type") not in _BRANCH_NOISE]
    errors = specific or errors
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "request body is not valid JSON", None)
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = _error_field(first)
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    details = [
        {"field": _error_field(e), "error": str(e.get("msg", "")).removeprefix("Value error, ")}
        for e in errors[:50]
    ]
    return error_response(422, f"{field or 'body'}: {msg}", field or None, details=details)


async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status, headers=exc.headers)


async def on_validation_failed(_: Request, exc: ValidationFailed) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.field)


async def on_idempotency_conflict(_: Request, exc: IdempotencyConflict) -> JSONResponse:
    return error_response(409, str(exc), "Idempotency-Key")


async def on_not_found(_: Request, exc: NotFound) -> JSONResponse:
    return error_response(404, str(exc))


_HTTP_MESSAGES = {400: "request body is not valid JSON", 404: "no such resource", 405: "method not allowed"}


_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _allowed_methods(app: FastAPI, path: str) -> set[str]:
    """Every method the OpenAPI document lists for ``path`` (empty when it documents no such path).

    Starlette's 405 names only the methods of the first route whose path matched
    (``GET /u/{token}`` hides ``POST /u/{token}``); ``Allow`` must list them all, and the
    document is what clients read.
    """
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        table = [
            (re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"),
             {m.upper() for m in item if m in _METHODS})
            for template, item in app.openapi().get("paths", {}).items()
        ]
        app.state.allow_table = table
    matched = [(regex, methods) for regex, methods in table if regex.match(path)]
    # A literal path (/v1/messages/batch) is its own resource, not an id of /v1/messages/{message_id}.
    exact = [methods for regex, methods in matched if "[^/]+" not in regex.pattern]
    return set().union(*exact) if exact else {m for _, methods in matched for m in methods}


async def on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Framework errors (unknown path, wrong method, unparsable body) in the API's one error shape."""
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allowed = _allowed_methods(request.app, request.url.path)
        if allowed:
            headers["Allow"] = ", ".join(sorted(allowed))
    message = _HTTP_MESSAGES.get(exc.status_code) if isinstance(exc.detail, str) and exc.detail.startswith(
        ("There was an error", "Not Found", "Method Not Allowed")) else None
    body = {"error": message or str(exc.detail), "field": "body" if exc.status_code == 400 else None}
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


async def on_database_unavailable(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
    log.warning("database_unavailable", error=str(exc))
    return JSONResponse(
        {"error": "the database is unavailable; nothing was accepted, retry later", "field": None},
        status_code=503,
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


# ---- the app

def create_app(ctx: HttpContext) -> FastAPI:
    """The FastAPI app over ``ctx`` (kept on ``app.state`` for :func:`engine.api.deps.get_ctx`).

    Optional routers are mounted only when their part of the context is there.
    """
    app = FastAPI(
        title="engine",
        version=__version__,
        description="Self-hosted email sending engine: submit mail, follow its delivery.",
        # /docs is served below from assets in the package (FastAPI's default loads them from a CDN and renders
        # blank offline); ReDoc has no local copy, so it is off.
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.exception_handler(RequestValidationError)(on_validation_error)
    app.exception_handler(StarletteHTTPException)(on_http_exception)
    app.exception_handler(ApiError)(on_api_error)
    app.exception_handler(ValidationFailed)(on_validation_failed)
    app.exception_handler(IdempotencyConflict)(on_idempotency_conflict)
    app.exception_handler(NotFound)(on_not_found)
    app.exception_handler(DatabaseUnavailable)(on_database_unavailable)

    # 401/403 only where an API key is required: the tracking routes are public (the signed token
    # is the credential) and declare their own responses; /healthz needs no key either.
    keyed: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 429: {"model": ErrorOut}, 503: {"model": ErrorOut},
    }
    app.include_router(messages.router, responses=keyed)
    if ctx.templates is not None and ctx.renderer is not None:
        app.include_router(templates.router, responses=keyed)
    if ctx.acceptor.suppressions is not None:
        app.include_router(suppressions.router, responses=keyed)
    if ctx.tracking is not None:
        app.include_router(tracking.router)
    if ctx.events is not None:
        app.include_router(events.router, responses=keyed)
    if ctx.consent is not None:
        app.include_router(consent.router, responses=keyed)
    if ctx.webhooks is not None:
        app.include_router(webhooks.router, responses={**keyed, 404: {"model": ErrorOut}})
    if ctx.audit is not None:
        app.include_router(audit.router, responses=keyed)
    app.include_router(health.router, responses={503: {"description": "The database is unreachable"}})
    if ctx.settings.metrics.enabled:
        app.include_router(metrics.router)
    app.mount(STATIC_PATH, StaticFiles(packages=[("engine.dashboard", "static")]), name="static")
    app.get("/docs", include_in_schema=False)(docs)
    if ctx.settings.dashboard.enabled:
        app.state.dashboard = dashboard.DashboardState(ctx.settings)
        app.include_router(dashboard.router)
    app.openapi = partial(openapi, app)  # type: ignore[method-assign]
    return app


STATIC_PATH = "/dashboard/static"
"""Assets shipped in the package (engine/dashboard/static): the dashboard's and Swagger UI's."""


async def docs() -> HTMLResponse:
    """Swagger UI over ``/openapi.json``, every asset from this engine (no request leaves the host)."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json", title="engine API",
        swagger_js_url=f"{STATIC_PATH}/swagger/swagger-ui-bundle.js",
        swagger_css_url=f"{STATIC_PATH}/swagger/swagger-ui.css",
        swagger_favicon_url=f"{STATIC_PATH}/swagger/favicon-32x32.png",
        # validatorUrl: Swagger UI would otherwise load a badge from validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request models the handlers parse themselves (see messages.parse_json)
    and the webhook payloads (``webhooks``, one JSON Schema per event type: engine.events.catalog).

    :func:`_tell_the_truth` then adds what every operation answers but FastAPI cannot see
    (tests/test_openapi_conformance.py checks the result against the running server)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (*messages.SELF_PARSED_MODELS, *consent.SELF_PARSED_MODELS):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(js.pop("$defs", {}))
            components[model.__name__] = js
        components.setdefault("ErrorOut", ErrorOut.model_json_schema(ref_template="#/components/schemas/{model}"))
        # What the engine POSTs to webhook endpoints: one entry per event type (OpenAPI 3.1).
        event_components, hooks = catalog.openapi_parts()
        components.update(event_components)
        schema["webhooks"] = hooks
        _tell_the_truth(schema, sorted(app.state.ctx.settings.queue.streams))
        app.openapi_schema = schema
    return app.openapi_schema


_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}


def _tell_the_truth(schema: dict[str, Any], streams: list[str]) -> None:
    """Responses every handler of a kind gives, and the streams this engine knows.

    * a JSON request body that does not parse is a 400 (FastAPI's and :func:`messages.parse_json`'s);
    * an operation with a path parameter answers 404 for an id, name or address it does not know;
    * an operation with parameters or a body answers 422 naming the field it refuses;
    * ``format=ndjson`` streams ``application/x-ndjson``;
    * ``stream`` (submission) and ``scope`` (suppressions) take only configured stream names.
    """
    for item in schema.get("paths", {}).values():
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            if "tracking" in op.get("tags", []):
                continue  # public routes: they declare exactly what they answer (engine.api.tracking)
            responses = op.setdefault("responses", {})
            params = op.get("parameters", [])
            body = op.get("requestBody", {}).get("content", {})
            if "application/json" in body:
                responses.setdefault("400", {"description": "The request body is not valid JSON", "content": _ERROR})
            if any(p.get("in") == "path" for p in params):
                responses.setdefault("404", {"description": "Not found", "content": _ERROR})
            if params or body:
                responses.setdefault("422", {"description": "A field is refused (named in `field`)", "content": _ERROR})
            fmt = next((p for p in params if p.get("name") == "format" and p.get("in") == "query"), None)
            if fmt is not None and "ndjson" in str(fmt.get("schema", {}).get("pattern", "")):
                responses.get("200", {}).setdefault("content", {})["application/x-ndjson"] = {
                    "schema": {"type": "string", "description": "One JSON object per line"},
                }
    components = schema.get("components", {}).get("schemas", {})
    if "MessageIn" in components:
        components["MessageIn"]["properties"]["stream"] = {
            "anyOf": [{"enum": streams}, {"type": "null"}],
            "description": "A configured stream; omitted: [queue] default_stream.",
        }
    if "SuppressionIn" in components:
        components["SuppressionIn"]["properties"]["scope"] = {
            "enum": ["*", *streams], "default": "*", "description": "A configured stream, or '*' (default) for every stream.",
        }
