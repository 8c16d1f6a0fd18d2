"""Before/after byte-identity check for refactors: the same few hundred outputs made by
two revisions of diskforge, compared by sha256.

    python3 bench/compare_outputs.py --before d01dbc2               # vs this worktree
    python3 bench/compare_outputs.py --before d01dbc2 --after main  # vs another revision
    python3 bench/compare_outputs.py --before d01dbc2 --list        # the cases, no run

Why a script and not a test: a refactor that promises "behaviour unchanged" must show
that every writer, with each of its main option sets, still writes the same bytes, and
that ``info``/``map``/``check --output json`` still print the same text; the suite checks
meanings (round trips, reference tools), not bytes.

How: each revision that is not the working tree is checked out with a temporary
``git worktree add --detach`` and run with ``PYTHONPATH=<tree>/src`` (plus a generated
``entry_points.txt`` from that tree's pyproject.toml, so the plugin registry loads that
tree's formats, not the installed ones). Both sides read the same inputs (raw disks made
here from a fixed seed, and qcow2/VHD/VHDX/DMG images and overlays made once from them by
the *before* code) and run in the same absolute directory, one after the other, so paths
written into images (VHD parent locators) match. The writers' random identifiers (VHD,
VHDX and DMG UUIDs, temporary names) come from ``os.urandom``, which the runner replaces
with a counter-seeded sha256 stream; ``SOURCE_DATE_EPOCH`` fixes VHD and ISO dates.

Counts each compared output (every file a case writes, and its stdout/stderr/exit code),
prints every difference, exits 1 when there is one. 2 to 6 minutes on 2 cores
(about 730 diskforge runs).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MiB = 1 << 20
EPOCH = "1700000000"

# os.urandom made reproducible, then the ordinary entry point (python -m diskforge)
RUNNER = r'''
import hashlib, os, runpy, sys, threading
_lock, _state = threading.Lock(), {"n": 0}
def _urandom(n):
    with _lock:
        out = b""
        while len(out) < n:
            _state["n"] += 1
            out += hashlib.sha256(b"compare_outputs %d" % _state["n"]).digest()
        return out[:n]
os.urandom = _urandom
sys.argv = ["diskforge"] + sys.argv[1:]
runpy.run_module("diskforge", run_name="__main__", alter_sys=True)
'''

# -O format -> option sets (each a list of extra arguments) and the output extension
WRITERS: dict[str, tuple[str, list[list[str]]]] = {
    "raw": ("raw", [[], ["-o", "preallocation=full"]]),
    "qcow2": ("qcow2", [
        [], ["-c"], ["-c", "-o", "compression_type=zstd"], ["-o", "compat=0.10"],
        ["-o", "cluster_size=4096"], ["-o", "cluster_size=2M"],
        ["-o", "extended_l2=on"], ["-c", "-o", "extended_l2=on,cluster_size=32768"],
        ["-o", "refcount_bits=1"], ["-o", "refcount_bits=64"],
        ["-o", "lazy_refcounts=on"], ["-o", "preallocation=metadata"],
        ["-o", "preallocation=full"], ["-o", "data_file={out}.data"],
        ["-o", "data_file={out}.data,data_file_raw=on"]]),
    "vpc": ("vhd", [[], ["-o", "subformat=fixed"], ["-o", "force_size=on"],
                    ["-o", "force_size=off"], ["-o", "block_size=512K"]]),
    "vhdx": ("vhdx", [[], ["-o", "subformat=fixed"], ["-o", "block_size=1M"],
                      ["-o", "logical_sector_size=4096"], ["-o", "log_size=2M"]]),
    "dmg": ("dmg", [[], ["-c"], ["-o", "format=UDBZ"], ["-o", "format=ULFO"],
                    ["-o", "format=ULMO"], ["-o", "format=UDRO"], ["-o", "format=UDRW"],
                    ["-o", "format=UDZO,zlib_level=9"]]),
}
RAW_INPUTS = ("sparse", "random", "zero", "mixed", "odd")
# images the before code makes once, read by both sides: name -> convert arguments
IMAGE_INPUTS = {
    "mixed.qcow2": ["-O", "qcow2", "in/mixed.raw"],
    "mixed-c.qcow2": ["-O", "qcow2", "-c", "in/mixed.raw"],
    "mixed-zstd.qcow2": ["-O", "qcow2", "-c", "-o", "compression_type=zstd",
                         "in/mixed.raw"],
    "mixed-l2.qcow2": ["-O", "qcow2", "-o", "extended_l2=on", "in/mixed.raw"],
    "mixed-v2.qcow2": ["-O", "qcow2", "-o", "compat=0.10", "in/mixed.raw"],
    "mixed.vhd": ["-O", "vpc", "in/mixed.raw"],
    "mixed-fixed.vhd": ["-O", "vpc", "-o", "subformat=fixed", "in/mixed.raw"],
    "mixed.vhdx": ["-O", "vhdx", "in/mixed.raw"],
    "mixed-fixed.vhdx": ["-O", "vhdx", "-o", "subformat=fixed", "in/mixed.raw"],
    "mixed.dmg": ["-O", "dmg", "in/mixed.raw"],
    "mixed-ulfo.dmg": ["-O", "dmg", "-o", "format=ULFO", "in/mixed.raw"],
    "mixed-udrw.dmg": ["-O", "dmg", "-o", "format=UDRW", "in/mixed.raw"],
    "base.qcow2": ["-O", "qcow2", "in/sparse.raw"],
    "base.vhd": ["-O", "vpc", "in/sparse.raw"],
    "base.vhdx": ["-O", "vhdx", "in/sparse.raw"],
    "ovl.qcow2": ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "in/mod.raw"],
    "ovl.vhd": ["-O", "vpc", "-B", "base.vhd", "-F", "vpc", "in/mod.raw"],
    "ovl.vhdx": ["-O", "vhdx", "-B", "base.vhdx", "-F", "vhdx", "in/mod.raw"],
}
ISO_SETS = [[], ["--level", "1"], ["--level", "4"], ["--no-rock-ridge"], ["--no-joliet"],
            ["--udf"], ["--rational-rock"], ["-V", "COMPARE_ME"],
            ["--boot", "boot/boot.img"], ["--boot", "boot/boot.img", "--hybrid"]]


# -- inputs ----------------------------------------------------------------------------
def _write_disk(path: str, size: int, runs) -> None:
    """A raw disk of ``size`` bytes: ``runs`` of (offset, bytes); the rest a hole."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in runs:
            f.seek(off)
            f.write(data)


