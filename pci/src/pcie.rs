//! The PCI Express Capability (ID 0x10), version 2, for an endpoint.
//!
//! Layout (offsets from the capability):
//! 0x00 ID/next, 0x02 PCIe Capabilities, 0x04 Device Capabilities,
//! 0x08 Device Control, 0x0A Device Status, 0x0C Link Capabilities,
//! 0x10 Link Control, 0x12 Link Status, 0x14..0x24 slot/root registers
//! (zero for an endpoint), 0x24 Device Capabilities 2, 0x28 Device
//! Control 2, 0x2A Device Status 2, 0x2C Link Capabilities 2, 0x30 Link
//! Control 2, 0x32 Link Status 2, 0x34..0x3C slot 2 registers. 0x3C bytes.
//!
//! Initiate Function Level Reset (Device Control bit 15) always reads 0; an
//! owner learns of a request with [`PcieCapability::flr_requested`] on the
//! data of each configuration write.

use crate::configuration::{ConfigError, PciConfiguration};

/// Capability ID of the PCI Express Capability.
pub const PCIE_CAPABILITY_ID: u8 = 0x10;
/// Bytes of a version 2 PCI Express Capability, header included.
pub const PCIE_CAPABILITY_SIZE: usize = 0x3c;

pub const PCIE_CAPABILITIES: u16 = 0x02;
pub const PCIE_DEVICE_CAPABILITIES: u16 = 0x04;
pub const PCIE_DEVICE_CONTROL: u16 = 0x08;
pub const PCIE_DEVICE_STATUS: u16 = 0x0a;
pub const PCIE_LINK_CAPABILITIES: u16 = 0x0c;
pub const PCIE_LINK_CONTROL: u16 = 0x10;
pub const PCIE_LINK_STATUS: u16 = 0x12;
pub const PCIE_DEVICE_CAPABILITIES_2: u16 = 0x24;
pub const PCIE_DEVICE_CONTROL_2: u16 = 0x28;
pub const PCIE_LINK_CAPABILITIES_2: u16 = 0x2c;
pub const PCIE_LINK_CONTROL_2: u16 = 0x30;
pub const PCIE_LINK_STATUS_2: u16 = 0x32;

/// Device Capabilities: Role-Based Error Reporting.
pub const DEVCAP_ROLE_BASED_ERROR: u32 = 1 << 15;
/// Device Capabilities: Function Level Reset Capability.
pub const DEVCAP_FLR: u32 = 1 << 28;
/// Device Control: Initiate Function Level Reset.
pub const DEVCTL_INITIATE_FLR: u16 = 1 << 15;
/// Device Control bits the guest may change: error reporting enables (3:0),
/// relaxed ordering (4), max payload size (7:5), extended tag (8), phantom
/// functions (9), aux power PM (10), no snoop (11), max read request (14:12).
pub const DEVCTL_WRITABLE: u16 = 0x7fff;
/// Device Control after reset: relaxed ordering, no snoop, 512-byte max
/// read request, 128-byte max payload.
pub const DEVCTL_DEFAULT: u16 = (1 << 4) | (1 << 11) | (0b010 << 12);
/// Device Status bits 3:0 (error detected) are write-1-to-clear.
pub const DEVSTA_W1C: u16 = 0xf;

/// Device/Port Type field values (PCIe Capabilities bits 7:4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PcieDeviceType {
    Endpoint = 0x0,
    LegacyEndpoint = 0x1,
    RootComplexIntegratedEndpoint = 0x9,
}

/// Builds a PCI Express Capability.
#[derive(Clone, Debug)]
pub struct PcieCapabilityBuilder {
    device_type: PcieDeviceType,
    flr: bool,
    /// Max_Payload_Size Supported encoding (0 = 128 bytes).
    max_payload_supported: u8,
    /// Interrupt Message Number (PCIe Capabilities bits 13:9).
    interrupt_message_number: u8,
}

impl Default for PcieCapabilityBuilder {
    fn default() -> Self {
        Self::endpoint()
    }
}

impl PcieCapabilityBuilder {
    /// A PCI Express Endpoint, x1 link at 2.5 GT/s, no FLR.
    pub fn endpoint() -> Self {
        PcieCapabilityBuilder {
            device_type: PcieDeviceType::Endpoint,
            flr: false,
            max_payload_supported: 0,
            interrupt_message_number: 0,
        }
    }

    pub fn device_type(mut self, t: PcieDeviceType) -> Self {
        self.device_type = t;
        self
    }

    /// Advertise Function Level Reset (Device Capabilities bit 28).
    pub fn flr(mut self, flr: bool) -> Self {
        self.flr = flr;
        self
    }

