"""Hostile OVF packages: truncated archives, sizes past the end, huge pax headers,
entity expansion and oversized descriptors, names that leave the package, absent and
duplicate members, nesting, GNU sparse members. Each ends in one line naming the
file, the structure and the field; nothing is written."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from conftest import cli, need, one_line_error, run
from ova_helpers import MIB, build_ova, fixture, make_disk, two_disk_ovf

from diskforge.formats.ova import tar

DISK = "ubuntu.2.0-disk1.vmdk"


def _ovf() -> str:
    with open(fixture("ubuntu.2.0.ovf"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture
def good(workdir):
    disk = make_disk(os.path.join(workdir, "d.raw"), "raw", 1 * MIB)
    return build_ova(os.path.join(workdir, "good.ova"), _ovf(), "ubuntu.2.0.ovf",
                     {DISK: disk}), disk


def _members(path: str):
    from diskforge.blockdev import FileBackend
    with FileBackend(path) as b:
        return {m.name: m for m in tar.index(b, path)}


def _fails(*argv, fields=()) -> str:
    code, _, err = cli(*argv)
    one_line_error(code, err)
    assert "Traceback" not in err
    for f in fields:
        assert f in err, err
    return err


def _crafted(path: str, members: list[tarfile.TarInfo], datas: list[bytes],
             fmt=tarfile.PAX_FORMAT) -> str:
    """A tar written by Python's tarfile (an independent writer) for shapes GNU tar
    will not make."""
    with tarfile.open(path, "w", format=fmt) as t:
        for info, data in zip(members, datas):
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_truncated_inside_the_disk(workdir, good):
    ova, _ = good
    m = _members(ova)[DISK]
    cut = os.path.join(workdir, "cut.ova")
    with open(ova, "rb") as f, open(cut, "wb") as g:
        g.write(f.read(m.offset + 1000))
    _fails("info", cut, fields=(cut, "tar header.size", "truncated"))


def test_truncated_inside_a_header(workdir, good):
    ova, _ = good
    m = _members(ova)[DISK]
    cut = os.path.join(workdir, "cut.ova")
    with open(ova, "rb") as f, open(cut, "wb") as g:
        g.write(f.read(m.header_offset + 100))
    _fails("info", cut, fields=("tar header", "ends inside it"))


def test_member_size_past_the_end(workdir, good):
    ova, _ = good
    m = _members(ova)[DISK]
    with open(ova, "r+b") as f:
        f.seek(m.header_offset)
        block = bytearray(f.read(512))
        block[124:136] = b"77777777777\0"
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        f.seek(m.header_offset)
        f.write(block)
    _fails("convert", "-O", "raw", ova, os.path.join(workdir, "o.raw"),
           fields=("tar header.size", "past the end"))
    assert not os.path.exists(os.path.join(workdir, "o.raw"))


def test_damaged_header_checksum(workdir, good):
    ova, _ = good
    m = _members(ova)[DISK]
    with open(ova, "r+b") as f:
        f.seek(m.header_offset + 10)
        f.write(b"\x01")
    _fails("info", ova, fields=("tar header.chksum",))


def test_huge_pax_header_claimed_past_the_end(workdir):
    path = os.path.join(workdir, "pax.ova")
    info = tarfile.TarInfo("a.ovf")
    info.pax_headers = {"comment": "x"}
    _crafted(path, [info], [_ovf().encode()])
    with open(path, "r+b") as f:         # the first header is the pax 'x' header
        block = bytearray(f.read(512))
        assert block[156:157] == b"x"
        block[124:136] = b"77777777777\0"
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        f.seek(0)
        f.write(block)
    _fails("info", "-f", "ova", path, fields=("tar header.size", "past the end"))


def test_pax_header_larger_than_the_limit(workdir):
    info = tarfile.TarInfo("a.ovf")
    info.pax_headers = {"comment": "x" * (2 * MIB)}
    path = _crafted(os.path.join(workdir, "bigpax.ova"), [info], [_ovf().encode()])
    _fails("info", "-f", "ova", path, fields=("pax extended header.size", "1 MiB"))


def test_pax_records_that_lie_about_their_length(workdir):
    info = tarfile.TarInfo("a.ovf")
    info.pax_headers = {"comment": "abc"}
    path = _crafted(os.path.join(workdir, "lie.ova"), [info], [_ovf().encode()])
    data = bytearray(open(path, "rb").read())
    at = data.index(b" comment=abc\n") - 2      # "NN comment=abc\n"
    data[at:at + 2] = b"99"
    open(path, "wb").write(data)
    _fails("info", "-f", "ova", path, fields=("pax extended header.length",))


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE Envelope [
 <!ENTITY a "aaaaaaaaaa">
 <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
 <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
 <!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">
 <!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">
 <!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;">
 <!ENTITY h "&g;&g;&g;&g;&g;&g;&g;&g;&g;&g;">
]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><VirtualSystem>&h;</VirtualSystem></Envelope>
"""


