//! virtio-iommu conformance tests, driven through the transport by
//! [`crate::test_driver`] acting as the guest's driver. Each test names the
//! requirement (`docs/virtio-iommu-contract.md`) it checks.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vm_migration::{DmaIommu, DmaMemory};

use super::tables::*;
use super::*;
use crate::block::Block;
use crate::test_disk::TestDisk;
use crate::test_driver::*;
use crate::transport::{VirtioPciDevice, VirtioPciOptions};

const BAR0: u64 = 0x1_0000_0000;
const VERSION_1: u64 = 1 << 32;
/// The endpoints the IOMMU under test manages.
const EP: u32 = 0x0020;
const EP2: u32 = 0x0021;
const NOT_MANAGED: u32 = 0x0100;

struct Rig {
    drv: TestDriver,
    dev: VirtioPciDevice<VirtioIommu>,
    handle: IommuHandle,
}

fn all_features() -> u64 {
    VERSION_1
        | (1 << VIRTIO_IOMMU_F_INPUT_RANGE)
        | (1 << VIRTIO_IOMMU_F_DOMAIN_RANGE)
        | (1 << VIRTIO_IOMMU_F_MAP_UNMAP)
        | (1 << VIRTIO_IOMMU_F_PROBE)
        | (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG)
}

fn rig() -> Rig {
    let mut drv = TestDriver::new(DEFAULT_MEM_SIZE);
    let iommu = VirtioIommu::new(vec![EP..=EP2], DmaMemory::direct(drv.mem().clone())).unwrap();
    let handle = iommu.handle();
    let mut dev = VirtioPciDevice::new(
        iommu,
        drv.dma_atomic(),
        drv.interrupt_group(),
        VirtioPciOptions::default(),
    )
    .unwrap();
    drv.probe(&mut dev, BAR0).unwrap();
    drv.bring_up(&mut dev, all_features(), 2).unwrap();
    Rig { drv, dev, handle }
}

impl Rig {
    /// Sends a request (`body` device-readable, `wlen` device-writable
    /// bytes); returns the used length and the writable bytes.
    fn send(&mut self, body: &[u8], wlen: u32) -> (u32, Vec<u8>) {
        let (s, u) = self
            .drv
            .request(
                &mut self.dev,
                0,
                &[Seg::Readable(body.to_vec()), Seg::Writable(wlen)],
                Layout::Direct,
            )
            .unwrap();
        let u = u.expect("the request was not completed");
        let (a, l) = s.writable()[0];
        (u.len, self.drv.read_mem(a, l as usize).unwrap())
    }

    /// Sends a request with a 4-byte tail; returns its status.
    fn status(&mut self, body: &[u8]) -> u8 {
        let (len, w) = self.send(body, 4);
        assert_eq!(len, 4, "used length of a completed request");
        assert_eq!(&w[1..4], &[0, 0, 0], "tail reserved bytes are zero");
        w[0]
    }

    fn attach(&mut self, domain: u32, ep: u32, flags: u32) -> u8 {
        self.status(&attach_req(domain, ep, flags, 0))
    }

