#!/usr/bin/env bash
# Backup-barrier A/B of two builds, alternating, so both see the same machine
# at the same moments. The barrier is the only moment a backup holds writers.
#
#   bench/barrier-ab.sh BIN_A BIN_B [ROUNDS=3]
#
# Per round and build: a node on a fresh directory ($AB_DIR, default
# /var/tmp/mirrordb-barrier-ab), 100,000 writes of 256 bytes, five backups
# with nothing writing, then five more under a 32-client write load, each
# `mirrordb backup --wait`. Every barrier's log line ("backup barrier": total
# and the time since its start when the marker was synced, the apply stage
# caught up and the segment was rotated) goes to $AB_DIR/barriers.txt; the
# summary gives each build's median and maximum, idle and under load.
# Needs nothing but the two binaries and curl.
set -euo pipefail
A=${1:?BIN_A}; B=${2:?BIN_B}; ROUNDS=${3:-3}
DIR=${AB_DIR:-/var/tmp/mirrordb-barrier-ab}
PORT=${AB_PORT:-7172}
URL="http://127.0.0.1:$PORT"
NODE=""; LOAD=""

cleanup() {
    [ -n "$LOAD" ] && kill "$LOAD" 2>/dev/null || true
    [ -n "$NODE" ] && kill "$NODE" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT

start() {
    rm -rf "$DIR/data" "$DIR/backups"
    mkdir -p "$DIR"
    "$1" serve --data-dir "$DIR/data" --listen "127.0.0.1:$PORT" --backup-dir "$DIR/backups" \
        > "$DIR/node.log" 2>&1 &
    NODE=$!
    for _ in $(seq 100); do curl -fsS "$URL/health" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "the node did not start; see $DIR/node.log" >&2; exit 1
}
stop() { kill "$NODE"; wait "$NODE" 2>/dev/null || true; NODE=""; }

# "backup barrier" lines of the node log as: build phase total marked
# applied rotated (µs; "-" for a build whose log line has no such field).
barriers() {
    grep 'backup barrier' "$DIR/node.log" | awk -v b="$1" '
        { f["number"] = f["barrier_us"] = f["marked_us"] = f["applied_us"] = f["rotated_us"] = "-"
          for (i = 1; i <= NF; i++) if (split($i, kv, "=") == 2 && (kv[1] in f)) f[kv[1]] = kv[2]
          printf "%s %s %s %s %s %s\n", b, (f["number"] <= 5 ? "idle" : "load"),
                 f["barrier_us"], f["marked_us"], f["applied_us"], f["rotated_us"] }'
}

mkdir -p "$DIR"
: > "$DIR/barriers.txt"
for _ in $(seq "$ROUNDS"); do
    for bin in "$A" "$B"; do
        start "$bin"
        "$bin" bench --url "$URL" --json --clients 32 --count 100000 --value-bytes 256 > /dev/null
        for _ in 1 2 3 4 5; do "$bin" backup --url "$URL" --wait --json > /dev/null; done
        "$bin" bench --url "$URL" --json --clients 32 --duration 600s --value-bytes 256 > /dev/null &
        LOAD=$!
        sleep 1
        for _ in 1 2 3 4 5; do "$bin" backup --url "$URL" --wait --json > /dev/null; done
        kill "$LOAD"; wait "$LOAD" 2>/dev/null || true; LOAD=""
        stop
        barriers "$bin" | tee -a "$DIR/barriers.txt"
    done
done
echo "build phase: barrier median / max (µs), over all rounds"
sort -k1,1 -k2,2 -k3,3n "$DIR/barriers.txt" | awk '
    { k = $1 " " $2; v[k, ++n[k]] = $3 }
    END { for (k in n) printf "%s: %d / %d over %d\n", k, v[k, int((n[k] + 1) / 2)], v[k, n[k]], n[k] }' | sort
