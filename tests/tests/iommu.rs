//! The virtio-iommu in a real guest (issue 12): Linux's virtio_iommu
//! driver finds it through ACPI VIOT, puts the `iommu=on` disk, PF and VFs
//! in translated DMA domains, and their I/O goes through its MAP/UNMAP
//! requests; a VF is given to vfio-pci.

use tests::checks::{boot, marker};
use tests::pattern::pattern;
use tests::Scenario;

const MIB: usize = 1024 * 1024;

/// The guest: the IOMMU's driver and groups, a pattern through the disk,
/// the PF and both VFs (virtio_blk over translated DMA), then VF 2 moved
/// to vfio-pci.
const SCRIPT: &str = r#"for v in /sys/bus/virtio/devices/*; do
  [ "$(cat $v/device)" = "0x0017" ] && echo "@@T:IOMMU=$(basename "$(readlink $v/driver)") $(basename "$(readlink -f $v/..)")@@"
done
echo "@@T:VIOT=$(dmesg | grep -c 'ACPI: VIOT')@@"
P=/sys/bus/pci/devices/0000:00:04.0
echo 2 > $P/sriov_numvfs; echo "@@T:ENABLE=$?@@"
i=0; while [ $i -lt 100 ] && [ "$(ls /sys/block | grep -c vd)" -lt 4 ]; do sleep 0.1; i=$((i+1)); done
for f in 0000:00:01.0 0000:00:02.0 0000:00:04.0 0000:00:05.0 0000:00:05.1; do
  d=/sys/bus/pci/devices/$f
  g=$(basename "$(readlink $d/iommu_group 2>/dev/null)" 2>/dev/null)
  t=$(cat $d/iommu_group/type 2>/dev/null)
  disk=$(ls $d/virtio*/block 2>/dev/null)
  # Feature bit 33 (VIRTIO_F_ACCESS_PLATFORM): the driver maps its buffers.
  ap=$(cut -c34 $d/virtio*/features 2>/dev/null)
  echo "@@T:FN=$f group=${g:-none} type=${t:-none} disk=${disk:-none} access_platform=${ap:-none}@@"
  [ -n "$disk" ] || continue
  dd if=/pattern.bin of=/dev/$disk bs=65536 oflag=direct conv=fsync 2>/dev/null
  if dd if=/dev/$disk bs=65536 count=4 iflag=direct 2>/dev/null | cmp -s - /pattern.bin; then
    echo "@@T:DATA=$f ok@@"
  else
    echo "@@T:DATA=$f bad@@"
  fi
done
# VF 2 to vfio-pci: unbind from virtio-pci, override, probe.
V=/sys/bus/pci/devices/0000:00:05.1
echo 0000:00:05.1 > $V/driver/unbind
echo vfio-pci > $V/driver_override
echo 0000:00:05.1 > /sys/bus/pci/drivers_probe
g=$(basename "$(readlink $V/iommu_group)")
echo "@@T:VFIO=$(basename "$(readlink $V/driver)") $( [ -c /dev/vfio/$g ] && echo node )@@"
dmesg | grep -iE 'iommu|vfio' | tail -n 20 | while read -r l; do echo "@@T:LOG=$l@@"; done
# Tell the host (flag disk, 00:03.0, not behind the IOMMU) and wait for it
# to read the VMM's counters.
printf 'GUEST-DONE\n' > /tmp/f; dd if=/tmp/f of=/dev/$(ls /sys/bus/pci/devices/0000:00:03.0/virtio*/block) conv=fsync 2>/dev/null
F=/dev/$(ls /sys/bus/pci/devices/0000:00:03.0/virtio*/block)
n=0; until dd if=$F bs=512 count=1 iflag=direct 2>/dev/null | grep -q HOST-ACK; do
  n=$((n+1)); [ $n -gt 300 ] && { echo "@@T:ACK=none@@"; exit 1; }; sleep 0.1
done
echo "@@T:ACK=yes@@"
"#;

