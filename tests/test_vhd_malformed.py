"""vpc: damaged, truncated and hostile files give one line naming what is wrong, no
traceback, no large allocation; checksum problems are reported by ``check``."""

import json
import os
import tracemalloc

import pytest
from conftest import cli, cli_merged, make_sparse, one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vhd_helpers import FIXTURES, gunzip, patch_bat, patch_footer, patch_header, read_header

import diskforge
from diskforge.checks import Repair
from diskforge.errors import DiskforgeError


@pytest.fixture
def dynamic(workdir):
    """A small dynamic VHD with a few blocks allocated (64 KiB blocks)."""
    src = make_sparse(os.path.join(workdir, "s.raw"), 1 << 20,
                      [(0, b"a" * 5000), (300 << 10, b"b" * 70000), ((1 << 20) - 10, b"c" * 10)])
    vhd = os.path.join(workdir, "d.vhd")
    assert cli("convert", "-O", "vpc", "-o", "block_size=64K,force_size=on", src, vhd)[0] == 0
    return vhd


@pytest.fixture
def fixed(workdir):
    src = make_sparse(os.path.join(workdir, "s.raw"), 1 << 20, [(0, b"fixed")])
    vhd = os.path.join(workdir, "f.vhd")
    assert cli("convert", "-O", "vpc", "-o", "subformat=fixed", src, vhd)[0] == 0
    return vhd


def fails(*argv, match: str):
    code, _, err = cli(*argv)
    one_line_error(code, err)
    assert match in err, err
    return err


def test_footer_checksum_is_verified_and_reported_by_check(workdir, fixed):
    patch_footer(fixed, fix_checksum=False, creator_version=7)  # edited, not re-summed
    out = os.path.join(workdir, "o.raw")
    fails("convert", "-O", "raw", fixed, out, match="VhdFooter.checksum")
    assert not os.path.exists(out)
    fails("info", fixed, match="checksum")
    code, text, _ = cli("check", "--format-checks", "--output", "json", fixed)
    assert code == 2 and json.loads(text)["corruptions"] == 1
    code, text, _ = cli_merged("check", "--format-checks", fixed)
    assert "VhdFooter.checksum" in text
    with diskforge.open(fixed) as dev:
        assert dev.verify() and "checksum" in dev.verify()[0]


@pytest.mark.parametrize("name", ["dfvfs_qemu_image_dynamic", "dfvfs_qemu_image-differential"])
def test_hand_edited_real_files_with_bad_checksums(workdir, name):
    """dfvfs edited these qemu-made files without fixing the checksums: qemu refuses
    them ("Incorrect header checksum"), and so does diskforge, except for check."""
    vhd = gunzip(os.path.join(FIXTURES, f"{name}.vhd.gz"), os.path.join(workdir, "x.vhd"))
    fails("convert", "-O", "raw", vhd, os.path.join(workdir, "o.raw"),
          match="VhdFooter.checksum")
    code, text, _ = cli_merged("check", "--format-checks", vhd)
    assert code == 2 and "VhdFooter.checksum" in text
    if "differential" in name:  # its header was edited too
        assert "VhdDynamicDiskHeader.checksum" in text


def test_a_damaged_footer_copy_falls_back_to_the_footer(dynamic):
    patch_footer(dynamic, where=[0], fix_checksum=False, time_stamp=1)
    with diskforge.open(dynamic) as dev:
        assert dev.read(0, 5000) == b"a" * 5000
        assert dev.verify()
    code, text, _ = cli_merged("check", "--format-checks", dynamic)
    assert code == 2 and "copy at offset 0" in text


