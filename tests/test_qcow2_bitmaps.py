"""qcow2 persistent dirty bitmaps against qemu: ``info``/``check`` of images qemu-img
makes, ``diskforge bitmap`` beside ``qemu-img bitmap`` (same exit codes, words and
results), ``convert --bitmaps``, ``measure``'s bitmaps bytes, resize/commit/rebase and
snapshots on images with bitmaps, and hostile bitmap directories.

Every image diskforge changes is read back by two of qemu's readers: ``qemu-img
check`` (no errors, no leaks: the bitmap clusters are counted) with ``qemu-img info``,
and the bits themselves through ``qemu-nbd``'s ``qemu:dirty-bitmap:NAME`` meta context
(``qemu-img map`` over NBD with ``x-dirty-bitmap``) and through QMP
(``query-named-block-nodes`` in a ``qemu-system`` that opens the image: dirty byte
count, recording, inconsistent)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import struct
import subprocess
import time

import pytest
from conftest import cli, need, one_line_error, qemu_img_json, run

import diskforge

MIB = 1 << 20


# -- qemu's readers ---------------------------------------------------------------------

def clean(path: str) -> dict:
    proc = run("qemu-img", "check", "--output", "json", path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def bitmaps_of(path: str) -> list[dict]:
    data = qemu_img_json("info", "-U", path)["format-specific"]["data"]
    return data.get("bitmaps", [])


_SOCKETS = itertools.count()



def _stop_server(pidfile: str, sock: str) -> None:
    """End the forked qemu-nbd and wait until it is gone: it holds the image's locks
    until it exits, and the next command of a test may want to write the image."""
    try:
        with open(pidfile) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if sock.encode() not in f.read():  # gone, and the pid reused
                    return
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):  # gone
            return
        time.sleep(0.02)
    raise AssertionError(f"qemu-nbd {pid} still running 30 s after SIGTERM")

def dirty(path: str, name: str) -> list[tuple[int, int]]:
    """The dirty ranges qemu-nbd exports for bitmap ``name`` (x-dirty-bitmap makes
    qemu-img map report dirty areas as "data": false). ``--fork`` returns once the
    server listens; without ``-t`` it ends after this one client."""
    need("qemu-nbd")
    # a socket of its own each time: a server that just ended removes its socket
    n = next(_SOCKETS)
    sock = os.path.join(os.path.dirname(path), f".nbd-{n}.sock")
    pidfile = os.path.join(os.path.dirname(path), f".nbd-{n}.pid")
    run("qemu-nbd", "-r", "--fork", "--pid-file", pidfile, "-k", sock, "-f", "qcow2",
        "-B", name, path, timeout=60)
    try:
        mapped = json.loads(run(
            "qemu-img", "map", "--output", "json", "--image-opts",
            f"driver=nbd,server.type=unix,server.path={sock},"
            f"x-dirty-bitmap=qemu:dirty-bitmap:{name}", timeout=60).stdout)
    finally:  # (it ends by itself after its one client; not if that client failed)
        _stop_server(pidfile, sock)
    out: list[tuple[int, int]] = []
    for e in mapped:
        if not e["data"]:
            if out and out[-1][0] + out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["start"], e["length"]))
    return out


def qmp_bitmaps(path: str) -> dict[str, dict]:
    """What a running QEMU makes of the image's bitmaps (read-only node)."""
    qemu = need("qemu-system-x86_64")
    script = ('{"execute":"qmp_capabilities"}\n'
              '{"execute":"query-named-block-nodes","arguments":{"flat":true}}\n'
              '{"execute":"quit"}\n')
    proc = subprocess.run(
        [qemu, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio",
         "-blockdev", "driver=qcow2,node-name=img,read-only=on,file.driver=file,"
         f"file.filename={path}"], input=script, capture_output=True, text=True,
        timeout=120)
    for line in proc.stdout.splitlines():
        reply = json.loads(line)
        if isinstance(reply.get("return"), list):
            node = next(n for n in reply["return"] if n["node-name"] == "img")
            return {b["name"]: b for b in node.get("dirty-bitmaps", [])}
    raise AssertionError(proc.stdout + proc.stderr)


