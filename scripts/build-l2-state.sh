#!/usr/bin/env bash
# Boot the nested migration scenario's L2 once, on the host, and save it:
# the L1 QEMU then starts L2 from that state instead of booting it (a boot
# under TCG inside the nested L1 takes over ten minutes; this one takes
# under a minute on the host's TCG). docs/nested-migration.md.
#
# L2 is Debian's 6.12 (build/guest/bzImage) with l2-base.cpio.gz,
# tests/guest/l2-workload.sh as its /scenario.sh and vpfctl in /bin, on the machine of
# tests/guest/l2-machine.args (one QEMU argument per line; the same file L1
# starts QEMU with), under the QEMU of scripts/build-l1-qemu.sh — the very
# binary L1 runs, so the state loads there. Once the workload prints
# "L2 WAITING-FOR-DISK" (it waits for its disk, which L1 hot-plugs: the VF),
# the VM is stopped and migrated to a file.
#
# Output, in $GUEST_DIR/l2-state/ (default build/guest/l2-state/):
#   l2-state.cpio.gz  an archive to append to L1's initramfs:
#                       /l2/bzImage /l2/initrd  L2's kernel and initramfs
#                       /l2/machine.args        tests/guest/l2-machine.args
#                       /l2/l2.state            the saved VM (QEMU migration stream)
#   boot.serial       L2's console during the boot
#
# Cached: rebuilt when an input (this script, the kernel, the initramfs
# base, the workload, the machine arguments, the QEMU archive) changes.
# Options: --force, --quiet; GUEST_DIR; VPFCTL: the static vpfctl binary
# for L2's /bin (the tests build it: tests/src/guest_tools.rs).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GUEST_DIR="${GUEST_DIR:-$REPO_ROOT/build/guest}"
FORCE=0
QUIET=0
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1; shift ;;
        --quiet) QUIET=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
        *) echo "build-l2-state.sh: unknown option: $1" >&2; exit 2 ;;
    esac
done
log() { [ "$QUIET" = 1 ] || echo "build-l2-state: $*" >&2; }
die() { echo "build-l2-state: error: $*" >&2; exit 1; }
# shellcheck source=scripts/archive-lib.sh
. "$REPO_ROOT/scripts/archive-lib.sh"

GUEST_DIR="$(cd "$GUEST_DIR" && pwd)"
QEMU_ARCHIVE="$(GUEST_DIR="$GUEST_DIR" bash "$REPO_ROOT/scripts/build-l1-qemu.sh" --quiet | tail -n 1)"
KERNEL="$GUEST_DIR/bzImage"
BASE="$GUEST_DIR/l2-base.cpio.gz"
WORKLOAD="$REPO_ROOT/tests/guest/l2-workload.sh"
ARGS="$REPO_ROOT/tests/guest/l2-machine.args"
VPFCTL="${VPFCTL:-}"
[ -n "$VPFCTL" ] || die "VPFCTL is not set (the path of a static vpfctl for L2; the test sets it)"
for f in "$QEMU_ARCHIVE" "$KERNEL" "$BASE" "$WORKLOAD" "$ARGS" "$VPFCTL"; do
    [ -f "$f" ] || die "missing $f (run scripts/build-guest-image.sh)"
done
OUT="$GUEST_DIR/l2-state"
mkdir -p "$OUT"
exec 8>"$OUT/.lock"
flock 8

STAMP="$(cat "${BASH_SOURCE[0]}" "$KERNEL" "$BASE" "$WORKLOAD" "$ARGS" "$QEMU_ARCHIVE" "$VPFCTL" | sha256sum | cut -d' ' -f1)"
cached "$OUT" "$STAMP" "$OUT/l2-state.cpio.gz"
WORK="$OUT/work"
rm -rf "$WORK"
mkdir -p "$WORK/qemu" "$WORK/root/l2" "$WORK/x/bin"

# QEMU from the archive, run through its own loader and libraries.
gzip -dc "$QEMU_ARCHIVE" | (cd "$WORK/qemu" && cpio -id --quiet) || die "cannot unpack $QEMU_ARCHIVE"
Q=("$WORK/qemu/lib64/ld-linux-x86-64.so.2" --library-path "$WORK/qemu/lib/x86_64-linux-gnu"
    "$WORK/qemu/opt/qemu/bin/qemu-system-x86_64" -L "$WORK/qemu/opt/qemu/share")

