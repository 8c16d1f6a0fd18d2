"""qemu-img's wording where scripts read it: the ``Formatting ...`` line of ``create``,
the ``-o help`` listing, the cache modes of ``-t``/``-T`` and ``-l`` snapshot specs.

Kept apart from the subcommands so that each of them stays thin, and so that what is
copied from qemu-img's behaviour (not its code) is in one place to check against a new
qemu-img release (``main.QEMU_IMG_INTERFACE`` names the one followed).
"""

from __future__ import annotations

from ..errors import UsageError

# ``..options`` (its parse_size and split_option_string) is imported where used: it
# defines the option dataclasses, which a command that only opens an image
# (``info``, whose ``open_source`` imports this module) never needs

# The order in which qemu-img 7.2's ``create`` prints each format's options on its
# ``Formatting 'NAME', fmt=FMT ...`` line, with the default it prints when the option was
# not given (None: printed only when given). Observed from qemu-img itself; formats not
# listed print ``size`` then the given options in the order given.
_FORMATTING: dict[str, list[tuple[str, str | None]]] = {
    "qcow2": [("encrypt.format", None), ("encrypt.key-secret", None),
              ("encrypt.cipher-alg", None), ("encrypt.cipher-mode", None),
              ("encrypt.ivgen-alg", None), ("encrypt.ivgen-hash-alg", None),
              ("encrypt.hash-alg", None), ("encrypt.iter-time", None),
              ("cluster_size", "65536"), ("extended_l2", "off"), ("preallocation", None),
              ("compression_type", "zlib"), ("size", None), ("compat", None),
              ("backing_file", None), ("backing_fmt", None), ("encryption", None),
              ("data_file", None), ("data_file_raw", None), ("lazy_refcounts", "off"),
              ("refcount_bits", "16")],
    "raw": [("size", None), ("preallocation", None)],
    "vpc": [("size", None), ("subformat", None), ("force_size", None)],
    "vhdx": [("size", None), ("log_size", "1048576"), ("block_size", "0"),
             ("subformat", None), ("block_state_zero", None)],
    "vmdk": [("size", None), ("adapter_type", None), ("backing_file", None),
             ("backing_fmt", None), ("compat6", "off"), ("hwversion", "undefined"),
             ("toolsversion", None), ("subformat", None), ("zeroed_grain", None)],
    "vdi": [("size", None), ("block_size", None), ("static", "off")],
}

# options whose values qemu-img prints as a byte count whatever suffix was given
_SIZE_KEYS = {"size", "cluster_size", "log_size", "block_size"}


def formatting_line(filename: str, fmt: str, size: int, given: dict[str, str],
                    backing: str | None = None, backing_fmt: str | None = None) -> str:
    """``Formatting 'disk.qcow2', fmt=qcow2 cluster_size=65536 ... size=N ...``, as
    qemu-img's ``create`` prints it before creating the image."""
    from ..options import parse_size
    values = dict(given)
    values["size"] = str(size)
    if backing:
        values["backing_file"] = backing
    if backing_fmt:
        values["backing_fmt"] = backing_fmt
    for key in _SIZE_KEYS & values.keys():
        try:
            values[key] = str(parse_size(values[key]))
        except UsageError:
            pass
    order = _FORMATTING.get(fmt)
    parts = []
    if order is None:
        parts.append(f"size={size}")
        parts += [f"{k}={v}" for k, v in values.items() if k != "size"]
    else:
        for key, default in order:
            value = values.get(key, default)
            if value is not None:
                parts.append(f"{key}={value}")
    return f"Formatting '{filename}', fmt={fmt} " + " ".join(parts)


