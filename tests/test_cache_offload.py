"""Cache modes and copy offloading as qemu-img 7.2 has them, seen in the system calls
(strace, run on both tools where the question is "does diskforge do what qemu-img
does"): ``-t none``/``directsync`` write the target with O_DIRECT, every mode but
``unsafe`` ends with an fdatasync of the target, and ``convert -C`` copies with
copy_file_range from every source whose runs lie in a host file, keeping holes, and
falls back to the ordinary copy for everything else, with qemu-img's refusals."""

import os
import random
import re
import subprocess
import sys

import pytest
from conftest import cli, make_sparse, need, one_line_error, run

MiB = 1 << 20


@pytest.fixture
def disk(workdir):
    """An 8 MiB raw disk: random data at 0, 1 MiB and 5 MiB (not sector aligned at
    the ends), holes elsewhere."""
    rng = random.Random(7)
    return make_sparse(os.path.join(workdir, "d.raw"), 8 * MiB,
                       [(0, rng.randbytes(4000)), (MiB, rng.randbytes(300_001)),
                        (5 * MiB + 512, rng.randbytes(70_000))])


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def traced(workdir: str, argv: list[str], calls: str) -> tuple[int, list[str]]:
    """Run ``argv`` under strace (children followed, file names shown), keeping the
    lines of ``calls``: (exit status, trace lines)."""
    need("strace")
    log = os.path.join(workdir, f"trace.{os.getpid()}.{random.random()}")
    proc = subprocess.run(["strace", "-f", "-y", "-qq", "-e", f"trace={calls}", "-o", log,
                           *argv], capture_output=True, text=True, cwd=workdir)
    lines = read(log).decode("utf-8", "replace").splitlines()
    os.unlink(log)
    return proc.returncode, lines


def diskforge(*argv: str) -> list[str]:
    return [sys.executable, "-m", "diskforge", *argv]


def syncs_of(lines: list[str], name: str) -> int:
    """fsync/fdatasync calls on a file whose name (or temporary name) contains
    ``name``."""
    return sum(1 for line in lines if re.search(r"\b(fsync|fdatasync)\(", line)
               and name in line)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_final_flush_follows_qemu_img(disk, workdir, fmt):
    """qemu-img's convert flushes the target once at the end for every cache mode but
    unsafe (its default); count both tools' fdatasyncs of the target."""
    need("qemu-img")
    for mode in (None, "unsafe", "writeback", "writethrough", "none", "directsync"):
        flag = [] if mode is None else ["-t", mode]
        counts = []
        for tool, name in ((["qemu-img"], "q"), (diskforge(), "d")):
            out = f"{name}-{mode}.{fmt}"
            code, lines = traced(workdir, [*tool, "convert", *flag, "-O", fmt, disk, out],
                                 "fsync,fdatasync")
            assert code == 0
            counts.append(syncs_of(lines, out))
            assert run("qemu-img", "compare", disk, os.path.join(workdir, out)).returncode == 0
        theirs, ours = counts
        if fmt == "raw":  # a qcow2 target's own create may flush (qemu's does, 4 times)
            assert (theirs > 0) == (ours > 0), (mode, theirs, ours)
        assert (ours > 0) == (mode not in (None, "unsafe")), (mode, ours)


@pytest.mark.parametrize("fmt,opts", [("raw", ""), ("qcow2", "cluster_size=512"),
                                      ("vhdx", ""), ("vpc", "")])
def test_cache_none_writes_the_target_with_o_direct(disk, workdir, fmt, opts):
    """The output is opened with O_DIRECT and the data goes through that descriptor;
    qcow2 with 512-byte clusters makes many unaligned metadata writes, which take the
    buffered descriptor. Two readers check the result: qemu-img and 7-Zip (raw)."""
    need("qemu-img")
    out = f"o.{fmt}"
    argv = diskforge("convert", "-t", "none", "-O", fmt, *(["-o", opts] if opts else []),
                     disk, out)
    code, lines = traced(workdir, argv, "openat,pwrite64,pwritev,pwritev2")
    assert code == 0
    direct = [line for line in lines if "O_DIRECT" in line and out in line
              and "openat(" in line]
    assert direct, "the target was not opened with O_DIRECT"
    fd = re.search(r"= (\d+)<", direct[0]).group(1)
    assert any(re.search(rf"pwritev2?\({fd}<", line) for line in lines)
    path = os.path.join(workdir, out)
    assert run("qemu-img", "compare", "-f", "raw", "-F", fmt, disk, path).returncode == 0
    if fmt in ("qcow2", "vhdx"):
        assert run("qemu-img", "check", "-f", fmt, path).returncode == 0
    elif fmt == "raw":
        assert read(path) == read(disk)


def test_cache_none_in_place(disk, workdir):
    """convert -n onto an existing raw image and rebase of a qcow2 overlay with -t none
    write through O_DIRECT too (the image written in place)."""
    need("qemu-img")
    target = os.path.join(workdir, "t.raw")
    make_sparse(target, 8 * MiB, [(3 * MiB, b"\xff" * 5000)])
    code, lines = traced(workdir, diskforge("convert", "-n", "-t", "none", "-O", "raw",
                                            disk, target), "openat")
    assert code == 0 and any("O_DIRECT" in ln and "t.raw" in ln for ln in lines)
    assert read(target) == read(disk)
    q = os.path.join(workdir, "q.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", disk, q)
    for tool in (["qemu-img"], diskforge()):  # bench -t none reads with O_DIRECT too
        for extra in ([], ["-w"]):
            code, lines = traced(workdir, [*tool, "bench", "-c", "8", *extra, "-t", "none",
                                           q], "openat")
            assert code == 0
            assert any("O_DIRECT" in ln and "q.qcow2" in ln for ln in lines), (tool, extra)


