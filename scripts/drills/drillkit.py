"""Shared pieces of the compose drills (Python 3 standard library only).

Each drill under scripts/drills/ imports this module: it knows the cluster
of docker-compose.yml (three nodes with fixed IPs, HTTP published on
127.0.0.1:17071..17073), talks to the nodes over HTTP, drives Docker, runs
a write load that records every acknowledged write, and prints the verdict.

    drill ──► Cluster (docker / docker compose, HTTP on the published ports)
          ──► Load (writer threads: follow not_primary, record each ack)
          ──► Verdict (measurements, checks ─► PASS/FAIL, exit code)

Environment: MIRRORDB_COMPOSE_FILES (colon-separated, default
docker-compose.yml), COMPOSE_PROJECT_NAME (as docker compose uses it),
MIRRORDB_APP_TOKEN and MIRRORDB_OPS_TOKEN (the compose file's defaults),
MIRRORDB_DRILL_WRITERS (writer threads, default 4).
"""

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODES = ["n1", "n2", "n3"]
IP = {"n1": "172.28.0.11", "n2": "172.28.0.12", "n3": "172.28.0.13"}
HOST_PORT = {"n1": 17071, "n2": 17072, "n3": 17073}
APP_TOKEN = os.environ.get("MIRRORDB_APP_TOKEN", "mirrordb-dev-app-token-0001")
OPS_TOKEN = os.environ.get("MIRRORDB_OPS_TOKEN", "mirrordb-dev-ops-token-0001")
COMPOSE_FILES = [f for f in os.environ.get("MIRRORDB_COMPOSE_FILES", "docker-compose.yml").split(":") if f]
WRITERS = int(os.environ.get("MIRRORDB_DRILL_WRITERS", "4"))
# Limits: every wait in a drill is bounded.
HTTP_TIMEOUT_S = 3.0
PROBE_TIMEOUT_S = 0.7
SCAN_PAGE = 10000

_T0 = time.monotonic()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------- processes

_compose_base = None


def compose_base():
    """`docker compose` (v2) when it works, else `docker-compose` (v1)."""
    global _compose_base
    if _compose_base is None:
        try:
            ok = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        base = ["docker", "compose"] if ok else ["docker-compose"]
        for f in COMPOSE_FILES:
            base += ["-f", os.path.join(ROOT, f)]
        _compose_base = base
    return list(_compose_base)


def run(cmd, check=True, timeout=300, quiet=False):
    """Runs a command, answers (returncode, stdout, stderr)."""
    if not quiet:
        log("$ " + " ".join(cmd))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        if check:
            raise DrillError(f"timed out after {timeout} s: {' '.join(cmd)}")
        return 124, "", "timeout"
    if check and p.returncode != 0:
        raise DrillError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p.returncode, p.stdout, p.stderr


def compose(*args, check=True, timeout=300, quiet=False):
    return run(compose_base() + list(args), check=check, timeout=timeout, quiet=quiet)


def docker(*args, check=True, timeout=120, quiet=False):
    return run(["docker"] + list(args), check=check, timeout=timeout, quiet=quiet)


class DrillError(Exception):
    """A drill step that could not be carried out."""


# ---------------------------------------------------------------------- HTTP


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


