"""Coverage-guided fuzzing of every format's reader (atheris, libFuzzer for Python).

Each input becomes an image file in a temporary folder (a directory for sparse
bundles), which is probed, opened with the confined open policy (files it names must
be in that folder, where an intact parent waits for the differencing seeds), asked for
``info()``, walked with ``extents()`` (at most 4096 runs) and read at a few offsets,
then closed. Any exception that is not a ``DiskforgeError`` is a crash; so is a
``DiskforgeError`` raised while handling a MemoryError, a RecursionError or the
per-input time limit (a hostile input must not be *reported* as corrupt only after it
exhausted memory or time), and one whose message is not a single line. Time is guarded
per input (CPU-time and wall-clock timers), memory by RLIMIT_AS on the fuzzing process.

Seeds are small valid images: the committed fixtures, and images made at setup by
qemu-img, qemu-io and xorriso (their timestamps and random ids pinned, so a run with a
fixed seed executes the same inputs every time). The fuzzer does not mutate the image
file itself but a dense form of it: its non-zero 512-byte blocks, concatenated, after
one byte choosing the seed whose layout puts them back in place. A VHDX of 4 MiB holds
about 10 KiB that are not zeros, and mutations should land there; an input shorter
than its layout is a truncated file, a longer one has bytes appended.

    .venv/bin/python tests/fuzz_formats.py --minutes N [--format F] [--dir DIR]  # by hand
    .venv/bin/python tests/fuzz_formats.py --runs N [--seed S] [--format F]      # fixed

By hand, each format gets its own process and an equal share of the time; a crash is
kept (the image file and its traceback) as DIR/FORMAT/crashes/FORMAT-*, and fuzzing
goes on past crashes already kept. With ``--runs`` (what the test suite does) the
chosen formats share one process for a fixed number of executions from a fixed seed:
nothing in it depends on time or thread scheduling (DMG read-ahead is off), so it
executes the same inputs, and finds the same thing or nothing, every time.
Executions per second are printed per format (needs qemu-img, qemu-io, xorriso and
atheris, which is in the ``[test]`` extra).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import plistlib
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "fixtures")
BLOCK = 512
FORMATS = {"raw": ".raw", "qcow2": ".qcow2", "vpc": ".vhd", "vhdx": ".vhdx", "vdi": ".vdi",
           "dmg": ".dmg", "sparseimage": ".sparseimage", "sparsebundle": ".sparsebundle",
           "iso": ".iso", "ova": ".ova", "vmdk": ".vmdk", "qcow": ".qcow", "qed": ".qed",
           "parallels": ".hds", "luks": ".luks", "asif": ".asif"}
KEY = b"x"                      # the passphrase of the encrypted seeds
EPOCH = "1700000000"            # SOURCE_DATE_EPOCH for every seed made here
CPU_SECONDS = 10                # per input; valid seeds take milliseconds
WALL_SECONDS = 60               # per input: a backstop for what does not use the CPU
MEMORY_HEADROOM = 768 << 20     # above the fuzzing process's own size: three times the
#                                 256 MiB a single command may allocate at once
BAND_MARK = b"\n--band--\n"     # splits a sparse bundle input: Info.plist, bands 0, 1...
MAX_EXTENTS = 4096


# -- seeds -----------------------------------------------------------------------------

def _sh(*args: str, cwd: str | None = None) -> None:
    env = dict(os.environ, SOURCE_DATE_EPOCH=EPOCH)
    subprocess.run(args, check=True, cwd=cwd, env=env, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _df(*args: str, cwd: str | None = None) -> None:
    """``diskforge ARGS``, in this process (a child process costs a second each)."""
    from diskforge.cli.main import main
    old_cwd, old_epoch = os.getcwd(), os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    try:
        os.chdir(cwd or old_cwd)
        if main(list(args)) != 0:
            raise RuntimeError(f"diskforge {' '.join(args)} failed")
    finally:
        os.chdir(old_cwd)
        if old_epoch is None:
            del os.environ["SOURCE_DATE_EPOCH"]
        else:
            os.environ["SOURCE_DATE_EPOCH"] = old_epoch


def _pin_vhd(path: str) -> None:
    """A fixed time stamp and unique id in every VHD footer copy (as
    fixtures/recipes/vhd.sh does), so the seed is the same file on every run."""
    stamp = (int(EPOCH) - 946684800).to_bytes(4, "big")
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        spots = []               # every copy, stale ones left inside blocks too
        for at in range(0, size, 512):
            f.seek(at)
            if f.read(8) == b"conectix":
                spots.append(at)
        for at in spots:
            f.seek(at)
            ft = bytearray(f.read(512))
            ft[24:28], ft[68:84], ft[64:68] = stamp, bytes(range(16)), bytes(4)
            ft[64:68] = (~sum(ft) & 0xFFFFFFFF).to_bytes(4, "big")
            f.seek(at)
            f.write(ft)


def _pin_vhdx(path: str, n: int) -> None:
    """Fixed GUIDs in a VHDX (the file, data and log GUIDs of both headers, wherever
    else they occur, and the virtual disk id), header checksums recomputed, so the seed
    is the same file on every run."""
    from diskforge.formats.vhdx.crc32c import crc32c
    from diskforge.formats.vhdx.structs import VIRTUAL_DISK_ID_GUID
    data = bytearray(open(path, "rb").read())
    # FileWriteGuid, DataWriteGuid and LogGuid of both headers, in that order
    olds = [bytes(data[at + k:at + k + 16]) for at in (65536, 131072) for k in (16, 32, 48)]
    table = data.find(b"metadata")          # the metadata table: its "page 83" item
    for at in range(table + 32, table + 32 * 64, 32):
        if data[at:at + 16] == VIRTUAL_DISK_ID_GUID:
            item = table + int.from_bytes(data[at + 16:at + 20], "little")
            olds.append(bytes(data[item:item + 16]))
    olds = [g for g in dict.fromkeys(olds) if g != bytes(16)]
    for i, old in enumerate(olds):
        data = bytearray(bytes(data).replace(old, bytes([n, i]) * 8))
    seqs = [int.from_bytes(data[at + 8:at + 16], "little") for at in (65536, 131072)]
    for at, seq in zip((65536, 131072), seqs):   # qemu starts from a random number
        data[at + 8:at + 16] = (1 + (seq > min(seqs))).to_bytes(8, "little")
    for at in (65536, 131072):
        data[at + 4:at + 8] = bytes(4)
        data[at + 4:at + 8] = crc32c(data[at:at + 4096]).to_bytes(4, "little")
    for at in range(0, len(data), 4096):     # log entries hold the LogGuid too
        if data[at:at + 4] == b"loge":
            length = int.from_bytes(data[at + 8:at + 12], "little")
            data[at + 4:at + 8] = bytes(4)
            data[at + 4:at + 8] = crc32c(data[at:at + length]).to_bytes(4, "little")
    with open(path, "r+b") as f:
        f.write(data)


def _drop_absolute_locator(path: str) -> None:
    """Remove the W2ku parent locator of a differencing VHD and keep only the file name
    in its parent_unicode_name (both hold the parent's absolute path, which differs with
    the folder the seeds are made in); the relative W2ru locator stays. The
    VhdDynamicDiskHeader checksum is recomputed."""
    import struct
    with open(path, "r+b") as f:
        f.seek(512)
        hd = bytearray(f.read(1024))
        name = hd[64:576].decode("utf-16-be").rstrip("\0").rsplit("/", 1)[-1]
        hd[64:576] = name.encode("utf-16-be").ljust(512, b"\0")
        for at in range(576, 576 + 8 * 24, 24):
            if hd[at:at + 4] == b"W2ku":
                space, _, _, offset = struct.unpack_from(">IIIQ", hd, at + 4)
                hd[at:at + 24] = bytes(24)
                f.seek(offset)
                f.write(bytes(space))
        hd[36:40] = bytes(4)
        hd[36:40] = (~sum(hd) & 0xFFFFFFFF).to_bytes(4, "big")
        f.seek(512)
        f.write(hd)


def _pin_vdi(path: str, create: int, linkage: int = 0) -> None:
    """Fixed UUIDs in a VDI header (uuidCreate and uuidModify from ``create``, the
    parent's in uuidLinkage and uuidParentModify from ``linkage``), so the seed is the
    same file on every run and a child still names its pinned parent."""
    def ids(n: int) -> bytes:
        return (bytes([n]) * 16 + bytes([n + 1]) * 16) if n else bytes(32)
    with open(path, "r+b") as f:
        f.seek(72 + 320)
        f.write(ids(create) + ids(linkage))


def _pin_qcow2_snapshots(path: str) -> None:
    """Zero the dates (date_sec, date_nsec, vm_clock_nsec) of every QCowSnapshotHeader."""
    import struct
    with open(path, "r+b") as f:
        h = f.read(72)
        count, = struct.unpack_from(">I", h, 60)
        at, = struct.unpack_from(">Q", h, 64)
        for _ in range(count):
            f.seek(at)
            e = f.read(40)
            id_len, name_len = struct.unpack_from(">HH", e, 12)
            extra, = struct.unpack_from(">I", e, 36)
            f.seek(at + 16)
            f.write(bytes(16))
            at += -(-(40 + extra + id_len + name_len) // 8) * 8


def _sparseimage(path: str) -> None:
    """A sparse image of 10 bands of 2048 sectors, bands 3 and 0 stored (in that order)."""
    import struct
    rng = random.Random(5)
    header = bytearray(4096)
    header[:28] = struct.pack(">4sIIII", b"sprs", 3, 16, 1, 10 * 16)
    header[40:44] = struct.pack(">I", 10 * 16)
    header[64:72] = struct.pack(">II", 4, 1)
    with open(path, "wb") as f:
        f.write(header + rng.randbytes(16 * 512) + rng.randbytes(3000).ljust(16 * 512, b"\0"))


def _bundle_seed(path: str) -> None:
    """A sparse bundle as one file: Info.plist, then the bands, split by BAND_MARK."""
    skeleton = os.path.join(FIXTURES, "dmg", "sparsebundle_skeleton", "hfsplus.sparsebundle")
    info = plistlib.loads(open(os.path.join(skeleton, "Info.plist"), "rb").read())
    info.update({"band-size": 4096, "size": 5 * 4096 + 512})
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.write(plistlib.dumps(info) + BAND_MARK + rng.randbytes(4096) + BAND_MARK
                + BAND_MARK + rng.randbytes(700))


def make_seeds(fmt: str, d: str) -> list[str]:
    """Valid images of ``fmt`` in ``d`` (and the parents their children name)."""
    p = lambda name: os.path.join(d, name)  # noqa: E731
    raw = os.path.join(FIXTURES, "mbr-fat.raw")
    small = p("small.raw")
    with open(raw, "rb") as f, open(small, "wb") as out:
        out.write(f.read(64 << 10))
    seeds: list[str] = []
    if fmt == "raw":
        shutil.copy(small, p("seed.raw"))
        seeds = [p("seed.raw")]
    elif fmt == "qcow2":
        for name, opts in (("s512", "cluster_size=512"), ("x", "extended_l2=on"),
                           ("z", "cluster_size=4096,compression_type=zstd")):
            _sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p(name + ".qcow2"), "1M")
            _sh("qemu-io", "-c", "write -P 0x55 4k 9k", "-c", "write -z 64k 64k",
                p(name + ".qcow2"))
            seeds.append(p(name + ".qcow2"))
        _sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", small,
            p("c.qcow2"))
        _sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512",
            p("parent.qcow2"), "1M")
        _sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b",
            "parent.qcow2", "-F", "qcow2", p("child.qcow2"))
        _sh("qemu-io", "-c", "write -P 0xa5 1k 2k", p("child.qcow2"))
        _sh("qemu-img", "snapshot", "-c", "snap", p("c.qcow2"))
        _sh("qemu-img", "bitmap", "--add", p("s512.qcow2"), "b0")
        _pin_qcow2_snapshots(p("c.qcow2"))
        seeds += [p("c.qcow2"), p("child.qcow2")]
    elif fmt == "vpc":
        _sh("qemu-img", "create", "-q", "-f", "vpc", p("d.vhd"), "1M")
        _sh("qemu-io", "-c", "write -P 0x55 4k 9k", p("d.vhd"))
        _sh("qemu-img", "convert", "-O", "vpc", "-o", "subformat=fixed", small, p("f.vhd"))
        _df("convert", "-O", "vpc", small, p("parent.vhd"))
        for name in ("d.vhd", "f.vhd", "parent.vhd"):
            _pin_vhd(p(name))
        os.utime(p("parent.vhd"), (int(EPOCH), int(EPOCH)))   # the child records it
        _df("create", "-q", "-f", "vpc", "-b", "parent.vhd", "child.vhd", cwd=d)
        _sh("qemu-io", "-c", "write -P 0xa5 1k 2k", p("child.vhd"))
        _drop_absolute_locator(p("child.vhd"))
        _pin_vhd(p("child.vhd"))
        seeds = [p("d.vhd"), p("f.vhd"), p("child.vhd")]
    elif fmt == "vhdx":
        # qemu's (without writes: qemu-io's go through the log, which is random), ours,
        # a differencing child, and one with a pending log to replay
        _sh("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", p("d.vhdx"), "3M")
        _df("convert", "-O", "vhdx", "-o", "block_size=1M", small, p("parent.vhdx"))
        _pin_vhdx(p("d.vhdx"), 1)
        _pin_vhdx(p("parent.vhdx"), 2)
        _df("create", "-q", "-f", "vhdx", "-b", "parent.vhdx", "child.vhdx", cwd=d)
        _pin_vhdx(p("child.vhdx"), 3)
        with open(p("three.raw"), "wb") as f:
            f.truncate(3 << 20)
            f.write(open(small, "rb").read())
        _df("convert", "-O", "vhdx", "-o", "block_size=1M", p("three.raw"), p("log.vhdx"))
        _pin_vhdx(p("log.vhdx"), 4)
        size = os.path.getsize(p("log.vhdx"))
        sys.path.insert(0, HERE)
        from vhdx_helpers import pending_log
        pending_log(p("log.vhdx"), extras=False, seed=3)
        with open(p("log.vhdx"), "r+b") as f:   # the new block's payload: zeros will do
            f.seek(-(-size // (1 << 20)) * (1 << 20))
            f.write(bytes(1 << 20))
        seeds = [p("d.vhdx"), p("child.vhdx"), p("log.vhdx")]
    elif fmt == "vmdk":
        seeds = _vmdk_seeds(d)
    elif fmt == "vdi":
        # qemu's (dynamic with data, static), ours (1 MiB blocks, and 4 KiB blocks with
        # a zero entry), and a differencing child of ours beside its parent
        _sh("qemu-img", "create", "-q", "-f", "vdi", p("d.vdi"), "3M")
        _sh("qemu-io", "-c", "write -P 0x55 4k 9k", "-c", "write -P 0x66 2M 4k", p("d.vdi"))
        _sh("qemu-img", "convert", "-O", "vdi", "-o", "static=on", small, p("s.vdi"))
        _df("convert", "-O", "vdi", "-o", "block_size=4k", small, p("b.vdi"))
        _df("convert", "-O", "vdi", small, p("parent.vdi"))
        changed = p("changed.raw")
        with open(small, "rb") as f, open(changed, "wb") as out:
            data = bytearray(f.read())
            data[1024:3072] = b"\xa5" * 2048
            out.write(data)
        _pin_vdi(p("parent.vdi"), 10)
        _df("convert", "-q", "-O", "vdi", "-B", "parent.vdi", changed, "child.vdi", cwd=d)
        for name, n in (("d.vdi", 1), ("s.vdi", 3), ("b.vdi", 5)):
            _pin_vdi(p(name), n)
        _pin_vdi(p("child.vdi"), 12, 10)
        seeds = [p("d.vdi"), p("s.vdi"), p("b.vdi"), p("child.vdi")]
    elif fmt == "dmg":
        for name in ("node-udif_compression-zlib.dmg", "node-udif_compression-bz2.dmg",
                     "node-udif_compression-lzfse.dmg", "dmgwiz_input_lzma.dmg",
                     "node-udif_compression-adc.dmg"):
            shutil.copy(os.path.join(FIXTURES, "dmg", name), p(name))
            seeds.append(p(name))
    elif fmt == "sparseimage":
        _sparseimage(p("s.sparseimage"))
        seeds = [p("s.sparseimage")]
    elif fmt == "sparsebundle":
        _bundle_seed(p("b.bundle"))
        seeds = [p("b.bundle")]
    elif fmt == "qcow":
        # plain and compressed (qemu-img 7.2 exits 1 after writing a compressed qcow,
        # the image complete), and an overlay of a parent with a write of its own
        _sh("qemu-img", "convert", "-O", "qcow", small, p("q.qcow"))
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow", small, p("z.qcow")],
                       timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _sh("qemu-img", "create", "-q", "-f", "qcow", p("parent.qcow"), "1M")
        _sh("qemu-img", "create", "-q", "-f", "qcow", "-b", "parent.qcow", "-F", "qcow",
            p("child.qcow"))
        _sh("qemu-io", "-c", "write -P 0xa5 1k 2k", p("child.qcow"))
        seeds = [p("q.qcow"), p("z.qcow"), p("child.qcow")]
    elif fmt == "qed":
        # small clusters with data, and an overlay with data and a zero cluster
        _sh("qemu-img", "convert", "-O", "qed", "-o", "cluster_size=4096", small,
            p("q.qed"))
        _sh("qemu-img", "create", "-q", "-f", "qed", p("parent.qed"), "1M")
        _sh("qemu-img", "create", "-q", "-f", "qed", "-b", "parent.qed", "-F", "qed",
            p("child.qed"))
        _sh("qemu-io", "-c", "write -P 0xa5 1k 2k", "-c", "write -z 64k 64k",
            p("child.qed"))
        seeds = [p("q.qed"), p("child.qed")]
    elif fmt == "parallels":
        # qemu's "WithouFreSpacExt" with 4 KiB clusters, and the same rewritten as a
        # "WithoutFreeSpace" image (BAT in sectors)
        _sh("qemu-img", "convert", "-O", "parallels", "-o", "cluster_size=4k", small,
            p("new.hds"))
        data = bytearray(open(p("new.hds"), "rb").read())
        import struct
        tracks, n = struct.unpack_from("<II", data, 28)
        bat = struct.unpack_from(f"<{n}I", data, 64)
        data[:16] = b"WithoutFreeSpace"
        struct.pack_into(f"<{n}I", data, 64, *(e * tracks for e in bat))
        with open(p("old.hds"), "wb") as f:
            f.write(data)
        seeds = [p("new.hds"), p("old.hds")]
    elif fmt == "iso":
        tree = p("tree")
        os.makedirs(os.path.join(tree, "a", "b"))
        with open(os.path.join(tree, "a", "b", "f"), "w") as f:
            f.write("hi\n")
        os.symlink("f", os.path.join(tree, "a", "b", "l"))
        for path in (tree, os.path.join(tree, "a"), os.path.join(tree, "a", "b"),
                     os.path.join(tree, "a", "b", "f"), os.path.join(tree, "a", "b", "l")):
            os.utime(path, (int(EPOCH), int(EPOCH)), follow_symlinks=False)
        _sh("xorriso", "-as", "mkisofs", "-quiet", "-R", "-J", "-V", "SEED", "-o",
            p("x.iso"), tree)
        _df("iso", "build", "-q", "--udf", tree, p("u.iso"))
        seeds = [p("x.iso"), p("u.iso")]
    elif fmt == "ova":
        # real descriptors (VirtualBox's OVF 2.0, ovftool's 1.0) with a raw and a qcow2
        # disk and a SHA256 manifest, in a ustar and a pax archive
        _sh("qemu-img", "convert", "-O", "qcow2", small, p("q.qcow2"))
        for name, ovf, disk, member, fmt_ in (
                ("v", "ubuntu.2.0.ovf", small, "ubuntu.2.0-disk1.vmdk", "ustar"),
                ("w", "vmware.ovf", p("q.qcow2"), "input.vmdk", "pax")):
            stage = p(name + ".stage")
            os.makedirs(stage)
            shutil.copy(os.path.join(FIXTURES, "ova", ovf), stage)
            shutil.copy(disk, os.path.join(stage, member))
            with open(os.path.join(stage, ovf[:-4] + ".mf"), "w") as f:
                for n in (ovf, member):
                    digest = hashlib.sha256(open(os.path.join(stage, n), "rb").read())
                    f.write(f"SHA256({n})= {digest.hexdigest()}\n")
            pax = ["--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime"]
            _sh("tar", "-c", "-f", p(name + ".ova"), f"--format={fmt_}", "--owner=0",
                "--group=0", "--numeric-owner", f"--mtime=@{EPOCH}",
                *(pax if fmt_ == "pax" else ()), "-C", stage, ovf, ovf[:-4] + ".mf",
                member)
            seeds.append(p(name + ".ova"))
    elif fmt == "asif":
        # no tool on Linux writes ASIF: a small image laid out as formats/asif.md says
        # (the real sample is AGPL and 261 MiB), chunks of 64 KiB
        import struct
        chunk = 64 << 10
        buf = bytearray(4 * chunk)
        struct.pack_into(">4sIII QQ 16s QQ IHH Q", buf, 0, b"shdw", 1, 512, 0, 512, 1024,
                         bytes(range(16)), 4 * chunk // 512, 4 * chunk // 512, chunk, 512,
                         0, 0)
        struct.pack_into(">QQ", buf, 512, 2, 1)
        struct.pack_into(">QQ", buf, 1024, 1, 0)
        struct.pack_into(">QQQ", buf, chunk, 2, 0, 3)
        buf[2 * chunk:2 * chunk + 4096] = b"\xa0" * 4096
        buf[3 * chunk:3 * chunk + 4096] = b"\xa2" * 4096
        with open(p("s.asif"), "wb") as f:
            f.write(buf)
        seeds = [p("s.asif")]
    elif fmt == "luks":
        # committed (cryptsetup's salts and keys are random, so seeds made here would
        # differ from run to run); their passphrase is KEY
        import gzip
        for name in ("cryptsetup261_luks1_cbc_essiv.img", "cryptsetup261_luks2_argon2id.img"):
            with gzip.open(os.path.join(FIXTURES, "luks", name + ".gz")) as f, \
                    open(p(name), "wb") as out:
                out.write(f.read())
            seeds.append(p(name))
    return seeds


def _vmdk_seeds(d: str) -> list[str]:
    """Hand-built (so pinned: qemu-img picks random CIDs) hosted sparse files of every
    flag (grain sizes, zeroed grains, compressed grains with markers, a parent), a
    descriptor file naming a flat extent, an ESX COWD extent, and the committed
    qemu-made fixture."""
    sys.path.insert(0, HERE)
    import struct

    from vmdk_helpers import build, descriptor
    p = lambda name: os.path.join(d, name)  # noqa: E731
    data = {0: bytes(range(256)) * 16, 2: b"\x55" * 4096}
    build(p("m.vmdk"), 256, data, grain=8, gtes=16, zeroed=(5,),
          desc=descriptor(256, "m.vmdk"))
    build(p("s.vmdk"), 256, data, grain=8, gtes=16, compress=True, markers=True,
          version=3, desc=descriptor(256, "s.vmdk", create_type="streamOptimized"))
    build(p("parent.vmdk"), 256, {1: b"\xaa" * 4096}, grain=8, gtes=16,
          desc=descriptor(256, "parent.vmdk", cid="0000abcd"))
    build(p("child.vmdk"), 256, {3: b"\xbb" * 100}, grain=8, gtes=16,
          desc=descriptor(256, "child.vmdk", parent="parent.vmdk", parent_cid="0000abcd"))
    with open(p("flat.vmdk"), "w") as f:
        f.write(descriptor(64, "parent.vmdk", create_type="monolithicFlat",
                           extent_type="FLAT").replace('vmdk"\n\n#', 'vmdk" 1\nRW 8 ZERO\n\n#'))
    cowd = bytearray(2048 + 512 + 4 * 4096 + 512)
    struct.pack_into("<4sIIIIIII", cowd, 0, b"COWD", 1, 3, 64, 1, 4, 1, 0)
    struct.pack_into("<I", cowd, 2048, 5)                   # grain table at sector 5
    struct.pack_into("<I", cowd, 2560 + 4 * 3, (len(cowd) - 512) // 512)
    cowd[-512:] = b"\xcc" * 512
    with open(p("cowd.vmdk"), "wb") as f:
        f.write(cowd)
    shutil.copy(os.path.join(FIXTURES, "vmdk", "dfvfs_qemu_ext2_monolithicSparse.vmdk"),
                p("q.vmdk"))
    return [p(n) for n in ("m.vmdk", "s.vmdk", "child.vmdk", "flat.vmdk", "cowd.vmdk",
                           "q.vmdk")]


def encode(path: str) -> tuple[dict, bytes]:
    """The layout of a seed file (size, where its non-zero blocks are) and its dense form."""
    data = open(path, "rb").read()
    blocks = [i for i in range(-(-len(data) // BLOCK))
              if data[i * BLOCK:(i + 1) * BLOCK].strip(b"\0")]
    return ({"size": len(data), "blocks": blocks},
            b"".join(data[i * BLOCK:(i + 1) * BLOCK].ljust(BLOCK, b"\0") for i in blocks))


def setup(formats: list[str], d: str) -> None:
    """d/seeds/FORMAT (made there), d/corpus (their dense forms), d/layouts.json (each
    seed's format and layout), d/work (the parents, beside which inputs are written)."""
    corpus, work = os.path.join(d, "corpus"), os.path.join(d, "work")
    os.makedirs(corpus)
    os.makedirs(work)
    layouts = []
    for fmt in formats:
        seeds_dir = os.path.join(d, "seeds", fmt)
        os.makedirs(seeds_dir)
        for seed in make_seeds(fmt, seeds_dir):
            layout, dense = encode(seed)
            unit = bytes([len(layouts)]) + dense
            layouts.append(dict(layout, format=fmt))
            with open(os.path.join(corpus, hashlib.sha1(unit).hexdigest()), "wb") as f:
                f.write(unit)
        for name in os.listdir(seeds_dir):
            if name.startswith("parent."):
                shutil.copy(os.path.join(seeds_dir, name), work)
    with open(os.path.join(d, "layouts.json"), "w") as f:
        json.dump(layouts, f)


# -- the harness (runs in the fuzzing child) ------------------------------------------

class InputTimeout(BaseException):
    """The per-input time limit. A BaseException, so no ``except Exception`` in the
    code under test turns it into an ordinary error."""


def _expire(signum, frame):
    raise InputTimeout(f"one input took more than {CPU_SECONDS} s of CPU or"
                       f" {WALL_SECONDS} s")


def materialize(data: bytes, layouts: list[dict], work: str) -> tuple[str, str]:
    """Write the image ``data`` stands for in ``work`` (see the module docstring),
    sparse, so a 4 MiB VHDX costs the few KiB that are not zeros; return its format
    and path."""
    layout = layouts[data[0] % len(layouts)] if data else layouts[0]
    fmt = layout["format"]
    path = os.path.join(work, "fuzz" + FORMATS[fmt])
    pieces: list[tuple[int, bytes]] = []
    size = 0
    if data:
        dense, blocks = data[1:], layout["blocks"]
        for k, block in enumerate(blocks):
            piece = dense[k * BLOCK:(k + 1) * BLOCK]
            pieces.append((block * BLOCK, piece))
            if len(piece) < BLOCK:  # the input ran out: the file is truncated here
                size = block * BLOCK + len(piece)
                break
        else:                   # all there: the seed's size, then any bytes appended
            size = layout["size"]
            pieces = [(at, p[:size - at]) for at, p in pieces if at < size]
            extra = dense[len(blocks) * BLOCK:]
            if extra:
                pieces.append((size, extra))
                size += len(extra)
    if fmt == "sparsebundle":
        image = bytearray(size)
        for at, piece in pieces:
            image[at:at + len(piece)] = piece
        shutil.rmtree(path, ignore_errors=True)
        parts = bytes(image).split(BAND_MARK)
        os.makedirs(os.path.join(path, "bands"))
        with open(os.path.join(path, "Info.plist"), "wb") as f:
            f.write(parts[0])
        for n, band in enumerate(parts[1:9]):
            if band:
                with open(os.path.join(path, "bands", f"{n:x}"), "wb") as f:
                    f.write(band)
        return fmt, path
    with open(path, "wb") as f:
        for at, piece in pieces:
            os.pwrite(f.fileno(), piece, at)
        f.truncate(size)
    return fmt, path


def exercise(path: str, fmt: str) -> None:
    """What a service does with an uploaded image: probe, open, info, map, read."""
    from itertools import islice

    from diskforge.policy import OpenPolicy
    from diskforge.registry import open_image, probe
    probe(path)
    # untrusted: what such a service uses, and what keeps a mutated backing name inside
    # the fuzz directory (the default follows names anywhere, as qemu-img does)
    with open_image(path, fmt, policy=OpenPolicy.untrusted(), key=KEY) as dev:
        dev.info()
        if fmt == "ova":        # the manifest check streams every member
            dev.verify()
        first_data = None
        for e in islice(dev.extents(), MAX_EXTENTS):
            if first_data is None and e.kind.value == "data":
                first_data = e.offset
        size = dev.size
        spots = [0, size // 2, size - 4096, size - 1]
        if first_data is not None:
            spots.append(first_data)
        for off in spots:
            off = max(0, min(off, size))
            dev.read(off, min(4096, size - off))


def _causes(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def signature(e: BaseException) -> str:
    """What makes two crashes the same bug: the exception type and the innermost
    diskforge line it came from."""
    where = "?"
    for frame in traceback.extract_tb(e.__traceback__):
        if os.sep + "diskforge" + os.sep in frame.filename:
            where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
    return f"{type(e).__name__}@{where}"


def child(d: str, libfuzzer_args: list[str]) -> None:
    """The fuzzing process: instrument diskforge, cap memory, run libFuzzer."""
    import atheris
    with atheris.instrument_imports(include=["diskforge"]):
        import pkgutil

        import diskforge
        import diskforge.formats
        import diskforge.iso
        from diskforge.errors import DiskforgeError
        from diskforge.registry import all_formats
        # the readers, imported now so that all of them are instrumented (diskforge
        # imports lazily); not the CLI, operations or hypervisor code
        for m in pkgutil.iter_modules(diskforge.__path__, "diskforge."):
            if not m.ispkg and m.name != "diskforge.__main__":
                __import__(m.name)
        for pkg in (diskforge.formats, diskforge.iso):
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                __import__(m.name)
        all_formats()
        # DMG read-ahead decodes the next chunks in worker threads: what they cover,
        # and when, depends on thread timing, which would make a run from a fixed seed
        # take a different path each time. The same decoders run in this thread
        # without it (read-ahead runs in every DMG conversion of the suite and of
        # fuzz_cli.py).
        from diskforge.formats.dmg import reader
        reader.READAHEAD_BYTES = 0
        # a LUKS header's KDF cost is capped at seconds of work, which is right for a
        # user's command but would let mutated costs eat the fuzzing budget: the caps
        # are lowered here (their checks run the same, against smaller numbers)
        from diskforge.crypto import kdf
        kdf.PBKDF2_MAX_ITERATIONS = 20_000
        kdf.BUDGET_PBKDF2_ITERATIONS = 40_000
        kdf.ARGON2_MAX_MEMORY_KIB = 1024
        kdf.ARGON2_MAX_TIME = 8
        kdf.BUDGET_ARGON2_KIB_PASSES = 16384
    layouts = json.load(open(os.path.join(d, "layouts.json")))
    work = os.path.join(d, "work")
    crashes = os.path.join(d, "crashes")
    known_file = os.path.join(crashes, "known.txt")
    known = set(open(known_file).read().split()) if os.path.exists(known_file) else set()
    counts: dict[str, list] = {layout["format"]: [0, 0.0] for layout in layouts}
    signal.signal(signal.SIGPROF, _expire)
    signal.signal(signal.SIGALRM, _expire)

    def one_input(data: bytes) -> None:
        start = time.monotonic()
        fmt, path = materialize(data, layouts, work)
        bad = None
        signal.setitimer(signal.ITIMER_PROF, CPU_SECONDS)
        signal.setitimer(signal.ITIMER_REAL, WALL_SECONDS)
        try:
            exercise(path, fmt)
        except DiskforgeError as e:
            hidden = [c for c in _causes(e)
                      if isinstance(c, (MemoryError, RecursionError, InputTimeout))]
            if hidden:
                bad = hidden[0]
            elif "\n" in str(e):
                bad = AssertionError(f"a multi-line error: {str(e)!r}")
                bad.__traceback__ = e.__traceback__
        except BaseException as e:  # noqa: BLE001 - anything else is a crash
            bad = e
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.setitimer(signal.ITIMER_REAL, 0)
        c = counts[fmt]
        c[0] += 1
        c[1] += time.monotonic() - start
        if sum(n for n, _ in counts.values()) % 64 == 0:
            with open(os.path.join(d, "counts.json"), "w") as f:
                json.dump(counts, f)
        if bad is None:
            return
        sig = signature(bad)
        if sig in known:
            return
        os.makedirs(crashes, exist_ok=True)
        name = f"{fmt}-{re.sub(r'[^A-Za-z0-9_.@-]', '_', sig)}"
        with open(os.path.join(crashes, name + ".txt"), "w") as f:
            f.write("".join(traceback.format_exception(bad)))
        keep = os.path.join(crashes, name + FORMATS[fmt])
        if os.path.isdir(path):
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(path, keep)
        else:
            shutil.copy(path, keep)
        print(f"CRASH {sig} (kept as {keep})", flush=True)
        raise bad

    os.chdir(work)
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_HEADROOM, vm + MEMORY_HEADROOM))
    atheris.Setup([sys.argv[0]] + libfuzzer_args, one_input)
    print(f"READY {time.monotonic()}", flush=True)  # executions per second count from here
    atheris.Fuzz()


# -- the driver ------------------------------------------------------------------------

def fuzz(d: str, *, runs: int | None, seconds: float | None, seed: int) -> dict:
    """Run libFuzzer on what ``setup`` made in ``d``, in a child process; return its
    statistics."""
    corpus = os.path.join(d, "corpus")
    max_len = max(os.path.getsize(os.path.join(corpus, n)) for n in os.listdir(corpus))
    args = [corpus, f"-seed={seed}", "-timeout=0", "-rss_limit_mb=0", "-malloc_limit_mb=0",
            f"-max_len={max_len + 4096}", "-print_final_stats=1", "-reload=0",
            f"-artifact_prefix={os.path.join(d, 'crashes', 'input-')}"]
    if runs is not None:
        args.append(f"-runs={runs}")
    if seconds is not None:
        args.append(f"-max_total_time={max(1, int(seconds))}")
    os.makedirs(os.path.join(d, "crashes"), exist_ok=True)
    # a hang guard for the whole run (each input has its own limits): generous, yet
    # short enough that a test waiting on this (test_fuzz_formats.py) sees it first
    limit = (seconds or 0) + (runs or 0) / 10 + 60
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--dir", d,
                           "--", *args], capture_output=True, text=True, timeout=limit, env=env)
    done = time.monotonic()
    out = re.sub(r"^INFO: Instrumenting .*\n", "", proc.stdout + proc.stderr, flags=re.M)
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", out))
    ready = re.search(r"^READY (\S+)", out, re.M)
    return {"returncode": proc.returncode, "output": out,
            "crash": re.findall(r"^CRASH (\S+)", out, re.M),
            "execs": int(stats.get("number_of_executed_units", 0)),
            "seconds": done - float(ready.group(1)) if ready else 0.0}


