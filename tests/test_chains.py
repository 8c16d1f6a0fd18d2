"""Backing chains as people have them (issue 16, "Follow the chains people actually
have"): the default mode follows what an image names wherever it is, as qemu-img does
(libvirt's absolute paths into a pool, OpenStack's ``../_base/HASH``), but only regular
files outside /proc, /sys and /dev, loop- and depth-checked; an overlay whose backing
file is missing behaves as with qemu-img; chain paths are printed as qemu-img prints
them; and a provisioning script runs the same with ``QEMU_IMG=qemu-img`` and
``QEMU_IMG=diskforge``. Untrusted mode's confinement is covered where it always was
(the formats' hostile-input tests, test_untrusted.py), now under ``--untrusted``."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import pytest
from conftest import cli, cli_process, need, one_line_error, run

import diskforge
from diskforge.blockdev import FileBackend
from diskforge.errors import SafetyError

MIB = 1 << 20
TIMEOUT = 60  # generous: a FIFO that is opened would block until this ends the test
HERE = os.path.dirname(os.path.abspath(__file__))


def qemu_img(*argv: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("qemu-img"), *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=TIMEOUT)


def qemu_io(path: str, *cmds: str, fmt: str = "raw") -> None:
    args = [need("qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, path, timeout=TIMEOUT)


def ours(*argv: str, cwd: str) -> tuple[int, str, str]:
    """diskforge ARGV in-process, from ``cwd`` (relative names as a script gives them)."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return cli(*argv)
    finally:
        os.chdir(old)


def same_words(theirs: str, mine: str, *words: str) -> None:
    for w in words:
        assert w in theirs, theirs
        assert w in mine, mine


# -- the default follows chains where they are ---------------------------------------------

@pytest.fixture
def layouts(tmp_path):
    """A libvirt pool (vms/vm.qcow2 naming /abs/pool/base.raw, raw) and an OpenStack
    instance (instances/UUID/disk naming ../_base/HASH, raw), made by qemu-img."""
    need("qemu-img")
    d = tmp_path
    (d / "pool").mkdir()
    (d / "vms").mkdir()
    base = str(d / "pool" / "base.raw")
    run("qemu-img", "create", "-q", "-f", "raw", base, "4M")
    qemu_io(base, "write -P 0x5a 0 1M")
    vm = str(d / "vms" / "vm.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", vm)
    qemu_io(vm, "write -P 0xa5 2M 64k", fmt="qcow2")
    os.makedirs(d / "instances" / "_base")
    os.makedirs(d / "instances" / "UUID")
    cache = str(d / "instances" / "_base" / "5a1d0c2e")
    run("qemu-img", "create", "-q", "-f", "raw", cache, "4M")
    qemu_io(cache, "write -P 0x44 1M 1M")
    disk = str(d / "instances" / "UUID" / "disk")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../_base/5a1d0c2e", "-F", "raw",
        disk)
    return {"libvirt": (vm, base), "openstack": (disk, cache)}


@pytest.mark.parametrize("layout", ["libvirt", "openstack"])
def test_default_mode_follows_absolute_and_parent_relative_backing_paths(layouts, layout,
                                                                          tmp_path):
    image, base = layouts[layout]
    for argv in (("info", "--backing-chain", image), ("check", image),
                 ("map", "--output", "json", image)):
        code, _, err = cli(*argv)
        assert code == 0, (argv, err)
    out = str(tmp_path / "flat.raw")
    code, _, err = cli("convert", "-O", "raw", image, out)
    assert code == 0, err
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, out)
    with diskforge.open(image) as dev:
        assert os.path.samefile(dev.backing.path, base)
    # untrusted mode still refuses both: outside the directory, and raw
    code, _, err = cli("--untrusted", "info", "--backing-chain", image)
    one_line_error(code, err)
    assert "outside the image's directory" in err
    code, _, err = cli("--untrusted", "convert", "--allow-root", os.path.dirname(base),
                       "-O", "raw", image, str(tmp_path / "u.raw"))
    one_line_error(code, err)
    assert "untrusted mode refuses raw backing files" in err


def _overlay_naming(tmp_path, name: str) -> str:
    top = str(tmp_path / "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", top, "1M")
    return top


