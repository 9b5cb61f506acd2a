//! virtio-pf benchmark (prints figures; not a test), one guest boot:
//!
//! * **member migration downtime**: `vpfctl migrate` of a VF under load
//!   (`blk-workload`, 8 requests in flight) to another VF, `CH_BENCH_RUNS`
//!   times (default 11), alternating direction (VF1 -> VF2, VF2 -> VF1; the
//!   source left in Freeze is reset by FLR before it is a destination again).
//!   Downtime is `vpfctl`'s own figure: from sending DEV_MODE_SET Stop to
//!   the source until DEV_MODE_SET Active of the destination completed
//!   (Stop, Freeze, final context read, final record drain, context write,
//!   Active), measured in the guest with CLOCK_MONOTONIC. The median, min
//!   and max, and the median of each phase, are printed; and the longest
//!   gap between two completions the workload saw (the stall its driver
//!   experienced, including its own switch to the destination).
//! * **admin command round trip** from the guest: `vpfctl bench`, the same
//!   admin command sent 200 times through the admin queue (submit -> used
//!   entry seen, polling), for DEV_MODE_GET, LIST_QUERY, DEV_CTX_SIZE_GET
//!   and DEV_WRITE_RECORD_CAP_QUERY; min, median, p99, max.
//!
//! * **the same member migration driven by Linux's own driver**: a second
//!   boot, Debian's Linux 7.x with the PF in `admin=virtio-1.4` and behind
//!   the virtio-iommu, VF1 and VF2 bound to `virtio_vfio_pci`; `vpfctl
//!   blk-workload --vfio` (8 requests in flight through VFIO) moves its
//!   member `CH_BENCH_RUNS` times between the VFs through VFIO's migration
//!   interface (PRE_COPY, STOP_COPY; RESUMING on the other VF). Downtime is
//!   the workload's figure: from the STOP_COPY request on the source to the
//!   destination RUNNING. Printed next to the draft dialect's.
//!
//! Queues per VF: the only member type is virtio-blk with ONE request queue
//! per VF, so the issue's "1, 4 and 16 queues per VF" reduces to the 1-queue
//! figure; the context (and so the downtime) grows with the queue count by
//! one PCI_VQ_CFG + VQ_SPLIT_RUNTIME_CFG field pair (35 bytes) per queue.
//!
//! In nested mode (the VMM under KVM inside QEMU TCG) every figure includes
//! the nested-virtualization cost of each MMIO exit and is far from what
//! the VMM does on hardware.
//!
//! Run with `cargo bench -p tests --bench virtio_pf` (uses `CH_BINARY` or
//! builds the VMM like the tests do).

use std::time::Duration;

use tests::Scenario;

const MIB: usize = 1024 * 1024;

const SCRIPT: &str = r#"V=vpfctl
set -u
PF=$($V --json info | sed -n 's/.*"dev":"\([^"]*\)".*/\1/p')
$V bind --dev "$PF" > /dev/null || echo "@@B:ERROR=bind@@"
$V sriov --numvfs 2 --autoprobe off > /dev/null || echo "@@B:ERROR=sriov@@"
VF1=$($V vf-bdf --member 1); VF2=$($V vf-bdf --member 2)
for op in DEV_MODE_GET LIST_QUERY DEV_CTX_SIZE_GET DEV_WRITE_RECORD_CAP_QUERY; do
  case $op in DEV_CTX_SIZE_GET) a="--member 1 --data 00" ;; LIST_QUERY) a="--member 0" ;; *) a="--member 1" ;; esac
  echo "@@B:RTT=$op $($V --json bench --opcode $op $a --result-len 64 --count 200)@@"
