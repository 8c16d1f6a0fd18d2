"""batch: run a list of convert/export/image/verify jobs, locally or on a Dask cluster
(``diskforge/batch/``)."""

from __future__ import annotations

import sys


def cmd_batch(args) -> int:
    import json

    from .. import batch
    tty = sys.stderr.isatty() and not args.q
    counts = {"done": 0, "skipped": 0, "failed": 0}

    def on_report(report: dict) -> None:
        counts[report["status"]] += 1
        if args.output == "json":
            print(json.dumps(report, sort_keys=True), flush=True)
        elif not args.q and report["status"] == "failed":
            print(f"diskforge: job {report['id']}: {report['error']}", file=sys.stderr)
        if tty:
            sys.stderr.write(f"\rbatch: {counts['done']} done, {counts['skipped']} skipped,"
                             f" {counts['failed']} failed\x1b[K")
            sys.stderr.flush()

    summary = batch.run(args.jobs, report_dir=args.report_dir, concurrency=args.j,
                        scheduler=args.scheduler, retries=args.retries,
                        cpus_per_job=args.cpus_per_job, memory_per_job=args.memory_per_job,
                        on_report=on_report)
    if tty:
        sys.stderr.write("\n")
    if args.output == "json":
        print(json.dumps({"summary": summary}, sort_keys=True))
    elif not args.q:
        print(f"{summary['jobs']} jobs: {summary['done']} done, {summary['skipped']}"
              f" skipped (already complete), {summary['failed']} failed;"
              f" {summary['bytes']} bytes written in {summary['seconds']:.1f} s")
    return 0 if summary["failed"] == 0 else 2


def add_parsers(sub) -> None:
    p = sub.add_parser("batch", help="run a list of convert/export/image/verify jobs (CSV"
                       " or YAML), locally or on a Dask cluster; exit 2 if any failed")
    p.add_argument("jobs", help="the job list: .csv (header: op,source,target,format,"
                   "options,…) or .yaml")
    p.add_argument("-j", type=int, metavar="N", help="jobs at once (local; default: cores"
                   " / --cpus-per-job)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run on a Dask cluster"
                   " (tcp://HOST:8786; default: $DASK_SCHEDULER_ADDRESS, else locally)")
    p.add_argument("--cpus-per-job", type=int, metavar="N", help="threads each job's"
                   " compression uses, and the 'cpus' resource its Dask task asks for")
    p.add_argument("--memory-per-job", type=int, metavar="MIB",
                   help="the 'memory' resource each Dask task asks for")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="tries again after a transient error (default 2)")
    p.add_argument("--report-dir", metavar="DIR",
                   help="where the per-job JSON reports go (default: JOBS.reports/)")
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="json: one report per line as jobs finish, then the summary")
    p.add_argument("-q", action="store_true", help="quiet: only the exit status")
    p.set_defaults(func=cmd_batch)
