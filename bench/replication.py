#!/usr/bin/env python3
"""Replication benchmarks of issue 4 on a three-node loopback cluster.

Starts `mirrordb cluster init` + three `mirrordb serve` processes (default
timings, quorum:1 with degrade) in a scratch directory and measures, in one
run on this machine:

1. replication lag at a paced 10,000 writes/s: `mirrordb bench --rate 10000`
   against the primary prints each mirror's acknowledgement lag (primary
   fsync -> mirror fsync acknowledged), target p99 <= 10 ms;
2. write throughput with 32 clients in quorum:1 and in async (the policy is
   switched through `PUT /v1/cluster/commit-policy`), target quorum >= 60 %
   of async;
3. catch-up: one mirror is stopped, 1,000,000 entries are written, the mirror
   is started again and the primary's view of it is polled until it has
   flushed everything (durable in its journal: what the target counts) and
   then until it has applied everything (visible to reads on the mirror);
   target >= 200,000 entries/s.

Only the Python standard library. Usage:

    cargo build --release -p mirrordb
    bench/replication.py [--bin target/release/mirrordb] [--keep]
        [--lag-seconds 20] [--throughput-seconds 15] [--catch-up 1000000]

Prints each figure with its target and verdict, and a JSON summary last.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from prom import bucket_at, histogram

TOKEN = "bench-admin-0123456789abcdef"
NODES = ["n1", "n2", "n3"]


def free_port(kind):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=5):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return None, None


class Cluster:
    def __init__(self, binary, work):
        self.bin = binary
        self.work = work
        self.http = {n: f"http://127.0.0.1:{free_port(socket.SOCK_STREAM)}" for n in NODES}
        quic = {n: f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}" for n in NODES}
        subprocess.run(
            [
                binary, "cluster", "init",
                "--nodes", ",".join(f"{n}={a}" for n, a in quic.items()),
                "--http", ",".join(f"{n}={u[len('http://'):]}" for n, u in self.http.items()),
                "--data-root", work,
                "--out", os.path.join(work, "certs"),
                "--token", f"bench:admin:{TOKEN}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self.procs = {}

    def start(self, node):
        log = open(os.path.join(self.work, f"{node}.log"), "ab")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self.procs[node] = subprocess.Popen(
            [self.bin, "serve", "--config", os.path.join(self.work, "certs", f"{node}.toml")],
            stdout=log,
            stderr=log,
            env=env,
        )

    def stop(self, node):
        p = self.procs.pop(node, None)
        if p is not None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for n in list(self.procs):
            self.stop(n)

    def status(self, node):
        return http("GET", f"{self.http[node]}/v1/cluster")[1]

    def wait_primary(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for n in self.procs:
                s = self.status(n)
                if s and s.get("role") == "primary":
                    return n
            time.sleep(0.1)
        raise SystemExit("no primary within 60 s; see the node logs in " + self.work)

    def wait_mirrors_streaming(self, primary, count, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.status(primary) or {}
            ok = [m for m in s.get("mirrors", []) if m.get("connected") and m.get("flush_lag_lsn", 1) == 0]
            if len(ok) >= count:
                return
            time.sleep(0.1)
        raise SystemExit(f"fewer than {count} mirrors caught up within {timeout} s")


def node_timings(c, node):
    """A node's fsync and cache-flush histograms, as 'count, p50, p99, max bucket'."""
    req = urllib.request.Request(f"{c.http[node]}/metrics")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    out = {}
    for name in ["mirrordb_fsync_seconds", "mirrordb_flush_seconds"]:
        b = histogram(text, name)
        if b and b[-1][1]:
            nonempty = [le for (le, cnt), (_, prev) in zip(b, [(0, 0)] + b) if cnt > prev]
            out[name] = {"count": b[-1][1], "p50_ms_at_most": bucket_at(b, 50) * 1000,
                         "p99_ms_at_most": bucket_at(b, 99) * 1000,
                         "max_ms_at_most": nonempty[-1] * 1000 if nonempty else None}
    return out


