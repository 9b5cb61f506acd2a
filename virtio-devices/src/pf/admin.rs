//! Administration command wire format (spec §3) and the descriptor-chain
//! gather/scatter that carries it (R-ADM-1b).
//!
//! ```text
//! readable:  le16 opcode | le16 group_type | u8 reserved[12] | le64 group_member_id | data…
//! writable:  le16 status | le16 status_qualifier | u8 command_specific_output[4] | result…
//! ```

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Readable header length.
pub const ADMIN_HEADER_LEN: usize = 24;
/// Writable status part length (status, qualifier, output).
pub const ADMIN_STATUS_LEN: usize = 8;
/// The SR-IOV group type.
pub const GROUP_TYPE_SRIOV: u16 = 1;

/// Most readable bytes gathered from one chain (header plus data). Longer
/// data is cut here; no command of this device needs more.
pub const MAX_READABLE: usize = ADMIN_HEADER_LEN + (1 << 20);
/// Most result bytes produced for one command.
pub const MAX_RESULT: usize = 16 << 20;

/// Opcodes (spec §3.1, the v2 draft's table).
pub mod opcode {
    /// VIRTIO_ADMIN_CMD_LIST_QUERY
    pub const LIST_QUERY: u16 = 0x00;
    /// VIRTIO_ADMIN_CMD_LIST_USE
    pub const LIST_USE: u16 = 0x01;
    /// VIRTIO_ADMIN_CMD_DEV_MODE_GET
    pub const DEV_MODE_GET: u16 = 0x07;
    /// VIRTIO_ADMIN_CMD_DEV_MODE_SET
    pub const DEV_MODE_SET: u16 = 0x08;
    /// VIRTIO_ADMIN_CMD_DEV_CTX_SIZE_GET
    pub const DEV_CTX_SIZE_GET: u16 = 0x09;
    /// VIRTIO_ADMIN_CMD_DEV_CTX_READ
    pub const DEV_CTX_READ: u16 = 0x0a;
    /// VIRTIO_ADMIN_CMD_DEV_CTX_WRITE
    pub const DEV_CTX_WRITE: u16 = 0x0b;
    /// VIRTIO_ADMIN_CMD_DEV_CTX_FIELDS_QUERY
    pub const DEV_CTX_FIELDS_QUERY: u16 = 0x0c;
    /// VIRTIO_ADMIN_CMD_DEV_CTX_DISCARD
    pub const DEV_CTX_DISCARD: u16 = 0x0d;
    /// VIRTIO_ADMIN_CMD_DEV_WRITE_RECORD_CAP_QUERY
    pub const DEV_WRITE_RECORD_CAP_QUERY: u16 = 0x0f;
    /// VIRTIO_ADMIN_CMD_DEV_WRITE_RECORDS_START
    pub const DEV_WRITE_RECORDS_START: u16 = 0x10;
    /// VIRTIO_ADMIN_CMD_DEV_WRITE_RECORDS_STOP
    pub const DEV_WRITE_RECORDS_STOP: u16 = 0x11;
    /// VIRTIO_ADMIN_CMD_DEV_WRITE_RECORDS_READ
    pub const DEV_WRITE_RECORDS_READ: u16 = 0x12;

    /// Every opcode this device implements.
    pub const ALL: [u16; 13] = [
        LIST_QUERY,
        LIST_USE,
        DEV_MODE_GET,
        DEV_MODE_SET,
        DEV_CTX_SIZE_GET,
        DEV_CTX_READ,
        DEV_CTX_WRITE,
        DEV_CTX_FIELDS_QUERY,
        DEV_CTX_DISCARD,
        DEV_WRITE_RECORD_CAP_QUERY,
        DEV_WRITE_RECORDS_START,
        DEV_WRITE_RECORDS_STOP,
        DEV_WRITE_RECORDS_READ,
    ];

