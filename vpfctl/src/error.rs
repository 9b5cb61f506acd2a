//! Errors of the tool, and the process exit code each maps to.

use std::io;
use std::path::PathBuf;

/// Exit code: the device completed an admin command with a non-OK status.
pub const EXIT_STATUS: i32 = 1;
/// Exit code: bad command line (also clap's own usage errors).
pub const EXIT_USAGE: i32 = 2;
/// Exit code: the host side failed (sysfs, mmap, pagemap, device layout).
pub const EXIT_SYSTEM: i32 = 3;
/// Exit code: the device did not complete a request in time.
pub const EXIT_TIMEOUT: i32 = 4;
/// Exit code: the workload found wrong data or a completion that broke the
/// exactly-once rule, or migrate's consistency checks failed.
pub const EXIT_VERIFY: i32 = 5;
/// `migrate --exit-after`: the owner left after the named phase, on purpose.
pub const EXIT_ABANDONED: i32 = 6;

/// Everything that can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was attempted ("read", "open", "write to", ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Sys {
        /// Name and purpose of the call.
        call: String,
        /// The OS error.
        source: io::Error,
    },
    /// The PCI function is not what the tool needs.
    #[error("PCI device {bdf}: {msg}")]
    Device {
        /// Function address.
        bdf: String,
        /// What is wrong.
        msg: String,
    },
    /// `/proc/self/pagemap` gave no physical address.
    #[error("no physical address for virtual page {vaddr:#x}: {msg}")]
    Pagemap {
        /// Virtual address of the page.
        vaddr: u64,
        /// Why.
        msg: String,
    },
    /// A queue had no room or gave back something impossible.
    #[error("virtqueue: {0}")]
    Queue(String),
    /// The device did not complete a request within the timeout.
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout {
        /// Milliseconds waited.
        ms: u64,
        /// What was awaited.
        what: String,
    },
    /// An admin command completed with a non-OK status.
    #[error("{opcode} failed: status {status} ({status_name}), qualifier {qualifier} ({qualifier_name})")]
    AdminStatus {
        /// Opcode name.
        opcode: String,
        /// Status value.
        status: u16,
        /// Status name.
        status_name: String,
        /// Qualifier value.
        qualifier: u16,
        /// Qualifier name.
        qualifier_name: String,
    },
    /// A reply the tool cannot make sense of.
    #[error("{0}")]
    Protocol(String),
    /// Bad arguments that clap could not catch.
    #[error("{0}")]
    Usage(String),
    /// Data verification or exactly-once check failed.
    #[error("verification failed: {0}")]
    Verify(String),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::AdminStatus { .. } => EXIT_STATUS,
            Error::Usage(_) => EXIT_USAGE,
            Error::Timeout { .. } => EXIT_TIMEOUT,
            Error::Verify(_) => EXIT_VERIFY,
            _ => EXIT_SYSTEM,
        }
    }

    /// Build an [`Error::Io`].
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// Build an [`Error::Sys`] from `errno`.
    pub fn last_os(call: impl Into<String>) -> Self {
        Error::Sys {
            call: call.into(),
            source: io::Error::last_os_error(),
        }
    }

    /// Build an [`Error::Device`].
    pub fn device(bdf: &str, msg: impl Into<String>) -> Self {
        Error::Device {
            bdf: bdf.to_string(),
            msg: msg.into(),
        }
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
