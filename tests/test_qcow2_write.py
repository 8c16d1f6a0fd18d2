"""qcow2 writing: everything diskforge writes passes ``qemu-img check`` with no errors
or leaks and ``qemu-img compare`` against the intended contents; dissect.hypervisor reads
every option's output but extended L2 (its bug) as a second reader."""

import json
import os

import dissect_oracle
import pytest
from conftest import cli, need, one_line_error, qemu_img_json, run, sha256_file

import diskforge

MIB = 1 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    need("qemu-img")
    d = tmp_path_factory.mktemp("qcow2w")
    path = str(d / "src.raw")
    rng = __import__("random").Random(11)
    size = 5 * MIB + 1536  # not a whole number of clusters
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(4096)
        f.write(rng.randbytes(300 * 1024))
        f.seek(MIB)
        f.write((b"compressible text for the qcow2 writer " * 30000)[:MIB + 777])
        f.seek(3 * MIB)
        f.write(bytes(128 * 1024))
        f.seek(size - 1000)
        f.write(rng.randbytes(1000))
    return path


def assert_clean(path: str, *, cwd=None) -> dict:
    """qemu-img check finds nothing; returns its JSON."""
    proc = run("qemu-img", "check", "--output", "json", path, check=False, cwd=cwd)
    result = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not result.get("corruptions") and not result.get("leaks")
    return result


def assert_same(a: str, b: str, *, cwd=None) -> None:
    proc = run("qemu-img", "compare", a, b, check=False, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr


OPTIONS = [
    "compat=1.1", "compat=0.10", "cluster_size=512", "cluster_size=4k", "cluster_size=2M",
    "preallocation=metadata", "preallocation=falloc", "preallocation=full",
    "lazy_refcounts=on", "refcount_bits=1", "refcount_bits=2", "refcount_bits=8",
    "refcount_bits=32", "refcount_bits=64", "extended_l2=on",
    "extended_l2=on,cluster_size=2M,preallocation=metadata",
    "compat=0.10,cluster_size=512,preallocation=metadata",
]


@pytest.mark.parametrize("opts", OPTIONS)
def test_convert_with_every_option(workdir, source, opts):
    out = os.path.join(workdir, "out.qcow2")
    code, _, err = cli("convert", "-O", "qcow2", "-o", opts, source, out)
    assert code == 0, err
    assert_clean(out)
    assert_same(source, out)
    if "extended_l2" not in opts:
        # a second reader; dissect.hypervisor 3.21 cannot read extended L2 entries
        # (count_contiguous_subclusters takes the bitmap from the L2 entry word), on
        # qemu-img's files as on ours
        with open(source, "rb") as f:
            assert dissect_oracle.read("qcow2", out) == f.read()
    info = qemu_img_json("info", out)
    fs = info["format-specific"]["data"]
    for kv in opts.split(","):
        k, v = kv.split("=")
        if k == "compat":
            assert fs["compat"] == ("0.10" if v == "0.10" else "1.1")
        elif k == "cluster_size":
            assert info["cluster-size"] == diskforge.options.parse_size(v)
        elif k == "refcount_bits":
            assert fs["refcount-bits"] == int(v)
        elif k in ("lazy_refcounts", "extended_l2"):
            assert fs[k.replace("_", "-")] is True
    if "preallocation=falloc" in opts or "preallocation=full" in opts:
        assert os.stat(out).st_blocks * 512 >= os.path.getsize(source)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("extra", ["", ",cluster_size=4k", ",refcount_bits=1",
                                   ",extended_l2=on"])
def test_compressed(workdir, source, ctype, extra):
    out = os.path.join(workdir, "c.qcow2")
    code, _, err = cli("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}"
                       + extra, source, out)
    assert code == 0, err
    result = assert_clean(out)
    assert result["compressed-clusters"] > 0
    assert_same(source, out)
    assert qemu_img_json("info", out)["format-specific"]["data"]["compression-type"] == ctype
    # smaller than qemu's own output by no more than 5%, either way
    theirs = os.path.join(workdir, "q.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}"
        + extra, source, theirs)
    assert os.path.getsize(out) <= os.path.getsize(theirs) * 1.05


def test_compression_runs_in_several_threads(workdir, source, monkeypatch):
    import threading

    import collections
    import time

    from diskforge.formats.qcow2 import codec
    calls = collections.Counter()
    real = codec.compress

    def spy(ctype, data):
        calls[threading.get_ident()] += 1
        time.sleep(0.002)  # long enough for the pipeline to hand work to other threads
        return real(ctype, data)
    monkeypatch.setattr(codec, "compress", spy)
    out = os.path.join(workdir, "c.qcow2")
    assert cli("convert", "-c", "-m", "3", "-O", "qcow2", source, out)[0] == 0
    main = calls.pop(threading.get_ident(), 0)  # clusters cut by the source's extents
    assert len(calls) >= 2 and sum(calls.values()) > 4 * main
    assert_same(source, out)


def test_create_plain_and_overlays(workdir, source):
    empty = os.path.join(workdir, "empty.qcow2")
    assert cli("create", "-q", empty, "10G")[0] == 0
    assert_clean(empty)
    assert qemu_img_json("info", empty)["virtual-size"] == 10 << 30
    base = os.path.join(workdir, "base.qcow2")
    assert cli("convert", "-O", "qcow2", source, base)[0] == 0
    for how in (["-b", "base.qcow2", "-F", "qcow2"], ["-o", "backing_file=base.qcow2"]):
        top = os.path.join(workdir, "top.qcow2")
        assert cli("create", "-q", "-f", "qcow2", *how, top)[0] == 0
        assert_clean(top)
        assert_same(source, top)
        info = qemu_img_json("info", top)
        assert info["backing-filename"] == "base.qcow2"
        assert info["virtual-size"] == os.path.getsize(source)
        os.unlink(top)
    v2 = os.path.join(workdir, "v2.qcow2")
    assert cli("create", "-q", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", v2)[0] \
        == 0
    assert_clean(v2)
    assert_same(source, v2)


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "extended_l2=on",
                                  "cluster_size=4k"])
