//! R-WR-1..7 through the admin queue, with writes made through a member's
//! view of guest memory.

use std::collections::BTreeSet;

use super::admin_tests::start_data;
use super::*;
use crate::pf::admin::{qualifier, status};
use vm_migration::dirty::{take_dirty_log, SUPPORTED_PAGE_SIZE_BITMAP};

fn read_data(addr: u64, len: u64) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d
}

/// READ the window until empty, `per` records at a time.
fn read_all(h: &mut Harness, id: u64, addr: u64, len: u64, per: usize) -> Vec<u64> {
    let mut all = Vec::new();
    loop {
        let r = h.cmd(
            opcode::DEV_WRITE_RECORDS_READ,
            id,
            &read_data(addr, len),
            8 * per,
        );
        assert!(r.ok(), "READ failed: {} {}", r.status, r.qualifier);
        let n = r.out_u32() as usize;
        assert_eq!(r.result.len(), 8 * n);
        let got: Vec<u64> = (0..n).map(|i| r.result_u64(i)).collect();
        assert!(got.windows(2).all(|w| w[0] < w[1]), "ascending");
        if let (Some(a), Some(b)) = (all.last(), got.first()) {
            assert!(a < b, "ascending across reads");
        }
        all.extend_from_slice(&got);
        if n < per {
            return all;
        }
    }
}

#[test]
fn r_wr_1_capability_query() {
    let mut h = Harness::new(1);
    let r = h.cmd(opcode::DEV_WRITE_RECORD_CAP_QUERY, 1, &[], 8);
    assert!(r.ok());
    let sizes = u32::from_le_bytes(r.result[0..4].try_into().unwrap());
    let ranges = u32::from_le_bytes(r.result[4..8].try_into().unwrap());
    assert_ne!(sizes, 0);
    assert_eq!(sizes, SUPPORTED_PAGE_SIZE_BITMAP);
    assert_eq!(sizes & 1, 1, "4 KiB supported");
    assert!(ranges > 0);
}

#[test]
fn r_wr_2_start_validation() {
    let mut h = Harness::new(1);
    let bad = |h: &mut Harness, d: Vec<u8>| {
        let r = h.cmd(opcode::DEV_WRITE_RECORDS_START, 1, &d, 0);
        assert_eq!(
            (r.status, r.qualifier),
            (status::EINVAL, qualifier::INVALID_FIELD)
        );
        assert!(!h.member(1).migration.recorder.is_started());
    };
    for ps in [0u64, 2048, 4097, 8192, 1 << 40, u64::MAX] {
        bad(&mut h, start_data(ps, &[(0, 1)]));
    }
    bad(&mut h, start_data(2 << 20, &[(0x1000, 1)])); // unaligned to 2 MiB
    bad(&mut h, start_data(4096, &[]));
    bad(&mut h, start_data(4096, &[(0, 0)]));
    bad(&mut h, start_data(4096, &[(!0xfff, 2)])); // wraps
    bad(&mut h, start_data(4096, &[(0, 4), (0x3000, 4)])); // overlap
    let many: Vec<(u64, u64)> = (0..65).map(|i| (i * 0x10000, 1)).collect();
    bad(&mut h, start_data(4096, &many));
    // count says 0xffffffff with no entries.
    let mut d = start_data(4096, &[]);
    d[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    bad(&mut h, d);
    // count says 2, one entry present: the missing one reads as zeros.
    let mut d = start_data(4096, &[(0x10000, 1)]);
    d[8..12].copy_from_slice(&2u32.to_le_bytes());
    bad(&mut h, d);
    // Several STARTs add ranges, up to supported_ranges in total.
    let first: Vec<(u64, u64)> = (0..40).map(|i| (i * 0x10000, 1)).collect();
    let second: Vec<(u64, u64)> = (40..64).map(|i| (i * 0x10000, 1)).collect();
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(4096, &first),
            0
        )
        .ok());
    bad_keep(&mut h, start_data(8192, &[(0x100_0000, 1)]), 40);
    bad_keep(&mut h, start_data(4096, &[(0x10000, 1)]), 40); // overlaps existing
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(4096, &second),
            0
        )
        .ok());
    assert_eq!(h.member(1).migration.recorder.ranges().len(), 64);
    bad_keep(&mut h, start_data(4096, &[(0x100_0000, 1)]), 64); // 65th
                                                                // Mixed page sizes across STARTs are fine.
    let mut h = Harness::new(1);
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(4096, &[(0, 16)]),
            0
        )
        .ok());
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(2 << 20, &[(2 << 20, 2)]),
            0
        )
        .ok());
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(64 << 10, &[(64 << 10, 2)]),
            0
        )
        .ok());
}

