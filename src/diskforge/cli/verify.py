"""verify: prove an image still holds what it should.

Two independent proofs, each used when available: the checksums the format carries
(like ``hdiutil verify``: a DMG's data-fork, blkx and master CRC-32s; a VHD's footer),
and the integrity record ``diskforge image`` wrote beside the image (the sha256 of the
whole virtual disk and of each 64 MiB chunk). Exit status: 0 everything matches, 2 a
mismatch (the image is corrupt), 1 an error (unreadable, or nothing to verify with), as
``qemu-img check`` separates corruption from errors.
"""

from __future__ import annotations

import os

from .image import (add_disk_arg, add_force_share_arg, add_policy_args, open_source,
                    progress_for)

EXIT_OK, EXIT_ERROR, EXIT_MISMATCH = 0, 1, 2


def cmd_verify(args) -> int:
    import json

    from ..errors import UnsupportedError
    from ..ops.imaging import find_record, record_path, verify_record
    problems: list[str] = []
    checked: list[str] = []
    notes: list[str] = []
    rec_file = args.record or record_path(args.filename)
    if args.record:  # named: it must be there, before the image is read
        record = find_record(args.record, required=True)
    with open_source(args.filename, args.f, args) as dev:
        fmt = dev.format
        try:
            problems += dev.verify()
            checked.append(f"{fmt} checksums")
        except UnsupportedError:
            pass
        # what the format saw but could not check (an OVA's certificate)
        notes = list(getattr(dev, "verify_notes", ()))
        if not args.record:   # beside the image (a URL's: under the same prefix)
            record = find_record(rec_file)
        if record is not None:
            with progress_for(args) as bar:
                problems += verify_record(dev, record, progress=bar).problems
            checked.append(f"integrity record {_base_name(rec_file)}")
    if not checked:
        raise UnsupportedError(f"nothing to verify: {fmt} images carry no checksums and"
                               f" there is no integrity record ({rec_file})", args.filename)
    if args.output == "json":
        print(json.dumps({"filename": args.filename, "format": fmt, "checked": checked,
                          "verified": not problems, "problems": problems,
                          "notes": notes}, indent=4))
        notes = []
    elif problems:
        from ..errors import printable
        for p in problems:   # they quote blkx names from inside the image
            print(f"{args.filename}: {printable(p)}")
        print(f"{args.filename}: {len(problems)} problem{'s' if len(problems) > 1 else ''}"
              f" ({', '.join(checked)}): the image is corrupt")
    elif not args.q:
        print(f"{args.filename}: verify passed ({', '.join(checked)})")
    if notes and not args.q:
        from ..errors import printable
        for n in notes:
            print(f"{args.filename}: note: {printable(n)}")
    return EXIT_MISMATCH if problems else EXIT_OK


def _base_name(name: str) -> str:
    """A record's last name (a URL's last path segment)."""
    if "://" in name:
        from urllib.parse import urlsplit
        name = urlsplit(name).path
    return os.path.basename(name)


def add_parsers(sub) -> None:
    p = sub.add_parser("verify", help="check an image against its own checksums and its"
                       " integrity record (exit 0 good, 2 mismatch, 1 error)")
    p.add_argument("-f", metavar="FMT", help="image format (default: probe)")
    p.add_argument("--record", metavar="FILE",
                   help="integrity record, a file or a URL (default: IMAGE.integrity.json"
                   " when present, beside a remote image too)")
    p.add_argument("-p", action="store_true", help="show progress")
    p.add_argument("-q", action="store_true", help="quiet: only the exit status")
    p.add_argument("--output", choices=("human", "json"), default="human")
    add_disk_arg(p)
    add_force_share_arg(p)
    add_policy_args(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_verify)
