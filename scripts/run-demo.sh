#!/usr/bin/env bash
# Builds everything and boots a Debian 6.12 guest with 2 vCPUs and a
# virtio-blk disk, showing what the guest sees. On a host without hardware KVM
# (like these machines) the VMM runs inside a QEMU TCG host VM with nested SVM;
# see tests/src/lib.rs. Extra arguments are passed to the VMM, e.g.
#   scripts/run-demo.sh --device virtio-pf
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
echo "== interrupts:"
grep -E 'virtio|ttyS|CPU' /proc/interrupts
echo "== powering off"
GUEST

echo "== booting (VMM: $CH_BINARY)" >&2
cargo run --release -q -p tests --bin guest-run -- --name demo --script build/demo/guest.sh \
    --file "disk.img=$disk" -- --cpus boot=2 --memory size=512M --disk path=disk.img "$@"
echo "== host: the guest left at 1 MiB of $disk: $(dd if="$disk" bs=512 skip=2048 count=1 status=none | tr -d '\0')"
