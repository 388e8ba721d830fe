#!/usr/bin/env bash
# CI STAND-IN for the official postgres image's entrypoint (see Dockerfile next to this file).
# Supported: POSTGRES_USER (default postgres), POSTGRES_PASSWORD (required), POSTGRES_DB (default
# POSTGRES_USER), their *_FILE variants, PGDATA; first start initialises PGDATA, later starts
# reuse it. Password authentication (scram-sha-256) for every TCP client, trust on the socket.
set -Eeuo pipefail

# file_env VAR [DEFAULT]: VAR from the environment or from the file named by VAR_FILE.
file_env() {
  local var=$1 def=${2:-} fvar="${1}_FILE" val
  if [[ -n ${!var:-} && -n ${!fvar:-} ]]; then
    echo "error: both $var and $fvar are set (but are exclusive)" >&2
    exit 1
  fi
  val=$def
  if [[ -n ${!var:-} ]]; then
    val=${!var}
  elif [[ -n ${!fvar:-} ]]; then
    val=$(<"${!fvar}")
  fi
  export "$var=$val"
  unset "$fvar"
}

if [[ ${1:-} == postgres ]]; then
  file_env POSTGRES_PASSWORD
  file_env POSTGRES_USER postgres
  file_env POSTGRES_DB "$POSTGRES_USER"

  if [[ $(id -u) == 0 ]]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 0700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
  fi

  if [[ ! -s $PGDATA/PG_VERSION ]]; then
    if [[ -z $POSTGRES_PASSWORD ]]; then
      echo "error: database is uninitialized and POSTGRES_PASSWORD is not set" >&2
      exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust \
      --auth-host=scram-sha-256 --encoding=UTF8 -D "$PGDATA" >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    if [[ $POSTGRES_DB != postgres ]]; then
      printf 'CREATE DATABASE "%s";\n' "${POSTGRES_DB//\"/\"\"}" |
        postgres --single -j -D "$PGDATA" postgres >/dev/null
    fi
    echo "stand-in: initialised $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
  fi
  unset POSTGRES_PASSWORD
fi

exec "$@"
