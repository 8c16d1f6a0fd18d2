"""Subcommands over whole images: info, create, convert, compare, map, measure.

Spellings follow qemu-img (``-f``, ``-O``, ``-o``, ``-B``, ``-F``, ``-c``, ``-n``, ``-p``,
``-q``, ``-m``, ``--output json``) so a qemu-img user's fingers already know them.
"""

from __future__ import annotations

import argparse


def add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                   help="in untrusted mode (and for an OVF's files), also open files an"
                   " image names (backing files, extents) under DIR; by default they"
                   " are followed anywhere, as qemu-img follows them")


def add_force_share_arg(p: argparse.ArgumentParser) -> None:
    """qemu-img's ``-U``: read images other processes hold (see locks.py)."""
    p.add_argument("-U", "--force-share", action="store_true",
                   help="read the image even while another process (a VM, qemu-nbd,"
                   " diskforge serve) writes it; refused with a write")


def add_snapshot_arg(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--snapshot", "-l", metavar="SNAPSHOT", help=text
                   + " (also qemu-img's snapshot.name=NAME / snapshot.id=ID)")


def add_cache_args(p: argparse.ArgumentParser, *, target: bool = True,
                   source: bool = True) -> None:
    """qemu-img's ``-t CACHE`` (the image written) and ``-T SRC_CACHE`` (images read)."""
    if target:
        p.add_argument("-t", metavar="CACHE", dest="cache",
                       help="cache mode of the image written: none/directsync (O_DIRECT"
                       " and flushed at the end), writeback/writethrough (flushed at"
                       " the end), unsafe (no final flush, the default)")
    if source:
        p.add_argument("-T", metavar="SRC_CACHE", dest="src_cache",
                       help="cache mode of the images read: none or directsync read with"
                       " O_DIRECT")


def apply_cache_modes(args) -> None:
    """Validate ``-t``/``-T`` and honour them as qemu-img 7.2 does (counted with strace:
    its ``convert -t writeback`` makes one fdatasync of the target at the end, ``-t
    unsafe`` and the default none): every mode but ``unsafe`` flushes the output to
    disk before it is renamed into place (qemu's flush on close; ``unsafe`` ignores
    flushes). ``none`` and ``directsync`` also write the output with O_DIRECT
    (``atomic.set_direct``, and ``open_source`` for images written in place), and on
    the source read with O_DIRECT (``open_source``). No ``-t`` is convert's default,
    ``unsafe``."""
    from .qemu_text import cache_mode
    args.cache = cache_mode(getattr(args, "cache", None), "target")
    args.src_cache = cache_mode(getattr(args, "src_cache", None), "source")
    args.flush_output = args.cache in ("none", "writethrough", "directsync", "writeback")


def policy_from(args, *, share: bool = True):
    """The open policy the command line asks for: untrusted mode's when ``--untrusted``
    or ``DISKFORGE_UNTRUSTED`` asked for it (main sets ``args.untrusted``);
    ``share=False`` for the files a command writes, to which ``-U`` does not apply
    (``convert -n``'s target)."""
    from ..policy import OpenPolicy
    roots = tuple(getattr(args, "allow_root", ()))
    policy = OpenPolicy.untrusted(roots) if getattr(args, "untrusted", False) \
        else OpenPolicy.default(roots)
    return policy.replace(force_share=share and getattr(args, "force_share", False))


def add_disk_arg(p: argparse.ArgumentParser, flag: str = "--disk",
                 which: str = "") -> None:
    """``--disk N``: the N-th disk (1-based) of a source that holds several (an OVA or
    OVF); ``vm.ova:NAME`` picks one by its file name or disk id instead."""
    p.add_argument(flag, type=int, metavar="N",
                   help=f"read disk N (1-based) of {which or 'the'} OVA/OVF source"
                   " (default: the first; or name one as FILE.ova:NAME)")


_ARGS = object()


