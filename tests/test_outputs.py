"""Where outputs may go and what inputs may be: regular files and block devices only.

Special files are made inside the test's own directory (``mknod``, ``mkfifo``, a bound
socket), never the machine's real /dev nodes; loop devices sit on files in tmp_path
and are detached afterwards (the ``loop_device`` fixture). Every command that could
block on a FIFO runs as a separate process with a timeout, so a regression fails
instead of hanging the suite.
"""

from __future__ import annotations

import fcntl
import json
import os
import plistlib
import shutil
import signal
import socket
import stat
import subprocess
import sys

import pytest
from conftest import FIXTURES, cli, cli_process, need, one_line_error, run, sha256_file

from diskforge.atomic import AtomicFile

TIMEOUT = 30
MIB = 1 << 20


def _random_qcow2(workdir: str, name: str = "src.qcow2", size: int = 24 * MIB) -> str:
    need("qemu-img")
    raw = os.path.join(workdir, name + ".raw")
    with open(raw, "wb") as f:
        f.write(os.urandom(size))
    out = os.path.join(workdir, name)
    run("qemu-img", "convert", "-O", "qcow2", raw, out)
    os.unlink(raw)
    return out


def _special(workdir: str, kind: str) -> str:
    path = os.path.join(workdir, f"target-{kind}")
    if kind == "chr":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null twin
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "sock":
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
    else:
        os.mkdir(path)
    return path


def _fingerprint(path: str) -> tuple:
    st = os.lstat(path)
    return st.st_ino, st.st_mode, st.st_rdev


def _no_temps(workdir: str) -> None:
    assert not [n for n in os.listdir(workdir) if n.endswith(".diskforge-tmp")]


@pytest.mark.parametrize("kind", ["chr", "fifo", "sock", "dir"])
def test_special_output_targets_are_refused_and_left_alone(workdir, kind):
    if kind == "chr" and os.geteuid() != 0:
        pytest.skip("mknod needs root")
    src = _random_qcow2(workdir, size=2 * MIB)
    target = _special(workdir, kind)
    before = _fingerprint(target)
    src_dir = os.path.join(workdir, "tree")
    os.mkdir(src_dir)
    with open(os.path.join(src_dir, "a.txt"), "w") as f:
        f.write("hello")
    commands = [("convert", "-O", "qcow2", src, target), ("convert", "-O", "raw", src, target),
                ("create", "-f", "qcow2", target, "1M"), ("image", src, target),
                ("restore", src, target), ("iso", "build", "-q", src_dir, target)]
    for argv in commands:
        if kind == "fifo":  # could block if opened: a separate process, with a timeout
            proc = cli_process(*argv, timeout=TIMEOUT)
            code, err = proc.returncode, proc.stderr
        else:
            code, _, err = cli(*argv)
        one_line_error(code, err)
        assert "target-" in err, argv
        assert _fingerprint(target) == before, argv
    _no_temps(workdir)


def test_a_dev_null_twin_is_refused_as_qemu_img_refuses_it(workdir):
    """qemu-img 7.2 refuses -O raw onto /dev/null too ("Cannot grow device files")."""
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    src = _random_qcow2(workdir, size=MIB)
    null = _special(workdir, "chr")
    code, _, err = cli("convert", "-O", "raw", src, null)
    one_line_error(code, err)
    assert "is a character device" in err
    theirs = run("qemu-img", "convert", "-O", "raw", src, null, check=False)
    assert theirs.returncode != 0


@pytest.mark.parametrize("fmt", ["qcow2", "vhdx"])
def test_image_written_in_place_on_a_block_device(workdir, loop_device, fmt):
    src = _random_qcow2(workdir, size=6 * MIB)
    disk = os.path.join(workdir, "disk.img")
    with open(disk, "wb") as f:
        f.write(b"\xa5" * (64 * MIB))  # old contents that must not show through
    dev = loop_device(disk)
    code, _, err = cli("convert", "-O", fmt, src, dev)
    assert code == 0, err
    assert stat.S_ISBLK(os.stat(dev).st_mode)   # still the device, written in place
    if fmt == "qcow2":
        assert "No errors were found" in run("qemu-img", "check", "-f", "qcow2", dev).stdout
    assert run("qemu-img", "compare", "-f", "qcow2", "-F", fmt, src, dev).returncode == 0
    code, out, err = cli("info", "-f", fmt, dev)
    assert code == 0 and "6291456" in out.replace(",", ""), err
    _no_temps(workdir)


