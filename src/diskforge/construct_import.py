"""How construct, dataclasses and concurrent.futures are imported: without the
standard-library modules they never use here.

Every format declares its on-disk structures with ``construct`` (DESIGN.md), so the
first ``diskforge info`` of almost any image imports it. ``import construct`` runs its
whole package, and three of its imports cost more start-up than the rest of it
(instruction counts under callgrind, Python 3.11): ``construct.debug`` imports ``pdb``
(and with it ``cmd``, ``bdb``, ``code``, ``glob``...) and ``traceback`` for its
``Debugger`` wrapper, ``construct.core`` imports ``pickle`` for ``Pickled`` and
``hashlib`` for checksums and its code compiler, and ``construct.lib.py3compat``
imports ``platform`` to ask ``platform.system()`` once. diskforge uses none of these
through construct: together they were about 45 M of the ~390 M instructions
``diskforge info small.qcow2`` took. ``construct.debug`` also imports ``inspect``
(with ``ast``, ``dis``, ``tokenize``...) and never uses it: 35 M more of the 285 M
that was left.

So, while construct's package runs (and only then), those names are bound to
stand-ins: a stand-in is a module object that imports the real module the first time
one of its attributes is read, and forwards to it from then on (``platform``'s
stand-in answers ``system()`` itself, as ``platform.uname()`` does on POSIX: from
``os.uname()``). Construct behaves
exactly as before (its ``Debugger`` or ``Pickled`` work, just import on first use);
the stand-ins leave ``sys.modules`` as soon as construct's ``__init__`` has run, so
any other ``import pdb`` in the process gets the real module. Nothing happens when
construct was imported before diskforge, or when a module is already imported.

``dataclasses`` gets the same treatment for ``inspect``: it imports it (with ``ast``,
``dis``, ``tokenize``, ``linecache``...) only to write a signature into the docstring
of a dataclass that has none. That import was 40 M instructions of every command's
start-up (``python -c "import dataclasses"``: 112 M, 71 M with the stand-in); a
docstring-less dataclass still gets its signature, by importing inspect then, so
every dataclass of this package has a docstring (tests/test_startup.py).

``concurrent.futures`` (the compression pool of a convert, the decoding pool of a
compressed read) imports ``logging`` in its ``_base`` module, only to log a done
callback that raises: 45 M of the 48 M instructions ``import concurrent.futures``
costs, about 10 ms of such a command's start-up. Its stand-in
answers ``getLogger(name)`` with a logger that imports ``logging`` and forwards to
the real ``logging.getLogger(name)`` the first time it is used.

``install()`` (called by ``diskforge/__init__.py``) puts a finder at the front of
``sys.meta_path`` that answers only for the modules in ``DEFERRED`` (each once, when
not imported yet) and removes itself when all are done.
"""

from __future__ import annotations

import os
import sys
import types

# the modules each package imports and diskforge never reaches through it
DEFERRED = {
    "construct": ("pdb", "pickle", "hashlib", "traceback", "platform", "inspect"),
    "dataclasses": ("inspect",),
    "concurrent.futures._base": ("logging",),
}


def _system() -> str:
    """``platform.system()`` on POSIX: ``os.uname().sysname`` ('Linux', 'Darwin')."""
    return os.uname().sysname


class _Logger:
    """``logging.getLogger(name)``, fetched (and ``logging`` imported) on first use."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        import logging
        return getattr(logging.getLogger(self._name), attr)


# what a stand-in answers without importing its module
ANSWERS = {"platform": {"system": _system}, "logging": {"getLogger": _Logger}}


class _StandIn(types.ModuleType):
    """A module that imports its real self when an attribute is first read."""

    def __init__(self, name: str):
        import threading  # only once construct is being imported
        super().__init__(name)
        self.__dict__["_lock"] = threading.Lock()
        self.__dict__["_real"] = None
        self.__dict__.update(ANSWERS.get(name, {}))

    def __getattr__(self, attr: str):
        # only called for what the stand-in does not hold itself
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)  # a probe of module metadata is no use
        real = self.__dict__["_real"]
        if real is None:
            with self.__dict__["_lock"]:
                real = self.__dict__["_real"]
                if real is None:
                    import importlib
                    if sys.modules.get(self.__name__) is self:
                        del sys.modules[self.__name__]
                    real = importlib.import_module(self.__name__)
                    self.__dict__["_real"] = real
        return getattr(real, attr)


class _Loader:
    """The package's own loader, with the stand-ins in place while its module runs."""

    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.real
        if module.__spec__ is not None:
            module.__spec__.loader = self.real
        placed = []
        for name in DEFERRED[module.__name__]:
            if name == "platform" and not hasattr(os, "uname"):
                continue  # Windows: the real platform.system() is not os.uname's
            if name not in sys.modules:
                sys.modules[name] = stand_in = _StandIn(name)
                placed.append((name, stand_in))
        try:
            self.real.exec_module(module)
        finally:
            for name, stand_in in placed:
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]


class _Finder:
    """Answers only for the packages in DEFERRED, once each."""

    pending = set(DEFERRED)

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name not in cls.pending:
            return None
        cls.pending.discard(name)
        if not cls.pending:
            try:
                sys.meta_path.remove(cls)
            except ValueError:
                pass
        for finder in sys.meta_path:
            if finder is cls:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Defer the unused imports of the modules in DEFERRED, unless already imported."""
    _Finder.pending = {name for name in DEFERRED if name not in sys.modules}
    if _Finder.pending and _Finder not in sys.meta_path:
        sys.meta_path.insert(0, _Finder)
