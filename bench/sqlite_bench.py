#!/usr/bin/env python3
"""SQLite peer benchmark for mirrordb (bench/run.sh).

Durable upserts of JSON values into one table with Python's standard-library
sqlite3: WAL journal, synchronous=FULL (every commit is fsynced before it
returns, like a mirrordb acknowledgement), one autocommit upsert per
operation, N threads each with its own connection. SQLite allows one writer
at a time, so threads wait on its lock (busy_timeout) rather than failing.

Prints one JSON object: ops, elapsed_s, ops_per_s, latency percentiles in
microseconds (nearest rank), errors, and the SQLite version.

Usage: sqlite_bench.py --db /tmp/x.db [--threads 32] [--duration 10]
                       [--count N] [--value-bytes 256] [--keys 100000] [--seed S]
"""

import argparse
import json
import math
import os
import random
import sqlite3
import sys
import threading
import time


def make_value(client: int, seq: int, size: int) -> str:
    """A JSON object of exactly `size` bytes, the same shape mirrordb bench writes."""
    head = '{"c":%d,"n":%d,"pad":"' % (client, seq)
    pad = max(0, size - len(head) - 2)
    return head + "x" * pad + '"}'


def percentile(sorted_samples, p):
    """Nearest-rank percentile, the same definition as mirrordb bench."""
    if not sorted_samples:
        return 0
    n = len(sorted_samples)
    rank = -(-round(p * 1000) * n // 100_000)  # ceil in integers
    return sorted_samples[min(max(rank, 1), n) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--count", type=int, default=0, help="total ops (0: use --duration)")
    ap.add_argument("--value-bytes", type=int, default=256)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 63)

    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(args.db + suffix)
        except FileNotFoundError:
            pass
    setup = sqlite3.connect(args.db)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID")
    setup.commit()
    setup.close()

    lock = threading.Lock()
    issued = [0]
    deadline = time.monotonic() + args.duration
    results = []
    errors = []

    def claim() -> bool:
        with lock:
            issued[0] += 1
            if args.count:
                return issued[0] <= args.count
        return time.monotonic() < deadline

    def worker(no: int) -> None:
        rng = random.Random(seed ^ (no * 0x9E3779B97F4A7C15 & ((1 << 64) - 1)))
        # isolation_level=None: autocommit, each statement its own durable txn.
        conn = sqlite3.connect(args.db, timeout=60, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=60000")
        samples = []
        errs = 0
        seq = 0
        while claim():
            seq += 1
            key = "k%010d" % rng.randrange(args.keys)
            val = make_value(no, seq, args.value_bytes)
            t0 = time.perf_counter()
            try:
                conn.execute(
                    "INSERT INTO kv (k, v) VALUES (?, ?) "
                    "ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                    (key, val),
                )
                samples.append(int((time.perf_counter() - t0) * 1e6))
            except sqlite3.Error as e:  # counted, reported once
                errs += 1
                if errs == 1:
                    errors.append(str(e))
        conn.close()
        with lock:
            results.append((samples, errs))

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start

    samples = sorted(s for r in results for s in r[0])
    n_err = sum(r[1] for r in results)
    ops = len(samples)
    out = {
        "peer": "sqlite",
        "sqlite_version": sqlite3.sqlite_version,
        "journal_mode": "wal",
        "synchronous": "full",
        "threads": args.threads,
        "value_bytes": args.value_bytes,
        "keys": args.keys,
        "seed": seed,
        "elapsed_s": elapsed,
        "ops": ops,
        "errors": n_err,
        "first_error": errors[0] if errors else None,
        "ops_per_s": ops / elapsed if elapsed > 0 else 0.0,
        "p50_us": percentile(samples, 50),
        "p90_us": percentile(samples, 90),
        "p99_us": percentile(samples, 99),
        "p999_us": percentile(samples, 99.9),
        "max_us": samples[-1] if samples else 0,
        "mean_us": (sum(samples) / ops) if ops else 0.0,
    }
    print(json.dumps(out))
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(args.db + suffix)
        except FileNotFoundError:
            pass
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
