"""Scheduled job definitions: TOML files under ``jobs/`` (format in jobs/README.md).

A job is one incremental ``batchmask run`` with a cron schedule. This module reads and
validates definitions; scheduling and rendering live in :mod:`batchmask.jobs.schedule`,
running (lock, timeout, history) in :mod:`batchmask.jobs.execute`, Ray Jobs submission in
:mod:`batchmask.jobs.submit`.

Relative local paths in a job file (``input``, ``input_list``, ``output``, ``model``) resolve against the
directory holding the job file, never against the current directory, so cron, systemd and
a shell give the same result.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..batch.manifest import list_location_problem
from ..batch.options import JOB_FIELDS, RunOptions
from ..batch.storage import has_userinfo, is_remote, is_url
from .schedule import validate_cron, validate_timezone

#: Longest job name: the Kubernetes CronJob is named ``batchmask-<name>`` and CronJob names are
#: limited to 52 characters (Kubernetes appends an 11-character suffix for each Job), so
#: 52 - len("batchmask-") = 42. Derived names are never truncated, so they never collide.
NAME_MAX = 42

#: Job names: lowercase letters, digits and '-', 1..NAME_MAX characters, starting and ending with
#: a letter or digit. The name is used in lock files, log files, Ray submission ids, systemd
#: unit names and Kubernetes object names.
NAME_RE = re.compile(rf"^[a-z0-9]([a-z0-9-]{{0,{NAME_MAX - 2}}}[a-z0-9])?$")

#: Field names that look like credentials get a specific error message.
SECRET_HINTS = ("key", "secret", "token", "password", "credential")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class JobError(ValueError):
    """One or more problems in a job definition; ``problems`` holds one line each."""

    def __init__(self, path: str | os.PathLike, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        shown = self.path if line_unsafe(self.path) is None else repr(self.path)  # one line per problem
        super().__init__("\n".join(f"{shown}: {p}" for p in problems))


@dataclass(frozen=True)
class JobSpec:
    """A validated job definition (local paths already absolute).

    The run's options are ``run``, a :class:`~batchmask.batch.options.RunOptions`: a job file
    sets its fields listed in ``JOB_FIELDS`` (read as attributes too: ``job.workers``), plus
    ``profile`` (the storage profile, given to the run as ``storage_options``).
    """

    name: str
    schedule: str
    #: None for a job whose images come from ``input_list`` (a run option: ``job.input_list``)
    input: str | None
    output: str
    timezone: str = "UTC"
    run: RunOptions = field(default_factory=RunOptions)
    profile: str | None = None
    max_failures: int = 0
    timeout: float | None = None
    enabled: bool = True
    description: str = ""
    #: the file the job was read from (not a TOML field)
    source: str = ""

    def __getattr__(self, name: str) -> Any:
        if name in JOB_FIELDS:  # only called for names that are not fields: the run's options
            return getattr(self.run, name)
        raise AttributeError(name)

    @property
    def input_where(self) -> str:
        """The folder or prefix read, or the list of images."""
        return self.input or self.run.input_list or ""

    def runner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`batchmask.batch.runner.run`: input, output and every run option."""
        return {"input": self.input, "output": self.output, **self.run.to_kwargs()}

    def to_dict(self) -> dict[str, Any]:
        """The job file's fields (and ``source``), with their values; None for fields not set."""
        d: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "run":
                d.update({k: getattr(self.run, k) for k in JOB_FIELDS})
            else:
                d[f.name] = getattr(self, f.name)
        return d

    def to_toml(self) -> str:
        """The definition as TOML (resolved paths), e.g. to ship it to a Ray cluster."""
        return "".join(f"{k} = {_toml_value(v)}\n" for k, v in self.to_dict().items()
                       if k != "source" and v is not None)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    s = str(value)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def line_unsafe(value: str) -> str | None:
    """Why ``value`` cannot go into a crontab line or a systemd unit (both line-based), or None.

    A newline (or another control character, or a Unicode line separator) in a path would end
    the line and let the rest be read as a cron entry or a unit directive of its own.
    """
    for c in value:
        if ord(c) < 0x20 or ord(c) == 0x7F or c in "\u0085\u2028\u2029":
            return f"contains the control character {c!r}; cron and systemd files are line-based"
    return None


def resolve_path(value: str, base_dir: Path) -> str:
    """A local path made absolute against ``base_dir`` (``~`` expanded); URLs unchanged."""
    if is_url(value):
        return value
    p = Path(os.path.expanduser(value))
    if not p.is_absolute():
        p = base_dir / p
    return os.path.normpath(str(p))


