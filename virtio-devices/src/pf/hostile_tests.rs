//! Hostile guests and failing parts against the real PF and its VFs: the
//! guest clearing VF Enable with admin commands queued or waiting, FLR and
//! virtio reset storms on a VF under load, a hundred VF Enable cycles with
//! 64 VFs, an owner that dies in the middle of a member migration. In each,
//! nothing panics or hangs, the other functions keep working, and no
//! request or record is lost.

use std::sync::{Arc, Weak};
use std::time::Duration;

use pci::bus::ecam_offset;

use super::admin::{opcode, qualifier, status};
use super::device::{MEMBER_PROGRESS_EVENT, VF_BAR0_SIZE};
use super::device_tests::*;
use super::migration::Mode;
use crate::block::VIRTIO_BLK_S_OK;
use crate::test_driver::{Layout, TestDriver};
use crate::transport::COMPLETION_EVENT;

/// Status and qualifier of an admin command's result at `res`.
fn status_at(r: &Rig, res: u64) -> (u16, u16) {
    let b = r.t.read_mem(res, 4).unwrap();
    (
        u16::from_le_bytes([b[0], b[1]]),
        u16::from_le_bytes([b[2], b[3]]),
    )
}

/// Every admin completion the PF has published since the last pop.
fn admin_done(r: &mut Rig) -> Vec<u16> {
    let d = r.pfd.as_mut().unwrap();
    let mut v = Vec::new();
    while let Some((h, _)) = d.pop_used(&r.t, ADMIN_Q) {
        v.push(h);
    }
    v
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// The guest clears VF Enable while commands for its VFs wait on the admin
/// queue: each completes once, in order, with the error for commands that
/// address a member while VF Enable is clear (R-ADM-1: EINVAL /
/// Q_INVALID_GROUP). The PF goes on; VFs enabled again are fresh members
/// (Active, not recording) that work.
#[test]
fn clearing_vf_enable_with_admin_commands_queued() {
    let mut r = Rig::up("vfe-queued", 2, 2, Files::PerVf);
    let cmds: [(u64, u16, Vec<u8>); 4] = [
        (1, opcode::DEV_MODE_SET, vec![Mode::Stop as u8]),
        (2, opcode::DEV_CTX_SIZE_GET, vec![0]),
        (1, opcode::DEV_MODE_GET, vec![]),
        (
            2,
            opcode::DEV_WRITE_RECORDS_START,
            records_start(4096, &[(0, 16)]),
        ),
    ];
    let queued: Vec<(u16, u64)> = cmds
        .iter()
        .map(|(m, op, d)| queue_admin(&mut r, *m, *op, d))
        .collect();
    let mut pf = r.on(PF_BDF);
    TestDriver::cfg_write16(&mut pf, SRIOV + 0x08, 0);
    assert_eq!(r.bus.function_ids(), vec![PF_BDF]);
    ring(&r, PF_BDF, ADMIN_Q);
    let heads: Vec<u16> = queued.iter().map(|q| q.0).collect();
    assert_eq!(admin_done(&mut r), heads, "each command completes once");
    for (h, res) in &queued {
        assert_eq!(
            status_at(&r, *res),
            (status::EINVAL, qualifier::INVALID_GROUP),
            "command at head {h}"
        );
    }
    assert!(r.admin(opcode::LIST_QUERY, 0, &[], 8).ok());

    r.enable_vfs(2);
    assert_eq!(r.mode(1), Mode::Active as u8, "the Stop never happened");
    let rd = r.admin(
        opcode::DEV_WRITE_RECORDS_READ,
        2,
        &[0u64.to_le_bytes(), (MEM_LEN as u64).to_le_bytes()].concat(),
        64,
    );
    assert_eq!(
        (rd.status, rd.qualifier),
        (status::EINVAL, qualifier::INVALID_COMMAND),
        "member 2 never started recording"
    );
    r.bring_up_vf(1);
    let data = pattern(3, 512);
    let (s, u) = r.request(1, &write_req(0, &data));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK);
    assert_eq!(&r.file(1, Files::PerVf)[..512], &data[..]);
}

