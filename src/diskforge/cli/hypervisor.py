"""Subcommands that hand disks to hypervisors: boot, attach, detach, backup, serve."""

from __future__ import annotations

import sys

from .image import add_force_share_arg, add_policy_args, policy_from


def _say(args, text: str) -> None:
    if not getattr(args, "q", False):
        print(text, file=sys.stderr, flush=True)


# -- serve --------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    import threading
    from ..errors import UsageError
    from ..hypervisor.nbd import NBDServer
    from ..registry import get, open_image, probe
    if (args.socket is None) == (args.port is None):
        raise UsageError("give exactly one of --socket PATH and --port N")
    plugin = get(args.f) if args.f else probe(args.image)
    read_only = args.read_only
    if not read_only and not plugin.random_write:
        read_only = True
        _say(args, f"diskforge: {plugin.name} images cannot be written in place;"
                   " serving read-only")
    if args.port is not None and args.bind not in ("127.0.0.1", "::1", "localhost"):
        _say(args, f"diskforge: warning: listening on {args.bind}, beyond this machine;"
                   " NBD has no authentication")
    log = (lambda m: print(f"diskforge: {m}", file=sys.stderr, flush=True)) \
        if args.verbose else None
    # an NBD export hands the image's bytes to whoever connects: what it names is
    # confined as for an upload unless the user vouches for the image (--trusted)
    policy = policy_from(args)
    if not policy.is_untrusted and not args.trusted:
        from ..policy import OpenPolicy
        policy = OpenPolicy.untrusted(policy.allowed_roots).replace(
            force_share=policy.force_share)
    with open_image(args.image, plugin.name, writable=not read_only,
                    policy=policy) as dev:
        server = NBDServer(dev, socket_path=args.socket, host=args.bind, port=args.port,
                           read_only=read_only, export_name=args.export_name,
                           description=args.image, max_clients=args.max_clients, log=log)
        server.start()
        try:
            print(f"serving {args.image} ({dev.format}, {dev.size} bytes,"
                  f" {'read-only' if read_only else 'writable'}) at {server.uri}",
                  flush=True)
            threading.Event().wait()  # until SIGINT/SIGTERM
        except KeyboardInterrupt:
            pass
        finally:
            server.close()
            if not read_only:
                dev.flush()
    return 0


# -- boot ----------------------------------------------------------------------------------

def cmd_boot(args) -> int:
    import time
    from ..hypervisor.boot import BootOptions, build_vm
    serial = args.serial
    if serial not in ("stdio", "none") and not serial.startswith("file:"):
        serial = f"file:{serial}"
    opts = BootOptions(image=args.image, fmt=args.f, via=args.via, snapshot=args.snapshot,
                       read_only=args.read_only, cdrom=args.cdrom, interface=args.interface,
                       memory=args.memory, cpus=args.cpus,
                       firmware="uefi" if args.uefi else "bios", accel=args.accel,
                       machine=args.machine, serial=None if serial == "none" else serial,
                       qmp_socket=args.qmp, display=args.display, net=args.net,
                       extra_args=args.qemu_arg, policy=policy_from(args))
    vm = build_vm(opts)
    try:
        vm.start()
        _say(args, f"diskforge: QEMU {vm.proc.pid} running ({vm.accel}); QMP socket:"
                   f" {vm.qmp_socket}")
        deadline = time.monotonic() + args.timeout if args.timeout else None
        while vm.running:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                _say(args, f"diskforge: --timeout {args.timeout:g} s reached; powering off")
                break
            vm.wait(0.5 if left is None else min(0.5, left))
        code = vm.stop(timeout=args.shutdown_timeout)
    except KeyboardInterrupt:
        _say(args, "diskforge: stopping the VM")
        code = vm.stop(timeout=args.shutdown_timeout)
    finally:
        vm.kill()  # idempotent: reaps QEMU and closes any NBD export, on every path
    if code not in (0, None):
        print(f"diskforge: QEMU exited with status {code}"
              + (f": {vm.exit_message}" if vm.exit_message else ""), file=sys.stderr)
        return 1
    return 0


# -- attach / detach -------------------------------------------------------------------------

def _connect(args):
    from ..hypervisor.qmp import QMP
    return QMP(args.qmp, timeout=args.connect_timeout)


def cmd_attach(args) -> int:
    from ..hypervisor.hotplug import attach
    with _connect(args) as qmp:
        got = attach(qmp, args.image, fmt=args.f, read_only=not args.rw,
                     device=args.device, node_name=args.node_name,
                     policy=policy_from(args))
    print(f"attached {args.image} as node {got['node']}, device {got['device']}"
          f" ({'read-write' if args.rw else 'read-only'})")
    return 0


def cmd_detach(args) -> int:
    from ..hypervisor.hotplug import detach
    with _connect(args) as qmp:
        got = detach(qmp, args.image, timeout=args.timeout)
    print(f"detached node {got['node']}" + (f", device {got['device']}"
                                            if got["device"] else ""))
    return 0


# -- backup ----------------------------------------------------------------------------------

def cmd_backup(args) -> int:
    from ..hypervisor.backup import backup
    from ..options import parse_size
    from .progress import ProgressBar
    speed = parse_size(args.speed, "speed") if args.speed else 0
    bar = ProgressBar("backup ", force=args.p, quiet=args.q)
    try:
        with _connect(args) as qmp:
            res = backup(qmp, args.device, args.out, incremental=args.incremental,
                         speed=speed, progress=bar)
    finally:
        bar.close()
    kind = "incremental backup" if res.kind == "incremental" else "full backup"
    base = f" over {res.base}" if res.base else ""
    print(f"{kind} of {args.device} written to {res.path}{base}: {res.bytes_copied} bytes"
          f" copied in {res.seconds:.1f} s; dirty bitmap {res.bitmap}"
          + ("" if res.persistent else " (not persistent: this disk's format cannot store"
             " it, so an incremental backup needs this same QEMU process)"))
    return 0


