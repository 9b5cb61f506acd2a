#!/bin/sh
# Guest-side scenario for the real-guest integration tests of the userspace
# owner (busybox sh, vpfctl in PATH, the PF as the only virtio function with
# SR-IOV, at least 2 VFs whose backing files are the same file).
#
# Prints one marker per check: @@VPF:<check>=ok@@ or @@VPF:<check>=fail <why>@@,
# then the workload's FINAL lines as "VPF-FINAL sector=.. bytes=.. id=.. dseed=.."
# for the host-side comparison of the backing file, the migrate JSON as
# "VPF-MIGRATE {...}", the admin round trip as "VPF-BENCH {...}", and finally
# @@VPF:RESULT=ok@@ or @@VPF:RESULT=fail@@. Exit status 0 only if all passed.
#
# Knobs (environment): VPF_AFTER_MOVE (requests after the move, default 200),
# VPF_INFLIGHT (default 8), VPF_ROUNDS (pre-copy rounds, default 2),
# VPF_PRECOPY_MS (least pre-copy time, default 300: the source must complete
# requests while it records, or the record-coverage check has nothing to check).
set -u
V=${VPFCTL:-vpfctl}
FAILED=0
AFTER_MOVE=${VPF_AFTER_MOVE:-200}
INFLIGHT=${VPF_INFLIGHT:-8}
ROUNDS=${VPF_ROUNDS:-2}
PRECOPY_MS=${VPF_PRECOPY_MS:-300}
W=/tmp/vpf
rm -rf "$W"
mkdir -p "$W"

ok() { echo "@@VPF:$1=ok@@"; }
fail() { echo "@@VPF:$1=fail $2@@"; FAILED=1; }

# expect NAME STATUS QUALIFIER CMD... : the command must complete with that
# status and qualifier (by name, from its --json output). The output is
# printed as "VPF-JSON NAME {json}" for the host to check the results.
expect() {
    name=$1 st=$2 q=$3
    shift 3
    out=$("$@" --json 2>/dev/null)
    rc=$?
    echo "VPF-JSON $name $out"
    case "$out" in
    *"\"status\":\"$st\""*"\"qualifier\":\"$q\""*) ok "$name" ;;
    *) fail "$name" "rc=$rc $out" ;;
    esac
}

# run NAME CMD... : the command must succeed.
run() {
    name=$1
    shift
    if out=$("$@" 2>&1); then ok "$name"; else fail "$name" "rc=$? $out"; fi
}

PF=$($V --json info | sed -n 's/.*"dev":"\([^"]*\)".*/\1/p')
[ -n "$PF" ] || { fail find-pf "no virtio PF with SR-IOV"; echo "@@VPF:RESULT=fail@@"; exit 1; }
echo "VPF-PF $PF"
run bind-pf $V bind --dev "$PF"
run sriov-off $V sriov --numvfs 0

# Admin commands that need no member work with VF Enable clear.
expect list-query OK Q_OK $V list-query
expect list-use OK Q_OK $V list-use
expect vf-enable-clear EINVAL Q_INVALID_GROUP $V mode-get --member 1

run sriov-on $V sriov --numvfs 2 --autoprobe off
VF1=$($V vf-bdf --member 1)
VF2=$($V vf-bdf --member 2)
echo "VPF-VFS $VF1 $VF2"

# Every admin command, expected to succeed.
expect mode-get OK Q_OK $V mode-get --member 1
expect ctx-size OK Q_OK $V ctx-size --member 1
expect ctx-size-freeze OK Q_OK $V ctx-size --member 1 --freeze
expect ctx-fields OK Q_OK $V ctx-fields --member 1
expect wr-cap OK Q_OK $V wr-cap --member 1
run ctx-read-active $V ctx-read --member 1 --out "$W/ctx-active.bin"
run freeze-2 $V mode-set --member 2 --mode stop
run freeze-2b $V mode-set --member 2 --mode freeze
run ctx-read-freeze $V ctx-read --member 2 --out "$W/ctx2.bin" --chunk 64
run ctx-write-self $V ctx-write --member 2 --in "$W/ctx2.bin" --chunk 50
expect ctx-discard OK Q_OK $V ctx-discard --member 2
expect wr-start OK Q_OK $V wr-start --member 2 --range 0x100000:16
expect wr-read OK Q_OK $V wr-read --member 2 --addr 0x100000 --len 0x10000
expect wr-stop OK Q_OK $V wr-stop --member 2
expect wr-stop-again OK Q_OK $V wr-stop --member 2

