"""Running a batch: each job's steps in their own processes, retried on transient
errors, reported as JSON; locally on a pool of N jobs at once, or as one task per job
on a Dask distributed cluster.

A job's report is written (atomically) when its result arrives, never by the job
itself, so a worker that dies mid-job leaves no report and the job simply runs again
(Dask reschedules the tasks of a lost worker); a re-run of the batch skips every job
whose report says done and verified and whose output is still the file that report
describes (same size and modification time locally, same size and ETag remotely).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

from .jobs import Job

RETRIES = 2
BACKOFF = 1.0                      # seconds before the first retry; doubles each time
OUTPUT_TAIL = 2000                 # characters of a step's stderr kept in its report


def run_job(job: Job, retries: int = RETRIES, cpus: int | None = None,
            backoff: float = BACKOFF) -> dict:
    """Run ``job`` here and return its report: ``status`` (done/failed), ``attempts``,
    ``seconds``, ``bytes`` (the output's size), ``digests``, ``verified``, ``error``.
    Tries again after a transient error (the OS or the network failed), at most
    ``retries`` times, waiting ``backoff``, then twice as long, and so on."""
    started = time.time()
    report: dict = {"id": job.id, "op": job.op, "source": job.source,
                    "target": job.target, "started": started}
    attempts, outcome = 0, {}
    for attempt in range(retries + 1):
        attempts += 1
        outcome = _attempt(job, cpus)
        if outcome["status"] == "done" or not outcome.get("transient"):
            break
        if attempt < retries:
            time.sleep(backoff * (1 << attempt))
    report.update(outcome, attempts=attempts, seconds=round(time.time() - started, 3))
    report.pop("transient", None)
    if report["status"] == "done" and job.output:
        report.update(fingerprint(job.output))
    return report


def _attempt(job: Job, cpus: int | None) -> dict:
    steps = job.steps()
    for n, argv in enumerate(steps):
        if cpus and argv[0] in ("convert", "image"):
            argv = [argv[0], "-m", str(cpus), *argv[1:]]
        result = _step(argv)
        if result["code"] != 0:
            verifying = job.verify and n == len(steps) - 1 and n > 0
            error = result.get("error") or result.get("stderr") or f"exit {result['code']}"
            if verifying and result.get("error") is None:
                error = f"verification failed ({' '.join(argv[:2])}): {error}"
            return {"status": "failed", "error": error, "verified": False,
                    "transient": result.get("transient", False)}
    return {"status": "done", "error": None, "verified": job.verify or job.op == "verify"}


def _step(argv: list[str]) -> dict:
    """Run ``diskforge ARGV`` as a child that dies with this thread's process.

    The child reports on a pipe, not a file, so a worker killed mid-step leaves
    nothing behind in the temporary directory."""
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.run([sys.executable, "-m", "diskforge.batch.step", str(write_end),
                               *argv], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", pass_fds=(write_end,),
                              preexec_fn=_die_with_parent)
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as f:
            read_end = -1
            said = f.read()
        try:
            result = json.loads(said)
        except ValueError:  # killed before it could say: worth another try
            result = {"code": proc.returncode or 1, "transient": True,
                      "error": f"the step ended by signal {-proc.returncode}"
                      if proc.returncode < 0 else None}
        result["stderr"] = proc.stderr.strip()[-OUTPUT_TAIL:]
        return result
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies (Linux
    PR_SET_PDEATHSIG), so a killed worker does not leave its jobs running; diskforge
    turns SIGTERM into removing its unfinished output."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def fingerprint(output: str) -> dict:
    """What identifies the output a report describes: ``bytes`` and a digest (sha256
    of a local file; the ETag of a remote object), plus the modification time of a
    local file, so a re-run can tell the file is unchanged without reading it."""
    from .. import remote
    if remote.is_remote(output):
        backend = remote.open_backend(output)
        try:
            etag = getattr(backend, "etag", None)
            return {"bytes": backend.size, "digests": {"etag": etag} if etag else {}}
        finally:
            backend.close()
    h = hashlib.sha256()
    with open(output, "rb") as f:
        st = os.fstat(f.fileno())
        while block := f.read(1 << 20):
            h.update(block)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "digests": {"sha256": h.hexdigest()}}


def complete(job: Job, report: dict | None) -> bool:
    """True when ``report`` says ``job`` is done and verified and its output is still
    what the report describes."""
    if not report or report.get("status") != "done" or not report.get("verified"):
        return False
    if not job.output:
        return False  # a verify job proves something now, not once
    try:
        from .. import remote
        if remote.is_remote(job.output):
            now = fingerprint(job.output)
            return (now["bytes"] == report.get("bytes")
                    and now["digests"] == report.get("digests") and bool(now["digests"]))
        st = os.stat(job.output)
    except Exception:  # gone, unreadable: not complete
        return False
    return st.st_size == report.get("bytes") and st.st_mtime_ns == report.get("mtime_ns")


def run_local(jobs: list[Job], concurrency: int, *, retries: int = RETRIES,
              cpus: int | None = None, on_result: Callable[[dict], None]) -> None:
    """Each job on a pool of ``concurrency`` threads, each thread driving its job's
    processes: a process pool in effect, with results handed back as they finish."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="diskforge-job") as pool:
        futures = [pool.submit(run_job, job, retries, cpus) for job in jobs]
        for future in as_completed(futures):
            on_result(future.result())


def run_dask(jobs: list[Job], address: str, *, retries: int = RETRIES,
             cpus: int | None = None, memory: int | None = None,
             on_result: Callable[[dict], None]) -> None:
    """One task per job on the Dask cluster at ``address``. ``cpus``/``memory`` (MiB)
    become task resources (``cpus``, ``memory``), which workers started with
    ``--resources "cpus=N,memory=M"`` honour; a worker lost mid-job has its tasks
    rescheduled by the scheduler, and the job starts again from nothing."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        from ..errors import UsageError
        raise UsageError("--scheduler needs Dask: pip install 'diskforge[cluster]'") from None
    import uuid
    resources = {k: v for k, v in (("cpus", cpus), ("memory", memory)) if v}
    run = uuid.uuid4().hex[:12]  # a batch run again is new work, not a cached result
    with Client(address, timeout="30s") as client:
        futures = {client.submit(run_job, job, retries, cpus,
                                 key=f"diskforge-{job.id}-{run}", pure=False,
                                 resources=resources or None): job for job in jobs}
        for future in as_completed(futures):
            try:
                on_result(future.result())
            except Exception as e:  # the scheduler gave up on it (workers kept dying)
                job = futures[future]
                on_result({"id": job.id, "op": job.op, "source": job.source,
                           "target": job.target, "status": "failed", "attempts": None,
                           "error": f"the cluster could not run it: {type(e).__name__}:"
                           f" {e}", "verified": False})


def write_report(report_dir: str, report: dict) -> str:
    """``REPORT_DIR/ID.json``, replaced atomically."""
    path = os.path.join(report_dir, f"{report['id']}.json")
    fd, tmp = tempfile.mkstemp(dir=report_dir, prefix=".report-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_report(report_dir: str, job_id: str) -> dict | None:
    try:
        with open(os.path.join(report_dir, f"{job_id}.json"), encoding="utf-8") as f:
            report = json.load(f)
        return report if isinstance(report, dict) else None
    except (OSError, ValueError):
        return None


def summarise(reports: Iterable[dict], seconds: float) -> dict:
    reports = list(reports)
    count = {s: sum(1 for r in reports if r["status"] == s)
             for s in ("done", "skipped", "failed")}
    return {"jobs": len(reports), **count, "seconds": round(seconds, 3),
            "bytes": sum(r.get("bytes") or 0 for r in reports if r["status"] == "done"),
            "failed_ids": [r["id"] for r in reports if r["status"] == "failed"]}
