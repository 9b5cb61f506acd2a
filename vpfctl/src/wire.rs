//! The admin command wire format as the driver sees it (spec §3, §4, §5),
//! kept independent of the device model so the guest binary needs nothing
//! but libc. The unit tests check every constant and encoding against
//! `virtio_devices::pf` so the two cannot drift apart.
//!
//! ```text
//! readable:  le16 opcode | le16 group_type | u8 reserved[12] | le64 group_member_id | data…
//! writable:  le16 status | le16 status_qualifier | u8 command_specific_output[4] | result…
//! ```

use crate::error::{Error, Result};

/// Readable header length.
pub const HEADER_LEN: usize = 24;
/// Writable status part length.
pub const STATUS_LEN: usize = 8;
/// The SR-IOV group type.
pub const GROUP_SRIOV: u16 = 1;

/// Opcodes (spec §3.1, the v2 draft's table).
pub mod opcode {
    /// LIST_QUERY
    pub const LIST_QUERY: u16 = 0x00;
    /// LIST_USE
    pub const LIST_USE: u16 = 0x01;
    /// DEV_MODE_GET
    pub const DEV_MODE_GET: u16 = 0x07;
    /// DEV_MODE_SET
    pub const DEV_MODE_SET: u16 = 0x08;
    /// DEV_CTX_SIZE_GET
    pub const DEV_CTX_SIZE_GET: u16 = 0x09;
    /// DEV_CTX_READ
    pub const DEV_CTX_READ: u16 = 0x0a;
    /// DEV_CTX_WRITE
    pub const DEV_CTX_WRITE: u16 = 0x0b;
    /// DEV_CTX_FIELDS_QUERY
    pub const DEV_CTX_FIELDS_QUERY: u16 = 0x0c;
    /// DEV_CTX_DISCARD
    pub const DEV_CTX_DISCARD: u16 = 0x0d;
    /// DEV_WRITE_RECORD_CAP_QUERY
    pub const DEV_WRITE_RECORD_CAP_QUERY: u16 = 0x0f;
    /// DEV_WRITE_RECORDS_START
    pub const DEV_WRITE_RECORDS_START: u16 = 0x10;
    /// DEV_WRITE_RECORDS_STOP
    pub const DEV_WRITE_RECORDS_STOP: u16 = 0x11;
    /// DEV_WRITE_RECORDS_READ
    pub const DEV_WRITE_RECORDS_READ: u16 = 0x12;

    /// Every opcode with its name.
    pub const ALL: [(u16, &str); 13] = [
        (LIST_QUERY, "LIST_QUERY"),
        (LIST_USE, "LIST_USE"),
        (DEV_MODE_GET, "DEV_MODE_GET"),
        (DEV_MODE_SET, "DEV_MODE_SET"),
        (DEV_CTX_SIZE_GET, "DEV_CTX_SIZE_GET"),
        (DEV_CTX_READ, "DEV_CTX_READ"),
        (DEV_CTX_WRITE, "DEV_CTX_WRITE"),
        (DEV_CTX_FIELDS_QUERY, "DEV_CTX_FIELDS_QUERY"),
        (DEV_CTX_DISCARD, "DEV_CTX_DISCARD"),
        (DEV_WRITE_RECORD_CAP_QUERY, "DEV_WRITE_RECORD_CAP_QUERY"),
        (DEV_WRITE_RECORDS_START, "DEV_WRITE_RECORDS_START"),
        (DEV_WRITE_RECORDS_STOP, "DEV_WRITE_RECORDS_STOP"),
        (DEV_WRITE_RECORDS_READ, "DEV_WRITE_RECORDS_READ"),
    ];

    /// Name of an opcode; `OPCODE_0x..` for unknown ones.
    pub fn name(op: u16) -> String {
        ALL.iter()
            .find(|(o, _)| *o == op)
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| format!("OPCODE_{op:#x}"))
    }

    /// Names of the opcodes set in a LIST_QUERY / LIST_USE bitmap.
    pub fn names_in(bitmap: u64) -> Vec<String> {
        (0..64u16)
            .filter(|b| bitmap & (1u64 << b) != 0)
            .map(name)
            .collect()
    }
}

