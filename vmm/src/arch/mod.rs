//! x86_64 platform: guest physical memory map, boot protocol, ACPI tables,
//! CPUID, the e820 map, and the KVM state of vCPUs and the VM.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod kvm_state;
pub mod layout;
