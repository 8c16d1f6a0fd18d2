"""cloud-init NoCloud seed ISOs: ``diskforge iso cloud-init OUT.iso``.

cloud-init's NoCloud data source looks for a file system labelled ``cidata`` holding
``user-data`` and ``meta-data`` (and optionally ``network-config``) at its root. The seed
is an ISO with volume id ``cidata``, Joliet and Rock Ridge (what ``genisoimage -volid
cidata -joliet -rock`` makes, the form cloud-init's documentation gives).

The files come from the user, or are written here from flags for the common case: a
host name, one user with sudo, SSH keys and a password hash. The YAML is written with
the standard library (every string double-quoted with YAML escapes), so it parses the
same in any YAML 1.1 or 1.2 reader.

References: cloud-init docs, "NoCloud" data source and "cloud-config" examples
(users and groups, set hostname); YAML 1.2 §7.3.1 (double-quoted scalars).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field

from ..devices import open_input_file
from ..errors import ImageIOError, UsageError
from .build import BuildOptions, BuildResult, build

USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                     r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
KEY_TYPES = ("ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-")
MAX_FILE = 16 << 20


@dataclass
class SeedSpec:
    """What a cloud-init seed holds."""
    user_data: str | None = None        # paths of files to use as they are
    meta_data: str | None = None
    network_config: str | None = None
    hostname: str | None = None
    user: str | None = None
    ssh_keys: list[str] = field(default_factory=list)   # paths of public key files
    password_hash: str | None = None
    instance_id: str | None = None


def yaml_quote(s: str) -> str:
    """A YAML double-quoted scalar: printable ASCII as is, everything else escaped."""
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        elif o <= 0xFF:
            out.append(f"\\x{o:02x}")
        elif o <= 0xFFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


def _read(path: str, what: str) -> bytes:
    try:
        with open_input_file(path) as f:  # a FIFO or device is refused, not read
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise ImageIOError.from_os(e, path) from None
    if len(data) > MAX_FILE:
        raise UsageError(f"the {what} file is larger than {MAX_FILE >> 20} MiB", path)
    return data


def ssh_keys_from(path: str) -> list[str]:
    keys = []
    for line in _read(path, "SSH key").decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith(KEY_TYPES):
            raise UsageError("not an OpenSSH public key (a line starts with"
                             f" '{line.split()[0][:20]}')", path)
        keys.append(line)
    if not keys:
        raise UsageError("no public key in the file", path)
    return keys


def cloud_config(spec: SeedSpec) -> str:
    """``#cloud-config`` user-data for the flags."""
    lines = ["#cloud-config"]
    if spec.hostname:
        lines.append(f"hostname: {yaml_quote(spec.hostname.split('.')[0])}")
        if "." in spec.hostname:
            lines.append(f"fqdn: {yaml_quote(spec.hostname)}")
    keys = [k for path in spec.ssh_keys for k in ssh_keys_from(path)]
    if spec.user:
        lines += ["users:",
                  f"  - name: {yaml_quote(spec.user)}",
                  '    sudo: "ALL=(ALL) NOPASSWD:ALL"',
                  '    shell: "/bin/bash"']
        if spec.password_hash:
            lines += ["    lock_passwd: false",
                      f"    passwd: {yaml_quote(spec.password_hash)}"]
        if keys:
            lines.append("    ssh_authorized_keys:")
            lines += [f"      - {yaml_quote(k)}" for k in keys]
    elif keys:
        lines.append("ssh_authorized_keys:")
        lines += [f"  - {yaml_quote(k)}" for k in keys]
    return "\n".join(lines) + "\n"


def seed_files(spec: SeedSpec) -> dict[str, bytes]:
    """The seed's files: name → contents."""
    flags = spec.user or spec.ssh_keys or spec.password_hash
    if spec.user_data and flags:
        raise UsageError("give either --user-data or the --user/--ssh-key/--password-hash"
                         " flags, not both")
    if spec.meta_data and spec.instance_id:
        raise UsageError("--instance-id goes into the generated meta-data; with"
                         " --meta-data put it in that file")
    if spec.hostname and spec.user_data and spec.meta_data:
        raise UsageError("--hostname has nowhere to go when both --user-data and"
                         " --meta-data are files")
    if spec.hostname and not HOST_RE.match(spec.hostname):
        raise UsageError(f"invalid host name '{spec.hostname}'")
    if spec.user and not USER_RE.match(spec.user):
        raise UsageError(f"invalid user name '{spec.user}' (lower case letters, digits, '_'"
                         " and '-', starting with a letter or '_', at most 32)")
    if spec.password_hash is not None:
        if not spec.user:
            raise UsageError("--password-hash needs --user")
        if not re.match(r"^\$[0-9a-z]+\$\S+$", spec.password_hash) or ":" in spec.password_hash:
            raise UsageError("--password-hash takes a crypt(3) hash such as '$6$salt$...'"
                             " (make one with 'mkpasswd -m sha-512' or 'openssl passwd -6')")
    files: dict[str, bytes] = {}
    if spec.user_data:
        files["user-data"] = _read(spec.user_data, "user-data")
    else:
        files["user-data"] = cloud_config(spec).encode()
    if spec.meta_data:
        files["meta-data"] = _read(spec.meta_data, "meta-data")
    else:
        iid = spec.instance_id or "iid-" + hashlib.sha256(
            files["user-data"] + (spec.hostname or "").encode()).hexdigest()[:16]
        meta = [f"instance-id: {yaml_quote(iid)}"]
        if spec.hostname:
            meta.append(f"local-hostname: {yaml_quote(spec.hostname)}")
        files["meta-data"] = ("\n".join(meta) + "\n").encode()
    if spec.network_config:
        files["network-config"] = _read(spec.network_config, "network-config")
    return files


def build_seed(out: str, spec: SeedSpec, *, source_date_epoch: int | None = None,
               progress=None) -> BuildResult:
    """Write the NoCloud seed ISO ``out``."""
    files = seed_files(spec)
    with tempfile.TemporaryDirectory(prefix="diskforge-seed-") as tmp:
        when = source_date_epoch
        for name, data in files.items():
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o644)
            if when is not None:
                os.utime(path, (when, when))
        if when is not None:
            os.utime(tmp, (when, when))
        opts = BuildOptions(volume_id="cidata", joliet=True, rock_ridge=True,
                            rational_rock=True, source_date_epoch=source_date_epoch)
        return build(tmp, out, opts, progress=progress)
