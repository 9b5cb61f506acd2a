//! The admin command reference, kept next to the code: `docs/admin-commands.md`
//! is generated from [`markdown`] and a unit test checks it stays equal
//! (regenerate with `UPDATE_DOCS=1 cargo test -p virtio-devices pf::`).

use super::admin::opcode;
use super::context::{
    COMMON_CFG_LEN, FIELD_DEV_CFG, FIELD_DEV_FEATURES, FIELD_PCI_COMMON_CFG, FIELD_PCI_VQ_CFG,
    FIELD_VQ_SPLIT_DEV_OWN_DESC, FIELD_VQ_SPLIT_RUNTIME_CFG, MAX_FEATURE_WORDS, VQ_CFG_LEN,
    VQ_RUNTIME_LEN,
};

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
    s.push_str("| opcode | name | member | data | output | result | errors |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for c in COMMANDS {
        s.push_str(&format!(
            "| {:#04x} | {} | {} | {} | {} | {} | {} |\n",
            c.opcode,
            opcode::name(c.opcode).unwrap_or("?"),
            if c.member { "yes" } else { "no" },
            c.data,
            c.output,
            c.result,
            c.errors
        ));
    }
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
