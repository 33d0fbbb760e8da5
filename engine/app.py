"""The engine process: explicit setup -> start -> stop, in the manner of aiohttp's web_runner.

One :class:`Engine` owns the database pool, the HTTP server, the SMTP
listeners and the background housekeeping tasks. Each resource is torn down
only if its startup succeeded. SIGTERM/SIGINT stop the listeners first (no new
work), let in-flight commits finish within ``[server] shutdown_timeout``, then
close the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg
import structlog
import uvicorn

from engine import metrics
from engine.accept import Acceptor
from engine.apikeys import ApiKeys
from engine.audit import Actor, AuditLog
from engine.compose.pipeline import engine_variables
from engine.compose.render import Renderer
from engine.compose.tracking import Keyring
from engine.config import Settings
from engine.consent.policy import ConsentPolicy
from engine.db import partitions
from engine.db.embedded import EmbeddedPostgres
from engine.db.migrate import migrate
from engine.db.pool import acquire, create_pool, resolve_dsn
from engine.errors import DatabaseUnavailable, EngineError
from engine.events.store import EventStore
from engine.intake import ListenerSockets, bind_listeners, inherited, intake_count, listen_socket, prepare_shared
from engine.outbox import Outbox
from engine.outcome.reputation import Reputation
from engine.retention.purge import Retention
from engine.shaping import automation
from engine.submit.server import SmtpListenerHandle
from engine.supervise import ChildSupervisor, cpu_budget, die_with_parent, report_ready, stop_when_orphaned
from engine.suppression import Suppressions
from engine.templates_db import DbTemplateStore
from engine.webhooks.deliveries import Deliveries
from engine.webhooks.endpoints import Endpoints

if TYPE_CHECKING:
    from engine.webhooks.dispatcher import Dispatcher

log = structlog.get_logger(__name__)

RETENTION = 8 * 86400.0  # rolling counters and ended shaping decisions
INTAKE_READY_TIMEOUT = 120.0  # engine run waits this long for its intake children before it reports started


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the engine owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True, slots=True)
class Services:
    """What :meth:`Engine.connect` made: the pool and, over it, the owner of each concern.

    One value, made whole or not at all, so code after ``connect`` never checks a field for None.
    """

    dsn: str
    pool: asyncpg.Pool
    outbox: Outbox
    apikeys: ApiKeys
    acceptor: Acceptor
    templates: DbTemplateStore
    renderer: Renderer
    suppressions: Suppressions
    events: EventStore
    keyring: Keyring | None
    webhooks: Endpoints
    webhook_deliveries: Deliveries
    audit: AuditLog


@dataclass
class Engine:
    settings: Settings
    dsn: str | None = None
    services: Services | None = None
    http_address: tuple[str, int] | None = None
    smtp_addresses: dict[str, tuple[str, int]] = field(default_factory=dict)
    inbound_address: tuple[str, int] | None = None
    inbound: SmtpListenerHandle | None = None  # the bounce/FBL listener when [feedback.inbound] is enabled
    _embedded: EmbeddedPostgres | None = None  # the embedded Postgres (pgserver) this process uses, if any
    _http: _QuietServer | None = None
    _http_task: asyncio.Task[None] | None = None
    _smtp: list[SmtpListenerHandle] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    dispatcher: Dispatcher | None = None  # the webhook dispatcher when [webhooks] enabled
    _roles: tuple[bool, bool] = (True, True)  # (intake, background) this process runs; see start()
    _dispatch_here: bool = True  # the webhook dispatcher runs in this process (see start())
    _side: set[asyncio.Task[None]] = field(default_factory=set)  # fire-and-forget NOTIFYs

    @property
    def svc(self) -> Services:
        """The connected services; an error before :meth:`connect` or after :meth:`stop`."""
        if self.services is None:
            raise EngineError("the engine is not connected to its database")
        return self.services

    # Shorthands used by the CLI, benchmarks and tests.
    @property
    def pool(self) -> asyncpg.Pool:
        return self.svc.pool

    @property
    def outbox(self) -> Outbox:
        return self.svc.outbox

    @property
    def acceptor(self) -> Acceptor:
        return self.svc.acceptor

    @property
    def apikeys(self) -> ApiKeys:
        return self.svc.apikeys

    @property
    def templates(self) -> DbTemplateStore:
        return self.svc.templates

    @property
    def suppressions(self) -> Suppressions:
        return self.svc.suppressions

    @property
    def events(self) -> EventStore:
        return self.svc.events

    @property
    def renderer(self) -> Renderer:
        return self.svc.renderer

    @property
    def keyring(self) -> Keyring | None:
        return self.svc.keyring

    async def resolve(self) -> str:
        """The database URL: configured, or that of the embedded Postgres, started here if need be."""
        if self.dsn is None:
            dsn, self._embedded = await asyncio.to_thread(resolve_dsn, self.settings)
            self.dsn = dsn
            return dsn
        return self.dsn

    async def connect(self, retry_for: float = 60.0) -> None:
        """Resolve the DSN (starting embedded Postgres if needed), open the pool, migrate."""
        dsn = await self.resolve()
        deadline = asyncio.get_running_loop().time() + retry_for
        delay = 0.2
        while True:
            try:
                pool = await create_pool(dsn, self.settings)
                break
            except DatabaseUnavailable as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                log.warning("database_not_ready", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        try:
            async with acquire(pool) as conn:
                applied = await migrate(conn)
            if applied:
                log.info("migrations_applied", versions=applied)
            outbox = Outbox(pool, self.settings.queue.max_age, consent=ConsentPolicy.from_config(self.settings.consent))
            # Uploaded templates mirrored in memory for the (synchronous) Renderer; suppressions at accept.
            templates = DbTemplateStore(pool)
            await templates.load()
        except BaseException:
            await pool.close()
            raise
        renderer = Renderer(self.settings.templates, store=templates, engine_variables=engine_variables(self.settings))
        suppressions = Suppressions(pool)
        self.services = Services(
            dsn=dsn,
            pool=pool,
            outbox=outbox,
            apikeys=ApiKeys(pool, self.settings.api.key_cache_ttl, self.settings.api.auth_failures_per_minute),
            acceptor=Acceptor(self.settings, outbox, renderer=renderer, templates=templates, suppressions=suppressions),
            templates=templates,
            renderer=renderer,
            suppressions=suppressions,
            events=EventStore(pool),
            keyring=Keyring.from_config(self.settings.tracking) if self.settings.tracking.keys else None,
            webhooks=Endpoints(pool, self.settings),
            webhook_deliveries=Deliveries(pool, self.settings.webhooks.transactional_streams),
            audit=AuditLog(pool),
        )

    async def close_pool(self) -> None:
        """Close the database pool (one-shot commands and workers, which start nothing else)."""
        if self.services is not None:
            services, self.services = self.services, None
            await services.pool.close()

    async def start(
        self, *, sockets: ListenerSockets | None = None, intake: bool = True, background: bool = True,
        dispatch: bool = True,
    ) -> None:
        """Start listeners and housekeeping. Call after :meth:`connect`.

        ``intake``: serve the HTTP API and the SMTP listeners, on ``sockets`` when given
        (an ``engine intake`` child serving what its supervisor bound), else on sockets bound
        here. ``background``: housekeeping, retention, the webhook dispatcher, the exporter
        and the bounce/FBL listener (the supervisor's share when intake runs in children).
        ``dispatch``: the webhook dispatcher runs among the background tasks (``engine run``
        says false when a child process dispatches, ``[webhooks] own_process``).
        """
        svc = self.svc
        self._roles = (intake, background)
        self._dispatch_here = dispatch
        if intake:
            await self._start_intake(svc, sockets)
        if background:
            await self.start_inbound()
            self._start_background(svc)
        elif intake:  # an intake child renders templates: keep its mirror of uploaded ones fresh
            self._tasks.append(asyncio.create_task(svc.templates.run_refresh(self._stopping), name="templates-refresh"))
        log.info(
            "engine_started" if background else "intake_serving",
            http=self.http_address,
            smtp=self.smtp_addresses,
            database="embedded" if self._embedded else "external",
        )

    async def _start_intake(self, svc: Services, sockets: ListenerSockets | None) -> None:
        given = sockets.sockets if sockets is not None else {}
        if self.settings.http.enabled:
            await self._start_http(svc, given.get("http"))
        if self.settings.smtp.enabled and self.settings.smtp.listeners:
            from engine.submit.smtp import start_smtp_listeners

            self._smtp = await start_smtp_listeners(self.settings, svc.acceptor, svc.apikeys, sockets=given)
            self.smtp_addresses = {h.name: h.address for h in self._smtp}

    def _start_background(self, svc: Services) -> None:
        self._tasks.append(asyncio.create_task(self._housekeeping(svc), name="housekeeping"))
        self._tasks.append(asyncio.create_task(svc.templates.run_refresh(self._stopping), name="templates-refresh"))
        if self._embedded is not None:  # restarted if its postmaster dies
            self._tasks.append(asyncio.create_task(self._embedded.supervise(self._stopping), name="embedded-postgres"))
        if self.settings.retention.enabled:  # [retention]: old data purged in small batches by each table's owner
            export = self.settings.export
            purge = Retention(svc.pool, self.settings.retention, self._stopping, export.destination if export.enabled else None)
            for note in self.settings.retention.caveats(self.settings.tracking):
                log.info("retention_caveat", note=note)
            self._tasks.append(asyncio.create_task(purge.run(), name="retention"))
        if self.settings.webhooks.enabled and self._dispatch_here:
            self._tasks.append(asyncio.create_task(self._dispatch(svc), name="webhooks"))
        if self.settings.export.enabled:
            self._tasks.append(asyncio.create_task(self._export(svc), name="export"))

    async def start_inbound(self) -> None:
        """The bounce/FBL listener (``[feedback.inbound]``): low volume, part of the background share."""
        if self.settings.feedback.inbound.enabled:
            from engine.outcome.inbound import start_inbound

            self.inbound = await start_inbound(self.settings, self.svc.pool)
            self.inbound_address = self.inbound.address

    async def _start_http(self, svc: Services, sock: socket.socket | None = None) -> None:
        # Imported here: one-shot commands build an Engine too, and never need FastAPI.
        from engine.api.app import create_app, wrap
        from engine.api.deps import ConsentDeps, HttpContext, TrackingDeps, WebhookDeps
        from engine.compose.pipeline import Composer
        from engine.consent.store import ConsentStore

        tracking = TrackingDeps(
            pool=svc.pool,
            keyring=svc.keyring,
            # Only links() is used here (click redirects); it re-renders with the shared Renderer.
            composer=Composer(self.settings, renderer=svc.renderer, keyring=svc.keyring) if svc.keyring else None,
            events=svc.events,
            suppressions=svc.suppressions,
            templates=svc.templates,
            consent=svc.outbox.consent,
        )
        ctx = HttpContext(
            self.settings, svc.outbox, svc.apikeys, svc.acceptor,
            templates=svc.templates, renderer=svc.renderer, tracking=tracking, events=svc.events,
            webhooks=WebhookDeps(svc.webhooks, svc.webhook_deliveries, wake=self._wake_dispatcher),
            consent=ConsentDeps(
                ConsentStore(svc.pool, ConsentPolicy.from_config(self.settings.consent)), svc.suppressions,
                self.settings.queue.streams, self.settings.consent.max_import_errors,
            ),
            audit=svc.audit,
            listeners=self.listener_states, stopping=self._stopping.is_set,
        )
        app = wrap(create_app(ctx), self.settings)
        if sock is None:
            host, port = self.settings.http.listen
            sock = listen_socket(host, port, "the HTTP API")
        self.http_address = sock.getsockname()[:2]
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(self.settings.server.shutdown_timeout),
            server_header=False,
        )
        self._http = _QuietServer(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]), name="http")
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
            await asyncio.sleep(0.01)

    async def _housekeeping(self, svc: Services) -> None:
        """Reclaim leases of dead workers, expire idempotency keys, prune rolling counters, and
        keep the day partitions of events and attempts a week ahead (at start, then hourly).

        Survives DB outages. Counters and decisions only matter over their windows (24 h
        at most), so they are kept for ``RETENTION`` and then dropped, hourly: their tables
        stay as big as the traffic of a week, whatever the uptime.
        """
        reputation = Reputation(svc.pool)
        next_prune = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                n = await svc.outbox.reclaim_expired_leases()
                if n:
                    log.info("leases_reclaimed", count=n)
                async with acquire(svc.pool) as conn:
                    await Acceptor.expire_idempotency_keys(conn, self.settings.api.idempotency_ttl)
                    if loop.time() >= next_prune:
                        await automation.prune(conn, RETENTION)
                if loop.time() >= next_prune:
                    await reputation.prune(RETENTION)
                    async with acquire(svc.pool) as conn:  # events and attempts: today's and the week ahead's
                        created = await partitions.ensure(conn)
                    if created:
                        log.info("partitions_created", count=created)
                    next_prune = loop.time() + 3600
            except DatabaseUnavailable as exc:
                log.warning("housekeeping_database_unavailable", error=str(exc))
            except Exception:  # housekeeping must never die silently
                log.exception("housekeeping_failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=10)

    def listener_states(self) -> dict[str, bool]:
        """Each listener this process is configured to run -> whether it is up now (for ``/readyz``).

        ``http``, ``smtp:<name>`` per ``[[smtp.listeners]]`` and ``inbound`` (the bounce/FBL
        listener). The HTTP server starts first, so during start-up the SMTP listeners show down.
        An intake child answers for its own listeners only (the bounce listener is its supervisor's).
        """
        intake, background = self._roles
        states: dict[str, bool] = {}
        if intake and self.settings.http.enabled:
            states["http"] = self._http is not None and self._http.started and not self._http.should_exit
        if intake and self.settings.smtp.enabled:
            serving = {h.name for h in self._smtp if h.server.is_serving()}
            for listener in self.settings.smtp.listeners:
                states[f"smtp:{listener.name}"] = listener.name in serving
        if background and self.settings.feedback.inbound.enabled:
            states["inbound"] = self.inbound is not None and self.inbound.server.is_serving()
        return states

    def _wake_dispatcher(self) -> None:
        """After an API change to endpoints or deliveries: this process's dispatcher at once, else by NOTIFY."""
        if self.dispatcher is not None:
            self.dispatcher.wake()
        elif self.settings.webhooks.enabled and self.services is not None:
            task = asyncio.get_running_loop().create_task(self._notify_dispatchers(self.services))
            self._side.add(task)
            task.add_done_callback(self._side.discard)

    @staticmethod
    async def _notify_dispatchers(svc: Services) -> None:
        with contextlib.suppress(DatabaseUnavailable):  # the dispatchers' next poll finds it anyway
            await svc.webhook_deliveries.wake_dispatchers()

    async def _dispatch(self, svc: Services) -> None:
        """The webhook dispatcher, on a pool of its own: a backlog of events never takes delivery's connections."""
        from engine.webhooks.dispatcher import Dispatcher

        pool = await create_pool(svc.dsn, self.settings, min_size=1, max_size=4)
        try:
            self.dispatcher = Dispatcher(self.settings, pool, dsn=svc.dsn)
            await self.dispatcher.run()
        finally:
            await pool.close()

    async def _export(self, svc: Services) -> None:
        """The analytics exporter, on a pool of its own (a slow store never holds delivery's connections)."""
        from engine.export.exporter import Exporter

        pool = await create_pool(svc.dsn, self.settings, min_size=1, max_size=4)  # two per batch read, plus the cursor
        try:
            await Exporter(self.settings, pool).run(self._stopping)
        finally:
            await pool.close()

    async def stop(self) -> None:
        """Stop accepting, drain in-flight work, release resources (each only if started)."""
        self._stopping.set()
        if self.dispatcher is not None:
            self.dispatcher.request_stop()
        timeout = self.settings.server.shutdown_timeout
        for handle in self._smtp:
            with contextlib.suppress(Exception):
                await handle.close()
        self._smtp = []
        if self.inbound is not None:
            with contextlib.suppress(Exception):
                await self.inbound.close()
            self.inbound = None
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, timeout=timeout + 1)
            self._http = None
        dispatching = [t for t in self._tasks if t.get_name() == "webhooks"]
        if dispatching:  # the dispatcher finishes its requests in flight
            await asyncio.wait(dispatching, timeout=timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.services is not None:
            pool, self.services = self.services.pool, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), timeout=timeout)
        if self._embedded is not None:  # stops the server unless another live process uses it
            await asyncio.to_thread(self._embedded.stop)
        log.info("engine_stopped")

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    def request_stop(self) -> None:
        self._stopping.set()


