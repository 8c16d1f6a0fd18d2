"""QEMU's image locks, both ways, against the real holders: ``qemu-nbd`` (writable,
``--shared``, ``-r``), a running ``qemu-system-x86_64`` and ``qemu-img``.

The oracle for which bytes a holder locks is the kernel's own list, /proc/locks: what
diskforge holds for a reader or a writer must be exactly what qemu-nbd holds for the
same kind of export of the same image. The refusals are checked by their messages
(qemu-img's wording), by exit status, and by the held image's bytes staying the same.

Every process is started with a deadline and killed and reaped in a finalizer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import cli, need, one_line_error, run, sha256_file
from test_hypervisor import _attached_files, hotplug_vm, qcow2_disk

from diskforge.hypervisor.vm import Drive, VMConfig

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
WRITER_BYTES = {100, 101, 103, 201, 203}   # consistent read, write, resize; unshared W, R
READER_BYTES = {100, 201, 203}             # consistent read; unshared write, resize
IN_USE = "Is another process using the image"


def held(path: str) -> set[int]:
    """The bytes of ``path`` some process holds an OFD lock on (from /proc/locks)."""
    st = os.stat(path)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts or len(parts) < 8 or parts[1] != "OFDLCK" \
                    or parts[5] != ident or not parts[7].isdigit():
                continue
            out.update(range(int(parts[6]), int(parts[7]) + 1))
    return out


def wait_held(path: str, want: set[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while held(path) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: locks {sorted(held(path))},"
                                 f" expected {sorted(want)}")
        time.sleep(0.05)


@pytest.fixture
def procs():
    """start(argv, {file: expected_bytes}) -> a started process, once it holds those
    locks; every process is killed and reaped at the end, whatever the test did."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], want: dict[str, set[int]]) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        started.append(p)
        try:
            for path, bytes_ in want.items():
                wait_held(path, bytes_)
        except AssertionError:
            p.kill()
            raise AssertionError(f"{argv[0]} did not take its locks: "
                                 f"{p.communicate(timeout=10)[1]!r}") from None
        return p

    yield start
    for p in started:
        p.kill()
        p.communicate(timeout=10)


def chain(d) -> tuple[str, str]:
    """A qcow2 overlay over a qcow2 base, both with data."""
    base = qcow2_disk(str(d / "base.qcow2"), 4 * MiB)
    top = str(d / "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", base)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 1M 1M", top)
    return base, top


def qemu_nbd(tmp_path, image: str, *extra: str) -> list[str]:
    return [need("qemu-nbd"), "--persistent", "--socket", str(tmp_path / "nbd.sock"),
            "-f", "qcow2", *extra, image]


def refused(argv, image: str, phrase: str) -> str:
    code, out, err = cli(*argv)
    one_line_error(code, err)
    assert phrase in err and IN_USE in err and f"[{image}]" in err, err
    return err


@pytest.mark.parametrize("writable", [False, True], ids=["reader", "writer"])
def test_diskforge_holds_the_bytes_qemu_nbd_holds(tmp_path, procs, writable):
    import diskforge
    need("qemu-img")
    base, top = chain(tmp_path)
    p = procs(qemu_nbd(tmp_path, top, *(() if writable else ("-r",))),
              {top: WRITER_BYTES if writable else READER_BYTES, base: READER_BYTES})
    qemu = held(top), held(base)
    p.kill()
    p.communicate(timeout=10)
    wait_held(top, set())
    wait_held(base, set())
    with diskforge.open(top, writable=writable):
        assert (held(top), held(base)) == qemu
    assert held(top) == held(base) == set()  # released on close