# qemu-img 7.2's ``-o help`` option lines, verbatim (``qemu-img create -f FMT -o help``,
# ``qemu-img amend -f qcow2 -o help``), so scripts and people comparing the two tools see
# the same listing. diskforge accepts every option listed (the encrypt.* ones and
# encryption with "not supported yet"); the options diskforge adds are listed by
# ``diskforge formats --options FMT``, not here: the listing stays qemu-img's byte for byte.
_QEMU_OPTION_LINES: dict[str, str] = {
    'qcow2': (
        '  backing_file=<str>     - File name of a base image\n'
        '  backing_fmt=<str>      - Image format of the base image\n'
        '  cluster_size=<size>    - qcow2 cluster size\n'
        '  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])\n'
        '  compression_type=<str> - Compression method used for image cluster compression\n'
        '  data_file=<str>        - File name of an external data file\n'
        '  data_file_raw=<bool (on/off)> - The external data file must stay valid as a '
        'raw image\n'
        '  encrypt.cipher-alg=<str> - Name of encryption cipher algorithm\n'
        '  encrypt.cipher-mode=<str> - Name of encryption cipher mode\n'
        "  encrypt.format=<str>   - Encrypt the image, format choices: 'aes', 'luks'\n"
        '  encrypt.hash-alg=<str> - Name of encryption hash algorithm\n'
        '  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds\n'
        '  encrypt.ivgen-alg=<str> - Name of IV generator algorithm\n'
        '  encrypt.ivgen-hash-alg=<str> - Name of IV generator hash algorithm\n'
        '  encrypt.key-secret=<str> - ID of secret providing qcow AES key or LUKS '
        'passphrase\n'
        "  encryption=<bool (on/off)> - Encrypt the image with format 'aes'. "
        '(Deprecated in favor of encrypt.format=aes)\n'
        '  extended_l2=<bool (on/off)> - Extended L2 tables\n'
        '  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n'
        '  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, '
        'falloc, full)\n'
        '  refcount_bits=<num>    - Width of a reference count entry in bits\n'
        '  size=<size>            - Virtual disk size\n'
    ),
    'raw': (
        '  size=<size>            - Virtual disk size\n'
    ),
    'vpc': (
        '  force_size=<bool (on/off)> - Force disk size calculation to use the actual '
        'size specified, rather than using the nearest CHS-based calculation\n'
        '  size=<size>            - Virtual disk size\n'
        '  subformat=<str>        - Type of virtual hard disk format. Supported '
        'formats are {dynamic (default) | fixed} \n'
    ),
    'vhdx': (
        '  block_size=<size>      - Block Size; min 1MB, max 256MB. 0 means '
        'auto-calculate based on image size.\n'
        '  block_state_zero=<bool (on/off)> - Force use of payload blocks of type '
        "'ZERO'. Non-standard, but default.  Do not set to 'off' when using 'qemu-img "
        "convert' with subformat=dynamic.\n"
        '  log_size=<size>        - Log size; min 1MB.\n'
        '  size=<size>            - Virtual disk size; max of 64TB.\n'
        "  subformat=<str>        - VHDX format type, can be either 'dynamic' or "
        "'fixed'. Default is 'dynamic'.\n"
    ),
    'vmdk': (
        '  adapter_type=<str>     - Virtual adapter type, can be one of ide (default), '
        'lsilogic, buslogic or legacyESX\n'
        '  backing_file=<str>     - File name of a base image\n'
        "  backing_fmt=<str>      - Must be 'vmdk' if present\n"
        '  compat6=<bool (on/off)> - VMDK version 6 image\n'
        '  hwversion=<str>        - VMDK hardware version\n'
        '  size=<size>            - Virtual disk size\n'
        '  subformat=<str>        - VMDK flat extent format, can be one of '
        '{monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | '
        'twoGbMaxExtentFlat | streamOptimized} \n'
        '  toolsversion=<str>     - VMware guest tools version\n'
        '  zeroed_grain=<bool (on/off)> - Enable efficient zero writes using the '
        'zeroed-grain GTE feature\n'
    ),
    'vdi': (
        '  size=<size>            - Virtual disk size\n'
        '  static=<bool (on/off)> - VDI static (pre-allocated) image\n'
    ),
}
_QEMU_AMEND_LINES: dict[str, str] = {
    'qcow2': (
        '  backing_file=<str>     - File name of a base image\n'
        '  backing_fmt=<str>      - Image format of the base image\n'
        '  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])\n'
        '  data_file=<str>        - File name of an external data file\n'
        '  data_file_raw=<bool (on/off)> - The external data file must stay valid as a '
        'raw image\n'
        '  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds\n'
        '  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly\n'
        '  encrypt.new-secret=<str> - New secret to set in the matching keyslots. '
        'Empty string to erase\n'
        '  encrypt.old-secret=<str> - Select all keyslots that match this password\n'
        '  encrypt.state=<str>    - Select new state of affected keyslots '
        '(active/inactive)\n'
        '  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n'
        '  refcount_bits=<num>    - Width of a reference count entry in bits\n'
        '  size=<size>            - Virtual disk size\n'
    ),
}


_QEMU_TYPE = {"bool": "bool (on/off)", "int": "num", "size": "size", "str": "str"}


def option_help(fmt, *, amend: bool = False) -> str:
    """A format's ``-o`` options in qemu-img's layout (``Supported qcow2 options:``, one
    ``  name=<type> - help`` line each, sorted by name, ``size`` included), with
    diskforge's own descriptions. For the formats qemu-img 7.2 has, its own listing,
    verbatim: scripts and people comparing the tools see the same text."""
    table = _QEMU_AMEND_LINES if amend else _QEMU_OPTION_LINES
    if fmt.name in table:
        lines = [table[fmt.name].rstrip("\n")]
    else:
        lines = _own_option_lines(fmt)
    title = f"Amend options for '{fmt.name}':" if amend else f"Supported {fmt.name} options:"
    out = title + "\n" + "\n".join(lines) + "\n"
    if not amend:
        out += ("\nThe protocol level may support further options.\n"
                "Specify the target filename to include those options.\n")
    return out


