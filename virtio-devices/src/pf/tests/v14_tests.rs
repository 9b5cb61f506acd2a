//! Conformance tests of the virtio 1.4 dialect (docs/virtio-1.4-contract.md,
//! requirements R14-*), driven the way Linux's virtio_vfio_pci drives it.

use super::*;
use crate::pf::admin::{qualifier, status};
use crate::pf::parts::{self, PartHeader, PART_HEADER_LEN};
use crate::pf::v14::{opcode as op, DEVICE_OBJECT_LIMIT, GROUP_TYPE_SELF, SRIOV_OPCODES};

/// What Linux puts in LIST_USE: the SR-IOV list without 0x0 and 0x1.
const LINUX_LIST_USE: u64 = 0x3e780;

/// Linux's PF probe sequence: LIST_QUERY and LIST_USE on the SR-IOV group
/// (member 0), then the capability commands on the self group, driver
/// limits = the device's.
fn linux_probe(h: &mut Harness) {
    let r = h.cmd(op::LIST_QUERY, 0, &[], 8);
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.result_u64(0) & LINUX_LIST_USE, LINUX_LIST_USE);
    assert!(h
        .cmd(op::LIST_USE, 0, &LINUX_LIST_USE.to_le_bytes(), 0)
        .ok());
    let r = h.cmd_group(GROUP_TYPE_SELF, op::CAP_ID_LIST_QUERY, 0, &[], 8);
    assert_eq!(r.result_u64(0) & 1, 1, "{r:?}");
    let r = h.cmd_group(GROUP_TYPE_SELF, op::DEVICE_CAP_GET, 0, &[0; 8], 2);
    assert!(r.ok(), "{r:?}");
    let limit = r.result[0].min(r.result[1]);
    let mut set = vec![0u8; 8];
    set.extend_from_slice(&[limit, limit]);
    assert!(h
        .cmd_group(GROUP_TYPE_SELF, op::DRIVER_CAP_SET, 0, &set, 0)
        .ok());
}

fn obj_hdr(id: u32) -> Vec<u8> {
    let mut d = vec![0u8; 4];
    d.extend_from_slice(&id.to_le_bytes());
    d
}

fn create(h: &mut Harness, member: u64, id: u32, purpose: u8) -> Response {
    let mut d = obj_hdr(id);
    d.extend_from_slice(&[0; 8]);
    d.push(purpose);
    d.extend_from_slice(&[0; 7]);
    h.cmd(op::RESOURCE_OBJ_CREATE, member, &d, 0)
}

fn with_type(id: u32, t: u8) -> Vec<u8> {
    let mut d = obj_hdr(id);
    d.push(t);
    d.extend_from_slice(&[0; 7]);
    d
}

fn size_of_parts(h: &mut Harness, member: u64, id: u32) -> usize {
    let r = h.cmd(op::DEV_PARTS_METADATA_GET, member, &with_type(id, 0), 8);
    assert!(r.ok(), "{r:?}");
    u32::from_le_bytes(r.result[..4].try_into().unwrap()) as usize
}

fn get_all(h: &mut Harness, member: u64, id: u32, cap: usize) -> Response {
    h.cmd(op::DEV_PARTS_GET, member, &with_type(id, 1), cap)
}

fn set_parts(h: &mut Harness, member: u64, id: u32, image: &[u8]) -> Response {
    let mut d = obj_hdr(id);
    d.extend_from_slice(image);
    h.cmd(op::DEV_PARTS_SET, member, &d, 0)
}

fn headers(image: &[u8]) -> Vec<PartHeader> {
    let mut out = Vec::new();
    let mut rest = image;
    while !rest.is_empty() {
        let h = PartHeader::parse(rest).expect("whole header");
        rest = &rest[PART_HEADER_LEN + h.length as usize..];
        out.push(h);
    }
    out
}

/// Replace the value of part (type, selector) in an image.
fn patch(image: &[u8], key: (u16, u64), value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = image;
    while !rest.is_empty() {
        let mut h = PartHeader::parse(rest).unwrap();
        let v = &rest[PART_HEADER_LEN..PART_HEADER_LEN + h.length as usize];
        rest = &rest[PART_HEADER_LEN + h.length as usize..];
        if h.key() == key {
            h.length = value.len() as u32;
            out.extend_from_slice(&h.to_bytes());
            out.extend_from_slice(value);
        } else {
            out.extend_from_slice(&h.to_bytes());
            out.extend_from_slice(v);
        }
    }
    out
}

