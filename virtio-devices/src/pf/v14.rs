//! The `virtio-1.4` admin dialect: the published virtio 1.4 commands for
//! device parts, as Linux's `virtio_vfio_pci` driver sends them.
//!
//! Opcodes 0x7..0x11 mean here what virtio 1.4 says (capabilities, resource
//! objects, device parts, device mode), not the draft's. Both dialects run
//! on the same member state ([`Member`], [`MigrationState`]): "stopped" is
//! the draft's Stop, a device parts image is the same [`MemberContext`] the
//! draft streams as TLV fields ([`super::parts`]), and DEV_PARTS_SET stages
//! the context the draft's DEV_CTX_WRITE would, applied when the member
//! becomes Active.
//!
//! Choices where the specification is silent or where Linux departs from
//! it (docs/admin-commands.md lists them for users):
//! * LIST_QUERY / LIST_USE of the SR-IOV group succeed with VF Enable clear
//!   and any member id: Linux sends them at DRIVER_OK, before any VF exists.
//! * Capability commands 0x7..0x9 are self-group commands; the same commands
//!   with the SR-IOV group (which older Linux sends, member 0) are taken as
//!   self-group commands. Until a LIST_USE names the self group (Linux
//!   never sends one), its list in use is LIST_QUERY, LIST_USE and what the
//!   SR-IOV group's list names.
//! * RESOURCE_OBJ_QUERY is 0xb and MODIFY 0xc (the opcode table; the
//!   paragraphs swap them). EEXIST is 17.
//! * A dev-parts object belongs to the member that created it; it survives
//!   that member's reset and FLR and goes at PF reset or when its member
//!   goes away (VF Enable cleared).

use std::collections::BTreeMap;

use super::admin::{qualifier, status, AdminCommand, AdminCompletion, Execution};
use super::migration::{addressed_member, set_mode, Member, MemberDevice, MemberTable, Mode};
use super::parts::{self, PartHeader, PART_HEADER_LEN};

/// Opcodes of the virtio 1.4 table.
pub mod opcode {
    /// LIST_QUERY.
    pub const LIST_QUERY: u16 = 0x0;
    /// LIST_USE.
    pub const LIST_USE: u16 = 0x1;
    /// CAP_ID_LIST_QUERY.
    pub const CAP_ID_LIST_QUERY: u16 = 0x7;
    /// DEVICE_CAP_GET.
    pub const DEVICE_CAP_GET: u16 = 0x8;
    /// DRIVER_CAP_SET.
    pub const DRIVER_CAP_SET: u16 = 0x9;
    /// RESOURCE_OBJ_CREATE.
    pub const RESOURCE_OBJ_CREATE: u16 = 0xa;
    /// RESOURCE_OBJ_QUERY (the table's number).
    pub const RESOURCE_OBJ_QUERY: u16 = 0xb;
    /// RESOURCE_OBJ_MODIFY (the table's number).
    pub const RESOURCE_OBJ_MODIFY: u16 = 0xc;
    /// RESOURCE_OBJ_DESTROY.
    pub const RESOURCE_OBJ_DESTROY: u16 = 0xd;
    /// DEV_PARTS_METADATA_GET.
    pub const DEV_PARTS_METADATA_GET: u16 = 0xe;
    /// DEV_PARTS_GET.
    pub const DEV_PARTS_GET: u16 = 0xf;
    /// DEV_PARTS_SET.
    pub const DEV_PARTS_SET: u16 = 0x10;
    /// DEV_MODE_SET.
    pub const DEV_MODE_SET: u16 = 0x11;

    /// Every opcode of this dialect.
    pub const ALL: [u16; 13] = [
        LIST_QUERY,
        LIST_USE,
        CAP_ID_LIST_QUERY,
        DEVICE_CAP_GET,
        DRIVER_CAP_SET,
        RESOURCE_OBJ_CREATE,
        RESOURCE_OBJ_QUERY,
        RESOURCE_OBJ_MODIFY,
        RESOURCE_OBJ_DESTROY,
        DEV_PARTS_METADATA_GET,
        DEV_PARTS_GET,
        DEV_PARTS_SET,
        DEV_MODE_SET,
    ];

