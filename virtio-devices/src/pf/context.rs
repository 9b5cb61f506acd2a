//! The device context stream (spec §4.3): a `le32 field_count` followed by
//! TLV fields `{le16 type; u8 reserved[6]; le64 length; u8 value[length]}`.
//!
//! [`MemberContext`] is the plain, transport-independent state of a member
//! device; [`MemberContext::encode`] produces a stream and
//! [`ContextDecoder`] parses one that may arrive in pieces of any size,
//! validating every field against the member's [`ContextLimits`]
//! (R-CTX-4).

/// Field type PCI_COMMON_CFG.
pub const FIELD_PCI_COMMON_CFG: u16 = 0x0;
/// Field type DEV_FEATURES.
pub const FIELD_DEV_FEATURES: u16 = 0x1;
/// Field type PCI_VQ_CFG.
pub const FIELD_PCI_VQ_CFG: u16 = 0x2;
/// Field type VQ_SPLIT_RUNTIME_CFG.
pub const FIELD_VQ_SPLIT_RUNTIME_CFG: u16 = 0x3;
/// Field type VQ_SPLIT_DEV_OWN_DESC.
pub const FIELD_VQ_SPLIT_DEV_OWN_DESC: u16 = 0x4;
/// Field type DEV_CFG.
pub const FIELD_DEV_CFG: u16 = 0x1000;

/// Length of PCI_COMMON_CFG.
pub const COMMON_CFG_LEN: usize = 64;
/// Length of PCI_VQ_CFG.
pub const VQ_CFG_LEN: usize = 30;
/// Length of VQ_SPLIT_RUNTIME_CFG.
pub const VQ_RUNTIME_LEN: usize = 5;
/// Most feature words accepted in DEV_FEATURES (words past the first must
/// be zero: this device offers no feature above bit 63).
pub const MAX_FEATURE_WORDS: usize = 4;
/// `msix_vector` value meaning "no vector".
pub const NO_VECTOR: u16 = 0xffff;

const FIELD_HEADER_LEN: usize = 16;

/// Errors of the context codec. Every one means EINVAL/Q_INVALID_FIELD for
/// DEV_CTX_WRITE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// A field type this device does not know.
    #[error("unknown device context field type {0:#x}")]
    UnknownType(u16),
    /// A field length that does not match its type.
    #[error("device context field type {ty:#x} has length {len}, expected {expected}")]
    BadLength {
        /// Field type.
        ty: u16,
        /// Length found.
        len: u64,
        /// What the type requires.
        expected: String,
    },
    /// `field_count` larger than any valid context of this member.
    #[error("device context field_count {count} exceeds the maximum {max}")]
    TooManyFields {
        /// field_count in the stream.
        count: u32,
        /// Largest valid count.
        max: u32,
    },
    /// Queue index out of range.
    #[error("device context field type {ty:#x} names queue {index}, device has {num_queues}")]
    BadQueueIndex {
        /// Field type.
        ty: u16,
        /// Queue index found.
        index: u16,
        /// Queues of the device.
        num_queues: u16,
    },
    /// Queue size not a power of two or above the maximum.
    #[error("queue {index} size {size} is not a power of two no larger than {max}")]
    BadQueueSize {
        /// Queue index.
        index: u16,
        /// Size found.
        size: u16,
        /// Maximum.
        max: u16,
    },
    /// An MSI-X vector beyond the member's table.
    #[error("MSI-X vector {vector} is beyond the member's {vectors} vectors")]
    BadVector {
        /// Vector found.
        vector: u16,
        /// Table size.
        vectors: u16,
    },
    /// Features the device does not offer.
    #[error("negotiated features {features:#x} include bits not offered ({offered:#x})")]
    FeaturesNotOffered {
        /// Features (word 0).
        features: u64,
        /// Offered features.
        offered: u64,
    },
    /// Features beyond word 0.
    #[error("negotiated feature word {0} is non-zero; this device offers no such features")]
    HighFeatures(usize),
    /// `num_queues` of the common configuration does not match the device.
    #[error("common configuration num_queues {found} does not match the device's {expected}")]
    NumQueuesMismatch {
        /// Found.
        found: u16,
        /// Expected.
        expected: u16,
    },
    /// A field appearing twice.
    #[error("device context field type {ty:#x} (queue {index:?}) appears twice")]
    Duplicate {
        /// Field type.
        ty: u16,
        /// Queue index if per-queue.
        index: Option<u16>,
    },
    /// A device-owned descriptor index or count impossible for its queue.
    #[error("queue {index}: device-owned descriptor {desc} / count {count} invalid for queue size {size}")]
    BadDeviceOwned {
        /// Queue index.
        index: u16,
        /// Offending descriptor index (or 0).
        desc: u16,
        /// desc_count.
        count: u16,
        /// Queue size.
        size: u16,
    },
    /// Bytes after the last field of a complete stream.
    #[error("{0} bytes follow the end of the device context stream")]
    TrailingBytes(usize),
    /// The stream ended before all fields arrived (whole-buffer decode).
    #[error("device context stream is truncated")]
    Truncated,
}

