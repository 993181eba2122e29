#!/usr/bin/env bash
# Idle-backup A/B of two builds on one dataset, alternating, so both see the
# same machine at the same moments.
#
#   bench/backup-ab.sh BIN_A BIN_B [ROUNDS=5]
#
# Builds a ~1 GiB dataset once (4,000-byte values of pseudo-random letters,
# as bench/backup.py; kept in $AB_DIR, default /var/tmp/mirrordb-backup-ab),
# then per round and build: starts the node, takes one untimed backup, times
# three `mirrordb backup --wait`, stops the node. Prints every time and the
# mean per build. Needs nothing but the two binaries and curl.
set -euo pipefail
A=${1:?BIN_A}; B=${2:?BIN_B}; ROUNDS=${3:-5}
DIR=${AB_DIR:-/var/tmp/mirrordb-backup-ab}
PORT=${AB_PORT:-7171}
URL="http://127.0.0.1:$PORT"

start() {
    "$1" serve --data-dir "$DIR/data" --listen "127.0.0.1:$PORT" --backup-dir "$DIR/backups" \
        >> "$DIR/node.log" 2>&1 &
    NODE=$!
    for _ in $(seq 100); do curl -fsS "$URL/health" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "the node did not start; see $DIR/node.log" >&2; exit 1
}
stop() { kill "$NODE"; wait "$NODE" 2>/dev/null || true; }

if [ ! -f "$DIR/data/mirrordb.redb" ]; then
    mkdir -p "$DIR"
    start "$A"
    while [ "$(stat -c %s "$DIR/data/mirrordb.redb")" -lt $((1 << 30)) ]; do
        "$A" bench --url "$URL" --json --clients 16 --count 60000 --value-bytes 4000 \
            --random-values --keys 1000000000 --table big > /dev/null
        sleep 1.5
    done
    "$A" bench --url "$URL" --json --clients 16 --count 75000 --value-bytes 4000 \
        --random-values --keys 1000000000 --table big > /dev/null
    stop
fi

for _ in $(seq "$ROUNDS"); do
    for bin in "$A" "$B"; do
        rm -rf "$DIR/backups"
        start "$bin"
        "$bin" backup --url "$URL" --wait --json > /dev/null
        for _ in 1 2 3; do
            t0=$EPOCHREALTIME
            "$bin" backup --url "$URL" --wait --json > /dev/null
            awk -v b="$bin" -v t0="$t0" -v t1="$EPOCHREALTIME" 'BEGIN {printf "%s %.2f\n", b, t1 - t0}'
        done
        stop
    done
done | tee "$DIR/times.txt"
awk '{s[$1]+=$2; n[$1]++} END {for (k in s) printf "%s: mean %.2f s over %d backups\n", k, s[k]/n[k], n[k]}' "$DIR/times.txt"
