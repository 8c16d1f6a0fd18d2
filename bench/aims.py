"""Issue 17's aims, one per bench row, and how a row is judged against its aim.

Each aim compares diskforge with a reference tool of the same row, on medians of the
interleaved runs (issue 17: "medians of several alternating runs"):

- ``ratio``: diskforge's time / the reference tool's, at most ``limit`` (and, with
  ``size_within``, diskforge's output size within that fraction of the tool's);
- ``speedup``: the reference's time / diskforge's (``-m 1`` against the default pool),
  at least ``limit``; beside it the *ceiling*, the speed-up had diskforge's own CPU
  seconds kept every core busy from its first instant to its last (the reference's
  median time / (diskforge's median CPU / cores)), and the cores it kept busy. Why: the
  ``-m 1`` baseline already reads and writes on a second thread beside its one
  compressor, so the speed-up is bounded by the work, not only by the scheduling; when
  the ceiling is below the aim no pipeline of the same work can meet it, and the row
  says so;
- ``seconds``: diskforge's own wall time, at most ``limit``;
- ``rss``: only diskforge's peak RSS (the 20 GiB sparse rows);
- every row with an aim also has diskforge's peak RSS held to ``RSS_LIMIT``.

A row is *noisy* when its spread reaches across the aim: the ratio computed from the
runs' extremes (diskforge's fastest over the tool's slowest, and the reverse) lies on
both sides of the limit, so the verdict could flip on another run. One run has no
spread and is never called noisy; say ``--repeat 5`` or more for verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass

RSS_LIMIT = 150_000_000  # bytes: "peak RSS < 150 MB", any row, 2 GiB or 20 GiB disk


@dataclass(frozen=True)
class Aim:
    kind: str                 # "ratio", "speedup", "seconds" or "rss"
    limit: float
    against: str = "qemu-img"
    size_within: float | None = None

    def text(self) -> str:
        if self.kind == "ratio":
            size = f", size ±{self.size_within:.0%}" if self.size_within else ""
            return f"<={self.limit:g}x {self.against}{size}"
        if self.kind == "speedup":
            return f">={self.limit:g}x over {self.against}"
        if self.kind == "rss":
            return f"peak RSS < {self.limit / 1e6:g} MB"
        return f"<={self.limit:g} s"


PLAIN = Aim("ratio", 0.9)
COMPRESSED_WRITE = Aim("ratio", 0.5, size_within=0.05)
COMPRESSED_READ = Aim("ratio", 0.6)
# LZFSE: qemu-img here cannot read it (no dmg-lzfse module in Debian) and dmg2img gets
# it wrong (bench/cases_dmg.py), so 7-Zip, which decodes it, is the reference
COMPRESSED_READ_LZFSE = Aim("ratio", 0.6, against="7zz x")
DMG_WRITE = Aim("speedup", 1.8, against="diskforge -m 1")
START_UP = Aim("seconds", 0.08)
MEMORY_ONLY = Aim("rss", RSS_LIMIT)  # no time aim: the row is there for its RSS

AIMS: dict[str, Aim] = {
    "raw->qcow2 plain": PLAIN,
    "qcow2->raw plain": PLAIN,
    "raw->raw (sparse)": PLAIN,
    "raw->vpc dynamic": PLAIN,
    "vpc dynamic->raw": PLAIN,
    "raw->vhdx (dynamic)": PLAIN,
    "vhdx->raw": PLAIN,
    "raw->vmdk monolithicSparse": PLAIN,
    "vmdk monolithicSparse->raw": PLAIN,
    "raw->vdi dynamic": PLAIN,
    "vdi dynamic->raw": PLAIN,
    "raw->qcow2 -c zlib": COMPRESSED_WRITE,
    "raw->qcow2 -c zstd": COMPRESSED_WRITE,
    "qcow2 zlib->raw": COMPRESSED_READ,
    "qcow2 zstd->raw": COMPRESSED_READ,
    "dmg(UDZO)->raw": COMPRESSED_READ,
    "dmg(ULFO)->raw": COMPRESSED_READ_LZFSE,
    "vmdk streamOptimized->raw": COMPRESSED_READ,
    "raw->dmg UDZO": DMG_WRITE,
    "raw->dmg ULFO": DMG_WRITE,
    "start-up: info (1 MiB raw)": START_UP,
    "start-up: info (small qcow2)": START_UP,
    "20G sparse raw->qcow2 (RSS)": MEMORY_ONLY,
    "20G sparse raw->qcow2 -c (RSS)": MEMORY_ONLY,
}


@dataclass
class Verdict:
    status: str               # "met", "missed" or "no reference"
    value: str                # the measured figure, as shown
    noisy: bool = False
    notes: tuple[str, ...] = ()

    def short(self) -> str:
        return self.status + (" (noisy)" if self.noisy else "")


def judge(aim: Aim, times: dict[str, list[float]], rss: dict[str, int],
          sizes: dict[str, int | None],
          cpu: dict[str, list[float]] | None = None) -> Verdict:
    """The verdict on one row from every tool's run times, peak RSS, output size and
    (for a speed-up) CPU seconds."""
    import statistics
    ours = times.get("diskforge")
    if not ours:
        return Verdict("no reference", "diskforge did not run")
    notes = []
    rss_ok = rss.get("diskforge", 0) < RSS_LIMIT
    if not rss_ok:
        notes.append(f"peak RSS {rss['diskforge'] / 1e6:.0f} MB >= {RSS_LIMIT / 1e6:.0f} MB")
    med = statistics.median(ours)
    if aim.kind == "rss":
        return Verdict("met" if rss_ok else "missed",
                       f"RSS {rss.get('diskforge', 0) / 1e6:.0f} MB", notes=tuple(notes))
    if aim.kind == "seconds":
        met = med <= aim.limit
        noisy = len(ours) > 1 and min(ours) <= aim.limit <= max(ours)
        return Verdict("met" if met and rss_ok else "missed", f"{med:.3f} s", noisy,
                       tuple(notes))
    ref = times.get(aim.against)
    if not ref:
        return Verdict("no reference", f"{aim.against} did not run", notes=tuple(notes))
    ref_med = statistics.median(ref)
    if aim.kind == "ratio":
        value_med = med / ref_med
        lo, hi = min(ours) / max(ref), max(ours) / min(ref)
        met = value_med <= aim.limit
    else:  # speedup
        value_med = ref_med / med
        lo, hi = min(ref) / max(ours), max(ref) / min(ours)
        met = value_med >= aim.limit
    noisy = len(ours) > 1 and len(ref) > 1 and lo <= aim.limit <= hi
    value = f"{value_med:.2f} ({lo:.2f}..{hi:.2f})"
    if aim.kind == "speedup" and cpu and cpu.get("diskforge"):
        from diskforge.parallel import cpu_count  # the cores the tool itself sees
        cores = cpu_count()
        cpu_med = statistics.median(cpu["diskforge"])
        ceiling = ref_med / (cpu_med / cores)
        value += f", ceiling {ceiling:.2f}, busy {cpu_med / med:.2f} of {cores} cores"
        if ceiling < aim.limit:
            notes.append(f"aim above the ceiling ({ceiling:.3f}): {cpu_med:.2f} CPU s on"
                         f" {cores} cores cannot take less than {cpu_med / cores:.2f} s")
    if aim.size_within is not None:
        a, b = sizes.get("diskforge"), sizes.get(aim.against)
        if a and b:
            off = a / b - 1
            value += f", size {off:+.1%}"
            if abs(off) > aim.size_within:
                met = False
                notes.append(f"output size {off:+.1%} from {aim.against}'s")
    return Verdict("met" if met and rss_ok else "missed", value, noisy, tuple(notes))
