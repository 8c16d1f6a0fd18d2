"""Promises the project makes about itself: CI runs the README's command, fixtures match
their manifest, the quick start works."""

import csv
import hashlib
import os
import re

from conftest import FIXTURES, REPO

import diskforge


def readme_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", quick, re.S)


def test_ci_runs_exactly_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2, "the quick start is two commands"
    ci = open(os.path.join(REPO, ".ci", "run")).read().strip().splitlines()[-1]
    assert ci == commands[1]


def test_fixtures_match_their_manifest():
    with open(os.path.join(FIXTURES, "MANIFEST.tsv")) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert rows
    for row in rows:
        with diskforge.open(os.path.join(FIXTURES, row["file"])) as dev:
            assert dev.format == row["format"], row["file"]
            assert dev.size == int(row["virtual_size"]), row["file"]
            h = hashlib.sha256()
            for off in range(0, dev.size, 1 << 20):
                h.update(dev.read(off, min(1 << 20, dev.size - off)))
            assert h.hexdigest() == row["sha256_virtual"], row["file"]


def test_fixtures_stay_small():
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(FIXTURES)
                for n in names)
    assert total < 8 << 20


def test_copied_samples_match_their_provenance():
    """Every real sample copied into fixtures/ is in SOURCES.tsv with a permissive licence
    (DESIGN.md) and the sha256 its source gives (of the file, or of it gunzipped)."""
    import gzip
    with open(os.path.join(FIXTURES, "SOURCES.tsv")) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert rows
    for row in rows:
        assert not any(g in row["license"] for g in ("GPL", "AGPL")), row["file"]
        data = open(os.path.join(FIXTURES, row["file"]), "rb").read()
        shas = {hashlib.sha256(data).hexdigest()}
        if row["file"].endswith(".gz"):
            shas.add(hashlib.sha256(gzip.decompress(data)).hexdigest())
        assert row["sha256"] in shas, row["file"]
