"""A bounded XML property-list reader for the plists inside Apple images.

A UDIF image carries its chunk tables in an XML plist (up to hundreds of MiB for a
large disk) and a sparse bundle describes itself in ``Info.plist``; both come from the
image, so both are hostile input. ``plistlib`` refuses entity declarations, but builds
whatever the document holds: a plist of hundreds of MiB of empty ``<array/>`` elements
becomes tens of millions of Python objects (gigabytes) before anything can be checked,
and nesting deep enough breaks every recursive consumer afterwards.

This reader drives expat itself, fed in 1 MiB pieces (never the whole document at
once), and refuses, with the element that crossed the line:

- entity declarations and a document type's internal subset (no entity expansion, no
  "billion laughs"), and entity references expat cannot resolve;
- nesting deeper than ``max_depth`` elements (real plists nest five deep);
- more than ``max_elements`` elements in all (a 1 TiB UDZO's plist has a few hundred:
  its chunk tables are base64 ``<data>``, not elements);
- more than ``max_bytes`` of document, and ``<integer>`` text longer than 64
  characters.

Values are built as ``plistlib`` builds them: dict, list, str, bytes (``<data>``), int,
float, bool; ``<date>`` stays its ISO 8601 text (nothing here needs it as a datetime).
"""

from __future__ import annotations

import binascii
from xml.parsers import expat

PIECE = 1 << 20
MAX_DEPTH = 32
MAX_ELEMENTS = 100_000
MAX_INTEGER_DIGITS = 64

_SCALARS = {"string", "key", "data", "date", "integer", "real"}
_CONTAINERS = {"dict", "array"}


class PlistError(ValueError):
    """The document is not a plist this reader accepts (the caller adds the file)."""


class _Builder:
    """expat callbacks that build the value, counting and capping as they go."""

    def __init__(self, parser, max_depth: int, max_elements: int):
        self.parser = parser
        self.max_depth = max_depth
        self.max_elements = max_elements
        self.elements = 0
        self.open: list[str] = []             # element names, outermost first
        self.stack: list[list] = []           # [container, pending dict key]
        self.text: list[str] = []
        self.result = None
        self.done = False

    def _fail(self, message: str):
        raise PlistError(f"{message} (line {self.parser.CurrentLineNumber})")

    def start(self, name: str, attrs) -> None:
        self.elements += 1
        if self.elements > self.max_elements:
            self._fail(f"more than {self.max_elements} elements")
        if len(self.open) >= self.max_depth:
            self._fail(f"elements nested deeper than {self.max_depth} levels")
        self.open.append(name)
        self.text = []
        if name in _CONTAINERS:
            self.stack.append([{} if name == "dict" else [], None])
        elif name not in _SCALARS and name not in ("true", "false", "plist"):
            self._fail(f"unknown element <{name}>")

    def chars(self, data: str) -> None:
        if self.open and self.open[-1] in _SCALARS:
            self.text.append(data)

    def end(self, name: str) -> None:
        self.open.pop()
        if name == "plist":
            return
        if name in _CONTAINERS:
            value = self.stack.pop()[0]
        elif name == "key":
            if not self.stack or not isinstance(self.stack[-1][0], dict):
                self._fail("<key> outside a <dict>")
            self.stack[-1][1] = "".join(self.text)
            return
        else:
            value = self._scalar(name, "".join(self.text))
        self._add(value)

    def _scalar(self, name: str, text: str):
        if name in ("string", "date"):
            return text
        if name == "true":
            return True
        if name == "false":
            return False
        if name == "data":
            try:
                return binascii.a2b_base64(text.encode("ascii"))
            except (binascii.Error, UnicodeEncodeError):
                self._fail("<data> is not valid base64")
        text = text.strip()
        if name == "integer":
            if len(text) > MAX_INTEGER_DIGITS:
                self._fail(f"<integer> of {len(text)} characters")
            try:
                return int(text, 16) if text.lower().startswith(("0x", "-0x")) \
                    else int(text)
            except ValueError:
                self._fail(f"<integer> {text[:20]!r} is not a number")
        try:
            return float(text)
        except ValueError:
            self._fail(f"<real> {text[:20]!r} is not a number")

    def _add(self, value) -> None:
        if not self.stack:
            if self.done:
                self._fail("more than one top-level value")
            self.result, self.done = value, True
            return
        container, key = self.stack[-1]
        if isinstance(container, list):
            container.append(value)
        elif key is None:
            self._fail("a <dict> value without its <key>")
        else:
            container[key] = value
            self.stack[-1][1] = None


def _refuse_entities(*_args) -> None:
    raise PlistError("entity declarations are not allowed in a plist")


def _refuse_skipped(name, _is_param) -> None:
    raise PlistError(f"entity reference '&{name};' is not allowed in a plist")


def loads(pieces, *, max_bytes: int, max_depth: int = MAX_DEPTH,
          max_elements: int = MAX_ELEMENTS):
    """The value of the XML plist whose bytes ``pieces`` yields (an iterable of bytes,
    or one bytes object). Raises :class:`PlistError`."""
    if isinstance(pieces, (bytes, bytearray, memoryview)):
        whole = memoryview(pieces)
        pieces = (whole[i:i + PIECE] for i in range(0, len(whole), PIECE))
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    b = _Builder(parser, max_depth, max_elements)
    parser.StartElementHandler = b.start
    parser.EndElementHandler = b.end
    parser.CharacterDataHandler = b.chars
    parser.EntityDeclHandler = _refuse_entities
    parser.UnparsedEntityDeclHandler = _refuse_entities
    parser.SkippedEntityHandler = _refuse_skipped
    parser.buffer_text = True
    total = 0
    try:
        for piece in pieces:
            total += len(piece)
            if total > max_bytes:
                raise PlistError(f"larger than the {max_bytes} bytes a plist may have")
            parser.Parse(bytes(piece), False)
        parser.Parse(b"", True)
    except expat.ExpatError as e:
        raise PlistError(f"not well-formed XML ({expat.errors.messages[e.code]}, line"
                         f" {e.lineno})") from None
    except (LookupError, ValueError) as e:
        # the XML declaration names an encoding Python does not know (LookupError) or
        # a multi-byte one expat cannot take from Python (ValueError); found by fuzzing
        raise PlistError(f"unusable XML encoding declaration ({e})") from None
    if not b.done:
        raise PlistError("no value in the plist")
    return b.result