def test_create_on_a_block_device_and_qemu_reads_it(workdir, loop_device):
    disk = os.path.join(workdir, "disk.img")
    with open(disk, "wb") as f:
        f.write(os.urandom(4 * MIB))
    dev = loop_device(disk)
    code, _, err = cli("create", "-q", "-f", "qcow2", dev, "64M")
    assert code == 0, err
    info = json.loads(run("qemu-img", "info", "-f", "qcow2", "--output", "json", dev).stdout)
    assert info["virtual-size"] == 64 * MIB
    run("qemu-img", "check", "-f", "qcow2", dev)
    assert run("qemu-io", "-f", "qcow2", "-c", "read -P 0 0 64M", dev).returncode == 0


def test_a_too_small_device_is_refused_before_anything_is_written(workdir, loop_device):
    src = _random_qcow2(workdir, size=24 * MIB)
    disk = os.path.join(workdir, "small.img")
    with open(disk, "wb") as f:
        f.write(b"\x5a" * (8 * MIB))
    dev = loop_device(disk)
    before = sha256_file(disk)
    for fmt in ("qcow2", "raw", "vhdx"):
        code, _, err = cli("convert", "-O", fmt, src, dev)
        one_line_error(code, err)
        assert "device is 8388608 bytes, image needs " in err, err
        assert sha256_file(disk) == before, fmt
    # what measure cannot foresee (compressed output is measured as empty) stops at
    # the device's end with the same message, never "Bad file descriptor"
    code, _, err = cli("convert", "-c", "-O", "qcow2", src, dev)
    one_line_error(code, err)
    assert "device is 8388608 bytes, image needs " in err, err