def test_check_rows_name_structure_and_field_and_drive_verify_and_repair(dynamic):
    """verify lists the rows whose field is a checksum (a stale but well-summed footer
    copy is not one), and -r all repairs the rows marked repairable, whatever their
    wording."""
    patch_footer(dynamic, where=[0], fix_checksum=True, time_stamp=1)   # stale copy
    with diskforge.open(dynamic) as dev:
        assert dev.verify() == []
        rows = [p for p in dev.check().problems if p.structure]
    assert [(p.structure, p.field, p.repairable) for p in rows] == \
        [("VhdFooter", None, True)]
    with diskforge.open(dynamic, writable=True) as dev:
        res = dev.check(Repair.ALL)
        assert (res.corruptions, res.corruptions_fixed) == (0, 1)
    patch_footer(dynamic, where=[0], fix_checksum=False, time_stamp=2)  # bad checksum
    with diskforge.open(dynamic) as dev:
        assert len(dev.verify()) == 1
        [row] = [p for p in dev.check().problems if p.structure]
        assert (row.structure, row.field, row.repairable) == ("VhdFooter", "checksum", True)
    patch_header(dynamic, fix_checksum=False, parent_time_stamp=5)
    with diskforge.open(dynamic) as dev:
        rows = [(p.structure, p.field, p.repairable) for p in dev.check().problems
                if p.structure]
        assert ("VhdDynamicDiskHeader", "checksum", False) in rows
        assert len(dev.verify()) == 2


def test_overlapping_blocks_are_rows_of_the_bat(dynamic):
    with diskforge.open(dynamic) as dev:
        first = dev.bat[0]
    patch_bat(dynamic, 4, first)     # block 4 stored where block 0 is
    with diskforge.open(dynamic) as dev:
        rows = [(p.structure, p.field) for p in dev.check().problems if p.structure]
    assert ("BAT", "entry[4]") in rows or ("BAT", "entry[0]") in rows, rows


def test_header_checksum(dynamic):
    patch_header(dynamic, fix_checksum=False, parent_time_stamp=5)
    fails("info", dynamic, match="VhdDynamicDiskHeader.checksum")
    patch_header(dynamic, fix_checksum=False, block_size=32768)
    fails("info", dynamic, match="VhdDynamicDiskHeader.checksum does not match")


def test_not_a_vhd(workdir):
    path = make_sparse(os.path.join(workdir, "x.img"), 1 << 20, [(0, b"hello")])
    fails("info", "-f", "vpc", path, match="not a VHD image")
    tiny = os.path.join(workdir, "tiny.vhd")
    with open(tiny, "wb") as f:
        f.write(b"conectix")
    fails("info", "-f", "vpc", tiny, match="too small")


def test_truncated_dynamic_disk(workdir, dynamic):
    size = os.path.getsize(dynamic)
    with open(dynamic, "r+b") as f:
        f.truncate(size - 4096)
    fails("convert", "-O", "raw", dynamic, os.path.join(workdir, "o.raw"),
          match="past the end of the file")


def test_bat_entry_past_eof(dynamic):
    patch_bat(dynamic, 3, 0x7FFFFFF0)
    fails("info", dynamic, match="BAT.entry[3]")


@pytest.mark.parametrize("block_size", [0, 3, 1536, 1 << 31, 0xFFFFFFFF])
def test_absurd_block_sizes(dynamic, block_size):
    patch_header(dynamic, block_size=block_size)
    fails("map", dynamic, match="VhdDynamicDiskHeader.block_size")


def test_bat_too_small_or_huge(dynamic):
    patch_header(dynamic, max_table_entries=3)
    fails("info", dynamic, match="max_table_entries")
    # a huge count: only the entries the disk needs are read, nothing large allocated
    patch_header(dynamic, max_table_entries=0xFFFFFFFF)
    tracemalloc.start()
    try:
        with diskforge.open(dynamic, writable=True) as dev:
            assert dev.read(0, 5000) == b"a" * 5000
            dev.write(900 << 10, b"new")  # lands after the blocks, not 16 GiB away
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
    assert os.path.getsize(dynamic) < 2 << 20
    code, out, _ = cli_merged("check", "--format-checks", dynamic)
    assert code == 0 and "more than the file holds" in out


