"""A mutation run over the CLI, outside the test suite (it takes minutes): small seed
images of every format are damaged at random (bit flips, 8-byte integers such as
0xFFFFFFFF, truncation) and fed to `info`, `convert -O raw`, `check`, `map`, `iso ls`
and `iso extract`, each in a child process with a 3 GiB address-space cap and a
30-second limit. Reported: internal errors, tracebacks, signals, hangs, and failures
that are not one line on stderr (`check` exiting 1, 2 or 3 is normal: its summary goes
to stdout and, as qemu-img's do, its findings to stderr, one line each).

    python3 tests/fuzz_cli.py [--seed N] [--count N] [--dir DIR]

Needs qemu-img and qemu-io (for the extended-L2 and compressed qcow2 seeds). Damaged
files that were reported are kept in DIR as crash-*.
"""

import argparse
import concurrent.futures as cf
import os
import random
import resource
import shutil
import subprocess
import sys

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
DF = [sys.executable, "-m", "diskforge"]


def make_seeds(d: str) -> list[str]:
    raw = os.path.join(FIXTURES, "mbr-fat.raw")

    def df(*args, cwd=None):
        subprocess.run(DF + list(args), check=True, cwd=cwd)

    def sh(*args):
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)

    p = lambda name: os.path.join(d, name)  # noqa: E731
    shutil.copy(os.path.join(FIXTURES, "mbr-fat.qcow2"), p("seed.qcow2"))
    sh("qemu-img", "convert", "-c", "-O", "qcow2", raw, p("seedc.qcow2"))
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", p("seedx.qcow2"),
       "4M")
    sh("qemu-io", "-c", "write -P 0x55 100k 300k", p("seedx.qcow2"))
    df("convert", "-O", "vpc", raw, p("seed.vhd"))
    df("convert", "-O", "vpc", "-o", "subformat=fixed", raw, p("seedf.vhd"))
    df("convert", "-O", "vhdx", "-o", "block_size=1M", raw, p("seed.vhdx"))
    df("convert", "-O", "dmg", raw, p("seed.dmg"))
    df("convert", "-O", "dmg", "-o", "format=ULFO", raw, p("seedl.dmg"))
    shutil.copy(os.path.join(FIXTURES, "dmg", "dmgwiz_input_adc.dmg"), p("seedadc.dmg"))
    tree = p("tree")
    os.makedirs(os.path.join(tree, "a", "b"))
    with open(os.path.join(tree, "a", "b", "f"), "w") as f:
        f.write("hi\n")
    os.symlink("f", os.path.join(tree, "a", "b", "l"))
    df("iso", "build", "-q", "--udf", tree, p("seed.iso"))
    # children of an intact parent (copied beside each damaged child): the parent
    # lookup, the bitmaps and the composition are exercised too
    parents = os.path.join(d, "parents")
    os.makedirs(parents)
    for fmt, ext in (("qcow2", "qcow2"), ("vpc", "vhd"), ("vhdx", "vhdx")):
        parent = os.path.join(parents, "parent." + ext)
        df("convert", "-O", fmt, raw, parent)
        changed = p("changed.raw")
        shutil.copy(raw, changed)
        with open(changed, "r+b") as f:
            f.seek(4096)
            f.write(b"\xa5" * 70000)
        # named relative to the child, so a copy of the pair works anywhere
        df("convert", "-O", fmt, "-B", "parent." + ext, changed, "seedchild." + ext,
           cwd=parents)
        os.replace(os.path.join(parents, "seedchild." + ext), p("seedchild." + ext))
        os.unlink(changed)
    return sorted(p(n) for n in os.listdir(d) if n.startswith("seed"))


def mutate(data: bytearray, r: random.Random) -> bytearray:
    kind = r.choice(["flip", "flip", "int", "int", "trunc", "tail"])
    n = len(data)
    if kind == "trunc":
        return data[:r.randrange(n)]
    for _ in range(r.randint(1, 6)):
        if kind == "tail":
            off = n - 1 - r.randrange(min(n, 1024))
        elif r.random() < 0.5:
            off = r.randrange(n)
        else:
            off = r.randrange(min(n, 65536))
        if kind == "int" and off + 8 <= n:
            v = r.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFFFFFFFFFF,
                          1 << r.randrange(64), r.getrandbits(32)])
            data[off:off + 8] = v.to_bytes(8, r.choice(["big", "little"]))
        else:
            data[off] ^= 1 << r.randrange(8)
    return data


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def one(d: str, seeds: list[str], seed: int, i: int):
    r = random.Random(seed * 1_000_003 + i)
    src = r.choice(seeds)
    ext = os.path.splitext(src)[1]
    work = os.path.join(d, f"w{i}")
    os.makedirs(work)
    path = os.path.join(work, "m" + ext)
    with open(src, "rb") as f:
        data = mutate(bytearray(f.read()), r)
    with open(path, "wb") as f:
        f.write(data)
    parent = os.path.join(d, "parents", "parent" + ext)
    if os.path.basename(src).startswith("seedchild") and os.path.exists(parent):
        shutil.copy(parent, work)
    if ext == ".iso":
        cmds = [["iso", "ls", "-l", path], ["iso", "extract", path, os.path.join(work, "x")],
                ["info", path]]
    else:
        cmds = [["info", path], ["convert", "-O", "raw", path, os.path.join(work, "o.raw")],
                ["check", path], ["map", path]]
    bad = []
    for c in cmds:
        try:
            p = subprocess.run(DF + c, capture_output=True, text=True, timeout=30,
                               preexec_fn=_cap)
        except subprocess.TimeoutExpired:
            bad.append(("timeout", c[0]))
            continue
        err = p.stderr.strip()
        findings = c[0] == "check" and p.returncode in (1, 2, 3)  # a line each
        if (p.returncode < 0 or "internal error" in err or "Traceback" in err
                or (p.returncode and not findings and len(err.splitlines()) != 1)):
            bad.append((p.returncode, c[0], err[-300:]))
    if bad:
        keep = os.path.join(d, f"crash-{i}{ext}")
        shutil.copy(path, keep)
    shutil.rmtree(work, ignore_errors=True)
    return (os.path.basename(src), keep, bad) if bad else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--dir", default="/tmp/diskforge-fuzz")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    seeds = make_seeds(a.dir)
    found = 0
    with cf.ThreadPoolExecutor(os.cpu_count() or 2) as ex:
        for res in ex.map(lambda i: one(a.dir, seeds, a.seed, i), range(a.count)):
            if res:
                found += 1
                print(res, flush=True)
    print(f"{a.count} damaged images, {found} reported")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