/// Status values (virtio 1.3).
pub mod status {
    /// Success.
    pub const OK: u16 = 0;
    /// Try again.
    pub const EAGAIN: u16 = 11;
    /// Out of memory.
    pub const ENOMEM: u16 = 12;
    /// Busy.
    pub const EBUSY: u16 = 16;
    /// Invalid.
    pub const EINVAL: u16 = 22;
    /// No space.
    pub const ENOSPC: u16 = 28;

    /// Name of a status value.
    pub fn name(s: u16) -> String {
        match s {
            OK => "OK".into(),
            EAGAIN => "EAGAIN".into(),
            ENOMEM => "ENOMEM".into(),
            EBUSY => "EBUSY".into(),
            EINVAL => "EINVAL".into(),
            ENOSPC => "ENOSPC".into(),
            _ => format!("UNKNOWN_{s}"),
        }
    }
}

/// Status qualifiers (virtio 1.3).
pub mod qualifier {
    /// No qualifier.
    pub const OK: u16 = 0;
    /// Invalid in the current state.
    pub const INVALID_COMMAND: u16 = 1;
    /// Unknown or unused opcode.
    pub const INVALID_OPCODE: u16 = 2;
    /// Invalid data field.
    pub const INVALID_FIELD: u16 = 3;
    /// Invalid or unusable group.
    pub const INVALID_GROUP: u16 = 4;
    /// Invalid member.
    pub const INVALID_MEMBER: u16 = 5;
    /// Out of resources.
    pub const NORESOURCE: u16 = 6;
    /// Try again.
    pub const TRYAGAIN: u16 = 7;

    /// Name of a qualifier value.
    pub fn name(q: u16) -> String {
        match q {
            OK => "Q_OK".into(),
            INVALID_COMMAND => "Q_INVALID_COMMAND".into(),
            INVALID_OPCODE => "Q_INVALID_OPCODE".into(),
            INVALID_FIELD => "Q_INVALID_FIELD".into(),
            INVALID_GROUP => "Q_INVALID_GROUP".into(),
            INVALID_MEMBER => "Q_INVALID_MEMBER".into(),
            NORESOURCE => "Q_NORESOURCE".into(),
            TRYAGAIN => "Q_TRYAGAIN".into(),
            _ => format!("Q_UNKNOWN_{q}"),
        }
    }
}

/// Member device modes (spec §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Works normally.
    Active = 0,
    /// No notifications, no driver memory access.
    Stop = 1,
    /// Context fixed.
    Freeze = 2,
}

impl Mode {
    /// Parse `active|stop|freeze` or a number.
    pub fn parse(s: &str) -> Option<Mode> {
        match s.to_ascii_lowercase().as_str() {
            "active" | "0" => Some(Mode::Active),
            "stop" | "1" => Some(Mode::Stop),
            "freeze" | "2" => Some(Mode::Freeze),
            _ => None,
        }
    }

    /// Mode for a raw value.
    pub fn from_u8(v: u8) -> Option<Mode> {
        match v {
            0 => Some(Mode::Active),
            1 => Some(Mode::Stop),
            2 => Some(Mode::Freeze),
            _ => None,
        }
    }

    /// Name for output.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Active => "active",
            Mode::Stop => "stop",
            Mode::Freeze => "freeze",
        }
    }
}

/// Name of a raw mode byte (`unknown(N)` when out of range).
pub fn mode_name(v: u8) -> String {
    Mode::from_u8(v)
        .map(|m| m.name().to_string())
        .unwrap_or_else(|| format!("unknown({v})"))
}

/// The readable bytes of a command: header then data.
pub fn encode_command(opcode: u16, group: u16, member: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + data.len());
    v.extend_from_slice(&opcode.to_le_bytes());
    v.extend_from_slice(&group.to_le_bytes());
    v.extend_from_slice(&[0u8; 12]);
    v.extend_from_slice(&member.to_le_bytes());
    v.extend_from_slice(data);
    v
}

/// The 8 status bytes the device writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Completion {
    /// `status`.
    pub status: u16,
    /// `status_qualifier`.
    pub qualifier: u16,
    /// `command_specific_output`.
    pub output: [u8; 4],
}

