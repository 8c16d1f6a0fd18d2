"""cloud-init NoCloud seeds: volume id ``cidata`` (as isoinfo and blkid-style readers
see it), Joliet and Rock Ridge, ``user-data``/``meta-data`` at the root, user-data that
parses as YAML under its ``#cloud-config`` header."""

from __future__ import annotations

import os
import re

import pytest
import yaml
from conftest import cli, need, one_line_error, run
from hypothesis import given, settings
from hypothesis import strategies as st

from diskforge.iso.cloudinit import yaml_quote

KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq4f8GZ1QmUqv5Jr0a1bP0m0yQHj7V4dOQzZl3oWzGk"
       " alice@example")
HASH = "$6$saltsalt$dq3u9TaXyZLa3x2fUTFIdCvvCwkAV1wWbp5N3cTQ9KXhZ2dWyTzZP6Kd6mnvnzrnz9GL4H8v5Fx6T4EwIbSJS/"


def seed_files(iso: str, tmp_path) -> dict[str, bytes]:
    dest = tmp_path / "seed"
    need("xorriso")
    run("xorriso", "-osirrox", "on", "-indev", iso, "-extract", "/", str(dest))
    return {n: (dest / n).read_bytes() for n in os.listdir(dest)}


def test_seed_from_flags(tmp_path):
    key = tmp_path / "id.pub"
    key.write_text(f"# my key\n{KEY}\n")
    iso = str(tmp_path / "seed.iso")
    code, out, err = cli("iso", "cloud-init", iso, "--hostname", "web1.example.org",
                         "--user", "alice", "--ssh-key", str(key), "--password-hash", HASH)
    assert code == 0, err
    need("isoinfo")
    info = run("isoinfo", "-d", "-i", iso).stdout
    assert "Volume id: cidata" in info
    assert "Joliet with UCS level 3 found" in info
    assert "Rock Ridge signatures version 1 found" in info
    assert set(run("isoinfo", "-R", "-f", "-i", iso).stdout.split()) == \
        {"/user-data", "/meta-data"}
    assert set(run("isoinfo", "-J", "-f", "-i", iso).stdout.split()) == \
        {"/user-data", "/meta-data"}
    files = seed_files(iso, tmp_path)
    user_data = files["user-data"].decode()
    assert user_data.startswith("#cloud-config\n")
    doc = yaml.safe_load(user_data)
    assert doc["hostname"] == "web1" and doc["fqdn"] == "web1.example.org"
    (user,) = doc["users"]
    assert user["name"] == "alice" and user["passwd"] == HASH
    assert user["ssh_authorized_keys"] == [KEY]
    assert user["lock_passwd"] is False and user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    meta = yaml.safe_load(files["meta-data"])
    assert meta["local-hostname"] == "web1.example.org"
    assert re.fullmatch(r"iid-[0-9a-f]{16}", meta["instance-id"])


def test_seed_from_files(tmp_path):
    (tmp_path / "ud").write_text("#cloud-config\npackages: [htop]\n")
    (tmp_path / "md").write_text("instance-id: i-123\nlocal-hostname: box\n")
    (tmp_path / "nc").write_text("version: 2\nethernets:\n  eth0:\n    dhcp4: true\n")
    iso = str(tmp_path / "seed.iso")
    code, _, err = cli("iso", "cloud-init", iso, "--user-data", str(tmp_path / "ud"),
                       "--meta-data", str(tmp_path / "md"), "--network-config",
                       str(tmp_path / "nc"))
    assert code == 0, err
    files = seed_files(iso, tmp_path)
    assert files == {"user-data": (tmp_path / "ud").read_bytes(),
                     "meta-data": (tmp_path / "md").read_bytes(),
                     "network-config": (tmp_path / "nc").read_bytes()}
    code, out, _ = cli("info", "--output", "json", iso)
    import json
    assert json.loads(out)["format-specific"]["data"]["volume-id"] == "cidata"


def test_minimal_seed_and_ssh_key_for_the_default_user(tmp_path):
    key = tmp_path / "k.pub"
    key.write_text(KEY + "\n")
    iso = str(tmp_path / "s.iso")
    assert cli("iso", "cloud-init", iso, "--ssh-key", str(key))[0] == 0
    doc = yaml.safe_load(seed_files(iso, tmp_path)["user-data"])
    assert doc == {"ssh_authorized_keys": [KEY]}


def test_seed_is_reproducible(tmp_path):
    from conftest import cli_process, sha256_file
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    for name in ("a.iso", "b.iso"):
        proc = cli_process("iso", "cloud-init", str(tmp_path / name), "--hostname", "h",
                           env=env)
        assert proc.returncode == 0, proc.stderr
    assert sha256_file(tmp_path / "a.iso") == sha256_file(tmp_path / "b.iso")


@pytest.mark.parametrize("args,words", [
    (["--user", "Bad User"], "invalid user name"),
    (["--hostname=-bad-"], "invalid host name"),
    (["--password-hash", "plaintext", "--user", "bob"], "crypt(3)"),
    (["--password-hash", HASH], "needs --user"),
    (["--user-data", "/dev/null", "--user", "bob"], "not both"),
    (["--ssh-key", "/nonexistent/key.pub"], "No such file"),
])
def test_bad_flags(args, words, tmp_path):
    code, _, err = cli("iso", "cloud-init", str(tmp_path / "x.iso"), *args)
    one_line_error(code, err)
    assert words in err
    assert not (tmp_path / "x.iso").exists()


def test_not_a_public_key(tmp_path):
    bad = tmp_path / "id_rsa"
    bad.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n")
    code, _, err = cli("iso", "cloud-init", str(tmp_path / "x.iso"), "--ssh-key", str(bad))
    one_line_error(code, err)
    assert "not an OpenSSH public key" in err


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_yaml_quote_round_trips(text):
    """Whatever the text (quotes, backslashes, control characters, emoji), the quoted
    scalar parses back to it."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return   # lone surrogates cannot be encoded anyway
    assert yaml.safe_load(f"v: {yaml_quote(text)}\n")["v"] == text
