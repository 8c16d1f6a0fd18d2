"""VHD, VHDX and VDI differencing disks whose parent is missing (issue 16): they behave
as a qcow2 overlay whose backing file is missing does with qemu-img (test_chains.py).
Plain ``info`` names the parent without opening it and exits 0; commands that open the
chain (``info --backing-chain``, ``check``, ``map``, ``convert``) fail with qemu-img's
nested "Could not open … Could not open backing file: …" words; ``rebase -u`` never
opens the old parent. The parent's identity is checked only when it is opened.

qemu-img cannot make differencing disks of these formats, so the parents are made by
qemu-img and the children by diskforge (whose differencing writers are checked
against libvhdi and VirtualBox's rules in their own modules). qemu-img reads a VHD
differencing disk as a dynamic one (ignoring its parent) and refuses VHDX and VDI
ones, so only the VHD text is compared with qemu-img's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from conftest import cli, need, one_line_error, run

MIB = 1 << 20
FORMATS = {"vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi"}


def ours(*argv: str, cwd: str) -> tuple[int, str, str]:
    """diskforge ARGV in-process from ``cwd``, relative names as a script gives them."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return cli(*argv)
    finally:
        os.chdir(old)


def qemu_raw(path: str, fmt: str) -> bytes:
    out = path + ".qemu.raw"
    run(need("qemu-img"), "convert", "-f", fmt, "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


@pytest.fixture(params=sorted(FORMATS))
def orphan(request, tmp_path):
    """(dir, ext, fmt, base bytes): base.EXT made by qemu-img holding data, top.EXT made
    by diskforge over it, and base.EXT then moved to keep/base.EXT."""
    need("qemu-img")
    ext, fmt = request.param, FORMATS[request.param]
    d = str(tmp_path)
    base = os.path.join(d, f"base.{ext}")
    run("qemu-img", "create", "-q", "-f", fmt, base, "4M")
    run(need("qemu-io"), "-f", fmt, "-c", "write -P 0x5a 1M 64k", base)
    data = qemu_raw(base, fmt)
    code, _, err = ours("create", "-q", "-f", fmt, "-b", f"base.{ext}", "-F", fmt,
                        f"top.{ext}", cwd=d)
    assert code == 0, err
    os.mkdir(os.path.join(d, "keep"))
    shutil.move(base, os.path.join(d, "keep", f"base.{ext}"))
    return d, ext, fmt, data


def test_info_names_a_missing_parent_and_exits_0(orphan):
    d, ext, fmt, _ = orphan
    code, out, err = ours("info", f"top.{ext}", cwd=d)
    assert code == 0, err
    code, js, err = ours("info", "--output", "json", f"top.{ext}", cwd=d)
    assert code == 0, err
    info = json.loads(js)
    if ext == "vdi":  # a VDI stores no parent name: nothing to show when it is gone
        assert "backing file" not in out and "backing-filename" not in info
        return
    assert f"base.{ext} (actual path: base.{ext})\n" in out
    assert f"backing file format: {fmt}\n" in out
    assert info["backing-filename"] == f".\\base.{ext}"
    assert info["full-backing-filename"] == f"base.{ext}"
    assert info["backing-filename-format"] == fmt
    if ext == "vhd":  # qemu-img reads it as a dynamic disk, parent ignored: the same
        # lines, diskforge's two backing lines added
        q = subprocess.run([need("qemu-img"), "info", "top.vhd"], capture_output=True,
                           text=True, cwd=d, timeout=60)
        assert q.returncode == 0, q.stderr
        mine = [line for line in out.splitlines() if not line.startswith("backing file")]
        assert mine == q.stdout.splitlines()


@pytest.mark.parametrize("argv", [("info", "--backing-chain"), ("check",), ("map",),
                                  ("map", "--output", "json"),
                                  ("convert", "-O", "raw")])
def test_commands_that_open_the_chain_fail_as_for_qcow2(orphan, argv):
    d, ext, _, _ = orphan
    args = list(argv) + [f"top.{ext}"] + (["out.raw"] if argv[0] == "convert" else [])
    code, out, err = ours(*args, cwd=d)
    one_line_error(code, err)
    assert code == 1 and out == ""
    assert err.startswith(f"diskforge: Could not open 'top.{ext}': Could not open backing"
                          " file: Could not open "), err
    assert "No such file or directory" in err
    if ext != "vdi":
        assert f"Could not open 'base.{ext}': No such file or directory" in err
    assert not os.path.exists(os.path.join(d, "out.raw"))


def test_rebase_u_with_the_old_parent_missing(orphan):
    d, ext, fmt, data = orphan
    if ext == "vdi":  # a VDI parent is found by its uuid beside the image or above it
        shutil.move(os.path.join(d, "keep", "base.vdi"), os.path.join(d, "moved.vdi"))
        new = "moved.vdi"
    else:
        new = f"keep/base.{ext}"
    code, _, err = ours("rebase", "-u", "-b", new, "-F", fmt, f"top.{ext}", cwd=d)
    assert code == 0, err
    code, out, err = ours("info", "--backing-chain", "--output", "json", f"top.{ext}",
                          cwd=d)
    assert code == 0, err
    assert len(json.loads(out)) == 2
    code, _, err = ours("convert", "-O", "raw", f"top.{ext}", "out.raw", cwd=d)
    assert code == 0, err
    with open(os.path.join(d, "out.raw"), "rb") as f:
        assert f.read() == data


@pytest.mark.parametrize("ext", ["vhd", "vhdx"])
def test_identity_is_checked_only_when_the_parent_is_opened(tmp_path, ext):
    """A different disk put where the parent was: plain info names it (qemu-img's info
    does not open a backing file either); opening the chain refuses it."""
    need("qemu-img")
    d, fmt = str(tmp_path), FORMATS[ext]
    run("qemu-img", "create", "-q", "-f", fmt, os.path.join(d, f"base.{ext}"), "4M")
    assert ours("create", "-q", "-f", fmt, "-b", f"base.{ext}", "-F", fmt, f"top.{ext}",
                cwd=d)[0] == 0
    os.unlink(os.path.join(d, f"base.{ext}"))
    run("qemu-img", "create", "-q", "-f", fmt, os.path.join(d, f"base.{ext}"), "4M")
    code, out, err = ours("info", f"top.{ext}", cwd=d)
    assert code == 0 and f"base.{ext}" in out, err
    code, _, err = ours("info", "--backing-chain", f"top.{ext}", cwd=d)
    one_line_error(code, err)
    assert ("wrong or replaced parent" if ext == "vhd" else "DataWriteGuid") in err
