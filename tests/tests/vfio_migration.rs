//! The real client (issue 12): Linux's own vfio/virtio migration driver
//! (`virtio_vfio_pci`, built for Debian's Linux 7.x by the image script)
//! migrates a VF of a `admin=virtio-1.4` PF. In L1, VF1 and VF2 (sharing
//! one backing file) are bound to `virtio_vfio_pci`; `vpfctl blk-workload
//! --vfio` runs verified I/O on VF1 through VFIO and the virtio-iommu,
//! then drives VFIO's migration state machine — RUNNING → PRE_COPY (the
//! pre-copy data read) → STOP_COPY (the device state read) on VF1,
//! RESUMING (the state written) → RUNNING on VF2 — and carries on on VF2.
//! Every admin command comes from Linux's driver. With `admin=draft` the
//! driver offers no migration and the move fails cleanly.

use tests::checks::{boot, marker};
use tests::workload::{assert_exactly_once, check_finals, field, parse_archive, requests};
use tests::{RunOutput, Scenario};

const MIB: usize = 1024 * 1024;

/// The guest: 2 VFs (no driver probed), both given to virtio_vfio_pci,
/// the workload started on VF1 and moved to VF2 once it runs; its log and
/// output archived on the log disk (00:02.0, not behind the IOMMU).
const SCRIPT: &str = r#"P=/sys/bus/pci/devices/0000:00:03.0
echo "@@T:KERNEL=$(uname -r)@@"
echo "@@T:MODULE=$(grep -c '^virtio_vfio_pci ' /proc/modules)@@"
echo 0 > $P/sriov_drivers_autoprobe
echo 2 > $P/sriov_numvfs; echo "@@T:ENABLE=$?@@"
for vf in 0000:00:04.0 0000:00:04.1; do
  echo virtio_vfio_pci > /sys/bus/pci/devices/$vf/driver_override
  echo $vf > /sys/bus/pci/drivers_probe
  echo "@@T:BOUND=$vf $(basename "$(readlink /sys/bus/pci/devices/$vf/driver)")@@"
done
D=/tmp/wl; mkdir -p $D
vpfctl --json --timeout-ms 20000 blk-workload --vfio --vf 0000:00:04.0 --log /tmp/wl.log \
  --state-dir $D --after-move $AFTER_MOVE --inflight 8 --blocks 64 --seed 3 > /tmp/wl.json 2> /tmp/wl.err &
WL=$!
n=0; until [ -e $D/ready ] || ! kill -0 $WL 2>/dev/null; do
  n=$((n+1)); [ $n -gt 600 ] && break; sleep 0.1
done
echo "@@T:READY=$([ -e $D/ready ] && echo yes || echo no)@@"
sleep 2
echo 0000:00:04.1 > $D/moved; kill -USR1 $WL 2>/dev/null
wait $WL; rc=$?
echo "@@T:WORKLOAD=$rc $(cat /tmp/wl.json) $(cat /tmp/wl.err)@@"
grep MOVED /tmp/wl.log | while read -r l; do echo "@@T:MOVED-LINE=$l@@"; done
dmesg | grep -iE 'virtio|vfio' | tail -n 15 | while read -r l; do echo "@@T:LOG=$l@@"; done
"#;

fn scenario(name: &str, admin: &str, after_move: u64) -> Scenario {
    let images = tests::host::guest_images().unwrap_or_else(|e| panic!("{e}"));
    Scenario::new(name)
        .guest_kernel(&images.bzimage7)
        .args([
            "--cpus",
            "boot=2",
            "--memory",
            "size=768M",
            "--disk",
            "path=log.img",
            "--device",
            &format!(
                "virtio-pf,id=pf0,member=blk,total_vfs=2,disk=pf.img,vf_disk=vf.img,admin={admin},iommu=on"
            ),
        ])
        .file("log.img", vec![0u8; 8 * MIB])
        .file("pf.img", vec![0u8; MIB])
        .file("vf.img", vec![0u8; 4 * MIB])
        .guest_file("bin/vpfctl", tests::guest_tools::vpfctl())
        .script(&format!(
            "AFTER_MOVE={after_move}\n{SCRIPT}{}",
            tests::workload::archive_script("0000:00:02.0", &["wl.log"])
        ))
}

