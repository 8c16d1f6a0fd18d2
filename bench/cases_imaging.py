"""Imaging rows: a full image of the mixed disk (compressed qcow2 with the integrity
record, i.e. the whole disk hashed too) and a differential image after 5% of its 4 KiB
blocks changed, each beside ``qemu-img convert -c`` doing the same (``-B`` for the
differential) in the same run.

The changed copy and the full image it is compared against are made once and kept in
the bench directory (``mixed-SIZE.changed.raw``, ``mixed-SIZE.full.qcow2``).
"""

import os
import random
import subprocess

from run import Case, Tool, diskforge_cmd, have


def _fresh(path, stamp_text):
    stamp = path + ".from"
    return os.path.exists(path) and os.path.exists(stamp) and open(stamp).read() == stamp_text


def _stamp(path, stamp_text):
    with open(path + ".from", "w") as f:
        f.write(stamp_text)


def prepare(ctx):
    src_stamp = open(ctx.source + ".sha256").read()
    base = os.path.splitext(ctx.source)[0]
    changed = base + ".changed.raw"
    if not _fresh(changed, src_stamp):
        tmp = changed + ".tmp"
        subprocess.run(["cp", "--sparse=always", ctx.source, tmp], check=True)
        rng = random.Random(5)
        blocks = ctx.size // 4096
        with open(tmp, "r+b") as f:
            for _ in range(blocks // 20):  # 5% of the blocks
                f.seek(rng.randrange(blocks) * 4096)
                f.write(rng.randbytes(4096))
        os.replace(tmp, changed)
        _stamp(changed, src_stamp)
    full = base + ".full.qcow2"
    if not _fresh(full, src_stamp):
        for leftover in (full, full + ".integrity.json"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        subprocess.run(diskforge_cmd() + ["image", "-q", ctx.source, full], check=True)
        _stamp(full, src_stamp)
    ctx.cache.update(changed=changed, full=full)


def out(name):
    return lambda ctx: ctx.path(name)


CASES = [
    Case("image full -> qcow2 -c", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["image", "-q", c.source,
                                                       c.path("img-df.qcow2")],
             out("img-df.qcow2")),
        Tool("qemu-img convert -c", lambda c: ["qemu-img", "convert", "-c", "-O", "qcow2",
                                               c.source, c.path("img-qi.qcow2")],
             out("img-qi.qcow2"), have("qemu-img")),
    ], setup=prepare),
    Case("image diff (5% changed)", [
        Tool("diskforge", lambda c: diskforge_cmd() + [
            "image", "-q", "--base", c.cache["full"], c.cache["changed"],
            c.path("diff-df.qcow2")], out("diff-df.qcow2")),
        Tool("qemu-img convert -c -B", lambda c: [
            "qemu-img", "convert", "-c", "-O", "qcow2", "-B",
            os.path.basename(c.cache["full"]), "-F", "qcow2", c.cache["changed"],
            c.path("diff-qi.qcow2")], out("diff-qi.qcow2"), have("qemu-img")),
    ], setup=prepare),
]
