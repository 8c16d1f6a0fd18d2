"""Hostile and broken VHDX files: one-line errors naming the structure, no traceback,
no hang, no large allocation; parents only where the policy allows."""

import os
import struct

import pytest
from conftest import cli, cli_merged, one_line_error, sha256_device, sha256_file
from vhdx_helpers import (MiB, metadata_item, metadata_offset, random_disk, read_at,
                          set_bat_entry, write_at)

import diskforge
from diskforge.formats.vhdx.structs import (FILE_PARAMETERS_GUID, REGION_TABLE_OFFSETS,
                                           VIRTUAL_DISK_SIZE_GUID)
from diskforge.formats.vhdx.tables import Region, build_region_table, parse_metadata


@pytest.fixture
def img(workdir):
    src = random_disk(os.path.join(workdir, "s.raw"), 8 * MiB, seed=31)
    with open(src, "r+b") as f:
        f.write(os.urandom(MiB))
    path = os.path.join(workdir, "m.vhdx")
    assert cli("convert", "-O", "vhdx", "-o", "block_size=1M", src, path)[0] == 0
    return path


def fails(path, *words, command=("convert", "-O", "raw")):
    out = os.path.join(os.path.dirname(path), "out.raw")
    code, _, err = cli(*command, path, out) if "convert" in command else \
        cli(*command, path)
    one_line_error(code, err)
    for w in words:
        assert w in err, err
    assert not os.path.exists(out)
    return err


def test_truncated_file(img):
    os.truncate(img, 100_000)
    fails(img, "truncated", command=("info", "-f", "vhdx"))


def test_not_a_vhdx(img):
    write_at(img, 0, b"notvhdx!")
    fails(img, "FileTypeIdentifier.Signature", command=("info", "-f", "vhdx"))


def test_both_region_tables_corrupt(img):
    for off in REGION_TABLE_OFFSETS:
        write_at(img, off + 40, b"\x99")
    fails(img, "RegionTableHeader.Checksum")


def test_one_region_table_corrupt_uses_the_other(img):
    with diskforge.open(img) as dev:
        good = sha256_device(dev)
    write_at(img, REGION_TABLE_OFFSETS[0] + 40, b"\x99")
    with diskforge.open(img) as dev:
        assert sha256_device(dev) == good
        assert any("region table 1" in p for p in dev.verify())


def test_check_rows_name_the_structure_and_field(img):
    from diskforge.formats.vhdx.structs import HEADER_OFFSETS
    write_at(img, REGION_TABLE_OFFSETS[1] + 40, b"\x99")
    write_at(img, HEADER_OFFSETS[0] + 100, b"\x99")
    with diskforge.open(img) as dev:
        rows = [(p.structure, p.field) for p in dev.check().problems if p.structure]
        assert len(dev.verify()) == 2
    assert rows == [("Header", "Checksum"), ("RegionTableHeader", "Checksum")]


@pytest.mark.parametrize("bad", ["past-eof", "unaligned", "overlap", "unknown-required",
                                 "count"])
def test_malformed_region_tables(img, bad):
    with diskforge.open(img) as dev:
        regs = list(dev.regions.values())
    if bad == "past-eof":
        regs[0] = Region(regs[0].guid, 1 << 40, regs[0].length, True)
        words = ("past the end of the file",)
    elif bad == "unaligned":
        regs[0] = Region(regs[0].guid, regs[0].offset + 4096, regs[0].length, True)
        words = ("1 MiB multiple",)
    elif bad == "overlap":
        regs[1] = Region(regs[1].guid, regs[0].offset, regs[1].length, True)
        words = ("overlap",)
    elif bad == "unknown-required":
        regs.append(Region(b"\x42" * 16, 64 * MiB, MiB, True))
        words = ("not supported yet", "required region")
    else:
        words = ("EntryCount",)
    table = bytearray(build_region_table(regs))
    if bad == "count":
        table[8:12] = struct.pack("<I", 100000)
        from diskforge.formats.vhdx.crc32c import crc32c
        table[4:8] = bytes(4)
        table[4:8] = struct.pack("<I", crc32c(table))
    for off in REGION_TABLE_OFFSETS:
        write_at(img, off, bytes(table))
    fails(img, *words)


@pytest.mark.parametrize("block_size", [0, 3, 512 * 1024, 1 << 31, (1 << 20) + 1])
def test_absurd_block_sizes(img, block_size):
    off = metadata_item(img, FILE_PARAMETERS_GUID)
    write_at(img, off, struct.pack("<I", block_size))
    fails(img, "FileParameters.BlockSize")


def test_absurd_virtual_size_allocates_nothing(img):
    write_at(img, metadata_item(img, VIRTUAL_DISK_SIZE_GUID), struct.pack("<Q", 1 << 62))
    fails(img, "VirtualDiskSize", "64 TiB")
    # 64 TiB is allowed, but its BAT would not fit the region: refused before reading
    write_at(img, metadata_item(img, VIRTUAL_DISK_SIZE_GUID), struct.pack("<Q", 64 << 40))
    fails(img, "the BAT region holds")


