"""Malformed, hostile and unsupported qcow2 images: one line naming the file and what
is wrong, a non-zero exit, no traceback, no hang, no large allocation.

Cases whose hostile field could size an allocation run the CLI in a child process
with a capped address space, so a giant allocation would fail loudly instead of
passing quietly."""

import os
import resource
import struct

import pytest
from conftest import cli, cli_process, need, one_line_error, run

MIB = 1 << 20
CAP = 512 * MIB  # address space of the child: plenty for diskforge, not for a bomb


def _cap():
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


def fails(*argv, expect: str, capped: bool = False) -> str:
    """The CLI fails with one line containing ``expect``; ``capped``: in a child
    process with a capped address space (for fields that size an allocation)."""
    if capped:
        proc = cli_process(*argv, preexec_fn=_cap, timeout=60)
        code, err = proc.returncode, proc.stderr
    else:
        code, _, err = cli(*argv)
    one_line_error(code, err)
    assert expect in err, err
    assert "internal error" not in err and "MemoryError" not in err
    return err


@pytest.fixture
def image(workdir):
    """A small qcow2 (64 KiB clusters) with data in two places."""
    need("qemu-img")
    path = os.path.join(workdir, "m.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "8M")
    run("qemu-io", "-c", "write -P 0x11 0 128k", "-c", "write -P 0x22 4M 64k", path)
    return path


def header(path):
    with open(path, "rb") as f:
        raw = f.read(104)
    names = ("magic version backing_file_offset backing_file_size cluster_bits size"
             " crypt_method l1_size l1_table_offset refcount_table_offset"
             " refcount_table_clusters nb_snapshots snapshots_offset").split()
    h = dict(zip(names, struct.unpack(">4sIQIIQIIQQIIQ", raw[:72])))
    h["incompatible_features"] = struct.unpack(">Q", raw[72:80])[0]
    return h


FIELDS = {"version": (4, ">I"), "backing_file_offset": (8, ">Q"),
          "backing_file_size": (16, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
          "crypt_method": (32, ">I"), "l1_size": (36, ">I"),
          "l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q"),
          "refcount_table_clusters": (56, ">I"), "nb_snapshots": (60, ">I"),
          "snapshots_offset": (64, ">Q"), "incompatible_features": (72, ">Q"),
          "refcount_order": (96, ">I"), "header_length": (100, ">I")}


def poke(path, offset, fmt, *values):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def set_field(path, name, value):
    off, fmt = FIELDS[name]
    poke(path, off, fmt, value)


def l2_offset(path):
    h = header(path)
    with open(path, "rb") as f:
        f.seek(h["l1_table_offset"])
        return struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00


@pytest.mark.parametrize("cut,expect", [
    (0, "too short"), (3, "too short"), (50, "too short"), (90, "version 3 header"),
    (200, "QCowExtension"), (70000, "past the end of the file"), (200000, "L2 table")])
def test_truncated_files(workdir, image, cut, expect):
    with open(image, "r+b") as f:
        f.truncate(cut)
    # info reads the headers only, as qemu-img's; --details also reads the partition
    # table through the L2 tables
    details = ["--details"] if expect == "L2 table" else []
    fails("info", *details, "-f", "qcow2", image, expect=expect)
    fails("convert", "-f", "qcow2", "-O", "raw", image, os.path.join(workdir, "o.raw"),
          expect=expect)
    if cut >= 4:  # still recognised as qcow2 without -f
        fails("info", *details, image, expect=expect)
    assert not os.path.exists(os.path.join(workdir, "o.raw"))


@pytest.mark.parametrize("field,value,expect", [
    ("l1_table_offset", 1 << 40, "L1 table"),
    ("l1_size", 0xFFFFFFFF, "l1_size"),
    ("l1_size", 0, "cannot map"),
    ("l1_table_offset", 12345, "not cluster aligned"),
    ("refcount_table_offset", 1 << 40, "refcount table"),
    ("refcount_table_clusters", 0xFFFFFFFF, "refcount_table_clusters"),
    ("refcount_table_clusters", 0, "no refcount table"),
    ("cluster_bits", 30, "cluster_bits"),
    ("cluster_bits", 8, "cluster_bits"),
    ("version", 4, "version 4"),
    ("size", 1 << 62, "l1_size"),
    ("nb_snapshots", 0xFFFFFFFF, "nb_snapshots"),
    ("nb_snapshots", 3, "snapshot"),
    ("header_length", 0x20000, "header_length"),
    ("header_length", 50, "header_length"),
    ("refcount_order", 7, "refcount_order"),
    ("backing_file_offset", 0x100, "QCowExtension"),
    ("backing_file_size", 0xFFFFFF, "backing"),
])
def test_absurd_header_fields(workdir, image, field, value, expect):
    set_field(image, field, value)
    if field == "backing_file_size":
        set_field(image, "backing_file_offset", 0x200)
    if field == "nb_snapshots" and value == 3:
        set_field(image, "snapshots_offset", 0x20000)  # points at the refcount block
    big = value > 0xFFFF
    fails("info", "-f", "qcow2", image, expect=expect, capped=big)
    fails("convert", "-f", "qcow2", "-O", "raw", image, os.path.join(workdir, "o.raw"),
          expect=expect)


def test_l2_table_pointing_into_the_header_or_past_eof(workdir, image):
    h = header(image)
    for value, expect in ((0x200, "not cluster aligned"), (1 << 45, "past the end"),
                          (0x8000000000000000 | 0x200, "not cluster aligned")):
        poke(image, h["l1_table_offset"], ">Q", value)
        fails("convert", "-O", "raw", image, os.path.join(workdir, "o.raw"), expect=expect,
              capped=value == 1 << 45)
        fails("map", image, expect=expect)


def test_data_cluster_pointing_into_the_header(workdir, image):
    l2 = l2_offset(image)
    for value in (0x8000000000000000 | 0x200, 0x200):
        poke(image, l2, ">Q", value)
        err = fails("convert", "-O", "raw", image, os.path.join(workdir, "o.raw"),
                    expect="m.qcow2")
        assert "header" in err or "aligned" in err


def test_compressed_descriptor_past_eof_or_into_the_header(workdir):
    need("qemu-img")
    src = os.path.join(workdir, "s.raw")
    with open(src, "wb") as f:
        f.write(b"compress me " * 100000)
    path = os.path.join(workdir, "c.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", src, path)
    l2 = l2_offset(path)
    with open(path, "rb") as f:
        f.seek(l2)
        entry = struct.unpack(">Q", f.read(8))[0]
    cs_shift = 62 - (16 - 8)
    sectors = entry & ~((1 << cs_shift) - 1)
    for host, expect in ((1 << 40, "past the end"), (100, "into the header")):
        poke(path, l2, ">Q", sectors | host)
        fails("convert", "-O", "raw", path, os.path.join(workdir, "o.raw"), expect=expect,
              capped=host > 100)
    # garbage where the compressed bytes should be
    poke(path, l2, ">Q", entry)
    off = entry & ((1 << cs_shift) - 1)
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\xff" * 64)
    fails("convert", "-O", "raw", path, os.path.join(workdir, "o.raw"), expect="corrupt")


def test_backing_loop_and_roots(workdir):
    need("qemu-img")
    a = os.path.join(workdir, "a.qcow2")
    b = os.path.join(workdir, "b.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", a, "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    run("qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)  # a -> b -> a
    fails("info", "--backing-chain", b, expect="loop")
    fails("convert", "-O", "raw", a, os.path.join(workdir, "o.raw"), expect="loop")
    itself = os.path.join(workdir, "self.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", itself, "1M")
    run("qemu-img", "rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", itself)
    fails("info", "--backing-chain", itself, expect="loop")
    # outside the image's directory: followed by default, as qemu-img does; refused in
    # untrusted mode, which --allow-root widens
    outside = os.path.join(os.path.dirname(workdir), "outside-" + os.path.basename(workdir))
    os.makedirs(outside, exist_ok=True)
    secret = os.path.join(outside, "secret.raw")
    with open(secret, "wb") as f:
        f.write(b"secret" * 1000)
    top = os.path.join(workdir, "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", top, "1M")
    fails("--untrusted", "convert", "-O", "raw", top, os.path.join(workdir, "o.raw"),
          expect="outside")
    rel = os.path.join(workdir, "rel.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
        "../" + os.path.basename(outside) + "/secret.raw", "-F", "raw", rel, "1M")
    fails("--untrusted", "info", rel, expect="outside")
    base = os.path.join(outside, "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "1M")
    q = os.path.join(workdir, "q.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", q, "1M")
    fails("--untrusted", "info", q, expect="outside")
    assert cli("--untrusted", "info", "--allow-root", outside, q)[0] == 0
    etc = os.path.join(workdir, "etc.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw",
        etc, "1M")
    fails("--untrusted", "convert", "-O", "raw", etc, os.path.join(workdir, "o.raw"),
          expect="outside")
    flat = os.path.join(workdir, "o.raw")
    assert cli("convert", "-O", "raw", top, flat)[0] == 0
    with open(flat, "rb") as f:
        assert f.read(6000) == b"secret" * 1000
    # a data file outside is refused the same way (qemu-img create empties it)
    df = os.path.join(workdir, "df.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={secret}", df, "1M")
    fails("--untrusted", "info", df, expect="outside")
    for image in (top, rel, q, df):
        assert cli("info", image)[0] == 0, image


def test_unsupported_features_are_named(workdir, image):
    set_field(image, "incompatible_features", 1 << 20)
    fails("info", image, expect="not supported: qcow2 incompatible feature(s): unknown"
          " feature bit 20")
    set_field(image, "incompatible_features", 0)
    set_field(image, "crypt_method", 3)
    fails("info", image, expect="QCowHeader.crypt_method: encrypted (unknown crypt_method"
          " 3); not supported yet")
    set_field(image, "crypt_method", 1)  # the old AES: opens without a key, as in qemu-img
    assert cli("info", image)[0] == 0


def test_luks_encryption_without_a_key_is_refused(workdir):
    from luks_helpers import qcow2_luks
    path = qcow2_luks(os.path.join(workdir, "luks.qcow2"))
    line = f"{path}: encrypted (LUKS1); give its passphrase"
    fails("convert", "-O", "raw", path, os.path.join(workdir, "o.raw"), expect=line)
    fails("map", path, expect=line)
    fails("compare", path, path, expect=line)
    assert not os.path.exists(os.path.join(workdir, "o.raw"))


def test_oversized_extension_and_snapshot_entries(workdir, image):
    # an extension claiming more bytes than the header cluster holds
    poke(image, 112, ">II", 0x12345678, 0x7FFFFFFF)
    fails("info", image, expect="QCowExtension", capped=True)
    # restore the end marker, then a snapshot entry with absurd extra data
    poke(image, 112, ">II", 0, 0)
    set_field(image, "nb_snapshots", 1)
    set_field(image, "snapshots_offset", 0x50000)
    with open(image, "r+b") as f:
        f.seek(0x50000)
        f.write(struct.pack(">QIHHIIQII", 0, 0, 1, 1, 0, 0, 0, 0, 0x7FFFFFFF))
    fails("info", image, expect="extra data", capped=True)


def test_writes_never_touch_a_bad_image(workdir, image):
    before = open(image, "rb").read()
    set_field(image, "l1_table_offset", 1 << 40)
    code, _, err = cli("resize", image, "16M")
    one_line_error(code, err)
    code, _, err = cli("snapshot", "-c", "x", image)
    one_line_error(code, err)
    after = open(image, "rb").read()
    assert after[:40] == before[:40] and after[48:] == before[48:]


def test_check_of_data_clusters_named_far_past_eof(workdir, image):
    """An L2 entry naming a cluster terabytes past the end: check reports it as qemu
    does, promptly and in bounded memory, without counting it into the image end."""
    l2 = l2_offset(image)
    poke(image, l2 + 8, ">Q", 0x8000000000000000 | (1 << 45))
    theirs = run("qemu-img", "check", image, check=False)
    proc = cli_process("check", image, preexec_fn=_cap, timeout=60)
    assert proc.returncode == theirs.returncode == 2
    # qemu-img prints the messages on stderr, the counts and the summary on stdout;
    # diskforge too, the same lines
    assert proc.stderr == theirs.stderr and proc.stdout == theirs.stdout
    assert "exceeding the end of the file by one cluster or more: offset 0x200000000000" \
        in proc.stderr
