"""Plugin discovery, probing, lookup, and the policy for files that images name."""

import os

import pytest
from conftest import make_sparse

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


