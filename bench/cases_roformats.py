"""Read-only formats' rows: qcow (version 1), qed and parallels → raw, beside qemu-img in
the same run.

Each source is made once by qemu-img from the mixed disk (in the bench directory), so
both tools read the very same file.
"""

import os
import subprocess

from run import Case, Tool, diskforge_cmd, have

FORMATS = (("qcow", "qcow"), ("qed", "qed"), ("parallels", "hds"))


def out(name):
    return lambda ctx: ctx.path(name)


def _source(fmt: str, ext: str):
    def setup(ctx) -> None:
        path = ctx.path(f"mixed-{ctx.size}.{ext}")
        if not os.path.exists(path):
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, ctx.source,
                            path + ".tmp"], check=True)
            os.replace(path + ".tmp", path)
        ctx.cache[fmt] = path
        with open(path, "rb") as f:  # warm, like the raw source
            while f.read(8 << 20):
                pass
    return setup


def _case(fmt: str, ext: str) -> Case:
    return Case(f"{fmt}->raw", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "raw",
                                                       c.cache[fmt], c.path("out-df.raw")],
             out("out-df.raw")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert", "-f", fmt, "-O", "raw",
                                    c.cache[fmt], c.path("out-qi.raw")],
             out("out-qi.raw"), have("qemu-img")),
    ], setup=_source(fmt, ext))


CASES = [_case(fmt, ext) for fmt, ext in FORMATS]
