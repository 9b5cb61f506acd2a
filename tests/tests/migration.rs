//! The VMM's own live migration between two VMM processes on one host,
//! while the guest rewrites a large memory area and does block I/O on VFs
//! the kernel owns.

use std::time::Duration;

use tests::checks::{marker, shared_runner};
use tests::Scenario;

const MIB: usize = 1024 * 1024;

/// The writer (before the beats) and its check (after the flag).
const REWRITER: &str = r#"SIZE=50331648
( r=0
  while [ ! -e /tmp/stop ]; do
    yes "round $r" | head -c $SIZE > /tmp/big
    echo "$r $(md5sum < /tmp/big | cut -d' ' -f1)" > /tmp/big.sum
    r=$((r + 1))
  done ) &
W=$!"#;
const REWRITER_CHECK: &str = r#"touch /tmp/stop; wait $W
read r sum < /tmp/big.sum
now=$(md5sum < /tmp/big | cut -d' ' -f1)
fresh=$(yes "round $r" | head -c $SIZE | md5sum | cut -d' ' -f1)
echo "@@T:MEMORY=rounds=$((r + 1)) noted=$sum now=$now fresh=$fresh@@""#;

/// Beside the source VMM: start a destination VMM with no VM, try a
/// destination nobody listens on and receivers that break off at each
/// phase (the VM goes on), then migrate; the source ends, the destination
/// runs the guest to its end.
const DURING: &str = r#"S=api.sock
n=0
until grep -q GUEST-UP up.img 2> /dev/null; do
  n=$((n + 1)); [ $n -gt 900 ] && { echo "@@T:GUEST-SEEN=no@@"; exit 1; }; sleep 0.1
done
sleep 3
cloud-hypervisor -v --log-file dst.log --api-socket dst.sock &
D=$!
n=0
until ch-remote --api-socket dst.sock ping > /dev/null 2>&1; do
  n=$((n + 1)); [ $n -gt 300 ] && { echo "@@T:DST-UP=no@@"; exit 1; }; sleep 0.1
