"""A blocking QMP client over ``qemu.qmp``, usable from any thread.

``qemu.qmp.QMPClient`` is asyncio-only and its legacy synchronous wrapper runs the event
loop of whichever thread calls it, so it cannot time a call out while QEMU hangs, nor
be shared between threads. Here one private event loop runs in a daemon thread; every
call is handed to it and waited for with a timeout, and events are collected as they
arrive (so a job's completion is never missed between two polls).

Errors become :class:`QMPError` (a ``DiskforgeError``: one line in the CLI), carrying
QEMU's error class and description; a connection that drops mid-call (QEMU killed)
becomes :class:`QMPDisconnected`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
import time
from typing import Any

from ..errors import DiskforgeError

QMP_READ_BUFFER = 16 << 20  # query-named-block-nodes can be large; qemu.qmp's default is 64 KiB


class QMPError(DiskforgeError):
    """QEMU refused a command, or the monitor could not be reached."""

    def __init__(self, message: str, path: str | None = None, *,
                 error_class: str | None = None, command: str | None = None):
        self.error_class = error_class
        self.command = command
        super().__init__(message, path)


class QMPDisconnected(QMPError):
    """The monitor connection went away (QEMU exited or was killed)."""


class QMP:
    """A connected QMP session. ``execute`` blocks until QEMU answers or ``timeout``."""

    def __init__(self, address: str, *, timeout: float = 10.0, name: str = "diskforge"):
        from qemu.qmp import QMPClient
        self.address = address
        self._events: queue.Queue = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"qmp-{os.path.basename(address)}")
        self._thread.start()
        self._client = None
        self._listener: asyncio.Future | None = None
        self._closed = False
        try:
            async def make():
                return QMPClient(name, readbuflen=QMP_READ_BUFFER)
            self._client = self._run(make(), 5.0)
            self._connect(timeout)
        except BaseException:
            self.close()
            raise

    # -- plumbing ---------------------------------------------------------------------
    def _run(self, coro, timeout: float | None):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise
        except BaseException:
            fut.cancel()
            raise

    def _connect(self, timeout: float) -> None:
        """Connect, retrying while QEMU has not created the socket yet."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                self._run(self._client.connect(self.address), max(0.5, timeout))
                break
            except Exception as e:  # ConnectError while the socket does not exist yet
                last = e
                if time.monotonic() >= deadline:
                    raise QMPError(f"cannot connect to the QMP socket: {_reason(e)}",
                                   self.address) from None
                time.sleep(0.05)
        del last

        async def listen():
            from qemu.qmp import EventListener
            listener = EventListener()
            self._client.register_listener(listener)
            async for event in listener:
                self._events.put(dict(event))

        async def start_listening():
            return asyncio.ensure_future(listen())
        self._listener = self._run(start_listening(), 5.0)

    # -- commands ---------------------------------------------------------------------
    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float = 60.0) -> Any:
        """Run one QMP command; its ``return`` value, or QMPError with QEMU's reason."""
        from qemu.qmp import ExecuteError
        if self._closed:
            raise QMPDisconnected("the QMP connection is closed", self.address,
                                  command=command)
        try:
            return self._run(self._client.execute(command, arguments), timeout)
        except ExecuteError as e:
            raise QMPError(f"{command}: {e}", error_class=e.error_class,
                           command=command) from None
        except concurrent.futures.TimeoutError:
            raise QMPError(f"{command}: QEMU did not answer within {timeout:g} s",
                           self.address, command=command) from None
        except Exception as e:  # the connection dropped: QEMU exited or was killed
            raise QMPDisconnected(f"{command}: the QMP connection was lost ({_reason(e)});"
                                  " QEMU has probably exited", self.address,
                                  command=command) from None

    def hmp(self, command_line: str, *, timeout: float = 60.0) -> str:
        """A human-monitor command (``qemu-io disk0 "write ..."``); its text output.
        HMP reports failures as text, so output that looks like an error raises."""
        out = self.execute("human-monitor-command", {"command-line": command_line},
                           timeout=timeout)
        text = str(out or "")
        low = text.lower()
        if low.startswith("error") or "failed" in low or "unknown command" in low:
            raise QMPError(f"{command_line.split()[0]}: {text.strip()}",
                           command="human-monitor-command")
        return text

    # -- events -----------------------------------------------------------------------
    def wait_event(self, name: str | tuple[str, ...], *, timeout: float,
                   match=None) -> dict | None:
        """The next event called ``name`` (for which ``match(event)`` is true), or None
        after ``timeout``. Other events are dropped; events already received count."""
        names = (name,) if isinstance(name, str) else name
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                ev = self._events.get(timeout=min(left, 0.2))
            except queue.Empty:
                if not self.connected:
                    raise QMPDisconnected("the QMP connection was lost while waiting for"
                                          f" {'/'.join(names)}; QEMU has probably exited",
                                          self.address) from None
                continue
            if ev.get("event") in names and (match is None or match(ev)):
                return ev

    def clear_events(self) -> None:
        while True:
            try:
                self._events.get_nowait()
            except queue.Empty:
                return

    @property
    def connected(self) -> bool:
        from qemu.qmp.protocol import Runstate
        return (not self._closed and self._client is not None
                and self._client.runstate == Runstate.RUNNING)

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async def shut():
            if self._listener is not None:
                self._listener.cancel()
                try:
                    await self._listener
                except BaseException:
                    pass
            if self._client is not None:
                await self._client.disconnect()
        try:
            self._run(shut(), 5.0)
        except Exception:
            pass
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> "QMP":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f": {cause}"
    return text
