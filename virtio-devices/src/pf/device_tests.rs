//! End-to-end tests of the virtio-pf PF and its VFs on a [`PciBus`], with
//! the guest played by [`TestDriver`] (VF drivers, Linux's order of
//! operations) and a small driver for the PF's admin queue, all on one
//! guest memory. Every test names the requirement it checks.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pci::bus::ecam_offset;
use pci::{
    BarRange, Bdf, FunctionChange, InterruptManager, InterruptSourceGroup, PciBus, PciDevice,
};

use super::admin::{opcode, qualifier, status, GROUP_TYPE_SRIOV, SUPPORTED_OPCODES};
use super::context::MemberContext;
use super::device::{
    vf_layout, PfConfig, PfError, VfBackendFn, VirtioPf, MEMBER_PROGRESS_EVENT, VF_BAR0_SIZE,
};
use super::migration::{Dialect, Mode};
use super::v14;
use crate::block::{
    DiskBackend, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use crate::device::{VIRTIO_F_ADMIN_VQ, VIRTIO_F_SR_IOV, VIRTIO_F_VERSION_1};
use crate::test_disk::{Fault, TestDisk};
use crate::test_driver::{
    Layout, RecordingInterrupts, Seg, Submitted, TestDriver, UsedElem, VirtioCaps,
};
use crate::transport::state::common_offset as co;
use crate::transport::state::*;
use crate::transport::COMPLETION_EVENT;

pub(crate) const PF_BDF: Bdf = Bdf::new(0, 4, 0);
pub(crate) const PF_BAR0: u64 = 0xe000_0000;
pub(crate) const VF_BAR0: u64 = 0xe100_0000;
pub(crate) const SRIOV: u16 = 0x100;
pub(crate) const DISK_LEN: usize = 1 << 20;
pub(crate) const MEM_LEN: usize = 64 << 20;

// ---- plumbing --------------------------------------------------------------

/// Interrupt groups by function, recording every trigger.
#[derive(Default)]
pub(crate) struct Irqs {
    groups: Mutex<HashMap<Bdf, Arc<RecordingInterrupts>>>,
}

impl Irqs {
    pub(crate) fn of(&self, bdf: Bdf) -> Arc<RecordingInterrupts> {
        self.groups.lock().unwrap().entry(bdf).or_default().clone()
    }
}

impl InterruptManager for Irqs {
    fn create_group(
        &self,
        bdf: Bdf,
        _vectors: u16,
    ) -> std::io::Result<Arc<dyn InterruptSourceGroup>> {
        let g = RecordingInterrupts::new();
        self.groups.lock().unwrap().insert(bdf, g.clone());
        Ok(g)
    }
}

/// A function as the guest reaches it: configuration space through ECAM,
/// BARs through the bus's decode map, doorbells as the VMM's device thread
/// delivers them (lock the function, call `doorbell`).
pub(crate) struct OnBus<'a> {
    bus: &'a PciBus,
    bdf: Bdf,
}

impl<'a> OnBus<'a> {
    pub(crate) fn new(bus: &'a PciBus, bdf: Bdf) -> Self {
        OnBus { bus, bdf }
    }
    fn bar_base(&self, bar: u8) -> Option<u64> {
        self.bus
            .decoded_bars_of(self.bdf)
            .into_iter()
            .find(|b| b.index == bar)
            .map(|b| b.base)
    }
}

impl PciDevice for OnBus<'_> {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.bus.ecam_read(ecam_offset(self.bdf, offset), data)
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<FunctionChange> {
        self.bus.ecam_write(ecam_offset(self.bdf, offset), data);
        None
    }
    fn decoded_bars(&self) -> Vec<BarRange> {
        self.bus.decoded_bars_of(self.bdf)
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match self.bar_base(bar) {
            Some(b) if self.bus.mmio_read(b + offset, data) => {}
            _ => data.fill(0xff),
        }
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if let Some(b) = self.bar_base(bar) {
            self.bus.mmio_write(b + offset, data);
        }
    }
    fn doorbell(&mut self, index: u16) {
        if let Some(d) = self.bus.function(self.bdf) {
            d.lock().unwrap().doorbell(index);
        }
    }
    fn drain(&mut self) {
        if let Some(d) = self.bus.function(self.bdf) {
            d.lock().unwrap().drain();
        }
    }
}

/// A split virtqueue of the PF driven by the test's own small driver.
pub(crate) struct MiniQueue {
    pub(crate) size: u16,
    desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    avail_idx: u16,
    last_used: u16,
}

/// The PF's driver: common configuration, queues 0 (block) and 1 (admin).
pub(crate) struct PfDriver {
    caps: VirtioCaps,
    pub(crate) queues: HashMap<u16, MiniQueue>,
    cmd_buf: u64,
    res_buf: u64,
}

/// An admin command's completion as the driver reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub status: u16,
    pub qualifier: u16,
    pub output: u32,
    pub result: Vec<u8>,
    pub used_len: u32,
}

impl Reply {
    pub(crate) fn ok(&self) -> bool {
        self.status == status::OK
    }
}

pub(crate) const ADMIN_Q: u16 = 1;
const CMD_BUF_LEN: u64 = 1 << 20;
const RES_BUF_LEN: u64 = 1 << 20;

impl PfDriver {
    fn cw(&self, dev: &mut dyn PciDevice, off: u64, len: usize, v: u64) {
        TestDriver::region_write(dev, &self.caps.common, off, len, v)
    }
    fn cr(&self, dev: &mut dyn PciDevice, off: u64, len: usize) -> u64 {
        TestDriver::region_read(dev, &self.caps.common, off, len)
    }

    /// Linux's virtio_pci bring-up of the PF: reset, features, MSI-X (one
    /// vector per queue plus config), queues, DRIVER_OK; then, as
    /// virtio_pci does at DRIVER_OK with an admin queue, LIST_QUERY and
    /// LIST_USE.
    fn bring_up(
        t: &mut TestDriver,
        dev: &mut dyn PciDevice,
        wanted: u64,
        list_use: bool,
    ) -> (Self, u64) {
        let caps = TestDriver::read_caps(dev).unwrap();
        let cmd_buf = t.alloc_pages(CMD_BUF_LEN / 4096).unwrap();
        let res_buf = t.alloc_pages(RES_BUF_LEN / 4096).unwrap();
        let mut d = PfDriver {
            caps,
            queues: HashMap::new(),
            cmd_buf,
            res_buf,
        };
        d.cw(dev, co::DEVICE_STATUS, 1, 0);
        assert_eq!(d.cr(dev, co::DEVICE_STATUS, 1), 0);
        d.cw(dev, co::DEVICE_STATUS, 1, u64::from(STATUS_ACKNOWLEDGE));
        d.cw(
            dev,
            co::DEVICE_STATUS,
            1,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER),
        );
        d.cw(dev, co::DEVICE_FEATURE_SELECT, 4, 0);
        let lo = d.cr(dev, co::DEVICE_FEATURE, 4);
        d.cw(dev, co::DEVICE_FEATURE_SELECT, 4, 1);
        let hi = d.cr(dev, co::DEVICE_FEATURE, 4);
        let offered = lo | (hi << 32);
        let f = offered & wanted;
        d.cw(dev, co::DRIVER_FEATURE_SELECT, 4, 0);
        d.cw(dev, co::DRIVER_FEATURE, 4, f & 0xffff_ffff);
        d.cw(dev, co::DRIVER_FEATURE_SELECT, 4, 1);
        d.cw(dev, co::DRIVER_FEATURE, 4, f >> 32);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        d.cw(dev, co::DEVICE_STATUS, 1, u64::from(s));
        assert_ne!(
            d.cr(dev, co::DEVICE_STATUS, 1) as u8 & STATUS_FEATURES_OK,
            0
        );
        // MSI-X: 3 vectors, config on 0, queue n on n + 1.
        let cap = caps.msix.unwrap();
        let table = TestDriver::cfg_read32(dev, cap + 4);
        for v in 0..3u64 {
            let e = u64::from(table & !7) + v * 16;
            dev.bar_write((table & 7) as u8, e, &0xfee0_0000u32.to_le_bytes());
            dev.bar_write((table & 7) as u8, e + 4, &0u32.to_le_bytes());
            dev.bar_write((table & 7) as u8, e + 8, &(v as u32).to_le_bytes());
            dev.bar_write((table & 7) as u8, e + 12, &0u32.to_le_bytes());
        }
        let mc = TestDriver::cfg_read16(dev, cap + 2);
        TestDriver::cfg_write16(dev, cap + 2, (mc | 0x8000) & !0x4000);
        d.cw(dev, co::CONFIG_MSIX_VECTOR, 2, 0);
        let admin_index = d.cr(dev, co::ADMIN_QUEUE_INDEX, 2) as u16;
        assert_eq!(admin_index, ADMIN_Q);
        for q in [0, admin_index] {
            d.setup_queue(t, dev, q, q + 1);
        }
        d.cw(dev, co::DEVICE_STATUS, 1, u64::from(s | STATUS_DRIVER_OK));
        let r = d.admin(t, dev, opcode::LIST_QUERY, 0, &[], 8);
        assert!(r.ok(), "{r:?}");
        if list_use {
            assert_eq!(r.result, SUPPORTED_OPCODES.to_le_bytes());
            let r = d.admin(
                t,
                dev,
                opcode::LIST_USE,
                0,
                &SUPPORTED_OPCODES.to_le_bytes(),
                0,
            );
            assert!(r.ok(), "{r:?}");
        }
        (d, f)
    }

    fn setup_queue(
        &mut self,
        t: &mut TestDriver,
        dev: &mut dyn PciDevice,
        index: u16,
        vector: u16,
    ) {
        self.cw(dev, co::QUEUE_SELECT, 2, u64::from(index));
        let size = self.cr(dev, co::QUEUE_SIZE, 2) as u16;
        assert!(size > 0);
        self.cw(dev, co::QUEUE_MSIX_VECTOR, 2, u64::from(vector));
        let desc = t
            .alloc_pages((u64::from(size) * 16).div_ceil(4096))
            .unwrap();
        let avail = t.alloc_pages(1).unwrap();
        let used = t
            .alloc_pages((6 + 8 * u64::from(size)).div_ceil(4096))
            .unwrap();
        for (f, a) in [
            (co::QUEUE_DESC, desc),
            (co::QUEUE_DRIVER, avail),
            (co::QUEUE_DEVICE, used),
        ] {
            self.cw(dev, f, 8, a);
        }
        self.cw(dev, co::QUEUE_ENABLE, 2, 1);
        self.queues.insert(
            index,
            MiniQueue {
                size,
                desc,
                avail,
                used,
                avail_idx: 0,
                last_used: 0,
            },
        );
    }

    /// Publishes a chain of raw descriptors `(addr, len, flags, next)`
    /// written at descriptor indices `first..`, head = `first`.
    fn publish_raw(&mut self, t: &TestDriver, q: u16, descs: &[(u64, u32, u16, u16)], first: u16) {
        let mq = self.queues.get_mut(&q).unwrap();
        for (k, &(a, l, fl, nx)) in descs.iter().enumerate() {
            let i = (first + k as u16) % mq.size;
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&a.to_le_bytes());
            b[8..12].copy_from_slice(&l.to_le_bytes());
            b[12..14].copy_from_slice(&fl.to_le_bytes());
            b[14..16].copy_from_slice(&nx.to_le_bytes());
            t.write_mem(mq.desc + 16 * u64::from(i), &b).unwrap();
        }
        let slot = mq.avail + 4 + 2 * u64::from(mq.avail_idx % mq.size);
        t.write_mem(slot, &first.to_le_bytes()).unwrap();
        mq.avail_idx = mq.avail_idx.wrapping_add(1);
        t.write_mem(mq.avail + 2, &mq.avail_idx.to_le_bytes())
            .unwrap();
    }

    /// device_status.
    pub(crate) fn status(&self, dev: &mut dyn PciDevice) -> u8 {
        self.cr(dev, co::DEVICE_STATUS, 1) as u8
    }

    /// Writes device_status 0 (a virtio reset) and returns the status
    /// read back.
    pub(crate) fn reset(&self, dev: &mut dyn PciDevice) -> u8 {
        self.cw(dev, co::DEVICE_STATUS, 1, 0);
        self.cr(dev, co::DEVICE_STATUS, 1) as u8
    }

    fn kick(&self, dev: &mut dyn PciDevice, q: u16) {
        let off = u64::from(q) * u64::from(self.caps.notify_off_multiplier);
        TestDriver::region_write(dev, &self.caps.notify, off, 2, u64::from(q));
        dev.doorbell(q);
        dev.drain();
    }

    pub(crate) fn pop_used(&mut self, t: &TestDriver, q: u16) -> Option<(u16, u32)> {
        let mq = self.queues.get_mut(&q).unwrap();
        let b = t.read_mem(mq.used + 2, 2).unwrap();
        if u16::from_le_bytes([b[0], b[1]]) == mq.last_used {
            return None;
        }
        let e = t
            .read_mem(mq.used + 4 + 8 * u64::from(mq.last_used % mq.size), 8)
            .unwrap();
        mq.last_used = mq.last_used.wrapping_add(1);
        Some((
            u16::from_le_bytes([e[0], e[1]]),
            u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        ))
    }

    /// One admin command: header + data in one descriptor, status + result
    /// in another; returns the completion.
    pub(crate) fn admin(
        &mut self,
        t: &mut TestDriver,
        dev: &mut dyn PciDevice,
        op: u16,
        member: u64,
        data: &[u8],
        result_len: u32,
    ) -> Reply {
        self.admin_group(t, dev, op, GROUP_TYPE_SRIOV, member, data, result_len)
    }

    #[allow(clippy::too_many_arguments)]
    fn admin_group(
        &mut self,
        t: &mut TestDriver,
        dev: &mut dyn PciDevice,
        op: u16,
        group: u16,
        member: u64,
        data: &[u8],
        result_len: u32,
    ) -> Reply {
        let mut cmd = Vec::with_capacity(24 + data.len());
        cmd.extend_from_slice(&op.to_le_bytes());
        cmd.extend_from_slice(&group.to_le_bytes());
        cmd.extend_from_slice(&[0; 12]);
        cmd.extend_from_slice(&member.to_le_bytes());
        cmd.extend_from_slice(data);
        assert!(cmd.len() as u64 <= CMD_BUF_LEN);
        assert!(u64::from(result_len) + 8 <= RES_BUF_LEN);
        t.write_mem(self.cmd_buf, &cmd).unwrap();
        let head = self.queues[&ADMIN_Q].avail_idx.wrapping_mul(2) % self.queues[&ADMIN_Q].size;
        self.publish_raw(
            t,
            ADMIN_Q,
            &[
                (
                    self.cmd_buf,
                    cmd.len() as u32,
                    1,
                    (head + 1) % self.queues[&ADMIN_Q].size,
                ),
                (self.res_buf, 8 + result_len, 2, 0),
            ],
            head,
        );
        self.kick(dev, ADMIN_Q);
        let (id, used_len) = self
            .pop_used(t, ADMIN_Q)
            .expect("admin command not completed");
        assert_eq!(id, head);
        let b = t.read_mem(self.res_buf, 8 + result_len as usize).unwrap();
        let n = (used_len as usize)
            .saturating_sub(8)
            .min(result_len as usize);
        Reply {
            status: u16::from_le_bytes([b[0], b[1]]),
            qualifier: u16::from_le_bytes([b[2], b[3]]),
            output: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            result: b[8..8 + n].to_vec(),
            used_len,
        }
    }
}