done
ch-remote --api-socket dst.sock info 2> info.err; echo "@@T:DST-NO-VM=$? $(cat info.err)@@"
ch-remote --api-socket $S send-migration unix:$PWD/nobody.sock 2> e.err; echo "@@T:SEND-NOWHERE=$? $(cat e.err)@@"
# Receivers that break off at each phase: the source goes on (after a
# cut at Complete it stays paused, as the destination may run the VM).
for cut in "start close" "config close" "memory refuse" "state close" "complete close"; do
  set -- $cut
  mig-cutoff $PWD/cut.sock $1 $2 > cut.out 2>&1 &
  C=$!
  n=0; while [ ! -S cut.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
  ch-remote --api-socket $S send-migration unix:$PWD/cut.sock 2> e.err
  echo "@@T:CUT-$1=$? $(cat e.err)@@"
  wait $C
done
echo "@@T:AFTER-CUT-INFO=$(ch-remote --api-socket $S info)@@"
ch-remote --api-socket $S resume; echo "@@T:RESUMED-AFTER-CUT=$?@@"
echo "@@T:AFTER-REFUSED@@"
sleep 1
ch-remote --api-socket dst.sock receive-migration unix:$PWD/mig.sock > recv.out 2>&1 &
R=$!
n=0; while [ ! -S mig.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
echo "@@T:SENDING@@"
ch-remote --api-socket $S send-migration unix:$PWD/mig.sock; echo "@@T:SENT=$?@@"
wait $R; echo "@@T:RECEIVED=$? $(cat recv.out)@@"
echo "@@T:MIGRATED-EVENT=$(grep '"migrated"' src-events.json)@@"
echo "@@T:DST-INFO=$(ch-remote --api-socket dst.sock info)@@"
sleep 2
printf 'MIGRATED' | dd of=up.img bs=512 seek=1 conv=notrunc,sync 2> /dev/null
wait $D; echo "@@T:DST-EXIT=$?@@"
grep -i "error\|warn" dst.log
"#;

/// The guest enables two VFs; in the background it rewrites a 48 MiB file
/// in tmpfs (guest RAM) round after round, noting each round's checksum;
/// in the foreground it beats, writing beat N into block N of VF1's disk.
/// When the host writes MIGRATED into block 1 of the first disk, it stops
/// the rewriting and checks: the file against its noted checksum and
/// against a fresh copy of its round, every beat's block on VF1, and the
/// VFs still disable and re-enable (`tests::vf_beats`).
#[test]
fn a_running_guest_migrates_with_its_memory_disk_io_and_vfs() {
    let scenario = tests::vf_beats::scenario("live-migration")
        .args(["--event-monitor", "path=src-events.json"])
        .script(&tests::vf_beats::guest(
            "MIGRATED",
            REWRITER,
            REWRITER_CHECK,
        ))
        .during(DURING)
        .during_outlives_vmm()
        .tool("mig-cutoff", env!("CARGO_BIN_EXE_mig-cutoff"))
        .step("VFs enabled", "@@T:ENABLE=", Duration::from_secs(60))
        .step("destination up", "@@T:DST-NO-VM=", Duration::from_secs(60))
        .step("cut at start", "@@T:CUT-start=", Duration::from_secs(30))
        .step("cut at config", "@@T:CUT-config=", Duration::from_secs(30))
        .step("cut at memory", "@@T:CUT-memory=", Duration::from_secs(30))
        .step("cut at state", "@@T:CUT-state=", Duration::from_secs(120))
        .step(
            "cut at complete",
            "@@T:CUT-complete=",
            Duration::from_secs(120),
        )
        .step(
            "refused destinations",
            "@@T:AFTER-REFUSED@@",
            Duration::from_secs(30),
        )
        .step("sending", "@@T:SENDING@@", Duration::from_secs(30))
        .step("migrated", "@@T:RECEIVED=", Duration::from_secs(240))
        .step(
            "guest sees the move",
            "@@T:SEEN-MIGRATED=",
            Duration::from_secs(60),
        )
        .step("memory checked", "@@T:MEMORY=", Duration::from_secs(60))
        .step(
            "VFs re-enabled",
            "@@T:VF-DATA-AGAIN=",
            Duration::from_secs(60),
        )
        .step("destination ends", "@@T:DST-EXIT=", Duration::from_secs(30));
    let out = tests::run(shared_runner(), &scenario);
    let sum = out.summary();
    let no_vm = marker(&out, "DST-NO-VM");
    assert!(
        no_vm.starts_with("1 ") && no_vm.contains("has no VM yet"),
        "{no_vm}\n{sum}"
    );
    let nowhere = marker(&out, "SEND-NOWHERE");
    assert!(
        nowhere.starts_with("1 ")
            && nowhere.contains("cannot connect")
            && nowhere.contains("the VM goes on"),
        "{nowhere}\n{sum}"
    );
    // Cut off at each phase: one error, and the VM goes on (after a cut
    // at Complete it waits, paused, until resumed by hand).
    for (phase, why) in [
        ("start", "the other side closed the connection"),
        ("config", "the other side closed the connection"),
        ("memory", "the receiver refused: mig-cutoff refuses memory"),
        ("state", "the other side closed the connection"),
    ] {
        let got = marker(&out, &format!("CUT-{phase}"));
        assert!(
            got.starts_with("1 ") && got.contains(why) && got.contains("the VM goes on here"),
            "{phase}: {got}\n{sum}"
        );
    }
    let complete = marker(&out, "CUT-complete");
    assert!(
        complete.starts_with("1 ") && complete.contains("the VM stays paused here"),
        "{complete}\n{sum}"
    );
    let info: serde_json::Value = serde_json::from_str(&marker(&out, "AFTER-CUT-INFO"))
        .unwrap_or_else(|e| panic!("info: {e}\n{sum}"));
    assert_eq!(info["state"], "Paused", "{info}");
    assert_eq!(marker(&out, "RESUMED-AFTER-CUT"), "0", "{sum}");
    assert_eq!(marker(&out, "SENT"), "0", "{sum}");
    assert_eq!(marker(&out, "RECEIVED").trim(), "0", "{sum}");
    let event = marker(&out, "MIGRATED-EVENT");
    let event: serde_json::Value =
        serde_json::from_str(&event).unwrap_or_else(|e| panic!("{e}: {event}\n{sum}"));
    let props = &event["properties"];
    let number = |k: &str| -> u64 {
        props[k]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {event}"))
    };
    assert!(
        number("bytes") >= 512 * MIB as u64,
        "all memory went: {event}"
    );
    assert!(number("rounds") >= 2, "{event}");
    assert!(number("downtime_ms") < number("total_ms"), "{event}");
    let info: serde_json::Value = serde_json::from_str(&marker(&out, "DST-INFO"))
        .unwrap_or_else(|e| panic!("info: {e}\n{sum}"));
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2, "{info}");

    // The guest's counter went on across the move (and after the refused
    // ones), with its VF data and VFs.
    let at = |t: &str| out.time_of(t).unwrap_or_else(|| panic!("no {t}\n{sum}"));
    let (refused, sending, received) = (
        at("@@T:AFTER-REFUSED@@"),
        at("@@T:SENDING@@"),
        at("@@T:RECEIVED="),
    );
    let beats = tests::vf_beats::beats(&out);
    assert!(
        beats.iter().any(|b| b.0 > refused && b.0 < sending),
        "the guest went on after the refused migration\n{sum}"
    );
    tests::vf_beats::assert_carried_on(&out, received);

    // Memory: the file the guest kept rewriting is what its round says.
    let mem = marker(&out, "MEMORY");
    let field = |k: &str| {
        mem.split(' ')
            .find_map(|f| f.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} in {mem}"))
            .to_string()
    };
    assert_eq!(field("now"), field("noted"), "{mem}");
    assert_eq!(field("now"), field("fresh"), "{mem}");
    assert!(
        field("rounds").parse::<u64>().unwrap_or(0) >= 2,
        "the memory was rewritten while migrating: {mem}"
    );

    assert_eq!(out.scenario_exit(), Some(0), "{sum}");
    assert_eq!(marker(&out, "DST-EXIT"), "0", "{sum}");
    assert_eq!(out.vmm_exit, 0, "the source VMM ends with 0\n{sum}");
}

/// The guest owns the PF with vpfctl: a workload does block I/O on VF1
/// (both VFs share one backing file) and `vpfctl migrate` moves it to VF2
/// with a pre-copy that lasts until the VMM has moved: two rounds, a wait
/// (VF1 keeps working, recorded) until the host's MIGRATED flag appears
/// in block 1 of the first disk, one more round, then the stop-and-copy.
/// Afterwards the guest archives the workload log and the migrate JSON
/// onto the first disk for the host.
const MEMBER_GUEST: &str = r#"V=vpfctl
W=/tmp/vpf; D=$W/wl; mkdir -p $W
$V bind --dev 0000:00:03.0 > /dev/null && $V sriov --numvfs 2 --autoprobe off > /dev/null
echo "@@T:BOUND=$?@@"
VF1=$($V vf-bdf --member 1)
$V --timeout-ms 120000 blk-workload --vf "$VF1" --log $W/wl.log --state-dir $D --inflight 4 \
  --rate 200 --after-move 300 > $W/wl.out 2>&1 &
WL=$!
n=0; while [ ! -e $D/ready ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
( until dd if=/dev/vda bs=512 skip=1 count=1 iflag=direct 2>/dev/null | grep -q MIGRATED; do
    sleep 0.2
  done; touch /tmp/vmm-moved ) &
$V --json --timeout-ms 240000 migrate --from 1 --to 2 --rounds 2 --min-precopy-ms 5000 \
  --precopy-until /tmp/vmm-moved --workload-dir $D > $W/migrate.json 2> $W/migrate.err &
M=$!
sleep 3
echo "@@T:PRECOPY-ON@@"
printf 'GUEST-UP\n' > /tmp/up
dd if=/tmp/up of=/dev/vda conv=fsync 2>/dev/null
wait $M; echo "@@T:MEMBER-MIGRATE=$? $(head -c 300 $W/migrate.err)@@"
wait $WL; echo "@@T:WORKLOAD=$? $(tail -n 1 $W/wl.log)@@"
A=/tmp/archive
: > $A
for f in wl.log migrate.json; do
  echo "VPFFILE $f $(wc -c < $W/$f)" >> $A
  cat $W/$f >> $A
done
echo VPFEND >> $A
dd if=$A of=/dev/vda bs=65536 conv=fsync 2>/dev/null; echo "@@T:ARCHIVE=$?@@"
"#;

/// Beside the source VMM: once the guest's member migration is in
/// pre-copy, migrate the VMM; the destination runs the guest to its end.
const MEMBER_DURING: &str = r#"S=api.sock
n=0
until grep -q GUEST-UP log.img 2> /dev/null; do
  n=$((n + 1)); [ $n -gt 900 ] && { echo "@@T:GUEST-SEEN=no@@"; exit 1; }; sleep 0.1
done
cloud-hypervisor -v --log-file dst.log --api-socket dst.sock &
D=$!
n=0
until ch-remote --api-socket dst.sock ping > /dev/null 2>&1; do
  n=$((n + 1)); [ $n -gt 300 ] && { echo "@@T:DST-UP=no@@"; exit 1; }; sleep 0.1
done
ch-remote --api-socket dst.sock receive-migration unix:$PWD/mig.sock > recv.out 2>&1 &
R=$!
n=0; while [ ! -S mig.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
echo "@@T:SENDING@@"
ch-remote --api-socket $S send-migration unix:$PWD/mig.sock; echo "@@T:SENT=$?@@"
wait $R; echo "@@T:RECEIVED=$? $(cat recv.out)@@"
# The guest's member migration waits for this (whether or not the VMM
# moved: the test then fails on SENT).
printf 'MIGRATED' | dd of=log.img bs=512 seek=1 conv=notrunc,sync 2> /dev/null
wait $D; echo "@@T:DST-EXIT=$?@@"
grep -i "error\|warn" dst.log
"#;

const VF_DISK: &str = "vf.img";

#[test]
fn a_member_migration_in_pre_copy_completes_after_the_vmm_moves() {
    use tests::workload::{
        assert_exactly_once, check_finals, field, json_value, parse_archive, record_coverage,
        requests,
    };
    let scenario = Scenario::new("live-migration-member")
        .args([
            "--cpus",
            "boot=2",
            "--disk",
            "path=log.img",
            "--device",
            &format!("virtio-pf,id=pf0,member=blk,total_vfs=2,disk=pf.img,vf_disk={VF_DISK}"),
            "--api-socket",
            "path=api.sock",
        ])
        .file("log.img", vec![0u8; 8 * MIB])
        .file("pf.img", vec![0u8; MIB])
        .file(VF_DISK, vec![0u8; 16 * MIB])
        .guest_file("bin/vpfctl", tests::guest_tools::vpfctl())
        .script(MEMBER_GUEST)
        .during(MEMBER_DURING)
        .during_outlives_vmm()
        .step("PF bound", "@@T:BOUND=", Duration::from_secs(60))
        .step("pre-copy on", "@@T:PRECOPY-ON@@", Duration::from_secs(60))
        .step("VMM migrated", "@@T:RECEIVED=", Duration::from_secs(240))
        .step(
            "member migrated",
            "@@T:MEMBER-MIGRATE=",
            Duration::from_secs(120),
        )
        .step("workload ends", "@@T:WORKLOAD=", Duration::from_secs(120))
        .step("archived", "@@T:ARCHIVE=", Duration::from_secs(30))
        .step("destination ends", "@@T:DST-EXIT=", Duration::from_secs(30));
    let out = tests::run(shared_runner(), &scenario);
    let sum = out.summary();
    assert_eq!(marker(&out, "BOUND"), "0", "{sum}");
    assert_eq!(marker(&out, "SENT"), "0", "{sum}");
    assert_eq!(marker(&out, "RECEIVED").trim(), "0", "{sum}");
    let at = |t: &str| out.time_of(t).unwrap_or_else(|| panic!("no {t}\n{sum}"));
    // The VMM moved while the member migration was in pre-copy.
    assert!(at("@@T:PRECOPY-ON@@") < at("@@T:SENDING@@"), "{sum}");
    assert!(at("@@T:RECEIVED=") < at("@@T:MEMBER-MIGRATE="), "{sum}");
    assert!(marker(&out, "MEMBER-MIGRATE").starts_with("0 "), "{sum}");
    assert!(marker(&out, "WORKLOAD").starts_with("0 "), "{sum}");
    assert_eq!(marker(&out, "ARCHIVE"), "0", "{sum}");
    assert_eq!(marker(&out, "DST-EXIT"), "0", "{sum}");
    assert_eq!(out.vmm_exit, 0, "{sum}");

    let files = parse_archive(&out.read_file("log.img").expect("log.img"));
    let (log, mig) = match (files.get("wl.log"), files.get("migrate.json")) {
        (Some(l), Some(m)) => (l, m),
        _ => panic!("the archive lacks wl.log or migrate.json\n{sum}"),
    };
    assert_eq!(json_value(mig, "ok").as_deref(), Some("true"), "{mig}");
    let vf2 = json_value(mig, "to_bdf").expect("to_bdf");

    // Every request exactly once, the move, and the data verified.
    let reqs = requests(log);
    assert_exactly_once(&reqs);
    assert_eq!(log.lines().filter(|l| l.starts_with("MOVED ")).count(), 1);
    let on_dest = reqs.values().filter(|q| q.done[0].1 == vf2).count();
    assert!(on_dest >= 300, "{on_dest} completions on {vf2}");
    let end = log
        .lines()
        .find(|l| l.starts_with("END "))
        .expect("END line");
    assert_eq!(field(end, "result"), Some("ok"), "{end}");
    assert_eq!(field(end, "verify_failures"), Some("0"), "{end}");

    // Write records, read partly before the VMM moved (the first rounds)
    // and partly after (the last round, the final drain), cover every page
    // VF1 wrote for a request submitted after recording started and done
    // before Stop, across the move.
    let (checked, missing) = record_coverage(&reqs, mig);
    assert!(checked >= 100, "only {checked} requests while recording");
    assert!(
        missing.is_empty(),
        "{} written pages not in the records: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );

    // The backing file, read from the host after both VMMs ended.
    let disk = out.read_file(VF_DISK).expect("read back the VF disk");
    check_finals(log, &disk, VF_DISK);
}

/// The guest powers off while the VMM is still sending its memory (the
/// receiver, `mig-cutoff`, would take everything up to the state): the
/// migration fails (its pause finds no vCPU to park) and the VMM ends
/// with the guest, status 0, instead of waiting for anything.
#[test]
fn a_guest_that_powers_off_during_a_migration_ends_the_vmm() {
    const GUEST: &str = r#"printf 'GUEST-UP\n' > /tmp/up
dd if=/tmp/up of=/dev/vda conv=fsync 2>/dev/null
# The pre-copy of 512 MiB takes tens of seconds nested: power off in it.
sleep 8
echo "@@T:POWERING-OFF@@"
"#;
    const DURING: &str = r#"n=0
until grep -q GUEST-UP up.img 2> /dev/null; do
  n=$((n + 1)); [ $n -gt 900 ] && { echo "@@T:GUEST-SEEN=no@@"; exit 1; }; sleep 0.1
done
mig-cutoff $PWD/cut.sock state close > cut.out 2>&1 &
n=0; while [ ! -S cut.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
ch-remote --api-socket api.sock send-migration unix:$PWD/cut.sock 2> e.err
echo "@@T:SENT=$? $(cat e.err)@@"
"#;
    let scenario = Scenario::new("migration-poweroff")
        .args([
            "--cpus",
            "boot=2",
            "--disk",
            "path=up.img",
            "--api-socket",
            "path=api.sock",
        ])
        .file("up.img", vec![0u8; MIB])
        .script(GUEST)
        .during(DURING)
        .tool("mig-cutoff", env!("CARGO_BIN_EXE_mig-cutoff"))
        .step(
            "powering off",
            "@@T:POWERING-OFF@@",
            Duration::from_secs(60),
        )
        .step("VMM exit", "@@CH-TEST:VMM-EXIT=", Duration::from_secs(40));
    let out = tests::run(shared_runner(), &scenario);
    let sum = out.summary();
    assert_eq!(out.vmm_exit, 0, "{sum}");
    assert_eq!(out.scenario_exit(), Some(0), "{sum}");
}
