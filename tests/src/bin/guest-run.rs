//! Boots one guest with the real-guest runner and shows its console:
//!
//! ```text
//! guest-run [--name NAME] [--script FILE] [--file NAME=HOSTPATH]...
//!           [--timeout SECS] [--cmdline STRING] [-- VMM ARGS...]
//! ```
//!
//! `--script` is run by the guest's /init (busybox sh). Each `--file` copies
//! HOSTPATH into the scenario directory as NAME (refer to it by NAME in the
//! VMM arguments) and copies it back to HOSTPATH after the run. The runner
//! adds --kernel/--initramfs/--cmdline/--serial/--console (see `Scenario`).
//! Exits 0 when the guest ran the script and the VMM exited with status 0.

use std::path::PathBuf;
use std::time::Duration;

use tests::Scenario;

fn usage() -> ! {
    eprintln!(
        "usage: guest-run [--name NAME] [--script FILE] [--file NAME=HOSTPATH]... \
         [--timeout SECS] [--cmdline STRING] [-- VMM ARGS...]"
    );
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut name = "guest-run".to_string();
    let mut script = String::new();
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    let mut timeout = None;
    let mut cmdline = None;
    let mut vmm_args = Vec::new();
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--name" => name = value(),
            "--script" => {
                let path = value();
                script = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                    eprintln!("guest-run: cannot read {path}: {e}");
                    std::process::exit(2)
                })
            }
            "--file" => {
                let v = value();
                let Some((n, p)) = v.split_once('=') else {
                    usage()
                };
                files.push((n.to_string(), PathBuf::from(p)));
            }
            "--timeout" => {
                timeout = Some(Duration::from_secs(
                    value().parse().unwrap_or_else(|_| usage()),
                ))
            }
            "--cmdline" => cmdline = Some(value()),
            "--" => {
                vmm_args.extend(args.by_ref());
            }
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let mut scenario = Scenario::new(&name).args(vmm_args).script(&script);
    if let Some(t) = timeout {
        scenario = scenario.timeout(t);
    }
    if let Some(c) = &cmdline {
        scenario = scenario.cmdline(c);
    }
    for (n, p) in &files {
        let data = std::fs::read(p).unwrap_or_else(|e| {
            eprintln!("guest-run: cannot read {}: {e}", p.display());
            std::process::exit(2)
        });
        scenario = scenario.file(n, data);
    }
    let mut runner = tests::runner();
    runner.echo = true;
    eprintln!("guest-run: VMM {}", runner.vmm.display());
    let out = match runner.run(&scenario) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("guest-run: {e}");
            std::process::exit(1);
        }
    };
    for (n, p) in &files {
        match out.read_file(n) {
            Ok(data) => {
                if let Err(e) = std::fs::write(p, data) {
                    eprintln!("guest-run: cannot write {}: {e}", p.display());
                }
            }
            Err(e) => eprintln!("guest-run: {e}"),
        }
    }
    let init = out
        .time_to_init()
        .map(|d| format!("{:.2} s", d.as_secs_f64()))
        .unwrap_or_else(|| "never".into());
    eprintln!(
        "guest-run: guest /init after {init}; script status {}; VMM exit status {} after {:.2} s; output in {}",
        out.scenario_exit()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "none".into()),
        out.vmm_exit,
        out.time_to_exit().as_secs_f64(),
        out.path(tests::runner::OUTPUT_LOG).display()
    );
    let ok = out.vmm_exit == 0 && out.scenario_exit() == Some(0);
    std::process::exit(if ok { 0 } else { 1 });
}
