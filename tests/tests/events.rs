//! `--event-monitor`: the events of a real guest's kernel-owner VF Enable and
//! a `vpfctl` member migration, one JSON object per line, in order.

use std::time::Duration;

use tests::checks::{boot, marker};
use tests::Scenario;

const MIB: usize = 1024 * 1024;
const EVENTS_BYTES: usize = 512 * 1024;

const SCRIPT: &str = r#"P=/sys/bus/pci/devices/0000:00:02.0
echo 2 > $P/sriov_numvfs; echo "@@T:ENABLE=$?@@"
echo "@@T:VF1=$(basename "$(readlink $P/virtfn0)")@@"
sleep 1
echo 0 > $P/sriov_numvfs; echo "@@T:DISABLE=$?@@"
V=vpfctl
$V bind --dev 0000:00:02.0 > /dev/null && $V sriov --numvfs 2 --autoprobe off > /dev/null
echo "@@T:BOUND=$?@@"
VF1=$($V vf-bdf --member 1)
D=/tmp/wl
$V --timeout-ms 60000 blk-workload --vf "$VF1" --log /tmp/wl.log --state-dir $D --inflight 8 --after-move 40 > /tmp/wl.out 2>&1 &
WL=$!
n=0; while [ ! -e $D/ready ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
sleep 0.5
$V --json --timeout-ms 60000 migrate --from 1 --to 2 --rounds 2 --workload-dir $D > /tmp/m.json 2>&1
echo "@@T:MIGRATE=$?@@"
wait $WL
echo "@@T:WORKLOAD-END=$?@@"
"#;

/// (source, event, properties that must match).
type Wanted<'a> = (&'a str, &'a str, Vec<(String, String)>);

#[derive(Debug)]
struct Event {
    at: Duration,
    source: String,
    event: String,
    props: serde_json::Value,
}

fn parse(bytes: &[u8]) -> Vec<Event> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end])
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            let t = &v["timestamp"];
            Event {
                at: Duration::new(
                    t["secs"].as_u64().expect("secs"),
                    t["nanos"].as_u64().expect("nanos") as u32,
                ),
                source: v["source"].as_str().expect("source").to_string(),
                event: v["event"].as_str().expect("event").to_string(),
                props: v["properties"].clone(),
            }
        })
        .collect()
}

#[test]
fn the_event_monitor_follows_vf_enable_and_a_member_migration_in_order() {
    let scenario = Scenario::new("event-monitor")
        .args([
            "--cpus",
            "boot=2",
            "--device",
            "virtio-pf,id=pf0,member=blk,total_vfs=2,disk=pf.img,vf_disk=vf.img",
            "--event-monitor",
            "path=events.log",
        ])
        .file("pf.img", vec![0u8; 4 * MIB])
        .file("vf.img", vec![0u8; 8 * MIB])
        .file("events.log", vec![0u8; EVENTS_BYTES])
        .guest_file("bin/vpfctl", tests::guest_tools::vpfctl())
        .step("enable", "@@T:ENABLE=", Duration::from_secs(30))
        .step("disable", "@@T:DISABLE=", Duration::from_secs(30))
        .step("bind", "@@T:BOUND=", Duration::from_secs(30))
        .step("migrate", "@@T:MIGRATE=", Duration::from_secs(90))
        .step("workload end", "@@T:WORKLOAD-END=", Duration::from_secs(90))
        .script(SCRIPT);
    let out = boot(scenario);
    let sum = out.summary();
    for (k, v) in [
        ("ENABLE", "0"),
        ("DISABLE", "0"),
        ("BOUND", "0"),
        ("MIGRATE", "0"),
        ("WORKLOAD-END", "0"),
    ] {
        assert_eq!(marker(&out, k), v, "{k}\n{sum}");
    }
    // Events name functions by bus:device.function (no PCI domain).
    let vf1 = marker(&out, "VF1");
    let vf1 = vf1.strip_prefix("0000:").unwrap_or(&vf1).to_string();
    let bytes = out.read_file("events.log").expect("events.log");
    assert!(
        bytes.last() == Some(&0),
        "the events filled the whole file: make it larger"
    );
    let events = parse(&bytes);
    let listing: Vec<String> = events
        .iter()
        .map(|e| format!("{} {} {}", e.source, e.event, e.props))
        .collect();
    let all = listing.join("\n");
    assert!(
        events.windows(2).all(|w| w[0].at <= w[1].at),
        "timestamps go back:\n{all}"
    );

    // These, in this order (others may come between).
    let prop = |k: &str, v: &str| (k.to_string(), v.to_string());
    let wanted: Vec<Wanted> = vec![
        ("vmm", "starting", vec![]),
        ("vm", "booted", vec![]),
        ("virtio-device", "activated", vec![prop("id", "00:02.0")]),
        (
            "virtio-pf",
            "vf-enable",
            vec![prop("num_vfs", "2"), prop("pf", "00:02.0")],
        ),
        ("virtio-device", "activated", vec![prop("id", &vf1)]),
        ("virtio-device", "reset", vec![prop("id", &vf1)]),
        ("virtio-pf", "vf-disable", vec![]),
        ("virtio-pf", "vf-enable", vec![prop("num_vfs", "2")]),
        (
            "virtio-pf",
            "write-records-start",
            vec![prop("member", "1")],
        ),
        ("virtio-pf", "context-read", vec![prop("member", "1")]),
        (
            "virtio-pf",
            "member-mode",
            vec![prop("member", "1"), prop("mode", "Stop")],
        ),
        (
            "virtio-pf",
            "member-mode",
            vec![prop("member", "1"), prop("mode", "Freeze")],
        ),
        ("virtio-pf", "context-write", vec![prop("member", "2")]),
        (
            "virtio-pf",
            "member-mode",
            vec![prop("member", "2"), prop("mode", "Active")],
        ),
        ("virtio-pf", "write-records-stop", vec![prop("member", "1")]),
        ("vm", "shutdown", vec![]),
    ];
    let mut at = 0;
    for (source, event, props) in &wanted {
        let found = events[at..].iter().position(|e| {
            e.source == *source
                && e.event == *event
                && props
                    .iter()
                    .all(|(k, v)| e.props.get(k).and_then(|x| x.as_str()) == Some(v.as_str()))
        });
        match found {
            Some(k) => at += k + 1,
            None => {
                panic!("no {source} {event} {props:?} after event {at}; the events were:\n{all}")
            }
        }
    }
    assert_eq!(events[0].event, "starting", "{all}");
}
