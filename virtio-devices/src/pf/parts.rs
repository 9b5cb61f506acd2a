//! Device parts (virtio 1.4, "Device parts"): the second encoding of a
//! member's state, used by the `virtio-1.4` admin dialect
//! ([`super::v14`]).
//!
//! The same [`MemberContext`] the draft dialect streams as TLV fields is
//! emitted here as a list of parts in the specification's mandatory order:
//!
//! | type | part | instances | value |
//! |---|---|---|---|
//! | 0x100 | DEV_FEATURES (optional) | 1 | `le64` offered device features |
//! | 0x101 | DRV_FEATURES | 1 | `le64` features the driver wrote |
//! | 0x102 | PCI_COMMON_CFG | one per offset 0, 8, 16, 18, 22 | that common-cfg field |
//! | 0x103 | DEVICE_STATUS | 1 | `u8` |
//! | 0x104 | VQ_CFG | one per queue | size, vector, enabled, desc, driver, device (32 bytes) |
//! | 0x105 | VQ_NOTIFY_CFG | one per queue | notify_off, notif_config_data (8 bytes) |
//!
//! Every part is a 16-byte header (`le16 type; u8 flags; u8 reserved;
//! u8 selector[8]; le32 length`) and `length` value bytes, packed with no
//! padding. The parts carry no ring position: a member is stopped only once
//! every request it took is completed (R14-MODE-2/3), so on resume each
//! enabled queue continues from the used index in guest memory
//! ([`QueueContext::avail_follows_used`]).

use super::context::{
    CommonCfg, ContextError, ContextLimits, MemberContext, QueueContext, NO_VECTOR,
};
use crate::transport::state::common_offset as co;

/// DEV_FEATURES: the device's offered features (optional; verified, never
/// applied, R14-PARTS-7).
pub const PART_DEV_FEATURES: u16 = 0x100;
/// DRV_FEATURES: the features the driver accepted.
pub const PART_DRV_FEATURES: u16 = 0x101;
/// PCI_COMMON_CFG: one field of `struct virtio_pci_common_cfg`.
pub const PART_PCI_COMMON_CFG: u16 = 0x102;
/// DEVICE_STATUS: the `device_status` byte.
pub const PART_DEVICE_STATUS: u16 = 0x103;
/// VQ_CFG: one queue's configuration.
pub const PART_VQ_CFG: u16 = 0x104;
/// VQ_NOTIFY_CFG: one queue's notification offsets (read-only; verified).
pub const PART_VQ_NOTIFY_CFG: u16 = 0x105;

/// Header flag: the part may be left out, and a device may ignore it.
pub const PART_F_OPTIONAL: u8 = 0x01;
/// Bytes of a part header.
pub const PART_HEADER_LEN: usize = 16;
/// Value bytes of VQ_CFG.
pub const VQ_CFG_LEN: usize = 32;
/// Value bytes of VQ_NOTIFY_CFG.
pub const VQ_NOTIFY_LEN: usize = 8;

/// The common-cfg fields this device emits as PCI_COMMON_CFG parts: (offset,
/// length). Per-queue registers travel in VQ_CFG / VQ_NOTIFY_CFG, the device
/// status in DEVICE_STATUS, features in the feature parts.
pub const COMMON_FIELDS: [(u32, usize); 5] = [
    (co::DEVICE_FEATURE_SELECT as u32, 4),
    (co::DRIVER_FEATURE_SELECT as u32, 4),
    (co::CONFIG_MSIX_VECTOR as u32, 2),
    (co::NUM_QUEUES as u32, 2), // read-only: verified
    (co::QUEUE_SELECT as u32, 2),
];

/// A part header (`struct virtio_dev_part_hdr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartHeader {
    /// `part_type`.
    pub part_type: u16,
    /// `flags`.
    pub flags: u8,
    /// `selector`: the common-cfg offset (0x102), the queue index
    /// (0x104/0x105), else 0.
    pub selector: u64,
    /// Value length.
    pub length: u32,
}

