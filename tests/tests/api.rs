//! The API socket of a running VMM, driven by `ch-remote` beside it (in the
//! outer VM in nested mode) while a real guest runs.

use std::time::Duration;

use tests::checks::{marker, shared_runner};
use tests::Scenario;

const MIB: usize = 1024 * 1024;

/// The guest says it is up on its disk (which the script beside the VMM
/// reads), then beats until the VMM ends it.
const GUEST: &str = r#"printf 'GUEST-UP\n' > /tmp/up
dd if=/tmp/up of=/dev/vda conv=fsync 2>/dev/null
i=0
while :; do echo "@@T:BEAT=$i $(cut -d' ' -f1 /proc/uptime)@@"; i=$((i + 1)); sleep 0.5; done
"#;

/// Beside the VMM: wait for the API, then for the guest; ping, info, a
/// request the VM's state does not allow (a snapshot of a running VM), a
/// bad subcommand, then shutdown.
const DURING: &str = r#"S=api.sock
n=0
until ch-remote --api-socket $S ping > ping.json 2> ping.err; do
  n=$((n + 1)); [ $n -gt 300 ] && { echo "@@T:API-UP=no $(cat ping.err)@@"; exit 1; }; sleep 0.1
done
echo "@@T:API-UP=yes@@"
echo "@@T:PING=$(cat ping.json)@@"
n=0
until grep -q GUEST-UP up.img 2> /dev/null; do
  n=$((n + 1)); [ $n -gt 600 ] && { echo "@@T:GUEST-SEEN=no@@"; exit 1; }; sleep 0.1
done
echo "@@T:GUEST-SEEN=yes@@"
sleep 1
echo "@@T:INFO=$(ch-remote --api-socket $S info)@@"
echo "@@T:COUNTERS=$(ch-remote --api-socket $S counters)@@"
api-probe $S
ch-remote --api-socket $S snapshot file:///tmp/snap 2> snap.err
echo "@@T:SNAPSHOT=$? $(cat snap.err)@@"
ch-remote --api-socket $S no-such-command 2> /dev/null
echo "@@T:BAD-SUBCOMMAND=$?@@"
ch-remote --api-socket $S shutdown
echo "@@T:SHUTDOWN=$?@@"
"#;

