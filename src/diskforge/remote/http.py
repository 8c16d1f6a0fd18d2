"""``http://`` and ``https://`` images, read with range requests.

A backend with FileBackend's reading interface (see ``remote/__init__``), so every
format plugin reads a web server's object as it reads a local file. Two access patterns
matter, and each gets its own path:

- **Sequential conversion** (the data of an image, read front to back in large pieces):
  a *stream* of readahead windows (1, 2, 4, then ``WINDOW`` = 8 MiB each), fetched by
  ``CONNECTIONS`` threads, each on its own keep-alive connection — nbdcopy's multi-conn
  idea — while the reader copies out of the windows already there. A window is dropped
  once the reader is past it, and a new one is started ahead; the windows held or in
  flight are capped by a semaphore (``CONNECTIONS + 1`` of them), so memory stays
  under ~40 MiB whatever the image size.
- **Small random reads** (headers, L2/BAT/grain tables, probing): served from an LRU
  of recent 64 KiB blocks (``CACHE_BLOCKS`` of them, 4 MiB), each miss one ranged GET
  of the blocks it covers.

A read is taken as sequential when it is large (at least 1 MiB), or is the third small
read in a row to start at most ``SEQ_GAP`` past where the one before ended (a
compressed image's clusters; one table read just after a header is not a pattern,
and starting 23 MiB of readahead for it cost more than it saved); it is then served
from the stream, started there if the stream is elsewhere. Reads are serialised by a lock (the formats'
readers are sequential consumers); the parallelism is in the fetching threads.

**Size and validator without HEAD.** A HEAD request fails on presigned S3 URLs (the
signature covers the method), so the first request is ``GET`` with ``Range: bytes=0-
65535``: its ``Content-Range`` gives the total size, its ``ETag`` / ``Last-Modified``
the validator, and its body is the first cache block (what probing reads first). This
works alike for nginx, Apache, S3 and S3-compatible servers.

**The object must not change under us.** Every later request carries ``If-Match``
(strong ETag) or ``If-Unmodified-Since`` (Last-Modified only), and every response's
validator, ``Content-Range`` start and total are compared with the first: any
difference (or 412 / 416) is one error, "changed while being read", never a mix of
two versions.

**Faults.** Connection resets, timeouts, 5xx, 408/429 and short bodies are retried
with exponential backoff (0.25 s doubling, at most 4 s), ``TRIES`` attempts per range
(a short body resumes where it stopped, and counts against them only when it
brought less than 64 KiB), then one error naming the URL, the byte range and the
last reason. Each socket operation has
``TIMEOUT`` (30 s; ``DISKFORGE_HTTP_TIMEOUT``) so nothing hangs. A server that
ignores ``Range`` (200 with the whole body) is refused with one clear error — unless
the whole object fits in the first answer (up to 64 KiB), which is then simply kept:
a sequential-only fallback would have to download the whole object for every random
read, which a disk image reader makes. 4xx other than those above are permanent
(404: qemu-img's "Could not open ...: No such file").

**Library.** The standard library's ``http.client``: it does exactly what is needed
(keep-alive GETs with headers, ``readinto`` straight into our buffers) with no
dependency for the base install; connection pooling is one connection per fetching
thread, which is all urllib3's pool would give here. https uses the system CA store
(``ssl.create_default_context``); ``sslverify=False`` is qemu's curl driver's
``sslverify=off``, for the Python API only. Credentials in the URL
(``https://user:pass@host/...``) are sent as Basic authentication and never shown in
messages.

**Proxies**, as curl (and so qemu-img's curl driver) takes them from the environment,
through the standard library's ``urllib.request.getproxies()`` and ``proxy_bypass()``:
``http_proxy`` for http:// URLs, ``https_proxy`` for https:// URLs (upper-case names
too; ``all_proxy`` when the scheme's own is unset), ``no_proxy`` for hosts reached
directly (``*`` for all; names, domain suffixes, ``host:port``). A proxy is an
``http://[user:pass@]host[:port]`` (no scheme means http, as curl); its credentials
go in ``Proxy-Authorization``. An http:// URL is asked of the proxy in absolute form
(``GET http://host/path``, RFC 9112 3.2.2), an https:// one through a ``CONNECT``
tunnel (``HTTPSConnection.set_tunnel``), so TLS and the certificate check stay end to
end. Not supported yet: https:// and SOCKS proxies (one clear error). A proxy that
refuses the tunnel with a 4xx (407: credentials) is one error, not retried.

Writing is not supported: "not supported yet: writing to http:// (use s3:// or a
local file)".
"""

