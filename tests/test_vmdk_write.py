"""Writing VMDKs: every subformat and option qemu-img has, checked by readers that are
not ours — ``qemu-img check`` and ``qemu-img compare``, libvmdk (pyvmdk) and
dissect.hypervisor bit for bit, 7-Zip for the single-file kinds — and by the ESXi/VMware/VirtualBox rules in
``vmdk_rules.py`` (our stream files pass them; qemu-img's fail them).

The disks are small (a few MiB of data, zero and hole regions, a size that is not a
whole number of grains) except one 5 GiB sparse disk with data past the 2 GiB split.
Random IDs (CID, longContentID) come from a fixed seed, so outputs are reproducible.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess

import dissect_oracle
import pytest
import vmdk_rules
from conftest import cli, make_sparse, need_real, one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskforge.blockdev import Backing
from diskforge.formats.vmdk import FORMAT
from diskforge.formats.vmdk.options import VmdkOptions
from diskforge.ops.convert import convert
from diskforge.registry import open_image

QEMU = shutil.which("qemu-img")
SEVENZIP = shutil.which("7zz")
pyvmdk = pytest.importorskip("pyvmdk", reason="libvmdk-python (pip) is the second reader")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-img not installed")

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
SIZE = (3 << 20) + 5 * 512 + 100     # not a whole number of grains, nor of sectors


def mixed_disk(path: str, size: int = SIZE, seed: int = 7) -> bytes:
    """Random data, runs of a repeated byte (compressible), written zeros, holes, and a
    tail that ends inside a grain."""
    rng = random.Random(seed)
    extents = [(0, rng.randbytes(70000)),                  # a grain and a bit
               (200 << 10, bytes(65536)),                   # written zeros
               (300 << 10, b"x" * 150000),                  # compressible
               ((2 << 20) + 4096, rng.randbytes(512)),      # one sector inside a grain
               (size - 700, rng.randbytes(700))]            # the short last grain
    make_sparse(path, size, extents)
    with open(path, "rb") as f:
        return f.read()


def write(src: str, out: str, spec: str = "", *, seed: int = 1, backing=None,
          workers: int | None = None) -> None:
    opts = VmdkOptions.parse(spec, format_name="vmdk")
    with open_image(src, "raw") as dev:
        w = FORMAT.writer(out, dev.size, opts, backing=backing, seed=seed)
        convert(dev, w, workers=workers)


def pyvmdk_read(path: str, parent: str | None = None) -> bytes:
    h = pyvmdk.handle()
    h.open(path)
    h.open_extent_data_files()
    keep = None
    if parent is not None:
        keep = pyvmdk.handle()
        keep.open(parent)
        keep.open_extent_data_files()
        h.set_parent(keep)
    try:
        return h.read_buffer_at_offset(h.get_media_size(), 0)
    finally:
        h.close()


def qemu_ok(src: str, image: str) -> None:
    assert subprocess.run([QEMU, "check", "-q", image], capture_output=True).returncode == 0
    r = subprocess.run([QEMU, "compare", "-f", "raw", "-F", "vmdk", src, image],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def header_of(path: str) -> dict:
    with open(path, "rb") as f:
        return vmdk_rules.header(f.read(512))


def descriptor_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] == b"KDMV":
        h = vmdk_rules.header(data)
        data = data[h["descriptorOffset"] * 512:(h["descriptorOffset"]
                                                 + h["descriptorSize"]) * 512]
    return data.split(b"\0", 1)[0].decode()


def ddb(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip().strip('"')
    return out


# -- every subformat and option: two independent readers --------------------------------

CASES = [(sub, "") for sub in SUBFORMATS] + [
    ("monolithicSparse", "adapter_type=lsilogic,hwversion=7,toolsversion=12325"),
    ("monolithicSparse", "compat6=on,zeroed_grain=on"),
    ("twoGbMaxExtentSparse", "zeroed_grain=on,adapter_type=buslogic"),
    ("streamOptimized", "adapter_type=lsilogic,hwversion=14,toolsversion=12325"),
    ("monolithicFlat", "adapter_type=legacyESX"),
]


@needs_qemu
@pytest.mark.parametrize("sub,spec", CASES)
def test_every_subformat_read_back_by_qemu_and_libvmdk(workdir, sub, spec):
    src = os.path.join(workdir, "src.raw")
    want = mixed_disk(src)
    out = os.path.join(workdir, "disk.vmdk")
    write(src, out, ",".join(p for p in (f"subformat={sub}", spec) if p))
    qemu_ok(src, out)
    got = pyvmdk_read(out)
    assert got[:SIZE] == want and not any(got[SIZE:])
    assert dissect_oracle.read("vmdk", out) == got      # a third reader
    text = descriptor_text(out)
    keys = ddb(text)
    assert keys["createType"] == sub
    opts = VmdkOptions.parse(spec)
    assert keys["ddb.adapterType"] == opts.adapter_type
    assert keys["ddb.virtualHWVersion"] == (opts.hwversion or ("6" if opts.compat6
                                                                else "4"))
    assert keys["ddb.toolsVersion"] == (opts.toolsversion or "2147483647")
    if sub == "monolithicSparse":
        # zeroed grains need a version-2 header (qemu writes the same), which
        # VirtualBox does not open: the option's documented cost
        assert vmdk_rules.sparse_violations(out) == (
            ["VBOX: header version 2 is not 1 or 3"] if opts.zeroed_grain else [])
        assert header_of(out)["version"] == (2 if opts.zeroed_grain else 1)


@pytest.mark.skipif(SEVENZIP is None, reason="7zz not installed")
@pytest.mark.parametrize("sub", ["monolithicSparse", "streamOptimized"])
def test_7zip_extracts_the_disk(workdir, sub):
    src = os.path.join(workdir, "src.raw")
    want = mixed_disk(src)
    out = os.path.join(workdir, "disk.vmdk")
    write(src, out, f"subformat={sub}")
    dest = os.path.join(workdir, "x")
    subprocess.run([SEVENZIP, "e", "-y", f"-o{dest}", out], check=True,
                   capture_output=True)
    (name,) = os.listdir(dest)
    with open(os.path.join(dest, name), "rb") as f:
        got = f.read()
    assert got[:SIZE] == want and not any(got[SIZE:])


# -- qemu-img's layout -------------------------------------------------------------------------

@needs_qemu
@pytest.mark.parametrize("sub", ["monolithicSparse", "twoGbMaxExtentSparse",
                                 "twoGbMaxExtentFlat", "monolithicFlat"])
def test_layout_and_descriptor_match_qemu_img(workdir, sub):
    """Header fields (the grain directories' places, overHead), extent names and the
    descriptor are qemu-img's, CID aside; split sparse extents carry no descriptor and
    start their redundant directory at sector 1, as VMware's do."""
    size = "5G" if sub.startswith("twoGb") else "100M"
    ours, theirs = os.path.join(workdir, "a.vmdk"), os.path.join(workdir, "q", "a.vmdk")
    os.mkdir(os.path.dirname(theirs))
    assert cli("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", ours, size)[0] == 0
    subprocess.run([QEMU, "create", "-q", "-f", "vmdk", "-o", f"subformat={sub}",
                    theirs, size], check=True)
    assert sorted(os.listdir(workdir)) == sorted(os.listdir(os.path.dirname(theirs))
                                                 + ["q"])
    a, b = descriptor_text(ours), descriptor_text(theirs)
    strip = lambda t: [x for x in t.splitlines() if x.strip() and not x.startswith("CID")]
    assert strip(a) == strip(b)
    if sub == "monolithicSparse":
        assert header_of(ours) == header_of(theirs)
    if sub == "twoGbMaxExtentSparse":
        ha, hb = header_of(ours[:-5] + "-s001.vmdk"), header_of(theirs[:-5] + "-s001.vmdk")
        assert ha["descriptorOffset"] == 0 and ha["rgdOffset"] == 1
        assert (ha["capacity"], ha["flags"], ha["version"]) == \
            (hb["capacity"], hb["flags"], hb["version"])
    subprocess.run([QEMU, "check", "-q", ours], check=True)


@needs_qemu
@pytest.mark.parametrize("name", ["disk.img", "noext", "a.b.vmdk"])
def test_extent_file_names_as_qemu_img(workdir, name):
    for sub in ("monolithicFlat", "twoGbMaxExtentSparse"):
        ours, theirs = (os.path.join(workdir, d) for d in ("ours", "qemu"))
        for d in (ours, theirs):
            shutil.rmtree(d, ignore_errors=True)
            os.mkdir(d)
        assert cli("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}",
                   os.path.join(ours, name), "1M")[0] == 0
        subprocess.run([QEMU, "create", "-q", "-f", "vmdk", "-o", f"subformat={sub}",
                        os.path.join(theirs, name), "1M"], check=True)
        assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))