impl Completion {
    /// Parse the status bytes.
    pub fn parse(b: &[u8; STATUS_LEN]) -> Self {
        Completion {
            status: u16::from_le_bytes([b[0], b[1]]),
            qualifier: u16::from_le_bytes([b[2], b[3]]),
            output: [b[4], b[5], b[6], b[7]],
        }
    }

    /// `command_specific_output` as `le32`.
    pub fn output_u32(&self) -> u32 {
        u32::from_le_bytes(self.output)
    }
}

/// DEV_MODE_SET data.
pub fn mode_set_data(mode: u8) -> Vec<u8> {
    vec![mode]
}

/// DEV_CTX_SIZE_GET data.
pub fn ctx_size_data(freeze: bool) -> Vec<u8> {
    vec![u8::from(freeze)]
}

/// DEV_WRITE_RECORDS_START data.
pub fn wr_start_data(page_size: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + 16 * ranges.len());
    v.extend_from_slice(&page_size.to_le_bytes());
    v.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    v.extend_from_slice(&[0u8; 4]);
    for &(addr, pages) in ranges {
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&pages.to_le_bytes());
    }
    v
}

/// DEV_WRITE_RECORDS_READ data.
pub fn wr_read_data(addr: u64, len: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&addr.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v
}

/// Little-endian u64 at `off` of `b`.
pub fn le64(b: &[u8], off: usize) -> Option<u64> {
    b.get(off..off + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

/// Little-endian u32 at `off` of `b`.
pub fn le32(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

/// Little-endian u16 at `off` of `b`.
pub fn le16(b: &[u8], off: usize) -> Option<u16> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes(s.try_into().expect("2 bytes")))
}

/// One DEV_CTX_FIELDS_QUERY entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldInfo {
    /// Field type.
    pub ty: u16,
    /// Exact (fixed) or maximum (variable) length.
    pub length: u64,
}

/// Parse a DEV_CTX_FIELDS_QUERY result (16 bytes per entry; a trailing
/// partial entry is ignored).
pub fn parse_fields(result: &[u8]) -> Vec<FieldInfo> {
    result
        .chunks_exact(16)
        .map(|e| FieldInfo {
            ty: u16::from_le_bytes([e[0], e[1]]),
            length: u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")),
        })
        .collect()
}

/// Name of a context field type.
pub fn field_type_name(ty: u16) -> String {
    match ty {
        0x0 => "PCI_COMMON_CFG".into(),
        0x1 => "DEV_FEATURES".into(),
        0x2 => "PCI_VQ_CFG".into(),
        0x3 => "VQ_SPLIT_RUNTIME_CFG".into(),
        0x4 => "VQ_SPLIT_DEV_OWN_DESC".into(),
        0x1000 => "DEV_CFG".into(),
        _ => format!("FIELD_{ty:#x}"),
    }
}

/// DEV_WRITE_RECORD_CAP_QUERY result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrCap {
    /// Bit n = page size 4096 << n.
    pub page_size_bitmap: u32,
    /// Most ranges recording can cover.
    pub supported_ranges: u32,
}

impl WrCap {
    /// Parse the 8-byte result.
    pub fn parse(result: &[u8]) -> Result<WrCap> {
        match (le32(result, 0), le32(result, 4)) {
            (Some(page_size_bitmap), Some(supported_ranges)) => Ok(WrCap {
                page_size_bitmap,
                supported_ranges,
            }),
            _ => Err(Error::Protocol(format!(
                "DEV_WRITE_RECORD_CAP_QUERY returned {} result bytes, expected 8",
                result.len()
            ))),
        }
    }

    /// The supported page sizes in bytes.
    pub fn page_sizes(&self) -> Vec<u64> {
        (0..32)
            .filter(|b| self.page_size_bitmap & (1 << b) != 0)
            .map(|b| 4096u64 << b)
            .collect()
    }

    /// Whether `page_size` is supported.
    pub fn supports(&self, page_size: u64) -> bool {
        self.page_sizes().contains(&page_size)
    }
}