#[test]
fn ch_remote_pings_reads_info_and_shuts_down_a_running_vm() {
    let scenario = Scenario::new("api-ch-remote")
        .args(["--disk", "path=up.img", "--api-socket", "path=api.sock"])
        .file("up.img", vec![0u8; MIB])
        .script(GUEST)
        .during(DURING)
        .tool("api-probe", env!("CARGO_BIN_EXE_api-probe"))
        // The guest never ends its script: the API shutdown ends the run.
        .step("guest beats", "@@T:BEAT=0 ", Duration::from_secs(30))
        .step("API shutdown", "@@T:SHUTDOWN=", Duration::from_secs(60));
    let out = tests::run(shared_runner(), &scenario);
    let sum = out.summary();
    assert_eq!(marker(&out, "API-UP"), "yes", "{sum}");
    assert_eq!(marker(&out, "GUEST-SEEN"), "yes", "{sum}");

    let ping: serde_json::Value =
        serde_json::from_str(&marker(&out, "PING")).unwrap_or_else(|e| panic!("ping: {e}\n{sum}"));
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"), "{ping}");
    assert!(ping["pid"].as_u64().is_some_and(|p| p > 1), "{ping}");

    let info: serde_json::Value =
        serde_json::from_str(&marker(&out, "INFO")).unwrap_or_else(|e| panic!("info: {e}\n{sum}"));
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(info["config"]["memory"]["size"], 512 * MIB as u64, "{info}");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 1, "{info}");
    assert_eq!(info["config"]["disks"][0]["path"], "up.img", "{info}");
    assert_eq!(info["memory_actual_size"], 512 * MIB as u64, "{info}");

    // The guest wrote its GUEST-UP block to the disk at 00:02.0.
    let counters: serde_json::Value = serde_json::from_str(&marker(&out, "COUNTERS"))
        .unwrap_or_else(|e| panic!("counters: {e}\n{sum}"));
    let disk = &counters["00:02.0"];
    assert!(
        disk["write_ops"].as_u64().is_some_and(|n| n >= 1),
        "{counters}"
    );
    assert!(
        disk["write_bytes"].as_u64().is_some_and(|n| n >= 512),
        "{counters}"
    );
    assert!(disk["read_ops"].as_u64().is_some(), "{counters}");

    // What a careless or hostile client gets (tests/src/bin/api-probe.rs).
    assert_eq!(marker(&out, "PROBE-DONE"), "yes", "{sum}");
    for e in ["vmm.ping", "vm.info", "vm.counters"] {
        assert_eq!(marker(&out, &format!("PROBE-GET-{e}")), "200", "{e}");
    }
    for e in [
        "vmm.shutdown",
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.reboot",
        "vm.power-button",
        "vm.snapshot",
        "vm.restore",
        "vm.send-migration",
        "vm.receive-migration",
    ] {
        assert_eq!(
            marker(&out, &format!("PROBE-WRONG-METHOD-{e}")),
            "405",
            "{e}"
        );
    }
    for (case, status) in [
        ("UNKNOWN", "404"),
        ("OUTSIDE", "404"),
        ("MALFORMED", "400"),
        ("NOT-AN-OBJECT", "400"),
        ("HUGE-BODY", "413"),
        ("HUGE-HEAD", "431"),
        ("CHUNKED", "400"),
        ("CONCURRENT", "200,200,200,200,200,200,200,200"),
        ("CONCURRENT-FAST", "true"),
        ("KEEP-ALIVE", "3"),
    ] {
        assert_eq!(
            marker(&out, &format!("PROBE-{case}")),
            status,
            "{case}\n{sum}"
        );
    }

    let snap = marker(&out, "SNAPSHOT");
    assert!(
        snap.starts_with("1 Error running command: Server responded with an error: 405"),
        "{snap}"
    );
    assert!(snap.contains("pause it before a snapshot"), "{snap}");
    assert_eq!(marker(&out, "BAD-SUBCOMMAND"), "2", "{sum}");

    assert_eq!(marker(&out, "SHUTDOWN"), "0", "{sum}");
    assert!(
        !out.markers("T:BEAT").is_empty(),
        "the guest was not running\n{sum}"
    );
    assert_eq!(
        out.scenario_exit(),
        None,
        "the guest script cannot end\n{sum}"
    );
    assert_eq!(out.vmm_exit, 0, "vm.shutdown ends the VMM with 0\n{sum}");
}

/// Pause and resume through the API while the guest beats: while paused
/// the guest prints nothing and `info` says Paused; a second pause and a
/// resume of a running VM are refused (405); after resume the guest's own
/// counter carries on with no beat lost or repeated.
const PAUSE_DURING: &str = r#"S=api.sock
n=0
until grep -q GUEST-UP up.img 2> /dev/null; do
  n=$((n + 1)); [ $n -gt 600 ] && { echo "@@T:GUEST-SEEN=no@@"; exit 1; }; sleep 0.1
done
sleep 1
ch-remote --api-socket $S resume 2> r.err; echo "@@T:RESUME-RUNNING=$? $(cat r.err)@@"
ch-remote --api-socket $S pause; echo "@@T:PAUSED=$?@@"
ch-remote --api-socket $S pause 2> p.err; echo "@@T:PAUSE-AGAIN=$? $(cat p.err)@@"
echo "@@T:PAUSED-INFO=$(ch-remote --api-socket $S info)@@"
sleep 3
echo "@@T:RESUMING@@"
ch-remote --api-socket $S resume; echo "@@T:RESUMED=$?@@"
sleep 2
ch-remote --api-socket $S shutdown; echo "@@T:SHUTDOWN=$?@@"
"#;

