//! The ACPI hardware-reduced sleep control/status register and reset
//! register: how the guest powers off or reboots.

use crate::arch::layout::{ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE};

/// SLP_EN in the sleep control register.
const SLP_EN: u8 = 1 << 5;

/// What a write to the ACPI registers asks of the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEvent {
    PowerOff,
    Reset,
}

/// Decodes a write to the sleep control register.
pub fn sleep_control_write(value: u8) -> Option<PowerEvent> {
    let slp_typ = (value >> 2) & 0x7;
    if value & SLP_EN != 0 && slp_typ == ACPI_S5_SLEEP_TYPE {
        Some(PowerEvent::PowerOff)
    } else {
        None
    }
}

/// Decodes a write to the reset register.
pub fn reset_write(value: u8) -> Option<PowerEvent> {
    (value == ACPI_RESET_VALUE).then_some(PowerEvent::Reset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off() {
        assert_eq!(
            sleep_control_write((5 << 2) | SLP_EN),
            Some(PowerEvent::PowerOff)
        );
        assert_eq!(sleep_control_write(5 << 2), None);
        assert_eq!(sleep_control_write((3 << 2) | SLP_EN), None);
        assert_eq!(reset_write(ACPI_RESET_VALUE), Some(PowerEvent::Reset));
        assert_eq!(reset_write(0), None);
    }
}
