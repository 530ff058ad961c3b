"""Cron schedules for jobs: validation, next run times, scheduled slots.

Only the classic 5-field syntax that every cron understands is accepted (numbers, ``*``,
ranges ``a-b``, steps ``/n``, lists ``,``, and single month/weekday names), so the lines
``batchmask jobs crontab`` prints are valid for cronie, Debian/Vixie cron, busybox crond,
systemd (after conversion) and Kubernetes. Extensions such as ``@daily``, ``L``, ``#``,
``?``, ``H`` and a seconds field are rejected.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_SYSTEMD_DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    lo: int
    hi: int
    names: tuple[str, ...] = ()
    names_base: int = 0


_SPECS = (
    _FieldSpec("minute", 0, 59),
    _FieldSpec("hour", 0, 23),
    _FieldSpec("day of month", 1, 31),
    _FieldSpec("month", 1, 12, tuple(_MONTHS), 1),
    _FieldSpec("day of week", 0, 7, tuple(_DAYS), 0),
)

_TOKEN = re.compile(r"^(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?$")


def validate_timezone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, IsADirectoryError) as exc:
        raise ValueError("unknown timezone (use an IANA name such as 'UTC' or 'Europe/Paris')") from exc


def _parse_field(text: str, spec: _FieldSpec) -> set[int]:
    low = text.lower()
    if spec.names and low in spec.names:
        return {spec.names.index(low) + spec.names_base}
    values: set[int] = set()
    for part in text.split(","):
        m = _TOKEN.match(part)
        if not m:
            hint = f" (names such as {spec.names[0]!r} only alone, not in lists or ranges)" if spec.names else ""
            raise ValueError(f"{spec.name} field {text!r}: {part!r} is not a number, '*', range or step{hint}")
        star, a, b, step = m.group(1) == "*", m.group(2), m.group(3), m.group(4)
        lo, hi = (spec.lo, spec.hi) if star else (int(a), int(b) if b is not None else int(a))
        if step is not None and not star and b is None:
            # "5/15" is a cronie extension that Debian/Vixie cron rejects
            raise ValueError(f"{spec.name} field {text!r}: write {part!r} as '{a}-{spec.hi}/{step}' (portable)")
        for v in (lo, hi):
            if not spec.lo <= v <= spec.hi:
                raise ValueError(f"{spec.name} field {text!r}: {v} out of range {spec.lo}-{spec.hi}")
        if lo > hi:
            raise ValueError(f"{spec.name} field {text!r}: range {lo}-{hi} goes backwards")
        n = int(step) if step is not None else 1
        if not 1 <= n <= spec.hi:
            raise ValueError(f"{spec.name} field {text!r}: step must be between 1 and {spec.hi}")
        values.update(range(lo, hi + 1, n))
    return values


def parse_cron(expr: str) -> list[set[int]]:
    """The five fields of a cron expression as value sets (day of week 7 folded to 0)."""
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError("empty cron expression")
    parts = expr.split()
    if expr.strip().startswith("@"):
        raise ValueError("'@' shortcuts are not accepted; write the 5 fields (e.g. '0 0 * * *' for @daily)")
    if len(parts) != 5:
        raise ValueError(f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}")
    sets = [_parse_field(p, s) for p, s in zip(parts, _SPECS, strict=True)]
    if 7 in sets[4]:
        sets[4] = (sets[4] - {7}) | {0}
    return sets


def validate_cron(expr: str) -> str:
    """Raise ValueError with a readable reason if ``expr`` is not a portable 5-field cron line."""
    parse_cron(expr)
    if not croniter.is_valid(expr):
        raise ValueError("not a valid cron expression")
    return expr


def _now(tz: str, now: dt.datetime | None) -> dt.datetime:
    zone = validate_timezone(tz)
    if now is None:
        return dt.datetime.now(zone)
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    return now.astimezone(zone)


def next_runs(expr: str, tz: str = "UTC", n: int = 3, now: dt.datetime | None = None) -> list[dt.datetime]:
    """The next ``n`` scheduled times after ``now``, timezone-aware in ``tz``."""
    it = croniter(expr, _now(tz, now))
    return [it.get_next(dt.datetime) for _ in range(n)]


def current_slot(expr: str, tz: str = "UTC", now: dt.datetime | None = None) -> dt.datetime:
    """The most recent scheduled time at or before ``now`` (the slot a cron run belongs to)."""
    start = _now(tz, now)
    probe = start.replace(second=0, microsecond=0)
    if croniter.match(expr, probe):
        return probe
    return croniter(expr, start).get_prev(dt.datetime)


def is_slot(expr: str, tz: str, when: dt.datetime) -> bool:
    """True when ``when`` (seconds ignored; naive = in ``tz``) is one of the schedule's run times.

    Same rule as :func:`next_runs` (so a time that does not exist in spring is matched where the
    run really happens): the first scheduled time after the minute before ``when`` is ``when``.
    """
    zone = validate_timezone(tz)
    t = when.replace(tzinfo=zone) if when.tzinfo is None else when
    t = t.astimezone(dt.UTC).replace(second=0, microsecond=0)
    nxt = croniter(expr, (t - dt.timedelta(minutes=1)).astimezone(zone)).get_next(dt.datetime)
    return nxt.astimezone(dt.UTC) == t


def dom_dow_is_or(expr: str) -> bool:
    """True when cron fires on day-of-month OR day-of-week (both fields restricted, no leading '*')."""
    parts = expr.split()
    return not parts[2].startswith("*") and not parts[4].startswith("*")


def to_on_calendar(expr: str, tz: str = "UTC") -> str:
    """A systemd ``OnCalendar=`` value equivalent to a cron expression.

    Raises ValueError where systemd cannot express the cron meaning: when both day of month and
    day of week are restricted, cron fires when *either* matches, systemd only when both do.
    """
    sets = parse_cron(expr)
    parts = expr.split()
    if dom_dow_is_or(expr):
        raise ValueError(
            f"cannot convert {expr!r} to systemd OnCalendar: cron runs when day-of-month OR day-of-week "
            "matches, systemd only when both match; use two jobs or --format cron"
        )

    def field(i: int, width: int = 2) -> str:
        spec = _SPECS[i]
        full = set(range(spec.lo, spec.hi + 1)) - ({7} if i == 4 else set())
        if parts[i] == "*" or sets[i] == full:
            return "*"
        return ",".join(f"{v:0{width}d}" for v in sorted(sets[i]))

    dow = ""
    if field(4) != "*":
        dow = ",".join(_SYSTEMD_DAYS[v] for v in sorted(sets[4])) + " "
    return f"{dow}*-{field(3)}-{field(2)} {field(1)}:{field(0)}:00 {tz}"


def spring_forward_runs(expr: str, tz: str = "UTC", years: int = 10,
                        now: dt.datetime | None = None) -> list[dt.datetime]:
    """Runs (UTC) in the next ``years`` that fall on a local time skipped by a DST change.

    :func:`next_runs` (croniter: what ``jobs list`` shows, and what cron does) moves a time that
    does not exist, e.g. 02:30 Europe/Paris on the last Sunday of March, to the next valid time
    (03:00); systemd's ``OnCalendar=*-*-* 02:30:00 Europe/Paris`` skips that day instead
    (``systemd-analyze calendar`` shows it). These are the moved runs, to give systemd as dates.
    """
    zone = validate_timezone(tz)
    start = (now or utcnow()).astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    end = start + dt.timedelta(days=366 * years)
    out: list[dt.datetime] = []
    day, prev = start, start.astimezone(zone).utcoffset()
    while day < end:  # a day at a time, then the hour where the offset grew (a gap in local time)
        nxt = day + dt.timedelta(days=1)
        off = nxt.astimezone(zone).utcoffset()
        if off is not None and prev is not None and off > prev:
            t = day
            while (t + dt.timedelta(hours=1)).astimezone(zone).utcoffset() == prev:
                t += dt.timedelta(hours=1)
            gap = t + dt.timedelta(hours=1)  # first instant with the new offset
            it = croniter(expr, (gap - dt.timedelta(minutes=1)).astimezone(zone))
            run = it.get_next(dt.datetime)
            local = run.replace(tzinfo=None)
            if run - gap < off - prev + dt.timedelta(minutes=1) and not croniter.match(expr, local):
                out.append(run.astimezone(dt.UTC))
        day, prev = nxt, off
    return out


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
