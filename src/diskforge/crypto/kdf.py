"""Password-based key derivation (PBKDF2, Argon2i/Argon2id) with cost caps.

A LUKS header chooses its own KDF cost. A hostile header could ask for terabytes of
Argon2 memory or billions of PBKDF2 iterations, so every cost is checked before the
KDF runs, and one whole unlock has a budget across key slots (``KdfBudget``): no
header can make diskforge allocate more than ``ARGON2_MAX_MEMORY_KIB`` or spin for
more than a bounded time.

The caps are above what cryptsetup and qemu-img write: cryptsetup benchmarks Argon2 to
at most 1 GiB and 4 threads (``--pbkdf-memory`` accepts up to 4 GiB, which is refused
here: a LimitError naming the field), and PBKDF2 to about 2 s of iterations on the
machine that made the header (a few million on a fast one). Argon2's memory is the
one allocation a valid header sizes beyond the per-command budget (``limits.py``), so
it may use four times that budget: 1 GiB normally, 256 MiB in untrusted mode (whose
budget is lower), where a header made on a big machine is refused rather than run.
"""

from __future__ import annotations

import hashlib

from .. import limits
from ..errors import LimitError, UnsupportedError
from .ciphers import hash_name

PBKDF2_MAX_ITERATIONS = 20_000_000     # ~10 s of SHA-256 on one core, at the most
ARGON2_MAX_MEMORY_KIB = 1 << 20        # 1 GiB: cryptsetup's own benchmark maximum
ARGON2_MAX_TIME = 1000
ARGON2_MAX_LANES = 16
# total work one unlock may spend over all key slots it tries
BUDGET_PBKDF2_ITERATIONS = 2 * PBKDF2_MAX_ITERATIONS
BUDGET_ARGON2_KIB_PASSES = 16 << 20    # 16 GiB of Argon2 memory passes


class KdfBudget:
    """The work left for one unlock: each KDF run is charged before it starts."""

    def __init__(self) -> None:
        self.iterations = BUDGET_PBKDF2_ITERATIONS
        self.argon2 = BUDGET_ARGON2_KIB_PASSES

    def charge_pbkdf2(self, iterations: int, path: str | None, where: str) -> None:
        if iterations > self.iterations:
            raise LimitError(f"{where}: PBKDF2 iterations over all key slots tried exceed"
                             f" {BUDGET_PBKDF2_ITERATIONS}", path)
        self.iterations -= iterations

    def charge_argon2(self, kib_passes: int, path: str | None, where: str) -> None:
        if kib_passes > self.argon2:
            raise LimitError(f"{where}: Argon2 work over all key slots tried exceeds"
                             f" {BUDGET_ARGON2_KIB_PASSES >> 20} GiB-passes", path)
        self.argon2 -= kib_passes


def pbkdf2(hash_spec: str, password: bytes, salt: bytes, iterations: int, length: int,
           path: str | None, where: str, budget: KdfBudget | None = None) -> bytes:
    """PBKDF2-HMAC (RFC 8018), refused past ``PBKDF2_MAX_ITERATIONS``."""
    name = hash_name(hash_spec, path, where)
    if not 1 <= iterations <= PBKDF2_MAX_ITERATIONS:
        kind = LimitError if iterations > 0 else UnsupportedError
        raise kind(f"{where}.iterations: {iterations} is outside 1..{PBKDF2_MAX_ITERATIONS}",
                   path)
    if budget is not None:
        budget.charge_pbkdf2(iterations, path, where)
    return hashlib.pbkdf2_hmac(name, password, salt, iterations, length)


def argon2(kind: str, password: bytes, salt: bytes, time: int, memory_kib: int,
           lanes: int, length: int, path: str | None, where: str,
           budget: KdfBudget | None = None) -> bytes:
    """Argon2i or Argon2id (RFC 9106), with cryptsetup's parameter names: ``time``
    passes over ``memory_kib`` KiB with ``lanes`` lanes."""
    memory_cap = min(ARGON2_MAX_MEMORY_KIB, 4 * limits.MEMORY_BUDGET >> 10)
    for field, value, top in (("time", time, ARGON2_MAX_TIME),
                              ("memory", memory_kib, memory_cap),
                              ("cpus", lanes, ARGON2_MAX_LANES)):
        if value < 1:
            raise LimitError(f"{where}.{field}: {value} is not a valid Argon2 cost", path)
        if value > top:
            raise LimitError(f"{where}.{field}: {value} is more than the {top} diskforge"
                             " allows (a header may not make us spin or allocate without"
                             " bound)", path)
    if memory_kib < 8 * lanes:
        raise LimitError(f"{where}.memory: {memory_kib} KiB is less than 8 KiB per lane"
                         " (RFC 9106)", path)
    if budget is not None:
        budget.charge_argon2(time * memory_kib, path, where)
    try:
        from cryptography.hazmat.primitives.kdf import argon2 as mod
    except ImportError:
        raise UnsupportedError("reading encrypted images needs the 'cryptography' package:"
                               " pip install 'diskforge[luks]'", path) from None
    cls = {"argon2id": getattr(mod, "Argon2id", None),
           "argon2i": getattr(mod, "Argon2i", None)}.get(kind)
    if cls is None:
        raise UnsupportedError(f"{where}.type: {kind} key derivation: not supported yet"
                               " (by this version of the 'cryptography' package)", path)
    return cls(salt=salt, length=length, iterations=time, lanes=lanes,
               memory_cost=memory_kib).derive(password)
