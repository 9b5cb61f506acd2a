//! Where vCPU exits go: the I/O port and MMIO address map of the machine,
//! and the VM's exit request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::*;
use crate::device_manager::DeviceManager;
use crate::devices::acpi_power::{self, PowerEvent};
use crate::devices::ged::Ged;
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
    ged: Option<Ged>,
    devices: Arc<DeviceManager>,
    exit_evt: EventFd,
    exit_flag: AtomicBool,
    exit_reason: Mutex<Option<ExitReason>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Platform {
    pub fn new(
        serial: Option<SerialPort>,
        ged: Option<Ged>,
        devices: DeviceManager,
        exit_evt: EventFd,
    ) -> Self {
        Platform {
            serial: serial.map(Mutex::new),
            ged,
            devices: Arc::new(devices),
            exit_evt,
            exit_flag: AtomicBool::new(false),
            exit_reason: Mutex::new(None),
        }
    }

    /// The Generic Event Device, when the machine has one.
    pub fn ged(&self) -> Option<&Ged> {
        self.ged.as_ref()
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

    /// COM1's registers and pending input (a snapshot; the VM is paused).
    pub fn serial_snapshot(
        &self,
    ) -> Result<Option<crate::devices::serial::SerialSnapshot>, vm_migration::MigratableError> {
        self.serial
            .as_ref()
            .map(|s| vm_migration::Snapshottable::snapshot(&*lock(s)))
            .transpose()
    }

    /// Puts COM1 in a saved state (restore; the VM has not started).
    pub fn restore_serial(
        &self,
        state: &crate::devices::serial::SerialSnapshot,
    ) -> Result<(), vm_migration::MigratableError> {
        match &self.serial {
            Some(s) => vm_migration::Snapshottable::restore(&mut *lock(s), state),
            None => Ok(()),
        }
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
            GED_PORT => {
                let v = self.ged.as_ref().map_or(0, Ged::read);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use pci::{Bdf, FunctionChange, PciDevice};

    use super::*;
    use crate::device_manager::IoEvents;
    use crate::firmware::BarAllocator;

    struct NoIoEvents;
    impl IoEvents for NoIoEvents {
        fn register(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn unregister(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Configuration space with a vendor/device ID and a scratch register.
    struct Ids {
        scratch: u32,
    }
    impl PciDevice for Ids {
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            let v: u32 = match offset & !3 {
                0 => 0x1234_1af4,
                0x40 => self.scratch,
                _ => 0,
            };
            let b = v.to_le_bytes();
            let o = usize::from(offset & 3);
            for (i, d) in data.iter_mut().enumerate() {
                *d = b.get(o + i).copied().unwrap_or(0);
            }
        }
        fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<FunctionChange> {
            if offset == 0x40 && data.len() == 4 {
                self.scratch = u32::from_le_bytes(data.try_into().unwrap());
            }
            None
        }
        fn decoded_bars(&self) -> Vec<pci::BarRange> {
            vec![]
        }
        fn bar_read(&mut self, _: u8, _: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn platform(serial: Option<Sink>) -> Platform {
        let alloc = BarAllocator::new(
            (PCI_MMIO32_START, PCI_MMIO32_SIZE),
            (0x100_0000_0000, 0x10_0000_0000),
        )
        .unwrap();
        let dm = DeviceManager::new(Arc::new(NoIoEvents), alloc).unwrap();
        dm.add_function(Bdf::new(0, 2, 0), Arc::new(Mutex::new(Ids { scratch: 0 })))
            .unwrap();
        let serial =
            serial.map(|s| SerialPort::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), Box::new(s)));
        Platform::new(serial, None, dm, EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    fn inb(p: &Platform, port: u16) -> u8 {
        let mut b = [0u8; 1];
        p.pio_read(port, &mut b);
        b[0]
    }

    #[test]
    fn acpi_s5_powers_off_and_the_first_reason_wins() {
        let p = platform(None);
        assert!(!p.exit_requested());
        // S5 without SLP_EN, and another sleep type: nothing.
        p.pio_write(ACPI_SLEEP_PORT, &[5 << 2]);
        p.pio_write(ACPI_SLEEP_PORT, &[(3 << 2) | (1 << 5)]);
        assert!(!p.exit_requested());
        assert_eq!(p.exit_evt.read().ok(), None);
        p.pio_write(ACPI_SLEEP_PORT, &[(5 << 2) | (1 << 5)]);
        assert!(p.exit_requested());
        assert_eq!(p.exit_reason(), Some(ExitReason::PowerOff));
        assert_eq!(p.exit_evt.read().unwrap(), 1);
        // A reset after the power off does not replace it.
        p.pio_write(ACPI_RESET_PORT, &[ACPI_RESET_VALUE]);
        assert_eq!(p.exit_reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn every_reset_path_requests_a_reset_and_near_misses_do_not() {
        let near_misses: [(u16, &[u8]); 4] = [
            (PCI_RESET_CONTROL_PORT, &[0x2]),
            // A 2-byte access at 0xCF9 is not the reset register.
            (PCI_RESET_CONTROL_PORT, &[PCI_RESET_CPU, 0]),
            (I8042_COMMAND_PORT, &[0xfd]),
            (ACPI_RESET_PORT, &[ACPI_RESET_VALUE + 1]),
        ];
        for (port, data) in near_misses {
            let p = platform(None);
            p.pio_write(port, data);
            assert!(!p.exit_requested(), "{port:#x} {data:x?}");
        }
        let hits: [(u16, &[u8]); 3] = [
            (PCI_RESET_CONTROL_PORT, &[PCI_RESET_CPU | 0x2]),
            (I8042_COMMAND_PORT, &[I8042_RESET_CMD]),
            (ACPI_RESET_PORT, &[ACPI_RESET_VALUE]),
        ];
        for (port, data) in hits {
            let p = platform(None);
            p.pio_write(port, data);
            assert_eq!(p.exit_reason(), Some(ExitReason::Reset), "{port:#x}");
        }
    }

    #[test]
    fn config_mechanism_1_and_ecam_reach_the_same_function() {
        let p = platform(None);
        let addr = |reg: u32| (0x8000_0000u32 | (2 << 11) | reg).to_le_bytes();
        p.pio_write(0xcf8, &addr(0));
        let mut id = [0u8; 4];
        p.pio_read(0xcfc, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1234_1af4);
        // Write through ECAM, read back through 0xCF8/0xCFC.
        let ecam = PCI_ECAM_START + (2 << 15) + 0x40;
        p.mmio_write(ecam, &0xdead_beefu32.to_le_bytes());
        p.pio_write(0xcf8, &addr(0x40));
        p.pio_read(0xcfc, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0xdead_beef);
        // An empty slot and unmapped MMIO read all ones.
        let mut v = [0u8; 4];
        p.mmio_read(PCI_ECAM_START + (9 << 15), &mut v);
        assert_eq!(v, [0xff; 4]);
        p.mmio_read(PCI_MMIO32_START + 0x10_0000, &mut v);
        assert_eq!(v, [0xff; 4]);
        // Unknown ports read all ones; the i8042 status reads 0.
        assert_eq!(inb(&p, 0x80), 0xff);
        assert_eq!(inb(&p, I8042_COMMAND_PORT), 0);
    }

    #[test]
    fn the_serial_port_writes_out_and_takes_input() {
        let out = Sink::default();
        let p = platform(Some(out.clone()));
        for b in b"hi" {
            p.pio_write(SERIAL_PORT_BASE, &[*b]);
        }
        assert_eq!(&*lock(&out.0), b"hi");
        // Line status: no data yet, then data ready after input.
        assert_eq!(inb(&p, SERIAL_PORT_BASE + 5) & 1, 0);
        p.serial_input(b"x");
        assert_eq!(inb(&p, SERIAL_PORT_BASE + 5) & 1, 1);
        assert_eq!(inb(&p, SERIAL_PORT_BASE), b'x');
        // Without a serial port, its registers read 0xff.
        let q = platform(None);
        assert_eq!(inb(&q, SERIAL_PORT_BASE + 5), 0xff);
    }
}
