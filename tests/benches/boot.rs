//! Boot benchmark (prints figures; not a test): time from VMM start to the
//! inner guest's /init and to VMM exit, over 5 runs (`CH_BENCH_RUNS`), median
//! reported, in the same runner as the real-guest tests.
//!
//! How it is measured: the runner timestamps every output line when it
//! reaches the host (stdout of the VMM, or of the outer QEMU).
//! * direct mode: start = the VMM process is spawned; /init = the line
//!   `@@CH-TEST:INIT@@` that the guest's /init prints on the serial console;
//!   exit = the host sees the VMM process end (polled every 5 ms).
//! * nested mode: start = the outer /init's `@@CH-TEST:VMM-START@@` line,
//!   printed right before it execs the VMM; /init as above; exit = the outer
//!   /init's `@@CH-TEST:VMM-EXIT=N@@` line, printed right after the VMM ends.
//!   Figures include nested-virtualization overhead (every VM exit of the
//!   inner guest goes through KVM in a TCG-emulated CPU), so they say little
//!   about the VMM on hardware; outer-VM boot time is printed separately.
//!
//! Run with `cargo bench -p tests --bench boot` (uses `CH_BINARY` or builds
//! the VMM like the tests do).

use std::time::Duration;

use tests::{Mode, Scenario};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:8.3} s", d.as_secs_f64())
}

fn main() {
    let runs: usize = std::env::var("CH_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5);
    let runner = tests::runner();
    println!("boot benchmark: {runs} runs, mode {}", runner.mode());
    println!("  ({})", runner.detected.reason);
    let scenario = Scenario::new("bench-boot").args(["--cpus", "boot=1", "--memory", "size=512M"]);
    let (mut to_init, mut to_exit, mut outer) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=runs {
        let out = match runner.run(&scenario) {
            Ok(out) => out,
            Err(e) => {
                eprintln!("run {i} failed: {e}");
                std::process::exit(1);
            }
        };
        let Some(init) = out.time_to_init() else {
            eprintln!("run {i}: the guest never reached /init\n{}", out.summary());
            std::process::exit(1);
        };
        if out.vmm_exit != 0 {
            eprintln!(
                "run {i}: VMM exit status {}\n{}",
                out.vmm_exit,
                out.summary()
            );
            std::process::exit(1);
        }
        let exit = out.time_to_exit();
        print!(
            "run {i}: VMM start -> guest /init {}   VMM start -> VMM exit {}",
            secs(init),
            secs(exit)
        );
        if runner.mode() == Mode::Nested {
            print!("   (outer VM start -> VMM start {})", secs(out.vmm_started));
            outer.push(out.vmm_started);
        }
        println!();
        to_init.push(init);
        to_exit.push(exit);
    }
    println!("median of {runs}:");
    println!("  VMM start -> guest /init: {}", secs(median(to_init)));
    println!("  VMM start -> VMM exit:    {}", secs(median(to_exit)));
    if !outer.is_empty() {
        println!(
            "  outer VM start -> VMM start (not part of the figures above): {}",
            secs(median(outer))
        );
    }
}