def same_bitmaps(ours: str, theirs: str) -> None:
    """Both images hold the same bitmaps, flags and dirty bits, for qemu."""
    assert bitmaps_of(ours) == bitmaps_of(theirs)
    for b in bitmaps_of(theirs):
        if "in-use" not in b["flags"]:
            assert dirty(ours, b["name"]) == dirty(theirs, b["name"]), b["name"]


def qemu_io(path: str, *cmds: str) -> None:
    argv = ["qemu-io"]
    for c in cmds:
        argv += ["-c", c]
    run(*argv, path)


def in_use(path: str) -> None:
    """Leave the image's enabled bitmaps in use, as a crashed QEMU leaves them."""
    run("qemu-io", "-c", "write -P 9 7M 4k", "-c", "abort", path, check=False)


@pytest.fixture
def image(workdir):
    """A qemu-img-made image: bitmaps enabled and disabled, with writes recorded."""
    need("qemu-img")
    path = os.path.join(workdir, "bm.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "16M")
    qemu_io(path, "write -P 1 0 64k")
    run("qemu-img", "bitmap", "--add", path, "b0")
    run("qemu-img", "bitmap", "--add", "-g", "512", path, "fine")
    run("qemu-img", "bitmap", "--add", "-g", "1M", "--disable", path, "coarse")
    qemu_io(path, "write -P 2 1M 4k", "write -P 3 5M 3M")
    return path


# -- reading ----------------------------------------------------------------------------

def _bitmaps_block(text: str) -> str:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if '"bitmaps": [' in line)
    indent = lines[start][:len(lines[start]) - len(lines[start].lstrip())]
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(indent + "]"))
    return "\n".join(lines[start:end + 1])


def test_info_shows_bitmaps_as_qemu_img(image):
    in_use(image)
    run("qemu-img", "bitmap", "--add", "--disable", image, "éte")
    theirs = run("qemu-img", "info", image).stdout
    code, ours, _ = cli("info", image)
    assert code == 0 and ours == theirs
    theirs = run("qemu-img", "info", "--output", "json", image).stdout
    code, ours, _ = cli("info", "--output", "json", image)
    assert json.loads(ours) == json.loads(theirs)
    assert _bitmaps_block(ours) == _bitmaps_block(theirs)  # byte for byte
    assert "in-use" in _bitmaps_block(ours) and '"flags": [\n' in ours


def test_check_counts_bitmap_clusters(image):
    in_use(image)
    theirs = run("qemu-img", "check", image)
    code, out, err = cli("check", image)
    assert (code, out) == (0, theirs.stdout), err
    theirs = json.loads(run("qemu-img", "check", "--output", "json", image).stdout)
    code, out, _ = cli("check", "--output", "json", image)
    assert json.loads(out) == theirs


# -- the bitmap subcommand ----------------------------------------------------------------

STEPS = [
    ["--add", "{img}", "b1"],
    ["--add", "-g", "64k", "--disable", "{img}", "b2"],
    ["--merge", "fine", "{img}", "b2"],
    ["--enable", "{img}", "b2"],
    ["--clear", "{img}", "b0"],
    ["--merge", "coarse", "--merge", "b1", "{img}", "b0"],
    ["--add", "--remove", "{img}", "gone"],
    ["--disable", "{img}", "fine"],
    ["--merge", "b0", "-b", "{other}", "-F", "qcow2", "{img}", "b1"],
    ["--remove", "{img}", "coarse"],
    # failures, some after an action that succeeded (which stays done, as in qemu-img)
    ["--add", "{img}", "b1"],
    ["--clear", "--add", "{img}", "b2"],
    ["--remove", "{img}", "nope"],
    ["--merge", "nope", "{img}", "b1"],
    ["--add", "-g", "1000", "{img}", "x"],
    ["--add", "-g", "256", "{img}", "x"],
    ["--add", "-g", "4G", "{img}", "x"],
    ["--clear", "-g", "64k", "{img}", "b1"],
    ["-b", "{other}", "--add", "{img}", "y"],
    ["-F", "qcow2", "--merge", "b0", "{img}", "b1"],
    ["{img}", "b1"],
    ["--add", "{img}"],
    ["--merge", "b0", "-b", "{workdir}/missing.qcow2", "{img}", "b1"],
    ["--add", "-g", "2G", "{img}", "huge"],
]


