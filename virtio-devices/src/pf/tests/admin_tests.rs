//! R-ADM-1, R-ADM-1b, R-ADM-2, R-ADM-3, R-ADM-4.

use super::*;
use crate::pf::admin::{qualifier, status};

const EINVAL: u16 = status::EINVAL;

#[test]
fn r_adm_1_invalid_group_before_opcode() {
    let mut h = Harness::new(2);
    // Bad group, unknown opcode, bad member: the group wins.
    let r = h.cmd_group(2, 0x0e, 0, &[], 8);
    assert_eq!((r.status, r.qualifier), (EINVAL, qualifier::INVALID_GROUP));
    let r = h.cmd_group(0, opcode::LIST_QUERY, 0, &[], 8);
    assert_eq!((r.status, r.qualifier), (EINVAL, qualifier::INVALID_GROUP));
}

#[test]
fn r_adm_1_unknown_opcode_before_member() {
    let mut h = Harness::new(2);
    for op in [0x02, 0x06, 0x0e, 0x13, 0x40, 0x7fff, 0xffff] {
        let r = h.cmd(op, 99, &[], 8);
        assert_eq!(
            (r.status, r.qualifier),
            (EINVAL, qualifier::INVALID_OPCODE),
            "opcode {op:#x}"
        );
    }
}

#[test]
fn r_adm_1_opcode_not_in_use_before_member_checks() {
    let mut h = Harness::bare(2);
    h.table.vf_enable = false;
    let r = h.cmd(opcode::DEV_MODE_GET, 0, &[], 1);
    assert_eq!((r.status, r.qualifier), (EINVAL, qualifier::INVALID_OPCODE));
}

#[test]
fn r_adm_1_vf_enable_clear_is_invalid_group() {
    let mut h = Harness::new(2);
    h.table.vf_enable = false;
    let r = h.cmd(opcode::DEV_MODE_GET, 1, &[], 1);
    assert_eq!((r.status, r.qualifier), (EINVAL, qualifier::INVALID_GROUP));
    // VF Enable clear beats an invalid member id.
    let r = h.cmd(opcode::DEV_MODE_GET, 0, &[], 1);
    assert_eq!((r.status, r.qualifier), (EINVAL, qualifier::INVALID_GROUP));
}

#[test]
fn r_adm_1_member_zero_and_beyond_num_vfs() {
    let mut h = Harness::new(3);
    for id in [0u64, 4, 0xffff, 0x1_0001, u64::MAX] {
        let r = h.cmd(opcode::DEV_MODE_GET, id, &[], 1);
        assert_eq!(
            (r.status, r.qualifier),
            (EINVAL, qualifier::INVALID_MEMBER),
            "member {id}"
        );
    }
    // NumVFs lowered below the instantiated members: member 3 is out.
    h.table.num_vfs = 2;
    let r = h.cmd(opcode::DEV_MODE_GET, 3, &[], 1);
    assert_eq!((r.status, r.qualifier), (EINVAL, qualifier::INVALID_MEMBER));
    let r = h.cmd(opcode::DEV_MODE_GET, 2, &[], 1);
    assert!(r.ok());
}

#[test]
fn r_adm_1_list_commands_need_no_member_nor_vf_enable() {
    let mut h = Harness::bare(0);
    h.table.vf_enable = false;
    let r = h.cmd(opcode::LIST_QUERY, 0xdead_beef, &[], 8);
    assert!(r.ok());
    assert_eq!(r.result_u64(0), SUPPORTED_OPCODES);
    let r = h.cmd(opcode::LIST_USE, 77, &SUPPORTED_OPCODES.to_le_bytes(), 0);
    assert!(r.ok());
    assert_eq!(h.admin.in_use(), SUPPORTED_OPCODES);
}

/// status, qualifier, output, result, used length
type Answer = (u16, u16, [u8; 4], Vec<u8>, u32);

fn layouts_run(layout: Layout) -> Vec<Answer> {
    let mut h = Harness::new(2);
    h.layout = layout;
    let mut out = Vec::new();
    let mut rec = |r: Response| out.push((r.status, r.qualifier, r.output, r.result, r.used));
    rec(h.cmd(opcode::LIST_QUERY, 0, &[], 8));
    rec(h.cmd(opcode::DEV_MODE_SET, 1, &[1], 0));
    rec(h.cmd(opcode::DEV_MODE_GET, 1, &[], 1));
    rec(h.cmd(opcode::DEV_CTX_SIZE_GET, 1, &[0], 8));
    rec(h.cmd(opcode::DEV_CTX_READ, 1, &[], 37));
    rec(h.cmd(opcode::DEV_CTX_READ, 1, &[], 150));
    rec(h.cmd(opcode::DEV_CTX_FIELDS_QUERY, 2, &[], 96));
    rec(h.cmd(opcode::DEV_WRITE_RECORD_CAP_QUERY, 2, &[], 8));
    out
}