/// The addresses of a DEV_WRITE_RECORDS_READ result: `count` entries
/// (from `command_specific_output`), bounded by the bytes returned.
pub fn parse_addresses(result: &[u8], count: u32) -> Vec<u64> {
    result
        .chunks_exact(8)
        .take(count as usize)
        .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
        .collect()
}

/// One TLV field of a context stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtxField {
    /// Field type.
    pub ty: u16,
    /// Declared length.
    pub length: u64,
    /// Queue index for per-queue fields (first `le16` of the value).
    pub queue: Option<u16>,
}

/// A context stream parsed for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtxSummary {
    /// `field_count`.
    pub field_count: u32,
    /// The fields found.
    pub fields: Vec<CtxField>,
}

/// Parse a whole context stream (spec §4.3) for display. Does not check
/// lengths against types (the device does that on write).
pub fn parse_context(stream: &[u8]) -> Result<CtxSummary> {
    let field_count = le32(stream, 0).ok_or_else(|| {
        Error::Protocol(format!(
            "context stream of {} bytes has no field_count",
            stream.len()
        ))
    })?;
    let mut off = 4usize;
    let mut fields = Vec::new();
    for i in 0..field_count {
        let (Some(ty), Some(length)) = (le16(stream, off), le64(stream, off + 8)) else {
            return Err(Error::Protocol(format!(
                "context stream truncated in the header of field {i} at byte {off}"
            )));
        };
        let start = off + 16;
        let end = usize::try_from(length)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&e| e <= stream.len())
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "context field {i} (type {ty:#x}) of length {length} at byte {off} runs past the stream's {} bytes",
                    stream.len()
                ))
            })?;
        let queue = match ty {
            0x2..=0x4 => le16(stream, start).filter(|_| end - start >= 2),
            _ => None,
        };
        fields.push(CtxField { ty, length, queue });
        off = end;
    }
    if off != stream.len() {
        return Err(Error::Protocol(format!(
            "{} bytes follow the last of {field_count} context fields",
            stream.len() - off
        )));
    }
    Ok(CtxSummary {
        field_count,
        fields,
    })
}

/// Parse hex bytes (`"01ff"`, `"01 ff"`, `"0x01ff"`; empty = no bytes).
pub fn parse_hex(s: &str) -> Result<Vec<u8>> {
    let t: String = s
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':' && *c != '_')
        .collect();
    if !t.len().is_multiple_of(2) {
        return Err(Error::Usage(format!(
            "hex data {s:?} has an odd number of digits"
        )));
    }
    (0..t.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&t[i..i + 2], 16)
                .map_err(|_| Error::Usage(format!("hex data {s:?} has a non-hex digit")))
        })
        .collect()
}

/// Lower-case hex of `b`.
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parse an unsigned number, decimal or `0x` hex.
pub fn parse_u64(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().replace('_', "");
    let r = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        t.parse()
    };
    r.map_err(|_| format!("{s:?} is not a number (decimal or 0x hex)"))
}