/// What a member accepts in a written context (R-CTX-4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextLimits {
    /// Queues of the member device (not counting any admin queue).
    pub num_queues: u16,
    /// Largest queue size.
    pub max_queue_size: u16,
    /// Feature bits the member offers.
    pub offered_features: u64,
    /// Length of the device configuration structure.
    pub device_cfg_len: usize,
    /// MSI-X vectors of the member (vectors must be below, or NO_VECTOR).
    pub msix_vectors: u16,
}

impl ContextLimits {
    /// Largest valid `field_count`: common cfg, features, device cfg and
    /// three per queue.
    pub fn max_fields(&self) -> u32 {
        3 + 3 * u32::from(self.num_queues)
    }

    /// Length rule of a field type: `Ok(())` if `len` fits it.
    fn check_len(&self, ty: u16, len: u64) -> Result<(), ContextError> {
        let bad = |expected: String| ContextError::BadLength { ty, len, expected };
        match ty {
            FIELD_PCI_COMMON_CFG if len != COMMON_CFG_LEN as u64 => Err(bad("64".into())),
            FIELD_DEV_FEATURES
                if len == 0 || !len.is_multiple_of(8) || len > (8 * MAX_FEATURE_WORDS) as u64 =>
            {
                Err(bad(format!(
                    "a multiple of 8 up to {}",
                    8 * MAX_FEATURE_WORDS
                )))
            }
            FIELD_PCI_VQ_CFG if len != VQ_CFG_LEN as u64 => Err(bad("30".into())),
            FIELD_VQ_SPLIT_RUNTIME_CFG if len != VQ_RUNTIME_LEN as u64 => Err(bad("5".into())),
            FIELD_VQ_SPLIT_DEV_OWN_DESC
                if len < 4
                    || !len.is_multiple_of(2)
                    || len > 4 + 2 * u64::from(self.max_queue_size) =>
            {
                Err(bad(format!(
                    "4 + 2 x desc_count, at most {}",
                    4 + 2 * u64::from(self.max_queue_size)
                )))
            }
            FIELD_DEV_CFG if len != self.device_cfg_len as u64 => {
                Err(bad(self.device_cfg_len.to_string()))
            }
            FIELD_PCI_COMMON_CFG
            | FIELD_DEV_FEATURES
            | FIELD_PCI_VQ_CFG
            | FIELD_VQ_SPLIT_RUNTIME_CFG
            | FIELD_VQ_SPLIT_DEV_OWN_DESC
            | FIELD_DEV_CFG => Ok(()),
            _ => Err(ContextError::UnknownType(ty)),
        }
    }

    pub(crate) fn check_vector(&self, vector: u16) -> Result<(), ContextError> {
        if vector != NO_VECTOR && vector >= self.msix_vectors {
            return Err(ContextError::BadVector {
                vector,
                vectors: self.msix_vectors,
            });
        }
        Ok(())
    }

    fn check_queue(&self, ty: u16, index: u16) -> Result<(), ContextError> {
        if index >= self.num_queues {
            return Err(ContextError::BadQueueIndex {
                ty,
                index,
                num_queues: self.num_queues,
            });
        }
        Ok(())
    }
}

