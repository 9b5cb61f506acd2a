//! Vendor-specific capabilities of a modern virtio-pci function
//! (`struct virtio_pci_cap`, virtio 1.3 §4.1.4).
//!
//! ```text
//! u8 cap_vndr (0x09); u8 cap_next; u8 cap_len; u8 cfg_type; u8 bar; u8 id;
//! u8 padding[2]; le32 offset; le32 length;
//! notify:  + le32 notify_off_multiplier          (cap_len 20)
//! pci_cfg: + u8 pci_cfg_data[4]                  (cap_len 20)
//! ```

/// Capability ID of vendor-specific capabilities.
pub const PCI_CAP_ID_VNDR: u8 = 0x09;

/// `cfg_type` values.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// Offsets inside a virtio capability, from its first byte.
pub const CAP_LEN: u16 = 2;
pub const CAP_CFG_TYPE: u16 = 3;
pub const CAP_BAR: u16 = 4;
pub const CAP_ID: u16 = 5;
pub const CAP_OFFSET: u16 = 8;
pub const CAP_LENGTH: u16 = 12;
pub const CAP_NOTIFY_OFF_MULTIPLIER: u16 = 16;
pub const CAP_PCI_CFG_DATA: u16 = 16;

/// One `virtio_pci_cap` as placed in configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioPciCap {
    pub cfg_type: u8,
    pub bar: u8,
    pub id: u8,
    pub offset: u32,
    pub length: u32,
    /// `notify_off_multiplier` for the notify capability.
    pub notify_off_multiplier: Option<u32>,
}

impl VirtioPciCap {
    /// Total capability length (`cap_len`).
    pub fn cap_len(&self) -> u8 {
        if self.notify_off_multiplier.is_some() || self.cfg_type == VIRTIO_PCI_CAP_PCI_CFG {
            20
        } else {
            16
        }
    }

    /// The capability bytes after ID and next pointer, and the guest write
    /// mask of those bytes (only the pci_cfg capability has writable
    /// fields: bar, offset, length and data).
    pub fn body_and_mask(&self) -> (Vec<u8>, Vec<u8>) {
        let mut b = vec![self.cap_len(), self.cfg_type, self.bar, self.id, 0, 0];
        b.extend_from_slice(&self.offset.to_le_bytes());
        b.extend_from_slice(&self.length.to_le_bytes());
        if let Some(m) = self.notify_off_multiplier {
            b.extend_from_slice(&m.to_le_bytes());
        }
        let mut mask = Vec::new();
        if self.cfg_type == VIRTIO_PCI_CAP_PCI_CFG {
            b.extend_from_slice(&[0; 4]);
            // Body offsets are capability offsets minus 2.
            mask = vec![0u8; b.len()];
            mask[usize::from(CAP_BAR) - 2] = 0xff;
            for m in &mut mask[usize::from(CAP_OFFSET) - 2..] {
                *m = 0xff;
            }
        }
        (b, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        let cap = VirtioPciCap {
            cfg_type: VIRTIO_PCI_CAP_NOTIFY_CFG,
            bar: 0,
            id: 0,
            offset: 0x3000,
            length: 0x1000,
            notify_off_multiplier: Some(4),
        };
        let (b, m) = cap.body_and_mask();
        assert_eq!(b.len(), 18);
        assert_eq!(b[0], 20);
        assert_eq!(b[1], 2);
        assert_eq!(&b[6..10], &0x3000u32.to_le_bytes());
        assert_eq!(&b[14..18], &4u32.to_le_bytes());
        assert!(m.is_empty());

        let cap = VirtioPciCap {
            cfg_type: VIRTIO_PCI_CAP_PCI_CFG,
            bar: 0,
            id: 0,
            offset: 0,
            length: 0,
            notify_off_multiplier: None,
        };
        let (b, m) = cap.body_and_mask();
        assert_eq!(b.len(), 18);
        assert_eq!(m.len(), 18);
        assert_eq!(m[2], 0xff);
        assert_eq!(m[3], 0);
        assert!(m[6..].iter().all(|&x| x == 0xff));
    }
}
