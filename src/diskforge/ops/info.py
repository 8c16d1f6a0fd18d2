"""info: header facts of an image and its backing chain, and qemu-img's human layout."""

from __future__ import annotations

import math
import re

from ..blockdev import BlockDevice, ImageInfo
from ..errors import printable

TYPE_CHECKING = False  # typing and json cost start-up time; info imports json only for JSON
if TYPE_CHECKING:
    from typing import Any


def image_info(dev: BlockDevice, *, backing_chain: bool = False,
               partitions: bool = True) -> list[ImageInfo]:
    """The image's info, and with ``backing_chain`` each backing image's after it.
    ``partitions`` adds the partition table of the virtual disk (the composed one)."""
    out = []
    top = dev
    while dev is not None:
        info = dev.info()
        if partitions and dev is top:
            from ..partitions import read_partitions
            table = read_partitions(dev)
            info.partitions = table.to_json() if table is not None else None
            info._table = table
        out.append(info)
        if not backing_chain:
            break
        dev = dev.backing
    return out


def size_to_str(n: int) -> str:
    """qemu's size_to_str: three significant digits and a binary unit, switching to
    the next unit once the value reaches 1000 of the lower one."""
    _, exp = math.frexp(n / (1000.0 / 1024.0))
    i = min(6, max(0, (exp - 1) // 10))
    return f"{n / (1 << (10 * i)):0.3g} {('', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei')[i]}B"


def _render_value(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for k, v in value.items():
            k = k.replace("-", " ")  # qemu prints JSON keys with spaces
            if isinstance(v, (dict, list)):
                lines.append(f"{pad}{k}:")
                lines.extend(_render_value(v, indent + 4))
            else:
                lines.append(f"{pad}{k}: {_scalar(v)}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, (dict, list)):
                lines.append(f"{pad}[{i}]:")
                lines.extend(_render_value(v, indent + 4))
            else:  # qemu: a list of strings (bitmap flags) one "[i]: value" a line
                lines.append(f"{pad}[{i}]: {_scalar(v)}")
    else:
        lines.append(f"{pad}{_scalar(value)}")
    return lines


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def format_human(info: ImageInfo) -> str:
    lines = [f"image: {info.filename}", f"file format: {info.format}",
             f"virtual size: {size_to_str(info.virtual_size)} ({info.virtual_size} bytes)"]
    if info.actual_size is not None:
        lines.append(f"disk size: {size_to_str(info.actual_size)}")
    if info.encrypted:
        lines.append("encrypted: yes")
    if info.cluster_size is not None:
        lines.append(f"cluster_size: {info.cluster_size}")
    if info.backing_filename:
        line = f"backing file: {info.backing_filename}"
        if info.full_backing_filename and info.full_backing_filename != info.backing_filename:
            line += f" (actual path: {info.full_backing_filename})"
        lines.append(line)
        if info.backing_format:
            lines.append(f"backing file format: {info.backing_format}")
    if info.snapshots:
        lines.extend(snapshot_table(info.snapshots))
    if info.format_specific:
        lines.append("Format specific information:")
        lines.extend(_render_value(info.format_specific, 4))
    if info.details:
        lines.append("Details:")
        lines.extend(_render_value(info.details, 4))
    table = getattr(info, "_table", None)
    if table is not None:
        from ..partitions import format_human as partition_lines
        lines.extend(partition_lines(table))
    # backing and parent names, DMG blkx names, partition names, volume identifiers:
    # most of this comes from inside the image, so every line is escaped
    return "\n".join(printable(line) for line in lines)


def snapshot_table(snapshots: list[dict[str, Any]]) -> list[str]:
    """qemu's snapshot list (bdrv_snapshot_dump) from qemu-img's JSON keys; dates in
    local time, as qemu prints them."""
    import time
    lines = ["Snapshot list:",
             f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.get("date-sec", 0)))
        secs, nsec = s.get("vm-clock-sec", 0), s.get("vm-clock-nsec", 0)
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"
                 f".{nsec // 1_000_000 % 1000:03d}")
        icount = str(s["icount"]) if "icount" in s else ""
        lines.append(f"{printable(s.get('id', '')):<9} {printable(s.get('name', '')):<16} "
                     f"{size_to_str(s.get('vm-state-size', 0)):>8}{date:>20}{clock:>13}"
                     f"{icount:>11}")
    return lines


def format_json(infos: list[ImageInfo], backing_chain: bool) -> str:
    data = [i.to_json() for i in infos]
    return qemu_json(data if backing_chain else data[0])


_ESCAPE = r"\\\\|\\u[0-9a-f]{4}"  # compiled when first used (re caches it)


def qemu_json(value: "Any", indent: int = 0) -> str:
    """``json.dumps(value, indent=4)`` as qemu's pretty printer writes it: the same but
    for empty lists and objects, which qemu opens and closes on two lines (a bitmap
    without flags is ``"flags": [`` then ``]``)."""
    import json
    pad = " " * indent
    inner = " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(str(k))}: {qemu_json(v, indent + 4)}"
                 for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [f"{inner}{qemu_json(v, indent + 4)}" for v in value]
    elif isinstance(value, str):  # qemu writes \u escapes with upper-case hex digits
        return re.sub(_ESCAPE,
                      lambda m: m[0] if m[0] == "\\\\" else "\\u" + m[0][2:].upper(),
                      json.dumps(value))
    else:
        return json.dumps(value)
    opening, closing = ("{", "}") if isinstance(value, dict) else ("[", "]")
    if not items:
        return f"{opening}\n{pad}{closing}"
    return opening + "\n" + ",\n".join(items) + f"\n{pad}{closing}"
