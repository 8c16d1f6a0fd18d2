"""``diskforge dd``: qemu-img's ``dd`` (``bs= count= skip= if= of=``, ``-f``/``-O``).

As qemu-img: a new image ``of`` in format ``-O`` (default raw) holding the input's
virtual disk from block ``skip`` (of ``bs`` bytes) up to block ``count`` — qemu-img
counts ``count`` from the start of the input, skipped blocks included, and so does
diskforge — its size rounded up to whole 512-byte sectors; nothing is printed. A
``skip`` past the end of the input gives an empty image and qemu-img's "cannot skip to
specified offset" on stderr, with exit status 0 as qemu-img 7.2 has it. The copy
goes through the convert pipeline, so holes stay holes and any readable format is an
input. Unlike qemu-img, a failed run leaves no output behind.
"""

from __future__ import annotations

from .image import (add_force_share_arg, add_policy_args, export_writer, is_export,
                    open_source)

_KEYS = ("bs", "count", "skip", "if", "of")


def _operands(words: list[str]) -> dict[str, str]:
    from ..errors import UsageError
    out = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not eq or key not in _KEYS:
            raise UsageError(f"unrecognized operand {word}")
        if key in out:
            raise UsageError(f"{key} given twice")
        out[key] = value
    return out


def cmd_dd(args) -> int:
    from ..atomic import refuse_overwrite
    from ..errors import UsageError
    from ..ops.convert import convert
    from ..ops.window import WindowDevice
    from ..options import parse_size
    from ..registry import get
    ops = _operands(args.operands)
    if "if" not in ops or "of" not in ops:
        raise UsageError("Must specify both input and output files")
    bs = parse_size(ops.get("bs", "512"), "bs")
    if not 1 <= bs <= 2**31 - 1:
        raise UsageError("Invalid bs specified. Must be between 1 and 2147483647.")
    count = parse_size(ops["count"], "count") if "count" in ops else None
    skip = parse_size(ops.get("skip", "0"), "skip")
    fmt = get(args.O or "raw")
    src = open_source(ops["if"], args.f, args)
    try:
        start = skip * bs
        end = src.size if count is None else min(src.size, count * bs)
        size = max(0, end - start)
        if start > src.size:
            import sys

            from ..errors import printable
            print(f"diskforge: {printable(ops['if'])}: cannot skip to specified offset",
                  file=sys.stderr)
        refuse_overwrite(ops["of"], src.files(), "the input")
        window = WindowDevice(src, start, -(-size // 512) * 512, data=size)
        if is_export(ops["of"]):  # written in place, as qemu-img dd does
            writer = export_writer(ops["of"], fmt.name, window.size, args)
        else:
            writer = fmt.writer(ops["of"], window.size, fmt.options.parse(""))
        convert(window, writer)
    finally:
        src.close()
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("dd", help="copy part of an image into a new one, as qemu-img dd"
                       " (bs= count= skip= if= of=)")
    p.add_argument("-f", metavar="FMT", help="input format (default: probe)")
    p.add_argument("-O", metavar="FMT", help="output format (default raw)")
    add_force_share_arg(p)
    add_policy_args(p)
    p.add_argument("operands", nargs="*", metavar="KEY=VALUE",
                   help="bs=BYTES (512), count=BLOCKS, skip=BLOCKS, if=INPUT, of=OUTPUT")
    p.set_defaults(func=cmd_dd)
