"""``diskforge bitmap``: qemu-img bitmap's command line — actions (``--add``,
``--remove``, ``--clear``, ``--enable``, ``--disable``, ``--merge SOURCE``) run in the
order given on one bitmap of one image; ``-g`` for ``--add``, ``-b FILE [-F FMT]``
for ``--merge`` from another image."""

from __future__ import annotations

import argparse

from .image import add_policy_args, open_source


class _Action(argparse.Action):
    """Collects the actions in command-line order (several in one invocation)."""

    def __call__(self, parser, namespace, values, option_string=None):
        actions = list(getattr(namespace, "actions", None) or [])
        actions.append((self.const, values))
        namespace.actions = actions


def cmd_bitmap(args) -> int:
    from ..dirty_bitmaps import parse_granularity
    from ..errors import UsageError
    from ..ops.bitmap import edit_bitmaps
    actions = args.actions or []
    if not actions:
        raise UsageError("Need at least one of --add, --remove, --clear, --enable,"
                         " --disable, or --merge")
    if args.g is not None and not any(op == "add" for op, _ in actions):
        raise UsageError("granularity only supported with --add")
    if args.F and not args.b:
        raise UsageError("-F only supported with -b")
    if args.b and not any(op == "merge" for op, _ in actions):
        raise UsageError("Merge bitmap source file only supported with --merge")
    if args.filename is None or args.bitmap is None:
        raise UsageError("Expecting filename and bitmap name")
    granularity = parse_granularity(args.g)
    # neither the image nor the merge source opens its backing chain, as qemu-img
    # opens them (BDRV_O_NO_BACKING): bitmaps are metadata of the one file, and an
    # overlay whose backing file is missing keeps working
    with open_source(args.filename, args.f, args, writable=True, backing=False) as dev:
        if args.b:  # a file name (qemu-img takes no option string there)
            from argparse import Namespace
            plain = Namespace(**{**vars(args), "image_opts": False})
            with open_source(args.b, args.F, plain, backing=False) as src:
                edit_bitmaps(dev, args.bitmap, actions, granularity=granularity,
                             source=src)
        else:
            edit_bitmaps(dev, args.bitmap, actions, granularity=granularity)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("bitmap", help="add, remove, clear, enable, disable or merge an"
                       " image's persistent dirty bitmaps (qcow2), as qemu-img bitmap")
    for op, text in (("add", "create the bitmap (enabled; -g sets its granularity)"),
                     ("remove", "delete the bitmap"),
                     ("clear", "mark everything clean"),
                     ("enable", "record writes from now on"),
                     ("disable", "stop recording writes")):
        p.add_argument(f"--{op}", action=_Action, nargs=0, const=op, dest="actions",
                       help=text)
    p.add_argument("--merge", action=_Action, const="merge", dest="actions",
                   metavar="SOURCE", help="add what bitmap SOURCE (of this image, or of"
                   " -b FILE) marks dirty")
    p.add_argument("-g", "--granularity", dest="g", metavar="GRANULARITY",
                   help="bytes per bit of a new bitmap (a power of two, 512 to 2G;"
                   " default: the cluster size, within 4k-64k)")
    p.add_argument("-b", "--source-file", dest="b", metavar="SOURCE_FILE",
                   help="the image --merge takes its source bitmap from")
    p.add_argument("-F", "--source-format", dest="F", metavar="SOURCE_FMT",
                   help="format of SOURCE_FILE")
    p.add_argument("-f", metavar="FMT", help="image format")
    add_policy_args(p)
    p.add_argument("filename", nargs="?")
    p.add_argument("bitmap", nargs="?")
    p.set_defaults(func=cmd_bitmap, actions=None)