/// Temporary files, removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "vpf-dev-{}-{name}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The whole machine: bus, PF at 00:04.0, its files, the guest memory
/// (owned by `t`, which also plays the VF drivers) and the PF driver.
pub(crate) struct Rig {
    pub bus: PciBus,
    pub pf: Arc<Mutex<VirtioPf>>,
    pub irqs: Arc<Irqs>,
    pub t: TestDriver,
    pub pfd: Option<PfDriver>,
    pub dir: TempDir,
}

/// VF backing file scheme of a rig.
#[derive(Clone, Copy)]
pub(crate) enum Files {
    /// One file per VF.
    PerVf,
    /// All VFs share one file.
    Shared,
}

pub(crate) fn vf_file(dir: &std::path::Path, files: Files, n: u16) -> PathBuf {
    match files {
        Files::PerVf => dir.join(format!("vf{n}.img")),
        Files::Shared => dir.join("shared.img"),
    }
}

impl Rig {
    pub(crate) fn new(name: &str, total: u16, files: Files) -> Rig {
        Self::build(name, total, files, None)
    }

    /// PF (virtio 1.4 dialect) probed and up, `n` VFs enabled; the driver
    /// sent the Linux probe: LIST_USE of the SR-IOV list and the driver
    /// limits of the device parts capability.
    pub(crate) fn up_v14(name: &str, total: u16, n: u16, files: Files) -> Rig {
        let mut r = Self::build_with(name, total, files, None, Dialect::V14);
        r.probe_pf();
        r.bring_up_pf_with(false);
        r.enable_vfs(n);
        assert!(r
            .admin(
                v14::opcode::LIST_USE,
                0,
                &v14::SRIOV_OPCODES.to_le_bytes(),
                0
            )
            .ok());
        let limits = [0, 0, 0, 0, 0, 0, 0, 0, 4, 4];
        assert!(r.admin(v14::opcode::DRIVER_CAP_SET, 0, &limits, 0).ok());
        r
    }

    /// A rig whose VF n's disk is `disks[n - 1]` (see [`TestDisk`]).
    pub(crate) fn with_disks(name: &str, disks: &[Arc<TestDisk>]) -> Rig {
        let total = u16::try_from(disks.len()).unwrap_or(u16::MAX);
        let disks = disks.to_vec();
        let f: VfBackendFn = Box::new(move |n| {
            disks
                .get(usize::from(n) - 1)
                .map(|d| d.clone() as Arc<dyn DiskBackend>)
                .ok_or_else(|| std::io::Error::other("no such test disk"))
        });
        Self::build(name, total, Files::PerVf, Some(f))
    }

    /// [`Rig::with_disks`], PF probed and up, every VF enabled.
    pub(crate) fn up_with_disks(name: &str, disks: &[Arc<TestDisk>]) -> Rig {
        let mut r = Self::with_disks(name, disks);
        r.probe_pf();
        r.bring_up_pf();
        r.enable_vfs(u16::try_from(disks.len()).unwrap_or(u16::MAX));
        r
    }

    fn build(name: &str, total: u16, files: Files, backend: Option<VfBackendFn>) -> Rig {
        Self::build_with(name, total, files, backend, Dialect::Draft)
    }

    fn build_with(
        name: &str,
        total: u16,
        files: Files,
        backend: Option<VfBackendFn>,
        dialect: Dialect,
    ) -> Rig {
        Self::build_behind(name, total, files, backend, dialect, None)
    }

    /// A rig whose PF and VFs sit behind `iommu`.
    fn build_behind(
        name: &str,
        total: u16,
        files: Files,
        backend: Option<VfBackendFn>,
        dialect: Dialect,
        iommu: Option<Arc<dyn vm_migration::DmaIommu>>,
    ) -> Rig {
        let dir = TempDir::new(name);
        std::fs::write(dir.0.join("pf.img"), vec![0u8; DISK_LEN]).unwrap();
        for n in 1..=total {
            std::fs::write(vf_file(&dir.0, files, n), vec![0u8; DISK_LEN]).unwrap();
        }
        let t = TestDriver::new(MEM_LEN);
        let irqs = Arc::new(Irqs::default());
        let d = dir.0.clone();
        let cfg = PfConfig::new(
            dir.0.join("pf.img"),
            Box::new(move |n| vf_file(&d, files, n)),
            total,
            PF_BDF,
            false,
        )
        .unwrap();
        let cfg = PfConfig {
            vf_backend: backend,
            dialect,
            iommu,
            ..cfg
        };
        let pf = VirtioPf::new(cfg, t.mem_atomic(), irqs.clone()).unwrap();
        let bus = PciBus::new();
        bus.add_function(PF_BDF, pf.clone()).unwrap();
        Rig {
            bus,
            pf,
            irqs,
            t,
            pfd: None,
            dir,
        }
    }

    pub(crate) fn on(&self, bdf: Bdf) -> OnBus<'_> {
        OnBus::new(&self.bus, bdf)
    }

    pub(crate) fn vf_bdf(&self, n: u16) -> Bdf {
        Bdf::from_rid(PF_BDF.rid() + 8 + n - 1)
    }

    /// Firmware / Linux probing the PF: BAR0 placed, memory and bus
    /// mastering on.
    pub(crate) fn probe_pf(&mut self) {
        let mut pf = self.on(PF_BDF);
        assert_eq!(TestDriver::size_bar0(&mut pf).unwrap(), 0x8000);
        TestDriver::cfg_write32(&mut pf, 0x10, PF_BAR0 as u32);
        TestDriver::cfg_write32(&mut pf, 0x14, (PF_BAR0 >> 32) as u32);
        TestDriver::cfg_write16(&mut pf, 0x04, 0x6);
    }

    /// Linux's `sriov_numvfs` write: VF BAR0 assigned, NumVFs, then VF
    /// Enable | VF MSE in one write.
    pub(crate) fn enable_vfs(&mut self, n: u16) {
        let mut pf = self.on(PF_BDF);
        TestDriver::cfg_write32(&mut pf, SRIOV + 0x24, VF_BAR0 as u32);
        TestDriver::cfg_write32(&mut pf, SRIOV + 0x28, (VF_BAR0 >> 32) as u32);
        TestDriver::cfg_write16(&mut pf, SRIOV + 0x10, n);
        let ctrl = TestDriver::cfg_read16(&mut pf, SRIOV + 0x08);
        TestDriver::cfg_write16(&mut pf, SRIOV + 0x08, ctrl | 0x1 | 0x8);
    }

    pub(crate) fn bring_up_pf(&mut self) {
        self.bring_up_pf_with(true)
    }

    pub(crate) fn bring_up_pf_with(&mut self, list_use: bool) {
        let mut pf = OnBus::new(&self.bus, PF_BDF);
        let wanted = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_F_SR_IOV)
            | (1u64 << VIRTIO_F_ADMIN_VQ)
            | (1u64 << 9);
        let (d, f) = PfDriver::bring_up(&mut self.t, &mut pf, wanted, list_use);
        assert_eq!(f, wanted);
        self.pfd = Some(d);
    }

    /// PF probed and up, `n` VFs enabled.
    pub(crate) fn up(name: &str, total: u16, n: u16, files: Files) -> Rig {
        let mut r = Rig::new(name, total, files);
        r.probe_pf();
        r.bring_up_pf();
        r.enable_vfs(n);
        r
    }

    pub(crate) fn admin(&mut self, op: u16, member: u64, data: &[u8], result_len: u32) -> Reply {
        let mut pf = OnBus::new(&self.bus, PF_BDF);
        let d = self.pfd.as_mut().expect("PF not brought up");
        let r = d.admin(&mut self.t, &mut pf, op, member, data, result_len);
        // As the VMM's device thread would: deliver what the members'
        // workers finished meanwhile (a member set Active serves its
        // queues at once).
        for (_, f) in self.bus.functions() {
            f.lock().unwrap().drain();
        }
        r
    }

    pub(crate) fn set_mode(&mut self, member: u16, mode: Mode) {
        let r = self.admin(opcode::DEV_MODE_SET, member.into(), &[mode as u8], 0);
        assert!(r.ok(), "DEV_MODE_SET {mode:?}: {r:?}");
    }

    pub(crate) fn mode(&mut self, member: u16) -> u8 {
        let r = self.admin(opcode::DEV_MODE_GET, member.into(), &[], 1);
        assert!(r.ok(), "{r:?}");
        r.result[0]
    }

    /// Probe VF `n` with `t` (its BAR0 is placed by the PF) and bring it
    /// up as a virtio-blk device; returns the negotiated features.
    pub(crate) fn bring_up_vf(&mut self, n: u16) -> u64 {
        let bdf = self.vf_bdf(n);
        let mut vf = OnBus::new(&self.bus, bdf);
        let bar = VF_BAR0 + u64::from(n - 1) * VF_BAR0_SIZE;
        self.t.probe_placed(&mut vf, bar).unwrap();
        self.t.bring_up(&mut vf, u64::MAX, 1).unwrap()
    }

    /// Rings VF `n`'s queue 0 doorbell (as `t`, the VF's driver).
    pub(crate) fn kick_vf(&mut self, n: u16) {
        let mut vf = OnBus::new(&self.bus, self.vf_bdf(n));
        self.t.kick(&mut vf, 0).unwrap();
    }

    /// Submits a block request on VF `n`, kicks, pops one used element.
    pub(crate) fn request(&mut self, n: u16, segs: &[Seg]) -> (Submitted, Option<UsedElem>) {
        let mut vf = OnBus::new(&self.bus, self.vf_bdf(n));
        self.t.request(&mut vf, 0, segs, Layout::Direct).unwrap()
    }

    pub(crate) fn start_records_all(&mut self, member: u16) {
        let r = self.admin(
            opcode::DEV_WRITE_RECORDS_START,
            member.into(),
            &records_start(4096, &[(0, MEM_LEN as u64 / 4096)]),
            0,
        );
        assert!(r.ok(), "{r:?}");
    }

    /// Every record of `member` over the whole memory, ascending.
    pub(crate) fn read_records(&mut self, member: u16) -> Vec<u64> {
        let mut data = Vec::new();
        data.extend_from_slice(&0u64.to_le_bytes());
        data.extend_from_slice(&(MEM_LEN as u64).to_le_bytes());
        let r = self.admin(
            opcode::DEV_WRITE_RECORDS_READ,
            member.into(),
            &data,
            8 * 4096,
        );
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.output as usize * 8, r.result.len());
        r.result
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// The whole context stream of `member`, read in `chunk`-byte pieces.
    pub(crate) fn read_context(&mut self, member: u16, chunk: u32) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let r = self.admin(opcode::DEV_CTX_READ, member.into(), &[], chunk);
            assert!(r.ok(), "{r:?}");
            assert_eq!(r.output as usize, r.result.len());
            out.extend_from_slice(&r.result);
            if r.result.len() < chunk as usize {
                return out;
            }
        }
    }

    pub(crate) fn write_context(&mut self, member: u16, ctx: &[u8], chunk: usize) {
        for c in ctx.chunks(chunk) {
            let r = self.admin(opcode::DEV_CTX_WRITE, member.into(), c, 0);
            assert!(r.ok(), "{r:?}");
        }
    }

    pub(crate) fn file(&self, n: u16, files: Files) -> Vec<u8> {
        std::fs::read(vf_file(&self.dir.0, files, n)).unwrap()
    }
}

/// `n` test disks of [`DISK_LEN`] bytes, for [`Rig::with_disks`].
pub(crate) fn test_disks(n: usize) -> Vec<Arc<TestDisk>> {
    (0..n).map(|_| Arc::new(TestDisk::new(DISK_LEN))).collect()
}

