"""Benchmarks, side by side with the reference tools in one run, as ratios.

    python bench/run.py                 # every case, on the 2 GiB mixed disk
    python bench/run.py -k raw          # cases whose name contains "raw"
    python bench/run.py --size 256M     # a smaller disk for a quick look
    python bench/run.py --repeat 5 --aims   # issue 17's table: each row against its aim

Cases live in ``bench/cases_*.py`` (each module has ``CASES``), so a format adds its rows
in its own file. Each command runs ``--repeat`` times, the tools interleaved (odd
rounds in reverse order, so no tool always runs right after the same other one), each
run after a ``sync`` (so one tool's dirty pages are not written back during another's run),
on a warm page cache, after priming resident free memory (``prime``: on a VM that
returns free memory to its host, a run's new pages would otherwise cost a host fault
each, by chance); the table shows the best and the median wall time, the spread of
the runs ((max - min) / median), throughput over the virtual size (best run), the
output's allocated size, the peak RSS of that process, and diskforge's time divided by
each other tool's, best and median (below 1.0: diskforge is faster).

The page-cache floor: every row that converts a file also times ``cat SOURCE >
/dev/null`` the same way, interleaved with the tools (the ``floor s`` column, median):
reading the source once from the page cache, the least any conversion of it can cost,
so the distance of each tool to the limit is visible. (A sparse source's holes read as
zeros there, so it is skipped for the 20 GiB sparse rows: it would time reading 20 GiB
of zeros, not a floor.) The source is ``Case.reads`` (returning None: no floor), by
default the SOURCE of diskforge's ``convert ... SOURCE TARGET``.

``--aims`` adds issue 17's aim of each row (``bench/aims.py``: the rows, the limits and
how a verdict and "noisy" are decided) on the row of the tool it is measured against,
and a summary after the table; a tool that fails (a reader without LZFSE, say) is
reported as failed and left out instead of ending the run.

Rows (issue 17's table): raw→raw, raw↔qcow2, qcow2 zlib/zstd→raw (compressed reads,
the cloud-image case), raw→qcow2 -c zlib/zstd (sizes compared), raw↔vpc, raw↔vhdx,
raw↔vmdk, stream VMDK→raw, raw↔vdi, UDZO/ULFO→raw, raw→UDZO/ULFO against ``-m 1``
(the parallel speed-up), ``info`` on a 1 MiB raw and a small qcow2 (wall time), and a
20 GiB sparse disk → qcow2 (plain and -c) for peak RSS; plus the rows of the other
modules (ISO, OVA, export, imaging, NBD, read-only formats) without aims.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import mkdisk  # noqa: E402


@dataclass
class Context:
    workdir: str
    source: str          # the mixed raw disk
    size: int
    small: str           # a small image for start-up timing
    cache: dict = field(default_factory=dict)

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)


@dataclass
class Tool:
    name: str
    argv: Callable[[Context], list[str]]
    output: Callable[[Context], str | None] = lambda ctx: None
    available: Callable[[], bool] = lambda: True


@dataclass
class Case:
    name: str
    tools: list[Tool]
    setup: Callable[[Context], None] = lambda ctx: None
    bytes_of: Callable[[Context], int] = lambda ctx: ctx.size  # for MB/s
    # the file the page-cache floor reads (None: guessed from diskforge's convert)
    reads: Callable[[Context], str | None] | None = None
    # False: no priming before this row's runs (see prime()). A row that writes no
    # file has no new pages to fault in, and a 0.1 s command timed right after 2.4 GiB
    # of page cache was written and dropped measures that, not itself: the start-up
    # rows, 9 rounds each, back to back, primed then not: info of the 1 MiB raw
    # 0.089 s against 0.067 s, of the small qcow2 0.140 s against 0.092 s
    prime: bool = True

    def floor_source(self, ctx: Context) -> str | None:
        """The source this row converts, for the ``cat`` floor: ``reads`` when given,
        else the SOURCE of diskforge's ``convert [...] SOURCE TARGET``; None when the
        row is no conversion of one file."""
        if self.reads is not None:
            return self.reads(ctx)
        for tool in self.tools:
            if tool.name != "diskforge":
                continue
            argv = tool.argv(ctx)
            if "convert" in argv and len(argv) >= 2 and os.path.isfile(argv[-2]):
                return argv[-2]
        return None


def diskforge_cmd() -> list[str]:
    """The console script beside this interpreter (not a PATH shim such as pyenv's,
    which would add its own start-up to every row)."""
    exe = os.path.join(os.path.dirname(sys.executable), "diskforge")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "diskforge"]


def have(tool: str) -> Callable[[], bool]:
    return lambda: shutil.which(tool) is not None


RUN_TIMEOUT = float(os.environ.get("DISKFORGE_BENCH_TIMEOUT", "600"))  # seconds per run

# Set when the kernel hands free memory back to its hypervisor (virtio-balloon free page
# reporting, as on our Firecracker VMs).
PAGE_REPORTING = "/sys/module/page_reporting/parameters/reported_kib"


def prime(directory: str, nbytes: int) -> None:
    """Write then delete ``nbytes`` of page cache, so the next run's new pages are
    resident ones.

    Why: on a VM with free page reporting, memory freed a second or more ago has been
    returned to the host, and the first touch of each such page is a host fault.
    Measured here: writing a new 2 GiB file took 0.36-0.63 s right after 2.5 GiB of page
    cache was freed and 3.3-5.7 s when the free memory had been reported, with no other
    change (the same `dd` either way, all of it system time). Which case a run met
    depended on how long ago the previous run's output was deleted, so the same
    conversion ranged from 0.5 to 4.4 s and swamped the tools' own differences.
    Priming before every run gives every tool the same, resident memory: the machine a
    user has when free memory is really free.
    """
    path = os.path.join(directory, ".prime")
    chunk = bytes(8 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(-(-nbytes // len(chunk))):
            os.write(fd, chunk)
    finally:
        os.close(fd)
        os.unlink(path)  # dirty pages of a deleted file are dropped, never written


def run_once(argv: list[str], prime_dir: str | None = None,
             prime_bytes: int = 0) -> tuple[float, int, float]:
    """Wall seconds, peak RSS in bytes and CPU seconds (user + system, every thread) of
    one run (raises on failure), after ``prime(prime_dir, prime_bytes)`` when
    ``prime_bytes``.

    The RSS comes from GNU time when installed: wait4's ru_maxrss would count the
    memory of this Python process, which the child inherits until it execs.
    """
    import tempfile
    gnu_time = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None
    with tempfile.NamedTemporaryFile("r") as rss_file:
        full = ([gnu_time, "-f", "%M", "-o", rss_file.name] if gnu_time else []) + argv
        if prime_bytes:
            prime(prime_dir, prime_bytes)
        os.sync()
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # a tool that stalls (qemu-img's curl driver has, at 0% CPU) is killed and left
        # out rather than hanging the whole run; a timer, so the wait itself stays exact
        timer = threading.Timer(RUN_TIMEOUT, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        timer.cancel()
        if elapsed >= RUN_TIMEOUT:
            proc.stderr.close()
            raise RuntimeError(f"{' '.join(argv)} timed out after {RUN_TIMEOUT:.0f} s")
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({code}): {err.strip()}")
        text = rss_file.read().strip().splitlines()
        rss = int(text[-1]) * 1024 if gnu_time and text else usage.ru_maxrss * 1024
    # wait4's times include what GNU time reaped: the tool's, plus time's own ~1 ms
    return elapsed, rss, usage.ru_utime + usage.ru_stime


def allocated(path: str | None) -> int | None:
    if not path or not os.path.exists(path):
        return None
    if os.path.isdir(path):
        return sum(os.stat(os.path.join(d, f)).st_blocks * 512
                   for d, _, fs in os.walk(path) for f in fs)
    return os.stat(path).st_blocks * 512


def remove(path: str | None) -> None:
    if path and os.path.isdir(path):
        shutil.rmtree(path)
    elif path and os.path.exists(path):
        os.unlink(path)


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def load_cases() -> list[Case]:
    cases: list[Case] = []
    for file in sorted(glob.glob(os.path.join(HERE, "cases_*.py"))):
        spec = importlib.util.spec_from_file_location(os.path.basename(file)[:-3], file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cases.extend(mod.CASES)
    return cases


def main(argv: list[str] | None = None) -> int:
    from diskforge.options import parse_size
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", action="append", default=[], help="only cases containing this")
    ap.add_argument("--size", default="2G", help="virtual size of the mixed disk")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=os.environ.get("DISKFORGE_BENCH_DIR",
                                                    os.path.join(HERE, ".cache")))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--prime", default="auto",
                    help="page cache to write and delete before each run (see prime()):"
                         " a size, 'off', or 'auto' (when the kernel reports free pages"
                         " to a hypervisor: 1.1 x the largest output of the row so far,"
                         " at least the disk's size, + 256 MiB)")
    ap.add_argument("--aims", action="store_true",
                    help="judge each row against issue 17's aim (bench/aims.py)")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    if args.prime == "auto":
        fixed_prime = None if os.path.exists(PAGE_REPORTING) else 0
    else:
        fixed_prime = 0 if args.prime == "off" else parse_size(args.prime)
    os.makedirs(args.dir, exist_ok=True)
    source = os.path.join(args.dir, f"mixed-{size}.raw")
    print(f"building/checking {source} ...", file=sys.stderr)
    mkdisk.build(source, size)
    small = os.path.join(args.dir, "small.raw")
    if not os.path.exists(small):
        with open(small, "wb") as f:
            f.truncate(1 << 20)
    ctx = Context(workdir=args.dir, source=source, size=size, small=small)
    warm(source)
    # Byte-compile diskforge as `pip install` would: with PYTHONDONTWRITEBYTECODE set (as
    # on our machines) an editable install would otherwise recompile every module at
    # every start, and every row would pay that.
    import compileall

    import diskforge
    compileall.compile_dir(os.path.dirname(diskforge.__file__), quiet=1)

    from aims import AIMS, judge

    results = []
    verdicts = []
    header = (f"{'case':<31}{'tool':<19}{'best s':>9}{'median s':>10}{'spread':>8}"
              f"{'floor s':>9}{'MB/s':>8}{'output MiB':>11}{'peak RSS MiB':>13}"
              f"{'ratio best':>11}{'ratio median':>13}" + (f"  {'aim':<26}" if args.aims
                                                          else ""))
    print(header)
    print("-" * len(header))
    for case in load_cases():
        if args.k and not any(k in case.name for k in args.k):
            continue
        tools = [t for t in case.tools if t.available()]
        missing = [t.name for t in case.tools if not t.available()]
        case.setup(ctx)
        floor_src = case.floor_source(ctx)
        floor: list[float] = []
        failed: dict[str, str] = {}
        times: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        rss: dict[str, int] = {}
        out_size: dict[str, int | None] = {}
        for rnd in range(args.repeat):  # interleaved, so drift hits every tool alike
            if floor_src:
                floor.append(run_once(["cat", floor_src])[0])
            for tool in (tools if rnd % 2 == 0 else tools[::-1]):
                if tool.name in failed:
                    continue
                out = tool.output(ctx)
                remove(out)
                primed = fixed_prime if case.prime else 0
                if primed is None:
                    biggest = max([s for s in out_size.values() if s] + [ctx.size])
                    primed = min(int(biggest * 1.1) + (256 << 20), 8 << 30)
                try:
                    secs, peak, cpu_s = run_once(tool.argv(ctx), args.dir, primed)
                except RuntimeError as e:
                    failed[tool.name] = str(e).splitlines()[0][-120:]
                    remove(out)
                    continue
                out_size[tool.name] = allocated(out)
                remove(out)
                times.setdefault(tool.name, []).append(secs)
                cpu.setdefault(tool.name, []).append(cpu_s)
                rss[tool.name] = max(peak, rss.get(tool.name, 0))
        ran = [t for t in tools if t.name in times]
        rows = [(t.name, min(times[t.name]), statistics.median(times[t.name]),
                 rss[t.name], out_size[t.name]) for t in ran]
        ours = next((r[1:3] for r in rows if r[0] == "diskforge"), None)
        aim = AIMS.get(case.name) if args.aims else None
        verdict = judge(aim, times, rss, out_size, cpu) if aim else None
        floor_med = statistics.median(floor) if floor else None
        for i, (name, secs, med, rss_, size_) in enumerate(rows):
            mbps = case.bytes_of(ctx) / secs / 1e6 if secs else 0
            spread = (max(times[name]) - secs) / med if med else 0
            ratio = ratio_med = ""
            if name != "diskforge" and ours is not None:
                ratio, ratio_med = f"{ours[0] / secs:.2f}", f"{ours[1] / med:.2f}"
            aim_col = ""
            if verdict is not None and name == ("diskforge" if aim.kind in ("seconds", "rss")
                                                else aim.against):
                aim_col = f"{aim.text()}: {verdict.short()}"
            floor_col = f"{floor_med:.3f}" if i == 0 and floor_med is not None else ""
            print(f"{case.name if i == 0 else '':<31}{name:<19}{secs:>9.3f}{med:>10.3f}"
                  f"{spread:>8.0%}{floor_col:>9}{mbps:>8.0f}"
                  f"{'' if size_ is None else f'{size_ / 2**20:.1f}':>11}"
                  f"{rss_ / 2**20:>13.1f}{ratio:>11}{ratio_med:>13}"
                  + (f"  {aim_col:<26}" if args.aims else ""))
            results.append({"case": case.name, "tool": name, "seconds": secs,
                            "median_seconds": med, "runs": times[name],
                            "mb_per_s": mbps, "output_bytes": size_, "peak_rss": rss_,
                            "ratio_diskforge_over_tool": ours[0] / secs if ours and secs
                            else None,
                            "median_ratio": ours[1] / med if ours and med else None,
                            "max_seconds": max(times[name]), "spread": spread,
                            "cpu_runs": cpu[name],
                            "floor_seconds": floor_med, "floor_runs": floor,
                            "floor_source": floor_src})
        for name in missing:
            print(f"{'':<31}{name:<19}  (not installed: skipped)")
        for name, why in failed.items():
            print(f"{'':<31}{name:<19}  (failed, left out: {why})")
        if verdict is not None:
            verdicts.append((case.name, aim, verdict))
            for row in results:  # on diskforge's row of this case
                if row["case"] == case.name and row["tool"] == "diskforge":
                    row.update({"aim": aim.text(), "aim_status": verdict.status,
                                "aim_value": verdict.value, "noisy": verdict.noisy,
                                "aim_notes": list(verdict.notes)})
        sys.stdout.flush()
    if verdicts:
        print(f"\naims (issue 17), medians of {args.repeat} interleaved run(s); "
              "value (from the runs' extremes):")
        width = max(30, *(len(v.value) + 2 for _, _, v in verdicts))
        for name, aim, v in verdicts:
            notes = f"  [{'; '.join(v.notes)}]" if v.notes else ""
            print(f"  {name:<31}{aim.text():<34}{v.value:<{width}}{v.short()}{notes}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
