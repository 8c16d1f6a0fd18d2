"""Debian's nginx on a loopback port, serving a temp dir: the real web server the
HTTP backend is tested (and benchmarked) against.

Each server gets its own prefix (config, pid, logs, temp dirs) under a temp dir, runs
in the foreground as a child (``daemon off; master_process off;``) and is stopped by
its pid. The port is picked by binding port 0 and then handed to nginx; another
process could take it in between, so start-up is retried on a new port when nginx
says the address is in use.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                  else None)

# locations every test server has, beside the plain root:
#   /norange/  the server ignores Range (max_ranges 0: 200 with the whole body)
#   /slow/     answers at 256 KiB/s per connection (limit_rate)
#   /drop/     closes the connection without answering (return 444)
#   /idle/     closes kept-alive connections after 1 s idle (keepalive_timeout)
#   /moved/    redirects (302) to the same name at the root
EXTRA_LOCATIONS = """
    location /moved/ { rewrite ^/moved/(.*)$ /$1 redirect; }
    location /norange/ { alias %(root)s/; max_ranges 0; }
    location /idle/ { alias %(root)s/; keepalive_timeout 1s; }
    location /slow/ { alias %(root)s/; limit_rate 256k; }
    location /drop/ { return 444; }
"""


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies, so a
    killed test run leaves no nginx behind (Linux's PR_SET_PDEATHSIG)."""
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 30.0) -> bool:
    """Whether ``proc`` came to accept connections on loopback ``port`` (False when it
    exited first, or after ``timeout`` seconds): polled, so no fixed sleep races it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class ServerProcess:
    """A server the tests started (``self.proc``), stopped at the end of a ``with``."""

    proc: "subprocess.Popen | None" = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Nginx(ServerProcess):
    """``Nginx(root, workdir)``: serving ``root`` at ``self.url``; ``stop()`` ends it."""

    def __init__(self, root: str, workdir: str, extra: str = "",
                 tls: "tuple[str, str] | None" = None, http_extra: str = "") -> None:
        if NGINX is None:
            raise RuntimeError("nginx is not installed (Debian: nginx-light)")
        self.root = os.path.abspath(root)
        self.prefix = os.path.join(workdir, "nginx")
        os.makedirs(os.path.join(self.prefix, "logs"), exist_ok=True)
        self.extra = extra            # inside the server block
        self.http_extra = http_extra  # inside the http block (a log_format)
        self.tls = tls  # (certificate, key): https only
        self.proc: subprocess.Popen | None = None
        last = ""
        for _ in range(10):
            self.port = _free_port()
            conf = self._write_conf()
            err = open(os.path.join(self.prefix, "logs", "stderr"), "w+b")
            self.proc = subprocess.Popen([NGINX, "-p", self.prefix, "-c", conf,
                                          "-e", os.path.join(self.prefix, "logs",
                                                             "error.log")],
                                         stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         preexec_fn=_die_with_parent)
            if self._wait_listening():
                return
            self.proc.kill()
            self.proc.wait()
            err.seek(0)
            last = err.read().decode(errors="replace")
            try:
                with open(os.path.join(self.prefix, "logs", "error.log")) as f:
                    last += f.read()
            except OSError:
                pass
            if "in use" not in last:
                break
        raise RuntimeError(f"nginx did not start: {last.strip()[-500:]}")

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _write_conf(self) -> str:
        temp = os.path.join(self.prefix, "tmp")
        os.makedirs(temp, exist_ok=True)
        conf = os.path.join(self.prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""
daemon off;
master_process off;
worker_processes 1;
pid {self.prefix}/nginx.pid;
error_log {self.prefix}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    {self.http_extra}
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{self.port}{" ssl" if self.tls else ""};
        {f"ssl_certificate {self.tls[0]}; ssl_certificate_key {self.tls[1]};"
         if self.tls else ""}
        root {self.root};
        {EXTRA_LOCATIONS % {"root": self.root}}
        {self.extra}
    }}
}}
""")
        return conf

    def _wait_listening(self) -> bool:
        return wait_listening(self.proc, self.port)
