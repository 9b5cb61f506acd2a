//! Real-guest test support for the `cloud-hypervisor` VMM.
//!
//! A [`Scenario`] names VMM arguments (paths relative to its scenario
//! directory), a shell script the inner Debian guest runs as its /init payload,
//! and files (disk images). A [`Runner`] runs it:
//!
//! * **direct**: the host's `/dev/kvm` is hardware KVM (kvm_intel or kvm_amd
//!   loaded, vmx/svm in /proc/cpuinfo): the VMM runs on the host.
//! * **nested**: any other `/dev/kvm` (here: kvm_pvm, which cannot run Linux):
//!   the VMM runs inside a QEMU TCG host VM (`-cpu max`, nested SVM) whose
//!   /init loads kvm + kvm_amd; see [`mod@runner`] for how files travel.
//! * **qemu-reference** (`CH_TEST_MODE=qemu-reference`): QEMU TCG stands in
//!   for the VMM, to check scenarios and guest images against a known-good
//!   VMM.
//!
//! No `/dev/kvm` at all, a failed image build or VMM build, a timeout: each is
//! an [`Error`], and the tests fail with it. Nothing is skipped.
//!
//! Environment:
//! * `CH_TEST_MODE`: auto (default) | direct | nested | qemu-reference.
//! * `CH_BINARY`: the VMM to run; default: `cargo build --release -p vmm`
//!   into the workspace's target/ (or `CH_VMM_TARGET_DIR`), once per process.
//! * `CH_GUEST_DIR`: prebuilt guest images, used as they are; default: run
//!   scripts/build-guest-image.sh (cached in build/guest).
//! * `CH_TEST_RUN_DIR`: where scenario directories go (default build/runs;
//!   each keeps `output.log`, every output line with its host timestamp).
//! * `CH_TEST_TIMEOUT_SECS`: time limit of a run (default 60 s direct, 180 s
//!   nested, 300 s qemu-reference; a scenario may set its own).
//!
//! VM runs are serialized: one at a time per machine (a lock file in the run
//! directory), since a nested run already keeps both cores busy.

pub mod checks;
pub mod cpio;
pub mod error;
pub mod guest_tools;
pub mod host;
pub mod pattern;
pub mod runner;
pub mod scenario;
pub mod steps;
pub mod stress;
pub mod vf_beats;
pub mod workload;

pub use error::{Error, Result};
pub use host::Mode;
pub use runner::Runner;
pub use scenario::{RunOutput, Scenario};

/// A runner for this host, or a panic with the reason (for tests: a missing
/// prerequisite FAILS the test, it is never skipped).
pub fn runner() -> Runner {
    match Runner::from_env() {
        Ok(r) => {
            eprintln!(
                "real-guest runner: mode {} ({})",
                r.mode(),
                r.detected.reason
            );
            r
        }
        Err(e) => panic!("cannot run real-guest tests: {e}"),
    }
}

/// Runs `scenario`, panicking with the error (timeouts include the tail of
/// the output).
pub fn run(runner: &Runner, scenario: &Scenario) -> RunOutput {
    match runner.run(scenario) {
        Ok(out) => out,
        Err(e) => panic!("scenario {} failed to run: {e}", scenario.name),
    }
}