def own_option_help(fmt) -> str:
    """Every ``-o`` option diskforge takes for ``fmt`` (qemu-img's and its own), in the
    same layout: what ``diskforge formats --options FMT`` prints."""
    return f"diskforge {fmt.name} options:\n" + "\n".join(_own_option_lines(fmt)) + "\n"


def _own_option_lines(fmt) -> list[str]:
    rows = {r["name"]: r for r in fmt.options.describe()}
    lines = []
    names = sorted(set(rows) | {"size"})
    for name in names:
        r = rows.get(name)
        typ = _QEMU_TYPE.get(r["type"], "str") if r else "size"
        text = r["help"] if r else "Virtual disk size"
        extra = []
        if r and r.get("choices"):
            extra.append("allowed values: " + ", ".join(r["choices"]))
        default = r["default"] if r else None
        if isinstance(default, bool):
            default = "on" if default else "off"
        if default not in (None, ""):
            extra.append(f"default: {default}")
        if extra:
            text += f" ({'; '.join(extra)})"
        head = f"  {name}=<{typ}>"
        lines.append(f"{head:<24} - {text}" if len(head) < 24 else f"{head} - {text}")
    return lines


def pop_size(specs: list[str]) -> tuple[str | None, list[str]]:
    """qemu-img takes the virtual size as ``-o size=...`` too: take it out of the ``-o``
    strings (the last one given wins) and return it with what is left."""
    from ..options import split_option_string
    size = None
    rest = []
    for spec in specs:
        if spec.strip() in ("help", "?"):
            rest.append(spec)
            continue
        values = split_option_string(spec)
        if "size" in values:
            size = values.pop("size")
            spec = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in values.items())
        if spec:
            rest.append(spec)
    return size, rest


CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")


def cache_mode(value: str | None, what: str) -> str | None:
    """Validate a ``-t``/``-T`` cache mode (qemu's names; ``off`` is ``none``'s alias
    in qemu, ``directsync`` is O_DIRECT plus a flush at the end)."""
    if value is None:
        return None
    if value == "off":
        return "none"
    if value not in CACHE_MODES:
        raise UsageError(f"Invalid {what} cache option: {value} (one of "
                         + ", ".join(CACHE_MODES) + ")")
    return value


def snapshot_spec(text: str | None) -> str | None:
    """``-l``'s argument: ``snapshot.name=NAME``, ``snapshot.id=ID`` or a bare ID or
    name, as qemu-img's convert accepts; the ID or name to look for."""
    if text is None:
        return None
    if "=" not in text or not text.startswith("snapshot."):
        return text
    from ..options import split_option_string
    values = split_option_string(text)
    name, ident = values.pop("snapshot.name", None), values.pop("snapshot.id", None)
    if values:
        raise UsageError(f"invalid snapshot spec '{text}': only snapshot.name= and"
                         " snapshot.id= are known")
    if name and ident:
        raise UsageError(f"invalid snapshot spec '{text}': give snapshot.name= or"
                         " snapshot.id=, not both")
    return name or ident


# --image-opts keys that change nothing diskforge does (qemu's AIO engine, discard and
# zero-detection policies, flush tuning): accepted so scripts that pass them work
_IGNORED_IMAGE_OPTS = {"aio", "file.aio", "discard", "detect-zeroes", "read-only",
                       "auto-read-only", "cache.no-flush", "cache.direct", "force-share"}