/// Beside the VMM: once the guest is done, the VMM's counters of the
/// virtio-iommu, then the acknowledgement on the flag disk.
const DURING: &str = r#"n=0
until grep -q GUEST-DONE flag.img 2> /dev/null; do
  n=$((n + 1)); [ $n -gt 1200 ] && { echo "@@T:COUNTERS=none@@"; exit 1; }; sleep 0.1
done
echo "@@T:COUNTERS=$(ch-remote --api-socket api.sock counters)@@"
printf 'HOST-ACK
' | dd of=flag.img conv=notrunc 2> /dev/null
"#;

#[test]
fn linux_translates_disk_pf_and_vf_dma_through_the_virtio_iommu() {
    let data = pattern(77, 4 * 65536);
    let s = Scenario::new("iommu-linux")
        .args([
            "--cpus",
            "boot=2",
            "--disk",
            "path=disk.img,iommu=on",
            "path=flag.img",
            "--api-socket",
            "path=api.sock",
            "--device",
            "virtio-pf,id=pf0,member=blk,total_vfs=2,disk=pf.img,vf_disk=vf%n.img,iommu=on",
        ])
        .file("disk.img", vec![0u8; 4 * MIB])
        .file("flag.img", vec![0u8; MIB])
        .during(DURING)
        .file("pf.img", vec![0u8; 4 * MIB])
        .file("vf1.img", vec![0u8; 4 * MIB])
        .file("vf2.img", vec![0u8; 4 * MIB])
        .guest_file("pattern.bin", data.clone())
        .script(SCRIPT);
    let out = boot(s);
    let sum = out.summary();
    assert_eq!(marker(&out, "IOMMU"), "virtio_iommu 0000:00:01.0", "{sum}");
    assert_eq!(marker(&out, "ENABLE"), "0", "{sum}");
    let fns = out.markers("T:FN");
    assert_eq!(fns.len(), 5, "{fns:?}\n{sum}");
    // The IOMMU itself is not behind itself; every other function is in
    // a group of its own with a translating (DMA) default domain.
    assert!(fns[0].contains("group=none"), "{fns:?}\n{sum}");
    let mut groups = Vec::new();
    for f in &fns[1..] {
        assert!(
            f.contains("type=DMA"),
            "not in a translated DMA domain: {f}\n{sum}"
        );
        assert!(!f.contains("disk=none"), "no virtio_blk disk: {f}\n{sum}");
        groups.push(f.split_whitespace().nth(1).unwrap_or("").to_string());
    }
    groups.sort();
    groups.dedup();
    assert_eq!(groups.len(), 4, "one group per function: {fns:?}\n{sum}");
    let data_ok = out.markers("T:DATA");
    assert_eq!(data_ok.len(), 4, "{data_ok:?}\n{sum}");
    assert!(
        data_ok.iter().all(|d| d.ends_with(" ok")),
        "{data_ok:?}\n{sum}"
    );
    for f in &fns[1..] {
        assert!(f.ends_with("access_platform=1"), "{f}\n{sum}");
    }
    // The VMM's side: the driver's requests, the domains and mappings they
    // made.
    assert_eq!(marker(&out, "ACK"), "yes", "{sum}");
    let counters: serde_json::Value = serde_json::from_str(&marker(&out, "COUNTERS"))
        .unwrap_or_else(|e| panic!("counters: {e}\n{sum}"));
    let iommu = &counters["00:01.0"];
    let n = |k: &str| iommu[k].as_u64().unwrap_or(0);
    assert!(n("requests") > 50, "{iommu}\n{sum}");
    assert!(n("attached") >= 3, "{iommu}\n{sum}");
    assert!(n("mappings") > 0, "{iommu}\n{sum}");
    assert_eq!(
        n("faults_reported") + n("faults_dropped"),
        0,
        "{iommu}\n{sum}"
    );
    assert_eq!(marker(&out, "VFIO"), "vfio-pci node", "{sum}");
    // From the host: every backing file holds the pattern.
    for f in ["disk.img", "pf.img", "vf1.img", "vf2.img"] {
        let b = out.read_file(f).expect("read back");
        assert_eq!(&b[..data.len()], &data[..], "{f}\n{sum}");
    }
}