/// DEV_CTX_FIELDS_QUERY (R-CTX-5): `(type, length)` per supported type,
/// exact for fixed-size values, the maximum for variable ones.
pub fn supported_fields(limits: &ContextLimits) -> [(u16, u64); 6] {
    [
        (FIELD_PCI_COMMON_CFG, COMMON_CFG_LEN as u64),
        (FIELD_DEV_FEATURES, (8 * MAX_FEATURE_WORDS) as u64),
        (FIELD_PCI_VQ_CFG, VQ_CFG_LEN as u64),
        (FIELD_VQ_SPLIT_RUNTIME_CFG, VQ_RUNTIME_LEN as u64),
        (
            FIELD_VQ_SPLIT_DEV_OWN_DESC,
            4 + 2 * u64::from(limits.max_queue_size),
        ),
        (FIELD_DEV_CFG, limits.device_cfg_len as u64),
    ]
}

/// Append the DEV_CTX_FIELDS_QUERY result (`{le16 type; u8 reserved[6];
/// le64 length}` each).
pub fn encode_supported_fields(limits: &ContextLimits, out: &mut Vec<u8>) {
    for (ty, len) in supported_fields(limits) {
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&[0u8; 6]);
        out.extend_from_slice(&len.to_le_bytes());
    }
}

/// `struct virtio_pci_common_cfg` (virtio 1.3, 64 bytes): the transport's
/// own type, so the context and the device share one encoding.
pub use crate::transport::state::CommonCfg;

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Per-queue context: PCI_VQ_CFG, VQ_SPLIT_RUNTIME_CFG and
/// VQ_SPLIT_DEV_OWN_DESC of one queue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueContext {
    /// `vq_index`.
    pub index: u16,
    /// `queue_size`.
    pub size: u16,
    /// `queue_msix_vector`.
    pub msix_vector: u16,
    /// `queue_desc`.
    pub desc: u64,
    /// `queue_driver` (available ring).
    pub driver: u64,
    /// `queue_device` (used ring).
    pub device: u64,
    /// `dev_avail_idx`: next available ring index the device will read.
    pub avail_idx: u16,
    /// `enabled`.
    pub enabled: bool,
    /// Heads of chains the device has taken and not completed; on resume
    /// the device processes them again (R-MODE-3, R-CTX-7).
    pub device_owned: Vec<u16>,
    /// The next available index is the used index found in guest memory at
    /// apply time, not `avail_idx`: set by device parts (virtio 1.4), which
    /// carry no ring position because a stopped member has completed every
    /// request it took. Never set by the draft's TLV stream.
    pub avail_follows_used: bool,
}

/// The context of a member device, independent of any transport.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberContext {
    /// PCI_COMMON_CFG, if present.
    pub common: Option<CommonCfg>,
    /// DEV_FEATURES: negotiated feature bits (word 0), if present.
    pub features: Option<u64>,
    /// Per-queue state, ascending by index.
    pub queues: Vec<QueueContext>,
    /// DEV_CFG, if present.
    pub device_config: Option<Vec<u8>>,
}

fn put_field_header(out: &mut Vec<u8>, ty: u16, len: usize) {
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&[0u8; 6]);
    out.extend_from_slice(&(len as u64).to_le_bytes());
}

impl MemberContext {
    /// Number of TLV fields [`MemberContext::encode`] emits.
    pub fn field_count(&self) -> u32 {
        u32::from(self.common.is_some())
            + u32::from(self.features.is_some())
            + u32::from(self.device_config.is_some())
            + 3 * self.queues.len() as u32
    }

    /// Exact length of the encoded stream.
    pub fn encoded_len(&self) -> usize {
        let mut n = 4;
        if self.common.is_some() {
            n += FIELD_HEADER_LEN + COMMON_CFG_LEN;
        }
        if self.features.is_some() {
            n += FIELD_HEADER_LEN + 8;
        }
        for q in &self.queues {
            n += 3 * FIELD_HEADER_LEN + VQ_CFG_LEN + VQ_RUNTIME_LEN + 4 + 2 * q.device_owned.len();
        }
        if let Some(c) = &self.device_config {
            n += FIELD_HEADER_LEN + c.len();
        }
        n
    }