impl PartHeader {
    /// The 16 header bytes.
    pub fn to_bytes(&self) -> [u8; PART_HEADER_LEN] {
        let mut b = [0u8; PART_HEADER_LEN];
        b[0..2].copy_from_slice(&self.part_type.to_le_bytes());
        b[2] = self.flags;
        b[4..12].copy_from_slice(&self.selector.to_le_bytes());
        b[12..16].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// Parse 16 header bytes (`b` must hold at least 16).
    pub fn parse(b: &[u8]) -> Option<PartHeader> {
        let b = b.get(..PART_HEADER_LEN)?;
        Some(PartHeader {
            part_type: u16::from_le_bytes([b[0], b[1]]),
            flags: b[2],
            selector: u64::from_le_bytes(b[4..12].try_into().ok()?),
            length: u32::from_le_bytes(b[12..16].try_into().ok()?),
        })
    }

    /// The part's identity: type and selector (flags and length aside).
    pub fn key(&self) -> (u16, u64) {
        (self.part_type, self.selector)
    }
}

/// Errors decoding or checking device parts. Each one makes DEV_PARTS_SET
/// fail with EINVAL/Q_INVALID_FIELD and leaves the member unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartsError {
    /// Bytes left after the last whole part.
    #[error("{0} bytes after the last device part do not make a part header")]
    Trailing(usize),
    /// A part's length runs past the data.
    #[error("device part {ty:#x} claims {length} value bytes, {left} remain")]
    Truncated {
        /// Part type.
        ty: u16,
        /// Its length.
        length: u32,
        /// Bytes left in the data.
        left: usize,
    },
    /// A mandatory part type this device does not know.
    #[error("device part type {0:#x} is unknown and not optional")]
    UnknownType(u16),
    /// A length that differs from the device's for that part (R14-PARTS-6).
    #[error("device part {ty:#x} (selector {selector:#x}) has length {length}, the device's is {expected}")]
    BadLength {
        /// Part type.
        ty: u16,
        /// Selector.
        selector: u64,
        /// Length found.
        length: u32,
        /// The device's length.
        expected: usize,
    },
    /// A PCI_COMMON_CFG offset this device does not carry as a part.
    #[error("PCI_COMMON_CFG part at offset {0:#x} is not a field this device carries")]
    CommonOffset(u64),
    /// A queue index beyond the member's queues.
    #[error("device part {ty:#x} names queue {index}, the member has {queues}")]
    QueueIndex {
        /// Part type.
        ty: u16,
        /// Queue index.
        index: u64,
        /// Queues of the member.
        queues: u16,
    },
    /// The same part twice in one DEV_PARTS_SET.
    #[error("device part {ty:#x} (selector {selector:#x}) appears twice")]
    Duplicate {
        /// Part type.
        ty: u16,
        /// Selector.
        selector: u64,
    },
    /// A read-only value that differs from the device's (DEV_FEATURES,
    /// num_queues, the notification offsets; R14-PARTS-7/12).
    #[error("device part {ty:#x} (selector {selector:#x}) holds {found:#x}, the device has {expected:#x}")]
    ReadOnly {
        /// Part type.
        ty: u16,
        /// Selector.
        selector: u64,
        /// Value found.
        found: u64,
        /// The device's value.
        expected: u64,
    },
    /// A header with reserved bytes or unknown flag bits set.
    #[error("device part {0:#x} has reserved header bits set")]
    Reserved(u16),
    /// The merged state breaks a member limit (queue size, vector,
    /// features not offered).
    #[error(transparent)]
    Context(#[from] ContextError),
}

/// One queue's VQ_CFG values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VqCfg {
    /// `queue_size`.
    pub size: u16,
    /// `vector`.
    pub vector: u16,
    /// `enabled`.
    pub enabled: bool,
    /// `queue_desc`.
    pub desc: u64,
    /// `queue_driver`.
    pub driver: u64,
    /// `queue_device`.
    pub device: u64,
}