def test_billion_laughs(workdir, good):
    _, disk = good
    ova = build_ova(os.path.join(workdir, "laughs.ova"), BILLION_LAUGHS, "x.ovf",
                    {DISK: disk})
    _fails("info", ova, fields=("OVF descriptor.DOCTYPE", "refused"))


def test_external_entity(workdir, good):
    _, disk = good
    text = ('<?xml version="1.0"?><!DOCTYPE Envelope SYSTEM "file:///etc/passwd">'
            '<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"/>')
    ova = build_ova(os.path.join(workdir, "ext.ova"), text, "x.ovf", {DISK: disk})
    _fails("info", ova, fields=("DOCTYPE",))


def test_oversized_descriptor(workdir, good):
    _, disk = good
    text = _ovf().replace("<References>", "<!--" + " " * (9 * MIB) + "--><References>")
    ova = build_ova(os.path.join(workdir, "big.ova"), text, "x.ovf", {DISK: disk},
                    manifest=None)
    _fails("info", ova, fields=("OVF descriptor.size", "limit"))


def test_malformed_descriptor(workdir, good):
    _, disk = good
    ova = build_ova(os.path.join(workdir, "bad.ova"), _ovf()[:3000], "x.ovf",
                    {DISK: disk})
    _fails("info", ova, fields=("OVF descriptor", "not well-formed"))


@pytest.mark.parametrize("href", ["../x", "/etc/passwd", "a/../../b"])
def test_names_that_leave_the_package(workdir, good, href):
    _, disk = good
    ova = build_ova(os.path.join(workdir, "leave.ova"), _ovf().replace(DISK, href),
                    "x.ovf", {DISK: disk}, manifest=None)
    _fails("info", ova, fields=("References.File.href", "leaves the package"))


def test_member_absent_from_the_archive(workdir, good):
    _, disk = good
    ova = build_ova(os.path.join(workdir, "absent.ova"), _ovf(), "x.ovf",
                    {"other.vmdk": disk}, manifest=None)
    _fails("info", ova, fields=("References.File.href", "not in the archive"))


def test_url_reference(workdir, good):
    _, disk = good
    ova = build_ova(os.path.join(workdir, "url.ova"),
                    _ovf().replace(DISK, "http://example.com/d.vmdk"), "x.ovf",
                    {DISK: disk}, manifest=None)
    _fails("info", ova, fields=("not supported yet: OVF files referenced by URL",))


def test_disk_that_is_itself_an_ova(workdir, good):
    inner, _ = good
    ova = build_ova(os.path.join(workdir, "nest.ova"), _ovf(), "x.ovf", {DISK: inner})
    _fails("info", ova, fields=("nested packages are refused",))


