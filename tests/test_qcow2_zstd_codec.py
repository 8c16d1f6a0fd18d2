"""qcow2 zstd clusters: the one-call path for qemu's frames (one frame declaring the
whole cluster) gives what the checked loop gives, and everything else still goes
through the loop's checks."""

from __future__ import annotations

import random

import pytest

from diskforge.errors import FormatError
from diskforge.formats.qcow2 import codec
from diskforge.formats.qcow2.structs import COMPRESSION_ZSTD

zstandard = pytest.importorskip("zstandard")
CS = 65536


@pytest.fixture(scope="module")
def cluster() -> bytes:
    rnd = random.Random(5)
    return bytes(rnd.randrange(4) for _ in range(CS))


def _dec(data: bytes) -> bytes:
    return codec.decompress(COMPRESSION_ZSTD, data, CS, "for guest offset 0x10000 at"
                            " host 0x50000", "img.qcow2")


def test_qemus_frame_with_the_next_clusters_bytes_after_it(cluster):
    frame = zstandard.ZstdCompressor(level=3).compress(cluster)
    assert zstandard.get_frame_parameters(frame).content_size == CS
    # the rest of the last sector may hold the start of the next compressed cluster
    assert _dec(frame + b"\xff" * 400) == cluster
    assert _dec(frame + zstandard.ZstdCompressor().compress(b"y" * 100)) == cluster


def test_several_frames_still_make_one_cluster(cluster):
    c = zstandard.ZstdCompressor(level=3)
    assert _dec(c.compress(cluster[:30000]) + c.compress(cluster[30000:])) == cluster


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_truncated_frame_that_declares_the_cluster_is_refused(cluster, cut):
    frame = zstandard.ZstdCompressor(level=3).compress(cluster)
    with pytest.raises(FormatError) as e:
        _dec(frame[:int(len(frame) * cut)])
    msg = str(e.value)
    assert "L2 entry" in msg and "img.qcow2" in msg and "guest offset 0x10000" in msg
    assert "not 65536 (corrupt or truncated)" in msg or "is corrupt" in msg


def test_a_frame_declaring_more_than_the_cluster_is_refused(cluster):
    frame = zstandard.ZstdCompressor(level=3).compress(cluster + cluster)
    with pytest.raises(FormatError, match="declares 131072 bytes"):
        _dec(frame)