pub(crate) fn records_start(page_size: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
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

fn blk_header(ty: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&ty.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

pub(crate) fn write_req(sector: u64, data: &[u8]) -> Vec<Seg> {
    vec![
        Seg::Readable(blk_header(VIRTIO_BLK_T_OUT, sector)),
        Seg::Readable(data.to_vec()),
        Seg::Writable(1),
    ]
}

pub(crate) fn read_req(sector: u64, len: u32) -> Vec<Seg> {
    vec![
        Seg::Readable(blk_header(VIRTIO_BLK_T_IN, sector)),
        Seg::Writable(len),
        Seg::Writable(1),
    ]
}

/// The status byte of a submitted block request.
pub(crate) fn status_of(t: &TestDriver, s: &Submitted) -> u8 {
    let (a, l) = *s.writable().last().unwrap();
    t.read_mem(a + u64::from(l) - 1, 1).unwrap()[0]
}

pub(crate) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

fn pages_of(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = addr / 4096;
    let last = (addr + len.max(1) - 1) / 4096;
    (first..=last).map(|p| p * 4096)
}

// ---- layout ------------------------------------------------------------------

#[test]
fn vf_layout_puts_vfs_on_the_next_devices() {
    let l = vf_layout(Bdf::new(0, 4, 0), 64).unwrap();
    assert_eq!((l.first_vf_offset, l.vf_stride), (8, 1));
    assert_eq!(l.vf_bdfs[0], Bdf::new(0, 5, 0));
    assert_eq!(l.vf_bdfs[7], Bdf::new(0, 5, 7));
    assert_eq!(l.vf_bdfs[8], Bdf::new(0, 6, 0));
    assert_eq!(l.vf_bdfs[63], Bdf::new(0, 0x0c, 7));
    let l = vf_layout(Bdf::new(1, 2, 3), 2).unwrap();
    assert_eq!(l.first_vf_offset, 5);
    assert_eq!(l.vf_bdfs, vec![Bdf::new(1, 3, 0), Bdf::new(1, 3, 1)]);
    assert!(matches!(
        vf_layout(Bdf::new(0, 30, 0), 16),
        Err(PfError::VfLayout { .. })
    ));
    assert!(matches!(
        vf_layout(Bdf::new(0, 4, 0), 0),
        Err(PfError::TotalVfs(0))
    ));
    assert!(matches!(
        vf_layout(Bdf::new(0, 4, 0), 65),
        Err(PfError::TotalVfs(65))
    ));
}

#[test]
fn construction_checks_vf_files() {
    let dir = TempDir::new("ctor");
    std::fs::write(dir.0.join("pf.img"), vec![0u8; 4096]).unwrap();
    let t = TestDriver::new(1 << 20);
    let d = dir.0.clone();
    let cfg = PfConfig::new(
        dir.0.join("pf.img"),
        Box::new(move |n| d.join(format!("missing{n}"))),
        2,
        PF_BDF,
        false,
    )
    .unwrap();
    let irqs: Arc<dyn InterruptManager> = Arc::new(Irqs::default());
    assert!(matches!(
        VirtioPf::new(cfg, t.mem_atomic(), irqs),
        Err(PfError::VfDisk { vf: 1, .. })
    ));
}

// ---- PCI presentation ----------------------------------------------------------

/// R-PCI-1: a PCI Express virtio-blk endpoint with a 4 KiB configuration
/// space reachable through ECAM.
#[test]
fn r_pci_1_pf_is_a_pcie_virtio_blk_endpoint() {
    let r = Rig::new("pci1", 4, Files::PerVf);
    let mut pf = r.on(PF_BDF);
    assert_eq!(TestDriver::cfg_read16(&mut pf, 0x00), 0x1af4);
    assert_eq!(TestDriver::cfg_read16(&mut pf, 0x02), 0x1042);
    assert!(TestDriver::cfg_read8(&mut pf, 0x08) >= 1);
    assert_eq!(TestDriver::cfg_read8(&mut pf, 0x0b), 0x01);
    let caps = TestDriver::capabilities(&mut pf);
    let pcie = caps.iter().find(|c| c.0 == 0x10).unwrap().1;
    // Capability version 2, endpoint.
    let reg = TestDriver::cfg_read16(&mut pf, pcie + 2);
    assert_eq!(reg & 0xf, 2);
    assert_eq!((reg >> 4) & 0xf, 0);
    // Extended configuration space through ECAM: the SR-IOV header.
    assert_eq!(TestDriver::cfg_read32(&mut pf, 0x100) & 0xffff, 0x0010);
    // Nothing at the VFs' functions yet.
    assert_eq!(
        TestDriver::cfg_read32(&mut r.on(r.vf_bdf(1)), 0),
        0xffff_ffff
    );
}

/// R-PCI-2: the SR-IOV Extended Capability's fields.
#[test]
fn r_pci_2_sriov_capability_fields() {
    let r = Rig::new("pci2", 6, Files::PerVf);
    let mut pf = r.on(PF_BDF);
    let hdr = TestDriver::cfg_read32(&mut pf, SRIOV);
    assert_eq!(hdr & 0xffff, 0x0010);
    assert_eq!((hdr >> 16) & 0xf, 1);
    assert_eq!(
        TestDriver::cfg_read16(&mut pf, SRIOV + 0x0c),
        6,
        "InitialVFs"
    );
    assert_eq!(TestDriver::cfg_read16(&mut pf, SRIOV + 0x0e), 6, "TotalVFs");
    // Function Dependency Link: the PF's own devfn (Linux checks it).
    let mut fdl = [0u8; 1];
    pf.config_read(SRIOV + 0x12, &mut fdl);
    assert_eq!(
        fdl[0],
        (PF_BDF.rid() & 0xff) as u8,
        "Function Dependency Link"
    );
    assert_eq!(
        TestDriver::cfg_read16(&mut pf, SRIOV + 0x14),
        8,
        "First VF Offset"
    );
    assert_eq!(
        TestDriver::cfg_read16(&mut pf, SRIOV + 0x16),
        1,
        "VF Stride"
    );
    assert_eq!(
        TestDriver::cfg_read16(&mut pf, SRIOV + 0x1a),
        0x1042,
        "VF Device ID"
    );
    assert_eq!(
        TestDriver::cfg_read32(&mut pf, SRIOV + 0x1c) & 1,
        1,
        "4 KiB page"
    );
    // VF BAR0: 64-bit memory, sized like a BAR to the per-VF size.
    let lo = TestDriver::cfg_read32(&mut pf, SRIOV + 0x24);
    assert_eq!(lo & 0x7, 0b100);
    TestDriver::cfg_write32(&mut pf, SRIOV + 0x24, 0xffff_ffff);
    TestDriver::cfg_write32(&mut pf, SRIOV + 0x28, 0xffff_ffff);
    let mlo = TestDriver::cfg_read32(&mut pf, SRIOV + 0x24) & !0xf;
    let mhi = TestDriver::cfg_read32(&mut pf, SRIOV + 0x28);
    let size = (!(u64::from(mlo) | (u64::from(mhi) << 32))).wrapping_add(1);
    assert_eq!(size, 32 * 1024);
    // NumVFs writable up to TotalVFs while VF Enable is clear.
    TestDriver::cfg_write16(&mut pf, SRIOV + 0x10, 3);
    assert_eq!(TestDriver::cfg_read16(&mut pf, SRIOV + 0x10), 3);
    TestDriver::cfg_write16(&mut pf, SRIOV + 0x10, 7);
    assert_eq!(TestDriver::cfg_read16(&mut pf, SRIOV + 0x10), 3);
    // Control: VF Enable (0) and VF MSE (3) are writable.
    TestDriver::cfg_write16(&mut pf, SRIOV + 0x08, 0x9);
    assert_eq!(TestDriver::cfg_read16(&mut pf, SRIOV + 0x08) & 0x9, 0x9);
    // Every VF routing ID lands on a free function of bus 0.
    let all = r.pf.lock().unwrap().all_vf_bdfs();
    assert_eq!(all.len(), 6);
    assert!(all.iter().all(|b| b.bus() == 0 && *b != PF_BDF));
}

/// R-PCI-3: VF Enable with NumVFs = N creates VFs 1..N at their routing
/// IDs; clearing it removes them.
#[test]
fn r_pci_3_vf_enable_creates_and_clear_removes_vfs() {
    let mut r = Rig::new("pci3", 4, Files::PerVf);
    r.probe_pf();
    r.enable_vfs(3);
    let ids = r.bus.function_ids();
    assert_eq!(
        ids,
        vec![PF_BDF, r.vf_bdf(1), r.vf_bdf(2), r.vf_bdf(3)],
        "PF plus three VFs"
    );
    assert_eq!(r.vf_bdf(1), Bdf::new(0, 5, 0));
    assert_eq!(r.pf.lock().unwrap().vfs().len(), 3);
    // NumVFs is frozen while VF Enable is set.
    let mut pf = r.on(PF_BDF);
    TestDriver::cfg_write16(&mut pf, SRIOV + 0x10, 1);
    assert_eq!(TestDriver::cfg_read16(&mut pf, SRIOV + 0x10), 3);
    // Clear VF Enable: gone.
    TestDriver::cfg_write16(&mut pf, SRIOV + 0x08, 0);
    assert_eq!(r.bus.function_ids(), vec![PF_BDF]);
    assert!(r.pf.lock().unwrap().vfs().is_empty());
    assert_eq!(
        TestDriver::cfg_read32(&mut r.on(r.vf_bdf(1)), 0),
        0xffff_ffff
    );
    // And again with a different count.
    r.enable_vfs(4);
    assert_eq!(r.bus.function_ids().len(), 5);
    // PF FLR clears VF Enable, so the VFs go too.
    let mut pf = r.on(PF_BDF);
    let pcie = TestDriver::capabilities(&mut pf)
        .into_iter()
        .find(|c| c.0 == 0x10)
        .unwrap()
        .1;
    TestDriver::cfg_write16(&mut pf, pcie + 8, 0x8000);
    assert_eq!(r.bus.function_ids(), vec![PF_BDF]);
}

/// R-PCI-3: VF n's BAR0 is at VF BAR0 + (n − 1) × 32 KiB and decodes only
/// while VF MSE is set; the VF's own BAR registers read 0.
#[test]
fn r_pci_3_vf_bar0_decodes_only_with_vf_mse() {
    let mut r = Rig::new("pci3bar", 4, Files::PerVf);
    r.probe_pf();
    let mut pf = r.on(PF_BDF);
    TestDriver::cfg_write32(&mut pf, SRIOV + 0x24, VF_BAR0 as u32);
    TestDriver::cfg_write32(&mut pf, SRIOV + 0x28, 0);
    TestDriver::cfg_write16(&mut pf, SRIOV + 0x10, 2);
    TestDriver::cfg_write16(&mut pf, SRIOV + 0x08, 0x1);
    assert_eq!(r.bus.function_ids().len(), 3);
    for n in 1..=2 {
        assert!(r.bus.decoded_bars_of(r.vf_bdf(n)).is_empty());
    }
    let mut b = [0u8; 2];
    assert!(!r.bus.mmio_read(VF_BAR0 + 0x12, &mut b));
    // VF MSE on.
    TestDriver::cfg_write16(&mut pf, SRIOV + 0x08, 0x9);
    for n in 1..=2u16 {
        let bars = r.bus.decoded_bars_of(r.vf_bdf(n));
        assert_eq!(bars.len(), 1);
        assert_eq!(bars[0].base, VF_BAR0 + u64::from(n - 1) * 0x8000);
        assert_eq!(bars[0].size, 0x8000);
        // num_queues of the VF's common configuration reads 1.
        assert!(r.bus.mmio_read(bars[0].base + 0x12, &mut b));
        assert_eq!(u16::from_le_bytes(b), 1);
        let mut vf = r.on(r.vf_bdf(n));
        for bar in 0..6 {
            assert_eq!(TestDriver::cfg_read32(&mut vf, 0x10 + 4 * bar), 0);
        }
    }
    // Moving VF BAR0 moves every VF.
    TestDriver::cfg_write32(&mut pf, SRIOV + 0x24, (VF_BAR0 + 0x10_0000) as u32);
    assert_eq!(
        r.bus.decoded_bars_of(r.vf_bdf(2))[0].base,
        VF_BAR0 + 0x10_0000 + 0x8000
    );
    // VF MSE off: nothing decoded, the VFs still exist.
    TestDriver::cfg_write16(&mut pf, SRIOV + 0x08, 0x1);
    assert!(r.bus.decoded_bars_of(r.vf_bdf(1)).is_empty());
    assert_eq!(r.bus.function_ids().len(), 3);
}

/// R-PCI-4: each VF is a modern virtio PCI device with its capabilities in
/// BAR0, its own MSI-X, a PCIe capability advertising FLR, and 0xFFFF IDs.
#[test]
fn r_pci_4_vf_is_a_modern_virtio_function_with_msix_and_flr() {
    let mut r = Rig::new("pci4", 2, Files::PerVf);
    r.probe_pf();
    r.enable_vfs(2);
    let mut vf = r.on(r.vf_bdf(2));
    assert_eq!(TestDriver::cfg_read32(&mut vf, 0), 0xffff_ffff);
    let caps = TestDriver::read_caps(&mut vf).unwrap();
    for reg in [caps.common, caps.notify, caps.isr, caps.device] {
        assert_eq!(reg.bar, 0);
    }
    let msix = caps.msix.expect("MSI-X capability");
    assert_eq!(
        TestDriver::cfg_read32(&mut vf, msix + 4) & 7,
        0,
        "table in BAR0"
    );
    let pcie = caps.pcie.expect("PCIe capability");
    let devcap = TestDriver::cfg_read32(&mut vf, pcie + 4);
    assert_ne!(devcap & (1 << 28), 0, "FLR advertised");
    // Its own interrupt group.
    let f = r.bring_up_vf(2);
    assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    assert_eq!(f & (1 << VIRTIO_F_SR_IOV), 0, "a VF is not a PF");
    let (s, u) = r.request(2, &write_req(0, &[1; 512]));
    assert!(u.is_some());
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK);
    assert!(!r.irqs.of(r.vf_bdf(2)).triggered().is_empty());
    assert!(r.irqs.of(r.vf_bdf(1)).triggered().is_empty());
}

/// R-PCI-5: the PF offers VERSION_1, SR_IOV and ADMIN_VQ, has MSI-X, the
/// admin queue follows the device queues, and the PF is a working
/// virtio-blk device itself.
#[test]
fn r_pci_5_pf_features_admin_queue_and_own_disk() {
    let mut r = Rig::new("pci5", 2, Files::PerVf);
    r.probe_pf();
    let mut pf = r.on(PF_BDF);
    let caps = TestDriver::read_caps(&mut pf).unwrap();
    assert!(caps.msix.is_some());
    let rd = |pf: &mut OnBus, o: u64, l| TestDriver::region_read(pf, &caps.common, o, l);
    let wr = |pf: &mut OnBus, o: u64, v| TestDriver::region_write(pf, &caps.common, o, 4, v);
    wr(&mut pf, co::DEVICE_FEATURE_SELECT, 1);
    let hi = rd(&mut pf, co::DEVICE_FEATURE, 4);
    for bit in [VIRTIO_F_VERSION_1, VIRTIO_F_SR_IOV, VIRTIO_F_ADMIN_VQ] {
        assert_ne!(hi & (1 << (bit - 32)), 0, "feature {bit}");
    }
    assert_eq!(rd(&mut pf, co::NUM_QUEUES, 2), 1);
    assert_eq!(rd(&mut pf, co::ADMIN_QUEUE_INDEX, 2), 1);
    assert_eq!(rd(&mut pf, co::ADMIN_QUEUE_NUM, 2), 1);
    // Linux's bring-up: LIST_QUERY / LIST_USE at DRIVER_OK, no VF yet.
    r.bring_up_pf();
    assert_eq!(
        r.pf.lock().unwrap().transport().device().admin().in_use(),
        SUPPORTED_OPCODES
    );
    // Block I/O on the PF's own queue 0 and disk.
    let mut pf = OnBus::new(&r.bus, PF_BDF);
    let d = r.pfd.as_mut().unwrap();
    let hdr = r.t.alloc(16, 8).unwrap();
    let data = r.t.alloc(512, 8).unwrap();
    let st = r.t.alloc(1, 8).unwrap();
    r.t.write_mem(hdr, &blk_header(VIRTIO_BLK_T_OUT, 2))
        .unwrap();
    r.t.write_mem(data, &[0x5a; 512]).unwrap();
    d.publish_raw(
        &r.t,
        0,
        &[(hdr, 16, 1, 1), (data, 512, 1, 2), (st, 1, 2, 0)],
        0,
    );
    d.kick(&mut pf, 0);
    assert_eq!(d.pop_used(&r.t, 0), Some((0, 1)));
    assert_eq!(r.t.read_mem(st, 1).unwrap(), [VIRTIO_BLK_S_OK]);
    let disk = std::fs::read(r.dir.0.join("pf.img")).unwrap();
    assert_eq!(&disk[1024..1536], &[0x5a; 512][..]);
    assert!(!r.irqs.of(PF_BDF).triggered().is_empty());
}

// ---- admin queue -------------------------------------------------------------

/// R-ADM-1 through the real admin queue: validation order and member ids.
#[test]
fn r_adm_1_member_ids_and_vf_enable_through_the_queue() {
    let mut r = Rig::new("adm1", 4, Files::PerVf);
    r.probe_pf();
    r.bring_up_pf();
    // VF Enable clear.
    let e = r.admin(opcode::DEV_MODE_GET, 1, &[], 1);
    assert_eq!(
        (e.status, e.qualifier),
        (status::EINVAL, qualifier::INVALID_GROUP)
    );
    r.enable_vfs(2);
    for m in [0u64, 3, 1 << 40] {
        let e = r.admin(opcode::DEV_MODE_GET, m, &[], 1);
        assert_eq!(
            (e.status, e.qualifier),
            (status::EINVAL, qualifier::INVALID_MEMBER)
        );
    }
    assert_eq!(r.mode(2), Mode::Active as u8);
    // Wrong group type first.
    let mut pf = OnBus::new(&r.bus, PF_BDF);
    let d = r.pfd.as_mut().unwrap();
    let e = d.admin_group(&mut r.t, &mut pf, 0x3f, 7, 99, &[], 1);
    assert_eq!(
        (e.status, e.qualifier),
        (status::EINVAL, qualifier::INVALID_GROUP)
    );
    let e = d.admin(&mut r.t, &mut pf, 0x3f, 1, &[], 1);
    assert_eq!(
        (e.status, e.qualifier),
        (status::EINVAL, qualifier::INVALID_OPCODE)
    );
}

/// R-ADM-3: PF device reset puts the list in use back to LIST_QUERY /
/// LIST_USE only; the members keep their modes.
#[test]
fn r_adm_3_pf_reset_resets_list_in_use_not_member_modes() {
    let mut r = Rig::up("adm3", 2, 2, Files::PerVf);
    r.set_mode(2, Mode::Stop);
    // The PF driver resets and re-initialises without LIST_USE.
    let mut pf = OnBus::new(&r.bus, PF_BDF);
    let caps = TestDriver::read_caps(&mut pf).unwrap();
    TestDriver::region_write(&mut pf, &caps.common, co::DEVICE_STATUS, 1, 0);
    assert_eq!(
        r.pf.lock().unwrap().transport().device().admin().in_use(),
        0
    );
    r.bring_up_pf_with(false);
    let e = r.admin(opcode::DEV_MODE_GET, 2, &[], 1);
    assert_eq!(
        (e.status, e.qualifier),
        (status::EINVAL, qualifier::INVALID_OPCODE)
    );
    let u = r.admin(opcode::LIST_USE, 0, &SUPPORTED_OPCODES.to_le_bytes(), 0);
    assert!(u.ok());
    assert_eq!(r.mode(2), Mode::Stop as u8);
    assert_eq!(r.pf.lock().unwrap().member_mode(2), Some(Mode::Stop));
}

// ---- VF I/O and modes ----------------------------------------------------------

/// Each VF is a virtio-blk device on the backing file chosen for it; VFs
/// may share one file.
#[test]
fn vf_block_io_reaches_its_backing_file() {
    let mut r = Rig::up("vfio", 3, 3, Files::PerVf);
    r.bring_up_vf(2);
    let data = pattern(7, 1024);
    let (s, u) = r.request(2, &write_req(4, &data));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK);
    let (s, u) = r.request(2, &read_req(4, 1024));
    assert_eq!(u.unwrap().len, 1025);
    let (a, _) = s.writable()[0];
    assert_eq!(r.t.read_mem(a, 1024).unwrap(), data);
    assert_eq!(&r.file(2, Files::PerVf)[2048..3072], &data[..]);
    assert!(r.file(1, Files::PerVf).iter().all(|b| *b == 0));
    assert!(r.file(3, Files::PerVf).iter().all(|b| *b == 0));

    // Shared storage: what VF 1 writes, VF 2 reads.
    let mut r = Rig::up("vfio-shared", 2, 2, Files::Shared);
    r.bring_up_vf(1);
    r.request(1, &write_req(9, &data));
    r.bring_up_vf(2);
    let (s, _) = r.request(2, &read_req(9, 1024));
    assert_eq!(r.t.read_mem(s.writable()[0].0, 1024).unwrap(), data);
}