    /// Name of an opcode, for logs and documentation.
    pub fn name(op: u16) -> Option<&'static str> {
        Some(match op {
            LIST_QUERY => "LIST_QUERY",
            LIST_USE => "LIST_USE",
            DEV_MODE_GET => "DEV_MODE_GET",
            DEV_MODE_SET => "DEV_MODE_SET",
            DEV_CTX_SIZE_GET => "DEV_CTX_SIZE_GET",
            DEV_CTX_READ => "DEV_CTX_READ",
            DEV_CTX_WRITE => "DEV_CTX_WRITE",
            DEV_CTX_FIELDS_QUERY => "DEV_CTX_FIELDS_QUERY",
            DEV_CTX_DISCARD => "DEV_CTX_DISCARD",
            DEV_WRITE_RECORD_CAP_QUERY => "DEV_WRITE_RECORD_CAP_QUERY",
            DEV_WRITE_RECORDS_START => "DEV_WRITE_RECORDS_START",
            DEV_WRITE_RECORDS_STOP => "DEV_WRITE_RECORDS_STOP",
            DEV_WRITE_RECORDS_READ => "DEV_WRITE_RECORDS_READ",
            _ => return None,
        })
    }
}

/// The `le64` LIST_QUERY bitmap: bit n set = opcode n supported (R-ADM-3).
pub const SUPPORTED_OPCODES: u64 = {
    let mut bits = 0u64;
    let mut i = 0;
    while i < opcode::ALL.len() {
        bits |= 1 << opcode::ALL[i];
        i += 1;
    }
    bits
};

/// Opcodes usable whatever the list in use says (R-ADM-3).
pub const ALWAYS_USABLE: u64 = (1 << opcode::LIST_QUERY) | (1 << opcode::LIST_USE);

/// Status values (virtio 1.3; ENXIO and EEXIST from virtio 1.4).
pub mod status {
    /// Success.
    pub const OK: u16 = 0;
    /// No such capability or resource object (virtio 1.4).
    pub const ENXIO: u16 = 6;
    /// Try again.
    pub const EAGAIN: u16 = 11;
    /// Out of memory.
    pub const ENOMEM: u16 = 12;
    /// Busy.
    pub const EBUSY: u16 = 16;
    /// The resource object exists already (virtio 1.4 names it; the value
    /// is the errno's, as for every other status).
    pub const EEXIST: u16 = 17;
    /// Invalid.
    pub const EINVAL: u16 = 22;
    /// No space.
    pub const ENOSPC: u16 = 28;
}

/// Status qualifiers (virtio 1.3).
pub mod qualifier {
    /// No qualifier.
    pub const OK: u16 = 0;
    /// The command is invalid in the current state.
    pub const INVALID_COMMAND: u16 = 1;
    /// Unknown or unused opcode.
    pub const INVALID_OPCODE: u16 = 2;
    /// A field of the command data is invalid.
    pub const INVALID_FIELD: u16 = 3;
    /// Invalid group type, or the group is not usable.
    pub const INVALID_GROUP: u16 = 4;
    /// Invalid member id.
    pub const INVALID_MEMBER: u16 = 5;
    /// Out of resources.
    pub const NORESOURCE: u16 = 6;
    /// Try again.
    pub const TRYAGAIN: u16 = 7;
}

/// Errors parsing an admin command header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// Fewer than 24 readable bytes.
    #[error("admin command header needs {ADMIN_HEADER_LEN} readable bytes, chain has {0}")]
    ShortHeader(usize),
}

/// A parsed admin command: header fields plus the command-specific data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminCommand<'a> {
    /// `opcode`.
    pub opcode: u16,
    /// `group_type`.
    pub group_type: u16,
    /// `group_member_id`.
    pub member_id: u64,
    /// `command_specific_data` (the readable bytes after the header).
    pub data: &'a [u8],
    /// The chain carried more than [`MAX_READABLE`] readable bytes: `data`
    /// holds only the first of them.
    pub truncated: bool,
}

