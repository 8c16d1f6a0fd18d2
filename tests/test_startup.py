"""Start-up: what ``diskforge info`` imports, and the tables that keep it small.

No timings (the machine may be shared): the guard is the set of modules a command
loads, read from ``sys.modules`` in a fresh interpreter after ``main()`` ran.
"""

import json
import os
import subprocess
import sys
import tomllib

import pytest
from conftest import need

from diskforge import registry
from diskforge.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what `diskforge info` on a qcow2 must not import: the heavy parts construct never
# uses here, the other command groups, packages for other commands, slow discovery
NOT_FOR_INFO = (
    "pdb", "pickle", "hashlib", "traceback", "platform", "concurrent.futures",
    "importlib.metadata", "email",
    "json", "typing", "pycdlib", "inspect", "ast",
    "diskforge.hypervisor", "diskforge.iso", "diskforge.export", "diskforge.crypto",
    "diskforge.remote", "diskforge.batch", "diskforge.ops.convert",
    "diskforge.cli.hypervisor", "diskforge.cli.iso", "diskforge.cli.export",
    "diskforge.cli.imaging", "diskforge.cli.maintenance",
    # check results, and secrets when no --object is given
    "diskforge.checks", "diskforge.cli.secrets",
    # formats named after qcow2: its probe is certain, so they are never asked
    "diskforge.formats.vhdx", "diskforge.formats.vhd", "diskforge.formats.vmdk",
    "diskforge.formats.vdi",
)

_RUN = """
import json, sys
before = set(sys.modules)
from diskforge.cli.main import main
rc = main(sys.argv[1:])
sys.stdout.flush()
print("\\nMODULES " + json.dumps(sorted(set(sys.modules) - before)))
sys.exit(rc)
"""


def _modules_after(*argv: str) -> tuple[set[str], str]:
    # json and sys are imported by the harness itself before ``before`` is taken, so
    # a module only counts when the command imported it
    env = dict(os.environ, DISKFORGE_UNTRUSTED="")
    p = subprocess.run([sys.executable, "-c", _RUN, *argv], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    out, _, mods = p.stdout.rpartition("\nMODULES ")
    return set(json.loads(mods)), out


def test_info_imports_only_what_it_needs(tmp_path):
    qemu_img = need("qemu-img")
    img = str(tmp_path / "small.qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", img, "64M"], check=True)
    loaded, out = _modules_after("info", img)
    assert "file format: qcow2" in out
    for name in NOT_FOR_INFO:
        assert not any(m == name or m.startswith(name + ".") for m in loaded), name
    assert "construct" in loaded  # it still reads the header with construct


def test_convert_to_a_file_leaves_map_alone(tmp_path):
    """convert asks ``ops.measure.require_room`` whether the target is a device that
    must be measured; for a file the map code (and json with it) is never imported."""
    src, dst = tmp_path / "a.raw", tmp_path / "b.raw"
    src.write_bytes(b"x" * 4096)
    loaded, _ = _modules_after("convert", "-O", "raw", str(src), str(dst))
    assert "diskforge.ops.measure" in loaded and "diskforge.ops.map" not in loaded
    assert dst.read_bytes() == b"x" * 4096


def test_dmg_write_and_read_import_no_network_or_unused_codecs(tmp_path):
    """A UDZO write escapes its plist names and makes its segment UUID itself:
    ``xml.sax.saxutils`` imported ``urllib.request`` (email, http, ssl) and ``uuid``
    imported ``platform``, 20-30 ms of start-up between them. bz2 and lzma are
    imported only for the chunks that need them. ``platform`` comes back with
    ``zstandard``, the incompressibility probe's judge (~5 ms of start-up, against
    0.55 ms saved per MiB of random data), so only the read is held to it."""
    src, dmg, back = tmp_path / "a.raw", tmp_path / "a.dmg", tmp_path / "b.raw"
    src.write_bytes(os.urandom(4096) + bytes(1 << 20))
    heavy = ("urllib", "email", "http", "ssl", "uuid", "platform", "bz2", "lzma")
    loaded, _ = _modules_after("convert", "-O", "dmg", str(src), str(dmg))
    assert "diskforge.formats.dmg.writer" in loaded and "zstandard" in loaded
    assert not [m for m in loaded if m.split(".")[0] in heavy and m != "platform"
                or m.startswith("xml.sax")]
    loaded, _ = _modules_after("convert", "-O", "raw", str(dmg), str(back))
    assert "diskforge.formats.dmg.reader" in loaded
    assert not [m for m in loaded if m.split(".")[0] in heavy or m.startswith("xml.sax")]
    assert back.read_bytes() == src.read_bytes()