/// The guest clears VF Enable while a Stop waits for a request on the
/// member's disk: the configuration write returns once the disk has
/// answered (no VF goes away with a request in flight), the request's data
/// is on the disk, the waiting Stop completes exactly once with the error
/// for a member that no longer exists, and the PF and new VFs work.
#[test]
fn clearing_vf_enable_while_a_stop_waits_on_the_disk() {
    let disks = test_disks(2);
    let mut r = Rig::up_with_disks("vfe-deferred", &disks);
    r.bring_up_vf(1);
    let vf1 = r.vf_bdf(1);
    disks[0].set_open(false);
    let data = pattern(4, 512);
    r.t.submit(0, &write_req(2, &data), Layout::Direct).unwrap();
    ring(&r, vf1, 0);
    assert!(disks[0].wait_for_waiting(1));
    let (stop_head, stop_res) = raw_admin(&mut r, 1, opcode::DEV_MODE_SET, &[Mode::Stop as u8]);
    assert!(admin_done(&mut r).is_empty(), "the Stop waits");

    // A vCPU clears VF Enable; the disk answers 50 ms later.
    std::thread::scope(|sc| {
        let d = disks[0].clone();
        sc.spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            d.set_open(true);
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let bus = &r.bus;
        sc.spawn(move || {
            bus.ecam_write(ecam_offset(PF_BDF, SRIOV + 0x08), &0u16.to_le_bytes());
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("clearing VF Enable did not return after the disk answered");
    });
    assert_eq!(r.bus.function_ids(), vec![PF_BDF]);
    assert_eq!(&disks[0].contents()[1024..1536], &data[..], "nothing lost");
    ring(&r, PF_BDF, MEMBER_PROGRESS_EVENT);
    ring(&r, PF_BDF, ADMIN_Q);
    assert_eq!(
        admin_done(&mut r),
        vec![stop_head],
        "the Stop completes once"
    );
    // The member it was for no longer exists: the error of a command for a
    // member while VF Enable is clear.
    assert_eq!(
        status_at(&r, stop_res),
        (status::EINVAL, qualifier::INVALID_GROUP)
    );
    assert!(r.admin(opcode::LIST_QUERY, 0, &[], 8).ok());
    r.enable_vfs(2);
    r.bring_up_vf(2);
    let (s, _) = r.request(2, &write_req(0, &data));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK);
}

/// FLR and virtio reset storms on VF 1 while it has requests in flight
/// (some on a disk that answers late): every reset completes (status reads
/// 0), no completion of a request from before the reset reaches the new
/// rings, and meanwhile VF 2 (its own driver) and the admin queue keep
/// working. After the storm VF 1 works and its member is still Active.
#[test]
fn flr_and_reset_storm_on_a_vf_under_load() {
    let disks = test_disks(2);
    let mut r = Rig::up_with_disks("storm", &disks);
    let (vf1, vf2) = (r.vf_bdf(1), r.vf_bdf(2));
    let mut t2 = r.t.split(8 << 20).unwrap();
    {
        let mut f = r.on(vf2);
        t2.probe_placed(&mut f, VF_BAR0 + VF_BAR0_SIZE).unwrap();
        t2.bring_up(&mut f, u64::MAX, 1).unwrap();
    }
    let pcie = TestDriver::read_caps(&mut r.on(vf1)).unwrap().pcie.unwrap();
    let mut rng = 0x5eed_u64;
    for round in 0..200u64 {
        r.bring_up_vf(1);
        let used = r.t.queue(0).unwrap().used;
        let n = 1 + xorshift(&mut rng) % 16;
        let late = round % 3 == 0;
        if late {
            disks[0].set_open(false);
        }
        for i in 0..n {
            r.t.submit(0, &write_req(i, &[round as u8; 512]), Layout::Direct)
                .unwrap();
        }
        ring(&r, vf1, 0);
        std::thread::scope(|sc| {
            if late {
                assert!(disks[0].wait_for_waiting(1), "round {round}");
                let d = disks[0].clone();
                sc.spawn(move || {
                    std::thread::sleep(Duration::from_millis(2));
                    d.set_open(true);
                });
            }
            let mut f = r.on(vf1);
            if round % 2 == 0 {
                TestDriver::cfg_write16(&mut f, pcie + 8, 0x8000);
            } else {
                r.t.set_status(&mut f, 0);
            }
            assert_eq!(r.t.status(&mut f), 0, "round {round}: reset done");
        });
        ring(&r, vf1, COMPLETION_EVENT);
        assert_eq!(
            r.t.read_mem(used + 2, 2).unwrap(),
            [0, 0],
            "round {round}: a completion from before the reset"
        );
        // VF 2 and the admin queue meanwhile.
        let data = [(round as u8) ^ 0x5a; 512];
        let (s, u) = t2
            .request(
                &mut r.on(vf2),
                0,
                &write_req(round % 64, &data),
                Layout::Direct,
            )
            .unwrap();
        assert_eq!(u.map(|u| u.id), Some(s.head), "round {round}: VF 2");
        assert_eq!(status_of(&t2, &s), VIRTIO_BLK_S_OK);
        assert_eq!(r.mode(1), Mode::Active as u8, "round {round}");
    }
    let f = r.bus.function(vf1).unwrap();
    assert!(!f.lock().unwrap().debug_state().contains("NEEDS_RESET"));
    r.bring_up_vf(1);
    let data = pattern(7, 4096);
    let (s, u) = r.request(1, &write_req(64, &data));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK);
    assert_eq!(&disks[0].contents()[64 * 512..64 * 512 + 4096], &data[..]);
    // VF 2's last write (round 199, sector 199 % 64).
    let at = (199 % 64) * 512;
    assert!(disks[1].contents()[at..at + 512] == [199u8 ^ 0x5a; 512]);
}