def _nbd_url(values: dict, prefix: str, objects) -> str:
    """QEMU's nbd driver options (``server.type=inet,server.host=H,server.port=P`` or
    ``server.type=unix,server.path=SOCK``, ``export=NAME``, ``tls-creds=ID``,
    ``tls-hostname=NAME``) as the NBD URI diskforge opens: ``nbds``/``nbds+unix`` with
    ``tls-certificates=DIR`` (and ``tls-verify-peer=false``, ``tls-hostname=``) when
    they name TLS credentials."""
    from urllib.parse import quote, urlencode

    from ..errors import UnsupportedError
    from .secrets import tls_creds

    def take(key: str) -> str | None:
        return values.pop(prefix + key, None)
    kind = take("server.type") or "inet"
    host, port, sock = take("server.host"), take("server.port"), take("server.path")
    host, port, sock = host or take("host"), port or take("port"), sock or take("path")
    export = take("export") or ""
    creds_id = take("tls-creds")
    hostname = take("tls-hostname")
    query: dict[str, str] = {}
    if creds_id is not None:
        creds = tls_creds(objects).get(creds_id)
        if creds is None:
            raise UsageError(f"No TLS credentials with id '{creds_id}'")
        query["tls-certificates"] = creds.directory
        if not creds.verify_peer:
            query["tls-verify-peer"] = "false"
        if hostname:
            query["tls-hostname"] = hostname
    scheme = "nbds" if creds_id is not None else "nbd"
    filename = take("filename")
    if filename is not None:  # the nbd driver's filename: a URI
        head, sep, rest = filename.partition("://")
        if not sep or head.lower() not in ("nbd", "nbd+unix", "nbds", "nbds+unix"):
            raise UsageError(f"--image-opts {prefix}driver=nbd: '{filename}' is not an"
                             " NBD URI (nbd://HOST[:PORT]/NAME, nbd+unix:///NAME?"
                             "socket=PATH)")
        if query:
            head = head.lower().replace("nbds", "nbd").replace("nbd", "nbds")
            rest += ("&" if "?" in rest else "?") + urlencode(query, safe="/")
        return f"{head}://{rest}"
    name = quote(export, safe="")
    if kind == "unix" or (sock and not host):
        if not sock:
            raise UsageError("--image-opts driver=nbd: server.type=unix needs"
                             " server.path=SOCKET")
        return f"{scheme}+unix:///{name}?" + urlencode({"socket": sock, **query}, safe="/")
    if kind != "inet":
        raise UnsupportedError(f"not supported yet: nbd server.type={kind} (inet, unix)")
    if not host:
        raise UsageError("--image-opts driver=nbd: needs server.host= (or"
                         " server.type=unix,server.path=)")
    netloc = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{netloc}:{port or 10809}/{name}"
    return url + ("?" + urlencode(query, safe="/") if query else "")


def _curl_url(values: dict, protocol: str) -> str | None:
    """``file.driver=http|https,file.url=URL`` as QEMU's curl driver takes it: the URL
    (read by remote/http.py). Its tuning keys are accepted and left to diskforge's own
    readahead and timeouts; ``sslverify=off`` is refused rather than ignored."""
    from ..errors import UnsupportedError
    url = values.pop("file.url", None)
    if not url:
        raise UsageError(f"--image-opts file.driver={protocol} needs file.url=")
    if not url.lower().startswith(f"{protocol}://"):
        raise UsageError(f"file.url '{url}' is not a {protocol}:// URL")
    for key in ("file.readahead", "file.timeout"):
        values.pop(key, None)
    if values.pop("file.sslverify", "on") not in ("on", "true", "yes"):
        raise UnsupportedError("not supported yet: --image-opts file.sslverify=off (https"
                               " is checked against the system CA store)", url)
    return url


def image_opts(text: str, objects=()) -> tuple[str, str | None, bool, str | None]:
    """``--image-opts`` and ``--target-image-opts``: the image named by an option string
    (``driver=qcow2,file.filename=disk.qcow2,file.locking=off``) instead of a file name.
    Returns the path, the format (``driver``; None: probe), whether locks are shared
    (``file.locking=off``, read as ``-U``) and the id of the secret holding its
    passphrase (``key-secret=`` for LUKS, ``encrypt.key-secret=`` for qcow2).
    ``objects`` are the command's ``--object`` definitions, where an NBD image's
    ``tls-creds=ID`` is looked up."""
    from ..errors import UnsupportedError
    from ..options import split_option_string
    values = split_option_string(text)
    protocol = values.get("file.driver", "file")
    if values.get("driver") == "nbd":  # QEMU's nbd driver: the export's bytes, raw
        path = _nbd_url(values, "", objects)
        values["driver"] = "raw"
    elif protocol == "nbd":
        path = _nbd_url(values, "file.", objects)
    elif protocol in ("http", "https"):  # QEMU's curl driver: the image is file.url
        path = _curl_url(values, protocol)
    else:
        path = values.pop("file.filename", None) or values.pop("filename", None)
    if not path:
        raise UsageError(f"Could not open '{text}': --image-opts needs file.filename=")
    driver = values.pop("driver", None)
    if driver == "file":
        driver = "raw"
    protocol = values.pop("file.driver", "file")
    if protocol not in ("file", "http", "https", "nbd"):
        raise UnsupportedError(f"not supported yet: --image-opts file.driver={protocol}"
                               " (file, http, https, nbd)", path)
    locking = values.pop("file.locking", values.pop("locking", "auto"))
    if locking not in ("on", "off", "auto"):
        raise UsageError(f"invalid value '{locking}' for file.locking: on, off or auto")
    key_id = values.pop("key-secret", None) or values.pop("encrypt.key-secret", None)
    values.pop("encrypt.format", None)  # the image says which; diskforge reads both
    for key in list(values):
        if key in _IGNORED_IMAGE_OPTS:
            del values[key]
    if values:
        raise UsageError("--image-opts: unknown or unsupported key(s) "
                         + ", ".join(sorted(values)), path)
    return path, driver, locking == "off", key_id
