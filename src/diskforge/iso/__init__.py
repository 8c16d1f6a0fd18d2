"""ISO 9660 file systems: building them from a directory, reading and extracting them,
cloud-init seeds.

- ``build``: a directory tree → an ISO (pycdlib does the mastering; we choose the names,
  dates, boot entries and the hybrid MBR, and copy the file data in the kernel).
- ``filesystem``: our own reader of ISO 9660, Joliet, Rock Ridge and UDF trees over any
  :class:`~diskforge.blockdev.BlockDevice`, strict about every offset and size, loop-
  and depth-checked, so hostile images give one-line errors.
- ``extract``: writes a tree under a destination directory and nowhere else.
- ``volume``: volume descriptors and the El Torito catalog (for ``info``).
- ``cloudinit``: NoCloud seeds.

The ``iso`` container format (``formats/iso.py``) uses ``volume`` for ``info``; an
ISO file's bytes are its block device.
"""