def open_source(path: str, fmt: str | None, args, *, writable: bool = False,
                snapshot: str | None = None, disk: "int | None | object" = _ARGS,
                backing: bool = True, data: bool = True):
    """Open a source image as the command line asks (policy, ``-U``, ``--disk``: by
    default ``args.disk`` when the command has one). ``backing=False`` names backing
    files without opening them (``OpenPolicy.open_backing``); ``data=False`` says no
    guest data will be read, so an encrypted image opens without its key
    (``OpenPolicy.open_data``)."""
    from ..registry import open_image
    from .qemu_text import image_opts, snapshot_spec
    if disk is _ARGS:
        disk = getattr(args, "disk", None)
    policy = policy_from(args)
    if not backing and not policy.is_untrusted:  # untrusted: the chain is always checked
        policy = policy.replace(open_backing=False)
    if not data:
        policy = policy.replace(open_data=False)
    key_id = None
    if getattr(args, "image_opts", False):  # an option string names the image
        path, opt_fmt, share, key_id = image_opts(path, getattr(args, "object", ()))
        fmt = fmt or opt_fmt
        if share and not writable:
            policy = policy.replace(force_share=True)
    key = None
    if getattr(args, "object", None) or key_id is not None:  # (secrets: only then)
        from .secrets import key_for
        key = key_for(args, key_id)
    dev = open_image(path, fmt, writable=writable, policy=policy,
                     snapshot=snapshot_spec(snapshot), member=disk, key=key)
    direct = getattr(args, "cache" if writable else "src_cache", None)
    if direct in ("none", "directsync"):
        try:
            use_direct_io(dev)
        except BaseException:
            dev.close()
            raise
    return dev


def use_direct_io(dev) -> int:
    """``-T none`` (or ``-t none`` for an image written in place): every file of the
    image and its backing chain read (and, open writable, written) with O_DIRECT; how
    many files do. A file system that refuses O_DIRECT fails, as in qemu-img."""
    count = 0
    while dev is not None:
        backend = getattr(dev, "backend", None)
        if backend is not None and hasattr(backend, "use_direct_io"):
            count += backend.use_direct_io()
        dev = dev.backing
    return count


def wants_option_help(spec: list[str]) -> bool:
    from ..options import split_option_string
    for s in spec:
        if s.strip() in ("help", "?"):
            return True
        try:
            if "help" in split_option_string(s):
                return True
        except Exception:
            return False
    return False


def parse_options(fmt, spec: list[str]):
    from ..options import merge_option_strings
    return fmt.options.parse(merge_option_strings(*spec), format_name=fmt.name)


def options_or_help(fmt, spec: list[str]):
    """The ``-o`` options parsed for ``fmt``, or None once the format's option help
    is printed (``-o help``/``-o ?``, in qemu-img's layout): the caller then exits 0."""
    if wants_option_help(spec):
        from .qemu_text import option_help
        print(option_help(fmt), end="")
        return None
    return parse_options(fmt, spec)


def progress_for(args, label: str = ""):
    """Progress as ``-p``/``-q`` ask for it (see progress.py: qemu-img's lines on stdout
    with ``-p``, nothing without); a context manager (``with progress_for(args) as
    bar:``) that ends its line however the work ends."""
    from .progress import ProgressBar
    return ProgressBar(label, force=getattr(args, "p", False), quiet=getattr(args, "q", False))


def backing_from_options(name: str | None, fmt: str | None, options):
    """qemu-img accepts ``-o backing_file=X,backing_fmt=Y`` for ``-b X -F Y``: move
    them over, so size defaults and copy-on-write work the same either way."""
    opt_name = getattr(options, "backing_file", "") or None
    opt_fmt = getattr(options, "backing_fmt", "") or None
    if opt_name is None and opt_fmt is None:
        return name, fmt, options
    if name is not None and opt_name is not None and name != opt_name:
        from ..errors import UsageError
        raise UsageError("two different backing files given (-b/-B and -o backing_file)")
    return name or opt_name, fmt or opt_fmt, options.replace(backing_file="",
                                                            backing_fmt="")


