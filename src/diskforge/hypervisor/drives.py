"""How an image reaches QEMU: its own format driver, or diskforge's NBD export.

QEMU reads raw, qcow2, VHD (``vpc``), VHDX, VMDK and VDI itself; those are attached
directly (fastest, and QEMU's image locking applies). Anything else diskforge reads —
or a file of a QEMU format that QEMU would mishandle — is served over NBD from a
Unix socket by this process and attached as ``driver=nbd``.

A format plugin can override the choice per file with a ``qemu_driver(path)`` method
returning QEMU's driver name, or None for "export it over NBD" (e.g. a VHDX whose log
must be replayed, a DMG that QEMU's dmg driver cannot decompress). Plugins without that
method use ``QEMU_DRIVERS`` by name.

Until every format plugin is merged, a file the registry can only call ``raw`` (its
fallback) is also shown to ``qemu-img info`` when that is installed, so that a qcow2
made by QEMU is not handed to a guest as raw bytes.

Files an image names (backing files) are checked against the open policy before QEMU
is let near them: diskforge opens the chain itself when it reads the format, and
otherwise checks the chain ``qemu-img info --backing-chain`` reports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

from ..errors import DiskforgeError, UsageError
from ..policy import OpenPolicy

# diskforge format name -> QEMU block driver, for formats QEMU reads correctly
QEMU_DRIVERS = {"raw": "raw", "qcow2": "qcow2", "vhd": "vpc", "vpc": "vpc",
                "vhdx": "vhdx", "vmdk": "vmdk", "vdi": "vdi", "iso": "raw"}
# QEMU's format names back to diskforge's, for the qemu-img fallback
_FROM_QEMU = {"vpc": "vhd"}


@dataclass
class ImagePlan:
    path: str
    format: str                 # diskforge's name for the format
    qemu_driver: str | None     # None: serve over NBD
    read_only_export: bool = False  # only for NBD: diskforge cannot write this format


def is_nbd_uri(text: str) -> bool:
    return text.startswith(("nbd://", "nbd+unix://", "nbd+tcp://"))


def nbd_blockdev(uri: str) -> dict:
    """QEMU's ``nbd`` driver options for an NBD URI (``nbd+unix:///NAME?socket=PATH``
    or ``nbd://HOST:PORT/NAME``)."""
    u = urlparse(uri)
    export = u.path.lstrip("/")
    if u.scheme == "nbd+unix":
        sock = parse_qs(u.query).get("socket", [""])[0]
        if not sock:
            raise UsageError(f"NBD URI without ?socket=: {uri}")
        server = {"type": "unix", "path": sock}
    else:
        if not u.hostname:
            raise UsageError(f"NBD URI without a host: {uri}")
        server = {"type": "inet", "host": u.hostname, "port": str(u.port or 10809)}
    opts = {"driver": "nbd", "server": server}
    if export:
        opts["export"] = export
    return opts


def _qemu_img_info(path: str, chain: bool = False) -> list[dict] | None:
    exe = shutil.which("qemu-img")
    if exe is None:
        return None
    argv = [exe, "info", "-U", "--output", "json"] + (["--backing-chain"] if chain else [])
    proc = subprocess.run(argv + [path], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    data = json.loads(proc.stdout)
    return data if isinstance(data, list) else [data]


def plan_image(path: str, fmt: str | None = None, *,
               policy: OpenPolicy | None = None) -> ImagePlan:
    """Decide how QEMU gets ``path``; checks the files it names against ``policy``."""
    from ..errors import UnknownFormatError
    from ..registry import check_readable, get, probe
    check_readable(path)
    try:
        plugin = get(fmt) if fmt else probe(path)
    except UnknownFormatError:
        qemu_name = QEMU_DRIVERS.get(fmt.lower()) if fmt else None
        if qemu_name is None and fmt and fmt.lower() in QEMU_DRIVERS.values():
            qemu_name = fmt.lower()
        if qemu_name is None:
            raise
        # a format QEMU reads that diskforge has no plugin for (yet): QEMU's driver
        _check_chain(path, fmt, None, policy)
        return ImagePlan(path, _FROM_QEMU.get(qemu_name, fmt.lower()), qemu_name)
    name = plugin.name
    if name == "raw" and not fmt:
        info = _qemu_img_info(path)
        if info and info[0].get("format") not in (None, "raw"):
            name = _FROM_QEMU.get(info[0]["format"], info[0]["format"])
    chooser = getattr(plugin, "qemu_driver", None) if plugin.name == name else None
    driver = chooser(path) if chooser is not None else QEMU_DRIVERS.get(name)
    _check_chain(path, name, plugin if plugin.name == name else None, policy)
    if driver is None:
        if plugin.name != name or not plugin.can_read:
            raise DiskforgeError(f"not supported yet: {name} images (QEMU cannot read this"
                                 " one and diskforge has no reader for it)", path)
        return ImagePlan(path, name, None, read_only_export=not plugin.random_write)
    return ImagePlan(path, name, driver)


def _check_chain(path: str, name: str, plugin, policy: OpenPolicy | None) -> None:
    """Refuse images whose backing files resolve outside the allowed roots."""
    policy = policy or OpenPolicy()
    if plugin is not None and plugin.can_read:
        from ..registry import open_image
        with open_image(path, plugin.name, policy=policy):
            return  # opening walks (and checks) the whole chain
    info = _qemu_img_info(path, chain=True)
    for layer in info or []:
        backing = layer.get("backing-filename")
        if backing:
            policy.resolve(layer.get("filename", path), backing)
