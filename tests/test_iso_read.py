"""Reading ISOs made by the reference tools (genisoimage, xorriso, isohybrid) and real
samples: ``iso ls`` and ``iso extract`` give back exactly the source tree, ``info``
reports what xorriso reports, and an ISO is a block device for convert/compare."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil

import pytest
from conftest import cli, need, need_real, run, sha256_file
from isotools import MTIME, copy_isolinux, efi_app, esp_image, make_tree, snapshot

ISOLINUX = "/usr/lib/ISOLINUX/isolinux.bin"


def plain_tree(root: str) -> str:
    """Names that survive ISO 9660 level 1 unchanged (upper-case 8.3, shallow)."""
    files = {"README.TXT": b"plain\n", "DOCS/GUIDE.MD": b"# g\n" * 50,
             "DATA/BLOB.BIN": bytes(range(256)) * 9, "EMPTY": b""}
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(root, "NOTHING"))
    return root


def extract_and_compare(iso: str, src: str, tmp: str, *args: str, ignore=(), modes=False,
                        mtimes=False) -> dict:
    dest = os.path.join(tmp, "out")
    shutil.rmtree(dest, ignore_errors=True)
    code, out, err = cli("iso", "extract", "-q", *args, iso, dest)
    assert code == 0, err
    got = snapshot(dest, modes=modes, mtimes=mtimes, ignore=ignore)
    want = snapshot(src, modes=modes, mtimes=mtimes, ignore=ignore)
    assert got == want
    # ls -R lists the same paths, sizes and link targets
    code, out, err = cli("iso", "ls", "-R", "--output", "json", *args, iso)
    assert code == 0, err
    listed = {e["path"]: e for e in json.loads(out)["entries"]
              if e["path"] not in ignore and e["path"].split("/")[0] not in ignore}
    assert set(listed) == set(want)
    for rel, row in want.items():
        e = listed[rel]
        assert e["type"] == row[0], rel
        if row[0] == "file":
            assert e["size"] == row[1], rel
        if row[0] == "symlink":
            assert e["target"] == row[2], rel
    return listed


@pytest.fixture
def tree(tmp_path):
    return make_tree(str(tmp_path / "src"))


# -- genisoimage and xorriso ISOs -------------------------------------------------------

@pytest.mark.parametrize("tool", ["genisoimage", "xorriso"])
def test_plain_iso9660(tool, tmp_path):
    src = plain_tree(str(tmp_path / "src"))
    iso = str(tmp_path / "plain.iso")
    argv = ["genisoimage"] if tool == "genisoimage" else [need("xorriso"), "-as", "mkisofs"]
    need(argv[0])
    if tool == "xorriso":
        argv.append("--norock")   # xorriso writes Rock Ridge unless told not to
    run(*argv, "-quiet", "-V", "PLAIN", "-o", iso, src)
    listed = extract_and_compare(iso, src, str(tmp_path))
    code, out, _ = cli("iso", "ls", "--output", "json", iso)
    assert json.loads(out)["namespace"] == "iso9660"
    assert "README.TXT" in listed


@pytest.mark.parametrize("tool", ["genisoimage", "xorriso"])
def test_joliet_only(tool, tmp_path):
    src = make_tree(str(tmp_path / "src"), deep=False, symlinks=False)
    iso = str(tmp_path / "j.iso")
    argv = ["genisoimage"] if tool == "genisoimage" else [need("xorriso"), "-as", "mkisofs"]
    need(argv[0])
    if tool == "xorriso":
        argv.append("--norock")
    run(*argv, "-quiet", "-J", "-joliet-long", "-o", iso, src)
    extract_and_compare(iso, src, str(tmp_path))
    code, out, _ = cli("iso", "ls", "--output", "json", iso)
    assert json.loads(out)["namespace"] == "joliet"


@pytest.mark.parametrize("tool", ["genisoimage", "xorriso"])
def test_rock_ridge_and_joliet(tool, tree, tmp_path):
    """Long and non-ASCII names, modes, mtimes, symlinks, >8 levels (relocated)."""
    iso = str(tmp_path / "rr.iso")
    argv = ["genisoimage"] if tool == "genisoimage" else [need("xorriso"), "-as", "mkisofs"]
    need(argv[0])
    run(*argv, "-quiet", "-R", "-J", "-joliet-long", "-o", iso, tree)
    extract_and_compare(iso, tree, str(tmp_path), modes=True, mtimes=True)
    # the Joliet tree of the same ISO: names too, but no symlinks or modes
    dest = str(tmp_path / "joliet")
    code, _, err = cli("iso", "extract", "-q", "--namespace", "joliet", iso, dest)
    assert code == 0, err
    assert open(os.path.join(dest, "Ελληνικά", "κείμενο.txt"), "rb").read() == b"greek\n"


def test_udf_genisoimage(tmp_path):
    need("genisoimage")
    src = make_tree(str(tmp_path / "src"), deep=False, symlinks=False)
    iso = str(tmp_path / "udf.iso")
    run("genisoimage", "-quiet", "-udf", "-o", iso, src)
    code, out, _ = cli("iso", "ls", "--output", "json", iso)
    assert json.loads(out)["namespace"] == "udf"   # no Rock Ridge: UDF has the names
    extract_and_compare(iso, src, str(tmp_path), "--namespace", "udf")
    code, out, _ = cli("info", "--details", "--output", "json", iso)
    assert json.loads(out)["format-specific"]["data"]["udf"] == "NSR02"


def boot_tree(root: str) -> str:
    make_tree(root, deep=False)
    copy_isolinux(os.path.join(root, "isolinux"))
    with open(os.path.join(root, "isolinux", "isolinux.cfg"), "w") as f:
        f.write("SAY hello\n")
    esp_image(os.path.join(root, "efi.img"), efi_app("X"))
    return root


def el_torito_report(iso: str) -> list[tuple[str, int, int]]:
    """(platform, load size, LBA) per boot image, as xorriso reports them."""
    out = run("xorriso", "-indev", iso, "-report_el_torito", "plain").stdout
    rows = []
    for line in out.splitlines():
        # N  Pltf  B  Emul  Ld_seg  Hdpt  Ldsiz  LBA
        m = re.match(r"El Torito boot img :\s+\d+\s+(\S+)\s+\S+\s+\S+\s+\S+\s+\S+\s+"
                     r"(\d+)\s+(\d+)", line)
        if m:
            rows.append((m.group(1), int(m.group(2)), int(m.group(3))))
    return rows


@pytest.mark.parametrize("tool", ["genisoimage", "xorriso"])
def test_el_torito(tool, tmp_path):
    need("xorriso")
    src = boot_tree(str(tmp_path / "src"))
    iso = str(tmp_path / "boot.iso")
    argv = ["genisoimage"] if tool == "genisoimage" else ["xorriso", "-as", "mkisofs"]
    need(argv[0])
    run(*argv, "-quiet", "-R", "-J", "-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat",
        "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table", "-eltorito-alt-boot",
        "-e", "efi.img", "-no-emul-boot", "-o", iso, src)
    ignore = ("isolinux/isolinux.bin", "isolinux/boot.cat")
    extract_and_compare(iso, src, str(tmp_path), ignore=ignore)
    # isolinux.bin differs only by the boot info table (bytes 8-63)
    got = open(os.path.join(tmp_path, "out", "isolinux", "isolinux.bin"), "rb").read()
    want = open(ISOLINUX, "rb").read()
    assert got[:8] == want[:8] and got[64:] == want[64:] and got[8:64] != want[8:64]
    code, out, _ = cli("info", "--details", "--output", "json", iso)
    facts = json.loads(out)["format-specific"]["data"]
    entries = facts["el-torito"]["entries"]
    assert [(e["platform"], e["emulation"], e["boot-info-table"]) for e in entries] == [
        ("x86 BIOS", "no emulation", True), ("UEFI", "no emulation", False)]
    assert [(e["load-size"], e["image-location"]) for e in entries] == \
        [(n, lba) for _, n, lba in el_torito_report(iso)]
    assert any(d["type"] == "boot record" for d in facts["volume-descriptors"])


def test_hybrid_xorriso(tmp_path):
    need("xorriso")
    src = boot_tree(str(tmp_path / "src"))
    iso = str(tmp_path / "hybrid.iso")
    run("xorriso", "-as", "mkisofs", "-quiet", "-R", "-J", "-isohybrid-mbr",
        "/usr/lib/ISOLINUX/isohdpfx.bin", "-b", "isolinux/isolinux.bin", "-c",
        "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
        "-eltorito-alt-boot", "-e", "efi.img", "-no-emul-boot", "-isohybrid-gpt-basdat",
        "-o", iso, src)
    extract_and_compare(iso, src, str(tmp_path),
                        ignore=("isolinux/isolinux.bin", "isolinux/boot.cat"))
    code, out, _ = cli("info", "--details", "--output", "json", iso)
    info = json.loads(out)
    assert info["format"] == "iso"
    table = info["partitions"]
    # -isohybrid-gpt-basdat: a GPT whose second entry is the EFI image, and an MBR whose
    # 0xEF entry points at it too
    assert table["scheme"] == "gpt" and table["primary-header-valid"]
    lba = el_torito_report(iso)[1][2]
    esp = os.path.getsize(os.path.join(src, "efi.img"))
    assert [(p["start"], p["size"]) for p in table["partitions"]][1] == (lba * 2048, esp)
    assert [(p["type"], p["start"]) for p in table["hybrid-mbr"]][-1] == ("0xef", lba * 2048)


def test_hybrid_isohybrid(tmp_path):
    """genisoimage + syslinux's isohybrid --uefi: MBR with an 0xEF partition."""
    need("genisoimage")
    need("isohybrid")
    src = boot_tree(str(tmp_path / "src"))
    iso = str(tmp_path / "hybrid.iso")
    run("genisoimage", "-quiet", "-R", "-J", "-b", "isolinux/isolinux.bin", "-c",
        "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
        "-eltorito-alt-boot", "-e", "efi.img", "-no-emul-boot", "-o", iso, src)
    run("isohybrid", "--uefi", iso)
    extract_and_compare(iso, src, str(tmp_path),
                        ignore=("isolinux/isolinux.bin", "isolinux/boot.cat"))
    code, out, _ = cli("info", "--details", "--output", "json", iso)
    table = json.loads(out)["partitions"]
    assert table["scheme"] in ("mbr", "gpt")
    code, out, _ = cli("info", "--details", iso)
    assert "EL TORITO" in out or "el-torito" in out


