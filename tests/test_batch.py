"""``diskforge batch``: job lists run locally and on a real Dask cluster (a
``LocalCluster`` started here), outputs checked by qemu-img, reports per job, re-runs
that skip finished work, retries after a real transient fault, and a worker killed
mid-batch."""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import cli, need, one_line_error, run

MiB = 1 << 20


def qemu_same(a: str, b: str) -> None:
    proc = run("qemu-img", "compare", a, b, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def images(tmp_path):
    """A qcow2 with random data (so conversions take a moment) and a VHD of it."""
    need("qemu-img")
    src = tmp_path / "src"
    src.mkdir()
    raw = str(src / "disk.raw")
    with open(raw, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(4 * MiB)
        f.write(os.urandom(4 * MiB))
    run("qemu-img", "convert", "-O", "qcow2", raw, str(src / "disk.qcow2"))
    run("qemu-img", "convert", "-O", "vpc", raw, str(src / "disk.vhd"))
    os.unlink(raw)
    return src


def write_csv(path, rows: list[dict]) -> str:
    keys = ["id", "op", "source", "target", "format", "options", "to", "args"]  # not "local"
    with open(path, "w") as f:
        f.write(",".join(keys) + "\n")
        for row in rows:
            f.write(",".join(str(row.get(k, "")) for k in keys) + "\n")
    return str(path)


def reports(report_dir) -> dict[str, dict]:
    out = {}
    for p in glob.glob(os.path.join(report_dir, "*.json")):
        with open(p) as f:
            r = json.load(f)
        out[r["id"]] = r
    return out


def test_local_batch_reports_verifies_and_skips_on_rerun(tmp_path, images):
    out = tmp_path / "out"
    out.mkdir()
    jobs = write_csv(tmp_path / "jobs.csv", [
        {"id": "raw", "op": "convert", "source": images / "disk.qcow2",
         "target": out / "disk.raw", "format": "raw"},
        {"id": "stream", "op": "convert", "source": images / "disk.vhd",
         "target": out / "disk.vmdk", "format": "vmdk",
         "options": "subformat=streamOptimized"},
        {"id": "azure", "op": "export", "source": images / "disk.qcow2",
         "target": out / "azure.vhd", "to": "azure"},
        {"id": "img", "op": "image", "source": images / "disk.qcow2",
         "target": out / "backup.qcow2"},
        {"id": "check", "op": "verify", "source": images / "disk.vhd"},
    ])
    code, stdout, err = cli("batch", jobs, "-j", "2")
    assert code == 0, err
    assert "5 jobs: 5 done" in stdout
    got = reports(tmp_path / "jobs.reports")
    assert set(got) == {"raw", "stream", "azure", "img", "check", "summary"}
    for name, target in (("raw", "disk.raw"), ("stream", "disk.vmdk"),
                         ("img", "backup.qcow2")):
        qemu_same(str(images / "disk.qcow2"), str(out / target))
        r = got[name]
        assert r["status"] == "done" and r["verified"] and r["attempts"] == 1
        assert r["bytes"] == os.path.getsize(out / target)
        assert len(r["digests"]["sha256"]) == 64
    assert got["azure"]["status"] == "done" and got["azure"]["verified"]  # export --check
    # a re-run does nothing but the verify job (which proves something each time)...
    code, stdout, err = cli("batch", jobs, "--output", "json")
    assert code == 0, err
    lines = [json.loads(line) for line in stdout.splitlines()]
    status = {r["id"]: r["status"] for r in lines[:-1]}
    assert status == {"raw": "skipped", "stream": "skipped", "azure": "skipped",
                      "img": "skipped", "check": "done"}
    assert lines[-1]["summary"]["skipped"] == 4
    # ...until an output changes: that job runs again
    with open(out / "disk.raw", "r+b") as f:
        f.write(b"changed")
    code, stdout, err = cli("batch", jobs, "--output", "json")
    assert code == 0, err
    status = {r["id"]: r["status"] for r in map(json.loads, stdout.splitlines()[:-1])}
    assert status["raw"] == "done" and status["stream"] == "skipped"
    qemu_same(str(images / "disk.qcow2"), str(out / "disk.raw"))


def test_failures_are_reported_not_retried_and_leave_no_output(tmp_path, images):
    out = tmp_path / "out"
    out.mkdir()
    bad = tmp_path / "bad.qcow2"
    with open(images / "disk.qcow2", "rb") as f:
        bad.write_bytes(f.read(512))  # a header whose tables are cut off
    jobs = write_csv(tmp_path / "jobs.csv", [
        {"id": "good", "source": images / "disk.qcow2", "target": out / "a.raw",
         "format": "raw"},
        {"id": "missing", "source": tmp_path / "nothere.qcow2", "target": out / "b.raw",
         "format": "raw"},
        {"id": "corrupt", "source": bad, "target": out / "c.raw", "format": "raw"},
    ])
    code, _, err = cli("batch", jobs)
    assert code == 2
    got = reports(tmp_path / "jobs.reports")
    assert got["good"]["status"] == "done"
    for name in ("missing", "corrupt"):
        assert got[name]["status"] == "failed" and got[name]["attempts"] == 1
        assert f"job {name}: " in err
    assert "No such file or directory" in got["missing"]["error"]
    assert sorted(os.listdir(out)) == ["a.raw"]
    assert got["summary"]["failed_ids"] == ["missing", "corrupt"]


def test_bad_job_lists_are_one_line(tmp_path):
    cases = {
        "unknown.csv": "op,source,target,colour\nconvert,a,b,red\n",
        "noop.csv": "op,source,target\nshred,a,b\n",
        "notarget.csv": "op,source\nconvert,a\n",
        "twice.csv": "op,source,target\nconvert,a,x.raw\nconvert,b,x.raw\n",
        "noto.csv": "op,source,target\nexport,a,b.vhd\n",
        "bad.yaml": "jobs: [unclosed\n",
        "scalar.yaml": "just a string\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        code, _, err = cli("batch", str(tmp_path / name))
        one_line_error(code, err)
        assert name in err


def test_a_transient_fault_is_retried(tmp_path, images):
    """The source is an NBD export whose first connection is dropped (the fault, from
    a listener here); the retry reaches qemu-nbd, started on the same socket."""
    need("qemu-nbd")
    sock = str(tmp_path / "nbd.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock)
    listener.listen(1)
    server: list[subprocess.Popen] = []

    def drop_then_serve():
        conn, _ = listener.accept()
        conn.close()  # the fault: the connection drops before the greeting
        listener.close()
        os.unlink(sock)
        server.append(subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow2", "-k", sock,
                                        str(images / "disk.qcow2")],
                                       stderr=subprocess.DEVNULL))
    t = threading.Thread(target=drop_then_serve, daemon=True)
    t.start()
    (tmp_path / "jobs.yaml").write_text(json.dumps({"jobs": [
        {"id": "nbd", "source": f"nbd+unix:///?socket={sock}",
         "target": str(tmp_path / "out.raw"), "format": "raw"}]}))
    try:
        code, _, err = cli("batch", str(tmp_path / "jobs.yaml"), "--retries", "5")
    finally:
        t.join(30)
        for proc in server:
            proc.terminate()
            proc.wait(10)
    assert code == 0, err
    r = reports(tmp_path / "jobs.reports")["nbd"]
    assert r["status"] == "done" and r["attempts"] >= 2
    qemu_same(str(images / "disk.qcow2"), str(tmp_path / "out.raw"))


@pytest.fixture
def s3_env(monkeypatch, tmp_path):
    """moto's S3 server on loopback (the test extra), a bucket, and the environment
    diskforge reads, set before the cluster starts so its workers inherit it."""
    boto3 = pytest.importorskip("boto3", reason="boto3 (the s3 extra, in the test extra)")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (the test extra)")
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_CONFIG_FILE", os.devnull),
                        ("AWS_SHARED_CREDENTIALS_FILE", os.devnull),
                        ("DISKFORGE_S3_ENDPOINT", endpoint)):
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="fleet")
    yield client
    srv.stop()


