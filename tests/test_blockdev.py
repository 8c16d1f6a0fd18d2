"""The core helpers every format and operation relies on."""

import random

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from diskforge.blockdev import (ZEROES, Extent, ExtentKind, aligned_buffer, coalesce, is_zero,
                                zero_runs)


def reference_runs(buf, base, gran, n):
    out = []
    pos = 0
    while pos < n:
        end = min((base + pos) // gran * gran + gran - base, n)
        z = not any(buf[pos:end])
        if out and out[-1][2] == z:
            out[-1][1] += end - pos
        else:
            out.append([base + pos, end - pos, z])
        pos = end
    return [tuple(r) for r in out]


@st.composite
def sparse_buffers(draw):
    gran = draw(st.sampled_from([512, 1024, 4096, 65536]))
    n = draw(st.integers(1, 5 * gran + 17))
    base = draw(st.integers(0, 3 * gran))
    buf = bytearray(n)
    for _ in range(draw(st.integers(0, 6))):
        pos = draw(st.integers(0, n - 1))
        buf[pos] = draw(st.integers(1, 255))
    return buf, base, gran, n


@given(sparse_buffers(), st.integers(0, 64))
@settings(max_examples=400, deadline=None)
def test_zero_runs_matches_granule_by_granule_reference(case, lead):
    buf, base, gran, n = case
    padded = bytearray(lead) + buf + b"\x01" * 7  # data window inside a larger buffer
    assert list(zero_runs(padded, base, gran, n, lead)) == reference_runs(buf, base, gran, n)


def test_zero_runs_long_random_mix():
    rng = random.Random(7)
    for _ in range(200):
        gran = rng.choice([512, 4096, 65536])
        n = rng.randint(1, 600_000)
        buf = bytearray(n)
        pos = 0
        while pos < n:
            length = rng.randint(1, gran * rng.choice([1, 3, 90]))
            if rng.random() < 0.5:
                buf[pos:pos + length] = rng.randbytes(min(length, n - pos))
            pos += length
        base = rng.randint(0, 4) * rng.choice([1, 512, 4096])
        assert list(zero_runs(buf, base, gran, n)) == reference_runs(buf, base, gran, n)


def test_is_zero_and_shared_zero_view_is_read_only():
    assert is_zero(bytes(10_000_000))
    b = bytearray(10_000_000)
    b[-1] = 1
    assert not is_zero(b)
    assert is_zero(b, 0, len(b) - 1)
    assert is_zero(memoryview(bytes(100)))
    assert ZEROES.readonly and not any(ZEROES[:4096])


def test_aligned_buffer_is_page_aligned():
    import ctypes
    buf, start = aligned_buffer(1 << 20)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf)) + start
    assert addr % 4096 == 0 and len(buf) - start >= 1 << 20


def test_coalesce_joins_only_continuing_extents():
    D, Z = ExtentKind.DATA, ExtentKind.ZERO
    got = list(coalesce([Extent(0, 10, D, True, 100), Extent(10, 5, D, True, 110),
                         Extent(15, 5, D, True, 500), Extent(20, 4, Z, False),
                         Extent(24, 4, Z, False), Extent(28, 0, Z)]))
    assert got == [Extent(0, 15, D, True, 100), Extent(15, 5, D, True, 500),
                   Extent(20, 8, Z, False)]


# -- WindowBackend: part of a file read as a file (a disk inside an OVA) -----------------

def _windowed(tmp_path):
    from diskforge.blockdev import FileBackend, WindowBackend
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(b"A" * 1000)
        f.truncate(3 << 20)          # a hole from 1000 to 3 MiB...
        f.seek(2 << 20)
        f.write(b"B" * 4096)         # ...with data at 2 MiB
    inner = FileBackend(str(path))
    return inner, WindowBackend(inner, 500, (2 << 20) + 100 - 500, "f:member")


