"""Helpers for the DMG tests: fixture paths, and rewriting a DMG's property list to
make malformed images (the data fork stays, the plist and trailer are rebuilt)."""

from __future__ import annotations

import csv
import gzip
import os
import plistlib
import shutil
import struct

from conftest import FIXTURES

SOURCES = os.path.join(FIXTURES, "SOURCES.tsv")


def fixture_rows(prefix: str = "dmg/") -> list[dict]:
    with open(SOURCES) as f:
        return [r for r in csv.DictReader(f, delimiter="\t") if r["file"].startswith(prefix)]


def fixture_path(rel: str, tmpdir: str) -> str:
    """The fixture, gunzipped into ``tmpdir`` when stored gzipped."""
    path = os.path.join(FIXTURES, rel)
    if not rel.endswith(".gz"):
        return path
    out = os.path.join(tmpdir, os.path.basename(rel)[:-3])
    with gzip.open(path) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def read_dmg(path: str):
    """(bytes, koly fields dict, plist) of a DMG."""
    from diskforge.formats.dmg import udif
    data = open(path, "rb").read()
    koly = udif.UDIFResourceFile.parse(data[-512:])
    plist = plistlib.loads(data[koly.XMLOffset:koly.XMLOffset + koly.XMLLength])
    return data, koly, plist


def rewrite(path: str, out: str, mutate=None, koly_changes: dict | None = None) -> str:
    """Copy a DMG to ``out`` after ``mutate(plist)`` and koly field changes; the XML
    and trailer are rebuilt after the data fork."""
    from diskforge.formats.dmg import udif
    data, koly, plist = read_dmg(path)
    if mutate:
        mutate(plist)
    xml = plistlib.dumps(plist)
    body = data[:koly.DataForkOffset + koly.DataForkLength]
    fields = dict(koly)
    fields.pop("_io", None)
    fields.update(XMLOffset=len(body), XMLLength=len(xml))
    fields.update(koly_changes or {})
    with open(out, "wb") as f:
        f.write(body + xml + udif.UDIFResourceFile.build(fields))
    return out


def mish(plist, i: int) -> bytearray:
    return bytearray(plist["resource-fork"]["blkx"][i]["Data"])


def set_mish(plist, i: int, data: bytes) -> None:
    plist["resource-fork"]["blkx"][i]["Data"] = bytes(data)


def chunk(data: bytearray, j: int) -> list:
    return list(struct.unpack_from(">IIQQQQ", data, 204 + 40 * j))


def set_chunk(data: bytearray, j: int, values) -> None:
    struct.pack_into(">IIQQQQ", data, 204 + 40 * j, *values)