# -- real samples -----------------------------------------------------------------------

REAL = [
    # file, namespace 7-Zip shows, expected namespace for auto
    ("iso/dfvfs_genisoimage_level3.iso", "iso9660", "iso9660"),
    ("iso/hdimac_hdiutil_makehybrid_iso_joliet.iso", "joliet", "rock-ridge"),
    ("iso/libcdio_test-udf1_genisoimage_udf-bridge.iso", "udf", "rock-ridge"),
    ("iso/libcdio_udf102_imgburn_udf-only.iso", "udf", "udf"),
    ("generated-local/xorriso154_hybrid_mbr_efi.iso.gz", "joliet", "rock-ridge"),
]


@pytest.mark.parametrize("rel,namespace,auto", REAL, ids=[r[0].split("/")[-1] for r in REAL])
def test_real_samples(rel, namespace, auto, tmp_path):
    """Each sample extracts to what 7-Zip extracts (in the namespace 7-Zip reads), and
    as a block device it is its own bytes (SOURCES.tsv sha256)."""
    path = need_real(rel)
    seven = need("7zz")
    if path.endswith(".gz"):
        plain = str(tmp_path / "sample.iso")
        with gzip.open(path) as f, open(plain, "wb") as g:
            shutil.copyfileobj(f, g)
        path = plain
    ref = str(tmp_path / "ref")
    run(seven, "x", "-y", f"-o{ref}", path)
    shutil.rmtree(os.path.join(ref, "[BOOT]"), ignore_errors=True)
    ours = str(tmp_path / "ours")
    code, out, err = cli("iso", "extract", "-q", "--namespace", namespace, path, ours)
    assert code == 0, err
    assert snapshot(ours) == snapshot(ref)
    code, out, err = cli("iso", "ls", "--output", "json", path)
    assert code == 0 and json.loads(out)["namespace"] == auto
    code, out, err = cli("info", "--output", "json", path)
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == "iso" and info["virtual-size"] == os.path.getsize(path)
    assert sha256_file(path) == _sha_of_device(path)