/// The guest for the VFIO workload: VF 1 (not probed by virtio-pci) given
/// to vfio-pci by `vpfctl --bind`, which then drives it from userspace with
/// its rings and buffers mapped through the IOMMU; the log comes back on
/// the first disk (not behind the IOMMU).
const VFIO_SCRIPT: &str = r#"P=/sys/bus/pci/devices/0000:00:03.0
echo 0 > $P/sriov_drivers_autoprobe
echo 2 > $P/sriov_numvfs; echo "@@T:ENABLE=$?@@"
vpfctl --bind --json blk-workload --vfio --vf 0000:00:04.0 --log /tmp/wl.log \
  --requests 400 --inflight 8 --blocks 64 --seed 9 > /tmp/wl.json 2> /tmp/wl.err
echo "@@T:WORKLOAD=$? $(cat /tmp/wl.json) $(cat /tmp/wl.err)@@"
echo "@@T:DRIVER=$(basename "$(readlink /sys/bus/pci/devices/0000:00:04.0/driver)")@@"
"#;

#[test]
fn a_userspace_driver_runs_a_vf_through_vfio_and_the_iommu() {
    use tests::workload::{assert_exactly_once, check_finals, field, parse_archive, requests};
    let s = Scenario::new("iommu-vfio-workload")
        .args([
            "--cpus",
            "boot=2",
            "--disk",
            "path=log.img",
            "--device",
            "virtio-pf,id=pf0,member=blk,total_vfs=2,disk=pf.img,vf_disk=vf.img,iommu=on",
        ])
        .file("log.img", vec![0u8; 8 * MIB])
        .file("pf.img", vec![0u8; MIB])
        .file("vf.img", vec![0u8; 4 * MIB])
        .guest_file("bin/vpfctl", tests::guest_tools::vpfctl())
        .script(&format!(
            "{VFIO_SCRIPT}{}",
            tests::workload::archive_script("0000:00:02.0", &["wl.log"])
        ));
    let out = boot(s);
    let sum = out.summary();
    assert_eq!(marker(&out, "ENABLE"), "0", "{sum}");
    let wl = marker(&out, "WORKLOAD");
    assert!(
        wl.starts_with("0 "),
        "vpfctl blk-workload --vfio: {wl}\n{sum}"
    );
    assert_eq!(marker(&out, "DRIVER"), "vfio-pci", "{sum}");
    assert_eq!(marker(&out, "ARCHIVE"), "0", "{sum}");
    let files = parse_archive(&out.read_file("log.img").expect("log.img"));
    let log = files
        .get("wl.log")
        .unwrap_or_else(|| panic!("no log\n{sum}"));
    // The device saw I/O virtual addresses: the rings at the IOVA the tool
    // maps its memory at, not a guest physical address.
    let start = log
        .lines()
        .find(|l| l.starts_with("START "))
        .expect("START");
    assert_eq!(field(start, "desc"), Some("0x40000000"), "{start}");
    let end = log.lines().find(|l| l.starts_with("END ")).expect("END");
    assert_eq!(field(end, "result"), Some("ok"), "{end}");
    // 400 requests, plus the verification reads of the last writes.
    let completed: usize = field(end, "completed").unwrap_or("0").parse().unwrap_or(0);
    assert!(completed >= 400, "{end}");
    assert_eq!(field(end, "submitted"), field(end, "completed"), "{end}");
    let reqs = requests(log);
    assert_eq!(reqs.len(), completed);
    assert_exactly_once(&reqs);
    let disk = out.read_file("vf.img").expect("vf.img");
    check_finals(log, &disk, "vf.img");
}