def open_backing(name: str, fmt: str | None, target: str, args, *, share: bool = False):
    """Open ``-B``/``-b NAME`` as qemu-img does: a relative name is relative to the new
    image's directory. The user named it, so the root policy does not apply to it.
    ``share``: only its size and format are needed, so it is opened as ``-U`` would
    (``create -b``: qemu-img locks nothing there, and an overlay of a running VM's
    disk is made that way)."""

    from ..blockdev import Backing
    from ..policy import beside
    from ..registry import open_image
    path = beside(target, name)
    policy = policy_from(args)
    dev = open_image(path, fmt, policy=policy.replace(force_share=True) if share
                     else policy)
    return dev, Backing(name=name, format=dev.format, device=dev)


# -- info ---------------------------------------------------------------------------------

def cmd_info(args) -> int:
    from ..ops.info import format_human, format_json, image_info
    # as qemu-img: without --backing-chain the backing file is named, not opened (so
    # an overlay whose backing file moved still shows it); --details reads the
    # partition table of the whole disk, which needs the chain; untrusted mode opens
    # it anyway, so an upload's chain is refused by every command, info too. Like
    # qemu-img (BDRV_O_NO_IO) it reads no guest data, so encrypted images need no key
    with open_source(args.filename, args.f, args,
                     backing=args.backing_chain or args.details, data=args.details) as dev:
        infos = image_info(dev, backing_chain=args.backing_chain, partitions=args.details)
    if not args.details:  # qemu-img's output exactly; diskforge's extras on request
        for info in infos:
            info.details = {}
            info.partitions = None
    if args.output == "json":
        print(format_json(infos, args.backing_chain))
    else:
        print("\n\n".join(format_human(i) for i in infos))
    return 0


# -- create -------------------------------------------------------------------------------

def cmd_create(args) -> int:
    from ..options import merge_option_strings, parse_size, split_option_string
    from ..registry import get, target_format
    from .qemu_text import formatting_line, pop_size
    if args.filename is None and wants_option_help(args.o):
        fmt = get(args.f or "raw")  # qemu-img: -o help needs no file name
    elif args.filename is None:
        from ..errors import UsageError
        raise UsageError("Expecting image file name")
    else:
        fmt = target_format(args.filename, args.f)
    opt_size, args.o = pop_size(args.o)
    options = options_or_help(fmt, args.o)
    if options is None:
        return 0
    given = split_option_string(merge_option_strings(*args.o))
    args.b, args.F, options = backing_from_options(args.b, args.F, options)
    backing = backing_dev = None
    if args.size is None and opt_size is not None:
        args.size = opt_size
    size = parse_size(args.size, "image size") if args.size is not None else None
    try:
        if args.b:
            if args.u:
                from ..blockdev import Backing
                if not args.F:
                    from ..errors import UsageError
                    raise UsageError("-u needs the backing format (-F)")
                backing = Backing(name=args.b, format=args.F)
            else:
                backing_dev, backing = open_backing(args.b, args.F, args.filename, args,
                                                    share=True)
                if size is None:
                    size = backing_dev.size
        if size is None:
            from ..errors import UsageError
            raise UsageError("give the image size (or a backing file with -b)")
        if backing_dev is not None:
            from ..atomic import refuse_overwrite
            refuse_overwrite(args.filename, backing_dev.files(), "its backing file")
        from ..ops.measure import require_room
        require_room(args.filename, fmt, options, size=size)
        if not args.q:
            given = {k: v for k, v in given.items()
                     if k not in ("backing_file", "backing_fmt")}
            print(formatting_line(args.filename, fmt.name, size, given, args.b,
                                  args.F or (backing.format if backing else None)))
        writer = fmt.writer(args.filename, size, options, backing=backing)
        with writer:
            writer.finish()
    finally:
        if backing_dev is not None:
            backing_dev.close()
    return 0


# -- convert ------------------------------------------------------------------------------