def test_qemu_nbd_writing_refuses_diskforge_and_minus_U_reads(tmp_path, procs):
    need("qemu-img")
    base, top = chain(tmp_path)
    procs(qemu_nbd(tmp_path, top), {top: WRITER_BYTES, base: READER_BYTES})
    before = sha256_file(top), sha256_file(base)
    # qemu-img's own refusals, for the wording
    q = run("qemu-img", "info", top, check=False)
    assert q.returncode != 0 and 'Failed to get shared "write" lock' in q.stderr
    q = run("qemu-img", "resize", top, "+1M", check=False)
    assert q.returncode != 0 and 'Failed to get "write" lock' in q.stderr

    refused(["info", top], top, 'Failed to get shared "write" lock')
    refused(["resize", top, "+1M"], top, 'Failed to get "write" lock')
    refused(["snapshot", "-c", "s1", top], top, 'Failed to get "write" lock')
    refused(["commit", top], top, "lock")
    out = str(tmp_path / "out.raw")
    refused(["convert", "-O", "raw", top, out], top, 'Failed to get shared "write" lock')
    assert not os.path.exists(out)
    assert (sha256_file(top), sha256_file(base)) == before

    # -U: the reads go through, and read what qemu-img -U reads
    code, text, err = cli("info", "-U", top)
    assert code == 0 and "backing file: base.qcow2" in text, err
    assert cli("convert", "-U", "-O", "raw", top, out)[0] == 0
    run("qemu-img", "convert", "-U", "-O", "raw", top, str(tmp_path / "qemu.raw"))
    assert sha256_file(out) == sha256_file(str(tmp_path / "qemu.raw"))
    assert cli("map", "-U", top)[0] == 0
    assert cli("compare", "-U", top, str(tmp_path / "qemu.raw"))[0] == 0
    # an overlay of the busy disk (an external snapshot) only needs its size: as qemu-img
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2",
        str(tmp_path / "qemu-overlay.qcow2"))
    code, _, err = cli("create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2",
                       str(tmp_path / "overlay.qcow2"))
    assert code == 0, err
    # -U never lets a write through: qemu-img's message
    code, _, err = cli("snapshot", "-U", "-c", "s1", top)
    one_line_error(code, err)
    assert "force-share=on can only be used with read-only images" in err
    assert (sha256_file(top), sha256_file(base)) == before


@pytest.mark.parametrize("variant", ["-r", "--shared=2"])
def test_qemu_nbd_variants(tmp_path, procs, variant):
    """A read-only export lets readers in and keeps writers out; a multi-client writable
    export (--shared) keeps both out."""
    need("qemu-img")
    base, top = chain(tmp_path)
    read_only = variant == "-r"
    procs(qemu_nbd(tmp_path, top, variant),
          {top: READER_BYTES if read_only else WRITER_BYTES, base: READER_BYTES})
    refused(["resize", top, "+1M"], top, 'Failed to get "write" lock')
    refused(["snapshot", "-c", "s1", top], top, 'Failed to get "write" lock')
    if read_only:
        assert cli("info", top)[0] == 0
        assert cli("convert", "-O", "raw", top, str(tmp_path / "o.raw"))[0] == 0
        # the failed writer attempt took its extra bytes back
        assert held(top) == READER_BYTES
    else:
        refused(["info", top], top, 'Failed to get shared "write" lock')
        assert cli("info", "-U", top)[0] == 0


def test_running_vm_holds_its_disk(tmp_path, vms):
    need("qemu-img")
    base, top = chain(tmp_path)
    vms(VMConfig(machine="none", drives=[Drive(top, "qcow2", id="disk0", device=None)]))
    wait_held(top, WRITER_BYTES)
    wait_held(base, READER_BYTES)
    before = sha256_file(top), sha256_file(base)
    refused(["info", top], top, 'Failed to get shared "write" lock')
    refused(["resize", top, "+1M"], top, 'Failed to get "write" lock')
    refused(["snapshot", "-c", "s1", top], top, 'Failed to get "write" lock')
    refused(["commit", top], top, "lock")
    refused(["convert", "-O", "qcow2", top, str(tmp_path / "o.qcow2")], top, "lock")
    # the base is read by the VM: diskforge may read it, not write it
    assert cli("info", base)[0] == 0
    refused(["resize", base, "+1M"], base, 'Failed to get "write" lock')
    assert (sha256_file(top), sha256_file(base)) == before
    code, text, err = cli("info", "-U", "--output", "json", top)
    assert code == 0 and '"virtual-size": 4194304' in text, err
    assert cli("convert", "-U", "-O", "raw", top, str(tmp_path / "o.raw"))[0] == 0