    /// Name of a virtio 1.4 opcode.
    pub fn name(op: u16) -> &'static str {
        match op {
            LIST_QUERY => "LIST_QUERY",
            LIST_USE => "LIST_USE",
            CAP_ID_LIST_QUERY => "CAP_ID_LIST_QUERY",
            DEVICE_CAP_GET => "DEVICE_CAP_GET",
            DRIVER_CAP_SET => "DRIVER_CAP_SET",
            RESOURCE_OBJ_CREATE => "RESOURCE_OBJ_CREATE",
            RESOURCE_OBJ_QUERY => "RESOURCE_OBJ_QUERY",
            RESOURCE_OBJ_MODIFY => "RESOURCE_OBJ_MODIFY",
            RESOURCE_OBJ_DESTROY => "RESOURCE_OBJ_DESTROY",
            DEV_PARTS_METADATA_GET => "DEV_PARTS_METADATA_GET",
            DEV_PARTS_GET => "DEV_PARTS_GET",
            DEV_PARTS_SET => "DEV_PARTS_SET",
            DEV_MODE_SET => "DEV_MODE_SET",
            _ => "unknown",
        }
    }
}

const fn bits(ops: &[u16]) -> u64 {
    let mut b = 0u64;
    let mut i = 0;
    while i < ops.len() {
        b |= 1 << ops[i];
        i += 1;
    }
    b
}

/// Group type "self" (the owner device itself).
pub const GROUP_TYPE_SELF: u16 = 0;
/// Group type SR-IOV.
pub const GROUP_TYPE_SRIOV: u16 = 1;

/// Commands of the self group.
pub const SELF_OPCODES: u64 = bits(&[
    opcode::LIST_QUERY,
    opcode::LIST_USE,
    opcode::CAP_ID_LIST_QUERY,
    opcode::DEVICE_CAP_GET,
    opcode::DRIVER_CAP_SET,
]);

/// Commands of the SR-IOV group: the capability commands too, which Linux
/// requires in this list before it offers migration (0x3ff83).
pub const SRIOV_OPCODES: u64 = bits(&opcode::ALL);

/// Capability id of VIRTIO_DEV_PARTS_CAP.
pub const CAP_DEV_PARTS: u16 = 0;
/// Resource object type of device parts.
pub const OBJ_DEV_PARTS: u16 = 0;
/// Device limit of GET objects, and of SET objects (each at most 255).
pub const DEVICE_OBJECT_LIMIT: u8 = 128;

/// Purpose of a device parts object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Purpose {
    /// Reads parts and metadata (type 0).
    Get,
    /// Sets parts (type 1).
    Set,
}

impl Purpose {
    fn from_u8(v: u8) -> Option<Purpose> {
        match v {
            0 => Some(Purpose::Get),
            1 => Some(Purpose::Set),
            _ => None,
        }
    }

    fn wire(self) -> u8 {
        match self {
            Purpose::Get => 0,
            Purpose::Set => 1,
        }
    }
}

/// A device parts object: its purpose and the member it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartsObject {
    /// GET or SET.
    pub purpose: Purpose,
    /// Member (VF number) that created it.
    pub member: u16,
}

/// State of the virtio 1.4 dialect of one PF: lists in use, driver
/// capability, resource objects. Serializable for the VMM's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct V14State {
    /// The SR-IOV group's list in use; `None` after reset: {0x0, 0x1}.
    pub sriov_in_use: Option<u64>,
    /// The self group's list in use; `None`: LIST_QUERY, LIST_USE and
    /// what the SR-IOV group's list names.
    pub self_in_use: Option<u64>,
    /// Driver limit of GET objects (DRIVER_CAP_SET; 0 until set).
    pub get_limit: u8,
    /// Driver limit of SET objects.
    pub set_limit: u8,
    /// Device parts objects by id.
    pub objects: BTreeMap<u32, PartsObject>,
}

const AFTER_RESET: u64 = bits(&[opcode::LIST_QUERY, opcode::LIST_USE]);

fn einval(q: u16) -> Execution {
    Execution::Done(AdminCompletion::err(status::EINVAL, q))
}

fn fail(st: u16, q: u16) -> Execution {
    Execution::Done(AdminCompletion::err(st, q))
}

fn ok() -> Execution {
    Execution::Done(AdminCompletion::ok())
}

impl V14State {
    /// PF reset: lists back to {0x0, 0x1}, driver capability cleared, every
    /// object destroyed (R14-GRP-8, R14-CAP-8, R14-OBJ-11).
    pub fn reset(&mut self) {
        *self = V14State::default();
    }

