"""``diskforge iso``: build ISOs from a directory, list and extract them, cloud-init seeds.

Flags follow xorriso/genisoimage's meaning where they overlap (``-V`` volume id,
``--boot`` for ``-b``, ``--boot-load-size``, ``--no-boot-info-table``, ``--efi-boot`` for
``-e``, ``--hybrid-mbr`` for ``-isohybrid-mbr``, ``--rational-rock`` for ``-r``).
"""

from __future__ import annotations

import argparse
import sys
import time


def _warn(msg: str) -> None:
    from ..errors import printable
    print(f"diskforge: warning: {printable(msg)}", file=sys.stderr)


def cmd_build(args) -> int:
    from ..iso.build import BuildOptions, build, source_date_epoch_from_env
    from .image import progress_for
    opts = BuildOptions(
        level=args.level, joliet=args.joliet, rock_ridge=args.rock_ridge, udf=args.udf,
        rational_rock=args.rational_rock, follow_symlinks=args.follow_symlinks,
        volume_id=args.volume_id, system_id=args.system_id,
        volume_set_id=args.volume_set_id, publisher=args.publisher,
        preparer=args.preparer, application=args.application,
        boot=args.boot, boot_load_size=args.boot_load_size,
        boot_info_table=args.boot_info_table, boot_catalog=args.boot_catalog,
        efi_boot=args.efi_boot, hybrid=args.hybrid or args.hybrid_mbr is not None,
        hybrid_mbr=args.hybrid_mbr, source_date_epoch=source_date_epoch_from_env())
    with progress_for(args) as bar:
        res = build(args.source, args.output, opts, progress=bar, warn=_warn)
    if not args.q:
        print(f"{args.output}: {res.files} files, {res.directories} directories,"
              f" {res.symlinks} symlinks, {res.size} bytes")
    return 0


def _mode_string(e) -> str:
    kinds = {"dir": "d", "file": "-", "symlink": "l", "char": "c", "block": "b",
             "fifo": "p", "socket": "s"}
    mode = e.mode if e.mode is not None else (0o555 if e.kind == "dir" else
                                              0o777 if e.kind == "symlink" else 0o444)
    bits = "".join(ch if mode & (1 << (8 - i)) else "-" for i, ch in enumerate("rwxrwxrwx"))
    return kinds.get(e.kind, "?") + bits


def _line(name: str, e) -> str:
    """One ``ls -l``-like line; the name and link target come from inside the image, so
    they are escaped (a newline in a Rock Ridge name would forge a line)."""
    from ..errors import printable
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime)) if e.mtime is not None \
        else "-" * 16
    owner = f"{e.uid if e.uid is not None else '-':>5} {e.gid if e.gid is not None else '-':>5}"
    shown = printable(name) + ("/" if e.kind == "dir" else "")
    if e.kind == "symlink":
        shown += f" -> {printable(e.target)}"
    return f"{_mode_string(e)} {owner} {e.size:>13} {when}  {shown}"


def cmd_ls(args) -> int:
    import json

    from ..iso.filesystem import open_filesystem
    from .image import open_source
    with open_source(args.image, args.f, args) as dev:
        tree = open_filesystem(dev, args.namespace)
        top = tree.lookup(args.path)
        if args.recursive and top.kind == "dir":
            rows = [("/".join(parts), e) for parts, e in tree.walk(top)]
        elif top.kind == "dir":
            rows = [(e.name, e) for e in tree.children(top)]
        else:
            rows = [(top.name, top)]
        if args.output == "json":
            entries = []
            for name, e in rows:
                d = e.to_json()
                d["path"] = name
                entries.append(d)
            print(json.dumps({"namespace": tree.namespace, "entries": entries}, indent=4))
        else:
            for name, e in rows:
                print(_line(name, e))
    return 0


