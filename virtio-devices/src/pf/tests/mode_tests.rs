//! R-MODE-1..7 and R-CTX-1, 2, 3, 6, 7.

use super::admin_tests::start_data;
use super::*;
use crate::pf::admin::{qualifier, status};

#[test]
fn r_mode_1_mode_get_returns_u8_mode() {
    let mut h = Harness::new(2);
    let r = h.cmd(opcode::DEV_MODE_GET, 2, &[], 1);
    assert!(r.ok());
    assert_eq!(r.used, 9);
    assert_eq!(r.result, vec![0], "Active after instantiation");
    assert!(h.set_mode(2, 2).ok());
    assert_eq!(h.mode(2), 2);
    assert_eq!(h.mode(1), 0);
}

#[test]
fn r_mode_2_same_mode_succeeds_invalid_mode_fails_unchanged() {
    let mut h = Harness::new(1);
    for m in [0u8, 1, 1, 2, 2, 0, 0] {
        assert!(h.set_mode(1, m).ok());
        assert_eq!(h.mode(1), m);
    }
    let resumes = h.member(1).device.resumes;
    assert!(h.set_mode(1, 0).ok(), "Active -> Active");
    assert_eq!(
        h.member(1).device.resumes,
        resumes,
        "no transition, no resume"
    );
    assert!(h.set_mode(1, 1).ok());
    for bad in [3u8, 4, 0x80, 0xff] {
        let r = h.set_mode(1, bad);
        assert_eq!(
            (r.status, r.qualifier),
            (status::EINVAL, qualifier::INVALID_FIELD)
        );
        assert_eq!(h.mode(1), 1);
    }
}

#[test]
fn r_mode_3_requests_drained_or_device_owned_before_stop_completes() {
    let mut h = Harness::new(1);
    h.member(1).device.in_flight = vec![4, 17, 33];
    assert!(h.set_mode(1, 1).ok());
    let d = &h.member(1).device;
    assert_eq!(d.quiesced, Some(Mode::Stop));
    assert!(d.in_flight.is_empty());
    assert_eq!(d.ctx.queues[0].device_owned, vec![4, 17, 33]);
    let pos_q = d.log.iter().position(|l| l == "quiesced").unwrap();
    assert!(d.log[..pos_q].iter().any(|l| l == "quiesce Stop"));
    // Freeze from Active also quiesces first.
    let mut h = Harness::new(1);
    h.member(1).device.in_flight = vec![1];
    assert!(h.set_mode(1, 2).ok());
    assert_eq!(h.member(1).device.quiesced, Some(Mode::Freeze));
    assert_eq!(h.member(1).device.ctx.queues[0].device_owned, vec![1]);
}

#[test]
fn r_mode_4_every_transition_to_active_examines_queues() {
    let mut h = Harness::new(1);
    assert!(h.set_mode(1, 1).ok());
    assert!(h.set_mode(1, 0).ok());
    assert_eq!(h.member(1).device.resumes, 1);
    assert!(h.set_mode(1, 2).ok());
    assert!(h.set_mode(1, 0).ok());
    assert_eq!(h.member(1).device.resumes, 2);
    assert!(h.set_mode(1, 1).ok());
    assert!(h.set_mode(1, 2).ok());
    assert!(h.set_mode(1, 1).ok());
    assert_eq!(h.member(1).device.resumes, 2, "Stop/Freeze do not resume");
    assert!(h.set_mode(1, 0).ok());
    assert_eq!(h.member(1).device.resumes, 3);
    assert_eq!(h.member(1).device.log.last().unwrap(), "resume");
}

#[test]
fn r_mode_5_active_or_stop_refused_while_read_partial() {
    let mut h = Harness::new(1);
    assert!(h.set_mode(1, 1).ok());
    let r = h.cmd(opcode::DEV_CTX_READ, 1, &[], 16);
    assert_eq!(r.out_u32(), 16);
    let r = h.set_mode(1, 0);
    assert_eq!(
        (r.status, r.qualifier),
        (status::EBUSY, qualifier::INVALID_COMMAND)
    );
    assert_eq!(h.mode(1), 1);
    // Setting the current mode is not a change: fine.
    assert!(h.set_mode(1, 1).ok());
    // Freeze is allowed (pre-copy flow: Stop -> Freeze with a read begun).
    assert!(h.set_mode(1, 2).ok());
    // Active -> Stop with a partial read of the Active stream: refused too.
    let mut h = Harness::new(1);
    assert_eq!(h.cmd(opcode::DEV_CTX_READ, 1, &[], 16).out_u32(), 16);
    let r = h.set_mode(1, 1);
    assert_eq!(
        (r.status, r.qualifier),
        (status::EBUSY, qualifier::INVALID_COMMAND)
    );
    assert_eq!(h.mode(1), 0);
}