    /// Append the stream: common cfg, features, then per queue PCI_VQ_CFG,
    /// VQ_SPLIT_RUNTIME_CFG and VQ_SPLIT_DEV_OWN_DESC, then DEV_CFG.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.extend_from_slice(&self.field_count().to_le_bytes());
        if let Some(c) = &self.common {
            put_field_header(out, FIELD_PCI_COMMON_CFG, COMMON_CFG_LEN);
            out.extend_from_slice(&c.to_bytes());
        }
        if let Some(f) = self.features {
            put_field_header(out, FIELD_DEV_FEATURES, 8);
            out.extend_from_slice(&f.to_le_bytes());
        }
        for q in &self.queues {
            put_field_header(out, FIELD_PCI_VQ_CFG, VQ_CFG_LEN);
            out.extend_from_slice(&q.index.to_le_bytes());
            out.extend_from_slice(&q.size.to_le_bytes());
            out.extend_from_slice(&q.msix_vector.to_le_bytes());
            out.extend_from_slice(&q.desc.to_le_bytes());
            out.extend_from_slice(&q.driver.to_le_bytes());
            out.extend_from_slice(&q.device.to_le_bytes());
            put_field_header(out, FIELD_VQ_SPLIT_RUNTIME_CFG, VQ_RUNTIME_LEN);
            out.extend_from_slice(&q.index.to_le_bytes());
            out.extend_from_slice(&q.avail_idx.to_le_bytes());
            out.push(u8::from(q.enabled));
            let n = q.device_owned.len();
            put_field_header(out, FIELD_VQ_SPLIT_DEV_OWN_DESC, 4 + 2 * n);
            out.extend_from_slice(&q.index.to_le_bytes());
            out.extend_from_slice(&(n as u16).to_le_bytes());
            for d in &q.device_owned {
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
        if let Some(c) = &self.device_config {
            put_field_header(out, FIELD_DEV_CFG, c.len());
            out.extend_from_slice(c);
        }
    }

    /// The encoded stream.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decode a whole stream in one piece.
    pub fn decode(bytes: &[u8], limits: &ContextLimits) -> Result<Self, ContextError> {
        let mut d = ContextDecoder::new(limits.clone());
        d.feed(bytes)?.ok_or(ContextError::Truncated)
    }

    /// Check the context against `limits` as a whole (what a decoder checks
    /// field by field, plus cross-field rules).
    pub fn validate(&self, limits: &ContextLimits) -> Result<(), ContextError> {
        if let Some(c) = &self.common {
            check_common(c, limits)?;
        }
        if let Some(f) = self.features {
            check_features(f, limits)?;
        }
        if let Some(c) = &self.device_config {
            limits.check_len(FIELD_DEV_CFG, c.len() as u64)?;
        }
        let mut prev: Option<u16> = None;
        for q in &self.queues {
            if prev.is_some_and(|p| p >= q.index) {
                return Err(ContextError::Duplicate {
                    ty: FIELD_PCI_VQ_CFG,
                    index: Some(q.index),
                });
            }
            prev = Some(q.index);
            limits.check_queue(FIELD_PCI_VQ_CFG, q.index)?;
            check_queue_size(q.index, q.size, limits)?;
            limits.check_vector(q.msix_vector)?;
            check_device_owned(q)?;
        }
        Ok(())
    }
}

fn check_common(c: &CommonCfg, limits: &ContextLimits) -> Result<(), ContextError> {
    if c.num_queues != limits.num_queues {
        return Err(ContextError::NumQueuesMismatch {
            found: c.num_queues,
            expected: limits.num_queues,
        });
    }
    limits.check_vector(c.config_msix_vector)?;
    Ok(())
}

fn check_features(f: u64, limits: &ContextLimits) -> Result<(), ContextError> {
    if f & !limits.offered_features != 0 {
        return Err(ContextError::FeaturesNotOffered {
            features: f,
            offered: limits.offered_features,
        });
    }
    Ok(())
}

fn check_queue_size(index: u16, size: u16, limits: &ContextLimits) -> Result<(), ContextError> {
    if !size.is_power_of_two() || size > limits.max_queue_size {
        return Err(ContextError::BadQueueSize {
            index,
            size,
            max: limits.max_queue_size,
        });
    }
    Ok(())
}

fn check_device_owned(q: &QueueContext) -> Result<(), ContextError> {
    let count = q.device_owned.len();
    if count > usize::from(q.size) {
        return Err(ContextError::BadDeviceOwned {
            index: q.index,
            desc: 0,
            count: count as u16,
            size: q.size,
        });
    }
    for (i, &d) in q.device_owned.iter().enumerate() {
        if d >= q.size || q.device_owned[..i].contains(&d) {
            return Err(ContextError::BadDeviceOwned {
                index: q.index,
                desc: d,
                count: count as u16,
                size: q.size,
            });
        }
    }
    Ok(())
}

const HAVE_VQ_CFG: u8 = 1;
const HAVE_RUNTIME: u8 = 2;
const HAVE_OWN: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// Reading `field_count`.
    Count,
    /// Reading a field header.
    Header,
    /// Reading the value of a field of `ty`, `len` bytes.
    Value { ty: u16, len: usize },
    /// All fields arrived.
    Done,
}

