"""``diskforge bench``: qemu-img's ``bench``, a simple I/O benchmark of an image.

The same flags and the same two lines of output as qemu-img 7.2 (``Sending N read
requests, S bytes each, D in parallel (starting at offset O, step size X)``, then ``Run
completed in T seconds.``): ``-c`` requests of ``-s`` bytes from offset ``-o``, each
``-S`` bytes after the last (wrapping at the end of the image), reads or with ``-w``
writes of ``--pattern``, a flush every ``--flush-interval`` requests. Through the
format's own reader and writer, so the figure measures diskforge's path: reads come
from ``-d`` threads (at most 16; the kernel copies outside the GIL), writes one at a
time (a format's writes allocate, and are not made concurrent), so for writes ``-d``
is only printed.
"""

from __future__ import annotations

from .image import add_cache_args, add_force_share_arg, add_policy_args, open_source


def cmd_bench(args) -> int:
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ..errors import UsageError
    from ..options import parse_size
    count, depth = args.c, args.d
    size = parse_size(args.s, "buffer size")
    step = parse_size(args.S, "step size") if args.S is not None else size
    offset = parse_size(args.o, "offset") if args.o is not None else 0
    if count < 1 or depth < 1 or size < 1:
        raise UsageError("-c, -d and -s must be at least 1")
    if args.flush_interval is not None and args.flush_interval < depth:
        raise UsageError("Flush interval can't be smaller than depth")
    if args.flush_interval is not None and not args.w:
        raise UsageError("--flush-interval is only available in write tests")
    args.src_cache = getattr(args, "cache", None)  # -t is the image's mode, read or written
    with open_source(args.filename, args.f, args, writable=args.w) as dev:
        if offset + size > dev.size:
            raise UsageError("offset + buffer size is past the end of the image",
                             args.filename)
        print(f"Sending {count} {'write' if args.w else 'read'} requests, {size} bytes"
              f" each, {depth} in parallel (starting at offset {offset}, step size {step})")
        if args.flush_interval:
            print(f"Sending flush every {args.flush_interval} requests")
        offsets, pos = [], offset
        for _ in range(count):  # as qemu-img: wrap to 0 when a request would pass the end
            if pos + size > dev.size:
                pos = 0
            offsets.append(pos)
            pos += step
        data = bytes([args.pattern]) * size if args.w else None

        def one(i: int) -> None:
            if data is not None:
                dev.write(offsets[i], data)
                if args.flush_interval and (i + 1) % args.flush_interval == 0:
                    dev.flush()
            else:
                dev.read(offsets[i], size)
        start = time.monotonic()
        if depth == 1 or data is not None:
            for i in range(count):
                one(i)
        else:
            with ThreadPoolExecutor(min(depth, 16)) as pool:
                for _ in pool.map(one, range(count)):
                    pass
        if data is not None and not args.no_drain:
            dev.flush()
        elapsed = time.monotonic() - start
    print(f"Run completed in {elapsed:.3f} seconds.")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="time reads or writes of an image, as qemu-img bench")
    p.add_argument("-c", type=int, default=75000, metavar="COUNT", help="requests")
    p.add_argument("-d", type=int, default=64, metavar="DEPTH",
                   help="requests in flight (threads, at most 16)")
    p.add_argument("-f", metavar="FMT", help="image format (default: probe)")
    p.add_argument("-s", default="4096", metavar="SIZE", help="bytes a request")
    p.add_argument("-S", metavar="STEP", help="bytes between requests (default -s)")
    p.add_argument("-o", metavar="OFFSET", help="offset of the first request")
    p.add_argument("-w", action="store_true", help="write instead of read")
    p.add_argument("--pattern", type=int, default=0, choices=range(256), metavar="BYTE",
                   help="the byte written (-w)")
    p.add_argument("--flush-interval", type=int, metavar="N",
                   help="flush after every N requests (-w; at least -d)")
    p.add_argument("--no-drain", action="store_true",
                   help="no final flush (qemu-img: do not drain before flushing)")
    p.add_argument("-n", action="store_true", help="accepted: native AIO (qemu-img)")
    p.add_argument("-i", metavar="AIO", help="accepted: AIO mode (qemu-img)")
    p.add_argument("-q", action="store_true",
                   help="accepted: qemu-img prints its two lines even with -q")
    add_cache_args(p, source=False)
    add_force_share_arg(p)
    add_policy_args(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_bench)