fn bad_keep(h: &mut Harness, d: Vec<u8>, ranges: usize) {
    let r = h.cmd(opcode::DEV_WRITE_RECORDS_START, 1, &d, 0);
    assert_eq!(
        (r.status, r.qualifier),
        (status::EINVAL, qualifier::INVALID_FIELD)
    );
    assert_eq!(h.member(1).migration.recorder.ranges().len(), ranges);
}

/// A deterministic pseudo-random generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn r_wr_3_records_equal_exactly_the_pages_written_through_the_view() {
    let mut h = Harness::new(2);
    // Ranges: 4 KiB pages over 1..3 MiB, 64 KiB pages over 4..5 MiB, 2 MiB
    // pages over the second region.
    let ranges: Vec<(u64, u64, u64)> = vec![
        (0x10_0000, 512, 4096),
        (0x40_0000, 16, 64 << 10),
        (16 << 20, 4, 2 << 20),
    ];
    for &(a, c, ps) in &ranges {
        assert!(h
            .cmd(
                opcode::DEV_WRITE_RECORDS_START,
                1,
                &start_data(ps, &[(a, c)]),
                0
            )
            .ok());
    }
    let view1 = h.view(1);
    let view2 = h.view(2);
    let mut expected = BTreeSet::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0u8; 20000];
    for i in 0..3000 {
        let region = rng.next() % 2;
        let base = if region == 0 { 0 } else { 16 << 20 };
        let len = 1 + (rng.next() % 9000) as usize;
        let off = rng.next() % ((8 << 20) - len as u64);
        let addr = base + off;
        buf[0] = i as u8;
        match rng.next() % 4 {
            // Member 1's writes: recorded where inside a range.
            0 | 1 => {
                view1.write_slice(&buf[..len], GuestAddress(addr)).unwrap();
                for p in (addr >> 12)..=((addr + len as u64 - 1) >> 12) {
                    let gpa = p << 12;
                    for &(a, c, ps) in &ranges {
                        if gpa >= a && gpa < a + c * ps {
                            expected.insert(a + (gpa - a) / ps * ps);
                        }
                    }
                }
            }
            // The VMM's own writes and member 2's: never member 1's records.
            2 => h.mem.write_slice(&buf[..len], GuestAddress(addr)).unwrap(),
            _ => view2.write_slice(&buf[..len], GuestAddress(addr)).unwrap(),
        }
    }
    // Also a small write via write_obj and an atomic store.
    view1.write_obj(0xabcdu16, GuestAddress(0x2f_fffe)).unwrap();
    expected.insert(0x2f_f000);
    view1
        .store(
            1u32,
            GuestAddress(0x12_3454),
            std::sync::atomic::Ordering::Release,
        )
        .unwrap();
    expected.insert(0x12_3000);
    let got = read_all(&mut h, 1, 0, 32 << 20, 37);
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), expected);
    // Everything was returned and cleared.
    assert_eq!(read_all(&mut h, 1, 0, 32 << 20, 37), Vec::<u64>::new());
    assert!(!h.member(2).migration.recorder.is_started());
}

