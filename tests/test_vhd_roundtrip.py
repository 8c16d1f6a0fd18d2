"""vpc round trips, property-tested: random sparse contents survive raw → vpc → raw bit
for bit for every subformat and option, qemu-img agreeing; and a differencing disk
made against a random base composes back to the random new contents."""

import os
import shutil
import subprocess

from conftest import make_sparse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diskforge
from diskforge.blockdev import Backing
from diskforge.ops.convert import convert
from diskforge.registry import get

QEMU = shutil.which("qemu-img")

extents = st.lists(
    st.tuples(st.integers(0, (6 << 20) - 1),
              st.one_of(st.binary(min_size=1, max_size=5000),
                        st.builds(lambda n, b: bytes([b]) * n, st.integers(1, 300_000),
                                  st.integers(0, 255)))),
    max_size=8)
options = st.fixed_dictionaries({
    "subformat": st.sampled_from(["dynamic", "fixed"]),
    "force_size": st.sampled_from(["auto", "on", "off"]),
    "block_size": st.sampled_from([4096, 65536, 2 << 20]),
})


def expected(size, exts) -> bytearray:
    out = bytearray(size)
    for off, data in exts:
        data = data[:size - off]
        out[off:off + len(data)] = data
    return out


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 6 << 20), exts=extents, opts=options)
def test_raw_vpc_raw(workdir, size, exts, opts):
    exts = [(o, d) for o, d in exts if o < size]
    src = make_sparse(os.path.join(workdir, "s.raw"), size,
                      [(o, d[:size - o]) for o, d in exts])
    want = expected(size, exts)
    if opts["subformat"] == "fixed":
        opts = dict(opts, block_size=2 << 20)
    vhd = os.path.join(workdir, "o.vhd")
    diskforge.convert(src, vhd, target_fmt="vpc", options=opts)
    with diskforge.open(vhd) as dev:
        assert dev.size >= size
        got = dev.read(0, dev.size)
    assert got[:size] == want and not any(got[size:])
    if QEMU:
        assert subprocess.run([QEMU, "compare", "-q", "-f", "raw", "-F", "vpc", src, vhd]
                              ).returncode == 0


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base_exts=extents, new_exts=extents, block_size=st.sampled_from([4096, 2 << 20]))
def test_differencing_round_trip(workdir, base_exts, new_exts, block_size):
    size = 6 << 20
    base = make_sparse(os.path.join(workdir, "base.raw"), size, base_exts)
    new_content = expected(size, base_exts + new_exts)
    new = os.path.join(workdir, "new.raw")
    with open(new, "wb") as f:
        f.write(new_content)
    fmt = get("vpc")
    parent = os.path.join(workdir, "parent.vhd")
    diskforge.convert(base, parent, target_fmt="vpc", options="force_size=on")
    child = os.path.join(workdir, "child.vhd")
    with diskforge.open(parent) as pdev, diskforge.open(new) as src:
        writer = fmt.writer(child, size, fmt.options.parse(f"block_size={block_size}"),
                            backing=Backing("parent.vhd", "vpc", pdev))
        convert(src, writer, base=pdev)
    with diskforge.open(child) as dev:
        assert dev.read(0, dev.size) == new_content


@given(bitmap=st.binary(min_size=1, max_size=64), data=st.data())
def test_bitmap_runs_and_set_bits(bitmap, data):
    """Sector bitmaps: bit n is the (n % 8)-th most significant bit of byte n // 8."""
    from diskforge.formats.vhd.structs import bitmap_runs, set_bits
    nbits = len(bitmap) * 8
    first = data.draw(st.integers(0, nbits - 1))
    count = data.draw(st.integers(1, nbits - first))
    bit = [bool(bitmap[i >> 3] & (0x80 >> (i & 7))) for i in range(nbits)]
    runs = list(bitmap_runs(bitmap, first, count))
    assert [b for s, n, b in runs for _ in range(n)] == bit[first:first + count]
    assert all(a[2] != b[2] for a, b in zip(runs, runs[1:]))  # coalesced
    bm = bytearray(bitmap)
    set_bits(bm, first, first + count)
    assert [bool(bm[i >> 3] & (0x80 >> (i & 7))) for i in range(nbits)] == \
        [bit[i] or first <= i < first + count for i in range(nbits)]
