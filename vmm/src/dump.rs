//! The state dump: on `SIGUSR1` the VMM writes to standard error what
//! every vCPU, the device thread and every PCI function is doing, between
//! the lines `@@CH-DUMP:BEGIN=<n>@@` and `@@CH-DUMP:END=<n>@@`.
//!
//! * per vCPU: in KVM_RUN or in which exit handler and since when, its
//!   exit count, and (answered by the vCPU thread itself after a kick out of
//!   KVM_RUN) RIP/RFLAGS, control registers, MP state, pending events, the
//!   local APIC's TPR/ISR/IRR/timer and the TSC deadline; a vCPU that does
//!   not answer within [`VCPU_ANSWER`] is reported as such (it is blocked
//!   in a handler: the activity line says which);
//! * the device thread: waiting, or serving which doorbell since when;
//! * per function: device status, mode, MSI-X enable/masks/pending
//!   vectors, per queue the ring positions and suppression fields in guest
//!   memory and an unserved doorbell (see `PciDevice::debug_state`).
//!
//! The signal is taken through a signalfd on the main thread (it is blocked
//! in every thread, see [`SignalFd::new`]), so no code runs in signal
//! context and no other thread sees `EINTR` because of it.

use std::fmt::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::Killable;

use crate::device_manager::DeviceManager;
use crate::vcpu::{self, VcpuReport};
use crate::watchdog::ExitWatch;

/// How long the dump waits for a vCPU thread to report its registers.
pub const VCPU_ANSWER: Duration = Duration::from_millis(500);

/// First line of a dump (followed by its number and `@@`).
pub const DUMP_BEGIN: &str = "@@CH-DUMP:BEGIN=";
/// Last line of a dump.
pub const DUMP_END: &str = "@@CH-DUMP:END=";

/// A signalfd for the signals the main thread serves.
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Blocks `signals` in the calling thread (and so in every thread it
    /// creates afterwards) and opens a signalfd that receives them.
    pub fn new(signals: &[libc::c_int]) -> std::io::Result<Self> {
        // SAFETY: an all-zero sigset_t is a valid argument to sigemptyset,
        // which initializes it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, writable sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        for &s in signals {
            // SAFETY: `set` is initialized; an invalid signal number only
            // makes the call fail.
            if unsafe { libc::sigaddset(&mut set, s) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // SAFETY: `set` is initialized; a null old-set pointer is allowed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: -1 asks for a new descriptor; `set` is initialized.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by signalfd and is owned by no one
        // else.
        Ok(SignalFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The next pending signal, if any.
    pub fn read(&self) -> Option<libc::c_int> {
        // SAFETY: an all-zero signalfd_siginfo is a valid buffer.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let len = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is a writable buffer of `len` bytes.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut info as *mut libc::signalfd_siginfo as *mut libc::c_void,
                len,
            )
        };
        (n == len as isize).then_some(info.ssi_signo as libc::c_int)
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A running vCPU thread and the slot it answers dump requests through.
pub struct VcpuThread {
    pub handle: JoinHandle<()>,
    pub report: Arc<VcpuReport>,
}

/// What the dump reads.
pub struct DumpSources<'a> {
    pub vcpus: &'a [VcpuThread],
    pub watch: &'a ExitWatch,
    pub devices: &'a DeviceManager,
    pub started: Instant,
}

/// Asks every vCPU thread for its registers (kicking it out of KVM_RUN
/// until it answers or [`VCPU_ANSWER`] passes) and returns each answer.
fn vcpu_reports(vcpus: &[VcpuThread]) -> Vec<Option<String>> {
    let wanted: Vec<u64> = vcpus.iter().map(|v| v.report.request()).collect();
    let deadline = Instant::now() + VCPU_ANSWER;
    let mut answers: Vec<Option<String>> = vec![None; vcpus.len()];
    loop {
        for (i, v) in vcpus.iter().enumerate() {
            if answers[i].is_none() {
                answers[i] = v.report.answered(wanted[i]);
                if answers[i].is_none() && !v.handle.is_finished() {
                    let _ = v.handle.kill(vcpu::kick_signal());
                }
            }
        }
        if answers.iter().all(Option::is_some) || Instant::now() >= deadline {
            return answers;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Builds dump number `n`.
pub fn collect(n: u64, src: &DumpSources<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{DUMP_BEGIN}{n}@@ (VMM up {:.3} s)",
        src.started.elapsed().as_secs_f64()
    );
    // Activity first: asking for registers kicks the vCPUs out of KVM_RUN.
    let activity: Vec<String> = (0..src.vcpus.len())
        .map(|i| src.watch.describe(i))
        .collect();
    let reports = vcpu_reports(src.vcpus);
    for (i, ((v, r), act)) in src.vcpus.iter().zip(reports).zip(activity).enumerate() {
        let _ = writeln!(out, "vCPU {i}: {act}");
        match r {
            Some(text) => {
                let _ = writeln!(out, "vCPU {i} state: {text}");
            }
            None if v.handle.is_finished() => {
                let _ = writeln!(out, "vCPU {i} state: the thread has ended");
            }
            None => {
                let _ = writeln!(
                    out,
                    "vCPU {i} state: no answer within {} ms (blocked outside KVM_RUN?)",
                    VCPU_ANSWER.as_millis()
                );
            }
        }
    }
    for line in src.devices.describe().lines() {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "{DUMP_END}{n}@@");
    out
}
