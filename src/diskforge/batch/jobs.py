"""A batch's job list: CSV or YAML rows of ``op, source, target`` and options, turned
into the diskforge commands each job runs.

Why commands and not Python calls: a job then does exactly what the same line typed at
a shell does (remote names, atomic outputs, one-line errors, exit codes), and it runs
in its own process wherever it is scheduled, so one job's crash or memory cannot touch
another's.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
from dataclasses import dataclass

from ..errors import UsageError

OPS = ("convert", "export", "image", "verify")
# the keys a row may have; anything else is a typo and refused
KEYS = ("id", "op", "source", "target", "format", "source_format", "options", "compress",
        "to", "args", "verify")
MAX_JOBS = 100_000
_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


@dataclass(frozen=True)
class Job:
    """One job of a batch: an operation, its source and target."""
    id: str
    op: str
    source: str
    target: str | None = None
    format: str | None = None          # -O (convert), -O (image)
    source_format: str | None = None   # -f
    options: str | None = None         # -o
    compress: bool = False             # -c
    to: str | None = None              # export --to
    args: tuple[str, ...] = ()         # further flags, as on the command line
    verify: bool = True                # check the output after writing it

    def steps(self) -> list[list[str]]:
        """The diskforge commands this job runs, in order: the work, then (unless
        ``verify`` is off) the check that proves the output."""
        f = ["-f", self.source_format] if self.source_format else []
        if self.op == "convert":
            work = ["convert", *f, *(["-O", self.format] if self.format else []),
                    *(["-o", self.options] if self.options else []),
                    *(["-c"] if self.compress else []), *self.args, self.source,
                    self.target]
            check = ["compare", *f, *(["-F", self.format] if self.format else []),
                     self.source, self.target]
        elif self.op == "export":
            work = ["export", "--to", self.to, *f, *self.args, self.source, self.target]
            check = ["export", "--check", self.to, self.target]
        elif self.op == "image":
            work = ["image", *f, *(["-O", self.format] if self.format else []),
                    *(["-o", self.options] if self.options else []), *self.args,
                    self.source, self.target]
            check = ["verify", self.target]
        else:  # verify
            return [["verify", *f, *self.args, self.source]]
        return [work, check] if self.verify else [work]

    @property
    def output(self) -> str | None:
        """The file this job makes (None for verify)."""
        return self.target if self.op != "verify" else None


def load_jobs(path: str) -> list[Job]:
    """The jobs in ``path``: ``.csv`` (a header row naming the columns) or ``.yaml``/
    ``.yml`` (a list of mappings, or ``{defaults: {...}, jobs: [...]}``)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(64 << 20)
    except OSError as e:
        raise UsageError(f"cannot read the job list: {e.strerror or e}", path) from None
    if path.lower().endswith((".yaml", ".yml")):
        rows, defaults = _yaml_rows(text, path)
    else:
        rows, defaults = list(csv.DictReader(text.splitlines())), {}
    if len(rows) > MAX_JOBS:
        raise UsageError(f"{len(rows)} jobs; at most {MAX_JOBS} in one list", path)
    jobs = [_job({**defaults, **row}, n, path) for n, row in enumerate(rows, 1)]
    seen: dict[str, int] = {}
    for n, job in enumerate(jobs, 1):
        if job.id in seen:
            raise UsageError(f"job {n}: id '{job.id}' is already job {seen[job.id]}'s", path)
        seen[job.id] = n
    outputs = [j.output for j in jobs if j.output]
    if len(set(outputs)) != len(outputs):
        dup = next(o for o in outputs if outputs.count(o) > 1)
        raise UsageError(f"two jobs write '{dup}'", path)
    return jobs


def _yaml_rows(text: str, path: str) -> tuple[list[dict], dict]:
    try:
        import yaml
    except ImportError:
        raise UsageError("YAML job lists need PyYAML: pip install 'diskforge[cluster]'"
                         " (or write the list as CSV)", path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"not valid YAML: {str(e).splitlines()[0]}", path) from None
    defaults: dict = {}
    if isinstance(data, dict):
        defaults = data.get("defaults") or {}
        data = data.get("jobs")
    if not isinstance(data, list) or not isinstance(defaults, dict):
        raise UsageError("a YAML job list is a list of jobs, or {defaults: ..., jobs: [...]}",
                         path)
    return data, defaults


def _job(row: object, n: int, path: str) -> Job:
    if not isinstance(row, dict):
        raise UsageError(f"job {n}: not a mapping of keys to values", path)
    row = {str(k).strip(): v for k, v in row.items() if k is not None and v not in (None, "")}
    unknown = sorted(set(row) - set(KEYS))
    if unknown:
        raise UsageError(f"job {n}: unknown key '{unknown[0]}' (keys: {', '.join(KEYS)})",
                         path)
    op = str(row.get("op", "convert")).strip().lower()
    if op not in OPS:
        raise UsageError(f"job {n}: op '{op}' is not one of {', '.join(OPS)}", path)
    source, target = row.get("source"), row.get("target")
    if not source:
        raise UsageError(f"job {n}: no source", path)
    if op != "verify" and not target:
        raise UsageError(f"job {n}: {op} needs a target", path)
    if op == "export" and not row.get("to"):
        raise UsageError(f"job {n}: export needs 'to' (azure, gcp, aws, ova, …)", path)
    args = row.get("args", ())
    args = tuple(shlex.split(args) if isinstance(args, str) else map(str, args))
    job_id = str(row.get("id") or f"{n:04d}-{os.path.basename(str(target or source))}")
    job_id = re.sub(r"[^A-Za-z0-9._-]", "_", job_id)[:128]
    if not _ID.fullmatch(job_id) or job_id == "summary":  # summary.json is the batch's
        raise UsageError(f"job {n}: id '{job_id}' is not a usable name", path)
    return Job(id=job_id, op=op, source=str(source), target=str(target) if target else None,
               format=_opt(row, "format"), source_format=_opt(row, "source_format"),
               options=_opt(row, "options"), compress=_flag(row.get("compress", False)),
               to=_opt(row, "to"), args=args, verify=_flag(row.get("verify", True)))


def _opt(row: dict, key: str) -> str | None:
    value = row.get(key)
    return str(value).strip() if value is not None else None


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")
