"""Run ``diskforge`` on hostile input in a child and measure what it cost.

A hostile image must end in one line, quickly and in bounded memory. Running the
command in-process could not show either (a hang would hang pytest, a giant allocation
would grow the test process), so the child runs under a deadline, and its peak RSS is
read from the kernel's rusage of that child alone (``os.wait4``), not from
``RUSAGE_CHILDREN``, which mixes in every child the test process ever had.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

# what one diskforge command may peak at on hostile input: well under the 256 MiB
# budget (the interpreter and diskforge's imports alone take about 40 MiB)
PEAK_LIMIT = 160 << 20


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    seconds: float
    peak_rss: int          # bytes
    timed_out: bool


def run_bounded(*argv: str, cwd: str | None = None, timeout: float = 30,
                nofile: int | None = None) -> Outcome:
    """``python -m diskforge ARGV`` in a child killed after ``timeout`` seconds;
    ``nofile`` lowers its RLIMIT_NOFILE (to show a descriptor bound quickly)."""
    def limits():
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "diskforge", *argv], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, preexec_fn=limits)
    fired = threading.Event()

    def kill():
        fired.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    streams: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: streams.__setitem__(k, f.read()))
               for k, f in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
        for t in readers:
            t.join()
        proc.stdout.close()
        proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here, not by Popen
    return Outcome(proc.returncode, streams["out"].decode(errors="replace"),
                   streams["err"].decode(errors="replace"), time.monotonic() - start,
                   usage.ru_maxrss * 1024, fired.is_set())


def assert_one_line(res: Outcome, *words: str, seconds: float = 20) -> None:
    """The contract for hostile input: one line on stderr naming what is wrong, a
    non-zero exit, no traceback, no hang, and well under the memory budget."""
    assert not res.timed_out, f"still running after its deadline: {res.err[-500:]!r}"
    assert res.code != 0, res
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line of error, got: {res.err[-2000:]!r}"
    assert "Traceback" not in res.err and "internal error" not in res.err, res.err
    for w in words:
        assert w in res.err, res.err
    assert res.seconds < seconds, f"took {res.seconds:.1f} s"
    assert res.peak_rss < PEAK_LIMIT, f"peak RSS {res.peak_rss >> 20} MiB"
