# L1 (Linux 7.x, its /scenario.sh): Debian's QEMU (/opt/qemu, from
# scripts/build-l1-qemu.sh) starts L2 under TCG from the state
# scripts/build-l2-state.sh saved (/l2: L2 booted and waiting for its
# disk), hot-plugs VF1 into it (vfio-pci on virtio_vfio_pci), and
# live-migrates it to a second QEMU that has VF2; VF1 and VF2 share one
# backing file in L0. Both QEMUs run the machine of /l2/machine.args.
#
# Set before this script: AFTER (OK lines L2 logs on the
# destination before the end), DOWNTIME_MS (QEMU's downtime-limit), and the
# limits of L1's own waits in seconds: WAIT_BOOT (the state loads),
# WAIT_PLUG (L2 finds the hot-plugged VF), WAIT_RUN, WAIT_MIGRATE,
# WAIT_AFTER (each shorter than the L0 test's step limit, so that L1 says
# what it was waiting for).
#
# L2's console goes to /tmp/src.serial and /tmp/dst.serial, relayed here
# with "@@" written "%%" (L2's markers are not L1's). Markers:
# @@T:KERNEL, QEMU, ENABLE, BOUND (per VF: driver, IOMMU group),
# L2-LOADED (state loaded), L2-INIT (L2 found the hot-plugged disk), L2-RUNNING, DEST-READY, MIGRATE-STATUS (each change),
# MIGRATED (final status), QUERY-MIGRATE (QEMU's last answer),
# SRC-STATUS / DST-STATUS, AFTER, FAIL (what L1 gave up on), ARCHIVE.
P=/sys/bus/pci/devices/0000:00:03.0
VF1=0000:00:04.0
VF2=0000:00:04.1
Q=/opt/qemu/bin/qemu-system-x86_64
CR=$(printf '\r')
up() { read -r u _ </proc/uptime; echo "$u"; }
T0=$(up)
t() { awk -v a="$T0" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }'; }
fail() {
    echo "@@T:FAIL=$* (L1 t=$(t)s)@@"
    for f in src.err dst.err; do [ -s /tmp/$f ] && sed "s/^/$f| /" /tmp/$f | tail -n 20; done
    dmesg | grep -iE 'vfio|virtio|iommu' | tail -n 20 | sed 's/^/dmesg| /'
    finish 1
}

echo "@@T:KERNEL=$(uname -r)@@"
echo "@@T:QEMU=$($Q --version | head -n 1) [$(cat /etc/l1-qemu-versions)]@@"
mkdir -p /dev/shm /tmp
ip link set lo up || echo "@@T:FAIL=no loopback@@"
echo 0 >$P/sriov_drivers_autoprobe
echo 2 >$P/sriov_numvfs
echo "@@T:ENABLE=$?@@"
for vf in $VF1 $VF2; do
    echo virtio_vfio_pci >/sys/bus/pci/devices/$vf/driver_override
    echo $vf >/sys/bus/pci/drivers_probe
    echo "@@T:BOUND=$vf $(basename "$(readlink /sys/bus/pci/devices/$vf/driver)") group=$(basename "$(readlink /sys/bus/pci/devices/$vf/iommu_group)")@@"
done

# l2 NAME QMP-PORT [QEMU-ARGS...]: a QEMU of L2's machine in the
# background, L2's console in /tmp/NAME.serial (relayed), QEMU's own output
# in /tmp/NAME.err.
l2() {
    name=$1 port=$2
    shift 2
    # The machine's arguments first (a -device names the bus they create),
    # then this QEMU's own.
    own=$#
    while IFS= read -r a; do set -- "$@" "$a"; done </l2/machine.args
    while [ $own -gt 0 ]; do
        a=$1
        shift
        set -- "$@" "$a"
        own=$((own - 1))
    done
    : >/tmp/$name.serial
    (cd /l2 && exec $Q -L /opt/qemu/share -serial file:/tmp/$name.serial \
        -qmp tcp:127.0.0.1:$port,server=on,wait=off "$@" </dev/null >/tmp/$name.err 2>&1) &
    eval "${name}_pid=$!"
    echo $! >/tmp/$name.pid
    tail -n +1 -f /tmp/$name.serial 2>/dev/null | while IFS= read -r l; do
        l=${l%"$CR"}
        echo "L2-$name| ${l//@@/%%}"
    done &
}
alive() { kill -0 "$1" 2>/dev/null; }
# A line every 30 s while L1 waits: how far the QEMUs got (CPU seconds,
# console bytes), so a slow or stuck L2 shows which.
heartbeat() {
    while sleep 30; do
        hb="L1-HB t=$(t)"
        for n in src dst; do
            p=$(cat /tmp/$n.pid 2>/dev/null)
            [ -n "$p" ] && [ -r /proc/$p/stat ] || continue
            hb="$hb $n: cpu=$(awk '{ printf "%.0f", ($14 + $15) / 100 }' /proc/$p/stat)s console=$(wc -c </tmp/$n.serial)B"
        done
        echo "$hb mem_free=$(awk '/MemAvailable/ { print $2 / 1024 "M" }' /proc/meminfo)"
    done
}
# wait_for SECONDS PID COMMAND...: until COMMAND succeeds (1 when PID ends
# or the time is up).
wait_for() {
    n=0 limit=$(($1 * 2)) pid=$2
    shift 2
    until "$@"; do
        alive "$pid" || return 1
        n=$((n + 1))
        [ $n -gt $limit ] && return 1
        sleep 0.5
    done
}
oks() { grep -c '^OK ' "$1" 2>/dev/null; }
oks_at_least() { [ "$(oks "$1")" -ge "$2" ]; }
last_ok() { grep '^OK ' "$1" | tail -n 1 | tr -d "$CR" | cut -d' ' -f2; }
status_of() { sed -n 's/.*"status": *"\([a-z-]*\)".*/\1/p' "$1" | tail -n 1; }
finish() {
    kill "$hb_pid" 2>/dev/null
    for p in ${src_pid:-} ${dst_pid:-}; do alive "$p" && kill "$p"; done
    sleep 1
    for f in src.serial dst.serial src.err dst.err migrate.json; do [ -f /tmp/$f ] && tr -d "$CR" </tmp/$f >/tmp/$f.txt; done
    ARCHIVE
    exit "$1"
}

