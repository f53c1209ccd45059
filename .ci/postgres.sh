#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 (Debian's postgresql package) for the feedback-store tests.
# Prints `export STACKRLHF_TEST_POSTGRES_URL=...`, so: eval "$(bash .ci/postgres.sh)"
set -euo pipefail
PORT="${STACKRLHF_TEST_POSTGRES_PORT:-55432}"
BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
if [ -z "$BIN" ]; then
  echo "PostgreSQL is not installed: apt-get install postgresql" >&2
  exit 1
fi
DIR="$(mktemp -d /tmp/stackrlhf-pg.XXXXXX)"
as_owner() {  # the server refuses to run as root: use the package's postgres user then
  if [ "$(id -u)" = 0 ]; then chown -R postgres: "$DIR"; su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}
as_owner "'$BIN/initdb' -D '$DIR/data' -A trust -U postgres --no-sync" >/dev/null
as_owner "'$BIN/pg_ctl' -D '$DIR/data' -l '$DIR/server.log' -w -o \"-h 127.0.0.1 -p $PORT -k $DIR -c fsync=off -c max_connections=200\" start" >/dev/null
echo "export STACKRLHF_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
