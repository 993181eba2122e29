#!/usr/bin/env bash
# bench/run.sh — measure mirrordb against its targets and its peers, on this
# machine, in one run. Prints every figure, the ratios and the verdicts.
#
#   1. machine: nproc, CPU model, kernel, filesystem of the bench directory
#   2. build mirrordb (release)
#   3. fdatasync latency of the bench directory (mirrordb bench --fsync-probe)
#   4. mirrordb serve + mirrordb bench over HTTP: 32 clients, 256 B JSON values;
#      the server's peak RSS (VmHWM) during the load; then one client (latency)
#   5. the engine in-process (no HTTP), same clients and values
#   6. recovery replay: write REPLAY_ENTRIES with flushing held off, SIGKILL
#      the server, restart it, read the recovery report (entries/s)
#   7. PostgreSQL (Debian package; installed if missing): a throwaway cluster,
#      synchronous_commit=on, pgbench with an upsert script, same clients/values
#   8. SQLite (Python's sqlite3): WAL, synchronous=FULL, same threads/values
#   9. summary: figures, ratios, targets met or missed
#
# Usage: bench/run.sh            (from anywhere; needs root only to install
#                                 PostgreSQL and to run it as `postgres`)
# Environment (all optional):
#   DURATION=15        seconds of each load run
#   CLIENTS=32         concurrent clients / threads for every system
#   VALUE_BYTES=256    JSON value size
#   KEYS=100000        key space
#   REPLAY_ENTRIES=500000
#   CACHE_MIB=256      mirrordb cache budget (the RSS target is this + 64 MiB)
#   BENCH_DIR=/var/tmp parent of the scratch directory (put it on the disk
#                      you want to measure)
#   PORT=17070 PG_PORT=55432
#   SKIP_BUILD=1 SKIP_PG=1 SKIP_SQLITE=1 SKIP_REPLAY=1
#   MIRRORDB_BIN=path  use this binary instead of building
#   RESULTS_JSON=path  also write every figure as one JSON object there
#
# Everything it creates lives in one scratch directory that is removed on
# exit (also on failure or Ctrl-C); servers it started are stopped.

set -euo pipefail

DURATION=${DURATION:-15}
CLIENTS=${CLIENTS:-32}
VALUE_BYTES=${VALUE_BYTES:-256}
KEYS=${KEYS:-100000}
REPLAY_ENTRIES=${REPLAY_ENTRIES:-500000}
CACHE_MIB=${CACHE_MIB:-256}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
PORT=${PORT:-17070}
PG_PORT=${PG_PORT:-55432}
SEED=${SEED:-1}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d "$BENCH_DIR/mirrordb-bench.XXXXXX")
chmod 755 "$WORK"
SERVER_PID=""
RSS_PID=""
PG_DATA=""

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'bench/run.sh: %s\n' "$*" >&2; exit 1; }

