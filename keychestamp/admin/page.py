# -*- test-case-name: tests.test_admin -*-
"""
The status page: one self-contained HTML document rendered on the server.

No script, no asset from anywhere (the style is inline, the charts are
inline SVG), so it works with JavaScript off and behind any firewall; it
reloads itself every 30 seconds with a meta refresh. Every value goes
through L{esc}: user agents, identifiers and problem details come from
clients and servers and must never become markup.
"""

from __future__ import annotations

import html
import time
from typing import Any, Dict, List, Optional, Sequence

from keychestamp.admin.stats import shortProblem

REFRESH_SECONDS = 30

#: The most rows a table shows (status.json has them all).
MAX_ROWS = 200

STYLE = """
body{font:13px/1.35 system-ui,sans-serif;margin:1em 1.5em;color:#222;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.2em 0 .4em;border-bottom:1px solid #ccc}
h3{font-size:1em;margin:.8em 0 .3em}td.agent{max-width:26em}header p{margin:.3em 0}
table{border-collapse:collapse;background:#fff}th,td{border:1px solid #ddd;padding:.25em .5em;
text-align:left;vertical-align:top}th{background:#eee}td.num{text-align:right}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:.1em 1em;margin:0}dt{color:#555}dd{margin:0}
.health{display:inline-block;padding:.2em .6em;border-radius:3px;font-weight:bold}
.health.ok{background:#d7f5dd;color:#14532d}.health.bad{background:#fde2e1;color:#7f1d1d}
tr.failing td{background:#fff1f0}.mark{background:#b91c1c;color:#fff;font-weight:bold;font-size:.8em;
padding:0 .35em;border-radius:2px;margin-right:.4em}.ok-mark{color:#15803d}.problem{color:#b91c1c}
.small{font-size:.85em;color:#555}.expired td{background:#fde2e1}.soon td{background:#fff7e0}
.empty{color:#777;font-style:italic}footer{margin-top:2em;color:#666;font-size:.85em}
code{font-size:.9em;word-break:break-all}td.addr code{word-break:normal;white-space:nowrap}
"""


def esc(value: Any) -> str:
    """
    Any value as HTML text: markup characters and quotes escaped.
    """
    return html.escape("" if value is None else str(value), quote=True)


def when(seconds: Optional[float]) -> str:
    """
    POSIX seconds as UTC text.
    """
    if seconds is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def duration(seconds: float) -> str:
    """
    A duration the way people say it: "3 d 4 h", "12 min", "40 s".
    """
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"


def ago(now: float, then: Optional[float]) -> str:
    """
    "3 min ago", or "never".
    """
    return "never" if then is None else f"{duration(now - then)} ago"


def _table(headers: Sequence[str], rows: List[str], empty: str) -> str:
    """
    A table of pre-escaped rows (at most L{MAX_ROWS}), or a note when empty.
    """
    if not rows:
        return f'<p class="empty">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    more = ""
    if len(rows) > MAX_ROWS:
        more = f'<p class="small">{len(rows) - MAX_ROWS} more rows in status.json</p>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows[:MAX_ROWS])}</tbody></table>{more}"


def header(status: Dict[str, Any]) -> str:
    """
    The health verdict and the proxy's facts.
    """
    health = status["health"]
    if health["ok"]:
        badge = '<span class="health ok" id="health">healthy</span>'
    else:
        badge = '<span class="health bad" id="health">unhealthy: {}</span>'.format(
            esc("; ".join(health["reasons"])))
    facts = [
        ("Proxy id", f'<code id="proxy-id">{esc(status["proxy"])}</code>'),
        ("Version", esc(status["version"])),
        ("Host", esc(status.get("host") or "")),
        ("Uptime", f'<span id="uptime">{esc(duration(status["uptime"]))}</span> '
                   f'<span class="small">(since {esc(when(status["started"]))})</span>'),
        ("Events per minute", f'<span id="events-per-minute">{esc(status["events"]["per_minute"])}</span>'
                              f' <span class="small">(5-minute average; {esc(status["events"]["total"])} '
                              'since start)</span>'),
        ("Open client connections", esc(status["connections"])),
    ]
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts)
    return f'<header><h1>keychestamp status</h1><p>{badge}</p><dl class="facts">{rows}</dl></header>'


