"""_malloc: freed heap memory is kept while a compressed image is read, so the pages
of one batch's buffers serve the next instead of being faulted in again (the page
faults were a third of the system CPU of a stream VMDK -> raw convert)."""

from __future__ import annotations

import filecmp
import os
import platform
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="mallopt thresholds are glibc's")

# a convert in a fresh process, its page faults counted from just before the command
# (the imports' faults left out)
CHILD = r"""
import resource, sys
from diskforge.cli.main import main
from diskforge import _malloc
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rc = main(sys.argv[1:])
print(rc, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "DISKFORGE_MALLOC"}
    env.update(extra)
    return env


def _ask(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", "from diskforge._malloc import"
                           " keep_freed_memory as k; print(k(), k())"],
                          env=env, capture_output=True, text=True, check=True).stdout.split()


def test_set_once_and_the_users_settings_win():
    assert _ask(_child_env()) == ["True", "False"]      # once per process
    assert _ask(_child_env(MALLOC_TRIM_THRESHOLD_="131072")) == ["False", "False"]
    assert _ask(_child_env(MALLOC_MMAP_THRESHOLD_="131072")) == ["False", "False"]
    assert _ask(_child_env(DISKFORGE_MALLOC="glibc")) == ["False", "False"]


def _mixed(path: str, size: int) -> None:
    """Random, text-like and zero extents of 1 MiB (the bench disk's mix, smaller)."""
    rnd = __import__("random").Random(17)
    words = b"the disk image cluster grain table sector boot kernel volume data "
    with open(path, "wb") as f:
        for i in range(size >> 20):
            kind = i % 4
            if kind in (0, 1):
                f.write(rnd.randbytes(1 << 20))
            elif kind == 2:
                f.write((words * ((1 << 20) // len(words) + 1))[:1 << 20])
            else:
                f.write(bytes(1 << 20))


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_stream_vmdk_read_faults_fewer_pages(tmp_path):
    raw, vmdk = str(tmp_path / "d.raw"), str(tmp_path / "d.vmdk")
    _mixed(raw, 256 << 20)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                    "subformat=streamOptimized", raw, vmdk], check=True)
    faults = {}
    for mode, env in (("glibc", _child_env(DISKFORGE_MALLOC="glibc")),
                      ("kept", _child_env())):
        out = str(tmp_path / f"{mode}.raw")
        r = subprocess.run([sys.executable, "-c", CHILD, "convert", "-O", "raw", vmdk, out],
                           env=env, capture_output=True, text=True, check=True)
        rc, n = r.stdout.split()
        assert rc == "0"
        faults[mode] = int(n)
        assert filecmp.cmp(out, raw, shallow=False)
    # 256 MiB of grains are 65,536 pages of decompressed output. Measured on a quiet
    # machine, 8 runs: 19,800-26,900 faults with glibc's thresholds, 3,600-4,900 kept
    # here (first touches of the buffers and lazy imports). The bound is on the kept
    # run alone, with 3x room: glibc's own count slides with its dynamic mmap
    # threshold, which thread timing decides (comparing the two failed once in 15
    # runs on a loaded machine)
    assert faults["kept"] < 65536 // 4, faults
