//! The scenarios of the stress command (`src/bin/stress.rs`): short real
//! guest runs covering the paths where a hang was seen or could hide
//! (plain boot, two vCPUs with disk I/O, the kernel owner enabling and
//! using VFs, vpfctl migrating a member under load), each with per-step
//! deadlines so that a hang fails its run within one step's limit and
//! comes with the VMM's state dump.

use std::time::Duration;

use crate::pattern::pattern;
use crate::Scenario;

const MIB: usize = 1024 * 1024;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The scenario names, in the order a stress round runs them.
pub const SCENARIOS: &[&str] = &["boot", "smp-disk", "pf-kernel", "pf-vpfctl"];

/// Builds scenario `name` (see [`SCENARIOS`]); `None` for an unknown name.
pub fn scenario(name: &str) -> Option<Scenario> {
    Some(match name {
        "boot" => Scenario::new("stress-boot").script(r#"echo "@@T:UP=$(uname -r)@@""#),
        "smp-disk" => Scenario::new("stress-smp-disk")
            .args(["--cpus", "boot=2", "--disk", "path=disk.img"])
            .file("disk.img", vec![0u8; 8 * MIB])
            .guest_file("pattern.bin", pattern(7, MIB))
            .step("online", "@@T:ONLINE=", secs(30))
            .step("write", "@@T:WRITE=", secs(60))
            .script(
                r#"echo "@@T:ONLINE=$(cat /sys/devices/system/cpu/online)@@"
dd if=/pattern.bin of=/dev/vda bs=65536 oflag=direct 2>/dev/null
echo "@@T:WRITE=$?@@"
dd if=/dev/vda bs=65536 count=16 iflag=direct 2>/dev/null | cmp -s - /pattern.bin && echo "@@T:READ=ok@@" || echo "@@T:READ=bad@@""#,
            ),
        "pf-kernel" => Scenario::new("stress-pf-kernel")
            .args([
                "--cpus",
                "boot=2",
                "--device",
                "virtio-pf,id=pf0,member=blk,total_vfs=2,disk=pf.img,vf_disk=vf%n.img",
            ])
            .file("pf.img", vec![0u8; 4 * MIB])
            .file("vf1.img", vec![0u8; 4 * MIB])
            .file("vf2.img", vec![0u8; 4 * MIB])
            .guest_file("pattern.bin", pattern(9, 65536))
            .step("enable", "@@T:ENABLE=", secs(30))
            .step("vf data", "@@T:VF-DATA=", secs(60))
            .step("disable", "@@T:DISABLE=", secs(30))
            .script(
                r#"P=/sys/bus/pci/devices/0000:00:02.0
echo 2 > $P/sriov_numvfs; echo "@@T:ENABLE=$?@@"
vf=$(basename "$(readlink $P/virtfn0)")
disk=$(ls /sys/bus/pci/devices/$vf/virtio*/block 2>/dev/null)
i=0; while [ $i -lt 100 ] && [ ! -b /dev/$disk ]; do sleep 0.1; i=$((i+1)); done
dd if=/pattern.bin of=/dev/$disk bs=65536 oflag=direct 2>/dev/null
if dd if=/dev/$disk bs=65536 count=1 iflag=direct 2>/dev/null | cmp -s - /pattern.bin; then
  echo "@@T:VF-DATA=ok@@"
else
  echo "@@T:VF-DATA=bad $disk@@"
fi
echo 0 > $P/sriov_numvfs; echo "@@T:DISABLE=$?@@""#,
            ),
        "pf-vpfctl" => Scenario::new("stress-pf-vpfctl")
            .args([
                "--cpus",
                "boot=2",
                "--device",
                "virtio-pf,id=pf0,member=blk,total_vfs=2,disk=pf.img,vf_disk=vf.img",
            ])
            .file("pf.img", vec![0u8; 4 * MIB])
            .file("vf.img", vec![0u8; 8 * MIB])
            .guest_file("bin/vpfctl", crate::guest_tools::vpfctl())
            .step("bind", "@@T:BOUND=", secs(30))
            .step("workload", "@@T:WORKLOAD=", secs(30))
            .step("migrate", "@@T:MIGRATE=", secs(90))
            .step("workload end", "@@T:WORKLOAD-END=", secs(90))
            .script(
                r#"V=vpfctl
PF=$($V --json info | sed -n 's/.*"dev":"\([^"]*\)".*/\1/p')
$V bind --dev "$PF" > /dev/null && $V sriov --numvfs 2 --autoprobe off > /dev/null
echo "@@T:BOUND=$?@@"
VF1=$($V vf-bdf --member 1)
D=/tmp/wl
$V --timeout-ms 60000 blk-workload --vf "$VF1" --log /tmp/wl.log --state-dir $D --inflight 8 --after-move 40 > /tmp/wl.out 2>&1 &
WL=$!
n=0; while [ ! -e $D/ready ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
echo "@@T:WORKLOAD=$([ -e $D/ready ] && echo ready || echo missing)@@"
sleep 0.5
$V --json --timeout-ms 60000 migrate --from 1 --to 2 --rounds 2 --workload-dir $D > /tmp/m.json 2>&1
echo "@@T:MIGRATE=$?@@"
wait $WL
echo "@@T:WORKLOAD-END=$? $(grep -c '^END .*result=ok' /tmp/wl.log)@@""#,
            ),
        _ => return None,
    })
}

/// The markers a successful run of scenario `name` prints, with the value
/// each must have (a prefix of it).
pub fn expected(name: &str) -> &'static [(&'static str, &'static str)] {
    match name {
        "boot" => &[("T:UP", "6.12")],
        "smp-disk" => &[("T:ONLINE", "0-1"), ("T:WRITE", "0"), ("T:READ", "ok")],
        "pf-kernel" => &[("T:ENABLE", "0"), ("T:VF-DATA", "ok"), ("T:DISABLE", "0")],
        "pf-vpfctl" => &[
            ("T:BOUND", "0"),
            ("T:WORKLOAD", "ready"),
            ("T:MIGRATE", "0"),
            ("T:WORKLOAD-END", "0 1"),
        ],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_builds_and_has_expectations() {
        for name in SCENARIOS.iter().filter(|n| **n != "pf-vpfctl") {
            let s = scenario(name).unwrap();
            assert!(s.validate().is_ok(), "{name}");
            assert!(!expected(name).is_empty(), "{name}");
        }
        assert!(scenario("nope").is_none());
    }
}
