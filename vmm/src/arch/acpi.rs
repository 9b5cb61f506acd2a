//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT, MCFG and a DSDT
//! with the PCIe host bridge and COM1, built with the `acpi_tables` crate.

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::viot::{PciDevice, PciRange, VirtIoPciIommu, VIOT};
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress};
use vm_migration::GuestMemoryMmap;

use super::layout::*;

const OEM_ID: [u8; 6] = *b"CLOUDH";
const OEM_TABLE_ID: [u8; 8] = *b"VIRTPF  ";
const OEM_REVISION: u32 = 1;

#[derive(Debug, Error)]
pub enum AcpiError {
    #[error("ACPI tables need {0} bytes, more than the {ACPI_MAX_SIZE} reserved for them")]
    TooLarge(u64),
    #[error("cannot write ACPI tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// What the tables describe.
pub struct AcpiConfig {
    pub cpus: u8,
    /// End (exclusive) of the 64-bit PCI MMIO window.
    pub mmio64: (u64, u64),
    /// A virtio-iommu (its routing ID) and the ranges of routing IDs it
    /// translates, `(first, last)`: described by a VIOT table.
    pub viot: Option<(pci::Bdf, Vec<(pci::Bdf, pci::Bdf)>)>,
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT: `\_SB.PCI0` (PNP0A08) with bus range and windows, `\_SB.COM1`,
/// `\_S5_`, and the power button behind the GED (`\_SB.PWRB`, `\_SB.GED_`).
pub fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let bus = AddressSpace::<u16>::new_bus_number(0, (PCI_BUS_COUNT - 1) as u16);
    let cf8 = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        cfg.mmio64.0,
        cfg.mmio64.1 - 1,
        None,
    );
    let pci_crs = aml::ResourceTemplate::new(vec![&bus, &cf8, &mmio32, &mmio64]);
    let pci_hid = aml::EISAName::new("PNP0A08");
    let pci_cid = aml::EISAName::new("PNP0A03");
    let zero = aml::ZERO;
    let hid = aml::Name::new("_HID".into(), &pci_hid);
    let cid = aml::Name::new("_CID".into(), &pci_cid);
    let adr = aml::Name::new("_ADR".into(), &zero);
    let seg = aml::Name::new("_SEG".into(), &zero);
    let uid = aml::Name::new("_UID".into(), &zero);
    let bbn = aml::Name::new("_BBN".into(), &zero);
    let crs = aml::Name::new("_CRS".into(), &pci_crs);
    let pci0 = aml::Device::new(
        "_SB_.PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs],
    );
    let com_hid = aml::EISAName::new("PNP0501");
    let com_io = aml::IO::new(SERIAL_PORT_BASE, SERIAL_PORT_BASE, 1, 8);
    let com_irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com_crs = aml::ResourceTemplate::new(vec![&com_io, &com_irq]);
    let com_hid_name = aml::Name::new("_HID".into(), &com_hid);
    let com_uid = aml::Name::new("_UID".into(), &zero);
    let com_crs_name = aml::Name::new("_CRS".into(), &com_crs);
    let com1 = aml::Device::new(
        "_SB_.COM1".into(),
        vec![&com_hid_name, &com_uid, &com_crs_name],
    );
    let s5_type = ACPI_S5_SLEEP_TYPE;
    let s5_pkg = aml::Package::new(vec![&s5_type]);
    let s5 = aml::Name::new("_S5_".into(), &s5_pkg);

    let mut body = Vec::new();
    pci0.to_aml_bytes(&mut body);
    com1.to_aml_bytes(&mut body);
    s5.to_aml_bytes(&mut body);
    crate::devices::ged::dsdt_aml(&mut body);

    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&body);
    table.update_checksum();
    table.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    b.reset_reg = GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_RESET_PORT as u64,
    );
    b.reset_value = ACPI_RESET_VALUE;
    // IA-PC boot architecture flags: no VGA (bit 2), no CMOS RTC (bit 5),
    // so Linux does not probe hardware this machine lacks.
    b.iapc_boot_arch = ((1u16 << 2) | (1u16 << 5)).into();
    let sleep = GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_SLEEP_PORT as u64,
    );
    b.sleep_control_reg = sleep;
    b.sleep_status_reg = sleep;
    to_bytes(&b.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for i in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    to_bytes(&m)
}