def export_writer(target: str, fmt_name: str, size: int, args):
    """What qemu-img's create does on an NBD export (``bdrv_co_create_opts_simple``):
    nothing can be created there, so the existing export is written in place when it
    holds ``size`` bytes, else qemu-img's "Cannot grow NBD nodes". Only raw is written
    into an export (qemu-img could format one as qcow2: not supported yet)."""
    from ..blockdev import DeviceWriter
    from ..errors import UnsupportedError, UsageError
    from ..registry import open_image
    if fmt_name != "raw":
        raise UnsupportedError(f"not supported yet: creating a {fmt_name} image inside an"
                               " NBD export (raw only: -O raw)", target)
    dev = open_image(target, "raw", writable=True, policy=policy_from(args, share=False))
    if dev.size < size:
        dev.close()
        raise UsageError("error while converting raw: Cannot grow NBD nodes", target)
    return DeviceWriter(dev)


def is_export(target: str) -> bool:
    """An NBD export: written in place, as qemu-img writes one without -n too."""
    from ..remote import is_remote, scheme_of
    return is_remote(target) and scheme_of(target).startswith("nbd")


def cmd_convert(args) -> int:
    from ..atomic import refuse_overwrite
    from ..blockdev import DeviceWriter
    from ..errors import UsageError
    from ..ops.convert import convert
    from ..registry import get, target_format
    from .qemu_text import pop_size
    if len(args.files) < 2:
        if wants_option_help(args.o):  # qemu-img: -o help needs no file names
            options_or_help(get(args.O or "raw"), args.o)
            return 0
        raise UsageError("Expecting image file name" if not args.files else
                         "Expecting a source and a target image file name")
    *sources, args.target = args.files
    if args.target_image_opts:
        if not args.n:
            raise UsageError("--target-image-opts requires use of -n flag")
        from .qemu_text import image_opts
        args.target, target_fmt, _, _ = image_opts(args.target, args.object)
        args.O = args.O or target_fmt
    fmt = target_format(args.target, args.O)
    _, args.o = pop_size(args.o)  # qemu-img takes the size from the source, always
    options = options_or_help(fmt, args.o)
    if options is None:
        return 0
    args.B, args.F, options = backing_from_options(args.B, args.F, options)
    if args.target_is_zero and not args.n:
        raise UsageError("--target-is-zero requires use of -n flag")
    if args.target_is_zero and args.B:
        raise UsageError("--target-is-zero cannot be used with -B")
    if args.C and args.c:  # qemu-img's refusals, in its words
        raise UsageError("Cannot enable copy offloading when -c is used")
    if args.C and args.S is not None:
        raise UsageError("Cannot enable copy offloading when -S is used")
    if args.C and args.salvage:
        raise UsageError("Cannot use copy offloading in salvaging mode")
    if args.skip_broken_bitmaps and not args.bitmaps:
        raise UsageError("Use of --skip-broken-bitmaps requires --bitmaps")
    if args.bitmaps and len(sources) > 1:
        raise UsageError("Copying bitmaps only possible with single source")
    sparse = _sparse_size(args.S)
    if args.c:
        options = fmt.compressed(options)
    src = _open_sources(sources, args)
    base = None
    try:
        copied = None
        if args.bitmaps:  # checked before anything is written, as qemu-img does
            from ..ops.bitmap import bitmaps_to_copy
            copied = bitmaps_to_copy(src, skip_broken=args.skip_broken_bitmaps,
                                     warn=_warning)
        backing = None
        if args.B:
            base, backing = open_backing(args.B, args.F, args.target, args)
        refuse_overwrite(args.target, src.files(), "the input")
        if base is not None:
            refuse_overwrite(args.target, base.files(), "the backing file")
        if args.n:
            from ..registry import open_image
            dev = open_image(args.target, args.O, writable=True,
                             policy=policy_from(args, share=False))
            if args.cache in ("none", "directsync"):
                try:
                    use_direct_io(dev)
                except BaseException:
                    dev.close()
                    raise
            if dev.size < src.size:
                dev.close()
                raise UsageError(f"target is smaller ({dev.size} bytes) than the source"
                                 f" ({src.size} bytes)", args.target)
            writer = _zeroed_target_writer(dev) if args.target_is_zero else DeviceWriter(dev)
        elif is_export(args.target) and not args.B and copied is None:
            writer = export_writer(args.target, fmt.name, src.size, args)
        else:
            from ..ops.measure import require_room
            require_room(args.target, fmt, options, source=src, base=base)
            writer = fmt.writer(args.target, src.size, options, backing=backing)
            if copied is not None:
                if not getattr(writer, "supports_bitmaps", False):
                    writer.abort()
                    raise UsageError(f"Format driver '{fmt.name}' does not support"
                                     " bitmaps", args.target)
                writer.add_bitmaps(copied)
        try:
            with progress_for(args) as bar:
                progress = _throttled(bar, args.r) if args.r else bar
                out_fd = None
                if args.C and base is None:  # with -B, only what differs: convert's job
                    from ..ops.offload import offload_target
                    out_fd = offload_target(writer, dev.format if args.n else fmt.name)
                if out_fd is not None:
                    from ..ops.offload import offload_copy
                    offload_copy(src, writer, out_fd, progress)
                else:  # as qemu-img when copy_range fails: the ordinary copy
                    from .. import parallel  # -m 1: the source is decoded in one thread too
                    with parallel.limit(args.m or None):
                        convert(src, writer, base=base, progress=progress,
                                workers=args.m, sparse_size=sparse)
            if copied is not None and args.n:
                from ..ops.bitmap import add_copied_bitmaps
                add_copied_bitmaps(dev, copied)
        finally:
            if args.n:
                dev.close()
        failures = getattr(src, "failures", [])
        if failures:
            import sys
            lost = sum(n for _, n in failures)
            print(f"diskforge: {len(failures)} unreadable ranges ({lost} bytes) were"
                  " written as zeros (--salvage)", file=sys.stderr)
    finally:
        src.close()
        if base is not None:
            base.close()
    return 0


