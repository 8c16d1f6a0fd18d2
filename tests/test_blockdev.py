"""The core helpers every format and operation relies on."""

import random

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
