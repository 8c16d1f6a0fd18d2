"""VHDX rows: raw -> vhdx (dynamic) and vhdx -> raw, beside qemu-img."""

import os
import shutil
import subprocess

from run import Case, Tool, diskforge_cmd, have


def out(name):
    return lambda ctx: ctx.path(name)


def vhdx_source(ctx):
    """The mixed disk as a dynamic VHDX made by qemu-img (by diskforge without it): the
    input of vhdx -> raw, built once beside the mixed disk."""
    path = ctx.path(f"mixed-{ctx.size}.vhdx")
    if not os.path.exists(path):
        maker = (["qemu-img", "convert"] if shutil.which("qemu-img")
                 else diskforge_cmd() + ["convert"])
        subprocess.run(maker + ["-O", "vhdx", ctx.source, path], check=True)
    ctx.cache["vhdx"] = path


CASES = [
    Case("raw->vhdx (dynamic)", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "vhdx", c.source,
                                                       c.path("out-df.vhdx")],
             out("out-df.vhdx")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert", "-O", "vhdx", c.source,
                                    c.path("out-qi.vhdx")], out("out-qi.vhdx"),
             have("qemu-img")),
    ]),
    Case("vhdx->raw", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "raw",
                                                       c.cache["vhdx"], c.path("v-df.raw")],
             out("v-df.raw")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert", "-O", "raw", c.cache["vhdx"],
                                    c.path("v-qi.raw")], out("v-qi.raw"), have("qemu-img")),
    ], setup=vhdx_source),
]
