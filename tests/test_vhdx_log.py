"""VHDX log replay and header selection, on files whose log we construct.

qemu-img is the oracle: it refuses to open a VHDX with a pending log read-only, and
``qemu-img check -r all`` replays it; the disk it then reads is what diskforge must
read from the untouched file (in memory), and what diskforge's writable open must
leave on disk.
"""

import os
import shutil
import uuid

import pytest
from conftest import (cli, cli_merged, need, one_line_error, run, sha256_device,
                      sha256_file)
from vhdx_helpers import (MiB, headers, pending_log, rewrite_headers, random_disk,
                          write_at)

import diskforge
from diskforge.formats.vhdx.structs import LOG_SECTOR
from diskforge.formats.vhdx.log import build_entry


def _qemu_vhdx(workdir, size=16 * MiB):
    need("qemu-img")
    src = random_disk(os.path.join(workdir, "s.raw"), size, seed=21, pieces=8)
    with open(src, "r+b") as f:   # make sure blocks 0 and 1 are allocated
        f.write(os.urandom(2 * MiB))
    img = os.path.join(workdir, "l.vhdx")
    run("qemu-img", "convert", "-O", "vhdx", "-o", "block_size=1M", src, img)
    return img


@pytest.mark.parametrize("wrapped", [False, True])
def test_pending_log_reads_as_the_replayed_disk(workdir, wrapped):
    img = _qemu_vhdx(workdir)
    oracle = os.path.join(workdir, "oracle.vhdx")
    shutil.copy(img, oracle)
    pending_log(img, wrapped=wrapped, seed=5)
    # qemu-img replays the same updates, logged without wrapping: qemu's log search
    # compares the sequence numbers of the first entries of candidate sequences, so
    # for a sequence that wraps it picks the lone entry after the wrap and skips A
    pending_log(oracle, wrapped=False, seed=5)
    assert run("qemu-img", "info", oracle, check=False).returncode != 0  # pending
    run("qemu-img", "check", "-r", "all", oracle)
    expected = os.path.join(workdir, "expected.raw")
    run("qemu-img", "convert", "-O", "raw", oracle, expected)
    before = sha256_file(img)
    with diskforge.open(img) as dev:   # read-only: replayed in memory
        assert len(dev.replayed.entries) == 2
        assert sha256_device(dev) == sha256_file(expected)
        assert dev.info().details["log"]["replayed"] == 2
    assert sha256_file(img) == before   # nothing written
    code, report, _ = cli_merged("check", img)
    assert code == 0 and "2 pending entries, replayed in memory" in report
    assert sha256_file(img) == before
    out = os.path.join(workdir, "ours.raw")
    assert cli("convert", "-O", "raw", img, out)[0] == 0
    assert sha256_file(out) == sha256_file(expected)
    # writable: replayed into the file, then the log is emptied
    with diskforge.open(img, writable=True) as dev:
        assert sha256_device(dev) == sha256_file(expected)
    assert all(h.LogGuid == bytes(16) for h in headers(img))
    run("qemu-img", "check", img)
    again = os.path.join(workdir, "again.raw")
    run("qemu-img", "convert", "-O", "raw", img, again)
    assert sha256_file(again) == sha256_file(expected)


def test_log_guid_without_entries_is_corrupt(workdir):
    img = _qemu_vhdx(workdir)
    rewrite_headers(img, LogGuid=uuid.uuid4().bytes_le)
    code, _, err = cli("info", img)
    one_line_error(code, err)
    assert "no valid entry sequence" in err


def test_log_of_a_truncated_file_is_refused(workdir):
    img = _qemu_vhdx(workdir)
    pending_log(img, extras=False)
    size = os.path.getsize(img)
    os.truncate(img, size - MiB)
    code, _, err = cli("info", img)
    one_line_error(code, err)
    assert "FlushedFileOffset" in err and "truncated" in err


def test_logged_write_onto_the_headers_is_refused(workdir):
    img = _qemu_vhdx(workdir)
    with diskforge.open(img) as dev:
        log_off = dev.header.LogOffset
    guid = uuid.uuid4().bytes_le
    e = build_entry(sequence=1, tail=0, log_guid=guid, flushed_file_offset=0,
                    last_file_offset=0, data=[(64 * 1024, bytes(LOG_SECTOR))])
    write_at(img, log_off, e)
    rewrite_headers(img, LogGuid=guid)
    code, _, err = cli("info", img)
    one_line_error(code, err)
    assert "would overwrite" in err


# -- headers ----------------------------------------------------------------------------

def test_one_damaged_header_opens_from_the_other(workdir):
    img = _qemu_vhdx(workdir)
    with diskforge.open(img) as dev:
        good = sha256_device(dev)
        current = dev.current
    # damage the current (newer) header: the older one must be used
    write_at(img, (64 << 10) * (current + 1) + 200, b"\xff")
    with diskforge.open(img) as dev:
        assert dev.current == 1 - current
        assert sha256_device(dev) == good
        assert dev.info().details["damaged-headers"] == [current + 1]
        assert any("checksum" in p for p in dev.verify())
    code, out, _ = cli_merged("check", img)
    assert code == 2 and "header" in out


def test_newer_valid_header_wins(workdir):
    img = _qemu_vhdx(workdir)
    h1, h2 = headers(img)
    from construct import Container

    from diskforge.formats.vhdx.tables import build_header
    older = Container(h1)
    older.SequenceNumber = min(h1.SequenceNumber, h2.SequenceNumber) - 1
    older.LogOffset = 5 * MiB   # nonsense that must not be used
    write_at(img, 64 << 10, build_header(older))
    with diskforge.open(img) as dev:
        assert dev.current == 1 and dev.header.LogOffset == MiB


def test_both_headers_damaged_is_a_clear_error(workdir):
    img = _qemu_vhdx(workdir)
    write_at(img, (64 << 10) + 300, b"\x01")
    write_at(img, (128 << 10), b"HEAD")
    code, _, err = cli("convert", "-O", "raw", img, os.path.join(workdir, "x.raw"))
    one_line_error(code, err)
    assert "neither header is valid" in err and "checksum mismatch" in err
    assert not os.path.exists(os.path.join(workdir, "x.raw"))