# -- parsers -------------------------------------------------------------------------------

def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="export an image over NBD (any format diskforge reads)")
    p.add_argument("image")
    p.add_argument("-f", metavar="FMT", help="the image's format (default: probed)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--port", type=int, metavar="N", help="listen on TCP port N")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="TCP address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--read-only", action="store_true", help="refuse writes")
    p.add_argument("--export-name", default="", metavar="NAME",
                   help="the export's name (default: empty, as qemu-nbd)")
    p.add_argument("--max-clients", type=int, default=16, metavar="N")
    p.add_argument("-v", "--verbose", action="store_true", help="log each client")
    p.add_argument("-q", action="store_true")
    p.add_argument("--trusted", action="store_true",
                   help="follow the files the image names anywhere, as qemu-nbd does"
                   " (default: untrusted mode's rules, files confined to the image's"
                   " directory and --allow-root DIRs, no raw backing files)")
    add_force_share_arg(p)
    add_policy_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("boot", help="start qemu-system-x86_64 with an image")
    p.add_argument("image", nargs="?", help="the boot disk (an ISO boots as a CD-ROM)")
    p.add_argument("-f", metavar="FMT", help="the image's format (default: probed)")
    p.add_argument("--cdrom", metavar="ISO", help="an extra CD-ROM (e.g. a cloud-init seed)")
    p.add_argument("-m", "--memory", default="1G", help="guest memory (default 1G)")
    p.add_argument("--cpus", type=int, default=1)
    p.add_argument("--uefi", action="store_true", help="boot with OVMF instead of the BIOS")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="auto: KVM when /dev/kvm is usable, else TCG")
    p.add_argument("--machine", default="q35", help="QEMU machine type (default q35)")
    p.add_argument("--interface", choices=("virtio", "ide", "scsi"), default="virtio")
    p.add_argument("--via", choices=("auto", "direct", "nbd"), default="auto",
                   help="how QEMU reads the image: its own driver, or diskforge's NBD"
                   " export (auto: NBD only for formats QEMU cannot read)")
    p.add_argument("--snapshot", action="store_true",
                   help="run without changing the image (writes go to a temporary overlay)")
    p.add_argument("--read-only", action="store_true", help="attach the disk read-only")
    p.add_argument("--serial", default="stdio",
                   help="serial console: stdio (this terminal), a file, or none")
    p.add_argument("--qmp", metavar="PATH", help="QMP socket path (default: a private one,"
                   " printed at start)")
    p.add_argument("--display", default="none", help="QEMU display (none, gtk, vnc=:1...)")
    p.add_argument("--net", choices=("user", "none"), default="user")
    p.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="pass one more argument to QEMU (repeatable)")
    p.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                   help="power the VM off after this long (default: run until it stops)")
    p.add_argument("--shutdown-timeout", type=float, default=30, metavar="SECONDS",
                   help="how long the guest gets to power down before QEMU is told to quit")
    p.add_argument("-q", action="store_true")
    add_policy_args(p)
    p.set_defaults(func=cmd_boot)

    for name, helptext in (("attach", "hot-plug an image into a running VM"),
                           ("detach", "hot-unplug a disk from a running VM")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--qmp", required=True, metavar="SOCKET", help="the VM's QMP socket")
        p.add_argument("image", help="image file or NBD URI" if name == "attach"
                       else "image file, node name or device id")
        p.add_argument("--connect-timeout", type=float, default=10, help=argparse_suppress())
        if name == "attach":
            p.add_argument("-f", metavar="FMT", help="the image's format (default: probed)")
            p.add_argument("--rw", action="store_true",
                           help="attach read-write (default: read-only)")
            p.add_argument("--device", default="virtio",
                           help="guest device: virtio (virtio-blk-pci), scsi, usb, ide,"
                           " or a QEMU device model")
            p.add_argument("--node-name", metavar="NAME", help="QEMU node name to use")
            add_policy_args(p)
            p.set_defaults(func=cmd_attach)
        else:
            p.add_argument("--timeout", type=float, default=10, metavar="SECONDS",
                           help="how long the guest gets to release the device")
            p.set_defaults(func=cmd_detach)

    p = sub.add_parser("backup", help="live full or incremental backup of a running VM's"
                       " disk into a qcow2")
    p.add_argument("--qmp", required=True, metavar="SOCKET", help="the VM's QMP socket")
    p.add_argument("--device", required=True, metavar="NODE",
                   help="drive name, device id or node name of the disk")
    p.add_argument("out", help="the new backup file (qcow2; never overwritten)")
    p.add_argument("--incremental", action="store_true",
                   help="only the blocks written since the previous backup, as an overlay"
                   " of it (the chain is recorded in diskforge-backup.json beside OUT)")
    p.add_argument("--speed", metavar="BYTES/S", help="limit the copy rate (e.g. 50M)")
    p.add_argument("--connect-timeout", type=float, default=10, help=argparse_suppress())
    p.add_argument("-p", action="store_true", help="show progress even when not on a TTY")
    p.add_argument("-q", action="store_true")
    p.set_defaults(func=cmd_backup)


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS
