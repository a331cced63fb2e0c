# -*- test-case-name: tests.test_ledger_report -*-
"""
``keychestamp report`` and ``keychestamp ledger rebuild``: the ledger over
audit files.

The report replays the files (from one proxy or several) through the same
rules as the live ledger, in memory, and tallies per account, per registered
domain and per client address: orders, certificates issued, failures by
problem type, the headroom each limit has left now, and certificates by
expiry. Every figure is a lower bound: only what passed through the proxies
that wrote the files is counted. ``--json`` is the stable form
(docs/ledger.rst, "report --json").

The rebuild replays the files into a new ``ledger.sqlite`` for a working
directory: after losing the file, or to start the ledger on history.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from twisted.python import usage
from twisted.python.filepath import FilePath

from keychestamp.ledger.buckets import Bucket, Limit, emptyAt, usedCount
from keychestamp.ledger.engine import LedgerEngine
from keychestamp.ledger.limits import LimitsError, LimitTable, loadLimits
from keychestamp.ledger.replay import AuditReader
from keychestamp.ledger.store import LEDGER_FILE, Store, StoreError
from keychestamp.ledger.text import renderText

__all__ = ["REPORT_FORMAT", "buildReport", "parseDuration", "rebuild", "run"]

#: The "format" of report --json; a change that is not additive changes it.
REPORT_FORMAT = "keychestamp-report/1"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parseDuration(text: str) -> float:
    """
    Seconds in a duration: a number with an optional unit s, m, h, d or w
    (``90s``, ``30m``, ``12h``, ``7d``, ``2w``; several: ``1d12h``).

    @raise ValueError: not a duration.
    """
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration (e.g. 30m, 12h, 7d, 2w)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _seconds(value: float) -> Any:
    return int(value) if float(value).is_integer() else value


def _iso(t: Optional[float]) -> Optional[str]:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class _Tally:
    """Counts of the facts the engine reports, per account, domain and client."""

    def __init__(self, since: Optional[float]) -> None:
        self.since = since
        self.accounts: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self.domains: Dict[str, Dict[str, Any]] = {}
        self.clients: Dict[str, Dict[str, Any]] = {}

    @staticmethod
    def _entry(table: Dict[Any, Dict[str, Any]], key: Any) -> Dict[str, Any]:
        entry = table.get(key)
        if entry is None:
            entry = table[key] = {"orders": 0, "certificates": 0, "failures": {}, "related": set()}
        return entry

    def __call__(self, kind: str, fact: Dict[str, Any]) -> None:
        if self.since is not None and fact["time"] < self.since:
            return
        account = (fact["server"], fact["account"])
        entries = [self._entry(self.accounts, account), self._entry(self.clients, fact["client"])]
        entries += [self._entry(self.domains, d) for d in fact["registered_domains"]]
        if fact["client"]:
            entries[0]["related"].add(fact["client"])
        entries[1]["related"].add(account)
        for entry in entries:
            if kind == "order":
                entry["orders"] += 1
            elif kind == "issued":
                entry["certificates"] += 1
            else:
                name = fact["type"] or "unknown"
                entry["failures"][name] = entry["failures"].get(name, 0) + 1


def _headroom(row: Any, now: float) -> Dict[str, Any]:
    limit = Limit(row["limit_name"], row["capacity"], row["period"])
    bucket = Bucket(row["used"], row["at"])
    used = usedCount(bucket, limit, now)
    full = emptyAt(bucket, limit)
    return {
        "server": row["server"], "limit": limit.name, "key": json.loads(row["key"]),
        "used": used, "capacity": limit.capacity, "period_s": _seconds(limit.period),
        "headroom": max(0, limit.capacity - used), "full_at": _iso(full) if full > now else None,
        "warning": row["warned"],
    }


def buildReport(
    paths: Sequence[str],
    limits: Optional[LimitTable] = None,
    now: Optional[float] = None,
    since: Optional[float] = None,
    failingAfter: int = 3,
    expiryDays: float = 30.0,
    egress: Optional[str] = None,
    onSkip: Any = None,
) -> Dict[str, Any]:
    """
    The report over C{paths} as a JSON-ready dict (docs/ledger.rst).

    @param now: POSIX time the headroom and expiry are computed at.
    @param since: seconds; only events this recent are tallied.
    @raise OSError: a file cannot be read.
    """
    now = time.time() if now is None else now
    sinceAt = None if since is None else now - since
    tally = _Tally(sinceAt)
    store = Store(None)
    engine = LedgerEngine(store, limits, failingAfter=failingAfter, expiryDays=expiryDays, egress=egress, facts=tally)
    reader = AuditReader(paths, onSkip)
    first = last = None
    for event in reader:
        engine.handle(event)
        when = event["params"].get("epoch") if isinstance(event.get("params"), dict) else None
        if isinstance(when, (int, float)):
            first = when if first is None else min(first, when)
            last = when if last is None else max(last, when)
    engine.due(now)
    buckets = [_headroom(row, now) for row in store.buckets()]
    buckets = [b for b in buckets if b["used"] > 0 or b["warning"]]
    certs = _certificates(engine, now)
    report = {
        "format": REPORT_FORMAT,
        "generated_at": _iso(now),
        "since": _iso(sinceAt),
        "lower_bound": True,
        "files": list(paths),
        "events": {"read": reader.read, "duplicates": reader.duplicates, "skipped": reader.skipped,
                   "first": _iso(first), "last": _iso(last)},
        "proxies": sorted(reader.proxies),
        "accounts": _accounts(engine, tally, buckets, certs),
        "registered_domains": _domains(engine, tally, buckets, certs),
        "clients": _clients(tally, certs),
        "limits": sorted(buckets, key=lambda b: (-b["used"] / b["capacity"], b["server"], b["limit"],
                                                 json.dumps(b["key"]))),
        "certificates": certs,
        "conditions": _conditions(engine, buckets, certs),
    }
    store.close()
    return report


def _failures(entry: Dict[str, Any]) -> Dict[str, int]:
    return dict(sorted(entry["failures"].items()))


def _byExpiry(certs: List[Dict[str, Any]]) -> Dict[str, int]:
    result = {"expired": 0, "expiring": 0, "ok": 0}
    for cert in certs:
        result[cert["state"]] += 1
    return result


def _accounts(engine: LedgerEngine, tally: _Tally, buckets: List[Dict[str, Any]], certs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    result = []
    for (server, account), entry in sorted(tally.accounts.items()):
        headroom = [b for b in buckets if b["server"] == server and b["key"].get("account") == account]
        limits = engine.limitsFor(server)
        if "new-orders-per-account" in limits and not any(b["limit"] == "new-orders-per-account" for b in headroom):
            limit = limits["new-orders-per-account"]
            headroom.insert(0, {"server": server, "limit": limit.name, "key": {"account": account}, "used": 0,
                                "capacity": limit.capacity, "period_s": _seconds(limit.period),
                                "headroom": limit.capacity,
                                "full_at": None, "warning": 0})
        mine = [c for c in certs if c["server"] == server and c["account"] == account]
        result.append({
            "server": server, "directory": engine.directoryURL(server), "account": account,
            "orders": entry["orders"], "certificates": entry["certificates"], "failures": _failures(entry),
            "headroom": headroom, "certificates_by_expiry": _byExpiry(mine),
            "clients": sorted(entry["related"]),
        })
    return result


def _domains(engine: LedgerEngine, tally: _Tally, buckets: List[Dict[str, Any]], certs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    result = []
    for domain, entry in sorted(tally.domains.items()):
        headroom = [b for b in buckets if b["key"].get("registered_domain") == domain]
        mine = [c for c in certs if domain in c["registered_domains"]]
        result.append({
            "registered_domain": domain, "orders": entry["orders"], "certificates": entry["certificates"],
            "failures": _failures(entry), "headroom": headroom, "certificates_by_expiry": _byExpiry(mine),
        })
    return result


def _clients(tally: _Tally, certs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    result = []
    for client, entry in sorted(tally.clients.items()):
        mine = [c for c in certs if c["client"] == client]
        result.append({
            "client": client, "orders": entry["orders"], "certificates": entry["certificates"],
            "failures": _failures(entry), "certificates_by_expiry": _byExpiry(mine),
            "accounts": [{"server": s, "account": a} for s, a in sorted(entry["related"])],
        })
    return result


def _certificates(engine: LedgerEngine, now: float) -> List[Dict[str, Any]]:
    result = []
    for row in engine.store.certs():
        ids = json.loads(row["identifiers"])
        state = "expired" if row["not_after"] <= now else "expiring" if row["due"] <= now else "ok"
        result.append({
            "identifiers": ids, "registered_domains": list(engine.domains.registeredSet(ids)),
            "serial": row["serial"], "not_after": _iso(row["not_after"]),
            "days_left": round((row["not_after"] - now) / 86400.0, 1), "state": state,
            "server": row["server"], "account": row["account"], "issuer": row["issuer"], "client": row["client"],
        })
    return result


def _conditions(engine: LedgerEngine, buckets: List[Dict[str, Any]], certs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    result: List[Dict[str, Any]] = []
    for b in buckets:
        if b["warning"]:
            result.append({"msg": "rate-limit-warning", "server": b["server"], "limit": b["limit"], "key": b["key"],
                           "used": b["used"], "capacity": b["capacity"], "level": b["warning"]})
    for row in engine.store.flaggedStreaks():
        result.append({"msg": "client-failing", "server": row["server"], "account": row["account"],
                       "identifiers": json.loads(row["identifiers"]), "failures": row["failures"],
                       "problem": json.loads(row["problem"])})
    for cert in certs:
        if cert["state"] != "ok":
            result.append({"msg": "cert-expiring", "server": cert["server"], "identifiers": cert["identifiers"],
                           "serial": cert["serial"], "not_after": cert["not_after"], "days_left": cert["days_left"]})
    return result


# commands


class _LedgerOptions(usage.Options):
    optParameters = [
        ["limits", None, None, "JSON rate-limit table (as the proxy's --limits)"],
        ["failing-after", None, 3, "consecutive failures that flag a client", int],
        ["expiry-days", None, 30.0, "days before not_after a certificate counts as expiring", float],
        ["egress-ip", None, None, "the proxy's address as the CA sees it, for new-accounts-per-ip"],
    ]

    def opt_version(self) -> None:
        """print keychestamp's version and exit"""
        from keychestamp import __version__

        sys.stdout.write(__version__ + "\n")
        raise SystemExit(0)

    def parseArgs(self, *files: str) -> None:
        if not files:
            raise usage.UsageError("give at least one audit file")
        for path in files:
            if not os.access(path, os.R_OK) or os.path.isdir(path):
                raise usage.UsageError(f"cannot read {path}")
        self["files"] = list(files)

    def postOptions(self) -> None:
        if self["failing-after"] < 1:
            raise usage.UsageError("--failing-after must be at least 1")
        if self["expiry-days"] < 0:
            raise usage.UsageError("--expiry-days must not be negative")
        try:
            self["limit-table"] = loadLimits(self["limits"])
        except LimitsError as e:
            raise usage.UsageError(str(e))


