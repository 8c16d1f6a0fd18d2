"""Property tests: random sparse contents survive raw → qcow2 (random options) → raw
bit for bit, and random write sequences through the writable device end up exactly as
the same writes applied to a raw file. ``qemu-img check`` and ``compare`` judge each
example, not only our own reader."""

import os
import subprocess
import tempfile

from conftest import need
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diskforge

SECTOR = 512


@st.composite
def qcow2_options(draw, *, for_writes: bool = False):
    compat = draw(st.sampled_from(["1.1", "0.10"]))
    cs = draw(st.sampled_from([512, 4096, 16384, 65536, 2 << 20]))
    opts = {"compat": compat, "cluster_size": cs}
    if compat == "1.1":
        opts["refcount_bits"] = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
        if cs >= 16384 and draw(st.booleans()):
            opts["extended_l2"] = "on"
        if draw(st.booleans()):
            opts["lazy_refcounts"] = "on"
    compress = not for_writes and draw(st.booleans())
    if compress and compat == "1.1":
        opts["compression_type"] = draw(st.sampled_from(["zlib", "zstd"]))
    if not compress:
        opts["preallocation"] = draw(st.sampled_from(["off", "off", "metadata", "falloc"]))
    return ",".join(f"{k}={v}" for k, v in opts.items()), compress


@st.composite
def sparse_disk(draw):
    size = draw(st.integers(1, 6 * 1024)) * SECTOR
    data = bytearray(size)
    for _ in range(draw(st.integers(0, 6))):
        off = draw(st.integers(0, size - 1))
        n = draw(st.integers(1, min(size - off, 400 * 1024)))
        kind = draw(st.sampled_from(["random", "pattern", "zero"]))
        if kind == "random":
            data[off:off + n] = draw(st.randoms()).randbytes(n)
        elif kind == "pattern":
            data[off:off + n] = bytes([draw(st.integers(1, 255))]) * n
        else:
            data[off:off + n] = bytes(n)
    return bytes(data)


def qemu_ok(path: str, raw: str) -> None:
    check = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", raw, path], capture_output=True,
                         text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=sparse_disk(), options=qcow2_options())
def test_raw_qcow2_raw_round_trip(data, options):
    need("qemu-img")
    opts, compress = options
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "src.raw")
        with open(src, "wb") as f:
            f.write(data)
        out = os.path.join(d, "out.qcow2")
        diskforge.convert(src, out, options=opts, compress=compress)
        back = os.path.join(d, "back.raw")
        diskforge.convert(out, back)
        with open(back, "rb") as f:
            assert f.read() == data
        qemu_ok(out, src)


@st.composite
def write_sequence(draw, size: int):
    ops = []
    for _ in range(draw(st.integers(1, 25))):
        off = draw(st.integers(0, size - 1))
        n = draw(st.integers(1, min(size - off, 300 * 1024)))
        kind = draw(st.sampled_from(["random", "pattern", "zeroes", "zeroes", "flush",
                                     "snapshot"]))
        ops.append((kind, off, n, draw(st.integers(0, 2 ** 32))))
    return ops


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=qcow2_options(for_writes=True), size_sectors=st.integers(1, 6 * 1024),
       backing=st.booleans(), compressed_start=st.booleans(), data=st.data())
def test_random_writes_match_a_raw_file(options, size_sectors, backing, compressed_start,
                                        data):
    need("qemu-img")
    import random
    opts, _ = options
    if backing:
        opts = opts.replace("preallocation=metadata", "preallocation=off") \
            .replace("preallocation=falloc", "preallocation=off")
    size = size_sectors * SECTOR
    ops = data.draw(write_sequence(size))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "w.qcow2")
        ref = bytearray(size)
        if backing:
            base = os.path.join(d, "base.raw")
            ref = bytearray(random.Random(size).randbytes(size))
            with open(base, "wb") as f:
                f.write(ref)
            diskforge.create(path, size, "qcow2", opts, backing="base.raw",
                             backing_fmt="raw")
        elif compressed_start and "preallocation=off" in opts:
            src = os.path.join(d, "start.raw")
            ref = bytearray(random.Random(size).randbytes(size // 2) + bytes(size - size // 2))
            with open(src, "wb") as f:
                f.write(ref)
            diskforge.convert(src, path, options=opts.replace(",preallocation=off", ""),
                              compress=True)
        else:
            diskforge.create(path, size, "qcow2", opts)
        with diskforge.open(path, writable=True) as dev:
            for i, (kind, off, n, seed) in enumerate(ops):
                if kind == "flush":
                    dev.flush()
                elif kind == "snapshot":
                    try:
                        # named by position: hypothesis often draws equal seeds, and a
                        # second "s0" was refused as a duplicate, failing the test by chance
                        dev.create_snapshot(f"s{i}")
                    except diskforge.DiskforgeError as e:  # 1-bit refcounts cannot share
                        assert "refcount" in str(e)
                elif kind == "zeroes":
                    dev.write_zeroes(off, n)
                    ref[off:off + n] = bytes(n)
                else:
                    chunk = random.Random(seed).randbytes(n) if kind == "random" \
                        else bytes([seed % 255 + 1]) * n
                    dev.write(off, chunk)
                    ref[off:off + n] = chunk
            assert dev.read(0, size) == ref
        raw = os.path.join(d, "ref.raw")
        with open(raw, "wb") as f:
            f.write(ref)
        qemu_ok(path, raw)
