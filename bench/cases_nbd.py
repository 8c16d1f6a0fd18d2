"""NBD export rows: ``qemu-img convert`` reading the mixed disk through ``diskforge
serve``, beside the same read through ``qemu-nbd`` and straight from the file; once for
the raw disk and once for a qcow2 of it (made by qemu-img, the same file
``cases_qcow2`` converts from).

The target is QEMU's ``null-co`` driver, so each row measures reading (over NBD, or from
the file) and nothing else. The servers are started once per image, before its case
runs, on sockets named for this process, and stopped when the benchmark exits.

Measured on the 2 GiB mixed disk (``python bench/run.py --dir /tmp/dfbench -k nbd
--repeat 5``, 2 shared cores), best of 5, diskforge/tool in brackets:

    raw    diskforge serve 0.73 s   qemu-nbd 1.54 s (0.47)   qemu-img on the file 0.36 s (1.99)
    qcow2  diskforge serve 0.62 s   qemu-nbd 1.09 s (0.57)   qemu-img on the file 0.36 s (1.71)

(an earlier, busier run: raw 1.07 / 2.39 / 0.61 s, qcow2 0.88 / 1.95 / 0.52 s; the
ratios held).

The server reads into one page-aligned buffer per client. That cut its CPU time for a
client's first pass over the raw disk from 1.15 s to 0.5 s (wall 1.84 s to 1.26 s,
busy machine; qcow2: 0.75 s to 0.35 s of CPU). Best-of-5 rows move less (raw 0.79 ->
0.73 s, qcow2 0.76 -> 0.62 s, old and new in one quiet spell): later clients of the
old server often got a well-placed buffer from malloc. What remains is the client's
side and the copy through the socket (cProfile of the server: sendmsg, then preadv,
its own Python a few percent), so os.sendfile, which would only save the server the
copy into that buffer, was not taken.
"""

import atexit
import os
import shutil
import subprocess
import time

from cases_qcow2 import qcow2_source
from run import Case, Tool, diskforge_cmd, have

_servers = []


def _stop_servers():
    for proc in _servers:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


atexit.register(_stop_servers)


def _wait_socket(path, proc):
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"NBD server for {path} did not start")
        time.sleep(0.05)


def _sock(ctx, server, fmt):
    return ctx.path(f"bench-{server}-{fmt}-{os.getpid()}.sock")


def _image(ctx, fmt):
    if fmt == "qcow2":
        qcow2_source(ctx)
        return ctx.cache["qcow2"]
    return ctx.source


def _setup(fmt):
    def setup(ctx):
        image = _image(ctx, fmt)
        for name, argv in (
                ("df", diskforge_cmd() + ["serve", "--read-only", "-q", "-f", fmt, image,
                                          "--socket"]),
                ("qemu-nbd", ["qemu-nbd", "--read-only", "--persistent", "-f", fmt,
                              "--shared", "4", image, "--socket"])):
            if name == "qemu-nbd" and not shutil.which("qemu-nbd"):
                continue
            sock = _sock(ctx, name, fmt)
            if sock in ctx.cache:
                continue
            if os.path.exists(sock):
                os.unlink(sock)
            proc = subprocess.Popen(argv + [sock], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            _servers.append(proc)
            _wait_socket(sock, proc)
            ctx.cache[sock] = proc
    return setup


def _read(fmt, uri_of):
    return lambda c: ["qemu-img", "convert", "-n", "-f", fmt, uri_of(c),
                      "--target-image-opts", f"driver=null-co,size={c.size}"]


def _uri(server, fmt):
    return lambda c: f"nbd+unix:///?socket={_sock(c, server, fmt)}"


def _case(fmt):
    return Case(f"nbd read {fmt} (qemu-img)", [
        Tool("diskforge", _read("raw", _uri("df", fmt)), available=have("qemu-img")),
        Tool("qemu-nbd", _read("raw", _uri("qemu-nbd", fmt)), available=have("qemu-nbd")),
        Tool("qemu-img (file)", _read(fmt, lambda c: _image(c, fmt)),
             available=have("qemu-img")),
    ], setup=_setup(fmt))


CASES = [_case("raw"), _case("qcow2")]
