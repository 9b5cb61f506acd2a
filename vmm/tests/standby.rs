//! A VMM started with only `--api-socket`: no VM, the API answers, a
//! receive-migration whose sender sends garbage or gives up is refused and
//! the VMM waits on, `vmm.shutdown` ends it. No KVM needed: no VM is built.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vm_migration::protocol::{self, Command as Mig};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ch-standby-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ch_remote(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ch-remote"))
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("run ch-remote")
}

/// Kills the VMM if the test ends early.
struct Vmm(Child);
impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path) -> (Vmm, PathBuf) {
    let sock = dir.join("api.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_cloud-hypervisor"))
        .arg("--api-socket")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cloud-hypervisor");
    let t = Instant::now();
    while !ch_remote(&sock, &["ping"]).status.success() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the API never came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (Vmm(child), sock)
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_vmm_without_a_vm_refuses_bad_migrations_and_waits_on() {
    let dir = scratch("refuse");
    let (mut vmm, sock) = start(&dir);

    let info = ch_remote(&sock, &["info"]);
    assert!(!info.status.success());
    assert!(
        text(&info).contains("500") && text(&info).contains("has no VM yet"),
        "{}",
        text(&info)
    );
    let bad = ch_remote(&sock, &["receive-migration", "file:///x"]);
    assert!(
        text(&bad).contains("400") && text(&bad).contains("not a migration URL"),
        "{}",
        text(&bad)
    );
    let restore = ch_remote(
        &sock,
        &["restore", &format!("source_url=file://{}", dir.display())],
    );
    assert!(
        text(&restore).contains("500") && text(&restore).contains("config.json"),
        "{}",
        text(&restore)
    );

    // A sender whose configuration is not one: refused with a reason.
    let mig = dir.join("mig.sock");
    let url = format!("unix:{}", mig.display());
    let receiver = {
        let sock = sock.clone();
        std::thread::spawn(move || ch_remote(&sock, &["receive-migration", &url]))
    };
    let t = Instant::now();
    let mut s = loop {
        if let Ok(s) = UnixStream::connect(&mig) {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the receiver never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    protocol::request(&mut s, Mig::Start, &[]).unwrap();
    match protocol::request(&mut s, Mig::Config, b"{not json") {
        Err(protocol::ProtocolError::Refused(why)) => {
            assert!(why.contains("configuration"), "{why}")
        }
        other => panic!("garbage configuration accepted: {other:?}"),
    }
    let r = receiver.join().unwrap();
    assert!(
        text(&r).contains("500") && text(&r).contains("configuration"),
        "{}",
        text(&r)
    );

    // A sender that gives up after Start: refused, the VMM waits on.
    let url = format!("unix:{}", mig.display());
    let receiver = {
        let sock = sock.clone();
        std::thread::spawn(move || ch_remote(&sock, &["receive-migration", &url]))
    };
    let t = Instant::now();
    let mut s = loop {
        if let Ok(s) = UnixStream::connect(&mig) {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the receiver never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    protocol::request(&mut s, Mig::Start, &[]).unwrap();
    drop(s);
    let r = receiver.join().unwrap();
    assert!(text(&r).contains("closed the connection"), "{}", text(&r));

    assert!(ch_remote(&sock, &["ping"]).status.success());
    assert!(ch_remote(&sock, &["shutdown-vmm"]).status.success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = vmm.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "vmm.shutdown did not end the VMM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "the API socket is left behind");
    let _ = std::fs::remove_dir_all(&dir);
}