#[test]
fn pause_stops_the_guest_and_resume_carries_on_where_it_was() {
    let scenario = Scenario::new("api-pause")
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
        .during(PAUSE_DURING)
        .step("guest beats", "@@T:BEAT=0 ", Duration::from_secs(30))
        .step("paused", "@@T:PAUSED=", Duration::from_secs(30))
        .step("resumed", "@@T:RESUMED=", Duration::from_secs(30))
        .step("API shutdown", "@@T:SHUTDOWN=", Duration::from_secs(30));
    let out = tests::run(shared_runner(), &scenario);
    let sum = out.summary();
    let refused = marker(&out, "RESUME-RUNNING");
    assert!(
        refused.starts_with("1 ") && refused.contains("405"),
        "{refused}"
    );
    assert_eq!(marker(&out, "PAUSED"), "0", "{sum}");
    let again = marker(&out, "PAUSE-AGAIN");
    assert!(again.starts_with("1 ") && again.contains("405"), "{again}");
    let info: serde_json::Value = serde_json::from_str(&marker(&out, "PAUSED-INFO"))
        .unwrap_or_else(|e| panic!("info: {e}\n{sum}"));
    assert_eq!(info["state"], "Paused", "{info}");
    assert_eq!(marker(&out, "RESUMED"), "0", "{sum}");
    assert_eq!(marker(&out, "SHUTDOWN"), "0", "{sum}");
    assert_eq!(out.vmm_exit, 0, "{sum}");

    // No beat while paused (one may still be on its way through the
    // serial output right after the pause).
    let at = |text: &str| {
        out.time_of(text)
            .unwrap_or_else(|| panic!("no line {text}\n{sum}"))
    };
    let (paused, resuming) = (at("@@T:PAUSED=0@@"), at("@@T:RESUMING@@"));
    assert!(resuming > paused + Duration::from_secs(2), "{sum}");
    // (when seen, the guest's number, the guest's uptime)
    let beats: Vec<(Duration, u64, f64)> = out
        .lines
        .iter()
        .filter_map(|l| {
            let v = tests::scenario::marker_in(&l.text, "T:BEAT")?;
            let (n, up) = v.split_once(' ')?;
            Some((l.at, n.parse().ok()?, up.parse().ok()?))
        })
        .collect();
    let during: Vec<_> = beats
        .iter()
        .filter(|(t, _, _)| *t > paused + Duration::from_millis(500) && *t < resuming)
        .collect();
    assert!(during.is_empty(), "beats while paused: {during:?}\n{sum}");
    assert!(
        beats.iter().any(|(t, _, _)| *t > resuming),
        "no beat after resume\n{sum}"
    );
    // The guest's clock held: across the pause (over 2 s) its uptime
    // moved by about one beat's sleep, not by the pause.
    let before = beats.iter().rfind(|b| b.0 < paused).expect("a beat before");
    let after = beats.iter().find(|b| b.0 > resuming).expect("a beat after");
    let guest_gap = after.2 - before.2;
    assert!(
        guest_gap < 1.5,
        "the guest's clock moved {guest_gap:.2} s across a pause of {:.1} s\n{sum}",
        (resuming - paused).as_secs_f64()
    );
    // The guest's own counter: every number once, in order.
    let numbers: Vec<u64> = beats.iter().map(|b| b.1).collect();
    let want: Vec<u64> = (0..numbers.len() as u64).collect();
    assert_eq!(numbers, want, "beats lost or repeated\n{sum}");
}