#[test]
fn r_adm_1b_any_layout_gives_the_same_answers() {
    let reference = layouts_run(Layout::Two);
    assert!(reference.iter().all(|r| r.0 == 0));
    for l in [Layout::Split, Layout::Bytes, Layout::Odd, Layout::Indirect] {
        assert_eq!(layouts_run(l), reference, "layout {l:?}");
    }
}

#[test]
fn r_adm_1b_missing_data_bytes_read_as_zero() {
    let mut h = Harness::new(1);
    assert!(h.set_mode(1, 1).ok());
    // DEV_MODE_SET with no data: mode byte reads as 0 = Active.
    let r = h.cmd(opcode::DEV_MODE_SET, 1, &[], 0);
    assert!(r.ok());
    assert_eq!(h.mode(1), 0);
    // WRITE_RECORDS_READ with a 4-byte data: address reads as partly zero.
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(4096, &[(0, 16)]),
            0
        )
        .ok());
    let r = h.cmd(opcode::DEV_WRITE_RECORDS_READ, 1, &[0, 0, 0, 0], 64);
    assert!(r.ok(), "window 0+0 is a valid empty window");
    assert_eq!(r.out_u32(), 0);
}

pub(crate) fn start_data(page_size: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&page_size.to_le_bytes());
    d.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    d.extend_from_slice(&[0; 4]);
    for &(a, c) in ranges {
        d.extend_from_slice(&a.to_le_bytes());
        d.extend_from_slice(&c.to_le_bytes());
    }
    d
}

#[test]
fn r_adm_1b_result_truncated_to_writable_space() {
    let mut h = Harness::new(1);
    let r = h.cmd(opcode::LIST_QUERY, 0, &[], 3);
    assert!(r.ok());
    assert_eq!(r.used, 11);
    assert_eq!(r.result, SUPPORTED_OPCODES.to_le_bytes()[..3].to_vec());
    let r = h.cmd(opcode::LIST_QUERY, 0, &[], 0);
    assert_eq!(r.used, 8);
    assert!(r.ok());
    // Status + output only in an odd layout with truncated result.
    h.layout = Layout::Odd;
    let r = h.cmd(opcode::DEV_CTX_FIELDS_QUERY, 1, &[], 21);
    assert_eq!(r.used, 29);
}

#[test]
fn r_adm_1b_malformed_short_header_used_zero_and_queue_goes_on() {
    let mut h = Harness::new(1);
    let bytes = AdminCommand {
        opcode: opcode::LIST_QUERY,
        group_type: GROUP_TYPE_SRIOV,
        member_id: 0,
        data: &[],
        truncated: false,
    }
    .to_bytes();
    let head = h.submit_raw(&bytes[..23], 8);
    let done = h.serve();
    assert_eq!(done, vec![(head, 0)]);
    // Nothing written: the status area still holds the driver's pattern.
    let (wr, _) = h.writable_of[&head];
    let mut b = [0u8; 8];
    h.mem.read_slice(&mut b, GuestAddress(wr)).unwrap();
    assert_eq!(b, [0xAA; 8]);
    assert!(h.cmd(opcode::LIST_QUERY, 0, &[], 8).ok());
}

#[test]
fn r_adm_1b_malformed_no_or_short_writable_part() {
    let mut h = Harness::new(1);
    let bytes = AdminCommand {
        opcode: opcode::DEV_MODE_SET,
        group_type: GROUP_TYPE_SRIOV,
        member_id: 1,
        data: &[1],
        truncated: false,
    }
    .to_bytes();
    // Readable only.
    let rd = BUF_BASE + 0x8000;
    h.mem.write_slice(&bytes, GuestAddress(rd)).unwrap();
    let head = h.tq.add_chain(&h.mem, &[(rd, bytes.len() as u32, 0)]);
    assert_eq!(h.serve(), vec![(head, 0)]);
    // 7 writable bytes.
    let head = h.tq.add_chain(
        &h.mem,
        &[(rd, bytes.len() as u32, 0), (rd + 0x100, 7, F_WRITE)],
    );
    assert_eq!(h.serve(), vec![(head, 0)]);
    // Malformed commands had no effect (the mode set never ran).
    assert_eq!(h.mode(1), 0);
}