    fn detach(&mut self, domain: u32, ep: u32) -> u8 {
        let mut b = vec![T_DETACH, 0, 0, 0];
        b.extend_from_slice(&domain.to_le_bytes());
        b.extend_from_slice(&ep.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        self.status(&b)
    }

    fn map(&mut self, domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> u8 {
        let mut b = vec![T_MAP, 0, 0, 0];
        b.extend_from_slice(&domain.to_le_bytes());
        b.extend_from_slice(&start.to_le_bytes());
        b.extend_from_slice(&end.to_le_bytes());
        b.extend_from_slice(&phys.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        self.status(&b)
    }

    fn unmap(&mut self, domain: u32, start: u64, end: u64) -> u8 {
        let mut b = vec![T_UNMAP, 0, 0, 0];
        b.extend_from_slice(&domain.to_le_bytes());
        b.extend_from_slice(&start.to_le_bytes());
        b.extend_from_slice(&end.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        self.status(&b)
    }

    fn mem_of(&self, ep: u32) -> DmaMemory {
        DmaMemory::translated(
            self.drv.mem().clone(),
            self.handle.endpoint(ep).expect("managed endpoint"),
        )
    }

    fn cfg_u64(&mut self, off: u64) -> u64 {
        self.drv.device_cfg_read(&mut self.dev, off, 4)
            | (self.drv.device_cfg_read(&mut self.dev, off + 4, 4) << 32)
    }

    /// Gives the event queue `n` buffers of `len` bytes.
    fn event_buffers(&mut self, n: usize, len: u32) -> Vec<Submitted> {
        let v: Vec<Submitted> = (0..n)
            .map(|_| {
                self.drv
                    .submit(1, &[Seg::Writable(len)], Layout::Direct)
                    .unwrap()
            })
            .collect();
        self.drv.kick(&mut self.dev, 1).unwrap();
        v
    }
}

fn attach_req(domain: u32, ep: u32, flags: u32, reserved: u32) -> Vec<u8> {
    let mut b = vec![T_ATTACH, 0, 0, 0];
    b.extend_from_slice(&domain.to_le_bytes());
    b.extend_from_slice(&ep.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&reserved.to_le_bytes());
    b
}

fn probe_req(ep: u32) -> Vec<u8> {
    let mut b = vec![T_PROBE, 0, 0, 0];
    b.extend_from_slice(&ep.to_le_bytes());
    b.extend_from_slice(&[0; 64]);
    b
}

const RW: u32 = MAP_F_READ | MAP_F_WRITE;

#[test]
fn r_iommu_1_features() {
    let mut r = rig();
    let f = r.drv.device_features(&mut r.dev);
    for bit in [
        VIRTIO_IOMMU_F_MAP_UNMAP,
        VIRTIO_IOMMU_F_INPUT_RANGE,
        VIRTIO_IOMMU_F_DOMAIN_RANGE,
        VIRTIO_IOMMU_F_PROBE,
        VIRTIO_IOMMU_F_BYPASS_CONFIG,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit} offered");
    }
    assert_eq!(f & (1 << VIRTIO_IOMMU_F_BYPASS), 0, "BYPASS is superseded");
    assert_eq!(f & (1 << VIRTIO_IOMMU_F_MMIO), 0, "MMIO is not offered");
    assert_eq!(r.dev.device().device_type(), 23);
}

#[test]
fn r_iommu_2_configuration_and_bypass_field() {
    let mut r = rig();
    assert_eq!(r.cfg_u64(0), PAGE_SIZE_MASK);
    assert_ne!(r.cfg_u64(0), 0, "at least one page size");
    assert_eq!(r.cfg_u64(8), 0);
    assert_eq!(r.cfg_u64(16), (1 << 48) - 1);
    assert_eq!(r.drv.device_cfg_read(&mut r.dev, 24, 4), 0);
    assert_eq!(
        r.drv.device_cfg_read(&mut r.dev, 28, 4),
        u64::from(u32::MAX)
    );
    assert_eq!(
        r.drv.device_cfg_read(&mut r.dev, 32, 4),
        u64::from(PROBE_SIZE)
    );
    assert_eq!(
        r.drv.device_cfg_read(&mut r.dev, 36, 1),
        0,
        "bypass starts at 0"
    );
    // Only bit 0 of a write counts; nothing else is writable.
    r.dev.device_mut().write_config(CONFIG_BYPASS, &[0xff]);
    assert_eq!(r.drv.device_cfg_read(&mut r.dev, 36, 1), 1);
    r.dev.device_mut().write_config(CONFIG_BYPASS, &[0xfe]);
    assert_eq!(r.drv.device_cfg_read(&mut r.dev, 36, 1), 0);
    r.dev
        .device_mut()
        .write_config(0, &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(r.cfg_u64(0), PAGE_SIZE_MASK);
    // bypass survives a device reset.
    r.dev.device_mut().write_config(CONFIG_BYPASS, &[1]);
    r.drv.reset(&mut r.dev).unwrap();
    assert_eq!(r.drv.device_cfg_read(&mut r.dev, 36, 1), 1);
}

#[test]
fn r_iommu_3_reset_detaches_everything() {
    let mut r = rig();
    assert_eq!(r.attach(1, EP, 0), status::OK);
    assert_eq!(r.map(1, 0x10_0000, 0x10_0fff, 0x20_0000, RW), status::OK);
    assert!(r
        .mem_of(EP)
        .read_obj::<u32>(GuestAddress(0x10_0000))
        .is_ok());
    r.drv.reset(&mut r.dev).unwrap();
    let t = r.handle.shared().tables();
    assert!(t.domains.is_empty() && t.attached.is_empty() && t.mapping_count == 0);
    assert!(r
        .mem_of(EP)
        .read_obj::<u32>(GuestAddress(0x10_0000))
        .is_err());
}

#[test]
fn r_iommu_4_unparseable_requests_are_returned_unwritten() {
    let mut r = rig();
    // Unknown type: nothing written (the driver's 0xAA fill stays), used 0.
    let (len, w) = r.send(&[0x77, 0, 0, 0, 1, 2, 3, 4], 4);
    assert_eq!((len, w), (0, vec![0xaa; 4]));
    // A writable part too small for the tail.
    let (len, w) = r.send(&attach_req(1, EP, 0, 0), 3);
    assert_eq!((len, w), (0, vec![0xaa; 3]));
    // A body too short for its type, with a tail: INVAL.
    assert_eq!(r.status(&[T_MAP, 0, 0, 0, 1, 0, 0, 0]), status::INVAL);
    assert!(r.handle.shared().tables().domains.is_empty());
    // Reserved bytes of the head are ignored.
    let mut b = attach_req(1, EP, 0, 0);
    b[1] = 0x5a;
    assert_eq!(r.status(&b), status::OK);
    // A larger writable buffer: the tail is its last 4 bytes, the rest
    // reads as zero.
    let (len, w) = r.send(&attach_req(2, EP2, 0, 0), 12);
    assert_eq!(len, 12);
    assert_eq!(w, vec![0; 12]);
}

#[test]
fn r_iommu_5_bypass_and_blocking_of_unattached_endpoints() {
    let mut r = rig();
    let m = r.mem_of(EP);
    r.drv.write_mem(0x30_0000, &[7; 8]).unwrap();
    assert!(
        m.read_obj::<u64>(GuestAddress(0x30_0000)).is_err(),
        "blocked"
    );
    r.dev.device_mut().write_config(CONFIG_BYPASS, &[1]);
    assert_eq!(
        m.read_obj::<u64>(GuestAddress(0x30_0000)).unwrap(),
        0x0707_0707_0707_0707
    );
    // Attached to a bypass domain: identity even with global bypass off.
    r.dev.device_mut().write_config(CONFIG_BYPASS, &[0]);
    assert_eq!(r.attach(5, EP, ATTACH_F_BYPASS), status::OK);
    assert!(m.read_obj::<u64>(GuestAddress(0x30_0000)).is_ok());
    // Attached to a translating domain with nothing mapped: faults.
    assert_eq!(r.attach(6, EP, 0), status::OK);
    assert!(m.read_obj::<u64>(GuestAddress(0x30_0000)).is_err());
}

#[test]
fn r_iommu_6_attach() {
    let mut r = rig();
    assert_eq!(
        r.status(&attach_req(1, EP, 0, 1)),
        status::INVAL,
        "reserved"
    );
    assert_eq!(r.attach(1, EP, 0x2), status::INVAL, "unknown flag");
    assert_eq!(r.attach(1, NOT_MANAGED, 0), status::NOENT);
    assert_eq!(r.attach(1, EP, 0), status::OK);
    assert_eq!(r.attach(1, EP2, 0), status::OK, "two endpoints, one domain");
    assert_eq!(
        r.attach(1, EP2, ATTACH_F_BYPASS),
        status::INVAL,
        "bypass flag differs"
    );
    assert_eq!(r.map(1, 0x1000, 0x1fff, 0x40_0000, RW), status::OK);
    r.drv.write_mem(0x40_0000, &[9; 4]).unwrap();
    assert!(r.mem_of(EP2).read_obj::<u32>(GuestAddress(0x1000)).is_ok());
    // Moving EP2 to domain 2 detaches it from domain 1 first.
    assert_eq!(r.attach(2, EP2, 0), status::OK);
    assert!(r.mem_of(EP2).read_obj::<u32>(GuestAddress(0x1000)).is_err());
    assert!(r.mem_of(EP).read_obj::<u32>(GuestAddress(0x1000)).is_ok());
    let t = r.handle.shared().tables();
    assert_eq!(t.attached.get(&EP2), Some(&2));
    assert_eq!(t.domains[&1].endpoints, 1);
    // Attaching where it already is changes nothing.
    assert_eq!(r.attach(1, EP, 0), status::OK);
    assert_eq!(r.handle.shared().tables().domains[&1].endpoints, 1);
}

#[test]
fn r_iommu_7_detach() {
    let mut r = rig();
    assert_eq!(r.detach(1, NOT_MANAGED), status::NOENT);
    assert_eq!(r.detach(1, EP), status::INVAL, "not attached");
    assert_eq!(r.attach(1, EP, 0), status::OK);
    assert_eq!(r.attach(1, EP2, 0), status::OK);
    assert_eq!(r.map(1, 0x1000, 0x1fff, 0x40_0000, RW), status::OK);
    assert_eq!(r.detach(2, EP), status::INVAL, "attached elsewhere");
    assert_eq!(r.detach(1, EP), status::OK);
    assert!(r.mem_of(EP).read_obj::<u32>(GuestAddress(0x1000)).is_err());
    assert_eq!(
        r.handle.shared().tables().mapping_count,
        1,
        "EP2 keeps the domain"
    );
    assert_eq!(r.detach(1, EP2), status::OK);
    let t = r.handle.shared().tables();
    assert!(t.domains.is_empty(), "the last detach removes the domain");
    assert_eq!(t.mapping_count, 0);
    // The ID can be reused for a fresh domain, without the old mappings.
    assert_eq!(r.attach(1, EP, 0), status::OK);
    assert!(r.mem_of(EP).read_obj::<u32>(GuestAddress(0x1000)).is_err());
}

#[test]
fn r_iommu_8_map() {
    let mut r = rig();
    assert_eq!(r.map(1, 0, 0xfff, 0, RW), status::NOENT);
    assert_eq!(r.attach(1, EP, 0), status::OK);
    assert_eq!(r.map(1, 0x800, 0x17ff, 0x40_0000, RW), status::RANGE);
    assert_eq!(r.map(1, 0x1000, 0x17ff, 0x40_0000, RW), status::RANGE);
    assert_eq!(r.map(1, 0x1000, 0x1fff, 0x40_0800, RW), status::RANGE);
    assert_eq!(r.map(1, 1 << 48, (1 << 48) + 0xfff, 0, RW), status::RANGE);
    assert_eq!(
        r.map(1, 0x2000, 0x1fff, 0, RW),
        status::INVAL,
        "end < start"
    );
    assert_eq!(
        r.map(1, 0x1000, 0x1fff, 0, 1 << 2),
        status::INVAL,
        "MMIO not offered"
    );
    assert_eq!(r.map(1, 0x1000, 0x1fff, 0, 1 << 7), status::INVAL);
    assert_eq!(
        r.map(1, 0xfee0_0000, 0xfee0_0fff, 0, RW),
        status::INVAL,
        "MSI window"
    );
    assert_eq!(r.map(1, 0x1000, 0x2fff, 0x40_0000, MAP_F_READ), status::OK);
    assert_eq!(
        r.map(1, 0x2000, 0x3fff, 0x50_0000, RW),
        status::INVAL,
        "overlap"
    );
    assert_eq!(
        r.map(1, 0x0, 0x1fff, 0x50_0000, RW),
        status::INVAL,
        "overlap"
    );
    assert_eq!(r.map(1, 0x3000, 0x3fff, 0x50_0000, MAP_F_WRITE), status::OK);
    // Permissions: read-only and write-only mappings.
    let m = r.mem_of(EP);
    assert!(m.read_obj::<u32>(GuestAddress(0x1000)).is_ok());
    assert!(m.write_obj(1u32, GuestAddress(0x1000)).is_err());
    assert!(m.write_obj(0x5555_aaaau32, GuestAddress(0x3004)).is_ok());
    assert_eq!(
        r.drv
            .mem()
            .read_obj::<u32>(GuestAddress(0x50_0004))
            .unwrap(),
        0x5555_aaaa
    );
    assert!(m.read_obj::<u32>(GuestAddress(0x3004)).is_err());
    // Bypass domains take no mappings.
    assert_eq!(r.attach(9, EP2, ATTACH_F_BYPASS), status::OK);
    assert_eq!(r.map(9, 0x1000, 0x1fff, 0, RW), status::INVAL);
}

#[test]
fn r_iommu_8_map_resources_are_bounded() {
    let mut t = Tables::new(false);
    assert_eq!(t.attach(1, EP, 0, true), status::OK);
    t.mapping_count = MAX_MAPPINGS;
    assert_eq!(t.map(1, 0, 0xfff, 0, RW), status::NOMEM);
    t.mapping_count = MAX_MAPPINGS - 1;
    assert_eq!(t.map(1, 0, 0xfff, 0, RW), status::OK);
}

#[test]
fn r_iommu_9_unmap_follows_the_specification_examples() {
    // Each example starts from a blank domain 1 with EP attached: the
    // mappings made (first and last page, inclusive), the UNMAP range (in
    // 4 KiB pages, inclusive), the status and the mappings left. The
    // first seven are the specification's; the last splits at the high end.
    type Example = (&'static [(u64, u64)], (u64, u64), u8, usize);
    const EXAMPLES: [Example; 8] = [
        (&[], (0, 4), status::OK, 0),
        (&[(0, 9)], (0, 9), status::OK, 0),
        (&[(0, 4), (5, 9)], (0, 9), status::OK, 0),
        (&[(0, 9)], (0, 4), status::RANGE, 1),
        (&[(0, 4), (5, 9)], (0, 4), status::OK, 1),
        (&[(0, 4)], (0, 9), status::OK, 0),
        (&[(0, 4), (10, 14)], (0, 14), status::OK, 0),
        (&[(3, 9)], (0, 4), status::RANGE, 1),
    ];
    let p = |n: u64| n * 0x1000;
    for (k, (maps, (lo, hi), want, left)) in EXAMPLES.into_iter().enumerate() {
        let mut r = rig();
        assert_eq!(r.attach(1, EP, 0), status::OK);
        for &(a, b) in maps {
            assert_eq!(
                r.map(1, p(a), p(b + 1) - 1, p(a) + 0x40_0000, RW),
                status::OK
            );
        }
        assert_eq!(r.unmap(1, p(lo), p(hi + 1) - 1), want, "example {}", k + 1);
        assert_eq!(
            r.handle.shared().tables().mapping_count,
            left,
            "example {}",
            k + 1
        );
        if want == status::RANGE {
            // Nothing was removed: the mapping still translates.
            let (a, _) = maps[0];
            assert!(r.mem_of(EP).read_obj::<u8>(GuestAddress(p(a))).is_ok());
        }
    }
    // Missing and bypass domains.
    let mut r = rig();
    assert_eq!(r.unmap(7, 0, 0xfff), status::NOENT);
    assert_eq!(r.attach(8, EP2, ATTACH_F_BYPASS), status::OK);
    assert_eq!(r.unmap(8, 0, 0xfff), status::INVAL);
}

#[test]
fn r_iommu_10_probe() {
    let mut r = rig();
    let n = PROBE_SIZE + 4;
    let (len, w) = r.send(&probe_req(EP), n);
    assert_eq!(len, n);
    assert_eq!(w[PROBE_SIZE as usize], status::OK);
    // One RESV_MEM property (type 1, length 20) of subtype MSI.
    assert_eq!(u16::from_le_bytes([w[0], w[1]]), PROBE_T_RESV_MEM);
    assert_eq!(u16::from_le_bytes([w[2], w[3]]), 20);
    assert_eq!(w[4], RESV_MEM_T_MSI);
    assert_eq!(&w[5..8], &[0, 0, 0]);
    assert_eq!(
        u64::from_le_bytes(w[8..16].try_into().unwrap()),
        0xfee0_0000
    );
    assert_eq!(
        u64::from_le_bytes(w[16..24].try_into().unwrap()),
        0xfeef_ffff
    );
    // The rest of the properties is zero (an empty property ends them).
    assert!(w[24..PROBE_SIZE as usize].iter().all(|&b| b == 0));
    // Unknown endpoint: NOENT.
    let (_, w) = r.send(&probe_req(NOT_MANAGED), n);
    assert_eq!(w[PROBE_SIZE as usize], status::NOENT);
    // Too small a properties buffer: INVAL, and no property written.
    let (len, w) = r.send(&probe_req(EP), 64 + 4);
    assert_eq!(len, 68);
    assert_eq!(w[64], status::INVAL);
    assert!(w[..64].iter().all(|&b| b == 0xaa));
}

#[test]
fn r_iommu_11_faults_are_reported_on_the_event_queue() {
    let mut r = rig();
    let bufs = r.event_buffers(2, 32);
    assert_eq!(r.attach(1, EP, 0), status::OK);
    assert_eq!(r.map(1, 0x1000, 0x1fff, 0x40_0000, MAP_F_READ), status::OK);
    let m = r.mem_of(EP);
    // A write to a read-only mapping, then a read by an unattached
    // endpoint.
    assert!(m.write_obj(1u8, GuestAddress(0x1234)).is_err());
    assert!(r.mem_of(EP2).read_obj::<u8>(GuestAddress(0x9000)).is_err());
    // The device thread delivers them (the fault event fired).
    r.dev.complete_requests();
    let parse = |r: &Rig, s: &Submitted| {
        let (a, _) = s.writable()[0];
        r.drv
            .mem()
            .read_obj::<FaultRecord>(GuestAddress(a))
            .unwrap()
    };
    let mut used = Vec::new();
    while let Some(u) = r.drv.pop_used(1).unwrap() {
        used.push(u);
    }
    assert_eq!(used.len(), 2, "{used:?}");
    assert!(used.iter().all(|u| u.len == FAULT_LEN as u32));
    let f0 = parse(
        &r,
        &bufs.iter().find(|b| b.head == used[0].id).unwrap().clone(),
    );
    assert_eq!(f0.reason, FAULT_R_MAPPING);
    assert_eq!(u32::from_le(f0.flags), FAULT_F_WRITE | FAULT_F_ADDRESS);
    assert_eq!(u32::from_le(f0.endpoint), EP);
    assert_eq!(u64::from_le(f0.address), 0x1234);
    assert_eq!((f0.reserved, f0.reserved1), ([0; 3], 0));
    let f1 = parse(
        &r,
        &bufs.iter().find(|b| b.head == used[1].id).unwrap().clone(),
    );
    assert_eq!(f1.reason, FAULT_R_DOMAIN);
    assert_eq!(u32::from_le(f1.flags), FAULT_F_READ | FAULT_F_ADDRESS);
    assert_eq!(u32::from_le(f1.endpoint), EP2);
    // Without buffers, faults wait (up to a bound) and reach the next
    // buffer the driver gives.
    for i in 0..100u64 {
        assert!(m.read_obj::<u8>(GuestAddress(0x8000 + i)).is_err());
    }
    r.dev.complete_requests();
    assert!(r.drv.pop_used(1).unwrap().is_none());
    r.event_buffers(1, 24);
    r.dev.complete_requests();
    let u = r
        .drv
        .pop_used(1)
        .unwrap()
        .expect("a waiting fault delivered");
    assert_eq!(u.len, 24);
    let counters: std::collections::HashMap<_, _> = r.dev.device().counters().into_iter().collect();
    assert_eq!(counters["faults_reported"], 3);
    assert_eq!(counters["faults_dropped"], 100 - 64);
    // A buffer too small for a report is returned unused.
    r.event_buffers(1, 8);
    let u = r.drv.pop_used(1).unwrap().expect("small buffer returned");
    assert_eq!(u.len, 0);
}

#[test]
fn r_iommu_12_translated_block_io_reaches_the_mapped_pages_and_marks_them_dirty() {
    // A virtio-blk function behind the IOMMU (endpoint EP). Its driver's
    // window (rings, headers, status bytes) is mapped 1:1; the data buffer
    // is at DMA address `iova`, mapped onto another guest page `page`.
    let mut r = rig();
    let mut bdrv = r.drv.split(4 << 20).unwrap();
    let window = bdrv.alloc(0, 0x1000).unwrap();
    let page = r.drv.alloc_pages(1).unwrap();
    let iova = r.drv.alloc_pages(1).unwrap();
    let disk = Arc::new(TestDisk::new(64 * 512));
    let blk = Block::from_backend(disk.clone(), false, "iommu-blk", 16).unwrap();
    let dma = DmaMemory::translated(r.drv.mem().clone(), r.handle.endpoint(EP).unwrap());
    let mut dev = VirtioPciDevice::new(
        blk,
        GuestMemoryAtomic::new(dma),
        bdrv.interrupt_group(),
        VirtioPciOptions::default(),
    )
    .unwrap();
    assert_eq!(r.attach(1, EP, 0), status::OK);
    assert_eq!(
        r.map(1, window, window + (4 << 20) - 1, window, RW),
        status::OK
    );
    assert_eq!(r.map(1, iova, iova + 0xfff, page, RW), status::OK);
    bdrv.probe(&mut dev, BAR0 + 0x10_0000).unwrap();
    bdrv.bring_up(&mut dev, VERSION_1, 1).unwrap();
    let hdr = |t: u32| {
        let mut h = t.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&3u64.to_le_bytes());
        h
    };
    let status_of = |d: &TestDriver, s: &Submitted| {
        let (a, _) = *s.writable().last().unwrap();
        d.read_mem(a, 1).unwrap()[0]
    };

    // A write of sector 3 from `iova` (the guest page whose address
    // equals the IOVA holds 0x11).
    let write_from_iova = |bdrv: &mut TestDriver, dev: &mut VirtioPciDevice<Block>| {
        bdrv.request(
            dev,
            0,
            &[
                Seg::Readable(hdr(1)),
                Seg::ReadableAt(iova, vec![0x11; 512]),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap()
    };
    // The device reads `page` (0x5a), not the IOVA's namesake.
    r.drv.write_mem(page, &[0x5a; 512]).unwrap();
    let (s, u) = write_from_iova(&mut bdrv, &mut dev);
    assert!(u.is_some());
    assert_eq!(status_of(&bdrv, &s), 0, "VIRTIO_BLK_S_OK");
    assert_eq!(&disk.contents()[3 * 512..4 * 512], &[0x5a; 512][..]);

    // Read it back into `iova`: the bytes land in `page`, whose guest
    // physical page is dirty in the VMM's log; the IOVA's namesake is not.
    r.drv.write_mem(page, &[0; 512]).unwrap();
    bdrv.clear_dirty();
    let (s, _) = bdrv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(hdr(0)),
                Seg::WritableAt(iova, 512),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(status_of(&bdrv, &s), 0);
    assert_eq!(r.drv.read_mem(page, 512).unwrap(), vec![0x5a; 512]);
    let dirty = bdrv.dirty_pages();
    assert!(dirty.contains(&page), "{dirty:x?}");
    assert!(!dirty.contains(&iova), "{dirty:x?}");

    // After UNMAP completes, the same request fails (IOERR) and faults.
    let events = r.event_buffers(1, 24);
    assert_eq!(r.unmap(1, iova, iova + 0xfff), status::OK);
    let (s, _) = write_from_iova(&mut bdrv, &mut dev);
    assert_eq!(status_of(&bdrv, &s), 1, "VIRTIO_BLK_S_IOERR");
    assert_eq!(&disk.contents()[3 * 512..4 * 512], &[0x5a; 512][..]);
    r.dev.complete_requests();
    let u = r.drv.pop_used(1).unwrap().expect("fault reported");
    assert_eq!(u.id, events[0].head);
    let (a, _) = events[0].writable()[0];
    let f = r
        .drv
        .mem()
        .read_obj::<FaultRecord>(GuestAddress(a))
        .unwrap();
    assert_eq!((f.reason, u64::from_le(f.address)), (FAULT_R_MAPPING, iova));
}

#[test]
fn r_iommu_13_own_queues_untranslated_and_other_endpoints_untouched() {
    // The IOMMU's own requests worked above with nothing mapped for it;
    // an endpoint it does not manage gets no translator at all.
    let r = rig();
    assert!(r.handle.endpoint(NOT_MANAGED).is_none());
    assert!(r.handle.endpoint(EP).is_some());
    assert!(r.handle.endpoint(EP2).is_some());
}

#[test]
fn r_iommu_14_state_round_trip() {
    let mut r = rig();
    r.event_buffers(3, 24);
    assert_eq!(r.attach(1, EP, 0), status::OK);
    assert_eq!(r.attach(2, EP2, ATTACH_F_BYPASS), status::OK);
    assert_eq!(r.map(1, 0x1000, 0x2fff, 0x40_0000, MAP_F_READ), status::OK);
    r.dev.device_mut().write_config(CONFIG_BYPASS, &[1]);
    let st = r.dev.device().state();
    assert_eq!(st.held.len(), 3);
    // A fresh device of the same configuration takes the state.
    let mut fresh =
        VirtioIommu::new(vec![EP..=EP2], DmaMemory::direct(r.drv.mem().clone())).unwrap();
    fresh.set_state(&st);
    assert_eq!(fresh.state(), st);
    let m = DmaMemory::translated(r.drv.mem().clone(), fresh.handle().endpoint(EP).unwrap());
    r.drv.write_mem(0x40_0010, &[3; 4]).unwrap();
    assert_eq!(
        m.read_obj::<u32>(GuestAddress(0x1010)).unwrap(),
        0x0303_0303
    );
    assert!(m.write_obj(0u32, GuestAddress(0x1010)).is_err());
    // The pending fault and the held buffers travel too: the restored
    // device reports it into a held buffer.
    let st2 = fresh.state();
    assert_eq!(st2.pending_faults.len(), 1);
    let mut out = Vec::new();
    fresh.take_completions(&mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].len, 24);
}
