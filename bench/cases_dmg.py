"""DMG rows: DMG (UDZO, zlib; ULFO, LZFSE) -> raw beside dmg2img, qemu-img and 7-Zip
(a tool that cannot read LZFSE shows as failed); raw -> UDZO and ULFO throughput,
each beside the same conversion on one thread (``-m 1``: the parallel speed-up is
1 / the ratio column), and qemu-img's compressed qcow2 as a familiar reference."""

import os
import subprocess

from run import Case, Context, Tool, diskforge_cmd, have


def out(name):
    # a "dmg-" prefix: the bench directory is shared with other formats' rows
    return lambda ctx: ctx.path(f"dmg-{name}")


def make_dmg(ctx: Context, fmt: str = "UDZO") -> None:
    """The input of a DMG -> raw row: the mixed disk as UDZO (or ULFO), written by
    diskforge (no tool here writes DMG), rebuilt when the disk is newer; warmed."""
    dmg = ctx.path(f"dmg-input-{ctx.size}.dmg" if fmt == "UDZO"
                   else f"dmg-input-{ctx.size}.{fmt}.dmg")
    if not os.path.exists(dmg) or os.path.getmtime(dmg) < os.path.getmtime(ctx.source):
        subprocess.run(diskforge_cmd() + ["convert", "-O", "dmg", "-o", f"format={fmt}",
                                          ctx.source, dmg], check=True)
    with open(dmg, "rb") as f:
        while f.read(8 << 20):
            pass
    ctx.cache[fmt.lower()] = dmg


def make_udzo(ctx: Context) -> None:
    make_dmg(ctx, "UDZO")


def dmg_in(ctx: Context, fmt: str = "udzo") -> str:
    return ctx.cache[fmt]


def from_dmg(fmt: str) -> Case:
    key = fmt.lower()
    return Case(f"dmg({fmt})->raw", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "raw",
                                                       dmg_in(c, key),
                                                       c.path("dmg-out-df.raw")],
             out("out-df.raw")),
        Tool("dmg2img", lambda c: ["dmg2img", "-s", dmg_in(c, key),
                                   c.path("dmg-out-d2i.raw")],
             out("out-d2i.raw"), have("dmg2img")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert", "-f", "dmg", "-O", "raw",
                                    dmg_in(c, key), c.path("dmg-out-qi.raw")],
             out("out-qi.raw"), have("qemu-img")),
        # the judge of the ULFO row: Debian's qemu-img has no LZFSE module, and
        # dmg2img 1.6.7 exits 0 on ULFO without decoding it (an empty file for 8 MiB
        # of text; 7-Zip's partition file equals the disk)
        Tool("7zz x", lambda c: ["7zz", "x", "-y", "-bso0", "-bsp0",
                                 f"-o{c.path('dmg-out-7')}", dmg_in(c, key)],
             out("out-7"), have("7zz")),
    ], setup=lambda c: make_dmg(c, fmt))


def to_dmg(fmt: str, workers: list[str]):
    return lambda c: diskforge_cmd() + ["convert", *workers, "-O", "dmg", "-o",
                                        f"format={fmt}", c.source,
                                        c.path(f"dmg-out-{fmt}.dmg")]


CASES = [
    from_dmg("UDZO"),
    from_dmg("ULFO"),
    Case("raw->dmg UDZO", [
        Tool("diskforge", to_dmg("UDZO", []), out("out-UDZO.dmg")),
        Tool("diskforge -m 1", to_dmg("UDZO", ["-m", "1"]), out("out-UDZO.dmg")),
        Tool("qemu-img qcow2 -c", lambda c: ["qemu-img", "convert", "-c", "-O", "qcow2",
                                             c.source, c.path("dmg-out-qi.qcow2")],
             out("out-qi.qcow2"), have("qemu-img")),
    ]),
    Case("raw->dmg ULFO", [
        Tool("diskforge", to_dmg("ULFO", []), out("out-ULFO.dmg")),
        Tool("diskforge -m 1", to_dmg("ULFO", ["-m", "1"]), out("out-ULFO.dmg")),
    ]),
]