#[test]
fn r14_grp_1_validation_order_and_linux_probe_before_vf_enable() {
    let mut h = Harness::v14(2);
    h.table.vf_enable = false;
    // Linux probes at DRIVER_OK, before VF Enable, with member 0.
    linux_probe(&mut h);
    // Bad group first, then opcode, then member.
    let r = h.cmd_group(2, 0x55, 9, &[], 0);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_GROUP));
    let r = h.cmd(0x12, 1, &[], 0);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_OPCODE));
    // Member commands need VF Enable ...
    let r = create(&mut h, 1, 0, 0);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_GROUP));
    h.table.vf_enable = true;
    // ... and a member in 1..NumVFs.
    for m in [0, 3, 1 << 40] {
        let r = create(&mut h, m, 0, 0);
        assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_MEMBER));
    }
    assert!(create(&mut h, 2, 0, 0).ok());
}

#[test]
fn r14_grp_8_10_lists_in_use_per_group() {
    let mut h = Harness::v14(1);
    // After reset only LIST_QUERY and LIST_USE.
    let r = h.cmd_group(GROUP_TYPE_SELF, op::CAP_ID_LIST_QUERY, 0, &[], 8);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_OPCODE));
    let r = h.cmd(op::LIST_QUERY, 0, &[], 8);
    assert_eq!(r.result_u64(0), SRIOV_OPCODES);
    assert_eq!(SRIOV_OPCODES, 0x3ff83);
    let r = h.cmd_group(GROUP_TYPE_SELF, op::LIST_QUERY, 0, &[], 8);
    assert_eq!(r.result_u64(0), 0x383);
    // R14-GRP-17: a list with an unsupported opcode is refused, no effect.
    let r = h.cmd(
        op::LIST_USE,
        0,
        &(LINUX_LIST_USE | 1 << 0x12).to_le_bytes(),
        0,
    );
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_FIELD));
    assert!(h.cmd(op::LIST_QUERY, 0, &[], 8).ok());
    // R14-GRP-9: exactly the list given; Linux's has no 0x0/0x1.
    assert!(h
        .cmd(op::LIST_USE, 0, &LINUX_LIST_USE.to_le_bytes(), 0)
        .ok());
    let r = h.cmd(op::LIST_QUERY, 0, &[], 8);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_OPCODE));
    // The self group follows the SR-IOV list until it gets its own.
    assert!(h
        .cmd_group(GROUP_TYPE_SELF, op::CAP_ID_LIST_QUERY, 0, &[], 8)
        .ok());
    assert!(h
        .cmd_group(GROUP_TYPE_SELF, op::LIST_USE, 0, &0x3u64.to_le_bytes(), 0)
        .ok());
    let r = h.cmd_group(GROUP_TYPE_SELF, op::CAP_ID_LIST_QUERY, 0, &[], 8);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_OPCODE));
    // Resource objects are SR-IOV group commands only.
    let r = h.cmd_group(GROUP_TYPE_SELF, op::RESOURCE_OBJ_CREATE, 0, &[0; 24], 0);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_OPCODE));
    // PF reset: back to {0x0, 0x1} (R14-GRP-8), the same list again works
    // (R14-GRP-12).
    h.admin.reset();
    assert!(h.cmd(op::LIST_QUERY, 0, &[], 8).ok());
    assert!(h
        .cmd(op::LIST_USE, 0, &LINUX_LIST_USE.to_le_bytes(), 0)
        .ok());
}