# Error cases.
expect member-0 EINVAL Q_INVALID_MEMBER $V mode-get --member 0
expect member-above-numvfs EINVAL Q_INVALID_MEMBER $V mode-get --member 3
expect bad-group EINVAL Q_INVALID_GROUP $V raw --opcode DEV_MODE_GET --group 2 --member 1
expect bad-opcode EINVAL Q_INVALID_OPCODE $V raw --opcode 0x0e --member 1
expect not-in-use EINVAL Q_INVALID_OPCODE $V --no-list-use mode-get --member 1
expect bad-mode EINVAL Q_INVALID_FIELD $V mode-set --member 1 --mode 3
expect ctx-write-outside-freeze EINVAL Q_INVALID_COMMAND $V raw --opcode DEV_CTX_WRITE --member 1 --data 01000000
expect wr-read-not-started EINVAL Q_INVALID_COMMAND $V wr-read --member 1 --addr 0 --len 4096
expect wr-start-bad-page-size EINVAL Q_INVALID_FIELD $V wr-start --member 1 --page-size 3000 --range 0:1
# One PCI_COMMON_CFG field of length 63 (must be 64), member 2 in Freeze.
HDR=01000000""0000""000000000000""3f00000000000000
VAL=$(i=0; while [ $i -lt 63 ]; do printf 00; i=$((i + 1)); done)
expect wrong-field-length EINVAL Q_INVALID_FIELD $V raw --opcode DEV_CTX_WRITE --member 2 --data "$HDR$VAL"
out=$($V raw --opcode DEV_MODE_GET --member 1 --readable 07000100000000000000 --json 2>/dev/null)
case "$out" in *'"used_len":0'*) ok malformed-short-header ;; *) fail malformed-short-header "$out" ;; esac
expect queue-still-serves OK Q_OK $V mode-get --member 1
run active-2 $V mode-set --member 2 --mode active
echo "VPF-BENCH $($V --json bench --member 1 --count 50)"

# Member migration under load: workload on VF1, migrate 1 -> 2, carry on on VF2.
D=$W/wl
$V --timeout-ms 60000 blk-workload --vf "$VF1" --log "$W/wl.log" --state-dir "$D" --inflight "$INFLIGHT" \
    --after-move "$AFTER_MOVE" > "$W/wl.out" 2>&1 &
WL=$!
n=0
while [ ! -e "$D/ready" ]; do
    sleep 0.1
    n=$((n + 1))
    [ $n -lt 600 ] || break
done
[ -e "$D/ready" ] && ok workload-ready || fail workload-ready "$(cat "$W/wl.out")"
sleep 1
$V --json --timeout-ms 60000 migrate --from 1 --to 2 --rounds "$ROUNDS" --min-precopy-ms "$PRECOPY_MS" --workload-dir "$D" > "$W/migrate.json" 2> "$W/migrate.err"
rc=$?
echo "VPF-MIGRATE $(cat "$W/migrate.json")"
[ $rc = 0 ] && ok migrate || fail migrate "rc=$rc $(cat "$W/migrate.err")"
wait $WL
rc=$?
[ $rc = 0 ] && ok workload-exit || fail workload-exit "rc=$rc $(cat "$W/wl.out")"
grep -q "^END .*result=ok" "$W/wl.log" && ok workload-verified || fail workload-verified "$(grep ^END "$W/wl.log")"
[ "$(grep -c '^MOVED ' "$W/wl.log")" = 1 ] && ok workload-moved || fail workload-moved "no MOVED line"
grep -q "^DONE .*dev=$VF2" "$W/wl.log" && ok completions-on-dest || fail completions-on-dest "none on $VF2"

