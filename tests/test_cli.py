"""The command line: qemu-img's spellings and outputs, and one-line errors."""

import json
import os
import re
import stat

import pytest
from conftest import cli, cli_process, make_sparse, need, one_line_error, run


@pytest.fixture
def image(workdir):
    return make_sparse(os.path.join(workdir, "t.raw"), 10 << 20,
                       [(5 << 16, os.urandom(3 << 16))])


@pytest.mark.parametrize("argv", [["info"], ["info", "--output", "json"],
                                  ["map"], ["map", "--output", "json"],
                                  ["measure", "-O", "raw"],
                                  ["measure", "--output", "json", "-O", "raw"]])
def test_output_is_byte_identical_to_qemu_img(image, argv):
    need("qemu-img")
    folder, name = os.path.split(image)
    theirs = run("qemu-img", *argv, name, cwd=folder).stdout
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        code, ours, err = cli(*argv, name)
    finally:
        os.chdir(cwd)
    assert code == 0, err
    if argv[0] == "info":  # "disk size" depends on the file system's allocation rounding
        theirs = "\n".join(l for l in theirs.splitlines() if "disk size" not in l
                           and "actual-size" not in l)
        ours = "\n".join(l for l in ours.splitlines() if "disk size" not in l
                         and "actual-size" not in l)
    assert ours.strip() == theirs.strip()


def test_compare_exit_codes(image, workdir):
    other = os.path.join(workdir, "o.raw")
    assert cli("convert", image, other)[0] == 0
    code, out, _ = cli("compare", image, other)
    assert (code, out.strip()) == (0, "Images are identical.")
    with open(other, "r+b") as f:  # the bytes there are random: flip them, so they differ
        f.seek(5 << 16 | 700)
        old = f.read(2)
        f.seek(5 << 16 | 700)
        f.write(bytes(b ^ 0xFF for b in old))
    code, out, _ = cli("compare", image, other)
    expected = (5 << 16) + 512
    assert (code, out.strip()) == (1, f"Content mismatch at offset {expected}!")
    need("qemu-img")
    theirs = run("qemu-img", "compare", image, other, check=False)
    assert (theirs.returncode, theirs.stdout.strip()) == (1, out.strip())
    code, _, err = cli("compare", image, os.path.join(workdir, "missing.raw"))
    assert code == 2 and "Could not open '" in err and "No such file or directory" in err


def test_compare_sizes(workdir):
    a = make_sparse(os.path.join(workdir, "a.raw"), 1 << 20, [(10, b"x")])
    b = make_sparse(os.path.join(workdir, "b.raw"), 2 << 20, [(10, b"x")])
    assert cli("compare", a, b)[0] == 0
    assert cli("compare", "-s", a, b)[0:2] == (1, "Strict mode: Image size mismatch!\n")
    make_sparse(b, 2 << 20, [(10, b"x"), ((1 << 20) + 4096, b"y")])
    assert cli("compare", a, b)[1].strip().endswith(f"offset {(1 << 20) + 4096}!")


def test_create_and_convert_infer_format_from_extension(workdir):
    path = os.path.join(workdir, "new.img")
    code, out, _ = cli("create", path, "64M")
    assert code == 0 and "fmt=raw" in out and os.path.getsize(path) == 64 << 20
    code, _, err = cli("convert", path, os.path.join(workdir, "x.unknownext"))
    one_line_error(code, err)
    assert "-O" in err


