"""Untrusted mode (--untrusted, DISKFORGE_UNTRUSTED=1, OpenPolicy.untrusted()): files an
image names stay confined, raw and unnamed-format backing files are refused, and the
command runs under address-space and CPU limits that end in one line."""

import os
import resource
import subprocess
import sys
import time

import pytest
from conftest import cli, cli_process, need, one_line_error, run

import diskforge
from diskforge import limits, untrusted
from diskforge.errors import DiskforgeError, SafetyError
from diskforge.policy import UNTRUSTED_MAX_DEPTH, OpenPolicy, untrusted_from_environment

BASE = bytes(range(256)) * 256  # 64 KiB that is neither zeros nor a known header


def untrusted_env(**extra) -> dict:
    return {**os.environ, "DISKFORGE_UNTRUSTED": "1", **extra}


@pytest.fixture
def upload(tmp_path):
    """An upload directory: base.raw, top.qcow2 naming it as raw, nofmt.qcow2 naming it
    without a format, q.qcow2 over a qcow2 base, out.qcow2 naming a file outside."""
    need("qemu-img")
    d = tmp_path / "upload"
    d.mkdir()
    (d / "base.raw").write_bytes(BASE + bytes((1 << 20) - len(BASE)))
    (tmp_path / "secret.raw").write_bytes(b"secret" * 1000)
    q = lambda *a: run("qemu-img", "create", "-q", "-f", "qcow2", *a, timeout=30)  # noqa
    q("-b", "base.raw", "-F", "raw", str(d / "top.qcow2"), "1M")
    q(str(d / "base.qcow2"), "1M")
    q("-b", "base.qcow2", "-F", "qcow2", str(d / "q.qcow2"), "1M")
    q("-u", "-b", "../secret.raw", "-F", "raw", str(d / "out.qcow2"), "1M")
    # qemu-img no longer writes a backing file without its format: make one by renaming
    # the "backing file format name" extension to an unknown one, which readers skip
    data = bytearray((d / "top.qcow2").read_bytes())
    at = data.index(b"\xe2\x79\x2a\xca", 0, 4096)
    data[at:at + 4] = b"\x0e\x0e\x0e\x0e"
    (d / "nofmt.qcow2").write_bytes(bytes(data))
    return d


def test_default_mode_reads_a_raw_backing_file_inside_the_directory(upload, tmp_path):
    out = str(tmp_path / "flat.raw")
    assert cli("convert", "-O", "raw", str(upload / "top.qcow2"), out)[0] == 0
    with open(out, "rb") as f:
        assert f.read(len(BASE)) == BASE
    assert cli("info", str(upload / "nofmt.qcow2"))[0] == 0  # probed, as today
    with diskforge.open(upload / "top.qcow2") as dev:
        assert dev.read(0, len(BASE)) == BASE


@pytest.mark.parametrize("name,expect", [
    ("top.qcow2", "backing file 'base.raw' is raw; untrusted mode refuses raw backing"),
    ("nofmt.qcow2", "not given for backing file 'base.raw'; untrusted mode refuses to probe"),
    ("out.qcow2", "outside the image's directory"),
])
def test_flag_refuses_raw_unnamed_and_outside_backing_files(upload, tmp_path, name, expect):
    out = tmp_path / "o.raw"
    proc = cli_process("--untrusted", "convert", "-O", "raw", str(upload / name), str(out),
                       timeout=60)
    one_line_error(proc.returncode, proc.stderr)
    assert f"{upload / name}: " in proc.stderr and expect in proc.stderr, proc.stderr
    if name != "out.qcow2":
        assert "QCowExtension 0xe2792aca (backing file format name)" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["secret.raw", "upload"]  # nothing written
    # a qcow2 backing file the image names as qcow2 is still followed
    proc = cli_process("--untrusted", "info", str(upload / "q.qcow2"), timeout=60)
    assert proc.returncode == 0 and "backing file: base.qcow2" in proc.stdout, proc.stderr


