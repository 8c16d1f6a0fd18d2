"""diskforge as an NBD *client*: ``nbd://host[:port]/name`` and
``nbd+unix:///name?socket=PATH`` (the URI forms of the NBD URI specification,
doc/uri.md in the NBD project, as qemu-img and nbdkit spell them).

Why our own client and not libnbd's binding: libnbd's Python module comes only with
Debian's system Python (not pip-installable into a venv), and the protocol side we need
is small and already written once for the server (``nbd_protocol`` holds the names).

Protocol (doc/proto.md): the fixed newstyle handshake, ``NBD_OPT_STRUCTURED_REPLY``,
``NBD_OPT_SET_META_CONTEXT`` for ``base:allocation`` and ``NBD_OPT_GO``; then
``NBD_CMD_READ`` (simple or structured replies, hole chunks filled with zeros) and
``NBD_CMD_BLOCK_STATUS``, so ``data_ranges`` reports the export's holes and a qemu-nbd
or nbdkit export converts sparsely. Reads larger than the server's maximum block size
are split and *pipelined*: every piece is requested before the first reply is read, so
one round trip serves a whole conversion batch.

Everything a server sends is bounded before it is used: reply lengths against what was
asked, chunk offsets inside the request, error messages and block-status payloads
against fixed caps, and every socket operation has a timeout, so a hostile or dead
server gives one error line, never a hang or a large allocation.

Not supported yet: ``nbds://`` (TLS), writing to an export.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import FormatError, ImageIOError, UnsupportedError, UsageError
from ..nbd_protocol import (
    BASE_ALLOCATION, IHAVEOPT, NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC, NBD_CMD_READ,
    NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT, NBD_OPT_GO,
    NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REP_INFO,
    NBD_REP_MAGIC, NBD_REP_META_CONTEXT, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC,
    NBD_STATE_ZERO, NBD_STRUCTURED_REPLY_MAGIC, NBDMAGIC)
from . import RemoteBackend

DEFAULT_PORT = 10809                      # IANA's NBD port, the URI default
TIMEOUT = 60.0                            # seconds for any one socket operation
MAX_REQUEST = 32 << 20                    # qemu-nbd's and nbdkit's usual maximum
MAX_OPTION_REPLY = 64 << 10               # option replies are small (names, info)
MAX_STATUS_PAYLOAD = 8 << 20              # one block-status reply: 1M descriptors
MAX_ERROR_MESSAGE = 4096
STATUS_SPAN = 1 << 30                     # asked per block-status request


def open_backend(url: str, **options) -> "NBDBackend":
    return NBDBackend(url, **options)


def parse_url(url: str) -> tuple[object, str]:
    """``(address, export name)`` of an NBD URI: ``(host, port)`` for ``nbd://``, the
    socket path for ``nbd+unix://``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    name = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if scheme == "nbds" or scheme.startswith("nbds+"):
        raise UnsupportedError("not supported yet: nbds:// (NBD over TLS)", url)
    if scheme == "nbd+unix":
        sockets = parse_qs(parts.query).get("socket")
        if not sockets or not sockets[0]:
            raise UsageError("nbd+unix:// needs ?socket=PATH", url)
        return sockets[0], name
    if scheme == "nbd":
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise UsageError("the port of an nbd:// URI must be a number", url) from None
        if not parts.hostname:
            raise UsageError("nbd:// needs a host (nbd://HOST[:PORT]/NAME)", url)
        return (parts.hostname, port), name
    raise UsageError("not an NBD URI (nbd://HOST[:PORT]/NAME or"
                     " nbd+unix:///NAME?socket=PATH)", url)