def _warning(text: str) -> None:
    import sys
    print(f"diskforge: warning: {text}", file=sys.stderr)


def _sparse_size(text: str | None) -> int | None:
    """``-S``: qemu-img accepts 0 or a multiple of 512 (bytes, with suffixes)."""
    if text is None:
        return None
    from ..errors import UsageError
    from ..options import parse_size
    n = parse_size(text, "sparse size (-S)")
    if n % 512:
        raise UsageError(f"Invalid buffer size for sparse output specified: {text}"
                         " (0 or a multiple of 512)")
    return n


def _open_sources(names: list[str], args):
    """The source: one image, or several read end to end (qemu-img's concatenation),
    wrapped for ``--salvage`` so unreadable sectors read as zeros."""
    if len(names) > 1 and args.snapshot:
        from ..errors import UsageError
        raise UsageError("-l cannot be used with more than one source image")
    opened = []
    try:
        for name in names:
            opened.append(open_source(name, args.f, args, snapshot=args.snapshot))
    except BaseException:
        for dev in opened:
            dev.close()
        raise
    if len(opened) == 1:
        src = opened[0]
    else:
        from ..ops.concat import ConcatDevice
        src = ConcatDevice(opened)
    if args.salvage:
        import sys

        from ..errors import printable
        from ..ops.salvage import SalvagingDevice

        def report(offset: int, length: int, why: str) -> None:
            print(f"diskforge: {printable(src.path)}: read error at offset {offset}"
                  f" ({length} bytes), written as zeros: {why}", file=sys.stderr)
        src = SalvagingDevice(src, report)
    return src


def _zeroed_target_writer(dev):
    """``convert -n --target-is-zero``: the target already reads as zeros, so zero
    ranges are not written at all (qemu-img skips them the same way)."""
    from ..blockdev import DeviceWriter

    class ZeroedTargetWriter(DeviceWriter):
        def zero(self, offset: int, length: int) -> None:
            pass
    return ZeroedTargetWriter(dev)


def _throttled(progress, rate_text: str):
    """``-r RATE``: the copy is limited to RATE bytes a second (qemu-img's
    ``rate-limit``), by sleeping in the progress callback the pipeline calls after
    every batch; the limit holds on average from the start of the copy."""
    import time

    from ..errors import UsageError
    from ..options import parse_size
    rate = parse_size(rate_text, "rate limit (-r)")
    if rate <= 0:
        raise UsageError(f"Invalid rate limit specified: {rate_text}")
    start = time.monotonic()

    def step(done: int, total: int) -> None:
        ahead = done / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
        progress(done, total)
    return step


