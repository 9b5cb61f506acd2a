//! The admin command reference, kept next to the code: `docs/admin-commands.md`
//! is generated from [`markdown`] and a unit test checks it stays equal
//! (regenerate with `UPDATE_DOCS=1 cargo test -p virtio-devices pf::`).

use super::admin::opcode;
use super::context::{
    COMMON_CFG_LEN, FIELD_DEV_CFG, FIELD_DEV_FEATURES, FIELD_PCI_COMMON_CFG, FIELD_PCI_VQ_CFG,
    FIELD_VQ_SPLIT_DEV_OWN_DESC, FIELD_VQ_SPLIT_RUNTIME_CFG, MAX_FEATURE_WORDS, VQ_CFG_LEN,
    VQ_RUNTIME_LEN,
};
use super::{parts, v14};

/// One command's documentation.
#[derive(Debug, Clone, Copy)]
pub struct CommandDoc {
    /// Opcode.
    pub opcode: u16,
    /// Addresses a member (`group_member_id` checked).
    pub member: bool,
    /// `command_specific_data`.
    pub data: &'static str,
    /// `command_specific_output`.
    pub output: &'static str,
    /// `command_specific_result`.
    pub result: &'static str,
    /// Command-specific failures (besides R-ADM-1's).
    pub errors: &'static str,
}

/// Every command of the device.
pub const COMMANDS: [CommandDoc; 13] = [
    CommandDoc {
        opcode: opcode::LIST_QUERY,
        member: false,
        data: "none",
        output: "none",
        result: "`le64` bitmap of supported opcodes (bit n = opcode n)",
        errors: "none",
    },
    CommandDoc {
        opcode: opcode::LIST_USE,
        member: false,
        data: "`le64[]` bitmap of opcodes the driver will use (missing bytes = 0)",
        output: "none",
        result: "none",
        errors: "EINVAL/Q_INVALID_FIELD if a bit names an unsupported opcode (list unchanged)",
    },
    CommandDoc {
        opcode: opcode::DEV_MODE_GET,
        member: true,
        data: "none",
        output: "none",
        result: "`u8 mode` (0 Active, 1 Stop, 2 Freeze)",
        errors: "EAGAIN/Q_TRYAGAIN while a mode change of the member is in progress (all member commands)",
    },
    CommandDoc {
        opcode: opcode::DEV_MODE_SET,
        member: true,
        data: "`u8 mode`",
        output: "none",
        result: "none",
        errors: "EINVAL/Q_INVALID_FIELD for mode > 2; EBUSY/Q_INVALID_COMMAND for Active or Stop while a context read or write is partial; EINVAL/Q_INVALID_FIELD if the member cannot apply the written context. May complete later than commands of other members (it waits for the member to quiesce).",
    },
    CommandDoc {
        opcode: opcode::DEV_CTX_SIZE_GET,
        member: true,
        data: "`u8 freeze_mode` (0 or 1)",
        output: "none",
        result: "`le64 size`: bytes left of the current mode's stream (0 once read), or with freeze_mode = 1 outside Freeze the size of a whole stream now",
        errors: "EINVAL/Q_INVALID_FIELD for freeze_mode > 1",
    },
    CommandDoc {
        opcode: opcode::DEV_CTX_READ,
        member: true,
        data: "none",
        output: "`le32 context_len`: bytes returned",
        result: "the next bytes of the context stream (snapshot taken at the first read of a mode; 0 bytes once fully read, until the mode changes)",
        errors: "none",
    },
    CommandDoc {
        opcode: opcode::DEV_CTX_WRITE,
        member: true,
        data: "the next bytes of a context stream (any split)",
        output: "none",
        result: "none",
        errors: "EINVAL/Q_INVALID_COMMAND outside Freeze; EINVAL/Q_INVALID_FIELD for an unknown field type, a wrong length, an inapplicable value, a duplicate field, too many fields or bytes after the stream's end (nothing changes)",
    },
    CommandDoc {
        opcode: opcode::DEV_CTX_FIELDS_QUERY,
        member: true,
        data: "none",
        output: "none",
        result: "`{le16 type; u8 reserved[6]; le64 length}` per supported field type",
        errors: "none",
    },
    CommandDoc {
        opcode: opcode::DEV_CTX_DISCARD,
        member: true,
        data: "none",
        output: "none",
        result: "none",
        errors: "none (drops a partial read and a partial write)",
    },
    CommandDoc {
        opcode: opcode::DEV_WRITE_RECORD_CAP_QUERY,
        member: true,
        data: "none",
        output: "none",
        result: "`le32 supported_page_size_bitmap` (0x211: 4 KiB, 64 KiB, 2 MiB); `le32 supported_ranges` (64)",
        errors: "none",
    },
    CommandDoc {
        opcode: opcode::DEV_WRITE_RECORDS_START,
        member: true,
        data: "`le64 page_size; le32 count; u8 reserved[4]; {le64 page_address; le64 page_count} entries[count]`",
        output: "none",
        result: "none",
        errors: "EINVAL/Q_INVALID_FIELD for an unsupported page size, no entries, an unaligned address, a zero or wrapping page count, overlap with another range, or more than supported_ranges in total (nothing started)",
    },
    CommandDoc {
        opcode: opcode::DEV_WRITE_RECORDS_STOP,
        member: true,
        data: "none",
        output: "none",
        result: "none",
        errors: "none (always succeeds; drops all ranges and records)",
    },
    CommandDoc {
        opcode: opcode::DEV_WRITE_RECORDS_READ,
        member: true,
        data: "`le64 page_address; le64 length` (4 KiB aligned)",
        output: "`le32 count`: records returned",
        result: "`le64 address_entries[count]`, ascending, as many as fit; those are cleared",
        errors: "EINVAL/Q_INVALID_COMMAND if recording is not started; EINVAL/Q_INVALID_FIELD for an unaligned or wrapping window",
    },
];