/// A hundred VF Enable cycles with 64 VFs: each cycle creates 64 functions
/// and removes them all; nothing of a removed VF outlives it (its device,
/// I/O worker thread and backing file handle go with it), and VFs of later
/// cycles work.
#[test]
fn a_hundred_vf_enable_cycles_with_64_vfs() {
    let mut r = Rig::new("cycles", 64, Files::Shared);
    r.probe_pf();
    r.bring_up_pf();
    let mut previous: Vec<Weak<_>> = Vec::new();
    for cycle in 0..100u16 {
        r.enable_vfs(64);
        assert_eq!(r.bus.function_ids().len(), 65, "cycle {cycle}");
        assert!(
            previous.iter().all(|w| w.upgrade().is_none()),
            "cycle {cycle}: a VF of the previous cycle is still alive"
        );
        previous = (1..=64)
            .map(|n| Arc::downgrade(&r.pf.lock().unwrap().vf(n).unwrap()))
            .collect();
        if cycle % 10 == 0 {
            let n = 1 + (cycle * 7) % 64;
            assert_eq!(r.mode(n), Mode::Active as u8);
            r.bring_up_vf(n);
            let data = [cycle as u8; 512];
            let (s, _) = r.request(n, &write_req(u64::from(cycle), &data));
            assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK, "cycle {cycle}");
        }
        let mut pf = r.on(PF_BDF);
        TestDriver::cfg_write16(&mut pf, SRIOV + 0x08, 0);
        assert_eq!(r.bus.function_ids(), vec![PF_BDF], "cycle {cycle}");
    }
    assert!(previous.iter().all(|w| w.upgrade().is_none()));
    let disk = r.file(1, Files::Shared);
    for cycle in (0..100u16).step_by(10) {
        let at = usize::from(cycle) * 512;
        assert_eq!(disk[at], cycle as u8, "cycle {cycle}'s write");
    }
}

