"""How an image reaches QEMU: its own format driver, or diskforge's NBD export.

QEMU reads raw, qcow2, VHD (``vpc``), VHDX, VMDK, VDI and some DMGs itself; those are
attached directly (fastest, and QEMU's image locking applies). Anything else diskforge
reads — or a file of a QEMU format that QEMU would misread or refuse — is served over
NBD from a Unix socket by this process and attached as ``driver=nbd``.

The choice is the format plugin's, per file: ``Format.qemu_driver(device)`` returns
QEMU's driver name for the opened image, or None for "export it over NBD" (a VHDX with
a pending log, a differencing VHD, a DMG with LZFSE chunks; see each plugin). Every
layer of a backing chain must be readable by QEMU for the image to go direct.

Formats diskforge has no plugin for (none at present) go to QEMU's driver when
named with ``-f``; unnamed, such a file probes as raw here as everywhere in diskforge.

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

# formats QEMU reads that diskforge has no plugin for (yet): attached with QEMU's driver
QEMU_ONLY_FORMATS: tuple[str, ...] = ()


@dataclass
class ImagePlan:
    """How one image reaches QEMU: its driver directly, or over NBD."""
    path: str
    format: str                 # diskforge's name for the format
    qemu_driver: str | None     # None: serve over NBD
    read_only: bool = False     # neither diskforge nor QEMU can write this image


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


def _qemu_img_chain(path: str, fmt: str) -> list[dict] | None:
    exe = shutil.which("qemu-img")
    if exe is None:
        return None
    proc = subprocess.run([exe, "info", "-U", "--output", "json", "--backing-chain",
                           "-f", fmt, path], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    data = json.loads(proc.stdout)
    return data if isinstance(data, list) else [data]


def plan_image(path: str, fmt: str | None = None, *,
               policy: OpenPolicy | None = None) -> ImagePlan:
    """Decide how QEMU gets ``path``; checks the files it names against ``policy``."""
    from ..errors import UnknownFormatError
    from ..registry import check_readable, get, open_image, probe
    check_readable(path)
    try:
        plugin = get(fmt) if fmt else probe(path)
    except UnknownFormatError:
        if fmt is None or fmt.lower() not in QEMU_ONLY_FORMATS:
            raise
        _check_chain(path, fmt.lower(), policy or OpenPolicy())
        return ImagePlan(path, fmt.lower(), fmt.lower())
    if not plugin.can_read:
        raise DiskforgeError(f"not supported yet: {plugin.name} images (QEMU cannot read"
                             " this one and diskforge has no reader for it)", path)
    # opening walks (and checks) the whole backing chain; it only looks, and closes
    # before QEMU opens the files, so it shares (-U): QEMU's own image locks decide
    with open_image(path, plugin.name,
                    policy=(policy or OpenPolicy()).replace(force_share=True)) as dev:
        driver = qemu_driver(dev)
    return ImagePlan(path, plugin.name, driver, read_only=not plugin.random_write)


def qemu_driver(dev) -> str | None:
    """QEMU's driver for an opened image, or None when QEMU cannot read it or any
    layer of its backing chain as diskforge does."""
    from ..registry import get
    layer = dev.backing
    while layer is not None:
        if get(layer.format).qemu_driver(layer) is None:
            return None
        layer = layer.backing
    return get(dev.format).qemu_driver(dev)


def _check_chain(path: str, fmt: str, policy: OpenPolicy) -> None:
    """Refuse images of QEMU-only formats whose backing files resolve outside the
    allowed roots."""
    for layer in _qemu_img_chain(path, fmt) or []:
        backing = layer.get("backing-filename")
        if backing:
            policy.resolve(layer.get("filename", path), backing)
