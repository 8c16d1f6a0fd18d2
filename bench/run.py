"""Benchmarks, side by side with the reference tools in one run, as ratios.

    python bench/run.py                 # every case, on the 2 GiB mixed disk
    python bench/run.py -k raw          # cases whose name contains "raw"
    python bench/run.py --size 256M     # a smaller disk for a quick look

Cases live in ``bench/cases_*.py`` (each module has ``CASES``), so a format adds its rows
in its own file. Each command runs ``--repeat`` times, the tools interleaved, each run
after a ``sync`` (so one tool's dirty pages are not written back during another's run),
on a warm page cache; the table shows the best and the median wall time, throughput
over the virtual size (best run), the output's allocated size, the peak RSS of that
process, and diskforge's time divided by each other tool's, best and median (below 1.0:
diskforge is faster).
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


def diskforge_cmd() -> list[str]:
    """The console script beside this interpreter (not a PATH shim such as pyenv's,
    which would add its own start-up to every row)."""
    exe = os.path.join(os.path.dirname(sys.executable), "diskforge")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "diskforge"]


def have(tool: str) -> Callable[[], bool]:
    return lambda: shutil.which(tool) is not None


def run_once(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes of one run (raises on failure).

    The RSS comes from GNU time when installed: wait4's ru_maxrss would count the
    memory of this Python process, which the child inherits until it execs.
    """
    import tempfile
    gnu_time = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None
    with tempfile.NamedTemporaryFile("r") as rss_file:
        full = ([gnu_time, "-f", "%M", "-o", rss_file.name] if gnu_time else []) + argv
        os.sync()
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({code}): {err.strip()}")
        text = rss_file.read().strip().splitlines()
        rss = int(text[-1]) * 1024 if gnu_time and text else usage.ru_maxrss * 1024
    return elapsed, rss


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
    args = ap.parse_args(argv)
    size = parse_size(args.size)
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

    results = []
    header = (f"{'case':<28}{'tool':<12}{'best s':>9}{'median s':>10}{'MB/s':>9}"
              f"{'output MiB':>12}{'peak RSS MiB':>14}{'ratio best':>12}{'ratio median':>14}")
    print(header)
    print("-" * len(header))
    for case in load_cases():
        if args.k and not any(k in case.name for k in args.k):
            continue
        tools = [t for t in case.tools if t.available()]
        missing = [t.name for t in case.tools if not t.available()]
        case.setup(ctx)
        times: dict[str, list[float]] = {}
        rss: dict[str, int] = {}
        out_size: dict[str, int | None] = {}
        for _ in range(args.repeat):  # interleaved, so drift hits every tool alike
            for tool in tools:
                out = tool.output(ctx)
                remove(out)
                secs, peak = run_once(tool.argv(ctx))
                out_size[tool.name] = allocated(out)
                remove(out)
                times.setdefault(tool.name, []).append(secs)
                rss[tool.name] = max(peak, rss.get(tool.name, 0))
        rows = [(t.name, min(times[t.name]), statistics.median(times[t.name]),
                 rss[t.name], out_size[t.name]) for t in tools]
        ours = next((r[1:3] for r in rows if r[0] == "diskforge"), None)
        for i, (name, secs, med, rss, out_size) in enumerate(rows):
            mbps = case.bytes_of(ctx) / secs / 1e6 if secs else 0
            ratio = ratio_med = ""
            if name != "diskforge" and ours is not None:
                ratio, ratio_med = f"{ours[0] / secs:.2f}", f"{ours[1] / med:.2f}"
            print(f"{case.name if i == 0 else '':<28}{name:<12}{secs:>9.3f}{med:>10.3f}"
                  f"{mbps:>9.0f}{'' if out_size is None else f'{out_size / 2**20:.1f}':>12}"
                  f"{rss / 2**20:>14.1f}{ratio:>12}{ratio_med:>14}")
            results.append({"case": case.name, "tool": name, "seconds": secs,
                            "median_seconds": med, "runs": times[name],
                            "mb_per_s": mbps, "output_bytes": out_size, "peak_rss": rss,
                            "ratio_diskforge_over_tool": ours[0] / secs if ours and secs
                            else None,
                            "median_ratio": ours[1] / med if ours and med else None})
        for name in missing:
            print(f"{'':<28}{name:<24}  (not installed: skipped)")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
