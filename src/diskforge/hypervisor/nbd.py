"""An NBD server over any diskforge BlockDevice (``diskforge serve``).

Protocol: the NBD protocol document (github.com/NetworkBlockDevice/nbd, doc/proto.md).
Implemented (names as in proto.md, defined once in ``nbd_protocol.py``): the fixed
newstyle handshake (``NBD_FLAG_FIXED_NEWSTYLE``, ``NBD_FLAG_NO_ZEROES``); options
``NBD_OPT_EXPORT_NAME``, ``_ABORT``, ``_LIST``, ``_INFO``, ``_GO``, ``_STRUCTURED_REPLY``,
``_LIST_META_CONTEXT`` and ``_SET_META_CONTEXT`` (``NBD_OPT_STARTTLS`` and extended
headers are answered ``NBD_REP_ERR_UNSUP``); commands ``NBD_CMD_READ`` (structured
replies send holes as ``NBD_REPLY_TYPE_OFFSET_HOLE`` chunks), ``_WRITE`` (with
``NBD_CMD_FLAG_FUA``), ``_FLUSH``, ``_TRIM``, ``_WRITE_ZEROES``, ``_BLOCK_STATUS`` for the
``base:allocation`` context (built from ``BlockDevice.extents()``, backing layers
resolved, so clients such as ``qemu-img map`` see the holes) and ``_DISC``.

Safety, the reason most of this module exists:
- One thread per client, at most ``max_clients`` at once; a client that sends garbage
  (a bad magic number, a malformed option, an oversized request) is disconnected and
  nobody else notices. Payloads are bounded (``MAX_PAYLOAD``, advertised through
  ``NBD_INFO_BLOCK_SIZE``; options ``MAX_OPTION``); the handshake has a time limit.
- Every device call goes through one lock per export, and a write is applied only after
  its whole payload has arrived: a client vanishing mid-request never leaves a torn
  write, and formats whose writers are not thread-safe stay consistent.
- Listening is on a Unix socket, or TCP on loopback unless another address is named.

Not implemented: TLS, ``NBD_CMD_CACHE``, ``NBD_CMD_RESIZE``, extended headers, the
``qemu:`` meta contexts; several exports per server.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterator

from ..blockdev import BlockDevice, Extent, ExtentKind, aligned_buffer, chain_extents
from ..errors import DiskforgeError, UsageError
from ..nbd_protocol import (
    NBDMAGIC, IHAVEOPT, NBD_REP_MAGIC, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES,
    NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES, NBD_FLAG_CAN_MULTI_CONN, NBD_OPT_EXPORT_NAME,
    NBD_OPT_ABORT, NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_OPT_INFO, NBD_OPT_GO,
    NBD_OPT_STRUCTURED_REPLY, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT,
    NBD_REP_ACK, NBD_REP_SERVER, NBD_REP_INFO, NBD_REP_META_CONTEXT, NBD_REP_ERR_UNSUP,
    NBD_REP_ERR_INVALID, NBD_REP_ERR_UNKNOWN, NBD_INFO_EXPORT, NBD_INFO_NAME,
    NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE, NBD_CMD_READ, NBD_CMD_WRITE,
    NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES,
    NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_REQ_ONE, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR, NBD_STATE_HOLE, NBD_STATE_ZERO, NBD_EPERM, NBD_EIO,
    NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, BASE_ALLOCATION)

KNOWN_CMD_FLAGS = (NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF
                   | NBD_CMD_FLAG_REQ_ONE)
BASE_ALLOCATION_ID = 1                 # our id for the base:allocation context

# -- limits ------------------------------------------------------------------------------
MAX_PAYLOAD = 32 << 20                 # largest READ/WRITE, as QEMU's own NBD server
MAX_OPTION = 64 << 10                  # largest option payload we read
MAX_OPTIONS = 256                      # options per handshake
MAX_DESCRIPTORS = 8192                 # block status descriptors per reply
PREFERRED_BLOCK = 4096

_REQUEST = struct.Struct(">IHHQQI")    # magic, flags, type, cookie, offset, length
_OPTION = struct.Struct(">QII")        # IHAVEOPT, option, length
_OPT_REPLY = struct.Struct(">QIII")    # magic, option, reply type, length
_SIMPLE = struct.Struct(">IIQ")        # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")       # magic, flags, type, cookie, length


class _Disconnect(Exception):
    """End this client's session (EOF, garbage, or the server closing)."""


