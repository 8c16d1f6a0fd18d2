"""Entry point: parse the command line, run one subcommand, turn errors into one line.

Imports stay lazy (each subcommand imports its operation when it runs) so that
``diskforge info`` starts quickly.
"""

from __future__ import annotations

import argparse
import os
import sys

try:  # CPython's C module: ``signal`` wraps it in IntEnum classes that cost every
    import _signal as signal  # command ~3.4 M instructions of start-up (issue 17)
except ImportError:  # pragma: no cover - an interpreter without it
    import signal

from ..errors import DiskforgeError
from ..untrusted import CpuTimeExceeded

# subcommand group modules, each with add_parsers(subparsers)
GROUPS = ("image", "maintenance", "chain", "snapshot", "dd", "bench", "imaging", "verify",
          "formats_cmd", "hypervisor", "iso", "export", "batch", "bitmap", "presign")

# Which group registers each subcommand, so that one command builds only its own
# group's parsers: importing all twelve modules and building ~40 subparsers cost more
# than the whole of ``diskforge info`` otherwise does (tests/test_startup.py checks
# that this table and the groups agree).
COMMANDS = {
    "info": "image", "create": "image", "convert": "image", "compare": "image",
    "map": "image", "measure": "image",
    "check": "maintenance", "resize": "maintenance", "amend": "maintenance",
    "rebase": "chain", "commit": "chain",
    "snapshot": "snapshot", "dd": "dd", "bench": "bench",
    "image": "imaging", "restore": "imaging", "verify": "verify", "formats": "formats_cmd",
    "serve": "hypervisor", "boot": "hypervisor", "attach": "hypervisor",
    "detach": "hypervisor", "backup": "hypervisor",
    "iso": "iso", "export": "export", "import": "export",
    "batch": "batch", "bitmap": "bitmap", "presign": "presign",
}


