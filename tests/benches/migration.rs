//! Snapshot, restore and live-migration benchmark (prints figures; not a
//! test), in the same runner as the real-guest tests.
//!
//! For each case (guest memory, idle or rewriting a 64 MiB file in a
//! loop), one boot: the script beside the VMM pauses the VM, saves a
//! snapshot and resumes it (snapshot time), reads the snapshot's
//! memory.bin once (the cost of copying that memory once, here), restores
//! the snapshot in a second VMM until its API answers (restore time, then
//! that VMM ends), then live-migrates the VM to a third VMM (total time,
//! downtime, rounds, bytes, pages the dirty log missed: the source's
//! `migrated` event). Times come from the outer VM's clock (nested mode)
//! or the host's (direct mode), at 10 ms resolution.
//!
//! `CH_BENCH_MIGRATION`: the cases, `SIZE:LOAD,...` (default
//! `512M:idle,512M:writes,2G:idle,2G:writes`); `.ci/run` runs
//! `512M:writes` as a smoke.
//!
//! Run with `cargo bench -p tests --bench migration`.

use std::time::Duration;

use tests::Scenario;

const MIB: usize = 1024 * 1024;

/// The guest: optionally a writer rewriting a 64 MiB tmpfs file, then up,
/// then beats until the host writes DONE into block 1 of its disk.
fn guest(writes: bool) -> String {
    let writer = if writes {
        "( r=0; while :; do yes \"round $r\" | head -c 67108864 > /tmp/big; r=$((r + 1)); done ) &\n"
    } else {
        ""
    };
    format!(
        r#"{writer}printf 'GUEST-UP\n' > /tmp/up
dd if=/tmp/up of=/dev/vda conv=fsync 2>/dev/null
i=0
while :; do
  echo "@@T:BEAT=$i@@"
  dd if=/dev/vda bs=512 skip=1 count=1 iflag=direct 2>/dev/null | grep -q DONE && break
  i=$((i + 1)); sleep 0.5
done
"#
    )
}

