"""S3 rows: convert the mixed qcow2 straight from an S3-compatible server on loopback
(``diskforge convert s3://... out.raw``) beside what users do today, download then
convert (boto3's ``download_file``, as ``aws s3 cp`` does it, then ``qemu-img convert``),
with the peak RSS of each.

The server, started once in its own process when the case runs and stopped when the
benchmark exits (the object is uploaded once):

- s3rver (Node.js, objects in files; ``npm install --prefix /tmp/s3rver s3rver@3.7.1``,
  then ``DISKFORGE_BENCH_S3RVER=/tmp/s3rver/node_modules/.bin/s3rver``, or ``s3rver`` on
  PATH) when there is one: it serves a 1.2 GiB object at about 130 MB/s here, so the
  row measures the tools;
- else moto's standalone server (``moto[server]``, the test extra): a Python server
  that serves about 19 MB/s here, so with it both tools wait on the server (112 s
  against 108 s last measured) and the row shows only the shape (one pass, no scratch
  copy) and the memory bound.
"""

import atexit
import os
import shutil
import socket
import subprocess
import sys
import time

from cases_qcow2 import qcow2_source
from run import Case, Tool, diskforge_cmd, have

BUCKET = "diskforge-bench"
_server: dict = {}


def _stop():
    proc = _server.get("proc")
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


atexit.register(_stop)


def _available() -> bool:
    from importlib.util import find_spec
    return find_spec("boto3") is not None and find_spec("moto") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _s3rver() -> str | None:
    return os.environ.get("DISKFORGE_BENCH_S3RVER") or shutil.which("s3rver")


def _start(port: int, workdir: str) -> subprocess.Popen:
    """s3rver when there is one (its fixed credentials are S3RVER), else moto."""
    s3rver = _s3rver()
    key = "S3RVER" if s3rver else "bench"
    for name, value in (("AWS_ACCESS_KEY_ID", key), ("AWS_SECRET_ACCESS_KEY", key),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ[name] = value  # inherited by every tool's process
    if s3rver:
        data = os.path.join(workdir, "s3rver-data")
        shutil.rmtree(data, ignore_errors=True)
        os.makedirs(data)
        argv = [s3rver, "-d", data, "-a", "127.0.0.1", "-p", str(port), "-s"]
    else:
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    print(f"S3 server: {os.path.basename(argv[0]) if s3rver else 'moto'}",
          file=sys.stderr)
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _setup(ctx):
    if "s3" in ctx.cache or not _available():
        return
    port = _free_port()
    proc = _start(port, ctx.workdir)
    _server["proc"] = proc
    endpoint = f"http://127.0.0.1:{port}"
    import boto3
    client = boto3.client("s3", endpoint_url=endpoint)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:  # noqa: BLE001 - not listening yet
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the S3 server did not start")
            time.sleep(0.2)
    qcow2_source(ctx)
    client.upload_file(ctx.cache["qcow2"], BUCKET, "mixed.qcow2")
    ctx.cache["s3"] = endpoint


def _url(ctx) -> str:
    return f"s3://{BUCKET}/mixed.qcow2"


_DOWNLOAD = ("import boto3, sys; boto3.client('s3', endpoint_url=sys.argv[1])"
             ".download_file(sys.argv[2], 'mixed.qcow2', sys.argv[3])")


def _download_then_convert(ctx) -> list[str]:
    scratch = ctx.path("s3-download.qcow2")
    out = ctx.path("s3-out.raw")
    script = ('"$0" -c "$1" "$2" "$3" "$4" && qemu-img convert -O raw "$4" "$5";'
              ' s=$?; rm -f "$4"; exit $s')
    return ["sh", "-c", script, sys.executable, _DOWNLOAD, ctx.cache["s3"], BUCKET,
            scratch, out]


CASES = [Case("convert qcow2 from s3", [
    Tool("diskforge", lambda c: diskforge_cmd() + ["--s3-endpoint", c.cache["s3"],
                                                   "convert", "-O", "raw", _url(c),
                                                   c.path("s3-out.raw")],
         output=lambda c: c.path("s3-out.raw"), available=_available),
    Tool("download+qemu-img", _download_then_convert,
         output=lambda c: c.path("s3-out.raw"),
         available=lambda: _available() and have("qemu-img")()),
], setup=_setup)]
