"""Core rows: raw → raw beside qemu-img and cp, CLI start-up time, and the memory of a
convert of a mostly-empty 20 GiB disk.

The 20 GiB rows read ``sparse-20G.raw`` (built once in the bench directory): 20 GiB
virtual, eight 8 MiB runs of random data spread over it, holes elsewhere; their point
is the peak RSS column (issue 17's aim: below 150 MB however large the disk), beside
qemu-img doing the same conversion.
"""

import os
import subprocess

from run import Case, Tool, diskforge_cmd, have

SPARSE_SIZE = 20 << 30
SPARSE_RUNS = 8
SPARSE_RUN = 8 << 20


def out(name):
    return lambda ctx: ctx.path(name)


def small_qcow2(ctx) -> None:
    path = ctx.path("small.qcow2")
    if not os.path.exists(path):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"], check=True)
    ctx.cache["small-qcow2"] = path


def sparse_20g(ctx) -> None:
    path = ctx.path("sparse-20G.raw")
    if not os.path.exists(path) or os.path.getsize(path) != SPARSE_SIZE:
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.truncate(SPARSE_SIZE)
            step = SPARSE_SIZE // SPARSE_RUNS
            for i in range(SPARSE_RUNS):
                f.seek(i * step + step // 3)
                f.write(os.urandom(SPARSE_RUN))
        os.replace(tmp, path)
    ctx.cache["sparse-20g"] = path


def sparse_case(name, df_args, qi_args, suffix):
    return Case(name, [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert"] + df_args + [
            c.cache["sparse-20g"], c.path(f"out-df-20g.{suffix}")], out(f"out-df-20g.{suffix}")),
        Tool("qemu-img", lambda c: ["qemu-img", "convert"] + qi_args + [
            c.cache["sparse-20g"], c.path(f"out-qi-20g.{suffix}")], out(f"out-qi-20g.{suffix}"),
             have("qemu-img")),
    ], setup=sparse_20g, bytes_of=lambda c: SPARSE_SIZE,
        reads=lambda c: None)  # no cat floor: it would read 20 GiB of holes as zeros


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
    ], bytes_of=lambda c: 1 << 20, prime=False),
    Case("start-up: info (small qcow2)", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["info", c.cache["small-qcow2"]]),
        Tool("qemu-img", lambda c: ["qemu-img", "info", c.cache["small-qcow2"]],
             available=have("qemu-img")),
    ], setup=small_qcow2, bytes_of=lambda c: 1 << 20, prime=False),
    sparse_case("20G sparse raw->qcow2 (RSS)", ["-O", "qcow2"], ["-O", "qcow2"], "qcow2"),
    sparse_case("20G sparse raw->qcow2 -c (RSS)", ["-c", "-O", "qcow2"],
                ["-c", "-O", "qcow2"], "c.qcow2"),
]