/// R-MODE-3, R-MODE-4: in Stop a VF takes no request, writes nothing and
/// sends no interrupt, but remembers the notification; back in Active it
/// serves the queue and delivers the interrupt. Freeze ignores the
/// notification, and Active still examines the queue.
#[test]
fn r_mode_4_stop_holds_vf_io_and_active_resumes_it() {
    let mut r = Rig::up("stop", 2, 2, Files::PerVf);
    r.bring_up_vf(1);
    let (_, u) = r.request(1, &write_req(0, &[1; 512]));
    assert!(u.is_some());
    let irq = r.irqs.of(r.vf_bdf(1));
    irq.clear();
    r.set_mode(1, Mode::Stop);
    let data = pattern(3, 512);
    r.start_records_all(1);
    let s = r.t.submit(0, &write_req(5, &data), Layout::Direct).unwrap();
    r.kick_vf(1);
    assert_eq!(r.t.pop_used(0).unwrap(), None);
    assert_eq!(status_of(&r.t, &s), 0xaa, "status untouched");
    assert!(r.read_records(1).is_empty(), "no driver memory written");
    assert!(irq.triggered().is_empty());
    assert!(r.file(1, Files::PerVf)[2560..3072].iter().all(|b| *b == 0));
    r.set_mode(1, Mode::Active);
    let u = r.t.pop_used(0).unwrap().expect("served on Active");
    assert_eq!(u.id, s.head);
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK);
    assert_eq!(&r.file(1, Files::PerVf)[2560..3072], &data[..]);
    assert!(!irq.triggered().is_empty());

    // Freeze: the kick is ignored; Active examines the queue anyway.
    r.set_mode(1, Mode::Freeze);
    let s = r.t.submit(0, &read_req(5, 512), Layout::Direct).unwrap();
    r.kick_vf(1);
    assert_eq!(r.t.pop_used(0).unwrap(), None);
    r.set_mode(1, Mode::Active);
    assert_eq!(r.t.pop_used(0).unwrap().map(|u| u.id), Some(s.head));
    assert_eq!(r.t.read_mem(s.writable()[0].0, 512).unwrap(), data);
}

/// R-MODE-7, R-WR-6: FLR of a VF in Stop resets its virtio state but keeps
/// its mode, its write recording and its records; so does a virtio reset.
#[test]
fn r_mode_7_vf_flr_in_stop_keeps_mode_and_write_records() {
    let mut r = Rig::up("flr", 2, 2, Files::PerVf);
    r.bring_up_vf(1);
    r.start_records_all(1);
    let (s, _) = r.request(1, &read_req(0, 4096));
    let buf_pages: Vec<u64> = pages_of(s.writable()[0].0, 4096).collect();
    r.set_mode(1, Mode::Stop);
    let bdf = r.vf_bdf(1);
    let mut vf = r.on(bdf);
    let pcie = TestDriver::read_caps(&mut vf).unwrap().pcie.unwrap();
    TestDriver::cfg_write16(&mut vf, pcie + 8, 0x8000);
    // Virtio state reset, PCI command register reset by FLR.
    assert_eq!(TestDriver::cfg_read16(&mut vf, 0x04), 0);
    assert_eq!(r.t.status(&mut vf), 0);
    assert_eq!(r.mode(1), Mode::Stop as u8);
    let recs = r.read_records(1);
    for p in &buf_pages {
        assert!(recs.contains(p), "page {p:#x} recorded before FLR is kept");
    }
    // Recording goes on: the driver re-initialises the VF (configuration
    // writes are accepted in Stop), the member becomes Active, I/O is
    // recorded.
    r.bring_up_vf(1);
    r.set_mode(1, Mode::Active);
    let (s, _) = r.request(1, &read_req(8, 512));
    let recs = r.read_records(1);
    assert!(recs.contains(&(s.writable()[0].0 & !4095)));
    // Virtio reset in Stop: same.
    r.set_mode(1, Mode::Stop);
    let mut vf = r.on(bdf);
    r.t.set_status(&mut vf, 0);
    assert_eq!(r.t.status(&mut vf), 0);
    assert_eq!(r.mode(1), Mode::Stop as u8);
    let rd = r.admin(
        opcode::DEV_WRITE_RECORDS_READ,
        1,
        &[0u64.to_le_bytes(), (MEM_LEN as u64).to_le_bytes()].concat(),
        64,
    );
    assert!(rd.ok(), "recording still started: {rd:?}");
}

/// R-MODE-7, R-WR-6 in Freeze: a virtio reset of a VF in Freeze resets its
/// virtio state (Freeze ignores every other virtio configuration write),
/// keeps the mode, the recording and the records; so does FLR.
#[test]
fn r_mode_7_virtio_reset_and_flr_in_freeze_reset_the_member() {
    let mut r = Rig::up("freeze-reset", 2, 2, Files::PerVf);
    r.bring_up_vf(1);
    r.start_records_all(1);
    let (s, _) = r.request(1, &read_req(0, 4096));
    let buf_pages: Vec<u64> = pages_of(s.writable()[0].0, 4096).collect();
    r.set_mode(1, Mode::Stop);
    r.set_mode(1, Mode::Freeze);
    let bdf = r.vf_bdf(1);
    let mut vf = r.on(bdf);
    assert_eq!(r.t.status(&mut vf), 0xf);
    r.t.set_status(&mut vf, 0);
    assert_eq!(
        r.t.status(&mut vf),
        0,
        "virtio reset in Freeze resets the VF"
    );
    assert_eq!(r.mode(1), Mode::Freeze as u8);
    let recs = r.read_records(1);
    for p in &buf_pages {
        assert!(
            recs.contains(p),
            "page {p:#x} recorded before the reset is kept"
        );
    }
    // The member comes back: Active, re-initialised by its driver, I/O
    // recorded.
    r.set_mode(1, Mode::Active);
    r.bring_up_vf(1);
    let (s, _) = r.request(1, &read_req(8, 512));
    assert!(r.read_records(1).contains(&(s.writable()[0].0 & !4095)));
    // FLR in Freeze: same.
    r.set_mode(1, Mode::Stop);
    r.set_mode(1, Mode::Freeze);
    let mut vf = r.on(bdf);
    let pcie = TestDriver::read_caps(&mut vf).unwrap().pcie.unwrap();
    TestDriver::cfg_write16(&mut vf, pcie + 8, 0x8000);
    assert_eq!(r.t.status(&mut vf), 0);
    assert_eq!(r.mode(1), Mode::Freeze as u8);
    let rd = r.admin(
        opcode::DEV_WRITE_RECORDS_READ,
        1,
        &[0u64.to_le_bytes(), (MEM_LEN as u64).to_le_bytes()].concat(),
        64,
    );
    assert!(rd.ok(), "recording still started: {rd:?}");
}

