"""Hand disks to hypervisors: start and drive QEMU over QMP, hot-plug disks, take live
full and incremental backups, and export any image diskforge reads over NBD.

The Python API (names load lazily, so ``import diskforge`` stays cheap)::

    from diskforge.hypervisor import VM, VMConfig, Drive, NBDServer, attach, detach
    from diskforge.hypervisor.backup import backup

    with VM(VMConfig(drives=[Drive("disk.qcow2", "qcow2")], serial="file:console.log")) as vm:
        print(vm.query_block())           # started, QMP connected; stopped and reaped on exit
        backup(vm.qmp, "disk0", "/backups/full.qcow2")
        ...
        backup(vm.qmp, "disk0", "/backups/inc1.qcow2", incremental=True)

    with diskforge.open("disk.raw", writable=True) as dev, \\
            NBDServer(dev, socket_path="/tmp/disk.sock") as srv:
        print(srv.uri)                    # nbd+unix:///?socket=/tmp/disk.sock

Modules: ``qmp`` (a blocking, thread-safe client over ``qemu.qmp``), ``vm`` (launch,
stop, reap; KVM/TCG, BIOS/UEFI), ``drives`` (which QEMU driver reads an image, or NBD),
``boot`` (a VM around an image: ``diskforge boot``), ``hotplug`` (``attach``/``detach``),
``backup`` (live full/incremental backups), ``nbd`` (the NBD server: ``diskforge serve``).

Status — done: everything above, tested against qemu-system-x86_64 (TCG), qemu-img,
qemu-io and QEMU's NBD client: NBD export of raw, qcow2 (backing chains too), VHDX,
VHD and DMG (UDZO, ULFO) images read by ``qemu-img`` with their holes, and written
through NBD (raw, qcow2, VHDX, VHD); per-file driver choice (``drives``: QEMU's driver
where it reads the file as diskforge does, the NBD export otherwise); booting a
qcow2, a DMG and the ISO issue's hybrid ISO; backup chains restored with
``diskforge restore``/``convert`` as well as ``qemu-img``.

Left for later:
- Attaching a non-QEMU format by file name (it needs a long-lived export: use
  ``diskforge serve`` and attach the URI); TLS for NBD; QEMU-compatible image locks
  taken by ``diskforge serve`` itself.
- vmdk files (no diskforge plugin yet) reach QEMU's driver only when named
  (``-f vmdk``); unnamed they probe as raw, as everywhere in diskforge.
"""

from __future__ import annotations

_EXPORTS = {
    "VM": "vm", "VMConfig": "vm", "Drive": "vm", "VMError": "vm", "kvm_usable": "vm",
    "QMP": "qmp", "QMPError": "qmp",
    "NBDServer": "nbd",
    "BackupError": "backup", "BackupResult": "backup",  # the function: .backup.backup
    "attach": "hotplug", "detach": "hotplug", "HotplugError": "hotplug",
    "BootOptions": "boot", "build_vm": "boot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diskforge.hypervisor' has no attribute '{name}'")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