def clients(status: Dict[str, Any]) -> str:
    """
    The ACME clients, failing ones first and marked.
    """
    now = status["now"]
    rows = []
    for c in status["clients"]:
        if c["failing"]:
            mark = '<span class="mark">FAILING</span>'
            state = f'<br><span class="small">failing for {esc(duration(now - c["failing_since"]))}</span>'
        else:
            mark, state = "", ""
        agents = "<br>".join(f"<code>{esc(a)}</code>" for a in c["agents"]) or '<span class="empty">none</span>'
        accounts = "<br>".join(
            f'<code title="{esc(a["server"])}">{esc(a["account"])}</code>' for a in c["accounts"]
        ) or '<span class="empty">none</span>'
        outcome = c["last_outcome"]
        if outcome == "ok":
            result = '<span class="ok-mark">ok</span>'
        else:
            result = f'<span class="problem">{esc(outcome)}</span> <code>{esc(shortProblem(c["last_failure"]))}</code>'
            if c["last_detail"]:
                result += f'<br><span class="small">{esc(c["last_detail"])}</span>'
        rows.append(
            f'<tr class="{"failing" if c["failing"] else "ok"}" data-client="{esc(c["address"])}">'
            f'<td class="addr">{mark}<code>{esc(c["address"])}</code>{state}</td>'
            f'<td class="agent">{agents}</td><td>{accounts}</td>'
            f'<td>{esc(c["last_msg"])} at <code>{esc(c["last_server"])}</code><br>'
            f'<span class="small">{esc(c["last_time"])} UTC ({esc(ago(now, c["last_seen"]))})</span></td>'
            f"<td>{result}</td>"
            f'<td class="num">{esc(c["exchanges"])} / {esc(c["failures"])}</td></tr>'
        )
    table = _table(
        ["Address", "User agent", "Accounts", "Last exchange", "Last outcome", "Exchanges / failures"],
        rows, "No ACME client seen since start.",
    )
    return f'<section id="clients"><h2>ACME clients</h2>{table}</section>'


def hoursChart(hours: List[Dict[str, Any]]) -> str:
    """
    Orders and failures per hour as grouped bars, with the hours under them.
    """
    width, height, left, bottom, top = 900, 170, 40, 28, 18
    plot = height - bottom - top
    slot = (width - left - 10) / max(1, len(hours))
    peak = max([1] + [max(h["orders"], h["failures"]) for h in hours])
    parts = [
        f'<svg id="chart-hours" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Orders and failures per hour">',
        f'<line x1="{left}" y1="{top + plot}" x2="{width - 10}" y2="{top + plot}" stroke="#999"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" font-size="11">{peak}</text>',
        f'<text x="{left - 6}" y="{top + plot}" text-anchor="end" font-size="11">0</text>',
        f'<rect x="{left}" y="2" width="10" height="10" fill="#2563eb"/>'
        f'<text x="{left + 14}" y="11" font-size="11">orders</text>',
        f'<rect x="{left + 70}" y="2" width="10" height="10" fill="#dc2626"/>'
        f'<text x="{left + 84}" y="11" font-size="11">failures</text>',
    ]
    bar = max(2.0, slot / 2 - 2)
    for i, h in enumerate(hours):
        x = left + i * slot + 1
        label = time.strftime("%H:00", time.gmtime(h["start"]))
        for j, (kind, colour) in enumerate((("orders", "#2563eb"), ("failures", "#dc2626"))):
            value = h[kind]
            size = plot * value / peak
            parts.append(
                f'<rect class="bar-{kind}" data-value="{value}" x="{x + j * (bar + 1):.1f}" '
                f'y="{top + plot - size:.1f}" width="{bar:.1f}" height="{size:.1f}" fill="{colour}">'
                f"<title>{esc(label)} UTC: {value} {kind}</title></rect>"
            )
        if i % 3 == 0:
            parts.append(
                f'<text x="{x + slot / 2:.1f}" y="{height - 12}" text-anchor="middle" font-size="10">'
                f"{esc(label)}</text>"
            )
    parts.append("</svg>")
    total = sum(h["orders"] for h in hours), sum(h["failures"] for h in hours)
    return (
        '<section id="activity"><h2>Orders and failures per hour, last 24 h (UTC)</h2>'
        + "".join(parts)
        + f'<p class="small">{total[0]} orders, {total[1]} failures (bad nonces not counted).</p></section>'
    )


