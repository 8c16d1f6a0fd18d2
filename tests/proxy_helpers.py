"""Debian's tinyproxy on a loopback port: the real HTTP proxy (absolute-form GETs and
CONNECT tunnels) the http_proxy/https_proxy tests put in front of the test nginx.

Like ``nginx_helpers.Nginx``: its own config and log under a temp dir, run in the
foreground (``-d``) as a child that dies with the test process, stopped by its pid;
the port is picked by binding port 0, and start-up is retried on a new port when
another process took it in between. ``requests()`` reads the proxy's log: one line
per request it took ("GET http://host:port/path" or "CONNECT host:port").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from nginx_helpers import ServerProcess, _die_with_parent, _free_port, wait_listening

TINYPROXY = shutil.which("tinyproxy") or ("/usr/bin/tinyproxy"
                                          if os.path.exists("/usr/bin/tinyproxy") else None)

# tinyproxy 1.11 logs each request at level Info as:
#   CONNECT   Dec 02 16:29:05.202 [15260]: Request (file descriptor 6): GET http://h:p/x HTTP/1.1
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+ \S+)")


class Tinyproxy(ServerProcess):
    """``Tinyproxy(workdir)``: a proxy at ``self.url``; ``stop()`` ends it. ``extra``
    is more configuration (``ConnectPort 443`` to refuse other tunnels)."""

    def __init__(self, workdir: str, extra: str = "") -> None:
        if TINYPROXY is None:
            raise RuntimeError("tinyproxy is not installed (Debian: tinyproxy-bin)")
        self.dir = os.path.join(workdir, "tinyproxy")
        os.makedirs(self.dir, exist_ok=True)
        self.log = os.path.join(self.dir, "tinyproxy.log")
        self.proc: subprocess.Popen | None = None
        last = ""
        for _ in range(10):
            self.port = _free_port()
            conf = os.path.join(self.dir, "tinyproxy.conf")
            with open(conf, "w") as f:
                f.write(f'Port {self.port}\nListen 127.0.0.1\nTimeout 60\n'
                        f'LogFile "{self.log}"\nLogLevel Info\nMaxClients 64\n'
                        f'Allow 127.0.0.1\n{extra}\n')
            err = open(os.path.join(self.dir, "stderr"), "w+b")
            self.proc = subprocess.Popen([TINYPROXY, "-d", "-c", conf],
                                         stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         preexec_fn=_die_with_parent)
            if wait_listening(self.proc, self.port):
                return
            self.proc.kill()
            self.proc.wait()
            err.seek(0)
            last = err.read().decode(errors="replace") + self._log_text()
            if "in use" not in last:
                break
        raise RuntimeError(f"tinyproxy did not start: {last.strip()[-500:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _log_text(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def requests(self) -> list[str]:
        """The requests the proxy took so far, in order: "GET http://..." lines and
        "CONNECT host:port" lines."""
        return _REQUEST.findall(self._log_text())