def cmd_extract(args) -> int:
    from ..iso.extract import extract
    from ..iso.filesystem import open_filesystem
    from .image import open_source, progress_for
    with open_source(args.image, args.f, args) as dev:
        tree = open_filesystem(dev, args.namespace)
        with progress_for(args) as bar:
            res = extract(tree, args.dest, args.paths, symlinks=args.symlinks,
                          overwrite=args.overwrite, same_owner=args.same_owner,
                          progress=bar)
    from ..errors import printable
    for path, why in res.refused:   # both quote names from inside the image
        print(f"diskforge: refused '{printable(path)}': {printable(why)}", file=sys.stderr)
    if not args.q:
        print(f"{args.dest}: {res.files} files, {res.directories} directories,"
              f" {res.symlinks} symlinks, {res.bytes} bytes ({tree.namespace} names)")
    if res.refused:
        print(f"diskforge: {len(res.refused)} entries were refused (not extracted)",
              file=sys.stderr)
        return 1
    return 0


def cmd_cloud_init(args) -> int:
    from ..iso.build import source_date_epoch_from_env
    from ..iso.cloudinit import SeedSpec, build_seed
    spec = SeedSpec(user_data=args.user_data, meta_data=args.meta_data,
                    network_config=args.network_config, hostname=args.hostname,
                    user=args.user, ssh_keys=args.ssh_key or [],
                    password_hash=args.password_hash, instance_id=args.instance_id)
    res = build_seed(args.output, spec, source_date_epoch=source_date_epoch_from_env())
    if not args.q:
        print(f"{args.output}: NoCloud seed (volume id cidata), {res.files} files,"
              f" {res.size} bytes")
    return 0


