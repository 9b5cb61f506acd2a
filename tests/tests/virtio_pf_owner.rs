//! virtio-pf with the userspace owner `vpfctl` in a real guest (issue 4:
//! "Userspace owner", "Member migration under load", "FLR of a VF while in
//! Stop", garbage on the admin queue and SR-IOV capability).
//!
//! One boot serves all four tests (each nested boot costs ~20 s): the guest
//! runs `vpfctl/scripts/guest-pf-scenario.sh` with the PF bound to
//! pci-pf-stub and two of four VFs enabled, both backed by the same file
//! (`vf_disk` without `%n`). The script prints one `@@VPF:<check>=ok|fail@@`
//! marker per check; afterwards it writes the workload logs and the JSON of
//! `migrate` and the FLR record read onto an extra virtio-blk disk (log.img,
//! 00:02.0; the PF is then 00:03.0) so that the host re-checks them itself:
//! every request completed exactly once, the backing file read from the
//! host after the VMM exited equals the workload's FINAL lines, the write
//! records cover every page the device wrote while recording.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use tests::checks::boot;
use tests::workload::{
    assert_exactly_once, check_finals, field, json_hex_list, json_value, num, parse_archive,
    record_coverage, requests,
};
use tests::{RunOutput, Scenario};

const MIB: usize = 1024 * 1024;
const SCENARIO: &str = include_str!("../../vpfctl/scripts/guest-pf-scenario.sh");

/// The guest: runs the scenario, then archives its files onto log.img
/// (`VPFFILE name size\n` + bytes per file, `VPFEND\n`).
const WRAPPER: &str = r#"export VPF_AFTER_MOVE=300 VPF_INFLIGHT=8 VPF_ROUNDS=2
sh /vpf-scenario.sh
echo "@@T:SCENARIO-RC=$?@@"
LOGDISK=$(ls /sys/bus/pci/devices/0000:00:02.0/virtio*/block 2>/dev/null)
A=/tmp/archive
: > $A
for f in wl.log migrate.json flr.log flr-records.json back.log back.json; do
  p=/tmp/vpf/$f
  [ -f $p ] || continue
  echo "VPFFILE $f $(wc -c < $p)" >> $A
  cat $p >> $A
done
echo VPFEND >> $A
if [ -n "$LOGDISK" ] && dd if=$A of=/dev/$LOGDISK bs=65536 conv=fsync 2>/dev/null; then
  echo "@@T:ARCHIVE=ok $(wc -c < $A)@@"
else
  echo "@@T:ARCHIVE=fail disk=$LOGDISK@@"
fi
"#;

const VF_DISK: &str = "vf.img";
const VF_DISK_BYTES: usize = 16 * MIB;

struct Run {
    out: RunOutput,
    files: BTreeMap<String, String>,
}

/// The one boot, shared by the tests of this file. A failed boot is
/// remembered (not retried) and fails every test with its message.
fn run() -> &'static Run {
    static RUN: OnceLock<Result<Run, String>> = OnceLock::new();
    let r = RUN.get_or_init(|| {
        std::panic::catch_unwind(boot_once).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "boot panicked".into())
        })
    });
    match r {
        Ok(run) => run,
        Err(why) => panic!("the shared virtio-pf owner boot failed:\n{why}"),
    }
}

