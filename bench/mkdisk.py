"""Build the deterministic benchmark disk: scattered extents of mixed content.

By bytes, about 40% incompressible random data, 20% compressible text-like data, 20%
written zeros and 20% holes, in extents of 64 KiB to 8 MiB (64 KiB aligned) placed in
a shuffled order. The same seed and size always give the same bytes (checked by the
sha256 recorded beside the file), so runs on different days compare.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys

SEED = 20261124
WORDS = ("the of and to in is was for on that with as by at from disk image block sector "
         "cluster header table partition boot kernel volume file system data zero backing "
         "snapshot qemu vhd vmdk qcow2 convert restore mount device format offset length "
         "alpha beta gamma delta lorem ipsum dolor sit amet consectetur").split()


def _text_pool(rng: random.Random, size: int) -> bytes:
    out, n = [], 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        line = f"{rng.randint(0, 99999):05d} {line}.\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def layout(size: int, seed: int = SEED):
    """The extent plan: a list of (offset, length, kind), kind in random/text/zero/hole."""
    rng = random.Random(seed)
    unit = 64 * 1024
    plan, pos = [], 0
    kinds = ["random"] * 40 + ["text"] * 20 + ["zero"] * 20 + ["hole"] * 20
    while pos < size:
        length = min(rng.randint(1, 128) * unit, size - pos)
        plan.append((pos, length, rng.choice(kinds)))
        pos += length
    return plan


def build(path: str, size: int = 2 << 30, seed: int = SEED) -> str:
    """Write the disk to ``path`` (atomically) unless an identical one is there; returns
    the sha256 of its contents."""
    stamp = path + ".sha256"
    if os.path.exists(path) and os.path.exists(stamp):
        recorded = open(stamp).read().split()
        if len(recorded) == 3 and recorded[1:] == [str(size), str(seed)] \
                and os.path.getsize(path) == size:
            return recorded[0]
    rng = random.Random(seed + 1)
    pool = _text_pool(rng, 8 << 20)
    tmp = f"{path}.{os.getpid()}.tmp"
    h = hashlib.sha256()
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off, length, kind in layout(size, seed):
            if kind == "random":
                data = rng.randbytes(length)
            elif kind == "text":
                start = rng.randrange(0, len(pool) - length + 1)
                data = pool[start:start + length]
            elif kind == "zero":
                data = bytes(length)
            else:
                h.update(bytes(length))
                continue
            os.pwrite(fd, data, off)
            h.update(data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    digest = h.hexdigest()
    with open(stamp, "w") as f:
        f.write(f"{digest} {size} {seed}\n")
    return digest


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "mixed.raw"
    print(build(target))