def test_header_and_table_offsets_outside_the_file(dynamic):
    patch_footer(dynamic, data_offset=1 << 40)
    fails("info", dynamic, match="VhdFooter.data_offset")


def test_table_offset_outside_the_file(dynamic):
    patch_header(dynamic, table_offset=1 << 50)
    fails("info", dynamic, match="VhdDynamicDiskHeader.table_offset")


def test_header_cookie(dynamic):
    with open(dynamic, "r+b") as f:
        f.seek(512)
        f.write(b"cxsparsX")
    fails("info", dynamic, match="cxsparse")


def test_unknown_disk_type(dynamic):
    patch_footer(dynamic, disk_type=7)
    fails("info", dynamic, match="disk type 7")


def test_too_large_disk(dynamic):
    patch_footer(dynamic, creator_application=b"win ", current_size=3 << 40)
    fails("info", dynamic, match="2040 GiB")


def test_fixed_disk_bigger_than_its_file(fixed):
    patch_footer(fixed, creator_application=b"win ", current_size=64 << 20)
    fails("info", fixed, match="truncated")


def test_locator_longer_than_any_path(workdir):
    parent = os.path.join(workdir, "p.vhd")
    assert cli("create", "-q", parent, "1M")[0] == 0
    child = os.path.join(workdir, "c.vhd")
    assert cli("create", "-q", "-b", "p.vhd", child)[0] == 0
    patch_header(child, locators={0: {"platform_data_length": 1 << 30}})
    fails("info", child, match="ParentLocatorEntry.platform_data_length")


def test_overlapping_blocks_are_corruption(dynamic):
    hd = read_header(dynamic)
    with open(dynamic, "rb") as f:
        f.seek(hd.table_offset)
        first = int.from_bytes(f.read(4), "big")
    patch_bat(dynamic, 10, first + 1)  # block 10 inside block 0
    code, text, _ = cli_merged("check", "--format-checks", dynamic)
    assert code == 2 and "overlaps block 0" in text
    patch_bat(dynamic, 10, 1)  # inside the header
    code, text, _ = cli_merged("check", "--format-checks", dynamic)
    assert code == 2 and "overlaps the dynamic disk header" in text


@pytest.fixture(scope="module")
def sample_bytes(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    src = make_sparse(str(d / "s.raw"), 256 << 10, [(0, b"x" * 3000), (200 << 10, b"y")])
    vhd = str(d / "d.vhd")
    assert cli("convert", "-O", "vpc", "-o", "block_size=16K,force_size=on", src, vhd)[0] == 0
    with open(vhd, "rb") as f:
        return f.read()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_fail_cleanly(workdir, sample_bytes, data):
    """Any bytes in the header area: a DiskforgeError or a readable disk, never another
    exception or a large allocation."""
    buf = bytearray(sample_bytes)
    for _ in range(data.draw(st.integers(1, 6))):
        region = data.draw(st.sampled_from([(0, 512), (512, 1536), (1536, 2048),
                                            (len(buf) - 512, len(buf))]))
        pos = data.draw(st.integers(*region).filter(lambda p: p < len(buf)))
        buf[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):  # keep the checksums valid so deeper fields are used
        from diskforge.formats.vhd.structs import (FOOTER_CHECKSUM_AT, HEADER_CHECKSUM_AT,
                                                   with_checksum)
        buf[0:512] = with_checksum(bytes(buf[0:512]), FOOTER_CHECKSUM_AT)
        buf[-512:] = buf[0:512]
        buf[512:1536] = with_checksum(bytes(buf[512:1536]), HEADER_CHECKSUM_AT)
    path = os.path.join(workdir, "m.vhd")
    with open(path, "wb") as f:
        f.write(buf)
    tracemalloc.start()
    try:
        with diskforge.open(path, "vpc") as dev:
            list(dev.extents())
            dev.read(0, min(dev.size, 1 << 20))
            dev.check()
    except DiskforgeError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 << 20