#[test]
fn r_mode_5_active_or_stop_refused_while_write_partial() {
    let mut h = Harness::new(1);
    assert!(h.set_mode(1, 2).ok());
    let s = sample_context(2, 4).to_bytes();
    assert!(h.cmd(opcode::DEV_CTX_WRITE, 1, &s[..30], 0).ok());
    for m in [0u8, 1] {
        let r = h.set_mode(1, m);
        assert_eq!(
            (r.status, r.qualifier),
            (status::EBUSY, qualifier::INVALID_COMMAND)
        );
        assert_eq!(h.mode(1), 2);
    }
    assert!(h.cmd(opcode::DEV_CTX_WRITE, 1, &s[30..], 0).ok());
    assert!(h.set_mode(1, 1).ok());
}

#[test]
fn r_mode_6_member_told_of_freeze_so_config_writes_are_ignored() {
    // The transport gates configuration writes and notifications on the
    // mode the member device was put in; here: the device is told.
    let mut h = Harness::new(1);
    assert!(h.set_mode(1, 2).ok());
    assert_eq!(h.member(1).device.quiesced, Some(Mode::Freeze));
    assert_eq!(h.member(1).mode(), Mode::Freeze);
    assert!(h.set_mode(1, 1).ok());
    assert_eq!(h.member(1).device.quiesced, Some(Mode::Stop));
}

#[test]
fn r_mode_7_flr_and_reset_in_stop_and_freeze_keep_mode_and_recording() {
    for mode in [1u8, 2] {
        let mut h = Harness::new(1);
        assert!(h
            .cmd(
                opcode::DEV_WRITE_RECORDS_START,
                1,
                &start_data(4096, &[(0x20_0000, 64)]),
                0
            )
            .ok());
        let view = h.view(1);
        view.write_obj(1u32, GuestAddress(0x20_3000)).unwrap();
        assert!(h.set_mode(1, mode).ok());
        // A partial read survives too.
        assert!(h.cmd(opcode::DEV_CTX_READ, 1, &[], 8).ok());
        h.member(1).function_reset();
        h.member(1).function_reset();
        assert_eq!(h.member(1).device.resets, 2);
        assert_eq!(h.mode(1), mode);
        assert!(h.member(1).migration.recorder.is_started());
        assert!(h.member(1).migration.read_partial());
        // R-WR-6: records written before the reset are still there.
        let mut d = 0x20_0000u64.to_le_bytes().to_vec();
        d.extend_from_slice(&(64u64 * 4096).to_le_bytes());
        let r = h.cmd(opcode::DEV_WRITE_RECORDS_READ, 1, &d, 64);
        assert!(r.ok());
        assert_eq!(r.out_u32(), 1);
        assert_eq!(r.result_u64(0), 0x20_3000);
    }
}

#[test]
fn r_ctx_1_size_get_remaining_and_freeze_estimate() {
    let mut h = Harness::new(1);
    let full = h.member(1).device.ctx.encoded_len() as u64;
    let size = |h: &mut Harness, f: u8| {
        let r = h.cmd(opcode::DEV_CTX_SIZE_GET, 1, &[f], 8);
        assert!(r.ok());
        r.result_u64(0)
    };
    assert_eq!(size(&mut h, 0), full);
    assert_eq!(size(&mut h, 1), full);
    assert!(h.cmd(opcode::DEV_CTX_READ, 1, &[], 40).ok());
    assert_eq!(size(&mut h, 0), full - 40);
    // Estimate for Freeze while Active: a whole new stream.
    assert_eq!(size(&mut h, 1), full);
    let rest = h.read_context(1, 4096);
    assert_eq!(rest.len() as u64, full - 40);
    assert_eq!(size(&mut h, 0), 0);
    // Freeze: in-flight requests add device-owned descriptors.
    h.member(1).device.in_flight = vec![1, 2];
    assert!(h.set_mode(1, 2).ok());
    assert_eq!(size(&mut h, 0), full + 4);
    assert_eq!(size(&mut h, 1), full + 4);
    let r = h.cmd(opcode::DEV_CTX_SIZE_GET, 1, &[7], 8);
    assert_eq!(
        (r.status, r.qualifier),
        (status::EINVAL, qualifier::INVALID_FIELD)
    );
}