class NBDBackend(RemoteBackend):
    """One connection to one export, with FileBackend's reading interface. Calls are
    serialised by a lock: one conversation on one socket, whichever thread asks."""

    def __init__(self, url: str, *, timeout: float = TIMEOUT) -> None:
        self.path = url
        self.closed = False
        self._lock = threading.Lock()
        self._cookie = 0
        address, self.export = parse_url(url)
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        try:
            if family == socket.AF_UNIX:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(address)
            else:
                self.sock = socket.create_connection(address, timeout=timeout)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise ImageIOError(f"cannot connect to the NBD server: {e.strerror or e}",
                               url) from None
        try:
            self._handshake()
        except BaseException:
            self.sock.close()
            raise

    # -- the wire ----------------------------------------------------------------------
    def _recv(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf), what)
        return bytes(buf)

    def _recv_into(self, mv: memoryview, what: str) -> None:
        got = 0
        try:
            while got < len(mv):
                k = self.sock.recv_into(mv[got:])
                if k == 0:
                    raise ImageIOError(f"the NBD server closed the connection while"
                                       f" sending {what}", self.path)
                got += k
        except socket.timeout:
            raise ImageIOError(f"the NBD server sent no {what} within {TIMEOUT:.0f} s",
                               self.path) from None
        except OSError as e:
            raise ImageIOError(f"reading {what} from the NBD server: {e.strerror or e}",
                               self.path) from None

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ImageIOError(f"sending to the NBD server: {e.strerror or e}",
                               self.path) from None

    def _bad(self, structure: str, field: str, message: str) -> FormatError:
        return FormatError(message, self.path, structure=structure, field=field)

    # -- handshake (proto.md "Fixed newstyle negotiation") ----------------------------
    def _handshake(self) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv(18, "its greeting"))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise self._bad("greeting", "magic", "not an NBD server speaking the newstyle"
                            " handshake")
        if not flags & NBD_FLAG_FIXED_NEWSTYLE:
            raise UnsupportedError("not supported yet: NBD servers without the fixed"
                                   " newstyle handshake", self.path)
        client = NBD_FLAG_C_FIXED_NEWSTYLE | (flags & NBD_FLAG_NO_ZEROES and
                                              NBD_FLAG_C_NO_ZEROES)
        self._send(struct.pack(">I", client))
        self.structured = self._option_ack(NBD_OPT_STRUCTURED_REPLY, b"")
        self.context_id = None
        name = self.export.encode()
        if self.structured:
            query = BASE_ALLOCATION.encode()
            self._option_send(NBD_OPT_SET_META_CONTEXT, struct.pack(">I", len(name)) + name
                              + struct.pack(">II", 1, len(query)) + query)
            try:  # refused (no such export, no contexts): reads still work, no holes
                for rtype, data in self._option_replies(NBD_OPT_SET_META_CONTEXT):
                    if rtype == NBD_REP_META_CONTEXT and len(data) >= 4 \
                            and data[4:] == query:
                        self.context_id = struct.unpack_from(">I", data)[0]
            except _OptionRefused:
                self.context_id = None
        self._option_send(NBD_OPT_GO, struct.pack(">I", len(name)) + name
                          + struct.pack(">HH", 1, NBD_INFO_BLOCK_SIZE))
        self._size = None
        self.max_request = MAX_REQUEST
        for rtype, data in self._option_replies(NBD_OPT_GO):
            if rtype != NBD_REP_INFO or len(data) < 2:
                continue
            info = struct.unpack_from(">H", data)[0]
            if info == NBD_INFO_EXPORT and len(data) >= 12:
                self._size, self.transmission_flags = struct.unpack_from(">QH", data, 2)
            elif info == NBD_INFO_BLOCK_SIZE and len(data) >= 14:
                maximum = struct.unpack_from(">I", data, 10)[0]
                if maximum >= 512:
                    self.max_request = min(MAX_REQUEST, maximum)
        if self._size is None:
            raise self._bad("NBD_REP_INFO", "NBD_INFO_EXPORT", "the server's reply to"
                            " NBD_OPT_GO gave no export size")
        if self._size >= 1 << 63:
            raise self._bad("NBD_INFO_EXPORT", "size", f"{self._size} is not a disk size")

    def _option_send(self, option: int, data: bytes) -> None:
        self._send(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def _option_replies(self, option: int) -> Iterator[tuple[int, bytes]]:
        """The replies to ``option`` up to its ``NBD_REP_ACK``; an error reply raises."""
        for _ in range(1 << 16):  # an export has a handful of infos and contexts
            magic, opt, rtype, length = struct.unpack(">QIII", self._recv(20,
                                                      "an option reply"))
            if magic != NBD_REP_MAGIC or opt != option:
                raise self._bad("option reply", "magic", "not a reply to the option sent")
            if length > MAX_OPTION_REPLY:
                raise self._bad("option reply", "length", f"{length} bytes is too long")
            data = self._recv(length, "an option reply")
            if rtype == NBD_REP_ACK:
                return
            if rtype & (1 << 31):
                message = data.decode("utf-8", "replace")[:200]
                if option == NBD_OPT_GO:
                    raise ImageIOError("the NBD server refused export"
                                       f" '{self.export}': {message or hex(rtype)}",
                                       self.path)
                raise _OptionRefused(rtype)
            yield rtype, data
        raise self._bad("option reply", "type", "no end to the replies")

    def _option_ack(self, option: int, data: bytes) -> bool:
        self._option_send(option, data)
        try:
            for _ in self._option_replies(option):
                pass
        except _OptionRefused:
            return False
        return True

    # -- transmission (proto.md "Transmission phase") ----------------------------------
    def _request(self, command: int, offset: int, length: int, flags: int = 0) -> int:
        self._cookie += 1
        self._send(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, command,
                               self._cookie, offset, length))
        return self._cookie

    def _reply_header(self) -> tuple[bool, int, int, int, int]:
        """``(structured, flags, type, cookie, length_or_error)``."""
        magic = struct.unpack(">I", self._recv(4, "a reply"))[0]
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self._recv(12, "a reply"))
            return False, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, error
        if magic == NBD_STRUCTURED_REPLY_MAGIC and self.structured:
            flags, rtype, cookie, length = struct.unpack(">HHQI", self._recv(16, "a reply"))
            return True, flags, rtype, cookie, length
        raise self._bad("reply", "magic", f"{magic:#x} is not an NBD reply")

    def _error_chunk(self, length: int) -> str:
        if length < 6 or length > 6 + MAX_ERROR_MESSAGE:
            raise self._bad("NBD_REPLY_TYPE_ERROR", "length", f"{length} is out of range")
        data = self._recv(length, "an error reply")
        error, mlen = struct.unpack_from(">IH", data)
        text = data[6:6 + mlen].decode("utf-8", "replace")
        return f"error {error}" + (f" ({text})" if text else "")

    def _read_pieces(self, offset: int, mv: memoryview) -> None:
        """Fill ``mv`` from ``offset``: every piece requested first, then the replies
        (in whatever order the server sends them) placed by cookie."""
        pending: dict[int, tuple[int, memoryview]] = {}
        pos = 0
        while pos < len(mv):
            n = min(self.max_request, len(mv) - pos)
            pending[self._request(NBD_CMD_READ, offset + pos, n)] = (offset + pos,
                                                                      mv[pos:pos + n])
            pos += n
        while pending:
            structured, flags, rtype, cookie, length = self._reply_header()
            if cookie not in pending:
                raise self._bad("reply", "cookie", f"{cookie} answers no read in flight")
            start, piece = pending[cookie]
            if not structured:
                if length:
                    raise ImageIOError(f"the NBD server failed a read at {start}:"
                                       f" error {length}", self.path)
                self._recv_into(piece, "read data")
                del pending[cookie]
                continue
            if rtype == NBD_REPLY_TYPE_OFFSET_DATA:
                if length < 8:
                    raise self._bad("NBD_REPLY_TYPE_OFFSET_DATA", "length", "too short")
                at = struct.unpack(">Q", self._recv(8, "a data chunk"))[0] - start
                n = length - 8
                if at < 0 or at + n > len(piece):
                    raise self._bad("NBD_REPLY_TYPE_OFFSET_DATA", "offset",
                                    "outside the read asked for")
                self._recv_into(piece[at:at + n], "read data")
            elif rtype == NBD_REPLY_TYPE_OFFSET_HOLE:
                if length != 12:
                    raise self._bad("NBD_REPLY_TYPE_OFFSET_HOLE", "length", "not 12")
                at, n = struct.unpack(">QI", self._recv(12, "a hole chunk"))
                at -= start
                if at < 0 or at + n > len(piece):
                    raise self._bad("NBD_REPLY_TYPE_OFFSET_HOLE", "offset",
                                    "outside the read asked for")
                piece[at:at + n] = bytes(n)
            elif rtype == NBD_REPLY_TYPE_ERROR or rtype & (1 << 15):
                raise ImageIOError(f"the NBD server failed a read at {start}:"
                                   f" {self._error_chunk(length)}", self.path)
            elif rtype != NBD_REPLY_TYPE_NONE or length:
                raise self._bad("structured reply", "type",
                                f"{rtype} is not a reply to a read")
            if flags & NBD_REPLY_FLAG_DONE:
                del pending[cookie]

    def _block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``[(length, flags)]`` of ``base:allocation`` from ``offset``, as the server
        describes it (at least one extent, at most ``length`` bytes)."""
        cookie = self._request(NBD_CMD_BLOCK_STATUS, offset, length)
        extents: list[tuple[int, int]] = []
        failure = None
        while True:
            structured, flags, rtype, got, size = self._reply_header()
            if got != cookie:
                raise self._bad("reply", "cookie", f"{got} answers no request in flight")
            if not structured:
                raise self._bad("reply", "magic", "a simple reply to NBD_CMD_BLOCK_STATUS")
            if rtype == NBD_REPLY_TYPE_BLOCK_STATUS:
                if size < 12 or size > MAX_STATUS_PAYLOAD or (size - 4) % 8:
                    raise self._bad("NBD_REPLY_TYPE_BLOCK_STATUS", "length",
                                    f"{size} is out of range")
                data = self._recv(size, "block status")
                if struct.unpack_from(">I", data)[0] == self.context_id and not extents:
                    extents = [struct.unpack_from(">II", data, p)
                               for p in range(4, size, 8)]
            elif rtype == NBD_REPLY_TYPE_ERROR or rtype & (1 << 15):
                failure = self._error_chunk(size)
            elif size:
                self._recv(min(size, MAX_ERROR_MESSAGE), "a reply")
                raise self._bad("structured reply", "type",
                                f"{rtype} is not a reply to block status")
            if flags & NBD_REPLY_FLAG_DONE:
                break
        if failure:
            raise ImageIOError(f"the NBD server failed block status at {offset}: {failure}",
                               self.path)
        if not extents or any(n == 0 for n, _ in extents):
            raise self._bad("NBD_REPLY_TYPE_BLOCK_STATUS", "descriptors",
                            "no progress (an empty or zero-length extent)")
        return extents

    def readinto(self, offset: int, buf) -> int:
        if self.closed:
            raise ImageIOError("read after close", self.path)
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self._size - offset))
        if n == 0 or offset < 0:
            return 0
        with self._lock:
            self._read_pieces(offset, mv[:n])
        return n

    def data_ranges(self, offset: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """Runs from ``NBD_CMD_BLOCK_STATUS``: a range the server says reads as zeros
        (``NBD_STATE_ZERO``) is not data; everything is data where the server has no
        ``base:allocation``."""
        end = min(end, self._size)
        if end <= offset:
            return
        if self.context_id is None:
            yield offset, end - offset, True
            return
        pos = offset
        while pos < end:
            with self._lock:
                extents = self._block_status(pos, min(STATUS_SPAN, end - pos))
            for n, flags in extents:
                n = min(n, end - pos)
                if n <= 0:
                    break
                yield pos, n, not flags & NBD_STATE_ZERO
                pos += n

    def _refuse(self, *args, **kwargs):
        raise UnsupportedError("not supported yet: writing to an NBD export", self.path)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with self._lock:
                self._request(NBD_CMD_DISC, 0, 0)
        except (ImageIOError, OSError):
            pass
        self.sock.close()


class _OptionRefused(Exception):
    """The server answered an option with an error: the option is not available."""

    def __init__(self, reply_type: int) -> None:
        super().__init__(reply_type)
        self.reply_type = reply_type