def _sha_of_device(path: str) -> str:
    import diskforge
    from conftest import sha256_device
    with diskforge.open(path) as dev:
        assert dev.format == "iso"
        return sha256_device(dev)


def test_real_hybrid_sample_partitions(tmp_path):
    path = need_real("generated-local/xorriso154_hybrid_mbr_efi.iso.gz")
    plain = str(tmp_path / "h.iso")
    with gzip.open(path) as f, open(plain, "wb") as g:
        shutil.copyfileobj(f, g)
    code, out, _ = cli("info", "--details", "--output", "json", plain)
    info = json.loads(out)
    parts = info["partitions"]["partitions"]
    assert [(p["type"], p["start"]) for p in parts] == [("0x83", 0), ("0xef", 366592)]
    facts = info["format-specific"]["data"]
    assert facts["volume-id"] == "HYBRID_FIXTURE"
    assert [e["platform"] for e in facts["el-torito"]["entries"]] == ["UEFI"]


# -- an ISO is a block device -------------------------------------------------------------

def test_iso_as_block_device(tree, tmp_path):
    need("xorriso")
    iso = str(tmp_path / "x.iso")
    run("xorriso", "-as", "mkisofs", "-quiet", "-R", "-o", iso, tree)
    raw = str(tmp_path / "x.raw")
    assert cli("convert", "-O", "raw", iso, raw)[0] == 0
    assert sha256_file(raw) == sha256_file(iso)
    code, out, _ = cli("compare", iso, raw)
    assert code == 0
    if shutil.which("qemu-img"):
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", iso, raw)
    code, out, err = cli("convert", "-O", "iso", raw, str(tmp_path / "y.iso"))
    assert code != 0 and "not supported yet" in err and "\n" not in err.strip()
    code, out, _ = cli("map", "--output", "json", iso)
    assert code == 0 and json.loads(out)