#[test]
fn r_wr_3_used_ring_written_by_virtio_queue_through_view_is_recorded() {
    let mut h = Harness::new(1);
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(4096, &[(0, 16)]),
            0
        )
        .ok());
    let view = h.view(1);
    // A request queue of the member whose used ring lives at 0x3000
    // (the harness's test queue): the device completes a chain.
    h.tq.add_chain(&h.mem, &[(0x8000, 16, F_WRITE)]);
    let q = &mut h.tq.q;
    let chain = q.pop_descriptor_chain(&view).unwrap();
    let head = chain.head_index();
    view.write_slice(&[1u8; 16], GuestAddress(0x8000)).unwrap();
    q.add_used(&view, head, 16).unwrap();
    let got = read_all(&mut h, 1, 0, 16 * 4096, 16);
    // Used ring page and the data page; nothing else.
    assert_eq!(got, vec![0x3000, 0x8000]);
}

#[test]
fn r_wr_4_read_clears_exactly_what_it_returns_and_redirtied_pages_return() {
    let mut h = Harness::new(1);
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(4096, &[(0x20_0000, 256)]),
            0
        )
        .ok());
    let view = h.view(1);
    let pages: Vec<u64> = (0..256).step_by(3).map(|p| 0x20_0000 + p * 4096).collect();
    for &p in &pages {
        view.write_obj(1u8, GuestAddress(p + 100)).unwrap();
    }
    let win = read_data(0x20_0000, 256 * 4096);
    let r = h.cmd(opcode::DEV_WRITE_RECORDS_READ, 1, &win, 8 * 5);
    assert_eq!(r.out_u32(), 5);
    let first: Vec<u64> = (0..5).map(|i| r.result_u64(i)).collect();
    assert_eq!(first, pages[..5]);
    // Re-dirty a returned page and a not-yet-returned one.
    view.write_obj(2u8, GuestAddress(pages[1])).unwrap();
    view.write_obj(2u8, GuestAddress(pages[10])).unwrap();
    let rest = read_all(&mut h, 1, 0x20_0000, 256 * 4096, 1000);
    let mut want: Vec<u64> = pages[5..].to_vec();
    want.push(pages[1]);
    want.sort();
    assert_eq!(rest, want);
    // A window: only pages inside it.
    for &p in &pages {
        view.write_obj(3u8, GuestAddress(p)).unwrap();
    }
    let got = read_all(&mut h, 1, 0x20_0000 + 30 * 4096, 30 * 4096, 4);
    let want: Vec<u64> = pages
        .iter()
        .copied()
        .filter(|p| *p >= 0x20_0000 + 30 * 4096 && *p < 0x20_0000 + 60 * 4096)
        .collect();
    assert_eq!(got, want);
    // Result space for no record: count 0, nothing cleared.
    let r = h.cmd(opcode::DEV_WRITE_RECORDS_READ, 1, &win, 7);
    assert!(r.ok());
    assert_eq!(r.out_u32(), 0);
    let all = read_all(&mut h, 1, 0x20_0000, 256 * 4096, 1000);
    assert_eq!(all.len(), pages.len() - want.len());
}

#[test]
fn r_wr_4_read_without_recording_is_invalid_command() {
    let mut h = Harness::new(1);
    let r = h.cmd(opcode::DEV_WRITE_RECORDS_READ, 1, &read_data(0, 4096), 64);
    assert_eq!(
        (r.status, r.qualifier),
        (status::EINVAL, qualifier::INVALID_COMMAND)
    );
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(4096, &[(0, 1)]),
            0
        )
        .ok());
    assert!(h.cmd(opcode::DEV_WRITE_RECORDS_STOP, 1, &[], 0).ok());
    let r = h.cmd(opcode::DEV_WRITE_RECORDS_READ, 1, &read_data(0, 4096), 64);
    assert_eq!(
        (r.status, r.qualifier),
        (status::EINVAL, qualifier::INVALID_COMMAND)
    );
    // A window not 4 KiB aligned.
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(4096, &[(0, 1)]),
            0
        )
        .ok());
    let r = h.cmd(opcode::DEV_WRITE_RECORDS_READ, 1, &read_data(1, 4096), 64);
    assert_eq!(
        (r.status, r.qualifier),
        (status::EINVAL, qualifier::INVALID_FIELD)
    );
}