@contextlib.asynccontextmanager
async def running(settings: Settings, dsn: str | None = None) -> AsyncIterator[Engine]:
    """An engine started for the duration of the block (used by ``engine run`` and tests)."""
    engine = Engine(settings, dsn=dsn)
    try:
        await engine.connect()
        await engine.start()
        yield engine
    finally:
        await engine.stop()


async def serve(settings: Settings, workers: int | None = None) -> None:
    """``engine run``: intake, background work and ``workers`` delivery child processes.

    With ``[server] intake_processes`` above one (the default on a multi-core host) the
    HTTP API and SMTP listeners are served by that many ``engine intake`` children on
    sockets bound here (:mod:`engine.intake`); this process keeps the background share
    (housekeeping, webhooks, export, retention, the bounce listener) and supervises.
    With one, it serves the listeners itself. Delivery children share the outbox through
    SKIP LOCKED leases; a child that dies is restarted (a worker's leases run out and its
    recipients are retried). SIGTERM is passed on and each child drains within
    ``[server] shutdown_timeout``.
    """
    loop = asyncio.get_running_loop()
    metrics.init(settings.home, fresh=True)  # before any child starts: they share its directory
    n = workers if workers is not None else settings.delivery.workers
    if n is None:
        n = cpu_budget()
    intake_n = intake_count(settings, n)
    sockets = await asyncio.to_thread(bind_listeners, settings) if intake_n > 1 else None
    engine = Engine(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):  # from the start: a stop during start-up is a clean stop
        loop.add_signal_handler(sig, engine.request_stop)
    children: list[ChildSupervisor] = []
    try:
        dsn = await engine.resolve()
        if sockets is not None:
            # The intake children start now: their imports and connections overlap ours.
            await asyncio.to_thread(prepare_shared, settings)
            if "http" in sockets.sockets:
                engine.http_address = sockets.address("http")
            engine.smtp_addresses = {k.removeprefix("smtp:"): sockets.address(k) for k in sockets.sockets if k != "http"}
            intake = ChildSupervisor(
                settings, dsn, intake_n, role="intake",
                env={"ENGINE_INTAKE_FDS": sockets.environment()}, pass_fds=sockets.fds(),
            )
            children.append(intake)
            await intake.start(with_ready_pipes=True)
        await engine.connect()
        if sockets is not None:  # "engine_started" means served: wait until the children accept
            await children[0].wait_ready(INTAKE_READY_TIMEOUT)
        dispatch_child = settings.webhooks.enabled and settings.webhooks.own_process
        await engine.start(intake=sockets is None, dispatch=not dispatch_child)
        loop.add_signal_handler(signal.SIGHUP, lambda: _spawn_reload(engine))
        if dispatch_child:  # its own event loop: intake and housekeeping never delay an event
            webhooks = ChildSupervisor(settings, dsn, 1, role="webhooks", command=("webhooks", "run"))
            children.append(webhooks)
            await webhooks.start()
        delivery = ChildSupervisor(settings, dsn, n, role="worker")
        children.append(delivery)
        await delivery.start()
        await engine.wait_stopped()
        log.info("shutdown_requested")
    finally:
        timeout = settings.server.shutdown_timeout + 5
        await asyncio.gather(*(c.stop(timeout) for c in children))
        await engine.stop()
        if sockets is not None:
            sockets.close()