#[test]
fn r14_cap_1_to_9_device_parts_capability() {
    let mut h = Harness::v14(1);
    assert!(h.cmd(op::LIST_USE, 0, &SRIOV_OPCODES.to_le_bytes(), 0).ok());
    let selfc = |h: &mut Harness, o, d: &[u8], cap| h.cmd_group(GROUP_TYPE_SELF, o, 0, d, cap);
    // R14-CAP-10: capability 0 only; its two limits in a 10-byte answer.
    assert_eq!(
        selfc(&mut h, op::CAP_ID_LIST_QUERY, &[], 8).result_u64(0),
        1
    );
    let r = selfc(&mut h, op::DEVICE_CAP_GET, &[0; 8], 2);
    assert_eq!(r.used, 10);
    assert_eq!(r.result, [DEVICE_OBJECT_LIMIT, DEVICE_OBJECT_LIMIT]);
    // R14-CAP-7: an id not listed is ENXIO.
    let r = selfc(&mut h, op::DEVICE_CAP_GET, &[1, 0, 0, 0, 0, 0, 0, 0], 2);
    assert_eq!(r.status, status::ENXIO);
    let mut set = vec![1u8, 0, 0, 0, 0, 0, 0, 0, 1, 1];
    assert_eq!(
        selfc(&mut h, op::DRIVER_CAP_SET, &set, 0).status,
        status::ENXIO
    );
    // R14-CAP-4: above the device's limit refused; R14-CAP-2: below taken.
    set[0] = 0;
    set[8] = DEVICE_OBJECT_LIMIT + 1;
    let r = selfc(&mut h, op::DRIVER_CAP_SET, &set, 0);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_FIELD));
    set[8] = 2;
    set[9] = 2;
    assert!(selfc(&mut h, op::DRIVER_CAP_SET, &set, 0).ok());
    // Older Linux: the same commands on the SR-IOV group, member 0.
    let r = h.cmd(op::DEVICE_CAP_GET, 0, &[0; 8], 2);
    assert!(r.ok(), "{r:?}");
    // R14-CAP-6: shrinking below an existing object is EBUSY.
    assert!(create(&mut h, 1, 1, 0).ok());
    set[8] = 1;
    assert_eq!(
        selfc(&mut h, op::DRIVER_CAP_SET, &set, 0).status,
        status::EBUSY
    );
    // R14-CAP-8/9: reset clears the driver limits: no object fits.
    h.admin.reset();
    assert!(h.cmd(op::LIST_USE, 0, &SRIOV_OPCODES.to_le_bytes(), 0).ok());
    let r = create(&mut h, 1, 0, 0);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_FIELD));
}

#[test]
fn r14_obj_1_to_12_device_parts_objects() {
    let mut h = Harness::v14(2);
    assert!(h.cmd(op::LIST_USE, 0, &SRIOV_OPCODES.to_le_bytes(), 0).ok());
    let set = [0u8, 0, 0, 0, 0, 0, 0, 0, 2, 1];
    assert!(h
        .cmd_group(GROUP_TYPE_SELF, op::DRIVER_CAP_SET, 0, &set, 0)
        .ok());
    assert!(create(&mut h, 1, 0, 0).ok());
    // R14-OBJ-1: the id exists.
    assert_eq!(create(&mut h, 1, 0, 1).status, status::EEXIST);
    // R14-OBJ-12: ids below the driver limit of the purpose.
    let r = create(&mut h, 1, 2, 0);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_FIELD));
    // R14-OBJ-3: one SET object allowed; a second is ENOSPC.
    assert!(create(&mut h, 2, 1, 0).ok());
    let r = create(&mut h, 1, 0, 1);
    assert_eq!(r.status, status::EEXIST);
    h.admin.v14.objects.clear();
    assert!(create(&mut h, 1, 0, 1).ok());
    let r = create(&mut h, 2, 1, 1);
    assert_eq!(r.status, status::EINVAL, "id 1 is not below set limit 1");
    // Bad type, flags, purpose.
    let mut d = obj_hdr(1);
    d.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0]);
    let r = h.cmd(op::RESOURCE_OBJ_CREATE, 1, &d, 0);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_FIELD));
    let r = h.cmd(op::RESOURCE_OBJ_CREATE, 1, &with_type(1, 2), 0);
    assert_eq!(r.status, status::EINVAL);
    // R14-OBJ-10: QUERY returns the purpose.
    let r = h.cmd(op::RESOURCE_OBJ_QUERY, 1, &obj_hdr(0), 8);
    assert_eq!(r.result[0], 1);
    // An object belongs to its member.
    let r = h.cmd(op::RESOURCE_OBJ_QUERY, 2, &obj_hdr(0), 8);
    assert_eq!(r.status, status::ENXIO);
    // R14-OBJ-2: DESTROY twice: ENXIO; R14-OBJ-5: created again.
    assert!(h.cmd(op::RESOURCE_OBJ_DESTROY, 1, &obj_hdr(0), 0).ok());
    let r = h.cmd(op::RESOURCE_OBJ_DESTROY, 1, &obj_hdr(0), 0);
    assert_eq!(r.status, status::ENXIO);
    assert!(create(&mut h, 1, 0, 0).ok());
    // R14-OBJ-9: a failed MODIFY changes nothing.
    let mut m = obj_hdr(0);
    m.extend_from_slice(&[0; 8]);
    m.push(7);
    assert_eq!(
        h.cmd(op::RESOURCE_OBJ_MODIFY, 1, &m, 0).status,
        status::EINVAL
    );
    assert_eq!(
        h.cmd(op::RESOURCE_OBJ_QUERY, 1, &obj_hdr(0), 8).result[0],
        0
    );
    // R14-OBJ-11: PF reset destroys every object.
    h.admin.reset();
    assert!(h.admin.v14.objects.is_empty());
}

