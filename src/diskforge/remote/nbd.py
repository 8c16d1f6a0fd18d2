"""diskforge as an NBD *client*: ``nbd://host[:port]/name``,
``nbd+unix:///name?socket=PATH`` and their TLS forms ``nbds://`` and
``nbds+unix://`` (the URI forms of the NBD URI specification, doc/uri.md in the NBD
project, as qemu-img, libnbd and nbdkit spell them).

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

TLS (proto.md "TLS support"): ``nbds`` sends ``NBD_OPT_STARTTLS`` first, then runs the
rest of the negotiation and all of transmission over ``ssl`` (stdlib). Credentials are
X.509 in qemu's and libnbd's directory layout: ``ca-cert.pem`` (the CA the server's
certificate must chain to) and, when the server asks for one, ``client-cert.pem`` and
``client-key.pem``. The directory comes from the URI's ``tls-certificates=DIR`` (libnbd),
else ``DISKFORGE_NBD_TLS_CERTIFICATES`` (what the CLI's ``--object
tls-creds-x509,dir=DIR,endpoint=client`` sets), else the system CA store;
``tls-verify-peer=false`` (or the object's ``verify-peer=no``) skips checking the
server, as libnbd and qemu allow. Over TCP the server's name must match its certificate
(an IP address matches an IP SAN); over a Unix socket only the chain is checked, as
qemu does when it has no host name. A server that refuses STARTTLS when we ask, or that
answers ``NBD_REP_ERR_TLS_REQD`` when we did not, is one error line saying which.

Writing (``writable=True``: ``convert [-n]``, ``dd of=``, ``diskforge.open(url,
writable=True)``):
``NBD_CMD_WRITE`` split at the server's maximum block size and pipelined like reads;
zero runs as ``NBD_CMD_WRITE_ZEROES`` (``punch_hole``: without ``NBD_CMD_FLAG_NO_HOLE``,
so the server may deallocate; ``write_zeroes``: with it, allocating, as a file's
``write_zeroes`` does), plain zero writes when the server lacks the command;
``NBD_CMD_FLUSH`` at ``flush`` and ``close`` when something was written. An export the
server marks ``NBD_FLAG_READ_ONLY`` is refused at open; writes past the export's end
are refused before anything is sent; an export cannot change size (qemu: "Cannot grow
NBD nodes"). There is no creating an export: ``convert`` and ``dd`` write into the
existing one, with or without ``-n``, as qemu-img does (``cli/image.export_writer``);
what would create one elsewhere (``open_upload``) is qemu-img's "Protocol driver 'nbd'
does not support image creation".

Everything a server sends is bounded before it is used: reply lengths against what was
asked, chunk offsets inside the request, error messages and block-status payloads
against fixed caps, and every socket operation has a timeout, so a hostile or dead
server gives one error line, never a hang or a large allocation.

Not supported yet: TLS with pre-shared keys (``tls-psk-file``),
``NBD_CMD_TRIM``, multi-conn.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from ..blockdev import ZERO_BUFFER_SIZE, ZEROES, pieces
from ..errors import FormatError, ImageIOError, UnsupportedError, UsageError
from ..nbd_protocol import (
    BASE_ALLOCATION, IHAVEOPT, NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC, NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_WRITE_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT, NBD_OPT_GO,
    NBD_OPT_SET_META_CONTEXT, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK,
    NBD_REP_ERR_TLS_REQD, NBD_REP_INFO, NBD_REP_MAGIC, NBD_REP_META_CONTEXT,
    NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
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
TLS_DIR_ENV = "DISKFORGE_NBD_TLS_CERTIFICATES"
TLS_VERIFY_ENV = "DISKFORGE_NBD_TLS_VERIFY_PEER"
WRITES_IN_PLACE = True                    # an export is written where it is (-n)


def open_backend(url: str, **options) -> "NBDBackend":
    return NBDBackend(url, **options)


def open_upload(url: str, **options):
    """There is no creating an export: qemu-img's words, and the way that works."""
    raise UsageError("Protocol driver 'nbd' does not support image creation: an NBD"
                     " export already exists; write into it with 'convert -O raw'",
                     url)