def _refused_everywhere(top: str, tmp_path, *words: str) -> None:
    """Every command that opens the chain refuses with one line, in a child process
    (a FIFO that were opened would block it: the timeout would end the test)."""
    out = str(tmp_path / "o.raw")
    for argv in (("info", "--backing-chain", top), ("convert", "-O", "raw", top, out),
                 ("map", top), ("check", top), ("compare", top, top)):
        proc = cli_process(*argv, timeout=TIMEOUT)
        one_line_error(proc.returncode, proc.stderr)
        for w in words:
            assert w in proc.stderr, (argv, proc.stderr)
        assert not os.path.exists(out)
    # plain info names the backing file without opening it, as qemu-img's does
    code, text, err = cli("info", top)
    assert code == 0 and "backing file: " in text, err


def test_a_fifo_backing_file_is_refused(tmp_path):
    need("qemu-img")
    os.mkfifo(tmp_path / "base.raw")
    top = _overlay_naming(tmp_path, "base.raw")
    _refused_everywhere(top, tmp_path, "top.qcow2", "'base.raw'",
                        "a FIFO (named pipe); files an image names must be regular files")


@pytest.mark.parametrize("kind", ["block", "char"])
def test_a_device_node_backing_file_is_refused(tmp_path, kind):
    """A device node made in tmp (not under /dev): refused by its type. Never opened,
    so which device it names does not matter (a loop device, /dev/zero's numbers)."""
    need("qemu-img")
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    mode, dev = (stat.S_IFBLK, os.makedev(7, 0)) if kind == "block" else \
        (stat.S_IFCHR, os.makedev(1, 5))
    os.mknod(tmp_path / "node", 0o600 | mode, dev)
    top = _overlay_naming(tmp_path, "node")
    _refused_everywhere(top, tmp_path, "'node'", f"a {kind}{'acter' * (kind == 'char')}"
                        " device; files an image names must be regular files")


@pytest.mark.parametrize("target,root", [("/proc/self/environ", "/proc"),
                                         ("/proc/self/mem", "/proc"),
                                         ("/sys/kernel/notes", "/sys"),
                                         ("/dev/zero", "/dev")])
def test_a_symlink_into_proc_sys_or_dev_is_refused(tmp_path, target, root):
    need("qemu-img")
    os.symlink(target, tmp_path / "base.raw")
    top = _overlay_naming(tmp_path, "base.raw")
    _refused_everywhere(top, tmp_path, "'base.raw'", f"under {root}")
    top = _overlay_naming(tmp_path, target)  # named directly, too
    _refused_everywhere(top, tmp_path, f"under {root}")


def test_the_descriptor_is_checked_not_only_the_name(tmp_path, monkeypatch):
    """A name that passes when resolved but leads elsewhere by the time it is opened
    (swapped in between) is refused by the check on the open descriptor: here the
    name check is blinded, so only the descriptor's real path can tell."""
    os.symlink("/proc/self/status", tmp_path / "swapped")
    monkeypatch.setattr(os.path, "realpath", lambda p, *a, **k: os.fspath(p))
    with pytest.raises(SafetyError, match="under /proc"):
        FileBackend(str(tmp_path / "swapped"), lock=False, referenced=True)
    FileBackend(str(tmp_path / "swapped"), lock=False).close()  # the user may name it


def test_backing_loops_are_refused_in_the_default_mode(tmp_path):
    need("qemu-img")
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", a, "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    run("qemu-img", "rebase", "-u", "-b", "../" + tmp_path.name + "/b.qcow2", "-F",
        "qcow2", a)
    for argv in (("info", "--backing-chain", b), ("map", a), ("check", b)):
        code, _, err = cli(*argv)
        one_line_error(code, err)
        assert "backing chain loop" in err, err
    with pytest.raises(SafetyError, match="loop"):
        diskforge.open(a)


# -- a missing backing file, as qemu-img ------------------------------------------------------

@pytest.fixture
def orphan(tmp_path):
    """top.qcow2 over base.qcow2, which is then deleted."""
    need("qemu-img")
    run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "4M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        str(tmp_path / "top.qcow2"))
    qemu_io(str(tmp_path / "top.qcow2"), "write -P 7 0 64k", fmt="qcow2")
    os.unlink(tmp_path / "base.qcow2")
    return str(tmp_path)