# Exactly once: every SUBMIT id has exactly one DONE.
awk '/^SUBMIT /{for(i=2;i<=NF;i++) if ($i ~ /^id=/) s[substr($i,4)]++}
     /^DONE /{for(i=2;i<=NF;i++) if ($i ~ /^id=/) d[substr($i,4)]++}
     END{bad=0; for(k in s) if (d[k]!=1) bad++; for(k in d) if (s[k]!=1) bad++;
         print bad; }' "$W/wl.log" > "$W/once"
[ "$(cat "$W/once")" = 0 ] && ok exactly-once || fail exactly-once "$(cat "$W/once") ids"

# Write records cover every page VF1 wrote while recording: requests
# submitted after recording started and completed before Stop was sent.
T0=$(sed -n 's/.*"t_wr_started_ns":\([0-9]*\).*/\1/p' "$W/migrate.json")
T1=$(sed -n 's/.*"t_stop_issued_ns":\([0-9]*\).*/\1/p' "$W/migrate.json")
REC=$(sed -n 's/.*"recorded_pages":\[\([^]]*\)\].*/\1/p' "$W/migrate.json" | tr -d '"' | tr ',' ' ')
awk -v t0="$T0" -v t1="$T1" -v rec="$REC" '
    BEGIN { n = split(rec, r, " "); for (i = 1; i <= n; i++) have[tolower(r[i])] = 1 }
    function val(k,   i) { for (i = 2; i <= NF; i++) if (index($i, k "=") == 1) return substr($i, length(k) + 2); return "" }
    /^SUBMIT / { st[val("id")] = val("t") + 0 }
    /^DONE / {
        id = val("id"); td = val("t") + 0
        if (st[id] > t0 && td < t1) {
            checked++
            m = split(val("wpages"), p, ",")
            for (i = 1; i <= m; i++) if (!(tolower(p[i]) in have)) { missing++; print "missing " p[i] " of request " id > "/dev/stderr" }
        }
    }
    END { printf "%d %d\n", checked + 0, missing + 0 }' "$W/wl.log" > "$W/cover" 2> "$W/cover.err"
set -- $(cat "$W/cover")
if [ "${2:-1}" = 0 ] && [ "${1:-0}" -gt 0 ]; then ok record-coverage; else fail record-coverage "checked=${1:-?} missing=${2:-?} $(head -3 "$W/cover.err")"; fi

grep '^FINAL ' "$W/wl.log" | sed 's/^FINAL /VPF-FINAL /'

# FLR of a VF in Freeze and in Stop keeps its mode (R-MODE-7) and neither
# stops write recording nor clears the records (R-WR-6). VF1 is in Freeze
# after the migration. Its second workload gets its DMA memory from a
# reserved 2 MiB hugetlb page, so it is one range to record.
F=$W/flr
mkdir -p "$F"
echo 4 > /proc/sys/vm/nr_hugepages
# The kernel must reset the VF by FLR (its PCIe capability advertises it).
RM=$(cat "/sys/bus/pci/devices/$VF1/reset_method" 2>/dev/null)
case " $RM " in *" flr "*) ok flr-method ;; *) fail flr-method "reset_method: $RM" ;; esac
echo 1 > "/sys/bus/pci/devices/$VF1/reset" && ok flr-in-freeze || fail flr-in-freeze "write to reset failed"
expect_mode() {
    out=$($V --json mode-get --member "$2" 2>/dev/null)
    case "$out" in *"\"mode\":\"$3\""*) ok "$1" ;; *) fail "$1" "$out" ;; esac
}
expect_mode flr-freeze-keeps-mode 1 freeze
run flr-active $V mode-set --member 1 --mode active
$V --timeout-ms 60000 blk-workload --vf "$VF1" --log "$W/flr.log" --state-dir "$F" --inflight 4 \
    --start-sector 2048 --blocks 16 --after-move 48 > "$W/flr.out" 2>&1 &
WL=$!
n=0
while [ ! -e "$F/ready" ]; do
    sleep 0.1
    n=$((n + 1))
    [ $n -lt 600 ] || break