/// R-MODE-6 with a real VF: in Stop and in Freeze, PCI-architected
/// behaviour is what it is in Active (VF MSE switches BAR0 decoding, the
/// command register and MSI-X table entries take writes); virtio configuration
/// writes take effect in Stop and are ignored in Freeze, whose reads return
/// the frozen values.
#[test]
fn r_mode_6_pci_behaviour_is_the_same_in_every_mode_on_a_real_vf() {
    let mut r = Rig::up("mode6", 1, 1, Files::PerVf);
    r.bring_up_vf(1);
    let bdf = r.vf_bdf(1);
    let mut vf = r.on(bdf);
    let cap = TestDriver::read_caps(&mut vf).unwrap().msix.unwrap();
    let table = TestDriver::cfg_read32(&mut vf, cap + 4);
    let ctrl_of = |vf: &mut OnBus, v: u64| {
        let mut b = [0u8; 4];
        vf.bar_read(
            (table & 7) as u8,
            u64::from(table & !7) + 16 * v + 12,
            &mut b,
        );
        u32::from_le_bytes(b)
    };
    for mode in [Mode::Stop, Mode::Freeze] {
        if mode == Mode::Freeze {
            r.set_mode(1, Mode::Stop);
        }
        r.set_mode(1, mode);
        let mut vf = r.on(bdf);
        // VF MSE off: BAR0 reads all ones; on again: the device.
        let mut pf = r.on(PF_BDF);
        TestDriver::cfg_write16(&mut pf, SRIOV + 0x08, 0x1);
        assert_eq!(r.t.status(&mut vf), 0xff, "{mode:?}: BAR0 not decoded");
        TestDriver::cfg_write16(&mut pf, SRIOV + 0x08, 0x9);
        assert_eq!(r.t.status(&mut vf), 0xf, "{mode:?}");
        // The VF's command register (Bus Master) takes writes.
        TestDriver::cfg_write16(&mut vf, 0x04, 0x0);
        assert_eq!(TestDriver::cfg_read16(&mut vf, 0x04) & 0x4, 0, "{mode:?}");
        TestDriver::cfg_write16(&mut vf, 0x04, 0x4);
        assert_eq!(TestDriver::cfg_read16(&mut vf, 0x04) & 0x4, 0x4, "{mode:?}");
        // MSI-X vector 1 masked and unmasked.
        r.t.mask_vector(&mut vf, 1, true).unwrap();
        assert_eq!(ctrl_of(&mut vf, 1) & 1, 1, "{mode:?}: mask");
        r.t.mask_vector(&mut vf, 1, false).unwrap();
        assert_eq!(ctrl_of(&mut vf, 1) & 1, 0, "{mode:?}: unmask");
        // Virtio configuration: queue_select 0 -> 5.
        assert_eq!(r.t.common_read(&mut vf, co::QUEUE_SELECT, 2), 0);
        r.t.common_write(&mut vf, co::QUEUE_SELECT, 2, 5);
        let seen = r.t.common_read(&mut vf, co::QUEUE_SELECT, 2);
        match mode {
            Mode::Stop => assert_eq!(seen, 5, "Stop takes configuration writes"),
            _ => assert_eq!(seen, 0, "Freeze ignores them, reads the frozen value"),
        }
        r.t.common_write(&mut vf, co::QUEUE_SELECT, 2, 0);
    }
    r.set_mode(1, Mode::Active);
    let (s, u) = r.request(1, &write_req(0, &[1; 512]));
    assert_eq!(u.map(|u| u.id), Some(s.head));
}

/// R-WR-6 with a real VF in Active mode: FLR and virtio reset of a
/// recording member stop nothing and clear nothing; what it writes after
/// its driver brings it up again is recorded too.
#[test]
fn r_wr_6_flr_and_reset_of_a_recording_real_vf_in_active() {
    let mut r = Rig::up("wr6", 1, 1, Files::PerVf);
    r.bring_up_vf(1);
    r.start_records_all(1);
    let bdf = r.vf_bdf(1);
    let pcie = TestDriver::read_caps(&mut r.on(bdf)).unwrap().pcie.unwrap();
    let mut expected: Vec<u64> = Vec::new();
    for (k, flr) in [true, false].into_iter().enumerate() {
        let (s, _) = r.request(1, &read_req(8 * k as u64, 4096));
        expected.extend(pages_of(s.writable()[0].0, 4096));
        let mut vf = r.on(bdf);
        if flr {
            TestDriver::cfg_write16(&mut vf, pcie + 8, 0x8000);
        } else {
            r.t.set_status(&mut vf, 0);
        }
        assert_eq!(r.t.status(&mut vf), 0);
        assert_eq!(r.mode(1), Mode::Active as u8);
        let recs = r.read_records(1);
        for p in &expected {
            assert!(
                recs.contains(p),
                "page {p:#x} lost by the reset (flr={flr})"
            );
        }
        // read_records returned and cleared them; the next round checks
        // fresh ones.
        expected.clear();
        r.bring_up_vf(1);
    }
    let (s, _) = r.request(1, &read_req(64, 512));
    assert!(r.read_records(1).contains(&(s.writable()[0].0 & !4095)));
}

// ---- device context round trip ---------------------------------------------------

fn apply_write(model: &mut [u8], sector: u64, data: &[u8]) {
    let o = (sector * 512) as usize;
    model[o..o + data.len()].copy_from_slice(data);
}

/// R-CTX-7 end to end through the admin queue: member A with requests in
/// flight goes through the pre-copy flow (records started, context read in
/// Active, Stop, Freeze, final read); the context is written into member
/// B on the same backing file; B becomes Active and the driver carries on
/// with B from the same rings. Every request completes exactly once and
/// the file holds exactly what was written.
#[test]
fn r_ctx_7_round_trip_between_members_through_the_admin_queue() {
    let mut r = Rig::up("ctx7", 2, 2, Files::Shared);
    let mut model = vec![0u8; DISK_LEN];
    r.bring_up_vf(1);
    // Completed and consumed.
    let d = pattern(1, 1024);
    let (s, u) = r.request(1, &write_req(0, &d));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    apply_write(&mut model, 0, &d);
    r.start_records_all(1);
    // Completed by A, not yet consumed by the driver.
    let mut pending = Vec::new();
    for (k, sector) in [(2u8, 10u64), (3, 20)] {
        let d = pattern(k, 512);
        pending.push(
            r.t.submit(0, &write_req(sector, &d), Layout::Direct)
                .unwrap(),
        );
        apply_write(&mut model, sector, &d);
    }
    r.kick_vf(1);
    // Published, not kicked: in flight from the driver's point of view.
    let d4 = pattern(4, 2048);
    pending.push(
        r.t.submit(0, &write_req(30, &d4), Layout::Indirect)
            .unwrap(),
    );
    apply_write(&mut model, 30, &d4);

    // Pre-copy: context read while Active.
    let first = r.read_context(1, 64);
    assert!(!first.is_empty());
    r.set_mode(1, Mode::Stop);
    // The driver keeps going while A is stopped.
    let d5 = pattern(5, 512);
    pending.push(r.t.submit(0, &write_req(40, &d5), Layout::Direct).unwrap());
    apply_write(&mut model, 40, &d5);
    r.kick_vf(1);
    r.set_mode(1, Mode::Freeze);
    let size = r.admin(opcode::DEV_CTX_SIZE_GET, 1, &[0], 8);
    assert!(size.ok());
    let ctx = r.read_context(1, 37);
    assert_eq!(
        u64::from_le_bytes(size.result[..8].try_into().unwrap()),
        ctx.len() as u64
    );
    let records = r.read_records(1);
    assert!(!records.is_empty());

    // B: the hypervisor that owns B carries its PCI state and MSI-X table.
    let b = r.vf_bdf(2);
    let mut vf_b = OnBus::new(&r.bus, b);
    r.t.probe_placed(&mut vf_b, VF_BAR0 + VF_BAR0_SIZE).unwrap();
    r.t.enable_msix(&mut vf_b, 2).unwrap();
    r.set_mode(2, Mode::Freeze);
    r.write_context(2, &ctx, 50);
    // The written context takes effect on leaving Freeze: B's own context
    // is then A's, byte for byte.
    r.set_mode(2, Mode::Stop);
    assert_eq!(r.read_context(2, 4096), ctx);
    r.set_mode(2, Mode::Active);

    // The driver carries on with B.
    let mut seen = Vec::new();
    while let Some(u) = r.t.pop_used(0).unwrap() {
        seen.push(u.id);
    }
    let mut want: Vec<u16> = pending.iter().map(|s| s.head).collect();
    want.sort_unstable();
    seen.sort_unstable();
    assert_eq!(seen, want, "every request completed exactly once");
    for s in &pending {
        assert_eq!(status_of(&r.t, s), VIRTIO_BLK_S_OK);
    }
    let d6 = pattern(6, 512);
    let (s, u) = r.request(2, &write_req(50, &d6));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    // B interrupts through the MSI-X vector the context carried.
    assert_eq!(r.irqs.of(b).triggered(), vec![1]);
    apply_write(&mut model, 50, &d6);
    // A is frozen: a stray kick of A does nothing.
    r.kick_vf(1);
    assert_eq!(r.t.pop_used(0).unwrap(), None);
    assert!(
        r.file(1, Files::Shared) == model,
        "file content is exactly what was written"
    );
}

/// VQ_SPLIT_DEV_OWN_DESC: heads a written context lists as device-owned
/// are reported while the member is not Active and served exactly once
/// when it becomes Active.
#[test]
fn r_mode_3_adopted_device_owned_heads_are_served_once() {
    let mut r = Rig::up("owned", 2, 2, Files::Shared);
    r.bring_up_vf(1);
    r.request(1, &write_req(0, &[9; 512]));
    let d = pattern(8, 1024);
    let s = r.t.submit(0, &write_req(12, &d), Layout::Direct).unwrap();
    r.set_mode(1, Mode::Freeze);
    let bytes = r.read_context(1, 4096);
    let limits = {
        use super::migration::MemberDevice;
        let vf = r.pf.lock().unwrap().vf(1).unwrap();
        let l = vf.lock().unwrap().context_limits();
        l
    };
    let mut ctx = MemberContext::decode(&bytes, &limits).unwrap();
    // As if A had taken the request and not finished it.
    ctx.queues[0].avail_idx = ctx.queues[0].avail_idx.wrapping_add(1);
    ctx.queues[0].device_owned = vec![s.head];
    let b = r.vf_bdf(2);
    let mut vf_b = OnBus::new(&r.bus, b);
    r.t.probe_placed(&mut vf_b, VF_BAR0 + VF_BAR0_SIZE).unwrap();
    r.t.enable_msix(&mut vf_b, 2).unwrap();
    r.set_mode(2, Mode::Freeze);
    r.write_context(2, &ctx.to_bytes(), 4096);
    r.set_mode(2, Mode::Stop);
    let back = MemberContext::decode(&r.read_context(2, 4096), &limits).unwrap();
    assert_eq!(back.queues[0].device_owned, vec![s.head]);
    r.set_mode(2, Mode::Active);
    assert_eq!(r.t.pop_used(0).unwrap().map(|u| u.id), Some(s.head));
    assert_eq!(r.t.pop_used(0).unwrap(), None);
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK);
    assert_eq!(&r.file(1, Files::Shared)[12 * 512..12 * 512 + 1024], &d[..]);
    let (s2, u) = r.request(2, &read_req(12, 1024));
    assert_eq!(u.map(|u| u.id), Some(s2.head));
    assert_eq!(r.t.read_mem(s2.writable()[0].0, 1024).unwrap(), d);
}

// ---- write records ----------------------------------------------------------------