cleanup() {
    set +e
    [[ -n "$RSS_PID" ]] && kill "$RSS_PID" 2>/dev/null
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null
    fi
    if [[ -n "$PG_DATA" && -f "$PG_DATA/postmaster.pid" ]]; then
        su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$PG_DATA' -m immediate stop" >/dev/null 2>&1
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# json FILE EXPR: evaluate a Python expression over the JSON object `j` in FILE.
json() { python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1"; }
# calc EXPR: floating-point arithmetic.
calc() { python3 -c "print($1)"; }

declare -A R   # every figure, for the summary and RESULTS_JSON

# ---------------------------------------------------------------- 1. machine
log "machine"
R[nproc]=$(nproc)
R[cpu]=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
R[kernel]=$(uname -r)
R[fs]=$(df -T "$WORK" | awk 'NR==2 {print $2" on "$1}')
R[mem_mib]=$(awk '/MemTotal/ {printf "%d", $2/1024}' /proc/meminfo)
R[os]=$(. /etc/os-release && echo "$PRETTY_NAME")
for k in nproc cpu kernel fs mem_mib os; do printf '%-8s %s\n' "$k" "${R[$k]}"; done

# ---------------------------------------------------------------- 2. build
if [[ -n "${MIRRORDB_BIN:-}" ]]; then
    BIN=$MIRRORDB_BIN
else
    TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
    BIN=$TARGET_DIR/release/mirrordb
    if [[ -z "${SKIP_BUILD:-}" ]]; then
        log "build (release)"
        (cd "$REPO" && cargo build --release -p mirrordb)
    fi
fi
[[ -x "$BIN" ]] || die "no mirrordb binary at $BIN (build it or set MIRRORDB_BIN)"
R[version]=$("$BIN" --version 2>/dev/null || echo "?")
R[commit]=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "?")

# ---------------------------------------------------------------- 3. fdatasync
log "fdatasync latency on $WORK (4 KiB write + fdatasync: appending, and over preallocated blocks)"
"$BIN" bench --fsync-probe --data-dir "$WORK/probe" --probe-count 2000 --json > "$WORK/fsync.json"
R[fsync_p50_us]=$(json "$WORK/fsync.json" 'j["latency"]["p50_us"]')
R[fsync_p99_us]=$(json "$WORK/fsync.json" 'j["latency"]["p99_us"]')
R[fsync_prealloc_p50_us]=$(json "$WORK/fsync.json" 'j["preallocated"]["p50_us"]')
R[fsync_prealloc_p99_us]=$(json "$WORK/fsync.json" 'j["preallocated"]["p99_us"]')
echo "fdatasync after an append: p50 ${R[fsync_p50_us]} us, p99 ${R[fsync_p99_us]} us"
echo "fdatasync over preallocated blocks: p50 ${R[fsync_prealloc_p50_us]} us, p99 ${R[fsync_prealloc_p99_us]} us"

# ---------------------------------------------------------------- helpers
# start_server NAME [FLUSH_INTERVAL DIRTY_MAX]: mirrordb serve on $WORK/NAME.
start_server() {
    local name=$1 flush=${2:-1s} dirty=${3:-64MiB}
    mkdir -p "$WORK/$name"
    cat > "$WORK/$name.toml" <<EOF
[node]
name = "bench"
data_dir = "$WORK/$name/data"
listen = "127.0.0.1:$PORT"

[cache]
flush_interval = "$flush"
dirty_bytes_max = "$dirty"
cache_bytes = "${CACHE_MIB}MiB"
EOF
    "$BIN" serve --config "$WORK/$name.toml" >> "$WORK/$name.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 600); do
        if curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/$name.log" >&2; die "mirrordb serve exited"; }
        sleep 0.1
    done
    cat "$WORK/$name.log" >&2
    die "mirrordb serve did not answer /health within 60 s"
}
stop_server() {
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
# lat FILE P: a write-latency figure (p50_us, p99_us, …) of a bench report.
lat() { json "$1" "j['kinds']['write']['latency']['$2']"; }

command -v curl >/dev/null || die "curl is needed (apt-get install -y curl)"

# ---------------------------------------------------------------- 4. HTTP
log "mirrordb HTTP: $CLIENTS clients, ${VALUE_BYTES} B values, ${DURATION} s"
start_server http
# Sample the server's resident memory while the load runs.
( peak=0; while sleep 0.5; do
      r=$(awk '/VmRSS/ {print $2}' "/proc/$SERVER_PID/status" 2>/dev/null) || break
      [[ -n "$r" && "$r" -gt "$peak" ]] && peak=$r && echo "$peak" > "$WORK/rss_peak_kib"
  done ) &
RSS_PID=$!
"$BIN" bench --url "http://127.0.0.1:$PORT" --clients "$CLIENTS" --duration "${DURATION}s" \
    --value-bytes "$VALUE_BYTES" --keys "$KEYS" --seed "$SEED" --json > "$WORK/http.json"
R[rss_hwm_kib]=$(awk '/VmHWM/ {print $2}' "/proc/$SERVER_PID/status")
kill "$RSS_PID" 2>/dev/null || true; RSS_PID=""
R[http_ops_s]=$(json "$WORK/http.json" 'round(j["ops_per_s"])')
R[http_p50_us]=$(lat "$WORK/http.json" p50_us)
R[http_p99_us]=$(lat "$WORK/http.json" p99_us)
echo "HTTP ${R[http_ops_s]} writes/s, p50 ${R[http_p50_us]} us, p99 ${R[http_p99_us]} us, server VmHWM ${R[rss_hwm_kib]} KiB"

log "mirrordb HTTP: 1 client (latency), ${DURATION} s"
"$BIN" bench --url "http://127.0.0.1:$PORT" --clients 1 --duration "${DURATION}s" \
    --value-bytes "$VALUE_BYTES" --keys "$KEYS" --seed "$SEED" --json > "$WORK/http1.json"
R[http1_ops_s]=$(json "$WORK/http1.json" 'round(j["ops_per_s"])')
R[http1_p50_us]=$(lat "$WORK/http1.json" p50_us)
R[http1_p99_us]=$(lat "$WORK/http1.json" p99_us)
echo "1 client: ${R[http1_ops_s]} writes/s, p50 ${R[http1_p50_us]} us, p99 ${R[http1_p99_us]} us"
stop_server

# ---------------------------------------------------------------- 5. engine
log "mirrordb engine in-process: $CLIENTS clients, ${VALUE_BYTES} B values, ${DURATION} s"
"$BIN" bench --in-process --data-dir "$WORK/engine" --clients "$CLIENTS" --duration "${DURATION}s" \
    --value-bytes "$VALUE_BYTES" --keys "$KEYS" --seed "$SEED" --json > "$WORK/engine.json"
R[engine_ops_s]=$(json "$WORK/engine.json" 'round(j["ops_per_s"])')
R[engine_p50_us]=$(lat "$WORK/engine.json" p50_us)
R[engine_p99_us]=$(lat "$WORK/engine.json" p99_us)
echo "engine ${R[engine_ops_s]} writes/s, p50 ${R[engine_p50_us]} us, p99 ${R[engine_p99_us]} us"
"$BIN" bench --in-process --data-dir "$WORK/engine1" --clients 1 --duration "${DURATION}s" \
    --value-bytes "$VALUE_BYTES" --keys "$KEYS" --seed "$SEED" --json > "$WORK/engine1.json"
R[engine1_p50_us]=$(lat "$WORK/engine1.json" p50_us)
echo "engine, 1 client: p50 ${R[engine1_p50_us]} us"
rm -rf "$WORK/engine" "$WORK/engine1"

# ---------------------------------------------------------------- 6. replay
if [[ -z "${SKIP_REPLAY:-}" ]]; then
    log "recovery replay: $REPLAY_ENTRIES entries unflushed, SIGKILL, restart"
    # Flushing held off (1 h, 16 GiB dirty) so every entry is replayed.
    start_server replay 1h 16GiB
    "$BIN" bench --url "http://127.0.0.1:$PORT" --clients "$CLIENTS" --count "$REPLAY_ENTRIES" \
        --value-bytes "$VALUE_BYTES" --keys "$KEYS" --seed "$SEED" --json > "$WORK/replay_load.json"
    kill -KILL "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
    : > "$WORK/replay.log"
    start_server replay 1h 16GiB
    curl -fsS "http://127.0.0.1:$PORT/v1/status" > "$WORK/status.json" 2>/dev/null || echo '{}' > "$WORK/status.json"
    stop_server
    # The recovery report: from /v1/status if it has one, else from the log.
    python3 - "$WORK/status.json" "$WORK/replay.log" > "$WORK/recovery.json" <<'PY'
import json, re, sys
def find(o):
    if isinstance(o, dict):
        if "replayed_entries" in o and "replay_ms" in o:
            return o
        for v in o.values():
            r = find(v)
            if r: return r
    return None
rep = find(json.load(open(sys.argv[1])))
if rep is None:
    for line in open(sys.argv[2], errors="replace"):
        e = re.search(r"replayed_entries\D+(\d+)", line); m = re.search(r"replay_ms\D+(\d+)", line)
        if e and m:
            rep = {"replayed_entries": int(e.group(1)), "replay_ms": int(m.group(1))}
print(json.dumps(rep or {"replayed_entries": 0, "replay_ms": 0}))
PY
    R[replay_entries]=$(json "$WORK/recovery.json" 'j["replayed_entries"]')
    R[replay_ms]=$(json "$WORK/recovery.json" 'j["replay_ms"]')
    R[replay_entries_s]=$(json "$WORK/recovery.json" 'round(j["replayed_entries"]*1000/max(j["replay_ms"],1))')
    echo "replayed ${R[replay_entries]} entries in ${R[replay_ms]} ms: ${R[replay_entries_s]} entries/s"
    rm -rf "$WORK/replay"
fi

# ---------------------------------------------------------------- 7. PostgreSQL
if [[ -z "${SKIP_PG:-}" ]]; then
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
    if [[ -z "$PG_BIN" || ! -x "$PG_BIN/pgbench" ]]; then
        log "installing PostgreSQL from Debian's packages"
        [[ $(id -u) -eq 0 ]] || die "PostgreSQL is missing and installing it needs root (or set SKIP_PG=1)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql postgresql-contrib >/dev/null
        PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    fi
    R[pg_version]=$("$PG_BIN/postgres" --version | awk '{print $3}')
    log "PostgreSQL ${R[pg_version]}: pgbench upserts, $CLIENTS clients, ${VALUE_BYTES} B jsonb, ${DURATION} s"
    PG_DATA=$WORK/pg/data
    mkdir -p "$WORK/pg/sock" && chown -R postgres: "$WORK/pg"
    su postgres -s /bin/sh -c "$PG_BIN/initdb -D '$PG_DATA' -A trust -U postgres" >/dev/null
    cat >> "$PG_DATA/postgresql.conf" <<EOF
listen_addresses = ''
port = $PG_PORT
unix_socket_directories = '$WORK/pg/sock'
max_connections = $((CLIENTS + 20))
fsync = on
synchronous_commit = on
wal_sync_method = fdatasync
full_page_writes = on
shared_buffers = 256MB
EOF
    su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$PG_DATA' -l '$WORK/pg/log' -w start" >/dev/null
    PSQL=("$PG_BIN/psql" -X -q -h "$WORK/pg/sock" -p "$PG_PORT" -U postgres -d postgres)
    "${PSQL[@]}" -c "CREATE TABLE kv (k text PRIMARY KEY, v jsonb NOT NULL)"
    pad=$(python3 -c "print('x' * ($VALUE_BYTES - len('{\"c\":1,\"n\":1,\"pad\":\"\"}')))")
    cat > "$WORK/pg/upsert.sql" <<EOF
\set k random(0, $((KEYS - 1)))
INSERT INTO kv (k, v) VALUES ('k' || lpad(:k::text, 10, '0'), '{"c":1,"n":1,"pad":"$pad"}'::jsonb) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v;
EOF
    pgb() { "$PG_BIN/pgbench" -n -h "$WORK/pg/sock" -p "$PG_PORT" -U postgres -M prepared \
            -f "$WORK/pg/upsert.sql" -T "$DURATION" "$@" postgres; }
    pgb -c "$CLIENTS" -j "$(nproc)" > "$WORK/pg/out32" 2>&1 || { cat "$WORK/pg/out32" >&2; die "pgbench failed"; }
    R[pg_tps]=$(awk '/^tps = / {printf "%d", $3}' "$WORK/pg/out32")
    R[pg_lat_ms]=$(awk '/^latency average/ {print $4}' "$WORK/pg/out32")
    pgb -c 1 -j 1 > "$WORK/pg/out1" 2>&1 || { cat "$WORK/pg/out1" >&2; die "pgbench failed"; }
    R[pg1_tps]=$(awk '/^tps = / {printf "%d", $3}' "$WORK/pg/out1")
    R[pg1_lat_ms]=$(awk '/^latency average/ {print $4}' "$WORK/pg/out1")
    echo "PostgreSQL ${R[pg_tps]} upserts/s (avg latency ${R[pg_lat_ms]} ms); 1 client ${R[pg1_tps]}/s (${R[pg1_lat_ms]} ms)"
    su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$PG_DATA' -m fast -w stop" >/dev/null
    PG_DATA=""
    rm -rf "$WORK/pg"
fi

# ---------------------------------------------------------------- 8. SQLite
if [[ -z "${SKIP_SQLITE:-}" ]]; then
    log "SQLite (Python sqlite3, WAL, synchronous=FULL): $CLIENTS threads, ${VALUE_BYTES} B, ${DURATION} s"
    python3 "$REPO/bench/sqlite_bench.py" --db "$WORK/sqlite.db" --threads "$CLIENTS" \
        --duration "$DURATION" --value-bytes "$VALUE_BYTES" --keys "$KEYS" --seed "$SEED" > "$WORK/sqlite.json"
    R[sqlite_version]=$(json "$WORK/sqlite.json" 'j["sqlite_version"]')
    R[sqlite_ops_s]=$(json "$WORK/sqlite.json" 'round(j["ops_per_s"])')
    R[sqlite_p50_us]=$(json "$WORK/sqlite.json" 'j["p50_us"]')
    R[sqlite_p99_us]=$(json "$WORK/sqlite.json" 'j["p99_us"]')
    python3 "$REPO/bench/sqlite_bench.py" --db "$WORK/sqlite1.db" --threads 1 \
        --duration "$DURATION" --value-bytes "$VALUE_BYTES" --keys "$KEYS" --seed "$SEED" > "$WORK/sqlite1.json"
    R[sqlite1_ops_s]=$(json "$WORK/sqlite1.json" 'round(j["ops_per_s"])')
    echo "SQLite ${R[sqlite_ops_s]} upserts/s with $CLIENTS threads (p50 ${R[sqlite_p50_us]} us, p99 ${R[sqlite_p99_us]} us); ${R[sqlite1_ops_s]}/s with 1 thread"
fi

# ---------------------------------------------------------------- 9. summary
verdict() { if python3 -c "import sys; sys.exit(0 if ($1) else 1)"; then echo "met"; else echo "MISSED"; fi; }
row() { printf '%-44s %-22s %-14s %s\n' "$1" "$2" "$3" "$4"; }
log "summary (commit ${R[commit]}, ${R[cpu]}, ${R[nproc]} cores, ${R[fs]}, kernel ${R[kernel]})"
row "figure" "measured" "target" "verdict"
row "HTTP durable writes/s ($CLIENTS clients)" "${R[http_ops_s]}" ">= 20000" "$(verdict "${R[http_ops_s]} >= 20000")"
row "engine writes/s ($CLIENTS clients)" "${R[engine_ops_s]}" ">= 50000" "$(verdict "${R[engine_ops_s]} >= 50000")"
R[lat_ratio]=$(calc "round(${R[http1_p50_us]} / max(${R[fsync_p50_us]}, 1), 2)")
row "1-client HTTP p50 / fdatasync p50" "${R[http1_p50_us]}/${R[fsync_p50_us]} us = ${R[lat_ratio]}x" "<= 1.5x" "$(verdict "${R[lat_ratio]} <= 1.5")"
R[lat_ratio_prealloc]=$(calc "round(${R[http1_p50_us]} / max(${R[fsync_prealloc_p50_us]}, 1), 2)")
row "1-client HTTP p50 / preallocated fdatasync" "${R[http1_p50_us]}/${R[fsync_prealloc_p50_us]} us = ${R[lat_ratio_prealloc]}x" "(info)" ""
R[engine_lat_ratio]=$(calc "round(${R[engine1_p50_us]} / max(${R[fsync_p50_us]}, 1), 2)")
row "1-client engine p50 / fdatasync p50" "${R[engine1_p50_us]}/${R[fsync_p50_us]} us = ${R[engine_lat_ratio]}x" "(info)" ""
if [[ -n "${R[pg_tps]:-}" ]]; then
    R[http_vs_pg]=$(calc "round(${R[http_ops_s]} / max(${R[pg_tps]}, 1), 2)")
    row "mirrordb HTTP / PostgreSQL upserts" "${R[http_vs_pg]}x" ">= 1.5x" "$(verdict "${R[http_vs_pg]} >= 1.5")"
fi
if [[ -n "${R[sqlite_ops_s]:-}" ]]; then
    R[engine_vs_sqlite]=$(calc "round(${R[engine_ops_s]} / max(${R[sqlite_ops_s]}, 1), 2)")
    row "mirrordb engine / SQLite upserts" "${R[engine_vs_sqlite]}x" ">= 10x" "$(verdict "${R[engine_vs_sqlite]} >= 10")"
fi
if [[ -n "${R[replay_entries_s]:-}" ]]; then
    row "replay entries/s" "${R[replay_entries_s]} (${R[replay_entries]} in ${R[replay_ms]} ms)" ">= 500000" \
        "$(verdict "${R[replay_entries_s]} >= 500000 and ${R[replay_entries]} > 0")"
fi
R[rss_limit_kib]=$(( (CACHE_MIB + 64) * 1024 ))
row "server peak RSS (VmHWM) under HTTP load" "$(( R[rss_hwm_kib] / 1024 )) MiB" "<= $((CACHE_MIB + 64)) MiB" \
    "$(verdict "${R[rss_hwm_kib]} <= ${R[rss_limit_kib]}")"

if [[ -n "${RESULTS_JSON:-}" ]]; then
    for k in "${!R[@]}"; do printf '%s\t%s\n' "$k" "${R[$k]}"; done | python3 -c '
import json, sys
d = {}
for line in sys.stdin:
    k, _, v = line.rstrip("\n").partition("\t")
    try: v = int(v)
    except ValueError:
        try: v = float(v)
        except ValueError: pass
    d[k] = v
print(json.dumps(dict(sorted(d.items())), indent=2))' > "$RESULTS_JSON"
    echo "figures written to $RESULTS_JSON" >&2
fi