def make_raw_inputs(d: str) -> None:
    rng = random.Random(20261202)
    rnd = lambda n: rng.randbytes(n)  # noqa: E731
    text = b"".join(b"%05d block sector cluster header table %d\n" % (i, i * 7)
                    for i in range(40000))
    _write_disk(f"{d}/sparse.raw", 8 * MiB, [(1 * MiB, rnd(65536)),
                                             (3 * MiB + 512, text[:200000]),
                                             (6 * MiB, rnd(MiB))])
    _write_disk(f"{d}/random.raw", 4 * MiB, [(0, rnd(4 * MiB))])
    _write_disk(f"{d}/zero.raw", 4 * MiB, [(0, bytes(4 * MiB))])
    runs, pos = [], 0
    while pos < 16 * MiB:
        n = min(rng.randint(1, 64) * 4096, 16 * MiB - pos)
        kind = rng.choice("rrtzh")
        if kind != "h":
            runs.append((pos, rnd(n) if kind == "r" else
                         bytes(n) if kind == "z" else (text * 2)[pos % 65536:][:n]))
        pos += n
    _write_disk(f"{d}/mixed.raw", 16 * MiB, runs)
    _write_disk(f"{d}/odd.raw", 5 * MiB + 1536, [(5 * MiB, rnd(1536)), (4096, rnd(700))])
    with open(f"{d}/sparse.raw", "rb") as f:
        base = f.read()
    mod = bytearray(base)
    mod[1 * MiB + 4096:1 * MiB + 8192] = rnd(4096)        # over data
    mod[5 * MiB:5 * MiB + 300000] = rnd(300000)           # over a hole
    mod[6 * MiB:6 * MiB + 65536] = bytes(65536)           # data zeroed
    _write_disk(f"{d}/mod.raw", 8 * MiB, [(0, bytes(mod))])
    tree = f"{d}/isotree"
    for sub in ("docs/deep/deeper", "boot", "empty"):
        os.makedirs(f"{tree}/{sub}", exist_ok=True)
    files = {"README.TXT": b"hello\n" * 100, "docs/a long file name.txt": text[:5000],
             "docs/deep/deeper/x.bin": rnd(70000), "boot/boot.img": rnd(2048),
             "UPPER.DAT": rnd(4096)}
    for name, data in files.items():
        with open(f"{tree}/{name}", "wb") as f:
            f.write(data)
    os.symlink("README.TXT", f"{tree}/link")
    for root, dirs, names in os.walk(tree):
        for n in dirs + names:
            os.utime(os.path.join(root, n), (1600000000, 1600000000), follow_symlinks=False)
    os.utime(tree, (1600000000, 1600000000))