def parse_duration(value: Any) -> float:
    """Seconds from an int/float or a string like ``"90s"``, ``"45m"``, ``"2h"``, ``"1d"``."""
    if isinstance(value, bool):
        raise ValueError("expected seconds (number) or a duration like '45m'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError("expected seconds (number) or a duration like '90s', '45m', '2h', '1d'")
        seconds = float(m.group(1)) * _DURATION_UNIT[m.group(2)]
    else:
        raise ValueError("expected seconds (number) or a duration like '45m'")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("must be more than 0 seconds")
    return seconds


# field -> (python types accepted, required): the job's own fields, then the run options a job sets
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), True),
    "schedule": ((str,), True),
    "timezone": ((str,), False),
    "input": ((str,), False),  # or input_list: one of them (_value_problems)
    "output": ((str,), True),
    **{k: (types, False) for k, types in JOB_FIELDS.items()},
    "profile": ((str,), False),
    "max_failures": ((int,), False),
    "timeout": ((int, float, str), False),
    "enabled": ((bool,), False),
    "description": ((str,), False),
}

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _check_location(field: str, value: str, problems: list[str]) -> None:
    if not value.strip():
        problems.append(f"field '{field}' = {value!r}: must not be empty")
        return
    if has_userinfo(value):
        problems.append(
            f"field '{field}' = <redacted>: credentials in the URL; secrets are never stored in job "
            "files (use the environment or `profile`)"
        )


def _shown(value: Any) -> str:
    """``value`` for an error message; URLs with credentials are never echoed."""
    return "<redacted>" if isinstance(value, str) and has_userinfo(value) else repr(value)


def parse_job(data: dict[str, Any], path: str | os.PathLike = "<job>") -> JobSpec:
    """Validate a parsed TOML table; raise :class:`JobError` listing every problem.

    All problems are collected in one pass: a field with the wrong type is reported once and
    skips only its own value checks (and those that need it); the other fields are checked.
    Values of unknown fields are never echoed (they could be secrets under an unhinted name).
    """
    path = Path(path)
    ok, problems = _typed_fields(data)
    problems += _value_problems(ok, path)
    timeout = None
    if "timeout" in ok:
        try:
            timeout = parse_duration(ok["timeout"])
        except ValueError as exc:
            problems.append(f"field 'timeout' = {ok['timeout']!r}: {exc}")
    if problems:
        raise JobError(path, problems)
    return _job_spec(ok, path, timeout)


