"""Start ``qemu-system-x86_64`` with disks attached, drive it over QMP, always reap it.

A :class:`VM` is built from a :class:`VMConfig` (memory, CPUs, machine, firmware,
accelerator, serial console, drives). ``start()`` launches QEMU with a QMP socket and
waits until the monitor answers (or QEMU exits, in which case its own error message is
raised); ``stop()`` asks the guest to power down (ACPI ``system_powerdown``), sends
``quit`` when it has not within the timeout, then terminates and kills as a last
resort, and always waits for the process. A VM is a context manager, so a failing
caller still reaps QEMU; QEMU is also told to die with its parent (PR_SET_PDEATHSIG),
so not even a SIGKILLed diskforge leaves it running.

Decisions:
- Drives use ``-drive if=none,id=ID`` plus an explicit ``-device``: the BlockBackend
  name is the drive id (what ``blockdev-backup`` and ``qemu-io`` take), ``snapshot=on``
  works per drive, and an NBD URI is just another ``file=``.
- Accelerator ``auto`` is KVM when ``/dev/kvm`` opens, creates a VM and lets QEMU start
  a vCPU (see ``kvm_usable``), else TCG.
- UEFI uses the OVMF build found on the system (Debian's ``ovmf`` package); its
  variable store is copied into the VM's private directory, so the system copy is never
  written.
- With no display and a serial console, the machine gets ``graphics=off`` (what
  ``-nographic`` sets): SeaBIOS then mirrors its console, and with it what boot
  loaders print through the BIOS (isolinux's ``SAY``), to the serial port.
- Networking is off unless asked (``net="user"``: QEMU's user-mode stack, with a
  virtio NIC without an option ROM so that no iPXE package is needed).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from ..errors import DiskforgeError, UsageError
from .qmp import QMP, QMPDisconnected, QMPError

QEMU_BINARY = "qemu-system-x86_64"

# OVMF builds, as (code, vars) pairs, most specific first (Debian/Ubuntu, Fedora, Arch)
OVMF_PAIRS = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
    ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),
)


class VMError(DiskforgeError):
    """QEMU could not be started, or exited with an error."""


def kvm_usable(path: str = "/dev/kvm", qemu: str = QEMU_BINARY) -> bool:
    """True when KVM can really run a guest: the device opens read-write, speaks API
    version 12 and creates a VM, and then QEMU itself survives starting a vCPU with it
    for half a second. The last step is there because nested or emulated KVM can pass
    every ioctl and still abort QEMU at the first vCPU reset (seen: "failed to set MSR
    0x10a"); the answer is cached per process."""
    import fcntl
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, 0xAE00) != 12:  # KVM_GET_API_VERSION
            return False
        vm = fcntl.ioctl(fd, 0xAE01, 0)  # KVM_CREATE_VM
        os.close(vm)
    except OSError:
        return False
    finally:
        os.close(fd)
    return _qemu_runs_kvm(shutil.which(qemu) or qemu)


_kvm_checked: dict[str, bool] = {}