def test_dask_cluster_survives_a_killed_worker(tmp_path, images, s3_env, monkeypatch):
    """Ten jobs mixing formats, S3 sources and S3 targets on a LocalCluster of two
    worker processes; one worker is killed while it runs a job. Every job still ends
    done, once, with its output verified (and read back by qemu-img), no temporary
    file is left (beside the outputs or in the workers' temporary directory), and no
    multipart upload is left pending."""
    distributed = pytest.importorskip("distributed")
    scratch = tmp_path / "tmp"  # the workers' TMPDIR, so what they leave is seen here
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    out = tmp_path / "out"
    out.mkdir()
    for name in ("disk.qcow2", "disk.vhd"):
        s3_env.upload_file(str(images / name), "fleet", f"in/{name}")
    rows = []
    for n in range(10):
        name = "disk.qcow2" if n % 2 else "disk.vhd"
        src = f"s3://fleet/in/{name}" if n % 3 == 0 else images / name
        fmt, opts = [("vmdk", "subformat=streamOptimized"), ("qcow2", "compression_type=zlib"),
                     ("vpc", ""), ("raw", ""), ("vdi", "")][n % 5]
        target = f"s3://fleet/out/d{n}.{fmt}" if n % 3 == 1 else out / f"d{n}.{fmt}"
        rows.append({"id": f"job{n}", "source": src, "target": target, "format": fmt,
                     "options": opts, "args": "-c" if fmt == "qcow2" else "",
                     "local": images / name})
    jobs = write_csv(tmp_path / "jobs.csv", rows)
    import dask
    with dask.config.set({"temporary-directory": str(scratch)}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                     dashboard_address=None, worker_dashboard_address=None,
                                     silence_logs=50) as cluster, \
            distributed.Client(cluster) as client:
        killed: list[str] = []

        def kill_one_busy_worker():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                busy = [w for w, keys in client.processing().items() if keys]
                if busy:
                    time.sleep(0.5)  # well inside its job: each takes seconds
                    pids = client.run(os.getpid, workers=[busy[0]])
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    killed.append(busy[0])
                    return
                time.sleep(0.05)
        t = threading.Thread(target=kill_one_busy_worker, daemon=True)
        t.start()
        code, stdout, err = cli("batch", jobs, "--scheduler", cluster.scheduler_address,
                                "--output", "json")
        t.join(30)
    assert killed, "no worker was ever busy"
    assert code == 0, err
    lines = [json.loads(line) for line in stdout.splitlines()]
    ids = [r["id"] for r in lines[:-1]]
    assert sorted(ids) == sorted(f"job{n}" for n in range(10))  # each once
    assert all(r["status"] == "done" and r["verified"] for r in lines[:-1])
    for row in rows:
        target = str(row["target"])
        if target.startswith("s3://"):
            key = target.split("/", 3)[3]
            target = str(tmp_path / key.replace("/", "_"))
            s3_env.download_file("fleet", key, target)
        qemu_same(str(row["local"]), target)
    assert not [p for p in os.listdir(out) if "diskforge-tmp" in p or p.startswith(".")]
    assert not glob.glob(str(scratch / "**" / "diskforge*"), recursive=True)
    assert not s3_env.list_multipart_uploads(Bucket="fleet").get("Uploads")