# -- cases -----------------------------------------------------------------------------
def cases() -> list[tuple[str, list[str], list[str]]]:
    """(name, diskforge arguments, files it writes) for one side; paths relative to the
    run directory (inputs under in/, outputs under out/)."""
    out: list[tuple[str, list[str], list[str]]] = []
    for src in RAW_INPUTS:
        for fmt, (ext, sets) in WRITERS.items():
            for i, opts in enumerate(sets):
                if src in ("random", "zero") and i:  # every option set: 3 inputs
                    continue
                dst = f"out/{src}.{fmt}{i}.{ext}"
                args = [a.format(out=os.path.basename(dst)) for a in opts]
                files = [dst] + ([f"{dst}.data"] if "data_file=" in " ".join(opts) else [])
                out.append((f"convert {src} -O {fmt} {' '.join(args)}",
                            ["convert", "-O", fmt, *args, f"in/{src}.raw", dst], files))
    for name in IMAGE_INPUTS:
        for fmt, (ext, _) in WRITERS.items():
            dst = f"out/from-{name}.{ext}"
            out.append((f"convert {name} -O {fmt}",
                        ["convert", "-O", fmt, f"in/{name}", dst], [dst]))
    for fmt, base, extra in (("qcow2", "base.qcow2", []), ("qcow2", "base.qcow2", ["-c"]),
                             ("vpc", "base.vhd", []), ("vhdx", "base.vhdx", []),
                             ("qcow2", "ovl.qcow2", [])):
        dst = f"out/diff-{fmt}-{base}{''.join(extra)}.img"
        out.append((f"convert -B {base} {' '.join(extra)}",
                    ["convert", "-O", fmt, *extra, "-B", f"../in/{base}", "in/mod.raw",
                     dst],
                    [dst]))
    inspected = [f"in/{n}" for n in IMAGE_INPUTS] + [f"in/{s}.raw" for s in RAW_INPUTS]
    # the writers' own outputs are compared byte for byte above; one check each still
    # runs the readers over every option set's layout
    inspected += [f"out/mixed.{fmt}{i}.{ext}" for fmt, (ext, sets) in WRITERS.items()
                  for i in range(len(sets)) if fmt != "raw"]
    for path in inspected:
        for cmd in (["info", "--output", "json"], ["map", "--output", "json"],
                    ["check", "--output", "json"], ["info"]):
            if path.startswith("out/") and cmd[0] != "check":
                continue
            out.append((f"{' '.join(cmd)} {path}", [*cmd, path], []))
    for path in ("in/ovl.qcow2", "in/ovl.vhd", "in/ovl.vhdx"):
        out.append((f"info --backing-chain {path}",
                    ["info", "--backing-chain", "--output", "json", path], []))
        out.append((f"map {path}", ["map", path], []))
    out.append(("compare", ["compare", "in/mixed.raw", "in/mixed-c.qcow2"], []))
    out.append(("measure", ["measure", "--output", "json", "-O", "qcow2",
                            "in/mixed.raw"], []))
    for i, opts in enumerate(ISO_SETS):
        dst = f"out/tree{i}.iso"
        out.append((f"iso build {' '.join(opts)}",
                    ["iso", "build", "-q", *opts, "in/isotree", dst], [dst]))
    for fmt in ("qcow2", "vhdx", "raw"):
        dst = f"out/imaged.{fmt}"
        out.append((f"image -O {fmt}", ["image", "-q", "-O", fmt, "in/mixed.raw", dst],
                    [dst, f"{dst}.integrity.json"]))
    dst = "out/imaged-diff.qcow2"
    out.append(("image --base", ["image", "-q", "-O", "qcow2", "--base", "in/sparse.raw",
                                 "-F", "raw", "in/mod.raw", dst],
                [dst, f"{dst}.integrity.json"]))
    return out


