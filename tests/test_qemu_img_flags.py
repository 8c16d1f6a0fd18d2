"""qemu-img flags whose effect the invocation matrix cannot see from outputs alone:
O_DIRECT reads (-T none), the rate limit (-r), full allocation (-S 0), copy offloading
(-C), --target-is-zero, --salvage, several sources, check's exit 63, stderr findings and
image end offset, and qemu-img's words in errors."""

import fcntl
import json
import os
import random
from types import SimpleNamespace

import pytest
from conftest import cli, make_sparse, need, one_line_error, run

MiB = 1 << 20


@pytest.fixture
def disk(workdir):
    """An 8 MiB raw disk: an MBR with one partition, random data at 1 MiB and at 5 MiB,
    holes elsewhere."""
    rng = random.Random(16)
    mbr = bytearray(512)
    mbr[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") \
        + (8192).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    return make_sparse(os.path.join(workdir, "d.raw"), 8 * MiB,
                       [(0, bytes(mbr)), (MiB, rng.randbytes(300_000)),
                        (5 * MiB, rng.randbytes(70_000))])


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_source_cache_none_reads_with_o_direct(disk, workdir):
    from diskforge.cli.image import open_source
    args = SimpleNamespace(src_cache="none", allow_root=[], untrusted=False,
                           force_share=False)
    with open_source(disk, None, args) as dev:
        fd = dev.backend._direct_fd
        if fd < 0:
            pytest.skip("this file system refuses O_DIRECT")
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        want = read(disk)
        rng = random.Random(7)  # unaligned offsets and lengths go through the bounce
        for _ in range(50):
            off = rng.randrange(len(want))
            n = rng.randrange(1, 3 * MiB)
            assert dev.read(off, min(n, len(want) - off)) == want[off:off + n]
    out = os.path.join(workdir, "o.qcow2")
    assert cli("convert", "-T", "none", "-t", "none", "-O", "qcow2", disk, out)[0] == 0
    need("qemu-img")
    assert run("qemu-img", "compare", disk, out).returncode == 0
    code, _, err = cli("convert", "-T", "sometimes", disk, os.path.join(workdir, "x.raw"))
    one_line_error(code, err)
    assert "Invalid source cache option: sometimes" in err


def test_rate_limit_paces_the_copy(disk, workdir, monkeypatch):
    """-r 1M over 8 MiB of disk: the copy takes 8 s of a clock that only its sleeps
    move (nothing is slept for real, so no timing is measured)."""
    import time
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    out = os.path.join(workdir, "r.raw")
    assert cli("convert", "-r", "1M", "-O", "raw", disk, out)[0] == 0
    assert clock[0] == pytest.approx(8.0) and read(out) == read(disk)
    code, _, err = cli("convert", "-r", "0", disk, os.path.join(workdir, "r0.raw"))
    one_line_error(code, err)


def test_sparse_size_zero_writes_everything(disk, workdir):
    sparse, full = os.path.join(workdir, "s.raw"), os.path.join(workdir, "f.raw")
    assert cli("convert", "-O", "raw", disk, sparse)[0] == 0
    assert cli("convert", "-S", "0", "-O", "raw", disk, full)[0] == 0
    assert read(sparse) == read(full) == read(disk)
    assert os.stat(sparse).st_blocks * 512 < 2 * MiB
    assert os.stat(full).st_blocks * 512 >= 8 * MiB
    code, _, err = cli("convert", "-S", "1000", disk, os.path.join(workdir, "b.raw"))
    one_line_error(code, err)
    assert not os.path.exists(os.path.join(workdir, "b.raw"))


def test_copy_offloading_keeps_holes(disk, workdir):
    out = os.path.join(workdir, "c.raw")
    assert cli("convert", "-C", "-O", "raw", disk, out)[0] == 0
    assert read(out) == read(disk) and os.stat(out).st_blocks * 512 < 2 * MiB
    q = os.path.join(workdir, "c.qcow2")  # every source kind: test_cache_offload.py
    assert cli("convert", "-O", "qcow2", disk, q)[0] == 0
    assert cli("convert", "-C", "-O", "raw", q, os.path.join(workdir, "c2.raw"))[0] == 0
    assert read(os.path.join(workdir, "c2.raw")) == read(disk)


def test_target_is_zero_skips_the_zeros(disk, workdir):
    target = os.path.join(workdir, "t.raw")
    with open(target, "wb") as f:  # not zero where the source has a hole: left alone
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(b"\xff" * 512)
    assert cli("convert", "-n", "--target-is-zero", "-O", "raw", disk, target)[0] == 0
    data = read(target)
    assert data[3 * MiB:3 * MiB + 512] == b"\xff" * 512
    assert data[MiB:MiB + 300_000] == read(disk)[MiB:MiB + 300_000]
    code, _, err = cli("convert", "--target-is-zero", "-O", "raw", disk,
                       os.path.join(workdir, "n.raw"))
    one_line_error(code, err)
    assert "requires use of -n" in err