fn boot_once() -> Run {
    let scenario = Scenario::new("virtio-pf-owner")
        .args([
            "--cpus",
            "boot=2",
            "--memory",
            "size=512M",
            "--disk",
            "path=log.img",
            "--device",
            &format!("virtio-pf,id=pf0,member=blk,total_vfs=4,disk=pf.img,vf_disk={VF_DISK}"),
        ])
        .file("log.img", vec![0u8; 8 * MIB])
        .file("pf.img", vec![0u8; 4 * MIB])
        .file(VF_DISK, vec![0u8; VF_DISK_BYTES])
        .guest_file("bin/vpfctl", tests::guest_tools::vpfctl())
        .guest_file("vpf-scenario.sh", SCENARIO.as_bytes().to_vec())
        .script(WRAPPER);
    // Each stretch of the scenario has its own deadline, several times
    // what it takes in nested mode (docs/testing.md lists measured times):
    // a stall anywhere fails within a minute or so with the VMM's state.
    let secs = Duration::from_secs;
    let scenario = [
        ("PF bound, 2 VFs", "VPF-VFS ", 30),
        ("admin checks", "VPF-BENCH ", 60),
        ("workload ready", "@@VPF:workload-ready=", 30),
        ("migrate under load", "VPF-MIGRATE ", 60),
        ("record coverage", "@@VPF:record-coverage=", 30),
        ("FLR in Stop", "@@VPF:flr-in-stop=", 30),
        ("FLR keeps records", "@@VPF:flr-keeps-records=", 30),
        ("migrate back", "@@VPF:migrate-back-workload=", 60),
        ("garbage", "VPF-GARBAGE ", 60),
        ("VFs after garbage", "@@VPF:vf1-works-after-garbage=", 30),
        (
            "owner deaths and recoveries",
            "@@VPF:recovered-after-ctx_write-2=",
            60,
        ),
        (
            "VFs after owner deaths",
            "@@VPF:vf2-works-after-owner-death=",
            30,
        ),
        ("result", "@@VPF:RESULT=", 15),
    ]
    .into_iter()
    .fold(scenario, |sc, (name, marker, limit)| {
        sc.step(name, marker, secs(limit))
    })
    .script_limit(secs(30));
    let out = boot(scenario);
    let log = out.read_file("log.img").expect("read back log.img");
    let files = parse_archive(&log);
    Run { out, files }
}

impl Run {
    fn sum(&self) -> String {
        self.out.summary()
    }

    /// Asserts each named `@@VPF:<check>=ok@@`.
    fn checks_ok(&self, names: &[&str]) {
        let all = self.all_checks();
        let mut bad = Vec::new();
        for n in names {
            match all.get(*n) {
                Some(v) if v == "ok" => {}
                Some(v) => bad.push(format!("{n}: {v}")),
                None => bad.push(format!("{n}: not reported")),
            }
        }
        assert!(
            bad.is_empty(),
            "guest checks failed:\n  {}\n{}",
            bad.join("\n  "),
            self.sum()
        );
    }

    fn all_checks(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for l in &self.out.lines {
            if let Some(i) = l.text.find("@@VPF:") {
                let rest = &l.text[i + 6..];
                if let (Some(eq), Some(end)) = (rest.find('='), rest.rfind("@@")) {
                    if eq < end {
                        m.insert(rest[..eq].to_string(), rest[eq + 1..end].to_string());
                    }
                }
            }
        }
        m
    }

    fn file(&self, name: &str) -> &str {
        self.files.get(name).unwrap_or_else(|| {
            panic!(
                "{name} did not come back on log.img (have {:?})\n{}",
                self.files.keys().collect::<Vec<_>>(),
                self.sum()
            )
        })
    }

    /// The text after `PREFIX ` on the first line starting with it.
    fn line_after(&self, prefix: &str) -> String {
        self.out
            .lines
            .iter()
            .find_map(|l| {
                l.text
                    .find(&format!("{prefix} "))
                    .map(|i| l.text[i + prefix.len() + 1..].to_string())
            })
            .unwrap_or_else(|| panic!("the guest printed no {prefix} line\n{}", self.sum()))
    }
}