/// Values of one DEV_PARTS_SET, decoded and checked on their own; applied
/// over a base state by [`PartsImage::apply_to`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartsImage {
    /// DRV_FEATURES.
    pub driver_features: Option<u64>,
    /// PCI_COMMON_CFG parts: (offset, value).
    pub common: Vec<(u32, u64)>,
    /// DEVICE_STATUS.
    pub device_status: Option<u8>,
    /// VQ_CFG parts: (queue, values).
    pub queues: Vec<(u16, VqCfg)>,
}

/// The parts of `ctx`, a member with `limits`, in mandatory order: each as
/// (header, value).
pub fn parts_of(ctx: &MemberContext, limits: &ContextLimits) -> Vec<(PartHeader, Vec<u8>)> {
    let common = ctx.common.unwrap_or_default();
    let mut out = Vec::with_capacity(8 + 2 * usize::from(limits.num_queues));
    let part = |part_type, flags, selector, value: Vec<u8>| {
        (
            PartHeader {
                part_type,
                flags,
                selector,
                length: value.len() as u32,
            },
            value,
        )
    };
    out.push(part(
        PART_DEV_FEATURES,
        PART_F_OPTIONAL,
        0,
        limits.offered_features.to_le_bytes().to_vec(),
    ));
    out.push(part(
        PART_DRV_FEATURES,
        0,
        0,
        ctx.features.unwrap_or(0).to_le_bytes().to_vec(),
    ));
    let image = common.to_bytes();
    for (off, len) in COMMON_FIELDS {
        let o = off as usize;
        out.push(part(
            PART_PCI_COMMON_CFG,
            0,
            u64::from(off),
            image[o..o + len].to_vec(),
        ));
    }
    out.push(part(PART_DEVICE_STATUS, 0, 0, vec![common.device_status]));
    let queue = |i: u16| ctx.queues.iter().find(|q| q.index == i);
    for i in 0..limits.num_queues {
        let mut v = Vec::with_capacity(VQ_CFG_LEN);
        let (size, vector, enabled, desc, driver, device) = match queue(i) {
            Some(q) => (q.size, q.msix_vector, q.enabled, q.desc, q.driver, q.device),
            None => (limits.max_queue_size, NO_VECTOR, false, 0, 0, 0),
        };
        v.extend_from_slice(&size.to_le_bytes());
        v.extend_from_slice(&vector.to_le_bytes());
        v.extend_from_slice(&u16::from(enabled).to_le_bytes());
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&desc.to_le_bytes());
        v.extend_from_slice(&driver.to_le_bytes());
        v.extend_from_slice(&device.to_le_bytes());
        out.push(part(PART_VQ_CFG, 0, u64::from(i), v));
    }
    for i in 0..limits.num_queues {
        out.push(part(
            PART_VQ_NOTIFY_CFG,
            0,
            u64::from(i),
            notify_value(i).to_vec(),
        ));
    }
    out
}

/// VQ_NOTIFY_CFG of queue `i` on this transport: `queue_notify_off` and
/// `queue_notif_config_data` both read as the queue index.
fn notify_value(i: u16) -> [u8; VQ_NOTIFY_LEN] {
    let mut v = [0u8; VQ_NOTIFY_LEN];
    v[0..2].copy_from_slice(&i.to_le_bytes());
    v[2..4].copy_from_slice(&i.to_le_bytes());
    v
}

/// Bytes of every part of a member with `limits` (DEV_PARTS_GET(ALL) and
/// METADATA_GET(SIZE)): the same for every state of the member.
pub fn all_parts_len(limits: &ContextLimits) -> usize {
    let q = usize::from(limits.num_queues);
    let common: usize = COMMON_FIELDS.iter().map(|(_, l)| PART_HEADER_LEN + l).sum();
    2 * (PART_HEADER_LEN + 8)
        + common
        + PART_HEADER_LEN
        + 1
        + q * (2 * PART_HEADER_LEN + VQ_CFG_LEN + VQ_NOTIFY_LEN)
}