done
R=$(grep -v '^#' "$F/ranges")
[ "$(echo "$R" | wc -l)" = 1 ] && [ -n "$R" ] && ok flr-one-range || fail flr-one-range "ranges: $R $(cat "$W/flr.out")"
RA=${R%%:*}
RP=${R##*:}
expect flr-wr-start OK Q_OK $V wr-start --member 1 --range "$R"
# Requests submitted after this "move" (onto the same VF) are recorded.
echo "$VF1" > "$F/moved.tmp" && mv "$F/moved.tmp" "$F/moved"
kill -USR1 $WL
wait $WL
rc=$?
[ $rc = 0 ] && ok flr-workload || fail flr-workload "rc=$rc $(cat "$W/flr.out")"
run flr-stop $V mode-set --member 1 --mode stop
echo 1 > "/sys/bus/pci/devices/$VF1/reset" && ok flr-in-stop || fail flr-in-stop "write to reset failed"
expect_mode flr-stop-keeps-mode 1 stop
$V --json wr-read --member 1 --addr "$RA" --len $((RP * 4096)) --max 1024 > "$W/flr-records.json" 2>&1
rc=$?
[ $rc = 0 ] && ok flr-records-readable || fail flr-records-readable "rc=$rc $(cat "$W/flr-records.json")"
echo "VPF-FLR-RECORDS $(cat "$W/flr-records.json")"
TM=$(sed -n 's/^MOVED t=\([0-9]*\) .*/\1/p' "$W/flr.log")
REC=$(sed -n 's/.*"pages":\[\([^]]*\)\].*/\1/p' "$W/flr-records.json" | tr -d '"' | tr ',' ' ')
awk -v t0="${TM:-0}" -v rec="$REC" '
    BEGIN { n = split(rec, r, " "); for (i = 1; i <= n; i++) have[tolower(r[i])] = 1 }
    function val(k,   i) { for (i = 2; i <= NF; i++) if (index($i, k "=") == 1) return substr($i, length(k) + 2); return "" }
    /^SUBMIT / { st[val("id")] = val("t") + 0 }
    /^DONE / {
        id = val("id")
        if (st[id] > t0) {
            checked++
            m = split(val("wpages"), p, ",")
            for (i = 1; i <= m; i++) if (!(tolower(p[i]) in have)) { missing++; print "missing " p[i] " of request " id > "/dev/stderr" }
        }
    }
    END { printf "%d %d\n", checked + 0, missing + 0 }' "$W/flr.log" > "$W/flr-cover" 2> "$W/flr-cover.err"
set -- $(cat "$W/flr-cover")
if [ -n "$TM" ] && [ "${2:-1}" = 0 ] && [ "${1:-0}" -gt 0 ]; then ok flr-keeps-records; else fail flr-keeps-records "moved_t=$TM checked=${1:-?} missing=${2:-?} $(head -3 "$W/flr-cover.err")"; fi
expect flr-wr-stop OK Q_OK $V wr-stop --member 1
run flr-back-active $V mode-set --member 1 --mode active

# And back, the context read and written in small pieces (64-byte reads,
# 50-byte writes): a workload on VF2 migrates to VF1, the source of the first
# migration, reset by FLR since. VF2, left in Freeze, is reset by FLR and
# made Active again. (Every later workload uses its own sectors, so the
# first one's FINAL blocks stay.)
B=$W/back
$V --timeout-ms 60000 blk-workload --vf "$VF2" --log "$W/back.log" --state-dir "$B" --inflight 8 \
    --start-sector 3072 --blocks 16 --after-move 64 > "$W/back.out" 2>&1 &
WL=$!
n=0
while [ ! -e "$B/ready" ]; do
    sleep 0.1
    n=$((n + 1))
    [ $n -lt 600 ] || break
done
$V --json --timeout-ms 60000 migrate --from 2 --to 1 --rounds 1 --read-chunk 64 --chunk 50 --workload-dir "$B" > "$W/back.json" 2>&1
rc=$?
[ $rc = 0 ] && ok migrate-back || fail migrate-back "rc=$rc $(cat "$W/back.json")"
wait $WL
rc=$?
[ $rc = 0 ] && grep -q "^END .*result=ok" "$W/back.log" && grep -q "^MOVED .*to=$VF1" "$W/back.log" \
    && ok migrate-back-workload || fail migrate-back-workload "rc=$rc $(cat "$W/back.out")"
echo 1 > "/sys/bus/pci/devices/$VF2/reset" && ok flr-2 || fail flr-2 "write to reset failed"
run active-2-again $V mode-set --member 2 --mode active

# Garbage on the admin queue and SR-IOV capability; both VFs keep working.
# The workloads after it run under `timeout`: if one ever stalls while the
# guest itself is alive, the run fails at once with the workload's output
# instead of reaching the runner's time limit (seen once, not understood).
g=$($V --json garbage --rounds 100 --sriov-writes 200 --check-member 1 2>&1)
rc=$?
echo "VPF-GARBAGE $g"
[ $rc = 0 ] && ok garbage || fail garbage "rc=$rc"
timeout 120 $V blk-workload --vf "$VF2" --log "$W/after.log" --requests 64 --start-sector 1024 --blocks 16 > "$W/after.out" 2>&1 \
    && ok vf-works-after-garbage || fail vf-works-after-garbage "$(cat "$W/after.out")"
timeout 120 $V blk-workload --vf "$VF1" --log "$W/after1.log" --requests 64 --start-sector 4096 --blocks 16 > "$W/after1.out" 2>&1 \
    && ok vf1-works-after-garbage || fail vf1-works-after-garbage "$(cat "$W/after1.out")"
# An owner that dies in the middle of a migration: vpfctl leaves right
# after the phase with nothing cleaned up (members in Stop or Freeze,
# recording on, a context stream read or written), as a killed owner would,
# but between two commands. A new vpfctl recovers both members (discard the
# streams, stop recording, Active) and both VFs work.
for phase in wr_start precopy stop freeze final_ctx_read ctx_write; do
    out=$($V --json --timeout-ms 60000 migrate --from 1 --to 2 --range 0x1000000:16 --exit-after $phase 2>&1)
    rc=$?
    case "$rc $out" in
    "6 "*"\"abandoned_after\":\"$phase\""*) ok "owner-dies-after-$phase" ;;
    *) fail "owner-dies-after-$phase" "rc=$rc $out" ;;
    esac
    # What the dead owner left: member 1 Active until the Stop, then Stop,
    # then Freeze; member 2 (the destination) in Freeze; recording on.
    case $phase in wr_start | precopy) e1=active ;; stop) e1=stop ;; *) e1=freeze ;; esac
    expect_mode "left-after-$phase-1" 1 $e1
    expect_mode "left-after-$phase-2" 2 freeze
    run "left-recording-after-$phase" $V wr-read --member 1 --addr 0x1000000 --len 65536
    for m in 1 2; do
        $V ctx-discard --member $m > /dev/null 2>&1
        $V wr-stop --member $m > /dev/null 2>&1
        r=$($V mode-set --member $m --mode active 2>&1) || fail "recover-after-$phase-$m" "$r"
    done
    expect_mode "recovered-after-$phase-1" 1 active
    expect_mode "recovered-after-$phase-2" 2 active
done
timeout 120 $V blk-workload --vf "$VF1" --log "$W/dead1.log" --requests 64 --start-sector 6144 --blocks 16 > "$W/dead1.out" 2>&1 \
    && ok vf1-works-after-owner-death || fail vf1-works-after-owner-death "$(cat "$W/dead1.out")"
timeout 120 $V blk-workload --vf "$VF2" --log "$W/dead2.log" --requests 64 --start-sector 8192 --blocks 16 > "$W/dead2.out" 2>&1 \
    && ok vf2-works-after-owner-death || fail vf2-works-after-owner-death "$(cat "$W/dead2.out")"

if [ $FAILED = 0 ]; then echo "@@VPF:RESULT=ok@@"; else echo "@@VPF:RESULT=fail@@"; fi
exit $FAILED
