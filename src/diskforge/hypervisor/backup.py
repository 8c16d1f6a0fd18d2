"""Live full and incremental backups of a running VM's disk, done by QEMU itself.

``backup(qmp, node, out)`` takes a full backup: QEMU creates ``out`` as a qcow2
(``blockdev-create``, under a temporary name beside it), and one QMP ``transaction``
adds a dirty bitmap to the disk and starts ``blockdev-backup sync=full`` — so the bitmap
starts counting writes at exactly the instant the backup's contents are taken from.
``backup(..., incremental=True)`` copies only the clusters that bitmap marks
(``sync=bitmap``, ``bitmap-mode=on-success``) into a qcow2 overlay whose backing file is
the previous backup; QEMU clears the copied bits only when the job succeeds and keeps
them (plus newer writes) when it fails, so a failed increment can simply be retried.

Each full backup starts a *chain* with its own bitmap (``diskforge-<random>``), recorded
with the chain's files in ``diskforge-backup.json`` in the backups' directory, under
the disk's file name (so any name of the node finds it); an incremental backup extends
the chain recorded there and refuses when the bitmap or the previous backup is gone.
Two chains of one disk in two directories each keep their own bitmap, so neither
corrupts the other; a new full backup in a directory removes the bitmap of the chain it
replaces. A chain lives in one directory (overlays name their backing file relatively).

Failure handling: nothing appears under ``out`` unless the job succeeded (the finished
file is linked into place, never over an existing one), the manifest is only rewritten
after success, and a job that fails or a QEMU that dies mid-job leaves every earlier
backup as it was, with the reason raised as :class:`BackupError`.

Bitmaps are persistent (stored in the disk image, surviving a QEMU restart) when the
disk's format can hold them (qcow2); on other formats (raw) they live only as long as
the QEMU process, and the result says so.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..devices import open_input_file
from ..errors import DiskforgeError, SafetyError, UsageError
from .qmp import QMP, QMPDisconnected, QMPError

MANIFEST = "diskforge-backup.json"
CLUSTER = 64 << 10  # backup cluster, bitmap granularity and target cluster size alike
PERSISTENT_DRIVERS = ("qcow2",)


class BackupError(DiskforgeError):
    """A backup did not complete; earlier backups are untouched."""


@dataclass
class BackupResult:
    """What a backup wrote."""
    path: str
    kind: str                  # "full" or "incremental"
    node: str
    bitmap: str
    persistent: bool
    base: str | None           # the backup this one is an overlay of
    bytes_copied: int
    seconds: float


# -- QEMU-side helpers ---------------------------------------------------------------

def find_node(qmp: QMP, name: str) -> dict:
    """The block node a user names: a drive (BlockBackend) name, a qdev id, or a node
    name. Returns query-named-block-nodes' entry for the root node."""
    root = None
    for b in qmp.execute("query-block"):
        ins = b.get("inserted")
        if not ins:
            continue
        qdev = b.get("qdev", "")
        if name in (b.get("device"), ins.get("node-name")) or \
                (qdev and name in (qdev, qdev.split("/")[-1])):
            root = ins.get("node-name")
            break
    target = root or name
    for n in qmp.execute("query-named-block-nodes", {"flat": True}):
        if n.get("node-name") == target:
            return n
    raise UsageError(f"no block device or node named '{name}' in this VM")


def run_job(qmp: QMP, job_id: str, *, progress: Callable[[int, int], None] | None = None,
            poll: float = 0.2) -> dict:
    """Wait for a job created with auto-dismiss off until it concludes; dismiss it;
    raise BackupError with QEMU's reason when it failed."""
    while True:
        job = next((j for j in qmp.execute("query-jobs") if j["id"] == job_id), None)
        if job is None:
            raise BackupError(f"job {job_id} disappeared")
        if progress is not None and job.get("total-progress"):
            progress(job.get("current-progress", 0), job["total-progress"])
        if job["status"] == "concluded":
            break
        qmp.wait_event("JOB_STATUS_CHANGE", timeout=poll,
                       match=lambda e: e.get("data", {}).get("id") == job_id)
    try:
        qmp.execute("job-dismiss", {"id": job_id})
    except QMPError:
        pass
    if job.get("error"):
        raise BackupError(f"QEMU job {job['type']} failed: {job['error']}")
    return job


def _create_qcow2(qmp: QMP, tmp: str, size: int, tag: str,
                  backing: str | None) -> tuple[str, str]:
    """Have QEMU create a qcow2 file at ``tmp`` and open it: (qcow2 node, file node)."""
    file_node, fmt_node = f"{tag}-file", f"{tag}-fmt"
    run_job_args = {"job-id": f"{tag}-mkfile",
                    "options": {"driver": "file", "filename": tmp, "size": 0}}
    qmp.execute("blockdev-create", run_job_args)
    run_job(qmp, f"{tag}-mkfile")
    qmp.execute("blockdev-add", {"driver": "file", "node-name": file_node,
                                 "filename": tmp})
    opts: dict = {"driver": "qcow2", "file": file_node, "size": size,
                  "cluster-size": CLUSTER}
    if backing:
        opts.update({"backing-file": backing, "backing-fmt": "qcow2"})
    qmp.execute("blockdev-create", {"job-id": f"{tag}-mkqcow2", "options": opts})
    run_job(qmp, f"{tag}-mkqcow2")
    qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": fmt_node,
                                 "file": file_node})
    return fmt_node, file_node


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except (QMPError, OSError):
        pass


# -- the manifest ----------------------------------------------------------------------

