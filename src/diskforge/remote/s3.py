"""``s3://bucket/key``: images read from and written to S3 and S3-compatible stores.

Library: boto3 (botocore), the standard client. It already does what must not be written
again here: the credential chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
/``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws/config``/``credentials``, instance
roles), SigV4 signing and region resolution. It is the optional extra ``diskforge[s3]``
and is imported only when an ``s3://`` name is used.

Endpoint, in order: ``endpoint_url=`` given to :func:`open_backend`/:func:`open_upload`,
``DISKFORGE_S3_ENDPOINT`` (what the global ``--s3-endpoint URL`` option sets, so child
processes of a batch see it too), then the standard ``AWS_ENDPOINT_URL_S3`` and
``AWS_ENDPOINT_URL``, then the profile's own setting. With an explicit endpoint (MinIO,
Ceph, moto, R2) requests use path-style addressing, which every S3-compatible server
takes.

Reading (:class:`S3Backend`): one HEAD for the size and ETag, then ranged GETs of
``BLOCK`` bytes. A read that moves on from where the previous one ended starts
readahead: the next ``inflight`` blocks are fetched by a small thread pool while the
caller works on the current one, as nbdcopy keeps several requests in flight. Cached and
pending blocks are capped (``inflight + 2``: 48 MiB by default; those behind the reader
go first), so memory is bounded by the requests in flight, never by the object's size.
Every GET carries ``If-Match: ETAG``: an object replaced mid-read fails with one clear
line instead of mixing two versions into the output. Transient failures (connection
drops, timeouts, a short body, 5xx, throttling) are retried with exponential backoff;
botocore's own retries cover failures before the body, ours the body itself.

Writing (:class:`S3Upload`): a multipart upload whose parts are uploaded by a bounded
pool while the writer goes on (parts may be uploaded in any order: S3 assembles them by
number, which lets a streamed output send its first part, the one holding headers
patched at the end, last). An output of one part or less is one PUT. The object appears
only when the upload completes; ``abort()`` (AbortMultipartUpload) on any failure leaves
nothing under the key and no pending upload. ``remote/upload.py`` turns this into an
output file for the writers (streamed or spooled).
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from concurrent.futures import CancelledError
from urllib.parse import unquote, urlsplit

from ..errors import ImageIOError, UsageError
from . import RemoteBackend

# ranged GETs: 8 MiB each, 4 in flight (S3's own guidance: 8-16 MiB ranges, parallel)
BLOCK = 8 << 20
INFLIGHT = 4
RETRIES = 5               # our attempts at one range (botocore retries inside each too)
BACKOFF = 0.25            # seconds before the first retry; doubled each time, jittered
# multipart: S3's limits (5 MiB minimum part except the last, 10,000 parts, 5 GiB part)
MIN_PART = 5 << 20
PART_SIZE = 8 << 20
MAX_PARTS = 10_000
MAX_PART = 5 << 30
NEEDS_EXTRA = "s3:// needs the s3 extra: pip install 'diskforge[s3]'"


def _boto():
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise UsageError(NEEDS_EXTRA) from None
    return boto3, botocore


def parse(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; a URL naming no object is refused."""
    parts = urlsplit(url)
    bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
    if parts.scheme.lower() != "s3" or not bucket or not key or key.endswith("/"):
        raise UsageError("an S3 object is named s3://BUCKET/KEY", url)
    if parts.query or parts.fragment:
        raise UsageError("an s3:// name takes no ?query or #fragment", url)
    return bucket, key


def endpoint(options: dict) -> str | None:
    """The endpoint URL to use, or None for botocore's own choice (AWS, or an
    ``endpoint_url`` in the profile). The ``AWS_ENDPOINT_URL*`` variables are read
    here too, so botocore releases older than their support (1.31) honour them."""
    env = os.environ.get
    for value in (options.get("endpoint_url"), env("DISKFORGE_S3_ENDPOINT"),
                  env("AWS_ENDPOINT_URL_S3"), env("AWS_ENDPOINT_URL")):
        if value:
            return value
    return None