/// R-WR-3 accuracy: the records equal, page for page, the pages the
/// device wrote as computed from the requests issued (data of reads and
/// GET_ID, status bytes, the used ring); nothing the driver or the PF
/// wrote; re-dirtied pages come back; a narrower range records only its
/// pages.
#[test]
fn r_wr_3_records_equal_the_pages_the_member_wrote() {
    let mut r = Rig::up("wr3", 2, 2, Files::PerVf);
    let disk = pattern(0x33, DISK_LEN);
    std::fs::write(vf_file(&r.dir.0, Files::PerVf, 1), &disk).unwrap();
    r.bring_up_vf(1);
    r.start_records_all(1);
    assert!(r.read_records(1).is_empty());
    let used_page = r.t.queue(0).unwrap().used & !4095;
    // Scratch pages for buffers placed across page boundaries.
    let area = r.t.alloc_pages(64).unwrap();
    let mut expect = BTreeSet::new();
    expect.insert(used_page);
    let mut reqs: Vec<Vec<Seg>> = vec![
        // A read whose data straddles two pages.
        vec![
            Seg::Readable(blk_header(VIRTIO_BLK_T_IN, 1)),
            Seg::WritableAt(area + 4096 - 256, 512),
            Seg::WritableAt(area + 10 * 4096 + 7, 1),
        ],
        // Data split over three descriptors on three pages, status with
        // the last one.
        vec![
            Seg::Readable(blk_header(VIRTIO_BLK_T_IN, 3)),
            Seg::WritableAt(area + 2 * 4096, 512),
            Seg::WritableAt(area + 5 * 4096 + 100, 1024),
            Seg::WritableAt(area + 20 * 4096 + 4095, 513),
        ],
        // A write: only the status byte.
        write_req(7, &[1; 1024]),
        // GET_ID: 20 bytes of serial.
        vec![
            Seg::Readable(blk_header(VIRTIO_BLK_T_GET_ID, 0)),
            Seg::WritableAt(area + 30 * 4096 + 4090, 20),
            Seg::WritableAt(area + 40 * 4096, 1),
        ],
        // Past the end of the disk: status only.
        vec![
            Seg::Readable(blk_header(VIRTIO_BLK_T_IN, 1 << 30)),
            Seg::WritableAt(area + 50 * 4096, 512),
            Seg::WritableAt(area + 51 * 4096, 1),
        ],
    ];
    reqs.push(read_req(100, 4096 * 3));
    for segs in &reqs {
        let (s, u) = r.request(1, segs);
        let u = u.expect("completed");
        // What the device wrote: `used_len` bytes of the writable stream
        // but the status is its last byte.
        let w = s.writable();
        let total: u64 = w.iter().map(|x| u64::from(x.1)).sum();
        let data_written = u64::from(u.len).saturating_sub(1);
        let mut off = 0u64;
        for &(a, l) in &w {
            let l = u64::from(l);
            let lo = off;
            let hi = off + l;
            // Data bytes [0, data_written) and the status byte at total-1.
            let d_hi = data_written.min(hi);
            if d_hi > lo {
                expect.extend(pages_of(a, d_hi - lo));
            }
            if (lo..hi).contains(&(total - 1)) {
                expect.insert((a + (total - 1 - lo)) & !4095);
            }
            off = hi;
        }
    }
    // The PF's own I/O and the driver's writes are not the member's.
    r.t.write_mem(area + 60 * 4096, &[1; 64]).unwrap();
    let recs = r.read_records(1);
    let got: BTreeSet<u64> = recs.iter().copied().collect();
    assert_eq!(recs.len(), got.len(), "no duplicates");
    assert!(recs.windows(2).all(|w| w[0] < w[1]), "ascending");
    assert_eq!(got, expect, "records equal the pages the device wrote");
    // The VMM's dirty log saw them too.
    let dirty: BTreeSet<u64> = r.t.dirty_pages().into_iter().collect();
    assert!(expect.is_subset(&dirty));
    // Cleared on read; a page written again comes back.
    assert!(r.read_records(1).is_empty());
    let (s, _) = r.request(1, &reqs[0]);
    let again: BTreeSet<u64> = r.read_records(1).into_iter().collect();
    let mut want = BTreeSet::from([used_page, (area + 4096 - 256) & !4095, area + 4096]);
    want.insert(s.writable()[1].0 & !4095);
    assert_eq!(again, want);
    // A narrower range: only the used ring page.
    assert!(r.admin(opcode::DEV_WRITE_RECORDS_STOP, 1, &[], 0).ok());
    let st = r.admin(
        opcode::DEV_WRITE_RECORDS_START,
        1,
        &records_start(4096, &[(used_page, 1)]),
        0,
    );
    assert!(st.ok());
    r.request(1, &reqs[1]);
    assert_eq!(r.read_records(1), vec![used_page]);
}

// ---- garbage ----------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Garbage on the admin queue (random descriptors, flags, lengths,
/// addresses, loops, indirect tables, random commands) and on the SR-IOV
/// capability never panics; the admin queue keeps serving and a VF that
/// the garbage does not address keeps working.
#[test]
fn garbage_on_admin_queue_and_sriov_capability_never_panics() {
    let mut r = Rig::up("garbage", 4, 4, Files::PerVf);
    r.bring_up_vf(2);
    let scratch = r.t.alloc_pages(16).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut pf = OnBus::new(&r.bus, PF_BDF);
    let d = r.pfd.as_mut().unwrap();
    let qsize = d.queues[&ADMIN_Q].size;
    for i in 0..400u32 {
        // A random command in the scratch area.
        let mut cmd = vec![0u8; 24 + rng.below(64) as usize];
        for b in cmd.iter_mut() {
            *b = rng.next() as u8;
        }
        let op = [0u16, 1, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17, 18, 0x3f][rng.below(14) as usize];
        cmd[0..2].copy_from_slice(&op.to_le_bytes());
        if rng.below(4) != 0 {
            cmd[2..4].copy_from_slice(&GROUP_TYPE_SRIOV.to_le_bytes());
        }
        let member = [0u64, 1, 3, 4, 5, rng.next()][rng.below(6) as usize];
        cmd[16..24].copy_from_slice(&member.to_le_bytes());
        r.t.write_mem(scratch, &cmd).unwrap();
        let n = 1 + rng.below(4) as usize;
        let head = (i as u16 * 4) % qsize;
        let mut descs = Vec::new();
        for k in 0..n {
            let addr = match rng.below(5) {
                0 => rng.next(),
                1 => scratch + 4096 * (1 + rng.below(8)),
                _ => scratch + rng.below(4096),
            };
            let len = match rng.below(4) {
                0 => rng.next() as u32,
                _ => rng.below(80) as u32,
            };
            let mut flags = (rng.next() & 0x7) as u16;
            if k + 1 < n {
                flags |= 1;
            }
            let next = match rng.below(4) {
                0 => rng.next() as u16,
                1 => head,
                _ => (head + k as u16 + 1) % qsize,
            };
            descs.push((addr, len, flags, next));
        }
        if rng.below(3) == 0 {
            // A well-formed command in an indirect table.
            let table = scratch + 12 * 4096;
            let mut t = Vec::new();
            for (k, (a, l, f)) in [
                (scratch, cmd.len() as u32, 1u16),
                (scratch + 4096, 8 + rng.below(64) as u32, 2),
            ]
            .into_iter()
            .enumerate()
            {
                t.extend_from_slice(&a.to_le_bytes());
                t.extend_from_slice(&l.to_le_bytes());
                t.extend_from_slice(&f.to_le_bytes());
                t.extend_from_slice(&((k as u16 + 1) % 2).to_le_bytes());
            }
            r.t.write_mem(table, &t).unwrap();
            descs = vec![(table, 32, 4, 0)];
        }
        d.publish_raw(&r.t, ADMIN_Q, &descs, head);
        d.kick(&mut pf, ADMIN_Q);
        while d.pop_used(&r.t, ADMIN_Q).is_some() {}
    }
    // Garbage must not have disturbed the admin queue or member 2.
    let st = TestDriver::region_read(&mut pf, &d.caps.common, co::DEVICE_STATUS, 1) as u8;
    assert_eq!(st & STATUS_DEVICE_NEEDS_RESET, 0);
    let q = d.admin(&mut r.t, &mut pf, opcode::LIST_QUERY, 0, &[], 8);
    assert!(q.ok());
    let q = d.admin(
        &mut r.t,
        &mut pf,
        opcode::LIST_USE,
        0,
        &SUPPORTED_OPCODES.to_le_bytes(),
        0,
    );
    assert!(q.ok());
    assert_eq!(r.mode(2), Mode::Active as u8);
    let data = pattern(0x44, 512);
    let (s, u) = r.request(2, &write_req(1, &data));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    assert_eq!(&r.file(2, Files::PerVf)[512..1024], &data[..]);

    // Random writes to the SR-IOV capability: the bus always shows exactly
    // the VFs the registers say, decoded only with VF MSE.
    let mut pfc = r.on(PF_BDF);
    for _ in 0..2000 {
        let off = SRIOV + rng.below(0x44) as u16;
        let len = [1usize, 2, 4][rng.below(3) as usize];
        let v = rng.next().to_le_bytes();
        pfc.config_write(off, &v[..len]);
        let ctrl = TestDriver::cfg_read16(&mut pfc, SRIOV + 0x08);
        let num = TestDriver::cfg_read16(&mut pfc, SRIOV + 0x10);
        assert!(num <= 4);
        let vfs = r.bus.function_ids().len() - 1;
        if ctrl & 1 != 0 {
            assert_eq!(vfs, usize::from(num));
        } else {
            assert_eq!(vfs, 0);
        }
        for n in 1..=vfs as u16 {
            let bars = r.bus.decoded_bars_of(r.vf_bdf(n));
            if ctrl & 8 == 0 {
                assert!(bars.is_empty());
            }
        }
    }
    // Back to a clean state: VFs work again.
    TestDriver::cfg_write16(&mut pfc, SRIOV + 0x08, 0);
    r.enable_vfs(2);
    r.bring_up_vf(2);
    let (s, u) = r.request(2, &read_req(1, 512));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    assert_eq!(r.t.read_mem(s.writable()[0].0, 512).unwrap(), data);
}

/// R-ADM-4: commands of different members published together complete
/// independently, each on its own used element, none waiting on another.
#[test]
fn r_adm_4_commands_of_different_members_complete_independently() {
    let mut r = Rig::up("adm4", 3, 3, Files::PerVf);
    let bufs = r.t.alloc_pages(2).unwrap();
    let mut pf = OnBus::new(&r.bus, PF_BDF);
    let d = r.pfd.as_mut().unwrap();
    let size = d.queues[&ADMIN_Q].size;
    let mut heads = Vec::new();
    for (k, (member, op, data)) in [
        (3u64, opcode::DEV_MODE_SET, vec![2u8]),
        (1, opcode::DEV_MODE_SET, vec![1]),
        (2, opcode::DEV_MODE_GET, vec![]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut cmd = op.to_le_bytes().to_vec();
        cmd.extend_from_slice(&GROUP_TYPE_SRIOV.to_le_bytes());
        cmd.extend_from_slice(&[0; 12]);
        cmd.extend_from_slice(&member.to_le_bytes());
        cmd.extend_from_slice(&data);
        let c = bufs + 256 * k as u64;
        let res = bufs + 4096 + 256 * k as u64;
        r.t.write_mem(c, &cmd).unwrap();
        let head = d.queues[&ADMIN_Q].avail_idx.wrapping_mul(2) % size;
        d.publish_raw(
            &r.t,
            ADMIN_Q,
            &[(c, cmd.len() as u32, 1, (head + 1) % size), (res, 9, 2, 0)],
            head,
        );
        heads.push((head, res));
    }
    d.kick(&mut pf, ADMIN_Q);
    let mut done = Vec::new();
    while let Some((id, len)) = d.pop_used(&r.t, ADMIN_Q) {
        done.push((id, len));
    }
    assert_eq!(done.len(), 3);
    for (head, res) in heads {
        assert!(done.iter().any(|&(id, _)| id == head));
        assert_eq!(r.t.read_mem(res, 2).unwrap(), [0, 0], "status OK");
    }
    assert_eq!(r.mode(3), Mode::Freeze as u8);
    assert_eq!(r.mode(1), Mode::Stop as u8);
    assert_eq!(r.mode(2), Mode::Active as u8);
    // The VMM's device thread finds each function's doorbells at their
    // current addresses.
    let vf2 = r.bus.function(r.vf_bdf(2)).unwrap();
    let db = vf2.lock().unwrap().doorbells();
    assert_eq!(db[0].address, VF_BAR0 + VF_BAR0_SIZE + 0x3000);
    let pfdb = r.bus.function(PF_BDF).unwrap().lock().unwrap().doorbells();
    assert_eq!(pfdb.len(), 2, "block queue and admin queue");
    assert_eq!(pfdb[1].address, PF_BAR0 + 0x3000 + 4);
}

/// Lock order (PF → VF, never the bus while holding either): admin
/// commands and SR-IOV writes on the PF race VF configuration and BAR
/// accesses, doorbells and decode-map rebuilds from other threads without
/// deadlock.
#[test]
fn lock_order_pf_then_vf_survives_concurrent_access() {
    let r = Rig::up("locks", 4, 4, Files::PerVf);
    let bus = Arc::new(r.bus);
    let pf = r.pf.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    {
        // The PF side: admin commands (PF then VF) and VF MSE toggles.
        let (bus, pf, stop) = (bus.clone(), pf.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut bytes = opcode::DEV_MODE_SET.to_le_bytes().to_vec();
                bytes.extend_from_slice(&GROUP_TYPE_SRIOV.to_le_bytes());
                bytes.extend_from_slice(&[0; 12]);
                bytes.extend_from_slice(&(1 + i % 4).to_le_bytes());
                bytes.push((i % 3) as u8);
                let cmd = super::admin::AdminCommand::parse(&bytes).unwrap();
                pf.lock().unwrap().execute_admin(&cmd, &mut out, 64);
                let ctrl: u16 = if i.is_multiple_of(2) { 0x1 } else { 0x9 };
                bus.ecam_write(ecam_offset(PF_BDF, SRIOV + 8), &ctrl.to_le_bytes());
                i += 1;
            }
        }));
    }
    for n in 1..=4u16 {
        // VF side: configuration, BAR reads, doorbells, rebuilds.
        let (bus, stop) = (bus.clone(), stop.clone());
        let bdf = Bdf::from_rid(PF_BDF.rid() + 8 + n - 1);
        threads.push(std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut b = [0u8; 4];
                bus.ecam_read(ecam_offset(bdf, 0), &mut b);
                bus.mmio_read(
                    VF_BAR0 + u64::from(n - 1) * VF_BAR0_SIZE + 0x12,
                    &mut b[..2],
                );
                if let Some(f) = bus.function(bdf) {
                    f.lock().unwrap().doorbell(0);
                }
                bus.rebuild_decode_map();
            }
        }));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for t in threads {
        while !t.is_finished() {
            assert!(std::time::Instant::now() < deadline, "deadlock");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        t.join().unwrap();
    }
    assert_eq!(bus.function_ids().len(), 5);
}

