"""The ``-o`` options of VMDK output: an ``options.Options`` dataclass, imported only
when a command writes or lists options, not when one opens an image."""

from __future__ import annotations

import dataclasses

from ...errors import UsageError
from ...options import Options, option

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
ADAPTER_TYPES = ("ide", "lsilogic", "buslogic", "legacyESX")


@dataclasses.dataclass
class VmdkOptions(Options):
    """qemu-img's vmdk options, with its defaults (``qemu-img create -f vmdk -o help``)."""
    subformat: str = option("monolithicSparse", "VMDK flat extent format",
                            choices=SUBFORMATS)
    adapter_type: str = option("ide", "virtual adapter type (ddb.adapterType)",
                               choices=ADAPTER_TYPES)
    hwversion: str = option("", "VMDK hardware version (ddb.virtualHWVersion; qemu's"
                            " default 4, or 6 with compat6)")
    toolsversion: str = option("", "VMware guest tools version (ddb.toolsVersion)")
    compat6: bool = option(False, "VMDK version 6 image (hwversion 6)")
    zeroed_grain: bool = option(False, "enable efficient zero writes using the"
                                " zeroed-grain GTE feature")
    backing_file: str = option("", "file name of a base image (also -b/-B)")
    backing_fmt: str = option("", "must be 'vmdk' if present (also -F)")

    def validate(self) -> None:
        if self.compat6 and self.hwversion not in ("", "6"):
            raise UsageError("compat6 cannot be enabled with hwversion set")
        if self.hwversion and not self.hwversion.isdigit():
            raise UsageError(f"hwversion '{self.hwversion}' is not a number")
        if self.backing_fmt not in ("", "vmdk"):
            raise UsageError("backing_fmt must be 'vmdk' if present")
        if self.backing_fmt and not self.backing_file:
            raise UsageError("backing_fmt requires backing_file")
