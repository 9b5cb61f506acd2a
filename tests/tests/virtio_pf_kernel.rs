//! virtio-pf with Linux's own owner driver (issue 4, "Kernel owner"): the
//! PF bound to virtio_pci with virtio_blk on it, VFs created through
//! `sriov_numvfs`, each VF a usable /dev/vdX, removal and re-creation.

use tests::checks::{boot, marker};
use tests::pattern::pattern;
use tests::Scenario;

const MIB: usize = 1024 * 1024;

/// The guest: probes the PF, creates 4 VFs, writes a distinct 64 KiB
/// pattern to each VF's disk and reads it back, removes the VFs, creates 2
/// again and uses one, then prints what it saw.
const SCRIPT: &str = r#"P=/sys/bus/pci/devices/0000:00:02.0
echo "@@T:PF-ID=$(cat $P/vendor):$(cat $P/device)@@"
echo "@@T:PF-DRIVER=$(basename "$(readlink $P/driver)")@@"
echo "@@T:PF-CONFIG-SIZE=$(wc -c < $P/config)@@"
echo "@@T:TOTALVFS=$(cat $P/sriov_totalvfs)@@"
echo "@@T:PF-DISK=$(ls $P/virtio*/block 2>/dev/null)@@"
echo 4 > $P/sriov_numvfs; echo "@@T:ENABLE4=$?@@"
echo "@@T:NUMVFS=$(cat $P/sriov_numvfs)@@"
n=0
for v in $P/virtfn*; do
  n=$((n+1))
  vf=$(basename "$(readlink $v)")
  d=/sys/bus/pci/devices/$vf
  disk=$(ls $d/virtio*/block 2>/dev/null)
  echo "@@T:VF=$n $vf $(cat $d/vendor):$(cat $d/device) $(basename "$(readlink $d/driver)") $disk@@"
  [ -n "$disk" ] || continue
  i=0; while [ $i -lt 50 ] && [ ! -b /dev/$disk ]; do sleep 0.1; i=$((i+1)); done
  dd if=/pattern$n.bin of=/dev/$disk bs=65536 conv=fsync 2>/dev/null
  if dd if=/dev/$disk bs=65536 count=1 iflag=direct 2>/dev/null | cmp -s - /pattern$n.bin; then
    echo "@@T:VF-DATA=$n ok@@"
  else
    echo "@@T:VF-DATA=$n bad@@"
  fi
done
echo 0 > $P/sriov_numvfs; echo "@@T:DISABLE=$?@@"
echo "@@T:AFTER-DISABLE=$(ls -d $P/virtfn* 2>/dev/null | wc -l) $(ls /sys/bus/pci/devices | wc -l)@@"
echo 2 > $P/sriov_numvfs; echo "@@T:ENABLE2=$?@@"
echo "@@T:AFTER-REENABLE=$(ls -d $P/virtfn* 2>/dev/null | wc -l)@@"
# virtfn0 is VF 1.
vf=$(basename "$(readlink $P/virtfn0)")
disk=$(ls /sys/bus/pci/devices/$vf/virtio*/block 2>/dev/null)
# The block device node appears asynchronously after the probe.
i=0; while [ $i -lt 50 ] && [ ! -b /dev/$disk ]; do sleep 0.1; i=$((i+1)); done
echo "@@T:REENABLED-DISK=$disk $(cat /sys/block/$disk/size 2>/dev/null)@@"
if [ -n "$disk" ] && dd if=/dev/$disk bs=65536 count=1 iflag=direct 2>/dev/null | cmp -s - /pattern1.bin; then
  echo "@@T:REENABLED-DATA=ok@@"
else
  echo "@@T:REENABLED-DATA=bad $disk@@"
fi
grep -E 'virtio[0-9]+-avq' /proc/interrupts | while read -r l; do echo "@@T:AVQ=$l@@"; done
"#;

#[test]
fn kernel_owner_creates_uses_removes_and_recreates_vfs() {
    let mut s = Scenario::new("virtio-pf-kernel-owner")
        .args([
            "--cpus",
            "boot=2",
            "--device",
            "virtio-pf,id=pf0,member=blk,total_vfs=4,disk=pf.img,vf_disk=vf%n.img",
        ])
        .file("pf.img", vec![0u8; 4 * MIB])
        .script(SCRIPT);
    for n in 1..=4u8 {
        s = s
            .file(&format!("vf{n}.img"), vec![0u8; 4 * MIB])
            .guest_file(&format!("pattern{n}.bin"), pattern(10 + n as u64, 65536));
    }
    let out = boot(s);
    let sum = out.summary();
    assert_eq!(marker(&out, "PF-ID"), "0x1af4:0x1042", "{sum}");
    assert_eq!(marker(&out, "PF-DRIVER"), "virtio-pci", "{sum}");
    assert_eq!(marker(&out, "PF-CONFIG-SIZE"), "4096", "{sum}");
    assert_eq!(marker(&out, "TOTALVFS"), "4", "{sum}");
    assert!(
        marker(&out, "PF-DISK").starts_with("vd"),
        "virtio_blk did not bind on the PF\n{sum}"
    );
    assert_eq!(
        marker(&out, "ENABLE4"),
        "0",
        "echo 4 > sriov_numvfs failed\n{sum}"
    );
    assert_eq!(marker(&out, "NUMVFS"), "4", "{sum}");
    let vfs = out.markers("T:VF");
    assert_eq!(vfs.len(), 4, "expected 4 VFs: {vfs:?}\n{sum}");
    for (i, vf) in vfs.iter().enumerate() {
        let f: Vec<&str> = vf.split_whitespace().collect();
        assert_eq!(f.len(), 5, "VF {i} not bound to virtio_blk: {vf}\n{sum}");
        assert_eq!(f[1], format!("0000:00:03.{i}"), "VF routing ID\n{sum}");
        assert_eq!(f[2], "0x1af4:0x1042", "VF IDs seen by Linux\n{sum}");
        assert_eq!(f[3], "virtio-pci", "{sum}");
    }
    let data = out.markers("T:VF-DATA");
    assert_eq!(
        data,
        (1..=4).map(|n| format!("{n} ok")).collect::<Vec<_>>(),
        "{sum}"
    );
    assert_eq!(marker(&out, "DISABLE"), "0", "{sum}");
    assert_eq!(
        marker(&out, "AFTER-DISABLE"),
        "0 1",
        "VFs left after echo 0\n{sum}"
    );
    assert_eq!(marker(&out, "ENABLE2"), "0", "{sum}");
    assert_eq!(marker(&out, "AFTER-REENABLE"), "2", "{sum}");
    assert_eq!(marker(&out, "REENABLED-DATA"), "ok", "{sum}");
    // Linux's LIST_QUERY / LIST_USE at DRIVER_OK went through the admin
    // queue and were answered with interrupts.
    let avq = out.markers("T:AVQ");
    let count: u64 = avq
        .iter()
        .flat_map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|f| f.parse::<u64>().ok())
        })
        .sum();
    assert!(count >= 2, "admin queue interrupts: {avq:?}\n{sum}");

    // From the host: each VF's backing file holds what the guest wrote.
    for n in 1..=4u8 {
        let f = out
            .read_file(&format!("vf{n}.img"))
            .expect("read back VF disk");
        assert_eq!(
            &f[..65536],
            &pattern(10 + n as u64, 65536)[..],
            "vf{n}.img does not hold the guest's data"
        );
    }
}
