"""Run ``diskforge`` on hostile input in a child and measure what it cost.

A hostile image must end in one line, quickly and in bounded memory. Running the
command in-process could not show either (a hang would hang pytest, a giant allocation
would grow the test process), so the child runs under a deadline and its peak RSS is
measured. Not with ``os.wait4`` straight from pytest: Linux keeps a process's peak RSS
across ``execve``, so a child forked from a pytest worker of 180 MiB starts its life at
180 MiB. A small runner (a fresh interpreter) forks the command instead and reports the
``ru_maxrss`` that ``wait4`` gives for that one child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# what one diskforge command may peak at on hostile input: well under the 256 MiB
# budget (the interpreter and diskforge's imports alone take about 25 MiB; the bombs
# and plists here peak at about 30)
PEAK_LIMIT = 96 << 20

_RUNNER = """
import json, os, resource, sys
report, limits, argv = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
pid = os.fork()
if pid == 0:
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))
    os.execv(sys.executable, [sys.executable, "-m", "diskforge", *argv])
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    seconds: float
    peak_rss: int          # bytes
    timed_out: bool


def run_bounded(*argv: str, cwd: str | None = None, timeout: float = 30,
                nofile: int | None = None, address_space: int | None = None) -> Outcome:
    """``python -m diskforge ARGV`` in a child killed (with its runner) after
    ``timeout`` seconds; ``nofile`` lowers its RLIMIT_NOFILE (to show a descriptor
    bound quickly), ``address_space`` its RLIMIT_AS (to meet a MemoryError)."""
    limits = {"RLIMIT_NOFILE": nofile, "RLIMIT_AS": address_space}
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "peak-rss")
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", _RUNNER, report,
                                 json.dumps({k: v for k, v in limits.items() if v}), *argv], cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        seconds = time.monotonic() - start
        peak = int(open(report).read()) if os.path.exists(report) else 0
    return Outcome(proc.returncode, out.decode(errors="replace"),
                   err.decode(errors="replace"), seconds, peak, timed_out)


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