/// A member with a GET object 0 and a SET object 1, after Linux's probe.
fn ready(n: u16) -> Harness {
    let mut h = Harness::v14(n);
    linux_probe(&mut h);
    h
}

#[test]
fn r14_parts_3_metadata_and_get_in_mandatory_order() {
    let mut h = ready(1);
    assert!(create(&mut h, 1, 0, 0).ok());
    let size = size_of_parts(&mut h, 1, 0);
    // Two queues: 159 + 72 × 2 bytes.
    assert_eq!(size, 303);
    let r = get_all(&mut h, 1, 0, size);
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.result.len(), size);
    assert_eq!(r.used as usize, 8 + size);
    let hs = headers(&r.result);
    let types: Vec<u16> = hs.iter().map(|h| h.part_type).collect();
    assert!(types.windows(2).all(|w| w[0] <= w[1]), "{types:x?}");
    assert_eq!(hs[0].part_type, parts::PART_DEV_FEATURES);
    assert_eq!(hs[0].flags, parts::PART_F_OPTIONAL);
    // COUNT and LIST name the same parts.
    let r = h.cmd(op::DEV_PARTS_METADATA_GET, 1, &with_type(0, 1), 8);
    assert_eq!(r.result[0] as usize, hs.len());
    let r = h.cmd(
        op::DEV_PARTS_METADATA_GET,
        1,
        &with_type(0, 2),
        8 + 16 * hs.len(),
    );
    assert!(r.ok());
    assert_eq!(
        r.result[8..]
            .chunks(16)
            .map(|c| PartHeader::parse(c).unwrap())
            .collect::<Vec<_>>(),
        hs
    );
    // R14-PARTS-13: LIST that does not fit is ENOMEM.
    let r = h.cmd(op::DEV_PARTS_METADATA_GET, 1, &with_type(0, 2), 40);
    assert_eq!(r.status, status::ENOMEM);
    // A GET that does not fit: ENOMEM, never half a part.
    let r = get_all(&mut h, 1, 0, size - 1);
    assert_eq!((r.status, r.used), (status::ENOMEM, 8));
    // R14-PARTS-2: again, same bytes; R14-PARTS-14: SELECTED in mandatory
    // order, unknown names skipped.
    let again = get_all(&mut h, 1, 0, size).result;
    let mut sel = with_type(0, 0);
    for key in [(0x104u16, 1u64), (0x101, 0), (0x1ff, 0), (0x104, 9)] {
        sel.extend_from_slice(
            &PartHeader {
                part_type: key.0,
                flags: 0,
                selector: key.1,
                length: 0,
            }
            .to_bytes(),
        );
    }
    let r = h.cmd(op::DEV_PARTS_GET, 1, &sel, size);
    let got: Vec<(u16, u64)> = headers(&r.result).iter().map(|h| h.key()).collect();
    assert_eq!(got, [(0x101, 0), (0x104, 1)]);
    assert_eq!(again, get_all(&mut h, 1, 0, size).result);
    // A SET object does not read.
    assert!(create(&mut h, 1, 1, 1).ok());
    let r = get_all(&mut h, 1, 1, size);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_FIELD));
}