# L2's initramfs: the base, padded to 512 bytes, then the workload as
# /scenario.sh (an uncompressed archive; Linux unpacks both).
L2="$WORK/root/l2"
cp "$KERNEL" "$L2/bzImage"
cp "$ARGS" "$L2/machine.args"
cp "$BASE" "$L2/initrd"
truncate -s $(( ($(stat -c %s "$L2/initrd") + 511) / 512 * 512 )) "$L2/initrd"
install -m 755 "$WORKLOAD" "$WORK/x/scenario.sh"
install -m 755 "$VPFCTL" "$WORK/x/bin/vpfctl"
(cd "$WORK/x" && printf '%s\n' scenario.sh bin/vpfctl | cpio -o -H newc --quiet -R 0:0) >>"$L2/initrd"

mapfile -t MACHINE <"$ARGS"
# QMP over a pair of FIFOs (QEMU's pipe: chardev reads NAME.in and writes
# NAME.out): no TCP port to pick, so builds in other trees cannot meet it.
mkfifo "$WORK/qmp.in" "$WORK/qmp.out"
log "booting L2 under $("${Q[@]}" --version | head -n 1) (TCG)"
(cd "$L2" && exec "${Q[@]}" "${MACHINE[@]}" -serial "file:$WORK/boot.serial" \
    -qmp "pipe:$WORK/qmp" </dev/null >"$WORK/qemu.err" 2>&1) &
QPID=$!
trap 'kill $QPID 2>/dev/null || true' EXIT
# Read-write opens of a FIFO do not wait for the other end.
exec 7<>"$WORK/qmp.in" 6<>"$WORK/qmp.out"
# qmp_reply: the next "return" or "error" line from QEMU.
qmp_reply() {
    local l
    while read -r -t 300 l <&6; do
        case "$l" in *'"return"'* | *'"error"'*) echo "$l"; return 0 ;; esac
    done
    return 1
}
# qmp COMMAND...: each command's reply line.
qmp() {
    local c
    for c in "$@"; do
        echo "$c" >&7
        qmp_reply || return 1
    done
}
read -r -t 120 greeting <&6 || die "no QMP greeting from L2's QEMU: $(cat "$WORK/qemu.err")"
qmp '{"execute":"qmp_capabilities"}' >/dev/null || die "QMP: no answer to qmp_capabilities"

n=0
until grep -q 'L2 WAITING-FOR-DISK' "$WORK/boot.serial" 2>/dev/null; do
    kill -0 $QPID 2>/dev/null || die "L2's QEMU ended before the workload waited for its disk: $(cat "$WORK/qemu.err"; tail -n 20 "$WORK/boot.serial")"
    n=$((n + 1))
    [ $n -le 600 ] || die "L2 did not reach its workload within 300 s: $(tail -n 20 "$WORK/boot.serial")"
    sleep 0.5
done
log "L2 waits for its disk after $((n / 2)) s; saving it"
reply="$(qmp '{"execute":"stop"}' "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"file:$L2/l2.state\"}}")" \
    || die "QMP: $reply"
n=0
while :; do
    st="$(qmp '{"execute":"query-migrate"}')"
    case "$st" in
        *'"completed"'*) break ;;
        *'"failed"'* | *'"cancelled"'* | *'"error"'*) die "saving L2 failed: $st" ;;
    esac
    n=$((n + 1))
    [ $n -le 300 ] || die "saving L2 did not complete: $st"
    sleep 0.2
done
qmp '{"execute":"quit"}' >/dev/null || true
wait $QPID || true
exec 6<&- 7>&-
trap - EXIT
[ -s "$L2/l2.state" ] || die "no state saved"

archive "$WORK/root" "$OUT/l2-state.cpio.gz"
tr -d '\r' <"$WORK/boot.serial" >"$OUT/boot.serial"
log "done: $OUT/l2-state.cpio.gz ($(stat -c %s "$OUT/l2-state.cpio.gz") bytes; state $(stat -c %s "$L2/l2.state") bytes)"
rm -rf "$WORK"
echo "$STAMP" >"$OUT/stamp"
echo "$OUT/l2-state.cpio.gz"