/// Parse `ADDR:PAGES` (both decimal or 0x hex).
pub fn parse_range(s: &str) -> std::result::Result<(u64, u64), String> {
    let (a, p) = s
        .split_once(':')
        .ok_or_else(|| format!("range {s:?} is not ADDR:PAGES"))?;
    Ok((parse_u64(a)?, parse_u64(p)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_devices::pf::admin as dev;
    use virtio_devices::pf::context as devctx;

    #[test]
    fn constants_match_device_model() {
        assert_eq!(HEADER_LEN, dev::ADMIN_HEADER_LEN);
        assert_eq!(STATUS_LEN, dev::ADMIN_STATUS_LEN);
        assert_eq!(GROUP_SRIOV, dev::GROUP_TYPE_SRIOV);
        assert_eq!(opcode::ALL.len(), dev::opcode::ALL.len());
        for (op, name) in opcode::ALL {
            assert!(dev::opcode::ALL.contains(&op), "{name}");
            assert_eq!(dev::opcode::name(op), Some(name));
            assert_eq!(opcode::name(op), name);
        }
        assert_eq!(opcode::name(0x0e), "OPCODE_0xe");
        let pairs = [
            (status::OK, dev::status::OK),
            (status::EAGAIN, dev::status::EAGAIN),
            (status::ENOMEM, dev::status::ENOMEM),
            (status::EBUSY, dev::status::EBUSY),
            (status::EINVAL, dev::status::EINVAL),
            (status::ENOSPC, dev::status::ENOSPC),
            (qualifier::INVALID_COMMAND, dev::qualifier::INVALID_COMMAND),
            (qualifier::INVALID_OPCODE, dev::qualifier::INVALID_OPCODE),
            (qualifier::INVALID_FIELD, dev::qualifier::INVALID_FIELD),
            (qualifier::INVALID_GROUP, dev::qualifier::INVALID_GROUP),
            (qualifier::INVALID_MEMBER, dev::qualifier::INVALID_MEMBER),
            (qualifier::NORESOURCE, dev::qualifier::NORESOURCE),
            (qualifier::TRYAGAIN, dev::qualifier::TRYAGAIN),
        ];
        for (a, b) in pairs {
            assert_eq!(a, b);
        }
        assert_eq!(devctx::FIELD_DEV_CFG, 0x1000);
        assert_eq!(field_type_name(devctx::FIELD_PCI_VQ_CFG), "PCI_VQ_CFG");
    }

    #[test]
    fn names() {
        assert_eq!(status::name(22), "EINVAL");
        assert_eq!(status::name(99), "UNKNOWN_99");
        assert_eq!(qualifier::name(5), "Q_INVALID_MEMBER");
        assert_eq!(qualifier::name(0), "Q_OK");
        assert_eq!(mode_name(2), "freeze");
        assert_eq!(mode_name(7), "unknown(7)");
        assert_eq!(Mode::parse("Stop"), Some(Mode::Stop));
        assert_eq!(Mode::parse("bogus"), None);
        assert_eq!(
            opcode::names_in(0b11 | 1 << 0x12),
            vec!["LIST_QUERY", "LIST_USE", "DEV_WRITE_RECORDS_READ"]
        );
    }

    #[test]
    fn command_encoding_parses_with_device_parser() {
        let data = wr_start_data(4096, &[(0x10_0000, 3), (0x20_0000, 1)]);
        let bytes = encode_command(opcode::DEV_WRITE_RECORDS_START, GROUP_SRIOV, 7, &data);
        assert_eq!(bytes.len(), 24 + 16 + 32);
        let cmd = dev::AdminCommand::parse(&bytes).unwrap();
        assert_eq!(cmd.opcode, opcode::DEV_WRITE_RECORDS_START);
        assert_eq!(cmd.group_type, GROUP_SRIOV);
        assert_eq!(cmd.member_id, 7);
        assert_eq!(cmd.data_u64(0), 4096);
        assert_eq!(cmd.data_u32(8), 2);
        assert_eq!(cmd.data_u64(16), 0x10_0000);
        assert_eq!(cmd.data_u64(24), 3);
        assert_eq!(cmd.data_u64(32), 0x20_0000);
        assert_eq!(cmd.data_u64(40), 1);
        let r = encode_command(
            opcode::DEV_WRITE_RECORDS_READ,
            1,
            2,
            &wr_read_data(0x5000, 0x3000),
        );
        let cmd = dev::AdminCommand::parse(&r).unwrap();
        assert_eq!((cmd.data_u64(0), cmd.data_u64(8)), (0x5000, 0x3000));
        assert_eq!(mode_set_data(2), vec![2]);
        assert_eq!(ctx_size_data(true), vec![1]);
        assert_eq!(ctx_size_data(false), vec![0]);
    }

    #[test]
    fn completion_decoding_matches_device_encoder() {
        let c = dev::AdminCompletion::ok_u32(0x1234_5678).to_bytes();
        let p = Completion::parse(&c);
        assert_eq!(p.status, 0);
        assert_eq!(p.output_u32(), 0x1234_5678);
        let e = dev::AdminCompletion::err(dev::status::EBUSY, dev::qualifier::INVALID_COMMAND);
        let p = Completion::parse(&e.to_bytes());
        assert_eq!((p.status, p.qualifier), (16, 1));
    }

    #[test]
    fn result_parsers() {
        let mut r = Vec::new();
        for (ty, len) in [(0u16, 64u64), (0x1000, 60)] {
            r.extend_from_slice(&ty.to_le_bytes());
            r.extend_from_slice(&[0; 6]);
            r.extend_from_slice(&len.to_le_bytes());
        }
        r.push(9); // partial trailing entry ignored
        let f = parse_fields(&r);
        assert_eq!(
            f,
            vec![
                FieldInfo { ty: 0, length: 64 },
                FieldInfo {
                    ty: 0x1000,
                    length: 60
                }
            ]
        );
        let cap = WrCap::parse(&[0b101, 0, 0, 0, 16, 0, 0, 0]).unwrap();
        assert_eq!(cap.page_sizes(), vec![4096, 16384]);
        assert!(cap.supports(4096) && !cap.supports(8192));
        assert_eq!(cap.supported_ranges, 16);
        assert!(WrCap::parse(&[1, 2, 3]).is_err());
        let mut a = Vec::new();
        for x in [0x1000u64, 0x3000, 0x9000] {
            a.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(parse_addresses(&a, 2), vec![0x1000, 0x3000]);
        assert_eq!(parse_addresses(&a, 10), vec![0x1000, 0x3000, 0x9000]);
    }

    #[test]
    fn context_stream_from_device_encoder_parses() {
        let ctx = devctx::MemberContext {
            common: Some(devctx::CommonCfg::default()),
            features: Some(1 << 32),
            queues: vec![
                devctx::QueueContext {
                    index: 0,
                    size: 64,
                    device_owned: vec![3, 5],
                    ..Default::default()
                },
                devctx::QueueContext {
                    index: 1,
                    size: 64,
                    ..Default::default()
                },
            ],
            device_config: Some(vec![0; 60]),
        };
        let s = ctx.to_bytes();
        let p = parse_context(&s).unwrap();
        assert_eq!(p.field_count, ctx.field_count());
        assert_eq!(p.fields.len(), p.field_count as usize);
        let own: Vec<_> = p.fields.iter().filter(|f| f.ty == 0x4).collect();
        assert_eq!(own.len(), 2);
        assert_eq!(own[0].queue, Some(0));
        assert_eq!(own[0].length, 4 + 2 * 2);
        assert_eq!(own[1].queue, Some(1));
        assert!(p.fields.iter().any(|f| f.ty == 0x1000 && f.length == 60));
        assert!(parse_context(&s[..s.len() - 1]).is_err());
        let mut extra = s.clone();
        extra.push(0);
        assert!(parse_context(&extra).is_err());
        assert!(parse_context(&[1, 0]).is_err());
    }

    #[test]
    fn fields_query_from_device_encoder_parses() {
        let limits = devctx::ContextLimits {
            num_queues: 2,
            max_queue_size: 256,
            offered_features: 1 << 32,
            device_cfg_len: 60,
            msix_vectors: 3,
        };
        let mut out = Vec::new();
        devctx::encode_supported_fields(&limits, &mut out);
        let f = parse_fields(&out);
        assert_eq!(f.len(), 6);
        assert_eq!(
            f[4],
            FieldInfo {
                ty: 4,
                length: 4 + 512
            }
        );
    }

    #[test]
    fn hex_and_numbers() {
        assert_eq!(parse_hex("").unwrap(), Vec::<u8>::new());
        assert_eq!(parse_hex("0x01ff").unwrap(), vec![1, 0xff]);
        assert_eq!(parse_hex("01 fF:00").unwrap(), vec![1, 0xff, 0]);
        assert!(parse_hex("123").is_err());
        assert!(parse_hex("zz").is_err());
        assert_eq!(to_hex(&[0, 0xab]), "00ab");
        assert_eq!(parse_u64("0x10").unwrap(), 16);
        assert_eq!(parse_u64("1_000").unwrap(), 1000);
        assert!(parse_u64("x").is_err());
        assert_eq!(parse_range("0x1000:4").unwrap(), (0x1000, 4));
        assert!(parse_range("0x1000").is_err());
    }
}