_columns: int | None = None


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout, given the terminal width without importing shutil:
    argparse makes a formatter for every argument it adds (to check its metavar), and
    the default one imports shutil (with bz2 and lzma) to ask the width; reading it
    as shutil.get_terminal_size does (COLUMNS, else the terminal, else 80), once,
    keeps that off every command's start-up."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        global _columns
        if width is None:
            if _columns is None:
                try:
                    _columns = int(os.environ["COLUMNS"])
                except (KeyError, ValueError):
                    _columns = 0
                if _columns <= 0:
                    try:
                        _columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
                    except (AttributeError, ValueError, OSError):
                        _columns = 0
                _columns = _columns or 80
            width = _columns - 2
        super().__init__(prog, indent_increment, max_help_position, width)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad invocation as one line (and the exit status the
    subcommand uses for errors: qemu-img's ``compare`` uses 2, the rest 1)."""

    error_status = 1

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(self.error_status, f"{self.prog}: error: {message}"
                                     f" (see '{self.prog} --help')\n")


def command_of(argv: list[str], parser: argparse.ArgumentParser | None = None
               ) -> str | None:
    """The subcommand ``argv`` names: its first word that is neither an option nor
    the value of a global option of ``parser`` that takes one."""
    takes_value = parser._option_string_actions if parser is not None else {}
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--":
            return None
        elif arg.startswith("-"):
            action = takes_value.get(arg)
            skip = action is not None and action.nargs != 0
        else:
            return arg
    return None


def build_parser(command: str | None = None, argv: list[str] | None = None
                 ) -> argparse.ArgumentParser:
    """The command line's parser: for one known subcommand (``command``, or the one
    ``argv`` names), only its own subparser, else all of them (``--help``, a misspelt
    command: the full list of choices is needed then)."""
    import importlib
    parser = OneLineParser(prog="diskforge", description="Inspect, create, convert, image"
                           " and restore virtual-machine and disk images.")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback when something fails")
    parser.add_argument("--sync", action="store_true",
                        help="fdatasync outputs before renaming them into place")
    parser.add_argument("--untrusted", action="store_true",
                        help="for images uploaded by others: confine the files they name,"
                        " refuse raw backing files, limit memory and CPU time (also"
                        " DISKFORGE_UNTRUSTED=1)")
    parser.add_argument("--s3-endpoint", metavar="URL",
                        help="the S3-compatible server for s3:// names (MinIO, Ceph...);"
                        " default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS")
    parser.add_argument("-V", "--version", action=_VersionAction, nargs=0,
                        help="show diskforge's version and the qemu-img version whose"
                        " interface it follows, and exit")
    if argv is not None:
        command = command_of(argv, parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    group = COMMANDS.get(command) if command else None
    for name in (group,) if group else GROUPS:
        importlib.import_module(f"{__package__}.{name}").add_parsers(
            _Only(sub, command) if group else sub)
    for name in QEMU_IMG_COMMANDS:  # qemu-img's options common to its subcommands
        p = sub.choices.get(name)
        if p is None:  # not built for this command
            continue
        p.add_argument("--object", action="append", default=[], metavar="OBJECTDEF",
                       help="a secret, as qemu-img defines it: secret,id=ID,data=TEXT"
                       " (or file=PATH; format=raw|base64), the passphrase of an"
                       " encrypted image; or tls-creds-x509,id=ID,dir=DIR,"
                       "endpoint=client, the CA (and client certificate) for nbds://")
        if name != "create":
            p.add_argument("--image-opts", action="store_true",
                           help="the image is named by an option string (driver=FMT,"
                           "file.filename=PATH,file.locking=off,key-secret=ID)")
    return parser


class _Only:
    """The subparsers action as a group module sees it when one command runs: the
    command's own parser is built, its siblings' calls go to a stand-in that takes
    and ignores them (a group registers up to six subcommands with a dozen arguments
    each, for nothing when one of them runs)."""

    def __init__(self, sub, command: str):
        self._sub, self._command = sub, command

    def add_parser(self, name: str, **kwargs):
        if name == self._command or self._command in kwargs.get("aliases", ()):
            return self._sub.add_parser(name, **kwargs)
        return _Ignored()

    def __getattr__(self, name: str):
        return getattr(self._sub, name)


class _Ignored:
    """Takes any call (add_argument, set_defaults, add_subparsers, add_parser, ...)
    and ignores it."""

    def __getattr__(self, name: str):
        return self._call

    def _call(self, *args, **kwargs):
        return self


# the subcommands that are qemu-img's, which take --object and --image-opts
QEMU_IMG_COMMANDS = ("amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create",
                     "dd", "info", "map", "measure", "rebase", "resize", "snapshot")


# The qemu-img release whose command line and outputs diskforge follows. Scripts probe
# ``qemu-img --version`` with a regex on "qemu-img version X.Y.Z" to pick flags.
QEMU_IMG_INTERFACE = "7.2.0"


class _VersionAction(argparse.Action):
    """Looks the version up only when asked (importlib.metadata is slow to import).
    Two lines: diskforge's own version, then qemu-img's spelling of the interface it
    follows, so a script that parses qemu-img's version line finds one it knows."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        print(f"qemu-img version {QEMU_IMG_INTERFACE} (interface followed by diskforge)")
        parser.exit(0)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"diskforge {version('diskforge')}"
    except PackageNotFoundError:
        return "diskforge (not installed)"


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def _inputs(args) -> str | None:
    """The image this command works on, to name in a resource-limit error."""
    for name in ("filename", "source", "image", "image1", "files"):
        value = getattr(args, name, None)
        if isinstance(value, list) and value:  # convert's SOURCE... TARGET
            value = value[0]
        if isinstance(value, str) and value:
            return value
    return None


def _limit_error(args, what: str) -> str:
    from ..errors import printable
    where = _inputs(args)
    return f"diskforge: {printable(where) + ': ' if where else ''}{what}"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Untrusted mode's process limits (setrlimit, the lower memory
    budget) apply only when this is the ``diskforge`` process itself (``argv`` None):
    ``main([...])`` called from Python (tests, embedding) gets the untrusted policy
    but never limits its caller's process.

    Whatever ends the command, no unfinished temporary output outlives it: a signal can
    land before an operation's own clean-up is armed (``atomic.discard_unfinished``)."""
    try:
        return _main(argv)
    finally:
        atomic = sys.modules.get("diskforge.atomic")  # loaded by every command that writes
        if atomic is not None:
            atomic.discard_unfinished()


def _main(argv: list[str] | None) -> int:
    own_process = argv is None
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv=argv)
    if argv[:1] == ["resize"] and len(argv) > 2 and argv[-1][:1] == "-" \
            and argv[-1][1:2].isdigit() and "--" not in argv:
        argv = argv[:-1] + ["--", argv[-1]]  # "resize img -1G": a size, not a flag
    args, extra = parser.parse_known_args(argv)
    variadic = next((n for n in ("files", "operands") if isinstance(getattr(args, n, None),
                                                                   list)), None)
    if extra and variadic and not any(e.startswith("-") for e in extra):
        # file names after options (qemu-img's getopt permutes; argparse fills a
        # variadic positional from its first run of names only)
        getattr(args, variadic).extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 1
    environment: dict[str, str] = {}
    if getattr(args, "object", None):
        from .secrets import parse_object, tls_environment
        try:
            for spec in args.object:  # a typo fails before anything is opened
                parse_object(spec)
            environment = tls_environment(args.object)
        except DiskforgeError as e:
            print(f"diskforge: {e}", file=sys.stderr)
            return getattr(args, "error_status", 1)
    if hasattr(args, "cache") or hasattr(args, "src_cache"):
        from .image import apply_cache_modes
        try:
            apply_cache_modes(args)  # -t none/writethrough/directsync: flushed outputs
        except DiskforgeError as e:
            print(f"diskforge: {e}", file=sys.stderr)
            return getattr(args, "error_status", 1)
    if args.sync or getattr(args, "flush_output", False) or "diskforge.atomic" in sys.modules:
        from ..atomic import set_direct, set_durable  # per command: main() may run many
        set_durable(args.sync or getattr(args, "flush_output", False))
        set_direct(getattr(args, "cache", None) in ("none", "directsync"))
    if args.s3_endpoint:  # read by remote/s3.py, and inherited by child processes
        os.environ["DISKFORGE_S3_ENDPOINT"] = args.s3_endpoint
    signal.signal(signal.SIGTERM, _on_sigterm)  # clean up temporary outputs on kill
    error_status = getattr(args, "error_status", 1)
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)  # for this command (main() may run many)
    try:
        from ..policy import untrusted_from_environment
        args.untrusted = args.untrusted or untrusted_from_environment()
        if args.untrusted and own_process:
            from ..untrusted import limit_process
            limit_process(_inputs(args))
        return int(args.func(args) or 0)
    except CpuTimeExceeded as e:
        print(_limit_error(args, str(e)), file=sys.stderr)
        return error_status
    except MemoryError:
        if args.debug:
            raise
    except DiskforgeError as e:
        if args.debug:
            raise
        print(f"diskforge: {e}", file=sys.stderr)
        return error_status
    except KeyboardInterrupt:
        print("diskforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return error_status
    except OSError as e:
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"diskforge: {where}{e.strerror or e}", file=sys.stderr)
        return error_status
    except Exception as e:  # a bug: still one line, with the way to see more
        if args.debug:
            raise
        print(f"diskforge: internal error: {type(e).__name__}: {e} (run 'diskforge --debug"
              f" ...' for the traceback, and please report it)", file=sys.stderr)
        return error_status
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    # Only a MemoryError gets here. Not inside its except block: there the traceback
    # still holds the frames (and whatever filled memory), so building even this line
    # failed again and again (a hostile plist once ended in a 39-line traceback).
    limit = " (an input asks for more than this machine can give)"
    if args.untrusted and own_process:
        from ..untrusted import address_space
        limit = (f" (untrusted mode's address-space limit of {address_space() >> 20}"
                 " MiB; DISKFORGE_UNTRUSTED_ADDRESS_SPACE sets it)")
    print(_limit_error(args, f"out of memory{limit}"), file=sys.stderr)
    return error_status


if __name__ == "__main__":
    sys.exit(main())
