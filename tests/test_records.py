"""records.Record: the written-out value classes behave as the dataclasses they
replaced (equality, hashing of frozen ones, repr, replace, extra attributes only
where a plain dataclass allowed them)."""

import pytest

from diskforge.blockdev import Extent, ExtentKind, ImageInfo
from diskforge.registry import Measurement


def test_equality_hash_and_repr_go_by_fields():
    a = Extent(0, 4096, ExtentKind.DATA, host_offset=512)
    b = Extent(0, 4096, ExtentKind.DATA, True, 512, None)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Extent(0, 4096, ExtentKind.ZERO, host_offset=512)
    assert a != (0, 4096, ExtentKind.DATA, True, 512, None)
    assert repr(a) == ("Extent(offset=0, length=4096, kind=<ExtentKind.DATA: 'data'>,"
                       " allocated=True, host_offset=512, host_file=None)")
    assert a.end == 4096


def test_replace_makes_a_changed_copy():
    m = Measurement(10, 20)
    n = m.replace(bitmaps=3)
    assert (m.bitmaps, n.bitmaps, n.required, n.fully_allocated) == (None, 3, 10, 20)


def test_mutable_records_are_unhashable_and_take_extra_attributes():
    info = ImageInfo("f", "raw", 1)
    with pytest.raises(TypeError):
        hash(info)
    info._table = "kept"   # as on a dataclass instance
    assert info._table == "kept"
    assert info == ImageInfo("f", "raw", 1)  # extra attributes are not fields
    assert info.details == {} and info.details is not ImageInfo("f", "raw", 1).details
    with pytest.raises(AttributeError):
        Extent(0, 1, ExtentKind.DATA).note = "x"  # slots only, as before
