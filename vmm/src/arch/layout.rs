//! The guest physical address map.
//!
//! ```text
//! 0x0000_0500  GDT                       0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top            0x0000_9000  PML4, PDPT, 4 page directories
//! 0x0002_0000  kernel command line       0x0009_fc00  EBDA (reserved) .. 1 MiB
//! 0x000e_0000  RSDP and ACPI tables      0x0010_0000  kernel, then RAM
//! 0xc000_0000  32-bit PCI MMIO window    0xe000_0000  ECAM (256 buses)
//! 0xfec0_0000  IOAPIC                    0xfee0_0000  local APIC
//! 4 GiB        RAM above the 32-bit hole
//! 64 GiB       64-bit PCI MMIO window (64 GiB)
//! ```

use vm_memory::GuestAddress;

pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: GuestAddress = GuestAddress(0xe0000);
pub const ACPI_MAX_SIZE: u64 = 0x20000;
pub const HIGH_RAM_START: GuestAddress = GuestAddress(0x100000);

/// Start of the hole below 4 GiB for MMIO, where low RAM ends.
pub const MEM_32BIT_RESERVED_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Buses covered by ECAM, MCFG and the host bridge.
pub const PCI_BUS_COUNT: u64 = 256;
pub const PCI_ECAM_SIZE: u64 = PCI_BUS_COUNT << 20;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
pub const RAM_64BIT_START: u64 = 1 << 32;
pub const PCI_MMIO64_START: u64 = 64 << 30;
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;

/// The 64-bit PCI window `(start, end)`: at 64 GiB, or above RAM when RAM
/// reaches that far (aligned to 1 GiB).
pub fn pci_mmio64_window(mem_size: u64) -> (u64, u64) {
    let ram_end = ram_ranges(mem_size)
        .last()
        .map(|(a, s)| a.0 + s)
        .unwrap_or(0);
    let start = PCI_MMIO64_START.max((ram_end + (1 << 30) - 1) & !((1 << 30) - 1));
    (start, start + PCI_MMIO64_SIZE)
}

/// I/O ports.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// ACPI hardware-reduced sleep control/status register.
pub const ACPI_SLEEP_PORT: u16 = 0x3c0;
/// ACPI reset register.
pub const ACPI_RESET_PORT: u16 = 0x3c1;
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// Status register of the ACPI Generic Event Device (one byte, read clears).
pub const GED_PORT: u16 = 0x3c4;
/// The GED's interrupt (ISA-style: edge, active high).
pub const GED_IRQ: u32 = 5;
/// i8042 command/status port and its "pulse reset line" command.
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const I8042_RESET_CMD: u8 = 0xfe;
/// PCI reset control register and its "reset CPU" bit.
pub const PCI_RESET_CONTROL_PORT: u16 = 0xcf9;
pub const PCI_RESET_CPU: u8 = 1 << 2;
/// Sleep type of S5 that the DSDT's `_S5_` gives, as written to the sleep
/// control register (SLP_TYP in bits 4:2, SLP_EN bit 5).
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;

// The fixed windows below 4 GiB must not overlap.
const _: () = assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);

/// The guest RAM ranges for `size` bytes of memory.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MEM_32BIT_RESERVED_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MEM_32BIT_RESERVED_START),
            (
                GuestAddress(RAM_64BIT_START),
                size - MEM_32BIT_RESERVED_START,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_split_around_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
        assert_eq!(r[1].0, GuestAddress(RAM_64BIT_START));
    }

    #[test]
    fn windows_do_not_overlap() {
        assert_eq!(pci_mmio64_window(512 << 20).0, PCI_MMIO64_START);
        let (start, _) = pci_mmio64_window(100 << 30);
        assert!(start >= RAM_64BIT_START + (100 << 30) - MEM_32BIT_RESERVED_START);
        assert_eq!(start % (1 << 30), 0);
    }
}