from __future__ import annotations

import base64
import collections
import errno
import http.client
import os
import socket
import threading
from urllib.parse import quote, unquote, urljoin, urlsplit

from ..errors import ImageIOError, UnsupportedError, UsageError
from . import RemoteBackend
from .names import shown_url

BLOCK = 64 << 10          # unit of the small-read cache, and of the first request
CACHE_BLOCKS = 64         # 4 MiB of recent small reads (headers, tables)
WINDOW = 8 << 20          # readahead window of the sequential stream, once ramped up
FIRST_WINDOW = 1 << 20
CONNECTIONS = 4           # windows fetched at once, each on its own connection
SEQ_GAP = 1 << 20         # a read starting this far past the last one is still sequential
SEQ_READS = 3             # small reads in a row that make a pattern worth a stream
LARGE_READ = 1 << 20      # a read this large is streamed wherever it is
SMALL_FETCH = 1 << 20     # the most one small-read miss fetches
READ_CHUNK = 1 << 20      # body read in pieces this large (an abandoned window stops)
TIMEOUT = 30.0            # seconds, per connect and per socket read
TRIES = 5
BACKOFF = 0.25            # first retry delay, doubled each time
BACKOFF_MAX = 4.0
MAX_REDIRECTS = 5
USER_AGENT = "diskforge"
WRITE_REFUSED = "not supported yet: writing to http:// (use s3:// or a local file)"
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class _Transient(Exception):
    """A failure worth another try (reset, timeout, 5xx, short body)."""


class _Abandoned(Exception):
    """The reader no longer wants this window (it jumped elsewhere)."""


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, "") or default)
    except ValueError:
        raise UsageError(f"{name} must be a number of seconds") from None
    return value if value > 0 else default


class _Window:
    """One readahead range of the stream: ``[start, end)``, its buffer when fetched."""
    __slots__ = ("start", "end", "future", "abandoned", "buf")

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end, self.future = start, end, None
        self.abandoned = False
        self.buf: bytearray | None = None


