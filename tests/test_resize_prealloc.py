"""``resize --preallocation=metadata|falloc|full`` on qcow2 (and raw) as qemu-img does
it: each case runs on two copies, one resized by qemu-img and one by diskforge, and the
results must agree in ``qemu-img info``, contents (``qemu-img compare``, and 7-Zip's
extraction as the second reader), ``qemu-img check`` (clean) and ``qemu-img map`` (the
same present/zero/data runs; host offsets may differ by where each tool puts its
metadata), with the host file allocated as qemu's is (falloc/full reserve the grown
part, metadata does not)."""

import json
import os
import shutil

import pytest
from conftest import cli, need, one_line_error, run

MiB = 1 << 20


def _map(path: str, fmt: str, zero: bool = True) -> list[tuple]:
    """qemu-img map's runs without host offsets; ``zero=False`` leaves out the zero
    flag (whether the host file has a hole there: qemu writes zeros into a partly
    used last cluster where diskforge leaves the host file sparse)."""
    entries = json.loads(run("qemu-img", "map", "-f", fmt, "--output", "json",
                             path).stdout)
    out: list[list] = []
    for e in entries:
        key = (e["depth"], e["present"], e["zero"] if zero else None, e["data"])
        if out and out[-1][2] == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], key])
    return [tuple(x) for x in out]


def _info(path: str, fmt: str) -> dict:
    data = json.loads(run("qemu-img", "info", "-f", fmt, "--output", "json", path).stdout)
    for key in ("actual-size", "filename", "full-backing-filename"):
        data.pop(key, None)
    fs = data.get("format-specific", {}).get("data", {})
    fs.pop("data-file", None)  # each copy names its own (absolute) data file
    return data


def _seven_zip(path: str, workdir: str) -> bytes:
    seven = shutil.which("7zz") or need("7z")
    dest = os.path.join(workdir, "x7-" + os.path.basename(path))
    run(seven, "x", "-y", f"-o{dest}", path)
    (name,) = os.listdir(dest)
    with open(os.path.join(dest, name), "rb") as f:
        return f.read()


CASES = {
    "v3": ([], None),
    "v2": (["-o", "compat=0.10"], None),
    "4k": (["-o", "cluster_size=4k"], None),
    "unaligned-end": ([], "16777728"),  # the old end inside a cluster
    "overlay": (["-b", "base.qcow2", "-F", "qcow2"], None),
    "data-file": (["-o", "data_file={folder}/img.data"], None),
}


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_qcow2_resize_preallocation_as_qemu_img(workdir, case, mode):
    need("qemu-img")
    need("qemu-io")
    opts, size = CASES[case]
    copies = {}
    for tool in ("qemu", "diskforge"):
        folder = os.path.join(workdir, tool)
        os.mkdir(folder)
        if case == "overlay":
            run("qemu-img", "create", "-q", "-f", "qcow2", os.path.join(folder, "base.qcow2"),
                "16M")
            run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 16M",
                os.path.join(folder, "base.qcow2"))
        img = os.path.join(folder, "img.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", *(o.format(folder=folder) for o in opts),
            img, size or "16M", cwd=folder)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 1M", "-c",
            "write -P 0xbb 15M 512", img)
        copies[tool] = img
    theirs, ours = copies["qemu"], copies["diskforge"]
    run("qemu-img", "resize", "-q", f"--preallocation={mode}", theirs, "+3M")
    assert cli("resize", "-q", f"--preallocation={mode}", ours, "+3M")[0] == 0
    assert _info(ours, "qcow2") == _info(theirs, "qcow2")
    assert run("qemu-img", "compare", theirs, ours).returncode == 0
    assert run("qemu-img", "check", ours).returncode == 0
    aligned = case != "unaligned-end"
    assert _map(ours, "qcow2", aligned) == _map(theirs, "qcow2", aligned)
    if case == "data-file":
        ours, theirs = (os.path.join(os.path.dirname(p), "img.data") for p in (ours, theirs))
    grown_q = os.stat(theirs).st_blocks * 512
    grown_d = os.stat(ours).st_blocks * 512
    if mode == "metadata":
        assert grown_d < grown_q + MiB  # no data space reserved
    else:
        assert grown_d >= grown_q - 256 * 1024  # the grown part reserved, as qemu's
    if case not in ("data-file", "overlay"):  # 7-Zip follows neither file
        assert _seven_zip(copies["diskforge"], workdir) == \
            _seven_zip(copies["qemu"], workdir)


def test_preallocation_refusals(workdir):
    need("qemu-img")
    img = os.path.join(workdir, "a.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
    raw = os.path.join(workdir, "a.raw")
    run("qemu-img", "create", "-q", "-f", "raw", raw, "1M")
    for argv, words in ((["--preallocation=falloc", "--shrink", img, "8M"],
                         "Preallocation can only be used for growing images"),
                        (["-f", "raw", "--preallocation=metadata", raw, "+1M"],
                         "Unsupported preallocation mode: metadata")):
        assert run("qemu-img", "resize", *argv, check=False).returncode == 1
        code, _, err = cli("resize", *argv)
        one_line_error(code, err)
        assert words in err
    assert os.path.getsize(raw) == MiB
    ext = os.path.join(workdir, "e.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", ext, "16M")
    code, _, err = cli("resize", "--preallocation=falloc", ext, "+1M")
    one_line_error(code, err)
    assert "not supported yet" in err