def client(options: dict | None = None, *, pool: int = INFLIGHT + 2):
    """A boto3 S3 client for the configured endpoint, profile and region."""
    options = options or {}
    boto3, botocore = _boto()
    url = endpoint(options)
    config = botocore.config.Config(
        signature_version="s3v4",
        retries={"max_attempts": 4, "mode": "standard"},
        max_pool_connections=pool,
        connect_timeout=20, read_timeout=60,
        s3={"addressing_style": "path"} if url else None)
    try:
        session = boto3.session.Session(profile_name=options.get("profile"))
        region = options.get("region") or session.region_name
        if region is None and url:
            region = "us-east-1"  # S3-compatible servers take any; SigV4 needs one
        return session.client("s3", endpoint_url=url, region_name=region, config=config)
    except botocore.exceptions.BotoCoreError as e:  # unknown profile, bad endpoint URL
        raise UsageError(f"S3 set-up: {e}") from None


def _code(exc) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _status(exc) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                    "503", "500", "502", "504"}


def transient(exc: BaseException) -> bool:
    """True for a failure worth retrying: the network, a short body, 5xx, throttling."""
    _, botocore = _boto()
    if isinstance(exc, (botocore.exceptions.ConnectionError,
                        botocore.exceptions.HTTPClientError,
                        botocore.exceptions.ResponseStreamingError,
                        botocore.exceptions.IncompleteReadError,
                        ConnectionError, TimeoutError, _ShortBody)):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        return _code(exc) in _TRANSIENT_CODES or _status(exc) >= 500
    return False


def error(exc: BaseException, url: str, doing: str) -> ImageIOError:
    """One line for a failed S3 request: what we were doing and what S3 said."""
    _, botocore = _boto()
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return ImageIOError(f"{doing}: no AWS credentials (set AWS_ACCESS_KEY_ID and"
                            " AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or ~/.aws/credentials)",
                            url)
    code, status = _code(exc), _status(exc)
    if code in ("NoSuchKey", "404", "NotFound"):
        err = ImageIOError(f"Could not open '{url}': No such object")
        err.errno = errno.ENOENT  # callers tell "not there" from failures
        return err
    if code == "NoSuchBucket":
        return ImageIOError(f"{doing}: no such bucket", url)
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return ImageIOError(f"{doing}: access denied ({code})", url)
    if isinstance(exc, botocore.exceptions.ClientError):
        message = exc.response.get("Error", {}).get("Message") or ""
        return ImageIOError(f"{doing}: {code or status} {message}".rstrip(), url)
    return ImageIOError(f"{doing}: {exc}", url)


class _ShortBody(Exception):
    """A GET whose body ended before the range did (a dropped connection)."""


def retrying(fn, url: str, doing: str, *, attempts: int = RETRIES):
    """``fn()``, retried on transient failures with jittered exponential backoff."""
    delay = BACKOFF
    for attempt in range(attempts):
        try:
            return fn()
        except ImageIOError:
            raise
        except Exception as e:
            if attempt + 1 >= attempts or not transient(e):
                if isinstance(e, _ShortBody):
                    raise ImageIOError(f"{doing}: {e} ({attempts} attempts)", url) from None
                raise error(e, url, doing) from None
        time.sleep(delay * (0.5 + random.random()))
        delay *= 2


