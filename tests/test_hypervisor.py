"""QEMU integration: boot, QMP, hot-plug and live backups against qemu-system-x86_64 under
software emulation (TCG), no guest OS needed.

Backups are checked with QEMU's own tools and with diskforge: each backup point is
flattened with ``qemu-img convert -O raw`` and with ``diskforge restore`` and
``diskforge convert`` (all following the qcow2 backing chain) and compared with the
disk's bytes at backup time; ``qemu-img map`` shows which clusters an increment holds;
``qemu-img check`` that every file QEMU wrote is consistent. The disk's bytes at
each time come from a model of the writes, which is itself checked against the real
disk once QEMU has stopped.

Every VM is started through the ``vms`` fixture, whose finalizer kills and reaps it even
when a test fails; every test has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import cli, need, one_line_error, run
from isotools import boot_iso, serial_text

from diskforge.hypervisor import backup as B
from diskforge.hypervisor.boot import hotplug_args
from diskforge.hypervisor.drives import plan_image
from diskforge.hypervisor.qmp import QMP
from diskforge.hypervisor.vm import VM, Drive, VMConfig, kvm_usable

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
CLUSTER = 64 * 1024
MARKER = b"DISKFORGE-BOOT-OK"


def qcow2_disk(path: str, size: int = 32 * MiB) -> str:
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
    return path


def block_vm(vms, disk: str, tmp_path) -> VM:
    """A VM with no guest (-machine none): just the disk as drive 'disk0', and a second
    QMP socket for the CLI (one QMP socket serves one client at a time)."""
    return vms(VMConfig(machine="none", drives=[Drive(disk, "qcow2", id="disk0", device=None)],
                        qmp_socket=str(tmp_path / "user-qmp.sock")))


class Model:
    """What the disk should hold: every qemu-io write applied to a bytearray too."""

    def __init__(self, vm: VM, size: int):
        self.vm, self.buf, self.dirty = vm, bytearray(size), set()

    def write(self, offset: int, length: int, pattern: int) -> None:
        self.vm.qmp.hmp(f'qemu-io disk0 "write -P {pattern:#x} {offset} {length}"')
        self.buf[offset:offset + length] = bytes([pattern]) * length
        self.dirty |= set(range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1))

    def snapshot(self) -> tuple[bytes, set[int]]:
        snap = (bytes(self.buf), self.dirty)
        self.dirty = set()
        return snap


def flatten(path: str, out: str) -> bytes:
    run("qemu-img", "convert", "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


def own_clusters(path: str) -> set[int]:
    """Clusters whose data lives in this file itself (depth 0 of qemu-img map)."""
    entries = json.loads(run("qemu-img", "map", "--output", "json", path).stdout)
    out = set()
    for e in entries:
        if e["depth"] == 0 and e["data"]:
            out |= set(range(e["start"] // CLUSTER, (e["start"] + e["length"]) // CLUSTER))
    return out


def restore_with_diskforge(path: str, want: bytes, tmp_path) -> None:
    """The backup point, flattened through its qcow2 chain by diskforge itself: the
    imaging issue's ``restore`` (which reads the target back and verifies it) and a
    plain ``convert``."""
    for how in ("restore", "convert"):
        out = str(tmp_path / f"df-{how}-{os.path.basename(path)}.raw")
        argv = ("restore", "-q", path, out) if how == "restore" else \
            ("convert", "-O", "raw", path, out)
        code, _, err = cli(*argv)
        assert code == 0, err
        assert open(out, "rb").read() == want, f"diskforge {how} of {path}"


def test_full_and_incremental_backups_restore_each_point(vms, tmp_path):
    need("qemu-img")
    d = str(tmp_path)
    disk = qcow2_disk(f"{d}/disk.qcow2")
    vm = block_vm(vms, disk, tmp_path)
    m = Model(vm, 32 * MiB)
    m.write(0, 192 * 1024, 0x11)
    m.write(5 * MiB + 4096, 8192, 0x22)
    m.write(31 * MiB, MiB, 0x33)
    points = []
    progress = []
    res = B.backup(vm.qmp, "disk0", f"{d}/full.qcow2",
                   progress=lambda done, total: progress.append((done, total)))
    points.append((res.path, *m.snapshot()))
    assert res.kind == "full" and res.persistent and progress[-1] == (32 * MiB, 32 * MiB)

    m.write(64 * 1024, 4096, 0x44)            # inside a cluster the full backup holds
    m.write(10 * MiB, 3 * CLUSTER, 0x55)      # new clusters
    code, out, err = cli("backup", "--qmp", vm.qmp_socket, "--device", "disk0",
                         f"{d}/inc1.qcow2", "--incremental", "-q")
    assert code == 0, err
    assert "incremental backup of disk0" in out and "over full.qcow2" in out
    points.append((f"{d}/inc1.qcow2", *m.snapshot()))

    m.write(10 * MiB + CLUSTER, 100, 0x66)    # partly over the previous increment
    m.write(20 * MiB - 512, 1024, 0x77)       # straddles two clusters
    res = B.backup(vm.qmp, "disk0", f"{d}/inc2.qcow2", incremental=True)
    assert res.base == "inc1.qcow2"
    points.append((res.path, *m.snapshot()))
    m.write(0, 4096, 0x99)                    # after the last backup: in no backup
    vm.stop(timeout=1)

    final = flatten(disk, f"{d}/final.raw")
    assert final == bytes(m.buf), "the model of the writes is not the disk"
    for i, (path, want, dirty) in enumerate(points):
        run("qemu-img", "check", "-q", path)
        got = flatten(path, f"{d}/point{i}.raw")
        assert got == want, f"{os.path.basename(path)} does not restore its point"
        restore_with_diskforge(path, want, tmp_path)
        if i:
            assert own_clusters(path) == dirty, f"{path} holds more than the dirty clusters"
    info = json.loads(run("qemu-img", "info", "--output", "json", f"{d}/inc2.qcow2").stdout)
    assert info["backing-filename"] == "inc1.qcow2"
    # the bitmap is stored in the disk image (persistent): it survives QEMU
    disk_info = json.loads(run("qemu-img", "info", "--output", "json", disk).stdout)
    bitmaps = disk_info["format-specific"]["data"].get("bitmaps", [])
    assert [b["name"] for b in bitmaps] == [res.bitmap]
    manifest = json.load(open(f"{d}/{B.MANIFEST}"))
    assert [b["file"] for b in manifest["chains"][disk]["backups"]] == \
        ["full.qcow2", "inc1.qcow2", "inc2.qcow2"]
    assert not [f for f in os.listdir(d) if f.endswith(".diskforge-tmp")]


def test_backup_refusals(vms, tmp_path):
    d = str(tmp_path)
    vm = block_vm(vms, qcow2_disk(f"{d}/disk.qcow2", 4 * MiB), tmp_path)
    code, out, err = cli("backup", "--qmp", vm.qmp_socket, "--device", "disk0",
                         f"{d}/inc.qcow2", "--incremental")
    one_line_error(code, err)
    assert "take a full backup first" in err
    code, out, err = cli("backup", "--qmp", vm.qmp_socket, "--device", "nosuch", f"{d}/x.qcow2")
    one_line_error(code, err)
    assert "nosuch" in err
    open(f"{d}/taken.qcow2", "w").write("mine")
    code, out, err = cli("backup", "--qmp", vm.qmp_socket, "--device", "disk0",
                         f"{d}/taken.qcow2")
    one_line_error(code, err)
    assert open(f"{d}/taken.qcow2").read() == "mine"


def _wait_job_running(qmp: QMP, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in qmp.execute("query-jobs") if j["type"] == "backup"]
        if jobs and jobs[0].get("current-progress", 0) > 0:
            return jobs[0]
        time.sleep(0.05)
    raise AssertionError("the backup job never got going")


def _snapshot_files(d: str) -> dict[str, bytes]:
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))
            if f.endswith((".qcow2", ".json")) and f != "disk.qcow2"}


def test_cancelled_increment_keeps_the_chain_and_the_bitmap(vms, tmp_path):
    need("qemu-img")
    d = str(tmp_path)
    disk = qcow2_disk(f"{d}/disk.qcow2", 16 * MiB)
    vm = block_vm(vms, disk, tmp_path)
    m = Model(vm, 16 * MiB)
    m.write(0, MiB, 0x11)
    B.backup(vm.qmp, "disk0", f"{d}/full.qcow2")
    m.snapshot()
    m.write(2 * MiB, 8 * MiB, 0x22)
    before = _snapshot_files(d)
    proc = subprocess.Popen([sys.executable, "-m", "diskforge", "backup", "--qmp",
                             vm.qmp_socket, "--device", "disk0", f"{d}/inc.qcow2",
                             "--incremental", "--speed", "1M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = _wait_job_running(vm.qmp)
        vm.qmp.execute("job-cancel", {"id": job["id"]})
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1 and "earlier backups are untouched" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(f"{d}/inc.qcow2")
    assert _snapshot_files(d) == before
    # the bitmap kept every dirty cluster: a retry holds all the writes since the full
    res = B.backup(vm.qmp, "disk0", f"{d}/inc.qcow2", incremental=True)
    want, dirty = m.snapshot()
    assert flatten(res.path, f"{d}/inc.raw") == want
    restore_with_diskforge(res.path, want, tmp_path)
    assert own_clusters(res.path) == dirty


def test_killing_qemu_mid_backup_leaves_earlier_backups(vms, tmp_path):
    need("qemu-img")
    d = str(tmp_path)
    disk = qcow2_disk(f"{d}/disk.qcow2", 16 * MiB)
    vm = block_vm(vms, disk, tmp_path)
    m = Model(vm, 16 * MiB)
    m.write(0, 4 * MiB, 0x11)
    B.backup(vm.qmp, "disk0", f"{d}/full.qcow2")
    full_point, _ = m.snapshot()
    m.write(4 * MiB, 8 * MiB, 0x22)
    before = _snapshot_files(d)
    proc = subprocess.Popen([sys.executable, "-m", "diskforge", "backup", "--qmp",
                             vm.qmp_socket, "--device", "disk0", f"{d}/inc.qcow2",
                             "--incremental", "--speed", "1M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_job_running(vm.qmp)
        vm.proc.kill()
        vm.proc.wait()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1, err
    assert "QEMU went away during the backup" in err and "Traceback" not in err
    assert _snapshot_files(d) == before
    assert not os.path.exists(f"{d}/inc.qcow2")
    assert not [f for f in os.listdir(d) if f.endswith(".diskforge-tmp")]
    run("qemu-img", "check", "-q", f"{d}/full.qcow2")
    assert flatten(f"{d}/full.qcow2", f"{d}/full.raw") == full_point
    restore_with_diskforge(f"{d}/full.qcow2", full_point, tmp_path)


def test_raw_disk_gets_a_non_persistent_bitmap(vms, tmp_path):
    need("qemu-img")
    d = str(tmp_path)
    disk = f"{d}/disk.raw"
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
    vm = vms(VMConfig(machine="none", drives=[Drive(disk, "raw", id="disk0", device=None)]))
    vm.qmp.hmp('qemu-io disk0 "write -P 0x42 1M 64k"')
    res = B.backup(vm.qmp, "disk0", f"{d}/full.qcow2")
    assert not res.persistent
    vm.qmp.hmp('qemu-io disk0 "write -P 0x43 3M 64k"')
    res = B.backup(vm.qmp, "disk0", f"{d}/inc.qcow2", incremental=True)
    assert own_clusters(res.path) == {3 * MiB // CLUSTER}
    vm.stop(timeout=1)
    assert flatten(res.path, f"{d}/inc.raw") == open(disk, "rb").read()


# -- hot-plug ------------------------------------------------------------------------------

def hotplug_vm(vms, tmp_path, drives=()) -> VM:
    return vms(VMConfig(machine="q35", memory="128M", drives=list(drives),
                        extra_args=hotplug_args("q35"),
                        qmp_socket=str(tmp_path / "user-qmp.sock")))


def _attached_files(vm: VM) -> dict[str, dict]:
    return {(b.get("inserted") or {}).get("file"): b for b in vm.query_block()
            if b.get("inserted")}


def test_attach_and_detach_show_in_query_block(vms, tmp_path):
    need("qemu-img")
    disk = qcow2_disk(str(tmp_path / "extra.qcow2"), 8 * MiB)
    vm = hotplug_vm(vms, tmp_path)
    assert disk not in _attached_files(vm)
    # SCSI: unplugged at once, even without a guest OS
    code, out, err = cli("attach", "--qmp", vm.qmp_socket, "--device", "scsi", disk)
    assert code == 0, err
    entry = _attached_files(vm)[disk]
    assert entry["inserted"]["ro"] is True and entry["inserted"]["drv"] == "qcow2"
    code, out, err = cli("detach", "--qmp", vm.qmp_socket, disk)
    assert code == 0, err
    assert disk not in _attached_files(vm)
    # virtio-blk (the default) on a free PCIe root port, read-write when asked
    code, out, err = cli("attach", "--qmp", vm.qmp_socket, "--rw", disk)
    assert code == 0, err
    entry = _attached_files(vm)[disk]
    assert entry["inserted"]["ro"] is False
    assert "virtio" in json.dumps(entry).lower() or entry.get("qdev")
    # PCI unplug waits for the guest, and there is none: detach says so, keeps the disk
    code, out, err = cli("detach", "--qmp", vm.qmp_socket, "--timeout", "1", disk)
    one_line_error(code, err)
    assert "guest has not released" in err
    assert disk in _attached_files(vm)
    # a DMG: UDZO with QEMU's read-only dmg driver; ULFO (LZFSE) needs an export
    raw = str(tmp_path / "d.raw")
    with open(raw, "wb") as f:
        f.write(b"dmg " * (1 << 18))
    for variant in ("UDZO", "ULFO"):
        assert cli("convert", "-O", "dmg", "-o", f"format={variant}", raw,
                   str(tmp_path / f"{variant}.dmg"))[0] == 0
    udzo, ulfo = str(tmp_path / "UDZO.dmg"), str(tmp_path / "ULFO.dmg")
    code, out, err = cli("attach", "--qmp", vm.qmp_socket, "--device", "scsi", "--rw", udzo)
    one_line_error(code, err)
    assert "cannot be written" in err
    code, out, err = cli("attach", "--qmp", vm.qmp_socket, "--device", "scsi", udzo)
    assert code == 0, err
    assert _attached_files(vm)[udzo]["inserted"]["drv"] == "dmg"
    code, out, err = cli("attach", "--qmp", vm.qmp_socket, "--device", "scsi", ulfo)
    one_line_error(code, err)
    assert "diskforge serve" in err and ulfo not in _attached_files(vm)


def test_attach_refuses_an_image_another_qemu_writes(vms, tmp_path):
    need("qemu-img")
    disk = qcow2_disk(str(tmp_path / "busy.qcow2"), 8 * MiB)
    vms(VMConfig(machine="none", drives=[Drive(disk, "qcow2", id="disk0", device=None)]))
    vm = hotplug_vm(vms, tmp_path)
    code, out, err = cli("attach", "--qmp", vm.qmp_socket, "--device", "scsi", disk)
    one_line_error(code, err)
    assert "in use by another process" in err and "lock" in err
    assert disk not in _attached_files(vm)


def test_attach_nbd_export(vms, tmp_path):
    """A disk QEMU reaches through diskforge's NBD export (the path for formats QEMU
    cannot read), attached by URI."""
    import diskforge
    from diskforge.hypervisor.nbd import NBDServer
    raw = str(tmp_path / "exported.raw")
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"exported!")
    with diskforge.open(raw) as dev, NBDServer(dev, socket_path=str(tmp_path / "e.sock"),
                                               read_only=True) as srv:
        vm = hotplug_vm(vms, tmp_path)
        code, out, err = cli("attach", "--qmp", vm.qmp_socket, "--device", "scsi", srv.uri)
        assert code == 0, err
        node = re.search(r"as node (\S+),", out).group(1)
        # QEMU reads the export: back the node up and look at what it read
        B.backup(vm.qmp, node, str(tmp_path / "copy.qcow2"))
        assert flatten(str(tmp_path / "copy.qcow2"), str(tmp_path / "copy.raw")) == \
            open(raw, "rb").read()
        code, out, err = cli("detach", "--qmp", vm.qmp_socket, node)
        assert code == 0, err
        vm.stop(timeout=1)


# -- boot ----------------------------------------------------------------------------------

def boot_sector() -> bytes:
    """x86 real-mode code: print MARKER on COM1 (I/O port 0x3f8), then halt."""
    code = bytes([
        0xFA,                    # cli
        0xFC,                    # cld
        0x31, 0xC0,              # xor ax, ax
        0x8E, 0xD8,              # mov ds, ax
        0xBA, 0xF8, 0x03,        # mov dx, 0x3f8
        0xBE, 0x17, 0x7C,        # mov si, 0x7c17 (the message, below)
        0xAC,                    # next: lodsb
        0x84, 0xC0,              # test al, al
        0x74, 0x03,              # jz halt
        0xEE,                    # out dx, al
        0xEB, 0xF8,              # jmp next
        0xF4,                    # halt: hlt
        0xEB, 0xFD,              # jmp halt
    ])
    assert len(code) == 0x17
    return (code + MARKER + b"\r\n\0").ljust(510, b"\0") + b"\x55\xaa"


def bootable_disk(d: str) -> tuple[str, str]:
    raw = os.path.join(d, "boot.raw")
    with open(raw, "wb") as f:
        f.write(boot_sector())
        f.truncate(MiB)
    qcow2 = os.path.join(d, "boot.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", raw, qcow2)
    return raw, qcow2


def wait_for_marker(path: str, timeout: float = 60, marker: bytes = MARKER) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and marker in serial_text(open(path, "rb").read()):
            return True
        time.sleep(0.1)
    return False


def _boot(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "diskforge", "boot", "--accel", "tcg",
                             "--net", "none", "--shutdown-timeout", "1", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pid_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _bottom_images(qmp_socket: str) -> dict[str, dict]:
    """Per drive, the image at the bottom of its chain (below a snapshot=on overlay):
    what QEMU really reads, with which driver."""
    with QMP(qmp_socket) as qmp:
        blocks = qmp.execute("query-block")
    out = {}
    for b in blocks:
        image = (b.get("inserted") or {}).get("image")
        while image and image.get("backing-image"):
            image = image["backing-image"]
        if image:
            out[b["device"]] = image
    return out


def _booted(proc: subprocess.Popen, log: str, qmp_socket: str, marker: bytes = MARKER):
    """Wait for the marker, look at the drives, stop diskforge boot (SIGINT); always
    reaped. (marker seen, bottom images, diskforge's stderr)."""
    try:
        found = wait_for_marker(log, marker=marker)
        images = _bottom_images(qmp_socket) if found else {}
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert found, f"no marker on the serial console; diskforge said: {err}"
    assert proc.returncode == 0, err
    pid = int(re.search(r"QEMU (\d+) running \(tcg\)", err).group(1))
    assert _pid_gone(pid)
    return images, err


@pytest.mark.parametrize("fmt,driver", [("qcow2", "qcow2"), ("dmg-UDZO", "dmg"),
                                        ("dmg-ULFO", None)])
def test_boot_disk_prints_marker(tmp_path, fmt, driver):
    """A qcow2 and a UDZO DMG boot with QEMU's own drivers; a ULFO DMG (LZFSE, which
    Debian's QEMU lacks) through diskforge's NBD export, chosen automatically. A DMG is
    read-only, so its guest writes to a temporary overlay even without --snapshot."""
    need("qemu-system-x86_64")
    need("qemu-img")
    raw, qcow2 = bootable_disk(str(tmp_path))
    image = qcow2
    if fmt.startswith("dmg"):
        image = str(tmp_path / "boot.dmg")
        code, _, err = cli("convert", "-O", "dmg", "-o", f"format={fmt[4:]}", raw, image)
        assert code == 0, err
    assert plan_image(image).qemu_driver == driver
    before = open(image, "rb").read()
    log, sock = str(tmp_path / "serial.log"), str(tmp_path / "qmp.sock")
    proc = _boot(image, "--serial", log, "--qmp", sock, "--timeout", "90",
                 *(["--snapshot"] if fmt == "qcow2" else []))
    images, err = _booted(proc, log, sock)
    assert "QMP socket:" in err
    disk = images["disk0"]
    if driver is None:
        assert disk["format"] == "raw" and disk["filename"].startswith("nbd+unix://")
    else:
        assert disk["format"] == driver and disk["filename"] == image
    assert open(image, "rb").read() == before  # the image is untouched


def test_boot_hybrid_iso_with_a_qcow2_disk(tmp_path):
    """``diskforge boot DISK --cdrom ISO``: the ISO issue's hybrid ISO (isolinux, its
    configuration printing a marker on the serial port) boots from the CD-ROM, with an
    empty qcow2 disk attached read-write with QEMU's qcow2 driver."""
    need("qemu-system-x86_64")
    need("qemu-img")
    marker = f"DISKFORGE-ISO-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp_path / "iso")
    iso = boot_iso(str(tmp_path / "iso"), marker)
    disk = qcow2_disk(str(tmp_path / "disk.qcow2"), 16 * MiB)
    log, sock = str(tmp_path / "serial.log"), str(tmp_path / "qmp.sock")
    proc = _boot(disk, "--cdrom", iso, "--memory", "128M", "--serial", log, "--qmp", sock,
                 "--timeout", "90")
    images, err = _booted(proc, log, sock, marker.encode())
    assert images["disk0"]["format"] == "qcow2" and images["disk0"]["filename"] == disk
    assert images["cd0"]["format"] == "raw" and images["cd0"]["filename"] == iso
    run("qemu-img", "check", "-q", disk)


def test_vm_api_boots_and_queries(vms, tmp_path):
    need("qemu-img")
    raw, qcow2 = bootable_disk(str(tmp_path))
    log = str(tmp_path / "serial.log")
    vm = vms(VMConfig(machine="q35", memory="64M", serial=f"file:{log}",
                      drives=[Drive(qcow2, "qcow2", id="disk0", bootindex=1)]))
    assert wait_for_marker(log)
    blocks = {b["device"]: b for b in vm.query_block()}
    assert blocks["disk0"]["inserted"]["file"] == qcow2
    assert vm.qmp.execute("query-status")["running"] is True
    code = vm.stop(timeout=1)  # no OS answers the power button: quit after the timeout
    assert code == 0 and not vm.running


@pytest.mark.slow
def test_uefi_firmware_runs(vms, tmp_path):
    """OVMF under TCG reaches its boot manager, which reports on the serial console."""
    from diskforge.hypervisor.vm import find_ovmf
    try:
        code, _ = find_ovmf()
    except Exception:
        pytest.skip("OVMF is not installed (.ci/install-tools installs it)")
    log = str(tmp_path / "uefi.log")
    vm = vms(VMConfig(machine="q35", memory="128M", firmware="uefi", serial=f"file:{log}"))
    assert any(code in a for a in vm.argv())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and b"BdsDxe" not in open(log, "rb").read():
        time.sleep(0.2)
    assert b"BdsDxe" in open(log, "rb").read()
    vm.stop(timeout=1)


def test_boot_errors_are_one_line(tmp_path):
    need("qemu-system-x86_64")
    code, out, err = cli("boot", str(tmp_path / "missing.qcow2"), "--serial", "none")
    one_line_error(code, err)
    assert "no such file" in err.lower()
    code, out, err = cli("attach", "--qmp", str(tmp_path / "nosock"), "--connect-timeout",
                         "0.5", str(tmp_path / "x"))
    one_line_error(code, err)
    assert "QMP" in err
    raw, _ = bootable_disk(str(tmp_path))
    ulfo = str(tmp_path / "boot.dmg")
    assert cli("convert", "-O", "dmg", "-o", "format=ULFO", raw, ulfo)[0] == 0
    code, out, err = cli("boot", ulfo, "--via", "direct", "--serial", "none")
    one_line_error(code, err)
    assert "QEMU cannot read this dmg image" in err and "--via nbd" in err


def test_kvm_detection_is_a_bool():
    assert kvm_usable("/nonexistent/kvm") is False
    assert isinstance(kvm_usable(), bool)
