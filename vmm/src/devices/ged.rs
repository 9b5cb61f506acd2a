//! The ACPI Generic Event Device (GED, `ACPI0013`): how a hardware-reduced
//! machine tells its guest about a platform event, here the power button.
//!
//! The VMM latches the event in a status register and pulses the GED's
//! interrupt. The guest's GED driver runs the DSDT's `_EVT` method, which
//! reads the register (reading clears it) and, for the power button,
//! notifies `\_SB.PWRB` (`PNP0C0C`) with 0x80: Linux's ACPI button driver
//! then reports `KEY_POWER` on its input device, and whatever the guest runs
//! on it (logind, acpid) powers the guest off.

use std::sync::atomic::{AtomicU8, Ordering};

use acpi_tables::aml;
use acpi_tables::Aml;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{GED_IRQ, GED_PORT};

/// Bit of the status register: the power button was pressed.
pub const EVENT_POWER_BUTTON: u8 = 1 << 0;

/// The GED's status register and interrupt.
pub struct Ged {
    irq: EventFd,
    pending: AtomicU8,
}

impl Ged {
    /// A GED whose interrupt is `irq` (an irqfd on [`GED_IRQ`]).
    pub fn new(irq: EventFd) -> Self {
        Ged {
            irq,
            pending: AtomicU8::new(0),
        }
    }

    /// Latches `events` and interrupts the guest.
    pub fn notify(&self, events: u8) -> std::io::Result<()> {
        self.pending.fetch_or(events, Ordering::AcqRel);
        self.irq.write(1)
    }

    /// The latched events, left latched (a snapshot).
    pub fn pending(&self) -> u8 {
        self.pending.load(Ordering::Acquire)
    }

    /// Latches `events` without an interrupt (a restore: the interrupt,
    /// if the guest had not taken it, is in the restored irqchip).
    pub fn set_pending(&self, events: u8) {
        self.pending.store(events, Ordering::Release);
    }

    /// A guest read of the status register: the latched events, cleared.
    pub fn read(&self) -> u8 {
        self.pending.swap(0, Ordering::AcqRel)
    }
}

/// The DSDT part: `\_SB.PWRB` and `\_SB.GED_` with its interrupt, status
/// register and `_EVT` method.
pub fn dsdt_aml(sink: &mut Vec<u8>) {
    let zero = aml::ZERO;
    let pwrb_hid = aml::EISAName::new("PNP0C0C");
    let uid = aml::Name::new("_UID".into(), &zero);
    let pwrb_hid = aml::Name::new("_HID".into(), &pwrb_hid);
    aml::Device::new("_SB_.PWRB".into(), vec![&pwrb_hid, &uid]).to_aml_bytes(sink);

    let hid = "ACPI0013";
    let irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let port = GED_PORT as u32;
    let one = 1u8;
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemIO, &port, &one);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let local0 = aml::Local(0);
    let gdat = aml::Path::new("GDAT");
    let load = aml::Store::new(&local0, &gdat);
    let button = EVENT_POWER_BUTTON;
    let masked = aml::And::new(&aml::ZERO, &local0, &button);
    let pressed = aml::Equal::new(&masked, &button);
    let pwrb_path = aml::Path::new("\\_SB_.PWRB");
    let code = 0x80u8;
    let notify = aml::Notify::new(&pwrb_path, &code);
    let on_button = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&load, &on_button]);
    let hid = aml::Name::new("_HID".into(), &hid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    )
    .to_aml_bytes(sink);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_returns_the_latched_events_once() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ged = Ged::new(evt.try_clone().unwrap());
        assert_eq!(ged.read(), 0);
        ged.notify(EVENT_POWER_BUTTON).unwrap();
        assert_eq!(evt.read().unwrap(), 1, "the interrupt was pulsed");
        assert_eq!(ged.read(), EVENT_POWER_BUTTON);
        assert_eq!(ged.read(), 0, "reading clears the register");
        assert!(evt.read().is_err(), "no second interrupt");
    }

    #[test]
    fn the_dsdt_part_names_the_devices_and_the_method() {
        let mut v = Vec::new();
        dsdt_aml(&mut v);
        let find = |needle: &[u8]| v.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"PWRB"));
        assert!(find(b"GED_"));
        assert!(find(b"ACPI0013"));
        assert!(find(b"_EVT"));
        assert!(find(b"GDAT"));
        // EISA id of PNP0C0C compressed: 0x41d0 0x0c0c.
        assert!(find(&[0x41, 0xd0, 0x0c, 0x0c]));
        // Notify (0x86) of \_SB_.PWRB with 0x80 (a byte constant).
        assert!(find(&[
            0x86, b'\\', 0x2e, b'_', b'S', b'B', b'_', b'P', b'W', b'R', b'B', 0x0a, 0x80
        ]));
    }
}