def test_bitmap_subcommand_as_qemu_img(image, workdir):
    """The same invocations with both tools on two copies of one image: the same exit
    codes, qemu's words in the errors, the same bitmaps and bits after each change."""
    ours = os.path.join(workdir, "ours.qcow2")
    shutil.copy(image, ours)
    other = os.path.join(workdir, "other.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", other, "16M")
    run("qemu-img", "bitmap", "--add", other, "b0")
    qemu_io(other, "write 12M 128k")
    for step in STEPS:
        def argv(img):
            return [a.format(img=img, other=other, workdir=workdir) for a in step]
        theirs = run("qemu-img", "bitmap", *argv(image), check=False)
        code, _, err = cli("bitmap", *argv(ours))
        assert code == theirs.returncode, (step, err, theirs.stderr)
        if code:
            one_line_error(code, err)
            words = theirs.stderr.splitlines()[0].split(": ", 1)[1]
            words = words.split("'#block")[0]  # qemu names its node, we the file
            if "Could not open" not in words:
                assert words in err, (step, err)
        clean(ours)
        assert bitmaps_of(ours) == bitmaps_of(image), step
    same_bitmaps(ours, image)
    # QMP: QEMU itself loads our bitmaps as it loads its own
    mine, its = qmp_bitmaps(ours), qmp_bitmaps(image)
    assert mine == its and mine["b1"]["count"] > 0 and mine["b2"]["recording"]