/// Append parts to `out`: all of them, or (when `selected` is `Some`) those
/// whose (type, selector) the list names, still in mandatory order; names
/// that match no part are skipped (R14-PARTS-3, R14-PARTS-14).
pub fn encode(parts: &[(PartHeader, Vec<u8>)], selected: Option<&[(u16, u64)]>, out: &mut Vec<u8>) {
    for (h, v) in parts {
        if selected.is_some_and(|s| !s.contains(&h.key())) {
            continue;
        }
        out.extend_from_slice(&h.to_bytes());
        out.extend_from_slice(v);
    }
}

fn le_value(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..v.len().min(8)].copy_from_slice(&v[..v.len().min(8)]);
    u64::from_le_bytes(b)
}

/// Decode and check the parts of a DEV_PARTS_SET against a member with
/// `limits`. Nothing is applied here; any error leaves no trace.
pub fn decode(data: &[u8], limits: &ContextLimits) -> Result<PartsImage, PartsError> {
    let mut img = PartsImage::default();
    let mut seen: Vec<(u16, u64)> = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let h = PartHeader::parse(rest).ok_or(PartsError::Trailing(rest.len()))?;
        if rest[3] != 0 || h.flags & !PART_F_OPTIONAL != 0 {
            return Err(PartsError::Reserved(h.part_type));
        }
        let body = &rest[PART_HEADER_LEN..];
        let len = h.length as usize;
        if len > body.len() {
            return Err(PartsError::Truncated {
                ty: h.part_type,
                length: h.length,
                left: body.len(),
            });
        }
        let value = &body[..len];
        rest = &body[len..];
        if seen.contains(&h.key()) {
            return Err(PartsError::Duplicate {
                ty: h.part_type,
                selector: h.selector,
            });
        }
        seen.push(h.key());
        let expect_len = |expected: usize| {
            if len == expected {
                Ok(())
            } else {
                Err(PartsError::BadLength {
                    ty: h.part_type,
                    selector: h.selector,
                    length: h.length,
                    expected,
                })
            }
        };
        let selector_zero = || {
            if h.selector == 0 {
                Ok(())
            } else {
                Err(PartsError::Reserved(h.part_type))
            }
        };
        let queue = || {
            if h.selector < u64::from(limits.num_queues) {
                Ok(h.selector as u16)
            } else {
                Err(PartsError::QueueIndex {
                    ty: h.part_type,
                    index: h.selector,
                    queues: limits.num_queues,
                })
            }
        };
        match h.part_type {
            PART_DEV_FEATURES => {
                selector_zero()?;
                expect_len(8)?;
                let f = le_value(value);
                if f != limits.offered_features {
                    return Err(PartsError::ReadOnly {
                        ty: h.part_type,
                        selector: 0,
                        found: f,
                        expected: limits.offered_features,
                    });
                }
            }
            PART_DRV_FEATURES => {
                selector_zero()?;
                expect_len(8)?;
                img.driver_features = Some(le_value(value));
            }
            PART_PCI_COMMON_CFG => {
                let Some(&(off, flen)) = COMMON_FIELDS
                    .iter()
                    .find(|(o, _)| u64::from(*o) == h.selector)
                else {
                    return Err(PartsError::CommonOffset(h.selector));
                };
                expect_len(flen)?;
                let v = le_value(value);
                if u64::from(off) == co::NUM_QUEUES && v != u64::from(limits.num_queues) {
                    return Err(PartsError::ReadOnly {
                        ty: h.part_type,
                        selector: h.selector,
                        found: v,
                        expected: u64::from(limits.num_queues),
                    });
                }
                img.common.push((off, v));
            }
            PART_DEVICE_STATUS => {
                selector_zero()?;
                expect_len(1)?;
                img.device_status = Some(value[0]);
            }
            PART_VQ_CFG => {
                let i = queue()?;
                expect_len(VQ_CFG_LEN)?;
                let u16_at = |o: usize| u16::from_le_bytes([value[o], value[o + 1]]);
                let enabled = u16_at(4);
                if enabled > 1 || u16_at(6) != 0 {
                    return Err(PartsError::ReadOnly {
                        ty: h.part_type,
                        selector: h.selector,
                        found: u64::from(enabled),
                        expected: 1,
                    });
                }
                img.queues.push((
                    i,
                    VqCfg {
                        size: u16_at(0),
                        vector: u16_at(2),
                        enabled: enabled == 1,
                        desc: le_value(&value[8..16]),
                        driver: le_value(&value[16..24]),
                        device: le_value(&value[24..32]),
                    },
                ));
            }
            PART_VQ_NOTIFY_CFG => {
                let i = queue()?;
                expect_len(VQ_NOTIFY_LEN)?;
                if value != notify_value(i) {
                    return Err(PartsError::ReadOnly {
                        ty: h.part_type,
                        selector: h.selector,
                        found: le_value(value),
                        expected: le_value(&notify_value(i)),
                    });
                }
            }
            // An optional part this device does not use (R14-PARTS-8).
            _ if h.flags & PART_F_OPTIONAL != 0 => {}
            other => return Err(PartsError::UnknownType(other)),
        }
    }
    // Check the values on their own now, so that a SET that cannot apply
    // fails here (R14-GRP-4) rather than at resume.
    if let Some(f) = img.driver_features {
        MemberContext {
            features: Some(f),
            ..Default::default()
        }
        .validate(limits)?;
    }
    for (i, q) in &img.queues {
        let ctx = MemberContext {
            queues: vec![QueueContext {
                index: *i,
                size: q.size,
                msix_vector: q.vector,
                ..Default::default()
            }],
            ..Default::default()
        };
        ctx.validate(limits)?;
    }
    for (off, v) in &img.common {
        if u64::from(*off) == co::CONFIG_MSIX_VECTOR {
            limits.check_vector(*v as u16)?;
        }
    }
    Ok(img)
}

