//! The command line: help, version and clear one-line errors with a
//! non-zero exit status, checked on the real binary (no KVM needed: every
//! case fails before the VM is created).

use std::path::PathBuf;
use std::process::{Command, Output};

fn ch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloud-hypervisor"))
        .args(args)
        .output()
        .expect("run cloud-hypervisor")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ch-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Asserts a failure with exactly one line on stderr containing `needle`.
fn fails_with(args: &[&str], needle: &str) {
    let out = ch(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_ne!(out.status.code(), None, "{args:?} died of a signal");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn help_and_version() {
    let out = ch(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--cpus",
        "--memory",
        "--disk",
        "--device",
        "--serial",
        "--console",
        "virtio-pf",
    ] {
        assert!(help.contains(opt), "--help lacks {opt}");
    }
    let out = ch(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("cloud-hypervisor "));
}

#[test]
fn bad_command_lines_give_one_clear_line() {
    let d = scratch("bad");
    let k = d.join("kernel");
    std::fs::write(&k, b"not a kernel").unwrap();
    let k = k.to_str().unwrap();
    fails_with(&["--kernel", "/nonexistent/bzImage"], "no such file");
    fails_with(&["--kernel", k, "--bogus"], "--bogus");
    fails_with(&["--kernel", k, "--memory", "size=12X"], "--memory");
    fails_with(&["--kernel", k, "--cpus", "boot=0"], "--cpus");
    fails_with(
        &["--kernel", k, "--disk", "path=/nonexistent.img"],
        "no such file",
    );
    fails_with(&["--kernel", k, "--disk", "path=a,colour=red"], "colour");
    fails_with(&["--kernel", k, "--serial", "pty"], "--serial");
    fails_with(&["--kernel", k, "--api-socket", "fd=x"], "--api-socket");
    fails_with(
        &["--kernel", k, "--api-socket", "path=/a,fd=3"],
        "--api-socket",
    );
    fails_with(&["--kernel", k, "--api-socket", "port=80"], "--api-socket");
    fails_with(
        &["--kernel", k, "--event-monitor", "fd=x"],
        "--event-monitor",
    );
    fails_with(
        &["--kernel", k, "--event-monitor", "fd=1000"],
        "--event-monitor",
    );
    fails_with(
        &["--kernel", k, "--event-monitor", "path=/nonexistent/dir/ev"],
        "--event-monitor",
    );
    fails_with(
        &["--kernel", k, "--log-file", "/nonexistent/dir/log"],
        "--log-file",
    );
}

/// `ch-remote`: a socket nobody listens on, and a bad subcommand, fail
/// with one line and their status.
#[test]
fn ch_remote_fails_clearly_without_a_vmm() {
    let d = scratch("remote");
    let sock = d.join("none.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_ch-remote"))
        .args(["--api-socket", sock.to_str().unwrap(), "ping"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("Error running command: cannot connect to"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ch-remote"))
        .args(["--api-socket", sock.to_str().unwrap(), "frobnicate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let help = Command::new(env!("CARGO_BIN_EXE_ch-remote"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    for sub in [
        "ping",
        "info",
        "pause",
        "resume",
        "shutdown",
        "shutdown-vmm",
        "snapshot",
    ] {
        assert!(text.contains(sub), "--help lacks {sub}: {text}");
    }
}

#[test]
fn bad_virtio_pf_options_are_refused() {
    let d = scratch("pf");
    let k = d.join("kernel");
    std::fs::write(&k, b"not a kernel").unwrap();
    let k = k.to_str().unwrap();
    let pf = d.join("pf.img");
    std::fs::write(&pf, vec![0u8; 4096]).unwrap();
    for n in 1..=2 {
        std::fs::write(d.join(format!("vf{n}.img")), vec![0u8; 4096]).unwrap();
    }
    let dev = |extra: &str| {
        format!(
            "virtio-pf,disk={},vf_disk={}/vf%n.img{extra}",
            pf.display(),
            d.display()
        )
    };
    fails_with(
        &["--kernel", k, "--device", &dev(",total_vfs=0")],
        "total_vfs",
    );
    fails_with(
        &["--kernel", k, "--device", &dev(",total_vfs=65")],
        "total_vfs",
    );
    // VF 3 has no backing file.
    fails_with(
        &["--kernel", k, "--device", &dev(",total_vfs=3")],
        "vf3.img: no such file",
    );
    fails_with(
        &["--kernel", k, "--device", &dev(",total_vfs=2,speed=9")],
        "speed",
    );
    fails_with(&["--kernel", k, "--device", &dev(",member=net")], "member");
    fails_with(&["--kernel", k, "--device", "vfio,path=/x"], "virtio-pf");
    // Too many VFs for bus 0: four PFs of 64 VFs need 36 device numbers.
    let big: Vec<String> = (0..4)
        .map(|_| {
            format!(
                "virtio-pf,total_vfs=64,disk={},vf_disk={}",
                pf.display(),
                pf.display()
            )
        })
        .collect();
    let mut args = vec!["--kernel", k];
    for b in &big {
        args.extend(["--device", b.as_str()]);
    }
    fails_with(&args, "free device numbers on bus 0");
    fails_with(
        &[
            "--kernel",
            k,
            "--device",
            "virtio-pf,disk=/nonexistent,vf_disk=x",
        ],
        "no such file",
    );
}

#[test]
fn restore_errors_are_one_line_and_no_vm() {
    let d = scratch("restore");
    let url = format!("file://{}", d.display());
    let src = format!("source_url={url}");
    fails_with(&["--restore", &src], "--restore needs --api-socket");
    fails_with(
        &["--restore", &src, "--kernel", "/k"],
        "cannot be used with",
    );
    fails_with(
        &["--restore", "source_url=/tmp/x", "--api-socket", "/tmp/s"],
        "not a snapshot URL",
    );
    fails_with(
        &["--restore", "url=x", "--api-socket", "/tmp/s"],
        "--restore",
    );
    let sock = d.join("api.sock");
    let sock = sock.to_str().unwrap();
    // An empty directory: no configuration.
    fails_with(&["--restore", &src, "--api-socket", sock], "config.json");
    // A configuration but a state that is not one.
    std::fs::write(d.join("config.json"), b"not json").unwrap();
    fails_with(
        &["--restore", &src, "--api-socket", sock],
        "not a configuration of this VMM",
    );
    let out = ch(&["--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--restore"));
    let _ = std::fs::remove_dir_all(&d);
}
