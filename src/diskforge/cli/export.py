"""export: make what a cloud or hypervisor imports, or say why a file would be refused.

``diskforge export --to TARGET SRC OUT`` writes the target's files (listed on stdout
unless ``-q``); ``diskforge export --check TARGET FILE`` prints each rule FILE breaks,
one line each, and exits 2 when there is any (0 when the target would take it, 1 on
an error), as ``check`` separates corruption from errors.
"""

from __future__ import annotations

from .image import (add_force_share_arg, add_policy_args, open_source, policy_from,
                    progress_for)

EXIT_OK, EXIT_ERROR, EXIT_RULES = 0, 1, 2


def cmd_export(args) -> int:
    from ..errors import UsageError, printable
    from ..export import TARGETS, target
    if args.check:
        if len(args.files) != 1:
            raise UsageError("export --check TARGET takes one FILE")
        from ..export import check
        path = args.files[0]
        problems = check(args.check, path, policy=policy_from(args))
        for p in problems:
            print(f"{printable(path)}: {printable(p)}")
        if not problems and not args.q:
            print(f"{printable(path)}: {args.check} would accept it")
        return EXIT_RULES if problems else EXIT_OK
    if not args.to:
        raise UsageError(f"give --to TARGET ({', '.join(TARGETS)}) or --check TARGET")
    if len(args.files) != 2:
        raise UsageError("export --to TARGET takes SRC and OUT")
    from ..atomic import refuse_overwrite
    from ..export.base import ExportOptions
    mod = target(args.to)
    opts = ExportOptions(cpus=args.cpus, memory=args.memory, name=args.name or "",
                         firmware=args.firmware, manifest=args.manifest,
                         package=args.package or "")
    opts.validate()
    source, out = args.files
    with open_source(source, args.f, args) as src:
        refuse_overwrite(out, src.files(), "the input")
        with progress_for(args) as bar:
            written = mod.export(src, out, opts, bar)
    if not args.q:
        for path in written:
            print(printable(path))
    return EXIT_OK


def add_parsers(sub) -> None:
    from ..export import TARGETS
    p = sub.add_parser(
        "export", help="write an image the way a cloud or hypervisor imports it"
        f" ({', '.join(TARGETS)}), or --check why a file would be refused",
        description="export --to TARGET SRC OUT | export --check TARGET FILE")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--to", metavar="TARGET", choices=TARGETS,
                      help="write SRC for TARGET at OUT: " + ", ".join(TARGETS))
    what.add_argument("--check", metavar="TARGET", choices=TARGETS,
                      help="print each of TARGET's rules FILE breaks (exit 2 if any)")
    p.add_argument("-f", metavar="FMT", help="source format (default: probe)")
    p.add_argument("--cpus", type=int, default=1, help="vCPUs (ova, libvirt, proxmox)")
    p.add_argument("--memory", type=int, default=1024, metavar="MIB",
                   help="memory in MiB (ova, libvirt, proxmox)")
    p.add_argument("--name", help="VM name (default: OUT's file name)")
    p.add_argument("--firmware", choices=("bios", "efi"), default="bios",
                   help="BIOS or UEFI boot (ova, libvirt, proxmox)")
    p.add_argument("--manifest", choices=("sha1", "sha256", "none"), default="sha256",
                   help="OVA manifest digest (sha1 for vCenter before 6.5)")
    p.add_argument("--package", choices=("vmdk", "ova"),
                   help="aws: a stream-optimized VMDK (default) or an OVA (also chosen"
                   " by OUT ending in .ova)")
    p.add_argument("-p", action="store_true", help="show progress")
    p.add_argument("-q", action="store_true", help="quiet")
    add_force_share_arg(p)
    add_policy_args(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="SRC OUT, or FILE with --check")
    p.set_defaults(func=cmd_export)

