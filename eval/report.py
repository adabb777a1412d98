"""Render comparison summaries (eval.compare) as a text table or markdown."""

from __future__ import annotations


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


_COLS = [  # header, key, format
    ("requests", "requests", "d"),
    ("att SLOs-Serve", "attainment_slos_serve", ".1%"),
    ("att AdaServe", "attainment_adaserve", ".1%"),
    ("goodput req/s", "goodput_rps", ".2f"),
    ("goodput tok/s", "goodput_tps", ".0f"),
    ("TTFT p50 s", "ttft_p50_s", ".3f"),
    ("TTFT p99 s", "ttft_p99_s", ".3f"),
    ("TPOT p50 ms", "tpot_p50_s", "ms"),
    ("TPOT p99 ms", "tpot_p99_s", "ms"),
    ("rejected", "rejected", "d"),
    ("unfinished", "unfinished", "d"),
]


def _cell(group: dict, key: str, fmt: str) -> str:
    v = group.get(key)
    if fmt == "ms":
        return _f(None if v is None else v * 1000, ".1f")
    return _f(v, fmt)


def rows(results: dict[str, dict], capacity: dict[str, dict] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one 'all' row per policy, then one row per SLO class, then a
    '(loops)' row for agent sessions (a loop counts as met iff all its calls are)."""
    header = ["policy", "class"] + [h for h, _, _ in _COLS] + (["capacity req/s"] if capacity else [])
    out = []
    for policy, res in results.items():
        groups = [("all", res["overall"])] + list(res["classes"].items())
        for cls, g in groups:
            row = [policy, cls] + [_cell(g, k, f) for _, k, f in _COLS]
            if capacity:
                row.append(_f(capacity.get(policy, {}).get("rate"), ".2f") if cls == "all" else "")
            out.append(row)
        sess = res.get("sessions") or {}
        if sess.get("sessions"):
            row = [policy, "(loops)", str(sess["sessions"]), _f(sess["attainment_slos_serve"], ".1%"),
                   _f(sess["attainment_adaserve"], ".1%")] + ["-"] * (len(_COLS) - 3)
            out.append(row + ([""] if capacity else []))
    return header, out


def text_table(results: dict[str, dict], capacity: dict[str, dict] | None = None) -> str:
    header, body = rows(results, capacity)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out, last = [line(header), "  ".join("-" * w for w in widths)], None
    for r in body:
        if last is not None and r[0] != last:
            out.append("")
        out.append(line(r))
        last = r[0]
    return "\n".join(out)


def markdown_table(results: dict[str, dict], capacity: dict[str, dict] | None = None) -> str:
    header, body = rows(results, capacity)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)
