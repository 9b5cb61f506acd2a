//! Platform devices on the I/O port bus: the COM1 serial port and the ACPI
//! sleep/reset registers.

pub mod acpi_power;
pub mod serial;
