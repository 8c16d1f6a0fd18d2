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
import test_remote_s3
from test_remote_s3 import put

server, s3 = test_remote_s3.server, test_remote_s3.s3   # moto's S3 server, a fresh bucket


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
def test_export_check_in_s3_equals_the_local_check(s3, exports, name):
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


# -- verify URL: the integrity record beside a remote image --------------------------

def _tamper(record: str, out: str) -> str:
    """The record with its first chunk's digest changed (still a valid record)."""
    with open(record) as f:
        d = json.load(f)
    d["chunks"][0] = "0" * 64
    with open(out, "w") as f:
        json.dump(d, f)
    return out


@pytest.fixture(scope="module")
def imaged(tmp_path_factory):
    """A qcow2 image made by ``diskforge image``, with its integrity record."""
    d = tmp_path_factory.mktemp("imaged")
    src = source_disk(str(d / "disk.raw"), 6 * MiB)
    out = str(d / "d.qcow2")
    code, _, err = cli("image", "-q", src, out)
    assert code == 0, err
    assert os.path.exists(out + ".integrity.json")
    return src, out


def test_verify_over_http_finds_the_record_beside_the_image(site, imaged, tmp_path):
    root, url, _ = site
    _, image = imaged
    shutil.copy(image, os.path.join(root, "v.qcow2"))
    shutil.copy(image + ".integrity.json", os.path.join(root, "v.qcow2.integrity.json"))
    code, out, err = cli("verify", f"{url}/v.qcow2")
    assert code == 0, err
    assert out == f"{url}/v.qcow2: verify passed (integrity record v.qcow2.integrity.json)\n"
    # a record whose digest does not match: the image is corrupt (exit 2)
    _tamper(image + ".integrity.json", os.path.join(root, "v.qcow2.integrity.json"))
    code, out, _ = cli("verify", f"{url}/v.qcow2")
    assert code == 2
    assert "differ from what was imaged (chunk 0)" in out
    # --record names another URL (or file): used instead of the one beside the image
    shutil.copy(image + ".integrity.json", os.path.join(root, "other.json"))
    assert cli("verify", "--record", f"{url}/other.json", f"{url}/v.qcow2")[0] == 0
    code, _, err = cli("verify", "--record", f"{url}/none.json", f"{url}/v.qcow2")
    one_line_error(code, err)
    assert code == 1 and "No such file" in err


def test_verify_over_http_without_a_record_is_as_local(site, imaged, tmp_path):
    """No record beside it: qcow2 carries no checksums, so nothing to verify (exit 1),
    the same line as for the local file but for the name."""
    root, url, _ = site
    _, image = imaged
    shutil.copy(image, os.path.join(root, "bare.qcow2"))
    local = shutil.copy(image, str(tmp_path / "bare.qcow2"))
    code, _, err = cli("verify", f"{url}/bare.qcow2")
    one_line_error(code, err)
    assert code == 1 and "nothing to verify" in err
    code_local, _, err_local = cli("verify", local)
    assert code_local == 1
    assert err.replace(f"{url}/bare.qcow2", "X") == err_local.replace(local, "X")


def test_image_to_s3_writes_its_record_and_verify_reads_it(s3, imaged, tmp_path):
    src, local = imaged
    url = f"s3://{s3.bucket}/img/d.qcow2"
    code, out, err = cli("image", src, url)
    assert code == 0, err
    assert f"integrity record: {url}.integrity.json" in out
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3.bucket)["Contents"]) \
        == ["img/d.qcow2", "img/d.qcow2.integrity.json"]
    code, out, err = cli("verify", url)
    assert (code, out) == (0, f"{url}: verify passed (integrity record"
                              " d.qcow2.integrity.json)\n"), err
    bad = _tamper(local + ".integrity.json", str(tmp_path / "bad.json"))
    put(s3, "img/d.qcow2.integrity.json", bad)
    code, out, _ = cli("verify", url)
    assert code == 2 and "the image is corrupt" in out
    # an object with no record beside it: nothing to verify, as locally
    put(s3, "img/lone.qcow2", local)
    code, _, err = cli("verify", f"s3://{s3.bucket}/img/lone.qcow2")
    one_line_error(code, err)
    assert "nothing to verify" in err


def test_a_batch_proves_its_s3_outputs_in_place(s3, imaged, tmp_path):
    """A batch's export and image jobs to S3 are proven by ``export --check`` and
    ``verify`` of the objects themselves (both refused URLs before)."""
    src, _ = imaged
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("id,op,source,target,to\n"
                    f"azure,export,{src},s3://{s3.bucket}/out/a.vhd,azure\n"
                    f"img,image,{src},s3://{s3.bucket}/out/b.qcow2,\n")
    code, out, err = cli("batch", str(jobs), "-j", "1")
    assert code == 0, err + out
    assert "2 jobs: 2 done" in out
    for name in ("azure", "img"):
        with open(tmp_path / "jobs.reports" / f"{name}.json") as f:
            report = json.load(f)
        assert report["status"] == "done" and report["verified"], report