// (a) Userspace owner: every admin command and the error cases, status and
// qualifier by name (the script's `expect` matches the --json output).
#[test]
fn userspace_owner_admin_commands_and_errors() {
    let r = run();
    r.checks_ok(&[
        "bind-pf",
        "sriov-off",
        "list-query",
        "list-use",
        "vf-enable-clear",
        "sriov-on",
        "mode-get",
        "ctx-size",
        "ctx-size-freeze",
        "ctx-fields",
        "wr-cap",
        "ctx-read-active",
        "freeze-2",
        "freeze-2b",
        "ctx-read-freeze",
        "ctx-write-self",
        "ctx-discard",
        "wr-start",
        "wr-read",
        "wr-stop",
        "wr-stop-again",
        "member-0",
        "member-above-numvfs",
        "bad-group",
        "bad-opcode",
        "not-in-use",
        "bad-mode",
        "ctx-write-outside-freeze",
        "wr-read-not-started",
        "wr-start-bad-page-size",
        "wrong-field-length",
        "malformed-short-header",
        "queue-still-serves",
        "active-2",
    ]);
    // The results, from each command's JSON.
    let j = |name: &str| r.line_after(&format!("VPF-JSON {name}"));
    let all_opcodes = [
        "LIST_QUERY",
        "LIST_USE",
        "DEV_MODE_GET",
        "DEV_MODE_SET",
        "DEV_CTX_SIZE_GET",
        "DEV_CTX_READ",
        "DEV_CTX_WRITE",
        "DEV_CTX_FIELDS_QUERY",
        "DEV_CTX_DISCARD",
        "DEV_WRITE_RECORD_CAP_QUERY",
        "DEV_WRITE_RECORDS_START",
        "DEV_WRITE_RECORDS_STOP",
        "DEV_WRITE_RECORDS_READ",
    ];
    let query = j("list-query");
    let used = j("list-use");
    for op in all_opcodes {
        assert!(
            query.contains(&format!("\"{op}\"")),
            "LIST_QUERY lacks {op}: {query}"
        );
        assert!(
            used.contains(&format!("\"{op}\"")),
            "LIST_USE lacks {op}: {used}"
        );
    }
    assert_eq!(json_value(&query, "bitmap"), json_value(&used, "bitmap"));
    assert_eq!(
        json_value(&j("mode-get"), "mode").as_deref(),
        Some("active")
    );
    for name in ["ctx-size", "ctx-size-freeze"] {
        let size = json_value(&j(name), "size").map(|s| num(&s)).unwrap_or(0);
        assert!(size > 0, "{name}: {}", j(name));
    }
    let fields = j("ctx-fields");
    for (name, len) in [
        ("PCI_COMMON_CFG", 64),
        ("PCI_VQ_CFG", 30),
        ("VQ_SPLIT_RUNTIME_CFG", 5),
    ] {
        assert!(
            fields.contains(&format!("\"name\":\"{name}\",\"length\":{len}")),
            "DEV_CTX_FIELDS_QUERY: no {name} of length {len}: {fields}"
        );
    }
    assert!(fields.contains("\"name\":\"DEV_FEATURES\""), "{fields}");
    let cap = j("wr-cap");
    let bitmap = json_value(&cap, "page_size_bitmap")
        .map(|s| num(&s))
        .unwrap_or(0);
    assert_eq!(bitmap & 1, 1, "4 KiB pages not supported: {cap}");
    let ranges = json_value(&cap, "supported_ranges")
        .map(|s| num(&s))
        .unwrap_or(0);
    assert!(ranges > 0, "{cap}");
    // Member 2 is frozen while recording: it writes nothing.
    assert_eq!(json_value(&j("wr-read"), "count").as_deref(), Some("0"));
    // The error cases, status and qualifier by name.
    for (name, st, q) in [
        ("vf-enable-clear", "EINVAL", "Q_INVALID_GROUP"),
        ("member-0", "EINVAL", "Q_INVALID_MEMBER"),
        ("member-above-numvfs", "EINVAL", "Q_INVALID_MEMBER"),
        ("bad-group", "EINVAL", "Q_INVALID_GROUP"),
        ("bad-opcode", "EINVAL", "Q_INVALID_OPCODE"),
        ("not-in-use", "EINVAL", "Q_INVALID_OPCODE"),
        ("bad-mode", "EINVAL", "Q_INVALID_FIELD"),
        ("ctx-write-outside-freeze", "EINVAL", "Q_INVALID_COMMAND"),
        ("wr-read-not-started", "EINVAL", "Q_INVALID_COMMAND"),
        ("wr-start-bad-page-size", "EINVAL", "Q_INVALID_FIELD"),
        ("wrong-field-length", "EINVAL", "Q_INVALID_FIELD"),
    ] {
        let out = j(name);
        assert_eq!(
            json_value(&out, "status").as_deref(),
            Some(st),
            "{name}: {out}"
        );
        assert_eq!(
            json_value(&out, "qualifier").as_deref(),
            Some(q),
            "{name}: {out}"
        );
        assert_eq!(
            json_value(&out, "ok").as_deref(),
            Some("false"),
            "{name}: {out}"
        );
    }
    let vfs = r.line_after("VPF-VFS");
    assert_eq!(
        vfs.split_whitespace().collect::<Vec<_>>(),
        ["0000:00:04.0", "0000:00:04.1"],
        "VF routing IDs with the PF at 00:03.0\n{}",
        r.sum()
    );
    let bench = r.line_after("VPF-BENCH");
    assert_eq!(json_value(&bench, "ok").as_deref(), Some("true"), "{bench}");
    assert_eq!(
        json_value(&bench, "count").as_deref(),
        Some("50"),
        "{bench}"
    );
}