def problems(status: Dict[str, Any]) -> str:
    """
    The problem types seen, most recent first.
    """
    now = status["now"]
    rows = [
        f'<tr><td><code>{esc(p["short"])}</code></td><td class="num">{esc(p["count"])}</td>'
        f'<td>{esc(ago(now, p["last_seen"]))}</td><td><code>{esc(p["last_client"])}</code> '
        f'{esc(p["last_msg"])} at <code>{esc(p["last_server"])}</code></td>'
        f'<td class="small">{esc(p["last_detail"])}</td></tr>'
        for p in status["problems"]
    ]
    table = _table(["Type", "Count", "Last seen", "Last by", "Last detail"], rows, "No problem seen since start.")
    return f'<section id="problems"><h2>Problem types seen</h2>{table}</section>'


EXPIRY_BUCKETS = (("expired", None, 0.0), ("< 7 days", 0.0, 7.0), ("7-14 days", 7.0, 14.0),
                  ("14-30 days", 14.0, 30.0), ("30 days or more", 30.0, None))


def certificates(status: Dict[str, Any]) -> str:
    """
    Certificates by days to expiry: a bar per range, then the table.
    """
    certs = status["certificates"]
    counts = []
    for name, low, high in EXPIRY_BUCKETS:
        counts.append((name, sum(1 for c in certs if (low is None or c["days_left"] >= low)
                                 and (high is None or c["days_left"] < high))))
    peak = max([1] + [n for _, n in counts])
    bars = ['<svg id="chart-expiry" xmlns="http://www.w3.org/2000/svg" width="460" height="112" '
            'role="img" aria-label="Certificates by days to expiry">']
    for i, (name, n) in enumerate(counts):
        y = 4 + i * 21
        colour = "#dc2626" if i < 2 else ("#d97706" if i < 4 else "#16a34a")
        bars.append(
            f'<text x="110" y="{y + 13}" text-anchor="end" font-size="11">{esc(name)}</text>'
            f'<rect class="bar-expiry" data-value="{n}" x="116" y="{y}" width="{300 * n / peak:.1f}" '
            f'height="16" fill="{colour}"><title>{esc(name)}: {n}</title></rect>'
            f'<text x="{120 + 300 * n / peak:.1f}" y="{y + 13}" font-size="11">{n}</text>'
        )
    bars.append("</svg>")
    rows = []
    for c in certs:
        style = "expired" if c["days_left"] < 0 else ("soon" if c["days_left"] < 14 else "")
        rows.append(
            f'<tr class="{style}"><td class="num">{esc(c["days_left"])}</td>'
            f'<td>{"<br>".join("<code>" + esc(n) + "</code>" for n in c["names"])}</td>'
            f'<td>{esc(when(c["not_after"]))}</td><td><code>{esc(c["server"])}</code></td>'
            f'<td class="small"><code>{esc(c["serial"])}</code><br>{esc(c["issuer"])}</td>'
            f'<td><code>{esc(c["client"])}</code></td></tr>'
        )
    table = _table(["Days left", "Identifiers", "Not after", "Server", "Serial, issuer", "Client"],
                   rows, "No certificate downloaded since start.")
    return f'<section id="certificates"><h2>Certificates by days to expiry</h2>{"".join(bars)}{table}</section>'


