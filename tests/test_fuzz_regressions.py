"""Inputs the fuzzers found (tests/fuzz_formats.py, tests/fuzz_cli.py), each rebuilt
here from a committed fixture by the change that broke it, and held to the contract
for bad input: one line naming the file, a non-zero exit, no internal error, within a
memory cap and a time limit."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

from conftest import FIXTURES, one_line_error


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def _diskforge(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diskforge", *argv], capture_output=True,
                          text=True, timeout=60, preexec_fn=_cap)


def test_a_corrupt_lzfse_chunk_is_one_clean_error(tmp_path):
    """fuzz_formats.py, dmg: one byte changed in the payload of the first LZFSE block
    (a bvx2 block that still declares the chunk's size) made ``lzfse.decompress`` raise
    MemoryError at once (no large allocation is made), shown as "internal error:
    MemoryError"; the bounded decoder (formats/dmg/codecs.py) reports a corrupt chunk."""
    data = bytearray(open(os.path.join(FIXTURES, "dmg", "node-udif_compression-lzfse.dmg"),
                          "rb").read())
    assert data[417] == 0x38
    data[417] = 0x37
    path = tmp_path / "lzfse.dmg"
    path.write_bytes(data)
    proc = _diskforge("convert", "-O", "raw", str(path), str(tmp_path / "out.raw"))
    one_line_error(proc.returncode, proc.stderr)
    assert "internal error" not in proc.stderr and str(path) in proc.stderr