def test_convert_B_writes_only_the_differences(workdir, source, opts):
    base = os.path.join(workdir, "base.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", source, base)
    changed = os.path.join(workdir, "changed.raw")
    data = bytearray(open(source, "rb").read())
    data[2 * MIB:2 * MIB + 4096] = b"\x99" * 4096         # new data
    data[8192:8192 + 65536] = bytes(65536)                # zeros over base data
    with open(changed, "wb") as f:
        f.write(data)
    out = os.path.join(workdir, "diff.qcow2")
    code, _, err = cli("convert", "-O", "qcow2", "-o", opts, "-B", "base.qcow2", "-F",
                       "qcow2", changed, out)
    assert code == 0, err
    assert_clean(out)
    assert_same(changed, out)
    # only the two changed regions live in the overlay
    mapped = qemu_img_json("map", out)
    own = sum(e["length"] for e in mapped if e["depth"] == 0 and e["present"])
    assert 0 < own <= 4 * 65536 if "4k" not in opts else own <= 2 * 65536
    assert qemu_img_json("info", out)["backing-filename"] == "base.qcow2"


def test_external_data_file(workdir, source):
    out = os.path.join(workdir, "ext.qcow2")
    code, _, err = cli("convert", "-O", "qcow2", "-o", "data_file=ext.raw", source, out)
    assert code == 0, err
    assert_clean(out, cwd=workdir)
    assert_same(source, out, cwd=workdir)
    raw = os.path.join(workdir, "raw.qcow2")
    code, _, err = cli("convert", "-O", "qcow2", "-o", "data_file=raw.raw,data_file_raw=on",
                       source, raw)
    assert code == 0, err
    assert_clean(raw, cwd=workdir)
    assert_same(source, raw, cwd=workdir)
    # the raw data file is the disk itself
    assert sha256_file(os.path.join(workdir, "raw.raw")) == sha256_file(source)


def test_option_errors_are_one_line(workdir, source):
    out = os.path.join(workdir, "x.qcow2")
    for opts in ("compat=0.10,lazy_refcounts=on", "compat=0.10,refcount_bits=1",
                 "extended_l2=on,cluster_size=4k", "cluster_size=3000",
                 "cluster_size=4M", "refcount_bits=3", "compression_type=lz4",
                 "data_file_raw=on"):
        code, _, err = cli("convert", "-O", "qcow2", "-o", opts, source, out)
        one_line_error(code, err)
        assert not os.path.exists(out)
    code, _, err = cli("convert", "-c", "-O", "qcow2", "-o", "preallocation=full", source,
                       out)
    one_line_error(code, err)
    assert [n for n in os.listdir(workdir) if "tmp" in n] == []


@pytest.mark.parametrize("opts", ["", "cluster_size=512", "extended_l2=on",
                                  "refcount_bits=1", "preallocation=full",
                                  "cluster_size=2M,refcount_bits=64"])
def test_measure_agrees_with_qemu(workdir, source, opts):
    args = ["-o", opts] if opts else []
    for size in ("0", "1M", "10G", str(5 * MIB + 1536)):
        theirs = qemu_img_json("measure", "-O", "qcow2", *args, "--size", size)
        code, text, _ = cli("measure", "-O", "qcow2", *args, "--size", size,
                            "--output", "json")
        ours = json.loads(text)
        assert (ours["required"], ours["fully-allocated"]) == \
            (theirs["required"], theirs["fully-allocated"]), size
    theirs = qemu_img_json("measure", "-O", "qcow2", *args, source)
    code, text, _ = cli("measure", "-O", "qcow2", *args, source, "--output", "json")
    ours = json.loads(text)
    assert (ours["required"], ours["fully-allocated"]) == \
        (theirs["required"], theirs["fully-allocated"])
    # and what we write fits in what we measured
    out = os.path.join(workdir, "m.qcow2")
    assert cli("convert", "-O", "qcow2", *args, source, out)[0] == 0
    assert os.stat(out).st_blocks * 512 <= ours["required"] + 65536 or \
        "prealloc" in opts


def test_a_disk_size_not_a_multiple_of_512_loses_nothing_in_qemu(workdir):
    """qemu floors a qcow2's size to whole sectors, so the writer rounds up as qemu-img
    does (the padding reads as zeros) instead of storing the odd size."""
    need("qemu-img")
    src = os.path.join(workdir, "odd.raw")
    tail = os.urandom(288)
    with open(src, "wb") as f:
        f.truncate(5 << 20)
        f.seek(5 << 20)
        f.write(tail)  # 5 MiB + 288 bytes
    out = os.path.join(workdir, "odd.qcow2")
    assert cli("convert", "-O", "qcow2", src, out)[0] == 0
    info = json.loads(run("qemu-img", "info", "--output", "json", out).stdout)
    assert info["virtual-size"] == (5 << 20) + 512
    flat = os.path.join(workdir, "flat.raw")
    run("qemu-img", "convert", "-O", "raw", out, flat)
    assert open(flat, "rb").read() == bytes(5 << 20) + tail + bytes(224)
