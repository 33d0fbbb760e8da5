"""The consent rule each stream's mail must pass, as data the outbox's statements take.

Pure (no database): built once from ``[consent]`` and handed to the outbox, which applies it
inside its enqueue statement (at accept) and its claim statement (when a worker takes the
row), so a revocation that arrives after accept still stops mail already queued. A recipient
stopped by consent becomes ``suppressed`` with reason ``consent:<purpose>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.consent.config import ConsentConfig


@dataclass(frozen=True, slots=True)
class ConsentPolicy:
    rules: dict[str, tuple[str, str]]
    """stream -> (purpose, rule) for streams whose rule is not 'none'."""
    purposes: dict[str, str]
    """stream -> purpose for every mapped stream (also rule 'none': unsubscribes revoke it)."""
    require_reconfirm: bool
    role_accounts: frozenset[str]
    role_purposes: frozenset[str]
    all_purposes: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: ConsentConfig) -> ConsentPolicy:
        return cls(
            rules={s: (r.purpose, r.rule) for s, r in cfg.streams.items() if r.rule != "none"},
            purposes={s: r.purpose for s, r in cfg.streams.items()},
            require_reconfirm=cfg.legacy == "require_reconfirm",
            role_accounts=frozenset(cfg.role_accounts),
            role_purposes=frozenset(cfg.role_account_purposes),
            all_purposes=cfg.all_purposes,
        )

    def rule(self, stream: str) -> tuple[str | None, str | None]:
        """(purpose, rule) of a stream's check, or (None, None) when its mail is not checked."""
        r = self.rules.get(stream)
        return (r[0], r[1]) if r is not None else (None, None)

    def enforced(self, stream: str) -> bool:
        return stream in self.rules

    def role_barred(self, address: str, stream: str) -> str | None:
        """``consent:<purpose>`` when ``address`` is a role account barred from this stream's purpose."""
        purpose = self.purposes.get(stream)
        if purpose is None or purpose not in self.role_purposes:
            return None
        local = address.rpartition("@")[0].lower()
        return f"role_account:{purpose}" if local in self.role_accounts else None

    def streams_of(self, purpose: str) -> list[str]:
        """Streams whose mail a change of ``purpose`` consent can stop."""
        return sorted(s for s, (p, _) in self.rules.items() if p == purpose)

    def blocks(self, purpose: str, status: str, legacy: bool) -> list[str]:
        """Streams whose rule the consent state (status, legacy) fails: their queued mail must stop."""
        out = []
        for stream, (p, rule) in self.rules.items():
            if p != purpose:
                continue
            if rule == "granted" and (status != "granted" or (legacy and self.require_reconfirm)):
                out.append(stream)
            elif rule == "not_revoked" and status == "revoked":
                out.append(stream)
        return sorted(out)

    def sql_rules(self) -> tuple[list[str], list[str], list[str]]:
        """The rules as three parallel arrays (stream, purpose, rule) for the claim statement."""
        items = sorted(self.rules.items())
        return [s for s, _ in items], [p for _, (p, _) in items], [r for _, (_, r) in items]
