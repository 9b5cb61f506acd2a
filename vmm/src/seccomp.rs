//! Seccomp filters (`--seccomp true|false|log`, built with `seccompiler`):
//! one allow-list per kind of thread, installed by the thread itself before
//! it touches anything the guest controls (the main thread once the VM is
//! built).
//!
//! With `true` a system call outside the thread's list raises SIGSYS; the
//! handler names the call and the thread on stderr and ends the VMM with
//! status 159 (128 + SIGSYS), so a missing entry is found at once. With
//! `log` the call is allowed and the kernel logs it (audit, type 1326).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

/// `--seccomp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SeccompMode {
    #[default]
    On,
    Off,
    Log,
}

impl SeccompMode {
    pub fn parse(s: &str) -> Option<SeccompMode> {
        match s {
            "true" | "on" => Some(SeccompMode::On),
            "false" | "off" => Some(SeccompMode::Off),
            "log" => Some(SeccompMode::Log),
            _ => None,
        }
    }
}

/// The kinds of thread, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM runs: the control loop, the dump, the
    /// teardown.
    Main,
    Vcpu,
    /// The device thread.
    Devices,
    /// A block device's I/O worker.
    BlkIo,
    /// The API socket's accept loop.
    Api,
    /// One API connection.
    ApiClient,
    SerialOutput,
    SerialInput,
    Watchdog,
}

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {kind:?} thread: {source}")]
    Build {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of the {kind:?} thread: {source}")]
    Apply {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
}

/// What every thread does: memory, locks, signals, time, logging, its own
/// end (and, through the Rust runtime, random hash keys).
const BASE: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_read,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_sched_getaffinity,
];

/// Starting a thread. The new thread inherits this thread's filter and
/// installs its own on top (both then apply): so a thread that starts
/// others allows `seccomp` and everything its children need.
const SPAWN: &[i64] = &[libc::SYS_clone, libc::SYS_clone3, libc::SYS_seccomp];

/// Creating what a function needs when the guest enables VFs: backing
/// files, eventfds, I/O worker threads, KVM routes and ioeventfds, epoll
/// registrations.
const CREATE_FUNCTIONS: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_eventfd2,
    libc::SYS_dup,
    libc::SYS_ioctl,
    libc::SYS_epoll_ctl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
];

/// The allow-list of `kind` (on top of [`BASE`]).
fn extra(kind: ThreadKind) -> Vec<i64> {
    let mut v: Vec<i64> = Vec::new();
    match kind {
        ThreadKind::Main => {
            v.extend([
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_tgkill,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_epoll_ctl,
                libc::SYS_ioctl,
                // Writing a snapshot directory.
                libc::SYS_openat,
                libc::SYS_mkdir,
                libc::SYS_mkdirat,
                libc::SYS_fsync,
                libc::SYS_fdatasync,
                // Sending a migration.
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_sendto,
                libc::SYS_recvfrom,
                libc::SYS_setsockopt,
                libc::SYS_getsockopt,
                libc::SYS_shutdown,
            ]);
        }
        ThreadKind::Vcpu => {
            v.extend(SPAWN);
            v.extend(CREATE_FUNCTIONS);
            v.push(libc::SYS_tgkill);
        }
        ThreadKind::Devices => {
            v.extend([libc::SYS_epoll_wait, libc::SYS_epoll_pwait]);
            v.extend(SPAWN);
            v.extend(CREATE_FUNCTIONS);
        }
        ThreadKind::BlkIo => {
            v.extend([
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_preadv,
                libc::SYS_pwritev,
                libc::SYS_fsync,
                libc::SYS_fdatasync,
            ]);
        }
        ThreadKind::Api => {
            v.extend([libc::SYS_accept4, libc::SYS_accept]);
            v.extend(SPAWN);
            // What its client threads do.
            v.extend(extra(ThreadKind::ApiClient));
        }
        ThreadKind::ApiClient => {
            v.extend([
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_setsockopt,
                libc::SYS_getsockopt,
                libc::SYS_shutdown,
                libc::SYS_tgkill,
            ]);
        }
        ThreadKind::SerialOutput => {
            v.push(libc::SYS_fsync);
        }
        ThreadKind::SerialInput => {
            v.extend([libc::SYS_poll, libc::SYS_ppoll, libc::SYS_ioctl]);
        }
        ThreadKind::Watchdog => {}
    }
    v
}