heartbeat &
hb_pid=$!
# The source: L2 as saved, paused (-S) until VF1 is in. The VF's MSI-X
# table and PBA share BAR 0 with the virtio structures (page-aligned, as
# PCIe asks); QEMU lays its emulated table over the BAR's mapping, which
# leaves mapped sections of unaligned size, and with container dirty
# tracking the first dirty sync of such a section fails (EINVAL:
# "Failed to get dirty bitmap for iova ..."). x-msix-relocation=bar2 puts
# QEMU's MSI-X in a BAR of its own, so BAR 0 stays one mapping.
l2 src 4444 -S -incoming file:/l2/l2.state
qstatus() { qmp "$1" '{"execute":"query-status"}' >/tmp/q 2>/dev/null && [ "$(status_of /tmp/q)" = "$2" ]; }
wait_for "$WAIT_BOOT" "$src_pid" qstatus 4444 paused || fail "L2's saved state did not load: $(cat /tmp/q)"
echo "@@T:L2-LOADED=$(t)@@"
qmp 4444 "{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"vfio-pci\",\"host\":\"$VF1\",\"bus\":\"rp0\",\"id\":\"vf\",\"enable-migration\":\"on\",\"x-msix-relocation\":\"bar2\"}}" '{"execute":"cont"}' >/tmp/q \
    || fail "device_add vfio-pci $VF1: $(grep error /tmp/q)"
echo "@@T:VF-ADDED=$(t)@@"
wait_for "$WAIT_PLUG" "$src_pid" grep -q '^L2 DISK' /tmp/src.serial || fail "L2 found no disk after the hot-plug"
echo "@@T:L2-INIT=$(t) $(grep -a '^L2 DISK' /tmp/src.serial | tr -d "$CR")@@"
wait_for "$WAIT_RUN" "$src_pid" oks_at_least /tmp/src.serial 10 || fail "L2 logged no 10 read-backs"
echo "@@T:L2-RUNNING=$(t) ok=$(oks /tmp/src.serial)@@"

l2 dst 4446 -device vfio-pci,host=$VF2,bus=rp0,id=vf,enable-migration=on,x-msix-relocation=bar2 -incoming tcp:127.0.0.1:4445
wait_for 120 "$dst_pid" qmp 4446 '{"execute":"query-status"}' >/tmp/q 2>/dev/null || fail "destination QEMU answers no QMP: $(cat /tmp/dst.err)"
echo "@@T:DEST-READY=$(t) $(grep '"return"' /tmp/q | tail -n 1)@@"

# Every page QEMU maps for VFIO reads as dirty on every pass (type1 cannot
# see the device's writes, and the device offers QEMU no dirty tracking of
# its own): the switch-over comes once a whole pass fits the downtime limit.
qmp 4444 "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"downtime-limit\":$DOWNTIME_MS,\"max-bandwidth\":4294967296}}" >/tmp/q \
    || fail "migrate-set-parameters: $(cat /tmp/q)"
before=$(last_ok /tmp/src.serial)
echo "@@T:MIGRATE-START=$(t) last_ok=$before@@"
qmp 4444 '{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:4445"}}' >/tmp/q || fail "migrate: $(cat /tmp/q)"
n=0 last=""
while :; do
    qmp 4444 '{"execute":"query-migrate"}' >/tmp/q 2>&1
    st=$(status_of /tmp/q)
    if [ "$st" != "$last" ]; then
        echo "@@T:MIGRATE-STATUS=$st t=$(t)@@"
        last=$st
    fi
    case "$st" in completed | failed | cancelled) break ;; esac
    n=$((n + 1))
    [ $n -gt $((WAIT_MIGRATE / 2)) ] && break
    sleep 2
done
grep '"return"' /tmp/q | tail -n 1 >/tmp/migrate.json
echo "@@T:QUERY-MIGRATE=$(cat /tmp/migrate.json)@@"
echo "@@T:MIGRATED=$st t=$(t)@@"
[ "$st" = completed ] || fail "migration ended $st"
qmp 4444 '{"execute":"query-status"}' >/tmp/q
echo "@@T:SRC-STATUS=$(status_of /tmp/q)@@"
qmp 4446 '{"execute":"query-status"}' >/tmp/q
echo "@@T:DST-STATUS=$(status_of /tmp/q)@@"
qmp 4444 '{"execute":"quit"}' >/dev/null

wait_for "$WAIT_AFTER" "$dst_pid" oks_at_least /tmp/dst.serial "$AFTER" || fail "L2 logged no $AFTER read-backs after the move"
echo "@@T:AFTER=$(t) ok=$(oks /tmp/dst.serial) last_ok=$(last_ok /tmp/dst.serial)@@"
qmp 4446 '{"execute":"quit"}' >/dev/null
wait_for 30 "$dst_pid" false
finish 0
