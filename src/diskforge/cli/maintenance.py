"""Subcommands that examine or change an image in place: check, resize, amend."""

from __future__ import annotations

from .image import add_disk_arg, add_force_share_arg, add_policy_args, open_source


def cmd_check(args) -> int:
    from ..errors import UnsupportedError
    from ..ops.check import EXIT_UNSUPPORTED, check_image
    writable = args.r is not None
    try:
        with open_source(args.filename, args.f, args, writable=writable) as dev:
            result = check_image(dev, args.r)
    except UnsupportedError as e:
        if "does not support checks" not in str(e):
            raise
        import sys
        print(f"diskforge: {e}", file=sys.stderr)
        return EXIT_UNSUPPORTED
    print(result.format_json() if args.output == "json" else result.format_human())
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
        if new < dev.size and not args.shrink:
            raise UsageError("Use the --shrink option to perform a shrink operation",
                             args.filename)
        dev.resize(new, shrink=args.shrink)
        if args.fix_gpt:
            from ..partitions import relocate_backup_gpt
            relocate_backup_gpt(dev)
        dev.flush()
    if not args.q:
        print("Image resized." + (" Backup GPT moved to the new end." if args.fix_gpt
                                  else ""))
    return 0


def cmd_amend(args) -> int:
    from ..errors import UsageError
    from ..options import merge_option_strings, split_option_string
    from .image import wants_option_help
    from ..registry import get
    spec = merge_option_strings(*args.o)
    if wants_option_help(args.o):
        with open_source(args.filename, args.f, args) as dev:
            fmt = get(dev.format)
        print(fmt.options.help_text(fmt.name), end="")
        return 0
    with open_source(args.filename, args.f, args, writable=True) as dev:
        fmt = get(dev.format)
        given = set(split_option_string(spec))
        if not given:
            raise UsageError("give the options to change with -o KEY=VALUE,...")
        options = fmt.options.parse(spec, format_name=fmt.name, validate=False)
        dev.amend(options, given)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("check", help="check an image's consistency (exit 0 clean,"
                       " 2 corrupt, 3 leaks, 1 error, 63 not supported)")
    p.add_argument("-f", metavar="FMT")
    p.add_argument("-r", choices=("leaks", "all"), help="repair leaks, or everything")
    p.add_argument("--output", choices=("human", "json"), default="human")
    add_disk_arg(p)
    add_force_share_arg(p)
    add_policy_args(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("resize", help="change an image's virtual size")
    p.add_argument("-f", metavar="FMT")
    p.add_argument("--shrink", action="store_true", help="allow making the image smaller")
    p.add_argument("--fix-gpt", action="store_true",
                   help="move the backup GPT to the new end of the disk (like sgdisk -e)")
    p.add_argument("-q", action="store_true")
    add_policy_args(p)
    p.add_argument("filename")
    p.add_argument("size", help="new size, or +SIZE / -SIZE")
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("amend", help="change format options of an image in place")
    p.add_argument("-f", metavar="FMT")
    p.add_argument("-o", action="append", default=[], metavar="OPTIONS",
                   help="options to change, key=value,... ('-o help' lists them)")
    p.add_argument("-q", action="store_true")
    add_policy_args(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_amend)