    /// Objects of members that no longer exist go (VF Enable cleared or
    /// NumVFs lowered).
    pub fn forget_members_above(&mut self, num_vfs: u16) {
        self.objects.retain(|_, o| o.member <= num_vfs);
    }

    fn in_use(&self, group: u16) -> u64 {
        match group {
            GROUP_TYPE_SELF => {
                self.self_in_use
                    .unwrap_or(AFTER_RESET | self.sriov_in_use.unwrap_or(0))
                    & SELF_OPCODES
            }
            _ => self.sriov_in_use.unwrap_or(AFTER_RESET),
        }
    }

    fn count(&self, purpose: Purpose) -> usize {
        self.objects
            .values()
            .filter(|o| o.purpose == purpose)
            .count()
    }

    fn limit(&self, purpose: Purpose) -> u8 {
        match purpose {
            Purpose::Get => self.get_limit,
            Purpose::Set => self.set_limit,
        }
    }

    /// Execute one command of this dialect.
    pub fn execute<T: MemberTable>(
        &mut self,
        table: &mut T,
        cmd: &AdminCommand<'_>,
        result: &mut Vec<u8>,
        cap: usize,
    ) -> Execution {
        result.clear();
        // R14-GRP-1: group type first.
        let capability = matches!(
            cmd.opcode,
            opcode::CAP_ID_LIST_QUERY | opcode::DEVICE_CAP_GET | opcode::DRIVER_CAP_SET
        );
        let group = match cmd.group_type {
            GROUP_TYPE_SELF => GROUP_TYPE_SELF,
            // Older Linux sends the capability commands to the SR-IOV group.
            GROUP_TYPE_SRIOV if capability => GROUP_TYPE_SELF,
            GROUP_TYPE_SRIOV => GROUP_TYPE_SRIOV,
            _ => return einval(qualifier::INVALID_GROUP),
        };
        let supported = if group == GROUP_TYPE_SELF {
            SELF_OPCODES
        } else {
            SRIOV_OPCODES
        };
        // R14-GRP-10: opcode supported and in the list in use.
        if cmd.opcode >= 64 || supported & self.in_use(group) & (1 << cmd.opcode) == 0 {
            return einval(qualifier::INVALID_OPCODE);
        }
        match cmd.opcode {
            opcode::LIST_QUERY => {
                result.extend_from_slice(&supported.to_le_bytes());
                return ok();
            }
            opcode::LIST_USE => {
                let list = cmd.data_u64(0);
                if cmd.data.iter().skip(8).any(|b| *b != 0) || list & !supported != 0 {
                    return einval(qualifier::INVALID_FIELD);
                }
                match group {
                    GROUP_TYPE_SELF => self.self_in_use = Some(list),
                    _ => self.sriov_in_use = Some(list),
                }
                return ok();
            }
            opcode::CAP_ID_LIST_QUERY => {
                result.extend_from_slice(&(1u64 << CAP_DEV_PARTS).to_le_bytes());
                return ok();
            }
            opcode::DEVICE_CAP_GET => {
                if cmd.data_u16(0) != CAP_DEV_PARTS {
                    return fail(status::ENXIO, qualifier::INVALID_FIELD);
                }
                result.extend_from_slice(&[DEVICE_OBJECT_LIMIT, DEVICE_OBJECT_LIMIT]);
                return ok();
            }
            opcode::DRIVER_CAP_SET => return self.driver_cap_set(cmd),
            _ => {}
        }
        // Commands that address a member (R14-GRP-13/14).
        let (id, m) = match addressed_member(table, cmd) {
            Ok(x) => x,
            Err(e) => return e,
        };
        match cmd.opcode {
            opcode::RESOURCE_OBJ_CREATE => self.create(id, cmd),
            opcode::RESOURCE_OBJ_QUERY => match self.object(id, cmd) {
                Ok((_, o)) => {
                    result.extend_from_slice(&[o.purpose.wire(), 0, 0, 0, 0, 0, 0, 0]);
                    ok()
                }
                Err(e) => e,
            },
            opcode::RESOURCE_OBJ_MODIFY => self.modify(id, cmd),
            opcode::RESOURCE_OBJ_DESTROY => match self.object(id, cmd) {
                Ok((oid, _)) => {
                    self.objects.remove(&oid);
                    ok()
                }
                Err(e) => e,
            },
            opcode::DEV_PARTS_METADATA_GET => match self.object_for(id, cmd, Purpose::Get) {
                Ok(()) => metadata_get(m, cmd, result, cap),
                Err(e) => e,
            },
            opcode::DEV_PARTS_GET => match self.object_for(id, cmd, Purpose::Get) {
                Ok(()) => parts_get(m, cmd, result, cap),
                Err(e) => e,
            },
            opcode::DEV_PARTS_SET => match self.object_for(id, cmd, Purpose::Set) {
                Ok(()) => parts_set(m, id, cmd),
                Err(e) => e,
            },
            opcode::DEV_MODE_SET => match cmd.data_u8(0) {
                0 => set_mode(m, id, Mode::Active),
                1 => match m.mode() {
                    // Stopped already (R14-MODE-13); a draft Freeze cannot
                    // happen in this dialect.
                    Mode::Stop | Mode::Freeze => ok(),
                    Mode::Active => set_mode(m, id, Mode::Stop),
                },
                _ => einval(qualifier::INVALID_FIELD),
            },
            _ => einval(qualifier::INVALID_OPCODE),
        }
    }

