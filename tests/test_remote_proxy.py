"""http_proxy / https_proxy / no_proxy for http(s):// sources (remote/http.py), as curl
and qemu-img's curl driver take them, with a real proxy (Debian's tinyproxy) in front
of the test nginx: a conversion through the proxy equals the direct one, and the
proxy's own log shows it carried the requests (absolute-form GETs for http://, a
CONNECT tunnel for https://).
"""

from __future__ import annotations

import random

import pytest

from conftest import cli, need, one_line_error, run
from nginx_helpers import NGINX, Nginx
from proxy_helpers import TINYPROXY, Tinyproxy

import diskforge

MiB = 1 << 20
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY",
              "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """nginx over http and over https (a self-signed certificate, trusted through
    SSL_CERT_FILE in the tests), both serving a qcow2 that qemu-img made, and a
    tinyproxy: (http url, https url, certificate, proxy)."""
    if NGINX is None:
        pytest.skip("nginx is not installed (.ci/install-tools installs nginx-light)")
    if TINYPROXY is None:
        pytest.skip("tinyproxy is not installed (.ci/install-tools installs"
                    " tinyproxy-bin)")
    need("qemu-img")
    need("openssl")
    work = tmp_path_factory.mktemp("proxy")
    root = work / "www"
    root.mkdir()
    raw = str(work / "d.raw")
    rng = random.Random(3)
    with open(raw, "wb") as f:
        f.truncate(24 * MiB)
        for off in (0, 5 * MiB, 11 * MiB + 4096, 24 * MiB - 70000):
            f.seek(off)
            f.write(rng.randbytes(min(2 * MiB, 24 * MiB - off)))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, str(root / "d.qcow2"))
    cert, key = str(work / "cert.pem"), str(work / "key.pem")
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
        "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1")
    plain = Nginx(str(root), str(work / "n1"))
    tls = Nginx(str(root), str(work / "n2"), tls=(cert, key))
    proxy = Tinyproxy(str(work))
    try:
        yield plain.url, tls.url, cert, proxy
    finally:
        proxy.stop()
        tls.stop()
        plain.stop()


@pytest.fixture
def env(monkeypatch):
    """No proxy settings but the test's own."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _convert(url: str, out) -> bytes:
    code, _, err = cli("convert", "-O", "qcow2", url, str(out))
    assert code == 0, err
    return out.read_bytes()


def test_http_through_the_proxy_equals_direct(servers, env, tmp_path):
    http_url, _, _, proxy = servers
    direct = _convert(f"{http_url}/d.qcow2", tmp_path / "direct.qcow2")
    before = len(proxy.requests())
    env.setenv("http_proxy", proxy.url)
    env.setenv("https_proxy", "http://127.0.0.1:9")  # not used for http:// URLs
    assert _convert(f"{http_url}/d.qcow2", tmp_path / "proxied.qcow2") == direct
    took = proxy.requests()[before:]
    assert took and set(took) == {f"GET {http_url}/d.qcow2"}  # absolute form


def test_https_through_a_connect_tunnel_equals_direct(servers, env, tmp_path):
    _, https_url, cert, proxy = servers
    env.setenv("SSL_CERT_FILE", cert)
    direct = _convert(f"{https_url}/d.qcow2", tmp_path / "direct.qcow2")
    before = len(proxy.requests())
    env.setenv("HTTPS_PROXY", proxy.url.removeprefix("http://"))  # no scheme: http
    assert _convert(f"{https_url}/d.qcow2", tmp_path / "proxied.qcow2") == direct
    took = proxy.requests()[before:]
    host_port = https_url.removeprefix("https://")
    assert took and set(took) == {f"CONNECT {host_port}"}   # TLS stays end to end


def test_no_proxy_goes_direct(servers, env, tmp_path):
    http_url, _, _, proxy = servers
    before = len(proxy.requests())
    env.setenv("http_proxy", proxy.url)
    for value in ("127.0.0.1", "*", "localhost,127.0.0.1:" + http_url.rsplit(":", 1)[1]):
        env.setenv("no_proxy", value)
        with diskforge.open(f"{http_url}/d.qcow2") as dev:
            assert dev.format == "qcow2"
    assert proxy.requests()[before:] == []


def test_proxy_credentials_and_refusals(servers, env, tmp_path):
    """A proxy that asks for credentials: given in the proxy URL they are sent
    (Proxy-Authorization), missing they are one error, for a GET (407 answer) and
    for a tunnel (CONNECT refused), neither retried as if transient."""
    http_url, https_url, cert, _ = servers
    env.setenv("SSL_CERT_FILE", cert)
    with Tinyproxy(str(tmp_path), extra="BasicAuth diskforge s3cret") as proxy:
        env.setenv("http_proxy", f"http://diskforge:s3cret@127.0.0.1:{proxy.port}")
        env.setenv("https_proxy", f"http://diskforge:s3cret@127.0.0.1:{proxy.port}")
        with diskforge.open(f"{http_url}/d.qcow2") as dev:
            assert dev.format == "qcow2"
        with diskforge.open(f"{https_url}/d.qcow2") as dev:
            assert dev.format == "qcow2"
        env.setenv("http_proxy", proxy.url)
        env.setenv("https_proxy", proxy.url)
        before = len(proxy.requests())
        code, _, err = cli("info", f"{http_url}/d.qcow2")
        one_line_error(code, err)
        assert "407" in err and "s3cret" not in err
        code, _, err = cli("info", f"{https_url}/d.qcow2")
        one_line_error(code, err)
        assert "refused the tunnel (407" in err
        assert len(proxy.requests()[before:]) == 2   # one try each


def test_unsupported_proxy_schemes_are_one_line(servers, env):
    http_url, _, _, _ = servers
    env.setenv("http_proxy", "socks5://127.0.0.1:1080")
    code, _, err = cli("info", f"{http_url}/d.qcow2")
    one_line_error(code, err)
    assert "not supported yet: socks5 proxies" in err