/// The BPF program of `kind`'s filter in `mode` (`None` with `Off`).
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::On => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        BASE.iter().map(|&nr| (nr, Vec::new())).collect();
    // Every thread may log, and the logger asks whether stderr is a
    // terminal (ioctl TCGETS); the threads that need more of ioctl list it.
    let tcgets = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::TCGETS)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|source| SeccompError::Build { kind, source })?;
    rules.insert(libc::SYS_ioctl, vec![tcgets]);
    // glibc opens files of its own now and then (the CPU count when a
    // thread's first allocation creates a malloc arena, for one): every
    // thread may open files read-only.
    let read_only = SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::O_ACCMODE as u64),
        libc::O_RDONLY as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|source| SeccompError::Build { kind, source })?;
    rules.insert(libc::SYS_openat, vec![read_only]);
    for nr in extra(kind) {
        rules.insert(nr, Vec::new());
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|source| SeccompError::Build { kind, source })?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|source| SeccompError::Build { kind, source })?;
    Ok(Some(prog))
}

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Sets the mode every later [`apply`] uses (once, from the command line)
/// and installs the SIGSYS handler.
pub fn set_mode(mode: SeccompMode) {
    let _ = MODE.set(mode);
    if mode == SeccompMode::On {
        install_sigsys_handler();
    }
    if mode != SeccompMode::Off {
        // With a fixed arena limit glibc does not count the CPUs (opening
        // /sys/devices/system/cpu/online) when a thread first allocates.
        // SAFETY: mallopt only sets an allocator parameter.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 8) };
    }
}

/// Installs `kind`'s filter on the calling thread, in the mode set by
/// [`set_mode`] (off if none was set).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let mode = MODE.get().copied().unwrap_or(SeccompMode::Off);
    if let Some(prog) = program(kind, mode)? {
        seccompiler::apply_filter(&prog).map_err(|source| SeccompError::Apply { kind, source })?;
    }
    Ok(())
}

/// [`apply`] for threads that cannot return an error: a filter that
/// cannot be installed ends the VMM (running unfiltered is not an option
/// the user chose).
pub fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        eprintln!("Error: {e}");
        std::process::exit(1);
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; for
    // SYS_SECCOMP its union holds (call address, syscall number, arch),
    // the number 8 bytes after the union's start at offset 16.
    let nr = unsafe { *((info as *const u8).add(24) as *const libc::c_int) };
    let mut msg = *b"seccomp: forbidden system call 0000 (see docs/api.md, --seccomp); exiting\n";
    let mut n = nr.max(0) as u32;
    for i in (31..35).rev() {
        msg[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed in
    // every thread's filter.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(128 + libc::SIGSYS);
    }
}

fn install_sigsys_handler() {
    // SAFETY: a zeroed sigaction is valid; the handler only calls
    // async-signal-safe functions.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_program_and_off_has_none() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Devices,
            ThreadKind::BlkIo,
            ThreadKind::Api,
            ThreadKind::ApiClient,
            ThreadKind::SerialOutput,
            ThreadKind::SerialInput,
            ThreadKind::Watchdog,
        ] {
            assert!(program(kind, SeccompMode::On).unwrap().is_some());
            assert!(program(kind, SeccompMode::Log).unwrap().is_some());
            assert!(program(kind, SeccompMode::Off).unwrap().is_none());
        }
        assert_eq!(SeccompMode::parse("true"), Some(SeccompMode::On));
        assert_eq!(SeccompMode::parse("false"), Some(SeccompMode::Off));
        assert_eq!(SeccompMode::parse("log"), Some(SeccompMode::Log));
        assert_eq!(SeccompMode::parse("yes"), None);
    }

    /// The filter is in force: in a child process (the test process must
    /// stay unfiltered), a blk-io thread's filter lets it read and write
    /// but a `socket()` call kills it with SIGSYS through the handler.
    #[test]
    fn a_call_outside_the_list_ends_the_process_with_sigsys() {
        let prog = program(ThreadKind::BlkIo, SeccompMode::On)
            .unwrap()
            .unwrap();
        // SAFETY: the child only runs async-signal-safe code and the
        // filter, then exits; the parent waits for it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            install_sigsys_handler();
            if seccompiler::apply_filter(&prog).is_err() {
                // SAFETY: exiting the child.
                unsafe { libc::_exit(3) };
            }
            // Allowed: a write to stderr, a read-only open.
            // SAFETY: a plain write of a static buffer.
            unsafe { libc::write(2, b"".as_ptr().cast(), 0) };
            // SAFETY: a NUL-terminated path, read-only.
            let fd = unsafe { libc::open(c"/proc/self/stat".as_ptr(), libc::O_RDONLY) };
            if fd < 0 {
                // SAFETY: exiting the child.
                unsafe { libc::_exit(4) };
            }
            // SAFETY: socket(2) with plain arguments; the filter stops it.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            // SAFETY: exiting the child (not reached if the filter works).
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            128 + libc::SIGSYS,
            "the forbidden call was not stopped"
        );
    }
}
