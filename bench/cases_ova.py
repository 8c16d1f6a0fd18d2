"""OVA row: the first disk of an OVA (a qcow2 of the mixed disk) to raw, read in place,
beside the recipe without diskforge (GNU tar extracts the member, then qemu-img
converts it), in the same run.

The OVA is built once in the bench directory: a minimal OVF 1.0 descriptor, the qcow2
qemu-img made of the mixed disk, in a ustar archive made by GNU tar.
"""

import os
import shutil
import subprocess

from run import Case, Tool, diskforge_cmd, have

OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:href="disk1.qcow2" ovf:id="file1"/></References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:capacity="{size}" ovf:diskId="vmdisk1" ovf:fileRef="file1"
      ovf:format="http://www.gnome.org/~markmc/qcow-image-format.html"/>
  </DiskSection>
  <VirtualSystem ovf:id="bench"><Info>bench</Info></VirtualSystem>
</Envelope>
"""


def out(name):
    return lambda ctx: ctx.path(name)


def _ova_source(ctx) -> None:
    path = ctx.path(f"mixed-{ctx.size}.ova")
    if not os.path.exists(path):
        stage = ctx.path("ova-stage")
        shutil.rmtree(stage, ignore_errors=True)
        os.makedirs(stage)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", ctx.source,
                        os.path.join(stage, "disk1.qcow2")], check=True)
        with open(os.path.join(stage, "bench.ovf"), "w") as f:
            f.write(OVF.format(size=ctx.size))
        subprocess.run(["tar", "-c", "-f", path + ".tmp", "--format=ustar", "-C", stage,
                        "bench.ovf", "disk1.qcow2"], check=True)
        os.replace(path + ".tmp", path)
        shutil.rmtree(stage)
    ctx.cache["ova"] = path
    with open(path, "rb") as f:  # warm, like the raw source
        while f.read(8 << 20):
            pass


def _extract_then_convert(c) -> list[str]:
    member = c.path("disk1.qcow2")
    return ["sh", "-c", f"tar -x -f '{c.cache['ova']}' -C '{c.workdir}' disk1.qcow2 &&"
            f" qemu-img convert -f qcow2 -O raw '{member}' '{c.path('out-qi.raw')}' &&"
            f" rm -f '{member}'"]


CASES = [
    Case("ova(qcow2)->raw", [
        Tool("diskforge", lambda c: diskforge_cmd() + ["convert", "-O", "raw",
                                                       c.cache["ova"], c.path("out-df.raw")],
             out("out-df.raw")),
        Tool("tar x + qemu-img", _extract_then_convert, out("out-qi.raw"),
             lambda: have("qemu-img")() and have("tar")()),
    ], setup=_ova_source),
]
