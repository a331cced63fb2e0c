# -*- test-case-name: tests.test_ledger_report -*-
"""
The report as text for a terminal: a few headed tables, plain ASCII rules,
numbers right-aligned. Used counts carry ">=" and headroom "<=": the proxy
only sees its own traffic.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

__all__ = ["renderText", "table"]

_PERIODS = ((7 * 86400, "w"), (86400, "d"), (3600, "h"), (60, "m"), (1, "s"))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> List[str]:
    """
    Lines of a table: a header, a rule, the rows; columns as wide as their
    widest cell, the C{numeric} ones right-aligned.
    """
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))]
        return "  ".join(parts).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells]


def plural(n: int, stem: str, one: str = "", many: str = "s") -> str:
    """C{n} and the word: 1 event, 2 events; 1 proxy, 3 proxies."""
    return f"{n} {stem}{one if n == 1 else many}"


def period(seconds: float) -> str:
    """3h, 7d, 1w, 90m: the largest unit that divides the period."""
    seconds = int(seconds)
    for size, unit in _PERIODS:
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def key(value: Mapping[str, Any]) -> str:
    """A bucket key as name=value pairs."""
    parts = []
    for name, v in sorted(value.items()):
        parts.append(f"{name}={','.join(v) if isinstance(v, list) else v}")
    return " ".join(parts)


def failures(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} x{n}" for name, n in counts.items()) or "-"


def expiry(counts: Mapping[str, int]) -> str:
    bad = [f"{counts[s]} {s}" for s in ("expired", "expiring") if counts.get(s)]
    return ", ".join(bad) or (f"{counts.get('ok', 0)} ok" if counts.get("ok") else "-")


def headroom(entries: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for h in entries:
        label = h["limit"]
        if "identifier" in h["key"]:
            label += f" ({h['key']['identifier']})"
        parts.append(f"{label} <={h['headroom']}/{h['capacity']} left")
    return "; ".join(parts) or "-"


def renderText(report: Mapping[str, Any]) -> str:
    """The whole report as text."""
    events = report["events"]
    out: List[str] = [f"keychestamp report at {report['generated_at']}"]
    span = f"{events['first']} .. {events['last']}" if events["first"] else "no events"
    out.append(
        f"{plural(events['read'], 'event')} from {plural(len(report['proxies']), 'prox', 'y', 'ies')} in "
        f"{plural(len(report['files']), 'file')} ({span})"
        + (f"; tallies since {report['since']}" if report["since"] else "")
    )
    if events["duplicates"] or events["skipped"]:
        out.append(f"{events['duplicates']} duplicate events and {events['skipped']} unreadable lines skipped")
    out.append("All figures are lower bounds: only traffic through these proxies is counted.")

    def section(title: str, lines: List[str]) -> None:
        out.extend(["", title, ""] + (lines if len(lines) > 2 else ["(none)"]))

    section("Accounts", table(
        ["SERVER", "ACCOUNT", "ORDERS", "CERTS", "FAILURES", "HEADROOM", "CERTIFICATES", "CLIENTS"],
        [[a["server"], a["account"] or "(none)", a["orders"], a["certificates"], failures(a["failures"]),
          headroom([h for h in a["headroom"] if h["limit"] == "new-orders-per-account"]),
          expiry(a["certificates_by_expiry"]), ", ".join(a["clients"]) or "-"] for a in report["accounts"]],
        numeric=(2, 3),
    ))
    section("Registered domains", table(
        ["DOMAIN", "ORDERS", "CERTS", "FAILURES", "HEADROOM", "CERTIFICATES"],
        [[d["registered_domain"], d["orders"], d["certificates"], failures(d["failures"]),
          headroom(d["headroom"]), expiry(d["certificates_by_expiry"])] for d in report["registered_domains"]],
        numeric=(1, 2),
    ))
    section("Client addresses", table(
        ["CLIENT", "ORDERS", "CERTS", "FAILURES", "CERTIFICATES", "ACCOUNTS"],
        [[c["client"] or "(none)", c["orders"], c["certificates"], failures(c["failures"]),
          expiry(c["certificates_by_expiry"]), ", ".join(f"{a['server']} {a['account']}" for a in c["accounts"])]
         for c in report["clients"]],
        numeric=(1, 2),
    ))
    section("Limits in use (fullest first)", table(
        ["SERVER", "LIMIT", "KEY", "USED", "CAPACITY", "PERIOD", "HEADROOM", "FULL AGAIN"],
        [[b["server"], b["limit"], key(b["key"]), f">={b['used']}", b["capacity"], period(b["period_s"]),
          f"<={b['headroom']}", b["full_at"] or "now"] for b in report["limits"]],
        numeric=(3, 4, 6),
    ))
    section("Certificates by expiry", table(
        ["NOT AFTER", "DAYS", "STATE", "IDENTIFIERS", "SERIAL", "SERVER", "ACCOUNT"],
        [[c["not_after"], f"{c['days_left']:.1f}", c["state"], ",".join(c["identifiers"]), c["serial"],
          c["server"], c["account"] or "-"] for c in report["certificates"]],
        numeric=(1,),
    ))
    section("Active conditions", table(
        ["EVENT", "SERVER", "WHAT"],
        [[c["msg"], c["server"], _condition(c)] for c in report["conditions"]],
    ))
    return "\n".join(out) + "\n"


def _condition(c: Dict[str, Any]) -> str:
    if c["msg"] == "rate-limit-warning":
        return f"{c['limit']} {key(c['key'])}: >={c['used']}/{c['capacity']} (passed {c['level']} %)"
    if c["msg"] == "client-failing":
        problem = c["problem"].get("type", "") if isinstance(c["problem"], dict) else ""
        problem = problem.rsplit(":", 1)[-1] or "unknown problem"
        return f"{c['account']} {','.join(c['identifiers'])}: {c['failures']} failures in a row, last {problem}"
    return f"{','.join(c['identifiers'])} serial {c['serial']} expires {c['not_after']} ({c['days_left']} days)"
