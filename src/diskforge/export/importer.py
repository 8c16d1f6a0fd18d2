"""``import``: an OVF package (``vm.ova``, or ``vm.ovf`` with its files beside it) made
into what libvirt runs: each disk of the virtual system converted (qcow2 by default)
and a libvirt domain XML built from the OVF's hardware section. The reverse of
``export --to ova``.

The package is opened through the registry like any image (``open_image(path,
member=N)`` gives disk N of the package), and the parsed descriptor is read from the
device's ``package.envelope`` (the ``ova`` plugin's OvaDevice): this module never
imports a format package.

What is written in OUTDIR (created when missing):

- one image per ``DiskSection`` disk, named after its file in the package (its last
  path component, extension replaced by the output format's, characters other than
  letters, digits, ``._+-`` replaced by ``_``, a leading dot dropped, ``-2``, ``-3``
  ... on a clash): never a path taken from the OVF. A disk with no file (an empty
  disk the OVF asks the importer to create) becomes an empty image of its capacity.
  An image is the disk's virtual size, or ``ovf:capacity`` when that is larger (the
  VM was given that much);
- ``NAME.xml``, the domain (``NAME`` is the virtual system's name, made safe the
  same way): CPUs and memory from the hardware items, firmware (``efi`` when the
  OVF says so: VMware's ``efi``, VirtualBox's ``EFI``/``EFI64``..., else BIOS), machine q35, the disks in the order of the hardware
  section's disk items (disks no item attaches are written but left out of the XML,
  and the plan says so), NICs on libvirt's ``default`` network (the OVF's network
  names mean nothing on the host).

Controller buses (OVF -> libvirt on q35), chosen so the guest finds a controller it
already has a driver for:

- IDE -> ``sata``: q35 has no IDE controller; every OS that has IDE drivers also
  drives AHCI (Linux, Windows since Vista);
- SCSI -> ``scsi`` with the controller model kept: ``lsilogic`` -> ``lsilogic``,
  ``lsilogicsas`` -> ``lsisas1068``, ``VirtualSCSI`` (pvscsi) -> ``vmpvscsi``,
  ``virtio``/``virtio-scsi`` -> ``virtio-scsi``, ``buslogic`` -> ``lsilogic`` (QEMU
  emulates no BusLogic); an unknown or missing model -> ``virtio-scsi``. A
  ``ResourceSubType`` listing several models ("virtio lsilogic", as VMware writes
  the alternatives) takes the first known one;
- SATA (AHCI) -> ``sata``;
- NVMe -> ``sata``: libvirt 9.0's schema has no ``nvme`` disk bus (only NVMe host
  devices), and AHCI drivers are everywhere;
- a disk whose controller is not found (VMware OVF 0.9 writes ``InstanceId``, so
  its items cannot be matched) -> ``virtio``.

``bus=`` (``--bus``) puts every disk on one bus instead.

NIC models (``ResourceSubType``) -> libvirt: ``E1000`` -> ``e1000``, ``E1000e`` ->
``e1000e``, ``PCNet32`` -> ``pcnet``, ``virtio`` -> ``virtio``, and ``VmxNet3``,
``VmxNet2``, ``Vmxnet`` -> ``virtio``: QEMU's vmxnet3 model is missing from several
distributions' builds (RHEL's among them) and every Linux since 2.6.25 has virtio-net;
a Windows guest without virtio drivers wants ``nic_model="e1000e"``
(``--nic-model``), which sets every NIC's model. Unknown or missing -> ``virtio``.

Limits (the descriptor is untrusted): CPUs 1..768, memory 4 MiB..24 TiB (libvirt and
the export options' range), at most 64 disks and 64 NICs; outside them the import
stops with one error naming the descriptor's structure and field. Disk files that
leave the package (``../``, absolute names) are refused by the ``ova`` reader.

Atomic as a whole: everything is written into a hidden staging directory in OUTDIR
(``.import-XXXXXXXX.diskforge-tmp``), then renamed into place; a failure or an
interruption removes the staging directory and whatever was already renamed, so an
aborted import leaves nothing (and OUTDIR itself is removed again when the import
created it). Only a process killed outright (``kill -9``, a power cut) can leave the
hidden staging directory behind; nothing is ever left under an output name. An
existing file under an output name is never overwritten.

Not supported yet: VirtualSystemCollection packages (several virtual systems),
CD/DVD and floppy drives (the plan lists how many were left out), the OVF's network
names (every NIC goes on libvirt's ``default`` network).
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from ..errors import FormatError, UnsupportedError, UsageError

MiB = 1 << 20
MAX_CPUS = 768
MIN_MEMORY, MAX_MEMORY = 4 * MiB, 24 << 40
MAX_DISKS = 64
MAX_NICS = 64
BUSES = ("virtio", "scsi", "sata")

# OVF controller type (formats/ova's VirtualSystem.controllers "type") -> libvirt bus
CONTROLLER_BUS = {"ide": "sata", "sata": "sata", "nvme": "sata", "scsi": "scsi"}
# SCSI ResourceSubType (lower case) -> libvirt <controller type='scsi' model=...>
SCSI_MODELS = {"lsilogic": "lsilogic", "lsilogicsas": "lsisas1068",
               "virtualscsi": "vmpvscsi", "pvscsi": "vmpvscsi", "virtio": "virtio-scsi",
               "virtio-scsi": "virtio-scsi", "buslogic": "lsilogic"}
# NIC ResourceSubType (lower case) -> libvirt <model type=...>
NIC_MODELS = {"e1000": "e1000", "e1000e": "e1000e", "pcnet32": "pcnet", "pcnet": "pcnet",
              "virtio": "virtio", "vmxnet3": "virtio", "vmxnet2": "virtio",
              "vmxnet": "virtio"}
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")


@dataclasses.dataclass
class DiskPlan:
    """One disk of the package and what it becomes."""
    number: int                     # 1-based, DiskSection order
    disk_id: str
    file: str | None                # the href in the package (None: an empty disk)
    capacity: int | None
    output: str                     # final path
    size: int = 0                   # bytes of the image written (0 until known)
    source_format: str | None = None
    attached: bool = True
    bus: str = "virtio"
    scsi_model: str = "virtio-scsi"
    controller: str | None = None   # how the OVF named the controller

    def to_json(self) -> dict[str, object]:
        return {"number": self.number, "disk-id": self.disk_id, "file": self.file,
                "capacity": self.capacity, "output": self.output,
                "virtual-size": self.size, "source-format": self.source_format,
                "attached": self.attached, "bus": self.bus if self.attached else None,
                "scsi-model": self.scsi_model if self.bus == "scsi" else None,
                "ovf-controller": self.controller}


@dataclasses.dataclass
class ImportPlan:
    """Everything ``import`` will write, decided before anything is written."""
    source: str
    outdir: str
    name: str
    cpus: int
    memory_mib: int
    firmware: str
    format: str
    disks: list[DiskPlan]
    nics: list[dict[str, object]]
    xml: str
    notes: list[str]

    def to_json(self) -> dict[str, object]:
        return {"source": self.source, "outdir": self.outdir, "name": self.name,
                "cpus": self.cpus, "memory-mib": self.memory_mib,
                "firmware": self.firmware, "format": self.format,
                "disks": [d.to_json() for d in self.disks], "nics": self.nics,
                "xml": self.xml, "notes": self.notes}

    def lines(self) -> list[str]:
        """The plan as ``--dry-run`` prints it (names escaped by the caller)."""
        out = [f"VM '{self.name}': {self.cpus} CPU{'s' if self.cpus > 1 else ''},"
               f" {self.memory_mib} MiB, firmware {self.firmware}, machine q35"]
        for d in self.disks:
            where = (f"bus {d.bus}" + (f" ({d.scsi_model})" if d.bus == "scsi" else "")
                     if d.attached else "not attached")
            src = f"'{d.file}'" if d.file else f"empty disk of {d.capacity} bytes"
            out.append(f"disk {d.number} '{d.disk_id}': {src} -> {d.output}"
                       f" ({self.format}, {d.size} bytes, {where})")
        for i, n in enumerate(self.nics, 1):
            out.append(f"NIC {i}: {n['ovf-model'] or 'no model'} -> {n['model']}"
                       " on network 'default'")
        out.append(f"domain XML -> {self.xml}")
        out += [f"note: {n}" for n in self.notes]
        return out


def safe_name(text: str, fallback: str) -> str:
    """A file name made from a name inside the package: its last path component,
    unsafe characters replaced, no leading dot, at most 100 characters."""
    base = text.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c if c in _SAFE else "_" for c in base).lstrip(".")[:100]
    return base if base.strip("._-") else fallback


def _stem(name: str) -> str:
    root, ext = os.path.splitext(name)
    return root if root and ext else name


def _envelope(dev, path: str):
    """The parsed descriptor the OVA device carries (formats/ova: ``package``)."""
    pkg = getattr(dev, "package", None)
    env = getattr(pkg, "envelope", None)
    if env is None:
        raise UsageError("not an OVF package (give a .ova, or a .ovf with its files)",
                         path)
    return env


def _hardware(env, path: str, opts: dict) -> tuple[str, int, int, str]:
    """Name, CPUs, memory (MiB) and firmware: the options', else the descriptor's
    (checked against the limits), else the defaults."""
    vs = env.system
    name = opts.get("name") or safe_name(vs.name or vs.id or "", "") or \
        _stem(safe_name(os.path.basename(path), "vm"))
    cpus = opts.get("cpus")
    if cpus is None:
        cpus = vs.cpus if vs.cpus is not None else 1
        if not 1 <= cpus <= MAX_CPUS:
            raise FormatError(f"{cpus} CPUs: a virtual machine has 1 to {MAX_CPUS}", path,
                              structure="VirtualHardwareSection",
                              field="Item(ResourceType=3).VirtualQuantity")
    memory = opts.get("memory")
    if memory is None:
        if vs.memory is None:
            memory = 1024
        else:
            if not MIN_MEMORY <= vs.memory <= MAX_MEMORY:
                raise FormatError(f"memory of {vs.memory} bytes: from 4 MiB to 24 TiB",
                                  path, structure="VirtualHardwareSection",
                                  field="Item(ResourceType=4).VirtualQuantity")
            memory = -(-vs.memory // MiB)
    # VMware writes "efi"; VirtualBox "EFI", "EFI32", "EFI64" or "EFIDUAL"
    firmware = opts.get("firmware") or \
        ("efi" if (vs.firmware or "").startswith("efi") else "bios")
    return name, cpus, memory, firmware


def _controller_of(vs, item: dict) -> dict | None:
    """The controller a disk item hangs on: its Parent is given as the controller's
    name (ElementName/Caption) or, without one, its InstanceID."""
    key = item.get("controller")
    for c in vs.controllers:
        if key is not None and key in (c.get("name"), c.get("id")):
            return c
    return None


def _scsi_model(subtype: object) -> str:
    for word in str(subtype or "").lower().split():
        if word in SCSI_MODELS:
            return SCSI_MODELS[word]
    return "virtio-scsi"


def _outputs(env, outdir: str, ext: str) -> list[str]:
    taken: set[str] = set()
    out = []
    for i, d in enumerate(env.disks, 1):
        stem = _stem(safe_name(d.file.href, f"disk{i}")) if d.file else \
            safe_name(d.disk_id, f"disk{i}")
        name, n = f"{stem}.{ext}", 1
        while name.lower() in taken:
            n += 1
            name = f"{stem}-{n}.{ext}"
        taken.add(name.lower())
        out.append(os.path.join(outdir, name))
    return out


def plan_import(dev, path: str, outdir: str, fmt: str, opts: dict) -> ImportPlan:
    """Decide every output from the descriptor (module docstring); nothing written."""
    from ..registry import get
    env = _envelope(dev, path)
    if env.system is None:
        raise FormatError("the descriptor has no VirtualSystem", path,
                          structure="Envelope", field="VirtualSystem")
    if env.systems > 1:
        raise UnsupportedError(f"not supported yet: importing a VirtualSystemCollection"
                               f" ({env.systems} virtual systems)", path)
    if not env.disks:
        raise FormatError("the descriptor lists no disks", path, structure="DiskSection",
                          field="Disk")
    vs = env.system
    if len(env.disks) > MAX_DISKS or len(vs.disks) > MAX_DISKS:
        raise FormatError(f"more than {MAX_DISKS} disks", path, structure="DiskSection",
                          field="Disk")
    if len(vs.nics) > MAX_NICS:
        raise FormatError(f"{len(vs.nics)} NICs: at most {MAX_NICS}", path,
                          structure="VirtualHardwareSection",
                          field="Item(ResourceType=10)")
    name, cpus, memory, firmware = _hardware(env, path, opts)
    ext = get(fmt).extensions[0] if get(fmt).extensions else fmt
    outs = _outputs(env, outdir, ext)
    disks = [DiskPlan(i, d.disk_id, d.file.href if d.file else None, d.capacity, out,
                      attached=False)
             for i, (d, out) in enumerate(zip(env.disks, outs), 1)]
    by_id = {d.disk_id: d for d in disks}
    notes: list[str] = []
    order: list[DiskPlan] = []
    for item in vs.disks:
        d = by_id.get(item.get("disk-id"))
        if d is None or d.attached:
            notes.append(f"disk drive '{item.get('name')}' names disk"
                         f" '{item.get('disk-id')}', which DiskSection does not list"
                         " (or another drive already has): left out")
            continue
        d.attached = True
        d.controller = str(item.get("controller")) if item.get("controller") else None
        ctrl = _controller_of(vs, item)
        bus = opts.get("bus")
        if bus is None:
            kind = ctrl.get("type") if ctrl else None
            bus = CONTROLLER_BUS.get(str(kind), "virtio")
            if ctrl is None:
                notes.append(f"disk {d.number}: controller '{d.controller}' not found in"
                             " the hardware section: virtio")
            elif kind not in CONTROLLER_BUS:
                notes.append(f"disk {d.number}: a {kind} controller has no libvirt"
                             " equivalent: virtio")
        d.bus = bus
        if bus == "scsi":
            d.scsi_model = _scsi_model(ctrl.get("model") if ctrl and
                                       ctrl.get("type") == "scsi" else None)
        order.append(d)
    if not vs.disks:        # no disk items at all: attach every disk, in order
        bus = opts.get("bus") or "virtio"
        for d in disks:
            d.attached, d.bus = True, bus
            order.append(d)
        notes.append(f"the hardware section has no disk drives: every disk attached"
                     f" on {bus}")
    for d in disks:
        if not d.attached:
            notes.append(f"disk {d.number} '{d.disk_id}' is attached to no drive of the"
                         " virtual system: written, left out of the domain XML")
    nics = []
    for n in vs.nics:
        ovf_model = n.get("model")
        model = opts.get("nic_model") or NIC_MODELS.get(str(ovf_model or "").lower(),
                                                         "virtio")
        nics.append({"ovf-network": n.get("network"), "ovf-model": ovf_model,
                     "model": model})
    if vs.cdroms:
        notes.append(f"not supported yet: {vs.cdroms} CD/DVD drive"
                     f"{'s' if vs.cdroms > 1 else ''} of the OVF left out")
    xml = os.path.join(outdir, f"{name}.xml")
    if any(os.path.basename(xml).lower() == os.path.basename(d.output).lower()
           for d in disks):
        xml = os.path.join(outdir, f"{name}-domain.xml")
    # attached disks first, in the hardware section's order, then the others
    ordered = order + [d for d in disks if not d.attached]
    return ImportPlan(path, outdir, name, cpus, memory, firmware, fmt, ordered, nics,
                      xml, notes)


def _check_opts(opts: dict) -> None:
    known = {"name", "cpus", "memory", "firmware", "bus", "nic_model"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise UsageError(f"unknown import option(s): {', '.join(unknown)} (known:"
                         f" {', '.join(sorted(known))})")
    from .base import ExportOptions
    given = {k: opts[k] for k in ("cpus", "memory", "name", "firmware")
             if opts.get(k) is not None}
    ExportOptions(**given).validate()
    if opts.get("bus") not in (None, *BUSES):
        raise UsageError(f"invalid --bus '{opts['bus']}': {', '.join(BUSES)}")
    model = opts.get("nic_model")
    if model is not None and (not isinstance(model, str) or not model or
                              not all(c.isalnum() or c in "-_" for c in model)):
        raise UsageError(f"invalid --nic-model {model!r}: a libvirt model name (virtio,"
                         " e1000e, ...)")


def import_ova(path: str | os.PathLike, outdir: str | os.PathLike = ".", *,
               fmt: str = "qcow2", options: object = None, source_fmt: str | None = None,
               dry_run: bool = False, progress=None, policy=None,
               **opts) -> ImportPlan:
    """Import the OVF package at ``path`` into ``outdir`` (module docstring) and return
    the plan that was carried out (with ``dry_run``: only decided). ``fmt`` and
    ``options`` (a ``-o`` string or a mapping) choose the disks' format; ``opts``:
    ``name``, ``cpus``, ``memory`` (MiB), ``firmware`` (bios/efi), ``bus``
    (virtio/scsi/sata for every disk), ``nic_model`` override the descriptor."""
    from ..errors import UnknownFormatError
    from ..registry import get, open_image
    _check_opts(opts)
    path, outdir = os.fspath(path), os.path.abspath(os.fspath(outdir))
    try:
        plugin = get(fmt)
    except UnknownFormatError:
        raise UsageError(f"unknown output format '{fmt}'") from None
    if not plugin.can_write:
        raise UnsupportedError(f"not supported yet: writing {plugin.name} images")
    wopts = plugin.options.parse(options, format_name=plugin.name)
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise UsageError("the output directory is not a directory", outdir)
    with open_image(path, source_fmt, policy=policy) as first:
        plan = plan_import(first, path, outdir, plugin.name, opts)
        inputs = first.files()
    for out in [d.output for d in plan.disks] + [plan.xml]:
        if os.path.lexists(out):
            raise UsageError("exists already: import never overwrites (remove it, or"
                             " import into another directory)", out)
    from ..atomic import refuse_overwrite
    for out in [d.output for d in plan.disks]:
        refuse_overwrite(out, inputs)
    _sizes(plan, path, source_fmt, policy)
    if not dry_run:
        _run(plan, path, source_fmt, plugin, wopts, progress, policy)
    return plan


def _sizes(plan: ImportPlan, path: str, source_fmt, policy) -> None:
    """Each disk's output size: its virtual size, or its capacity when larger; every
    disk is opened once here, so a missing or unreadable one fails before writing."""
    from ..registry import open_image
    for d in plan.disks:
        if d.file is None:
            if not d.capacity:
                raise FormatError(f"disk '{d.disk_id}' has neither a file nor a"
                                  " capacity", path, structure="DiskSection",
                                  field="Disk.capacity")
            d.size = d.capacity
            continue
        with open_image(path, source_fmt, policy=policy, member=d.number) as dev:
            inner = (dev.info().details or {}).get("disk-info", {})
            d.source_format = inner.get("format")
            d.size = max(dev.size, d.capacity or 0)
            if d.capacity and d.capacity < dev.size:
                plan.notes.append(f"disk {d.number}: ovf:capacity {d.capacity} is less"
                                  f" than the file's virtual size {dev.size}: kept"
                                  f" {dev.size}")
        d.size = -(-d.size // 512) * 512


def _name_final(e: BaseException, stage: str | None, d: DiskPlan | None) -> None:
    """An error about a file in the staging directory names the output the user asked
    for instead, and which disk it was (a writer refusing the size, a full disk)."""
    from ..errors import DiskforgeError, printable
    if not (isinstance(e, DiskforgeError) and stage and e.path and d is not None and
            os.path.abspath(e.path).startswith(stage + os.sep)):
        return
    e.path = d.output
    e.message = f"disk {d.number} '{d.disk_id}' ({d.size} bytes): {e.message}"
    e.args = (f"{printable(e.path)}: {printable(e.message)}",)


def _run(plan: ImportPlan, path: str, source_fmt, plugin, wopts, progress,
         policy) -> None:
    import tempfile

    from ..atomic import AtomicFile
    from ..ops.convert import convert
    from ..registry import open_image
    from .domain_xml import DiskSpec, Machine, domain_xml
    made_dir = not os.path.isdir(plan.outdir)
    if made_dir:
        os.makedirs(plan.outdir)
    total = sum(d.size for d in plan.disks if d.file) or 1
    placed: list[str] = []
    stage = None
    ok = False
    current: DiskPlan | None = None
    try:
        stage = tempfile.mkdtemp(prefix=".import-", suffix=".diskforge-tmp",
                                 dir=plan.outdir)
        done = 0
        for d in plan.disks:
            current = d
            staged = os.path.join(stage, os.path.basename(d.output))
            writer = plugin.writer(staged, d.size, wopts)
            if d.file is None:
                writer.finish()
                continue
            base = done

            def step(n: int, _t: int, base: int = base) -> None:
                if progress is not None:
                    progress(base + n, total)
            with open_image(path, source_fmt, policy=policy, member=d.number) as dev:
                convert(dev, writer, progress=step)
            done += d.size
        current = None
        m = Machine(name=plan.name, disk_path="", memory_mib=plan.memory_mib,
                    cpus=plan.cpus, firmware=plan.firmware,
                    disks=[DiskSpec(d.output, plan.format, d.bus, d.scsi_model)
                           for d in plan.disks if d.attached],
                    nics=[n["model"] for n in plan.nics])
        xml = AtomicFile(os.path.join(stage, os.path.basename(plan.xml)))
        try:
            xml.pwrite(0, domain_xml(m))
            xml.commit()
        except BaseException:
            xml.discard()
            raise
        for final in [d.output for d in plan.disks] + [plan.xml]:
            if os.path.lexists(final):
                raise UsageError("appeared while importing: not overwritten", final)
            os.rename(os.path.join(stage, os.path.basename(final)), final)
            placed.append(final)
        ok = True
    except BaseException as e:
        _name_final(e, stage, current)
        for final in placed:
            try:
                os.unlink(final)
            except OSError:
                pass
        raise
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if made_dir and not ok:
            try:
                os.rmdir(plan.outdir)
            except OSError:
                pass