def _qemu_runs_kvm(binary: str) -> bool:
    if binary not in _kvm_checked:
        try:
            proc = subprocess.Popen(
                [binary, "-nodefaults", "-no-user-config", "-machine", "pc", "-accel", "kvm",
                 "-cpu", "host", "-m", "16M", "-display", "none", "-serial", "none",
                 "-monitor", "none"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, preexec_fn=_child_setup)
        except OSError:
            return False
        try:
            proc.wait(0.5)
            ok = False  # it exited: KVM failed it
        except subprocess.TimeoutExpired:
            ok = True
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        _kvm_checked[binary] = ok
    return _kvm_checked[binary]


def find_ovmf() -> tuple[str, str]:
    """The (code, vars template) of an installed OVMF, or a one-line error."""
    for code, vars_ in OVMF_PAIRS:
        if os.path.exists(code) and os.path.exists(vars_):
            return code, vars_
    raise VMError("UEFI firmware not found (install the 'ovmf' package)")


@dataclass
class Drive:
    """One disk or CD-ROM given to QEMU.

    ``path`` is a file or an NBD URI; ``driver`` the QEMU format driver reading it.
    ``device`` is the guest device model (``virtio-blk-pci``, ``ide-hd``, ``ide-cd``,
    ``scsi-hd``), or None for a drive with no guest device (block jobs only, as with
    ``-machine none``).
    """
    path: str
    driver: str = "raw"
    id: str = "disk0"
    device: str | None = "virtio-blk-pci"
    read_only: bool = False
    snapshot: bool = False
    bootindex: int | None = None
    media: str = "disk"

    def args(self) -> list[str]:
        opts = ["if=none", f"id={self.id}", f"file={_escape(self.path)}",
                f"format={self.driver}", f"media={self.media}"]
        if self.read_only:
            opts.append("read-only=on")
        if self.snapshot:
            opts.append("snapshot=on")
        argv = ["-drive", ",".join(opts)]
        if self.device:
            dev = [self.device, f"drive={self.id}", f"id={self.id}-dev"]
            if self.bootindex is not None:
                dev.append(f"bootindex={self.bootindex}")
            argv += ["-device", ",".join(dev)]
        return argv


def _escape(value: str) -> str:
    """QEMU option values double their commas."""
    return value.replace(",", ",,")


@dataclass
class VMConfig:
    """The QEMU machine to launch."""
    drives: list[Drive] = field(default_factory=list)
    memory: str = "512M"
    cpus: int = 1
    machine: str = "q35"            # "none" for block jobs without a guest
    firmware: str = "bios"          # or "uefi"
    accel: str = "auto"             # "kvm", "tcg" or "auto"
    serial: str | None = None       # "stdio", "file:PATH", or None (no serial port)
    qmp_socket: str | None = None   # the monitor for others (default: in a private
                                    # directory); diskforge keeps its own second one
    display: str = "none"
    net: str = "none"               # or "user"
    paused: bool = False            # -S: do not start the CPUs
    extra_args: list[str] = field(default_factory=list)
    qemu: str = QEMU_BINARY
    die_with_parent: bool = True


class VM:
    """One QEMU process. Use as a context manager, or call ``stop()`` in a finally."""

    def __init__(self, config: VMConfig, *, cleanup=()):
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.qmp: QMP | None = None
        self.workdir = tempfile.mkdtemp(prefix="diskforge-vm-")
        # QEMU's QMP socket serves one client at a time: diskforge talks on a private
        # one, and ``qmp_socket`` stays free for the user (attach, backup, scripts)
        self.own_socket = os.path.join(self.workdir, "diskforge-qmp.sock")
        self.qmp_socket = config.qmp_socket or os.path.join(self.workdir, "qmp.sock")
        self.stderr_path = os.path.join(self.workdir, "qemu.stderr")
        self.accel = ""
        self.exit_message = ""  # QEMU's last stderr lines, kept when it failed
        # things to close after QEMU is reaped (NBD servers feeding its drives)
        self._cleanup = list(cleanup)

    # -- the command line ---------------------------------------------------------------
    def argv(self) -> list[str]:
        c = self.config
        binary = shutil.which(c.qemu) or c.qemu
        accel = c.accel
        if accel == "auto":
            accel = "kvm" if kvm_usable() else "tcg"
        if accel not in ("kvm", "tcg"):
            raise UsageError(f"unknown accelerator '{c.accel}' (kvm, tcg or auto)")
        self.accel = accel
        machine = c.machine
        if c.display == "none" and c.serial is not None and machine != "none":
            # as -nographic: with no screen, the firmware's console (SeaBIOS's, and so a
            # boot loader's BIOS output) goes to the serial port too
            machine += ",graphics=off"
        argv = [binary, "-nodefaults", "-no-user-config", "-machine", machine,
                "-accel", accel, "-display", c.display,
                "-qmp", f"unix:{_escape(self.own_socket)},server=on,wait=off",
                "-qmp", f"unix:{_escape(self.qmp_socket)},server=on,wait=off"]
        if c.machine != "none":
            argv += ["-m", str(c.memory), "-smp", str(int(c.cpus))]
            if accel == "kvm":
                argv += ["-cpu", "host"]
            if c.display != "none":
                argv += ["-vga", "std"]
            if c.firmware == "uefi":
                code, vars_template = find_ovmf()
                vars_copy = os.path.join(self.workdir, "OVMF_VARS.fd")
                shutil.copyfile(vars_template, vars_copy)
                argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,"
                         f"file={_escape(code)}",
                         "-drive", f"if=pflash,format=raw,unit=1,file={_escape(vars_copy)}"]
            elif c.firmware != "bios":
                raise UsageError(f"unknown firmware '{c.firmware}' (bios or uefi)")
            if c.net == "user":
                argv += ["-netdev", "user,id=net0",
                         "-device", "virtio-net-pci,netdev=net0,romfile="]
            elif c.net != "none":
                raise UsageError(f"unknown network mode '{c.net}' (user or none)")
            if any(d.device == "scsi-hd" for d in c.drives):
                argv += ["-device", "virtio-scsi-pci,id=scsi0"]
        if c.serial is None:
            argv += ["-serial", "none"]
        elif c.serial == "stdio" or c.serial.startswith("file:"):
            argv += ["-serial", c.serial]
        else:
            raise UsageError(f"serial must be 'stdio' or 'file:PATH', not '{c.serial}'")
        if c.paused:
            argv.append("-S")
        for d in c.drives:
            argv += d.args()
        return argv + list(c.extra_args)

    # -- lifetime ---------------------------------------------------------------------
    def start(self, *, timeout: float = 30.0) -> "VM":
        """Launch QEMU and wait until QMP answers; on failure QEMU is reaped and its
        own error message raised."""
        argv = self.argv()
        stdio = self.config.serial == "stdio"
        try:
            err = open(self.stderr_path, "wb")
            try:
                self.proc = subprocess.Popen(
                    argv, stdin=None if stdio else subprocess.DEVNULL,
                    stdout=None if stdio else subprocess.DEVNULL, stderr=err,
                    start_new_session=True,
                    preexec_fn=_child_setup if self.config.die_with_parent else _no_core)
            finally:
                err.close()
        except FileNotFoundError:
            self._release()
            raise VMError(f"{self.config.qemu} not found (install the qemu-system-x86"
                          " package)") from None
        try:
            deadline = time.monotonic() + timeout
            while not os.path.exists(self.own_socket):
                if self.proc.poll() is not None:
                    raise VMError(f"QEMU exited at start ({self.proc.returncode}):"
                                  f" {self.stderr_tail()}")
                if time.monotonic() > deadline:
                    raise VMError(f"QEMU did not open its QMP socket within {timeout:g} s")
                time.sleep(0.02)
            try:
                self.qmp = QMP(self.own_socket,
                               timeout=max(1.0, deadline - time.monotonic()))
            except QMPError:
                if self.wait(2) is not None:  # QEMU opened the socket, then gave up
                    raise VMError(f"QEMU exited at start ({self.proc.returncode}):"
                                  f" {self.stderr_tail()}") from None
                raise
        except BaseException:
            self.kill()
            raise
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for QEMU to exit by itself (guest power-off); its exit status, or None."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 30.0) -> int | None:
        """Power down cleanly: ACPI power button, ``quit`` after ``timeout`` seconds,
        then SIGTERM and SIGKILL. Always reaps QEMU and closes what fed its drives."""
        try:
            if self.running and self.qmp is not None and self.config.machine != "none":
                try:
                    self.qmp.execute("system_powerdown", timeout=5)
                except QMPError:
                    pass
                self.wait(timeout)
            if self.running and self.qmp is not None:
                try:
                    self.qmp.execute("quit", timeout=5)
                except QMPDisconnected:
                    pass  # quit closes the monitor before answering, sometimes
                except QMPError:
                    pass
                self.wait(10)
        finally:
            code = self.kill()
        return code

    def kill(self) -> int | None:
        """Terminate (then kill) QEMU if it still runs, reap it, release everything."""
        code = None
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.proc.terminate()
                    if self.wait(5) is None:
                        self.proc.kill()
                code = self.proc.wait()
                if code and not self.exit_message:
                    self.exit_message = self.stderr_tail()
        finally:
            self._release()
        return code

    def _release(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        while self._cleanup:
            thing = self._cleanup.pop()
            try:
                thing.close()
            except Exception:
                pass
        if self.config.qmp_socket:  # QEMU leaves its socket file behind
            try:
                if stat.S_ISSOCK(os.lstat(self.config.qmp_socket).st_mode):
                    os.unlink(self.config.qmp_socket)
            except OSError:
                pass
        if self.workdir and os.path.isdir(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                text = f.read()[-limit:].decode(errors="replace")
        except OSError:
            return ""
        return " / ".join(line.strip() for line in text.splitlines() if line.strip())

    # -- queries ------------------------------------------------------------------------
    def query_block(self) -> list[dict]:
        """QEMU's ``query-block``: every BlockBackend with what is inserted in it."""
        if self.qmp is None:
            raise VMError("the VM is not running")
        return self.qmp.execute("query-block")

    def __enter__(self) -> "VM":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _no_core() -> None:
    """A crashing QEMU would dump all guest RAM as a core file, slowly."""
    import resource
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError):
        pass


def _child_setup() -> None:
    """In QEMU's process before exec: no core dump, and die with the thread that
    started it (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal
    _no_core()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass
