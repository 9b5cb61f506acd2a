//! The guest the snapshot and migration tests share: it owns a PF's VFs
//! through the kernel and beats, writing each beat's number into VF1's
//! disk, until the host raises a flag; then it checks every block, disables
//! and re-enables the VFs and checks again. And the host side of it.

use std::time::Duration;

use crate::checks::marker;
use crate::{RunOutput, Scenario};

/// The guest script: the PF at 00:03.0 (the first disk, /dev/vda, at
/// 00:02.0) enables two VFs; `background` runs before the beats start;
/// each beat writes `beat N` into block N of VF1's disk and prints
/// `@@T:BEAT=N UPTIME@@`; the loop ends when the host writes `flag` into
/// block 1 of /dev/vda (`@@T:SEEN-<flag>=N@@`); `after_flag` runs; then
/// `@@T:VF-DATA=<bad blocks>@@`, `DISABLE`, `REENABLE` and
/// `VF-DATA-AGAIN` (the blocks read through the re-created VF1).
pub fn guest(flag: &str, background: &str, after_flag: &str) -> String {
    format!(
        r#"P=/sys/bus/pci/devices/0000:00:03.0
echo 2 > $P/sriov_numvfs; echo "@@T:ENABLE=$?@@"
VF1=$(basename "$(readlink $P/virtfn0)")
blk() {{ ls /sys/bus/pci/devices/$1/virtio*/block/ 2>/dev/null | head -n 1; }}
n=0; while [ -z "$(blk $VF1)" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
B=/dev/$(blk $VF1)
echo "@@T:VF1-DISK=$B@@"
check() {{
  bad=0; j=0
  while [ $j -le $1 ]; do
    got=$(dd if=$2 bs=512 skip=$j count=1 iflag=direct 2>/dev/null | tr -d '\000')
    [ "$got" = "$(printf 'beat %06d' $j)" ] || bad=$((bad + 1))
    j=$((j + 1))
  done
  echo $bad
}}
{background}
printf 'GUEST-UP\n' > /tmp/up
dd if=/tmp/up of=/dev/vda conv=fsync 2>/dev/null
i=0
while :; do
  printf 'beat %06d' $i | dd of=/tmp/blk bs=512 conv=sync 2>/dev/null
  dd if=/tmp/blk of=$B bs=512 seek=$i conv=fsync,notrunc 2>/dev/null || echo "@@T:WRITE-FAILED=$i@@"
  echo "@@T:BEAT=$i $(cut -d' ' -f1 /proc/uptime)@@"
  dd if=/dev/vda bs=512 skip=1 count=1 iflag=direct 2>/dev/null | grep -q {flag} && break
  i=$((i + 1))
  sleep 0.3
done
echo "@@T:SEEN-{flag}=$i@@"
{after_flag}
echo "@@T:VF-DATA=$(check $i $B)@@"
echo 0 > $P/sriov_numvfs; echo "@@T:DISABLE=$?@@"
echo 2 > $P/sriov_numvfs; echo "@@T:REENABLE=$?@@"
VF1=$(basename "$(readlink $P/virtfn0)")
n=0; while [ -z "$(blk $VF1)" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
echo "@@T:VF-DATA-AGAIN=$(check $i /dev/$(blk $VF1))@@"
"#
    )
}

/// The machine [`guest`] runs on: 2 vCPUs, the first disk `up.img`
/// (00:02.0), a virtio-pf with two VFs (00:03.0, `vf1.img`, `vf2.img`),
/// the API socket `api.sock`.
pub fn scenario(name: &str) -> Scenario {
    const MIB: usize = 1024 * 1024;
    Scenario::new(name)
        .args([
            "--cpus",
            "boot=2",
            "--disk",
            "path=up.img",
            "--device",
            "virtio-pf,id=pf0,member=blk,total_vfs=2,disk=pf.img,vf_disk=vf%n.img",
            "--api-socket",
            "path=api.sock",
        ])
        .file("up.img", vec![0u8; MIB])
        .file("pf.img", vec![0u8; MIB])
        .file("vf1.img", vec![0u8; MIB])
        .file("vf2.img", vec![0u8; MIB])
}

/// When each beat reached the host, and its number.
pub fn beats(out: &RunOutput) -> Vec<(Duration, u64)> {
    out.lines
        .iter()
        .filter_map(|l| {
            let v = crate::scenario::marker_in(&l.text, "T:BEAT")?;
            Some((l.at, v.split(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The guest's counter went on with every number once, in order (beats
/// before and after `moment`), no VF write failed, every block on VF1 is
/// intact, and the VFs disabled and re-enabled with their data.
pub fn assert_carried_on(out: &RunOutput, moment: Duration) {
    let sum = out.summary();
    let beats = beats(out);
    let numbers: Vec<u64> = beats.iter().map(|b| b.1).collect();
    let want: Vec<u64> = (0..numbers.len() as u64).collect();
    assert_eq!(numbers, want, "beats lost or repeated\n{sum}");
    assert!(beats.iter().any(|b| b.0 < moment), "no beat before\n{sum}");
    assert!(beats.iter().any(|b| b.0 > moment), "no beat after\n{sum}");
    assert!(out.markers("T:WRITE-FAILED").is_empty(), "{sum}");
    assert_eq!(marker(out, "VF-DATA"), "0", "bad beat blocks\n{sum}");
    assert_eq!(marker(out, "DISABLE"), "0", "{sum}");
    assert_eq!(marker(out, "REENABLE"), "0", "{sum}");
    assert_eq!(marker(out, "VF-DATA-AGAIN"), "0", "bad beat blocks\n{sum}");
}
