"""Subcommands over backing chains: rebase, commit (qemu-img's spellings)."""

from __future__ import annotations

from .image import (add_cache_args, add_force_share_arg, add_policy_args, open_source,
                    policy_from, progress_for)


def cmd_rebase(args) -> int:
    from ..errors import UsageError
    from ..ops.rebase import rebase
    from ..registry import open_image
    from ..policy import beside
    if args.b is None:
        raise UsageError("give the new backing file with -b (-b \"\" removes it)")
    name = args.b or None
    if getattr(args, "image_opts", False):
        from .qemu_text import image_opts
        args.filename, opt_fmt, _, _ = image_opts(args.filename,
                                                  getattr(args, "object", ()))
        args.f = args.f or opt_fmt
    # -U shares the new backing file only, as qemu-img rebase -U: never the image.
    # -u never opens the old backing file (that is what -u is for: it was moved or
    # deleted), as qemu-img opens the image with BDRV_O_NO_BACKING then; untrusted
    # mode still opens and checks the chain it is given
    policy = policy_from(args, share=False)
    if args.u and not policy.is_untrusted:
        policy = policy.replace(open_backing=False)
    image = open_image(args.filename, args.f, writable=True, policy=policy)
    new = None
    try:
        fmt = args.F
        if name and not args.u:
            # the new name is relative to the image, as it will be stored
            full = beside(args.filename, name)
            new = open_image(full, args.F, policy=policy_from(args))
            fmt = fmt or new.format
        elif name and not fmt:
            raise UsageError("-u needs the backing format (-F)")
        with progress_for(args) as bar:
            rebase(image, new, name, fmt, unsafe=args.u, progress=bar)
    finally:
        if new is not None:
            new.close()
        image.close()
    return 0


def cmd_commit(args) -> int:
    from ..errors import UsageError
    from ..ops.commit import chain_depth, commit
    from ..registry import open_image
    # writable from the start, as qemu-img opens it: emptied afterwards, and re-linked
    # to the written base where the format records the base's identity (VHDX)
    top = open_source(args.filename, args.f, args, writable=True)
    try:
        if top.backing is None:
            raise UsageError("the image has no backing file to commit into", args.filename)
        if args.b:
            depth = chain_depth(top, args.b)
            below = top
            for _ in range(depth):
                below = below.backing
        else:
            depth, below = 1, top.backing
        base = open_image(below.path, below.format, writable=True,
                          policy=policy_from(args))
        try:
            with progress_for(args) as bar:
                commit(top, base, depth, progress=bar)
        finally:
            base.close()
        if depth == 1:
            top.relink_backing()
        if not (args.d or args.b):  # -b implies -d: the layers between would show through
            top.make_empty()
        top.flush()
    finally:
        top.close()
    if not args.q:
        print("Image committed.")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("rebase", help="change an image's backing file (copying what"
                       " differs unless -u)")
    p.add_argument("-f", metavar="FMT", help="image format")
    p.add_argument("-b", metavar="BACKING", help="new backing file (\"\" for none),"
                   " relative to the image")
    p.add_argument("-F", metavar="BACKING_FMT", help="format of the new backing file")
    p.add_argument("-u", action="store_true", help="unsafe: only change the name")
    p.add_argument("-p", action="store_true", help="show progress")
    p.add_argument("-q", action="store_true", help="quiet")
    add_cache_args(p)
    add_force_share_arg(p)
    add_policy_args(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_rebase)

    p = sub.add_parser("commit", help="write an overlay's changes into its backing file")
    p.add_argument("-f", metavar="FMT", help="image format")
    p.add_argument("-b", metavar="BASE", help="commit into BASE, deeper in the chain"
                   " (implies -d)")
    p.add_argument("-d", action="store_true", help="do not empty the image afterwards")
    p.add_argument("-p", action="store_true", help="show progress")
    p.add_argument("-q", action="store_true", help="quiet")
    add_cache_args(p, source=False)
    add_policy_args(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_commit)