#[test]
fn r_ctx_2_read_is_a_snapshot_then_zero_until_mode_changes() {
    let mut h = Harness::new(1);
    let before = h.member(1).device.ctx.to_bytes();
    let first = h.cmd(opcode::DEV_CTX_READ, 1, &[], 20);
    assert_eq!(first.out_u32(), 20);
    // The device changes after the first read began: not in this stream.
    h.member(1).device.ctx.queues[1].avail_idx = 999;
    let mut stream = first.result.clone();
    stream.extend(h.read_context(1, 7));
    assert_eq!(stream, before);
    // Fully read: 0 bytes, again and again, in this mode.
    for _ in 0..3 {
        let r = h.cmd(opcode::DEV_CTX_READ, 1, &[], 64);
        assert!(r.ok());
        assert_eq!(r.out_u32(), 0);
        assert_eq!(r.used, 8);
    }
    // New mode: new snapshot showing the change; reading works in Stop and
    // Freeze too.
    for mode in [1u8, 2] {
        assert!(h.set_mode(1, mode).ok());
        let s = h.read_context(1, 1000);
        let c = MemberContext::decode(&s, &fake_limits(2)).unwrap();
        assert_eq!(c.queues[1].avail_idx, 999);
    }
}

#[test]
fn r_ctx_3_write_outside_freeze_is_invalid_command() {
    let mut h = Harness::new(1);
    let s = sample_context(2, 3).to_bytes();
    for mode in [0u8, 1] {
        assert!(h.set_mode(1, mode).ok());
        let r = h.cmd(opcode::DEV_CTX_WRITE, 1, &s, 0);
        assert_eq!(
            (r.status, r.qualifier),
            (status::EINVAL, qualifier::INVALID_COMMAND)
        );
        assert!(h.member(1).migration.pending_context().is_none());
    }
}

#[test]
fn r_ctx_3_complete_stream_replaces_pending_applied_on_leaving_freeze() {
    for target in [0u8, 1] {
        let mut h = Harness::new(1);
        assert!(h.set_mode(1, 2).ok());
        let a = sample_context(2, 5);
        let b = sample_context(2, 6);
        for r in h.write_context(1, &a.to_bytes(), 13) {
            assert!(r.ok());
        }
        assert_eq!(h.member(1).migration.pending_context(), Some(&a));
        // Not applied in Freeze.
        assert!(!h.member(1).device.log.iter().any(|l| l == "apply"));
        // The next write starts a new stream, which replaces the first.
        for r in h.write_context(1, &b.to_bytes(), 64) {
            assert!(r.ok());
        }
        assert_eq!(h.member(1).migration.pending_context(), Some(&b));
        assert!(h.set_mode(1, target).ok());
        assert_eq!(h.member(1).device.ctx, b);
        assert!(h.member(1).migration.pending_context().is_none());
        assert_eq!(
            h.member(1)
                .device
                .log
                .iter()
                .filter(|l| *l == "apply")
                .count(),
            1
        );
    }
}

#[test]
fn r_ctx_3_device_refusing_apply_fails_and_keeps_freeze() {
    let mut h = Harness::new(1);
    assert!(h.set_mode(1, 2).ok());
    h.write_context(1, &sample_context(2, 8).to_bytes(), 4096);
    h.member(1).device.fail_apply = true;
    let r = h.set_mode(1, 0);
    assert_eq!(r.status, status::EINVAL);
    assert_eq!(h.mode(1), 2);
    assert!(h.member(1).migration.pending_context().is_some());
    h.member(1).device.fail_apply = false;
    assert!(h.set_mode(1, 0).ok());
}