/// Spec §6: the PF and its VFs survive a snapshot and restore into a new
/// PF on a new bus (same memory and files): PCI configuration, BAR
/// placement, MSI-X, virtio state and rings, the list in use, each
/// member's mode, a partially read context stream, write-record ranges and
/// unread records. The guest then carries on.
#[test]
fn spec_6_snapshot_and_restore_of_pf_and_vfs() {
    let mut r = Rig::up("snap", 3, 3, Files::PerVf);
    r.bring_up_vf(1);
    let d1 = pattern(1, 512);
    r.request(1, &write_req(3, &d1));
    r.start_records_all(1);
    let (s, _) = r.request(1, &read_req(3, 512));
    r.set_mode(1, Mode::Stop);
    // A request the driver published and kicked while Stopped.
    let d2 = pattern(2, 512);
    let held = r.t.submit(0, &write_req(6, &d2), Layout::Direct).unwrap();
    r.kick_vf(1);
    r.set_mode(3, Mode::Freeze);
    // A partially read context stream of member 3.
    let part = r.admin(opcode::DEV_CTX_READ, 3, &[], 16);
    assert_eq!(part.result.len(), 16);
    let snap = r.pf.lock().unwrap().snapshot().unwrap();
    assert_eq!(snap.vfs.len(), 3);

    // A new PF on a new bus, same files and memory.
    let d = r.dir.0.clone();
    let cfg = PfConfig::new(
        r.dir.0.join("pf.img"),
        Box::new(move |n| vf_file(&d, Files::PerVf, n)),
        3,
        PF_BDF,
        false,
    )
    .unwrap();
    let irqs = Arc::new(Irqs::default());
    let pf2 = VirtioPf::new(cfg, r.t.mem_atomic(), irqs.clone()).unwrap();
    let change = pf2.lock().unwrap().restore(&snap).unwrap();
    assert!(change.removed.is_empty());
    let bus2 = PciBus::new();
    bus2.add_function(PF_BDF, pf2.clone()).unwrap();
    for (bdf, f) in change.added {
        bus2.add_function(bdf, f).unwrap();
    }
    assert_eq!(bus2.function_ids(), r.bus.function_ids());
    assert_eq!(bus2.decoded_bars(), r.bus.decoded_bars());
    assert_eq!(pf2.lock().unwrap().snapshot().unwrap(), snap);
    r.bus = bus2;
    r.pf = pf2;
    r.irqs = irqs;

    // The guest carries on: same admin queue, same VF rings.
    assert_eq!(r.mode(1), Mode::Stop as u8);
    assert_eq!(r.mode(3), Mode::Freeze as u8);
    // The partially read stream resumes at its offset.
    let z = r.admin(opcode::DEV_CTX_SIZE_GET, 3, &[0], 8);
    let left = u64::from_le_bytes(z.result[..8].try_into().unwrap());
    let rest = r.read_context(3, 4096);
    assert_eq!(rest.len() as u64, left);
    assert!(left > 0);
    let limits = {
        use super::migration::MemberDevice;
        let vf = r.pf.lock().unwrap().vf(3).unwrap();
        let l = vf.lock().unwrap().context_limits();
        l
    };
    let whole = [part.result.clone(), rest].concat();
    assert!(MemberContext::decode(&whole, &limits).is_ok());
    let recs = r.read_records(1);
    assert!(
        recs.contains(&(s.writable()[0].0 & !4095)),
        "unread records carried"
    );
    r.set_mode(1, Mode::Active);
    assert_eq!(r.t.pop_used(0).unwrap().map(|u| u.id), Some(held.head));
    assert_eq!(status_of(&r.t, &held), VIRTIO_BLK_S_OK);
    assert_eq!(&r.file(1, Files::PerVf)[3072..3584], &d2[..]);
    let (s, u) = r.request(1, &read_req(3, 512));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    assert_eq!(r.t.read_mem(s.writable()[0].0, 512).unwrap(), d1);
    assert!(!r.irqs.of(r.vf_bdf(1)).triggered().is_empty());
    assert!(r.read_records(1).contains(&(s.writable()[0].0 & !4095)));
}

/// VF Enable with NumVFs = 0 creates nothing and member commands see no
/// member; a read-only PF makes read-only VFs.
#[test]
fn r_pci_3_zero_vfs_and_read_only_members() {
    let mut r = Rig::new("zero", 2, Files::PerVf);
    r.probe_pf();
    r.bring_up_pf();
    r.enable_vfs(0);
    assert_eq!(r.bus.function_ids(), vec![PF_BDF]);
    let e = r.admin(opcode::DEV_MODE_GET, 1, &[], 1);
    assert_eq!(
        (e.status, e.qualifier),
        (status::EINVAL, qualifier::INVALID_MEMBER)
    );

    let dir = TempDir::new("ro");
    for f in ["pf.img", "vf.img"] {
        std::fs::write(dir.0.join(f), vec![0u8; 8192]).unwrap();
    }
    let mut t = TestDriver::new(8 << 20);
    let d = dir.0.clone();
    let cfg = PfConfig::new(
        dir.0.join("pf.img"),
        Box::new(move |_| d.join("vf.img")),
        1,
        PF_BDF,
        true,
    )
    .unwrap();
    let pf = VirtioPf::new(cfg, t.mem_atomic(), Arc::new(Irqs::default())).unwrap();
    let bus = PciBus::new();
    bus.add_function(PF_BDF, pf).unwrap();
    let mut p = OnBus::new(&bus, PF_BDF);
    TestDriver::cfg_write32(&mut p, SRIOV + 0x24, VF_BAR0 as u32);
    TestDriver::cfg_write16(&mut p, SRIOV + 0x10, 1);
    TestDriver::cfg_write16(&mut p, SRIOV + 0x08, 0x9);
    let mut vf = OnBus::new(&bus, Bdf::new(0, 5, 0));
    t.probe_placed(&mut vf, VF_BAR0).unwrap();
    let f = t.bring_up(&mut vf, u64::MAX, 1).unwrap();
    assert_ne!(f & (1 << crate::block::VIRTIO_BLK_F_RO), 0);
    let (s, _) = t
        .request(&mut vf, 0, &write_req(0, &[1; 512]), Layout::Direct)
        .unwrap();
    assert_eq!(status_of(&t, &s), crate::block::VIRTIO_BLK_S_IOERR);
    assert!(std::fs::read(dir.0.join("vf.img"))
        .unwrap()
        .iter()
        .all(|b| *b == 0));
}

// ---- requests in flight on the I/O worker --------------------------------------

/// Publishes one admin command on the PF's admin queue and rings its
/// doorbell as the device thread does, without waiting for anything else
/// (no function is drained). Returns the chain's head and its result
/// buffer (status first).
pub(crate) fn raw_admin(r: &mut Rig, member: u64, op: u16, data: &[u8]) -> (u16, u64) {
    let (head, res) = queue_admin(r, member, op, data);
    ring(r, PF_BDF, ADMIN_Q);
    (head, res)
}

/// Publishes an admin command without ringing the doorbell; returns its
/// head and the address of its 9-byte status + result (filled with 0xEE).
pub(crate) fn queue_admin(r: &mut Rig, member: u64, op: u16, data: &[u8]) -> (u16, u64) {
    let bufs = r.t.alloc_pages(1).unwrap();
    let d = r.pfd.as_mut().unwrap();
    let size = d.queues[&ADMIN_Q].size;
    let mut cmd = op.to_le_bytes().to_vec();
    cmd.extend_from_slice(&GROUP_TYPE_SRIOV.to_le_bytes());
    cmd.extend_from_slice(&[0; 12]);
    cmd.extend_from_slice(&member.to_le_bytes());
    cmd.extend_from_slice(data);
    let res = bufs + 2048;
    r.t.write_mem(bufs, &cmd).unwrap();
    r.t.write_mem(res, &[0xee; 9]).unwrap();
    let head = d.queues[&ADMIN_Q].avail_idx.wrapping_mul(2) % size;
    d.publish_raw(
        &r.t,
        ADMIN_Q,
        &[
            (bufs, cmd.len() as u32, 1, (head + 1) % size),
            (res, 9, 2, 0),
        ],
        head,
    );
    (head, res)
}

/// Rings doorbell or work event `index` of function `bdf` the way the
/// device thread does (no draining).
pub(crate) fn ring(r: &Rig, bdf: Bdf, index: u16) {
    r.bus.function(bdf).unwrap().lock().unwrap().doorbell(index);
}

/// R-MODE-3 and R-ADM-4 with a real VF: DEV_MODE_SET Stop of a member
/// whose request is still on its disk does not complete until the request
/// has (used ring written): the admin command is deferred, commands for
/// other members complete meanwhile, and once the disk answers the VF's
/// completion event delivers the request and signals the PF, whose
/// progress event completes the Stop.
#[test]
fn r_mode_3_stop_waits_for_a_real_vf_request_on_its_disk() {
    let disks = test_disks(2);
    let mut r = Rig::up_with_disks("stop-waits", &disks);
    r.bring_up_vf(1);
    let vf1 = r.vf_bdf(1);
    disks[0].set_open(false);
    let data = pattern(4, 512);
    let s = r.t.submit(0, &write_req(2, &data), Layout::Direct).unwrap();
    ring(&r, vf1, 0);
    assert!(disks[0].wait_for_waiting(1), "the request reached the disk");

    let (stop_head, stop_res) = raw_admin(&mut r, 1, opcode::DEV_MODE_SET, &[Mode::Stop as u8]);
    let d = r.pfd.as_mut().unwrap();
    assert_eq!(
        d.pop_used(&r.t, ADMIN_Q),
        None,
        "Stop must wait for the request"
    );
    assert_eq!(r.pf.lock().unwrap().member_mode(1), Some(Mode::Active));
    // Another member's command completes meanwhile (R-ADM-4).
    let (get_head, get_res) = raw_admin(&mut r, 2, opcode::DEV_MODE_GET, &[]);
    let d = r.pfd.as_mut().unwrap();
    assert_eq!(d.pop_used(&r.t, ADMIN_Q).map(|u| u.0), Some(get_head));
    assert_eq!(
        r.t.read_mem(get_res, 3).unwrap(),
        [0, 0, Mode::Active as u8]
    );
    // The same member: busy until its mode change is done.
    let (busy_head, busy_res) = raw_admin(&mut r, 1, opcode::DEV_MODE_GET, &[]);
    let d = r.pfd.as_mut().unwrap();
    assert_eq!(d.pop_used(&r.t, ADMIN_Q).map(|u| u.0), Some(busy_head));
    assert_eq!(
        r.t.read_mem(busy_res, 2).unwrap(),
        status::EAGAIN.to_le_bytes()
    );
    assert_eq!(
        r.t.used_idx(0).unwrap(),
        0,
        "the request is still on its disk"
    );

    // The disk answers; the device thread serves the VF's completion
    // event, then the PF's progress event.
    disks[0].set_open(true);
    let vf = r.bus.function(vf1).unwrap();
    vf.lock().unwrap().drain();
    let progress = r
        .bus
        .function(PF_BDF)
        .unwrap()
        .lock()
        .unwrap()
        .work_events()
        .into_iter()
        .find(|w| w.index == MEMBER_PROGRESS_EVENT)
        .unwrap();
    assert!(progress.event.read().is_ok(), "the VF signalled the PF");
    assert_eq!(r.t.pop_used(0).unwrap().map(|u| u.id), Some(s.head));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK);
    ring(&r, PF_BDF, MEMBER_PROGRESS_EVENT);
    let d = r.pfd.as_mut().unwrap();
    assert_eq!(d.pop_used(&r.t, ADMIN_Q).map(|u| u.0), Some(stop_head));
    assert_eq!(
        r.t.read_mem(stop_res, 2).unwrap(),
        [0, 0],
        "Stop completed OK"
    );
    assert_eq!(r.mode(1), Mode::Stop as u8);
    assert_eq!(&disks[0].contents()[1024..1536], &data[..]);
}

