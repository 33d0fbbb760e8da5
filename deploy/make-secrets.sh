#!/bin/sh
# Makes the secret files deploy/compose.yaml reads (once; existing files are kept).
#   postgres_password   random, for the Postgres superuser 'engine'
#   database_url        postgresql://engine:<that password>@postgres:5432/engine
#   engine_secret_key   a Fernet key: encrypts webhook endpoint secrets at rest, shared by every node
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
if [ ! -s secrets/postgres_password ]; then
    python3 -c 'import secrets; print(secrets.token_hex(24))' > secrets/postgres_password
fi
if [ ! -s secrets/database_url ]; then
    printf 'postgresql://engine:%s@postgres:5432/engine\n' "$(cat secrets/postgres_password)" > secrets/database_url
fi
if [ ! -s secrets/engine_secret_key ]; then
    python3 -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())' > secrets/engine_secret_key
fi
# The directory stays 0700 (umask above); the files must be readable inside the containers, which run
# as uid 10001 (engine) and 999 (postgres): compose bind-mounts each file as it is.
chmod 0644 secrets/postgres_password secrets/database_url secrets/engine_secret_key
echo "secrets in $(pwd)/secrets (keep them out of version control)"