def flat_extents(dev: BlockDevice, offset: int, length: int) -> Iterator[Extent]:
    """The extents of what a reader of ``dev`` sees (the chain resolved by
    ``blockdev.chain_extents``), as block status reports them: kind and allocation."""
    for le in chain_extents(dev, offset, length):
        e = le.extent
        yield e if e.host_offset is None else Extent(e.offset, e.length, e.kind,
                                                     e.allocated)


class NBDServer:
    """Serve one BlockDevice as one NBD export. ``start()`` listens in a background
    thread; ``close()`` stops accepting, disconnects every client and joins its thread.

    The device stays owned by the caller (it is not closed here).
    """

    def __init__(self, device: BlockDevice, *, socket_path: str | None = None,
                 host: str = "127.0.0.1", port: int | None = None,
                 read_only: bool = False, export_name: str = "",
                 description: str | None = None, max_clients: int = 16,
                 handshake_timeout: float = 30.0, request_timeout: float = 60.0,
                 log: Callable[[str], None] | None = None):
        if socket_path is None and port is None:
            raise UsageError("NBD server: give a Unix socket path or a TCP port")
        if not read_only and not device.writable:
            raise UsageError("NBD server: the device is open read-only; serve it with"
                             " read_only=True", device.path)
        self.device = device
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self.read_only = read_only
        self.export_name = export_name
        self.description = description or ""
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.request_timeout = request_timeout
        self.log = log or (lambda msg: None)
        self.lock = threading.Lock()  # every device call, from every client
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._clients: dict[int, tuple[threading.Thread, socket.socket]] = {}
        self._clients_lock = threading.Lock()
        self._closing = False
        self._next_id = 0
        self.connections = 0           # accepted so far
        self.dropped = 0               # disconnected for a protocol violation

    # -- addresses ----------------------------------------------------------------------
    @property
    def uri(self) -> str:
        name = self.export_name
        if self.socket_path:
            return f"nbd+unix:///{name}?socket={os.path.abspath(self.socket_path)}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"

    @property
    def transmission_flags(self) -> int:
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_CAN_MULTI_CONN
        if self.read_only:
            return flags | NBD_FLAG_READ_ONLY
        return (flags | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM
                | NBD_FLAG_SEND_WRITE_ZEROES)

    # -- lifetime -----------------------------------------------------------------------
    def start(self) -> "NBDServer":
        if self.socket_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            _remove_stale_socket(self.socket_path)
            try:
                sock.bind(self.socket_path)
            except OSError as e:
                sock.close()
                raise DiskforgeError(f"cannot listen: {e.strerror or e}",
                                     self.socket_path) from None
        else:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
            except OSError as e:
                sock.close()
                raise DiskforgeError(f"cannot listen on {self.host}:{self.port}:"
                                     f" {e.strerror or e}") from None
            self.port = sock.getsockname()[1]
        sock.listen(16)
        sock.setblocking(False)
        self._listener = sock
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._accept_loop, name="nbd-accept",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop: no new clients, current ones disconnected (a request being applied
        finishes first: the lock is taken by it), all threads joined."""
        if self._closing:
            return
        self._closing = True
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(10)
        with self._clients_lock:
            clients = list(self._clients.values())
        for _, sock in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread, _ in clients:
            thread.join(30)
        if self._listener is not None:
            self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self.socket_path:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass

    def __enter__(self) -> "NBDServer":
        if self._listener is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def active_clients(self) -> int:
        with self._clients_lock:
            return len(self._clients)

    # -- accepting ----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._closing:
                for key, _ in sel.select():
                    if key.fileobj is not self._listener or self._closing:
                        continue
                    try:
                        conn, addr = self._listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as e:  # EMFILE and friends: keep serving others
                        self.log(f"accept failed: {e}")
                        continue
                    self._admit(conn, addr)
        finally:
            sel.close()

    def _admit(self, conn: socket.socket, addr) -> None:
        conn.setblocking(True)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._clients_lock:
            if len(self._clients) >= self.max_clients:
                self.log(f"refused a client: {self.max_clients} already connected")
                conn.close()
                return
            self._next_id += 1
            cid = self._next_id
            self.connections += 1
            thread = threading.Thread(target=self._run_client, args=(cid, conn),
                                      name=f"nbd-client-{cid}", daemon=True)
            self._clients[cid] = (thread, conn)
        thread.start()

    def _run_client(self, cid: int, conn: socket.socket) -> None:
        session = _Session(self, conn, cid)
        try:
            session.run()
        finally:
            try:
                conn.close()
            finally:
                with self._clients_lock:
                    self._clients.pop(cid, None)


class _Session:
    """One client connection: handshake, then requests until it leaves."""

    def __init__(self, server: NBDServer, sock: socket.socket, cid: int):
        self.server = server
        self.dev = server.device
        self.sock = sock
        self.cid = cid
        self.structured = False
        self.meta_allocation = False
        self.no_zeroes = False
        self.buf = bytearray()
        self.bufview = memoryview(self.buf)

    def run(self) -> None:
        log = self.server.log
        log(f"client {self.cid} connected")
        try:
            self.sock.settimeout(self.server.handshake_timeout)
            if self.handshake():
                self.sock.settimeout(None)
                self.transmission()
            log(f"client {self.cid} disconnected")
        except _Disconnect as e:
            if str(e):
                self.server.dropped += 1
                log(f"client {self.cid} dropped: {e}")
            else:
                log(f"client {self.cid} disconnected")
        except OSError as e:
            log(f"client {self.cid} connection lost: {e}")
        except Exception as e:  # a bug must cost one connection, never the server
            self.server.dropped += 1
            log(f"client {self.cid} dropped after an internal error: {e!r}")

    # -- socket helpers -----------------------------------------------------------------
    def recv_exact(self, n: int) -> bytes:
        data = bytearray(n)
        self.recv_into(memoryview(data))
        return bytes(data)

    def recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise _Disconnect()
            got += k

    def send(self, *parts) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            sent = self.sock.sendmsg(views)
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def buffer(self, n: int) -> memoryview:
        """A reused, page-aligned buffer of ``n`` bytes: the kernel copies the file's
        pages into it several times faster than into a bytearray at malloc's offset
        (bench/cases_nbd.py)."""
        if len(self.bufview) < n:
            size = max(n, 1 << 20)
            self.buf, start = aligned_buffer(size)
            self.bufview = memoryview(self.buf)[start:start + size]
        return self.bufview[:n]

    # -- handshake ------------------------------------------------------------------------
    def handshake(self) -> bool:
        """Negotiate; True when transmission starts, False when the client aborted."""
        self.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                              NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", self.recv_exact(4))
        if cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
            raise _Disconnect(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & NBD_FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, opt, length = _OPTION.unpack(self.recv_exact(_OPTION.size))
            if magic != IHAVEOPT:
                raise _Disconnect(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise _Disconnect(f"option {opt} of {length} bytes is too large")
            data = self.recv_exact(length)
            if opt == NBD_OPT_EXPORT_NAME:
                if data.decode("utf-8", "replace") != self.server.export_name:
                    raise _Disconnect("unknown export name")
                tail = b"" if self.no_zeroes else bytes(124)
                self.send(struct.pack(">QH", self.dev.size,
                                      self.server.transmission_flags), tail)
                return True
            if opt == NBD_OPT_ABORT:
                self.reply(opt, NBD_REP_ACK)
                return False
            if opt in (NBD_OPT_INFO, NBD_OPT_GO):
                if self.info_or_go(opt, data):
                    return True
            elif opt == NBD_OPT_LIST:
                if data:
                    self.reply_error(opt, NBD_REP_ERR_INVALID, "LIST takes no data")
                    continue
                name = self.server.export_name.encode()
                self.reply(opt, NBD_REP_SERVER, struct.pack(">I", len(name)) + name)
                self.reply(opt, NBD_REP_ACK)
            elif opt == NBD_OPT_STRUCTURED_REPLY:
                if data:
                    self.reply_error(opt, NBD_REP_ERR_INVALID,
                                     "STRUCTURED_REPLY takes no data")
                    continue
                self.structured = True
                self.reply(opt, NBD_REP_ACK)
            elif opt in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
                self.meta_context(opt, data)
            elif opt == NBD_OPT_STARTTLS:
                self.reply_error(opt, NBD_REP_ERR_UNSUP, "TLS is not supported")
            else:
                self.reply_error(opt, NBD_REP_ERR_UNSUP, f"option {opt} is not supported")
        raise _Disconnect(f"more than {MAX_OPTIONS} options")

    def reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.send(_OPT_REPLY.pack(NBD_REP_MAGIC, opt, rtype, len(data)), data)

    def reply_error(self, opt: int, rtype: int, message: str) -> None:
        self.reply(opt, rtype, message.encode())

    def parse_name(self, data: bytes, opt: int) -> tuple[str, int] | None:
        if len(data) < 4:
            self.reply_error(opt, NBD_REP_ERR_INVALID, "option data too short")
            return None
        (n,) = struct.unpack_from(">I", data)
        if 4 + n > len(data):
            self.reply_error(opt, NBD_REP_ERR_INVALID, "export name runs past the option")
            return None
        return data[4:4 + n].decode("utf-8", "replace"), 4 + n

    def info_or_go(self, opt: int, data: bytes) -> bool:
        parsed = self.parse_name(data, opt)
        if parsed is None:
            return False
        name, pos = parsed
        if pos + 2 > len(data):
            self.reply_error(opt, NBD_REP_ERR_INVALID, "information request count missing")
            return False
        (count,) = struct.unpack_from(">H", data, pos)
        pos += 2
        if pos + 2 * count != len(data):
            self.reply_error(opt, NBD_REP_ERR_INVALID, "information requests do not match"
                             " the option length")
            return False
        requests = set(struct.unpack_from(f">{count}H", data, pos))
        if name != self.server.export_name:
            self.reply_error(opt, NBD_REP_ERR_UNKNOWN, f"no export named '{name}'")
            return False
        self.reply(opt, NBD_REP_INFO, struct.pack(">HQH", NBD_INFO_EXPORT, self.dev.size,
                                              self.server.transmission_flags))
        if NBD_INFO_NAME in requests:
            self.reply(opt, NBD_REP_INFO, struct.pack(">H", NBD_INFO_NAME) + name.encode())
        if NBD_INFO_DESCRIPTION in requests and self.server.description:
            self.reply(opt, NBD_REP_INFO, struct.pack(">H", NBD_INFO_DESCRIPTION)
                       + self.server.description.encode()[:4096])
        if NBD_INFO_BLOCK_SIZE in requests:
            self.reply(opt, NBD_REP_INFO, struct.pack(">HIII", NBD_INFO_BLOCK_SIZE, 1,
                                                  PREFERRED_BLOCK, MAX_PAYLOAD))
        self.reply(opt, NBD_REP_ACK)
        return opt == NBD_OPT_GO

    def meta_context(self, opt: int, data: bytes) -> None:
        if opt == NBD_OPT_SET_META_CONTEXT and not self.structured:
            self.reply_error(opt, NBD_REP_ERR_INVALID, "negotiate structured replies first")
            return
        parsed = self.parse_name(data, opt)
        if parsed is None:
            return
        name, pos = parsed
        if pos + 4 > len(data):
            self.reply_error(opt, NBD_REP_ERR_INVALID, "query count missing")
            return
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            if pos + 4 > len(data):
                self.reply_error(opt, NBD_REP_ERR_INVALID, "query runs past the option")
                return
            (n,) = struct.unpack_from(">I", data, pos)
            if pos + 4 + n > len(data):
                self.reply_error(opt, NBD_REP_ERR_INVALID, "query runs past the option")
                return
            queries.append(data[pos + 4:pos + 4 + n].decode("utf-8", "replace"))
            pos += 4 + n
        if pos != len(data):
            self.reply_error(opt, NBD_REP_ERR_INVALID, "trailing bytes after the queries")
            return
        if name != self.server.export_name:
            self.reply_error(opt, NBD_REP_ERR_UNKNOWN, f"no export named '{name}'")
            return
        if opt == NBD_OPT_SET_META_CONTEXT:
            chosen = BASE_ALLOCATION in queries
            self.meta_allocation = chosen
        else:
            chosen = not queries or any(q in (BASE_ALLOCATION, "base:") for q in queries)
        if chosen:
            self.reply(opt, NBD_REP_META_CONTEXT, struct.pack(">I", BASE_ALLOCATION_ID)
                       + BASE_ALLOCATION.encode())
        self.reply(opt, NBD_REP_ACK)

    # -- transmission ------------------------------------------------------------------
    def transmission(self) -> None:
        server = self.server
        header = bytearray(_REQUEST.size)
        hview = memoryview(header)
        while not server._closing:
            self.recv_into(hview)
            magic, flags, cmd, cookie, offset, length = _REQUEST.unpack(header)
            if magic != NBD_REQUEST_MAGIC:
                raise _Disconnect(f"bad request magic {magic:#x}")
            if cmd == NBD_CMD_DISC:
                return
            if cmd == NBD_CMD_WRITE:
                self.do_write(flags, cookie, offset, length)
                continue
            if flags & ~KNOWN_CMD_FLAGS:
                self.error(cookie, NBD_EINVAL, "unknown command flags")
                continue
            if cmd == NBD_CMD_READ:
                self.do_read(flags, cookie, offset, length)
            elif cmd == NBD_CMD_FLUSH:
                self.apply(cookie, lambda: None if server.read_only else self.dev.flush())
            elif cmd in (NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES):
                if server.read_only:
                    self.error(cookie, NBD_EPERM, "the export is read-only")
                elif not self.in_range(offset, length):
                    self.error(cookie, NBD_ENOSPC, "range is beyond the end of the export")
                else:
                    self.apply(cookie, lambda: self.zero(offset, length, flags))
            elif cmd == NBD_CMD_BLOCK_STATUS:
                self.do_block_status(flags, cookie, offset, length)
            else:
                self.error(cookie, NBD_EINVAL, f"command {cmd} is not supported")

    def in_range(self, offset: int, length: int) -> bool:
        return offset + length <= self.dev.size

    def zero(self, offset: int, length: int, flags: int) -> None:
        if length:
            self.dev.write_zeroes(offset, length)
        if flags & NBD_CMD_FLAG_FUA:
            self.dev.flush()

    def apply(self, cookie: int, fn) -> None:
        """Run a device call under the export lock; answer success or NBD_EIO."""
        try:
            with self.server.lock:
                fn()
        except (DiskforgeError, OSError) as e:
            self.server.log(f"client {self.cid}: I/O error: {e}")
            self.error(cookie, NBD_EIO, str(e))
            return
        self.ok(cookie)

    def ok(self, cookie: int) -> None:
        if self.structured:
            self.send(_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                                  NBD_REPLY_TYPE_NONE, cookie, 0))
        else:
            self.send(_SIMPLE.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie))

    def error(self, cookie: int, err: int, message: str) -> None:
        if self.structured:
            msg = message.encode()[:1024]
            payload = struct.pack(">IH", err, len(msg)) + msg
            self.send(_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                                  NBD_REPLY_TYPE_ERROR, cookie, len(payload)), payload)
        else:
            self.send(_SIMPLE.pack(NBD_SIMPLE_REPLY_MAGIC, err, cookie))

    def do_write(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if length > MAX_PAYLOAD:
            # the payload cannot be skipped in bounded memory and time: say why, leave
            self.error(cookie, NBD_EOVERFLOW, f"write of {length} bytes is over the"
                       f" {MAX_PAYLOAD}-byte limit")
            raise _Disconnect(f"write of {length} bytes is over the limit")
        view = self.buffer(length)
        self.sock.settimeout(self.server.request_timeout)
        try:
            self.recv_into(view)  # all of it before anything touches the disk
        finally:
            self.sock.settimeout(None)
        if flags & ~KNOWN_CMD_FLAGS:
            self.error(cookie, NBD_EINVAL, "unknown command flags")
        elif self.server.read_only:
            self.error(cookie, NBD_EPERM, "the export is read-only")
        elif not self.in_range(offset, length):
            self.error(cookie, NBD_ENOSPC, "write is beyond the end of the export")
        else:
            def write():
                self.dev.write(offset, view)
                if flags & NBD_CMD_FLAG_FUA:
                    self.dev.flush()
            self.apply(cookie, write)

    def do_read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if length > MAX_PAYLOAD:
            self.error(cookie, NBD_EOVERFLOW if self.structured else NBD_EINVAL,
                       f"read of {length} bytes is over the {MAX_PAYLOAD}-byte limit")
            return
        if length == 0 or not self.in_range(offset, length):
            self.error(cookie, NBD_EINVAL, "read range is empty or beyond the end")
            return
        view = self.buffer(length)
        try:
            with self.server.lock:
                if self.structured and not flags & NBD_CMD_FLAG_DF:
                    pieces = self.read_pieces(offset, length, view)
                else:
                    self.dev.readinto(offset, view)
                    pieces = None
        except (DiskforgeError, OSError) as e:
            self.server.log(f"client {self.cid}: read error: {e}")
            self.error(cookie, NBD_EIO, str(e))
            return
        if not self.structured:
            self.send(_SIMPLE.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie), view)
            return
        if pieces is None:
            pieces = [(offset, length, True)]
        last = len(pieces) - 1
        for i, (off, n, data) in enumerate(pieces):
            done = NBD_REPLY_FLAG_DONE if i == last else 0
            if data:
                rel = off - offset
                self.send(_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, done,
                                      NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + n),
                          struct.pack(">Q", off), view[rel:rel + n])
            else:
                self.send(_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, done,
                                      NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12),
                          struct.pack(">QI", off, n))

    def read_pieces(self, offset: int, length: int, view: memoryview):
        """Read the data runs into ``view``; (offset, length, is_data) per run, with
        zero runs left as holes (not read, not sent)."""
        pieces: list[list] = []
        for e in flat_extents(self.dev, offset, length):
            data = e.kind is not ExtentKind.ZERO
            if pieces and pieces[-1][2] == data:
                pieces[-1][1] += e.length
            else:
                pieces.append([e.offset, e.length, data])
        for off, n, data in pieces:
            if data:
                rel = off - offset
                self.dev.readinto(off, view[rel:rel + n])
        return [tuple(p) for p in pieces]

    def do_block_status(self, flags: int, cookie: int, offset: int, length: int) -> None:
        if not self.structured or not self.meta_allocation:
            self.error(cookie, NBD_EINVAL, "block status needs structured replies and the"
                       " base:allocation context")
            return
        if length == 0 or not self.in_range(offset, length):
            self.error(cookie, NBD_EINVAL, "block status range is empty or beyond the end")
            return
        descriptors = bytearray()
        count = 0
        limit = 1 if flags & NBD_CMD_FLAG_REQ_ONE else MAX_DESCRIPTORS
        try:
            with self.server.lock:
                prev_state, prev_len = None, 0
                for e in flat_extents(self.dev, offset, length):
                    zero = e.kind is ExtentKind.ZERO
                    state = NBD_STATE_HOLE | NBD_STATE_ZERO if zero else 0
                    if state == prev_state:
                        prev_len += e.length
                        continue
                    if prev_state is not None:
                        descriptors += struct.pack(">II", prev_len, prev_state)
                        count += 1
                        if count >= limit:
                            prev_state = None
                            break
                    prev_state, prev_len = state, e.length
                if prev_state is not None:
                    descriptors += struct.pack(">II", prev_len, prev_state)
        except (DiskforgeError, OSError) as e:
            self.error(cookie, NBD_EIO, str(e))
            return
        payload = struct.pack(">I", BASE_ALLOCATION_ID) + descriptors
        self.send(_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                              NBD_REPLY_TYPE_BLOCK_STATUS, cookie, len(payload)), payload)


def _remove_stale_socket(path: str) -> None:
    """Replace a socket file nobody listens on; refuse anything else."""
    import stat
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DiskforgeError("exists and is not a socket; refusing to replace it", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise DiskforgeError(f"cannot tell whether the socket is in use: {e}", path) from None
    finally:
        probe.close()
    raise DiskforgeError("another server is listening on this socket", path)
