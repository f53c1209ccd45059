#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 (Debian's postgresql package) for the feedback-store tests.
# Prints `export STACKRLHF_TEST_POSTGRES_URL=...` and the command that stops it, so: eval "$(bash .ci/postgres.sh)"
set -euo pipefail
# A free loopback port unless one is given (a server left by an earlier run may hold any fixed one).
PORT="${STACKRLHF_TEST_POSTGRES_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
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
if ! as_owner "'$BIN/pg_ctl' -D '$DIR/data' -l '$DIR/server.log' -w -o \"-h 127.0.0.1 -p $PORT -k $DIR -c fsync=off -c max_connections=200\" start" >/dev/null; then
  echo "PostgreSQL did not start on 127.0.0.1:$PORT; its log:" >&2
  cat "$DIR/server.log" >&2
  exit 1
fi
echo "export STACKRLHF_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
echo "stop_test_postgres() { $([ "$(id -u)" = 0 ] && echo "su postgres -s /bin/sh -c \"'$BIN/pg_ctl' -D '$DIR/data' -m fast stop\"" || echo "'$BIN/pg_ctl' -D '$DIR/data' -m fast stop") >/dev/null; }"
