"""A progress bar for long work: on a TTY (or when asked with -p), silent otherwise."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """Callable as ``progress(done, total)``; redraws at most ten times a second."""

    def __init__(self, label: str = "", *, force: bool = False, quiet: bool = False,
                 stream=None):
        self.stream = stream or sys.stderr
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = not quiet and (tty or force)
        self.tty = tty
        from ..errors import printable
        self.label = printable(label)
        self.start = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        pct = 100.0 * done / total if total else 100.0
        if self.tty:
            width = 30
            filled = int(width * pct / 100)
            rate = done / max(now - self.start, 1e-6) / 1e6
            self.stream.write(f"\r{self.label}[{'#' * filled}{' ' * (width - filled)}]"
                              f" {pct:6.2f}%  {rate:8.1f} MB/s")
        else:
            self.stream.write(f"    ({pct:.2f}/100%)\n")
        self.stream.flush()
        self.drawn = True

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.enabled and self.drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()
