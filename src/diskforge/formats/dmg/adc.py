"""Apple Data Compression (ADC): the LZ77 variant of UDCO images (chunk type 0x80000004).

No package implements it, so here is the decoder (decompression only: hdiutil stopped
writing UDCO long ago, and diskforge does not write it). The stream is a sequence of
tokens, each introduced by one byte ``b``:

- ``b & 0x80``: a literal run of ``(b & 0x7f) + 1`` bytes that follow;
- ``b & 0x40``: a match of ``(b & 0x3f) + 4`` bytes, ``distance - 1`` in the next two
  bytes (big-endian);
- otherwise: a match of ``((b >> 2) & 0x0f) + 3`` bytes, ``distance - 1`` in the low two
  bits of ``b`` and the next byte.

A match copies from ``distance`` bytes back in the output and may overlap what it is
writing (distance 1 repeats the last byte). References: the format as described by
dmg2img's adc.c and Jonathan Levin, "Demystifying the DMG File Format" (facts only; this
code is written from the description above).

Hostile input is bounded: the output may not exceed ``out_size`` (checked per token, and
a token adds at most 128 bytes), and every reference must point inside the output.
"""

from __future__ import annotations


class AdcError(ValueError):
    """The stream is not valid ADC, or does not decode to the expected size."""


def adc_decompress(src: bytes, out_size: int) -> bytes:
    """Decode ``src``; the result must be exactly ``out_size`` bytes."""
    out = bytearray()
    n = len(src)
    i = 0
    while i < n:
        b = src[i]
        if b & 0x80:
            run = (b & 0x7F) + 1
            if i + 1 + run > n:
                raise AdcError(f"literal run of {run} bytes at input offset {i} goes past"
                               f" the end of the chunk ({n} bytes)")
            out += src[i + 1:i + 1 + run]
            i += 1 + run
        else:
            if b & 0x40:
                if i + 3 > n:
                    raise AdcError(f"match token at input offset {i} is cut off")
                length = (b & 0x3F) + 4
                dist = ((src[i + 1] << 8) | src[i + 2]) + 1
                i += 3
            else:
                if i + 2 > n:
                    raise AdcError(f"match token at input offset {i} is cut off")
                length = ((b >> 2) & 0x0F) + 3
                dist = (((b & 0x03) << 8) | src[i + 1]) + 1
                i += 2
            start = len(out) - dist
            if start < 0:
                raise AdcError(f"match at output offset {len(out)} refers {dist} bytes"
                               " back, before the start of the output")
            if dist >= length:
                out += out[start:start + length]
            else:  # overlapping copy: the last ``dist`` bytes repeat
                pattern = out[start:]
                out += (pattern * (length // dist + 1))[:length]
        if len(out) > out_size:
            raise AdcError(f"decompresses to more than its declared {out_size} bytes")
    if len(out) != out_size:
        raise AdcError(f"decompresses to {len(out)} bytes, not the declared {out_size}")
    return bytes(out)
