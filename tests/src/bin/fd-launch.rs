//! `fd-launch [--listen N=PATH] [--file N=PATH] -- PROGRAM ARGS...`: opens
//! descriptors for a program to inherit, then executes it (same process).
//!
//! `--listen N=PATH` binds and listens on a Unix socket at PATH (an old
//! socket file there is replaced; PATH appears only once it listens) as
//! descriptor N; `--file N=PATH` creates
//! or truncates PATH for writing as descriptor N. The tests start the VMM
//! through it to check `--api-socket fd=N` and `--event-monitor fd=N`
//! ([`tests::Scenario::launcher`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{exit, Command};

fn fail(why: String) -> ! {
    eprintln!("fd-launch: {why}");
    exit(2)
}

/// Moves `fd` to a descriptor number of 64 or more (close-on-exec), so
/// that placing one descriptor cannot close another still to be placed.
fn park(fd: OwnedFd) -> i32 {
    // SAFETY: duplicates a descriptor this process owns; the original is
    // closed when `fd` drops, the duplicate is closed at exec.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
    if high < 0 {
        fail(format!(
            "fcntl(F_DUPFD_CLOEXEC): {}",
            std::io::Error::last_os_error()
        ));
    }
    high
}

/// Puts the parked descriptor `high` on `n`, inheritable (dup2 leaves the
/// new descriptor without close-on-exec).
fn place(high: i32, n: i32) {
    // SAFETY: dup2 onto a descriptor number the caller chose (above 2);
    // nothing else in this process uses it.
    if unsafe { libc::dup2(high, n) } < 0 {
        fail(format!(
            "dup2({high}, {n}): {}",
            std::io::Error::last_os_error()
        ));
    }
}

fn split(spec: &str) -> (i32, &str) {
    let Some((n, path)) = spec.split_once('=') else {
        fail(format!("{spec:?}: expected N=PATH"));
    };
    match n.parse::<i32>() {
        Ok(n) if n > 2 => (n, path),
        _ => fail(format!("{spec:?}: N must be a descriptor number above 2")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let mut opened = Vec::new();
    while i < args.len() && args[i] != "--" {
        let value = args
            .get(i + 1)
            .unwrap_or_else(|| fail(format!("{} needs a value", args[i])));
        let (n, path) = split(value);
        if opened.iter().any(|&(_, m)| m == n) {
            fail(format!("descriptor {n} given twice"));
        }
        let fd: OwnedFd = match args[i].as_str() {
            "--listen" => {
                // Bound and listening under a temporary name, then renamed:
                // PATH appears only once a connect to it succeeds, so a
                // client may wait for the file and connect once.
                let tmp = format!("{path}.binding");
                let _ = std::fs::remove_file(&tmp);
                let listener = UnixListener::bind(&tmp)
                    .unwrap_or_else(|e| fail(format!("cannot listen on {tmp}: {e}")));
                std::fs::rename(&tmp, path)
                    .unwrap_or_else(|e| fail(format!("cannot rename {tmp} to {path}: {e}")));
                listener.into()
            }
            "--file" => std::fs::File::create(path)
                .unwrap_or_else(|e| fail(format!("cannot create {path}: {e}")))
                .into(),
            other => fail(format!("unknown option {other:?}")),
        };
        opened.push((park(fd), n));
        i += 2;
    }
    let program = args.get(i + 1).unwrap_or_else(|| {
        fail("usage: fd-launch [--listen N=PATH] [--file N=PATH] -- PROGRAM ARGS...".into())
    });
    for (high, n) in opened {
        place(high, n);
    }
    let err = Command::new(program).args(&args[i + 2..]).exec();
    fail(format!("cannot execute {program}: {err}"))
}