class ReportOptions(_LedgerOptions):
    synopsis = "keychestamp report [--json] [--since DURATION] [options] FILE..."
    longdesc = ("Rate-limit headroom, orders, certificates, failures and expiring certificates per "
                "account, registered domain and client address, from audit files. Figures are lower bounds.")
    optFlags = [["json", None, "print the report as JSON (stable format, see docs/ledger.rst)"]]
    optParameters = _LedgerOptions.optParameters + [
        ["since", None, None, "tally only the last DURATION (30m, 12h, 7d, 2w); headroom always uses all"],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if self["since"] is not None:
            try:
                self["since"] = parseDuration(self["since"])
            except ValueError as e:
                raise usage.UsageError(f"--since: {e}")


class RebuildOptions(_LedgerOptions):
    synopsis = "keychestamp ledger rebuild [-e DIR] [options] FILE..."
    longdesc = ("Rebuild the working directory's ledger.sqlite from audit files. The proxy using "
                "that directory must be stopped.")
    optParameters = _LedgerOptions.optParameters + [
        ["etc", "e", None, "working directory (default: $KC_CONFIG_DIR, else ~/.keychestamp)"],
    ]


def rebuild(
    workdir: str, paths: Sequence[str], limits: Optional[LimitTable] = None, now: Optional[float] = None,
    failingAfter: int = 3, expiryDays: float = 30.0, egress: Optional[str] = None, onSkip: Any = None,
) -> AuditReader:
    """
    Replace C{workdir}/ledger.sqlite by one rebuilt from C{paths}. Nothing
    is emitted: what fell due is emitted by the proxy when it next starts.

    @raise OSError: a proxy holds the working directory, or a file fails.
    @raise StoreError: the new ledger cannot be written.
    """
    now = time.time() if now is None else now
    lockPath = os.path.join(workdir, "event-id")
    lock = os.open(lockPath, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(f"a keychestamp proxy is running on {workdir}; stop it first") from None
        target = os.path.join(workdir, LEDGER_FILE)
        tmp = target + ".rebuild"
        for suffix in ("", "-wal", "-shm"):
            _remove(tmp + suffix)
        store = Store(tmp)
        try:
            engine = LedgerEngine(store, limits, failingAfter=failingAfter, expiryDays=expiryDays, egress=egress)
            reader = AuditReader(paths, onSkip)
            for event in reader:
                engine.handle(event)
            engine.prune(now)
        finally:
            store.close()
        for suffix in ("-wal", "-shm"):
            _remove(target + suffix)
        os.replace(tmp, target)
        return reader
    finally:
        os.close(lock)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _parse(options: usage.Options, argv: Sequence[str], command: str, stderr: TextIO) -> bool:
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        stderr.write(f"keychestamp {command}: error: {e}\n")
        return False
    return True


def reportMain(argv: Sequence[str], stdout: TextIO, stderr: TextIO, now: Optional[float] = None) -> int:
    """C{keychestamp report ARGV}; returns the exit status."""
    options = ReportOptions()
    try:
        if not _parse(options, argv, "report", stderr):
            return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    skipped: List[str] = []
    try:
        report = buildReport(
            options["files"], options["limit-table"], now=now, since=options["since"],
            failingAfter=options["failing-after"], expiryDays=options["expiry-days"], egress=options["egress-ip"],
            onSkip=lambda path, n, why: skipped.append(f"{path}:{n}: {why}"),
        )
    except (OSError, StoreError) as e:
        stderr.write(f"keychestamp report: error: {e}\n")
        return 1
    for line in skipped[:10]:
        stderr.write(f"keychestamp report: skipped {line}\n")
    if options["json"]:
        stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    else:
        stdout.write(renderText(report))
    return 0


def rebuildMain(argv: Sequence[str], stdout: TextIO, stderr: TextIO, environ: Optional[Dict[str, str]] = None) -> int:
    """C{keychestamp ledger rebuild ARGV}; returns the exit status."""
    from keychestamp.options import defaultWorkDir

    options = RebuildOptions()
    try:
        if not _parse(options, argv, "ledger rebuild", stderr):
            return 2
    except SystemExit as e:
        return int(e.code or 0)
    workdir = os.path.abspath(options["etc"] or defaultWorkDir(dict(os.environ if environ is None else environ)))
    if not FilePath(workdir).isdir():
        stderr.write(f"keychestamp ledger rebuild: error: no working directory {workdir}\n")
        return 2
    try:
        reader = rebuild(
            workdir, options["files"], options["limit-table"], failingAfter=options["failing-after"],
            expiryDays=options["expiry-days"], egress=options["egress-ip"],
        )
    except (OSError, StoreError) as e:
        stderr.write(f"keychestamp ledger rebuild: error: {e}\n")
        return 1
    stdout.write(
        f"rebuilt {os.path.join(workdir, LEDGER_FILE)} from {reader.read} events in {len(options['files'])} "
        f"file(s); {reader.duplicates} duplicates and {reader.skipped} unreadable lines skipped\n"
    )
    return 0


def run(argv: Sequence[str], stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None) -> Optional[int]:
    """
    Run C{keychestamp report ...} or C{keychestamp ledger rebuild ...} and
    return the exit status; None when C{argv} is neither (the proxy runs).
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    if argv[:1] == ["report"]:
        return reportMain(argv[1:], out, err)
    if argv[:1] == ["ledger"]:
        if argv[1:2] == ["rebuild"]:
            return rebuildMain(argv[2:], out, err)
        err.write("keychestamp ledger: error: the only ledger command is 'rebuild'\n")
        return 2
    return None