def test_metadata_table_entry_count(img):
    write_at(img, metadata_offset(img) + 10, struct.pack("<H", 65535))
    fails(img, "MetadataTableHeader.EntryCount")


def test_metadata_item_outside_the_region(img):
    base = metadata_offset(img)
    write_at(img, base + 32 + 16, struct.pack("<II", 900 * 1024, 200 * 1024))
    fails(img, "outside the metadata region")


@pytest.mark.parametrize("state,offset,words", [
    (6, 1 << 40, ("BAT.entry", "outside the file")),
    (6, 0, ("BAT.entry", "outside the file")),
    (4, 0, ("invalid state 4",)),
    (7, 5 * MiB, ("invalid state 7",)),   # PARTIALLY_PRESENT outside a differencing disk
])
def test_bad_bat_entries(img, state, offset, words):
    set_bat_entry(img, 2, state, offset)
    fails(img, *words)


def test_check_reports_bat_entries_past_eof_and_overlaps(img):
    with diskforge.open(img) as dev:
        first = next(i for i, e in enumerate(dev.bat) if e & 7 == 6)
        host = (dev.bat[first] >> 20) << 20
    set_bat_entry(img, first + 1, 6, host)   # two blocks share one place
    set_bat_entry(img, first + 2, 6, 1 << 40)
    code, out, _ = cli_merged("check", img)
    assert code == 2
    assert "overlaps" in out and "outside the file" in out


# -- parents ----------------------------------------------------------------------------

def _chain(workdir):
    base_raw = random_disk(os.path.join(workdir, "b.raw"), 4 * MiB, seed=32)
    base = os.path.join(workdir, "b.vhdx")
    assert cli("convert", base_raw, base)[0] == 0
    child = os.path.join(workdir, "c.avhdx")
    assert cli("create", "-q", "-b", "b.vhdx", child)[0] == 0
    return base, child, base_raw


def _set_locator(path, **entries):
    from diskforge.formats.vhdx.tables import build_metadata_region
    with open(path, "rb") as f:
        f.seek(0)
    base = metadata_offset(path)

    def read(off, n, what=""):
        return read_at(path, off, n)
    md = parse_metadata(read, Region(b"", base, MiB, True), path)
    md.parent_locator.update(entries)
    for k in [k for k, v in md.parent_locator.items() if v is None]:
        del md.parent_locator[k]
    write_at(path, base, build_metadata_region(md))


def test_parent_loop(workdir):
    base, child, _ = _chain(workdir)
    _set_locator(child, relative_path=".\\c.avhdx")
    err = fails(child, "loop")
    assert "Traceback" not in err


def test_parent_outside_the_allowed_roots(workdir):
    base, child, base_raw = _chain(workdir)
    sub = os.path.join(workdir, "sub")
    os.mkdir(sub)
    moved = os.path.join(sub, "c.avhdx")
    os.rename(child, moved)
    _set_locator(moved, relative_path="..\\b.vhdx")
    # refused in untrusted mode unless --allow-root widens it; followed by default
    fails(moved, "outside the image's directory", "--allow-root",
          command=("--untrusted", "convert", "-O", "raw"))
    out = os.path.join(workdir, "ok.raw")
    code, _, err = cli("--untrusted", "convert", "--allow-root", workdir, "-O", "raw",
                       moved, out)
    assert code == 0, err
    assert sha256_file(out) == sha256_file(base_raw)
    os.unlink(out)
    assert cli("convert", "-O", "raw", moved, out)[0] == 0
    assert sha256_file(out) == sha256_file(base_raw)


def test_windows_absolute_path_is_looked_for_beside_the_image(workdir):
    base, child, base_raw = _chain(workdir)
    _set_locator(child, relative_path=None,
                 absolute_win32_path="C:\\Users\\Public\\Hyper-V\\b.vhdx")
    with diskforge.open(child) as dev:
        assert sha256_device(dev) == sha256_file(base_raw)


def test_modified_parent_is_refused(workdir):
    base, child, _ = _chain(workdir)
    with diskforge.open(base, writable=True) as dev:
        dev.write(0, b"changed")
    fails(child, "parent_linkage", "changed after")


def test_missing_parent(workdir):
    base, child, _ = _chain(workdir)
    os.unlink(base)
    fails(child, "b.vhdx", "not found")


def test_chain_depth_is_limited(workdir):
    from diskforge.errors import SafetyError
    from diskforge.policy import OpenPolicy
    base, child, base_raw = _chain(workdir)
    grandchild = os.path.join(workdir, "g.avhdx")
    assert cli("create", "-q", "-b", "c.avhdx", grandchild)[0] == 0
    with diskforge.open(grandchild) as dev:
        assert sha256_device(dev) == sha256_file(base_raw)
    with pytest.raises(SafetyError, match="deeper than 2"):
        diskforge.open(grandchild, policy=OpenPolicy(max_depth=2))