def bench(binary, url, *args):
    cmd = [binary, "bench", "--url", url, "--token", TOKEN, "--json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        report = json.loads(out.stdout)
    except ValueError:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    if out.returncode != 0:
        print(f"   (bench: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode})")
    return report


def verdict(ok):
    return "met" if ok else "MISSED"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/mirrordb")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--lag-seconds", type=int, default=20)
    ap.add_argument("--throughput-seconds", type=int, default=15)
    ap.add_argument("--catch-up", type=int, default=1_000_000, help="entries the stopped mirror misses")
    args = ap.parse_args()
    if not os.access(args.bin, os.X_OK):
        raise SystemExit(f"{args.bin} not found: cargo build --release -p mirrordb")

    work = tempfile.mkdtemp(prefix="mirrordb-replication-bench-")
    c = Cluster(args.bin, work)
    summary = {"dir": work, "nproc": os.cpu_count(), "load_before": os.getloadavg()[0]}
    try:
        for n in NODES:
            c.start(n)
        p = c.wait_primary()
        c.wait_mirrors_streaming(p, 2)
        url = c.http[p]
        print(f"primary {p} at {url}; work directory {work}", flush=True)

        # 1. Lag at a paced 10,000 writes/s.
        r = bench(args.bin, url, "--rate", "10000", "--clients", "64",
                  "--duration", f"{args.lag_seconds}s", "--keys", "1000000")
        summary["lag_run"] = {k: r[k] for k in ("ops_per_s", "errors")}
        summary["lag"] = r.get("replication", [])
        print(f"\n1. replication lag at --rate 10000: {r['ops_per_s']:.0f} writes/s achieved, {r['errors']} errors")
        worst = 0.0
        for m in r.get("replication", []):
            p99 = m["p99_ms_at_most"] if m["p99_ms_at_most"] is not None else float("inf")
            worst = max(worst, p99)
            print(f"   {m['mirror']}: {m['samples']} group commits; p50 <= {m['p50_ms_at_most']} ms, "
                  f"p99 <= {m['p99_ms_at_most']} ms, p99.9 <= {m['p999_ms_at_most']} ms")
        summary["node_timings"] = {n: node_timings(c, n) for n in NODES}
        for n, t in summary["node_timings"].items():
            parts = [f"{k.split('_')[1]}: {v['count']}, p99 <= {v['p99_ms_at_most']:g} ms, "
                     f"max <= {v['max_ms_at_most']:g} ms" for k, v in t.items()]
            print(f"   {n}{' (primary)' if n == p else ''} since start: " + "; ".join(parts))
        lag_ok = bool(r.get("replication")) and worst <= 10.0 and r["ops_per_s"] >= 9500
        print(f"   target p99 <= 10 ms at 10,000 writes/s: {verdict(lag_ok)}")

        # 2. quorum:1 against async, 32 clients.
        tput = {}
        for policy in ["quorum:1", "async"]:
            st, _ = http("PUT", f"{url}/v1/cluster/commit-policy", {"commit_policy": policy})
            if st != 200:
                raise SystemExit(f"PUT commit-policy {policy} answered {st}")
            time.sleep(0.5)
            r = bench(args.bin, url, "--clients", "32", "--duration", f"{args.throughput_seconds}s")
            tput[policy] = r["ops_per_s"]
            print(f"\n2. {policy}: {r['ops_per_s']:.0f} writes/s (32 clients, p50 "
                  f"{r['kinds']['write']['latency']['p50_us'] / 1000:.2f} ms), {r['errors']} errors")
        http("PUT", f"{url}/v1/cluster/commit-policy", {"commit_policy": "quorum:1"})
        ratio = tput["quorum:1"] / tput["async"] if tput["async"] else 0.0
        summary["throughput"] = tput | {"ratio": ratio}
        print(f"   quorum:1 / async = {ratio:.2f}; target >= 0.60: {verdict(ratio >= 0.6)}")

        # 3. Catch-up of a mirror the given number of entries behind.
        m = next(n for n in NODES if n != p)
        c.stop(m)
        before = (c.status(p) or {}).get("last_lsn", 0)
        print(f"\n3. stopped mirror {m}; writing {args.catch_up} entries", flush=True)
        r = bench(args.bin, url, "--clients", "32", "--count", str(args.catch_up), "--keys", "1000000")
        after = (c.status(p) or {}).get("last_lsn", 0)
        behind = after - before
        c.start(m)
        t0 = time.time()
        start_flushed = None
        flushed_at = None
        deadline = t0 + 600
        while time.time() < deadline:
            s = c.status(p) or {}
            mv = next((x for x in s.get("mirrors", []) if x.get("node") == m), None)
            if mv and mv.get("connected"):
                if start_flushed is None:
                    start_flushed = mv.get("flushed_lsn", 0)
                if flushed_at is None and mv.get("flushed_lsn", 0) >= after:
                    flushed_at = time.time()
                if flushed_at is not None and mv.get("applied_lsn", 0) >= after:
                    break
            time.sleep(0.05)
        else:
            raise SystemExit(f"{m} did not catch up within 600 s")
        applied_at = time.time()
        took = flushed_at - t0
        rate = behind / took if took > 0 else 0.0
        took_applied = applied_at - t0
        rate_applied = behind / took_applied if took_applied > 0 else 0.0
        ms = c.status(m) or {}
        summary["catch_up"] = {"entries": behind, "seconds": took, "entries_per_s": rate,
                               "applied_seconds": took_applied,
                               "applied_entries_per_s": rate_applied,
                               "mirror_flushed_at_connect": start_flushed}
        print(f"   {m} was {behind} entries behind; restart to flushed (durable) in {took:.2f} s = "
              f"{rate:.0f} entries/s (incl. process start; role now {ms.get('role')})")
        print(f"   restart to applied (visible to reads) in {took_applied:.2f} s = {rate_applied:.0f} entries/s")
        print(f"   target >= 200,000 entries/s (flushed): {verdict(rate >= 200_000)}")
        summary["load_after"] = os.getloadavg()[0]
        print("\n" + json.dumps(summary, indent=2))
    finally:
        c.stop_all()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
