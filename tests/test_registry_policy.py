"""Plugin discovery, probing, lookup, and the policy for files that images name."""

import os

import pytest
from conftest import make_sparse, need

from diskforge import registry
from diskforge.errors import SafetyError, UnknownFormatError, UsageError
from diskforge.policy import OpenPolicy


def test_builtin_formats_come_from_entry_points():
    eps = registry._eps()
    assert eps["raw"].value == "diskforge.formats.raw:FORMAT"
    assert registry.get("raw").name == "raw"


def test_entry_point_file_parsing():
    text = "[console_scripts]\nx = a:b\n\n[diskforge.formats]\nfoo = pkg.mod:FORMAT\n" \
           "# comment\nbar=pkg.bar:Plugin\n[other]\nbaz = q:r\n"
    assert list(registry._parse_group(text, "diskforge.formats")) == [
        ("foo", "pkg.mod:FORMAT"), ("bar", "pkg.bar:Plugin")]


def test_third_party_plugin_via_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "dfplug"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from diskforge.registry import Format\n"
        "class Toy(Format):\n    name = 'toy'\n    extensions = ('toy',)\n"
        "    def probe(self, head, tail, size):\n        return 90 if head[:3] == b'TOY' else 0\n"
        "FORMAT = Toy()\n")
    dist = tmp_path / "dfplug-1.0.dist-info"
    dist.mkdir()
    (dist / "entry_points.txt").write_text("[diskforge.formats]\ntoy = dfplug:FORMAT\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points", None)
    monkeypatch.setattr(registry, "_loaded", {})
    monkeypatch.setattr(registry, "_all_loaded", False)
    assert "toy" in registry.all_formats() and "raw" in registry.all_formats()
    f = tmp_path / "x.bin"
    f.write_bytes(b"TOY" + bytes(1000))
    assert registry.probe(str(f)).name == "toy"
    assert registry.by_extension("disk.TOY").name == "toy"


def test_probe_falls_back_to_raw_but_write_targets_are_never_guessed(tmp_path):
    f = make_sparse(str(tmp_path / "noext"), 4096, [(0, b"hello")])
    assert registry.probe(f).name == "raw"
    with pytest.raises(UsageError):
        registry.target_format(str(tmp_path / "out.weird"), None)
    assert registry.target_format(str(tmp_path / "out.weird"), "raw").name == "raw"
    with pytest.raises(UnknownFormatError):
        registry.get("nope")


def test_untrusted_policy_keeps_references_inside_the_image_directory(tmp_path):
    img = tmp_path / "vm" / "disk.qcow2"
    img.parent.mkdir()
    p = OpenPolicy.untrusted()
    assert p.resolve(str(img), "base.qcow2") == str(tmp_path / "vm" / "base.qcow2")
    assert p.resolve(str(img), "sub/base.qcow2").endswith("vm/sub/base.qcow2")
    for hostile in ("/etc/passwd", "../outside.qcow2", "sub/../../x"):
        with pytest.raises(SafetyError):
            p.resolve(str(img), hostile)
    os.symlink("/etc", str(tmp_path / "vm" / "etc-link"))
    with pytest.raises(SafetyError):
        p.resolve(str(img), "etc-link/passwd")
    allowed = OpenPolicy.untrusted(allowed_roots=(str(tmp_path),))
    assert allowed.resolve(str(img), "../outside.qcow2") == str(tmp_path / "vm" /
                                                                  "../outside.qcow2")


def test_default_policy_follows_references_anywhere_but_system_files(tmp_path):
    img = tmp_path / "vm" / "disk.qcow2"
    img.parent.mkdir()
    (tmp_path / "outside.qcow2").write_bytes(b"x")
    p = OpenPolicy()
    assert p.resolve(str(img), "../outside.qcow2") == str(tmp_path / "vm" /
                                                            "../outside.qcow2")
    assert p.resolve(str(img), "/etc/passwd") == "/etc/passwd"
    assert p.resolve(str(img), "not-there-yet") == str(tmp_path / "vm" / "not-there-yet")
    os.mkfifo(tmp_path / "vm" / "fifo")
    os.symlink("/proc/self/environ", tmp_path / "vm" / "env")
    for name, words in (("fifo", "a FIFO (named pipe); files an image names must be"
                         " regular files"), ("env", "under /proc"),
                        ("/sys/kernel/notes", "under /sys"), ("/dev/zero", "under /dev"),
                        ("../vm/../../" * 20 + "proc/self/mem", "under /proc")):
        with pytest.raises(SafetyError, match=words.replace("(", r"\(").replace(")", r"\)")):
            p.resolve(str(img), name)
    # confine=True (an OVF's files) confines in the default mode too
    with pytest.raises(SafetyError, match="outside"):
        p.resolve(str(img), "../outside.qcow2", "OVF file", confine=True)


