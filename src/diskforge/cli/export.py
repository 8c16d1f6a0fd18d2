"""export: make what a cloud or hypervisor imports, or say why a file would be refused;
import: the reverse, an OVF package made into disks and a libvirt domain.

``diskforge export --to TARGET SRC OUT`` writes the target's files (listed on stdout
unless ``-q``); ``diskforge export --check TARGET FILE`` prints each rule FILE breaks,
one line each, and exits 2 when there is any (0 when the target would take it, 1 on
an error), as ``check`` separates corruption from errors.

``diskforge import vm.ova [OUTDIR]`` writes each disk converted and the domain XML
(export/importer.py), listing the files written; ``--dry-run`` prints the plan
instead, ``--output json`` prints the plan as JSON.
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


def cmd_import(args) -> int:
    import json
    import sys

    from ..errors import printable
    from ..export.importer import import_ova
    from .image import wants_option_help
    if wants_option_help(args.o):
        from ..registry import get
        plugin = get(args.O)
        print(plugin.options.help_text(plugin.name), end="")
        return EXIT_OK
    from ..options import merge_option_strings
    opts = {k: v for k, v in (("name", args.name), ("cpus", args.cpus),
                              ("memory", args.memory), ("firmware", args.firmware),
                              ("bus", args.bus), ("nic_model", args.nic_model))
            if v is not None}
    with progress_for(args) as bar:
        plan = import_ova(args.source, args.outdir, fmt=args.O,
                          options=merge_option_strings(*args.o), source_fmt=args.f,
                          dry_run=args.dry_run, progress=bar, policy=policy_from(args),
                          **opts)
    if args.output == "json":
        report = plan.to_json()
        report["dry-run"] = args.dry_run
        print(json.dumps(report, indent=4))
    elif args.dry_run:
        for line in plan.lines():
            print(printable(line))
    elif not args.q:
        for path in [d.output for d in plan.disks] + [plan.xml]:
            print(printable(path))
        for note in plan.notes:
            print(f"diskforge: note: {printable(note)}", file=sys.stderr)
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
    add_import_parser(sub)


def add_import_parser(sub) -> None:
    p = sub.add_parser(
        "import", help="an OVA (or OVF) made into converted disks and a libvirt domain"
        " XML", description="import vm.ova [OUTDIR]: each disk converted (qcow2 unless"
        " -O) and NAME.xml, a libvirt domain from the OVF's hardware section, in OUTDIR"
        " (default: the current directory); nothing is overwritten")
    p.add_argument("-f", metavar="FMT", help="the package's format (default: probe)")
    p.add_argument("-O", metavar="FMT", default="qcow2",
                   help="the disks' output format (default qcow2)")
    p.add_argument("-o", action="append", default=[], metavar="OPTIONS",
                   help="output format options, as convert takes them ('-o help')")
    p.add_argument("--name", help="the domain's name (default: the OVF's)")
    p.add_argument("--cpus", type=int, help="vCPUs (default: the OVF's)")
    p.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB (default:"
                   " the OVF's)")
    p.add_argument("--firmware", choices=("bios", "efi"),
                   help="default: the OVF's (efi when it says so, else bios)")
    p.add_argument("--bus", choices=("virtio", "scsi", "sata"),
                   help="every disk on this bus (default: mapped from the OVF's"
                   " controllers)")
    p.add_argument("--nic-model", metavar="MODEL",
                   help="every NIC's libvirt model (default: mapped from the OVF's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="json: the plan (and what was written) as JSON")
    p.add_argument("-p", action="store_true", help="show progress")
    p.add_argument("-q", action="store_true", help="quiet")
    add_force_share_arg(p)
    add_policy_args(p)
    p.add_argument("source", metavar="vm.ova", help="an .ova, or an .ovf with its files")
    p.add_argument("outdir", nargs="?", default=".", metavar="OUTDIR")
    p.set_defaults(func=cmd_import)