/// The owner dies in the middle of a migration: member 1 recording with a
/// request on its disk and a Stop waiting for it, member 2 in Freeze with
/// its context stream half read. The PF is reset (the owner's driver went
/// away): the reset does not wait for the member, and the orphaned Stop
/// never writes to the dead owner's ring. The member's own guest loses
/// nothing: its request completes. A new owner finds the members as the
/// migration left them (Stop, Freeze, recording on with its records),
/// discards the half-read stream and brings both back to Active.
#[test]
fn an_owner_that_dies_mid_migration_leaves_everything_recoverable() {
    let disks = test_disks(2);
    let mut r = Rig::up_with_disks("owner-dies", &disks);
    r.bring_up_vf(1);
    let vf1 = r.vf_bdf(1);
    r.start_records_all(1);
    r.set_mode(2, Mode::Freeze);
    let part = r.admin(opcode::DEV_CTX_READ, 2, &[], 16);
    assert!(part.ok() && part.output == 16, "{part:?}");

    disks[0].set_open(false);
    let data = pattern(9, 4096);
    let s = r.t.submit(0, &read_req(0, 4096), Layout::Direct).unwrap();
    let w =
        r.t.submit(0, &write_req(16, &data), Layout::Direct)
            .unwrap();
    ring(&r, vf1, 0);
    assert!(disks[0].wait_for_waiting(1));
    let (_, stop_res) = raw_admin(&mut r, 1, opcode::DEV_MODE_SET, &[Mode::Stop as u8]);
    let old_used = {
        let d = r.pfd.as_ref().unwrap();
        d.queues[&ADMIN_Q].used
    };
    let old_idx = r.t.read_mem(old_used + 2, 2).unwrap();

    // The owner dies: its driver resets the PF, with the disk still stuck.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|sc| {
        let bus = &r.bus;
        let pfd = r.pfd.as_ref().unwrap();
        sc.spawn(move || {
            let _ = tx.send(pfd.reset(&mut OnBus::new(bus, PF_BDF)));
        });
        let done = rx.recv_timeout(Duration::from_secs(5));
        disks[0].set_open(true);
        assert_eq!(
            done.expect("the PF reset waited for a member's disk"),
            0,
            "the PF's status after its reset"
        );
    });

    // The member's guest: both requests complete.
    f_drain(&r, vf1);
    ring(&r, PF_BDF, MEMBER_PROGRESS_EVENT);
    let mut got: Vec<u16> = Vec::new();
    while let Some(u) = r.t.pop_used(0).unwrap() {
        got.push(u.id);
    }
    got.sort_unstable();
    let mut want = vec![s.head, w.head];
    want.sort_unstable();
    assert_eq!(got, want, "the member's requests completed");
    assert_eq!(&disks[0].contents()[16 * 512..16 * 512 + 4096], &data[..]);
    assert_eq!(
        r.t.read_mem(old_used + 2, 2).unwrap(),
        old_idx,
        "the orphaned Stop wrote to the dead owner's ring"
    );
    assert_eq!(r.t.read_mem(stop_res, 4).unwrap(), [0xee; 4]);

    // A new owner.
    r.bring_up_pf();
    assert_eq!(r.mode(1), Mode::Stop as u8, "the Stop took effect");
    assert_eq!(r.mode(2), Mode::Freeze as u8);
    let recs = r.read_records(1);
    let buf = s.writable()[0].0 & !4095;
    assert!(recs.contains(&buf), "records kept across the owner's death");
    let busy = r.admin(opcode::DEV_MODE_SET, 2, &[Mode::Active as u8], 0);
    assert_eq!(
        (busy.status, busy.qualifier),
        (status::EBUSY, qualifier::INVALID_COMMAND),
        "R-MODE-5: the half-read stream holds the mode"
    );
    assert!(r.admin(opcode::DEV_CTX_DISCARD, 2, &[], 0).ok());
    r.set_mode(2, Mode::Active);
    r.set_mode(1, Mode::Active);
    assert!(r.admin(opcode::DEV_WRITE_RECORDS_STOP, 1, &[], 0).ok());
    let (s, u) = r.request(1, &write_req(40, &data));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK);
}

