//! x86_64 platform: guest physical memory map, boot protocol, ACPI tables,
//! CPUID and the e820 map.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
