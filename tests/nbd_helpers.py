"""Real NBD servers for the NBD client's tests: qemu-nbd and nbdkit started by the
test on a Unix socket (or a loopback TCP port) in its temp dir, stopped and reaped when
it ends; and X.509 credentials made with ``openssl`` for the TLS tests, in the
directory layout qemu and libnbd use (``ca-cert.pem``, ``server-cert.pem``,
``server-key.pem``, ``client-cert.pem``, ``client-key.pem``).

Readiness is a connection accepted on the socket (or TCP port), polled, never a
fixed sleep. (qemu-nbd runs with ``-t``, so that probe does not end it.)"""

from __future__ import annotations

import os
import socket
import subprocess
import time

from conftest import need, run


class Server:
    """A server process started by a test, stopped (and reaped) when it ends."""

    def __init__(self, argv: list[str], ready) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{argv[0]} exited: {self.proc.stderr.read()!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{argv[0]} did not start within 30 s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


class Servers:
    """The servers one test started: ``start(argv, ready)``; all stopped at exit."""

    def __init__(self) -> None:
        self.started: list[Server] = []

    def __call__(self, argv: list[str], ready) -> Server:
        server = Server(argv, ready)
        self.started.append(server)
        return server

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc) -> None:
        for server in self.started:
            server.stop()


def listening(sock_path: str):
    """Ready when a connection is accepted: the socket file appears at bind(), a
    moment before listen(), and a client in between is refused."""
    def ready() -> bool:
        if not os.path.exists(sock_path):
            return False
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            try:  # the greeting read, so the server sees a whole, finished client
                s.connect(sock_path)
                return len(s.recv(8, socket.MSG_WAITALL)) == 8
            except OSError:
                return False
    return ready


def qemu_nbd(servers, image: str, fmt: str, sock: str, *extra: str,
             writable: bool = False) -> str:
    need("qemu-nbd")
    servers(["qemu-nbd", *([] if writable else ["-r"]), "-t", "-f", fmt, "-k", sock,
             *extra, image], listening(sock))
    return f"nbd+unix:///?socket={sock}"


def nbdkit(servers, sock: str, *args: str, writable: bool = False) -> str:
    need("nbdkit")
    servers(["nbdkit", "-f", *([] if writable else ["-r"]), "-U", sock, *args],
            listening(sock))
    return f"nbd+unix:///?socket={sock}"


def tcp_server(servers, argv_for_port) -> int:
    """Start ``argv_for_port(port)`` on a free loopback port (another one when the
    port was taken in between); the port."""
    last = None
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

        def ready() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False
        try:
            servers(argv_for_port(port), ready)
            return port
        except AssertionError as e:  # exited: most likely the port was taken
            last = e
    raise AssertionError(f"no server started: {last}")


_EXTENSIONS = {
    "server": ("basicConstraints=critical,CA:FALSE\n"
               "keyUsage=critical,digitalSignature,keyEncipherment\n"
               "extendedKeyUsage=serverAuth\n"
               "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
    "client": ("basicConstraints=critical,CA:FALSE\n"
               "keyUsage=critical,digitalSignature,keyEncipherment\n"
               "extendedKeyUsage=clientAuth\n"),
}


def _key(path: str) -> None:
    run("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
        "ec_paramgen_curve:prime256v1", "-out", path)
    os.chmod(path, 0o600)


def make_ca(directory: str, name: str = "diskforge test CA") -> tuple[str, str]:
    """A self-signed CA in ``directory``: ``(ca-cert.pem, ca-key.pem)``."""
    need("openssl")
    os.makedirs(directory, exist_ok=True)
    cert, key = os.path.join(directory, "ca-cert.pem"), os.path.join(directory,
                                                                     "ca-key.pem")
    _key(key)
    run("openssl", "req", "-new", "-x509", "-key", key, "-out", cert, "-days", "2",
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def issue(ca: tuple[str, str], directory: str, role: str, name: str) -> None:
    """``ROLE-cert.pem`` and ``ROLE-key.pem`` (role: server or client) in
    ``directory``, signed by ``ca``, plus the CA's certificate as ``ca-cert.pem``."""
    os.makedirs(directory, exist_ok=True)
    key = os.path.join(directory, f"{role}-key.pem")
    csr = os.path.join(directory, f"{role}.csr")
    ext = os.path.join(directory, f"{role}.ext")
    with open(ext, "w") as f:
        f.write(_EXTENSIONS[role])
    _key(key)
    run("openssl", "req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={name}")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1],
        "-CAcreateserial", "-out", os.path.join(directory, f"{role}-cert.pem"),
        "-days", "2", "-extfile", ext)
    for leftover in (csr, ext):
        os.unlink(leftover)
    ca_copy = os.path.join(directory, "ca-cert.pem")
    if os.path.abspath(ca_copy) != os.path.abspath(ca[0]):
        with open(ca[0], "rb") as src, open(ca_copy, "wb") as dst:
            dst.write(src.read())


def make_credentials(base: str) -> dict[str, str]:
    """A CA, a server directory (for qemu-nbd and nbdkit) and a client directory (for
    diskforge and qemu-img) under ``base``; also a second CA's client directory
    (``wrong``) whose CA did not sign the server."""
    ca = make_ca(os.path.join(base, "ca"))
    dirs = {role: os.path.join(base, role) for role in ("server", "client", "wrong")}
    issue(ca, dirs["server"], "server", "localhost")
    issue(ca, dirs["client"], "client", "diskforge client")
    other = make_ca(os.path.join(base, "other-ca"), "some other CA")
    issue(ca, dirs["wrong"], "client", "diskforge client")  # a client cert they take
    with open(other[0], "rb") as src, \
            open(os.path.join(dirs["wrong"], "ca-cert.pem"), "wb") as dst:
        dst.write(src.read())                              # but the wrong CA to check
    return dirs