impl PartsImage {
    /// The state `base` becomes with these parts set over it: the parts
    /// given replace their fields, everything else stays. Queues named by a
    /// VQ_CFG part continue on resume from the used index in guest memory.
    pub fn apply_to(&self, base: &MemberContext) -> MemberContext {
        let mut ctx = base.clone();
        if let Some(f) = self.driver_features {
            ctx.features = Some(f);
        }
        let mut common: CommonCfg = ctx.common.unwrap_or_default();
        for (off, v) in &self.common {
            match u64::from(*off) {
                co::DEVICE_FEATURE_SELECT => common.device_feature_select = *v as u32,
                co::DRIVER_FEATURE_SELECT => common.driver_feature_select = *v as u32,
                co::CONFIG_MSIX_VECTOR => common.config_msix_vector = *v as u16,
                co::QUEUE_SELECT => common.queue_select = *v as u16,
                _ => {}
            }
        }
        if let Some(s) = self.device_status {
            common.device_status = s;
        }
        ctx.common = Some(common);
        for (i, v) in &self.queues {
            let q = QueueContext {
                index: *i,
                size: v.size,
                msix_vector: v.vector,
                desc: v.desc,
                driver: v.driver,
                device: v.device,
                avail_idx: 0,
                enabled: v.enabled,
                device_owned: Vec::new(),
                avail_follows_used: true,
            };
            match ctx.queues.iter_mut().find(|c| c.index == *i) {
                Some(slot) => *slot = q,
                None => {
                    ctx.queues.push(q);
                    ctx.queues.sort_by_key(|c| c.index);
                }
            }
        }
        ctx
    }
}
