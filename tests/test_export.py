"""The export command and API themselves: naming, options, atomic outputs, and bad or
hostile input to --check (one line, no traceback, no hang, nothing left behind)."""

from __future__ import annotations

import gzip
import io
import os
import random
import tarfile

import pytest
from conftest import cli, cli_process, need, one_line_error, run
from export_helpers import MiB, source_disk

import diskforge
from diskforge.errors import DiskforgeError, UsageError
from diskforge.export import TARGETS, ova_package, ovf, tarfmt


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return source_disk(str(tmp_path_factory.mktemp("src") / "disk.raw"), 4 * MiB)


def leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


# -- API and CLI ---------------------------------------------------------------------------

def test_api_stays_callable_after_the_package_is_imported(src, tmp_path):
    import importlib
    importlib.import_module("diskforge.export.azure")   # binds diskforge.export
    assert callable(diskforge.export)
    assert diskforge.export(src, "hyperv", str(tmp_path / "a.vhdx")) == \
        [str(tmp_path / "a.vhdx")]


def test_every_target_module_has_the_interface():
    for name in TARGETS:
        mod = diskforge.export.target(name)
        assert mod.NAME == name and mod.SUMMARY and mod.__doc__
        assert callable(mod.export) and callable(mod.check)


def test_unknown_target_and_bad_options(src, tmp_path):
    with pytest.raises(UsageError, match="unknown export target 'vsphere'"):
        diskforge.export(src, "vsphere", str(tmp_path / "x"))
    with pytest.raises(UsageError, match="unknown export option"):
        diskforge.export(src, "ova", str(tmp_path / "x.ova"), colour="red")
    with pytest.raises(UsageError, match="invalid --cpus"):
        diskforge.export(src, "libvirt", str(tmp_path / "x.qcow2"), cpus=0)
    with pytest.raises(UsageError, match="invalid --memory '2G': expected int"):
        diskforge.export(src, "libvirt", str(tmp_path / "x.qcow2"), memory="2G")
    with pytest.raises(UsageError, match="invalid --name"):
        diskforge.export(src, "libvirt", str(tmp_path / "x.qcow2"), name="a\nb")
    assert os.listdir(tmp_path) == []


def test_cli_usage_errors_are_one_line(src, tmp_path):
    one_line_error(*cli("export", "--to", "azure", src)[::2])
    one_line_error(*cli("export", "--check", "gcp", src, src)[::2])
    one_line_error(*cli("export", "--to", "nowhere", src, str(tmp_path / "x"))[::2])
    one_line_error(*cli("export", "--check", "gcp", str(tmp_path / "missing"))[::2])
    one_line_error(*cli("export", src, str(tmp_path / "x"))[::2])


def test_refuses_to_write_onto_its_input(src, tmp_path):
    copy = str(tmp_path / "same.qcow2")
    diskforge.convert(src, copy)
    code, _, err = cli("export", "--to", "libvirt", copy, copy)
    one_line_error(code, err)
    assert "refusing to write onto the input" in err


@pytest.mark.parametrize("target,out", [("gcp", "x.tar.gz"), ("libvirt", "x.qcow2"),
                                        ("azure", "x.vhd"), ("hyperv", "x.vhdx")])
def test_an_interrupted_export_leaves_nothing(src, tmp_path, target, out):
    def stop(done, total):
        if done > 0:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        diskforge.export(src, target, str(tmp_path / out), progress=stop)
    assert os.listdir(tmp_path) == []


def test_progress_reaches_the_end(src, tmp_path):
    seen = []
    diskforge.export(src, "gcp", str(tmp_path / "p.tar.gz"),
                     progress=lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] and all(d <= t for d, t in seen)
    code, out, err = cli("export", "--to", "azure", "-p", src, str(tmp_path / "p.vhd"))
    assert code == 0 and "(100.00/100%)" in err + out


def test_export_as_a_separate_process(src, tmp_path):
    proc = cli_process("export", "--to", "gcp", src, str(tmp_path / "d.tar.gz"))
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "d.tar.gz")
    proc = cli_process("export", "--check", "gcp", str(tmp_path / "d.tar.gz"))
    assert proc.returncode == 0 and "gcp would accept it" in proc.stdout


# -- tar headers ---------------------------------------------------------------------------

def test_tar_numbers_octal_then_base256():
    assert tarfmt.number(0o777, 8) == b"0000777\x00"
    big = 9 << 30
    raw = tarfmt.number(big, 12)
    assert raw[0] == 0x80 and tarfmt.parse_number(raw) == big
    assert tarfmt.parse_number(tarfmt.number(8 ** 11 - 1, 12)) == 8 ** 11 - 1


def test_sparse_headers_with_many_regions_read_by_python_tarfile():
    """More than 4 regions need extension blocks; Python's tarfile reads the map."""
    regions = [(i * 8192, 512) for i in range(30)]
    head = tarfmt.sparse_headers("disk.raw", 1 << 20, regions, 0)
    assert len(head) == 3 * 512          # the header and two extension blocks
    data = b"".join(bytes([i + 1]) * 512 for i in range(30))
    body = head + data + tarfmt.padding(len(data))
    body += tarfmt.end_of_archive(len(body))
    with tarfile.open(fileobj=io.BytesIO(body)) as t:
        (m,) = t.getmembers()
        assert m.size == 1 << 20 and m.issparse()
        content = t.extractfile(m).read()
    for i in range(30):
        assert content[i * 8192:i * 8192 + 512] == bytes([i + 1]) * 512
    assert content.count(0) == (1 << 20) - 30 * 512