// (b) Member migration under load.
#[test]
fn member_migration_under_load() {
    let r = run();
    r.checks_ok(&[
        "workload-ready",
        "migrate",
        "migrate-back",
        "migrate-back-workload",
        "flr-2",
        "active-2-again",
        "workload-exit",
        "workload-verified",
        "workload-moved",
        "completions-on-dest",
        "exactly-once",
        "record-coverage",
    ]);
    let log = r.file("wl.log");
    let mig = r.file("migrate.json");
    let sum = r.sum();
    assert_eq!(json_value(mig, "ok").as_deref(), Some("true"), "{mig}");
    let (vf1, vf2) = (
        json_value(mig, "from_bdf").expect("from_bdf"),
        json_value(mig, "to_bdf").expect("to_bdf"),
    );

    // Exactly once, and the move happened while requests were in flight.
    let reqs = requests(log);
    assert!(reqs.len() > 300, "only {} requests", reqs.len());
    assert_exactly_once(&reqs);
    let moved: Vec<&str> = log.lines().filter(|l| l.starts_with("MOVED ")).collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    let inflight = num(field(moved[0], "inflight").expect("MOVED inflight"));
    assert!(
        inflight > 0,
        "no request in flight at the move: {}",
        moved[0]
    );
    assert_eq!(field(moved[0], "from"), Some(vf1.as_str()));
    assert_eq!(field(moved[0], "to"), Some(vf2.as_str()));
    let on_dest = reqs.values().filter(|q| q.done[0].1 == vf2).count();
    assert!(on_dest >= 300, "{on_dest} completions on {vf2}");
    let end = log
        .lines()
        .find(|l| l.starts_with("END "))
        .expect("END line");
    assert_eq!(field(end, "result"), Some("ok"), "{end}");
    assert_eq!(field(end, "verify_failures"), Some("0"), "{end}");

    // Requests crossed the migration: published to the source's ring before
    // the destination went Active (the source, stopped, left them) and
    // completed after it, by the destination, through the same used ring.
    let t_stop = num(&json_value(mig, "t_stop_issued_ns").expect("t_stop_issued_ns"));
    let t_active = num(&json_value(mig, "t_active_done_ns").expect("t_active_done_ns"));
    let t_wr = num(&json_value(mig, "t_wr_started_ns").expect("t_wr_started_ns"));
    assert!(t_wr < t_stop && t_stop < t_active, "{mig}");
    let carried = reqs
        .values()
        .filter(|q| q.submit_t < t_active && q.done[0].0 > t_active)
        .count();
    assert!(
        carried > 0,
        "no request crossed the migration (submitted before the destination was Active, done after)\n{sum}"
    );

    // Write records: every page the device wrote for a request submitted
    // after recording started and seen done before Stop was sent.
    let (checked, missing) = record_coverage(&reqs, mig);
    // 300 ms of pre-copy under load: typically > 1000 requests.
    assert!(
        checked >= 20,
        "only {checked} requests fell inside the recording window"
    );
    assert!(
        missing.is_empty(),
        "{} of the pages written while recording are not in the records: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );

    // The backing file, read from the host after the VMM exited, holds each
    // block's last completed write.
    let disk = r.out.read_file(VF_DISK).expect("read back the VF disk");
    let blocks = check_finals(log, &disk, VF_DISK);
    // And the migration back (VF2 -> VF1, the context in 64-byte reads
    // and 50-byte writes; exactly once, its blocks).
    let back_json = r.file("back.json");
    assert_eq!(
        json_value(back_json, "ok").as_deref(),
        Some("true"),
        "{back_json}"
    );
    let writes = json_value(back_json, "ctx_write_commands").map(|s| num(&s));
    let ctx = json_value(back_json, "final_ctx_bytes").map(|s| num(&s));
    assert!(
        matches!((writes, ctx), (Some(w), Some(c)) if c > 100 && w == c.div_ceil(50)),
        "context written in 50-byte pieces: {back_json}"
    );
    let back = r.file("back.log");
    for (id, q) in requests(back) {
        assert_eq!(q.done.len(), 1, "migration back: request {id}");
    }
    check_finals(back, &disk, VF_DISK);
    // The same FINAL lines were printed on the console.
    let printed: Vec<String> = r
        .out
        .lines
        .iter()
        .filter_map(|l| {
            l.text
                .find("VPF-FINAL ")
                .map(|i| l.text[i + 10..].to_string())
        })
        .collect();
    assert_eq!(printed.len(), blocks, "{sum}");
}

// (c) FLR of a VF in Freeze and in Stop keeps its mode, its recording and
// its records.
#[test]
fn flr_in_stop_keeps_mode_and_write_records() {
    let r = run();
    r.checks_ok(&[
        "flr-method",
        "flr-in-freeze",
        "flr-freeze-keeps-mode",
        "flr-active",
        "flr-one-range",
        "flr-wr-start",
        "flr-workload",
        "flr-stop",
        "flr-in-stop",
        "flr-stop-keeps-mode",
        "flr-records-readable",
        "flr-keeps-records",
        "flr-wr-stop",
        "flr-back-active",
    ]);
    // Host-side re-check of the records against the workload log.
    let log = r.file("flr.log");
    let rec = r.file("flr-records.json");
    assert_eq!(json_value(rec, "status").as_deref(), Some("OK"), "{rec}");
    let pages = json_hex_list(&json_value(rec, "pages").expect("pages"));
    let moved = log
        .lines()
        .find(|l| l.starts_with("MOVED "))
        .expect("MOVED line");
    let t0 = num(field(moved, "t").unwrap());
    let reqs = requests(log);
    let mut checked = 0;
    for (id, q) in &reqs {
        assert_eq!(q.done.len(), 1, "request {id}");
        if q.submit_t > t0 {
            checked += 1;
            for p in &q.done[0].2 {
                assert!(
                    pages.contains(p),
                    "page {p:#x} of request {id} lost by the FLR (records: {} pages)",
                    pages.len()
                );
            }
        }
    }
    assert!(checked >= 40, "{checked} requests checked");
}

// (d) Garbage on the admin queue and the SR-IOV capability neither crashes
// nor hangs the VMM (the guest ran to the end and the VMM exited 0), and
// the VFs keep working.
#[test]
fn garbage_does_not_hurt_vmm_or_other_vfs() {
    let r = run();
    r.checks_ok(&[
        "garbage",
        "vf-works-after-garbage",
        "vf1-works-after-garbage",
    ]);
    let g = r.line_after("VPF-GARBAGE");
    assert_eq!(json_value(&g, "healthy").as_deref(), Some("true"), "{g}");
    assert_eq!(
        json_value(&g, "read_only_intact").as_deref(),
        Some("true"),
        "{g}"
    );
    assert_eq!(r.out.vmm_exit, 0);
    let all = r.all_checks();
    assert_eq!(
        all.get("RESULT").map(String::as_str),
        Some("ok"),
        "{:?}",
        all.iter().filter(|(_, v)| *v != "ok").collect::<Vec<_>>()
    );
    assert!(
        r.out
            .lines
            .iter()
            .any(|l| l.text.contains("@@T:ARCHIVE=ok")),
        "{}",
        r.sum()
    );
}

/// An owner that dies in the middle of a migration (after each phase,
/// leaving members in Stop or Freeze, recording on, streams half done) is
/// recovered by the next owner with discard, records stop and Active, and
/// both VFs then work.
#[test]
fn an_owner_that_dies_mid_migration_is_recovered_by_the_next() {
    let r = run();
    let mut names = Vec::new();
    for phase in [
        "wr_start",
        "precopy",
        "stop",
        "freeze",
        "final_ctx_read",
        "ctx_write",
    ] {
        names.push(format!("owner-dies-after-{phase}"));
        names.push(format!("left-after-{phase}-1"));
        names.push(format!("left-after-{phase}-2"));
        names.push(format!("left-recording-after-{phase}"));
        names.push(format!("recovered-after-{phase}-1"));
        names.push(format!("recovered-after-{phase}-2"));
    }
    names.push("vf1-works-after-owner-death".into());
    names.push("vf2-works-after-owner-death".into());
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    r.checks_ok(&refs);
    let failed: Vec<(String, String)> = r
        .all_checks()
        .into_iter()
        .filter(|(k, v)| k.starts_with("recover-after-") && v != "ok")
        .collect();
    assert!(failed.is_empty(), "recovery commands failed: {failed:?}");
}
