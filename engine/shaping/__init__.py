"""Traffic shaping: how fast, over how many connections, the engine talks to each destination.

A stage of its own between the scheduler and the SMTP client: the shaping file's
rules (:mod:`.rules`), the admission gate a worker asks before each transaction
(:mod:`.gate`), the limits shared through Postgres (:mod:`.throttle`,
:mod:`.warmup`) and the automation that adjusts them (:mod:`.automation`).
"""
