"""Core rows: raw → raw beside qemu-img and cp, and CLI start-up time."""

from run import Case, Tool, diskforge_cmd, have


def out(name):
    return lambda ctx: ctx.path(name)


CASES = [
    Case("raw->raw (sparse)", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "raw", c.source,
                                                       c.path("out-df.raw")],
             out("out-df.raw")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert", "-O", "raw", c.source,
                                    c.path("out-qi.raw")], out("out-qi.raw"), have("qemu-img")),
        Tool("cp --sparse=always", lambda c: ["cp", "--sparse=always", c.source,
                                              c.path("out-cp.raw")], out("out-cp.raw")),
    ]),
    Case("start-up: info (1 MiB raw)", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["info", c.small]),
        Tool("qemu-img", lambda c: ["qemu-img", "info", c.small], available=have("qemu-img")),
    ], bytes_of=lambda c: 1 << 20),
]