/// No guest can keep the admin queue, another VF or a vCPU waiting behind
/// its own I/O: VF 1 fills its queue while its disk does not answer; VF 2's
/// requests, admin commands for both members and configuration and BAR
/// accesses to VF 1 itself all complete meanwhile. When the disk answers,
/// every request of VF 1 completes exactly once.
#[test]
fn a_vf_stuck_on_its_disk_holds_up_nobody_else() {
    let disks = test_disks(2);
    let mut r = Rig::up_with_disks("flood", &disks);
    r.bring_up_vf(1);
    let vf1 = r.vf_bdf(1);
    disks[0].set_open(false);
    let mut flood = Vec::new();
    for i in 0..40u64 {
        flood.push(
            r.t.submit(0, &write_req(i, &[i as u8; 512]), Layout::Direct)
                .unwrap(),
        );
    }
    ring(&r, vf1, 0);
    assert!(disks[0].wait_for_waiting(1));
    let vf1_used = r.t.queue(0).unwrap().used;

    // A vCPU touching VF 1 (configuration space, BAR0) is not held by its
    // disk: done on another thread, bounded.
    let f = r.bus.function(vf1).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut d = f.lock().unwrap();
        let mut b = [0u8; 4];
        d.config_read(0, &mut b);
        let mut st = [0u8; 1];
        d.bar_read(0, co::DEVICE_STATUS, &mut st);
        let _ = tx.send((b, st[0]));
    });
    let (id, status) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("VF 1's registers did not answer while its disk was stuck");
    assert_eq!(id, [0xff; 4], "a VF's vendor/device ID reads 0xFFFF");
    assert_eq!(status, 0xf);

    // Admin commands for both members.
    for m in [1u64, 2] {
        let (h, res) = raw_admin(&mut r, m, opcode::DEV_MODE_GET, &[]);
        let d = r.pfd.as_mut().unwrap();
        assert_eq!(
            d.pop_used(&r.t, ADMIN_Q).map(|u| u.0),
            Some(h),
            "member {m}"
        );
        assert_eq!(r.t.read_mem(res, 3).unwrap(), [0, 0, 0]);
    }
    // VF 2 does I/O with its own disk.
    r.bring_up_vf(2);
    let data = pattern(9, 4096);
    let (s, u) = r.request(2, &write_req(8, &data));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK);
    assert_eq!(&disks[1].contents()[4096..8192], &data[..]);
    assert_eq!(
        r.t.read_mem(vf1_used + 2, 2).unwrap(),
        [0, 0],
        "VF 1 completed nothing while its disk was stuck"
    );

    // The disk answers: all 40 complete, once each.
    disks[0].set_open(true);
    f_drain(&r, vf1);
    let idx = u16::from_le_bytes(r.t.read_mem(vf1_used + 2, 2).unwrap().try_into().unwrap());
    assert_eq!(idx, 40);
    let mut ids: Vec<u32> = (0..40u64)
        .map(|k| {
            let e = r.t.read_mem(vf1_used + 4 + 8 * k, 4).unwrap();
            u32::from_le_bytes(e.try_into().unwrap())
        })
        .collect();
    ids.sort_unstable();
    let mut want: Vec<u32> = flood.iter().map(|s| u32::from(s.head)).collect();
    want.sort_unstable();
    assert_eq!(ids, want);
    for i in 0..40usize {
        assert_eq!(disks[0].contents()[i * 512], i as u8);
    }
}

pub(crate) fn f_drain(r: &Rig, bdf: Bdf) {
    r.bus.function(bdf).unwrap().lock().unwrap().drain();
}

/// A disk that fails: the guest sees VIRTIO_BLK_S_IOERR for the request
/// that failed, the queue keeps working, the other VF is untouched, and
/// the same VF works again once the disk does. A full disk fails writes
/// only.
#[test]
fn disk_errors_reach_the_guest_as_ioerr_and_nothing_else_breaks() {
    let disks = test_disks(2);
    let mut r = Rig::up_with_disks("faults", &disks);
    r.bring_up_vf(1);
    let data = pattern(1, 512);
    let (_, u) = r.request(1, &write_req(0, &data));
    assert!(u.is_some());

    disks[0].set_fault(Fault::Io);
    let (s, u) = r.request(1, &read_req(0, 512));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_IOERR);
    let (s, _) = r.request(1, &write_req(1, &data));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_IOERR);

    disks[0].set_fault(Fault::NoSpace);
    let (s, _) = r.request(1, &write_req(1, &data));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_IOERR, "ENOSPC");
    let (s, _) = r.request(1, &read_req(0, 512));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK, "reads still work");
    assert_eq!(r.t.read_mem(s.writable()[0].0, 512).unwrap(), data);
    let vf1 = r.bus.function(r.vf_bdf(1)).unwrap();
    assert!(
        !vf1.lock().unwrap().debug_state().contains("NEEDS_RESET"),
        "an I/O error is the request's, not the device's"
    );

    disks[0].set_fault(Fault::None);
    let (s, _) = r.request(1, &write_req(1, &data));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK);
    // The other VF was never affected; admin still works.
    r.bring_up_vf(2);
    let (s, _) = r.request(2, &write_req(3, &data));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK);
    assert_eq!(r.mode(1), Mode::Active as u8);
}

/// A reset (virtio reset or FLR) of a VF with requests on its disk waits
/// for them (the device must not write guest memory after the reset) and
/// drops their completions: the driver that reset the device does not see
/// them, and the queue starts clean.
#[test]
fn reset_with_requests_in_flight_waits_and_drops_their_completions() {
    let disks = test_disks(1);
    let mut r = Rig::up_with_disks("reset-inflight", &disks);
    r.bring_up_vf(1);
    let vf1 = r.vf_bdf(1);
    disks[0].set_open(false);
    for i in 0..4u64 {
        r.t.submit(0, &write_req(i, &[7; 512]), Layout::Direct)
            .unwrap();
    }
    ring(&r, vf1, 0);
    assert!(disks[0].wait_for_waiting(1));
    let used = r.t.queue(0).unwrap().used;
    // The reset (from a vCPU) waits for the disk: open it from elsewhere.
    let d = disks[0].clone();
    let opener = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        d.set_open(true);
    });
    let mut vf = r.on(vf1);
    r.t.set_status(&mut vf, 0);
    opener.join().unwrap();
    assert_eq!(r.t.status(&mut vf), 0);
    assert_eq!(
        disks[0].ops(),
        4,
        "every request reached the disk before the reset ended"
    );
    ring(&r, vf1, COMPLETION_EVENT);
    assert_eq!(
        r.t.read_mem(used + 2, 2).unwrap(),
        [0, 0],
        "completions dropped"
    );
    // The device works again after the driver brings it up.
    r.bring_up_vf(1);
    let (s, u) = r.request(1, &write_req(9, &[1; 512]));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    assert_eq!(status_of(&r.t, &s), VIRTIO_BLK_S_OK);
}

/// R14-PARTS round trip on real VFs: Linux's flow (stop A, METADATA SIZE,
/// DEV_PARTS_GET ALL; stop B, DEV_PARTS_SET, resume B) moves a running
/// virtio-blk driver from VF1 to VF2 with requests completed by A and not
/// consumed, published and not kicked, and kicked while A was stopped:
/// each completes exactly once, through B, with B's MSI-X vector.
#[test]
fn r14_parts_round_trip_of_a_real_vf_driver() {
    let mut r = Rig::up_v14("parts", 2, 2, Files::Shared);
    let mut model = vec![0u8; DISK_LEN];
    r.bring_up_vf(1);
    let d = pattern(1, 1024);
    let (s, u) = r.request(1, &write_req(0, &d));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    apply_write(&mut model, 0, &d);
    let mut pending = Vec::new();
    for (k, sector) in [(2u8, 10u64), (3, 20)] {
        let d = pattern(k, 512);
        pending.push(
            r.t.submit(0, &write_req(sector, &d), Layout::Direct)
                .unwrap(),
        );
        apply_write(&mut model, sector, &d);
    }
    r.kick_vf(1);
    let d4 = pattern(4, 2048);
    pending.push(
        r.t.submit(0, &write_req(30, &d4), Layout::Indirect)
            .unwrap(),
    );
    apply_write(&mut model, 30, &d4);
    let object = |id: u32, purpose: u8| {
        let mut d = vec![0u8; 4];
        d.extend_from_slice(&id.to_le_bytes());
        d.extend_from_slice(&[0; 8]);
        d.push(purpose);
        d.extend_from_slice(&[0; 7]);
        d
    };
    assert!(r
        .admin(v14::opcode::RESOURCE_OBJ_CREATE, 1, &object(0, 0), 0)
        .ok());
    assert!(r.admin(v14::opcode::DEV_MODE_SET, 1, &[1], 0).ok());
    // The driver goes on while A is stopped: accepted, not served.
    let d5 = pattern(5, 512);
    pending.push(r.t.submit(0, &write_req(40, &d5), Layout::Direct).unwrap());
    apply_write(&mut model, 40, &d5);
    r.kick_vf(1);
    let get = |t: u8| {
        let mut d = object(0, 0)[..8].to_vec();
        d.push(t);
        d.extend_from_slice(&[0; 7]);
        d
    };
    let size = r.admin(v14::opcode::DEV_PARTS_METADATA_GET, 1, &get(0), 8);
    assert!(size.ok(), "{size:?}");
    let size = u32::from_le_bytes(size.result[..4].try_into().unwrap());
    let image = r.admin(v14::opcode::DEV_PARTS_GET, 1, &get(1), size);
    assert!(image.ok(), "{image:?}");
    assert_eq!(image.result.len(), size as usize);

    let b = r.vf_bdf(2);
    let mut vf_b = OnBus::new(&r.bus, b);
    r.t.probe_placed(&mut vf_b, VF_BAR0 + VF_BAR0_SIZE).unwrap();
    r.t.enable_msix(&mut vf_b, 2).unwrap();
    assert!(r
        .admin(v14::opcode::RESOURCE_OBJ_CREATE, 2, &object(1, 1), 0)
        .ok());
    assert!(r.admin(v14::opcode::DEV_MODE_SET, 2, &[1], 0).ok());
    let mut set = object(1, 1)[..8].to_vec();
    set.extend_from_slice(&image.result);
    let rep = r.admin(v14::opcode::DEV_PARTS_SET, 2, &set, 0);
    assert!(rep.ok(), "{rep:?}");
    assert!(r.admin(v14::opcode::DEV_MODE_SET, 2, &[0], 0).ok());

    let mut seen = Vec::new();
    while let Some(u) = r.t.pop_used(0).unwrap() {
        seen.push(u.id);
    }
    let mut want: Vec<u16> = pending.iter().map(|s| s.head).collect();
    want.sort_unstable();
    seen.sort_unstable();
    assert_eq!(seen, want, "every request completed exactly once");
    for s in &pending {
        assert_eq!(status_of(&r.t, s), VIRTIO_BLK_S_OK);
    }
    let d6 = pattern(6, 512);
    let (s, u) = r.request(2, &write_req(50, &d6));
    assert_eq!(u.map(|u| u.id), Some(s.head));
    assert!(!r.irqs.of(b).triggered().is_empty(), "B interrupts");
    apply_write(&mut model, 50, &d6);
    assert!(
        r.file(1, Files::Shared) == model,
        "file content is exactly what was written"
    );
}

/// R-WR-3 behind the virtio-iommu: a VF whose DMA addresses are IOVAs
/// records IOVAs. Everything is mapped 1:1 except an alias window at
/// 4 GiB onto the first 16 MiB; the VF reads a block into the alias of a
/// page. The record is the alias (the DMA address), the VMM's dirty log
/// has the guest physical page, and a range over the physical address
/// records nothing.
#[test]
fn r_wr_3_a_vf_behind_the_iommu_records_its_dma_addresses() {
    use crate::iommu::tables::{Domain, Mapping, Tables, MAP_F_READ, MAP_F_WRITE};
    use crate::iommu::{IommuState, VirtioIommu};
    const ALIAS: u64 = 1 << 32;
    let dummy = TestDriver::new(4096);
    let last_vf = Bdf::from_rid(PF_BDF.rid() + 8);
    let mut iommu = VirtioIommu::new(
        vec![u32::from(PF_BDF.rid())..=u32::from(last_vf.rid())],
        vm_migration::DmaMemory::direct(dummy.mem().clone()),
    )
    .unwrap();
    let rw = MAP_F_READ | MAP_F_WRITE;
    let mut domain = Domain {
        endpoints: 2,
        ..Default::default()
    };
    domain.mappings.insert(
        0,
        Mapping {
            end: MEM_LEN as u64 - 1,
            phys: 0,
            flags: rw,
        },
    );
    domain.mappings.insert(
        ALIAS,
        Mapping {
            end: ALIAS + (16 << 20) - 1,
            phys: 0,
            flags: rw,
        },
    );
    let mut tables = Tables::new(false);
    tables.domains.insert(1, domain);
    tables.mapping_count = 2;
    tables.attached.insert(u32::from(PF_BDF.rid()), 1);
    tables.attached.insert(u32::from(last_vf.rid()), 1);
    iommu.set_state(&IommuState {
        tables,
        held: Vec::new(),
        pending_faults: Vec::new(),
    });
    let handle: Arc<dyn vm_migration::DmaIommu> = Arc::new(iommu.handle());
    let mut r = Rig::build_behind(
        "wr-iommu",
        1,
        Files::PerVf,
        None,
        Dialect::Draft,
        Some(handle),
    );
    r.probe_pf();
    r.bring_up_pf();
    r.enable_vfs(1);
    r.bring_up_vf(1);
    let page = r.t.alloc_pages(1).unwrap();
    assert!(page < 16 << 20);
    // Records over the alias window and over the physical page.
    let start = records_start(4096, &[(ALIAS, 4096), (page, 1)]);
    assert!(r.admin(opcode::DEV_WRITE_RECORDS_START, 1, &start, 0).ok());
    r.t.clear_dirty();
    let mut segs = read_req(0, 512);
    segs[1] = Seg::WritableAt(ALIAS + page, 512);
    let (s, u) = r.request(1, &segs);
    assert_eq!(u.map(|u| u.id), Some(s.head));
    let status = s
        .writable()
        .last()
        .map(|&(a, _)| r.t.read_mem(a, 1).unwrap()[0]);
    assert_eq!(status, Some(0), "VIRTIO_BLK_S_OK");
    assert!(
        r.t.dirty_pages().contains(&page),
        "the VMM's log has the GPA"
    );
    let rd = r.admin(
        opcode::DEV_WRITE_RECORDS_READ,
        1,
        &[ALIAS.to_le_bytes(), (16u64 << 20).to_le_bytes()].concat(),
        64,
    );
    assert!(rd.ok(), "{rd:?}");
    assert_eq!(
        rd.result,
        (ALIAS + page).to_le_bytes().to_vec(),
        "the DMA page"
    );
    let rd = r.admin(
        opcode::DEV_WRITE_RECORDS_READ,
        1,
        &[page.to_le_bytes(), 4096u64.to_le_bytes()].concat(),
        64,
    );
    assert!(rd.ok() && rd.result.is_empty(), "nothing by GPA: {rd:?}");
}