def test_info_on_an_overlay_whose_backing_file_is_missing(orphan):
    q = qemu_img("info", "top.qcow2", cwd=orphan)
    code, out, err = ours("info", "top.qcow2", cwd=orphan)
    assert q.returncode == code == 0, err
    assert out == q.stdout and "backing file: base.qcow2\n" in out
    q = qemu_img("info", "--output", "json", "top.qcow2", cwd=orphan)
    code, out, err = ours("info", "--output", "json", "top.qcow2", cwd=orphan)
    assert q.returncode == code == 0, err
    assert json.loads(out) == json.loads(q.stdout)
    for json_out in ((), ("--output", "json")):
        q = qemu_img("info", "--backing-chain", *json_out, "top.qcow2", cwd=orphan)
        code, out, err = ours("info", "--backing-chain", *json_out, "top.qcow2", cwd=orphan)
        assert q.returncode == code == 1 and not out
        one_line_error(code, err)
        same_words(q.stderr, err, "Could not open 'base.qcow2'", "No such file or directory")


@pytest.mark.parametrize("fmt", ["vmdk", "qed"])
def test_other_formats_with_a_missing_backing_file(tmp_path, fmt):
    """qemu-img follows backing files of vmdk and qed too: the same behaviour."""
    need("qemu-img")
    d = str(tmp_path)
    run("qemu-img", "create", "-q", "-f", fmt, f"{d}/base.{fmt}", "1M")
    run("qemu-img", "create", "-q", "-f", fmt, "-b", f"base.{fmt}", "-F", fmt,
        f"{d}/top.{fmt}")
    os.unlink(f"{d}/base.{fmt}")
    for argv in (("info", f"top.{fmt}"), ("info", "--output", "json", f"top.{fmt}"),
                 ("info", "--backing-chain", f"top.{fmt}"), ("map", f"top.{fmt}")):
        q = qemu_img(*argv, cwd=d)
        code, out, err = ours(*argv, cwd=d)
        assert code == q.returncode, (argv, err)
        if code == 0 and "json" in argv:
            assert json.loads(out) == json.loads(q.stdout)
        elif code == 0:  # (diskforge orders a VMDK extent's format-specific keys
            # differently in text: a difference of its own, not of the chain)
            cut = "Format specific information:"
            assert out.split(cut)[0] == q.stdout.split(cut)[0]
            assert f"backing file: base.{fmt}\n" in out
        else:
            same_words(q.stderr, err, f"Could not open 'base.{fmt}'",
                       "No such file or directory")


@pytest.mark.parametrize("argv", [("check", "top.qcow2"), ("map", "top.qcow2"),
                                  ("map", "--output", "json", "top.qcow2"),
                                  ("convert", "-O", "raw", "top.qcow2", "out.raw"),
                                  ("measure", "-O", "qcow2", "top.qcow2"),
                                  ("compare", "top.qcow2", "top.qcow2")])
def test_commands_that_read_the_overlay_fail_as_qemu_img(orphan, argv):
    q = qemu_img(*argv, cwd=orphan)
    code, out, err = ours(*argv, cwd=orphan)
    assert code == q.returncode != 0 and out == q.stdout == ""
    one_line_error(code, err)
    same_words(q.stderr, err, "Could not open 'top.qcow2': Could not open backing file:"
               " Could not open 'base.qcow2': No such file or directory")
    assert not os.path.exists(os.path.join(orphan, "out.raw"))