def test_direct_writes_at_any_offset(workdir):
    """FileBackend with O_DIRECT writes: random unaligned writes land as a plain file
    model says, read back through both descriptors."""
    from diskforge.blockdev import FileBackend
    path = os.path.join(workdir, "f.bin")
    open(path, "wb").close()
    model = bytearray()
    rng = random.Random(3)
    with FileBackend(path, writable=True) as fb:
        if not fb.use_direct_io():
            pytest.skip("no O_DIRECT here")
        for _ in range(200):
            off = rng.choice([0, 4096, 8192 * 3]) + rng.randrange(0, 3 * MiB)
            data = rng.randbytes(rng.choice([1, 511, 4096, 4097, 65536, 1 << 20, 1500000]))
            fb.pwrite(off, data)
            if len(model) < off + len(data):
                model.extend(bytes(off + len(data) - len(model)))
            model[off:off + len(data)] = data
        assert fb.size == len(model)
        assert fb.pread(0, len(model)) == model
    assert read(path) == model


# -- convert -C ------------------------------------------------------------------------

def _sources(disk: str, workdir: str) -> dict[str, tuple[str, str]]:
    """name -> (path, format) of the same disk in every layout, made by qemu-img."""
    base = os.path.join(workdir, "b.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", disk, base)
    ov = os.path.join(workdir, "ov.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", ov, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 2M 64k", "-c", "write -z 0 64k", ov)
    out = {"raw": (disk, "raw"), "qcow2": (base, "qcow2"), "overlay": (ov, "qcow2")}
    text = make_sparse(os.path.join(workdir, "text.raw"), 8 * MiB,
                       [(MiB, b"compressible " * 50_000)])
    comp = os.path.join(workdir, "s-compressed.qcow2")  # qemu stores random data as it is
    run("qemu-img", "convert", "-c", "-O", "qcow2", text, comp)
    out["compressed"] = (comp, "qcow2")
    for name, fmt, opts in (("vmdk-flat", "vmdk", ["-o", "subformat=monolithicFlat"]),
                            ("vmdk-sparse", "vmdk", []),
                            ("vpc-fixed", "vpc", ["-o", "subformat=fixed,force_size=on"]),
                            ("vpc", "vpc", ["-o", "force_size=on"]), ("vhdx", "vhdx", [])):
        path = os.path.join(workdir, f"s-{name}.{fmt}")
        run("qemu-img", "convert", *opts, "-O", fmt, disk, path)
        out[name] = (path, fmt)
    return out


def test_copy_offloading_from_every_host_mapped_source(disk, workdir):
    """-C into a raw file copies with copy_file_range wherever the source's runs lie in
    a host file, holes stay holes, and the bytes are what qemu-img's own conversion
    gives (compared byte for byte, and by qemu-img compare)."""
    need("qemu-img")
    need("qemu-io")
    for name, (path, fmt) in _sources(disk, workdir).items():
        out = os.path.join(workdir, f"c-{name}.raw")
        code, lines = traced(workdir, diskforge("convert", "-C", "-f", fmt, "-O", "raw",
                                                path, out), "copy_file_range")
        assert code == 0, name
        copies = sum(1 for line in lines if "copy_file_range(" in line)
        if name == "compressed":
            assert copies == 0  # nothing lies in the file as it is: read and written
        else:
            assert copies > 0, name
        ref = os.path.join(workdir, f"q-{name}.raw")
        run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, ref)
        assert read(out) == read(ref), name
        assert run("qemu-img", "compare", "-f", fmt, "-F", "raw", path, out).returncode == 0
        assert os.stat(out).st_blocks * 512 <= 2 * MiB, f"{name}: holes were filled"


def test_copy_offloading_acceptance_as_qemu_img(disk, workdir):
    """qemu-img refuses -C with -c, -S and --salvage (its words), and accepts it for any
    target format and with -B, copying the ordinary way where it cannot offload."""
    need("qemu-img")
    for extra, words in ((["-c", "-O", "qcow2"], "Cannot enable copy offloading when -c"),
                         (["-S", "4k", "-O", "raw"], "when -S is used"),
                         (["-S", "0", "-O", "raw"], "when -S is used"),
                         (["--salvage", "-O", "raw"], "Cannot use copy offloading in"
                          " salvaging mode")):
        out = os.path.join(workdir, "x.out")
        assert run("qemu-img", "convert", "-C", *extra, disk, out,
                   check=False).returncode == 1
        code, _, err = cli("convert", "-C", *extra, disk, out + "2")
        one_line_error(code, err)
        assert words in err and not os.path.exists(out + "2")
    base = os.path.join(workdir, "base.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", disk, base)
    for fmt in ("qcow2", "vhdx", "vmdk"):
        out = os.path.join(workdir, f"c.{fmt}")
        assert cli("convert", "-C", "-O", fmt, disk, out)[0] == 0
        assert run("qemu-img", "compare", disk, out).returncode == 0
        assert run("qemu-img", "check", out).returncode == 0
    out = os.path.join(workdir, "b.qcow2")
    assert cli("convert", "-C", "-B", base, "-F", "qcow2", "-O", "qcow2", disk, out)[0] == 0
    assert run("qemu-img", "compare", disk, out).returncode == 0
    target = make_sparse(os.path.join(workdir, "n.raw"), 8 * MiB, [(3 * MiB, b"\x01" * 99)])
    assert cli("convert", "-C", "-n", "-O", "raw", base, target)[0] == 0
    assert read(target) == read(disk)
