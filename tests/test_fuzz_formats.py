"""The suite's fuzz budget: tests/fuzz_formats.py (coverage-guided, atheris) over every
format's probe/open/info/extents/read, for a fixed number of executions from a fixed
seed. The seeds are pinned and the mutations follow from the seed, so the run executes
the same inputs every time, however loaded the machine: it fails on a real bug, the
same one every run, never by chance. Longer runs are by hand (``--minutes N``,
README)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import need

FUZZ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_formats.py")
RUNS = 2000   # about 7 s of CPU after 5 s of seeds and instrumentation
FORMATS = ("raw", "qcow2", "vpc", "vhdx", "vdi", "dmg", "sparseimage", "sparsebundle",
           "iso", "ova")


@pytest.mark.slow
def test_a_fixed_fuzz_budget_finds_no_crash_in_any_reader(tmp_path):
    pytest.importorskip("atheris", reason="atheris (in the [test] extra) is not installed")
    for tool in ("qemu-img", "qemu-io", "xorriso"):
        need(tool)
    proc = subprocess.run([sys.executable, FUZZ, "--runs", str(RUNS), "--seed", "1",
                           "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=290)
    report = proc.stdout + proc.stderr[-6000:]
    assert proc.returncode == 0, report
    m = re.search(r"^(\d+) executions, \d+/s, ok$", proc.stdout, re.M)
    assert m and int(m.group(1)) >= RUNS, report
    done = dict(re.findall(r"(\w+) (\d+) \(\d+/s\)", proc.stdout))
    assert all(int(done.get(fmt, 0)) > 0 for fmt in FORMATS), report  # every reader ran
