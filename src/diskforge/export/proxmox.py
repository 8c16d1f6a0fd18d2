"""Proxmox VE: a qcow2 disk for ``qm disk import VMID disk.qcow2 STORAGE`` and a
libvirt domain XML describing the machine, with Proxmox's defaults.

Rules, from the Proxmox VE administration guide, "Qemu/KVM Virtual Machines" and
``qm(1)`` (https://pve.proxmox.com/pve-docs/qm.1.html): ``qm disk import`` takes
qcow2, raw or VMDK; new VMs get the "VirtIO SCSI single" controller with the disk on
``scsi0``, the q35 or i440fx machine, a virtio NIC, and ``cache=none`` by default.

So the export is libvirt's (``libvirt.export_with``) with the disk on a virtio-scsi
controller (``sda``, bus ``scsi``) and ``cache='none'``; the check is libvirt's.
"""

from __future__ import annotations

from ..blockdev import BlockDevice
from .base import ExportOptions, Progress
from .libvirt import check_pair, export_with

NAME = "proxmox"
SUMMARY = "Proxmox VE: qcow2 disk (qm disk import) plus a domain XML, virtio-scsi"


def export(source: BlockDevice, out: str, opts: ExportOptions,
           progress: Progress | None = None) -> list[str]:
    return export_with(source, out, opts, progress, bus="scsi", cache="none")


def check(f, policy=None) -> list[str]:
    return check_pair(f, buses=("scsi", "virtio", "sata"), policy=policy)
