"""Erasure of a contact: the only writer of ``do_not_mail``; every other table through its owner.

``DELETE /v1/contacts/{address}`` (and ``engine consent erase``) remove the address from the
queue (recipient rows, attempts, and message bodies nobody else still needs), the event log,
the webhook outbox, suppressions, consent and its history, and stored idempotent answers, in
one transaction. What remains is a salted hash in ``do_not_mail`` (the salt lives in the
database, made at migration) so the address is refused at accept forever, and a
``contact_erased`` event that carries only the hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from engine.accept import erase_idempotency
from engine.consent import store as consent_store
from engine.db.pool import acquire
from engine.db.queries import q
from engine.events.store import Event, erase_events, record_events
from engine.outbox import erase_address
from engine.suppression import erase as erase_suppressions
from engine.suppression import normalize_address
from engine.webhooks.deliveries import erase_deliveries


@dataclass(frozen=True, slots=True)
class ErasureReport:
    address_hash: str
    recipients: int
    messages_blanked: int
    events: int
    suppressions: int
    consent_rows: int
    idempotency_keys: int


async def erase_contact(pool: asyncpg.Pool, address: str, actor: str) -> ErasureReport:
    key = normalize_address(address)
    async with acquire(pool) as conn, conn.transaction():
        queue = await erase_address(conn, key)
        event_ids = await erase_events(conn, key, queue.recipient_ids, queue.message_ids)
        await erase_deliveries(conn, event_ids)
        suppressions = await erase_suppressions(conn, key)
        consent_rows = await consent_store.erase(conn, key)
        idem = await erase_idempotency(conn, key)
        await conn.fetch(*q("do_not_mail_add", address=key))
        digest = await conn.fetchrow(*q("do_not_mail_hash", address=key))
        assert digest is not None  # the salt row is made by the migration
        report = ErasureReport(
            address_hash=digest["hash"], recipients=len(queue.recipient_ids), messages_blanked=queue.blanked,
            events=len(event_ids), suppressions=suppressions, consent_rows=consent_rows, idempotency_keys=idem,
        )
        await record_events(conn, [Event("contact_erased", data={
            "address_hash": report.address_hash, "actor": actor[:200], "recipients": report.recipients,
            "events": report.events, "messages_blanked": report.messages_blanked,
        })])
    return report


async def is_erased(pool: asyncpg.Pool, address: str) -> bool:
    async with acquire(pool) as conn:
        row = await conn.fetchrow(*q("do_not_mail_hash", address=normalize_address(address)))
    return bool(row and row["listed"])