_reload_tasks: set[asyncio.Task[None]] = set()


def _spawn_reload(engine: Engine) -> None:
    task = asyncio.get_running_loop().create_task(_reload(engine))
    _reload_tasks.add(task)
    task.add_done_callback(_reload_tasks.discard)


async def _reload(engine: Engine) -> None:
    """SIGHUP: validate the shaping file here, then tell every worker (on every host) to re-read it."""
    from engine.errors import ConfigError
    from engine.shaping.rules import ShapingError
    from engine.shaping.status import check_configured, notify_reload

    try:
        shaping = check_configured(engine.settings)
    except (ShapingError, ConfigError) as exc:
        log.error("shaping_reload_refused", error=str(exc))
        return
    if engine.pool is not None:
        try:
            await notify_reload(engine.pool, shaping.source)
            log.info("shaping_reload_sent", file=shaping.source)
            await engine.svc.audit.record(Actor.system("signal:SIGHUP"), "shaping.reload", shaping.source)
        except DatabaseUnavailable as exc:
            log.error("shaping_reload_not_sent", error=str(exc))


async def run_worker(settings: Settings) -> None:
    """``engine worker``: one delivery process (started by ``engine run``, or by hand on more hosts)."""
    from engine.deliver.scheduler import DeliveryWorker

    if settings.worker_slot is not None:
        die_with_parent()  # an orphaned worker drains and exits at once (see engine.supervise)
    loop = asyncio.get_running_loop()
    metrics.init(settings.home)
    engine = Engine(settings)
    await engine.connect()
    from engine.compose.pipeline import Composer

    # The renderer reads uploaded templates through the engine's DB-backed store.
    worker = DeliveryWorker(
        settings, engine.pool, dsn=engine.dsn, composer=Composer(settings, renderer=engine.renderer)
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    loop.add_signal_handler(signal.SIGHUP, worker.request_reload)
    orphan_watch = None
    if settings.worker_slot is not None:
        orphan_watch = asyncio.create_task(
            stop_when_orphaned(worker.request_stop, settings.parent_pid), name="orphan-watch"
        )
    try:
        await worker.run()
    finally:
        if orphan_watch is not None:
            orphan_watch.cancel()
        await engine.close_pool()


async def run_intake(settings: Settings) -> None:
    """``engine intake``: serve the listeners ``engine run`` passed down, until SIGTERM or it is gone."""
    die_with_parent()
    if not settings.intake_fds:
        raise EngineError("engine intake serves sockets that engine run passes down; start the engine with `engine run`")
    loop = asyncio.get_running_loop()
    metrics.init(settings.home)
    engine = Engine(settings)
    sockets = inherited(settings)
    await engine.connect()
    await engine.start(sockets=sockets, background=False)
    report_ready(settings.ready_fd)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, engine.request_stop)
    watch = asyncio.create_task(stop_when_orphaned(engine.request_stop, settings.parent_pid), name="orphan-watch")
    try:
        await engine.wait_stopped()
    finally:
        watch.cancel()
        await engine.stop()
        sockets.close()


async def run_dispatcher(settings: Settings) -> None:
    """``engine webhooks run``: a webhook dispatcher alone (more of them on more hosts share the work)."""
    from engine.webhooks.dispatcher import Dispatcher

    supervised = settings.parent_pid is not None  # a child of `engine run` ([webhooks] own_process)
    if supervised:
        die_with_parent()
    loop = asyncio.get_running_loop()
    metrics.init(settings.home)
    engine = Engine(settings)
    await engine.connect()
    dispatcher = Dispatcher(settings, engine.pool, dsn=engine.dsn)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, dispatcher.request_stop)
    log.info("webhook_dispatcher_started", owner=dispatcher.owner)
    watch = None
    if supervised:
        watch = asyncio.create_task(stop_when_orphaned(dispatcher.request_stop, settings.parent_pid), name="orphan-watch")
    try:
        await dispatcher.run()
    finally:
        if watch is not None:
            watch.cancel()
        await engine.close_pool()
        log.info("webhook_dispatcher_stopped", owner=dispatcher.owner)
