//! The VMM as a library: the `cloud-hypervisor` binary's command line sits
//! on top of it, and its benchmarks and tests drive the same device wiring
//! and threads the binary runs.

pub mod api;
pub mod arch;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod dump;
pub mod firmware;
pub mod interrupts;
pub mod pause;
pub mod platform;
pub mod seccomp;
pub mod snapshot;
pub mod stdin;
pub mod vcpu;
pub mod vm;
pub mod watchdog;
pub mod wiring;