#[test]
fn r_adm_1b_malformed_descriptor_loop_terminates() {
    let mut h = Harness::new(1);
    let bytes = AdminCommand {
        opcode: opcode::LIST_QUERY,
        group_type: GROUP_TYPE_SRIOV,
        member_id: 0,
        data: &[],
        truncated: false,
    }
    .to_bytes();
    let rd = BUF_BASE + 0x9000;
    h.mem.write_slice(&bytes, GuestAddress(rd)).unwrap();
    // 200 -> 201 -> 200 -> ... readable only: never a writable part.
    h.tq.add_raw(
        &h.mem.clone(),
        &[
            (
                200,
                Desc {
                    addr: rd,
                    len: 24,
                    flags: F_NEXT,
                    next: 201,
                },
            ),
            (
                201,
                Desc {
                    addr: rd,
                    len: 24,
                    flags: F_NEXT,
                    next: 200,
                },
            ),
        ],
        200,
    );
    assert_eq!(h.serve(), vec![(200, 0)]);
    // A loop with a writable part terminates too (bounded by queue size).
    h.tq.add_raw(
        &h.mem.clone(),
        &[
            (
                210,
                Desc {
                    addr: rd,
                    len: 24,
                    flags: F_NEXT,
                    next: 211,
                },
            ),
            (
                211,
                Desc {
                    addr: rd + 0x100,
                    len: 8,
                    flags: F_NEXT | F_WRITE,
                    next: 210,
                },
            ),
        ],
        210,
    );
    let done = h.serve();
    assert_eq!(done.len(), 1);
    // The queue is still served.
    assert!(h.cmd(opcode::LIST_QUERY, 0, &[], 8).ok());
}

#[test]
fn r_adm_1b_malformed_indirect_tables() {
    let mut h = Harness::new(1);
    let bytes = AdminCommand {
        opcode: opcode::LIST_QUERY,
        group_type: GROUP_TYPE_SRIOV,
        member_id: 0,
        data: &[],
        truncated: false,
    }
    .to_bytes();
    let rd = BUF_BASE + 0xa000;
    let table = BUF_BASE + 0xb000;
    h.mem.write_slice(&bytes, GuestAddress(rd)).unwrap();
    // Indirect table length not a multiple of 16.
    let head = h.tq.add_chain(&h.mem, &[(table, 20, F_INDIRECT)]);
    assert_eq!(h.serve(), vec![(head, 0)]);
    // Nested indirect descriptor inside an indirect table.
    write_desc(
        &h.mem,
        table,
        0,
        Desc {
            addr: table,
            len: 32,
            flags: F_INDIRECT,
            next: 0,
        },
    );
    let head = h.tq.add_chain(&h.mem, &[(table, 32, F_INDIRECT)]);
    assert_eq!(h.serve(), vec![(head, 0)]);
    // Indirect table whose entries loop: 0 -> 1 -> 0.
    write_desc(
        &h.mem,
        table,
        0,
        Desc {
            addr: rd,
            len: 24,
            flags: F_NEXT,
            next: 1,
        },
    );
    write_desc(
        &h.mem,
        table,
        1,
        Desc {
            addr: rd,
            len: 24,
            flags: F_NEXT,
            next: 0,
        },
    );
    let head = h.tq.add_chain(&h.mem, &[(table, 32, F_INDIRECT)]);
    assert_eq!(h.serve(), vec![(head, 0)]);
    // Indirect table placed outside guest memory (the hole at 8..16 MiB).
    let head = h.tq.add_chain(&h.mem, &[(12 << 20, 64, F_INDIRECT)]);
    assert_eq!(h.serve(), vec![(head, 0)]);
    // A large valid indirect table of 1-byte descriptors still works.
    h.layout = Layout::Indirect;
    let r = h.cmd(opcode::LIST_QUERY, 0, &[], 8);
    assert!(r.ok());
    assert!(h.cmd(opcode::LIST_QUERY, 0, &[], 8).ok());
}