FORMAT_PACKAGES = ("asif", "dmg", "iso", "luks", "ova", "parallels", "qcow1", "qcow2",
                   "qed", "raw", "vdi", "vhd", "vhdx", "vmdk")


@pytest.mark.parametrize("fmt, own", [("raw", "raw"), ("qcow2", "qcow2")])
def test_info_imports_only_its_own_format(tmp_path, fmt, own):
    """Probing imports only the plugins whose signature is in the file (the registry's
    SIGNATURES), and reading a qcow2 leaves its write path (check, maintenance,
    refcounts, bitmaps when it has none) alone: the other format packages are never
    imported."""
    qemu_img = need("qemu-img")
    img = str(tmp_path / f"small.{fmt}")
    subprocess.run([qemu_img, "create", "-q", "-f", fmt, img, "64M"], check=True)
    loaded, out = _modules_after("info", img)
    assert f"file format: {fmt}" in out
    for name in FORMAT_PACKAGES:
        package = f"diskforge.formats.{name}"
        if name == own:
            assert package in loaded
        else:
            assert not any(m == package or m.startswith(package + ".") for m in loaded), \
                package
    for module in ("bitmaps", "check", "maintenance", "refcount", "writer"):
        assert f"diskforge.formats.qcow2.{module}" not in loaded
    if fmt == "raw":  # no format's structures: construct is not imported at all
        assert "construct" not in loaded


def test_qcow2_write_runs_no_ldconfig(tmp_path):
    """The qcow2 writer imports ``_fallocate.allocate`` (os.posix_fallocate); loading
    libc for ``punch_hole`` through ``ctypes.util.find_library`` ran ``ldconfig -p``
    in a subprocess at that import. libc is now the one already loaded, on first use."""
    src, dst = tmp_path / "a.raw", tmp_path / "a.qcow2"
    src.write_bytes(os.urandom(1 << 16))
    loaded, _ = _modules_after("convert", "-O", "qcow2", str(src), str(dst))
    assert "diskforge._fallocate" in loaded
    assert not {"ctypes.util", "subprocess", "shutil"} & loaded


