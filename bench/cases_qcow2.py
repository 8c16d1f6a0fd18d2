"""qcow2 rows: raw → qcow2 (plain, and -c with zlib and zstd) and qcow2 → raw (plain,
and compressed with zlib — every Ubuntu/Debian/Fedora cloud image — and zstd), each
beside qemu-img doing the same conversion in the same run.

The qcow2 sources of the qcow2 → raw rows are made once by qemu-img from the mixed disk
and kept beside it (``mixed-SIZE.qcow2``, ``mixed-SIZE.zlib.qcow2``,
``mixed-SIZE.zstd.qcow2``), so both tools read the same file.
"""

import os
import subprocess

from run import Case, Tool, diskforge_cmd, have


def out(name):
    return lambda ctx: ctx.path(name)


def qcow2_source(ctx, kind="qcow2", extra=()):
    """``mixed-SIZE.qcow2`` (or ``.zlib.qcow2``/``.zstd.qcow2``, compressed by qemu-img
    with ``extra`` options), remade when the mixed disk changes; warmed."""
    suffix = ".qcow2" if kind == "qcow2" else f".{kind}.qcow2"
    path = os.path.splitext(ctx.source)[0] + suffix
    stamp = path + ".from"
    src_stamp = open(ctx.source + ".sha256").read() if os.path.exists(ctx.source + ".sha256") \
        else ""
    if not (os.path.exists(path) and os.path.exists(stamp) and open(stamp).read() == src_stamp):
        tmp = path + f".{os.getpid()}.tmp"
        subprocess.run(["qemu-img", "convert", *extra, "-O", "qcow2", ctx.source, tmp],
                       check=True)
        os.replace(tmp, path)
        with open(stamp, "w") as f:
            f.write(src_stamp)
    with open(path, "rb") as f:  # warm, like the raw source
        while f.read(8 << 20):
            pass
    ctx.cache[kind] = path


def qcow2_to_raw(name, kind, extra=()):
    return Case(name, [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "raw",
                                                       c.cache[kind], c.path("out-df.raw")],
             out("out-df.raw")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert", "-O", "raw", c.cache[kind],
                                    c.path("out-qi.raw")], out("out-qi.raw"), have("qemu-img")),
    ], setup=lambda c: qcow2_source(c, kind, extra))


def convert_case(name, df_args, qi_args, suffix):
    return Case(name, [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert"] + df_args + [
            c.source, c.path(f"out-df.{suffix}")], out(f"out-df.{suffix}")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert"] + qi_args + [
            c.source, c.path(f"out-qi.{suffix}")], out(f"out-qi.{suffix}"), have("qemu-img")),
    ])


CASES = [
    convert_case("raw->qcow2 plain", ["-O", "qcow2"], ["-O", "qcow2"], "qcow2"),
    qcow2_to_raw("qcow2->raw plain", "qcow2"),
    qcow2_to_raw("qcow2 zlib->raw", "zlib", ["-c"]),  # the cloud-image case
    qcow2_to_raw("qcow2 zstd->raw", "zstd", ["-c", "-o", "compression_type=zstd"]),
    convert_case("raw->qcow2 -c zlib", ["-c", "-O", "qcow2"], ["-c", "-O", "qcow2"],
                 "zlib.qcow2"),
    convert_case("raw->qcow2 -c zstd", ["-c", "-O", "qcow2", "-o", "compression_type=zstd"],
                 ["-c", "-O", "qcow2", "-o", "compression_type=zstd"], "zstd.qcow2"),
]
