"""Partition tables read back exactly as sfdisk and sgdisk wrote them."""

import json
import os
import struct

import pytest
from conftest import cli, need, run

import diskforge
from diskforge.partitions import read_partitions


def sfdisk_json(path):
    return json.loads(run("sfdisk", "--json", path).stdout)["partitiontable"]


@pytest.fixture
def mbr_logical(workdir):
    need("sfdisk")
    path = os.path.join(workdir, "mbr.raw")
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    script = ("label: dos\nlabel-id: 0x12345678\n"
              "start=2048, size=8192, type=83, bootable\n"
              "start=10240, size=8192, type=7\n"
              "start=18432, size=100000, type=5\n"
              "start=20480, size=4096, type=82\n"
              "start=26624, size=8192, type=83\n"
              "start=36864, size=2048, type=c\n")
    run("sfdisk", "-q", path, input=script)
    return path


def test_mbr_with_logical_partitions_matches_sfdisk(mbr_logical):
    theirs = sfdisk_json(mbr_logical)
    with diskforge.open(mbr_logical) as dev:
        table = read_partitions(dev)
    assert table.scheme == "mbr" and table.disk_id == theirs["id"]
    assert not table.problems
    ours = [(f"{mbr_logical}{p.number}", p.start // 512, p.size // 512, p.type[2:].lstrip("0"))
            for p in table.partitions]
    expected = [(p["node"], p["start"], p["size"], p["type"]) for p in theirs["partitions"]]
    assert ours == expected
    assert [p.kind for p in table.partitions] == ["primary", "primary", "extended",
                                                  "logical", "logical", "logical"]
    assert table.partitions[0].bootable


def test_gpt_matches_sgdisk_and_survives_a_corrupt_primary(workdir):
    need("sgdisk")
    path = os.path.join(workdir, "gpt.raw")
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    run("sgdisk", "-n", "1:2048:+10M", "-t", "1:ef00", "-c", "1:EFI",
        "-n", "2:0:+20M", "-t", "2:8300", "-c", "2:root fs", path)
    theirs = sfdisk_json(path)
    with diskforge.open(path) as dev:
        table = read_partitions(dev)
    assert table.scheme == "gpt" and table.primary_ok and table.backup_ok
    assert table.disk_id.upper() == theirs["id"].upper()
    ours = [(p.start // 512, p.size // 512, p.type.upper(), p.guid.upper(), p.name)
            for p in table.partitions]
    expected = [(p["start"], p["size"], p["type"].upper(), p["uuid"].upper(), p["name"])
                for p in theirs["partitions"]]
    assert ours == expected
    assert table.partitions[0].type_name == "EFI System"
    with open(path, "r+b") as f:   # damage the primary header
        f.seek(512 + 40)
        f.write(b"\xff" * 8)
    with diskforge.open(path) as dev:
        broken = read_partitions(dev)
    assert not broken.primary_ok and broken.backup_ok
    assert [p.start for p in broken.partitions] == [p.start for p in table.partitions]
    assert any("primary GPT is corrupt" in p for p in broken.problems)
    code, out, _ = cli("info", "--details", path)
    assert code == 0 and "primary GPT is corrupt" in out and "root fs" in out


def test_ebr_loop_and_absurd_gpt_counts_are_reported_not_followed(workdir):
    path = os.path.join(workdir, "loop.raw")
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        mbr = bytearray(512)
        mbr[446:462] = struct.pack("<B3sB3sII", 0, b"", 0x05, b"", 2048, 4096)
        mbr[510:512] = b"\x55\xaa"
        f.write(mbr)
        ebr = bytearray(512)  # logical partition, then a "next" pointing back at itself
        ebr[446:462] = struct.pack("<B3sB3sII", 0, b"", 0x83, b"", 1, 100)
        ebr[462:478] = struct.pack("<B3sB3sII", 0, b"", 0x05, b"", 0, 4096)
        ebr[510:512] = b"\x55\xaa"
        f.seek(2048 * 512)
        f.write(ebr)
    with diskforge.open(path) as dev:
        table = read_partitions(dev)
    assert any("loops" in p for p in table.problems)
    assert len(table.partitions) == 2

    import binascii
    hdr = bytearray(512)  # a GPT header claiming 2^32-1 entries, with a valid CRC
    struct.pack_into("<8sIIIIQQQQ16sQIII", hdr, 0, b"EFI PART", 0x10000, 92, 0, 0, 1,
                     16383, 34, 16000, b"\1" * 16, 2, 0xFFFFFFFF, 128, 0)
    struct.pack_into("<I", hdr, 16, binascii.crc32(bytes(hdr[:92])))
    with open(path, "r+b") as f:
        f.seek(512)
        f.write(hdr)
    with diskforge.open(path) as dev:
        table = read_partitions(dev)
    assert table.scheme == "gpt" and not table.partitions
    assert any("out of range" in p for p in table.problems)


def test_no_table_on_a_blank_disk(workdir):
    path = os.path.join(workdir, "blank.raw")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    with diskforge.open(path) as dev:
        assert read_partitions(dev) is None