fn common_checks(out: &RunOutput) {
    let sum = out.summary();
    assert!(marker(out, "KERNEL").starts_with("7."), "{sum}");
    assert_eq!(
        marker(out, "MODULE"),
        "1",
        "virtio_vfio_pci not loaded\n{sum}"
    );
    assert_eq!(marker(out, "ENABLE"), "0", "{sum}");
    let bound = out.markers("T:BOUND");
    assert_eq!(
        bound,
        vec![
            "0000:00:04.0 virtio_vfio_pci".to_string(),
            "0000:00:04.1 virtio_vfio_pci".to_string()
        ],
        "{sum}"
    );
    assert_eq!(marker(out, "READY"), "yes", "{sum}");
    assert_eq!(marker(out, "ARCHIVE"), "0", "{sum}");
}

fn workload_log(out: &RunOutput) -> String {
    let files = parse_archive(&out.read_file("log.img").expect("log.img"));
    files
        .get("wl.log")
        .cloned()
        .unwrap_or_else(|| panic!("no workload log\n{}", out.summary()))
}

#[test]
fn linux_virtio_vfio_pci_migrates_a_vf_under_load() {
    let out = boot(scenario("vfio-migration-v14", "virtio-1.4", 300));
    let sum = out.summary();
    common_checks(&out);
    let wl = marker(&out, "WORKLOAD");
    assert!(wl.starts_with("0 "), "workload: {wl}\n{sum}");
    let log = workload_log(&out);
    let moved = log
        .lines()
        .find(|l| l.starts_with("MOVED "))
        .unwrap_or_else(|| panic!("no MOVED line\n{log}\n{sum}"));
    assert_eq!(field(moved, "to"), Some("0000:00:04.1"), "{moved}");
    // VFIO's migration through Linux's driver: PRE_COPY offered, pre-copy
    // data and the device state carried, the destination runs the queue
    // at the source's IOVAs.
    let flags = u64::from_str_radix(
        field(moved, "vfio_flags")
            .unwrap_or("0x0")
            .trim_start_matches("0x"),
        16,
    )
    .unwrap_or(0);
    assert_eq!(flags & 0b101, 0b101, "STOP_COPY | PRE_COPY: {moved}");
    let bytes = |k: &str| {
        field(moved, k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(bytes("precopy_bytes") > 0, "{moved}");
    assert!(bytes("stop_copy_bytes") > 0, "{moved}");
    assert_eq!(field(moved, "dest_desc"), Some("0x40000000"), "{moved}");
    // The move came right after a turn of submissions: requests were in
    // flight on VF1 when it stopped; they completed exactly once below.
    let inflight: u64 = field(moved, "inflight")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(inflight >= 1, "no request in flight at the move: {moved}");
    let end = log.lines().find(|l| l.starts_with("END ")).expect("END");
    assert_eq!(field(end, "result"), Some("ok"), "{end}");
    assert_eq!(field(end, "moves"), Some("1"), "{end}");
    assert_eq!(field(end, "dev"), Some("0000:00:04.1"), "{end}");
    // Every request exactly once, on one side or the other; some after
    // the move on VF2.
    let reqs = requests(&log);
    assert_exactly_once(&reqs);
    let on_dest = log
        .lines()
        .filter(|l| l.starts_with("DONE ") && field(l, "dev") == Some("0000:00:04.1"))
        .count();
    assert!(
        on_dest >= 300,
        "only {on_dest} requests completed on VF2\n{end}"
    );
    // The shared backing file holds the last write of every block.
    let disk = out.read_file("vf.img").expect("vf.img");
    check_finals(&log, &disk, "vf.img");
    println!("vfio migration: {moved}");
}

#[test]
fn with_the_draft_dialect_the_driver_offers_no_migration() {
    let out = boot(scenario("vfio-migration-draft", "draft", 0));
    let sum = out.summary();
    common_checks(&out);
    let wl = marker(&out, "WORKLOAD");
    assert!(
        !wl.starts_with("0 ") && wl.contains("offers no migration"),
        "the move must fail cleanly: {wl}\n{sum}"
    );
    let log = workload_log(&out);
    assert!(
        log.lines()
            .any(|l| l.starts_with("ERROR ") && l.contains("offers no migration")),
        "{log}"
    );
}