# -- compare ------------------------------------------------------------------------------

def cmd_compare(args) -> int:
    from ..ops.compare import compare
    with open_source(args.image1, args.f, args, snapshot=args.snapshot) as a, \
            open_source(args.image2, args.F, args, disk=args.disk2) as b:
        with progress_for(args) as bar:
            result = compare(a, b, strict=args.s, progress=bar)
            if not args.q:  # before progress's closing newline, as qemu-img
                print(result.message)
    return 0 if result.identical else 1


# -- map ----------------------------------------------------------------------------------

def cmd_map(args) -> int:
    from ..ops.map import format_human, format_json, map_image
    from ..options import parse_size
    start = parse_size(args.start_offset, "start offset") if args.start_offset else 0
    with open_source(args.filename, args.f, args, snapshot=args.snapshot) as dev:
        length = parse_size(args.max_length, "length") if args.max_length else None
        entries = map_image(dev, min(start, dev.size), length, as_mapped=True)
        print(format_json(entries) if args.output == "json" else format_human(entries))
    return 0


# -- measure ------------------------------------------------------------------------------

def cmd_measure(args) -> int:
    import json

    from ..errors import UsageError
    from ..ops.measure import measure
    from ..options import parse_size
    from ..registry import get
    fmt = get(args.O)
    options = options_or_help(fmt, args.o)
    if options is None:
        return 0
    if (args.size is None) == (args.filename is None):
        raise UsageError("give either --size SIZE or an image file")
    if args.filename:
        with open_source(args.filename, args.f, args, snapshot=args.snapshot) as src:
            m = measure(fmt, options, source=src)
    else:
        m = measure(fmt, options, size=parse_size(args.size, "size"))
    if args.output == "json":
        d = {"bitmaps": m.bitmaps} if m.bitmaps is not None else {}
        d.update({"required": m.required, "fully-allocated": m.fully_allocated})
        print(json.dumps(d, indent=4))  # (qemu-img's key order)
    else:
        print(f"required size: {m.required}\nfully allocated size: {m.fully_allocated}")
        if m.bitmaps is not None:
            print(f"bitmaps size: {m.bitmaps}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("info", help="show an image's header facts and backing chain")
    p.add_argument("-f", metavar="FMT", help="image format (default: probe)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--backing-chain", action="store_true", help="also show every backing image")
    p.add_argument("--details", action="store_true",
                   help="also show diskforge's extra facts: the format's header details"
                   " and the partition table (the 'diskforge' and 'partitions' JSON keys)")
    add_disk_arg(p)
    add_force_share_arg(p)
    add_policy_args(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("create", help="create a new, empty image (or an overlay with -b)")
    p.add_argument("-f", metavar="FMT", help="format (default: from the file extension)")
    p.add_argument("-o", action="append", default=[], metavar="OPTIONS",
                   help="format options key=value,... ('-o help' lists them)")
    p.add_argument("-b", metavar="BACKING", help="backing file (relative to the new image)")
    p.add_argument("-F", metavar="BACKING_FMT", help="backing file format")
    p.add_argument("-u", action="store_true", help="do not open the backing file")
    p.add_argument("-q", action="store_true", help="quiet")
    add_policy_args(p)
    p.add_argument("filename", nargs="?")
    p.add_argument("size", nargs="?", help="virtual size (k, M, G, T suffixes; or -o size=)")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("convert", help="convert an image to another format (sparse-aware)")
    p.add_argument("-f", metavar="FMT", help="source format (default: probe)")
    p.add_argument("-O", metavar="FMT", help="target format (default: from the extension)")
    p.add_argument("-o", action="append", default=[], metavar="OPTIONS",
                   help="target format options ('-o help' lists them)")
    p.add_argument("-c", action="store_true", help="compress the target")
    p.add_argument("-B", metavar="BACKING", help="make the target an overlay of BACKING,"
                   " writing only what differs from it")
    p.add_argument("-F", metavar="BACKING_FMT", help="format of BACKING")
    p.add_argument("-n", action="store_true", help="write into an existing target")
    p.add_argument("-m", type=int, metavar="N",
                   help="threads compressing the target and decoding the source")
    p.add_argument("-p", action="store_true", help="print progress (qemu-img's lines)")
    p.add_argument("-q", action="store_true", help="quiet")
    p.add_argument("-S", metavar="SIZE", help="zero-detection granularity: zero runs of"
                   " at least SIZE stay holes; 0 writes everything")
    p.add_argument("-W", action="store_true", help="allow out-of-order writes (accepted;"
                   " diskforge writes in order, which -W permits)")
    p.add_argument("-C", action="store_true", help="copy offloading (copy_file_range)"
                   " into a raw file from every run stored as it is (raw, VHD, VHDX,"
                   " flat VMDK, uncompressed qcow2); holes kept; other runs and"
                   " targets copied the ordinary way, as qemu-img")
    p.add_argument("-r", metavar="RATE", help="limit the copy to RATE bytes a second")
    p.add_argument("--target-is-zero", action="store_true",
                   help="with -n: the target already reads as zeros, skip writing them")
    p.add_argument("--salvage", action="store_true",
                   help="read errors become zeros (each reported) instead of failing")
    p.add_argument("--target-image-opts", action="store_true",
                   help="with -n: TARGET is an option string (driver=,file.filename=)")
    p.add_argument("--bitmaps", action="store_true",
                   help="copy the source's persistent dirty bitmaps (qcow2 to qcow2)")
    p.add_argument("--skip-broken-bitmaps", action="store_true",
                   help="with --bitmaps: leave out inconsistent (in-use) bitmaps, with a"
                   " warning, instead of failing")
    add_cache_args(p)
    add_disk_arg(p)
    add_force_share_arg(p)
    add_snapshot_arg(p, "read the source's internal snapshot SNAPSHOT (ID or name)")
    add_policy_args(p)
    p.add_argument("files", nargs="*", metavar="SOURCE... TARGET",
                   help="one or more source images (read end to end) and the target")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("compare", help="compare two images' contents (exit 0 same,"
                       " 1 different, 2 error)")
    p.error_status = 2
    p.add_argument("-f", metavar="FMT", help="format of the first image")
    p.add_argument("-F", metavar="FMT", help="format of the second image")
    p.add_argument("-s", action="store_true", help="strict: sizes and allocation must match")
    p.add_argument("-p", action="store_true", help="show progress")
    p.add_argument("-q", action="store_true", help="quiet")
    add_cache_args(p, target=False)
    add_disk_arg(p, "--disk", "the first image, if an")
    add_disk_arg(p, "--disk2", "the second image, if an")
    add_force_share_arg(p)
    add_snapshot_arg(p, "compare the first image's internal snapshot SNAPSHOT")
    add_policy_args(p)
    p.add_argument("image1")
    p.add_argument("image2")
    p.set_defaults(func=cmd_compare, error_status=2)

    p = sub.add_parser("map", help="show where the image's data lives")
    p.add_argument("-f", metavar="FMT")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--start-offset", metavar="OFFSET")
    p.add_argument("--max-length", metavar="LEN")
    add_disk_arg(p)
    add_force_share_arg(p)
    add_snapshot_arg(p, "map the internal snapshot SNAPSHOT (ID or name)")
    add_policy_args(p)
    p.add_argument("filename")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("measure", help="space needed for an image in a format")
    p.add_argument("-O", metavar="FMT", default="raw", help="target format (default raw)")
    p.add_argument("-o", action="append", default=[], metavar="OPTIONS")
    p.add_argument("-f", metavar="FMT", help="format of FILE")
    p.add_argument("--size", metavar="SIZE", help="measure an empty disk of this size")
    p.add_argument("--output", choices=("human", "json"), default="human")
    add_disk_arg(p)
    add_force_share_arg(p)
    add_snapshot_arg(p, "measure the source's internal snapshot SNAPSHOT (ID or name)")
    add_policy_args(p)
    p.add_argument("filename", nargs="?")
    p.set_defaults(func=cmd_measure)
