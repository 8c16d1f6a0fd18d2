"""``diskforge iso build``: every option checked by the reference readers — xorriso
(extraction), isoinfo (names, volume ids), 7-Zip (Joliet/UDF extraction) — and by our
own reader; reproducibility, dates, owners, >4 GiB files, progress, memory, errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import cli, cli_process, need, one_line_error, run, sha256_file
from isotools import MTIME, copy_isolinux, make_tree, snapshot

RR_MOVED = ("rr_moved",)   # where Rock Ridge relocates directories deeper than 8 levels


def build(src: str, iso: str, *args: str, env: dict | None = None) -> str:
    if env is None:
        code, out, err = cli("iso", "build", "-q", *args, src, iso)
        assert code == 0, err
    else:
        proc = cli_process("iso", "build", "-q", *args, src, iso,
                           env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr
    return iso


def xorriso_extract(iso: str, dest: str) -> str:
    need("xorriso")
    run("xorriso", "-osirrox", "on", "-indev", iso, "-extract", "/", dest)
    # xorriso leaves read-only directories read-only: make the copy removable
    for dirpath, dirnames, _ in os.walk(dest):
        os.chmod(dirpath, 0o755)
    return dest


def seven_extract(iso: str, dest: str, *args: str) -> str:
    seven = need("7zz")
    run(seven, "x", "-y", *args, f"-o{dest}", iso)
    shutil.rmtree(os.path.join(dest, "[BOOT]"), ignore_errors=True)
    return dest


def isoinfo_names(iso: str, *flags: str) -> set[str]:
    """Every path isoinfo lists (-R Rock Ridge, -J Joliet, none: ISO 9660)."""
    need("isoinfo")
    proc = subprocess.run(["isoinfo", *flags, "-f", "-i", iso], capture_output=True,
                          check=True)
    # isoinfo prints Joliet names in a single-byte charset (it has no UTF-8 for them)
    out = proc.stdout.decode("latin-1" if "-J" in flags else "utf-8")
    return {line.strip().lstrip("/") for line in out.splitlines() if line.strip()}


@pytest.fixture
def tree(tmp_path):
    return make_tree(str(tmp_path / "src"))


def files_only(snap: dict) -> dict:
    return {k: v for k, v in snap.items() if v[0] == "file"}


# -- the default: level 3, Rock Ridge, Joliet --------------------------------------------

def test_default_build_read_by_xorriso_isoinfo_7z(tree, tmp_path):
    iso = build(tree, str(tmp_path / "d.iso"))
    # xorriso (Rock Ridge): names, sizes, contents, symlinks, modes and mtimes
    got = xorriso_extract(iso, str(tmp_path / "x"))
    assert snapshot(got, modes=True, mtimes=True, ignore=RR_MOVED) == \
        snapshot(tree, modes=True, mtimes=True)
    # isoinfo: the Rock Ridge and Joliet trees hold every path
    want = set(snapshot(tree))
    rr = isoinfo_names(iso, "-R")
    # isoinfo lists relocated directories where they are stored (rr_moved/d8), not where
    # their Rock Ridge CL entry puts them
    moved = {p for p in rr if p == "rr_moved" or p.startswith("rr_moved/")}
    rr = (rr - moved) | {p.replace("rr_moved/", "d1/d2/d3/d4/d5/d6/d7/", 1)
                         for p in moved if p != "rr_moved"}
    assert rr == want
    joliet = isoinfo_names(iso, "-J")
    assert {p for p in want if p.isascii() and len(p.split("/")[-1]) <= 64
            and "link" not in p and "dangling" not in p} <= joliet
    # 7-Zip reads the Joliet tree: every file's contents (the 67-character name is cut
    # to Joliet's 64)
    seven = snapshot(seven_extract(iso, str(tmp_path / "7")))
    assert sorted(v for v in files_only(seven).values()) == \
        sorted(v for v in files_only(snapshot(tree)).values())
    assert any(k.startswith("A long file name with spaces and ünïcödé") for k in seven)
    # and our own reader, through the CLI
    out = str(tmp_path / "ours")
    assert cli("iso", "extract", "-q", iso, out)[0] == 0
    assert snapshot(out, modes=True, mtimes=True) == snapshot(tree, modes=True, mtimes=True)


@pytest.mark.parametrize("level", [1, 2, 4])
def test_levels(level, tree, tmp_path):
    iso = build(tree, str(tmp_path / f"l{level}.iso"), "--level", str(level))
    names = isoinfo_names(iso)      # plain ISO 9660 identifiers
    assert names
    for path in names:
        for comp in path.split("/"):
            if level == 4:
                continue
            base = comp.split(";")[0]
            stem, _, ext = base.partition(".")
            assert re.fullmatch(r"[A-Z0-9_]*", stem + ext), comp
            if level == 1:
                assert len(stem) <= 8 and len(ext) <= 3, comp
            else:
                assert len(stem) + len(ext) <= 31, comp
    if level == 4:
        assert "hello.txt" in names and "Ελληνικά/κείμενο.txt" in names
        assert any(d["type"] == "enhanced" for d in
                   json.loads(cli("info", "--output", "json", iso)[1])
                   ["format-specific"]["data"]["volume-descriptors"])
    got = xorriso_extract(iso, str(tmp_path / "x"))
    assert snapshot(got, ignore=RR_MOVED) == snapshot(tree)


def test_plain_iso9660_only(tmp_path):
    src = str(tmp_path / "src")
    for rel in ("README.TXT", "DOCS/GUIDE.MD", "DATA/BLOB.BIN"):
        os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
        with open(os.path.join(src, rel), "wb") as f:
            f.write(rel.encode() * 100)
    iso = build(src, str(tmp_path / "p.iso"), "--no-rock-ridge", "--no-joliet", "--level", "1")
    facts = json.loads(cli("info", "--output", "json", iso)[1])["format-specific"]["data"]
    assert facts["rock-ridge"] is False and facts["joliet"] is False
    assert snapshot(xorriso_extract(iso, str(tmp_path / "x"))) == snapshot(src)
    assert snapshot(seven_extract(iso, str(tmp_path / "7"))) == snapshot(src)
    assert isoinfo_names(iso) == {"README.TXT;1", "DOCS", "DOCS/GUIDE.MD;1", "DATA",
                                  "DATA/BLOB.BIN;1"}


def test_joliet_only(tmp_path):
    src = make_tree(str(tmp_path / "src"), deep=False, symlinks=False, long_names=False)
    with open(os.path.join(src, "Ελληνικά.txt"), "w") as f:
        f.write("unicode\n")
    iso = build(src, str(tmp_path / "j.iso"), "--no-rock-ridge")
    assert snapshot(xorriso_extract(iso, str(tmp_path / "x"))) == snapshot(src)
    assert snapshot(seven_extract(iso, str(tmp_path / "7"))) == snapshot(src)
    assert isoinfo_names(iso, "-J") == {p if p.isascii() else "________.txt"
                                        for p in snapshot(src)}


def test_udf(tree, tmp_path):
    iso = build(tree, str(tmp_path / "u.iso"), "--udf")
    facts = json.loads(cli("info", "--output", "json", iso)[1])["format-specific"]["data"]
    assert facts["udf"] in ("NSR02", "NSR03") and facts["udf-volume-id"] == "CDROM"
    # 7-Zip reads the UDF tree: full names (no symlinks there: see formats/iso.md)
    seven = snapshot(seven_extract(iso, str(tmp_path / "7"), "-tudf"))
    want = {k: v for k, v in snapshot(tree).items() if v[0] != "symlink"}
    assert seven == want
    # our UDF reader agrees, and Rock Ridge still has everything for xorriso
    out = str(tmp_path / "ours")
    assert cli("iso", "extract", "-q", "--namespace", "udf", iso, out)[0] == 0
    assert snapshot(out) == want
    assert snapshot(xorriso_extract(iso, str(tmp_path / "x")), ignore=RR_MOVED) == \
        snapshot(tree)


def test_udf_without_rock_ridge_keeps_symlinks(tmp_path):
    src = make_tree(str(tmp_path / "src"), deep=False)
    iso = build(src, str(tmp_path / "u.iso"), "--udf", "--no-rock-ridge")
    out = str(tmp_path / "ours")
    assert cli("iso", "extract", "-q", iso, out)[0] == 0      # auto: UDF
    assert snapshot(out) == snapshot(src)


def test_rational_rock_and_owners(tmp_path):
    src = make_tree(str(tmp_path / "src"), deep=False)
    if os.geteuid() != 0:
        pytest.skip("setting file owners needs root")
    os.chown(os.path.join(src, "hello.txt"), 1234, 5678)
    os.chmod(os.path.join(src, "README"), 0o640)
    need("xorriso")
    iso = build(src, str(tmp_path / "o.iso"))
    out = run("xorriso", "-indev", iso, "-lsl", "/hello.txt", "/README").stdout
    assert re.search(r"-rw-r--r--\s+1\s+1234\s+5678\s+13 .*hello.txt", out)
    assert re.search(r"-rw-r-----\s+1\s+0\s+0\s+8 .*README", out)
    iso = build(src, str(tmp_path / "r.iso"), "--rational-rock")
    out = run("xorriso", "-indev", iso, "-lsl", "/hello.txt", "/README", "/bin").stdout
    assert re.search(r"-r--r--r--\s+1\s+0\s+0\s+13 .*hello.txt", out)
    assert re.search(r"-r--r--r--\s+1\s+0\s+0\s+8 .*README", out)
    out = run("xorriso", "-indev", iso, "-lsl", "/bin/tool.sh").stdout
    assert re.search(r"-r-xr-xr-x\s+1\s+0\s+0", out)


def test_follow_symlinks(tmp_path):
    src = make_tree(str(tmp_path / "src"), deep=False)
    iso = str(tmp_path / "f.iso")
    code, out, err = cli("iso", "build", "-q", "--follow-symlinks", src, iso)
    assert code == 0
    assert "dangling" in err  # the dangling link is skipped with a warning
    got = snapshot(xorriso_extract(iso, str(tmp_path / "x")))
    assert got["link-to-file"] == got["hello.txt"]
    assert got["link-to-dir/2020.txt"] == got["docs/notes/2020.txt"]
    assert "dangling" not in got


def test_volume_identifiers_shown_by_isoinfo(tree, tmp_path):
    need("isoinfo")
    iso = build(tree, str(tmp_path / "v.iso"), "-V", "A_LONGER_VOLUME_ID_OF_32_CHARS__",
                "--publisher", "ACME Publishing", "--preparer", "Prepared by diskforge",
                "--application", "diskforge tests", "--system-id", "SYS",
                "--volume-set-id", "SET1")
    out = run("isoinfo", "-d", "-i", iso).stdout
    assert "Volume id: A_LONGER_VOLUME_ID_OF_32_CHARS__" in out
    assert "Publisher id: ACME Publishing" in out
    assert "Data preparer id: Prepared by diskforge" in out
    assert "Application id: diskforge tests" in out
    assert "System id: SYS" in out
    assert "Volume set id: SET1" in out
    assert "Rock Ridge signatures version 1 found" in out
    assert "Joliet with UCS level 3 found" in out
    # the Joliet descriptor holds the id cut to its 16 UCS-2 characters
    facts = json.loads(cli("info", "--output", "json", iso)[1])["format-specific"]["data"]
    assert facts["joliet-volume-id"] == "A_LONGER_VOLUME_"
    assert run("xorriso", "-indev", iso, "-pvd_info").stdout.count("ACME Publishing") == 1 \
        if shutil.which("xorriso") else True


def test_files_over_4_gib_are_multi_extent(tmp_path):
    """Level 3 (the default) stores a 4.5 GiB file as two extents; holes stay holes, so
    this costs no disk."""
    src = str(tmp_path / "src")
    os.makedirs(src)
    big = os.path.join(src, "big.img")
    size = (4 << 30) + (512 << 20)
    with open(big, "wb") as f:
        f.truncate(size)
        f.write(b"start")
        f.seek(size - 3)
        f.write(b"end")
    iso = build(src, str(tmp_path / "big.iso"))
    assert os.stat(iso).st_blocks * 512 < 64 << 20
    need("isoinfo")
    out = run("isoinfo", "-l", "-i", iso).stdout
    assert len(re.findall(r"BIG\.IMG;1", out)) == 2          # two directory records
    if shutil.which("xorriso"):
        out = run("xorriso", "-indev", iso, "-lsl", "/big.img").stdout
        assert f" {size} " in out
    if shutil.which("7zz"):
        out = run("7zz", "l", iso).stdout
        assert str(size) in out
    dest = str(tmp_path / "x")
    assert cli("iso", "extract", "-q", iso, dest)[0] == 0
    with open(os.path.join(dest, "big.img"), "rb") as f:
        assert f.read(5) == b"start"
        f.seek(size - 3)
        assert f.read() == b"end"
        assert os.fstat(f.fileno()).st_size == size
    code, out, err = cli("iso", "build", "-q", "--level", "2", src, str(tmp_path / "l2.iso"))
    one_line_error(code, err)
    assert "4 GiB" in err


# -- boot entries and hybrid ---------------------------------------------------------------

def boot_src(tmp_path) -> str:
    from isotools import efi_app, esp_image
    src = make_tree(str(tmp_path / "src"), deep=False)
    copy_isolinux(os.path.join(src, "isolinux"))
    with open(os.path.join(src, "isolinux", "isolinux.cfg"), "w") as f:
        f.write("SAY hi\n")
    os.makedirs(os.path.join(src, "EFI"))
    esp_image(os.path.join(src, "EFI", "efiboot.img"), efi_app("X"))
    return src


def test_el_torito_bios_and_uefi_seen_by_xorriso(tmp_path):
    need("xorriso")
    src = boot_src(tmp_path)
    iso = build(src, str(tmp_path / "b.iso"), "--boot", "isolinux/isolinux.bin",
                "--efi-boot", "EFI/efiboot.img", "--hybrid")
    report = run("xorriso", "-indev", iso, "-report_el_torito", "plain",
                 "-report_system_area", "plain").stdout
    assert re.search(r"El Torito boot img :\s+1\s+BIOS\s+y\s+none\s+0x0000\s+0x00\s+4\s+\d+",
                     report)
    esp_sectors = os.path.getsize(os.path.join(src, "EFI", "efiboot.img")) // 512
    assert re.search(rf"El Torito boot img :\s+2\s+UEFI\s+y\s+none\s+0x0000\s+0x00\s+"
                     rf"{esp_sectors}\s+\d+", report)
    assert "boot-info-table" in report
    assert "El Torito cat path : /isolinux/boot.cat" in report
    assert re.search(r"MBR partition\s+:\s+1\s+0x80\s+0x00\s+0\s+\d+", report)
    lba = int(re.search(r"boot img :\s+2\s+UEFI.*\s(\d+)\s*$", report, re.M).group(1))
    assert re.search(rf"MBR partition\s+:\s+2\s+0x00\s+0xef\s+{lba * 4}\s+{esp_sectors}",
                     report)
    assert os.path.getsize(iso) % (1 << 20) == 0   # padded to whole cylinders
    # our info reads the same entries, and the 0xEF partition from diskforge.partitions
    info = json.loads(cli("info", "--details", "--output", "json", iso)[1])
    entries = info["format-specific"]["data"]["el-torito"]["entries"]
    assert [(e["platform"], e["boot-info-table"]) for e in entries] == \
        [("x86 BIOS", True), ("UEFI", False)]
    assert entries[1]["image-location"] == lba
    assert [(p["type"], p["start"]) for p in info["partitions"]["partitions"]] == \
        [("0xef", lba * 2048)]
    # 7-Zip lists the boot images; extraction gives the tree and the catalog
    seven = snapshot(seven_extract(iso, str(tmp_path / "7")))
    assert "isolinux/boot.cat" in seven
    code, out, _ = cli("iso", "extract", "-q", iso, str(tmp_path / "o"))
    assert code == 0


def test_boot_errors(tmp_path):
    src = make_tree(str(tmp_path / "src"), deep=False)
    iso = str(tmp_path / "x.iso")
    code, _, err = cli("iso", "build", "--boot", "missing.bin", src, iso)
    one_line_error(code, err)
    assert "missing.bin" in err
    code, _, err = cli("iso", "build", "--boot", "hello.txt", "--hybrid", src, iso)
    one_line_error(code, err)
    assert "isolinux" in err
    code, _, err = cli("iso", "build", "--hybrid", src, iso)
    one_line_error(code, err)
    code, _, err = cli("iso", "build", "--boot", "../etc/passwd", src, iso)
    one_line_error(code, err)
    assert not os.path.exists(iso)


# -- reproducibility, dates, progress, memory -------------------------------------------

def test_reproducible_with_source_date_epoch(tmp_path):
    src = boot_src(tmp_path)
    args = ("--udf", "--boot", "isolinux/isolinux.bin", "--efi-boot", "EFI/efiboot.img",
            "--hybrid")
    env = {"SOURCE_DATE_EPOCH": "1700000000", "TZ": "UTC"}
    a = build(src, str(tmp_path / "a.iso"), *args, env=env)
    b = build(src, str(tmp_path / "b.iso"), *args, env={**env, "TZ": "Asia/Kolkata"})
    assert sha256_file(a) == sha256_file(b)
    c = build(src, str(tmp_path / "c.iso"), *args, env={"SOURCE_DATE_EPOCH": "1700000001"})
    assert sha256_file(c) != sha256_file(a)
    facts = json.loads(cli("info", "--output", "json", a)[1])["format-specific"]["data"]
    assert facts["created"].startswith("2023-11-14T22:13:20")
    # files older than SOURCE_DATE_EPOCH keep their dates
    code, out, _ = cli("iso", "ls", "--output", "json", a)
    assert {e["name"]: e["mtime"] for e in json.loads(out)["entries"]}["hello.txt"] == MTIME


def test_dates_are_clamped_to_source_date_epoch(tmp_path):
    src = make_tree(str(tmp_path / "src"), deep=False)
    iso = build(src, str(tmp_path / "a.iso"), env={"SOURCE_DATE_EPOCH": str(MTIME - 100)})
    code, out, _ = cli("iso", "ls", "-R", "--output", "json", iso)
    assert {e["mtime"] for e in json.loads(out)["entries"] if "mtime" in e} == {MTIME - 100}


def test_progress_when_asked(tmp_path):
    src = make_tree(str(tmp_path / "src"), deep=False)
    proc = cli_process("iso", "build", "-p", src, str(tmp_path / "p.iso"))
    assert proc.returncode == 0
    assert "(100.00/100%)" in proc.stdout  # qemu-img's -p lines, on stdout


def test_memory_follows_the_listing_not_the_data(tmp_path):
    """96 MiB of file data: the build's peak RSS stays far below it (pycdlib is given
    paths; the data moves in the kernel)."""
    src = str(tmp_path / "src")
    os.makedirs(src)
    with open(os.path.join(src, "data.bin"), "wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))
    # VmHWM, not ru_maxrss: the latter also counts the parent's memory when the child
    # was started with vfork (as subprocess does), and this pytest worker may be large
    code = ("import re, sys; from diskforge.cli.main import main;"
            "rc = main(['iso', 'build', '-q', sys.argv[1], sys.argv[2]]);"
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]);"
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, src, str(tmp_path / "m.iso")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    peak_mib = int(proc.stdout.split()[-1]) / 1024
    assert peak_mib < 80, f"peak RSS {peak_mib:.0f} MiB"


# -- errors ---------------------------------------------------------------------------------

def test_build_errors_are_one_line(tmp_path):
    src = make_tree(str(tmp_path / "src"), deep=True, symlinks=False)
    iso = str(tmp_path / "e.iso")
    for args, words in ((["--no-rock-ridge"], "8 levels"),
                        (["-V", "X" * 33], "32 bytes"),
                        (["--udf", "-V", "Ω" * 16], "UDF")):
        code, _, err = cli("iso", "build", *args, src, iso)
        one_line_error(code, err)
        assert words in err
        assert not os.path.exists(iso)
    code, _, err = cli("iso", "build", str(tmp_path / "nope"), iso)
    one_line_error(code, err)
    bad = os.path.join(src, os.fsdecode(b"bad-\xff-name"))
    open(bad, "w").close()
    code, _, err = cli("iso", "build", src, iso)
    one_line_error(code, err)
    assert "UTF-8" in err


def test_output_inside_the_source_is_not_included(tmp_path):
    src = make_tree(str(tmp_path / "src"), deep=False)
    iso = os.path.join(src, "self.iso")
    build(src, iso)
    build(src, iso)   # the earlier output is in SRC_DIR now: it must not go in
    code, out, _ = cli("iso", "ls", "--output", "json", iso)
    assert "self.iso" not in {e["name"] for e in json.loads(out)["entries"]}