def test_compression_pool_leaves_logging_until_a_callback_fails(tmp_path):
    """concurrent.futures imports logging only to report a failing done-callback: a
    compressed convert (its pool) runs without it, and such a callback is still
    logged, through the real ``logging.getLogger("concurrent.futures")``."""
    src, dst = tmp_path / "a.raw", tmp_path / "a.qcow2"
    src.write_bytes(os.urandom(1 << 16) * 4)
    loaded, _ = _modules_after("convert", "-c", "-O", "qcow2", str(src), str(dst))
    assert "concurrent.futures" in loaded and "logging" not in loaded
    code = (
        "import io, sys\n"
        "import diskforge\n"
        "import concurrent.futures as cf\n"
        "assert 'logging' not in sys.modules\n"
        "import logging\n"
        "out = io.StringIO()\n"
        "logging.getLogger('concurrent.futures').addHandler(logging.StreamHandler(out))\n"
        "with cf.ThreadPoolExecutor(1) as pool:\n"
        "    f = pool.submit(int, '7')\n"
        "    assert f.result() == 7\n"
        "f.add_done_callback(lambda f: 1 / 0)\n"
        "assert 'exception calling callback' in out.getvalue(), out.getvalue()\n"
        "assert 'ZeroDivisionError' in out.getvalue()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_construct_stand_ins_leave_no_trace(tmp_path):
    """construct's deferred imports still work when used, and other importers of
    those modules get the real ones."""
    qemu_img = need("qemu-img")
    img = str(tmp_path / "small.qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", img, "1M"], check=True)
    code = (
        "import sys, types\n"
        "import diskforge\n"
        f"diskforge.info({img!r})\n"
        "assert 'construct' in sys.modules and 'pdb' not in sys.modules\n"
        "import construct.core, construct.debug\n"
        "assert construct.debug.pdb.Pdb.__name__ == 'Pdb'\n"
        "assert construct.core.hashlib.sha256(b'').hexdigest().startswith('e3b0')\n"
        "import pdb, pickle\n"
        "assert type(pdb) is types.ModuleType and pickle.loads(pickle.dumps(1)) == 1\n"
        "assert construct.Pickled.parse(pickle.dumps([1])) == [1]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_command_table_matches_the_groups():
    """main.COMMANDS (which group registers each subcommand) is what the groups
    register; a new subcommand missing from it would still work, but build every
    group's parsers."""
    import argparse
    import importlib
    seen = {}
    for group in cli_main.GROUPS:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(f"diskforge.cli.{group}").add_parsers(sub)
        for name in sub.choices:
            seen[name] = group
    assert seen == cli_main.COMMANDS


@pytest.mark.parametrize("argv", [["info", "--help"], ["--debug", "convert", "--help"],
                                  ["iso", "build", "--help"]])
def test_one_group_parser_gives_the_full_command(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main.main(argv)
    assert e.value.code == 0
    assert "usage: diskforge" in capsys.readouterr().out


def test_unknown_command_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main.main(["infoo", "x"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    for name in cli_main.COMMANDS:
        assert f"'{name}'" in err


def test_builtin_table_is_the_entry_point_table():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"][registry.ENTRY_POINT_GROUP]
    assert eps == registry.BUILTIN


def test_one_command_builds_only_its_parser():
    parser = cli_main.build_parser("compare")
    sub = next(a for a in parser._actions if a.choices and "compare" in a.choices)
    assert list(sub.choices) == ["compare"]
    assert sub.choices["compare"].error_status == 2  # set by its group after add_parser
    assert cli_main.main(["compare", "/nonexistent-a", "/nonexistent-b"]) == 2


def test_command_found_past_global_options():
    parser = cli_main.OneLineParser(prog="x")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--endpoint", metavar="URL")
    assert cli_main.command_of(["--debug", "info", "f"], parser) == "info"
    assert cli_main.command_of(["--endpoint", "convert", "map", "f"], parser) == "map"
    assert cli_main.command_of(["--endpoint=u", "map"], parser) == "map"
    assert cli_main.command_of(["--debug"], parser) is None


def test_every_dataclass_has_a_docstring():
    """dataclasses writes a signature into a docstring-less class's ``__doc__`` with
    ``inspect``, which construct_import keeps off start-up: one such class on the way
    to ``info`` would import it (40 M instructions) again."""
    import ast
    missing = []
    for folder, _, files in os.walk(os.path.join(ROOT, "src", "diskforge")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and ast.get_docstring(node) is None \
                        and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
                    missing.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}")
    assert not missing, missing


_IMPORTED = """
import sys
from diskforge.cli.main import main
rc = main(sys.argv[1:])
sys.stdout.flush()
print("\\nIMPORTED " + " ".join(m for m in ("dataclasses", "diskforge.options")
                                 if m in sys.modules))
sys.exit(rc)
"""


def test_info_imports_no_dataclasses(tmp_path):
    """``dataclasses`` costs ~6 M instructions to import and each dataclass 2-4 M more
    (records.py): ``info`` needs none. The option classes (which need
    ``dataclasses.fields``) are imported only when a command writes or lists options
    (``registry.OptionsFrom``), and OpenPolicy is a record."""
    qemu_img = need("qemu-img")
    img = str(tmp_path / "small.qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", img, "64M"], check=True)
    raw = tmp_path / "small.raw"
    raw.write_bytes(b"\0" * 4096)
    for path in (img, str(raw)):
        p = subprocess.run([sys.executable, "-c", _IMPORTED, "info", path],
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, DISKFORGE_UNTRUSTED=""))
        assert p.returncode == 0, p.stderr
        assert p.stdout.rpartition("\nIMPORTED ")[2].split() == [], path