def test_environment_variable_turns_it_on(upload):
    proc = cli_process("info", str(upload / "top.qcow2"), env=untrusted_env(), timeout=60)
    one_line_error(proc.returncode, proc.stderr)
    assert "untrusted mode refuses raw backing files" in proc.stderr
    proc = cli_process("info", str(upload / "top.qcow2"),
                       env={**os.environ, "DISKFORGE_UNTRUSTED": "0"}, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_environment_values(monkeypatch):
    for value, on in (("1", True), ("yes", True), ("ture", True), ("0", False),
                      ("off", False), ("", False)):
        monkeypatch.setenv("DISKFORGE_UNTRUSTED", value)
        assert untrusted_from_environment() is on
        assert OpenPolicy.from_environment().is_untrusted is on


def test_python_api_turns_it_on(upload, monkeypatch):
    policy = diskforge.OpenPolicy.untrusted()
    assert policy.is_untrusted and not OpenPolicy.default().is_untrusted
    with pytest.raises(SafetyError, match="refuses raw backing files"):
        diskforge.open(upload / "top.qcow2", policy=policy)
    with pytest.raises(SafetyError, match="refuses to probe"):
        diskforge.info(upload / "nofmt.qcow2", policy=policy)
    with pytest.raises(SafetyError, match="outside"):
        diskforge.convert(upload / "out.qcow2", upload.parent / "x.raw", policy=policy)
    with diskforge.open(upload / "q.qcow2", policy=policy) as dev:
        assert dev.backing is not None and dev.backing.format == "qcow2"
    # a service's environment makes calls without a policy untrusted
    monkeypatch.setenv("DISKFORGE_UNTRUSTED", "1")
    with pytest.raises(SafetyError, match="refuses raw backing files"):
        diskforge.open(upload / "top.qcow2")


def test_untrusted_policy_stays_strict(tmp_path):
    img = str(tmp_path / "vm" / "disk.qcow2")
    # allow_any_root (the later qemu-img-like default) does not widen untrusted mode
    loose = OpenPolicy(allow_any_root=True, mode="untrusted")
    with pytest.raises(SafetyError, match="outside"):
        loose.resolve(img, "/etc/passwd")
    assert OpenPolicy(allow_any_root=True).resolve(img, "/etc/passwd") == "/etc/passwd"
    # whatever format plugin opened it, a file another image named is never raw here
    top = OpenPolicy.untrusted().descend(img)
    with pytest.raises(SafetyError, match=f"as the backing file of {img}"):
        top.check_referenced_format(str(tmp_path / "vm" / "base"), "raw")
    top.check_referenced_format(str(tmp_path / "vm" / "base"), "qcow2")
    OpenPolicy.untrusted().check_referenced_format(img, "raw")  # the upload itself may be
    OpenPolicy().descend(img).check_referenced_format(str(tmp_path / "b"), "raw")
    with pytest.raises(ValueError):
        OpenPolicy(mode="Untrusted")
    p = OpenPolicy.untrusted()
    for i in range(UNTRUSTED_MAX_DEPTH):
        p = p.descend(str(tmp_path / f"layer{i}"))
    with pytest.raises(SafetyError, match=f"deeper than {UNTRUSTED_MAX_DEPTH}"):
        p.descend(str(tmp_path / "one-more"))


def test_in_process_main_never_limits_its_caller(upload):
    """``main([...])`` from Python gets the policy, not setrlimit or a lower budget."""
    before = [resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU)]
    code, _, err = cli("--untrusted", "info", str(upload / "top.qcow2"))
    one_line_error(code, err)
    assert "refuses raw backing files" in err
    assert [resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU)] \
        == before
    assert limits.MEMORY_BUDGET == 256 << 20


def test_cpu_limit_ends_in_one_line_promptly(tmp_path):
    """8 MiB of hex text costs LZMA (ULMO) about 5 CPU seconds: far beyond one. One
    thread (-m 1), so that unwinding waits for one chunk, not one per thread."""
    src = tmp_path / "text.raw"
    src.write_bytes(os.urandom(4 << 20).hex().encode())
    out = tmp_path / "out.dmg"
    start = time.monotonic()
    proc = cli_process("--untrusted", "convert", "-m", "1", "-O", "dmg", "-o", "format=ULMO",
                       str(src), str(out), env={**os.environ, "DISKFORGE_UNTRUSTED_CPU_SECONDS": "1"},
                       timeout=60)
    elapsed = time.monotonic() - start
    one_line_error(proc.returncode, proc.stderr)
    assert proc.returncode == 1  # an exit, not death by SIGXCPU/SIGKILL (no core)
    assert f"{src}: CPU time limit of 1 s exceeded (untrusted mode" in proc.stderr
    assert elapsed < 30
    assert os.listdir(tmp_path) == ["text.raw"]  # no output, no temporary file left


def test_address_space_limit_ends_in_one_line_naming_the_file(tmp_path):
    """A valid qcow2 whose L1 table is 32 MiB (4 KiB clusters, 8 TiB) needs twice
    that at once to open; a limit 32 MiB above what diskforge needs to start cannot
    hold it, while a small image opens fine under the same limit."""
    need("qemu-img")
    big, small = str(tmp_path / "big.qcow2"), str(tmp_path / "small.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", big, "8T",
        timeout=60)
    run("qemu-img", "create", "-q", "-f", "qcow2", small, "1M", timeout=30)
    probe = subprocess.run(
        [sys.executable, "-c", "import diskforge.cli.main, diskforge.registry as r;"
         " r.all_formats(); print([int(l.split()[1]) for l in open('/proc/self/status')"
         " if l.startswith('VmPeak')][0] * 1024)"],
        capture_output=True, text=True, check=True, timeout=60)
    limit = str(int(probe.stdout) + (32 << 20))
    env = untrusted_env(DISKFORGE_UNTRUSTED_ADDRESS_SPACE=limit)
    assert cli_process("info", small, env=env, timeout=60).returncode == 0
    proc = cli_process("info", big, env=env, timeout=60)
    one_line_error(proc.returncode, proc.stderr)
    assert f"{big}: out of memory (untrusted mode's address-space limit" in proc.stderr
    assert cli("info", big)[0] == 0  # valid: only the limit refused it


def test_run_helper_gives_the_api_the_process_limits(upload):
    out = untrusted.run(["info", str(upload / "q.qcow2")], timeout=60).stdout
    assert "backing file: base.qcow2" in out
    with pytest.raises(DiskforgeError, match="refuses raw backing files") as e:
        untrusted.run(["info", str(upload / "top.qcow2")], timeout=60)
    assert str(e.value).startswith(str(upload / "top.qcow2"))
    assert untrusted.run(["compare", str(upload / "q.qcow2"), str(upload / "base.raw")],
                         ok=(0, 1), timeout=60).returncode == 1


def test_bad_limit_settings_are_one_line(upload):
    for var, value in (("DISKFORGE_UNTRUSTED_CPU_SECONDS", "soon"),
                       ("DISKFORGE_UNTRUSTED_ADDRESS_SPACE", "1M")):
        proc = cli_process("--untrusted", "info", str(upload / "q.qcow2"),
                           env={**os.environ, var: value}, timeout=60)
        one_line_error(proc.returncode, proc.stderr)
        assert var in proc.stderr