/// Streaming decoder of a context stream: feed it pieces of any size, split
/// anywhere. Each field is validated the moment it is complete.
#[derive(Debug, Clone)]
pub struct ContextDecoder {
    limits: ContextLimits,
    stage: Stage,
    buf: Vec<u8>,
    consumed: u64,
    field_count: u32,
    fields_seen: u32,
    ctx: MemberContext,
    /// Per-queue presence bits (HAVE_*), indexed by queue.
    seen: Vec<u8>,
    queues: Vec<Option<QueueContext>>,
}

impl ContextDecoder {
    /// A decoder at the start of a stream.
    pub fn new(limits: ContextLimits) -> Self {
        ContextDecoder {
            seen: Vec::new(),
            queues: Vec::new(),
            limits,
            stage: Stage::Count,
            buf: Vec::new(),
            consumed: 0,
            field_count: 0,
            fields_seen: 0,
            ctx: MemberContext::default(),
        }
    }

    /// The limits fields are checked against.
    pub fn limits(&self) -> &ContextLimits {
        &self.limits
    }

    /// Bytes of the current stream consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// A stream has begun and is not complete (R-MODE-5).
    pub fn is_partial(&self) -> bool {
        self.consumed > 0 && self.stage != Stage::Done
    }

    /// Forget any partial stream (R-CTX-6).
    pub fn reset(&mut self) {
        *self = ContextDecoder::new(self.limits.clone());
    }