class S3Backend(RemoteBackend):
    """FileBackend's reading interface over one S3 object (see the module docstring).
    Writes are refused: an object is replaced whole, by :class:`S3Upload`."""
    remote = True  # a whole image of its own, unlike a window into another file

    def __init__(self, url: str, *, block_size: int = BLOCK, inflight: int = INFLIGHT,
                 **options) -> None:
        self.path = url
        self.bucket, self.key = parse(url)
        if block_size < 4096 or inflight < 1:
            raise UsageError("S3 reads need a block of at least 4 KiB and one request",
                             url)
        self.block = block_size
        self.inflight = inflight
        self.client = client(options, pool=inflight + 2)
        try:
            head = retrying(lambda: self.client.head_object(Bucket=self.bucket,
                                                            Key=self.key),
                            url, "reading the object's size (HEAD)")
        except ImageIOError as e:
            if "No such object" in str(e):  # a HEAD's 404 has no body to say which
                self._bucket_exists()
            raise
        self._size = int(head["ContentLength"])
        self.etag = head.get("ETag")
        self.closed = False
        self._lock = threading.Lock()
        self._blocks: dict[int, object] = {}   # block index -> Future[bytes], LRU order
        self._limit = inflight + 2             # the one being read, those ahead, one behind
        self._start = self._end = -(1 << 62)   # the previous read's range
        self._pool = None
        self.requests = 0                      # GETs made (tests and bench read it)

    def _bucket_exists(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001 - only a clear 404 changes the message
            if _status(e) == 404 or _code(e) in ("404", "NoSuchBucket"):
                raise ImageIOError("no such bucket", self.path) from None

    # -- one ranged GET ------------------------------------------------------------------
    def _get(self, index: int) -> bytes:
        start = index * self.block
        end = min(self._size, start + self.block)
        want = end - start

        def attempt() -> bytes:
            extra = {"IfMatch": self.etag} if self.etag else {}
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self.key,
                                           Range=f"bytes={start}-{end - 1}", **extra)
            except Exception as e:
                if _code(e) == "PreconditionFailed" or _status(e) == 412:
                    raise ImageIOError(
                        f"the object changed while it was being read (its ETag is no"
                        f" longer {self.etag}); nothing was written from the new version",
                        self.path) from None
                raise
            with self._lock:
                self.requests += 1
            body = r["Body"]
            try:
                data = body.read()
            finally:
                body.close()
            if len(data) != want:
                raise _ShortBody(f"range {start}-{end - 1} returned {len(data)} of"
                                 f" {want} bytes")
            return data

        return retrying(attempt, self.path, f"reading bytes {start}-{end - 1}")

    def _future(self, index: int, reading: int | None = None):
        """The (possibly pending) block ``index``, most recently used last; the caller
        holds ``_lock``. Over the cap, blocks outside the window around the block being
        read (``reading``: one behind, ``inflight`` ahead) go first, oldest first."""
        fut = self._blocks.pop(index, None)
        if fut is None:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(self.inflight,
                                                thread_name_prefix="diskforge-s3")
            fut = self._pool.submit(self._get, index)
        self._blocks[index] = fut
        if len(self._blocks) > self._limit:
            at = index if reading is None else reading
            keys = [k for k in self._blocks if k != index]
            victims = [k for k in keys if not at - 1 <= k <= at + self.inflight]
            victims += [k for k in keys if k not in victims]
            for k in victims[:len(self._blocks) - self._limit]:
                self._blocks.pop(k).cancel()
        return fut

    def readinto(self, offset: int, buf) -> int:
        """Read up to ``len(buf)`` bytes at ``offset``; short only at the object's end."""
        if self.closed:
            raise ImageIOError("read after close", self.path)
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self._size - offset))
        if n == 0 or offset < 0:
            return 0
        first, last = offset // self.block, (offset + n - 1) // self.block
        nblocks = -(-self._size // self.block)
        with self._lock:
            # moving forward from the previous read, at most a little past its end (a
            # compressed cluster's sectors overlap the next one's): read ahead
            sequential = self._start <= offset <= self._end + (64 << 10)
            self._start, self._end = offset, offset + n
        done = 0
        for i in range(first, last + 1):  # one block at a time: a huge read stays bounded
            with self._lock:
                fut = self._future(i)
                if sequential:
                    for k in range(i + 1, min(i + 1 + self.inflight, nblocks)):
                        if k not in self._blocks:
                            self._future(k, i)
            try:
                data = fut.result()
            except CancelledError:  # evicted by another thread's reads meanwhile
                data = self._get(i)
            lo = max(offset, i * self.block) - i * self.block
            hi = min(offset + n, (i + 1) * self.block) - i * self.block
            mv[done:done + hi - lo] = data[lo:hi]
            done += hi - lo
        return done

    def _refuse(self, *args, **kwargs):
        raise ImageIOError("an S3 object is not written in place; convert to a new"
                           " s3:// name instead", self.path)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self._lock:
            for fut in self._blocks.values():
                fut.cancel()
            self._blocks.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def open_backend(url: str, **options) -> S3Backend:
    """An open read backend for ``s3://bucket/key`` (``remote.open_backend``)."""
    return S3Backend(url, **options)


def part_size_from_environment() -> int:
    """``DISKFORGE_S3_PART_SIZE`` (bytes, at least S3's 5 MiB), else 8 MiB."""
    text = os.environ.get("DISKFORGE_S3_PART_SIZE", "").strip()
    if not text:
        return PART_SIZE
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"DISKFORGE_S3_PART_SIZE={text!r} is not a number of bytes") \
            from None
    if not MIN_PART <= value <= MAX_PART:
        raise UsageError(f"DISKFORGE_S3_PART_SIZE={value}: S3 parts are 5 MiB to 5 GiB")
    return value