def test_policy_refuses_loops_and_deep_chains(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    p = OpenPolicy(max_depth=3).descend(a).descend(b)
    with pytest.raises(SafetyError, match="loop"):
        p.descend(a)
    with pytest.raises(SafetyError, match="deeper"):
        p.descend(str(tmp_path / "c")).descend(str(tmp_path / "d"))




# -- signatures: probing imports only the plugins whose magic is there ---------------------

def _samples(tmp_path):
    """(label, head, tail, size) of real files of every built-in format: made by
    qemu-img here, the fixtures (gzipped ones unpacked), and hand-made heads for the
    cases no tool here writes (old VHD footers, cut DMG trailers, encrypted wrappers,
    OVF descriptors, Parallels bundle descriptors, stream VMDK descriptors...)."""
    import gzip
    import io
    import subprocess
    import tarfile
    from conftest import FIXTURES, REAL

    paths = []
    qemu_img = need("qemu-img")
    for fmt, opts in [("raw", ""), ("qcow", ""), ("qcow2", "compat=0.10"),
                      ("qcow2", "compat=1.1"), ("qed", ""), ("vdi", ""), ("vhdx", ""),
                      ("vpc", "subformat=dynamic"), ("vpc", "subformat=fixed"),
                      ("vmdk", "subformat=monolithicSparse"),
                      ("vmdk", "subformat=monolithicFlat"),
                      ("vmdk", "subformat=streamOptimized"), ("parallels", "")]:
        path = str(tmp_path / f"{fmt}-{opts.replace('=', '-') or 'default'}.img")
        cmd = [qemu_img, "create", "-q", "-f", fmt] + (["-o", opts] if opts else [])
        subprocess.run(cmd + [path, "1M"], check=True)
        paths.append(path)
    for top in (FIXTURES, REAL):
        for folder, _, files in os.walk(top):
            paths += [os.path.join(folder, f) for f in files]
    out = []
    for path in sorted(paths):
        if path.endswith(".gz"):
            with gzip.open(path) as f:
                data = f.read()
            out.append((path, data[:registry.PROBE_BYTES], data[-registry.PROBE_BYTES:],
                        len(data)))
        elif os.path.getsize(path):
            out.append((path, *registry.read_probe_window(path)))
    footer = b"conectix" + bytes(504)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.USTAR_FORMAT) as t:
        t.addfile(tarfile.TarInfo("VM.OVF"), io.BytesIO(b""))
    made = {
        "vhd footer of 511 bytes": bytes(4096) + footer[:511],
        "dmg trailer cut short": bytes(1024) + b"<plist/></plist>" + b"koly" + bytes(300),
        "encrcdsa": b"encrcdsa" + bytes(4096),
        "AEA1": b"AEA1" + bytes(4096),
        "cdsaencr": bytes(4096) + b"cdsaencr",
        "ovf descriptor": b'<?xml version="1.0"?>\n<ovf:Envelope xmlns:ovf="http://'
                          b'schemas.dmtf.org/ovf/envelope/1"></ovf:Envelope>\n',
        "ova tar": tar.getvalue(),
        "parallels bundle": b'<?xml version="1.0"?>\n<Parallels_disk_image Version="1.0">'
                            b"</Parallels_disk_image>\n",
        "parallels other version": b"WithoutFreeSpace\x03\x00\x00\x00" + bytes(4096),
        "vmdk comment descriptor": b"# written by a converter\nversion=1\n"
                                   b'createType="streamOptimized"\n',
        "luks1": b"LUKS\xba\xbe\x00\x01" + bytes(4096),
        "luks2": b"LUKS\xba\xbe\x00\x02" + bytes(4096),
        "asif": b"shdw\x00\x00\x00\x01" + bytes(4096),
        "sparseimage": b"sprs" + bytes(8192),
    }
    for label, data in made.items():
        out.append((label, data[:registry.PROBE_BYTES], data[-registry.PROBE_BYTES:],
                    len(data)))
    return out


def test_signatures_never_hide_a_format_from_its_probe(tmp_path):
    """A built-in is not imported to probe a file without its signature: so every file
    its probe claims (any score above 0) must carry it. Every format is met."""
    claimed = set()
    for label, head, tail, size in _samples(tmp_path):
        for name, signatures in registry.SIGNATURES.items():
            plugin = registry.get(name)
            if plugin.can_probe and plugin.probe(head, tail, size) > 0:
                claimed.add(name)
                assert registry.signature_matches(signatures, head, tail), (name, label)
    probed = {name for name, plugin in registry.known_formats().items()
              if name in registry.BUILTIN and plugin.can_probe}
    assert claimed == probed - {registry.FALLBACK}


def test_every_builtin_is_in_the_signature_tables():
    for name in registry.BUILTIN:
        plugin = registry.get(name)
        if name == registry.FALLBACK:
            assert plugin.probe(b"anything", b"", 8) == registry.FALLBACK_SCORE
            continue
        assert name in registry.SIGNATURES, name
        assert bool(registry.SIGNATURES[name]) == plugin.can_probe, name
        assert (name in registry.DIRECTORY_FORMATS) == hasattr(plugin, "probe_directory")


def test_signature_forms():
    m = registry.signature_matches
    assert m((registry.at(2, b"ab"),), b"xxab", b"")
    assert not m((registry.at(3, b"ab"),), b"xxab", b"")
    assert m((registry.at(-4, b"ab"),), b"", b"abcd")
    assert not m((registry.at(-5, b"ab"),), b"", b"abcd")  # before the file's start
    assert m((registry.within(b"ovf", anycase=True),), b"x.OVF", b"")
    assert not m((registry.within(b"ovf"),), b"x.OVF", b"")
    assert m((registry.within(b"ko", -3),), b"", b"xxkoy")
    assert not m((registry.within(b"ko", 0, 2),), b"xko", b"")


def test_a_replaced_builtin_is_always_asked(tmp_path, monkeypatch):
    class Everything(registry.Format):
        name = "qed"

        def probe(self, head, tail, size):
            return 100
    monkeypatch.setitem(registry._loaded, "qed", Everything())
    f = tmp_path / "x"
    f.write_bytes(bytes(4096))
    assert isinstance(registry.probe(str(f)), Everything)