def test_option_help_is_qemu_imgs_and_formats_lists_diskforges(workdir):
    """``-o help`` prints qemu-img 7.2's listing (no file names needed, as qemu-img; the
    matrix compares it with qemu-img's byte for byte); ``formats --options`` lists every
    option diskforge takes, raw's preallocation (which qemu-img leaves to the protocol
    level) with its choices and default."""
    code, out, _ = cli("convert", "-O", "raw", "-o", "help", "a", "b")
    assert code == 0 and out.startswith("Supported raw options:\n")
    assert "  size=<size>            - Virtual disk size\n" in out
    assert "preallocation" not in out
    assert cli("create", "-f", "raw", "-o", "?", "x")[1] == out
    assert cli("create", "-f", "raw", "-o", "help")[:2] == (0, out)
    assert cli("convert", "-O", "raw", "-o", "?")[:2] == (0, out)
    code, own, _ = cli("formats", "--options", "raw")
    assert code == 0 and own.startswith("diskforge raw options:\n")
    assert "  preallocation=<str>    - " in own and "off, falloc, full; default: off" in own
    code, own, _ = cli("formats", "--options", "vhdx")
    assert code == 0 and "logical_sector_size=<num>" in own and "block_state_zero" in own
    code, _, err = cli("formats", "--options", "nosuchformat")
    one_line_error(code, err)


def test_vhdx_takes_qemu_imgs_block_state_zero(workdir):
    """Listed by ``-o help`` as in qemu-img, so accepted: off (what diskforge's fixed
    disks are), either value on a dynamic disk (qemu ignores it there too); on with
    subformat=fixed is not supported yet, said so."""
    for i, opt in enumerate(("block_state_zero=off", "block_state_zero=on",
                             "subformat=fixed,block_state_zero=off")):
        path = os.path.join(workdir, f"ok{i}.vhdx")
        code, _, err = cli("create", "-f", "vhdx", "-o", opt, path, "8M")
        assert code == 0, err
        need("qemu-img")
        assert run("qemu-img", "check", path).returncode == 0
    bad = os.path.join(workdir, "no.vhdx")
    code, _, err = cli("create", "-f", "vhdx", "-o", "subformat=fixed,block_state_zero=on",
                       bad, "8M")
    one_line_error(code, err)
    assert "not supported yet" in err and not os.path.exists(bad)


def test_formats_table_comes_from_the_registry(monkeypatch):
    from diskforge import registry

    class Fake(registry.Format):
        name = "fakefmt"
        description = "registered in a test"

        def probe(self, head, tail, size):
            return 0
    registry.all_formats()
    monkeypatch.setitem(registry._loaded, "fakefmt", Fake())
    code, out, _ = cli("formats")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["raw"][3:7] == ["yes", "yes", "yes", "yes"]
    assert rows["fakefmt"][3:7] == ["yes", "-", "-", "-"]
    data = json.loads(cli("formats", "--output", "json")[1])
    assert {"name": "fakefmt", "read": False} .items() <= next(
        d for d in data if d["name"] == "fakefmt").items()


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "unknown_O", "bad_o",
                                  "bad_o_value", "no_args", "bad_size", "unknown_f"])
def test_bad_invocations_give_one_line(workdir, image, case):
    out = os.path.join(workdir, "out.raw")
    empty = os.path.join(workdir, "empty")
    open(empty, "w").close()
    argv = {
        "missing": ["info", os.path.join(workdir, "nope.raw")],
        "directory": ["info", workdir],
        "empty": ["convert", empty, out],
        "unknown_O": ["convert", "-O", "floppy", image, out],
        "bad_o": ["convert", "-O", "raw", "-o", "cluster_size=64k", image, out],
        "bad_o_value": ["convert", "-O", "raw", "-o", "preallocation=sometimes", image, out],
        "no_args": ["convert"],
        "bad_size": ["create", "-f", "raw", out, "12Q"],
        "unknown_f": ["info", "-f", "nosuch", image],
    }[case]
    proc = cli_process(*argv)
    one_line_error(proc.returncode, proc.stderr)
    assert not os.path.exists(out)


def test_unreadable_file(workdir, image, monkeypatch):
    """As a user, chmod 0 makes the file unreadable; root reads anything, so there the
    kernel's EACCES is simulated for this one path."""
    if os.geteuid() != 0:
        os.chmod(image, 0)
        for argv in (["info", image], ["info", "-f", "raw", image]):
            proc = cli_process(*argv)
            one_line_error(proc.returncode, proc.stderr)
            assert "permission denied" in proc.stderr.lower()
        return
    real_access, real_open = os.access, os.open

    def access(path, mode, *a, **k):
        return False if os.fspath(path) == image else real_access(path, mode, *a, **k)

    def opener(path, flags, *a, **k):
        if os.fspath(path) == image:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "open", opener)
    for argv in (["info", image], ["convert", image, os.path.join(workdir, "o.raw")]):
        code, _, err = cli(*argv)
        one_line_error(code, err)
        assert "permission denied" in err.lower()
    monkeypatch.setattr(os, "access", real_access)  # past the early check: os.open fails
    code, _, err = cli("info", "-f", "raw", image)
    one_line_error(code, err)
    assert "permission denied" in err.lower()