#[test]
fn r14_parts_4_to_8_set_is_checked_and_has_no_effect_when_refused() {
    let mut h = ready(2);
    assert!(create(&mut h, 1, 0, 0).ok());
    assert!(create(&mut h, 2, 1, 1).ok());
    let size = size_of_parts(&mut h, 1, 0);
    let image = get_all(&mut h, 1, 0, size).result;
    // R14-PARTS-4: not while running.
    let r = set_parts(&mut h, 2, 1, &image);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_COMMAND));
    assert!(h.cmd(op::DEV_MODE_SET, 2, &[1], 0).ok());
    let bad = [
        // R14-PARTS-6: a length not the device's.
        patch(&image, (0x103, 0), &[0x0f, 0]),
        // R14-PARTS-7: DEV_FEATURES are the device's, never applied.
        patch(&image, (0x100, 0), &(1u64 << 63).to_le_bytes()),
        // Read-only num_queues.
        patch(&image, (0x102, 0x12), &7u16.to_le_bytes()),
        // Features the member does not offer.
        patch(&image, (0x101, 0), &(1u64 << 63).to_le_bytes()),
        // A queue size that is not a power of two.
        patch(&image, (0x104, 0), &[&[3u8, 0][..], &[0u8; 30]].concat()),
        // Cut in the middle of a part.
        image[..image.len() - 3].to_vec(),
    ];
    for b in &bad {
        let r = set_parts(&mut h, 2, 1, b);
        assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_FIELD));
        assert!(h.member(2).migration.pending_context().is_none());
    }
    // An unknown part: refused unless optional (R14-PARTS-8).
    let mut extra = image.clone();
    let unknown = PartHeader {
        part_type: 0x1f0,
        flags: 0,
        selector: 0,
        length: 2,
    };
    extra.extend_from_slice(&unknown.to_bytes());
    extra.extend_from_slice(&[1, 2]);
    assert_eq!(set_parts(&mut h, 2, 1, &extra).status, status::EINVAL);
    let mut optional = image.clone();
    optional.extend_from_slice(
        &PartHeader {
            flags: parts::PART_F_OPTIONAL,
            ..unknown
        }
        .to_bytes(),
    );
    optional.extend_from_slice(&[1, 2]);
    assert!(set_parts(&mut h, 2, 1, &optional).ok());
    // R14-PARTS-5: again; staged, applied only on resume (R14-PARTS-15).
    assert!(set_parts(&mut h, 2, 1, &image).ok());
    assert!(!h.member(2).device.log.contains(&"apply".to_string()));
    assert!(h.cmd(op::DEV_MODE_SET, 2, &[0], 0).ok());
    assert!(h.member(2).device.log.contains(&"apply".to_string()));
}

#[test]
fn r14_mode_13_14_15_mode_set_flags() {
    let mut h = ready(1);
    // Running → running, stopped → stopped: no-ops that succeed.
    assert!(h.cmd(op::DEV_MODE_SET, 1, &[0], 0).ok());
    assert_eq!(h.member(1).device.resumes, 0);
    assert!(h.cmd(op::DEV_MODE_SET, 1, &[1], 0).ok());
    assert_eq!(h.member(1).mode(), Mode::Stop);
    assert!(h.cmd(op::DEV_MODE_SET, 1, &[1], 0).ok());
    // Reserved flag bits.
    let r = h.cmd(op::DEV_MODE_SET, 1, &[3], 0);
    assert_eq!((r.status, r.qualifier), (22, qualifier::INVALID_FIELD));
    assert_eq!(h.member(1).mode(), Mode::Stop);
    assert!(h.cmd(op::DEV_MODE_SET, 1, &[0], 0).ok());
    assert_eq!(h.member(1).mode(), Mode::Active);
}

#[test]
fn r14_mode_2_stop_completes_after_in_flight_requests() {
    let mut h = ready(2);
    h.member(1).device.slow = 3;
    let bytes = AdminCommand {
        opcode: op::DEV_MODE_SET,
        group_type: 1,
        member_id: 1,
        data: &[1],
        truncated: false,
    }
    .to_bytes();
    let head = h.submit_raw(&bytes, 0);
    assert!(h.serve().is_empty(), "the stop waits");
    // The member's other commands: EAGAIN meanwhile; another member's run.
    assert!(create(&mut h, 2, 0, 0).ok());
    assert_eq!(create(&mut h, 1, 1, 0).status, status::EAGAIN);
    let mut done = Vec::new();
    for _ in 0..5 {
        done.extend(h.poll());
    }
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, head);
    assert_eq!(h.member(1).mode(), Mode::Stop);
}