class S3Upload:
    """A multipart upload to ``url`` with at most ``inflight`` parts in the air.

    ``part(number, data)`` hands one part over (it blocks while ``inflight`` are
    already uploading, so memory stays bounded); ``complete()`` waits for them all and
    makes the object appear; ``put(data)`` is the one-request form for a small output;
    ``abort()`` cancels, so nothing appears and no parts are left billed."""

    def __init__(self, url: str, *, inflight: int = INFLIGHT, **options) -> None:
        self.url = url
        self.bucket, self.key = parse(url)
        self.client = client(options, pool=inflight + 2)
        self.inflight = inflight
        self.upload_id: str | None = None
        self.etags: dict[int, str] = {}
        self.done = False
        self._slots = threading.BoundedSemaphore(inflight)
        self._pool = None
        self._futures: list = []
        self._failure: BaseException | None = None

    def _start(self) -> None:
        r = retrying(lambda: self.client.create_multipart_upload(Bucket=self.bucket,
                                                                  Key=self.key),
                     self.url, "starting the upload (CreateMultipartUpload)")
        self.upload_id = r["UploadId"]
        from concurrent.futures import ThreadPoolExecutor
        self._pool = ThreadPoolExecutor(self.inflight, thread_name_prefix="diskforge-s3up")

    def _send(self, number: int, data) -> None:
        try:
            r = retrying(lambda: self.client.upload_part(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                PartNumber=number, Body=data),
                self.url, f"uploading part {number}")
            self.etags[number] = r["ETag"]
        except BaseException as e:
            self._failure = self._failure or e
            raise
        finally:
            self._slots.release()

    def part(self, number: int, data) -> None:
        """Upload part ``number`` (1-based) in the background."""
        if not 1 <= number <= MAX_PARTS:
            raise UsageError(f"the output needs more than {MAX_PARTS} parts", self.url)
        if self._failure is not None:
            raise self._failure
        if self.upload_id is None:
            self._start()
        self._slots.acquire()
        if self._failure is not None:
            self._slots.release()
            raise self._failure
        self._futures.append(self._pool.submit(self._send, number, data))

    def put(self, data) -> None:
        """The whole object in one request (an output of at most one part)."""
        retrying(lambda: self.client.put_object(Bucket=self.bucket, Key=self.key,
                                                Body=bytes(data)),
                 self.url, "uploading the object (PutObject)")
        self.done = True

    def complete(self) -> None:
        """Wait for every part, then make the object appear (CompleteMultipartUpload)."""
        for fut in self._futures:
            fut.result()
        if self._failure is not None:
            raise self._failure
        parts = [{"PartNumber": n, "ETag": e} for n, e in sorted(self.etags.items())]
        retrying(lambda: self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
            MultipartUpload={"Parts": parts}),
            self.url, "finishing the upload (CompleteMultipartUpload)")
        self.done = True
        self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Cancel: no object under the key, no pending upload. Never raises."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.upload_id is not None and not self.done:
            try:
                retrying(lambda: self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self.upload_id),
                    self.url, "cancelling the upload (AbortMultipartUpload)")
            except Exception:  # noqa: BLE001 - an abort is best effort, said on stderr
                import sys
                print(f"diskforge: could not cancel the multipart upload"
                      f" {self.upload_id} of {self.url}; a bucket lifecycle rule"
                      " (AbortIncompleteMultipartUpload) removes it", file=sys.stderr)
            self.upload_id = None


def open_upload(url: str, **options) -> S3Upload:
    """A new upload to ``s3://bucket/key`` (``remote.open_upload``)."""
    return S3Upload(url, **options)


def presign(url: str, expires: int = 3600, **options) -> str:
    """A presigned HTTPS GET URL for ``s3://bucket/key``, valid ``expires`` seconds:
    anyone (curl, qemu-img's curl driver, diskforge's http://) reads it without
    credentials."""
    bucket, key = parse(url)
    if not 1 <= expires <= 604800:
        raise UsageError("--expires: 1 second to 7 days (604800), SigV4's limit", url)
    return client(options).generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires)