def test_probe_and_volume_facts(tmp_path):
    need("xorriso")
    src = plain_tree(str(tmp_path / "src"))
    iso = str(tmp_path / "v.iso")
    run("xorriso", "-as", "mkisofs", "-quiet", "--norock", "-V", "MY_VOLUME", "-publisher", "ACME",
        "-p", "PREP", "-A", "APP", "-o", iso, src)
    import diskforge
    with diskforge.open(iso) as dev:
        assert dev.format == "iso"
    code, out, _ = cli("info", "--details", "--output", "json", iso)
    facts = json.loads(out)["format-specific"]["data"]
    assert facts["volume-id"] == "MY_VOLUME"
    assert facts["publisher"] == "ACME" and facts["preparer"] == "PREP"
    assert facts["application"] == "APP"
    assert facts["volume-size"] == os.path.getsize(iso)
    assert facts["volume-descriptors"][0] == {"sector": 16, "type": "primary"}
    assert facts["rock-ridge"] is False and facts["joliet"] is False


def test_ls_of_a_single_path(tree, tmp_path):
    need("xorriso")
    iso = str(tmp_path / "x.iso")
    run("xorriso", "-as", "mkisofs", "-quiet", "-R", "-J", "-o", iso, tree)
    code, out, _ = cli("iso", "ls", iso, "docs")
    assert code == 0
    names = [line.split()[-1] for line in out.splitlines()]
    assert names[:2] == ["guide.md", "notes/"]
    code, out, _ = cli("iso", "ls", iso, "link-to-file")
    assert out.strip().endswith("link-to-file -> hello.txt")
    code, out, err = cli("iso", "ls", iso, "no/such")
    assert code == 1 and "no such file" in err
    # extracting one subtree lands at DEST/its/path
    dest = str(tmp_path / "one")
    assert cli("iso", "extract", "-q", iso, dest, "docs/notes")[0] == 0
    assert os.listdir(dest) == ["docs"]
    assert open(os.path.join(dest, "docs/notes/2020.txt"), "rb").read() == b"notes\n"
    assert int(os.stat(os.path.join(dest, "docs/notes/2020.txt")).st_mtime) == MTIME
