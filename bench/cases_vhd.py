"""VHD rows: raw → vpc (dynamic) and vpc → raw, beside qemu-img in the same run.

The vpc → raw rows read one dynamic VHD that qemu-img made from the mixed disk (built
once in the bench directory), so both tools read the very same file.
"""

import os
import subprocess

from run import Case, Tool, diskforge_cmd, have


def out(name):
    return lambda ctx: ctx.path(name)


def _vhd_source(ctx) -> None:
    """A dynamic VHD of the mixed disk, made by qemu-img, reused across runs."""
    path = ctx.path(f"mixed-{ctx.size}.vhd")
    if not os.path.exists(path):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
                        "force_size=on", ctx.source, path + ".tmp"], check=True)
        os.replace(path + ".tmp", path)
    ctx.cache["vhd"] = path
    with open(path, "rb") as f:  # warm, like the raw source
        while f.read(8 << 20):
            pass


CASES = [
    Case("raw->vpc dynamic", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "vpc", "-o",
                                                       "force_size=on", c.source,
                                                       c.path("out-df.vhd")],
             out("out-df.vhd")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
                                    "force_size=on", c.source, c.path("out-qi.vhd")],
             out("out-qi.vhd"), have("qemu-img")),
    ]),
    Case("vpc dynamic->raw", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "raw",
                                                       c.cache["vhd"], c.path("out-df.raw")],
             out("out-df.raw")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert", "-f", "vpc", "-O", "raw",
                                    c.cache["vhd"], c.path("out-qi.raw")],
             out("out-qi.raw"), have("qemu-img")),
    ], setup=_vhd_source),
]