def test_empty_file_opens_as_raw_when_named(workdir):
    empty = os.path.join(workdir, "empty")
    open(empty, "w").close()
    code, out, _ = cli("info", "-f", "raw", empty)
    assert code == 0 and "virtual size: 0 B (0 bytes)" in out


def test_python_m_and_version():
    """diskforge's version, then qemu-img's version line for the interface it follows
    (scripts match "qemu-img version X.Y" to pick flags); -V is the same."""
    proc = cli_process("--version")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0].startswith("diskforge ")
    assert lines[1].startswith("qemu-img version 7.2.0 ")
    assert cli_process("-V").stdout == proc.stdout


def _run_on_a_tty(argv: list[str], env: dict | None = None) -> tuple[int, bytes]:
    """Run ``diskforge ARGV`` with stdout and stderr on a pseudo-terminal: (status,
    everything it printed)."""
    import pty
    import subprocess
    import sys
    main, sub = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "diskforge", *argv], stdout=sub,
                            stderr=sub, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    os.close(sub)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    return proc.wait(), b"".join(chunks)


def test_progress_only_with_p_as_qemu_img_prints_it(image, workdir):
    """Without -p nothing, terminal or not; with -p qemu-img's lines on stdout (from
    0.00 to 100.00, each ending in \r, then a newline), nothing on stderr; diskforge's
    bar only when DISKFORGE_PROGRESS=bar asks for it."""
    proc = cli_process("convert", image, os.path.join(workdir, "p.raw"))
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == ""
    assert _run_on_a_tty(["convert", image, os.path.join(workdir, "tty.raw")]) == (0, b"")
    proc = subprocess_bytes("convert", "-p", image, os.path.join(workdir, "p2.raw"))
    assert proc.returncode == 0 and proc.stderr == b""
    assert proc.stdout.startswith(b"    (0.00/100%)\r")
    assert proc.stdout.endswith(b"    (100.00/100%)\r\n")
    steps = proc.stdout[:-1].split(b"\r")[:-1]
    assert all(re.fullmatch(rb"    \(\d+\.\d\d/100%\)", s) for s in steps)
    assert stat.S_ISREG(os.stat(os.path.join(workdir, "p2.raw")).st_mode)
    code, seen = _run_on_a_tty(["convert", image, os.path.join(workdir, "b.raw")],
                               env={"DISKFORGE_PROGRESS": "bar"})
    assert code == 0 and b"MB/s" in seen and b"100.00%" in seen
    code, seen = _run_on_a_tty(["convert", "-q", image, os.path.join(workdir, "q.raw")],
                               env={"DISKFORGE_PROGRESS": "bar"})
    assert (code, seen) == (0, b"")


def subprocess_bytes(*argv: str):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "diskforge", *argv], capture_output=True)


def test_convert_n_writes_into_an_existing_target(image, workdir):
    target = os.path.join(workdir, "existing.raw")
    with open(target, "wb") as f:
        f.write(b"\xee" * (12 << 20))  # bigger than the source, full of non-zero bytes
    code, _, err = cli("convert", "-n", "-O", "raw", image, target)
    assert code == 0, err
    data = open(target, "rb").read()
    assert data[:10 << 20] == open(image, "rb").read()   # zeros were written as zeros
    assert data[10 << 20:] == b"\xee" * (2 << 20)        # beyond the source: untouched
    small = os.path.join(workdir, "small.raw")
    open(small, "wb").write(bytes(4096))
    code, _, err = cli("convert", "-n", "-O", "raw", image, small)
    one_line_error(code, err)
    assert "smaller" in err