    /// Feed the next bytes. Returns the context when the stream completes
    /// (after which the decoder is ready for a new stream). On error the
    /// decoder is left in an unspecified state: callers wanting atomicity
    /// feed a clone and keep it only on success.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Option<MemberContext>, ContextError> {
        if self.stage == Stage::Done {
            self.reset();
        }
        while !bytes.is_empty() || self.stage_ready() {
            match self.stage.clone() {
                Stage::Count => {
                    if !self.fill(&mut bytes, 4) {
                        break;
                    }
                    let count = le32(&self.buf, 0);
                    self.buf.clear();
                    if count > self.limits.max_fields() {
                        return Err(ContextError::TooManyFields {
                            count,
                            max: self.limits.max_fields(),
                        });
                    }
                    self.field_count = count;
                    self.stage = if count == 0 {
                        Stage::Done
                    } else {
                        Stage::Header
                    };
                }
                Stage::Header => {
                    if !self.fill(&mut bytes, FIELD_HEADER_LEN) {
                        break;
                    }
                    let ty = le16(&self.buf, 0);
                    let len = le64(&self.buf, 8);
                    self.buf.clear();
                    self.limits.check_len(ty, len)?;
                    // check_len bounds len by the type's maximum.
                    let len = len as usize;
                    self.stage = Stage::Value { ty, len };
                }
                Stage::Value { ty, len } => {
                    if !self.fill(&mut bytes, len) {
                        break;
                    }
                    let value = std::mem::take(&mut self.buf);
                    self.apply_field(ty, &value)?;
                    self.buf = value;
                    self.buf.clear();
                    self.fields_seen += 1;
                    self.stage = if self.fields_seen == self.field_count {
                        Stage::Done
                    } else {
                        Stage::Header
                    };
                }
                Stage::Done => {
                    if !bytes.is_empty() {
                        return Err(ContextError::TrailingBytes(bytes.len()));
                    }
                    return self.finish().map(Some);
                }
            }
        }
        Ok(None)
    }

    /// A stage that can progress with no more input (zero-length value or
    /// a finished stream).
    fn stage_ready(&self) -> bool {
        matches!(self.stage, Stage::Done | Stage::Value { len: 0, .. })
    }

    /// Move up to `want - buf.len()` bytes into `buf`; true when full.
    fn fill(&mut self, bytes: &mut &[u8], want: usize) -> bool {
        let need = want - self.buf.len();
        let n = need.min(bytes.len());
        self.buf.extend_from_slice(&bytes[..n]);
        *bytes = &bytes[n..];
        self.consumed += n as u64;
        self.buf.len() == want
    }

    fn queue_slot(
        &mut self,
        ty: u16,
        index: u16,
        bit: u8,
    ) -> Result<&mut QueueContext, ContextError> {
        self.limits.check_queue(ty, index)?;
        let i = usize::from(index);
        if self.seen.len() <= i {
            self.seen.resize(i + 1, 0);
            self.queues.resize(i + 1, None);
        }
        if self.seen[i] & bit != 0 {
            return Err(ContextError::Duplicate {
                ty,
                index: Some(index),
            });
        }
        self.seen[i] |= bit;
        Ok(self.queues[i].get_or_insert_with(|| QueueContext {
            index,
            ..Default::default()
        }))
    }

    fn apply_field(&mut self, ty: u16, v: &[u8]) -> Result<(), ContextError> {
        match ty {
            FIELD_PCI_COMMON_CFG => {
                if self.ctx.common.is_some() {
                    return Err(ContextError::Duplicate { ty, index: None });
                }
                let mut b = [0u8; COMMON_CFG_LEN];
                b.copy_from_slice(v);
                let c = CommonCfg::from_bytes(&b);
                check_common(&c, &self.limits)?;
                self.ctx.common = Some(c);
            }
            FIELD_DEV_FEATURES => {
                if self.ctx.features.is_some() {
                    return Err(ContextError::Duplicate { ty, index: None });
                }
                for w in 1..v.len() / 8 {
                    if le64(v, 8 * w) != 0 {
                        return Err(ContextError::HighFeatures(w));
                    }
                }
                let f = le64(v, 0);
                check_features(f, &self.limits)?;
                self.ctx.features = Some(f);
            }
            FIELD_PCI_VQ_CFG => {
                let index = le16(v, 0);
                let size = le16(v, 2);
                let vector = le16(v, 4);
                check_queue_size(index, size, &self.limits)?;
                self.limits.check_vector(vector)?;
                let q = self.queue_slot(ty, index, HAVE_VQ_CFG)?;
                q.size = size;
                q.msix_vector = vector;
                q.desc = le64(v, 6);
                q.driver = le64(v, 14);
                q.device = le64(v, 22);
            }
            FIELD_VQ_SPLIT_RUNTIME_CFG => {
                let index = le16(v, 0);
                let enabled = match v[4] {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(ContextError::BadLength {
                            ty,
                            len: VQ_RUNTIME_LEN as u64,
                            expected: "enabled 0 or 1".into(),
                        })
                    }
                };
                let q = self.queue_slot(ty, index, HAVE_RUNTIME)?;
                q.avail_idx = le16(v, 2);
                q.enabled = enabled;
            }
            FIELD_VQ_SPLIT_DEV_OWN_DESC => {
                let index = le16(v, 0);
                let count = le16(v, 2);
                if 4 + 2 * usize::from(count) != v.len() {
                    return Err(ContextError::BadLength {
                        ty,
                        len: v.len() as u64,
                        expected: format!("4 + 2 x {count}"),
                    });
                }
                let q = self.queue_slot(ty, index, HAVE_OWN)?;
                q.device_owned = (0..usize::from(count))
                    .map(|k| le16(v, 4 + 2 * k))
                    .collect();
            }
            FIELD_DEV_CFG => {
                if self.ctx.device_config.is_some() {
                    return Err(ContextError::Duplicate { ty, index: None });
                }
                self.ctx.device_config = Some(v.to_vec());
            }
            _ => return Err(ContextError::UnknownType(ty)),
        }
        Ok(())
    }

    /// Cross-field checks once every field has arrived.
    fn finish(&mut self) -> Result<MemberContext, ContextError> {
        let mut ctx = std::mem::take(&mut self.ctx);
        ctx.queues = std::mem::take(&mut self.queues)
            .into_iter()
            .flatten()
            .collect();
        for (q, seen) in ctx
            .queues
            .iter_mut()
            .zip(self.seen.iter().filter(|s| **s != 0))
        {
            if seen & HAVE_VQ_CFG == 0 {
                // Without PCI_VQ_CFG the queue keeps its reset size: the
                // maximum.
                q.size = self.limits.max_queue_size;
                q.msix_vector = NO_VECTOR;
            }
            check_device_owned(q)?;
        }
        self.seen.clear();
        self.stage = Stage::Done;
        Ok(ctx)
    }
}
