"""Build a VM around an image (``diskforge boot``): the right driver for each disk, an
NBD export for formats QEMU cannot read, a CD-ROM, hot-plug slots for ``attach``.

The NBD server (and the device it reads) belong to the VM object: they are closed
after QEMU has been reaped, whatever way it ends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import UsageError
from ..policy import OpenPolicy
from .vm import VM, Drive, VMConfig

INTERFACES = {"virtio": "virtio-blk-pci", "ide": "ide-hd", "scsi": "scsi-hd"}
CDROM_FORMATS = ("iso",)
HOTPLUG_SLOTS = 4


@dataclass
class BootOptions:
    """What ``diskforge boot`` was asked for."""
    image: str | None = None
    fmt: str | None = None
    via: str = "auto"               # "auto", "direct" (QEMU's driver) or "nbd"
    snapshot: bool = False
    read_only: bool = False
    cdrom: str | None = None
    interface: str = "virtio"
    memory: str = "1G"
    cpus: int = 1
    firmware: str = "bios"
    accel: str = "auto"
    machine: str = "q35"
    serial: str | None = "stdio"
    qmp_socket: str | None = None
    display: str = "none"
    net: str = "user"
    extra_args: list[str] = field(default_factory=list)
    policy: OpenPolicy | None = None


def hotplug_args(machine: str) -> list[str]:
    """Devices that let ``diskforge attach`` add disks later: free PCIe root ports
    (q35's root bus takes no hot-plugged devices) and a virtio-scsi controller."""
    extra: list[str] = []
    if machine == "q35":
        for i in range(HOTPLUG_SLOTS):
            extra += ["-device", f"pcie-root-port,id=df-hp{i},chassis={i + 1}"]
    if machine in ("q35", "pc"):
        extra += ["-device", "virtio-scsi-pci,id=df-scsi"]
    return extra


def build_vm(opts: BootOptions, *, log=None) -> VM:
    """A VM ready to ``start()``; an NBD export is already listening when one is
    needed. On error everything opened so far is closed."""
    from .drives import plan_image
    if opts.via not in ("auto", "direct", "nbd"):
        raise UsageError(f"--via must be auto, direct or nbd, not '{opts.via}'")
    if opts.interface not in INTERFACES:
        raise UsageError(f"unknown interface '{opts.interface}' (virtio, ide or scsi)")
    if opts.image is None and opts.cdrom is None:
        raise UsageError("nothing to boot: give an image, a --cdrom, or both")
    extra = hotplug_args(opts.machine)
    cfg = VMConfig(memory=opts.memory, cpus=opts.cpus, machine=opts.machine,
                   firmware=opts.firmware, accel=opts.accel, serial=opts.serial,
                   qmp_socket=opts.qmp_socket, display=opts.display, net=opts.net,
                   extra_args=extra + list(opts.extra_args))
    vm = VM(cfg)
    try:
        boot_index = 1
        if opts.image is not None:
            plan = plan_image(opts.image, opts.fmt, policy=opts.policy)
            cdrom = plan.format in CDROM_FORMATS
            device = "ide-cd" if cdrom else INTERFACES[opts.interface]
            if opts.via == "direct" and plan.qemu_driver is None:
                raise UsageError(f"QEMU cannot read this {plan.format} image as diskforge"
                                 " does; use --via nbd (or auto)")
            if opts.via == "nbd" or plan.qemu_driver is None:
                drive = _nbd_drive(vm, plan, opts, log)
            else:
                # a format neither diskforge nor QEMU writes (dmg) still boots: the
                # guest's writes go to a temporary overlay (snapshot=on)
                drive = Drive(os.path.abspath(opts.image), plan.qemu_driver, id="disk0",
                              read_only=opts.read_only or cdrom,
                              snapshot=opts.snapshot or (plan.read_only and not cdrom))
            drive.device = device
            drive.media = "cdrom" if cdrom else "disk"
            drive.bootindex = boot_index
            boot_index += 1
            cfg.drives.append(drive)
        if opts.cdrom is not None:
            cd = plan_image(opts.cdrom, None, policy=opts.policy)
            if cd.qemu_driver is None:
                raise UsageError(f"--cdrom {opts.cdrom}: a {cd.format} image cannot be a"
                                 " CD-ROM")
            cfg.drives.append(Drive(os.path.abspath(opts.cdrom), cd.qemu_driver,
                                    id="cd0", device="ide-cd", read_only=True,
                                    media="cdrom", bootindex=boot_index))
    except BaseException:
        vm.kill()
        raise
    return vm


def _nbd_drive(vm: VM, plan, opts: BootOptions, log) -> Drive:
    """Export the image from this process and point QEMU at the socket."""
    from ..registry import open_image
    from .nbd import NBDServer
    read_only = opts.read_only or opts.snapshot or plan.read_only
    dev = open_image(plan.path, plan.format, writable=not read_only, policy=opts.policy)
    vm._cleanup.append(dev)
    server = NBDServer(dev, socket_path=os.path.join(vm.workdir, "disk0.nbd"),
                       read_only=read_only, description=plan.path, log=log)
    server.start()
    vm._cleanup.append(server)
    # a format diskforge only reads still boots: the guest's writes go to a
    # temporary overlay (QEMU's snapshot=on), never to the image
    return Drive(server.uri, "raw", id="disk0", read_only=opts.read_only,
                 snapshot=opts.snapshot or plan.read_only)