def test_rebase_u_never_opens_the_old_backing_file(orphan, tmp_path):
    copy = tmp_path / "q"
    copy.mkdir()
    shutil.copy(os.path.join(orphan, "top.qcow2"), copy)
    for d, rebase in ((str(copy), qemu_img), (orphan, ours)):
        result = rebase("rebase", "-u", "-b", "moved/base.qcow2", "-F", "qcow2",
                        "top.qcow2", cwd=d)
        code = result.returncode if hasattr(result, "returncode") else result[0]
        assert code == 0, result
    theirs = qemu_img("info", "--output", "json", "top.qcow2", cwd=str(copy))
    mine = qemu_img("info", "--output", "json", "top.qcow2", cwd=orphan)
    assert json.loads(mine.stdout)["backing-filename"] == "moved/base.qcow2"
    assert _scrub(json.loads(mine.stdout)) == _scrub(json.loads(theirs.stdout))
    # the old backing file is not even looked at: here it is now a FIFO, which any
    # command that opens the chain refuses
    os.mkdir(os.path.join(orphan, "moved"))
    os.mkfifo(os.path.join(orphan, "moved", "base.qcow2"))
    top = os.path.join(orphan, "top.qcow2")
    proc = cli_process("rebase", "-u", "-b", "again.qcow2", "-F", "qcow2", top,
                       timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(run("qemu-img", "info", "--output", "json", top).stdout)
    assert info["backing-filename"] == "again.qcow2"


# -- chain paths printed as qemu-img prints them -----------------------------------------------

@pytest.fixture
def chain(tmp_path):
    """vm/top.qcow2 -> vm/mid.qcow2 (by "mid.qcow2") -> images/base.qcow2 (by
    "../images/base.qcow2"), and abs.qcow2 naming vm/top.qcow2 by its absolute path."""
    need("qemu-img")
    (tmp_path / "vm").mkdir()
    (tmp_path / "images").mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "images" / "base.qcow2"),
        "4M")
    qemu_io(str(tmp_path / "images" / "base.qcow2"), "write -P 1 0 1M", fmt="qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../images/base.qcow2", "-F",
        "qcow2", str(tmp_path / "vm" / "mid.qcow2"), "6M")
    qemu_io(str(tmp_path / "vm" / "mid.qcow2"), "write -P 2 1M 64k", fmt="qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
        str(tmp_path / "vm" / "top.qcow2"), "8M")
    qemu_io(str(tmp_path / "vm" / "top.qcow2"), "write -P 3 2M 64k", fmt="qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(tmp_path / "vm" / "top.qcow2"),
        "-F", "qcow2", str(tmp_path / "abs.qcow2"))
    return str(tmp_path)


@pytest.mark.parametrize("name", ["vm/top.qcow2", "./vm/top.qcow2", "vm/../vm/top.qcow2",
                                  "abs.qcow2", "ABSOLUTE"])
def test_chain_paths_are_printed_as_qemu_img_prints_them(chain, name):
    name = os.path.join(chain, "vm", "top.qcow2") if name == "ABSOLUTE" else name
    for argv in (("info", "--backing-chain", name), ("map", name),
                 ("map", "--output", "json", name)):
        q = qemu_img(*argv, cwd=chain)
        code, out, err = ours(*argv, cwd=chain)
        assert code == q.returncode == 0, err
        assert out == q.stdout, argv  # byte for byte: these outputs are deterministic
    for argv in (("info", "--backing-chain", "--output", "json", name),
                 ("info", "--output", "json", name)):
        q = qemu_img(*argv, cwd=chain)
        code, out, err = ours(*argv, cwd=chain)
        assert code == q.returncode == 0, err
        assert json.loads(out) == json.loads(q.stdout), argv


def test_resize_past_a_shorter_backing_file_maps_as_qemu_img(chain):
    """Zeros past a shorter backing image are reported at the depth of the layer whose
    backing image ended (qemu-img 7.2), and so merge with what that layer holds."""
    for name in ("vm/top.qcow2", "vm/mid.qcow2"):
        q = qemu_img("map", "--output", "json", name, cwd=chain)
        assert ours("map", "--output", "json", name, cwd=chain)[1] == q.stdout


# -- serve is untrusted unless told otherwise --------------------------------------------------

def test_serve_applies_untrusted_rules_unless_trusted(layouts, tmp_path):
    image, _ = layouts["libvirt"]
    sock = str(tmp_path / "s.sock")
    proc = cli_process("serve", image, "--socket", sock, "--read-only", timeout=TIMEOUT)
    one_line_error(proc.returncode, proc.stderr)
    assert "outside the image's directory" in proc.stderr
    server = subprocess.Popen([sys.executable, "-m", "diskforge", "serve", "--trusted", image,
                               "--socket", sock, "--read-only"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert f"socket={sock}" in line, line + server.stderr.read()
        out = str(tmp_path / "served.raw")
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///?socket={sock}",
            out, timeout=TIMEOUT)
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, out, timeout=TIMEOUT)
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=TIMEOUT)
    assert server.returncode == 0


# -- a provisioning script, run with both tools ------------------------------------------------

