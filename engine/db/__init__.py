"""Database access: connection pool (embedded or external Postgres), named queries, migrations."""