const DURING: &str = r#"S=api.sock
now() { cut -d' ' -f1 /proc/uptime; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%d", (b - a) * 1000 }'; }
n=0
until grep -q GUEST-UP up.img 2> /dev/null; do
  n=$((n + 1)); [ $n -gt 1800 ] && { echo "@@T:GUEST-SEEN=no@@"; exit 1; }; sleep 0.1
done
sleep 3
t0=$(now)
ch-remote --api-socket $S pause && ch-remote --api-socket $S snapshot file://$PWD/snap || exit 1
t1=$(now)
ch-remote --api-socket $S resume || exit 1
echo "@@T:SNAPSHOT-MS=$(ms $t0 $t1)@@"
t0=$(now); dd if=snap/memory.bin of=/dev/null bs=1M 2> /dev/null; t1=$(now)
echo "@@T:COPY-MS=$(ms $t0 $t1)@@"
t0=$(now)
cloud-hypervisor --restore source_url=file://$PWD/snap --api-socket r.sock &
R=$!
until ch-remote --api-socket r.sock info 2> /dev/null | grep -q Paused; do
  kill -0 $R 2> /dev/null || { echo "@@T:RESTORE-MS=failed@@"; exit 1; }; sleep 0.05
done
t1=$(now)
echo "@@T:RESTORE-MS=$(ms $t0 $t1)@@"
ch-remote --api-socket r.sock shutdown-vmm; wait $R
rm -rf snap
cloud-hypervisor --api-socket dst.sock &
D=$!
until ch-remote --api-socket dst.sock ping > /dev/null 2>&1; do sleep 0.1; done
ch-remote --api-socket dst.sock receive-migration unix:$PWD/mig.sock &
n=0; while [ ! -S mig.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
ch-remote --api-socket $S send-migration unix:$PWD/mig.sock || exit 1
echo "@@T:MIGRATED=$(grep '"migrated"' events.json)@@"
printf 'DONE' | dd of=up.img bs=512 seek=1 conv=notrunc,sync 2> /dev/null
wait $D; echo "@@T:END=$?@@"
"#;

fn parse_size(s: &str) -> Option<usize> {
    let (n, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: usize = n.parse().ok()?;
    match unit {
        "M" => Some(n * MIB),
        "G" => Some(n * 1024 * MIB),
        _ => None,
    }
}

fn main() {
    let spec = std::env::var("CH_BENCH_MIGRATION")
        .unwrap_or_else(|_| "512M:idle,512M:writes,2G:idle,2G:writes".into());
    let runner = tests::runner();
    println!("migration benchmark: cases {spec}, mode {}", runner.mode());
    println!("  ({})", runner.detected.reason);
    println!(
        "{:>6} {:>7} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>6} {:>9} {:>7} | {:>11} {:>11}",
        "memory",
        "load",
        "copy",
        "snapshot",
        "restore",
        "migration",
        "downtime",
        "rounds",
        "sent MiB",
        "missed",
        "snap/copy",
        "migr/copy"
    );
    for case in spec.split(',') {
        let Some((size, load)) = case.split_once(':') else {
            eprintln!("bad case {case:?}: expected SIZE:idle|writes");
            std::process::exit(2);
        };
        let (Some(bytes), writes) = (parse_size(size), load == "writes") else {
            eprintln!("bad size in {case:?}");
            std::process::exit(2);
        };
        let mib = (bytes / MIB) as u32;
        let scenario = Scenario::new(&format!("bench-migration-{size}-{load}"))
            .args([
                "--cpus",
                "boot=2",
                "--memory",
                &format!("size={size}"),
                "--disk",
                "path=up.img",
                "--api-socket",
                "path=api.sock",
                "--event-monitor",
                "path=events.json",
            ])
            // The guest, a snapshot of it, a restored copy, the destination.
            .outer_memory_mib(1536 + 3 * mib)
            .file("up.img", vec![0u8; MIB])
            .script(&guest(writes))
            .during(DURING)
            .during_outlives_vmm()
            .step("guest up", "@@T:BEAT=0@@", Duration::from_secs(120))
            .step("snapshot", "@@T:SNAPSHOT-MS=", Duration::from_secs(300))
            .step("restore", "@@T:RESTORE-MS=", Duration::from_secs(300))
            .step("migration", "@@T:MIGRATED=", Duration::from_secs(900))
            .step("end", "@@T:END=", Duration::from_secs(60));
        let out = match runner.run(&scenario) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("{case}: {e}");
                std::process::exit(1);
            }
        };
        let get = |k: &str| {
            out.marker(&format!("T:{k}")).unwrap_or_else(|| {
                eprintln!("{case}: no {k}\n{}", out.summary());
                std::process::exit(1)
            })
        };
        let ms = |k: &str| -> f64 { get(k).parse::<f64>().unwrap_or(f64::NAN) };
        let (copy, snap, restore) = (ms("COPY-MS"), ms("SNAPSHOT-MS"), ms("RESTORE-MS"));
        let event: serde_json::Value = serde_json::from_str(&get("MIGRATED")).unwrap_or_default();
        let prop = |k: &str| -> f64 {
            event["properties"][k]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let total = prop("total_ms");
        println!(
            "{:>6} {:>7} | {:>7.2} s {:>7.2} s {:>7.2} s | {:>7.2} s {:>6.0} ms {:>6.0} {:>9.0} {:>7.0} | {:>10.1}x {:>10.1}x",
            size,
            load,
            copy / 1e3,
            snap / 1e3,
            restore / 1e3,
            total / 1e3,
            prop("downtime_ms"),
            prop("rounds"),
            prop("bytes") / MIB as f64,
            prop("missed_pages"),
            snap / copy,
            total / copy
        );
    }
}
