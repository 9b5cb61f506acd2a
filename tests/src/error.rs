//! Errors of the real-guest test runner.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can stop a scenario from producing a result.
///
/// Every variant is a reason for a test to FAIL: the runner never skips.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host has no `/dev/kvm` at all, and no mode was forced.
    #[error(
        "no /dev/kvm on this host: the real-guest tests need KVM (hardware KVM runs the VMM \
         directly; any other /dev/kvm makes the runner nest it in a QEMU TCG VM). \
         Set CH_TEST_MODE=nested to run under QEMU TCG anyway"
    )]
    NoKvm,

    /// `CH_TEST_MODE` holds something the runner does not know.
    #[error("CH_TEST_MODE={0:?} is not one of auto, direct, nested, qemu-reference")]
    BadMode(String),

    /// A tool the chosen mode needs is not installed.
    #[error("{tool} is needed ({why}) but was not found in PATH; run scripts/build-guest-image.sh as root to install it")]
    MissingTool { tool: String, why: String },

    /// `scripts/build-guest-image.sh` failed.
    #[error("guest image builder {script} failed ({status}):\n{output}")]
    ImageBuild {
        script: PathBuf,
        status: String,
        output: String,
    },

    /// The guest image directory lacks an expected file.
    #[error("guest image file {0} is missing (run scripts/build-guest-image.sh)")]
    MissingImage(PathBuf),

    /// `CH_BINARY` names a file that does not exist.
    #[error("CH_BINARY={0} does not exist")]
    MissingBinary(PathBuf),

    /// Building the VMM with cargo failed.
    #[error("building the VMM failed: {command} ({status}):\n{output}")]
    VmmBuild {
        command: String,
        status: String,
        output: String,
    },

    /// A scenario is malformed (bad file name, ...).
    #[error("bad scenario {scenario}: {why}")]
    BadScenario { scenario: String, why: String },

    /// A file operation failed.
    #[error("{context}: {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Starting a process failed.
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },

    /// The run did not finish in time; the process was killed.
    #[error("{what} did not finish within {:.0} s and was killed; last output:\n{tail}", .limit.as_secs_f64())]
    Timeout {
        what: String,
        limit: Duration,
        tail: String,
    },

    /// A step of the run did not end in time: the VMM's state dump was
    /// collected and the process killed.
    #[error(
        "{what} stalled: {overdue}.\nVMM state dump:\n{dump}\nlast output before the dump:\n{tail}"
    )]
    Stalled {
        what: String,
        overdue: String,
        dump: String,
        tail: String,
    },

    /// The outer (QEMU TCG) host VM reported a problem before or after the VMM ran.
    #[error("the outer QEMU host VM failed: {why}; last output:\n{tail}")]
    Outer { why: String, tail: String },

    /// A marker line the protocol requires never appeared.
    #[error("{what}: marker {marker} missing from the output; last output:\n{tail}")]
    MissingMarker {
        what: String,
        marker: String,
        tail: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }
}
