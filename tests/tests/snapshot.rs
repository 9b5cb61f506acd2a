//! The VMM's own snapshot and restore, in a real guest that owns a
//! virtio-pf's VFs through the kernel: snapshot a paused VM, end the VMM,
//! restore the snapshot in a new VMM, resume, and the guest carries on.

use std::time::Duration;

use tests::checks::{marker, shared_runner};

/// Beside the first VMM: pause, snapshot, end it; then a second VMM
/// restores the snapshot, is resumed, and runs until the guest powers off.
const DURING: &str = r#"S=api.sock
n=0
until grep -q GUEST-UP up.img 2> /dev/null; do
  n=$((n + 1)); [ $n -gt 900 ] && { echo "@@T:GUEST-SEEN=no@@"; exit 1; }; sleep 0.1
done
sleep 2
ch-remote --api-socket $S snapshot file://$PWD/snap 2> s.err; echo "@@T:SNAPSHOT-RUNNING=$? $(cat s.err)@@"
ch-remote --api-socket $S pause; echo "@@T:PAUSED=$?@@"
ch-remote --api-socket $S snapshot file://$PWD/snap; echo "@@T:SNAPSHOT=$?@@"
echo "@@T:SNAPSHOT-FILES=$(ls snap | tr '\n' ' ')@@"
ch-remote --api-socket $S shutdown-vmm; echo "@@T:FIRST-DOWN=$?@@"
n=0; while [ -e $S ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
R="cloud-hypervisor --restore source_url=file://$PWD/snap --api-socket b.sock"
# Damaged copies: each must fail with one error line and no VM.
cp snap/state.bin state.good
head -c 100 state.good > snap/state.bin
$R > bad.out 2>&1; echo "@@T:BAD-TRUNCATED=$? $(cat bad.out)@@"
cp state.good snap/state.bin
printf '\011' | dd of=snap/state.bin bs=1 seek=8 conv=notrunc 2> /dev/null
$R > bad.out 2>&1; echo "@@T:BAD-VERSION=$? $(cat bad.out)@@"
cp state.good snap/state.bin
cp snap/config.json config.good
sed 's/536870912/268435456/' config.good > snap/config.json
$R > bad.out 2>&1; echo "@@T:BAD-MISMATCH=$? $(cat bad.out)@@"
cp config.good snap/config.json
AT=104857600
dd if=snap/memory.bin of=byte.orig bs=1 skip=$AT count=1 2> /dev/null
if [ "$(cat byte.orig)" = X ]; then c=Y; else c=X; fi
printf $c | dd of=snap/memory.bin bs=1 seek=$AT conv=notrunc 2> /dev/null
$R > bad.out 2>&1; echo "@@T:BAD-MEMORY=$? $(cat bad.out)@@"
dd if=byte.orig of=snap/memory.bin bs=1 seek=$AT conv=notrunc 2> /dev/null
echo "@@T:RESTORING@@"
cloud-hypervisor -v --log-file restore.log --restore source_url=file://$PWD/snap --api-socket r.sock &
V2=$!
n=0
until ch-remote --api-socket r.sock ping > /dev/null 2>&1; do
  n=$((n + 1))
  if [ $n -gt 300 ] || ! kill -0 $V2 2> /dev/null; then
    echo "@@T:RESTORED-API=no@@"; kill $V2; cat restore.log; exit 1
  fi
  sleep 0.1
done
echo "@@T:RESTORED-INFO=$(ch-remote --api-socket r.sock info)@@"
sleep 1
echo "@@T:RESUMING@@"
ch-remote --api-socket r.sock resume; echo "@@T:RESUMED=$?@@"
sleep 2
printf 'RESTORED' | dd of=up.img bs=512 seek=1 conv=notrunc,sync 2> /dev/null
wait $V2; echo "@@T:SECOND-EXIT=$?@@"
grep -i "restor\|error\|warn" restore.log
"#;

/// The guest enables two VFs, then beats: each beat writes its number into
/// block N of VF1's disk. When the host writes RESTORED into block 1 of the
/// first disk, it checks every beat's block on VF1, disables and
/// re-enables the VFs (the kernel owner after a restore) and checks again
/// (`tests::vf_beats`).
#[test]
fn a_restored_snapshot_carries_on_with_its_counter_disk_data_and_vfs() {
    let scenario = tests::vf_beats::scenario("snapshot-restore")
        .script(&tests::vf_beats::guest("RESTORED", "", ""))
        .during(DURING)
        .during_outlives_vmm()
        .step("VFs enabled", "@@T:ENABLE=", Duration::from_secs(60))
        .step("paused", "@@T:PAUSED=", Duration::from_secs(60))
        .step("snapshot", "@@T:SNAPSHOT=", Duration::from_secs(60))
        .step(
            "restored VMM up",
            "@@T:RESTORED-INFO=",
            Duration::from_secs(60),
        )
        .step("resumed", "@@T:RESUMED=", Duration::from_secs(30))
        .step(
            "guest sees the restore",
            "@@T:SEEN-RESTORED=",
            Duration::from_secs(60),
        )
        .step(
            "VFs re-enabled",
            "@@T:VF-DATA-AGAIN=",
            Duration::from_secs(60),
        )
        .step(
            "second VMM ends",
            "@@T:SECOND-EXIT=",
            Duration::from_secs(30),
        );
    let out = tests::run(shared_runner(), &scenario);
    let sum = out.summary();
    let refused = marker(&out, "SNAPSHOT-RUNNING");
    assert!(
        refused.starts_with("1 ") && refused.contains("405"),
        "a snapshot of a running VM is refused: {refused}\n{sum}"
    );
    for k in ["ENABLE", "PAUSED", "SNAPSHOT", "FIRST-DOWN", "RESUMED"] {
        assert_eq!(marker(&out, k), "0", "{k}\n{sum}");
    }
    let files = marker(&out, "SNAPSHOT-FILES");
    for f in ["config.json", "memory.bin", "state.bin"] {
        assert!(files.contains(f), "{f} in {files}");
    }
    // Damaged snapshots: status 1, one error line saying what is wrong.
    let version = format!(
        "format version 9, this VMM reads version {}",
        vm_migration::state::STATE_VERSION
    );
    for (k, why) in [
        ("BAD-TRUNCATED", "state.bin: truncated"),
        ("BAD-VERSION", version.as_str()),
        (
            "BAD-MISMATCH",
            "the configuration has 268435456 bytes of memory, the state 536870912",
        ),
        (
            "BAD-MEMORY",
            "memory.bin: checksum mismatch: the memory is corrupted",
        ),
    ] {
        let got = marker(&out, k);
        assert!(
            got.starts_with("1 Error: ") && got.contains(why),
            "{k}: {got}\n{sum}"
        );
    }
    let info: serde_json::Value = serde_json::from_str(&marker(&out, "RESTORED-INFO"))
        .unwrap_or_else(|e| panic!("info: {e}\n{sum}"));
    assert_eq!(
        info["state"], "Paused",
        "a restored VM waits for resume: {info}"
    );

    // The guest's counter went on across the restore, and VF1's disk holds
    // every beat, written before and after, also after the kernel disabled
    // and re-enabled the VFs.
    let restoring = out
        .time_of("@@T:RESTORING@@")
        .unwrap_or_else(|| panic!("no RESTORING\n{sum}"));
    tests::vf_beats::assert_carried_on(&out, restoring);
    assert_eq!(out.scenario_exit(), Some(0), "{sum}");
    assert_eq!(marker(&out, "SECOND-EXIT"), "0", "{sum}");
    assert_eq!(out.vmm_exit, 0, "the first VMM ends with 0\n{sum}");
}
