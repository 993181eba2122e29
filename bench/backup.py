#!/usr/bin/env python3
"""Backup benchmarks of issue 3 on one node, against `cp` in the same run.

Starts one `mirrordb serve` (default config; data and backups on the same
disk, in a scratch directory) and measures, in one run on this machine:

1. backup of a ~1 GiB dataset: records of 4,000-byte values (padded with
   pseudo-random letters, `mirrordb bench --random-values`, so compression
   has real work and saves about a quarter) are written until the data
   file holds about --dataset-mib MiB; then `cp` of the data
   file (plus `sync` of the copy) is timed, then `mirrordb backup --wait`
   (zstd at the default level; after a first, untimed backup that also
   archives the load's journal, so the timed ones are the steady state),
   alternating, --pairs times (default 3). Target: the backup's median
   throughput >= 70 % of cp's median, both counted in bytes of the data
   file;
2. writes during a backup: `mirrordb bench --clients 32` (256-byte values)
   for --write-seconds without a backup, then again while a backup of the
   same dataset runs (the load goes on until the backup is done), then
   once more without one. The load starts by inserting the keys it has not
   written yet, so its table grows through the phases: the runs before and
   after the backup bracket the state the backup ran in, and their mean is
   the rate without a backup (the ratio to the run before alone is printed
   too). Target: >= 80 % of the throughput without one; all rates come
   from the node's write counter (sampled every 0.25 s), the one with a
   backup over exactly the seconds it ran. Also printed: the barrier's
   duration (`mirrordb_backup_barrier_seconds`, the only moment writers wait;
   target for the write p99 during it: <= 10 ms), and where the writer's
   time went in both phases (cache flushes, journal fsyncs);
3. restore: --journal-entries more writes after the last set, the node is
   stopped, and `mirrordb restore --from BACKUPS --to NEW --journal-dir
   DATA/journal` is timed (the set plus the integration of its archive and
   the live journal). Target: <= 30 s; the integration rate is printed.

Also printed: the data file's length before and after phase 2 (it grows
while a backup's snapshot is open under writes) and what `mirrordb
compact` returns once the node is stopped.

Only the Python standard library. Usage:

    cargo build --release -p mirrordb
    bench/backup.py [--bin target/release/mirrordb] [--keep]
        [--dataset-mib 1024] [--write-seconds 10] [--journal-entries 1000000] [--pairs 3]
        [--priority idle|N] [--cache-mib N] [--flush-interval 1s]

Prints each figure with its target and verdict, and a JSON summary last.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request

from prom import bucket_at, histogram, total


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def parse_json(text):
    """The command's JSON: its whole output, or else its last line."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        return json.loads(text.splitlines()[-1])


def run_json(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return parse_json(out.stdout)
    except (ValueError, IndexError):
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}")


def bench(bin_, url, *extra):
    return run_json([bin_, "bench", "--url", url, "--json", *extra])


def verdict(ok):
    return "met" if ok else "MISSED"


