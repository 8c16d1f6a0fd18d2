"""Subcommands for backing up and restoring disks: image, restore (verify is in
verify.py)."""

from __future__ import annotations

import os
import sys

from .. import parallel
from .image import (add_force_share_arg, add_policy_args, open_backing, open_source,
                    progress_for)

DEFAULT_IMAGE_FORMAT = "qcow2"


def cmd_image(args) -> int:
    from ..atomic import refuse_overwrite
    from ..errors import UnsupportedError, UsageError
    from ..ops.imaging import badmap_path, discard_resume, image, load_resume, resume_path
    from ..options import merge_option_strings
    from ..registry import by_extension, get
    state = None
    if args.resume:
        state = load_resume(args.output)
        fmt = get(state["format"])
        if (args.O and get(args.O) is not fmt) or (args.o and merge_option_strings(
                *args.o) != state["options"]):
            raise UsageError("--resume continues with the interrupted run's format and"
                             " options; leave -O and -o out", args.output)
        option_text = state["options"]
        base_name = state["base"]
        if args.base and os.path.abspath(args.base) != os.path.abspath(base_name or ""):
            raise UsageError("--resume continues with the interrupted run's base",
                             args.output)
    else:
        fmt = get(args.O) if args.O else (by_extension(args.output)
                                          or get(DEFAULT_IMAGE_FORMAT))
        option_text = merge_option_strings(*args.o)
        base_name = os.path.abspath(args.base) if args.base else None
        if os.path.exists(resume_path(args.output)):
            discard_resume(args.output)  # a fresh run replaces an interrupted one
    options = fmt.options.parse(option_text, format_name=fmt.name)
    if not args.no_compress:
        try:
            options = fmt.compressed(options)
        except UnsupportedError:
            pass  # formats without compression image uncompressed
    src = open_source(args.source, args.f, args)
    base = None
    try:
        backing = None
        if base_name:
            # the user names BASE from here; the image records it relative to itself
            rel = os.path.relpath(base_name, os.path.dirname(os.path.abspath(args.output)))
            base, backing = open_backing(rel, args.F, args.output, args)
        refuse_overwrite(args.output, src.files(), "the source")
        if base is not None:
            refuse_overwrite(args.output, base.files(), "the base image")
        if state is not None:
            writer = fmt.resume_writer(args.output, src.size, options, backing=backing,
                                       state=state["writer"])
        else:
            from ..ops.measure import require_room
            require_room(args.output, fmt, options, source=src, base=base)
            writer = fmt.writer(args.output, src.size, options, backing=backing)
        with progress_for(args) as bar, parallel.limit(args.m or None):
            try:
                result = image(src, writer, args.output, fmt_name=fmt.name,
                               options=option_text, base=base, progress=bar,
                               workers=args.m, retries=args.retries,
                               source_name=args.source, resume=state)
            except KeyboardInterrupt:
                if os.path.exists(resume_path(args.output)):
                    print(f"diskforge: interrupted; continue with: diskforge image"
                          f" --resume {args.source} {args.output}", file=sys.stderr)
                    return 130
                raise
    finally:
        src.close()
        if base is not None:
            base.close()
    if not args.q:
        s = result.stats
        kind = "differential image" if base_name else "image"
        resumed = f" (resumed at {result.resumed_from})" if result.resumed_from else ""
        print(f"{kind} {args.output}{resumed}: {s.virtual_size} bytes, {s.bytes_written}"
              f" written, {s.bytes_zero} zero, {s.bytes_skipped} unchanged;"
              f" sha256 {result.sha256}")
        print(f"integrity record: {result.record_path}")
    if result.bad_ranges:
        total = sum(n for _, n in result.bad_ranges)
        print(f"diskforge: {args.source}: {len(result.bad_ranges)} unreadable ranges"
              f" ({total} bytes) read as zeros; map in {badmap_path(args.output)}",
              file=sys.stderr)
        if not args.allow_bad_sectors:
            return 1
    return 0


def cmd_restore(args) -> int:
    from ..ops.restore import restore
    with open_source(args.image, args.f, args) as img:
        with progress_for(args) as bar, parallel.limit(args.m or None):
            result = restore(img, args.target, force=args.force, verify=not args.no_verify,
                             progress=bar, workers=args.m)
    if not args.q:
        state = "verified by read-back" if result.verified else "not verified"
        print(f"restored {args.image} to {args.target}: sha256 {result.sha256} ({state})")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("image", help="image a disk or image (full, or differential with"
                       " --base), with an integrity record")
    p.add_argument("-f", metavar="FMT", help="source format (a device reads as raw)")
    p.add_argument("-O", metavar="FMT", help="output format (default: from the extension,"
                   f" else {DEFAULT_IMAGE_FORMAT})")
    p.add_argument("-o", action="append", default=[], metavar="OPTIONS")
    p.add_argument("--base", metavar="BASE", help="differential: store only what differs"
                   " from BASE, in an overlay backed by it")
    p.add_argument("-F", metavar="BASE_FMT", help="format of BASE")
    p.add_argument("--no-compress", action="store_true",
                   help="do not compress (compression is on where the format has it)")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="retries of a failed read before a sector counts as bad")
    p.add_argument("--allow-bad-sectors", action="store_true",
                   help="exit 0 even when some sectors could not be read")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last checkpoint")
    p.add_argument("-m", type=int, metavar="N",
                   help="threads compressing, decoding the source and hashing")
    p.add_argument("-p", action="store_true")
    p.add_argument("-q", action="store_true")
    add_force_share_arg(p)
    add_policy_args(p)
    p.add_argument("source")
    p.add_argument("output")
    p.set_defaults(func=cmd_image)

    p = sub.add_parser("restore", help="write an image (its whole chain) to a device or"
                       " file, then verify it by reading back")
    p.add_argument("-f", metavar="FMT")
    p.add_argument("--force", action="store_true",
                   help="overwrite even a mounted or busy device")
    p.add_argument("--no-verify", action="store_true", help="skip the read-back check")
    p.add_argument("-m", type=int, metavar="N",
                   help="threads decoding the image and hashing the read-back")
    p.add_argument("-p", action="store_true")
    p.add_argument("-q", action="store_true")
    add_force_share_arg(p)
    add_policy_args(p)
    p.add_argument("image")
    p.add_argument("target")
    p.set_defaults(func=cmd_restore)