#[test]
fn r_ctx_6_discard_partial_read_restarts_stream() {
    let mut h = Harness::new(1);
    let r = h.cmd(opcode::DEV_CTX_READ, 1, &[], 10);
    assert_eq!(r.out_u32(), 10);
    assert!(h.member(1).migration.read_partial());
    assert!(h.cmd(opcode::DEV_CTX_DISCARD, 1, &[], 0).ok());
    assert!(!h.member(1).migration.read_partial());
    h.member(1).device.ctx.queues[0].avail_idx = 4242;
    let s = h.read_context(1, 33);
    // From the first byte, of a fresh snapshot.
    assert_eq!(s, h.member(1).device.ctx.to_bytes());
    // Now Active is allowed again after a discard in Stop.
    assert!(h.set_mode(1, 1).ok());
    h.cmd(opcode::DEV_CTX_READ, 1, &[], 10);
    assert_eq!(h.set_mode(1, 0).status, status::EBUSY);
    assert!(h.cmd(opcode::DEV_CTX_DISCARD, 1, &[], 0).ok());
    assert!(h.set_mode(1, 0).ok());
}

#[test]
fn r_ctx_6_discard_partial_write_as_if_never_written() {
    let mut h = Harness::new(1);
    assert!(h.set_mode(1, 2).ok());
    let a = sample_context(2, 11);
    h.write_context(1, &a.to_bytes(), 4096);
    let b = sample_context(2, 12).to_bytes();
    assert!(h.cmd(opcode::DEV_CTX_WRITE, 1, &b[..100], 0).ok());
    assert!(h.member(1).migration.write_partial());
    assert!(h.cmd(opcode::DEV_CTX_DISCARD, 1, &[], 0).ok());
    assert!(!h.member(1).migration.write_partial());
    // The complete stream written before stays pending.
    assert_eq!(h.member(1).migration.pending_context(), Some(&a));
    // A new write starts a new stream from its first byte.
    let c = sample_context(2, 13);
    for r in h.write_context(1, &c.to_bytes(), 17) {
        assert!(r.ok());
    }
    assert!(h.set_mode(1, 0).ok());
    assert_eq!(h.member(1).device.ctx, c);
    // Discard with nothing partial succeeds and changes nothing.
    assert!(h.cmd(opcode::DEV_CTX_DISCARD, 1, &[], 0).ok());
}

#[test]
fn r_ctx_7_round_trip_between_members() {
    let mut h = Harness::new(2);
    // Member A with requests in flight; pre-copy read in Active.
    h.member(1).device.in_flight = vec![2, 5];
    let pre = h.read_context(1, 100);
    assert!(!pre.is_empty());
    assert!(h.set_mode(1, 1).ok());
    assert!(h.set_mode(1, 2).ok());
    let final_stream = h.read_context(1, 64);
    let a_ctx = MemberContext::decode(&final_stream, &fake_limits(2)).unwrap();
    assert_eq!(a_ctx.queues[0].device_owned, vec![2, 5]);
    // Member B frozen, written, activated: it carries on from A's state.
    assert!(h.set_mode(2, 2).ok());
    for r in h.write_context(2, &final_stream, 29) {
        assert!(r.ok());
    }
    assert!(h.set_mode(2, 0).ok());
    assert_eq!(h.member(2).device.ctx, a_ctx);
    assert_eq!(h.member(2).device.resumes, 1);
    // B's context now reads back identically.
    assert_eq!(h.read_context(2, 4096), final_stream);
}

#[test]
fn migration_state_snapshot_restore_carries_streams_and_records() {
    let mut h = Harness::new(2);
    assert!(h
        .cmd(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            &start_data(4096, &[(0x40_0000, 8)]),
            0
        )
        .ok());
    let view = h.view(1);
    view.write_obj(7u8, GuestAddress(0x40_2000)).unwrap();
    assert!(h.set_mode(1, 2).ok());
    assert!(h.cmd(opcode::DEV_CTX_READ, 1, &[], 12).ok());
    let s = sample_context(2, 1).to_bytes();
    assert!(h.cmd(opcode::DEV_CTX_WRITE, 1, &s[..77], 0).ok());
    let snap = h.member(1).migration.snapshot();
    // Restore into member 2.
    h.member(2).migration.restore(&snap).unwrap();
    assert_eq!(h.member(2).migration.snapshot(), snap);
    assert_eq!(h.mode(2), 2);
    assert!(h.member(2).migration.write_partial());
    assert!(h.cmd(opcode::DEV_CTX_WRITE, 2, &s[77..], 0).ok());
    assert!(h.member(2).migration.pending_context().is_some());
}