def test_window_reads_are_shifted_and_clipped(tmp_path):
    inner, w = _windowed(tmp_path)
    with inner:
        assert (w.size, w.path, w.writable, w.is_block_device) == \
            ((2 << 20) - 400, "f:member", False, False)
        assert w.pread(0, 600) == b"A" * 500 + bytes(100)
        end = w.pread(w.size - 200, 1000)        # clipped at the window's end
        assert end == bytes(100) + b"B" * 100
        assert w.pread(w.size, 10) == b"" and w.pread(w.size + 5, 10) == b""
        buf = bytearray(300)
        assert w.readinto(w.size - 100, buf) == 100
        assert w.read_exact(0, 10) == b"A" * 10
        from diskforge.errors import FormatError
        with pytest.raises(FormatError, match="f:member: .*truncated"):
            w.read_exact(w.size - 5, 10, "grain")


def test_window_holes_and_allocation(tmp_path):
    inner, w = _windowed(tmp_path)
    with inner:
        runs = list(w.data_ranges(0, w.size + 12345))
        assert runs[0][0] == 0 and runs[-1][0] + runs[-1][1] == w.size
        assert sum(n for _, n, _ in runs) == w.size
        data = [(o, n) for o, n, d in runs if d]
        # the first block holds the A's; the B's at 2 MiB are 1524+ bytes inside
        assert data[0][0] == 0 and any(o <= (2 << 20) - 500 < o + n for o, n in data)
        assert 0 < w.allocated_bytes() < w.size
        assert list(w.data_ranges(w.size, w.size + 10)) == []


def test_window_refuses_writes_and_leaves_the_file_open(tmp_path):
    from diskforge.errors import UnsupportedError
    inner, w = _windowed(tmp_path)
    with inner:
        for call in (lambda: w.pwrite(0, b"x"), lambda: w.write_zeroes(0, 1),
                     lambda: w.truncate(0), lambda: w.punch_hole(0, 1)):
            with pytest.raises(UnsupportedError, match="f:member: is read-only"):
                call()
        w.flush()
        w.close()
        assert inner.pread(0, 1) == b"A"      # the inner file is its opener's
    with pytest.raises(Exception):
        w.pread(0, 1)


def test_a_format_reads_through_a_window(tmp_path):
    """Format.open(name, backend=window): a raw disk that is bytes 500.. of a file."""
    from diskforge import registry
    inner, w = _windowed(tmp_path)
    with inner:
        plugin = registry.probe_backend(w, w.path)
        assert plugin.name == "raw"
        with plugin.open(w.path, backend=w) as dev:
            assert dev.size == w.size
            assert dev.read(490, 20) == b"A" * 10 + bytes(10)


def test_zero_runs_screen_edges():
    """The screen decides a granule from its first 8-byte word: granules whose head is
    zero but whose body is not, zero words that straddle two granules' heads, a
    granularity that is not a multiple of 8, memoryview input (read in place) and a
    base that is not granule-aligned all give the granule-by-granule answer."""
    rng = random.Random(11)
    for gran in (512, 4096, 1000, 65536):
        for _ in range(30):
            count = rng.randint(1, 40)
            buf = bytearray()
            for _ in range(count):
                kind = rng.choice(["zero", "data", "zero-head", "zero-tail", "one-byte"])
                g = bytearray(gran)
                if kind == "data":
                    g[:] = rng.randbytes(gran)
                elif kind == "zero-head":     # first word zero, data later
                    g[rng.randint(8, gran - 1)] = rng.randint(1, 255)
                elif kind == "zero-tail":
                    g[:8] = rng.randbytes(8)
                elif kind == "one-byte":
                    g[gran - 1] = 1
                buf += g
            base = rng.choice([0, 8, 512, gran // 2, 3 * gran])
            lead = rng.randint(0, 9)
            padded = bytearray(rng.randbytes(lead)) + buf + b"\x01"
            n = len(buf) - rng.randint(0, gran // 2)
            want = reference_runs(buf, base, gran, n)
            assert list(zero_runs(padded, base, gran, n, lead)) == want
            view = memoryview(padded)[lead:lead + n]
            assert list(zero_runs(view, base, gran)) == want
            assert is_zero(view) == (want == [(base, n, True)])
