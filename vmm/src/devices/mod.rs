//! Platform devices on the I/O port bus: the COM1 serial port, the ACPI
//! sleep/reset registers and the ACPI Generic Event Device (power button).

pub mod acpi_power;
pub mod ged;
pub mod serial;
