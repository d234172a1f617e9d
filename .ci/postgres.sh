#!/usr/bin/env bash
# Start a PostgreSQL server on loopback for the multi-worker tests, installing it with apt if needed.
# Idempotent. Prints the URL to use as PYRAMIDINFER_TEST_PG on its last line.
set -euo pipefail
PORT=${PYRAMIDINFER_PG_PORT:-54329}
URL="postgresql://optuna:optuna@127.0.0.1:${PORT}/optuna"
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then echo "postgres.sh: PostgreSQL is not installed and this is not root" >&2; exit 1; fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
BIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")
DATA=${PYRAMIDINFER_PG_DATA:-/tmp/pyramidinfer-pg}
RUNAS=()
if [ "$(id -u)" = 0 ]; then RUNAS=(runuser -u postgres --); fi
if [ ! -f "$DATA/PG_VERSION" ]; then
  mkdir -p "$DATA"
  [ "$(id -u)" = 0 ] && chown postgres "$DATA"
  "${RUNAS[@]}" "$BIN/initdb" -D "$DATA" -A trust -U postgres >/dev/null
fi
if ! "${RUNAS[@]}" "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  "${RUNAS[@]}" "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k /tmp -c max_connections=200" start >/dev/null
fi
PSQL=("${RUNAS[@]}" "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qtA)
"${PSQL[@]}" -c "select 1 from pg_roles where rolname='optuna'" | grep -q 1 \
  || "${PSQL[@]}" -c "create role optuna login password 'optuna'"
"${PSQL[@]}" -c "select 1 from pg_database where datname='optuna'" | grep -q 1 \
  || "${PSQL[@]}" -c "create database optuna owner optuna"
echo "$URL"
