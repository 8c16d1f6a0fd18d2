"""s3:// sources and targets, against a real S3-compatible server on loopback: moto's
standalone server (``moto[server]``, the test extra), started here, buckets made here.

Reads are checked bit for bit against the same conversion from a local file; outputs
are downloaded and checked by two readers (qemu-img, and diskforge's own s3 read).
Failed, interrupted and changed-underneath runs must leave no object and no pending
multipart upload.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FIXTURES, cli, make_sparse, need, one_line_error, run, sha256_file

boto3 = pytest.importorskip("boto3", reason="boto3 (the s3 extra, in the test extra)")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (the test extra)")

MiB = 1 << 20
PART = 5 * MiB  # S3's smallest part, so a test output of a few parts stays small


@pytest.fixture(scope="module")
def server():
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    yield f"http://{host}:{port}"
    srv.stop()


@pytest.fixture
def s3(server, monkeypatch, request):
    """A client on the server, a fresh bucket, and the environment diskforge reads."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("DISKFORGE_S3_ENDPOINT", server)
    client = boto3.client("s3", endpoint_url=server, region_name="us-east-1")
    bucket = "t-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:20]
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    client.endpoint = server
    return client


def put(s3, key: str, path: str) -> str:
    s3.upload_file(path, s3.bucket, key)
    return f"s3://{s3.bucket}/{key}"


def get(s3, key: str, path: str) -> str:
    s3.download_file(s3.bucket, key, path)
    return path


def keys(s3) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=s3.bucket).get("Contents", [])]


def pending_uploads(s3) -> list:
    return s3.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])


def source_raw(path: str, size: int = 6 * MiB) -> str:
    """A sparse disk with data at the start, across a block edge, and at the end."""
    rnd = hashlib.sha256(b"diskforge-s3").digest() * 2048  # 64 KiB, not zeros
    return make_sparse(path, size, [(0, rnd[:4096]), (MiB - 512, rnd[:70000]),
                                    (3 * MiB + 12345, rnd), (size - 4096, rnd[:4096])])


