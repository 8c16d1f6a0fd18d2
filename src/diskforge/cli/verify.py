"""verify: check an image against the checksums it carries (like ``hdiutil verify``).

A thin command over ``BlockDevice.verify()``: each format knows its own checksums (a
DMG's data-fork, blkx and master CRC-32s). Exit status: 0 every checksum matches,
2 a mismatch (the image is corrupt), 1 an error (unreadable, or a format without
checksums), as ``qemu-img check`` separates corruption from errors.
"""

from __future__ import annotations

from .image import add_policy_args, open_source

EXIT_OK, EXIT_ERROR, EXIT_MISMATCH = 0, 1, 2


def cmd_verify(args) -> int:
    import json
    with open_source(args.filename, args.f, args) as dev:
        problems = dev.verify()
        fmt = dev.format
    if args.output == "json":
        print(json.dumps({"filename": args.filename, "format": fmt,
                          "verified": not problems, "problems": problems}, indent=4))
    elif problems:
        for p in problems:
            print(f"{args.filename}: {p}")
        print(f"{args.filename}: {len(problems)} checksum problem"
              f"{'s' if len(problems) > 1 else ''}: the image is corrupt")
    elif not args.q:
        print(f"{args.filename}: every checksum matches")
    return EXIT_MISMATCH if problems else EXIT_OK


def add_parsers(sub) -> None:
    p = sub.add_parser("verify", help="check an image against its own checksums (exit 0"
                       " good, 2 mismatch, 1 error)")
    p.add_argument("-f", metavar="FMT", help="image format (default: probe)")
    p.add_argument("-q", action="store_true", help="quiet: only the exit status")
    p.add_argument("--output", choices=("human", "json"), default="human")
    add_policy_args(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_verify)
