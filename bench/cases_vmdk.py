"""VMDK rows: raw → vmdk monolithicSparse, raw → vmdk streamOptimized (diskforge's
deflate runs in the convert pool; qemu-img's in one thread) and vmdk → raw, beside
qemu-img in the same run; and streamOptimized → raw (compressed reads).

The vmdk → raw rows read one monolithicSparse (or streamOptimized) VMDK that qemu-img
made from the mixed disk (built once in the bench directory), so both tools read the
very same file.
"""

import os
import subprocess

from run import Case, Tool, diskforge_cmd, have


def out(name):
    return lambda ctx: ctx.path(name)


def _vmdk_source(ctx, subformat: str = "monolithicSparse") -> None:
    """A monolithicSparse (or streamOptimized) VMDK of the mixed disk, made by
    qemu-img, reused across runs."""
    stream = subformat == "streamOptimized"
    path = ctx.path(f"mixed-{ctx.size}.stream.vmdk" if stream else f"mixed-{ctx.size}.vmdk")
    if not os.path.exists(path):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                        f"subformat={subformat}", ctx.source, path + ".tmp"], check=True)
        os.replace(path + ".tmp", path)
    key = "vmdk-stream" if stream else "vmdk"
    ctx.cache[key] = path
    with open(path, "rb") as f:  # warm, like the raw source
        while f.read(8 << 20):
            pass




def _to_vmdk(subformat: str, name: str) -> list:
    return [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "vmdk", "-o",
                                                       f"subformat={subformat}", c.source,
                                                       c.path(f"out-df-{name}.vmdk")],
             out(f"out-df-{name}.vmdk")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                                    f"subformat={subformat}", c.source,
                                    c.path(f"out-qi-{name}.vmdk")],
             out(f"out-qi-{name}.vmdk"), have("qemu-img")),
    ]


CASES = [
    Case("raw->vmdk monolithicSparse", _to_vmdk("monolithicSparse", "sparse")),
    Case("raw->vmdk streamOptimized", _to_vmdk("streamOptimized", "stream")),
    Case("vmdk monolithicSparse->raw", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "raw",
                                                       c.cache["vmdk"], c.path("out-df.raw")],
             out("out-df.raw")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert", "-f", "vmdk", "-O", "raw",
                                    c.cache["vmdk"], c.path("out-qi.raw")],
             out("out-qi.raw"), have("qemu-img")),
    ], setup=_vmdk_source),
    Case("vmdk streamOptimized->raw", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "raw",
                                                       c.cache["vmdk-stream"],
                                                       c.path("out-df.raw")],
             out("out-df.raw")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert", "-f", "vmdk", "-O", "raw",
                                    c.cache["vmdk-stream"], c.path("out-qi.raw")],
             out("out-qi.raw"), have("qemu-img")),
    ], setup=lambda c: _vmdk_source(c, "streamOptimized")),
]
