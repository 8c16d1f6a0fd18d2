"""Shared test helpers: reference-tool checks, sparse-file builders, CLI runners.

Tests that need a reference tool call ``need("qemu-img")`` and skip with the reason when
it is missing; ``.ci/run`` installs every tool, so in CI nothing skips.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
from hypothesis import settings

# Property tests explore a fixed sequence of examples in the suite, so a run can never
# fail by chance (a test that can is a bug): no per-example deadline either, since on a
# loaded machine a slow example is not a wrong one; HYPOTHESIS_PROFILE=explore draws new
# examples for a by-hand search.
settings.register_profile("suite", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

# A suite started in the background by a non-interactive shell (`cmd &`, nohup) inherits
# SIGINT ignored, and so would every diskforge and QEMU process the tests start: the
# tests that interrupt them (boot, serve, convert) then time out. Ctrl-C is what those
# tests exercise, so give this process, and through it each child, the normal handler.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "fixtures")
# Real images made by tools we cannot run here (GPL-family samples stay there; see DESIGN.md).
def _find_real() -> str:
    """``shared/fixtures-real`` beside the checkout (or beside any folder above it, so a
    git worktree nested elsewhere finds it too)."""
    folder = REPO
    while True:
        parent = os.path.dirname(folder)
        candidate = os.path.join(parent, "shared", "fixtures-real")
        if os.path.isdir(candidate) or parent == folder:
            return candidate
        folder = parent


REAL = os.environ.get("DISKFORGE_REAL_FIXTURES") or _find_real()


def need(tool: str) -> str:
    """The path of a reference tool, or skip the test saying which one is missing."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"reference tool '{tool}' is not installed (.ci/run installs it)")
    return path


def need_real(relpath: str) -> str:
    """A real sample: the copy in fixtures/ (permissive licences, listed in SOURCES.tsv),
    else the one in ../shared/fixtures-real; skip when neither is there."""
    path = os.path.join(FIXTURES, relpath)
    if not os.path.exists(path):
        path = os.path.join(REAL, relpath)
    if not os.path.exists(path):
        pytest.skip(f"real fixture {relpath} not found under {REAL}")
    return path


def run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; raise with its stderr when it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``diskforge ARGV`` in this process: (exit status, stdout, stderr)."""
    from diskforge.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse exits
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def cli_merged(*argv: str) -> tuple[int, str, str]:
    """``cli`` with stderr put before stdout in the second field: ``check`` prints its
    findings on stderr and its summary on stdout, as qemu-img does."""
    code, out, err = cli(*argv)
    return code, err + out, err


def cli_process(*argv: str, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m diskforge ARGV`` as a separate process (for exit paths, signals)."""
    return subprocess.run([sys.executable, "-m", "diskforge", *argv], capture_output=True,
                          text=True, **kw)


def qemu_img_json(*argv: str):
    need("qemu-img")
    return json.loads(run("qemu-img", *argv, "--output", "json").stdout)


def make_sparse(path: str, size: int, extents: list[tuple[int, bytes]]) -> str:
    """A sparse raw file of ``size`` bytes holding ``data`` at each ``offset``."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in extents:
            f.seek(off)
            f.write(data)
    return path


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_device(dev) -> str:
    """sha256 of a BlockDevice's whole virtual contents."""
    h = hashlib.sha256()
    off = 0
    while off < dev.size:
        n = min(1 << 20, dev.size - off)
        h.update(dev.read(off, n))
        off += n
    return h.hexdigest()


def one_line_error(code: int, err: str) -> None:
    """The contract for bad input: non-zero exit, one line on stderr, no traceback."""
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line of error, got: {err!r}"
    assert "Traceback" not in err


@pytest.fixture
def workdir(tmp_path):
    return str(tmp_path)


@pytest.fixture
def loop_device():
    """Attach files as loop devices (root and losetup needed; skips otherwise); every
    device is detached again, whatever the test did."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup for loop devices")
    attached = []

    def attach(path: str) -> str:
        proc = subprocess.run(["losetup", "--find", "--show", path], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"loop devices unavailable here: {proc.stderr.strip()}")
        attached.append(proc.stdout.strip())
        return attached[-1]
    yield attach
    for dev in attached:
        subprocess.run(["umount", dev], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def libvhdi_sha256(path: str, parents=()) -> tuple[int, str]:
    """(media size, sha256) of a VHD or VHDX as libvhdi (pyvhdi, from the [test] extra)
    reads it — an independent reader — with ``parents`` (nearest first) as its chain."""
    pyvhdi = pytest.importorskip("pyvhdi", reason="libvhdi-python (the [test] extra)")
    files = []
    for p in (path, *parents):
        f = pyvhdi.file()
        f.open(p)
        files.append(f)
    for child, parent in reversed(list(zip(files, files[1:]))):  # from the bottom up
        child.set_parent(parent)
    top = files[0]
    size, off, h = top.get_media_size(), 0, hashlib.sha256()
    while off < size:
        n = min(1 << 20, size - off)
        h.update(top.read_buffer_at_offset(n, off))
        off += n
    for f in files:
        f.close()
    return size, h.hexdigest()


@pytest.fixture
def vms():
    """start(config) -> a started VM (TCG); every VM is stopped and reaped at the end.
    Here, not in test_hypervisor.py, because test_locks.py starts VMs too."""
    from diskforge.hypervisor.vm import VM
    need("qemu-system-x86_64")
    started: list = []

    def start(config):
        config.accel = "tcg"
        vm = VM(config)
        started.append(vm)
        return vm.start()

    yield start
    for vm in started:
        vm.kill()
        assert vm.proc is None or vm.proc.returncode is not None
