//! Where vCPU exits go: the I/O port and MMIO address map of the machine,
//! and the VM's exit request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::*;
use crate::device_manager::DeviceManager;
use crate::devices::acpi_power::{self, PowerEvent};
use crate::devices::serial::SerialPort;

/// Why the VM stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    PowerOff,
    Reset,
    Error(String),
}

/// The machine's address decoding and exit state, shared by all vCPUs.
pub struct Platform {
    serial: Option<Mutex<SerialPort>>,
    devices: Arc<DeviceManager>,
    exit_evt: EventFd,
    exit_flag: AtomicBool,
    exit_reason: Mutex<Option<ExitReason>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Platform {
    pub fn new(serial: Option<SerialPort>, devices: DeviceManager, exit_evt: EventFd) -> Self {
        Platform {
            serial: serial.map(Mutex::new),
            devices: Arc::new(devices),
            exit_evt,
            exit_flag: AtomicBool::new(false),
            exit_reason: Mutex::new(None),
        }
    }

    pub fn devices_arc(&self) -> Arc<DeviceManager> {
        self.devices.clone()
    }

    /// Asks the VMM to stop the VM. The first reason wins.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut r = lock(&self.exit_reason);
        if r.is_none() {
            *r = Some(reason);
        }
        self.exit_flag.store(true, Ordering::Release);
        let _ = self.exit_evt.write(1);
    }

    pub fn exit_requested(&self) -> bool {
        self.exit_flag.load(Ordering::Acquire)
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        lock(&self.exit_reason).clone()
    }

    /// Host input for the serial port.
    pub fn serial_input(&self, bytes: &[u8]) {
        if let Some(s) = &self.serial {
            lock(s).enqueue_input(bytes);
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + 8).contains(&p) => {
                let v = match &self.serial {
                    Some(s) => lock(s).read((p - SERIAL_PORT_BASE) as u8),
                    None => 0xff,
                };
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            ACPI_SLEEP_PORT => data.fill(0),
            // i8042 status: input buffer empty, so a reboot through the
            // keyboard controller does not wait.
            I8042_COMMAND_PORT => data.fill(0),
            p if (0xcf8..0xd00).contains(&p) => self.devices.pio_read(p, data),
            _ => data.fill(0xff),
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let first = data.first().copied().unwrap_or(0);
        match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + 8).contains(&p) => {
                if let Some(s) = &self.serial {
                    lock(s).write((p - SERIAL_PORT_BASE) as u8, first);
                }
            }
            ACPI_SLEEP_PORT => {
                if let Some(PowerEvent::PowerOff) = acpi_power::sleep_control_write(first) {
                    self.request_exit(ExitReason::PowerOff);
                }
            }
            // Reset through the keyboard controller (pulse reset line) or
            // the PCI reset control register at 0xCF9.
            I8042_COMMAND_PORT if first == I8042_RESET_CMD => self.request_exit(ExitReason::Reset),
            PCI_RESET_CONTROL_PORT if data.len() == 1 => {
                if first & PCI_RESET_CPU != 0 {
                    self.request_exit(ExitReason::Reset);
                }
            }
            ACPI_RESET_PORT => {
                if let Some(PowerEvent::Reset) = acpi_power::reset_write(first) {
                    self.request_exit(ExitReason::Reset);
                }
            }
            p if (0xcf8..0xd00).contains(&p) => self.devices.pio_write(p, data),
            p => log::debug!("ignored write of {data:x?} to I/O port {p:#x}"),
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if (PCI_ECAM_START..PCI_ECAM_START + PCI_ECAM_SIZE).contains(&addr) {
            self.devices.ecam_read(addr - PCI_ECAM_START, data);
        } else if !self.devices.mmio_read(addr, data) {
            data.fill(0xff);
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if (PCI_ECAM_START..PCI_ECAM_START + PCI_ECAM_SIZE).contains(&addr) {
            self.devices.ecam_write(addr - PCI_ECAM_START, data);
        } else {
            self.devices.mmio_write(addr, data);
        }
    }
}
