#!/bin/sh
# A small provisioning script of the kind libvirt and OpenStack deployments run, written
# against $QEMU_IMG so that it runs unchanged with QEMU_IMG=qemu-img and
# QEMU_IMG=diskforge (tests/test_chains.py runs it both ways, each in its own copy of
# the same layout, and compares what every line printed, its exit code and the
# images left behind).
#
# Layout (made by the test before the copy, in $1):
#   pool/images/base.raw, pool/images/base2.raw   libvirt's storage pool: raw bases
#   pool/vms/                                      overlays, naming the base by its
#                                                  absolute path with backing_fmt=raw
#   instances/_base/HASH                           nova's image cache (raw)
#   instances/UUID/                                an instance: disk -> ../_base/HASH
#
# Each step's stdout, stderr and exit code go to out/NN.out, NN.err, NN.rc.
set -u
ROOT=$1
cd "$ROOT" || exit 1
mkdir -p out
n=0
step() {
    n=$((n + 1))
    tag=$(printf '%02d' "$n")
    "$@" > "out/$tag.out" 2> "out/$tag.err"
    echo $? > "out/$tag.rc"
    echo "$*" > "out/$tag.cmd"
}

# -- libvirt: absolute backing path into another directory, raw base --------------------
step $QEMU_IMG create -f qcow2 -b "$ROOT/pool/images/base.raw" -F raw pool/vms/vm1.qcow2
step $QEMU_IMG info --output json pool/vms/vm1.qcow2
step $QEMU_IMG info --backing-chain pool/vms/vm1.qcow2
step $QEMU_IMG info --backing-chain --output=json -U pool/vms/vm1.qcow2
step $QEMU_IMG check pool/vms/vm1.qcow2
step $QEMU_IMG check --output json pool/vms/vm1.qcow2
step $QEMU_IMG resize pool/vms/vm1.qcow2 +8M
step $QEMU_IMG snapshot -c before-upgrade pool/vms/vm1.qcow2
step $QEMU_IMG snapshot -l pool/vms/vm1.qcow2
step $QEMU_IMG map pool/vms/vm1.qcow2
step $QEMU_IMG map --output json pool/vms/vm1.qcow2
step $QEMU_IMG measure -O qcow2 pool/vms/vm1.qcow2
step $QEMU_IMG measure --output json -O raw pool/vms/vm1.qcow2
step $QEMU_IMG convert -O qcow2 pool/vms/vm1.qcow2 pool/vms/vm1-flat.qcow2
step $QEMU_IMG convert -O raw pool/vms/vm1.qcow2 pool/vms/vm1.raw
# an external snapshot (what virsh snapshot-create --disk-only writes), committed back
step $QEMU_IMG create -f qcow2 -b vm1.qcow2 -F qcow2 pool/vms/vm1.snap1
step $QEMU_IMG info --backing-chain pool/vms/vm1.snap1
step $QEMU_IMG map --output json pool/vms/vm1.snap1
step $QEMU_IMG commit pool/vms/vm1.snap1
# the pool moved: the overlay still shows its old base, then is pointed at the new place
mkdir -p pool/moved
mv pool/images/base.raw pool/moved/base.raw
step $QEMU_IMG info pool/vms/vm1.qcow2
step $QEMU_IMG info --output json pool/vms/vm1.qcow2
step $QEMU_IMG info --backing-chain pool/vms/vm1.qcow2
step $QEMU_IMG check pool/vms/vm1.qcow2
step $QEMU_IMG convert -O raw pool/vms/vm1.qcow2 pool/vms/lost.raw
step $QEMU_IMG rebase -u -b "$ROOT/pool/moved/base.raw" -F raw pool/vms/vm1.qcow2
step $QEMU_IMG info --backing-chain pool/vms/vm1.qcow2
# a safe rebase onto a different base copies what differs into the overlay
step $QEMU_IMG rebase -b "$ROOT/pool/images/base2.raw" -F raw pool/vms/vm1.qcow2
step $QEMU_IMG compare pool/vms/vm1.qcow2 pool/vms/vm1.raw

# -- OpenStack: the instance disk names ../_base/HASH ------------------------------------
H=instances/_base/5a1d0c2e9b8f4c1e
step $QEMU_IMG info --output=json -U "$H"
step $QEMU_IMG create -f qcow2 -o backing_file=../_base/5a1d0c2e9b8f4c1e,backing_fmt=raw instances/UUID/disk 24M
step $QEMU_IMG info --output=json -U instances/UUID/disk
step $QEMU_IMG info --backing-chain instances/UUID/disk
step $QEMU_IMG resize instances/UUID/disk 32M
step $QEMU_IMG check instances/UUID/disk
step $QEMU_IMG map instances/UUID/disk
step $QEMU_IMG map --output json instances/UUID/disk
step $QEMU_IMG measure --output json -O qcow2 instances/UUID/disk
# nova's snapshot: a flattened copy, then its upload format
step $QEMU_IMG convert -f qcow2 -O qcow2 instances/UUID/disk instances/snapshot.qcow2
step $QEMU_IMG convert -f qcow2 -O raw instances/UUID/disk instances/snapshot.raw
step $QEMU_IMG compare instances/snapshot.qcow2 instances/snapshot.raw
# rebase onto the same base by another spelling (no data copied), then flatten
step $QEMU_IMG rebase -b "$ROOT/$H" -F raw instances/UUID/disk
step $QEMU_IMG info --backing-chain --output json instances/UUID/disk
step $QEMU_IMG rebase -b "" instances/UUID/disk
step $QEMU_IMG info --output json instances/UUID/disk
step $QEMU_IMG compare instances/UUID/disk instances/snapshot.raw
exit 0