    /// Max_Payload_Size Supported encoding (0..=5: 128..4096 bytes).
    pub fn max_payload_supported(mut self, encoding: u8) -> Self {
        self.max_payload_supported = encoding.min(5);
        self
    }

    pub fn interrupt_message_number(mut self, n: u8) -> Self {
        self.interrupt_message_number = n & 0x1f;
        self
    }

    /// The capability body (bytes after ID/next, 0x3A of them) and its guest
    /// write mask.
    pub fn body_and_mask(&self) -> (Vec<u8>, Vec<u8>) {
        let len = PCIE_CAPABILITY_SIZE - 2;
        let mut body = vec![0u8; len];
        let mut mask = vec![0u8; len];
        let put16 = |b: &mut Vec<u8>, off: u16, v: u16| {
            let i = off as usize - 2;
            b[i..i + 2].copy_from_slice(&v.to_le_bytes());
        };
        let put32 = |b: &mut Vec<u8>, off: u16, v: u32| {
            let i = off as usize - 2;
            b[i..i + 4].copy_from_slice(&v.to_le_bytes());
        };
        let caps: u16 =
            2 | ((self.device_type as u16) << 4) | (u16::from(self.interrupt_message_number) << 9);
        put16(&mut body, PCIE_CAPABILITIES, caps);
        let mut devcap = u32::from(self.max_payload_supported) | DEVCAP_ROLE_BASED_ERROR;
        if self.flr {
            devcap |= DEVCAP_FLR;
        }
        put32(&mut body, PCIE_DEVICE_CAPABILITIES, devcap);
        put16(&mut body, PCIE_DEVICE_CONTROL, DEVCTL_DEFAULT);
        put16(&mut mask, PCIE_DEVICE_CONTROL, DEVCTL_WRITABLE);
        if self.device_type != PcieDeviceType::RootComplexIntegratedEndpoint {
            // Max link speed 2.5 GT/s (vector bit 0), max width x1.
            put32(&mut body, PCIE_LINK_CAPABILITIES, 1 | (1 << 4));
            // Link Control: ASPM control (1:0), RCB (3), common clock (6),
            // extended synch (7).
            put16(&mut mask, PCIE_LINK_CONTROL, 0x00cb);
            // Current speed 2.5 GT/s, negotiated width x1.
            put16(&mut body, PCIE_LINK_STATUS, 1 | (1 << 4));
            // Supported Link Speeds Vector: 2.5 GT/s.
            put32(&mut body, PCIE_LINK_CAPABILITIES_2, 1 << 1);
            // Link Control 2: target link speed 2.5 GT/s.
            put16(&mut body, PCIE_LINK_CONTROL_2, 1);
        }
        // Device Capabilities 2 advertises nothing (no completion timeout
        // ranges, no timeout disable, no LTR/OBFF/10-bit tags), so Device
        // Control 2 is hardwired to zero.
        (body, mask)
    }

    /// Appends the capability to `config`.
    pub fn add_to(&self, config: &mut PciConfiguration) -> Result<PcieCapability, ConfigError> {
        let (body, mask) = self.body_and_mask();
        let offset = config.add_capability(PCIE_CAPABILITY_ID, &body, &mask)?;
        config.set_w1c_mask(offset + PCIE_DEVICE_STATUS, &DEVSTA_W1C.to_le_bytes())?;
        Ok(PcieCapability {
            offset,
            flr: self.flr,
        })
    }
}

/// A PCI Express Capability placed in a configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcieCapability {
    offset: u16,
    flr: bool,
}

impl PcieCapability {
    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> u16 {
        self.offset
    }

    pub fn flr_supported(&self) -> bool {
        self.flr
    }

