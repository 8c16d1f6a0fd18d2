"""Outputs appear atomically; inputs are never overwritten."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import cli, make_sparse, one_line_error, sha256_file

import diskforge
from diskforge.blockdev import ImageWriter
from diskforge.errors import SafetyError


def leftovers(folder):
    return [n for n in os.listdir(folder) if "diskforge-tmp" in n]


@pytest.fixture
def src(workdir):
    return make_sparse(os.path.join(workdir, "src.raw"), 8 << 20,
                       [(0, os.urandom(1 << 20)), (4 << 20, os.urandom(1 << 20))])


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "relative"])
def test_refuses_to_write_onto_its_input(workdir, src, how):
    before = sha256_file(src)
    target = {"same": src, "relative": os.path.relpath(src)}.get(how)
    if how == "symlink":
        target = os.path.join(workdir, "link.raw")
        os.symlink(src, target)
    elif how == "hardlink":
        target = os.path.join(workdir, "hard.raw")
        os.link(src, target)
    code, _, err = cli("convert", src, target)
    one_line_error(code, err)
    assert "refusing to write onto the input" in err
    assert sha256_file(src) == before and not leftovers(workdir)
    with pytest.raises(SafetyError):
        diskforge.convert(src, target)


def test_failed_writer_leaves_nothing(workdir, src, monkeypatch):
    from diskforge.formats import raw
    target = os.path.join(workdir, "out.raw")
    real = raw.RawWriter.write_prepared
    calls = []

    def failing(self, offset, data):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(self, offset, data)
    monkeypatch.setattr(raw.RawWriter, "write_prepared", failing)
    code, _, err = cli("convert", src, target)
    one_line_error(code, err)
    assert "No space left" in err
    assert not os.path.exists(target) and not leftovers(workdir)


def test_existing_target_survives_a_failed_convert(workdir, src, monkeypatch):
    target = os.path.join(workdir, "keep.raw")
    with open(target, "wb") as f:
        f.write(b"precious")
    from diskforge.formats import raw
    monkeypatch.setattr(raw.RawWriter, "finish",
                        lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    code, _, err = cli("convert", src, target)
    assert code == 130 and "interrupted" in err
    assert open(target, "rb").read() == b"precious" and not leftovers(workdir)


def test_sigint_and_sigterm_during_convert_leave_nothing(workdir):
    """A real process, killed mid-way: no output, no temporary file."""
    big = make_sparse(os.path.join(workdir, "big.raw"), 3 << 30,
                      [(i << 26, b"\1" * (1 << 20)) for i in range(48)])
    # a slow source: the writer sleeps per call so the signal lands mid-run
    code = ("import sys, time, diskforge.formats.raw as r\n"
            "orig = r.RawWriter.write_prepared\n"
            "def slow(self, o, d):\n    time.sleep(0.05); return orig(self, o, d)\n"
            "r.RawWriter.write_prepared = slow\n"
            "from diskforge.cli.main import main\nsys.exit(main(sys.argv[1:]))\n")
    for sig in (signal.SIGINT, signal.SIGTERM):
        target = os.path.join(workdir, f"out-{sig}.raw")
        proc = subprocess.Popen([sys.executable, "-c", code, "convert", big, target],
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 20
        while not leftovers(workdir) and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert not os.path.exists(target) and not leftovers(workdir)


def test_writer_context_manager_aborts_on_error(workdir):
    from diskforge.registry import get
    fmt = get("raw")
    target = os.path.join(workdir, "ctx.raw")
    with pytest.raises(ValueError):
        with fmt.writer(target, 1 << 20, fmt.options.parse("")) as w:
            assert isinstance(w, ImageWriter)
            raise ValueError("boom")
    assert not os.path.exists(target) and not leftovers(workdir)


def test_output_through_a_symlink_replaces_the_link_target(workdir, src):
    real = os.path.join(workdir, "real.raw")
    open(real, "wb").close()
    link = os.path.join(workdir, "link-out.raw")
    os.symlink(real, link)
    assert cli("convert", src, link)[0] == 0
    assert os.path.islink(link) and sha256_file(real) == sha256_file(src)