def add_parsers(sub) -> None:
    from .image import add_policy_args
    p = sub.add_parser("iso", help="build, list and extract ISO images; cloud-init seeds")
    isub = p.add_subparsers(dest="iso_command", metavar="COMMAND",
                            parser_class=type(p))
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 1)[1])
    on_off = argparse.BooleanOptionalAction

    b = isub.add_parser("build", help="build an ISO from a directory",
                        description="Build an ISO from SRC_DIR. Defaults: ISO 9660 level 3"
                        " (files over 4 GiB), Rock Ridge and Joliet on, UDF off. With"
                        " SOURCE_DATE_EPOCH set, the output is reproducible.")
    b.add_argument("source", metavar="SRC_DIR")
    b.add_argument("output", metavar="OUT.iso")
    b.add_argument("--level", type=int, choices=(1, 2, 3, 4), default=3,
                   help="ISO 9660 interchange level (default 3: long files, multi-extent"
                   " files over 4 GiB; 4 is ISO 9660:1999)")
    b.add_argument("--rock-ridge", action=on_off, default=True,
                   help="Rock Ridge: POSIX names, modes, owners, symlinks, deep directories"
                   " (default on)")
    b.add_argument("--joliet", action=on_off, default=True,
                   help="Joliet: Windows names up to 64 characters (default on)")
    b.add_argument("--udf", action=on_off, default=False, help="add a UDF 2.60 bridge"
                   " (default off)")
    b.add_argument("--rational-rock", action="store_true", help="owner 0:0 and tidy modes"
                   " (r for all, x where any x), like mkisofs -r")
    b.add_argument("--follow-symlinks", action="store_true",
                   help="store what symlinks point to instead of the links")
    b.add_argument("-V", "--volume-id", default="CDROM", metavar="ID",
                   help="volume id (32 characters; default CDROM)")
    b.add_argument("--system-id", default="LINUX", metavar="ID")
    b.add_argument("--volume-set-id", default="", metavar="ID")
    b.add_argument("--publisher", default="", metavar="TEXT")
    b.add_argument("--preparer", default="", metavar="TEXT")
    b.add_argument("--application", default="DISKFORGE", metavar="TEXT")
    b.add_argument("--boot", metavar="PATH", help="El Torito BIOS no-emulation image, a"
                   " path inside SRC_DIR (e.g. isolinux/isolinux.bin)")
    b.add_argument("--boot-load-size", type=int, default=4, metavar="N",
                   help="512-byte sectors the BIOS loads (default 4)")
    b.add_argument("--no-boot-info-table", dest="boot_info_table", action="store_false",
                   help="do not patch the boot info table into the BIOS image")
    b.add_argument("--boot-catalog", metavar="PATH", help="where the El Torito catalog"
                   " appears in the ISO (default: boot.cat beside the boot image)")
    b.add_argument("--efi-boot", metavar="PATH", help="El Torito UEFI entry (platform"
                   " 0xEF): an EFI system partition image, a path inside SRC_DIR")
    b.add_argument("--hybrid", action="store_true", help="add an MBR so the image also"
                   " boots from a USB stick (syslinux isohdpfx.bin; an 0xEF partition for"
                   " the EFI image)")
    b.add_argument("--hybrid-mbr", metavar="FILE", help="the MBR boot code to use"
                   " (implies --hybrid; default /usr/lib/ISOLINUX/isohdpfx.bin)")
    b.add_argument("-p", action="store_true", help="show progress even when not a TTY")
    b.add_argument("-q", action="store_true", help="quiet")
    b.set_defaults(func=cmd_build)

    ls = isub.add_parser("ls", help="list an ISO's files")
    ls.add_argument("image", metavar="ISO")
    ls.add_argument("path", nargs="?", default="/", metavar="PATH")
    ls.add_argument("-R", "--recursive", action="store_true")
    ls.add_argument("--namespace", default="auto", choices=("auto", "rock-ridge", "udf",
                                                            "joliet", "iso9660"),
                    help="which names to read (default: Rock Ridge, else UDF, else"
                    " Joliet, else ISO 9660)")
    ls.add_argument("-f", metavar="FMT", help="format of ISO (default: probe)")
    ls.add_argument("--output", choices=("human", "json"), default="human")
    add_policy_args(ls)
    ls.set_defaults(func=cmd_ls)

    x = isub.add_parser("extract", help="extract an ISO's files under a directory (never"
                        " outside it)")
    x.add_argument("image", metavar="ISO")
    x.add_argument("dest", metavar="DEST")
    x.add_argument("paths", nargs="*", metavar="PATH", help="only these (default: all)")
    x.add_argument("--namespace", default="auto", choices=("auto", "rock-ridge", "udf",
                                                           "joliet", "iso9660"))
    x.add_argument("--symlinks", choices=("refuse", "reroot", "keep"), default="refuse",
                   help="symlinks pointing outside DEST: refuse them (default), reroot"
                   " absolute ones under DEST, or keep them as they are")
    x.add_argument("--overwrite", action="store_true", help="replace existing files")
    x.add_argument("--same-owner", action="store_true", help="apply Rock Ridge owners and"
                   " set-id bits (root only)")
    x.add_argument("-f", metavar="FMT", help="format of ISO (default: probe)")
    x.add_argument("-p", action="store_true", help="show progress even when not a TTY")
    x.add_argument("-q", action="store_true", help="quiet")
    add_policy_args(x)
    x.set_defaults(func=cmd_extract)

    c = isub.add_parser("cloud-init", help="make a cloud-init NoCloud seed ISO (volume id"
                        " cidata)")
    c.add_argument("output", metavar="OUT.iso")
    c.add_argument("--user-data", metavar="FILE")
    c.add_argument("--meta-data", metavar="FILE")
    c.add_argument("--network-config", metavar="FILE")
    c.add_argument("--hostname", metavar="NAME")
    c.add_argument("--user", metavar="NAME", help="create this user, with sudo")
    c.add_argument("--ssh-key", action="append", metavar="FILE",
                   help="authorized public key(s) for the user (repeatable)")
    c.add_argument("--password-hash", metavar="HASH", help="crypt(3) hash for the user")
    c.add_argument("--instance-id", metavar="ID", help="default: derived from the contents")
    c.add_argument("-q", action="store_true", help="quiet")
    c.set_defaults(func=cmd_cloud_init)