def _typed_fields(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(known fields of the right type, problems: tables, unknown fields, wrong types, missing fields)."""
    problems: list[str] = []
    ok: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            problems.append(f"unexpected table [{key}]: a job file holds plain fields only")
            continue
        if key not in _FIELDS:
            if any(h in key.lower() for h in SECRET_HINTS):
                problems.append(
                    f"field '{key}': secrets are never stored in job files; credentials come from "
                    "the environment or a named profile (field 'profile')"
                )
            else:
                problems.append(f"unknown field '{key}' (known: {', '.join(_FIELDS)})")
            continue
        types, _ = _FIELDS[key]
        if not _type_ok(value, types):
            want = " or ".join(_TYPE_NAMES[t] for t in types)
            problems.append(f"field '{key}' = {_shown(value)}: expected {want}, got {type(value).__name__}")
            continue
        ok[key] = value
    problems += [f"missing required field '{key}'" for key, (_, required) in _FIELDS.items()
                 if required and key not in data]
    if "input" not in data and "input_list" not in data:
        problems.append("missing required field 'input' (a folder or prefix) or 'input_list' (a list of images)")
    return ok, problems


def _value_problems(ok: dict[str, Any], path: Path) -> list[str]:
    """Problems with the values of fields whose type is right (run options: RunOptions.problems)."""
    problems: list[str] = []
    name = ok.get("name")
    if name is not None and not NAME_RE.match(name):
        problems.append(
            f"field 'name' = {name!r}: use 1-{NAME_MAX} lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    for key, check in (("timezone", validate_timezone), ("schedule", validate_cron)):
        if key in ok:
            try:
                check(ok[key])
            except ValueError as exc:
                problems.append(f"field '{key}' = {ok[key]!r}: {exc}")
    for key in ("input", "input_list", "output", "model"):
        if key in ok:
            _check_location(key, ok[key], problems)
    problems += _input_problems(ok)
    run_fields = {k: v for k, v in ok.items() if k in JOB_FIELDS}
    problems += [f"field '{key}' = {_shown(ok[key])}: {why}" for key, why in RunOptions.problems(run_fields)]
    if "max_failures" in ok and ok["max_failures"] < 0:
        problems.append(f"field 'max_failures' = {ok['max_failures']!r}: must be 0 or more")
    endpoint = ok.get("endpoint_url")
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            problems.append(f"field 'endpoint_url' = {_shown(endpoint)}: expected an http:// or https:// URL")
        elif has_userinfo(endpoint):
            problems.append(
                "field 'endpoint_url' = <redacted>: credentials in the URL; secrets are never stored "
                "in job files (use the environment or `profile`)"
            )
    if "input" in ok and "output" in ok:  # only judged when both locations are known (a list's entries may be URLs)
        # the S3 endpoint and profile: gs:// and az:// take their settings from their own variables
        remote = [k for k in ("input", "output") if is_remote(ok[k]) and ok[k].lower().startswith(("s3://", "s3a://"))]
        for key in ("endpoint_url", "profile"):
            if key in ok and not remote:
                problems.append(f"field '{key}' = {_shown(ok[key])}: only used with s3:// input or output")
    if "glob" in ok and not ok["glob"].strip():
        problems.append("field 'glob' = '': must not be empty (leave it out for the default)")
    if path.name != "<job>":
        why = line_unsafe(str(path.resolve()))
        if why:
            problems.append(f"the job file's path {why}; rename it (it is written into cron lines)")
    return problems


def _input_problems(ok: dict[str, Any]) -> list[str]:
    """Exactly one of ``input`` and ``input_list``; a list's name says its format."""
    if "input" in ok and "input_list" in ok:
        return ["fields 'input' and 'input_list' are mutually exclusive: a job reads a folder or a list"]
    if "input_list" in ok and ok["input_list"].strip():
        why = list_location_problem(ok["input_list"])
        if why:
            return [f"field 'input_list' = {_shown(ok['input_list'])}: {why}"]
    return []


def _job_spec(ok: dict[str, Any], path: Path, timeout: float | None) -> JobSpec:
    """The JobSpec of a valid definition: local paths resolved against the job file's directory."""
    base = path.parent.resolve() if path.name != "<job>" else Path.cwd()
    run = {k: v for k, v in ok.items() if k in JOB_FIELDS}
    for key in ("model", "input_list"):
        if run.get(key):
            run[key] = resolve_path(run[key], base)
    if "threshold" in run:
        run["threshold"] = float(run["threshold"])
    if ok.get("profile"):
        run["storage_options"] = {"profile": ok["profile"]}
    return JobSpec(
        name=ok["name"],
        schedule=" ".join(ok["schedule"].split()),
        timezone=ok.get("timezone", "UTC"),
        input=resolve_path(ok["input"], base) if "input" in ok else None,
        output=resolve_path(ok["output"], base),
        run=RunOptions(**run),
        profile=ok.get("profile"),
        max_failures=ok.get("max_failures", 0),
        timeout=timeout,
        enabled=ok.get("enabled", True),
        description=ok.get("description", ""),
        source=str(path.resolve()) if path.name != "<job>" else "",
    )


def load_job(path: str | os.PathLike) -> JobSpec:
    """Read and validate one job file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise JobError(path, [f"cannot read: {exc.strerror or exc}"]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise JobError(path, [f"not UTF-8 text: {exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise JobError(path, [f"invalid TOML: {exc}"]) from exc
    return parse_job(data, path)


def job_files(paths: list[str | os.PathLike] | tuple[str | os.PathLike, ...]) -> list[Path]:
    """Job files named directly, or every ``*.toml`` directly inside named directories."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(q for q in p.glob("*.toml") if q.is_file()))
        else:
            out.append(p)
    return out


def load_jobs(
    paths: list[str | os.PathLike] | tuple[str | os.PathLike, ...],
) -> tuple[list[JobSpec], list[JobError]]:
    """Load every job under ``paths``; also report duplicate names (they would share a lock)."""
    jobs: list[JobSpec] = []
    errors: list[JobError] = []
    seen: dict[str, str] = {}
    for f in job_files(paths):
        try:
            job = load_job(f)
        except JobError as exc:
            errors.append(exc)
            continue
        if job.name in seen:
            errors.append(
                JobError(f, [f"field 'name' = {job.name!r}: already used by {seen[job.name]} (names must be unique)"])
            )
            continue
        seen[job.name] = str(f)
        jobs.append(job)
    return jobs, errors
