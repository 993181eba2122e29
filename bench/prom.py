"""Prometheus text helpers shared by the benchmark scripts (standard library only)."""


def histogram(text, name):
    """Cumulative buckets [(le, count)] of an unlabelled Prometheus histogram."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "_bucket{"):
            continue
        try:
            labels, value = line[len(name) + 8:].rsplit("} ", 1)
            le = labels.split('le="', 1)[1].split('"', 1)[0]
            out.append((float("inf") if le == "+Inf" else float(le), int(float(value))))
        except (IndexError, ValueError):
            continue
    return sorted(out)


def total(text, name):
    """(sum, count) of an unlabelled Prometheus histogram; (0.0, 0) if absent."""
    found = {}
    for line in text.splitlines():
        for part in ("_sum ", "_count "):
            if line.startswith(name + part):
                try:
                    found[part] = float(line[len(name + part):])
                except ValueError:
                    pass
    return found.get("_sum ", 0.0), int(found.get("_count ", 0))


def bucket_at(buckets, p):
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return None
    rank = max(1, -(-total * p // 100))
    return next(le for le, c in buckets if c >= rank)
