#!/bin/sh
# Smoke test of vpfctl's userspace virtio path in a real Debian 6.12 guest
# under QEMU TCG, against QEMU's modern virtio-blk-pci (no SR-IOV, no admin
# queue): pci-pf-stub binding, capability parsing, BAR mmap, pagemap DMA,
# blk-workload (verified requests, SIGTERM drain, the moved-file + SIGUSR1
# protocol onto the same device, hugetlb DMA memory), the exactly-once log
# check, the admin path refusing a device without VIRTIO_F_ADMIN_VQ, and
# the host-side check of the disk image against the log's FINAL lines.
#
# Needs the guest image (scripts/build-guest-image.sh) and qemu-system-x86_64.
# Usage: vpfctl/scripts/qemu-smoke.sh   (from the workspace root)
set -eu
ROOT=$(pwd)
GUEST=${GUEST_DIR:-$ROOT/build/guest}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-vpfctl}
RUSTFLAGS='-C target-feature=+crt-static' cargo build -q --release -p vpfctl --target x86_64-unknown-linux-gnu
BIN=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/vpfctl
W=$(mktemp -d)
[ -n "${VPF_SMOKE_KEEP:-}" ] && echo "keeping $W" || trap 'rm -rf "$W"' EXIT
mkdir -p "$W/extra/bin"
cp "$BIN" "$W/extra/bin/vpfctl"
strip "$W/extra/bin/vpfctl" 2>/dev/null || true
cat > "$W/extra/scenario.sh" <<'SCEN'
BLK=""
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1042 ]; then BLK=$(basename $d); fi
done
[ -n "$BLK" ] || { echo "SMOKE-FAIL no virtio-blk"; exit 1; }
vpfctl --json info --dev $BLK
vpfctl bind --dev $BLK || { echo "SMOKE-FAIL bind"; exit 1; }
vpfctl --json --pf $BLK list-query; rc=$?
[ $rc = 3 ] && echo "SMOKE-OK admin path refuses a device without ADMIN_VQ" || echo "SMOKE-FAIL list-query rc=$rc"
vpfctl --json blk-workload --vf $BLK --log /tmp/a.log --requests 300 --blocks 32 || echo "SMOKE-FAIL workload 1"
vpfctl blk-workload --vf $BLK --log /tmp/wl.log --state-dir /tmp/wl --inflight 6 --blocks 16 --start-sector 64 --seed 77 &
P=$!
while [ ! -e /tmp/wl/ready ]; do sleep 0.1; done
sleep 1
kill -TERM $P; wait $P; rc=$?
[ $rc = 0 ] && echo "SMOKE-OK workload drained on SIGTERM" || echo "SMOKE-FAIL workload rc=$rc"
grep -E "^(FINAL|END)" /tmp/wl.log
grep ^SUBMIT /tmp/wl.log | sed 's/.* id=\([0-9]*\) .*/\1/' | sort > /tmp/s
grep ^DONE /tmp/wl.log | sed 's/.* id=\([0-9]*\) .*/\1/' | sort > /tmp/d
cmp /tmp/s /tmp/d && echo "SMOKE-OK exactly once" || echo "SMOKE-FAIL exactly once"
# The move protocol (to the same device: QEMU has no VFs): moved file +
# SIGUSR1, MOVED line, --after-move ends the run.
vpfctl blk-workload --vf $BLK --log /tmp/mv.log --state-dir /tmp/mv --after-move 100 --start-sector 1024 &
P=$!
while [ ! -e /tmp/mv/ready ]; do sleep 0.1; done
echo $BLK > /tmp/mv/moved.tmp; mv /tmp/mv/moved.tmp /tmp/mv/moved; kill -USR1 $P
wait $P; rc=$?
[ $rc = 0 ] && [ -e /tmp/mv/moved.1 ] && grep -q "^MOVED " /tmp/mv.log && grep -q "result=ok" /tmp/mv/done \
  && echo "SMOKE-OK move protocol" || echo "SMOKE-FAIL move protocol rc=$rc"
# DMA memory from a hugetlb page when the guest has one reserved: one range.
echo 4 > /proc/sys/vm/nr_hugepages
grep -i huge /proc/meminfo
vpfctl blk-workload --vf $BLK --log /tmp/hp.log --state-dir /tmp/hp --requests 100 --start-sector 2048 \
  && [ "$(grep -vc '^#' /tmp/hp/ranges)" = 1 ] && echo "SMOKE-OK hugetlb DMA memory ($(grep -v '^#' /tmp/hp/ranges))" \
  || echo "SMOKE-FAIL hugetlb $(cat /tmp/hp/ranges)"
echo 0 > /proc/sys/vm/nr_hugepages
sync
SCEN
(cd "$W/extra" && printf "bin/vpfctl\nscenario.sh\n" | cpio -o -H newc 2>/dev/null | gzip > ../extra.cpio.gz)
cat "$GUEST/inner-base.cpio.gz" "$W/extra.cpio.gz" > "$W/initrd.gz"
truncate -s 64M "$W/disk.img"
timeout 600 qemu-system-x86_64 -machine q35,accel=tcg -cpu max -m 1024 -smp 1 -nodefaults \
  -no-user-config -display none -serial stdio -no-reboot -kernel "$GUEST/bzImage" \
  -initrd "$W/initrd.gz" -append 'console=ttyS0 quiet panic=-1' \
  -drive file="$W/disk.img",if=none,id=d0,format=raw -device virtio-blk-pci,drive=d0,disable-legacy=on \
  2>&1 | tr -d '\r' > "$W/console.txt"
grep -E "SMOKE|^END" "$W/console.txt"
python3 - "$W/disk.img" "$W/console.txt" <<'PY'
import re, sys
def pattern(seed, n):
    m = (1 << 64) - 1
    st = ((seed * 0x9E3779B97F4A7C15) & m) | 1
    out = bytearray()
    while len(out) < n:
        st ^= st >> 12; st ^= (st << 25) & m; st ^= st >> 27
        out += ((st * 0x2545F4914F6CDD1D) & m).to_bytes(8, "little")
    return bytes(out[:n])
disk = open(sys.argv[1], "rb").read()
ok = bad = 0
for line in open(sys.argv[2]):
    g = re.match(r"FINAL sector=(\d+) bytes=(\d+) id=\d+ dseed=(0x[0-9a-f]+)", line.strip())
    if g:
        s, b, d = int(g[1]), int(g[2]), int(g[3], 16)
        if disk[s * 512:s * 512 + b] == pattern(d, b): ok += 1
        else: bad += 1
print(f"SMOKE host check: {ok} blocks match the log, {bad} differ")
sys.exit(1 if bad or not ok else 0)
PY
if grep -q SMOKE-FAIL "$W/console.txt"; then
    echo "qemu-smoke: FAIL"
    exit 1
fi
echo "qemu-smoke: PASS"