/// The VIOT: one virtio-iommu PCI node, and one PCI range node per range
/// of endpoints it translates (endpoint ID = routing ID).
fn viot(iommu: pci::Bdf, ranges: &[(pci::Bdf, pci::Bdf)]) -> Vec<u8> {
    let dev = |b: pci::Bdf| PciDevice::new(0, b.bus(), b.device(), b.function());
    let mut v = VIOT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let handle = v.add_virtio_pci_iommu(VirtIoPciIommu::new(dev(iommu)));
    for &(first, last) in ranges {
        v.add_pci_range(PciRange::new(dev(first), dev(last), &handle));
    }
    to_bytes(&v)
}

fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(PCI_ECAM_START, 0, 0, (PCI_BUS_COUNT - 1) as u8);
    to_bytes(&m)
}

/// Writes all tables at [`ACPI_START`], RSDP first. Returns the RSDP address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = ACPI_START.unchecked_add(64);
    let mut place = |bytes: &[u8]| -> Result<GuestAddress, AcpiError> {
        let at = next;
        let end = at.raw_value() + bytes.len() as u64;
        if end > ACPI_START.raw_value() + ACPI_MAX_SIZE {
            return Err(AcpiError::TooLarge(end - ACPI_START.raw_value()));
        }
        mem.write_slice(bytes, at)?;
        next = GuestAddress((end + 15) & !15);
        Ok(at)
    };
    let dsdt_addr = place(&dsdt(cfg))?;
    let fadt_addr = place(&fadt(dsdt_addr.raw_value()))?;
    let madt_addr = place(&madt(cfg.cpus))?;
    let mcfg_addr = place(&mcfg())?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for a in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(a.raw_value());
    }
    if let Some((iommu, ranges)) = &cfg.viot {
        xsdt.add_entry(place(&viot(*iommu, ranges))?.raw_value());
    }
    let xsdt_addr = place(&to_bytes(&xsdt))?;
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr.raw_value());
    mem.write_slice(&to_bytes(&rsdp), rsdp_addr)?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut v = vec![0u8; len as usize];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn tables_have_valid_checksums_and_links() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let cfg = AcpiConfig {
            cpus: 2,
            mmio64: (PCI_MMIO64_START, PCI_MMIO64_START + PCI_MMIO64_SIZE),
            viot: None,
        };
        let rsdp = create_acpi_tables(&mem, &cfg).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert!(checksum_ok(&r[0..20]), "RSDP v1 checksum");
        assert!(checksum_ok(&r), "RSDP extended checksum");
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let mut sigs = Vec::new();
        for chunk in xsdt[36..].chunks(8) {
            let a = u64::from_le_bytes(chunk.try_into().unwrap());
            let t = table_at(&mem, a);
            assert!(checksum_ok(&t), "checksum of {:?}", &t[0..4]);
            sigs.push(t[0..4].to_vec());
            if &t[0..4] == b"FACP" {
                // X_DSDT at offset 140.
                let dsdt = u64::from_le_bytes(t[140..148].try_into().unwrap());
                let d = table_at(&mem, dsdt);
                assert_eq!(&d[0..4], b"DSDT");
                assert!(checksum_ok(&d));
                // Flags at offset 112: HW_REDUCED_ACPI (bit 20).
                let flags = u32::from_le_bytes(t[112..116].try_into().unwrap());
                assert_ne!(flags & (1 << 20), 0);
                // IAPC_BOOT_ARCH at offset 109: no CMOS RTC.
                assert_ne!(t[109] & (1 << 5), 0);
                // Sleep control register at offset 244: I/O port.
                assert_eq!(t[244], 1);
                assert_eq!(
                    u64::from_le_bytes(t[248..256].try_into().unwrap()),
                    ACPI_SLEEP_PORT as u64
                );
            }
            if &t[0..4] == b"APIC" {
                // Two local APIC entries (type 0) and one IOAPIC (type 1).
                let mut off = 44;
                let mut lapics = 0;
                let mut ioapics = 0;
                while off < t.len() {
                    match t[off] {
                        0 => lapics += 1,
                        1 => ioapics += 1,
                        _ => {}
                    }
                    off += t[off + 1] as usize;
                }
                assert_eq!((lapics, ioapics), (2, 1));
            }
            if &t[0..4] == b"MCFG" {
                let base = u64::from_le_bytes(t[44..52].try_into().unwrap());
                assert_eq!(base, PCI_ECAM_START);
                assert_eq!(t[55], (PCI_BUS_COUNT - 1) as u8);
            }
        }
        assert_eq!(
            sigs,
            vec![b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]
        );
    }

    #[test]
    fn viot_describes_the_iommu_and_its_endpoint_ranges() {
        use pci::Bdf;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let ranges = vec![
            (Bdf::new(0, 2, 0), Bdf::new(0, 2, 0)),
            (Bdf::new(0, 4, 0), Bdf::new(0, 5, 3)),
        ];
        let cfg = AcpiConfig {
            cpus: 1,
            mmio64: (PCI_MMIO64_START, PCI_MMIO64_START + PCI_MMIO64_SIZE),
            viot: Some((Bdf::new(0, 1, 0), ranges)),
        };
        let rsdp = create_acpi_tables(&mem, &cfg).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        let xsdt = table_at(&mem, u64::from_le_bytes(r[24..32].try_into().unwrap()));
        let last = u64::from_le_bytes(xsdt[xsdt.len() - 8..].try_into().unwrap());
        let t = table_at(&mem, last);
        assert_eq!(&t[0..4], b"VIOT");
        assert!(checksum_ok(&t), "VIOT checksum");
        let u16_at = |o: usize| u16::from_le_bytes([t[o], t[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(t[o..o + 4].try_into().unwrap());
        assert_eq!(u16_at(36), 3, "node count");
        let first = usize::from(u16_at(38));
        assert_eq!(first, 48);
        // The virtio-iommu PCI node (type 3, 16 bytes) at 00:01.0.
        assert_eq!((t[first], u16_at(first + 2)), (3, 16));
        assert_eq!(u16_at(first + 6), 0x08);
        // Two PCI range nodes (type 1, 24 bytes) pointing at it.
        for (k, (lo, hi)) in [(0x10u16, 0x10u16), (0x20, 0x2b)].into_iter().enumerate() {
            let n = first + 16 + 24 * k;
            assert_eq!((t[n], u16_at(n + 2)), (1, 24), "range node {k}");
            assert_eq!(u32_at(n + 4), u32::from(lo), "endpoint start = routing ID");
            assert_eq!((u16_at(n + 12), u16_at(n + 14)), (lo, hi));
            assert_eq!(usize::from(u16_at(n + 16)), first, "output node");
        }
        assert_eq!(t.len(), first + 16 + 48);
    }

    #[test]
    fn dsdt_names_host_bridge_and_com1() {
        let cfg = AcpiConfig {
            cpus: 1,
            mmio64: (PCI_MMIO64_START, PCI_MMIO64_START + PCI_MMIO64_SIZE),
            viot: None,
        };
        let d = dsdt(&cfg);
        let find = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"PCI0"));
        assert!(find(b"COM1"));
        assert!(find(b"_S5_"));
        // EISA id of PNP0A08 compressed: 0x41d0 0x0a08.
        assert!(find(&[0x41, 0xd0, 0x0a, 0x08]));
    }
}
