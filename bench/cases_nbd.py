"""NBD export rows: ``qemu-img convert`` reading the mixed disk through ``diskforge
serve``, beside the same read through ``qemu-nbd`` and straight from the file.

The target is QEMU's ``null-co`` driver, so each row measures reading (over NBD, or from
the file) and nothing else. The servers are started once, before the case runs, and
stopped when the benchmark exits.
"""

import atexit
import os
import shutil
import subprocess
import time

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


def _setup(ctx):
    for name, argv in (
            ("df", diskforge_cmd() + ["serve", "--read-only", "-q", ctx.source,
                                      "--socket"]),
            ("qemu-nbd", ["qemu-nbd", "--read-only", "--persistent", "-f", "raw",
                          "--shared", "4", ctx.source, "--socket"])):
        if name == "qemu-nbd" and not shutil.which("qemu-nbd"):
            continue
        sock = ctx.path(f"bench-{name}.sock")
        if sock in ctx.cache:
            continue
        if os.path.exists(sock):
            os.unlink(sock)
        proc = subprocess.Popen(argv + [sock], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _servers.append(proc)
        _wait_socket(sock, proc)
        ctx.cache[sock] = proc


def _read(uri_of):
    return lambda c: ["qemu-img", "convert", "-n", "-f", "raw", uri_of(c),
                      "--target-image-opts", f"driver=null-co,size={c.size}"]


def _uri(name):
    return lambda c: f"nbd+unix:///?socket={c.path(f'bench-{name}.sock')}"


CASES = [
    Case("nbd read (qemu-img convert)", [
        Tool("diskforge", _read(_uri("df")), available=have("qemu-img")),
        Tool("qemu-nbd", _read(_uri("qemu-nbd")), available=have("qemu-nbd")),
        Tool("qemu-img (file)", _read(lambda c: c.source), available=have("qemu-img")),
    ], setup=_setup),
]