#[test]
fn r_adm_1b_malformed_buffer_outside_memory() {
    let mut h = Harness::new(1);
    // Readable header in the hole: cannot be read, used length 0.
    let head =
        h.tq.add_chain(&h.mem, &[(12 << 20, 24, 0), (BUF_BASE, 8, F_WRITE)]);
    assert_eq!(h.serve(), vec![(head, 0)]);
    // Writable part in the hole: the device cannot write, used length 0.
    let bytes = AdminCommand {
        opcode: opcode::LIST_QUERY,
        group_type: GROUP_TYPE_SRIOV,
        member_id: 0,
        data: &[],
        truncated: false,
    }
    .to_bytes();
    h.mem.write_slice(&bytes, GuestAddress(BUF_BASE)).unwrap();
    let head =
        h.tq.add_chain(&h.mem, &[(BUF_BASE, 24, 0), (12 << 20, 16, F_WRITE)]);
    assert_eq!(h.serve(), vec![(head, 0)]);
    assert!(h.cmd(opcode::LIST_QUERY, 0, &[], 8).ok());
}

/// Everything an EINVAL must leave untouched.
fn state_of(h: &mut Harness) -> Vec<String> {
    let mut v = vec![format!("{:#x}", h.admin.in_use())];
    for id in 1..=h.table.members.len() as u16 {
        let m = h.member(id);
        v.push(format!("{:?}", m.migration.snapshot()));
        v.push(format!("{:?}", m.device.log));
        v.push(format!("{:?}", m.device.ctx));
    }
    v
}

#[test]
fn r_adm_2_einval_has_no_side_effect() {
    let mut h = Harness::new(2);
    // Some state: member 1 frozen with a partial write and a partial read,
    // recording started.
    assert!(h.set_mode(1, 2).ok());
    let stream = sample_context(2, 9).to_bytes();
    assert!(h.write_context(1, &stream[..50], 50)[0].ok());
    assert!(h.cmd(opcode::DEV_CTX_READ, 1, &[], 10).ok());
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &super::admin_tests::start_data(4096, &[(0x10000, 4)]),
            0
        )
        .ok());
    let before = state_of(&mut h);
    let mut bad_field = stream[50..].to_vec();
    // Stream offset 84 is the type of the field after PCI_COMMON_CFG.
    bad_field[84 - 50] = 0x77;
    let einvals: Vec<(u16, u64, Vec<u8>)> = vec![
        (opcode::DEV_MODE_SET, 1, vec![3]),
        (opcode::DEV_MODE_SET, 1, vec![0xff]),
        (opcode::DEV_CTX_WRITE, 2, stream.clone()), // member 2 not frozen
        (opcode::DEV_CTX_WRITE, 1, bad_field),
        (opcode::DEV_CTX_SIZE_GET, 1, vec![2]),
        (
            opcode::DEV_WRITE_RECORDS_START,
            1,
            start_data(8192, &[(0, 1)]),
        ),
        (
            opcode::DEV_WRITE_RECORDS_START,
            1,
            start_data(4096, &[(0x10000, 1)]),
        ),
        (
            opcode::DEV_WRITE_RECORDS_START,
            1,
            start_data(4096, &[(0x100, 1)]),
        ),
        (opcode::DEV_WRITE_RECORDS_READ, 2, vec![0; 16]),
        (opcode::DEV_WRITE_RECORDS_READ, 1, {
            let mut d = 0x10000u64.to_le_bytes().to_vec();
            d.extend_from_slice(&100u64.to_le_bytes());
            d
        }),
        (opcode::LIST_USE, 0, (1u64 << 2).to_le_bytes().to_vec()),
        (opcode::DEV_MODE_GET, 3, vec![]),
        (0x0e, 1, vec![]),
    ];
    for (op, id, data) in einvals {
        let r = h.cmd(op, id, &data, 64);
        assert_eq!(r.status, EINVAL, "opcode {op:#x} member {id}");
        assert_eq!(state_of(&mut h), before, "opcode {op:#x} changed state");
    }
}

#[test]
fn r_adm_3_list_query_returns_the_opcode_bitmap() {
    let mut h = Harness::bare(1);
    let r = h.cmd(opcode::LIST_QUERY, 0, &[], 8);
    assert!(r.ok());
    let expected: u64 = (1 << 0x0)
        | (1 << 0x1)
        | (0x07..=0x0d).map(|b| 1u64 << b).sum::<u64>()
        | (0x0f..=0x12).map(|b| 1u64 << b).sum::<u64>();
    assert_eq!(r.result_u64(0), expected);
    assert_eq!(expected, SUPPORTED_OPCODES);
    // Legacy 0x2..0x6 and 0xe are not advertised.
    for b in [2, 3, 4, 5, 6, 0xe] {
        assert_eq!(r.result_u64(0) & (1 << b), 0);
    }
}