#[test]
fn r14_parts_round_trip_between_members() {
    let mut h = ready(2);
    assert!(create(&mut h, 1, 0, 0).ok());
    assert!(create(&mut h, 2, 1, 1).ok());
    // Linux's flow: stop the source, read SIZE and ALL; stop the
    // destination, SET the record, resume.
    assert!(h.cmd(op::DEV_MODE_SET, 1, &[1], 0).ok());
    let size = size_of_parts(&mut h, 1, 0);
    let image = get_all(&mut h, 1, 0, size).result;
    assert!(h.cmd(op::DEV_MODE_SET, 2, &[1], 0).ok());
    assert!(set_parts(&mut h, 2, 1, &image).ok());
    assert!(h.cmd(op::DEV_MODE_SET, 2, &[0], 0).ok());
    let src = h.member(1).device.ctx.clone();
    let dst = h.member(2).device.ctx.clone();
    assert_eq!(dst.features, src.features);
    let (sc, dc) = (src.common.unwrap(), dst.common.unwrap());
    assert_eq!(
        (
            sc.device_status,
            sc.queue_select,
            sc.config_msix_vector,
            sc.driver_feature_select
        ),
        (
            dc.device_status,
            dc.queue_select,
            dc.config_msix_vector,
            dc.driver_feature_select
        )
    );
    for (s, d) in src.queues.iter().zip(&dst.queues) {
        assert_eq!(
            (
                s.index,
                s.size,
                s.msix_vector,
                s.desc,
                s.driver,
                s.device,
                s.enabled
            ),
            (
                d.index,
                d.size,
                d.msix_vector,
                d.desc,
                d.driver,
                d.device,
                d.enabled
            )
        );
        assert!(d.avail_follows_used, "no ring position in parts");
    }
    // The destination's own GET now gives the source's image.
    assert!(create(&mut h, 2, 2, 0).ok());
    assert_eq!(get_all(&mut h, 2, 2, size).result, image);
}

#[test]
fn r14_parts_9_flr_makes_the_member_running_and_keeps_objects() {
    let mut h = ready(1);
    assert!(create(&mut h, 1, 1, 1).ok());
    assert!(h.cmd(op::DEV_MODE_SET, 1, &[1], 0).ok());
    assert!(create(&mut h, 1, 0, 0).ok());
    let size = size_of_parts(&mut h, 1, 0);
    let image = get_all(&mut h, 1, 0, size).result;
    assert!(set_parts(&mut h, 1, 1, &image).ok());
    assert!(h.member(1).migration.pending_context().is_some());
    h.member(1).device.flr = true;
    // The next command sees the member running with nothing staged.
    assert!(h.cmd(op::DEV_MODE_SET, 1, &[0], 0).ok());
    assert_eq!(h.member(1).device.resumes, 0, "running already");
    assert_eq!(h.member(1).mode(), Mode::Active);
    assert!(h.member(1).migration.pending_context().is_none());
    assert!(!h.member(1).device.log.contains(&"apply".to_string()));
    // Objects stay: Linux destroys them itself after a reset.
    assert!(h.cmd(op::RESOURCE_OBJ_DESTROY, 1, &obj_hdr(1), 0).ok());
    assert!(h.cmd(op::RESOURCE_OBJ_DESTROY, 1, &obj_hdr(0), 0).ok());
}

#[test]
fn r14_avq_1_linux_buffer_shapes_in_every_layout() {
    for layout in [
        Layout::Two,
        Layout::Split,
        Layout::Bytes,
        Layout::Odd,
        Layout::Indirect,
    ] {
        let mut h = ready(1);
        h.layout = layout;
        assert!(create(&mut h, 1, 0, 0).ok());
        // 1-byte DEV_MODE_SET, 2-byte DEVICE_CAP_GET result.
        assert!(h.cmd(op::DEV_MODE_SET, 1, &[1], 0).ok(), "{layout:?}");
        let r = h.cmd_group(GROUP_TYPE_SELF, op::DEVICE_CAP_GET, 0, &[0; 8], 2);
        assert_eq!(r.result.len(), 2, "{layout:?}");
        // One byte per descriptor cannot hold a whole image in a ring.
        if !matches!(layout, Layout::Bytes) {
            let size = size_of_parts(&mut h, 1, 0);
            assert_eq!(get_all(&mut h, 1, 0, size).result.len(), size, "{layout:?}");
        }
    }
}