/// An admin command published with a head outside the ring: the admin
/// queue is broken (DEVICE_NEEDS_RESET) and the command is not run, so the
/// member's mode is unchanged; the PF comes back after a reset.
#[test]
fn an_admin_head_outside_the_ring_needs_reset_and_runs_nothing() {
    let mut r = Rig::up("admin-head", 1, 1, Files::PerVf);
    let (head, _) = queue_admin(&mut r, 1, opcode::DEV_MODE_SET, &[Mode::Stop as u8]);
    let (slot, bad) = {
        let q = &r.pfd.as_ref().unwrap().queues[&ADMIN_Q];
        // The entry queue_admin just published, pointing past the ring.
        let idx = u16::from_le_bytes(r.t.read_mem(q.avail + 2, 2).unwrap().try_into().unwrap());
        (
            q.avail + 4 + 2 * u64::from(idx.wrapping_sub(1) % q.size),
            head + q.size,
        )
    };
    r.t.write_mem(slot, &bad.to_le_bytes()).unwrap();
    ring(&r, PF_BDF, ADMIN_Q);
    let st = r.pfd.as_ref().unwrap().status(&mut r.on(PF_BDF));
    assert_ne!(st & 0x40, 0, "DEVICE_NEEDS_RESET: status {st:#x}");
    assert_eq!(r.pf.lock().unwrap().member_mode(1), Some(Mode::Active));
    r.bring_up_pf();
    assert_eq!(r.mode(1), Mode::Active as u8);
}

/// Finding 2 for the admin queue: a driver that publishes more commands
/// than one turn serves and then waits gets them all. The first turn
/// serves `ADMIN_BUDGET` and signals the admin queue's own doorbell, so
/// the device thread comes back for the rest without a new kick.
#[test]
fn a_full_admin_queue_is_served_in_budgeted_turns_with_a_rekick() {
    use super::device::ADMIN_BUDGET;
    let mut r = Rig::up("admin-budget", 2, 2, Files::PerVf);
    let n = 30usize;
    assert!(
        n > ADMIN_BUDGET && 2 * n <= 64,
        "more than one turn, fits the ring"
    );
    let heads: Vec<u16> = (0..n)
        .map(|i| queue_admin(&mut r, 1 + (i as u64 % 2), opcode::DEV_MODE_GET, &[]).0)
        .collect();
    let doorbell = r
        .bus
        .function(PF_BDF)
        .unwrap()
        .lock()
        .unwrap()
        .doorbells()
        .into_iter()
        .find(|d| d.index == ADMIN_Q)
        .unwrap()
        .event;
    // Earlier kicks (the bring-up's commands) left a count on the eventfd.
    let _ = doorbell.read();
    ring(&r, PF_BDF, ADMIN_Q);
    let mut done = admin_done(&mut r);
    assert_eq!(done.len(), ADMIN_BUDGET, "one turn serves the budget");
    // As the device thread does: the re-kick is pending on the doorbell.
    let mut turns = 1;
    while done.len() < n {
        assert!(
            doorbell.read().is_ok(),
            "{} of {n} served and no re-kick pending",
            done.len()
        );
        ring(&r, PF_BDF, ADMIN_Q);
        done.extend(admin_done(&mut r));
        turns += 1;
    }
    assert_eq!(done, heads, "every command once, in order");
    assert_eq!(turns, n.div_ceil(ADMIN_BUDGET));
    assert!(
        doorbell.read().is_err(),
        "no re-kick once the queue is empty"
    );
}