def ratelimits(status: Dict[str, Any]) -> str:
    """
    The ledger's buckets as headroom bars, and its recent notices.
    """
    rows = status.get("ratelimits")
    if rows is None:
        body = '<p class="empty">No rate-limit ledger in this proxy.</p>'
    elif not rows:
        body = '<p class="empty">No rate-limit bucket in use.</p>'
    else:
        lines = []
        for r in rows[:50]:
            share = min(1.0, r["ratio"])
            colour = "#dc2626" if r["ratio"] >= 0.8 else ("#d97706" if r["ratio"] >= 0.5 else "#16a34a")
            window = f' per {esc(r["window"])}' if r.get("window") else ""
            lines.append(
                f'<tr><td><code>{esc(r["server"])}</code></td><td>{esc(r["limit"])}</td>'
                f'<td><code>{esc(r["key"])}</code></td><td><svg class="headroom" width="204" height="14" '
                f'xmlns="http://www.w3.org/2000/svg"><rect x="1" y="1" width="200" height="12" fill="#eee" '
                f'stroke="#bbb"/><rect class="bar-headroom" x="1" y="1" width="{200 * share:.1f}" height="12" '
                f'fill="{colour}"/></svg></td><td class="num">{esc(int(r["used"]))} / '
                f'{esc(int(r["capacity"]))}{window} ({esc(round(100 * r["ratio"]))} %)</td></tr>'
            )
        body = _table(["Server", "Limit", "Key", "Usage", "Used / limit"], lines, "")
    notices = status.get("ledger_events") or []
    if notices:
        now = status["now"]
        items = "".join(
            f'<li><code>{esc(n["msg"])}</code> at <code>{esc(n["server"])}</code>, '
            f'{esc(ago(now, n["seen"]))}: <span class="small">{esc(n["summary"])}</span></li>'
            for n in notices
        )
        body += f'<h3>Recent ledger notices</h3><ul id="ledger-events">{items}</ul>'
    return f'<section id="ratelimits"><h2>Rate-limit headroom</h2>{body}</section>'


def poster(status: Dict[str, Any]) -> str:
    """
    The poster's queue and last delivery.
    """
    p = status.get("poster")
    if p is None:
        body = '<p class="empty">Events are not posted (--noapi).</p>'
    else:
        now = status["now"]
        facts = [
            ("Collector", f'<code>{esc(p["url"])}</code>'),
            ("Backlog", f'<span id="poster-backlog">{esc(p["backlog"] if p["backlog"] is not None else "?")}'
                        "</span> events waiting"),
            ("Last delivery", f"{esc(when(p['last_delivery']))} ({esc(ago(now, p['last_delivery']))})"),
            ("Delivered / set aside since start", f"{esc(p['delivered'])} / {esc(p['dead_lettered'])}"),
            ("Failures in a row", esc(p["consecutive_failures"])),
            ("Last error", esc(p["last_error"] or "none")),
        ]
        body = '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"
    return f'<section id="poster"><h2>Event delivery</h2>{body}</section>'


def renderPage(status: Dict[str, Any]) -> bytes:
    """
    The whole page for a status document, as UTF-8.
    """
    body = "".join(
        [header(status), clients(status), hoursChart(status["hours"]), problems(status),
         certificates(status), ratelimits(status), poster(status)]
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>keychestamp {esc(status['proxy'])}</title><style>{STYLE}</style></head><body>"
        f"{body}<footer>Generated {esc(when(status['now']))}; this page reloads every "
        f'{REFRESH_SECONDS} s. Also: <a href="status.json">status.json</a>, <a href="metrics">metrics</a>, '
        '<a href="healthz">healthz</a>.</footer></body></html>\n'
    ).encode("utf-8")
