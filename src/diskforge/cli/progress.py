"""Progress for long work, as qemu-img reports it, with diskforge's bar as an opt-in.

The contract scripts rely on (qemu-img's ``util/qemu-progress.c``):

- with ``-p``: ``    (NN.NN/100%)\\r`` on **stdout**, from ``(0.00/100%)`` when the work
  starts, again each time it advances by at least one percent, ``(100.00/100%)`` at
  the end, then a newline;
- without ``-p``: nothing at all, whether or not stdout or stderr is a terminal.

``DISKFORGE_PROGRESS=bar`` in the environment asks for diskforge's own bar instead (on
stderr, redrawn in place on a terminal; rate in MB/s), with or without ``-p``; ``-q``
silences both.
"""

from __future__ import annotations

import os
import sys
import time


class ProgressBar:
    """Callable as ``progress(done, total)``; a context manager that ends the line
    however the work ends. ``force`` is ``-p``; ``quiet`` is ``-q``."""

    def __init__(self, label: str = "", *, force: bool = False, quiet: bool = False,
                 stream=None):
        bar = os.environ.get("DISKFORGE_PROGRESS", "").lower() == "bar"
        self.mode = None if quiet else "bar" if bar else "qemu" if force else None
        self.enabled = self.mode is not None
        default = sys.stderr if self.mode == "bar" else sys.stdout
        self.stream = stream or default
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        from ..errors import printable
        self.label = printable(label)
        self.start = time.monotonic()
        self.last = 0.0
        self.printed = -100.0   # the last percentage printed (qemu mode)
        self.drawn = False
        self.closed = False
        if self.mode == "qemu":
            self._qemu(0.0)

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        pct = min(100.0, 100.0 * done / total) if total else 100.0
        if self.mode == "qemu":
            if pct - self.printed >= 1.0 or (pct == 100.0 and self.printed < 100.0):
                self._qemu(pct)
            return
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6) / 1e6
        if self.tty:
            width = 30
            filled = int(width * pct / 100)
            self.stream.write(f"\r{self.label}[{'#' * filled}{' ' * (width - filled)}]"
                              f" {pct:6.2f}%  {rate:8.1f} MB/s")
        else:
            self.stream.write(f"{self.label}{pct:6.2f}%  {rate:8.1f} MB/s\n")
        self.stream.flush()
        self.drawn = True

    def _qemu(self, pct: float) -> None:
        self.stream.write(f"    ({pct:.2f}/100%)\r")
        self.stream.flush()
        self.printed = pct

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the progress line: the final step (when not printed yet: an empty
        image reports nothing) and a newline, as qemu-img."""
        if self.closed:
            return
        self.closed = True
        if self.mode == "qemu":
            if self.printed < 100.0:
                self._qemu(100.0)
            self.stream.write("\n")
            self.stream.flush()
        elif self.mode == "bar" and self.drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()