class HttpBackend(RemoteBackend):
    """A remote object read with ranged GETs (see the module docstring)."""

    def __init__(self, url: str, *, timeout: float | None = None, tries: int = TRIES,
                 connections: int = CONNECTIONS, window: int = WINDOW,
                 sslverify: bool = True) -> None:
        try:
            parts = urlsplit(url)
        except ValueError as e:  # "Invalid IPv6 URL"
            raise UsageError(f"not a valid URL: {e}", url) from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise UsageError("not an http:// or https:// URL with a host", shown_url(url))
        if any(ord(c) < 0x20 or c == "\x7f" for c in url):
            raise UsageError("a URL with control characters", shown_url(url))
        self.path = url
        self.name = shown_url(url)
        self.timeout = timeout if timeout is not None else _env_float(
            "DISKFORGE_HTTP_TIMEOUT", TIMEOUT)
        self.tries = max(1, int(tries))
        self.connections = max(1, int(connections))
        self.window = max(BLOCK, int(window))
        self.sslverify = sslverify
        self.closed = False
        self._stopping = threading.Event()     # set by close(): backoff waits end
        self._lock = threading.Lock()          # one reader at a time
        self._conn_lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._auth = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._auth = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        self._set_target(url)
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._cond: dict[str, str] = {}
        self._cache: collections.OrderedDict[int, memoryview] = collections.OrderedDict()
        self._windows: collections.deque[_Window] = collections.deque()
        self._next = 0                    # where the stream's next window starts
        self._next_len = min(FIRST_WINDOW, self.window)
        self._last_end: int | None = None
        self._seq_run = 0                 # reads in a row that followed the one before
        self._slots = threading.BoundedSemaphore(self.connections + 1)
        self._free: list[bytearray] = []   # window buffers to reuse (at most the slots)
        self._pool = None
        try:
            self._size = self._discover()
        except BaseException:
            self.close()
            raise

    # -- connections -------------------------------------------------------------------
    def _set_target(self, url: str) -> None:
        p = urlsplit(url)
        self._scheme = p.scheme.lower()
        self._host = p.hostname or ""
        try:
            self._port = p.port
        except ValueError:
            raise UsageError("the URL's port is not a number", self.name) from None
        # a space or other character a request line cannot hold is sent %-quoted (as
        # curl does); what is already %-quoted stays as it is
        path = quote(p.path or "/", safe="/%:@!$&'()*+,;=-._~")
        query = quote(p.query, safe="/%:@!$&'()*+,;=-._~?")
        self._target = path + (f"?{query}" if query else "")
        self._host_header = p.netloc.rpartition("@")[2]
        self._proxy = proxy_for(self._scheme, self._host, self._port, self.name)
        # through an http proxy, a plain-http request names the whole URL (absolute form)
        self._request_target = self._target if self._proxy is None or \
            self._scheme == "https" else f"http://{self._host_header}{self._target}"

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            proxy = self._proxy
            host, port = (proxy.host, proxy.port) if proxy else (self._host, self._port)
            if self._scheme == "https":
                import ssl
                ctx = ssl.create_default_context()
                if not self.sslverify:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                conn = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                                   context=ctx)
                if proxy:  # CONNECT host:port, then TLS to the host through the tunnel
                    conn.set_tunnel(self._host, self._port or 443,
                                    headers=proxy.headers)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            self._local.conn = conn
            with self._conn_lock:
                self._conns.append(conn)
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.used = False
        if conn is not None:
            self._local.conn = None
            conn.close()
            with self._conn_lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def _send(self, headers: dict[str, str]) -> http.client.HTTPResponse:
        """One request on this thread's connection. A kept-alive connection the server
        closed meanwhile (its idle timeout, its request limit) fails before any answer:
        that is asked again at once on a new connection, not counted as a fault."""
        all_headers = {"User-Agent": USER_AGENT, "Host": self._host_header}
        if self._auth:
            all_headers["Authorization"] = self._auth
        if self._proxy is not None and self._scheme == "http":
            all_headers.update(self._proxy.headers)
        all_headers.update(headers)
        for again in (True, False):
            conn = self._conn()
            reused = getattr(self._local, "used", False)
            try:
                conn.request("GET", self._request_target, headers=all_headers)
                resp = conn.getresponse()
                self._local.used = True
                return resp
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as e:
                self._drop_conn()
                if again and reused:
                    continue
                raise _Transient(_reason(e)) from None
            except (OSError, http.client.HTTPException) as e:
                self._drop_conn()
                if type(e).__name__ == "SSLCertVerificationError":  # no retry cures it
                    raise ImageIOError(f"Could not open '{self.name}': the server's TLS"
                                       f" certificate is not trusted ({e.verify_message})"
                                       ) from None
                if str(e).startswith("Tunnel connection failed: 4"):  # the proxy's no
                    raise ImageIOError(f"Could not open '{self.name}': the proxy"
                                       f" {self._proxy.shown} refused the tunnel"
                                       f" ({str(e).partition(': ')[2].strip()})") from None
                raise _Transient(_reason(e)) from None
        raise AssertionError("unreachable")

    def _discard(self, resp: http.client.HTTPResponse) -> None:
        """Finish an unwanted response so its connection can be reused (a small body),
        or drop the connection (a large or unknown one)."""
        try:
            if resp.length is not None and resp.length <= BLOCK:
                resp.read()
                return
        except (OSError, http.client.HTTPException):
            pass
        self._drop_conn()

    # -- the first request: size and validator --------------------------------------------
    def _discover(self) -> int:
        """Learn the size and validator with ``GET Range: bytes=0-65535`` (see the module
        docstring), following redirects, with the same retries as every read."""
        redirects = 0
        delay = BACKOFF
        for attempt in range(1, self.tries + 1):
            if self.closed:
                raise ImageIOError("read after close", self.name)
            try:
                resp = self._send({"Range": f"bytes=0-{BLOCK - 1}"})
                status = resp.status
                if status in (301, 302, 303, 307, 308):
                    location = resp.getheader("Location")
                    self._discard(resp)
                    redirects += 1
                    if not location or redirects > MAX_REDIRECTS:
                        raise ImageIOError(f"HTTP {status}: too many redirects or no"
                                           " Location", self.name)
                    new = urljoin(self._current_url(), location)
                    if urlsplit(new).scheme.lower() not in ("http", "https"):
                        raise ImageIOError(f"HTTP {status} redirects to a non-HTTP URL",
                                           self.name)
                    self._drop_conn()
                    if urlsplit(new).netloc.rpartition("@")[2].lower() != \
                            self._host_header.lower():
                        self._auth = None  # credentials are for the host they named
                    self._set_target(new)
                    continue
                return self._first_response(resp)
            except _Transient as e:
                if attempt == self.tries:
                    raise ImageIOError(f"Could not open '{self.name}': {e} (after"
                                       f" {attempt} tries)") from None
                self._stopping.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        raise AssertionError("unreachable")

    def _current_url(self) -> str:
        port = f":{self._port}" if self._port else ""
        return f"{self._scheme}://{self._host}{port}{self._target}"

    def _first_response(self, resp: http.client.HTTPResponse) -> int:
        status = resp.status
        if status in RETRY_STATUS:
            self._discard(resp)
            raise _Transient(f"HTTP {status} {resp.reason}")
        if status == 416:  # an empty object: no byte 0 to give
            total = _content_range(resp.getheader("Content-Range"), empty=True)
            self._discard(resp)
            if total == 0:
                self._remember_validator(resp)
                return 0
            raise ImageIOError("HTTP 416 for the first 64 KiB of a non-empty object",
                               self.name)
        if status == 200:
            length = resp.length
            if length is not None and length <= BLOCK:
                body = self._read_body(resp, length)
                self._remember_validator(resp)
                if body is not None:
                    self._cache[0] = memoryview(body)
                    return length
            self._drop_conn()
            raise ImageIOError("the server does not support range requests (it answered"
                               " 200 with the whole object); diskforge reads images in"
                               " place and needs them (Accept-Ranges: bytes)", self.name)
        if status != 206:
            self._discard(resp)
            raise _http_error(status, resp.reason, self.name)
        cr = _content_range(resp.getheader("Content-Range"))
        if cr is None:
            self._drop_conn()
            raise ImageIOError("HTTP 206 without a usable Content-Range (bytes A-B/TOTAL)",
                               self.name)
        start, end, total = cr
        if start != 0 or end >= total or end >= BLOCK:
            self._drop_conn()
            raise ImageIOError(f"HTTP 206 with Content-Range {start}-{end}/{total} for"
                               f" bytes 0-{BLOCK - 1}", self.name)
        body = self._read_body(resp, end + 1)
        if body is None:
            raise _Transient("short body")
        self._remember_validator(resp)
        self._cache[0] = memoryview(body)
        return total

    def _read_body(self, resp: http.client.HTTPResponse, length: int) -> bytearray | None:
        buf = bytearray(length)
        got = self._readinto(resp, memoryview(buf))
        return buf if got == length else None

    def _remember_validator(self, resp: http.client.HTTPResponse) -> None:
        self._etag = resp.getheader("ETag")
        self._last_modified = resp.getheader("Last-Modified")
        if self._etag and not self._etag.startswith("W/"):
            self._cond = {"If-Match": self._etag}   # weak ETags never match If-Match
        elif self._last_modified:
            self._cond = {"If-Unmodified-Since": self._last_modified}

    def _check_validator(self, resp: http.client.HTTPResponse) -> None:
        etag = resp.getheader("ETag")
        modified = resp.getheader("Last-Modified")
        if self._etag and etag and etag != self._etag:
            raise self._changed(f"ETag {self._etag} became {etag}")
        if self._last_modified and modified and modified != self._last_modified:
            raise self._changed(f"Last-Modified {self._last_modified} became {modified}")

    def _changed(self, how: str) -> ImageIOError:
        return ImageIOError(f"changed while being read ({how}); read it again once it"
                            " stays put", self.name)

    # -- one ranged GET, with retries ----------------------------------------------------
    def _fetch(self, start: int, mv: memoryview, win: _Window | None = None) -> None:
        """Fill ``mv`` with the object's bytes at ``start``: retried as the module
        docstring says; a short body resumes where it stopped, and counts as a fault
        unless it brought at least a block (so a server that drips a few bytes per
        connection ends in an error, not in a million requests)."""
        got = 0
        failures = 0
        delay = BACKOFF
        while got < len(mv):
            if self.closed:
                raise ImageIOError("read after close", self.name)
            try:
                n = self._get_into(start + got, mv[got:], win)
                got += n
                if got < len(mv) and n < BLOCK:
                    raise _Transient(f"short body ({n} bytes)")
            except _Transient as e:
                failures += 1
                if failures >= self.tries:
                    end = start + len(mv) - 1
                    raise ImageIOError(f"reading bytes {start}-{end} failed after"
                                       f" {failures} tries: {e}", self.name) from None
                self._stopping.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                if win is not None and win.abandoned:
                    raise _Abandoned() from None

    def _get_into(self, pos: int, mv: memoryview, win: _Window | None = None) -> int:
        """One GET of ``[pos, pos+len(mv))``: the bytes it got (all, or some before the
        body ended early). Raises _Transient for what a retry may cure."""
        headers = {"Range": f"bytes={pos}-{pos + len(mv) - 1}", **self._cond}
        resp = self._send(headers)
        status = resp.status
        if status == 206:
            try:
                self._check_validator(resp)
            except ImageIOError:
                self._drop_conn()
                raise
            cr = _content_range(resp.getheader("Content-Range"))
            if cr is None or cr[0] != pos or cr[2] != self._size or cr[1] < pos:
                self._drop_conn()
                if cr is not None and cr[2] != self._size:
                    raise self._changed(f"size {self._size} became {cr[2]}")
                raise ImageIOError(f"HTTP 206 with Content-Range {resp.getheader('Content-Range')!r}"
                                   f" for bytes {pos}-{pos + len(mv) - 1}", self.name)
            want = min(len(mv), cr[1] - pos + 1)
            got = self._readinto(resp, mv[:want], win)
            if got < want:
                self._drop_conn()
                if got == 0:
                    raise _Transient(f"short body (0 of {want} bytes)")
            elif not resp.isclosed():  # more than asked for: unread, so not reusable
                self._drop_conn()
            return got
        if status == 412:
            self._discard(resp)
            raise self._changed("the server says the validator no longer matches (412)")
        if status == 416:
            self._discard(resp)
            raise self._changed("the range is no longer inside it (416)")
        if status in RETRY_STATUS:
            self._discard(resp)
            raise _Transient(f"HTTP {status} {resp.reason}")
        if status == 200:
            self._drop_conn()
            raise ImageIOError("the server stopped honouring range requests (200 with the"
                               " whole object)", self.name)
        self._discard(resp)
        raise _http_error(status, resp.reason, self.name)

    def _readinto(self, resp: http.client.HTTPResponse, mv: memoryview,
                  win: _Window | None = None) -> int:
        """Read the body into ``mv``: the bytes read; fewer when the body ended early or
        the connection broke (then the connection is dropped). A window the reader
        abandoned stops within a chunk, dropping its connection, so that its thread
        serves the reader's new position at once."""
        got = 0
        try:
            while got < len(mv):
                if win is not None and win.abandoned:
                    self._drop_conn()
                    raise _Abandoned()
                n = resp.readinto(mv[got:got + READ_CHUNK])
                if not n:
                    break
                got += n
        except (OSError, http.client.HTTPException):
            self._drop_conn()
        return got

    # -- the reading interface --------------------------------------------------------
    def readinto(self, offset: int, buf) -> int:
        """Read up to ``len(buf)`` bytes at ``offset``; short only at the object's end."""
        if self.closed:
            raise ImageIOError("read after close", self.name)
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self._size - offset))
        if n == 0 or offset < 0:
            return 0
        with self._lock:
            end = offset + n
            if self._last_end is not None and \
                    self._last_end <= offset <= self._last_end + SEQ_GAP:
                self._seq_run += 1
            else:
                self._seq_run = 0
            sequential = n >= LARGE_READ or self._seq_run >= SEQ_READS
            pos = offset
            while pos < end:
                piece = mv[pos - offset:n]
                k = self._from_stream(pos, piece) or self._from_cache(pos, piece)
                if k:
                    pos += k
                elif sequential:
                    self._start_stream(pos)
                else:
                    self._fetch_blocks(pos, end)
            self._last_end = end
        return n

    def _refuse(self, *args, **kwargs):
        raise UnsupportedError(WRITE_REFUSED, self.name)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stopping.set()
        self._drop_stream()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        with self._conn_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                sock = conn.sock
                if sock is not None:  # wake a fetching thread blocked in recv
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._cache.clear()
        self._free.clear()

    # -- small reads: the block cache -------------------------------------------------
    def _from_cache(self, pos: int, out: memoryview) -> int:
        index = pos // BLOCK
        block = self._cache.get(index)
        if block is None:
            return 0
        self._cache.move_to_end(index)
        inner = pos - index * BLOCK
        k = min(len(out), len(block) - inner)
        if k <= 0:
            return 0
        out[:k] = block[inner:inner + k]
        return k

    def _fetch_blocks(self, pos: int, end: int) -> None:
        """Fetch the blocks covering ``[pos, end)`` (at most SMALL_FETCH) into the cache."""
        first = pos // BLOCK * BLOCK
        last = min(self._size, -(-min(end, pos + SMALL_FETCH) // BLOCK) * BLOCK)
        buf = bytearray(last - first)
        self._fetch(first, memoryview(buf))
        mv = memoryview(buf)
        for at in range(first, last, BLOCK):
            # a copy per block: a view would keep the whole fetch alive for as long as
            # any one of its blocks stays cached (64 blocks could pin 64 MiB)
            self._cache[at // BLOCK] = memoryview(bytes(mv[at - first:at - first + BLOCK]))
            self._cache.move_to_end(at // BLOCK)
        while len(self._cache) > CACHE_BLOCKS:
            self._cache.popitem(last=False)

    # -- sequential reads: the readahead stream ----------------------------------------
    def _from_stream(self, pos: int, out: memoryview) -> int:
        w = self._windows
        if not w or pos < w[0].start or pos >= w[-1].end:
            return 0
        while w[0].end <= pos:        # the reader is past it: free its slot
            self._release(w.popleft())
        self._top_up()
        win = w[0]
        try:
            data = win.future.result()
        except BaseException:
            self._drop_stream()
            raise
        inner = pos - win.start
        k = min(len(out), win.end - pos)
        out[:k] = data[inner:inner + k]
        return k

    def _start_stream(self, pos: int) -> None:
        self._drop_stream()
        self._next = pos // BLOCK * BLOCK
        self._next_len = min(FIRST_WINDOW, self.window)
        self._top_up()

    def _top_up(self) -> None:
        """Keep ``connections`` windows scheduled ahead of the reader."""
        while len(self._windows) <= self.connections and self._next < self._size:
            start = self._next
            end = min(self._size, start + self._next_len)
            self._slots.acquire()  # bounded memory: waits for a dropped window's GET
            win = _Window(start, end)
            try:
                win.future = self._executor().submit(self._fetch_window, win)
            except BaseException:
                self._slots.release()
                raise
            self._windows.append(win)
            self._next = end
            self._next_len = min(self.window, self._next_len * 2)

    def _fetch_window(self, win: _Window) -> bytearray | None:
        """The window's bytes, in a buffer of ``self.window`` bytes reused from window
        to window: a fresh 8 MiB bytearray per window costs an mmap, 2048 page
        faults and a munmap each time, which showed as most of the system time."""
        if win.abandoned:
            return None
        try:
            buf = self._free.pop()
        except IndexError:
            buf = bytearray(self.window)
        win.buf = buf
        try:
            self._fetch(win.start, memoryview(buf)[:win.end - win.start], win)
        except _Abandoned:
            return None
        return buf

    def _executor(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(self.connections,
                                            thread_name_prefix="diskforge-http")
        return self._pool

    def _release(self, win: _Window) -> None:
        """Give back ``win``'s slot once its GET is over (cancelled if not started)."""
        win.abandoned = True
        win.future.cancel()
        win.future.add_done_callback(lambda _f: self._recycle(win))

    def _recycle(self, win: _Window) -> None:
        if win.buf is not None and not self.closed:
            self._free.append(win.buf)
            win.buf = None
        self._slots.release()

    def _drop_stream(self) -> None:
        while self._windows:
            self._release(self._windows.popleft())


class Proxy:
    """Where to send a URL's requests instead of its host (see the module docstring):
    ``host``, ``port``, the ``Proxy-Authorization`` header when the proxy URL has
    credentials, and ``shown``, the proxy's URL without them, for messages."""
    __slots__ = ("host", "port", "headers", "shown")

    def __init__(self, host: str, port: int, headers: dict[str, str], shown: str):
        self.host, self.port, self.headers, self.shown = host, port, headers, shown


def proxy_for(scheme: str, host: str, port: int | None, name: str) -> Proxy | None:
    """The proxy the environment gives for ``scheme://host:port`` (``http_proxy``,
    ``https_proxy``, ``all_proxy``, less ``no_proxy``), as curl reads them; None to go
    direct."""
    from urllib.request import getproxies, proxy_bypass
    proxies = getproxies()
    value = (proxies.get(scheme) or proxies.get("all") or "").strip()
    if not value:
        return None
    where = f"{host}:{port}" if port else host
    if proxy_bypass(where):
        return None
    if "://" not in value:
        value = "http://" + value  # curl's default proxy scheme
    try:
        p = urlsplit(value)
        proxy_port = p.port or 1080  # curl's default proxy port
    except ValueError:
        raise UsageError(f"the {scheme}_proxy setting is not a valid proxy URL",
                         name) from None
    shown = f"{p.scheme}://{p.hostname}:{proxy_port}"
    if p.scheme.lower() != "http" or not p.hostname:
        raise UnsupportedError(f"not supported yet: {p.scheme} proxies (the environment"
                               f" gives {shown} for {scheme}:// URLs); use an http://"
                               " proxy, or no_proxy to go direct", name)
    headers = {}
    if p.username is not None:
        pair = f"{unquote(p.username)}:{unquote(p.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(
            pair.encode()).decode("ascii")
    return Proxy(p.hostname, proxy_port, headers, shown)


def _reason(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    text = str(e) or type(e).__name__
    return text if isinstance(e, OSError) else f"{type(e).__name__}: {text}"


def _http_error(status: int, reason: str, name: str) -> ImageIOError:
    if status == 404:  # errno: callers tell "not there" from failures (verify's record)
        err = ImageIOError(f"Could not open '{name}': No such file (HTTP 404 {reason})")
        err.errno = errno.ENOENT
        return err
    if status in (401, 403):
        return ImageIOError(f"Could not open '{name}': Permission denied (HTTP {status}"
                            f" {reason})")
    return ImageIOError(f"HTTP {status} {reason}", name)


def _content_range(value: str | None, empty: bool = False):
    """``(start, end, total)`` from ``bytes A-B/TOTAL``; with ``empty``, the total of
    ``bytes */TOTAL`` (a 416's). None when it is missing or malformed."""
    if not value:
        return None
    unit, _, rest = value.strip().partition(" ")
    if unit.lower() != "bytes":
        return None
    span, _, total = rest.partition("/")
    if not total.strip().isdigit():
        return None
    total_n = int(total)
    if empty:
        return total_n if span.strip() == "*" else None
    a, _, b = span.partition("-")
    if not (a.strip().isdigit() and b.strip().isdigit()):
        return None
    start, end = int(a), int(b)
    if end < start or end >= total_n:
        return None
    return start, end, total_n


def open_backend(url: str, **options) -> HttpBackend:
    """An open read backend for an ``http://`` or ``https://`` URL."""
    if options.get("writable"):
        raise UnsupportedError(WRITE_REFUSED, shown_url(url))
    options.pop("writable", None)
    return HttpBackend(url, **options)


def open_upload(url: str, **options):
    """Writing is not supported: a web server takes no uploads here (``remote.
    open_upload`` asks each scheme; S3 has one)."""
    raise UnsupportedError(WRITE_REFUSED, shown_url(url))
