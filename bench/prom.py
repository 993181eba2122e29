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


def bucket_at(buckets, p):
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return None
    rank = max(1, -(-total * p // 100))
    return next(le for le, c in buckets if c >= rank)