def test_salvage_turns_read_errors_into_reported_zeros(disk, workdir, monkeypatch):
    from diskforge.blockdev import FileBackend
    from diskforge.errors import ImageIOError
    real = FileBackend.readinto
    bad = 5 * MiB + 4096  # one unreadable sector inside the data at 5 MiB

    def failing(self, offset, buf):
        n = len(memoryview(buf).cast("B"))
        if self.path == disk and offset <= bad < offset + n:
            raise ImageIOError("Input/output error", self.path)
        return real(self, offset, buf)
    monkeypatch.setattr(FileBackend, "readinto", failing)
    out = os.path.join(workdir, "s.raw")
    code, _, err = cli("convert", "-O", "raw", disk, out)
    one_line_error(code, err)
    assert not os.path.exists(out)
    code, _, err = cli("convert", "--salvage", "-O", "raw", disk, out)
    assert code == 0
    assert f"read error at offset {bad} (512 bytes)" in err and "1 unreadable" in err
    want = bytearray(read(disk))
    want[bad:bad + 512] = bytes(512)
    assert read(out) == bytes(want)


def test_several_sources_are_concatenated_as_qemu_img_does(disk, workdir):
    need("qemu-img")
    q = os.path.join(workdir, "a.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", disk, q)
    ours, theirs = os.path.join(workdir, "o.qcow2"), os.path.join(workdir, "t.qcow2")
    assert cli("convert", "-O", "qcow2", q, disk, q, ours)[0] == 0
    run("qemu-img", "convert", "-O", "qcow2", q, disk, q, theirs)
    assert run("qemu-img", "compare", "-s", ours, theirs).returncode == 0
    assert json.loads(run("qemu-img", "info", "--output", "json", ours).stdout)[
        "virtual-size"] == 24 * MiB


def test_check_63_findings_on_stderr_and_end_offset_with_leaks(disk, workdir):
    """Formats qemu-img cannot check give 63 unless diskforge's own checks are asked
    for; a qcow2 with leaked clusters at its end prints what qemu-img prints, on the
    same streams, with the same image end offset."""
    code, out, err = cli("check", disk)
    assert (code, out) == (63, "") and "does not support checks" in err
    assert cli("check", "-q", disk)[0] == 63
    assert cli("check", "--partitions", disk)[:2] == (0, "No errors were found on the"
                                                     " image.\n")
    need("qemu-img")
    need("qemu-io")
    path = os.path.join(workdir, "l.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "4M")
    run("qemu-io", "-c", "write -P 1 0 256k", path)
    with open(path, "r+b") as f:  # leak two clusters past the end: counted, unused
        header = f.read(64)
        rt = int.from_bytes(header[48:56], "big")
        end = -(-os.path.getsize(path) // 65536)
        f.truncate((end + 2) * 65536)
        f.seek(rt)
        block = int.from_bytes(f.read(8), "big")
        f.seek(block + 2 * end)
        f.write((1).to_bytes(2, "big") * 2)
    theirs = run("qemu-img", "check", path, check=False)
    code, out, err = cli("check", path)
    assert (code, out, err) == (theirs.returncode, theirs.stdout, theirs.stderr)
    assert f"Image end offset: {(end + 2) * 65536}" in out
    theirs = run("qemu-img", "check", "--output", "json", path, check=False)
    code, out, _ = cli("check", "--output", "json", path)
    assert json.loads(out) == json.loads(theirs.stdout)
    assert cli("check", "-q", path)[:2] == (3, "")


def test_errors_use_qemu_img_words(workdir):
    missing = os.path.join(workdir, "nope.qcow2")
    for argv in (["info", missing], ["convert", missing, os.path.join(workdir, "o.raw")],
                 ["check", missing]):
        code, _, err = cli(*argv)
        one_line_error(code, err)
        assert f"Could not open '{missing}': No such file or directory" in err


def test_image_opts_and_objects(disk, workdir):
    """--image-opts names the image by an option string; keys diskforge cannot honour
    and objects other than secrets are one-line errors, never silently ignored."""
    code, out, _ = cli("info", "--image-opts", f"driver=raw,file.filename={disk}")
    assert code == 0 and "file format: raw" in out
    for opts, words in ((f"driver=raw,file.filename={disk},encrypt.key-secret=s0",
                         "No secret with id 's0'"),
                        (f"file.filename={disk},file.driver=nbd", "file.driver=nbd"),
                        (f"file.filename={disk},bogus=1", "bogus"),
                        (disk, "needs file.filename=")):
        code, _, err = cli("info", "--image-opts", opts)
        one_line_error(code, err)
        assert words in err
    code, _, err = cli("info", "--object", "iothread,id=t0", disk)
    one_line_error(code, err)
    code, _, err = cli("info", "--object", "secret,id=s0", disk)
    one_line_error(code, err)
    assert cli("info", "--object", "secret,id=s0,data=x", disk)[0] == 0
