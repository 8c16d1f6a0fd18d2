"""CPU seconds per thread of one command: where a pipeline's time goes, without a clock.

Why: on a shared 2-core machine wall times say little, but CPU seconds per thread do.
On two idle cores a run's wall time is at least max(its busiest thread's CPU, its
total CPU / 2), so comparing those bounds between diskforge and qemu-img predicts the
timed bench (``bench/run.py``) without running it.

    python3 bench/threadcpu.py diskforge convert -O raw in.qcow2 out.raw
    python3 bench/threadcpu.py qemu-img convert -O raw in.qcow2 out.raw

``diskforge ...`` runs in this process (threads named, each one's ``RUSAGE_THREAD``
taken as it ends; the decoding pool's, still alive at the end, from
``/proc/self/task``). Any other command runs as a child whose threads are polled from
``/proc/PID/task/*/stat`` every 20 ms (a thread's last 20 ms may be missed); its
threads other than the main one are summed as ``workers``. Linux only.
"""

from __future__ import annotations

import collections
import os
import re
import resource
import subprocess
import sys
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def _stat(path: str) -> tuple[str, float, float] | None:
    """(name, user, system) seconds of one /proc task."""
    try:
        with open(path) as f:
            s = f.read()
    except OSError:
        return None
    fields = s.rsplit(")", 1)[1].split()
    return s[s.index("(") + 1:s.rindex(")")], int(fields[11]) / TICK, int(fields[12]) / TICK


def _print(rows: dict, total: tuple[float, float]) -> None:
    print(f"total CPU {total[0] + total[1]:.2f} s (user {total[0]:.2f}, system"
          f" {total[1]:.2f})", file=sys.stderr)
    for name, (n, u, s) in sorted(rows.items()):
        print(f"  {name:28s} x{n:<3d} {u + s:6.2f} s (system {s:.2f})", file=sys.stderr)


def in_process(argv: list[str]) -> int:
    rows: dict = collections.defaultdict(lambda: [0, 0.0, 0.0])
    lock = threading.Lock()
    run = threading.Thread.run

    def measured(self):
        try:
            run(self)
        finally:
            r = resource.getrusage(resource.RUSAGE_THREAD)
            with lock:
                row = rows[re.sub(r"_\d+$", "_N", self.name)]
                row[0] += 1
                row[1] += r.ru_utime
                row[2] += r.ru_stime

    threading.Thread.run = measured
    from diskforge.cli.main import main
    rc = main(argv)
    r = resource.getrusage(resource.RUSAGE_THREAD)
    rows["main"] = [1, r.ru_utime, r.ru_stime]
    for th in threading.enumerate():
        if th is threading.main_thread() or not th.native_id:
            continue
        got = _stat(f"/proc/self/task/{th.native_id}/stat")
        if got:
            row = rows[re.sub(r"_\d+$", "_N", th.name) + " (alive)"]
            row[0] += 1
            row[1] += got[1]
            row[2] += got[2]
    r = resource.getrusage(resource.RUSAGE_SELF)
    _print(rows, (r.ru_utime, r.ru_stime))
    return rc


def child(argv: list[str]) -> int:
    p = subprocess.Popen(argv)
    last: dict = {}
    while p.poll() is None:
        try:
            tids = os.listdir(f"/proc/{p.pid}/task")
        except OSError:
            tids = []
        for tid in tids:
            got = _stat(f"/proc/{p.pid}/task/{tid}/stat")
            if got:
                last[tid] = got
        time.sleep(0.02)
    rows: dict = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for tid, (_, u, s) in last.items():
        row = rows["main" if tid == str(p.pid) else "workers"]
        row[0] += 1
        row[1] += u
        row[2] += s
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    _print(rows, (r.ru_utime, r.ru_stime))
    return p.returncode


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] == "diskforge":
        sys.exit(in_process(sys.argv[2:]))
    sys.exit(child(sys.argv[1:]))
