"""Small value classes without ``dataclasses``' start-up cost.

Why: ``@dataclass`` writes each class's methods as source text and compiles it when
the module is imported: about 2 M instructions per class, 4 M when frozen with
slots (callgrind, Python 3.11), against 0.07 M for a class written out. The records
every command creates on its way to the first byte (extents, the image info, a qcow2
header, lock modes...) were 14 dataclasses and about a fifth of ``diskforge info``'s
start-up. They are written out instead, on this base: each class lists its fields in
``__slots__`` and writes its own ``__init__`` (the fast path when millions of extents
are made); comparison, ``repr`` and ``replace`` come from here, field by field, as a
dataclass's would. Classes that parse options (``options.Options``) stay dataclasses:
they need ``dataclasses.fields``.
"""

from __future__ import annotations


class Record:
    """Equality, ``repr`` and ``replace`` over the fields named in ``__slots__``
    (of this class and its bases, in order). Mutable and unhashable, as a plain
    ``@dataclass``; a class whose instances also take other attributes, as a
    dataclass's do, lists ``"__dict__"`` among its slots."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def _fields(cls) -> tuple[str, ...]:
        names = cls.__dict__.get("_field_names")
        if names is None:
            names = tuple(n for k in reversed(cls.__mro__)
                          for n in k.__dict__.get("__slots__", ()) if n != "__dict__")
            type.__setattr__(cls, "_field_names", names)
        return names

    def _values(self) -> tuple:
        return tuple(getattr(self, n) for n in self._fields())

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields())
        return f"{type(self).__qualname__}({inner})"

    def replace(self, **changes):
        """A copy with ``changes`` (``dataclasses.replace``)."""
        values = {n: getattr(self, n) for n in self._fields()}
        values.update(changes)
        return type(self)(**values)


class FrozenRecord(Record):
    """A record treated as a value: hashable by its fields. Nothing assigns to one
    after ``__init__`` (not enforced: enforcing would slow every ``__init__``)."""

    __slots__ = ()

    def __hash__(self) -> int:
        return hash(self._values())
