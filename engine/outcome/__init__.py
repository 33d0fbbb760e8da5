"""The outcome stage: what a delivery attempt or an inbound report means, applied in batches.

``writer`` turns the delivery loop's attempts into final outcomes, deferrals, attempt rows,
events, DSNs and reputation counters (one transaction per flush); ``inbound`` receives
bounces and complaints after the fact and ``feedback`` applies them; ``reputation`` keeps
the rolling counters the shaping automation reads. Classification itself is pure and lives
in :mod:`engine.feedback`.
"""
