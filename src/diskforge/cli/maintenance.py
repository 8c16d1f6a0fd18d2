"""Subcommands that examine or change an image in place: check, resize, amend."""

from __future__ import annotations

from .image import add_disk_arg, add_force_share_arg, add_policy_args, open_source


# Formats qemu-img 7.2 can check (a driver with bdrv_co_check); for the others it
# answers "This image format does not support checks" with exit 63, and so does
# diskforge unless asked for its own checks (--format-checks, --partitions).
QEMU_CHECKS = frozenset({"qcow2", "qed", "vdi", "vhdx", "vmdk", "parallels"})


def cmd_check(args) -> int:
    import sys

    from ..checks import Repair
    from ..errors import UnsupportedError
    from ..ops.check import EXIT_UNSUPPORTED, check_image
    writable = args.r is not None
    try:
        with open_source(args.filename, args.f, args, writable=writable) as dev:
            own = dev.format in QEMU_CHECKS or args.format_checks
            if not own and not args.partitions:
                raise UnsupportedError("This image format does not support checks",
                                       args.filename)
            result = check_image(dev, args.r if own else Repair.NONE,
                                 format_checks=own, partitions=args.partitions)
    except UnsupportedError as e:
        if "does not support checks" not in str(e):
            raise
        print(f"diskforge: {e}", file=sys.stderr)
        return EXIT_UNSUPPORTED
    for line in result.problem_lines():  # as qemu-img: findings on stderr
        print(line, file=sys.stderr)
    if not args.q:
        print(result.format_json() if args.output == "json" else result.format_summary())
    return result.exit_status


def cmd_resize(args) -> int:
    from ..errors import UsageError
    from ..options import parse_size
    text = args.size
    with open_source(args.filename, args.f, args, writable=True) as dev:
        if text[:1] in "+-":
            delta = parse_size(text[1:], "size")
            new = dev.size + delta if text[0] == "+" else dev.size - delta
        else:
            new = parse_size(text, "size")
        if new < 0:
            raise UsageError("the new size would be negative", args.filename)
        if new % 512 and dev.format != "raw":
            raise UsageError("The new size must be a multiple of 512", args.filename)
        if new < dev.size and not (args.shrink or args.safe_shrink):
            raise UsageError("Use the --shrink option to perform a shrink operation",
                             args.filename)
        if new < dev.size and args.safe_shrink:
            _refuse_cutting_data(dev, new)
        old = dev.size
        prealloc = args.preallocation or "off"
        if prealloc != "off" and new < old:
            raise UsageError("Preallocation can only be used for growing images",
                             args.filename)
        if prealloc != "off" and new > old:
            dev.preallocate(old, 0, prealloc)  # refuses before the size changes
        dev.resize(new, shrink=args.shrink or args.safe_shrink)
        if new > old and prealloc != "off":
            dev.preallocate(old, new - old, prealloc)
        if args.fix_gpt:
            from ..partitions import relocate_backup_gpt
            relocate_backup_gpt(dev)
        dev.flush()
    if not args.q:
        print("Image resized." + (" Backup GPT moved to the new end." if args.fix_gpt
                                  else ""))
    return 0


def _refuse_cutting_data(dev, new: int) -> None:
    """``--safe-shrink``: shrink only when nothing allocated lies past the new end
    (``--shrink`` discards it, as qemu-img does)."""
    from ..blockdev import ExtentKind
    from ..errors import UsageError
    for e in dev.extents(new, dev.size - new):
        if e.kind is ExtentKind.DATA:
            raise UsageError(f"shrinking to {new} bytes would cut allocated data at offset"
                             f" {e.offset} (+{e.length}); --safe-shrink cuts nothing"
                             " allocated (--shrink discards it)", dev.path)


def cmd_amend(args) -> int:
    from ..errors import UsageError
    from ..options import merge_option_strings, parse_size, split_option_string
    from ..registry import get
    from .image import progress_for, wants_option_help
    from .qemu_text import option_help, pop_size
    if wants_option_help(args.o):
        if args.filename is None and not args.f:
            raise UsageError("Expecting one image file name")
        if args.filename is None:
            fmt = get(args.f)
        else:
            with open_source(args.filename, args.f, args) as dev:
                fmt = get(dev.format)
        print(option_help(fmt, amend=True), end="")
        return 0
    if args.filename is None:
        raise UsageError("Expecting one image file name")
    size_text, args.o = pop_size(args.o)
    spec = merge_option_strings(*args.o)
    with open_source(args.filename, args.f, args, writable=True) as dev:
        fmt = get(dev.format)
        given = set(split_option_string(spec))
        if not given and size_text is None:
            raise UsageError("give the options to change with -o KEY=VALUE,...")
        with progress_for(args) as bar:
            if given:
                options = fmt.options.parse(spec, format_name=fmt.name, validate=False)
                dev.amend(options, given)
            if size_text is not None:  # qemu-img amend -o size=: a resize
                new = parse_size(size_text, "size")
                if new % 512:
                    raise UsageError("The new size must be a multiple of 512",
                                     args.filename)
                dev.resize(new, shrink=args.force)
            bar(1, 1)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("check", help="check an image's consistency (exit 0 clean,"
                       " 2 corrupt, 3 leaks, 1 error, 63 not supported)")
    p.add_argument("-f", metavar="FMT")
    p.add_argument("-r", choices=("leaks", "all"), help="repair leaks, or everything")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("-q", action="store_true", help="quiet: only the exit status")
    p.add_argument("--partitions", action="store_true",
                   help="also check the partition table (GPT copies, overlaps, loops)")
    p.add_argument("--format-checks", action="store_true",
                   help="run diskforge's own check for formats qemu-img cannot check"
                   " (VHD footers and BAT, DMG checksums) instead of exit 63")
    from .image import add_cache_args
    add_cache_args(p, target=False)
    add_disk_arg(p)
    add_force_share_arg(p)
    add_policy_args(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("resize", help="change an image's virtual size")
    p.add_argument("-f", metavar="FMT")
    p.add_argument("--shrink", action="store_true", help="allow making the image smaller"
                   " (what lies past the new end is discarded, as qemu-img)")
    p.add_argument("--safe-shrink", action="store_true",
                   help="shrink only if nothing allocated lies past the new end")
    p.add_argument("--fix-gpt", action="store_true",
                   help="move the backup GPT to the new end of the disk (like sgdisk -e)")
    p.add_argument("--preallocation", choices=("off", "metadata", "falloc", "full"),
                   help="allocate the grown part (raw: falloc or full)")
    p.add_argument("-q", action="store_true")
    add_policy_args(p)
    p.add_argument("filename")
    p.add_argument("size", help="new size, or +SIZE / -SIZE")
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("amend", help="change format options of an image in place")
    p.add_argument("-f", metavar="FMT")
    p.add_argument("-o", action="append", default=[], metavar="OPTIONS",
                   help="options to change, key=value,... ('-o help' lists them;"
                   " size= resizes)")
    p.add_argument("-p", action="store_true", help="print progress (qemu-img's lines)")
    p.add_argument("-q", action="store_true")
    p.add_argument("--force", action="store_true",
                   help="allow what qemu-img allows only with --force (a shrinking"
                   " size=)")
    add_policy_args(p)
    p.add_argument("filename", nargs="?")
    p.set_defaults(func=cmd_amend)