#[test]
fn r_adm_3_after_reset_only_list_commands_are_usable() {
    let mut h = Harness::new(1);
    assert!(h.cmd(opcode::DEV_MODE_GET, 1, &[], 1).ok());
    h.admin.reset();
    let r = h.cmd(opcode::DEV_MODE_GET, 1, &[], 1);
    assert_eq!((r.status, r.qualifier), (EINVAL, qualifier::INVALID_OPCODE));
    assert!(h.cmd(opcode::LIST_QUERY, 1, &[], 8).ok());
    // LIST_USE of a subset: only those become usable.
    let use_bits: u64 = 1 << opcode::DEV_MODE_GET;
    assert!(h.cmd(opcode::LIST_USE, 5, &use_bits.to_le_bytes(), 0).ok());
    assert!(h.cmd(opcode::DEV_MODE_GET, 1, &[], 1).ok());
    let r = h.cmd(opcode::DEV_MODE_SET, 1, &[1], 0);
    assert_eq!((r.status, r.qualifier), (EINVAL, qualifier::INVALID_OPCODE));
    // LIST_QUERY and LIST_USE stay usable though not in the list.
    assert!(h.cmd(opcode::LIST_QUERY, 0, &[], 8).ok());
}

#[test]
fn r_adm_3_list_use_with_unsupported_opcode_fails() {
    let mut h = Harness::new(1);
    for bits in [1u64 << 0x0e, 1 << 2, 1 << 63] {
        let r = h.cmd(opcode::LIST_USE, 0, &bits.to_le_bytes(), 0);
        assert_eq!((r.status, r.qualifier), (EINVAL, qualifier::INVALID_FIELD));
    }
    // A second word with a bit set names opcodes >= 64: unsupported.
    let mut d = SUPPORTED_OPCODES.to_le_bytes().to_vec();
    d.extend_from_slice(&1u64.to_le_bytes());
    let r = h.cmd(opcode::LIST_USE, 0, &d, 0);
    assert_eq!(r.status, EINVAL);
    assert_eq!(h.admin.in_use(), SUPPORTED_OPCODES);
}

#[test]
fn r_adm_4_commands_of_members_complete_out_of_order() {
    let mut h = Harness::new(2);
    h.member(1).device.slow = 3;
    h.member(1).device.in_flight = vec![5, 9];
    let cmd = |op, id, data: &[u8]| {
        AdminCommand {
            opcode: op,
            group_type: GROUP_TYPE_SRIOV,
            member_id: id,
            data,
            truncated: false,
        }
        .to_bytes()
    };
    // Member 1 goes to Stop, slowly; member 2's command is behind it.
    let slow = h.submit_raw(&cmd(opcode::DEV_MODE_SET, 1, &[1]), 0);
    let fast = h.submit_raw(&cmd(opcode::DEV_MODE_SET, 2, &[1]), 0);
    let busy = h.submit_raw(&cmd(opcode::DEV_MODE_GET, 1, &[]), 1);
    let done = h.serve();
    assert_eq!(
        done.iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![fast, busy]
    );
    // A command to the member still changing mode: try again, no effect.
    let r = h.response(busy, done[1].1);
    assert_eq!(
        (r.status, r.qualifier),
        (status::EAGAIN, qualifier::TRYAGAIN)
    );
    assert_eq!(h.poll(), vec![]);
    assert_eq!(h.poll(), vec![]);
    let late = h.poll();
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].0, slow);
    assert!(h.response(slow, late[0].1).ok());
    // Used ring order: member 2, the EAGAIN, then member 1.
    let used: Vec<u32> = h.tq.used(&h.mem).iter().map(|u| u.0).collect();
    let n = used.len();
    assert_eq!(
        used[n - 3..],
        [u32::from(fast), u32::from(busy), u32::from(slow)]
    );
    assert_eq!(h.mode(1), 1);
    // R-MODE-3: the requests in flight are device-owned now.
    assert_eq!(h.member(1).device.ctx.queues[0].device_owned, vec![5, 9]);
}
