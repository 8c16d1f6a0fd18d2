"""The places of issue 18 that took only local files: ``export --check TARGET URL``
and ``verify URL`` (its integrity record found beside the image), against real
servers started here: Debian's nginx on loopback, and moto's S3 server (the
``s3`` fixture of test_remote_s3). A remote file must be judged as its local copy
is: the same rule lines, the same exit status.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import cli, need, one_line_error, run
from export_helpers import MiB, source_disk
from nginx_helpers import NGINX, Nginx
from test_remote_s3 import put, s3, server  # noqa: F401 - fixtures used by name


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """nginx serving a temp dir, with an access log of the bytes each request sent:
    (root, base url, log path)."""
    if NGINX is None:
        pytest.skip("nginx is not installed (.ci/install-tools installs nginx-light)")
    root = tmp_path_factory.mktemp("www")
    work = tmp_path_factory.mktemp("nginx")
    log = str(work / "access.log")
    srv = Nginx(str(root), str(work), extra=f"access_log {log} sent;",
                http_extra="log_format sent '$request_uri $status $body_bytes_sent';")
    try:
        yield str(root), srv.url, log
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """What the targets take, written by diskforge's exports, and a VHD Azure refuses
    (qemu-img's fixed VHD of a size that is not a whole MiB)."""
    need("qemu-img")
    d = tmp_path_factory.mktemp("exports")
    src = source_disk(str(d / "disk.raw"))
    made = {}
    for target, name in (("azure", "azure.vhd"), ("gcp", "gcp.tar.gz"),
                         ("aws", "aws.ova"), ("aws", "aws.vmdk"), ("hyperv", "hv.vhdx")):
        out = str(d / name)
        code, _, err = cli("export", "--to", target, src, out)
        assert code == 0, err
        made[name] = (target, out)
    odd = str(d / "odd.vhd")
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on",
        odd, str(30 * MiB + 3 * 512))
    made["odd.vhd"] = ("azure", odd)
    dyn = str(d / "dyn.vhd")
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", src, dyn)
    made["dyn.vhd"] = ("azure", dyn)
    return made


def _rules(code_out) -> tuple[int, list[str]]:
    """(exit status, the rule lines without their ``NAME:`` prefix)."""
    code, out, _ = code_out
    return code, [line.split(": ", 1)[1] for line in out.splitlines()]


GOOD = ["azure.vhd", "gcp.tar.gz", "aws.ova", "aws.vmdk", "hv.vhdx"]
BAD = ["odd.vhd", "dyn.vhd"]


@pytest.mark.parametrize("name", GOOD + BAD)
def test_export_check_over_http_equals_the_local_check(site, exports, name):
    root, url, _ = site
    target, local = exports[name]
    shutil.copy(local, os.path.join(root, name))
    here = _rules(cli("export", "--check", target, local))
    there = _rules(cli("export", "--check", target, f"{url}/{name}"))
    assert there == here
    if name in GOOD:
        assert here == (0, ["azure would accept it".replace("azure", target)])
    else:
        assert here[0] == 2 and here[1]


@pytest.mark.parametrize("name", ["azure.vhd", "gcp.tar.gz", "aws.ova", "odd.vhd"])
def test_export_check_in_s3_equals_the_local_check(s3, exports, name):  # noqa: F811
    target, local = exports[name]
    url = put(s3, f"exports/{name}", local)
    assert _rules(cli("export", "--check", target, url)) == \
        _rules(cli("export", "--check", target, local))


def test_export_check_reads_ranges_not_the_whole_file(site, exports):
    """The Azure rules read a VHD's probe window and footer, not its 30 MiB: nginx's
    own log of the bytes it sent says so."""
    root, url, log = site
    target, local = exports["azure.vhd"]
    shutil.copy(local, os.path.join(root, "counted.vhd"))
    assert cli("export", "--check", target, f"{url}/counted.vhd")[0] == 0
    with open(log) as f:
        sent = [int(line.split()[2]) for line in f if line.startswith("/counted.vhd ")]
    assert sent and sum(sent) <= 4 * 64 << 10   # four 64 KiB ranges at most
    assert os.path.getsize(local) > 30 * MiB


def test_export_check_of_a_missing_url_is_one_line(site):
    _, url, _ = site
    code, _, err = cli("export", "--check", "azure", f"{url}/nothing.vhd")
    one_line_error(code, err)
    assert "No such file" in err


def test_export_check_of_a_remote_domain_xml_is_not_supported_yet(site, tmp_path):
    root, url, _ = site
    with open(os.path.join(root, "dom.xml"), "w") as f:
        f.write("<domain type='kvm'><name>x</name></domain>\n")
    code, _, err = cli("export", "--check", "libvirt", f"{url}/dom.xml")
    one_line_error(code, err)
    assert "not supported yet: export --check of a remote domain XML" in err
