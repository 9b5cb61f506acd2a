//! A VMM started with only `--api-socket`: no VM, the API answers, a
//! receive-migration (Unix socket or TCP) whose sender sends garbage,
//! sends out of order or gives up is refused and the VMM waits on,
//! `vmm.shutdown` ends it. No KVM needed: no VM is built.

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

/// `ch-remote receive-migration URL` in a thread.
fn receive(sock: &Path, url: String) -> std::thread::JoinHandle<Output> {
    let sock = sock.to_path_buf();
    std::thread::spawn(move || ch_remote(&sock, &["receive-migration", &url]))
}

/// Connects (retrying while the receiver is not listening yet).
fn connect<T>(what: &str, f: impl Fn() -> std::io::Result<T>) -> T {
    let t = Instant::now();
    loop {
        if let Ok(s) = f() {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the {what} receiver never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
    let receiver = receive(&sock, format!("unix:{}", mig.display()));
    let mut s = connect("Unix", || UnixStream::connect(&mig));
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
    let receiver = receive(&sock, format!("unix:{}", mig.display()));
    let mut s = connect("Unix", || UnixStream::connect(&mig));
    protocol::request(&mut s, Mig::Start, &[]).unwrap();
    drop(s);
    let r = receiver.join().unwrap();
    assert!(text(&r).contains("closed the connection"), "{}", text(&r));

    // Over TCP: the same refusal.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let receiver = receive(&sock, format!("tcp:127.0.0.1:{port}"));
    let mut s = connect("TCP", || std::net::TcpStream::connect(("127.0.0.1", port)));
    protocol::request(&mut s, Mig::Start, &[]).unwrap();
    assert!(matches!(
        protocol::request(&mut s, Mig::Memory, &protocol::encode_memory(&[(0, 4)], &[0; 4])),
        Err(protocol::ProtocolError::Refused(why)) if why.contains("memory before the configuration")
    ));
    let r = receiver.join().unwrap();
    assert!(
        text(&r).contains("memory before the configuration"),
        "{}",
        text(&r)
    );

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
