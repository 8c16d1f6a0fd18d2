"""Exports: one command makes a disk that a cloud or hypervisor imports on the first
try, and a checker says why a given file would be refused.

One module per target holds its rules (format, size rounding, limits, names,
metadata) with the vendor pages it follows in its docstring: ``azure``, ``gcp``,
``aws``, ``ova``, ``hyperv``, ``proxmox``, ``libvirt``. Adding a target is adding a
module with ``NAME``, ``SUMMARY``, ``export`` and ``check`` (``base.py``) and its name
to ``TARGETS``. Shared pieces: ``base`` (options, rounding, writing a disk through the
registry), ``tarfmt`` (ustar and oldgnu sparse headers), ``pgzip`` (gzip on every
core), ``ovf`` (the OVF 1.0 envelope), ``ova_package`` (manifest and tar),
``domain_xml`` (libvirt's domain), ``vmdk_peek`` (a VMDK's createType for the
checkers).

The package is callable: ``diskforge.export`` is this package (``import diskforge``
stays light: its ``__getattr__`` imports it on first use), so
``diskforge.export(src, target, out, **opts)`` runs :func:`export` and
``diskforge.export.check(target, path)`` runs :func:`check`.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

TARGETS = ("azure", "gcp", "aws", "ova", "hyperv", "proxmox", "libvirt")


def target(name: str) -> types.ModuleType:
    """The module of the target called ``name``."""
    from ..errors import UsageError
    key = name.strip().lower()
    if key not in TARGETS:
        raise UsageError(f"unknown export target '{name}' (targets: {', '.join(TARGETS)})")
    return importlib.import_module(f"{__name__}.{key}")


def export(source: str | os.PathLike, target_name: str, out: str | os.PathLike, *,
           source_fmt: str | None = None, progress=None, policy=None,
           **opts) -> list[str]:
    """Write what ``target_name`` imports from the image ``source`` at ``out``; the
    paths written (a disk, and for some targets a descriptor beside it). ``opts``:
    ``cpus``, ``memory`` (MiB), ``name``, ``firmware`` (bios/efi), ``manifest``
    (sha1/sha256/none), ``package`` (aws: vmdk/ova)."""
    from ..atomic import refuse_overwrite
    from ..registry import open_image
    from .base import ExportOptions
    mod = target(target_name)
    options = ExportOptions.from_mapping(opts)
    out = os.fspath(out)
    with open_image(source, source_fmt, policy=policy) as src:
        refuse_overwrite(out, src.files())
        return mod.export(src, out, options, progress)


def check(target_name: str, path: str | os.PathLike, *, policy=None) -> list[str]:
    """Every rule of ``target_name`` that the file at ``path`` breaks (empty: none);
    images are opened under ``policy`` (default: from the environment). ``path`` may
    be a URL (http(s)://, s3://): the rules read the file in place, with range
    requests (``checkfile.py``)."""
    from .checkfile import open_check_file
    mod = target(target_name)
    with open_check_file(path) as f:
        return mod.check(f, policy)


class _CallableModule(types.ModuleType):
    """``diskforge.export(...)`` calls :func:`export` (see the module docstring)."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
