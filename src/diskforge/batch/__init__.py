"""Fleets of jobs: ``diskforge batch JOBS`` and ``diskforge.batch.run``.

A job list (CSV or YAML; ``jobs.py``) names jobs of four kinds — ``convert``,
``export``, ``image``, ``verify`` — each a source, a target and options. Every job runs
the diskforge commands a user would type (``Job.steps``: the work, then the check that
proves it: ``compare``, ``export --check``, ``verify``), each in its own process, so
outputs appear atomically and a failed job leaves nothing under its target. Transient
errors (the OS or the network failing) are retried with backoff; a JSON report per job
and a summary are written; a re-run skips jobs already complete and verified.

Where jobs run (``runner.py``): a local pool of ``concurrency`` jobs at once, or one
task per job on a Dask distributed cluster (``scheduler="tcp://HOST:8786"``, or
``DASK_SCHEDULER_ADDRESS``), where sources and targets are typically ``s3://`` or
``https://`` names every worker reaches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from .jobs import Job, load_jobs
from .runner import RETRIES, complete, read_report, run_dask, run_local, summarise, \
    write_report

__all__ = ["Job", "load_jobs", "run"]


def run(jobs_file: str, *, report_dir: str | None = None, concurrency: int | None = None,
        scheduler: str | None = None, retries: int = RETRIES, cpus_per_job: int | None = None,
        memory_per_job: int | None = None,
        on_report: Callable[[dict], None] | None = None) -> dict:
    """Run every job of ``jobs_file`` not already complete; returns the summary (counts,
    bytes, seconds, the ids that failed). Reports go to ``report_dir`` (default:
    ``JOBS_FILE.reports/`` beside the list), one ``ID.json`` per job and
    ``summary.json``."""
    started = time.time()
    jobs = load_jobs(jobs_file)
    report_dir = report_dir or f"{os.path.splitext(jobs_file)[0]}.reports"
    os.makedirs(report_dir, exist_ok=True)
    reports: list[dict] = []

    def done(report: dict) -> None:
        if report["status"] != "skipped":
            write_report(report_dir, report)
        reports.append(report)
        if on_report:
            on_report(report)

    todo = []
    for job in jobs:
        if complete(job, read_report(report_dir, job.id)):
            done({"id": job.id, "op": job.op, "source": job.source, "target": job.target,
                  "status": "skipped", "reason": "complete and verified by an earlier run"})
        else:
            todo.append(job)
    scheduler = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    if todo and scheduler:
        run_dask(todo, scheduler, retries=retries, cpus=cpus_per_job,
                 memory=memory_per_job, on_result=done)
    elif todo:
        if concurrency is None:
            concurrency = max(1, (os.cpu_count() or 1) // (cpus_per_job or 1))
        run_local(todo, concurrency, retries=retries, cpus=cpus_per_job, on_result=done)
    order = {job.id: n for n, job in enumerate(jobs)}
    reports.sort(key=lambda r: order[r["id"]])
    summary = summarise(reports, time.time() - started)
    write_report(report_dir, {"id": "summary", **summary})
    return summary
