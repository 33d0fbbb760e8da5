"""Analytics export: the event stream to object storage as Hive-partitioned Parquet (or NDJSON.gz).

``config`` ([export]), ``columns`` (the typed schema per event type and the one SQL read),
``destinations`` (local directory, S3-compatible store: atomic whole-file writes),
``exporter`` (the only writer of ``export_state`` and ``export_batches``: cursor, batches, leases).
"""