    /// Whether a guest configuration write of `data` at `offset` sets
    /// Initiate Function Level Reset (and FLR is advertised). The bit reads
    /// as 0 afterwards, so the owner acts on this and resets the function.
    pub fn flr_requested(&self, offset: u16, data: &[u8]) -> bool {
        if !self.flr {
            return false;
        }
        // High byte of Device Control holds bit 15 as its bit 7.
        let target = u32::from(self.offset) + u32::from(PCIE_DEVICE_CONTROL) + 1;
        let start = u32::from(offset);
        target
            .checked_sub(start)
            .and_then(|i| data.get(i as usize))
            .is_some_and(|b| b & 0x80 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::PciHeaderParams;

    #[test]
    fn layout_and_size() {
        let mut c = PciConfiguration::new(&PciHeaderParams::default());
        let cap = PcieCapabilityBuilder::endpoint()
            .flr(true)
            .add_to(&mut c)
            .unwrap();
        let o = cap.offset();
        assert_eq!(o, 0x40);
        assert_eq!(c.find_capability(PCIE_CAPABILITY_ID), Some(o));
        assert_eq!(c.read_u16(o + PCIE_CAPABILITIES), 0x0002);
        let devcap = c.read_u32(o + PCIE_DEVICE_CAPABILITIES);
        assert_ne!(devcap & DEVCAP_FLR, 0);
        assert_eq!(c.read_u16(o + PCIE_DEVICE_CONTROL), DEVCTL_DEFAULT);
        assert_eq!(c.read_u16(o + PCIE_LINK_STATUS), 0x11);
        // The next capability starts right after 0x3C bytes.
        let next = c.add_capability(0x09, &[0; 2], &[]).unwrap();
        assert_eq!(next, o + PCIE_CAPABILITY_SIZE as u16);

        let mut c = PciConfiguration::new(&PciHeaderParams::default());
        let cap = PcieCapabilityBuilder::endpoint().add_to(&mut c).unwrap();
        assert_eq!(
            c.read_u32(cap.offset() + PCIE_DEVICE_CAPABILITIES) & DEVCAP_FLR,
            0
        );
        let cap = PcieCapabilityBuilder::endpoint()
            .device_type(PcieDeviceType::RootComplexIntegratedEndpoint)
            .add_to(&mut c)
            .unwrap();
        assert_eq!(c.read_u16(cap.offset() + PCIE_CAPABILITIES), 0x92);
        assert_eq!(c.read_u32(cap.offset() + PCIE_LINK_CAPABILITIES), 0);
    }

    #[test]
    fn flr_detection() {
        let mut c = PciConfiguration::new(&PciHeaderParams::default());
        c.add_capability(0x09, &[0; 6], &[]).unwrap();
        let cap = PcieCapabilityBuilder::endpoint()
            .flr(true)
            .add_to(&mut c)
            .unwrap();
        let dc = cap.offset() + PCIE_DEVICE_CONTROL;
        let v = DEVCTL_DEFAULT | DEVCTL_INITIATE_FLR;
        // 16-bit write to device control.
        assert!(cap.flr_requested(dc, &v.to_le_bytes()));
        c.write(dc, &v.to_le_bytes());
        // The bit reads as zero, the rest was written.
        assert_eq!(c.read_u16(dc), DEVCTL_DEFAULT);
        // 32-bit write of control + status, byte write of the high byte.
        let d = u32::from(v).to_le_bytes();
        assert!(cap.flr_requested(dc, &d));
        assert!(cap.flr_requested(dc + 1, &[0x80]));
        // Not set, or another register.
        assert!(!cap.flr_requested(dc, &DEVCTL_DEFAULT.to_le_bytes()));
        assert!(!cap.flr_requested(dc + 2, &[0xff, 0xff]));
        assert!(!cap.flr_requested(dc, &[0xff]));
        assert!(!cap.flr_requested(dc - 4, &[0xff; 4]));
        // Without FLR advertised the bit is ignored.
        let mut c = PciConfiguration::new(&PciHeaderParams::default());
        let cap = PcieCapabilityBuilder::endpoint().add_to(&mut c).unwrap();
        assert!(!cap.flr_requested(cap.offset() + PCIE_DEVICE_CONTROL + 1, &[0x80]));
    }

    #[test]
    fn device_status_w1c_and_control_mask() {
        let mut c = PciConfiguration::new(&PciHeaderParams::default());
        let cap = PcieCapabilityBuilder::endpoint().add_to(&mut c).unwrap();
        let ds = cap.offset() + PCIE_DEVICE_STATUS;
        c.set_u16(ds, 0b1011 | (1 << 5));
        c.write(ds, &0b0011u16.to_le_bytes());
        assert_eq!(c.read_u16(ds), 0b1000 | (1 << 5));
        // Device Control 2 is hardwired to zero (nothing advertised).
        let dc2 = cap.offset() + PCIE_DEVICE_CONTROL_2;
        c.write(dc2, &[0xff, 0xff]);
        assert_eq!(c.read_u16(dc2), 0);
        // Device capabilities are read-only.
        let dcap = cap.offset() + PCIE_DEVICE_CAPABILITIES;
        let before = c.read_u32(dcap);
        c.write(dcap, &[0xff; 4]);
        assert_eq!(c.read_u32(dcap), before);
        // Reset restores device control.
        c.write(cap.offset() + PCIE_DEVICE_CONTROL, &[0, 0]);
        assert_eq!(c.read_u16(cap.offset() + PCIE_DEVICE_CONTROL), 0);
        c.reset();
        assert_eq!(
            c.read_u16(cap.offset() + PCIE_DEVICE_CONTROL),
            DEVCTL_DEFAULT
        );
    }
}