#[test]
fn r_wr_4_large_pages_grouped() {
    let mut h = Harness::new(1);
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(2 << 20, &[(0, 4)]),
            0
        )
        .ok());
    let view = h.view(1);
    // Many 4 KiB pages of the same 2 MiB page: one record.
    for p in 0..100u64 {
        view.write_obj(1u8, GuestAddress((2 << 20) + p * 8192))
            .unwrap();
    }
    view.write_obj(1u8, GuestAddress((6 << 20) + 5)).unwrap();
    let r = h.cmd(opcode::DEV_WRITE_RECORDS_READ, 1, &read_data(0, 8 << 20), 8);
    assert_eq!(r.out_u32(), 1);
    assert_eq!(r.result_u64(0), 2 << 20);
    let r = h.cmd(
        opcode::DEV_WRITE_RECORDS_READ,
        1,
        &read_data(0, 8 << 20),
        80,
    );
    assert_eq!(r.out_u32(), 1);
    assert_eq!(r.result_u64(0), 6 << 20);
}

#[test]
fn r_wr_5_stop_always_succeeds_and_drops_everything() {
    let mut h = Harness::new(1);
    assert!(h.cmd(opcode::DEV_WRITE_RECORDS_STOP, 1, &[], 0).ok());
    assert!(h.cmd(opcode::DEV_WRITE_RECORDS_STOP, 1, &[], 0).ok());
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(4096, &[(0, 64)]),
            0
        )
        .ok());
    let view = h.view(1);
    view.write_obj(1u64, GuestAddress(0x5000)).unwrap();
    assert!(h.cmd(opcode::DEV_WRITE_RECORDS_STOP, 1, &[], 0).ok());
    assert!(!h.member(1).migration.recorder.is_started());
    // Writes while stopped are not recorded.
    view.write_obj(1u64, GuestAddress(0x6000)).unwrap();
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(4096, &[(0, 64)]),
            0
        )
        .ok());
    assert_eq!(read_all(&mut h, 1, 0, 64 * 4096, 8), Vec::<u64>::new());
    view.write_obj(1u64, GuestAddress(0x7000)).unwrap();
    assert_eq!(read_all(&mut h, 1, 0, 64 * 4096, 8), vec![0x7000]);
}

#[test]
fn r_wr_6_flr_in_active_mode_stops_nothing() {
    let mut h = Harness::new(1);
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(4096, &[(0, 64)]),
            0
        )
        .ok());
    let view = h.view(1);
    view.write_obj(1u64, GuestAddress(0x5000)).unwrap();
    h.member(1).function_reset();
    view.write_obj(1u64, GuestAddress(0x9000)).unwrap();
    assert_eq!(read_all(&mut h, 1, 0, 64 * 4096, 8), vec![0x5000, 0x9000]);
}

#[test]
fn r_wr_7_member_writes_also_mark_the_vmm_dirty_log() {
    let mut h = Harness::new(1);
    let _ = take_dirty_log(&h.mem);
    let view = h.view(1);
    // Recording off: the VMM still sees the write, no record is made.
    view.write_obj(5u32, GuestAddress((16 << 20) + 0x3000))
        .unwrap();
    let log = take_dirty_log(&h.mem);
    assert_eq!(log[1].start, GuestAddress(16 << 20));
    assert_eq!(log[1].bits[0], 1 << 3);
    assert!(log[0].bits.iter().all(|w| *w == 0));
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(4096, &[(16 << 20, 64)]),
            0
        )
        .ok());
    assert_eq!(
        read_all(&mut h, 1, 16 << 20, 64 * 4096, 8),
        Vec::<u64>::new()
    );
    // Recording on: both.
    view.write_obj(5u32, GuestAddress((16 << 20) + 0x4000))
        .unwrap();
    let log = take_dirty_log(&h.mem);
    assert_eq!(log[1].bits[0], 1 << 4);
    assert_eq!(
        read_all(&mut h, 1, 16 << 20, 64 * 4096, 8),
        vec![(16 << 20) + 0x4000]
    );
    // Same host memory: the VMM reads what the member wrote.
    let v: u32 = h.mem.read_obj(GuestAddress((16 << 20) + 0x4000)).unwrap();
    assert_eq!(v, 5);
}
