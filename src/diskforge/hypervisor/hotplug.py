"""Add a disk to a running VM and take it away again (``diskforge attach|detach``).

``attach``: ``blockdev-add`` (read-only unless asked) then ``device_add`` (virtio-blk by
default). QEMU's own image locks decide whether the file may be opened: an image that
another QEMU has open for writing is refused, and the refusal is reported as such. On
q35 the root bus takes no hot-plugged devices, so when QEMU says so the disk goes
into the first free ``pcie-root-port`` (``diskforge boot`` creates a few).

``detach``: ``device_del``, wait for QEMU's ``DEVICE_DELETED``, then ``blockdev-del``.
PCI unplug needs the guest's cooperation (ACPI or PCIe hot-plug): with no guest OS, or
one that ignores the request, the device stays and ``detach`` says so after its
timeout. SCSI disks (``scsi-hd``) unplug at once.

Images QEMU cannot read must be exported first (``diskforge serve IMAGE --socket S``)
and attached by URI (``nbd+unix:///?socket=S``): an export needs a process that lives
as long as the VM uses it, which a one-shot command is not.
"""

from __future__ import annotations

import os
import re

from ..errors import DiskforgeError, SafetyError, UnsupportedError, UsageError
from ..policy import OpenPolicy
from .qmp import QMP, QMPError

DEVICE_MODELS = {"virtio": "virtio-blk-pci", "scsi": "scsi-hd", "usb": "usb-storage",
                 "ide": "ide-hd"}


class HotplugError(DiskforgeError):
    """A disk could not be attached or detached."""


def _node_name(path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", os.path.splitext(os.path.basename(path))[0])
    return f"df-{stem[:16]}-{os.urandom(2).hex()}"


def attach(qmp: QMP, image: str, *, fmt: str | None = None, read_only: bool = True,
           device: str = "virtio", node_name: str | None = None,
           policy: OpenPolicy | None = None) -> dict:
    """Attach ``image`` (a file, or an NBD URI) to the VM; ``{"node", "device"}``."""
    from .drives import is_nbd_uri, nbd_blockdev, plan_image
    model = DEVICE_MODELS.get(device, device)
    node = node_name or _node_name(image)
    if is_nbd_uri(image):
        opts = {"driver": fmt or "raw", "file": nbd_blockdev(image)}
    else:
        plan = plan_image(image, fmt, policy=policy)
        if plan.qemu_driver is None:
            raise UnsupportedError(
                f"not supported yet: attaching this {plan.format} image directly (QEMU"
                " cannot read it as diskforge does); export it with 'diskforge serve"
                " IMAGE --socket SOCK' and attach nbd+unix:///?socket=SOCK", image)
        if plan.read_only and not read_only:
            raise UnsupportedError(f"{plan.format} images cannot be written; attach it"
                                   " read-only", image)
        opts = {"driver": plan.qemu_driver,
                "file": {"driver": "file", "filename": os.path.abspath(image)}}
    opts.update({"node-name": node, "read-only": read_only})
    try:
        qmp.execute("blockdev-add", opts)
    except QMPError as e:
        if "lock" in str(e).lower():
            raise SafetyError(f"refused: the image is in use by another process (QEMU"
                              f" image lock: {e.message})", image) from None
        raise HotplugError(f"cannot open the image in QEMU: {e.message}", image) from None
    dev_id = f"{node}-dev"
    try:
        _device_add(qmp, {"driver": model, "drive": node, "id": dev_id})
    except BaseException:
        try:
            qmp.execute("blockdev-del", {"node-name": node})
        except QMPError:
            pass
        raise
    return {"node": node, "device": dev_id}


def _device_add(qmp: QMP, args: dict) -> None:
    try:
        qmp.execute("device_add", args)
        return
    except QMPError as e:
        if "hotplug" not in str(e).lower():
            raise HotplugError(f"cannot add the {args['driver']} device: {e.message}") \
                from None
        first = e
    for bus in _free_root_ports(qmp):
        try:
            qmp.execute("device_add", dict(args, bus=bus))
            return
        except QMPError:
            continue
    raise HotplugError(f"cannot add the {args['driver']} device: {first.message}; and no"
                       " free pcie-root-port takes it (start the VM with"
                       " '-device pcie-root-port,...', as diskforge boot does)")


def _free_root_ports(qmp: QMP) -> list[str]:
    ports = []
    for where in ("/machine/peripheral", "/machine/peripheral-anon"):
        try:
            children = qmp.execute("qom-list", {"path": where})
        except QMPError:
            continue
        for c in children:
            if c.get("type") == "child<pcie-root-port>":
                ports.append(c["name"])
    return ports


def find_attached(qmp: QMP, target: str) -> dict:
    """The ``query-block`` entry whose image file, node name, drive or device id is
    ``target``."""
    real = os.path.realpath(target) if os.path.exists(target) else None
    hits = []
    for b in qmp.execute("query-block"):
        ins = b.get("inserted") or {}
        qdev = b.get("qdev", "")
        dev_id = _qdev_id(qdev)
        names = {b.get("device"), ins.get("node-name"), dev_id, qdev} - {None, ""}
        files = {ins.get("file"), (ins.get("image") or {}).get("filename")} - {None, ""}
        if target in names or target in files or (
                real and any(os.path.realpath(f) == real for f in files
                             if not f.startswith(("nbd:", "json:")))):
            hits.append(b)
    if not hits:
        raise UsageError(f"no disk '{target}' is attached to this VM")
    if len(hits) > 1:
        raise UsageError(f"'{target}' matches {len(hits)} disks; name the node instead")
    return hits[0]


def _qdev_id(qdev: str) -> str:
    """``/machine/peripheral/ID/virtio-backend`` -> ``ID``; an id stays as it is."""
    parts = qdev.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == "machine" and parts[1] == "peripheral":
        return parts[2]
    return qdev if "/" not in qdev else ""


def detach(qmp: QMP, target: str, *, timeout: float = 10.0) -> dict:
    """Unplug the guest device and close the node; ``{"node", "device"}``."""
    entry = find_attached(qmp, target)
    node = (entry.get("inserted") or {}).get("node-name")
    dev_id = _qdev_id(entry.get("qdev", ""))
    if dev_id:
        qmp.clear_events()
        try:
            qmp.execute("device_del", {"id": dev_id})
        except QMPError as e:
            if "in the process of unplug" not in str(e):
                raise HotplugError(f"cannot remove device '{dev_id}': {e.message}") from None
        ev = qmp.wait_event("DEVICE_DELETED", timeout=timeout,
                            match=lambda ev: ev.get("data", {}).get("device") == dev_id)
        if ev is None:
            raise HotplugError(
                f"the guest has not released device '{dev_id}' within {timeout:g} s"
                " (PCI hot-unplug needs the guest OS to acknowledge it); the disk stays"
                " attached, run detach again later")
    if node and any(n.get("node-name") == node
                    for n in qmp.execute("query-named-block-nodes", {"flat": True})):
        try:
            qmp.execute("blockdev-del", {"node-name": node})
        except QMPError as e:
            if "not found" not in str(e).lower():
                raise HotplugError(f"the device is gone but node '{node}' could not be"
                                   f" closed: {e.message}") from None
    return {"node": node, "device": dev_id}
