"""Format options: the ``-o key=value,...`` keys, declared once per format as a dataclass.

A format declares ``class Qcow2Options(Options)`` with fields made by :func:`option`;
the same declaration gives the parser, the defaults, the validation and the
``-o help`` listing, so they cannot drift apart. Key names follow qemu-img where qemu-img
has the option (``cluster_size``, ``lazy_refcounts``, ``backing_file``...).
"""

from __future__ import annotations

import dataclasses
import re

from .errors import UnsupportedError, UsageError

TYPE_CHECKING = False  # importing typing would cost start-up time
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpPeE]?)(i?[bB])?\s*$")
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str | int, what: str = "size") -> int:
    """A byte count with qemu-img's suffixes: ``512``, ``64k``, ``1.5G``, ``2MiB``."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise UsageError(f"invalid {what} '{text}': use a number with an optional"
                             " suffix k, M, G, T, P or E")
        number, suffix = m.group(1), m.group(2).lower()
        if "." in number and not suffix:
            raise UsageError(f"invalid {what} '{text}': a fraction needs a unit suffix")
        value = int(float(number) * (1 << _SIZE_SHIFT[suffix])) if "." in number \
            else int(number) << _SIZE_SHIFT[suffix]
    if value < 0 or value > (1 << 63) - 1:
        raise UsageError(f"invalid {what} '{text}': out of range")
    return value


def option(default: Any, help: str, *, kind: str | None = None,
           choices: tuple[str, ...] | None = None, minimum: int | None = None,
           maximum: int | None = None, power_of_two: bool = False) -> Any:
    """Declare one option field. ``kind`` is "size" for byte counts with suffixes;
    otherwise the field's annotation (int, bool, str) decides."""
    meta = {"help": help, "kind": kind, "choices": choices, "minimum": minimum,
            "maximum": maximum, "power_of_two": power_of_two}
    return dataclasses.field(default=default, metadata=meta)


_TRUE = {"on", "true", "yes", "1"}
_FALSE = {"off", "false", "no", "0"}


@dataclasses.dataclass
class Options:
    """Base class of every format's options. Subclasses are dataclasses."""

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One dict per option: name, type, default, help, choices (for ``-o help``)."""
        rows = []
        for f in dataclasses.fields(cls):
            m = f.metadata
            rows.append({"name": f.name, "type": _type_name(f), "default": f.default,
                         "help": m.get("help", ""), "choices": m.get("choices")})
        return rows

    @classmethod
    def help_text(cls, format_name: str) -> str:
        rows = cls.describe()
        if not rows:
            return f"Format '{format_name}' has no options.\n"
        lines = [f"Supported options for {format_name}:"]
        for r in rows:
            default = r["default"]
            shown = ("on" if default else "off") if isinstance(default, bool) else default
            typ = "|".join(r["choices"]) if r["choices"] else r["type"]
            lines.append(f"  {r['name']}=<{typ}>" + (f"  (default: {shown})"
                                                     if shown not in (None, "") else ""))
            lines.append(f"      {r['help']}")
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, spec: "str | Mapping[str, Any] | None" = None, *,
              format_name: str = "", validate: bool = True) -> "Options":
        """Build options from ``"k=v,k2=v2"`` or a mapping; unknown keys are errors.
        ``validate=False`` skips the cross-field checks (``amend`` changes a few keys
        of an existing image, whose other settings are not these defaults)."""
        values = split_option_string(spec) if isinstance(spec, str) or spec is None \
            else dict(spec)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, raw in values.items():
            f = fields.get(key)
            if f is None and (key == "encryption" or key.startswith("encrypt.")):
                # qemu's keys for writing encrypted images (qcow2's aes and luks, luks):
                # reading them is supported, writing not yet
                raise UnsupportedError(f"not supported yet: writing encrypted"
                                       f" {format_name or 'disk'} images (-o {key})")
            if f is None:
                known = ", ".join(fields) or "none"
                raise UsageError(f"invalid option '{key}' for format '{format_name}'"
                                 f" (known options: {known}; see -o help)")
            kwargs[key] = _convert(f, raw, format_name)
        obj = cls(**kwargs)
        if validate:
            obj.validate()
        return obj

    def validate(self) -> None:
        """Cross-field checks; subclasses extend (and raise UsageError)."""

    def replace(self, **changes: Any) -> "Options":
        return dataclasses.replace(self, **changes)


def split_option_string(spec: str | None) -> dict[str, str]:
    """``"a=1,b=2"`` → ``{"a": "1", "b": "2"}``; ``,,`` escapes a comma as qemu-img does."""
    out: dict[str, str] = {}
    if not spec:
        return out
    parts, cur, i = [], "", 0
    while i < len(spec):
        c = spec[i]
        if c == ",":
            if spec[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    for part in parts:
        if not part:
            continue
        if "=" not in part:
            k, v = part, "on"  # a bare key is a flag set on, as in qemu-img
        else:
            k, v = part.split("=", 1)
        out[k.strip()] = v
    return out


def merge_option_strings(*specs: str | None) -> str:
    """Repeated ``-o`` flags accumulate, later keys winning, as in qemu-img."""
    return ",".join(s for s in specs if s)


def _type_name(f: dataclasses.Field) -> str:
    if f.metadata.get("kind") == "size":
        return "size"
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return {"bool": "bool", "int": "int", "str": "str"}.get(t.split("|")[0].strip(), t)


def _convert(f: dataclasses.Field, raw: Any, format_name: str) -> Any:
    m = f.metadata
    name = f.name
    typ = _type_name(f)
    if isinstance(raw, str):
        text = raw.strip()
    else:
        text = raw
    if typ == "bool":
        if isinstance(text, bool):
            return text
        low = str(text).lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise UsageError(f"invalid value '{raw}' for option '{name}': expected on or off")
    if typ in ("int", "size"):
        if typ == "size":
            value = parse_size(text, f"value for option '{name}'")
        else:
            try:
                value = int(text)
            except (TypeError, ValueError):
                raise UsageError(f"invalid value '{raw}' for option '{name}':"
                                 " expected an integer") from None
        lo, hi = m.get("minimum"), m.get("maximum")
        if lo is not None and value < lo or hi is not None and value > hi:
            raise UsageError(f"invalid value {value} for option '{name}': must be between"
                             f" {lo} and {hi}")
        if m.get("power_of_two") and (value <= 0 or value & (value - 1)):
            raise UsageError(f"invalid value {value} for option '{name}':"
                             " must be a power of two")
        return value
    value = str(text)
    choices = m.get("choices")
    if choices and value not in choices:
        raise UsageError(f"invalid value '{value}' for option '{name}': expected one of "
                         + ", ".join(choices))
    return value


@dataclasses.dataclass
class NoOptions(Options):
    """For formats without options."""