@dataclass(frozen=True)
class TLSConfig:
    """What an ``nbds`` URI asks for: the credentials directory (None: the system CA
    store, no client certificate), whether the server's certificate is checked, and
    the name it must carry (None: the chain only)."""
    certificates: str | None
    verify_peer: bool
    hostname: str | None = None


def _truth(text: str, what: str, url: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{what}={text}: expected true or false", url)


def parse_url(url: str) -> tuple[object, str, "TLSConfig | None"]:
    """``(address, export name, TLS or None)`` of an NBD URI: ``(host, port)`` for
    ``nbd://`` and ``nbds://``, the socket path for ``nbd+unix://`` and
    ``nbds+unix://``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    name = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qs(parts.query)
    tls = None
    if scheme in ("nbds", "nbds+unix"):
        certs = query.get("tls-certificates", [None])[0] or \
            os.environ.get(TLS_DIR_ENV) or None
        verify = query.get("tls-verify-peer", [None])[0]
        if verify is None:
            verify = os.environ.get(TLS_VERIFY_ENV, "true")
        tls = TLSConfig(certs, _truth(verify, "tls-verify-peer", url),
                        query.get("tls-hostname", [None])[0] or
                        (parts.hostname if scheme == "nbds" else None))
        scheme = scheme.replace("nbds", "nbd")
    if scheme == "nbd+unix":
        sockets = query.get("socket")
        if not sockets or not sockets[0]:
            raise UsageError(f"{parts.scheme}:// needs ?socket=PATH", url)
        return sockets[0], name, tls
    if scheme == "nbd":
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise UsageError("the port of an nbd:// URI must be a number", url) from None
        if not parts.hostname:
            raise UsageError(f"{parts.scheme}:// needs a host"
                             f" ({parts.scheme}://HOST[:PORT]/NAME)", url)
        return (parts.hostname, port), name, tls
    raise UsageError("not an NBD URI (nbd[s]://HOST[:PORT]/NAME or"
                     " nbd[s]+unix:///NAME?socket=PATH)", url)


def tls_context(tls: TLSConfig, url: str):
    """The ``ssl`` context for ``tls``: the CA of the directory (or the system's),
    the client certificate when the directory has one (qemu-nbd asks for it by
    default: its ``verify-peer`` is on for servers)."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    certs = tls.certificates
    if certs is not None and not os.path.isdir(certs):
        raise UsageError(f"tls-certificates: '{certs}' is not a directory", url)

    def load(what: str, call, *files: str) -> None:
        try:
            call(*files)
        except (OSError, ssl.SSLError) as e:
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
            raise UsageError(f"cannot load the {what} {files[0]}: {reason}") from None
    if tls.verify_peer:
        if certs is None:
            ctx.load_default_certs()
        else:
            ca = os.path.join(certs, "ca-cert.pem")
            if not os.path.isfile(ca):
                raise UsageError(f"tls-certificates: no CA certificate {ca} (the"
                                 " directory holds ca-cert.pem, client-cert.pem,"
                                 " client-key.pem)", url)
            load("CA certificate", ctx.load_verify_locations, ca)
        ctx.check_hostname = tls.hostname is not None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if certs is not None:
        cert = os.path.join(certs, "client-cert.pem")
        if os.path.isfile(cert):
            load("client certificate", ctx.load_cert_chain, cert,
                 os.path.join(certs, "client-key.pem"))
    return ctx


class NBDBackend(RemoteBackend):
    """One connection to one export, with FileBackend's reading interface. Calls are
    serialised by a lock: one conversation on one socket, whichever thread asks."""

    def __init__(self, url: str, *, writable: bool = False,
                 timeout: float = TIMEOUT) -> None:
        self.path = url
        self.closed = False
        self.writable = writable
        self._dirty = False
        self._tls_hint = ""
        self._lock = threading.Lock()
        self._cookie = 0
        address, self.export, tls = parse_url(url)
        context = tls_context(tls, url) if tls is not None else None
        hostname = tls.hostname if tls is not None else None
        if tls is not None and not (tls.certificates and os.path.isfile(
                os.path.join(tls.certificates, "client-cert.pem"))):
            self._tls_hint = (" (does the server want a client certificate?"
                              " client-cert.pem and client-key.pem in the"
                              " tls-certificates directory)")
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
            self._handshake(context, hostname)
        except BaseException:
            self.sock.close()
            raise
        if writable and self.transmission_flags & NBD_FLAG_READ_ONLY:
            self.close()
            raise ImageIOError(f"the NBD server exports '{self.export}' read-only"
                               " (NBD_FLAG_READ_ONLY): it cannot be written", url)

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
                                       f" sending {what}{self._tls_hint}", self.path)
                got += k
        except socket.timeout:
            raise ImageIOError(f"the NBD server sent no {what} within {TIMEOUT:.0f} s",
                               self.path) from None
        except OSError as e:
            raise ImageIOError(f"reading {what} from the NBD server: {self._why(e)}",
                               self.path) from None

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ImageIOError(f"sending to the NBD server: {self._why(e)}",
                               self.path) from None

    def _why(self, e: OSError) -> str:
        """An OS or TLS error as words; a TLS failure right after the handshake is most
        often the server refusing us for want of a client certificate: say so."""
        text = str(e.strerror or e)
        if self._tls_hint and type(e).__module__ == "ssl":
            text = text.split(" (_ssl.c:")[0] + self._tls_hint
        return text

    def _bad(self, structure: str, field: str, message: str) -> FormatError:
        return FormatError(message, self.path, structure=structure, field=field)

    # -- handshake (proto.md "Fixed newstyle negotiation") ----------------------------
    def _handshake(self, context, hostname: str | None) -> None:
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
        if context is not None:
            self._starttls(context, hostname)
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

    def _starttls(self, context, hostname: str | None) -> None:
        """``NBD_OPT_STARTTLS``, then the TLS handshake on the same socket; the
        server's certificate is checked against the context's CA (and ``hostname``
        when there is one: the URI's host, or ``tls-hostname=``)."""
        import ssl
        self._option_send(NBD_OPT_STARTTLS, b"")
        try:
            for _ in self._option_replies(NBD_OPT_STARTTLS):
                pass
        except _OptionRefused as e:
            raise ImageIOError(f"the NBD server refused TLS (NBD_OPT_STARTTLS answered"
                               f" {e.reply_type & 0x7FFFFFFF:#x}): it offers no TLS; use"
                               " nbd:// for a plain connection", self.path) from None
        if not context.check_hostname:
            hostname = None
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=hostname)
        except ssl.SSLCertVerificationError as e:
            raise ImageIOError("TLS: the NBD server's certificate is not trusted:"
                               f" {e.verify_message or e.reason}", self.path) from None
        except ssl.SSLError as e:
            raise ImageIOError(f"TLS handshake with the NBD server failed:"
                               f" {e.reason or e}{self._tls_hint}", self.path) from None
        except socket.timeout:
            raise ImageIOError(f"the NBD server did not finish the TLS handshake within"
                               f" {TIMEOUT:.0f} s", self.path) from None
        except OSError as e:
            raise ImageIOError(f"TLS handshake with the NBD server failed:"
                               f" {e.strerror or e}", self.path) from None

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
            if rtype == NBD_REP_ERR_TLS_REQD:
                raise ImageIOError("the NBD server requires TLS (NBD_REP_ERR_TLS_REQD):"
                                   " use nbds:// (nbds+unix://) with its CA in"
                                   " tls-certificates=DIR", self.path)
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

    # -- writing (opened with writable=True) ----------------------------------------
    def _refuse(self, *args, **kwargs):
        raise UnsupportedError("the NBD export is open read-only", self.path)

    def _check_write(self, offset: int, length: int) -> None:
        if self.closed:
            raise ImageIOError("write after close", self.path)
        if not self.writable:
            self._refuse()
        if offset < 0 or length < 0 or offset + length > self._size:
            raise UsageError(f"a write at {offset} (+{length}) is past the end of the"
                             f" export ({self._size} bytes); an NBD export cannot grow",
                             self.path)

    def _acks(self, pending: dict[int, tuple[str, int]]) -> None:
        """Read the replies to the requests in ``pending`` (cookie -> what, offset),
        all of them, so the conversation stays in step; then raise the first failure."""
        failure = None
        while pending:
            structured, flags, rtype, cookie, length = self._reply_header()
            if cookie not in pending:
                raise self._bad("reply", "cookie", f"{cookie} answers no request in"
                                " flight")
            what, at = pending[cookie]
            if not structured:
                if length and failure is None:
                    failure = f"the NBD server failed {what} at {at}: {_errno(length)}"
                del pending[cookie]
                continue
            if rtype == NBD_REPLY_TYPE_ERROR or rtype & (1 << 15):
                text = self._error_chunk(length)
                failure = failure or f"the NBD server failed {what} at {at}: {text}"
            elif rtype != NBD_REPLY_TYPE_NONE or length:
                raise self._bad("structured reply", "type",
                                f"{rtype} is not a reply to {what}")
            if flags & NBD_REPLY_FLAG_DONE:
                del pending[cookie]
        if failure:
            raise ImageIOError(failure, self.path)

    def pwrite(self, offset: int, data) -> None:
        """``NBD_CMD_WRITE``: pieces of at most the server's maximum block size, all
        sent before the first reply is read."""
        mv = memoryview(data).cast("B")
        self._check_write(offset, len(mv))
        if not len(mv):
            return
        with self._lock:
            pending: dict[int, tuple[str, int]] = {}
            for pos in range(0, len(mv), self.max_request):
                piece = mv[pos:pos + self.max_request]
                cookie = self._request(NBD_CMD_WRITE, offset + pos, len(piece))
                self._send(piece)
                pending[cookie] = ("a write", offset + pos)
            self._dirty = True
            self._acks(pending)

    def _zeroes(self, offset: int, length: int, flags: int) -> None:
        self._check_write(offset, length)
        if not self.transmission_flags & NBD_FLAG_SEND_WRITE_ZEROES:
            for pos, n in pieces(offset, length, ZERO_BUFFER_SIZE):
                self.pwrite(pos, ZEROES[:n])
            return
        with self._lock:
            pending: dict[int, tuple[str, int]] = {}
            for pos, n in pieces(offset, length, self.max_request):
                pending[self._request(NBD_CMD_WRITE_ZEROES, pos, n, flags)] = \
                    ("a zeroing (NBD_CMD_WRITE_ZEROES)", pos)
            self._dirty = True
            self._acks(pending)

    def punch_hole(self, offset: int, length: int) -> bool:
        """Zeros the server may store as a hole (``NBD_CMD_FLAG_NO_HOLE`` unset)."""
        self._zeroes(offset, length, 0)
        return True

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zeros the server keeps allocated (``NBD_CMD_FLAG_NO_HOLE``), as a file's
        ``write_zeroes`` allocates (``preallocation=full``)."""
        self._zeroes(offset, length, NBD_CMD_FLAG_NO_HOLE)

    def truncate(self, size: int) -> None:
        if size != self._size:
            raise UnsupportedError(f"an NBD export cannot change size ({self._size}"
                                   f" bytes; {size} asked): Cannot grow NBD nodes",
                                   self.path)

    def flush(self, *, durable: bool = True) -> None:
        """``NBD_CMD_FLUSH`` when something was written since the last one."""
        if not self._dirty or self.closed:
            return
        with self._lock:
            self._dirty = False
            if self.transmission_flags & NBD_FLAG_SEND_FLUSH:
                self._acks({self._request(NBD_CMD_FLUSH, 0, 0): ("a flush", 0)})

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            try:
                with self._lock:
                    self._request(NBD_CMD_DISC, 0, 0)
            except (ImageIOError, OSError):
                pass
            self.sock.close()


def _errno(value: int) -> str:
    """An NBD error number as text: the protocol's values are Linux's errno values."""
    try:
        return f"error {value} ({os.strerror(value)})"
    except ValueError:
        return f"error {value}"


class _OptionRefused(Exception):
    """The server answered an option with an error: the option is not available."""

    def __init__(self, reply_type: int) -> None:
        super().__init__(reply_type)
        self.reply_type = reply_type