# -- hostile input to --check --------------------------------------------------------------

def _ova(tmp_path, files) -> str:
    out = str(tmp_path / "h.ova")
    ova_package.write_ova(out, files)
    return out


def test_check_truncated_targz(src, tmp_path):
    out = str(tmp_path / "t.tar.gz")
    diskforge.export(src, "gcp", out)
    with open(out, "r+b") as f:
        f.truncate(os.path.getsize(out) // 2)
    problems = diskforge.export.check("gcp", out)
    assert len(problems) == 1 and problems[0].startswith("not a valid gzip'd tar archive")


def test_check_ovf_with_entities_is_refused_unparsed(tmp_path):
    bomb = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
            + b"".join(b'<!ENTITY %c "&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;">'
                       % ((98 + i,) + (97 + i,) * 10) for i in range(9))
            + b']><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">&j;</Envelope>')
    ova = _ova(tmp_path, [("vm.ovf", bomb)])
    assert diskforge.export.check("ova", ova) == [
        "descriptor 'vm.ovf': the descriptor declares a DTD or entities"]


def test_check_names_from_inside_are_escaped(tmp_path):
    ova = _ova(tmp_path, [("evil\n\x1b[2Jname.ovf", b"<x/>")])
    code, out, err = cli("export", "--check", "ova", ova)
    assert code == 2 and "\x1b" not in out and "\\n" in out
    assert all(line.startswith(ova) for line in out.splitlines())


def test_check_vmdk_with_oversized_descriptor(tmp_path):
    from diskforge.formats.vmdk.structs import SparseExtentHeader
    head = SparseExtentHeader.build(dict(
        magicNumber=b"KDMV", version=1, flags=3, capacity=2048, grainSize=128,
        descriptorOffset=1, descriptorSize=1 << 40, numGTEsPerGT=512, rgdOffset=0,
        gdOffset=0, overHead=128, uncleanShutdown=0, newlineTest=b"\n \r\n",
        compressAlgorithm=0, pad=bytes(433)))
    path = str(tmp_path / "h.vmdk")
    with open(path, "wb") as f:
        f.write(head.ljust(512, b"\0"))
    code, _, err = cli("export", "--check", "aws", path)
    one_line_error(code, err)
    assert "SparseExtentHeader.descriptorSize" in err


def test_check_ova_member_past_the_end(tmp_path):
    good = _ova(tmp_path, [("vm.ovf", b"<x/>" * 100)])
    with open(good, "r+b") as f:
        header = bytearray(f.read(512))
        header[124:136] = tarfmt.number(1 << 40, 12)
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\x00 " % sum(header)
        f.seek(0)
        f.write(header)
    problems = diskforge.export.check("ova", good)
    assert problems and len(problems) <= 3


def test_check_refuses_a_fifo(tmp_path):
    fifo = str(tmp_path / "f.ova")
    os.mkfifo(fifo)
    code, _, err = cli("export", "--check", "ova", fifo)
    one_line_error(code, err)


@pytest.mark.parametrize("target", ["gcp", "ova", "aws", "azure", "libvirt", "hyperv"])
def test_check_on_damaged_files_never_crashes(src, tmp_path, target):
    """Mutated copies of good outputs (fixed seed): each --check ends in a list of
    rules or one DiskforgeError, never another exception."""
    need("qemu-img")
    base = str(tmp_path / "good")
    if target in ("gcp",):
        diskforge.export(src, "gcp", base)
    elif target in ("ova", "aws"):
        env = ovf.envelope(ovf.Vm(name="vm", disk_file="vm-disk1.vmdk", disk_file_size=512,
                                  capacity=MiB))
        vmdk = str(tmp_path / "s.vmdk")
        run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized",
            vmdk, "1M")
        base = _ova(tmp_path, [("vm.ovf", env), ("vm-disk1.vmdk", vmdk)])
    elif target == "azure":
        diskforge.export(src, "azure", base + ".vhd")
        base += ".vhd"
    elif target == "hyperv":
        diskforge.export(src, "hyperv", base + ".vhdx")
        base += ".vhdx"
    else:
        diskforge.export(src, "libvirt", base + ".qcow2")
        base += ".xml"
    data = open(base, "rb").read()
    rng = random.Random(15)
    bad = str(tmp_path / ("bad" + os.path.splitext(base)[1]))
    for _ in range(25):
        mutated = bytearray(data[:max(512, len(data) // 4)] if rng.random() < 0.3 else data)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(min(len(mutated), 4096))
            mutated[pos] = rng.randrange(256)
        with open(bad, "wb") as f:
            f.write(mutated)
        try:
            result = diskforge.export.check(target, bad)
        except DiskforgeError as e:
            assert "\n" not in str(e)
        else:
            assert isinstance(result, list)


def test_gzip_of_pgzip_is_byte_exact_for_fixed_input():
    from diskforge.export.pgzip import ParallelGzip
    rng = random.Random(3)
    data = rng.randbytes(3 * MiB + 77) + bytes(2 * MiB)
    out = bytearray()
    gz = ParallelGzip(out.extend, workers=2, chunk=256 << 10)
    for i in range(0, len(data), 100_000):
        gz.write(data[i:i + 100_000])
    assert gz.close() == len(out)
    assert gzip.decompress(bytes(out)) == data