impl<'a> AdminCommand<'a> {
    /// Parse the readable bytes of a command.
    pub fn parse(readable: &'a [u8]) -> Result<Self, AdminError> {
        let h = readable
            .get(..ADMIN_HEADER_LEN)
            .ok_or(AdminError::ShortHeader(readable.len()))?;
        Ok(AdminCommand {
            opcode: u16::from_le_bytes([h[0], h[1]]),
            group_type: u16::from_le_bytes([h[2], h[3]]),
            member_id: u64::from_le_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]]),
            data: &readable[ADMIN_HEADER_LEN..],
            truncated: false,
        })
    }

    /// Serialize header plus data (the driver side; used by tests/tools).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(ADMIN_HEADER_LEN + self.data.len());
        v.extend_from_slice(&self.opcode.to_le_bytes());
        v.extend_from_slice(&self.group_type.to_le_bytes());
        v.extend_from_slice(&[0u8; 12]);
        v.extend_from_slice(&self.member_id.to_le_bytes());
        v.extend_from_slice(self.data);
        v
    }

    /// Data byte `i`, zero when missing (R-ADM-1b).
    pub fn data_u8(&self, i: usize) -> u8 {
        self.data.get(i).copied().unwrap_or(0)
    }

    /// Little-endian `u16` at data offset `off`, missing bytes zero.
    pub fn data_u16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.data_u8(off), self.data_u8(off.saturating_add(1))])
    }

    /// Little-endian `u32` at data offset `off`, missing bytes zero.
    pub fn data_u32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        for (k, x) in b.iter_mut().enumerate() {
            *x = self.data_u8(off.saturating_add(k));
        }
        u32::from_le_bytes(b)
    }

    /// Little-endian `u64` at data offset `off`, missing bytes zero.
    pub fn data_u64(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        for (k, x) in b.iter_mut().enumerate() {
            *x = self.data_u8(off.saturating_add(k));
        }
        u64::from_le_bytes(b)
    }
}

/// The device-writable outcome of a command (the result bytes travel
/// separately, in the caller's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdminCompletion {
    /// `status`.
    pub status: u16,
    /// `status_qualifier`.
    pub qualifier: u16,
    /// `command_specific_output`.
    pub output: [u8; 4],
}

impl AdminCompletion {
    /// Success with no output.
    pub const fn ok() -> Self {
        AdminCompletion {
            status: status::OK,
            qualifier: qualifier::OK,
            output: [0; 4],
        }
    }

    /// Success with a `le32` output.
    pub const fn ok_u32(v: u32) -> Self {
        AdminCompletion {
            status: status::OK,
            qualifier: qualifier::OK,
            output: v.to_le_bytes(),
        }
    }

    /// Failure.
    pub const fn err(status: u16, qualifier: u16) -> Self {
        AdminCompletion {
            status,
            qualifier,
            output: [0; 4],
        }
    }

    /// The 8 status bytes.
    pub fn to_bytes(&self) -> [u8; ADMIN_STATUS_LEN] {
        let s = self.status.to_le_bytes();
        let q = self.qualifier.to_le_bytes();
        let o = self.output;
        [s[0], s[1], q[0], q[1], o[0], o[1], o[2], o[3]]
    }

    /// Parse 8 status bytes (driver side).
    pub fn from_bytes(b: &[u8; ADMIN_STATUS_LEN]) -> Self {
        AdminCompletion {
            status: u16::from_le_bytes([b[0], b[1]]),
            qualifier: u16::from_le_bytes([b[2], b[3]]),
            output: [b[4], b[5], b[6], b[7]],
        }
    }
}

/// What executing a command produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execution {
    /// Completed now; the result bytes are in the caller's buffer.
    Done(AdminCompletion),
    /// The command waits on its member (e.g. a mode change draining
    /// requests); complete it later with [`DeferredChain::complete`]
    /// (R-ADM-4: other members' commands go on meanwhile).
    Deferred {
        /// The member the command waits on.
        member: u16,
    },
}

/// Scratch buffers reused across commands (no allocation per command once
/// warmed up).
#[derive(Debug, Default)]
pub struct AdminBuffers {
    readable: Vec<u8>,
    /// Result bytes produced by the executor.
    pub result: Vec<u8>,
    writable: Vec<(GuestAddress, u32)>,
}

impl AdminBuffers {
    /// Empty buffers.
    pub fn new() -> Self {
        Self::default()
    }
}

/// A command whose completion was deferred: where to write its status and
/// result later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferredChain {
    /// Head descriptor index, for the used ring.
    pub head_index: u16,
    /// The member the command waits on.
    pub member: u16,
    writable: Vec<(GuestAddress, u32)>,
}

impl DeferredChain {
    /// Write the completion (and `result`) into the chain's writable
    /// buffers; returns the used length.
    pub fn complete<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        completion: &AdminCompletion,
        result: &[u8],
    ) -> u32 {
        scatter(mem, &self.writable, &completion.to_bytes(), result)
    }
}

