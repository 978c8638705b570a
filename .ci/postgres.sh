# A throwaway PostgreSQL cluster on 127.0.0.1 for the tests. Source it:
#
#   source .ci/postgres.sh && pg_start   # exports VCN_TEST_POSTGRES_URL
#   ...
#   pg_stop                              # stops it and removes its files
#
# Uses Debian's postgresql package (/usr/lib/postgresql/*/bin). initdb
# refuses to run as root, so as root the cluster runs as user postgres.

pg_bin() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$d" ] && command -v pg_ctl >/dev/null; then d=$(dirname "$(command -v pg_ctl)"); fi
    [ -n "$d" ] || { echo "PostgreSQL server binaries not found (apt-get install postgresql)" >&2; return 1; }
    echo "$d"
}

pg_as() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_free_port() {
    local p
    for p in $(seq 25432 25532); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
    done
    return 1
}

pg_start() {
    local bin
    bin=$(pg_bin) || return 1
    PG_TMP=$(mktemp -d /tmp/vcn-pg.XXXXXX)
    [ "$(id -u)" = 0 ] && chown postgres: "$PG_TMP"
    PG_PORT=$(pg_free_port) || { echo "no free port for PostgreSQL" >&2; return 1; }
    pg_as "$bin/initdb" -D "$PG_TMP/data" -U postgres -A trust --no-sync >"$PG_TMP/initdb.log" 2>&1 \
        || { cat "$PG_TMP/initdb.log" >&2; return 1; }
    pg_as "$bin/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_TMP -c max_connections=300" start >/dev/null \
        || { cat "$PG_TMP/server.log" >&2; return 1; }
    export PG_TMP PG_PORT
    export VCN_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
    export VCN_TEST_PG_BIN="$bin"
    echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT ($PG_TMP)"
}

pg_stop() {
    [ -n "${PG_TMP:-}" ] || return 0
    local bin
    bin=$(pg_bin) || return 0
    pg_as "$bin/pg_ctl" -D "$PG_TMP/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_TMP"
    unset PG_TMP
}