@needs_qemu
def test_five_gib_split_disk_with_data_past_each_extent(workdir):
    size = 5 << 30
    src = make_sparse(os.path.join(workdir, "s.raw"), size,
                      [(100, b"a" * 5000), ((2 << 30) - 1000, b"b" * 3000),
                       ((9 << 29) + 77, b"c" * 70000), (size - 10, b"d" * 10)])
    for sub in ("twoGbMaxExtentSparse", "streamOptimized", "twoGbMaxExtentFlat"):
        out = os.path.join(workdir, f"{sub}.vmdk")
        write(src, out, f"subformat={sub}")
        qemu_ok(src, out)
    names = sorted(n for n in os.listdir(workdir) if "-s0" in n)
    assert names == [f"twoGbMaxExtentSparse-s00{i}.vmdk" for i in (1, 2, 3)]
    assert vmdk_rules.stream_violations(os.path.join(workdir, "streamOptimized.vmdk")) == []


# -- streamOptimized: the rules ESXi, VMware and VirtualBox apply -------------------------------

@needs_qemu
def test_stream_passes_the_rules_and_qemu_img_stream_fails_them(workdir):
    src = os.path.join(workdir, "src.raw")
    mixed_disk(src)
    ours = os.path.join(workdir, "ours.vmdk")
    write(src, ours, "subformat=streamOptimized")
    assert vmdk_rules.stream_violations(ours) == []
    h = header_of(ours)
    assert (h["version"], h["flags"], h["gdOffset"], h["overHead"]) == \
        (3, 0x30001, vmdk_rules.GD_AT_END, 128)
    theirs = os.path.join(workdir, "qemu.vmdk")
    subprocess.run([QEMU, "convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    src, theirs], check=True)
    lenient = vmdk_rules.stream_violations(theirs, strict=False)
    assert any(v.startswith("ESXI:") and "end-of-stream" in v for v in lenient), lenient


@pytest.mark.parametrize("name", ["cot_vmware_generated-stream_streamOptimized.vmdk",
                                  "cot_virtualbox_ova_export_streamOptimized.vmdk",
                                  "vmdkrs_streamOptimized.vmdk",
                                  "vmdkrs_streamOptimizedWithMarkers.vmdk"])
def test_real_vmware_and_virtualbox_streams_pass_the_lenient_rules(name):
    """The checker is not stricter than the tools whose files ESXi imports."""
    assert vmdk_rules.stream_violations(need_real(f"vmdk/{name}"), strict=False) == []


def test_stream_descriptor_has_what_open_vmdk_writes(workdir):
    src = os.path.join(workdir, "src.raw")
    mixed_disk(src)
    out = os.path.join(workdir, "s.vmdk")
    write(src, out, "subformat=streamOptimized,adapter_type=lsilogic")
    keys = ddb(descriptor_text(out))
    assert keys["encoding"] == "UTF-8"
    assert len(keys["ddb.longContentID"]) == 32
    assert keys["ddb.longContentID"].endswith(keys["CID"])
    assert (keys["ddb.geometry.heads"], keys["ddb.geometry.sectors"]) == ("255", "63")
    assert keys["ddb.geometry.cylinders"] == str(-(-(-(-SIZE // 512)) // (255 * 63)))


def test_stream_output_is_deterministic_whatever_the_threads(workdir):
    src = os.path.join(workdir, "src.raw")
    mixed_disk(src)
    digests = set()
    for i, workers in enumerate((1, 2, 4)):
        os.mkdir(os.path.join(workdir, str(i)))
        out = os.path.join(workdir, str(i), "s.vmdk")   # the name is in the descriptor
        write(src, out, "subformat=streamOptimized", seed=5, workers=workers)
        with open(out, "rb") as f:
            digests.add(hashlib.sha256(f.read()).hexdigest())
    assert len(digests) == 1
    write(src, os.path.join(workdir, "other.vmdk"), "subformat=streamOptimized", seed=6)
    assert ddb(descriptor_text(os.path.join(workdir, "other.vmdk")))["CID"] != \
        ddb(descriptor_text(os.path.join(workdir, "0", "s.vmdk")))["CID"]


def test_stream_skips_zero_grains_and_writes_only_used_tables(workdir):
    size = 64 << 20
    src = make_sparse(os.path.join(workdir, "s.raw"), size,
                      [(0, b"\1" * 10), (40 << 20, bytes(1 << 20)), (50 << 20, b"\2")])
    out = os.path.join(workdir, "s.vmdk")
    write(src, out, "subformat=streamOptimized")
    with open(out, "rb") as f:
        data = f.read()
    grains = gts = 0
    pos = 128 * 512
    while True:
        lba, n = struct.unpack_from("<QI", data, pos)
        if n:
            grains += 1
            pos += -(-(12 + n) // 512) * 512
            continue
        kind = struct.unpack_from("<I", data, pos + 12)[0]
        if kind == 0:
            break
        gts += kind == 1
        pos += 512 + lba * 512
    assert (grains, gts) == (2, 2)
    assert pyvmdk_read(out) == open(src, "rb").read()


def test_convert_c_means_what_it_means_to_qemu_img(workdir):
    src = os.path.join(workdir, "src.raw")
    mixed_disk(src)
    for sub in ("streamOptimized", "monolithicSparse"):
        out = os.path.join(workdir, f"{sub}.vmdk")
        code, _, err = cli("convert", "-c", "-O", "vmdk", "-o", f"subformat={sub}", src,
                           out)
        assert code == 0, err
        assert bool(header_of(out)["flags"] & (1 << 16)) == (sub == "streamOptimized")
        assert pyvmdk_read(out)[:SIZE] == open(src, "rb").read()


# -- delta disks -------------------------------------------------------------------------------

def _delta_setup(workdir):
    rng = random.Random(3)
    size = 2 << 20
    base_raw = make_sparse(os.path.join(workdir, "base.raw"), size,
                           [(0, rng.randbytes(size))])
    new = bytearray(open(base_raw, "rb").read())
    new[1000:1100] = b"N" * 100                 # part of grain 0
    new[5 * 65536:6 * 65536] = bytes(65536)     # a whole grain zeroed over the base
    new[9 * 65536 + 7:9 * 65536 + 9] = b"\0\0"  # two zero bytes inside a grain
    new[20 * 65536:22 * 65536] = rng.randbytes(2 * 65536)
    new_raw = make_sparse(os.path.join(workdir, "new.raw"), size, [(0, bytes(new))])
    base = os.path.join(workdir, "base.vmdk")
    write(base_raw, base, seed=11)
    return base_raw, new_raw, base, bytes(new)


@needs_qemu
@pytest.mark.parametrize("zeroed", [False, True])
def test_delta_disk_over_a_vmdk_parent(workdir, zeroed):
    base_raw, new_raw, base, want = _delta_setup(workdir)
    delta = os.path.join(workdir, "delta.vmdk")
    opts = VmdkOptions.parse(f"zeroed_grain={'on' if zeroed else 'off'}")
    with open_image(new_raw, "raw") as src, open_image(base_raw, "raw") as parent:
        w = FORMAT.writer(delta, src.size, opts, seed=2,
                          backing=Backing(name="base.vmdk", format="vmdk", device=parent))
        stats = convert(src, w, base=parent)
    assert stats.bytes_skipped > 0           # grains equal to the parent's read through
    keys = ddb(descriptor_text(delta))
    assert keys["parentCID"] == ddb(descriptor_text(base))["CID"]
    assert keys["parentFileNameHint"] == "base.vmdk"
    info = subprocess.run([QEMU, "info", delta], capture_output=True, text=True).stdout
    assert "backing file: base.vmdk" in info
    qemu_ok(new_raw, delta)
    # dissect finds the parent by parentFileNameHint and reads zeroed grains as zeros:
    # the second reader where libvmdk goes wrong (below)
    assert dissect_oracle.read("vmdk", delta) == want
    got = pyvmdk_read(delta, parent=base)
    if zeroed:
        # libvmdk reads a zeroed-grain entry (1) of a delta disk through to the parent:
        # it differs from qemu (and the spec) exactly on the grain zeroed over the base
        diff = [i for i in range(0, len(want), 65536) if got[i:i + 65536] !=
                want[i:i + 65536]]
        assert diff == [5 * 65536]
    else:
        assert got == want
    assert header_of(delta)["version"] == (2 if zeroed else 1)
    # only what differs is stored: far less than the disk
    assert os.path.getsize(delta) < (1 << 20)


@needs_qemu
def test_create_with_backing_file_as_qemu_img(workdir):
    base = os.path.join(workdir, "base.vmdk")
    assert cli("create", "-q", "-f", "vmdk", base, "1M")[0] == 0
    delta = os.path.join(workdir, "d.vmdk")
    code, _, err = cli("create", "-q", "-f", "vmdk", "-u", "-b", "base.vmdk", "-F", "vmdk",
                       delta, "1M")
    assert code == 0, err
    assert ddb(descriptor_text(delta))["parentCID"] == ddb(descriptor_text(base))["CID"]
    subprocess.run([QEMU, "check", "-q", delta], check=True)


BACKED = ("-u", "-b", "base.vmdk", "-F", "vmdk")


@pytest.mark.parametrize("spec,extra,message", [
    ("subformat=monolithicFlat", BACKED, "Flat image can't have backing"),
    ("subformat=twoGbMaxExtentFlat,zeroed_grain=on", (), "Flat image can't enable zeroed"),
    ("subformat=streamOptimized", BACKED, "not supported yet"),
    ("compat6=on,hwversion=7", (), "compat6 cannot be enabled"),
    ("subformat=monolithicSparse", ("-u", "-b", "base.vmdk", "-F", "raw"),
     "Must be vmdk"),
])
def test_refused_combinations_are_one_line(workdir, spec, extra, message):
    assert cli("create", "-q", "-f", "vmdk", os.path.join(workdir, "base.vmdk"), "1M")[0] == 0
    out = os.path.join(workdir, "x.vmdk")
    code, _, err = cli("create", "-q", "-f", "vmdk", "-o", spec, *extra, out, "1M")
    one_line_error(code, err)
    assert message in err
    assert sorted(os.listdir(workdir)) == ["base.vmdk"]


def test_parent_name_that_would_break_the_descriptor_is_refused(workdir):
    code, _, err = cli("create", "-q", "-f", "vmdk", "-u", "-b", 'a"b.vmdk', "-F", "vmdk",
                       os.path.join(workdir, "d.vmdk"), "1M")
    one_line_error(code, err)
    assert "parentFileNameHint" in err and os.listdir(workdir) == []


def test_parent_that_is_not_a_vmdk_is_one_line(workdir):
    with open(os.path.join(workdir, "base.vmdk"), "wb") as f:
        f.write(b"KDMV" + b"\xff" * 508)       # a header whose descriptor is huge
    code, _, err = cli("create", "-q", "-f", "vmdk", "-u", "-b", "base.vmdk", "-F", "vmdk",
                       os.path.join(workdir, "d.vmdk"), "1M")
    one_line_error(code, err)
    assert "descriptorSize" in err
    assert sorted(os.listdir(workdir)) == ["base.vmdk"]


@pytest.mark.parametrize("content,field", [
    (b"# Disk DescriptorFile\nversion=1\nCID=zz\ncreateType=\"monolithicSparse\"\n"
     b'RW 8 SPARSE "b.vmdk"\n', "CID"),
    (b"# Disk DescriptorFile\n" + b"#" * (2 << 20), "descriptor"),
    (b"KDMV" + bytes(508), "descriptorOffset"),
    (b"\0" * 4096, "descriptor"),
])
def test_hostile_parent_is_one_line(workdir, content, field):
    """The parent a delta disk names is input: read bounded, validated, one line."""
    with open(os.path.join(workdir, "base.vmdk"), "wb") as f:
        f.write(content)
    code, _, err = cli("create", "-q", "-f", "vmdk", *BACKED,
                       os.path.join(workdir, "d.vmdk"), "1M")
    one_line_error(code, err)
    assert field in err
    assert sorted(os.listdir(workdir)) == ["base.vmdk"]


def test_mutated_parents_give_errors_not_crashes(workdir):
    """A fixed-seed mutation run over the parent reader (header + embedded descriptor):
    every outcome is a CID or a DiskforgeError."""
    from diskforge.errors import DiskforgeError
    from diskforge.formats.vmdk.parent import parent_descriptor
    good = os.path.join(workdir, "good.vmdk")
    assert cli("create", "-q", "-f", "vmdk", good, "1M")[0] == 0
    with open(good, "rb") as f:
        seed_bytes = f.read(21 * 512)
    rng = random.Random(1234)
    path = os.path.join(workdir, "m.vmdk")
    for _ in range(300):
        data = bytearray(seed_bytes)
        for _ in range(rng.randint(1, 8)):
            at = rng.choice([rng.randrange(0, 80), rng.randrange(512, 900)])
            data[at] = rng.randrange(256)
        with open(path, "wb") as f:
            f.write(data)
        try:
            parent_descriptor(path)
        except DiskforgeError:
            pass


@needs_qemu
@pytest.mark.parametrize("sub", ["monolithicSparse", "streamOptimized"])
def test_largest_sparse_disk_and_one_beyond(workdir, sub):
    """2 TiB, the most 32-bit grain offsets address: written in an instant, its
    directory of 65536 entries is what qemu-img checks; one byte more is refused."""
    out = os.path.join(workdir, "big.vmdk")
    code, _, err = cli("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", out, "2T")
    assert code == 0, err
    subprocess.run([QEMU, "check", "-q", out], check=True)
    code, _, err = cli("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}",
                       os.path.join(workdir, "x.vmdk"), str((2 << 40) + 512))
    one_line_error(code, err)
    assert "2 TiB" in err


# -- files appear together or not at all ---------------------------------------------------------

@pytest.mark.parametrize("sub", SUBFORMATS)
def test_abort_leaves_nothing(workdir, sub):
    opts = VmdkOptions.parse(f"subformat={sub}")
    w = FORMAT.writer(os.path.join(workdir, "x.vmdk"), 5 << 30, opts)
    w.write(0, b"\1" * 65536)
    w.abort()
    assert os.listdir(workdir) == []


def test_a_failing_commit_removes_the_files_already_in_place(workdir, monkeypatch):
    opts = VmdkOptions.parse("subformat=twoGbMaxExtentSparse")
    w = FORMAT.writer(os.path.join(workdir, "x.vmdk"), 5 << 30, opts)
    w.write(0, b"\1" * 65536)
    desc = w.descriptor_file

    def fail(**kw):
        raise OSError("disk full")
    monkeypatch.setattr(desc, "commit", fail)
    with pytest.raises(OSError):
        w.finish()
    assert os.listdir(workdir) == []


# -- measure, CLI ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sub", SUBFORMATS)
def test_measure_matches_what_is_written(workdir, sub):
    src = os.path.join(workdir, "src.raw")
    mixed_disk(src)
    code, out, err = cli("measure", "--output", "json", "-O", "vmdk", "-o",
                         f"subformat={sub}", src)
    assert code == 0, err
    m = json.loads(out)
    d = os.path.join(workdir, "o")
    os.mkdir(d)
    write(src, os.path.join(d, "disk.vmdk"), f"subformat={sub}")
    total = sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d))
    if "Flat" in sub:
        assert m["required"] >= total and m["fully-allocated"] == m["required"]
    elif sub == "streamOptimized":
        assert total <= m["required"] <= m["fully-allocated"]
    else:
        # the source's map counts its written-zero grain as allocated (as qemu-img's
        # measure does); the writer leaves it out
        assert total <= m["required"] <= total + 65536 + 1024  # descriptor: <= 1 KiB
        assert m["fully-allocated"] > total


def test_option_help_reads_as_qemu_img(workdir):
    code, out, _ = cli("create", "-f", "vmdk", "-o", "help", os.path.join(workdir, "x"))
    assert code == 0
    for key in ("subformat", "adapter_type", "hwversion", "toolsversion", "compat6",
                "zeroed_grain", "backing_file"):
        assert key in out


@needs_qemu
def test_cli_convert_every_subformat(workdir):
    src = os.path.join(workdir, "src.raw")
    mixed_disk(src)
    for sub in SUBFORMATS:
        out = os.path.join(workdir, f"{sub}.vmdk")
        code, _, err = cli("convert", "-O", "vmdk", "-o", f"subformat={sub}", src, out)
        assert code == 0, err
        qemu_ok(src, out)


# -- property: random sparse contents survive raw -> vmdk, read by libvmdk and qemu-img ------

_extents = st.lists(
    st.tuples(st.integers(0, (3 << 20) - 1),
              st.one_of(st.binary(min_size=1, max_size=5000),
                        st.builds(lambda n, b: bytes([b]) * n, st.integers(1, 200_000),
                                  st.integers(0, 255)))),
    max_size=6)


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 3 << 20), exts=_extents, sub=st.sampled_from(SUBFORMATS))
def test_random_contents_round_trip(workdir, size, exts, sub):
    exts = [(o, d[:size - o]) for o, d in exts if o < size]
    src = make_sparse(os.path.join(workdir, "s.raw"), size, exts)
    want = bytearray(size)
    for o, d in exts:
        want[o:o + len(d)] = d
    out = os.path.join(workdir, "o", "disk.vmdk")
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    os.mkdir(os.path.dirname(out))
    write(src, out, f"subformat={sub}")
    got = pyvmdk_read(out)
    assert got[:size] == want and not any(got[size:])
    if QEMU:
        qemu_ok(src, out)
    if sub == "streamOptimized":
        assert vmdk_rules.stream_violations(out) == []