def test_qemu_img_continues_on_our_bitmaps(workdir):
    """qemu-img's bitmap operations, qemu-io writes and qemu-img check on images whose
    bitmaps diskforge wrote, and the other way round."""
    path = os.path.join(workdir, "o.qcow2")
    assert cli("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "32M")[0] == 0
    assert cli("bitmap", "--add", "-g", "8k", path, "a")[0] == 0
    assert cli("bitmap", "--add", "--disable", path, "d")[0] == 0
    qemu_io(path, "write 0 4k", "write 20M 1M")
    assert dirty(path, "a") == [(0, 8192), (20 * MIB, MIB)]
    assert dirty(path, "d") == []
    run("qemu-img", "bitmap", "--merge", "a", path, "d")
    run("qemu-img", "bitmap", "--add", path, "q")
    assert cli("bitmap", "--remove", path, "a")[0] == 0
    run("qemu-img", "bitmap", "--clear", path, "q")
    with diskforge.open(path, writable=True) as dev:   # our writes mark 'q'
        dev.write(31 * MIB, b"x" * 512)
    clean(path)
    assert [b["name"] for b in bitmaps_of(path)] == ["d", "q"]
    assert [b["granularity"] for b in bitmaps_of(path)] == [4096, 4096]  # qemu's default
    assert dirty(path, "d") == [(0, 8192), (20 * MIB, MIB)]
    assert dirty(path, "q") == [(31 * MIB, 4096)]
    assert qmp_bitmaps(path)["q"]["count"] == 4096
    assert cli("bitmap", "--remove", path, "d")[0] == 0
    assert cli("bitmap", "--remove", path, "q")[0] == 0
    clean(path)
    assert bitmaps_of(path) == []
    assert "bitmaps" not in run("qemu-img", "info", path).stdout


def test_bitmap_takes_image_opts_and_objects(image):
    opts = f"driver=qcow2,file.filename={image}"
    assert cli("bitmap", "--object", "secret,id=s0,data=x", "--add", "--image-opts",
               opts, "io")[0] == 0
    assert cli("bitmap", "--merge", "b0", "--image-opts", opts, "io")[0] == 0
    clean(image)
    assert dirty(image, "io") == dirty(image, "b0")


def test_bitmap_refused_where_qemu_refuses(workdir):
    v2 = os.path.join(workdir, "v2.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M")
    raw = os.path.join(workdir, "r.raw")
    run("qemu-img", "create", "-q", "-f", "raw", raw, "1M")
    big = os.path.join(workdir, "big.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", big, "4T")
    for argv, words in ((["--add", v2, "d"], "Cannot store dirty bitmaps in qcow2 v2"),
                        (["--add", "-f", "raw", raw, "r"], "Operation not supported"),
                        (["--remove", "-f", "raw", raw, "r"], "Dirty bitmap 'r' not"),
                        (["--add", "-g", "512", big, "d"], "Too much space will be"),
                        ([], "Need at least one of")):
        theirs = run("qemu-img", "bitmap", *argv, check=False)
        code, _, err = cli("bitmap", *argv)
        one_line_error(code, err)
        assert theirs.returncode == code and words in err and words in theirs.stderr


def test_inconsistent_bitmaps_only_removed(image, workdir):
    in_use(image)
    ours = os.path.join(workdir, "ours.qcow2")
    shutil.copy(image, ours)
    for step in (["--clear"], ["--disable"], ["--enable"], ["--merge", "coarse"],
                 ["--remove"]):
        theirs = run("qemu-img", "bitmap", *step, image, "b0", check=False)
        code, _, err = cli("bitmap", *step, ours, "b0")
        assert code == theirs.returncode
        if code:
            one_line_error(code, err)
            assert "Bitmap 'b0' is inconsistent and cannot be used" in err
    clean(ours)
    assert bitmaps_of(ours) == bitmaps_of(image)
    assert [b["name"] for b in bitmaps_of(ours)] == ["fine", "coarse"]


# -- other operations on images with bitmaps ----------------------------------------------

def test_resize_keeps_bitmaps_as_qemu_img(image, workdir):
    ours = os.path.join(workdir, "ours.qcow2")
    shutil.copy(image, ours)
    for size in ("+8M", "20M"):
        run("qemu-img", "resize", *(["--shrink"] if size == "20M" else []), image, size)
        code, _, err = cli("resize", *(["--shrink"] if size == "20M" else []), ours, size)
        assert code == 0, err
        clean(ours)
        same_bitmaps(ours, image)
    assert dirty(ours, "b0") == [(MIB, 65536), (5 * MIB, 3 * MIB)]
    in_use(image)
    shutil.copy(image, ours)
    theirs = run("qemu-img", "resize", image, "32M", check=False)
    code, _, err = cli("resize", ours, "32M")
    one_line_error(code, err)
    assert theirs.returncode == code and "Bitmap 'b0' is inconsistent" in err
    assert qemu_img_json("info", ours)["virtual-size"] == 20 * MIB


def test_commit_and_rebase_mark_what_they_write(workdir):
    """As qemu-img: commit marks the base's enabled bitmaps where it writes and leaves
    the overlay's alone; a safe rebase marks what it copies into the overlay."""
    def chain(tag):
        base = os.path.join(workdir, f"base-{tag}.qcow2")
        ov = os.path.join(workdir, f"ov-{tag}.qcow2")
        new = os.path.join(workdir, f"new-{tag}.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
        run("qemu-img", "bitmap", "--add", base, "bb")
        qemu_io(base, "write -P 1 2M 64k")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.basename(base),
            "-F", "qcow2", ov)
        run("qemu-img", "bitmap", "--add", ov, "ob")
        qemu_io(ov, "write -P 2 9M 128k")
        run("qemu-img", "create", "-q", "-f", "qcow2", new, "16M")
        qemu_io(new, "write -P 3 4M 64k")
        return base, ov, new
    qb, qo, qn = chain("q")
    db, do, dn = chain("d")
    run("qemu-img", "rebase", "-b", os.path.basename(qn), "-F", "qcow2", qo)
    assert cli("rebase", "-b", os.path.basename(dn), "-F", "qcow2", do)[0] == 0
    same_bitmaps(do, qo)
    run("qemu-img", "commit", qo)
    assert cli("commit", do)[0] == 0
    for ours, theirs in ((db, qb), (do, qo), (dn, qn)):
        clean(ours)
    same_bitmaps(do, qo)
    assert dirty(do, "ob") == [(2 * MIB, 65536), (4 * MIB, 65536), (9 * MIB, 131072)]


def test_snapshot_apply_refused_with_bitmaps(image):
    run("qemu-img", "snapshot", "-c", "s1", image)  # (creating one is fine)
    before = bitmaps_of(image)
    code, _, err = cli("snapshot", "-a", "s1", image)
    theirs = run("qemu-img", "snapshot", "-a", "s1", image, check=False)
    one_line_error(code, err)
    assert theirs.returncode == code and "Device has active dirty bitmaps" in err
    assert cli("snapshot", "-c", "s2", image)[0] == 0
    assert cli("snapshot", "-d", "s1", image)[0] == 0
    clean(image)
    assert bitmaps_of(image) == before


# -- convert --bitmaps and measure ------------------------------------------------------

@pytest.mark.parametrize("opts", [[], ["-c", "-o", "cluster_size=4k"],
                                  ["-o", "cluster_size=2M,extended_l2=on"]])
def test_convert_copies_bitmaps_as_qemu_img(image, workdir, opts):
    theirs = os.path.join(workdir, "theirs.qcow2")
    ours = os.path.join(workdir, "ours.qcow2")
    run("qemu-img", "convert", "--bitmaps", "-O", "qcow2", *opts, image, theirs)
    code, _, err = cli("convert", "--bitmaps", "-O", "qcow2", *opts, image, ours)
    assert code == 0, err
    clean(ours)
    same_bitmaps(ours, theirs)
    assert qmp_bitmaps(ours) == qmp_bitmaps(theirs)
    assert run("qemu-img", "compare", image, ours).returncode == 0
    salvaged = os.path.join(workdir, "salvaged.qcow2")
    code, _, err = cli("convert", "--salvage", "--bitmaps", "-O", "qcow2", image, salvaged)
    assert code == 0, err
    same_bitmaps(salvaged, ours)
    # and a target that exists (-n), with bitmaps of its own
    target = os.path.join(workdir, "n.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", target, "16M")
    run("qemu-img", "bitmap", "--add", target, "own")
    code, _, err = cli("convert", "-n", "--bitmaps", "-O", "qcow2", image, target)
    assert code == 0, err
    clean(target)
    assert [b["name"] for b in bitmaps_of(target)] == ["own", "b0", "fine", "coarse"]
    assert dirty(target, "fine") == dirty(theirs, "fine")
    code, _, err = cli("convert", "-n", "--bitmaps", "-O", "qcow2", image, target)
    one_line_error(code, err)
    assert "Bitmap already exists: b0" in err


def test_convert_bitmaps_refusals_as_qemu_img(image, workdir):
    out = os.path.join(workdir, "o")
    raw = os.path.join(workdir, "r.raw")
    run("qemu-img", "create", "-q", "-f", "raw", raw, "1M")
    for argv, words in (
            (["--skip-broken-bitmaps", "-O", "qcow2", image, out], "requires --bitmaps"),
            (["--bitmaps", "-O", "raw", image, out], "Format driver 'raw' does not"),
            (["--bitmaps", "-O", "qcow2", "-o", "compat=0.10", image, out],
             "does not support bitmaps"),
            (["--bitmaps", "-O", "qcow2", raw, out], "Source lacks bitmap support"),
            (["--bitmaps", "-O", "qcow2", image, image, out], "only possible with single")):
        theirs = run("qemu-img", "convert", *argv, check=False)
        code, _, err = cli("convert", *argv)
        one_line_error(code, err)
        assert theirs.returncode == code and words in err and words in theirs.stderr
        if os.path.exists(out):
            os.unlink(out)  # (qemu-img leaves a target behind in some; we never do)
    in_use(image)
    theirs = run("qemu-img", "convert", "--bitmaps", "-O", "qcow2", image, out,
                 check=False)
    code, _, err = cli("convert", "--bitmaps", "-O", "qcow2", image, out)
    one_line_error(code, err)
    assert theirs.returncode == code and not os.path.exists(out)
    words = theirs.stderr.splitlines()[0].split(": ", 1)[1]
    assert words == "Cannot copy inconsistent bitmap 'coarse'" and words in err
    code, _, err = cli("convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2",
                       image, out)
    theirs = run("qemu-img", "convert", "--bitmaps", "--skip-broken-bitmaps", "-O",
                 "qcow2", image, out + ".q")
    assert code == 0 and err.count("Skipping inconsistent bitmap 'b0'") == 1
    assert [line.split(": ", 2)[2] for line in theirs.stderr.splitlines()] == \
        [line.split(": ", 2)[2] for line in err.splitlines()]
    clean(out)
    same_bitmaps(out, out + ".q")


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4k"], ["-o", "compat=0.10"],
                                  ["-o", "cluster_size=2M,refcount_bits=1"]])