def per_format(d: str) -> str:
    """Executions and executions per second of each format, from the harness's counts."""
    try:
        counts = json.load(open(os.path.join(d, "counts.json")))
    except OSError:
        return ""
    return ", ".join(f"{fmt} {n} ({n / max(t, 1e-9):.0f}/s)" for fmt, (n, t) in counts.items())


def by_runs(formats: list[str], d: str, runs: int, seed: int) -> int:
    """One process over every format, ``runs`` executions from ``seed``: deterministic."""
    setup(formats, d)
    r = fuzz(d, runs=runs, seconds=None, seed=seed)
    rate = r["execs"] / max(r["seconds"], 1e-9)
    status = "crash: " + " ".join(r["crash"]) if r["crash"] else \
        "ok" if r["returncode"] == 0 else f"exit {r['returncode']}"
    print(f"{r['execs']} executions, {rate:.0f}/s, {status}")
    print(f"  of which {per_format(d)}")
    if r["returncode"] != 0:
        print(r["output"][-6000:], file=sys.stderr)
    return 0 if r["returncode"] == 0 else 1


def by_time(formats: list[str], d: str, minutes: float, seed: int) -> int:
    """Each format in turn, in its own process, for an equal share of the time; crashes
    are kept and fuzzing goes on past them."""
    found = []
    for fmt in formats:
        fd = os.path.join(d, fmt)
        setup([fmt], fd)
        deadline = time.monotonic() + minutes * 60 / len(formats)
        execs, seconds, crashes, s = 0, 0.0, [], seed
        while time.monotonic() < deadline - 1:
            r = fuzz(fd, runs=None, seconds=deadline - time.monotonic(), seed=s)
            execs, seconds = execs + r["execs"], seconds + r["seconds"]
            if not r["crash"]:
                if r["returncode"] != 0:
                    crashes.append(f"exit {r['returncode']}")
                    print(r["output"][-3000:], file=sys.stderr)
                break
            crashes += r["crash"]
            with open(os.path.join(fd, "crashes", "known.txt"), "a") as f:
                f.write("".join(c + "\n" for c in r["crash"]))
            s += 1
        print(f"{fmt}: {execs} executions, {execs / max(seconds, 1e-9):.0f}/s, "
              + ("crashes: " + " ".join(crashes) if crashes else "ok"), flush=True)
        found += crashes
    if found:
        print(f"crashes kept in {d}/*/crashes (the image file and its traceback)")
    return 1 if found else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, help="fuzz for this long in all (by hand)")
    ap.add_argument("--runs", type=int, help="executions in all (deterministic)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--format", action="append", choices=sorted(FORMATS),
                    help="only this format (repeatable); default: all")
    ap.add_argument("--dir", default="/tmp/diskforge-fuzz-formats",
                    help="where seeds, corpus and crashes go (emptied first)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("libfuzzer", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.dir, a.libfuzzer)
        return 0
    if (a.minutes is None) == (a.runs is None):
        ap.error("give --minutes (by hand) or --runs (deterministic)")
    formats = a.format or list(FORMATS)
    shutil.rmtree(a.dir, ignore_errors=True)
    if a.runs is not None:
        return by_runs(formats, a.dir, a.runs, a.seed)
    return by_time(formats, a.dir, a.minutes, a.seed)


if __name__ == "__main__":
    sys.exit(main())
