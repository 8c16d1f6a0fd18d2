"""Azure: a fixed VHD whose virtual size is a whole number of MiB.

Rules, from Microsoft's pages:

- "Prepare a Linux VHD / generic Linux distributions"
  (https://learn.microsoft.com/azure/virtual-machines/linux/create-upload-generic):
  the VHD must be *fixed* (dynamic disks are refused) and its virtual size aligned to
  1 MiB, else "The VHD ... has an unsupported virtual size of N bytes. The size must
  be a whole number (in MBs)". The page's recipe is ``qemu-img resize`` to a whole
  MiB, then ``qemu-img convert -O vpc -o subformat=fixed,force_size``.
- "Upload a VHD to Azure" and the API's ``DiskCreationData.UploadSizeBytes``
  (https://learn.microsoft.com/dotnet/api/azure.resourcemanager.compute.models.diskcreationdata.uploadsizebytes):
  the upload, footer included, is from 20 MiB + 512 bytes to 32 TiB + 512 bytes;
  ``Add-AzVhd`` (https://learn.microsoft.com/powershell/module/az.compute/add-azvhd)
  wants "N * MiB + 512 bytes".

The export rounds the virtual size up to a whole MiB (never shrinking data; a disk
under 20 MiB is grown to 20 MiB) and writes it with the ``vpc`` plugin's writer
through the registry, ``subformat=fixed,force_size=auto``: the disk bytes then the
footer, zeros left as holes, so the file is sparse locally (uploaders such as
``azcopy`` and ``Add-AzVhd`` skip empty ranges).

The footer: the fields Azure's own tooling sets (Azure PowerShell's
``VhdFooterFactory.CreateFixedDiskFooter``: cookie ``conectix``, features 2, version
1.0, data offset all ones, original size = current size = the virtual size, disk type
fixed, a random unique id, saved state 0) are what the vpc writer writes. Two differ
on purpose: the creator application stays diskforge's ``dskf`` (Azure's tooling
writes ``wa``), and the geometry is the specification's only when it is exactly the
size (else 65535/16/255). With ``wa`` and a rounded-down geometry, qemu and
every reader that believes the geometry would see a smaller disk than Azure does;
with these, qemu-img, libvhdi, Hyper-V and Azure all read the current size. Azure
reads only the current size and the type.
"""

from __future__ import annotations

from ..blockdev import BlockDevice
from .base import MiB, TiB, ExportOptions, Progress, round_up, size_text, write_disk
from .checkfile import CheckFile

NAME = "azure"
SUMMARY = "Azure: fixed VHD, virtual size a whole MiB (20 MiB to 32 TiB), sparse"
FOOTER = 512
MIN_SIZE = 20 * MiB
MAX_SIZE = 32 * TiB
WRITE_OPTIONS = "subformat=fixed,force_size=auto"


def export(source: BlockDevice, out: str, opts: ExportOptions,
           progress: Progress | None = None) -> list[str]:
    from ..errors import UsageError
    size = max(round_up(source.size, MiB), MIN_SIZE)
    if size > MAX_SIZE:
        raise UsageError(f"the disk is {size_text(source.size)}; Azure takes at most"
                         " 32 TiB", out)
    write_disk("vpc", WRITE_OPTIONS, source, out, size, progress)
    return [out]


def check(f: CheckFile, policy=None) -> list[str]:
    fmt = f.format()
    if fmt != "vpc":
        hint = " (Hyper-V's VHDX: convert it to a fixed VHD)" if fmt == "vhdx" else ""
        return [f"is {fmt}, not a VHD{hint}: Azure takes fixed VHDs only"]
    file_size = f.size
    info, unreadable = f.info("vpc", policy)
    if info is None:
        return [unreadable]
    problems = []
    d = info.details
    kind = d.get("disk-type")
    if kind != "fixed":
        problems.append(f"is a {kind} VHD: Azure takes fixed VHDs only (convert with -o"
                        " subformat=fixed)")
    current = int(d.get("current-size", info.virtual_size))
    if current % MiB:
        problems.append(f"virtual size {current} bytes is not a whole number of MiB:"
                        f" Azure refuses it (round up to {round_up(current, MiB)})")
    if kind == "fixed":
        if file_size != current + FOOTER:
            problems.append(f"file is {file_size} bytes, not the virtual size plus the"
                            f" 512-byte footer ({current + FOOTER})")
        if not MIN_SIZE + FOOTER <= file_size <= MAX_SIZE + FOOTER:
            problems.append(f"upload size {file_size} bytes is outside Azure's limits"
                            f" (20 MiB + 512 to 32 TiB + 512 bytes)")
    return problems