done
i=1
while [ $i -le $RUNS ]; do
  if [ $((i % 2)) = 1 ]; then FROM=1 TO=2 SRC=$VF1; else FROM=2 TO=1 SRC=$VF2; fi
  D=/tmp/wl$i
  $V --timeout-ms 60000 blk-workload --vf "$SRC" --log /tmp/wl$i.log --state-dir $D --inflight 8 --after-move 40 > /tmp/wl$i.out 2>&1 &
  WL=$!
  n=0; while [ ! -e $D/ready ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
  sleep 0.5
  M=$($V --json --timeout-ms 60000 migrate --from $FROM --to $TO --rounds 2 --workload-dir $D 2>&1)
  echo "@@B:MIGRATE=$i $M@@"
  wait $WL || echo "@@B:ERROR=workload $i $(tail -3 /tmp/wl$i.out)@@"
  grep -q '^END .*result=ok' /tmp/wl$i.log || echo "@@B:ERROR=workload log $i@@"
  # The longest time the workload saw no completion (the migration's gap).
  echo "@@B:STALL=$i $(awk '/^DONE /{t=substr($2,3)+0; if (p && t-p>g) g=t-p; p=t} END{printf "%d", g/1000}' /tmp/wl$i.log)@@"
  # The source stays in Freeze; FLR it so it can be the next destination.
  [ $FROM = 1 ] && S=$VF1 || S=$VF2
  echo 1 > /sys/bus/pci/devices/$S/reset
  i=$((i + 1))
done
"#;

/// The VFIO-driven runs (Linux 7.x, virtio_vfio_pci): one workload on VF1,
/// moved back and forth RUNS times; its MOVED lines are printed.
const VFIO_SCRIPT: &str = r#"P=/sys/bus/pci/devices/0000:00:02.0
echo 0 > $P/sriov_drivers_autoprobe
echo 2 > $P/sriov_numvfs || echo "@@B:ERROR=sriov@@"
for vf in 0000:00:03.0 0000:00:03.1; do
  echo virtio_vfio_pci > /sys/bus/pci/devices/$vf/driver_override
  echo $vf > /sys/bus/pci/drivers_probe
done
D=/tmp/wl; mkdir -p $D
vpfctl --timeout-ms 60000 blk-workload --vfio --vf 0000:00:03.0 --log /tmp/wl.log --state-dir $D --inflight 8 > /tmp/wl.out 2>&1 &
WL=$!
n=0; while [ ! -e $D/ready ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
i=1
while [ $i -le $RUNS ]; do
  sleep 0.5
  [ $((i % 2)) = 1 ] && TO=0000:00:03.1 || TO=0000:00:03.0
  echo $TO > $D/moved; kill -USR1 $WL
  n=0; while [ ! -e $D/moved.$i ] && [ $n -lt 600 ] && kill -0 $WL 2>/dev/null; do sleep 0.1; n=$((n + 1)); done
  [ -e $D/moved.$i ] || echo "@@B:ERROR=move $i $(tail -3 /tmp/wl.out)@@"
  i=$((i + 1))
done
sleep 0.5
kill -TERM $WL; wait $WL || echo "@@B:ERROR=vfio workload $(tail -3 /tmp/wl.out)@@"
grep -q '^END .*result=ok' /tmp/wl.log || echo "@@B:ERROR=vfio workload log@@"
grep '^MOVED ' /tmp/wl.log | while read -r l; do echo "@@B:VMOVE=$l@@"; done
"#;

/// `key=value` of a workload log line.
fn log_num(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The VFIO-driven migrations: returns their downtimes (us).
fn vfio_runs(runs: usize) -> Vec<u64> {
    let images = tests::host::guest_images().unwrap_or_else(|e| fail(&e.to_string()));
    let scenario = Scenario::new("bench-virtio-pf-vfio")
        .guest_kernel(&images.bzimage7)
        .args([
            "--cpus",
            "boot=2",
            "--device",
            "virtio-pf,id=pf0,member=blk,total_vfs=2,disk=pf.img,vf_disk=vf.img,admin=virtio-1.4,iommu=on",
        ])
        .file("pf.img", vec![0u8; 4 * MIB])
        .file("vf.img", vec![0u8; 8 * MIB])
        .guest_file("bin/vpfctl", tests::guest_tools::vpfctl())
        .script(&format!("RUNS={runs}\n{VFIO_SCRIPT}"))
        .step("VFIO workload", "@@B:VMOVE=", Duration::from_secs(60 + 10 * runs as u64))
        .script_limit(Duration::from_secs(30));
    let out = tests::runner()
        .run(&scenario)
        .unwrap_or_else(|e| fail(&format!("the VFIO benchmark run failed: {e}")));
    let errors = out.markers("B:ERROR");
    if !errors.is_empty() || out.scenario_exit() != Some(0) || out.vmm_exit != 0 {
        fail(&format!(
            "the VFIO guest reported errors: {errors:?}\n{}",
            out.summary()
        ));
    }
    let moves = out.markers("B:VMOVE");
    if moves.len() != runs {
        fail(&format!(
            "expected {runs} VFIO moves, got {}\n{}",
            moves.len(),
            out.summary()
        ));
    }
    println!("member migration by Linux's virtio_vfio_pci through VFIO (admin=virtio-1.4, Linux 7.x in L1):");
    let mut downtime = Vec::new();
    for (i, m) in moves.iter().enumerate() {
        let get =
            |k| log_num(m, k).unwrap_or_else(|| fail(&format!("move {}: no {k}: {m}", i + 1)));
        let d = get("downtime_us");
        println!(
            "  run {}: downtime {d:7} us   whole migration {:8} us   pre-copy {} bytes, stop-copy {} bytes, {} requests in flight",
            i + 1,
            get("total_us"),
            get("precopy_bytes"),
            get("stop_copy_bytes"),
            get("inflight")
        );
        downtime.push(d);
    }
    downtime
}

fn json_num(json: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let i = json.find(&pat)? + pat.len();
    let rest = &json[i..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(1);
}

fn main() {
    let runs: usize = std::env::var("CH_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(11);
    let runner = tests::runner();
    println!(
        "virtio-pf benchmark: {runs} migrations in one boot, mode {}",
        runner.mode()
    );
    println!("  ({})", runner.detected.reason);
    let scenario = Scenario::new("bench-virtio-pf")
        .args([
            "--cpus",
            "boot=2",
            "--device",
            "virtio-pf,id=pf0,member=blk,total_vfs=2,disk=pf.img,vf_disk=vf.img",
        ])
        .file("pf.img", vec![0u8; 4 * MIB])
        .file("vf.img", vec![0u8; 8 * MIB])
        .guest_file("bin/vpfctl", tests::guest_tools::vpfctl())
        .script(&format!("RUNS={runs}\n{SCRIPT}"))
        .step(
            "admin round trips",
            "@@B:RTT=DEV_WRITE_RECORD_CAP_QUERY ",
            Duration::from_secs(90),
        );
    // Each migration and its workload's end have their own deadline.
    let scenario = (1..=runs)
        .fold(scenario, |sc, i| {
            sc.step(
                &format!("run {i}: migrate"),
                &format!("@@B:MIGRATE={i} "),
                Duration::from_secs(60),
            )
            .step(
                &format!("run {i}: workload end"),
                &format!("@@B:STALL={i} "),
                Duration::from_secs(60),
            )
        })
        .script_limit(Duration::from_secs(30));
    let out = match runner.run(&scenario) {
        Ok(out) => out,
        Err(e) => fail(&format!("the benchmark run failed: {e}")),
    };
    let errors = out.markers("B:ERROR");
    if !errors.is_empty() || out.scenario_exit() != Some(0) || out.vmm_exit != 0 {
        fail(&format!(
            "the guest reported errors: {errors:?}\n{}",
            out.summary()
        ));
    }

    println!("admin command round trip from the guest (vpfctl bench, 200 each, submit -> used entry, polling):");
    let rtts = out.markers("B:RTT");
    if rtts.len() != 4 {
        fail(&format!(
            "expected 4 RTT results, got {rtts:?}\n{}",
            out.summary()
        ));
    }
    for r in &rtts {
        let (op, json) = r.split_once(' ').unwrap_or((r, ""));
        let get = |k| json_num(json, k).unwrap_or_else(|| fail(&format!("{op}: no {k} in {json}")));
        println!(
            "  {op:28} min {:6} us  median {:6} us  p99 {:6} us  max {:6} us",
            get("min_us"),
            get("median_us"),
            get("p99_us"),
            get("max_us")
        );
    }

    const PHASES: [&str; 6] = [
        "stop",
        "freeze",
        "final_ctx_read",
        "final_drain",
        "ctx_write",
        "activate",
    ];
    let migrations = out.markers("B:MIGRATE");
    if migrations.len() != runs {
        fail(&format!(
            "expected {runs} migrations, got {}\n{}",
            migrations.len(),
            out.summary()
        ));
    }
    let mut downtime = Vec::new();
    let mut phases: Vec<Vec<u64>> = vec![Vec::new(); PHASES.len()];
    let mut ctx_bytes = Vec::new();
    println!(
        "member migration under load (1 queue per VF: member type blk has one request queue):"
    );
    for m in &migrations {
        let (i, json) = m.split_once(' ').unwrap_or((m, ""));
        if !json.contains("\"ok\":true") {
            fail(&format!("migration {i} failed: {json}"));
        }
        let d = json_num(json, "downtime_us")
            .unwrap_or_else(|| fail(&format!("migration {i}: no downtime_us in {json}")));
        let total = json_num(json, "total_us").unwrap_or(0);
        let ctx = json_num(json, "final_ctx_bytes").unwrap_or(0);
        println!("  run {i}: downtime {d:7} us   whole migrate {total:8} us   context {ctx} bytes");
        downtime.push(d);
        ctx_bytes.push(ctx);
        for (k, p) in PHASES.iter().enumerate() {
            phases[k].push(
                json_num(json, p)
                    .unwrap_or_else(|| fail(&format!("migration {i}: no phase {p} in {json}"))),
            );
        }
    }
    let stalls: Vec<u64> = out
        .markers("B:STALL")
        .iter()
        .filter_map(|m| m.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .collect();
    if stalls.len() != runs {
        fail(&format!("expected {runs} stall figures, got {stalls:?}"));
    }
    println!(
        "  workload stall (longest gap between completions, includes the workload's own switch to the destination): median {} us, min {} us, max {} us",
        median(stalls.clone()),
        stalls.iter().min().unwrap(),
        stalls.iter().max().unwrap()
    );
    println!(
        "  downtime (Stop sent on the source -> Active done on the destination), {runs} runs: median {} us, min {} us, max {} us",
        median(downtime.clone()),
        downtime.iter().min().unwrap(),
        downtime.iter().max().unwrap()
    );
    println!("  median per phase inside the downtime:");
    for (k, p) in PHASES.iter().enumerate() {
        println!("    {p:15} {:7} us", median(phases[k].clone()));
    }
    println!("  4 and 16 queues per VF: not measurable, no member type with more than one queue");

    let vfio = vfio_runs(runs);
    println!("downtime side by side ({runs} runs each, median / min / max):");
    println!(
        "  draft dialect, vpfctl migrate (Stop sent -> Active done):           {:7} / {:7} / {:7} us",
        median(downtime.clone()),
        downtime.iter().min().unwrap(),
        downtime.iter().max().unwrap()
    );
    println!(
        "  virtio 1.4, virtio_vfio_pci via VFIO (STOP_COPY asked -> RUNNING): {:7} / {:7} / {:7} us",
        median(vfio.clone()),
        vfio.iter().min().unwrap(),
        vfio.iter().max().unwrap()
    );
}