/// The guest acts on its power button as logind or acpid would: it finds
/// the ACPI button's input device, waits for KEY_POWER (an evdev event of
/// type EV_KEY, code 116) and powers off.
const BUTTON_GUEST: &str = r#"ev=""
for d in /sys/class/input/event*; do
  [ "$(cat $d/device/name 2>/dev/null)" = "Power Button" ] && ev=/dev/input/${d##*/}
done
echo "@@T:BUTTON-DEV=${ev:-none}@@"
[ -n "$ev" ] || exit 1
printf 'GUEST-UP\n' > /tmp/up
dd if=/tmp/up of=/dev/vda conv=fsync 2>/dev/null
while :; do
  set -- $(dd if=$ev bs=24 count=1 2>/dev/null | od -An -tu2 -j16 -N4)
  echo "@@T:INPUT=$1 $2@@"
  [ "$1" = 1 ] && [ "$2" = 116 ] && break
done
echo "@@T:KEY-POWER@@"
"#;

/// Beside the VMM: a press while paused is held until resume; then the
/// guest powers off and the VMM ends with 0.
const BUTTON_DURING: &str = r#"S=api.sock
n=0
until grep -q GUEST-UP up.img 2> /dev/null; do
  n=$((n + 1)); [ $n -gt 600 ] && { echo "@@T:GUEST-SEEN=no@@"; exit 1; }; sleep 0.1
done
sleep 1
ch-remote --api-socket $S pause; echo "@@T:PAUSED=$?@@"
ch-remote --api-socket $S power-button; echo "@@T:PRESSED=$?@@"
sleep 2
echo "@@T:RESUMING@@"
ch-remote --api-socket $S resume; echo "@@T:RESUMED=$?@@"
"#;

#[test]
fn power_button_through_the_api_reaches_the_guest_as_key_power() {
    let scenario = Scenario::new("api-power-button")
        .args(["--disk", "path=up.img", "--api-socket", "path=api.sock"])
        .file("up.img", vec![0u8; MIB])
        .script(BUTTON_GUEST)
        .during(BUTTON_DURING)
        .step("button device", "@@T:BUTTON-DEV=", Duration::from_secs(30))
        .step("paused", "@@T:PAUSED=", Duration::from_secs(60))
        .step("resumed", "@@T:RESUMED=", Duration::from_secs(30))
        .step("KEY_POWER", "@@T:KEY-POWER@@", Duration::from_secs(30));
    let out = tests::run(shared_runner(), &scenario);
    let sum = out.summary();
    assert!(
        marker(&out, "BUTTON-DEV").starts_with("/dev/input/event"),
        "no ACPI power button input device in the guest\n{sum}"
    );
    assert_eq!(marker(&out, "PAUSED"), "0", "{sum}");
    assert_eq!(marker(&out, "PRESSED"), "0", "{sum}");
    assert_eq!(marker(&out, "RESUMED"), "0", "{sum}");
    // Held while paused: the key arrives after resume, not before.
    let at = |text: &str| {
        out.time_of(text)
            .unwrap_or_else(|| panic!("no line {text}\n{sum}"))
    };
    assert!(at("@@T:KEY-POWER@@") > at("@@T:RESUMING@@"), "{sum}");
    assert!(
        out.markers("T:INPUT")
            .iter()
            .all(|i| i.starts_with("1 116") || i.starts_with("0 ")),
        "input other than the power key: {:?}\n{sum}",
        out.markers("T:INPUT")
    );
    // The guest powered off after the key (its script ended).
    assert_eq!(out.scenario_exit(), Some(0), "{sum}");
    assert_eq!(out.vmm_exit, 0, "{sum}");
}

/// The guest owns the PF with vpfctl, puts member 1 in Stop and member 2 in
/// Freeze, says so on its disk, then reads both modes back through the
/// admin queue every half second until the VMM ends it.
const MODES_GUEST: &str = r#"V=vpfctl
$V bind --dev 0000:00:03.0 > /dev/null && $V sriov --numvfs 2 --autoprobe off > /dev/null
echo "@@T:BOUND=$?@@"
$V mode-set --member 1 --mode stop > /dev/null && $V mode-set --member 2 --mode stop > /dev/null \
  && $V mode-set --member 2 --mode freeze > /dev/null
echo "@@T:MODES-SET=$?@@"
mode() { $V --json mode-get --member $1 | sed -n 's/.*"mode":"\([a-z]*\)".*/\1/p'; }
printf 'GUEST-UP\n' > /tmp/up
dd if=/tmp/up of=/dev/vda conv=fsync 2>/dev/null
while :; do echo "@@T:MODES=$(mode 1) $(mode 2)@@"; sleep 0.5; done
"#;

/// Beside the VMM, on the socket the launcher passed as descriptor 3:
/// ping, pause, resume, reboot (which ends the VMM with status 0, as a
/// guest reboot does).
const MODES_DURING: &str = r#"S=api.sock
n=0
until [ -S $S ]; do
  n=$((n + 1)); [ $n -gt 100 ] && { echo "@@T:PING=no socket bound by fd-launch@@"; exit 1; }; sleep 0.1
done
ch-remote --api-socket $S ping > ping.json; echo "@@T:PING=$? $(cat ping.json)@@"
n=0
until grep -q GUEST-UP up.img 2> /dev/null; do
  n=$((n + 1)); [ $n -gt 900 ] && { echo "@@T:GUEST-SEEN=no@@"; exit 1; }; sleep 0.1
done
sleep 1
ch-remote --api-socket $S pause; echo "@@T:PAUSED=$?@@"
sleep 2
echo "@@T:RESUMING@@"
ch-remote --api-socket $S resume; echo "@@T:RESUMED=$?@@"
sleep 2
ch-remote --api-socket $S reboot; echo "@@T:REBOOT=$?@@"
"#;

/// `--api-socket fd=3` and `--event-monitor fd=4` on descriptors the VMM
/// inherits (opened by `fd-launch`), and member modes the guest set (Stop,
/// Freeze) that hold across pause/resume: the guest reads them back after
/// resume, and the event log has no mode change from paused to shutdown.
#[test]
fn inherited_descriptors_serve_the_api_and_events_and_member_modes_survive_pause() {
    let scenario = Scenario::new("api-fd-modes")
        .args([
            "--cpus",
            "boot=2",
            "--disk",
            "path=up.img",
            "--device",
            "virtio-pf,id=pf0,member=blk,total_vfs=2,disk=pf.img,vf_disk=vf.img",
            "--api-socket",
            "fd=3",
            "--event-monitor",
            "fd=4",
        ])
        .file("up.img", vec![0u8; MIB])
        .file("pf.img", vec![0u8; MIB])
        .file("vf.img", vec![0u8; MIB])
        .file("events.log", vec![0u8; 64 * 1024])
        .guest_file("bin/vpfctl", tests::guest_tools::vpfctl())
        .script(MODES_GUEST)
        .during(MODES_DURING)
        .tool("fd-launch", env!("CARGO_BIN_EXE_fd-launch"))
        .launcher(
            "fd-launch",
            &["--listen", "3=api.sock", "--file", "4=events.log", "--"],
        )
        .step("modes set", "@@T:MODES-SET=", Duration::from_secs(60))
        .step("paused", "@@T:PAUSED=", Duration::from_secs(60))
        .step("resumed", "@@T:RESUMED=", Duration::from_secs(30))
        .step("API reboot", "@@T:REBOOT=", Duration::from_secs(30));
    let out = tests::run(shared_runner(), &scenario);
    let sum = out.summary();
    let ping = marker(&out, "PING");
    assert!(ping.starts_with("0 {"), "ping on fd 3: {ping}\n{sum}");
    for k in ["BOUND", "MODES-SET", "PAUSED", "RESUMED", "REBOOT"] {
        assert_eq!(marker(&out, k), "0", "{k}\n{sum}");
    }
    assert_eq!(out.vmm_exit, 0, "{sum}");

    // Read back through the admin queue before and after the pause.
    let resuming = out
        .time_of("@@T:RESUMING@@")
        .unwrap_or_else(|| panic!("no RESUMING\n{sum}"));
    let modes: Vec<(Duration, String)> = out
        .lines
        .iter()
        .filter_map(|l| {
            Some((
                l.at,
                tests::scenario::marker_in(&l.text, "T:MODES")?.to_string(),
            ))
        })
        .collect();
    assert!(
        modes.iter().any(|(t, _)| *t > resuming),
        "no mode read after resume\n{sum}"
    );
    assert!(
        modes.iter().all(|(_, m)| m == "stop freeze"),
        "modes changed: {modes:?}\n{sum}"
    );

    // The events, written to descriptor 4.
    let bytes = out.read_file("events.log").expect("events.log");
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&bytes[..end])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let names: Vec<String> = events
        .iter()
        .map(|e| format!("{} {} {}", e["source"], e["event"], e["properties"]))
        .collect();
    let all = names.join("\n");
    let index = |source: &str, event: &str| {
        events
            .iter()
            .position(|e| e["source"] == source && e["event"] == event)
            .unwrap_or_else(|| panic!("no {source} {event} event:\n{all}"))
    };
    let (booted, paused, resumed, reboot) = (
        index("vm", "booted"),
        index("vm", "paused"),
        index("vm", "resumed"),
        index("vm", "reboot"),
    );
    assert!(
        booted < paused && paused < resumed && resumed < reboot,
        "{all}"
    );
    let mode_events: Vec<usize> = (0..events.len())
        .filter(|&i| events[i]["event"] == "member-mode")
        .collect();
    assert_eq!(mode_events.len(), 3, "Stop, Stop, Freeze:\n{all}");
    assert!(mode_events.iter().all(|&i| i < paused), "{all}");
    let last = &events[mode_events[2]]["properties"];
    assert_eq!(
        (last["member"].as_str(), last["mode"].as_str()),
        (Some("2"), Some("Freeze")),
        "{all}"
    );
}
