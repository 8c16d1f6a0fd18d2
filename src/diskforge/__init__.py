"""diskforge: inspect, create, convert, image, restore and boot disk images.

The Python API is small and stable::

    import diskforge
    with diskforge.open("disk.qcow2") as dev:        # any format, probed
        head = dev.read(0, 512)
    diskforge.convert("disk.vmdk", "disk.qcow2")      # format from the extension
    diskforge.create("new.qcow2", 10 << 30)
    print(diskforge.info("disk.qcow2").virtual_size)
    diskforge.export("disk.qcow2", "azure", "disk.vhd")    # a cloud's import rules
    diskforge.import_ova("vm.ova", "vms/")             # disks + libvirt domain XML

For images uploaded by others, pass ``policy=diskforge.OpenPolicy.untrusted()`` (or set
``DISKFORGE_UNTRUSTED=1``): confinement and backing-format rules in this process; run
the work through ``diskforge.untrusted.run([...])`` to add the CPU and memory limits
(see ``untrusted.py`` for what each mode enforces).

Everything else lives in ``diskforge.ops`` (operations over BlockDevice),
``diskforge.registry`` (formats) and ``diskforge.blockdev`` (the abstraction).
Imports are lazy so that ``import diskforge`` stays cheap.
"""

from __future__ import annotations

import os

from . import construct_import
from .errors import DiskforgeError

construct_import.install()  # before any format's structures import construct

TYPE_CHECKING = False  # importing typing would cost start-up time
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

    from .blockdev import BlockDevice, ImageInfo
    from .ops.convert import ConvertStats
    from .policy import OpenPolicy

__all__ = ["open", "create", "convert", "info", "export", "import_ova", "DiskforgeError",
           "OpenPolicy"]


def __getattr__(name: str):
    """``diskforge.OpenPolicy`` and ``diskforge.export`` without importing them at
    ``import diskforge``. ``export`` is the callable package ``diskforge/export/``:
    ``diskforge.export(src, target, out, **opts)`` writes what a cloud or hypervisor
    imports (returns the paths written) and ``diskforge.export.check(target, path)``
    lists the rules a file breaks; a function of that name here would be replaced by
    the package as soon as any of its modules is imported."""
    if name == "OpenPolicy":
        from .policy import OpenPolicy
        return OpenPolicy
    if name == "export":
        import importlib
        return importlib.import_module(".export", __name__)
    raise AttributeError(f"module 'diskforge' has no attribute '{name}'")


def open(path: str | os.PathLike, fmt: str | None = None, *, writable: bool = False,
         policy: "OpenPolicy | None" = None, snapshot: str | None = None,
         disk: "str | int | None" = None, key: bytes | str | None = None
         ) -> "BlockDevice":
    """Open an image as a BlockDevice (format probed unless given); ``snapshot`` (ID or
    name) opens an internal snapshot as a read-only view; ``disk`` picks one disk of an
    OVA or OVF (its file name, disk id or 1-based number; ``"vm.ova:NAME"`` too);
    ``key`` is the passphrase of an encrypted image (raw LUKS, qcow2 with
    ``encrypt.format=luks``; a str is taken as UTF-8, as qemu's ``secret`` object takes
    its data). ``path`` may be a URL (``https://``, ``s3://``, ``nbd://``, ``nbds://``;
    see ``diskforge.remote``); of those only an NBD export opens ``writable``, as raw,
    in place."""
    from .registry import open_image
    if isinstance(key, str):
        key = key.encode("utf-8")
    return open_image(path, fmt, writable=writable, policy=policy, snapshot=snapshot,
                      member=disk, key=key)


def create(path: str | os.PathLike, size: int, fmt: str | None = None,
           options: "str | Mapping[str, Any] | None" = None, *,
           backing: str | None = None, backing_fmt: str | None = None) -> None:
    """Create an empty image (or an overlay of ``backing``, named relative to ``path``)."""
    from .blockdev import Backing
    from .policy import beside
    from .registry import open_image, target_format
    path = os.fspath(path)
    plugin = target_format(path, fmt)
    opts = plugin.options.parse(options, format_name=plugin.name)
    bdev = None
    try:
        if backing:
            full = beside(path, backing)
            bdev = open_image(full, backing_fmt)
        b = Backing(backing, bdev.format, bdev) if bdev else None
        from .ops.measure import require_room
        require_room(path, plugin, opts, size=size)
        with plugin.writer(path, size, opts, backing=b) as w:
            w.finish()
    finally:
        if bdev is not None:
            bdev.close()


def convert(source: str | os.PathLike, target: str | os.PathLike, *,
            source_fmt: str | None = None, target_fmt: str | None = None,
            options: "str | Mapping[str, Any] | None" = None, compress: bool = False,
            progress: Callable[[int, int], None] | None = None,
            policy: "OpenPolicy | None" = None) -> "ConvertStats":
    """Convert an image file to another format; the output appears atomically."""
    from .atomic import refuse_overwrite
    from .ops.convert import convert as run
    from .registry import open_image, target_format
    plugin = target_format(os.fspath(target), target_fmt)
    opts = plugin.options.parse(options, format_name=plugin.name)
    if compress:
        opts = plugin.compressed(opts)
    with open_image(source, source_fmt, policy=policy) as src:
        refuse_overwrite(target, src.files())
        from .ops.measure import require_room
        require_room(os.fspath(target), plugin, opts, source=src)
        return run(src, plugin.writer(os.fspath(target), src.size, opts), progress=progress)


def info(path: str | os.PathLike, fmt: str | None = None, *,
         policy: "OpenPolicy | None" = None) -> "ImageInfo":
    """Header facts of an image."""
    from .registry import open_image
    with open_image(path, fmt, policy=policy) as dev:
        return dev.info()


def import_ova(path: str | os.PathLike, outdir: str | os.PathLike = ".",
               **opts: "Any") -> "Any":
    """Import an OVF package (``.ova``, or ``.ovf`` with its files): each disk converted
    into ``outdir`` (qcow2 unless ``fmt=``) and a libvirt domain XML from its hardware
    section; returns the plan carried out (``dry_run=True``: only decided). Options
    and the mapping rules: ``diskforge/export/importer.py``."""
    from .export.importer import import_ova as run
    return run(path, outdir, **opts)