def qemu_made(tmp_path, fmt: str, *opts: str) -> str:
    need("qemu-img")
    raw = source_raw(str(tmp_path / "src.raw"))
    out = str(tmp_path / f"src.{fmt}")
    run("qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, raw, out)
    return out


# -- reading ---------------------------------------------------------------------------

SOURCES = {
    "raw": lambda t: source_raw(str(t / "src.raw")),
    "qcow2": lambda t: qemu_made(t, "qcow2", "-c"),
    "vmdk-stream": lambda t: qemu_made(t, "vmdk", "-o", "subformat=streamOptimized"),
    "vpc": lambda t: qemu_made(t, "vpc"),
    "dmg": lambda t: os.path.join(FIXTURES, "dmg", "keramics_hfsplus_zlib_UDZO.dmg"),
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_convert_from_s3_equals_the_local_conversion(s3, tmp_path, kind):
    src = SOURCES[kind](tmp_path)
    url = put(s3, f"images/{os.path.basename(src)}", src)
    local, remote = str(tmp_path / "local.raw"), str(tmp_path / "remote.raw")
    assert cli("convert", "-O", "raw", src, local)[0] == 0
    code, _, err = cli("convert", "-O", "raw", url, remote)
    assert code == 0, err
    assert sha256_file(remote) == sha256_file(local)
    code, out, err = cli("info", "--output", "json", url)
    assert code == 0 and f'"filename": "{url}"' in out, err


def test_ranged_reads_with_readahead_return_the_object(s3, tmp_path):
    """Small blocks so one read spans several, readahead runs ahead and the block cache
    evicts: every byte still comes back right, and sequential reads are cached."""
    from diskforge.remote.s3 import S3Backend
    data = hashlib.sha256(b"x").digest() * (300_000 // 32)
    path = tmp_path / "obj"
    path.write_bytes(data)
    url = put(s3, "obj", str(path))
    with S3Backend(url, block_size=16384, inflight=3) as b:
        assert b.size == len(data)
        got, pos = bytearray(), 0
        while pos < len(data):  # sequential, 10000-byte steps across block edges
            got += b.pread(pos, 10000)
            pos += 10000
        assert bytes(got) == data
        sequential = b.requests
        assert sequential == -(-len(data) // 16384)  # each block fetched once
        for off, n in [(299_000, 5000), (5, 70000), (16383, 2), (0, 1), (150_000, 40000)]:
            assert b.pread(off, n) == data[off:off + n]
        assert b.pread(len(data), 10) == b""
        assert b.pread(0, len(data)) == data  # one read over more blocks than are kept
        assert list(b.data_ranges(0, 1 << 40)) == [(0, len(data), True)]


def test_an_object_replaced_mid_read_is_one_clear_error(s3, tmp_path):
    from diskforge.errors import ImageIOError
    from diskforge.remote.s3 import S3Backend
    path = tmp_path / "obj"
    path.write_bytes(b"a" * 200_000)
    url = put(s3, "obj", str(path))
    with S3Backend(url, block_size=65536, inflight=1) as b:
        assert b.pread(0, 10) == b"a" * 10
        s3.put_object(Bucket=s3.bucket, Key="obj", Body=b"b" * 200_000)
        with pytest.raises(ImageIOError, match="changed while it was being read"):
            b.pread(150_000, 10)


def test_missing_objects_and_bad_names_are_one_line(s3, tmp_path):
    for name, words in [(f"s3://{s3.bucket}/nope.qcow2", "No such object"),
                        ("s3://no-such-bucket-here/x.qcow2", "no such bucket"),
                        (f"s3://{s3.bucket}", "s3://BUCKET/KEY")]:
        code, _, err = cli("info", name)
        one_line_error(code, err)
        assert words in err, err


def test_without_the_s3_extra_the_error_says_how_to_get_it(tmp_path):
    code = ("import sys; sys.modules['boto3'] = None;"
            "from diskforge.cli.main import main;"
            "sys.exit(main(['convert', 's3://bucket/disk.qcow2', 'out.raw']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    one_line_error(proc.returncode, proc.stderr)
    assert "s3:// needs the s3 extra: pip install 'diskforge[s3]'" in proc.stderr
    assert os.listdir(tmp_path) == []


# -- backing files ---------------------------------------------------------------------

def test_a_backing_file_resolves_only_under_the_image_prefix(s3, tmp_path):
    need("qemu-img")
    base = qemu_made(tmp_path, "qcow2")
    ov = str(tmp_path / "ov.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", ov)
    run("qemu-io", "-c", "write -P 0x5a 1M 64k", ov)
    put(s3, "vm/src.qcow2", base)
    url = put(s3, "vm/ov.qcow2", ov)
    local, remote = str(tmp_path / "local.raw"), str(tmp_path / "remote.raw")
    assert cli("convert", "-O", "raw", ov, local)[0] == 0
    code, _, err = cli("convert", "-O", "raw", url, remote)
    assert code == 0, err
    assert sha256_file(remote) == sha256_file(local)
    # the same overlay naming a way out of its prefix, or a local file, is refused
    for name in ("../src.qcow2", "/etc/passwd", f"s3://{s3.bucket}/src.qcow2",
                 "s3://other-bucket/vm/src.qcow2"):
        bad = str(tmp_path / "bad.qcow2")
        run("qemu-img", "create", "-f", "qcow2", "-u", "-b", name, "-F", "qcow2", bad, "6M")
        put(s3, "src.qcow2", base)
        url = put(s3, "vm/bad.qcow2", bad)
        code, _, err = cli("convert", "-O", "raw", url, str(tmp_path / "x.raw"))
        one_line_error(code, err)
        assert "may only name objects beside it" in err, err
    assert not os.path.exists(tmp_path / "x.raw")


# -- writing ---------------------------------------------------------------------------

TARGETS = {  # -O and options; how it is uploaded is in each formats/*.md note
    "raw": ("raw",),
    "qcow2": ("qcow2",),
    "vmdk": ("vmdk", "-o", "subformat=streamOptimized"),
    "vpc": ("vpc",),
    "vpc-fixed": ("vpc", "-o", "subformat=fixed"),
}


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_convert_to_s3_is_read_back_by_qemu_img_and_diskforge(s3, tmp_path, kind):
    need("qemu-img")
    src = qemu_made(tmp_path, "qcow2")
    fmt, *opts = TARGETS[kind]
    url = f"s3://{s3.bucket}/out/disk.{kind}"
    code, _, err = cli("convert", "-O", fmt, *opts, src, url)
    assert code == 0, err
    got = get(s3, f"out/disk.{kind}", str(tmp_path / "got"))
    assert run("qemu-img", "compare", "-f", "qcow2", "-F", fmt, src, got).returncode == 0
    code, out, err = cli("compare", src, url)
    assert code == 0, err + out
    assert pending_uploads(s3) == []


def test_outputs_larger_than_a_part_upload_in_parts(s3, tmp_path, monkeypatch):
    """A streamed raw and VMDK (the VMDK's header, in part 1, is written last) and a
    spooled qcow2, each over several 5 MiB parts."""
    need("qemu-img")
    monkeypatch.setenv("DISKFORGE_S3_PART_SIZE", str(PART))
    rnd = os.urandom(MiB)
    src = make_sparse(str(tmp_path / "big.raw"), 13 * MiB + 4096,
                      [(o * MiB, rnd) for o in range(0, 13, 2)] + [(13 * MiB, rnd[:4096])])
    for kind, fmt, opts in [("raw", "raw", ()), ("qcow2", "qcow2", ()),
                            ("vmdk", "vmdk", ("-o", "subformat=streamOptimized"))]:
        url = f"s3://{s3.bucket}/big.{kind}"
        code, _, err = cli("convert", "-O", fmt, *opts, src, url)
        assert code == 0, err
        head = s3.head_object(Bucket=s3.bucket, Key=f"big.{kind}")
        parts = int(head["ETag"].strip('"').rpartition("-")[2])  # multipart: "md5-N"
        assert parts >= 2, (kind, head["ETag"])
        got = get(s3, f"big.{kind}", str(tmp_path / f"got.{kind}"))
        run("qemu-img", "compare", "-f", "raw", "-F", fmt, src, got)
        assert cli("compare", src, url)[0] == 0
    assert pending_uploads(s3) == []


def test_a_failed_upload_leaves_no_object_and_keeps_the_old_one(s3, tmp_path,
                                                               monkeypatch):
    """The source fails midway (a compressed cluster at 20 MiB is corrupt) after parts
    were uploaded: the upload is aborted, and the object the key held before is still
    there, unchanged."""
    import struct
    need("qemu-img")
    monkeypatch.setenv("DISKFORGE_S3_PART_SIZE", str(PART))
    raw = str(tmp_path / "s.raw")
    with open(raw, "wb") as f:  # compressible, so every cluster is stored compressed
        for i in range(24):
            f.write(((b"block %08d " % i) * 70000)[:MiB])
    qcow = str(tmp_path / "s.qcow2")
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, qcow)
    with open(qcow, "r+b") as f:
        header = f.read(48)
        f.seek(struct.unpack(">Q", header[40:48])[0])            # L1
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 8 * 320)                                     # the cluster at 20 MiB
        entry = struct.unpack(">Q", f.read(8))[0]
        assert entry >> 62 == 1, "expected a compressed cluster"
        f.seek(entry & ((1 << 54) - 1))
        f.write(b"\xff" * 64)
    s3.put_object(Bucket=s3.bucket, Key="keep.raw", Body=b"old")
    for key in ("new.raw", "keep.raw", "new.qcow2"):
        code, _, err = cli("convert", "-O", key.rpartition(".")[2], qcow,
                           f"s3://{s3.bucket}/{key}")
        one_line_error(code, err)
    assert keys(s3) == ["keep.raw"]
    assert s3.get_object(Bucket=s3.bucket, Key="keep.raw")["Body"].read() == b"old"
    assert pending_uploads(s3) == []


def test_an_interrupted_upload_is_aborted(s3, tmp_path):
    """SIGTERM while parts are being uploaded (the copy rate-limited so the run is
    still going when the test sees its multipart upload)."""
    raw = make_sparse(str(tmp_path / "s.raw"), 40 * MiB,
                      [(o * MiB, os.urandom(4096)) for o in range(40)])
    env = dict(os.environ, DISKFORGE_S3_PART_SIZE=str(PART))
    proc = subprocess.Popen([sys.executable, "-m", "diskforge", "convert", "-r", "4M",
                             "-O", "raw", raw, f"s3://{s3.bucket}/int.raw"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not pending_uploads(s3):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no multipart upload started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "interrupted" in err, err
    assert keys(s3) == []
    assert pending_uploads(s3) == []


def test_dd_and_export_targets_upload(s3, tmp_path):
    """dd of=s3://..., and an export target's archive (GCP's tar.gz, streamed)."""
    import tarfile
    need("qemu-img")
    src = qemu_made(tmp_path, "qcow2")
    code, _, err = cli("dd", "-O", "raw", "bs=1M", "count=2", f"if={src}",
                       f"of=s3://{s3.bucket}/dd.raw")
    assert code == 0, err
    got = get(s3, "dd.raw", str(tmp_path / "dd.raw"))
    with open(got, "rb") as f, open(tmp_path / "src.raw", "rb") as g:
        assert f.read() == g.read(2 * MiB)
    code, _, err = cli("export", "--to", "gcp", src, f"s3://{s3.bucket}/image.tar.gz")
    assert code == 0, err
    got = get(s3, "image.tar.gz", str(tmp_path / "image.tar.gz"))
    with tarfile.open(got) as t:  # GCP's disk.raw: whole GiB, an oldgnu sparse member
        info = t.getmember("disk.raw")
        assert info.size == 1 << 30 and info.issparse()
        assert t.extractfile(info).read(6 * MiB) == open(tmp_path / "src.raw", "rb").read()


# -- presigned URLs --------------------------------------------------------------------

def test_presign_prints_a_url_that_reads_the_object(s3, tmp_path):
    import urllib.request
    src = source_raw(str(tmp_path / "p.raw"))
    url = put(s3, "p.raw", src)
    code, out, err = cli("presign", "--expires", "600", url)
    assert code == 0, err
    https = out.strip()
    assert "X-Amz-Signature=" in https and "X-Amz-Expires=600" in https
    with urllib.request.urlopen(https, timeout=60) as r:
        assert hashlib.sha256(r.read()).hexdigest() == sha256_file(src)


def test_a_presigned_url_converts_through_http(s3, tmp_path):
    try:
        import importlib
        importlib.import_module("diskforge.remote.http")  # the HTTP backend
    except ImportError:
        pytest.skip("diskforge.remote.http (the HTTP backend) is not merged yet")
    src = qemu_made(tmp_path, "qcow2")
    url = put(s3, "p.qcow2", src)
    https = s3.generate_presigned_url("get_object", Params={"Bucket": s3.bucket,
                                                            "Key": "p.qcow2"},
                                      ExpiresIn=600)
    local, remote = str(tmp_path / "local.raw"), str(tmp_path / "remote.raw")
    assert cli("convert", "-O", "raw", src, local)[0] == 0
    code, _, err = cli("convert", "-f", "qcow2", "-O", "raw", https, remote)
    assert code == 0, err
    assert sha256_file(remote) == sha256_file(local)
    assert url


def test_imaging_to_s3_goes_on_without_checkpoints(s3, tmp_path):
    """``image``'s checkpoints need a partial output that lasts: an upload has none, so
    the run goes on without them and leaves no resume record, only the image and its
    integrity record."""
    import diskforge
    from diskforge.ops.imaging import image
    from diskforge.registry import get
    src = source_raw(str(tmp_path / "d.raw"), 2 * MiB)
    url = f"s3://{s3.bucket}/img/d.qcow2"
    fmt = get("qcow2")
    with diskforge.open(src) as dev:
        writer = fmt.writer(url, dev.size, fmt.options.parse(""))
        result = image(dev, writer, url, fmt_name="qcow2", chunk=64 << 10,
                       checkpoint_every=256 << 10)
    assert sorted(keys(s3)) == ["img/d.qcow2", "img/d.qcow2.integrity.json"]
    assert result.sha256 == hashlib.sha256(open(src, "rb").read()).hexdigest()
    assert cli("compare", src, url)[0] == 0
    assert pending_uploads(s3) == []


def test_credentials_profile_and_endpoint_come_from_the_standard_places(s3, tmp_path,
                                                                        monkeypatch):
    """AWS_PROFILE with the config files, AWS_ENDPOINT_URL_S3, then --s3-endpoint; and
    with no credentials anywhere, one line saying where they are looked for."""
    src = make_sparse(str(tmp_path / "c.raw"), MiB, [(0, b"boot" * 128)])
    url = put(s3, "c.raw", src)
    config, creds = tmp_path / "config", tmp_path / "credentials"
    config.write_text("[profile df]\nregion = us-east-1\n")
    creds.write_text("[df]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "df")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("DISKFORGE_S3_ENDPOINT", "")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    code, out, err = cli("info", url)
    assert code == 0 and "virtual size: 1 MiB" in out, err
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    code, out, err = cli("--s3-endpoint", s3.endpoint, "info", url)
    assert code == 0 and "virtual size: 1 MiB" in out, err
    monkeypatch.delenv("AWS_PROFILE")
    code, _, err = cli("--s3-endpoint", s3.endpoint, "info", url)
    one_line_error(code, err)
    assert "no AWS credentials" in err


def test_a_server_that_goes_away_briefly_is_retried(s3, tmp_path):
    """The server stops (connections refused) and comes back on the same port a moment
    later, keeping its objects: the read in between succeeds through the retries."""
    import threading
    from diskforge.remote.s3 import S3Backend
    data = os.urandom(200_000)
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=s3.bucket, Key="r",
                                                          Body=data)
    again = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port,
                                           verbose=False)
    try:
        with S3Backend(f"s3://{s3.bucket}/r", block_size=65536, inflight=1,
                       endpoint_url=endpoint) as b:
            assert b.pread(0, 10) == data[:10]
            srv.stop()
            srv._server.server_close()  # stop() leaves the socket listening
            threading.Timer(0.3, again.start).start()
            assert b.pread(100_000, 50_000) == data[100_000:150_000]
    finally:
        deadline = time.monotonic() + 30
        while again._server is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if again._server is not None:
            again.stop()
            again._server.server_close()


def test_a_streamed_upload_takes_patches_to_its_first_part_only(s3, monkeypatch):
    """Headers patched at the end land in part 1 (sent last); a write further back,
    into a part already sent, fails and the upload is aborted, never corrupted."""
    from diskforge.atomic import AtomicFile
    from diskforge.errors import UnsupportedError
    monkeypatch.setenv("DISKFORGE_S3_PART_SIZE", str(PART))
    chunk = bytes(range(256)) * 4096  # 1 MiB
    out = AtomicFile(f"s3://{s3.bucket}/s.raw", stream=True)
    for i in range(12):
        out.pwrite(i * MiB, chunk)
    out.pwrite(0, b"HEADER")
    with pytest.raises(UnsupportedError, match="already uploaded"):
        out.pwrite(6 * MiB, b"late")
    out.discard()
    assert keys(s3) == [] and pending_uploads(s3) == []
    with AtomicFile(f"s3://{s3.bucket}/s.raw", stream=True) as out:
        for i in range(12):
            out.pwrite(i * MiB, chunk)
        out.pwrite(0, b"HEADER")
        out.truncate(13 * MiB)  # a zero tail, sent as zeros
        out.commit()
    body = s3.get_object(Bucket=s3.bucket, Key="s.raw")["Body"].read()
    assert body == b"HEADER" + (chunk * 12)[6:] + bytes(MiB)


def test_an_overlay_written_to_s3_names_its_base_beside_it(s3, tmp_path):
    """``convert -B base.qcow2 ... s3://b/dir/delta.qcow2``: the base is the object
    beside the new image, as qemu-img resolves a relative -B; only what differs is
    uploaded, and the chain reads back whole."""
    need("qemu-img")
    base = qemu_made(tmp_path, "qcow2")
    put(s3, "ch/base.qcow2", base)
    mod = str(tmp_path / "src.raw")  # qemu_made's raw, changed in one cluster
    with open(mod, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"changed!" * 512)
    url = f"s3://{s3.bucket}/ch/delta.qcow2"
    code, _, err = cli("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", mod, url)
    assert code == 0, err
    code, out, err = cli("info", url)
    assert "backing file: base.qcow2" in out, err
    assert cli("compare", mod, url)[0] == 0
    got = get(s3, "ch/delta.qcow2", str(tmp_path / "delta.qcow2"))
    assert os.path.getsize(got) < os.path.getsize(base)