class Resp:
    """An HTTP answer; status None when the node could not be reached."""

    def __init__(self, status, headers=None, body=b"", error=None):
        self.status = status
        self.headers = headers or {}
        self.body = body
        self.error = error

    def json(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None

    def code(self):
        j = self.json()
        if isinstance(j, dict) and isinstance(j.get("error"), dict):
            return j["error"].get("code")
        return None

    def __repr__(self):
        if self.status is None:
            return f"<unreachable: {self.error}>"
        return f"<{self.status} {self.body[:200]!r}>"


def request(method, url, body=None, token=None, timeout=HTTP_TIMEOUT_S):
    data = None
    headers = {}
    if body is not None:
        data = json.dumps(body).encode("utf-8") if not isinstance(body, bytes) else body
        headers["content-type"] = "application/json"
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _opener.open(req, timeout=timeout) as r:
            return Resp(r.status, dict(r.headers), r.read())
    except urllib.error.HTTPError as e:
        try:
            b = e.read()
        except OSError:
            b = b""
        return Resp(e.code, dict(e.headers or {}), b)
    except (OSError, ValueError) as e:  # URLError, timeouts, resets
        return Resp(None, error=str(e))


def url(node, path):
    return f"http://127.0.0.1:{HOST_PORT[node]}{path}"


def node_of(location):
    """The node a `Location` (http://172.28.0.12:7070/…) points at."""
    try:
        u = urllib.parse.urlsplit(location)
    except ValueError:
        return None
    for n in NODES:
        if u.hostname == IP[n] or (u.hostname in ("127.0.0.1", "localhost") and u.port == HOST_PORT[n]):
            return n
    return None


def cluster_view(node, timeout=HTTP_TIMEOUT_S):
    r = request("GET", url(node, "/v1/cluster"), token=OPS_TOKEN, timeout=timeout)
    return r.json() if r.status == 200 else None


def is_primary(node, timeout=PROBE_TIMEOUT_S):
    """GET /primary: True on a writable primary, False when it answers
    otherwise, None when unreachable."""
    r = request("GET", url(node, "/primary"), timeout=timeout)
    if r.status is None:
        return None
    return r.status == 200


def probe_primary(nodes=NODES):
    """The one node whose /primary probe answers 200, or None."""
    found = [n for n in nodes if is_primary(n)]
    return found[0] if len(found) == 1 else None


def wait_for(what, pred, timeout, interval=0.2):
    """Polls `pred` until it answers something truthy; raises after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise DrillError(f"gave up waiting after {timeout} s: {what}")
        time.sleep(interval)


def data_nodes():
    """The data (non-witness) members, from any node's view."""
    for n in NODES:
        v = cluster_view(n)
        if v and isinstance(v.get("members"), list):
            return [m["id"] for m in v["members"] if m.get("role", "data") == "data"]
    return list(NODES)


def find_primary(timeout=60, exclude=()):
    """The primary every reachable node agrees on, whose probe answers 200."""

    def agreed():
        seen = set()
        for n in NODES:
            if n in exclude:
                continue
            v = cluster_view(n, timeout=PROBE_TIMEOUT_S * 2)
            if v and v.get("primary"):
                seen.add(v["primary"])
        if len(seen) == 1:
            p = seen.pop()
            if p not in exclude and is_primary(p):
                return p
        return None

    return wait_for("a primary that every reachable node names", agreed, timeout)


def mirror_caught_up(node, primary):
    """The node is a streaming mirror of `primary` that applied the
    primary's last LSN. The primary is asked first: under load its end
    moves on, and a mirror asked before it would always look behind."""
    p = cluster_view(primary, timeout=PROBE_TIMEOUT_S * 2)
    v = cluster_view(node, timeout=PROBE_TIMEOUT_S * 2)
    if not v or not p:
        return False
    f = v.get("following") or {}
    return (
        v.get("role") == "mirror"
        and v.get("primary") == primary
        and f.get("streaming") is True
        and v.get("applied_lsn", -1) >= p.get("last_lsn", 1 << 62)
    )


def wait_ready(timeout=120):
    """Every node serves HTTP, one primary is elected and every other data
    node follows it, caught up. Answers the primary."""
    log("waiting for the cluster: a primary and caught-up mirrors")
    wait_for(
        "every node answering /health",
        lambda: all(request("GET", url(n, "/health"), timeout=PROBE_TIMEOUT_S).status == 200 for n in NODES),
        timeout,
    )
    primary = find_primary(timeout)
    mirrors = [n for n in data_nodes() if n != primary]
    wait_for(
        f"mirrors {mirrors} streaming from {primary} and caught up",
        lambda: all(mirror_caught_up(m, primary) for m in mirrors),
        timeout,
    )
    log(f"cluster ready: primary {primary}, mirrors {mirrors}")
    return primary


def scan(node, table, min_lsn=None, wait_ms=10000):
    """Every record of a table on a node, as {key: value}; None if the node
    could not answer."""
    out = {}
    after = None
    while True:
        q = {"limit": str(SCAN_PAGE)}
        if after is not None:
            q["start_after"] = after
        if min_lsn is not None:
            q["min_lsn"] = str(min_lsn)
            q["wait_ms"] = str(wait_ms)
        r = request(
            "GET",
            url(node, f"/v1/tables/{table}/records?" + urllib.parse.urlencode(q)),
            token=APP_TOKEN,
            timeout=HTTP_TIMEOUT_S + wait_ms / 1000,
        )
        if r.status == 404 and after is None:
            return {}
        if r.status != 200:
            log(f"scan of {table} on {node} failed: {r!r}")
            return None
        j = r.json() or {}
        for rec in j.get("records", []):
            out[rec["key"]] = rec["value"]
        after = j.get("next")
        if not after:
            return out


def last_lsn(node):
    v = cluster_view(node)
    return v.get("last_lsn") if v else None


# ---------------------------------------------------------------- containers


def container(node):
    _, out, _ = compose("ps", "-q", node, quiet=True)
    cid = out.strip().splitlines()
    if not cid:
        raise DrillError(f"no container for {node}: is the cluster up?")
    return cid[0]


def inspect(cid):
    _, out, _ = docker("inspect", cid, quiet=True)
    return json.loads(out)[0]


def cluster_network(cid):
    nets = inspect(cid)["NetworkSettings"]["Networks"]
    for name in nets:
        if name.endswith("_cluster") or name == "cluster":
            return name
    raise DrillError(f"container {cid[:12]} is on no *_cluster network: {list(nets)}")


def project_name():
    for n in NODES:
        try:
            labels = inspect(container(n))["Config"]["Labels"]
            return labels["com.docker.compose.project"]
        except (DrillError, KeyError):
            continue
    raise DrillError("cannot find the compose project of the cluster")


def volume_of(cid, dest):
    for m in inspect(cid)["Mounts"]:
        if m.get("Destination") == dest and m.get("Type") == "volume":
            return m["Name"]
    raise DrillError(f"container {cid[:12]} has no volume at {dest}")


def exec_json(cid, *args, timeout=20):
    """Runs the image's binary in a running container (there is no shell)."""
    code, out, err = docker("exec", cid, "/mirrordb", *args, check=False, timeout=timeout, quiet=True)
    try:
        return code, json.loads(out)
    except ValueError:
        return code, {"stdout": out.strip()[-500:], "stderr": err.strip()[-500:]}


def list_dir(cid, path):
    """Files under a path in a container (docker cp to a tar stream), as
    [(name, size)], or None when the path does not exist."""
    try:
        p = subprocess.run(["docker", "cp", f"{cid}:{path}", "-"], capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if p.returncode != 0:
        return None
    with tarfile.open(fileobj=io.BytesIO(p.stdout)) as t:
        return [(m.name, m.size) for m in t.getmembers() if m.isfile()]


def logs(node, tail=80):
    _, out, err = compose("logs", "--no-color", "--tail", str(tail), node, check=False, quiet=True)
    return (out + err).strip()


def grep_logs(node, *words, tail=2000):
    text = logs(node, tail=tail)
    return [ln for ln in text.splitlines() if any(w in ln for w in words)]


# ---------------------------------------------------------------------- load


class Load:
    """Writer threads putting `w<i>-<seq>` = {"writer","seq","run"} into a
    table. A write is retried (same key, same value: idempotent) until it is
    acknowledged; `acked` holds every acknowledged one. Writers follow
    307/503 not_primary and look for the primary with the /primary probe
    when a node cannot be reached."""

    def __init__(self, table, writers=WRITERS, pace_s=0.0):
        self.table = table
        self.writers = writers
        self.pace_s = pace_s
        self.run_id = uuid.uuid4().hex[:8]
        self.lock = threading.Lock()
        self.acked = {}  # key -> value
        self.acks = []  # (monotonic time, node)
        self.errors = {}  # code -> count
        self.unexpected = []  # answers that are not part of a failover
        self.target = None
        self.stop_flag = threading.Event()
        self.threads = []

    def start(self, primary):
        self.target = primary
        for i in range(self.writers):
            t = threading.Thread(target=self._writer, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
        log(f"load: {self.writers} writers into table {self.table} (run {self.run_id})")

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=15)
        log(f"load stopped: {len(self.acked)} writes acknowledged, errors {self.errors}")

    def _count(self, code):
        with self.lock:
            self.errors[code] = self.errors.get(code, 0) + 1

    def _rediscover(self, bad):
        for n in NODES:
            if n != bad and is_primary(n):
                return n
        return None

    def _writer(self, i):
        seq = 0
        node = self.target
        while not self.stop_flag.is_set():
            key = f"w{i}-{seq:07d}"
            value = {"writer": i, "seq": seq, "run": self.run_id}
            while not self.stop_flag.is_set():
                r = request(
                    "PUT",
                    url(node, f"/v1/tables/{self.table}/records/{key}"),
                    body=value,
                    token=APP_TOKEN,
                )
                if r.status is not None and 200 <= r.status < 300:
                    with self.lock:
                        self.acked[key] = value
                        self.acks.append((time.monotonic(), node))
                        self.target = node
                    seq += 1
                    break
                code = r.code() if r.status is not None else "unreachable"
                self._count(code or str(r.status))
                loc = r.headers.get("Location") or r.headers.get("location")
                if r.status in (307, 503) and code == "not_primary" and loc and node_of(loc):
                    node = node_of(loc)
                    time.sleep(0.02)
                    continue
                if r.status is None or code in ("not_primary", "shutting_down", "unavailable"):
                    time.sleep(0.05)
                    with self.lock:
                        shared = self.target
                    node = shared if shared != node else (self._rediscover(node) or NODES[(NODES.index(node) + 1) % 3])
                    continue
                if code == "write_blocked" or r.status == 503:
                    # Not acknowledged; may or may not be applied: retried
                    # with the same value.
                    time.sleep(0.05)
                    continue
                with self.lock:
                    self.unexpected.append(f"{node} {key}: {r!r}")
                time.sleep(0.2)
            if self.pace_s:
                time.sleep(self.pace_s)

    def first_ack_after(self, t, not_node=None):
        with self.lock:
            for at, n in self.acks:
                if at >= t and n != not_node:
                    return at, n
        return None

    def longest_pause(self, t_from=None, t_to=None):
        """(seconds, start) of the longest gap between two acknowledged
        writes (any writer) in [t_from, t_to]."""
        with self.lock:
            times = sorted(at for at, _ in self.acks)
        if t_from is not None:
            times = [t for t in times if t >= t_from]
        if t_to is not None:
            times = [t for t in times if t <= t_to]
        best = (0.0, None)
        for a, b in zip(times, times[1:]):
            if b - a > best[0]:
                best = (b - a, a)
        return best

    def verify(self, node, min_lsn=None):
        """Every acknowledged write is on `node` with its value. Answers
        (missing, wrong, total) or None when the node cannot be read."""
        with self.lock:
            acked = dict(self.acked)
        have = scan(node, self.table, min_lsn=min_lsn)
        if have is None:
            return None
        missing = [k for k in acked if k not in have]
        wrong = [k for k in acked if k in have and have[k] != acked[k]]
        return missing, wrong, len(acked)


# ------------------------------------------------------------------- verdict


class Verdict:
    """Measurements and checks of one drill; `finish` prints the verdict
    and exits 0 only when every check passed."""

    def __init__(self, name):
        self.name = name
        self.measures = []
        self.checks = []
        self.notes = []
        log(f"drill {name}: start")

    def measure(self, key, value):
        self.measures.append((key, value))
        log(f"measured {key} = {value}")

    def check(self, ok, what):
        self.checks.append((bool(ok), what))
        log(f"{'ok  ' if ok else 'FAIL'} {what}")
        return ok

    def note(self, text):
        self.notes.append(text)
        log(f"note: {text}")

    def finish(self, error=None, logs_of=()):
        if error is not None:
            self.checks.append((False, f"drill could not complete: {error}"))
        ok = bool(self.checks) and all(c for c, _ in self.checks)
        if not ok:
            for n in logs_of:
                print(f"--- last log lines of {n} ---\n{logs(n, tail=60)}", flush=True)
        print(f"\n=== drill {self.name}: {'PASS' if ok else 'FAIL'} ===")
        for k, v in self.measures:
            print(f"  {k}: {v}")
        for c, what in self.checks:
            print(f"  [{'ok' if c else 'FAILED'}] {what}")
        for n in self.notes:
            print(f"  note: {n}")
        print(f"RESULT {self.name} {'PASS' if ok else 'FAIL'}", flush=True)
        sys.exit(0 if ok else 1)


def ms(seconds):
    return f"{seconds * 1000:.0f} ms"