def test_measure_counts_bitmaps_as_qemu_img(image, workdir, opts):
    in_use(image)  # an in-use bitmap is still counted, as qemu counts it
    for fmt in ("qcow2", "raw"):
        for output in ("human", "json"):
            argv = ["measure", "--output", output, "-O", fmt, *opts, image]
            if fmt == "raw" and opts:
                continue
            code, out, err = cli(*argv)
            assert (code, out) == (0, run("qemu-img", *argv).stdout), err
    v2 = os.path.join(workdir, "v2.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", "-o", "compat=0.10", image, v2)
    argv = ["measure", "--output", "json", "-O", "qcow2", *opts, v2]
    assert cli(*argv)[1] == run("qemu-img", *argv).stdout


# -- hostile bitmap directories -----------------------------------------------------------

def _directory(path):
    with diskforge.open(path) as dev:
        ext = dev.header.bitmaps
        from diskforge.formats.qcow2.bitmaps import read_directory
        return ext, read_directory(dev), dev.cs


def _hdr_ext_offset(path):
    """Where the bitmaps header extension's 24 bytes start."""
    with open(path, "rb") as f:
        head = f.read(65536)
    pos = struct.unpack(">I", head[100:104])[0]   # header_length
    while True:
        magic, length = struct.unpack(">II", head[pos:pos + 8])
        if magic == 0x23852875:
            return pos + 8
        assert magic, "no bitmaps extension"
        pos += 8 + length + (-length % 8)