    fn driver_cap_set(&mut self, cmd: &AdminCommand<'_>) -> Execution {
        if cmd.data_u16(0) != CAP_DEV_PARTS {
            return fail(status::ENXIO, qualifier::INVALID_FIELD);
        }
        let (get, set) = (cmd.data_u8(8), cmd.data_u8(9));
        if get > DEVICE_OBJECT_LIMIT || set > DEVICE_OBJECT_LIMIT {
            return einval(qualifier::INVALID_FIELD);
        }
        // Shrinking below the objects that exist (R14-CAP-6).
        let too_small = |limit: u8, purpose: Purpose| {
            self.objects
                .iter()
                .any(|(id, o)| o.purpose == purpose && *id >= u32::from(limit))
        };
        if too_small(get, Purpose::Get) || too_small(set, Purpose::Set) {
            return fail(status::EBUSY, qualifier::INVALID_COMMAND);
        }
        self.get_limit = get;
        self.set_limit = set;
        ok()
    }

    /// The object a command names (header: le16 type, 2 reserved, le32 id),
    /// if it exists and belongs to `member`.
    fn object(&self, member: u16, cmd: &AdminCommand<'_>) -> Result<(u32, PartsObject), Execution> {
        if cmd.data_u16(0) != OBJ_DEV_PARTS {
            return Err(einval(qualifier::INVALID_FIELD));
        }
        let id = cmd.data_u32(4);
        match self.objects.get(&id) {
            Some(o) if o.member == member => Ok((id, *o)),
            _ => Err(fail(status::ENXIO, qualifier::INVALID_FIELD)),
        }
    }

    fn object_for(
        &self,
        member: u16,
        cmd: &AdminCommand<'_>,
        purpose: Purpose,
    ) -> Result<(), Execution> {
        let (_, o) = self.object(member, cmd)?;
        if o.purpose != purpose {
            return Err(einval(qualifier::INVALID_FIELD));
        }
        Ok(())
    }

    fn create(&mut self, member: u16, cmd: &AdminCommand<'_>) -> Execution {
        if cmd.data_u16(0) != OBJ_DEV_PARTS || cmd.data_u64(8) != 0 {
            return einval(qualifier::INVALID_FIELD);
        }
        let Some(purpose) = Purpose::from_u8(cmd.data_u8(16)) else {
            return einval(qualifier::INVALID_FIELD);
        };
        let id = cmd.data_u32(4);
        if self.objects.contains_key(&id) {
            return fail(status::EEXIST, qualifier::INVALID_FIELD);
        }
        let limit = self.limit(purpose);
        if id >= u32::from(limit) {
            return einval(qualifier::INVALID_FIELD);
        }
        if self.count(purpose) >= usize::from(limit) {
            return fail(status::ENOSPC, qualifier::NORESOURCE);
        }
        self.objects.insert(id, PartsObject { purpose, member });
        ok()
    }

