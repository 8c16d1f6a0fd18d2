"""vdi round trips, property-tested: random sparse contents survive raw → vdi → raw bit
for bit for every option, dissect.hypervisor agreeing at every block size and qemu-img
where it reads the file (1 MiB blocks); a differencing image made against a random base
composes back to the new contents; and random writes in place read back (dissect
agreeing in both)."""

import os
import random
import shutil
import subprocess

from conftest import make_sparse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diskforge
import dissect_oracle
from diskforge.blockdev import Backing
from diskforge.ops.convert import convert
from diskforge.registry import get

QEMU = shutil.which("qemu-img")

extents = st.lists(
    st.tuples(st.integers(0, (5 << 20) - 1),
              st.one_of(st.binary(min_size=1, max_size=5000),
                        st.builds(lambda n, b: bytes([b]) * n, st.integers(1, 300_000),
                                  st.integers(0, 255)))),
    max_size=8)
options = st.fixed_dictionaries({
    "static": st.booleans(),
    "block_size": st.sampled_from([4096, 65536, 1 << 20, 2 << 20]),
})


def expected(size, exts) -> bytearray:
    out = bytearray(size)
    for off, data in exts:
        data = data[:size - off]
        out[off:off + len(data)] = data
    return out


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 5 << 20), exts=extents, opts=options)
def test_raw_vdi_raw(workdir, size, exts, opts):
    exts = [(o, d) for o, d in exts if o < size]
    src = make_sparse(os.path.join(workdir, "s.raw"), size,
                      [(o, d[:size - o]) for o, d in exts])
    want = expected(size, exts)
    vdi = os.path.join(workdir, "o.vdi")
    diskforge.convert(src, vdi, target_fmt="vdi", options=opts)
    with diskforge.open(vdi) as dev:
        assert dev.size == -(-size // 512) * 512
        got = dev.read(0, dev.size)
    assert got[:size] == want and not any(got[size:])
    assert dissect_oracle.vdi_read(vdi) == got       # any block size: the second reader
    if QEMU and opts["block_size"] == 1 << 20:
        with open(src, "r+b") as f:
            f.truncate(-(-size // 512) * 512)
        assert subprocess.run([QEMU, "compare", "-q", "-f", "raw", "-F", "vdi", src, vdi]
                              ).returncode == 0


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base_exts=extents, new_exts=extents, zeroed=st.lists(st.integers(0, 4), max_size=2),
       block_size=st.sampled_from([4096, 1 << 20]))
def test_differencing_round_trip(workdir, base_exts, new_exts, zeroed, block_size):
    size = 5 << 20
    base = make_sparse(os.path.join(workdir, "base.raw"), size, base_exts)
    new_content = expected(size, base_exts + new_exts)
    for z in zeroed:
        new_content[z << 20:(z + 1) << 20] = bytes(1 << 20)
    new = os.path.join(workdir, "new.raw")
    with open(new, "wb") as f:
        f.write(new_content)
    fmt = get("vdi")
    parent = os.path.join(workdir, "parent.vdi")
    diskforge.convert(base, parent, target_fmt="vdi")
    child = os.path.join(workdir, "child.vdi")
    with diskforge.open(parent) as pdev, diskforge.open(new) as src:
        writer = fmt.writer(child, size, fmt.options.parse(f"block_size={block_size}"),
                            backing=Backing("parent.vdi", "vdi", pdev))
        convert(src, writer, base=pdev)
    with diskforge.open(child) as dev:
        assert dev.read(0, dev.size) == new_content
    assert dissect_oracle.vdi_read(child, [parent]) == new_content


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1 << 30), static=st.booleans(), diff=st.booleans())
def test_random_writes_in_place(workdir, seed, static, diff):
    """Writes and zeroings at random offsets into a dynamic, static or differencing
    image, reopened and read back against a bytearray model."""
    rng = random.Random(seed)
    size = 3 << 20
    model = bytearray(rng.randbytes(size // 3)) + bytes(size - size // 3)
    base = make_sparse(os.path.join(workdir, "b.raw"), size, [(0, bytes(model))])
    img = os.path.join(workdir, "w.vdi")
    if diff:
        diskforge.convert(base, os.path.join(workdir, "p.vdi"), target_fmt="vdi")
        fmt = get("vdi")
        with diskforge.open(os.path.join(workdir, "p.vdi")) as pdev:
            w = fmt.writer(img, size, fmt.options.parse("block_size=64k"),
                           backing=Backing("p.vdi", "vdi", pdev))
            w.finish()
    else:
        diskforge.convert(base, img, target_fmt="vdi",
                          options={"static": static, "block_size": 65536})
    with diskforge.open(img, writable=True) as dev:
        for _ in range(12):
            off = rng.randrange(size)
            n = rng.randrange(1, min(200_000, size - off) + 1)
            if rng.random() < 0.3:
                dev.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
            else:
                data = rng.randbytes(n)
                dev.write(off, data)
                model[off:off + n] = data
    with diskforge.open(img) as dev:
        assert dev.read(0, size) == model
        assert dev.check().exit_status == 0
    parents = [os.path.join(workdir, "p.vdi")] if diff else []
    assert dissect_oracle.vdi_read(img, parents) == model