def _poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


HOSTILE = {
    # name: (how, field the error names)
    "directory truncated": ("dirsize", "Broken bitmap directory"),
    "directory past the file": ("dir_past_end", "bitmap_directory_offset"),
    "more bitmaps than the directory holds": ("nb_huge", "nb_bitmaps"),
    "fewer bitmaps than the directory holds": ("nb_small", "nb_bitmaps"),
    "table offset past the file": ("table_past_end", "bitmap_table_offset"),
    "table offset unaligned": ("table_unaligned", "bitmap_table_offset"),
    "table of 128 Mi entries": ("table_huge", "bitmap_table_size"),
    "name runs past the directory": ("name_huge", "name_size"),
    "extra data": ("extra", "extra_data_size"),
    "reserved flags": ("flags", "flags"),
    "granularity 2^5": ("gran", "granularity_bits"),
    "type 7": ("type", "type"),
    "two bitmaps of one name": ("dup", "name"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_bitmap_directory(workdir, case):
    """Every structure of a bad directory gives one line naming the file, structure
    and field: info, check (corruption, exit 2) and the bitmap subcommand; reading the
    disk's data still works (the bitmaps are not needed for it)."""
    need("qemu-img")
    how, field = HOSTILE[case]
    path = os.path.join(workdir, "h.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "16M")
    run("qemu-img", "bitmap", "--add", path, "b0")
    run("qemu-img", "bitmap", "--add", path, "b1")
    qemu_io(path, "write -P 7 0 64k")
    ext, entries, cs = _directory(path)
    hx = _hdr_ext_offset(path)
    e0 = entries[0].entry_offset
    size = os.path.getsize(path)
    if how == "dirsize":
        _poke(path, hx + 8, struct.pack(">Q", ext.directory_size - 8))
    elif how == "dir_past_end":
        _poke(path, hx + 16, struct.pack(">Q", (size // cs + 4) * cs))
    elif how == "nb_huge":
        _poke(path, hx, struct.pack(">I", 65535))
    elif how == "nb_small":
        _poke(path, hx, struct.pack(">I", 1))
    elif how == "table_past_end":
        _poke(path, e0, struct.pack(">Q", (size // cs + 4) * cs))
    elif how == "table_unaligned":
        _poke(path, e0, struct.pack(">Q", entries[0].table_offset + 8))
    elif how == "table_huge":
        _poke(path, e0 + 8, struct.pack(">I", 0x8000000))
        os.truncate(path, 2 << 30)
    elif how == "name_huge":
        _poke(path, e0 + 18, struct.pack(">H", 1023))
    elif how == "extra":
        _poke(path, e0 + 20, struct.pack(">I", 8))
    elif how == "flags":
        _poke(path, e0 + 12, struct.pack(">I", 0x80000002))
    elif how == "gran":
        _poke(path, e0 + 17, b"\x05")
    elif how == "type":
        _poke(path, e0 + 16, b"\x07")
    elif how == "dup":
        _poke(path, entries[1].entry_offset + 24, b"b0")
    for argv in (["info", path], ["info", "--output", "json", path],
                 ["bitmap", "--add", path, "x"], ["measure", "-O", "qcow2", path]):
        code, out, err = cli(*argv)
        one_line_error(code, err)
        assert path in err and field in err, (argv, err)
    code, out, err = cli("check", path)
    if how == "dir_past_end":  # the header's own checks: the image does not open
        one_line_error(code, err)
        assert field in err
    else:
        assert code == 2 and field in err and "Traceback" not in err, out + err
    if how != "dir_past_end":
        code, out, err = cli("convert", "-O", "raw", path, os.path.join(workdir, "o.raw"))
        assert code == 0, err


def test_shared_and_misplaced_bitmap_clusters_are_corruption(workdir):
    """Two bitmaps sharing a data cluster (a loop in the reference graph), and a table
    entry pointing at the directory or into the header: check counts every reference
    as qemu does and reports the damage, naming the structure."""
    path = os.path.join(workdir, "s.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "16M")
    for name in ("b0", "b1"):
        run("qemu-img", "bitmap", "--add", "-g", "512", path, name)
    qemu_io(path, "write 0 4k")
    clean(path)
    ext, entries, cs = _directory(path)
    with open(path, "rb") as f:
        f.seek(entries[0].table_offset)
        e0 = f.read(8)
    assert int.from_bytes(e0, "big")  # b0's first cluster has data
    # a loop: b1's table is the directory itself, whose first 8 bytes (b0's table
    # offset) then read as b1's one data cluster
    work = os.path.join(workdir, "loop.qcow2")
    shutil.copy(path, work)
    _poke(work, entries[1].entry_offset, struct.pack(">Q", ext.directory_offset))
    code, out, err = cli("check", work)
    assert code == 2 and "reference=2" in err, out + err
    code, _, err = cli("bitmap", "--remove", work, "b1")
    one_line_error(code, err)
    assert "named 2 times" in err and "bitmap table.offset" in err
    for entry, words in ((e0, "refcount=1 reference=2"),
                         (struct.pack(">Q", ext.directory_offset), "reference=2"),
                         (struct.pack(">Q", 512), "table entry 0"),
                         (struct.pack(">Q", 0x0100_0000_0000_0000), "reserved bits")):
        work = os.path.join(workdir, "w.qcow2")
        shutil.copy(path, work)
        _poke(work, entries[1].table_offset, entry)
        theirs = run("qemu-img", "check", work, check=False)
        code, out, err = cli("check", work)
        assert code == 2 and words in err, out + err
        assert theirs.returncode in (1, 2)  # qemu: corrupt, or cannot open it at all
        with open(work, "rb") as f:
            before = f.read()
        for argv in (["bitmap", "--clear", work, "b0"], ["bitmap", "--remove", work, "b1"],
                     ["convert", "--bitmaps", "-O", "qcow2", work, work + ".o"]):
            code, out, err = cli(*argv)   # refused before anything is written
            if argv[0] == "convert" and words.startswith("refcount"):
                assert code == 0, err     # (reading a shared cluster is harmless)
            else:
                one_line_error(code, err)
                assert "bitmap table" in err, err
            with open(work, "rb") as f:
                assert f.read() == before


def test_amend_keeps_bitmaps(image):
    before = {b["name"]: dirty(image, b["name"]) for b in bitmaps_of(image)}
    for width in ("8", "64", "1"):
        assert cli("amend", "-o", f"refcount_bits={width}", image)[0] == 0
        clean(image)
    assert {b["name"]: dirty(image, b["name"]) for b in bitmaps_of(image)} == before
    code, _, err = cli("amend", "-o", "compat=0.10", image)
    one_line_error(code, err)   # qemu-img downgrades and leaks them; we refuse
    assert "bitmaps" in err
    clean(image)


# -- the in-memory model ------------------------------------------------------------------

from hypothesis import given, strategies as st  # noqa: E402

from diskforge.dirty_bitmaps import DirtyBitmap, bit_runs  # noqa: E402

GRANS = st.sampled_from([512, 4096, 65536, 1 << 20])
WRITES = st.lists(st.tuples(st.integers(0, 4 * MIB), st.integers(1, MIB)), max_size=12)


def _marked(bits: set, size: int, granularity: int, writes) -> set:
    """A bit-per-set-member model of marking byte ranges."""
    for off, n in writes:
        if off < size:
            bits |= set(range(off // granularity,
                              (min(size, off + n) - 1) // granularity + 1))
    return bits


def _ranges(bits: set, size: int, granularity: int) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for i in sorted(bits):
        start, end = i * granularity, min(size, (i + 1) * granularity)
        if out and out[-1][1] == start:
            out[-1][1] = end
        else:
            out.append([start, end])
    return [(s, e - s) for s, e in out]


@given(GRANS, GRANS, WRITES, WRITES, st.integers(1, 4 * MIB))
def test_bitmap_model(g1, g2, w1, w2, size):
    """Marking, run finding, merging across granularities and resizing agree with a
    set-of-bits model (what qemu's hbitmap does: a shrink keeps the partial last
    granule's bit, a grow adds clean bits)."""
    a = DirtyBitmap.empty("a", g1, size)
    b = DirtyBitmap.empty("b", g2, size)
    for off, n in w1:
        a.set_range(off, n)
    for off, n in w2:
        b.set_range(off, n)
    model = _marked(set(), size, g1, w1)
    assert list(a.dirty_ranges()) == _ranges(model, size, g1)
    a.merge(b)
    model = _marked(model, size, g1, _ranges(_marked(set(), size, g2, w2), size, g2))
    assert list(a.dirty_ranges()) == _ranges(model, size, g1)
    half = size // 2 + 1
    a.resize(half)
    model = {i for i in model if i < -(-half // g1)}
    assert list(a.dirty_ranges()) == _ranges(model, half, g1)
    a.resize(size)
    assert list(a.dirty_ranges()) == _ranges(model, size, g1)
    assert list(bit_runs(bytes([0b10110110, 0xFF, 0x01, 0, 0x80]))) == \
        [(1, 3), (4, 6), (7, 17), (39, 40)]


def test_bitmap_on_an_overlay_whose_backing_file_is_missing(workdir):
    """qemu-img bitmap opens neither the image's backing chain nor the merge source's
    (issue 16): the same edits work with both tools while the base is gone, and with
    the base back, qemu-img check and qemu-nbd find the same bitmaps and bits."""
    need("qemu-img")
    base = os.path.join(workdir, "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
    tops = {}
    for who in ("theirs", "ours"):
        d = os.path.join(workdir, who)
        os.mkdir(d)
        for name in ("top", "src"):
            tops[who, name] = os.path.join(d, f"{name}.qcow2")
            run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F",
                "qcow2", tops[who, name])
        run("qemu-img", "bitmap", "--add", tops[who, "src"], "s")
        qemu_io(tops[who, "src"], "write 1M 64k")
    os.rename(base, base + ".away")
    steps = [("--add", "{top}", "b"), ("--add", "-g", "128k", "{top}", "c"),
             ("--merge", "s", "-b", "{src}", "{top}", "b"), ("--disable", "{top}", "c"),
             ("--clear", "{src}", "s"), ("--remove", "{top}", "c")]
    for step in steps:
        def argv(who):
            return [a.format(top=tops[who, "top"], src=tops[who, "src"]) for a in step]
        theirs = run("qemu-img", "bitmap", *argv("theirs"), check=False)
        assert theirs.returncode == 0, theirs.stderr
        code, _, err = cli("bitmap", *argv("ours"))
        assert code == 0, (step, err)
    os.rename(base + ".away", base)
    for name in ("top", "src"):
        clean(tops["ours", name])
        assert bitmaps_of(tops["ours", name]) == bitmaps_of(tops["theirs", name])
    assert dirty(tops["ours", "top"], "b") == dirty(tops["theirs", "top"], "b") != []
