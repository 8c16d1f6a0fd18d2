"""VDI rows: raw → vdi (dynamic) and vdi → raw, beside qemu-img in the same run.

The vdi → raw rows read one dynamic VDI that qemu-img made from the mixed disk (built
once in the bench directory), so both tools read the very same file.
"""

import os
import subprocess

from run import Case, Tool, diskforge_cmd, have


def out(name):
    return lambda ctx: ctx.path(name)


def _vdi_source(ctx) -> None:
    """A dynamic VDI of the mixed disk, made by qemu-img, reused across runs."""
    path = ctx.path(f"mixed-{ctx.size}.vdi")
    if not os.path.exists(path):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vdi", ctx.source,
                        path + ".tmp"], check=True)
        os.replace(path + ".tmp", path)
    ctx.cache["vdi"] = path
    with open(path, "rb") as f:  # warm, like the raw source
        while f.read(8 << 20):
            pass


CASES = [
    Case("raw->vdi dynamic", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "vdi", c.source,
                                                       c.path("out-df.vdi")],
             out("out-df.vdi")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert", "-f", "raw", "-O", "vdi",
                                    c.source, c.path("out-qi.vdi")],
             out("out-qi.vdi"), have("qemu-img")),
    ]),
    Case("vdi dynamic->raw", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "raw",
                                                       c.cache["vdi"], c.path("out-df.raw")],
             out("out-df.raw")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert", "-f", "vdi", "-O", "raw",
                                    c.cache["vdi"], c.path("out-qi.raw")],
             out("out-qi.raw"), have("qemu-img")),
    ], setup=_vdi_source),
]