# fields that differ between any two runs (when, and how the file system allocated)
_VOLATILE_KEYS = {"date-sec", "date-nsec", "actual-size"}
# the same in human output: qemu's "disk size" line and a snapshot list's date column
_VOLATILE_TEXT = [(re.compile(r"^disk size: .*$", re.M), "disk size: N"),
                  (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"), "DATE")]


def _scrub(value):
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in _VOLATILE_KEYS}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _normal(text: str, root: str):
    """A step's stdout, its copy's root replaced, as data when it is JSON."""
    text = text.replace(root, "ROOT")
    try:
        return _scrub(json.loads(text))
    except ValueError:
        for pattern, fixed in _VOLATILE_TEXT:
            text = pattern.sub(fixed, text)
        return text


def _layout(root: str) -> None:
    """The pools and caches the script finds (made by qemu-img and qemu-io)."""
    for sub in ("pool/images", "pool/vms", "instances/_base", "instances/UUID"):
        os.makedirs(os.path.join(root, sub))
    for name, writes in (("pool/images/base.raw", ["write -P 0x11 0 1M",
                                                   "write -P 0x22 8M 512k"]),
                         ("pool/images/base2.raw", ["write -P 0x11 0 512k",
                                                    "write -P 0x33 12M 64k"]),
                         ("instances/_base/5a1d0c2e9b8f4c1e", ["write -P 0x44 0 2M"])):
        path = os.path.join(root, name)
        run("qemu-img", "create", "-q", "-f", "raw", path, "16M")
        qemu_io(path, *writes)


def test_provisioning_script_runs_the_same_with_qemu_img_and_diskforge(tmp_path):
    need("qemu-img")
    diskforge_bin = os.path.join(os.path.dirname(sys.executable), "diskforge")
    if not os.path.exists(diskforge_bin):
        pytest.skip("the diskforge command is not installed beside this Python")
    _layout(str(tmp_path / "layout"))
    roots = {}
    for tool in ("qemu-img", "diskforge"):
        root = str(tmp_path / tool)
        run("cp", "-a", "--sparse=always", str(tmp_path / "layout"), root)
        env = {**os.environ, "QEMU_IMG": tool, "LC_ALL": "C",
               "PATH": os.path.dirname(diskforge_bin) + os.pathsep + os.environ["PATH"]}
        env.pop("DISKFORGE_UNTRUSTED", None)
        env.pop("DISKFORGE_PROGRESS", None)
        run("sh", os.path.join(HERE, "chains_provision.sh"), root, env=env, timeout=600)
        roots[tool] = root
    q, d = roots["qemu-img"], roots["diskforge"]
    steps = sorted(n[:-4] for n in os.listdir(os.path.join(q, "out")) if n.endswith(".cmd"))
    assert len(steps) > 40
    failures = []
    for step in steps:
        def read(root, ext):
            with open(os.path.join(root, "out", f"{step}.{ext}"), encoding="utf-8",
                      errors="replace") as f:
                return f.read()
        cmd = read(q, "cmd").strip().replace(q, "ROOT")
        rc_q, rc_d = int(read(q, "rc")), int(read(d, "rc"))
        if rc_q != rc_d:
            failures.append(f"{cmd}: exit {rc_q} vs {rc_d}: {read(d, 'err').strip()}")
            continue
        if _normal(read(q, "out"), q) != _normal(read(d, "out"), d):
            failures.append(f"{cmd}: stdout differs:\n{read(q, 'out')}\n---\n"
                            f"{read(d, 'out')}")
        if bool(read(q, "err").strip()) != bool(read(d, "err").strip()):
            failures.append(f"{cmd}: stderr {read(q, 'err')!r} vs {read(d, 'err')!r}")
    assert not failures, "\n".join(failures)
    # the images left behind hold the same disks, and qemu-img finds diskforge's sound
    images = []
    for folder, _, files in os.walk(q):
        rel = os.path.relpath(folder, q)
        if rel.split(os.sep)[0] != "out":
            images += [os.path.join(rel, f) for f in files]
    assert len(images) >= 10
    for rel in sorted(images):
        theirs, mine = os.path.join(q, rel), os.path.join(d, rel)
        assert os.path.exists(mine), rel
        res = run("qemu-img", "compare", "-U", theirs, mine, check=False, timeout=TIMEOUT)
        assert res.returncode == 0, (rel, res.stdout, res.stderr)
        info_q = json.loads(run("qemu-img", "info", "-U", "--output", "json", theirs).stdout)
        info_d = json.loads(run("qemu-img", "info", "-U", "--output", "json", mine).stdout)
        assert _normal(json.dumps(info_q), q) == _normal(json.dumps(info_d), d)
        if info_d["format"] == "qcow2":
            run("qemu-img", "check", "-U", mine, timeout=TIMEOUT)