/// Outcome of one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainOutcome {
    /// Put `head_index` on the used ring with this used length.
    Complete {
        /// Head descriptor index.
        head_index: u16,
        /// Bytes written into the writable part (0 for a malformed chain).
        used_len: u32,
    },
    /// Completion deferred; keep it and complete it later.
    Deferred(DeferredChain),
}

/// Write `head` then `result` across `writable`, in order, truncating to
/// the space there is. Returns the bytes written. Every write goes through
/// `Bytes` on `mem`, so the dirty log and write records see it.
fn scatter<M: GuestMemory + ?Sized>(
    mem: &M,
    writable: &[(GuestAddress, u32)],
    head: &[u8],
    result: &[u8],
) -> u32 {
    let mut written: u64 = 0;
    let mut src_head = head;
    let mut src_res = result;
    for &(addr, len) in writable {
        let mut room = len as usize;
        let mut at = addr;
        for src in [&mut src_head, &mut src_res] {
            if room == 0 || src.is_empty() {
                continue;
            }
            let n = room.min(src.len());
            if mem.write_slice(&src[..n], at).is_err() {
                return written as u32;
            }
            written += n as u64;
            room -= n;
            *src = &src[n..];
            at = match at.0.checked_add(n as u64) {
                Some(a) => GuestAddress(a),
                None => return written as u32,
            };
        }
        if src_head.is_empty() && src_res.is_empty() {
            break;
        }
    }
    u32::try_from(written).unwrap_or(u32::MAX)
}

/// Gather the readable bytes of `chain`, run `exec` on the parsed command,
/// scatter the completion and result into the writable bytes, whatever the
/// layout (R-ADM-1b): header, data, status and result in any number of
/// chained or indirect descriptors of any sizes. Readable bytes past
/// [`MAX_READABLE`] are not gathered; a result longer than the writable
/// part is truncated. A chain with fewer than 24 readable or 8 writable
/// bytes, or whose readable buffers cannot be read, is malformed: it
/// completes with used length 0 and `exec` is not called. Descriptor loops
/// end because the chain iterator visits at most queue-size (or
/// indirect-table-size) descriptors.
pub fn process_chain<M, F>(
    chain: DescriptorChain<M>,
    bufs: &mut AdminBuffers,
    exec: F,
) -> ChainOutcome
where
    M: Deref + Clone,
    M::Target: GuestMemory,
    F: FnOnce(&AdminCommand<'_>, &mut Vec<u8>, usize) -> Execution,
{
    let head_index = chain.head_index();
    let malformed = ChainOutcome::Complete {
        head_index,
        used_len: 0,
    };
    let mem = chain.memory();
    bufs.readable.clear();
    bufs.writable.clear();
    bufs.result.clear();
    let mut readable_total: u64 = 0;
    let mut writable_total: u64 = 0;
    let mut read_failed = false;
    for desc in chain.clone() {
        let len = desc.len();
        if desc.is_write_only() {
            writable_total += u64::from(len);
            if len > 0 {
                bufs.writable.push((desc.addr(), len));
            }
        } else {
            readable_total += u64::from(len);
            let have = bufs.readable.len();
            let take = (len as usize).min(MAX_READABLE - have);
            if take > 0 {
                bufs.readable.resize(have + take, 0);
                if mem
                    .read_slice(&mut bufs.readable[have..], desc.addr())
                    .is_err()
                {
                    read_failed = true;
                    break;
                }
            }
        }
    }
    if read_failed
        || readable_total < ADMIN_HEADER_LEN as u64
        || writable_total < ADMIN_STATUS_LEN as u64
    {
        return malformed;
    }
    let Ok(mut cmd) = AdminCommand::parse(&bufs.readable) else {
        return malformed;
    };
    cmd.truncated = readable_total > MAX_READABLE as u64;
    let cap = usize::try_from(writable_total - ADMIN_STATUS_LEN as u64)
        .unwrap_or(usize::MAX)
        .min(MAX_RESULT);
    match exec(&cmd, &mut bufs.result, cap) {
        Execution::Done(c) => {
            let res_len = bufs.result.len().min(cap);
            let used_len = scatter(mem, &bufs.writable, &c.to_bytes(), &bufs.result[..res_len]);
            ChainOutcome::Complete {
                head_index,
                used_len,
            }
        }
        Execution::Deferred { member } => ChainOutcome::Deferred(DeferredChain {
            head_index,
            member,
            writable: bufs.writable.clone(),
        }),
    }
}