def test_duplicate_member_names(workdir, good):
    ova, disk = good
    run("tar", "-r", "-f", ova, "--transform", f"s|.*|{DISK}|", disk)
    _fails("info", ova, fields=("tar header.name", "appears twice"))


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_gnu_sparse_members_are_not_supported_yet(workdir, fmt):
    need("tar")
    stage = os.path.join(workdir, "s")
    os.makedirs(stage)
    with open(os.path.join(stage, "x.ovf"), "w") as f:
        f.write(_ovf())
    with open(os.path.join(stage, DISK), "wb") as f:
        f.truncate(4 * MIB)
        f.seek(MIB)
        f.write(b"data" * 1024)
    ova = os.path.join(workdir, "sparse.ova")
    run("tar", "-c", "-S", "-f", ova, f"--format={fmt}", "-C", stage, "x.ovf", DISK)
    _fails("info", ova, fields=("not supported yet: GNU sparse tar members",))


def test_compressed_files(workdir, good):
    _, disk = good
    text = _ovf().replace('ovf:id="file1"', 'ovf:id="file1" ovf:compression="gzip"')
    ova = build_ova(os.path.join(workdir, "gz.ova"), text, "x.ovf", {DISK: disk},
                    manifest=None)
    _fails("info", ova, fields=("not supported yet: compressed OVF files",))


def test_chunks_that_do_not_add_up(workdir, good):
    """A chunk of the wrong size, a missing last chunk, no ovf:size to check them."""
    _, disk = good                       # 1 MiB: two chunks of 512 KiB
    half = 512 << 10
    data = open(disk, "rb").read()
    chunks = {}
    for i in range(2):
        chunks[f"{DISK}.{i:09d}"] = os.path.join(workdir, f"c{i}")
        with open(chunks[f"{DISK}.{i:09d}"], "wb") as f:
            f.write(data[i * half:(i + 1) * half])
    for attrs, members, field in (
            (f'ovf:chunkSize="{half}" ovf:size="{2 * half}"', dict(list(chunks.items())[:1]),
             "References.File.size"),
            (f'ovf:chunkSize="{half // 2}" ovf:size="{2 * half}"', chunks,
             "References.File.chunkSize"),
            (f'ovf:chunkSize="{half}"', chunks, "References.File.size")):
        text = _ovf().replace('ovf:id="file1"', f'ovf:id="file1" {attrs}')
        ova = build_ova(os.path.join(workdir, "ch.ova"), text, "x.ovf", members,
                        manifest=None)
        _fails("info", ova, fields=(field,))
        os.remove(ova)


def test_first_member_must_be_the_descriptor(workdir, good):
    _, disk = good
    path = os.path.join(workdir, "order.ova")
    run("tar", "-c", "-f", path, "-C", os.path.dirname(disk), os.path.basename(disk))
    _fails("info", "-f", "ova", path, fields=("tar.first member",))


def test_disk_without_a_file_and_bad_numbers(workdir, good):
    _, disk = good
    text = two_disk_ovf("a.raw", "b.raw").replace('ovf:capacity="4194304"',
                                                  'ovf:capacity="12x"')
    ova = build_ova(os.path.join(workdir, "num.ova"), text, "x.ovf",
                    {"a.raw": disk, "b.raw": disk}, manifest=None)
    _fails("info", ova, fields=("DiskSection.Disk.capacity",))


def test_manifest_naming_files_that_are_not_there(workdir, good):
    _, disk = good
    ova = build_ova(os.path.join(workdir, "mf.ova"), _ovf(), "ubuntu.2.0.ovf",
                    {DISK: disk}, manifest=None,
                    extra={"ubuntu.2.0.mf": b"SHA256(../../etc/passwd)= " + b"0" * 64
                           + b"\nSHA1(gone.vmdk)= " + b"1" * 40 + b"\n"})
    code, out, err = cli("verify", ova)
    assert code == 2, out + err
    assert "leaves the package" in out and "'gone.vmdk' is not in the archive" in out
    assert f"'{DISK}' is not in the manifest" in out


def test_unknown_xml_encoding(workdir, good):
    """Found by the fuzzer: expat raises LookupError for an unknown encoding name."""
    _, disk = good
    text = _ovf().replace('<?xml version="1.0"?>', '<?xml version="1.0" encoding="UVF-8"?>')
    ova = build_ova(os.path.join(workdir, "enc.ova"), text, "x.ovf", {DISK: disk})
    _fails("info", ova, fields=("OVF descriptor.encoding",))
