#!/usr/bin/env bash
# Builds everything and boots a Debian 6.12 guest with 2 vCPUs, a
# virtio-blk disk and a virtio-pf (a virtio-blk SR-IOV physical function with
# an admin virtqueue), enables 2 VFs from the guest with sriov_numvfs and uses
# one as a disk, showing what the guest sees. On a host without hardware KVM
# (like these machines) the VMM runs inside a QEMU TCG host VM with nested SVM;
# see tests/src/lib.rs. Extra arguments are passed to the VMM.
# Environment: CH_BINARY (a prebuilt VMM; else cargo build --release -p vmm),
# CH_TEST_MODE (auto|direct|nested), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

echo "== building the guest images (cached in build/guest)" >&2
bash scripts/build-guest-image.sh --quiet >/dev/null
if [ -z "${CH_BINARY:-}" ]; then
    echo "== building the VMM: cargo build --release -p vmm" >&2
    CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release -q -p vmm --bin cloud-hypervisor
    export CH_BINARY="$TARGET_DIR/release/cloud-hypervisor"
fi

mkdir -p build/demo
disk=build/demo/disk.img
rm -f "$disk"
truncate -s 64M "$disk"
printf 'Hello from the host (%s)\n' "$(date -u '+%F %T UTC')" | dd of="$disk" conv=notrunc status=none
for f in pf vf1 vf2; do rm -f build/demo/$f.img; truncate -s 16M build/demo/$f.img; done

cat >build/demo/guest.sh <<'GUEST'
echo "== guest: $(uname -sr); CPUs online: $(cat /sys/devices/system/cpu/online); memory: $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
echo "== PCI functions:"
for d in /sys/bus/pci/devices/*; do
  drv=$(readlink "$d/driver" 2>/dev/null); drv=${drv##*/}
  echo "   ${d##*/}  $(cat $d/vendor):$(cat $d/device)  class $(cat $d/class)  config space $(wc -c < $d/config) bytes  driver ${drv:-none}"
done
echo "== /dev/vda: $(cat /sys/block/vda/size) sectors, read-only: $(cat /sys/block/vda/ro)"
echo "== the disk's first line, written by the host: $(head -n 1 /dev/vda)"
echo "Hello from the guest ($(uname -r))" | dd of=/dev/vda bs=512 seek=2048 conv=fsync 2>/dev/null \
  && echo "== wrote a line at 1 MiB (fsync'ed)"
P=$(for d in /sys/bus/pci/devices/*; do [ -e $d/sriov_totalvfs ] && echo $d; done | head -n 1)
echo "== virtio-pf ${P##*/}: driver $(basename "$(readlink $P/driver)"), TotalVFs $(cat $P/sriov_totalvfs)"
echo "== echo 2 > ${P}/sriov_numvfs"
echo 2 > $P/sriov_numvfs
for v in $P/virtfn*; do
  vf=$(readlink -f $v); blk=$(ls $vf/virtio*/block 2>/dev/null)
  echo "   VF ${vf##*/}: $(cat $vf/vendor):$(cat $vf/device) driver $(basename "$(readlink $vf/driver)") disk /dev/$blk"
done
vf1=$(ls $(readlink -f $P/virtfn0)/virtio*/block)
sleep 0.5
echo "Hello from the guest, through VF 1" | dd of=/dev/$vf1 bs=512 conv=fsync 2>/dev/null \
  && echo "== wrote a line to /dev/$vf1 (VF 1, backed by vf1.img on the host)"
echo "== interrupts:"
grep -E 'virtio|ttyS|CPU' /proc/interrupts
echo "== powering off"
GUEST

echo "== booting (VMM: $CH_BINARY)" >&2
cargo run --release -q -p tests --bin guest-run -- --name demo --script build/demo/guest.sh \
    --file "disk.img=$disk" --file pf.img=build/demo/pf.img --file vf1.img=build/demo/vf1.img \
    --file vf2.img=build/demo/vf2.img -- --cpus boot=2 --memory size=512M --disk path=disk.img \
    --device virtio-pf,id=pf0,member=blk,total_vfs=2,disk=pf.img,vf_disk=vf%n.img "$@"
echo "== host: the guest left at 1 MiB of $disk: $(dd if="$disk" bs=512 skip=2048 count=1 status=none | tr -d '\0')"
echo "== host: vf1.img starts with: $(head -c 64 build/demo/vf1.img | tr -d '\0' | head -n 1)"
