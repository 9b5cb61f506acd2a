//! Boots the real-guest stress scenarios many times in a row and reports
//! every hang with what was running:
//!
//! ```text
//! stress [--runs N] [--scenarios a,b,...] [--out DIR]
//! ```
//!
//! Runs N guests (default 100), cycling through the scenarios (default
//! all: `boot`, `smp-disk`, `pf-kernel`, `pf-vpfctl`; see
//! `tests::stress`). Each run is held to per-step deadlines; a step that
//! does not end in time is a **hang**: the runner collects the VMM's state
//! dump, and the run's whole output (dump included) is kept as
//! `DIR/<run>-<scenario>.log` (default DIR: build/stress). A run that ends
//! but prints the wrong results is a **failure**, kept the same way. One
//! line per run, then per scenario: runs, hangs, failures, and the median
//! and slowest time of each step. Exits 0 only if every run passed.
//!
//! Uses the VMM and guest images as the tests do (`CH_BINARY`,
//! `CH_TEST_MODE`, ...).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tests::stress::{expected, scenario, SCENARIOS};
use tests::Error;

fn usage() -> ! {
    eprintln!("usage: stress [--runs N] [--scenarios a,b,...] [--out DIR]");
    eprintln!("scenarios: {}", SCENARIOS.join(", "));
    std::process::exit(2);
}

#[derive(Default)]
struct Tally {
    runs: usize,
    hangs: usize,
    failures: usize,
    /// Step name and its times, in the order the steps run.
    steps: Vec<(String, Vec<Duration>)>,
}

fn main() {
    let mut runs = 100usize;
    let mut names: Vec<String> = SCENARIOS.iter().map(|s| s.to_string()).collect();
    let mut out_dir = tests::host::repo_root().join("build").join("stress");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--runs" => runs = value().parse().unwrap_or_else(|_| usage()),
            "--scenarios" => names = value().split(',').map(str::to_string).collect(),
            "--out" => out_dir = PathBuf::from(value()),
            _ => usage(),
        }
    }
    for n in &names {
        if scenario(n).is_none() {
            eprintln!("stress: unknown scenario {n}");
            usage();
        }
    }
    if std::fs::create_dir_all(&out_dir).is_err() {
        eprintln!("stress: cannot create {}", out_dir.display());
        std::process::exit(2);
    }
    let runner = tests::runner();
    println!(
        "stress: {runs} runs of {} (mode {}, VMM {})",
        names.join(", "),
        runner.mode(),
        runner.vmm.display()
    );
    let started = Instant::now();
    let mut tally: BTreeMap<String, Tally> = BTreeMap::new();
    for i in 1..=runs {
        let name = &names[(i - 1) % names.len()];
        let Some(sc) = scenario(name) else { usage() };
        let t0 = Instant::now();
        let result = runner.run(&sc);
        let took = t0.elapsed();
        let t = tally.entry(name.clone()).or_default();
        t.runs += 1;
        let keep = |what: &str, text: &str| {
            let path = out_dir.join(format!("{i:03}-{name}.log"));
            let log = runner_log(&sc.name);
            let _ = std::fs::write(
                &path,
                format!("{what}\n{text}\n\n--- output.log ---\n{log}"),
            );
            path
        };
        let verdict = match result {
            Ok(out) => {
                for (step, d) in &out.step_times {
                    match t.steps.iter_mut().find(|(s, _)| s == step) {
                        Some((_, v)) => v.push(*d),
                        None => t.steps.push((step.clone(), vec![*d])),
                    }
                }
                let mut bad = Vec::new();
                for (key, want) in expected(name) {
                    match out.marker(key) {
                        Some(v) if v.starts_with(want) => {}
                        other => bad.push(format!("{key}={other:?} (want {want}...)")),
                    }
                }
                if out.scenario_exit() != Some(0) || out.vmm_exit != 0 {
                    bad.push(format!(
                        "script exit {:?}, VMM exit {}",
                        out.scenario_exit(),
                        out.vmm_exit
                    ));
                }
                if bad.is_empty() {
                    let steps: Vec<String> = out
                        .step_times
                        .iter()
                        .map(|(s, d)| format!("{s}={:.1}s", d.as_secs_f64()))
                        .collect();
                    format!("ok      {}", steps.join(" "))
                } else {
                    t.failures += 1;
                    let p = keep("FAILED", &bad.join("\n"));
                    format!("FAILED  {} (kept {})", bad.join("; "), p.display())
                }
            }
            Err(e @ Error::Stalled { .. }) => {
                t.hangs += 1;
                let p = keep("HANG", &e.to_string());
                let first = e.to_string().lines().next().unwrap_or("").to_string();
                format!("HANG    {first} (kept {})", p.display())
            }
            Err(e) => {
                t.failures += 1;
                let p = keep("ERROR", &e.to_string());
                let first = e.to_string().lines().next().unwrap_or("").to_string();
                format!("ERROR   {first} (kept {})", p.display())
            }
        };
        println!(
            "[{i:4}/{runs}] {name:<10} {:6.1}s  {verdict}",
            took.as_secs_f64()
        );
    }
    println!(
        "\nstress: {runs} runs in {:.1} min",
        started.elapsed().as_secs_f64() / 60.0
    );
    let mut all_ok = true;
    for (name, t) in &tally {
        println!(
            "{name:<10} runs={} hangs={} failures={}",
            t.runs, t.hangs, t.failures
        );
        all_ok &= t.hangs == 0 && t.failures == 0;
        for (step, times) in &t.steps {
            let mut v = times.clone();
            v.sort();
            println!(
                "    {step:<28} median {:6.2}s  max {:6.2}s",
                v[v.len() / 2].as_secs_f64(),
                v[v.len() - 1].as_secs_f64()
            );
        }
    }
    println!(
        "stress: {}",
        if all_ok {
            "every run passed, no hang"
        } else {
            "SOME RUNS HUNG OR FAILED"
        }
    );
    std::process::exit(if all_ok { 0 } else { 1 });
}

fn runner_log(scenario: &str) -> String {
    let path = tests::host::runs_dir()
        .join(scenario)
        .join(tests::runner::OUTPUT_LOG);
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no output.log: {e})"))
}