# -- running ---------------------------------------------------------------------------
def _tree_env(tree: str, meta: str) -> dict:
    """Environment that runs ``tree``'s diskforge with its own plugin entry points."""
    with open(os.path.join(tree, "pyproject.toml"), "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"]
    dist = os.path.join(meta, "diskforge-0.dist-info")
    os.makedirs(dist, exist_ok=True)
    with open(os.path.join(dist, "entry_points.txt"), "w") as f:
        for group, items in eps.items():
            f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()))
    with open(os.path.join(meta, "compare_runner.py"), "w") as f:
        f.write(RUNNER)
    env = dict(os.environ, PYTHONPATH=f"{tree}/src{os.pathsep}{meta}",
               SOURCE_DATE_EPOCH=EPOCH, TZ="UTC", LC_ALL="C.UTF-8",
               PYTHONHASHSEED="0")
    env.pop("DISKFORGE_UNTRUSTED", None)
    return env


def _run(env: dict, meta: str, cwd: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(meta, "compare_runner.py"), *args],
                          cwd=cwd, env=env, capture_output=True, timeout=600)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _normalized(stdout: bytes) -> bytes:
    """Blocks the file system gave a file (``actual-size``, ``disk size``) vary from run
    to run with the same bytes written; everything else is compared as printed."""
    return re.sub(rb'("actual-size": )\d+|(disk size: ).*', rb"\1\2-", stdout)


def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except FileNotFoundError:
        return "missing"
    return h.hexdigest()


def run_side(tree: str, meta: str, run_dir: str, jobs: int) -> dict[str, str]:
    """Run every case with ``tree``'s code; {output name: sha256}."""
    env = _tree_env(tree, meta)
    out_dir = os.path.join(run_dir, "out")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    results: dict[str, str] = {}
    all_cases = cases()
    writers = [c for c in all_cases if c[2]]
    readers = [c for c in all_cases if not c[2]]

    def one(case):
        name, args, files = case
        p = _run(env, meta, run_dir, args)
        printed = b"%d\n" % p.returncode + _normalized(p.stdout) + b"\0" + p.stderr
        got = {f"{name} :: rc+stdout+stderr": _sha(printed)}
        for path in files:
            got[f"{name} :: {os.path.basename(path)}"] = _file_sha(
                os.path.join(run_dir, path))
        return got
    for group in (writers, readers):
        with cf.ThreadPoolExecutor(jobs) as pool:
            for got in pool.map(one, group):
                results.update(got)
    return results


def _checkout(rev: str, where: str) -> str:
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "-q", where, rev],
                   check=True)
    return where


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="git revision of the old code")
    ap.add_argument("--after", default="worktree",
                    help="git revision of the new code, or 'worktree' (default): this tree")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="parallel runs (default 2)")
    ap.add_argument("--keep", help="keep the work directory here (inputs, last outputs)")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, cmd, _ in cases():
            print(name)
        print(f"{len(cases())} cases")
        return 0
    work = args.keep or tempfile.mkdtemp(prefix="df-compare-")
    os.makedirs(work, exist_ok=True)
    trees: list[str] = []
    try:
        before = _checkout(args.before, os.path.join(work, "tree-before"))
        trees.append(before)
        if args.after == "worktree":
            after = REPO
        else:
            after = _checkout(args.after, os.path.join(work, "tree-after"))
            trees.append(after)
        run_dir = os.path.join(work, "run")
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(os.path.join(run_dir, "in"))
        make_raw_inputs(os.path.join(run_dir, "in"))
        env = _tree_env(before, os.path.join(work, "meta-before"))
        for name, conv in IMAGE_INPUTS.items():
            p = _run(env, os.path.join(work, "meta-before"), os.path.join(run_dir, "in"),
                     ["convert", *conv[:-1], conv[-1].removeprefix("in/"), name])
            if p.returncode:
                sys.exit(f"making input {name} failed: {p.stderr.decode().strip()}")
        old = run_side(before, os.path.join(work, "meta-before"), run_dir, args.jobs)
        new = run_side(after, os.path.join(work, "meta-after"), run_dir, args.jobs)
    finally:
        for t in trees:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", t],
                           check=False)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    for k in diff:
        print(f"DIFFERS: {k}: {old.get(k, 'absent')[:12]} -> {new.get(k, 'absent')[:12]}")
    files = sum(1 for k in old if not k.endswith("rc+stdout+stderr"))
    print(f"{len(cases())} runs a side, {len(old)} outputs compared ({files} files,"
          f" {len(old) - files} stdout/stderr/exit): {len(old) - len(diff)} identical,"
          f" {len(diff)} different ({args.before} -> {args.after})")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