def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        with open_input_file(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {"version": 1, "chains": {}}
    except (OSError, ValueError) as e:
        raise BackupError(f"cannot read the backup manifest: {e}", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("chains"), dict):
        raise BackupError("the backup manifest is not a diskforge manifest", path)
    return data


def write_manifest(directory: str, data: dict) -> None:
    from ..atomic import AtomicFile
    out = AtomicFile(os.path.join(directory, MANIFEST), sidecar=True)
    try:
        out.pwrite(0, (json.dumps(data, indent=2) + "\n").encode())
        out.commit()
    except BaseException:
        out.discard()
        raise


# -- the operation -----------------------------------------------------------------------

def backup(qmp: QMP, node: str, out: str, *, incremental: bool = False,
           speed: int = 0, progress: Callable[[int, int], None] | None = None) -> BackupResult:
    """Back up the running disk ``node`` into ``out`` (a new qcow2): full, or only the
    clusters written since the last backup of the chain recorded beside ``out``."""
    out = os.path.abspath(out)
    directory = os.path.dirname(out)
    if os.path.lexists(out):
        raise SafetyError("exists already; a backup never overwrites a file", out)
    if not os.path.isdir(directory):
        raise UsageError("the directory to write the backup into does not exist", out)
    info = find_node(qmp, node)
    node_name = info["node-name"]
    image = info.get("image", {})
    size = int(image.get("virtual-size", 0))
    source = info.get("file", "")
    if size <= 0:
        raise BackupError(f"cannot tell the size of '{node}'")
    persistent = info.get("drv") in PERSISTENT_DRIVERS
    bitmaps = {b.get("name") for b in info.get("dirty-bitmaps", [])}

    manifest = read_manifest(directory)
    chain = manifest["chains"].get(source)  # by disk file: any name of the node finds it
    base = None
    if incremental:
        if not chain or not chain.get("backups"):
            raise BackupError(f"no full backup of '{node}' ({source}) is recorded in"
                              f" {directory};"
                              " take a full backup first (without --incremental)")
        bitmap = chain["bitmap"]
        if bitmap not in bitmaps:
            raise BackupError(f"the dirty bitmap '{bitmap}' of this chain is gone from"
                              f" '{node}' (QEMU restarted, or the bitmap was not"
                              " persistent); take a full backup")
        base = chain["backups"][-1]["file"]
        if not os.path.exists(os.path.join(directory, base)):
            raise BackupError(f"the previous backup {base} is missing from {directory};"
                              " take a full backup")
    else:
        bitmap = f"diskforge-{os.urandom(4).hex()}"

    tag = f"dfbk{os.urandom(3).hex()}"
    tmp = os.path.join(directory, f".{os.path.basename(out)}.{tag}.diskforge-tmp")
    job_id = f"{tag}-backup"
    start = time.monotonic()
    nodes: list[str] = []
    bitmap_added = False
    try:
        fmt_node, file_node = _create_qcow2(qmp, tmp, size, tag, base)
        nodes = [fmt_node, file_node]
        job = {"job-id": job_id, "device": node_name, "target": fmt_node,
               "auto-dismiss": False}
        if speed:
            job["speed"] = int(speed)
        if incremental:
            job.update({"sync": "bitmap", "bitmap": bitmap, "bitmap-mode": "on-success"})
            actions = [{"type": "blockdev-backup", "data": job}]
        else:
            job["sync"] = "full"
            actions = [{"type": "block-dirty-bitmap-add",
                        "data": {"node": node_name, "name": bitmap,
                                 "persistent": persistent, "granularity": CLUSTER}},
                       {"type": "blockdev-backup", "data": job}]
        qmp.execute("transaction", {"actions": actions})
        bitmap_added = not incremental
        done = run_job(qmp, job_id, progress=progress)
        for n in nodes:  # closes (and flushes) the target before it is put in place
            qmp.execute("blockdev-del", {"node-name": n})
        nodes = []
        os.link(tmp, out)  # never over an existing file
        os.unlink(tmp)
    except QMPDisconnected as e:
        _cleanup_file(tmp)
        raise BackupError(f"QEMU went away during the backup ({e.message}); nothing was"
                          f" written to {out}, earlier backups are untouched") from None
    except BaseException as e:
        for n in nodes:
            _quietly(qmp.execute, "blockdev-del", {"node-name": n})
        if bitmap_added:
            _quietly(qmp.execute, "block-dirty-bitmap-remove",
                     {"node": node_name, "name": bitmap})
        _cleanup_file(tmp)
        if isinstance(e, (DiskforgeError, OSError)):
            reason = e.message if isinstance(e, DiskforgeError) else str(e)
            raise BackupError(f"backup failed: {reason}; nothing was written to {out},"
                              " earlier backups are untouched") from None
        raise
    copied = int(done.get("current-progress", 0))
    entry = {"file": os.path.basename(out), "kind": "incremental" if incremental else "full",
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bytes": copied}
    if incremental:
        chain["backups"].append(entry)
    else:
        old = chain.get("bitmap") if chain else None
        manifest["chains"][source] = {"node": node, "bitmap": bitmap,
                                    "persistent": persistent, "size": size,
                                    "backups": [entry]}
        if old and old != bitmap and old in bitmaps:
            _quietly(qmp.execute, "block-dirty-bitmap-remove",
                     {"node": node_name, "name": old})
    write_manifest(directory, manifest)
    return BackupResult(path=out, kind=entry["kind"], node=node_name, bitmap=bitmap,
                        persistent=persistent, base=base, bytes_copied=copied,
                        seconds=time.monotonic() - start)


def _cleanup_file(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