    fn modify(&mut self, member: u16, cmd: &AdminCommand<'_>) -> Execution {
        let (id, o) = match self.object(member, cmd) {
            Ok(x) => x,
            Err(e) => return e,
        };
        if cmd.data_u64(8) != 0 {
            return einval(qualifier::INVALID_FIELD);
        }
        let Some(purpose) = Purpose::from_u8(cmd.data_u8(16)) else {
            return einval(qualifier::INVALID_FIELD);
        };
        if purpose != o.purpose {
            if id >= u32::from(self.limit(purpose)) {
                return einval(qualifier::INVALID_FIELD);
            }
            if self.count(purpose) >= usize::from(self.limit(purpose)) {
                return fail(status::ENOSPC, qualifier::NORESOURCE);
            }
        }
        self.objects.insert(id, PartsObject { purpose, member });
        ok()
    }
}

/// Metadata types of DEV_PARTS_METADATA_GET.
const METADATA_SIZE: u8 = 0;
const METADATA_COUNT: u8 = 1;
const METADATA_LIST: u8 = 2;

fn metadata_get<D: MemberDevice>(
    m: &mut Member<D>,
    cmd: &AdminCommand<'_>,
    result: &mut Vec<u8>,
    cap: usize,
) -> Execution {
    let limits = m.device.context_limits();
    match cmd.data_u8(8) {
        METADATA_SIZE => {
            result.extend_from_slice(&(parts::all_parts_len(&limits) as u32).to_le_bytes());
            result.extend_from_slice(&[0; 4]);
            ok()
        }
        kind @ (METADATA_COUNT | METADATA_LIST) => {
            let all = parts::parts_of(&m.device.capture_context(), &limits);
            if kind == METADATA_LIST && cap < 8 + PART_HEADER_LEN * all.len() {
                return fail(status::ENOMEM, qualifier::NORESOURCE);
            }
            result.extend_from_slice(&(all.len() as u32).to_le_bytes());
            result.extend_from_slice(&[0; 4]);
            if kind == METADATA_LIST {
                for (h, _) in &all {
                    result.extend_from_slice(&h.to_bytes());
                }
            }
            ok()
        }
        _ => einval(qualifier::INVALID_FIELD),
    }
}

/// DEV_PARTS_GET types.
const GET_SELECTED: u8 = 0;
const GET_ALL: u8 = 1;

fn parts_get<D: MemberDevice>(
    m: &mut Member<D>,
    cmd: &AdminCommand<'_>,
    result: &mut Vec<u8>,
    cap: usize,
) -> Execution {
    let limits = m.device.context_limits();
    let selected: Option<Vec<(u16, u64)>> = match cmd.data_u8(8) {
        GET_ALL => None,
        GET_SELECTED => Some(
            cmd.data
                .get(16..)
                .unwrap_or(&[])
                .chunks_exact(PART_HEADER_LEN)
                .filter_map(PartHeader::parse)
                .map(|h| h.key())
                .collect(),
        ),
        _ => return einval(qualifier::INVALID_FIELD),
    };
    let all = parts::parts_of(&m.device.capture_context(), &limits);
    parts::encode(&all, selected.as_deref(), result);
    if result.len() > cap {
        // Never a part cut in half: the whole answer or ENOMEM.
        result.clear();
        return fail(status::ENOMEM, qualifier::NORESOURCE);
    }
    ok()
}

fn parts_set<D: MemberDevice>(m: &mut Member<D>, id: u16, cmd: &AdminCommand<'_>) -> Execution {
    if m.mode() == Mode::Active {
        return einval(qualifier::INVALID_COMMAND);
    }
    if cmd.truncated {
        return fail(status::ENOMEM, qualifier::NORESOURCE);
    }
    let limits = m.device.context_limits();
    let img = match parts::decode(cmd.data.get(8..).unwrap_or(&[]), &limits) {
        Ok(img) => img,
        Err(e) => {
            log::debug!("member {id}: device parts refused: {e}");
            return einval(qualifier::INVALID_FIELD);
        }
    };
    // Over what an earlier SET staged, else over the member's own state;
    // the last value of each part wins (R14-PARTS-5).
    let base = match m.migration.pending_context() {
        Some(c) => c.clone(),
        None => m.device.capture_context(),
    };
    let mut ctx = img.apply_to(&base);
    // Device-owned heads belong to the draft's streams only.
    for q in &mut ctx.queues {
        q.device_owned.clear();
    }
    if let Err(e) = ctx.validate(&limits) {
        log::debug!("member {id}: device parts refused: {e}");
        return einval(qualifier::INVALID_FIELD);
    }
    m.migration.stage_context(ctx);
    ok()
}
