"""Hand disks to hypervisors: QEMU over QMP, hot-plug, live backups, NBD export.
(placeholder docstring, rewritten below)"""