/// Every command of the `virtio-1.4` dialect ([`super::v14`]).
pub const COMMANDS_V14: [CommandDoc; 13] = [
    CommandDoc {
        opcode: v14::opcode::LIST_QUERY,
        member: false,
        data: "none",
        output: "none",
        result: "`le64` bitmap: SR-IOV group 0x3ff83, self group 0x383",
        errors: "none",
    },
    CommandDoc {
        opcode: v14::opcode::LIST_USE,
        member: false,
        data: "`le64[]` bitmap of the opcodes the driver will use in this group (exactly this list afterwards; it may leave out 0x0/0x1, as Linux does)",
        output: "none",
        result: "none",
        errors: "EINVAL/Q_INVALID_FIELD for an opcode the group does not support",
    },
    CommandDoc {
        opcode: v14::opcode::CAP_ID_LIST_QUERY,
        member: false,
        data: "none (self group; the SR-IOV group is taken as self, as older Linux sends it)",
        output: "none",
        result: "`le64` bitmap of capability ids: 0x1 (VIRTIO_DEV_PARTS_CAP)",
        errors: "none",
    },
    CommandDoc {
        opcode: v14::opcode::DEVICE_CAP_GET,
        member: false,
        data: "`le16 id; u8 reserved[6]`",
        output: "none",
        result: "id 0: `u8 get_parts_resource_objects_limit; u8 set_parts_resource_objects_limit` (128, 128)",
        errors: "ENXIO/Q_INVALID_FIELD for an id other than 0",
    },
    CommandDoc {
        opcode: v14::opcode::DRIVER_CAP_SET,
        member: false,
        data: "`le16 id; u8 reserved[6]` + id 0: `u8 get_limit; u8 set_limit`",
        output: "none",
        result: "none",
        errors: "ENXIO/Q_INVALID_FIELD for an id other than 0; EINVAL/Q_INVALID_FIELD above the device's limits; EBUSY/Q_INVALID_COMMAND below the id of an existing object",
    },
    CommandDoc {
        opcode: v14::opcode::RESOURCE_OBJ_CREATE,
        member: true,
        data: "`le16 type (0 = device parts); u8 reserved[2]; le32 id; le64 flags (0); u8 purpose (0 GET, 1 SET); u8 reserved[7]`",
        output: "none",
        result: "none",
        errors: "EEXIST(17)/Q_INVALID_FIELD if the id exists; EINVAL/Q_INVALID_FIELD for another type, flags, purpose, or an id not below the driver's limit for the purpose (0 until DRIVER_CAP_SET); ENOSPC/Q_NORESOURCE when that many objects of the purpose exist",
    },
    CommandDoc {
        opcode: v14::opcode::RESOURCE_OBJ_QUERY,
        member: true,
        data: "`le16 type; u8 reserved[2]; le32 id; le64 flags`",
        output: "none",
        result: "`u8 purpose; u8 reserved[7]`",
        errors: "ENXIO/Q_INVALID_FIELD if the member has no such object",
    },
    CommandDoc {
        opcode: v14::opcode::RESOURCE_OBJ_MODIFY,
        member: true,
        data: "as RESOURCE_OBJ_CREATE",
        output: "none",
        result: "none",
        errors: "ENXIO/Q_INVALID_FIELD if the member has no such object; as RESOURCE_OBJ_CREATE for the new values (the object is unchanged on failure)",
    },
    CommandDoc {
        opcode: v14::opcode::RESOURCE_OBJ_DESTROY,
        member: true,
        data: "`le16 type; u8 reserved[2]; le32 id`",
        output: "none",
        result: "none",
        errors: "ENXIO/Q_INVALID_FIELD if the member has no such object",
    },
    CommandDoc {
        opcode: v14::opcode::DEV_PARTS_METADATA_GET,
        member: true,
        data: "object header (a GET object) + `u8 type (0 SIZE, 1 COUNT, 2 LIST); u8 reserved[7]`",
        output: "none",
        result: "`le32 size|count; u8 reserved[4]` + for LIST the part headers",
        errors: "ENXIO for no such object, EINVAL/Q_INVALID_FIELD for a SET object or another type; ENOMEM/Q_NORESOURCE if the LIST does not fit",
    },
    CommandDoc {
        opcode: v14::opcode::DEV_PARTS_GET,
        member: true,
        data: "object header (a GET object) + `u8 type (0 SELECTED, 1 ALL); u8 reserved[7]` + for SELECTED the part headers wanted",
        output: "none",
        result: "the parts, in mandatory order (allowed while running)",
        errors: "as METADATA_GET; ENOMEM/Q_NORESOURCE if the parts do not fit (never half a part)",
    },
    CommandDoc {
        opcode: v14::opcode::DEV_PARTS_SET,
        member: true,
        data: "object header (a SET object) + parts",
        output: "none",
        result: "none",
        errors: "EINVAL/Q_INVALID_COMMAND unless stopped; EINVAL/Q_INVALID_FIELD for a part cut short, a length not the device's, an unknown mandatory part, a duplicate, DEV_FEATURES/num_queues/notify values not the device's, features not offered, a bad queue size or vector (nothing staged)",
    },
    CommandDoc {
        opcode: v14::opcode::DEV_MODE_SET,
        member: true,
        data: "`u8 flags`: 0x01 stop, 0x00 run",
        output: "none",
        result: "none",
        errors: "EINVAL/Q_INVALID_FIELD for other bits; EINVAL/Q_INVALID_FIELD if the member cannot apply the staged parts (it stays stopped). A stop completes once the member's requests in flight have; meanwhile that member's commands get EAGAIN/Q_TRYAGAIN",
    },
];

