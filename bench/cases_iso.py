"""ISO rows: building an ISO from a tree of 1,000 files (300 MB) beside xorriso and
genisoimage, and extracting one beside xorriso and 7-Zip (7zz).

The tree is made once under the bench directory (``iso-tree``, deterministic sizes,
random contents) and reused. Every builder writes Rock Ridge + Joliet (diskforge's
default; ``-R -J`` for the others). Extraction reads one ISO made by xorriso, so all
three tools read the same image.
"""

import os
import random
import subprocess

from run import Case, Tool, diskforge_cmd, have

FILES = 1000
TOTAL = 300 * 1000 * 1000


def make_tree(ctx) -> None:
    root = ctx.path("iso-tree")
    stamp = os.path.join(root, ".complete")
    if os.path.exists(stamp):
        return
    rng = random.Random(1)
    weights = [rng.lognormvariate(0, 1.2) for _ in range(FILES)]
    scale = TOTAL / sum(weights)
    sizes = [int(w * scale) for w in weights]
    sizes[-1] += TOTAL - sum(sizes)
    chunk = os.urandom(8 << 20)
    for i, size in enumerate(sizes):
        d = os.path.join(root, f"dir{i % 40:02d}", f"sub{i % 7}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"file-{i:04d}.bin"), "wb") as f:
            left, off = size, (i * 4099) % 4096   # files differ from one another
            while left > 0:
                n = min(left, len(chunk) - off)
                f.write(chunk[off:off + n])
                left, off = left - n, 0
    open(stamp, "w").close()


def make_iso(ctx) -> None:
    make_tree(ctx)
    iso = ctx.path("iso-ref.iso")
    if not os.path.exists(iso):
        subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-R", "-J", "-o", iso,
                        ctx.path("iso-tree")], check=True)


def tree(ctx):
    return ctx.path("iso-tree")


def out(name):
    return lambda ctx: ctx.path(name)


CASES = [
    Case("iso build 1000 files/300MB", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["iso", "build", "-q", tree(c),
                                                       c.path("iso-df.iso")],
             out("iso-df.iso")),
        Tool("xorriso -R -J", lambda c: ["xorriso", "-as", "mkisofs", "-quiet", "-R", "-J",
                                         "-o", c.path("iso-x.iso"), tree(c)],
             out("iso-x.iso"), have("xorriso")),
        Tool("genisoimage -R -J", lambda c: ["genisoimage", "-quiet", "-R", "-J", "-o",
                                             c.path("iso-g.iso"), tree(c)],
             out("iso-g.iso"), have("genisoimage")),
    ], setup=make_tree, bytes_of=lambda c: TOTAL),
    Case("iso extract 1000 files/300MB", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["iso", "extract", "-q",
                                                       c.path("iso-ref.iso"),
                                                       c.path("iso-out-df")],
             out("iso-out-df")),
        Tool("xorriso -extract", lambda c: ["xorriso", "-osirrox", "on", "-indev",
                                            c.path("iso-ref.iso"), "-extract", "/",
                                            c.path("iso-out-x")],
             out("iso-out-x"), have("xorriso")),
        Tool("7zz x", lambda c: ["7zz", "x", "-y", "-bso0", "-bsp0",
                                 f"-o{c.path('iso-out-7')}", c.path("iso-ref.iso")],
             out("iso-out-7"), have("7zz")),
    ], setup=make_iso, bytes_of=lambda c: TOTAL),
]