def test_formats_ending_in_a_trailer_say_plainly_they_cannot_go_on_a_device(workdir,
                                                                         loop_device):
    src = _random_qcow2(workdir, size=MIB)
    disk = os.path.join(workdir, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(8 * MIB)
    dev = loop_device(disk)
    for fmt in ("vpc", "dmg"):
        code, _, err = cli("convert", "-O", fmt, src, dev)
        one_line_error(code, err)
        assert "not supported yet: writing this format in place on a block device" in err


def test_a_device_claimed_by_someone_else_is_refused(workdir, loop_device):
    src = _random_qcow2(workdir, size=MIB)
    disk = os.path.join(workdir, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(8 * MIB)
    dev = loop_device(disk)
    held = os.open(dev, os.O_RDONLY | os.O_EXCL)  # as a mount or another tool would
    try:
        code, _, err = cli("convert", "-O", "qcow2", src, dev)
        one_line_error(code, err)
        assert "the device is busy" in err
    finally:
        os.close(held)
    assert not any(open(disk, "rb").read())


def test_image_sidecars_are_never_written_onto_special_files(workdir):
    src = os.path.join(workdir, "disk.raw")
    with open(src, "wb") as f:
        f.write(os.urandom(MIB))
    out = os.path.join(workdir, "out.qcow2")
    os.mkfifo(out + ".integrity.json")
    proc = cli_process("image", src, out, timeout=TIMEOUT)
    one_line_error(proc.returncode, proc.stderr)
    assert "out.qcow2.integrity.json: is a FIFO" in proc.stderr
    assert stat.S_ISFIFO(os.lstat(out + ".integrity.json").st_mode)


def test_iso_extract_never_writes_through_or_replaces_a_fifo(workdir):
    tree = os.path.join(workdir, "tree")
    os.mkdir(tree)
    with open(os.path.join(tree, "a.txt"), "w") as f:
        f.write("hello")
    iso = os.path.join(workdir, "x.iso")
    assert cli("iso", "build", "-q", tree, iso)[0] == 0
    dest = os.path.join(workdir, "dest")
    os.mkdir(dest)
    os.mkfifo(os.path.join(dest, "a.txt"))
    for extra in ([], ["--overwrite"]):
        proc = cli_process("iso", "extract", *extra, iso, dest, timeout=TIMEOUT)
        assert proc.returncode != 0
        assert "refused 'a.txt'" in proc.stderr
        assert stat.S_ISFIFO(os.lstat(os.path.join(dest, "a.txt")).st_mode)


# -- inputs ------------------------------------------------------------------------------

def _assert_refused(proc, name: str, kind: str = "is a FIFO") -> None:
    one_line_error(proc.returncode, proc.stderr)
    assert f"{name}: {kind}" in proc.stderr, proc.stderr
    assert "refused before reading" in proc.stderr


def _assert_refused_reference(proc, name: str) -> None:
    """A FIFO named *by an image* is refused by the open policy, before any open."""
    one_line_error(proc.returncode, proc.stderr)
    assert f"{name}'" in proc.stderr and "a FIFO (named pipe); files an image names must" \
        " be regular files" in proc.stderr, proc.stderr


def test_a_fifo_as_the_image(workdir):
    fifo = os.path.join(workdir, "disk.qcow2")
    os.mkfifo(fifo)
    for argv in (("info", fifo), ("convert", "-O", "raw", fifo, fifo + ".raw"),
                 ("convert", "-f", "qcow2", "-O", "raw", fifo, fifo + ".raw"),
                 ("check", fifo), ("compare", fifo, fifo)):
        _assert_refused(cli_process(*argv, timeout=TIMEOUT), "disk.qcow2")


def test_a_char_device_and_a_socket_as_the_image(workdir):
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    zero = os.path.join(workdir, "zero")
    os.mknod(zero, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # a /dev/zero twin
    _assert_refused(cli_process("info", "-f", "raw", zero, timeout=TIMEOUT), "zero",
                    "is a character device")
    sock = _special(workdir, "sock")
    _assert_refused(cli_process("info", sock, timeout=TIMEOUT), "target-sock", "is a socket")


def test_a_fifo_as_qcow2_backing_file_and_external_data_file(workdir):
    need("qemu-img")
    os.mkfifo(os.path.join(workdir, "base.raw"))
    top = os.path.join(workdir, "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw",
        top, "16M")
    data = os.path.join(workdir, "data.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", data, "16M",
        cwd=workdir)
    os.unlink(os.path.join(workdir, "data.raw"))
    os.mkfifo(os.path.join(workdir, "data.raw"))
    # (plain info names the backing file without opening it, as qemu-img's does)
    for image, name in ((top, "base.raw"), (data, "data.raw")):
        for argv in (("info", "--backing-chain", image),
                     ("convert", "-O", "raw", image, image + ".out")):
            _assert_refused_reference(cli_process(*argv, timeout=TIMEOUT), name)


def test_a_fifo_as_vhdx_parent(workdir):
    parent = os.path.join(workdir, "parent.vhdx")
    child = os.path.join(workdir, "child.vhdx")
    assert cli("create", "-q", "-f", "vhdx", parent, "16M")[0] == 0
    assert cli("create", "-q", "-f", "vhdx", "-b", "parent.vhdx", "-F", "vhdx", child)[0] == 0
    os.unlink(parent)
    os.mkfifo(parent)
    for argv in (("info", child), ("convert", "-O", "raw", child, child + ".raw")):
        _assert_refused_reference(cli_process(*argv, timeout=TIMEOUT), "parent.vhdx")


def test_a_fifo_as_sparse_bundle_info_plist(workdir):
    skeleton = os.path.join(FIXTURES, "dmg", "sparsebundle_skeleton", "hfsplus.sparsebundle")
    bundle = os.path.join(workdir, "b.sparsebundle")
    shutil.copytree(skeleton, bundle)
    plist = os.path.join(bundle, "Info.plist")
    assert b"sparsebundle" in plistlib.dumps(plistlib.loads(open(plist, "rb").read()))
    os.unlink(plist)
    os.mkfifo(plist)
    for argv in (("info", "-f", "sparsebundle", bundle),
                 ("convert", "-f", "sparsebundle", "-O", "raw", bundle, bundle + ".raw")):
        _assert_refused_reference(cli_process(*argv, timeout=TIMEOUT), "Info.plist")
    proc = cli_process("info", bundle, timeout=TIMEOUT)  # probing does not read it either
    one_line_error(proc.returncode, proc.stderr)


def test_user_named_side_inputs_are_refused_too(workdir):
    fifo = os.path.join(workdir, "key.pub")
    os.mkfifo(fifo)
    proc = cli_process("iso", "cloud-init", os.path.join(workdir, "seed.iso"),
                       "--ssh-key", fifo, timeout=TIMEOUT)
    _assert_refused(proc, "key.pub")
    img = os.path.join(workdir, "x.raw")
    with open(img, "wb") as f:
        f.truncate(MIB)
    os.mkfifo(img + ".integrity.json")
    _assert_refused(cli_process("verify", img, timeout=TIMEOUT), "x.raw.integrity.json")


# -- leftovers of a killed run -----------------------------------------------------------

_HOLD = """
import sys, time
from diskforge.atomic import AtomicFile
f = AtomicFile(sys.argv[1])
f.pwrite(0, b"partial")
print(f.tmp_path, flush=True)
time.sleep(60)
"""


def _temp_holder(target: str) -> tuple[subprocess.Popen, str]:
    """A real diskforge AtomicFile owned by a live process: (process, temp path)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, target], stdout=subprocess.PIPE,
                            text=True)
    return proc, proc.stdout.readline().strip()


def test_stale_temp_of_a_killed_run_is_removed_and_nothing_else(workdir):
    src = os.path.join(workdir, "disk.raw")
    with open(src, "wb") as f:
        f.write(os.urandom(MIB))
    out = os.path.join(workdir, "out.qcow2")
    dead, stale = _temp_holder(out)
    live, alive = _temp_holder(out)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(TIMEOUT)
        others = [os.path.join(workdir, n) for n in (
            ".other.qcow2.0123abcd.diskforge-tmp",     # another target's
            ".out.qcow2.notours.diskforge-tmp",        # not our naming
            ".out.qcow2.0123abcd.diskforge-tmp.keep")]  # not our suffix
        for p in others:
            open(p, "wb").close()
        os.mkfifo(os.path.join(workdir, ".out.qcow2.feedf00d.diskforge-tmp"))
        proc = cli_process("convert", "-O", "qcow2", src, out, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stderr.splitlines()
        assert lines == [f"diskforge: removed {stale}, a temporary file left by an"
                         " interrupted run"]
        assert not os.path.exists(stale)
        assert os.path.exists(alive)          # its owner still holds its flock
        assert all(os.path.exists(p) for p in others)
        assert stat.S_ISFIFO(os.lstat(os.path.join(
            workdir, ".out.qcow2.feedf00d.diskforge-tmp")).st_mode)
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, out)
    finally:
        live.kill()
        live.wait(TIMEOUT)


def test_the_owner_holds_a_flock_for_its_whole_life(workdir):
    out = os.path.join(workdir, "x.raw")
    f = AtomicFile(out)
    try:
        fd = os.open(f.tmp_path, os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    finally:
        f.discard()
    _no_temps(workdir)


def test_a_resumable_partial_is_kept_by_other_runs(workdir):
    """An interrupted ``image`` past a checkpoint keeps its partial output for
    ``--resume``; a later run onto the same name must not take it for a leftover."""
    from diskforge import open as open_image
    from diskforge.ops import imaging
    from diskforge.registry import get
    src_path = os.path.join(workdir, "disk.raw")
    with open(src_path, "wb") as f:
        f.write(os.urandom(6 * MIB))
    out = os.path.join(workdir, "out.qcow2")
    qcow2 = get("qcow2")

    def stop_after_two_checkpoints(done, total):
        if done > 3 * MIB:
            raise KeyboardInterrupt

    with open_image(src_path, "raw") as src:
        writer = qcow2.writer(out, src.size, qcow2.options.parse(""))
        with pytest.raises(KeyboardInterrupt):
            imaging.image(src, writer, out, fmt_name="qcow2", chunk=MIB,
                          checkpoint_every=MIB, progress=stop_after_two_checkpoints)
    state = imaging.load_resume(out)
    partial = state["writer"]["partial"]
    assert os.path.exists(partial)
    code, _, err = cli("convert", "-O", "qcow2", src_path, out)  # same target name
    assert code == 0 and "removed" not in err, err
    assert os.path.exists(partial)
    with open_image(src_path, "raw") as src:
        writer = qcow2.resume_writer(out, src.size, qcow2.options.parse(""),
                                     state=state["writer"])
        res = imaging.image(src, writer, out, fmt_name="qcow2", chunk=MIB,
                            checkpoint_every=MIB, resume=state)
    assert res.resumed_from > 0 and res.sha256 == sha256_file(src_path)
    _no_temps(workdir)


def test_iso_build_onto_a_block_device(workdir, loop_device):
    need("isoinfo")
    tree = os.path.join(workdir, "tree")
    os.mkdir(tree)
    with open(os.path.join(tree, "big.bin"), "wb") as f:
        f.write(os.urandom(MIB))
    disk = os.path.join(workdir, "stick.img")
    with open(disk, "wb") as f:
        f.write(b"\xee" * (4 * MIB))
    code, _, err = cli("iso", "build", "-q", tree, loop_device(disk))
    assert code == 0, err
    listing = run("isoinfo", "-R", "-i", disk, "-f").stdout
    assert "/big.bin" in listing
    small = os.path.join(workdir, "small.img")
    with open(small, "wb") as f:
        f.truncate(512 * 1024)
    code, _, err = cli("iso", "build", "-q", tree, loop_device(small))
    one_line_error(code, err)
    assert "device is 524288 bytes, image needs " in err
    assert not any(open(small, "rb").read())