fn table(s: &mut String, commands: &[CommandDoc], name: fn(u16) -> &'static str) {
    s.push_str("| opcode | name | member | data | output | result | errors |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for c in commands {
        s.push_str(&format!(
            "| {:#04x} | {} | {} | {} | {} | {} | {} |\n",
            c.opcode,
            name(c.opcode),
            if c.member { "yes" } else { "no" },
            c.data,
            c.output,
            c.result,
            c.errors
        ));
    }
}

/// The reference as Markdown.
pub fn markdown() -> String {
    let mut s = String::new();
    s.push_str("# virtio-pf admin command reference\n\n");
    s.push_str(
        "Generated from `virtio-devices/src/pf/reference.rs` (a unit test keeps this file \
         equal to the code; regenerate with `UPDATE_DOCS=1 cargo test -p virtio-devices pf::`). \
         The contract is `shared/spec/virtio-pf.md`.\n\n",
    );
    s.push_str("## Every command\n\n");
    s.push_str(
        "Readable: `le16 opcode; le16 group_type; u8 reserved[12]; le64 group_member_id` + data. \
         Writable: `le16 status; le16 status_qualifier; u8 command_specific_output[4]` + result. \
         Used length = writable bytes filled; a result longer than the writable part is \
         truncated; missing data bytes read as zero. A chain with < 24 readable or < 8 writable \
         bytes completes with used length 0.\n\n",
    );
    s.push_str(
        "Checks, in order (R-ADM-1): group_type != 1 → EINVAL/Q_INVALID_GROUP; opcode \
         unsupported or not in the list in use (LIST_QUERY and LIST_USE are always usable) → \
         EINVAL/Q_INVALID_OPCODE; for member commands: VF Enable clear → \
         EINVAL/Q_INVALID_GROUP; member id outside 1..NumVFs → EINVAL/Q_INVALID_MEMBER. \
         A command failing with EINVAL changes nothing.\n\n",
    );
    table(&mut s, &COMMANDS, |op| opcode::name(op).unwrap_or("?"));
    s.push_str("\n## Device context fields (DEV_CTX_READ / DEV_CTX_WRITE)\n\n");
    s.push_str("Stream: `le32 field_count` then `{le16 type; u8 reserved[6]; le64 length; u8 value[length]}`.\n\n");
    s.push_str("| type | name | length |\n|---|---|---|\n");
    let rows = [
        (
            FIELD_PCI_COMMON_CFG,
            "PCI_COMMON_CFG",
            COMMON_CFG_LEN.to_string(),
        ),
        (
            FIELD_DEV_FEATURES,
            "DEV_FEATURES (negotiated)",
            format!("8 × words, at most {}", 8 * MAX_FEATURE_WORDS),
        ),
        (
            FIELD_PCI_VQ_CFG,
            "PCI_VQ_CFG (per queue)",
            VQ_CFG_LEN.to_string(),
        ),
        (
            FIELD_VQ_SPLIT_RUNTIME_CFG,
            "VQ_SPLIT_RUNTIME_CFG (per queue)",
            VQ_RUNTIME_LEN.to_string(),
        ),
        (
            FIELD_VQ_SPLIT_DEV_OWN_DESC,
            "VQ_SPLIT_DEV_OWN_DESC (per queue)",
            "4 + 2 × desc_count".to_string(),
        ),
        (
            FIELD_DEV_CFG,
            "DEV_CFG",
            "the device type's config size".to_string(),
        ),
    ];
    for (ty, name, len) in rows {
        s.push_str(&format!("| {ty:#x} | {name} | {len} |\n"));
    }
    s.push_str("\n# The virtio-1.4 dialect (`admin=virtio-1.4`)\n\n");
    s.push_str(
        "The published virtio 1.4 commands on the same opcodes 0x7..0x11, as Linux's \
         virtio_vfio_pci sends them; the requirements are in `docs/virtio-1.4-contract.md` \
         (R14-*). Status values add ENXIO 6 and EEXIST 17; the writable part has no output \
         field (bytes 4..8 are reserved, written 0).\n\n",
    );
    s.push_str(
        "Checks, in order (R14-GRP-1): group_type not 0 (self) or 1 (SR-IOV) → \
         EINVAL/Q_INVALID_GROUP; opcode not supported by the group or not in its list in use \
         (after reset: LIST_QUERY, LIST_USE) → EINVAL/Q_INVALID_OPCODE; for member commands \
         (0xa..0x11, SR-IOV group): VF Enable clear → EINVAL/Q_INVALID_GROUP; member id \
         outside 1..NumVFs → EINVAL/Q_INVALID_MEMBER. LIST_QUERY and LIST_USE take any member \
         id and work before VF Enable (Linux sends them at DRIVER_OK). The self group's list \
         in use, until a self-group LIST_USE, is LIST_QUERY, LIST_USE and what the SR-IOV \
         list names. RESOURCE_OBJ_QUERY is 0xb and MODIFY 0xc (the specification's table). \
         PF reset destroys every object and clears the driver limits; VF Enable cleared \
         destroys the VFs' objects; a VF's FLR makes it running again, drops staged parts and \
         keeps its objects.\n\n",
    );
    table(&mut s, &COMMANDS_V14, v14::opcode::name);
    s.push_str("\n## Device parts (DEV_PARTS_GET / DEV_PARTS_SET)\n\n");
    s.push_str(
        "Part: `le16 type; u8 flags (0x1 optional); u8 reserved; u8 selector[8]; le32 length` \
         + value, packed. A blk VF with N queues has these parts, in this order; SIZE is \
         159 + 72 × N bytes. No part carries ring positions: a stopped member has completed \
         every request it took, and on resume each enabled queue continues from the used \
         index in guest memory.\n\n",
    );
    s.push_str("| type | name | selector | length | on SET |\n|---|---|---|---|---|\n");
    let parts_rows: [(u16, &str, &str, String, &str); 6] = [
        (
            parts::PART_DEV_FEATURES,
            "DEV_FEATURES (optional)",
            "0",
            "8".into(),
            "must equal the device's; not applied",
        ),
        (
            parts::PART_DRV_FEATURES,
            "DRV_FEATURES",
            "0",
            "8".into(),
            "applied; only offered bits",
        ),
        (
            parts::PART_PCI_COMMON_CFG,
            "PCI_COMMON_CFG",
            "offset 0x0, 0x8, 0x10, 0x12, 0x16",
            "the field's size (4, 4, 2, 2, 2)".into(),
            "applied; num_queues (0x12) must equal the device's",
        ),
        (
            parts::PART_DEVICE_STATUS,
            "DEVICE_STATUS",
            "0",
            "1".into(),
            "applied",
        ),
        (
            parts::PART_VQ_CFG,
            "VQ_CFG (per queue)",
            "queue index",
            parts::VQ_CFG_LEN.to_string(),
            "applied; power-of-two size up to the maximum, vector below the member's",
        ),
        (
            parts::PART_VQ_NOTIFY_CFG,
            "VQ_NOTIFY_CFG (per queue)",
            "queue index",
            parts::VQ_NOTIFY_LEN.to_string(),
            "must equal the device's (notify_off = notif_config_data = the queue index)",
        ),
    ];
    for (ty, name, sel, len, set) in parts_rows {
        s.push_str(&format!("| {ty:#x} | {name} | {sel} | {len} | {set} |\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pf::admin::SUPPORTED_OPCODES;

    #[test]
    fn reference_covers_every_opcode() {
        let mut bits = 0u64;
        for c in COMMANDS {
            assert!(opcode::name(c.opcode).is_some());
            bits |= 1 << c.opcode;
        }
        assert_eq!(bits, SUPPORTED_OPCODES);
        let mut bits = 0u64;
        for c in COMMANDS_V14 {
            assert_ne!(v14::opcode::name(c.opcode), "unknown");
            bits |= 1 << c.opcode;
        }
        assert_eq!(bits, v14::SRIOV_OPCODES);
    }

    #[test]
    fn docs_admin_commands_md_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/admin-commands.md");
        let want = markdown();
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "docs/admin-commands.md is stale; run UPDATE_DOCS=1 cargo test -p virtio-devices pf::"
        );
    }
}