class Node:
    def __init__(self, bin_, work, priority=None, cache_mib=None, flush_interval=None):
        self.bin = bin_
        self.data = os.path.join(work, "data")
        self.backups = os.path.join(work, "backups")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(work, "node.log"), "w")
        cmd = [bin_, "serve", "--data-dir", self.data, "--listen", f"127.0.0.1:{self.port}",
               "--backup-dir", self.backups]
        toml = ""
        if priority is not None:
            value = priority if priority.isdigit() else f'"{priority}"'
            toml += f"[backup]\npriority = {value}\n"
        if cache_mib is not None or flush_interval is not None:
            toml += "[cache]\n"
        if cache_mib is not None:
            toml += f"cache_bytes = \"{cache_mib}MiB\"\n"
        if flush_interval is not None:
            toml += f"flush_interval = \"{flush_interval}\"\n"
        if toml:
            cfg = os.path.join(work, "node.toml")
            with open(cfg, "w") as f:
                f.write(toml)
            cmd += ["--config", cfg]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if get(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("the node did not answer /health within 60 s")

    def data_file(self):
        return os.path.join(self.data, "mirrordb.redb")

    def metrics(self):
        return get(self.url + "/metrics")[1]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class WriteSampler:
    """Samples the node's `mirrordb_writes_total` every 0.25 s on a thread,
    so a write rate can be taken over any window (interpolated)."""

    def __init__(self, node):
        self.node = node
        self.samples = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.is_set():
            try:
                text = self.node.metrics()
            except OSError:
                text = ""
            for line in text.splitlines():
                if line.startswith("mirrordb_writes_total "):
                    self.samples.append((time.time(), float(line.split()[1])))
            self.done.wait(0.25)

    def stop(self):
        self.done.set()
        self.thread.join()

    def count_at(self, t):
        s = self.samples
        if not s:
            return 0.0
        if t <= s[0][0]:
            return s[0][1]
        for (t0, c0), (t1, c1) in zip(s, s[1:]):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1
        return s[-1][1]

    def rate(self, t_from, t_to):
        if t_to <= t_from:
            return 0.0
        return (self.count_at(t_to) - self.count_at(t_from)) / (t_to - t_from)


def backup(bin_, url):
    t = time.time()
    r = run_json([bin_, "backup", "--url", url, "--wait", "--json"])
    return r, time.time() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/mirrordb")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--dataset-mib", type=int, default=1024)
    ap.add_argument("--write-seconds", type=int, default=10)
    ap.add_argument("--journal-entries", type=int, default=1_000_000)
    ap.add_argument("--pairs", type=int, default=3, help="cp and backup timed this many times each, alternating; medians compared")
    ap.add_argument("--priority", help="backup.priority for the node: idle or a nice value 0..19 (default: the node's default, idle)")
    ap.add_argument("--cache-mib", type=int, help="cache.cache_bytes for the node, in MiB (default: the node's default)")
    ap.add_argument("--flush-interval", help="cache.flush_interval for the node, e.g. 5s (default: the node's default)")
    args = ap.parse_args()
    if not os.access(args.bin, os.X_OK):
        raise SystemExit(f"{args.bin} not found: cargo build --release -p mirrordb")

    work = tempfile.mkdtemp(prefix="mirrordb-backup-bench-")
    summary = {"dir": work, "nproc": os.cpu_count(), "load_before": os.getloadavg()[0]}
    node = Node(args.bin, work, args.priority, args.cache_mib, args.flush_interval)
    try:
        # 1. The dataset, then cp against mirrordb backup.
        target = args.dataset_mib << 20
        written = 0
        while os.path.getsize(node.data_file()) < target:
            n = max(20_000, (target - os.path.getsize(node.data_file())) // 4200)
            bench(args.bin, node.url, "--clients", "16", "--count", str(n), "--value-bytes", "4000",
                  "--random-values", "--keys", "1000000000", "--table", "big")
            written += n
            # The data file grows at the cache flush (every second).
            time.sleep(1.5)
        size = os.path.getsize(node.data_file())
        print(f"dataset: {written} records of 4,000 bytes; data file {size / 2**20:.0f} MiB", flush=True)
        # A first backup archives the journal of the load itself; the timed
        # one below is the steady state: the dataset plus what was written
        # since the last set.
        first, first_s = backup(args.bin, node.url)
        print(f"first backup (archives the load's journal too): {first_s:.2f} s, {first.get('status')}")
        # cp and the backup alternate, --pairs times: both vary from one
        # moment to the next on a shared VM (cp + sync of the cached file by
        # up to 2x), and the medians compare them at like moments.
        copy = os.path.join(work, "cp-copy.redb")
        pairs = []
        for _ in range(args.pairs):
            t = time.time()
            subprocess.run(["cp", node.data_file(), copy], check=True)
            subprocess.run(["sync", copy], check=True)
            cp_s = time.time() - t
            os.remove(copy)
            rep, backup_s = backup(args.bin, node.url)
            if rep.get("status") != "ok":
                raise SystemExit(f"backup failed: {rep}")
            pairs.append((cp_s, backup_s))
        cp_s = statistics.median(p[0] for p in pairs)
        backup_s = statistics.median(p[1] for p in pairs)
        cp_rate = size / cp_s
        backup_rate = size / backup_s
        ratio = backup_rate / cp_rate
        set_bytes = sum(f.get("bytes", 0) for f in rep.get("files", []) if isinstance(f, dict))
        summary["backup"] = {"data_file_bytes": size, "cp_seconds": cp_s, "backup_seconds": backup_s,
                             "ratio": ratio, "set_bytes": set_bytes, "pairs": pairs, "history": rep}
        print(f"\n1. cp (+ sync) and backup, alternating, {len(pairs)} times: "
              + ", ".join(f"{c:.2f} / {b:.2f} s" for c, b in pairs))
        print(f"   cp of the data file (+ sync), median: {cp_s:.2f} s = {cp_rate / 2**20:.0f} MiB/s")
        print(f"   mirrordb backup --wait, median:      {backup_s:.2f} s = {backup_rate / 2**20:.0f} MiB/s "
              f"(set number {rep.get('number')}, {set_bytes / 2**20:.0f} MiB written)")
        print(f"   backup / cp = {ratio:.2f}; target >= 0.70: {verdict(ratio >= 0.7)}", flush=True)

        # 2. Writes without and with a backup. The rates come from the
        # node's write counter: without, over the steady part of a
        # --write-seconds run; with, over exactly the seconds the backup ran
        # (the load runs until it is done).
        load = ["--clients", "32", "--value-bytes", "256", "--keys", "1000000"]
        sizes = [os.path.getsize(node.data_file())]
        sampler = WriteSampler(node)
        m0 = node.metrics()
        q_start = time.time()
        quiet = bench(args.bin, node.url, *load, "--duration", f"{args.write_seconds}s")
        q_end = time.time()
        sizes.append(os.path.getsize(node.data_file()))
        m1 = node.metrics()
        with subprocess.Popen([args.bin, "bench", "--url", node.url, *load, "--duration", "600s"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as p:
            time.sleep(1.0)
            b_start = time.time()
            rep2, b2_s = backup(args.bin, node.url)
            b_end = time.time()
            m2 = node.metrics()
            p.terminate()
        sizes.append(os.path.getsize(node.data_file()))
        # The same load once more without a backup: at first the load
        # inserts keys it has not written yet, so the table it updates
        # grows through the phases; the runs before and after the backup
        # bracket the state it ran in, and their mean is the baseline.
        time.sleep(1.0)
        a_start = time.time()
        bench(args.bin, node.url, *load, "--duration", f"{args.write_seconds}s")
        a_end = time.time()
        sampler.stop()
        before_rate = sampler.rate(q_start + 1, q_end - 0.5)
        after_rate = sampler.rate(a_start + 1, a_end - 0.5)
        quiet_rate = (before_rate + after_rate) / 2
        busy_rate = sampler.rate(b_start, b_end)
        w_ratio = busy_rate / quiet_rate if quiet_rate else 0.0
        ratio_before = busy_rate / before_rate if before_rate else 0.0

        def spent(name):
            """(seconds, count) of a histogram in each phase."""
            return [tuple(b - a for a, b in zip(total(x, name), total(y, name)))
                    for x, y in ((m0, m1), (m1, m2))]
        flush = spent("mirrordb_flush_seconds")
        fsync = spent("mirrordb_fsync_seconds")
        q_s, b_s = q_end - q_start, b_end - b_start
        b = histogram(node.metrics(), "mirrordb_backup_barrier_seconds")
        barrier_le, barriers = bucket_at(b, 100), (b[-1][1] if b else 0)
        p99_quiet = quiet["kinds"]["write"]["latency"]["p99_us"] / 1000
        summary["writes"] = {"without": quiet_rate, "with": busy_rate, "ratio": w_ratio,
                             "without_before": before_rate, "without_after": after_rate,
                             "ratio_to_before": ratio_before,
                             "backup_seconds": b2_s, "backup_status": rep2.get("status"),
                             "p99_ms_without": p99_quiet,
                             "barrier_max_s_at_most": barrier_le, "barriers": barriers,
                             "flush_seconds_per_s": [flush[0][0] / q_s, flush[1][0] / b_s],
                             "fsyncs_per_s": [fsync[0][1] / q_s, fsync[1][1] / b_s],
                             "fsync_mean_ms": [fsync[i][0] / max(1, fsync[i][1]) * 1e3 for i in (0, 1)]}
        print(f"\n2. writes, 32 clients (node's write counter): {quiet_rate:.0f}/s without a backup "
              f"({before_rate:.0f}/s before it, {after_rate:.0f}/s after it; client p99 before "
              f"{p99_quiet:.1f} ms), {busy_rate:.0f}/s while one ran ({b_s:.1f} s, {rep2.get('status')})")
        print(f"   cache flushes: {flush[0][0] / q_s:.2f} s per s without a backup, "
              f"{flush[1][0] / b_s:.2f} s per s with one")
        print(f"   journal fsyncs: {fsync[0][1] / q_s:.0f}/s, mean {fsync[0][0] / max(1, fsync[0][1]) * 1e3:.2f} ms "
              f"without; {fsync[1][1] / b_s:.0f}/s, mean {fsync[1][0] / max(1, fsync[1][1]) * 1e3:.2f} ms with")
        print(f"   with / without = {w_ratio:.2f} (against the run before it alone: {ratio_before:.2f}); "
              f"target >= 0.80: {verdict(w_ratio >= 0.8)}")
        summary["writes"]["data_file_bytes"] = sizes
        print(f"   data file: {sizes[0] / 2**20:.0f} MiB before, {sizes[1] / 2**20:.0f} MiB after the writes "
              f"without a backup, {sizes[2] / 2**20:.0f} MiB after the backup under writes (the snapshot "
              f"pins the pages rewritten meanwhile)")
        if barrier_le is not None:
            ms = barrier_le * 1000
            print(f"   barrier (writers wait only here): every one of {barriers} took <= {ms:g} ms; "
                  f"target write p99 during it <= 10 ms: {verdict(ms <= 10)}")

        # 3. Restore: the last set plus its archive plus the live journal.
        print(f"\n3. writing {args.journal_entries} more entries", flush=True)
        bench(args.bin, node.url, "--clients", "32", "--count", str(args.journal_entries),
              "--value-bytes", "256", "--keys", "1000000")
        node.stop()
        c = run_json([args.bin, "compact", "--data-dir", node.data, "--json"])
        summary["compact"] = c
        print(f"   mirrordb compact (node stopped): {c.get('bytes_before', 0) / 2**20:.0f} -> "
              f"{c.get('bytes_after', 0) / 2**20:.0f} MiB in {c.get('seconds', 0):.1f} s")
        restored = os.path.join(work, "restored")
        t = time.time()
        rr = run_json([args.bin, "restore", "--from", node.backups, "--to", restored,
                       "--journal-dir", os.path.join(node.data, "journal"), "--json"])
        restore_s = time.time() - t
        entries = rr.get("entries_integrated", 0)
        summary["restore"] = {"seconds": restore_s, "entries_integrated": entries,
                              "entries_per_sec": rr.get("entries_per_sec"), "records": rr.get("records"),
                              "last_lsn": rr.get("last_lsn")}
        print(f"   restore of set {(rr.get('plan', {}).get('base') or {}).get('number', '?')} + {entries} journal entries: "
              f"{restore_s:.2f} s ({rr.get('records')} records; integration "
              f"{rr.get('entries_per_sec')} entries/s)")
        print(f"   target <= 30 s: {verdict(restore_s <= 30)}")
        summary["load_after"] = os.getloadavg()[0]
        print("\n" + json.dumps(summary, indent=2, default=str))
    finally:
        node.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