def test_attach_hands_the_image_over_and_detach_gives_it_back(tmp_path, vms):
    """``attach`` looks at the image, closes it, then QEMU opens it (no self-deadlock);
    while QEMU has it read-write diskforge may not touch it, after detach it may."""
    need("qemu-img")
    base, top = chain(tmp_path)
    vm = hotplug_vm(vms, tmp_path)
    code, out, err = cli("attach", "--qmp", vm.qmp_socket, "--device", "scsi", "--rw", top)
    assert code == 0, err
    assert _attached_files(vm)[top]["inserted"]["ro"] is False
    wait_held(top, WRITER_BYTES)
    refused(["resize", top, "+1M"], top, 'Failed to get "write" lock')
    refused(["info", top], top, 'Failed to get shared "write" lock')
    code, out, err = cli("detach", "--qmp", vm.qmp_socket, top)
    assert code == 0, err
    wait_held(top, set())
    assert cli("resize", "-q", top, "+1M")[0] == 0


def test_diskforge_writing_refuses_qemu_img(tmp_path):
    import diskforge
    need("qemu-img")
    base, top = chain(tmp_path)
    with diskforge.open(top, writable=True) as dev:
        dev.write(0, b"x" * 512)
        q = run("qemu-img", "info", top, check=False)
        assert q.returncode == 1 and 'Failed to get shared "write" lock' in q.stderr
        q = run("qemu-img", "resize", top, "+1M", check=False)
        assert q.returncode == 1 and 'Failed to get "write" lock' in q.stderr
        q = run("qemu-img", "resize", base, "+1M", check=False)  # the backing file too
        assert q.returncode == 1 and 'Failed to get "write" lock' in q.stderr
        assert run("qemu-img", "info", "-U", top).returncode == 0
        assert run("qemu-img", "info", base).returncode == 0   # readers share
    assert held(top) == held(base) == set()
    run("qemu-img", "resize", top, "+1M")
    run("qemu-img", "check", top)


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_diskforge_serve_holds_what_its_export_needs(tmp_path, procs, read_only):
    need("qemu-img")
    base, top = chain(tmp_path)
    argv = [sys.executable, "-m", "diskforge", "serve", top, "--socket",
            str(tmp_path / "df.sock")] + (["--read-only"] if read_only else [])
    procs(argv, {top: READER_BYTES if read_only else WRITER_BYTES, base: READER_BYTES})
    q = run("qemu-img", "info", top, check=False)
    assert (q.returncode == 0) == read_only, q.stderr
    q = run("qemu-img", "resize", top, "+1M", check=False)
    assert q.returncode == 1 and 'Failed to get "write" lock' in q.stderr
    # a VM can still reach the disk: through the export, not the file
    q = run("qemu-img", "info", "-f", "raw",
            f"nbd+unix:///?socket={tmp_path / 'df.sock'}", timeout=30)
    assert "virtual size: 4 MiB" in q.stdout


def test_own_opens_share_one_holder_and_minus_U_holds_only_read(tmp_path):
    """diskforge's own opens of one file never refuse each other (commit reads the
    chain and writes the base): other processes see the union of what they hold."""
    import diskforge
    from diskforge.policy import OpenPolicy
    need("qemu-img")
    base, top = chain(tmp_path)
    with diskforge.open(top):
        assert held(base) == READER_BYTES
        with diskforge.open(base, writable=True):
            assert held(base) == WRITER_BYTES
        assert held(base) == READER_BYTES
    assert held(base) == set()
    # -U: consistent read only, sharing everything (as qemu-img check -U)
    with diskforge.open(top, policy=OpenPolicy(force_share=True)):
        assert held(top) == held(base) == {100}
        run("qemu-img", "resize", top, "+1M")
    with pytest.raises(diskforge.errors.UsageError, match="force-share=on can only"):
        diskforge.open(top, writable=True, policy=OpenPolicy(force_share=True))


def test_outputs_are_locked_while_written(tmp_path):
    """Like qemu-img's outputs, a file being written holds a writer's locks."""
    import glob
    from diskforge.registry import get
    need("qemu-img")
    fmt = get("qcow2")
    writer = fmt.writer(str(tmp_path / "out.qcow2"), 4 * MiB, fmt.options.parse(
        "", format_name="qcow2"))
    try:
        [tmp] = glob.glob(str(tmp_path / ".out.qcow2.*.diskforge-tmp"))
        assert held(tmp) == WRITER_BYTES
        q = run("qemu-img", "info", "-f", "qcow2", tmp, check=False)
        assert q.returncode == 1 and 'Failed to get shared "write" lock' in q.stderr
    finally:
        writer.abort()
    assert not os.path.exists(tmp)
