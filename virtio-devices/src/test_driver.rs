//! A guest-side virtio-pci driver for tests, played against any
//! [`PciDevice`] with plain method calls (no threads, no KVM).
//!
//! [`TestDriver`] owns the guest memory (a [`GuestMemoryMmap`] starting at
//! guest address 0) and a [`RecordingInterrupts`] group to give to the
//! device. It does what a guest's virtio_pci driver does:
//!
//! * configuration space accesses, BAR0 sizing and placement, the command
//!   register, walking the capability list for the virtio and MSI-X
//!   capabilities ([`TestDriver::probe`]);
//! * feature negotiation in Linux's order ([`TestDriver::negotiate`]),
//!   MSI-X table programming ([`TestDriver::enable_msix`]);
//! * split virtqueues in its memory, each ring on its own 4 KiB page
//!   ([`TestDriver::setup_queue`]);
//! * descriptor chains of any shape: readable and writable segments in any
//!   split, as direct chains or through an indirect table
//!   ([`TestDriver::submit`]);
//! * doorbells: the MMIO notify write, then [`PciDevice::doorbell`] as the
//!   VMM's device thread would call it ([`TestDriver::kick`]);
//! * used ring consumption ([`TestDriver::pop_used`]).
//!
//! Methods that take a `dev` argument access the device; the driver never
//! holds it, so the caller keeps ownership (a PF test can pass a VF).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pci::{Bdf, InterruptManager, InterruptSourceGroup, MsiMessage, PciDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};
use vm_migration::{DmaMemory, GuestMemoryMmap};

use crate::transport::caps::*;
use crate::transport::state::common_offset as co;
use crate::transport::state::*;

/// Default size of the driver's guest memory.
pub const DEFAULT_MEM_SIZE: usize = 16 << 20;
/// Where the driver starts allocating rings and buffers (address 0 is
/// left unused: virtio-queue treats an available ring at 0 as unset).
pub const ALLOC_START: u64 = 0x10_0000;
/// Page size of the allocator's page-aligned allocations.
pub const PAGE_SIZE: u64 = 4096;
/// MSI address the driver programs into every MSI-X entry.
pub const MSI_ADDRESS: u64 = 0xfee0_0000;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Available ring flag: no interrupt wanted.
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Errors the driver reports (what a guest driver would fail probing on).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("the device has no {0} capability")]
    MissingCapability(&'static str),
    #[error("BAR0 is not a 64-bit memory BAR (reads {0:#x})")]
    Bar0Kind(u32),
    #[error("device status reads {0:#x} after reset, expected 0")]
    ResetIncomplete(u8),
    #[error("the device refused FEATURES_OK (status {0:#x})")]
    FeaturesRefused(u8),
    #[error("queue {0} does not exist (queue_size reads 0)")]
    NoSuchQueue(u16),
    #[error("queue {index}: size {size} is not usable (maximum {max})")]
    QueueSize { index: u16, size: u16, max: u16 },
    #[error("queue {index}: the device refused MSI-X vector {vector}")]
    VectorRefused { index: u16, vector: u16 },
    #[error("queue {0} is not set up by this driver")]
    QueueNotSetUp(u16),
    #[error("queue {index} has {free} free descriptors, the chain needs {need}")]
    QueueFull {
        index: u16,
        free: usize,
        need: usize,
    },
    #[error("a chain needs at least one segment")]
    EmptyChain,
    #[error("guest memory access at {0:#x} failed")]
    Memory(u64),
    #[error("the driver's memory allocator is exhausted")]
    OutOfMemory,
}

/// Result of driver operations.
pub type Result<T> = std::result::Result<T, DriverError>;

/// One interrupt-group call the device made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptEvent {
    Trigger(u16),
    Update {
        vector: u16,
        msg: MsiMessage,
        masked: bool,
    },
}

/// An [`InterruptSourceGroup`] that records every call.
#[derive(Debug, Default)]
pub struct RecordingInterrupts {
    events: Mutex<Vec<InterruptEvent>>,
}

impl RecordingInterrupts {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Every call so far.
    pub fn events(&self) -> Vec<InterruptEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Vectors triggered so far, in order.
    pub fn triggered(&self) -> Vec<u16> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                InterruptEvent::Trigger(v) => Some(v),
                InterruptEvent::Update { .. } => None,
            })
            .collect()
    }

    /// Vectors triggered since the last call (and forgets all events).
    pub fn take_triggered(&self) -> Vec<u16> {
        let v = self.triggered();
        self.clear();
        v
    }

    /// Forgets all events.
    pub fn clear(&self) {
        if let Ok(mut e) = self.events.lock() {
            e.clear();
        }
    }

    fn push(&self, ev: InterruptEvent) {
        if let Ok(mut e) = self.events.lock() {
            e.push(ev);
        }
    }
}

impl InterruptSourceGroup for RecordingInterrupts {
    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        self.push(InterruptEvent::Trigger(vector));
        Ok(())
    }

    fn update(&self, vector: u16, msg: MsiMessage, masked: bool) -> std::io::Result<()> {
        self.push(InterruptEvent::Update {
            vector,
            msg,
            masked,
        });
        Ok(())
    }
}

/// Where a virtio structure lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapRegion {
    /// Offset of the capability in configuration space.
    pub cap_offset: u16,
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
}

/// The capabilities the driver found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCaps {
    pub common: CapRegion,
    pub notify: CapRegion,
    pub notify_off_multiplier: u32,
    pub isr: CapRegion,
    pub device: CapRegion,
    /// Offset of the `VIRTIO_PCI_CAP_PCI_CFG` capability.
    pub pci_cfg: Option<u16>,
    /// Offset of the MSI-X capability.
    pub msix: Option<u16>,
    /// Offset of the PCI Express capability.
    pub pcie: Option<u16>,
}

/// One segment of a chain to submit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    /// Device-readable bytes, placed by the driver's allocator.
    Readable(Vec<u8>),
    /// Device-writable bytes of this length, placed by the allocator (and
    /// filled with 0xAA so untouched bytes are visible).
    Writable(u32),
    /// Device-readable bytes at a chosen guest address.
    ReadableAt(u64, Vec<u8>),
    /// Device-writable bytes of this length at a chosen guest address
    /// (not filled).
    WritableAt(u64, u32),
}

/// How a chain is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One ring descriptor per segment, linked with NEXT.
    Direct,
    /// One ring descriptor pointing to an indirect table with one entry per
    /// segment.
    Indirect,
}

/// A submitted chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// Head descriptor index (the used element's id).
    pub head: u16,
    /// Guest address and length of every segment, in order.
    pub segments: Vec<(u64, u32, bool)>,
}

impl Submitted {
    /// The writable segments: (address, length).
    pub fn writable(&self) -> Vec<(u64, u32)> {
        self.segments
            .iter()
            .filter(|s| s.2)
            .map(|s| (s.0, s.1))
            .collect()
    }
}

/// A used ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u16,
    pub len: u32,
}

/// A queue the driver set up.
#[derive(Clone, Debug)]
pub struct DriverQueue {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub notify_off: u16,
    pub msix_vector: u16,
    /// Next avail index the driver will publish.
    pub avail_idx: u16,
    /// Next used index the driver will consume.
    pub last_used: u16,
    free: Vec<u16>,
    in_flight: HashMap<u16, Vec<u16>>,
}

/// Interrupts that go nowhere, for benchmarks and tests that poll the used
/// rings (a recorder would grow without bound). Also an interrupt manager
/// handing out such groups.
pub struct NoInterrupts;

impl InterruptSourceGroup for NoInterrupts {
    fn trigger(&self, _: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn update(&self, _: u16, _: MsiMessage, _: bool) -> std::io::Result<()> {
        Ok(())
    }
}

impl InterruptManager for NoInterrupts {
    fn create_group(&self, _: Bdf, _: u16) -> std::io::Result<Arc<dyn InterruptSourceGroup>> {
        Ok(Arc::new(NoInterrupts))
    }
}

/// The guest driver.
pub struct TestDriver {
    mem: GuestMemoryMmap,
    irqs: Arc<RecordingInterrupts>,
    bar0: u64,
    caps: Option<VirtioCaps>,
    queues: HashMap<u16, DriverQueue>,
    alloc_next: u64,
    alloc_end: u64,
    features: u64,
}

impl TestDriver {
    /// A driver with `mem_size` bytes of guest memory at address 0.
    pub fn new(mem_size: usize) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)])
            .expect("test driver: failed to allocate guest memory");
        TestDriver {
            mem,
            irqs: RecordingInterrupts::new(),
            bar0: 0,
            caps: None,
            queues: HashMap::new(),
            alloc_next: ALLOC_START,
            alloc_end: mem_size as u64,
            features: 0,
        }
    }

    /// The driver's guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// A `GuestMemoryAtomic` over the same regions (and dirty bitmaps), to
    /// give to a device.
    pub fn mem_atomic(&self) -> GuestMemoryAtomic<GuestMemoryMmap> {
        GuestMemoryAtomic::new(self.mem.clone())
    }

    /// The same memory as a device without an IOMMU reaches it by DMA, to
    /// give to a transport.
    pub fn dma_atomic(&self) -> GuestMemoryAtomic<DmaMemory> {
        GuestMemoryAtomic::new(DmaMemory::direct(self.mem.clone()))
    }

    /// The interrupt recorder, to give to a device.
    pub fn irqs(&self) -> Arc<RecordingInterrupts> {
        Arc::clone(&self.irqs)
    }

    /// The interrupt recorder as an `InterruptSourceGroup`.
    pub fn interrupt_group(&self) -> Arc<dyn InterruptSourceGroup> {
        self.irqs.clone()
    }

    /// The capabilities found by [`Self::probe`].
    pub fn caps(&self) -> Option<&VirtioCaps> {
        self.caps.as_ref()
    }

    /// BAR0's address as placed by [`Self::probe`].
    pub fn bar0(&self) -> u64 {
        self.bar0
    }

    /// Features negotiated by [`Self::negotiate`].
    pub fn features(&self) -> u64 {
        self.features
    }

    /// A queue set up by this driver.
    pub fn queue(&self, index: u16) -> Option<&DriverQueue> {
        self.queues.get(&index)
    }

    // ---- guest memory ----------------------------------------------------

    /// Allocates `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64> {
        let align = align.max(1);
        let start = self.alloc_next.div_ceil(align) * align;
        let end = start.checked_add(len).ok_or(DriverError::OutOfMemory)?;
        if end > self.alloc_end {
            return Err(DriverError::OutOfMemory);
        }
        self.alloc_next = end;
        Ok(start)
    }

    /// A second driver over the same guest memory, for another function
    /// (a PF and its VFs each have their own driver): `bytes` of this
    /// driver's free memory become the new driver's allocation window.
    pub fn split(&mut self, bytes: u64) -> Result<TestDriver> {
        let start = self.alloc_pages(bytes.div_ceil(PAGE_SIZE))?;
        Ok(TestDriver {
            mem: self.mem.clone(),
            irqs: RecordingInterrupts::new(),
            bar0: 0,
            caps: None,
            queues: HashMap::new(),
            alloc_next: start,
            alloc_end: start + bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE,
            features: 0,
        })
    }

    /// Allocates whole pages.
    pub fn alloc_pages(&mut self, pages: u64) -> Result<u64> {
        self.alloc(pages * PAGE_SIZE, PAGE_SIZE)
    }

    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| DriverError::Memory(addr))
    }

    pub fn read_mem(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .map_err(|_| DriverError::Memory(addr))?;
        Ok(v)
    }

    fn write_u16(&self, addr: u64, v: u16) -> Result<()> {
        self.write_mem(addr, &v.to_le_bytes())
    }

    fn read_u16(&self, addr: u64) -> Result<u16> {
        let b = self.read_mem(addr, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn read_u32(&self, addr: u64) -> Result<u32> {
        let b = self.read_mem(addr, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Clears the dirty bitmap of every region.
    pub fn clear_dirty(&self) {
        for r in self.mem.iter() {
            let mapping: &vm_memory::MmapRegion<vm_migration::DirtyBitmap> = r;
            mapping.bitmap().reset();
        }
    }

    /// Guest addresses of the dirty 4 KiB pages, ascending.
    pub fn dirty_pages(&self) -> Vec<u64> {
        use vm_memory::bitmap::Bitmap;
        let mut out = Vec::new();
        for r in self.mem.iter() {
            let len = r.len();
            let mut off = 0u64;
            while off < len {
                if r.bitmap().dirty_at(off as usize) {
                    out.push(r.start_addr().0 + off);
                }
                off += PAGE_SIZE;
            }
        }
        out
    }

    // ---- configuration space --------------------------------------------

    pub fn cfg_read(dev: &mut dyn PciDevice, offset: u16, len: usize) -> u32 {
        let mut b = [0u8; 4];
        let n = len.min(4);
        dev.config_read(offset, &mut b[..n]);
        u32::from_le_bytes(b)
    }

    pub fn cfg_read8(dev: &mut dyn PciDevice, offset: u16) -> u8 {
        Self::cfg_read(dev, offset, 1) as u8
    }

    pub fn cfg_read16(dev: &mut dyn PciDevice, offset: u16) -> u16 {
        Self::cfg_read(dev, offset, 2) as u16
    }

    pub fn cfg_read32(dev: &mut dyn PciDevice, offset: u16) -> u32 {
        Self::cfg_read(dev, offset, 4)
    }

    pub fn cfg_write8(dev: &mut dyn PciDevice, offset: u16, v: u8) {
        dev.config_write(offset, &[v]);
    }

    pub fn cfg_write16(dev: &mut dyn PciDevice, offset: u16, v: u16) {
        dev.config_write(offset, &v.to_le_bytes());
    }

    pub fn cfg_write32(dev: &mut dyn PciDevice, offset: u16, v: u32) {
        dev.config_write(offset, &v.to_le_bytes());
    }

    /// Sizes BAR0 the way firmware does (write all-ones, read back) and
    /// restores it. Returns (size, is 64-bit).
    pub fn size_bar0(dev: &mut dyn PciDevice) -> Result<u64> {
        let lo = Self::cfg_read32(dev, 0x10);
        let hi = Self::cfg_read32(dev, 0x14);
        if lo & 0x1 != 0 || (lo >> 1) & 0x3 != 0x2 {
            return Err(DriverError::Bar0Kind(lo));
        }
        Self::cfg_write32(dev, 0x10, 0xffff_ffff);
        Self::cfg_write32(dev, 0x14, 0xffff_ffff);
        let mlo = Self::cfg_read32(dev, 0x10) & !0xf;
        let mhi = Self::cfg_read32(dev, 0x14);
        Self::cfg_write32(dev, 0x10, lo);
        Self::cfg_write32(dev, 0x14, hi);
        let mask = u64::from(mlo) | (u64::from(mhi) << 32);
        Ok((!mask).wrapping_add(1))
    }

    /// Walks the capability list: `(id, offset)` in order.
    pub fn capabilities(dev: &mut dyn PciDevice) -> Vec<(u8, u16)> {
        let mut out = Vec::new();
        if Self::cfg_read16(dev, 0x06) & (1 << 4) == 0 {
            return out;
        }
        let mut off = u16::from(Self::cfg_read8(dev, 0x34) & !3);
        while off >= 0x40 && out.len() < 48 {
            out.push((Self::cfg_read8(dev, off), off));
            off = u16::from(Self::cfg_read8(dev, off + 1) & !3);
        }
        out
    }

    /// Reads the virtio, MSI-X and PCIe capabilities.
    pub fn read_caps(dev: &mut dyn PciDevice) -> Result<VirtioCaps> {
        let mut common = None;
        let mut notify = None;
        let mut mult = 0;
        let mut isr = None;
        let mut device = None;
        let mut pci_cfg = None;
        let mut msix = None;
        let mut pcie = None;
        for (id, off) in Self::capabilities(dev) {
            match id {
                0x11 => msix = Some(off),
                0x10 => pcie = Some(off),
                PCI_CAP_ID_VNDR => {
                    let region = CapRegion {
                        cap_offset: off,
                        bar: Self::cfg_read8(dev, off + CAP_BAR),
                        offset: Self::cfg_read32(dev, off + CAP_OFFSET),
                        length: Self::cfg_read32(dev, off + CAP_LENGTH),
                    };
                    match Self::cfg_read8(dev, off + CAP_CFG_TYPE) {
                        VIRTIO_PCI_CAP_COMMON_CFG if common.is_none() => common = Some(region),
                        VIRTIO_PCI_CAP_NOTIFY_CFG if notify.is_none() => {
                            notify = Some(region);
                            mult = Self::cfg_read32(dev, off + CAP_NOTIFY_OFF_MULTIPLIER);
                        }
                        VIRTIO_PCI_CAP_ISR_CFG if isr.is_none() => isr = Some(region),
                        VIRTIO_PCI_CAP_DEVICE_CFG if device.is_none() => device = Some(region),
                        VIRTIO_PCI_CAP_PCI_CFG if pci_cfg.is_none() => pci_cfg = Some(off),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        Ok(VirtioCaps {
            common: common.ok_or(DriverError::MissingCapability("common"))?,
            notify: notify.ok_or(DriverError::MissingCapability("notify"))?,
            notify_off_multiplier: mult,
            isr: isr.ok_or(DriverError::MissingCapability("ISR"))?,
            device: device.ok_or(DriverError::MissingCapability("device"))?,
            pci_cfg,
            msix,
            pcie,
        })
    }

    /// Probes a physical function: sizes BAR0, places it at `bar0`,
    /// enables memory decoding and bus mastering, reads the capabilities.
    pub fn probe(&mut self, dev: &mut dyn PciDevice, bar0: u64) -> Result<VirtioCaps> {
        Self::size_bar0(dev)?;
        Self::cfg_write32(dev, 0x10, bar0 as u32);
        Self::cfg_write32(dev, 0x14, (bar0 >> 32) as u32);
        let cmd = Self::cfg_read16(dev, 0x04);
        Self::cfg_write16(dev, 0x04, cmd | 0x2 | 0x4);
        self.bar0 = bar0;
        self.probe_caps(dev)
    }

    /// Reads the capabilities of a function whose BAR0 is already placed
    /// at `bar0` (a VF), and enables bus mastering.
    pub fn probe_placed(&mut self, dev: &mut dyn PciDevice, bar0: u64) -> Result<VirtioCaps> {
        let cmd = Self::cfg_read16(dev, 0x04);
        Self::cfg_write16(dev, 0x04, cmd | 0x2 | 0x4);
        self.bar0 = bar0;
        self.probe_caps(dev)
    }

    fn probe_caps(&mut self, dev: &mut dyn PciDevice) -> Result<VirtioCaps> {
        let caps = Self::read_caps(dev)?;
        self.caps = Some(caps);
        Ok(caps)
    }

    // ---- BAR accesses --------------------------------------------------------

    fn caps_or_err(&self) -> Result<VirtioCaps> {
        self.caps.ok_or(DriverError::MissingCapability("common"))
    }

    /// Reads `len` (1, 2, 4, 8) bytes at `offset` of the region `r`.
    pub fn region_read(dev: &mut dyn PciDevice, r: &CapRegion, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        let n = len.min(8);
        dev.bar_read(r.bar, u64::from(r.offset) + offset, &mut b[..n]);
        u64::from_le_bytes(b)
    }

    /// Writes `len` bytes of `v` at `offset` of the region `r`.
    pub fn region_write(dev: &mut dyn PciDevice, r: &CapRegion, offset: u64, len: usize, v: u64) {
        let b = v.to_le_bytes();
        dev.bar_write(r.bar, u64::from(r.offset) + offset, &b[..len.min(8)]);
    }

    /// Reads a common configuration field.
    pub fn common_read(&self, dev: &mut dyn PciDevice, offset: u64, len: usize) -> u64 {
        match self.caps {
            Some(c) => Self::region_read(dev, &c.common, offset, len),
            None => u64::MAX,
        }
    }

    /// Writes a common configuration field.
    pub fn common_write(&self, dev: &mut dyn PciDevice, offset: u64, len: usize, v: u64) {
        if let Some(c) = self.caps {
            Self::region_write(dev, &c.common, offset, len, v);
        }
    }

    /// The whole common configuration as read through the BAR.
    pub fn read_common_cfg(&self, dev: &mut dyn PciDevice) -> CommonCfg {
        let mut b = [0u8; COMMON_CFG_LEN];
        for (i, chunk) in b.chunks_mut(4).enumerate() {
            let v = self.common_read(dev, (i * 4) as u64, 4) as u32;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        CommonCfg::from_bytes(&b)
    }

    pub fn status(&self, dev: &mut dyn PciDevice) -> u8 {
        self.common_read(dev, co::DEVICE_STATUS, 1) as u8
    }

    pub fn set_status(&self, dev: &mut dyn PciDevice, status: u8) {
        self.common_write(dev, co::DEVICE_STATUS, 1, u64::from(status));
    }

    /// Reads the ISR byte (which clears it).
    pub fn read_isr(&self, dev: &mut dyn PciDevice) -> u8 {
        match self.caps {
            Some(c) => Self::region_read(dev, &c.isr, 0, 1) as u8,
            None => 0xff,
        }
    }

    /// Reads device configuration.
    pub fn device_cfg_read(&self, dev: &mut dyn PciDevice, offset: u64, len: usize) -> u64 {
        match self.caps {
            Some(c) => Self::region_read(dev, &c.device, offset, len),
            None => u64::MAX,
        }
    }

    // ---- initialisation ------------------------------------------------------

    /// Resets the device: writes 0 and checks the status reads 0.
    pub fn reset(&mut self, dev: &mut dyn PciDevice) -> Result<()> {
        self.set_status(dev, 0);
        let s = self.status(dev);
        self.queues.clear();
        self.features = 0;
        if s != 0 {
            return Err(DriverError::ResetIncomplete(s));
        }
        Ok(())
    }

    /// Linux's order: reset, ACKNOWLEDGE, DRIVER, read the device features,
    /// write the accepted ones (`device & wanted`), FEATURES_OK, check it
    /// stuck. Returns the negotiated features.
    pub fn negotiate(&mut self, dev: &mut dyn PciDevice, wanted: u64) -> Result<u64> {
        self.reset(dev)?;
        self.set_status(dev, STATUS_ACKNOWLEDGE);
        self.set_status(dev, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let offered = self.device_features(dev);
        let accepted = offered & wanted;
        self.write_driver_features(dev, accepted);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.set_status(dev, s);
        let got = self.status(dev);
        if got & STATUS_FEATURES_OK == 0 {
            return Err(DriverError::FeaturesRefused(got));
        }
        self.features = accepted;
        Ok(accepted)
    }

    /// The device's 64 feature bits.
    pub fn device_features(&self, dev: &mut dyn PciDevice) -> u64 {
        self.common_write(dev, co::DEVICE_FEATURE_SELECT, 4, 0);
        let lo = self.common_read(dev, co::DEVICE_FEATURE, 4);
        self.common_write(dev, co::DEVICE_FEATURE_SELECT, 4, 1);
        let hi = self.common_read(dev, co::DEVICE_FEATURE, 4);
        (lo & 0xffff_ffff) | ((hi & 0xffff_ffff) << 32)
    }

    /// Writes both driver feature words.
    pub fn write_driver_features(&self, dev: &mut dyn PciDevice, features: u64) {
        self.common_write(dev, co::DRIVER_FEATURE_SELECT, 4, 0);
        self.common_write(dev, co::DRIVER_FEATURE, 4, features & 0xffff_ffff);
        self.common_write(dev, co::DRIVER_FEATURE_SELECT, 4, 1);
        self.common_write(dev, co::DRIVER_FEATURE, 4, features >> 32);
    }

    /// Programs MSI-X entries `0..vectors` (address [`MSI_ADDRESS`], data =
    /// vector number, unmasked) and sets MSI-X Enable with the function
    /// unmasked.
    pub fn enable_msix(&mut self, dev: &mut dyn PciDevice, vectors: u16) -> Result<()> {
        let caps = self.caps_or_err()?;
        let cap = caps.msix.ok_or(DriverError::MissingCapability("MSI-X"))?;
        let table = Self::cfg_read32(dev, cap + 4);
        let bir = (table & 0x7) as u8;
        let off = u64::from(table & !0x7);
        for v in 0..vectors {
            let e = off + u64::from(v) * 16;
            dev.bar_write(bir, e, &(MSI_ADDRESS as u32).to_le_bytes());
            dev.bar_write(bir, e + 4, &((MSI_ADDRESS >> 32) as u32).to_le_bytes());
            dev.bar_write(bir, e + 8, &u32::from(v).to_le_bytes());
            dev.bar_write(bir, e + 12, &0u32.to_le_bytes());
        }
        let mc = Self::cfg_read16(dev, cap + 2);
        Self::cfg_write16(dev, cap + 2, (mc | 0x8000) & !0x4000);
        Ok(())
    }

    /// Sets or clears the mask bit of MSI-X entry `vector`.
    pub fn mask_vector(&self, dev: &mut dyn PciDevice, vector: u16, masked: bool) -> Result<()> {
        let caps = self.caps_or_err()?;
        let cap = caps.msix.ok_or(DriverError::MissingCapability("MSI-X"))?;
        let table = Self::cfg_read32(dev, cap + 4);
        let e = u64::from(table & !0x7) + u64::from(vector) * 16;
        dev.bar_write((table & 7) as u8, e + 12, &u32::from(masked).to_le_bytes());
        Ok(())
    }

    /// Whether MSI-X vector `vector`'s pending bit is set.
    pub fn vector_pending(&self, dev: &mut dyn PciDevice, vector: u16) -> Result<bool> {
        let caps = self.caps_or_err()?;
        let cap = caps.msix.ok_or(DriverError::MissingCapability("MSI-X"))?;
        let pba = Self::cfg_read32(dev, cap + 8);
        let off = u64::from(pba & !0x7) + u64::from(vector / 64) * 8;
        let mut b = [0u8; 8];
        dev.bar_read((pba & 7) as u8, off, &mut b);
        Ok(u64::from_le_bytes(b) & (1u64 << (vector % 64)) != 0)
    }

    /// Sets `config_msix_vector`; returns what the device reads back.
    pub fn set_config_vector(&self, dev: &mut dyn PciDevice, vector: u16) -> u16 {
        self.common_write(dev, co::CONFIG_MSIX_VECTOR, 2, u64::from(vector));
        self.common_read(dev, co::CONFIG_MSIX_VECTOR, 2) as u16
    }

    /// Sets up queue `index` like Linux's `setup_vq`: select, read the
    /// maximum size, write `size` (or keep the maximum), write the vector
    /// and check it, place the rings (each on its own page), read
    /// `queue_notify_off`, enable.
    pub fn setup_queue(
        &mut self,
        dev: &mut dyn PciDevice,
        index: u16,
        size: Option<u16>,
        vector: u16,
    ) -> Result<()> {
        self.common_write(dev, co::QUEUE_SELECT, 2, u64::from(index));
        let max = self.common_read(dev, co::QUEUE_SIZE, 2) as u16;
        if max == 0 {
            return Err(DriverError::NoSuchQueue(index));
        }
        let size = size.unwrap_or(max);
        if size == 0 || size > max || !size.is_power_of_two() {
            return Err(DriverError::QueueSize { index, size, max });
        }
        self.common_write(dev, co::QUEUE_SIZE, 2, u64::from(size));
        self.common_write(dev, co::QUEUE_MSIX_VECTOR, 2, u64::from(vector));
        let got = self.common_read(dev, co::QUEUE_MSIX_VECTOR, 2) as u16;
        if got != vector {
            return Err(DriverError::VectorRefused { index, vector });
        }
        let desc_pages = (u64::from(size) * 16).div_ceil(PAGE_SIZE);
        let avail_pages = (6 + 2 * u64::from(size)).div_ceil(PAGE_SIZE);
        let used_pages = (6 + 8 * u64::from(size)).div_ceil(PAGE_SIZE);
        let desc = self.alloc_pages(desc_pages)?;
        let avail = self.alloc_pages(avail_pages)?;
        let used = self.alloc_pages(used_pages)?;
        self.write_mem(desc, &vec![0u8; (desc_pages * PAGE_SIZE) as usize])?;
        self.write_mem(avail, &vec![0u8; (avail_pages * PAGE_SIZE) as usize])?;
        self.write_mem(used, &vec![0u8; (used_pages * PAGE_SIZE) as usize])?;
        for (field, addr) in [
            (co::QUEUE_DESC, desc),
            (co::QUEUE_DRIVER, avail),
            (co::QUEUE_DEVICE, used),
        ] {
            self.common_write(dev, field, 4, addr & 0xffff_ffff);
            self.common_write(dev, field + 4, 4, addr >> 32);
        }
        let notify_off = self.common_read(dev, co::QUEUE_NOTIFY_OFF, 2) as u16;
        self.common_write(dev, co::QUEUE_ENABLE, 2, 1);
        self.queues.insert(
            index,
            DriverQueue {
                index,
                size,
                desc,
                avail,
                used,
                notify_off,
                msix_vector: vector,
                avail_idx: 0,
                last_used: 0,
                free: (0..size).rev().collect(),
                in_flight: HashMap::new(),
            },
        );
        Ok(())
    }

    /// Sets DRIVER_OK.
    pub fn driver_ok(&self, dev: &mut dyn PciDevice) {
        let s = self.status(dev);
        self.set_status(dev, s | STATUS_DRIVER_OK);
    }

    /// The whole bring-up of a probed function: negotiate `wanted`, enable
    /// MSI-X with one vector per queue plus the config vector (config on
    /// vector 0, queue n on vector n + 1), set up `queues` queues at their
    /// maximum size, DRIVER_OK. Returns the negotiated features.
    pub fn bring_up(&mut self, dev: &mut dyn PciDevice, wanted: u64, queues: u16) -> Result<u64> {
        let f = self.negotiate(dev, wanted)?;
        self.enable_msix(dev, queues + 1)?;
        self.set_config_vector(dev, 0);
        for q in 0..queues {
            self.setup_queue(dev, q, None, q + 1)?;
        }
        self.driver_ok(dev);
        Ok(f)
    }

    // ---- chains --------------------------------------------------------------

    fn place_segment(&mut self, seg: &Seg) -> Result<(u64, u32, bool)> {
        Ok(match seg {
            Seg::Readable(data) => {
                let a = self.alloc(data.len().max(1) as u64, 8)?;
                self.write_mem(a, data)?;
                (a, data.len() as u32, false)
            }
            Seg::Writable(len) => {
                let a = self.alloc(u64::from(*len).max(1), 8)?;
                self.write_mem(a, &vec![0xaa; *len as usize])?;
                (a, *len, true)
            }
            Seg::ReadableAt(a, data) => {
                self.write_mem(*a, data)?;
                (*a, data.len() as u32, false)
            }
            Seg::WritableAt(a, len) => (*a, *len, true),
        })
    }

    fn write_desc(
        &self,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write_mem(table + u64::from(i) * 16, &d)
    }

    /// Builds a chain of `segs` on queue `index` and publishes it in the
    /// available ring (without notifying). Segments may be readable and
    /// writable in any order and split.
    pub fn submit(&mut self, index: u16, segs: &[Seg], layout: Layout) -> Result<Submitted> {
        if segs.is_empty() {
            return Err(DriverError::EmptyChain);
        }
        let need = match layout {
            Layout::Direct => segs.len(),
            Layout::Indirect => 1,
        };
        {
            let q = self
                .queues
                .get(&index)
                .ok_or(DriverError::QueueNotSetUp(index))?;
            if q.free.len() < need {
                return Err(DriverError::QueueFull {
                    index,
                    free: q.free.len(),
                    need,
                });
            }
        }
        let mut placed = Vec::with_capacity(segs.len());
        for s in segs {
            placed.push(self.place_segment(s)?);
        }
        let indirect_table = match layout {
            Layout::Indirect => Some(self.alloc(segs.len() as u64 * 16, 16)?),
            Layout::Direct => None,
        };
        let q = self
            .queues
            .get_mut(&index)
            .ok_or(DriverError::QueueNotSetUp(index))?;
        let descs: Vec<u16> = (0..need).filter_map(|_| q.free.pop()).collect();
        let (desc_table, avail, size, avail_idx) = (q.desc, q.avail, q.size, q.avail_idx);
        let head = descs[0];
        q.in_flight.insert(head, descs.clone());
        q.avail_idx = q.avail_idx.wrapping_add(1);

        match indirect_table {
            None => {
                for (k, (&(a, l, w), &d)) in placed.iter().zip(&descs).enumerate() {
                    let last = k + 1 == placed.len();
                    let mut flags = if w { VIRTQ_DESC_F_WRITE } else { 0 };
                    let next = if last { 0 } else { descs[k + 1] };
                    if !last {
                        flags |= VIRTQ_DESC_F_NEXT;
                    }
                    self.write_desc(desc_table, d, a, l, flags, next)?;
                }
            }
            Some(t) => {
                for (k, &(a, l, w)) in placed.iter().enumerate() {
                    let last = k + 1 == placed.len();
                    let mut flags = if w { VIRTQ_DESC_F_WRITE } else { 0 };
                    if !last {
                        flags |= VIRTQ_DESC_F_NEXT;
                    }
                    let next = if last { 0 } else { k as u16 + 1 };
                    self.write_desc(t, k as u16, a, l, flags, next)?;
                }
                self.write_desc(
                    desc_table,
                    head,
                    t,
                    segs.len() as u32 * 16,
                    VIRTQ_DESC_F_INDIRECT,
                    0,
                )?;
            }
        }
        // avail ring: flags(2) idx(2) ring[size](2 each) used_event(2)
        let slot = avail + 4 + u64::from(avail_idx % size) * 2;
        self.write_u16(slot, head)?;
        self.write_u16(avail + 2, avail_idx.wrapping_add(1))?;
        Ok(Submitted {
            head,
            segments: placed,
        })
    }

    /// Sets or clears `VIRTQ_AVAIL_F_NO_INTERRUPT` on queue `index`.
    pub fn set_no_interrupt(&self, index: u16, on: bool) -> Result<()> {
        let q = self
            .queues
            .get(&index)
            .ok_or(DriverError::QueueNotSetUp(index))?;
        self.write_u16(q.avail, if on { VIRTQ_AVAIL_F_NO_INTERRUPT } else { 0 })
    }

    /// Rings queue `index`'s doorbell: the MMIO write of the queue index at
    /// its notify address, then [`PciDevice::doorbell`] as the VMM's device
    /// thread calls it when the eventfd fires. With EVENT_IDX the driver
    /// first asks for an interrupt at the next used entry.
    pub fn kick(&mut self, dev: &mut dyn PciDevice, index: u16) -> Result<()> {
        let caps = self.caps_or_err()?;
        let q = self
            .queues
            .get(&index)
            .ok_or(DriverError::QueueNotSetUp(index))?;
        if self.features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0 {
            let used_event = q.avail + 4 + u64::from(q.size) * 2;
            self.write_u16(used_event, q.last_used)?;
        }
        let off = u64::from(q.notify_off) * u64::from(caps.notify_off_multiplier);
        Self::region_write(dev, &caps.notify, off, 2, u64::from(index));
        dev.doorbell(index);
        // A device with an I/O worker completes later: wait for it, as the
        // VMM's device thread would deliver the completions.
        dev.drain();
        Ok(())
    }

    /// The device's used index of queue `index`.
    pub fn used_idx(&self, index: u16) -> Result<u16> {
        let q = self
            .queues
            .get(&index)
            .ok_or(DriverError::QueueNotSetUp(index))?;
        self.read_u16(q.used + 2)
    }

    /// Takes the next used element of queue `index`, if any, and frees its
    /// descriptors.
    pub fn pop_used(&mut self, index: u16) -> Result<Option<UsedElem>> {
        let used_idx = self.used_idx(index)?;
        let q = self
            .queues
            .get(&index)
            .ok_or(DriverError::QueueNotSetUp(index))?;
        if used_idx == q.last_used {
            return Ok(None);
        }
        let e = q.used + 4 + u64::from(q.last_used % q.size) * 8;
        let id = self.read_u32(e)?;
        let len = self.read_u32(e + 4)?;
        let q = self
            .queues
            .get_mut(&index)
            .ok_or(DriverError::QueueNotSetUp(index))?;
        q.last_used = q.last_used.wrapping_add(1);
        if let Some(descs) = q.in_flight.remove(&(id as u16)) {
            q.free.extend(descs);
        }
        Ok(Some(UsedElem { id: id as u16, len }))
    }

    /// Polls queue `index` for a used element up to `polls` times, ringing
    /// the doorbell before each poll after the first (the device runs only
    /// when called, so "waiting" is re-notifying).
    pub fn wait_used(
        &mut self,
        dev: &mut dyn PciDevice,
        index: u16,
        polls: usize,
    ) -> Result<Option<UsedElem>> {
        for i in 0..polls.max(1) {
            if i > 0 {
                dev.doorbell(index);
                dev.drain();
            }
            if let Some(e) = self.pop_used(index)? {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }

    /// Submits `segs`, kicks, and returns the used element.
    pub fn request(
        &mut self,
        dev: &mut dyn PciDevice,
        index: u16,
        segs: &[Seg],
        layout: Layout,
    ) -> Result<(Submitted, Option<UsedElem>)> {
        let s = self.submit(index, segs, layout)?;
        self.kick(dev, index)?;
        let u = self.wait_used(dev, index, 1)?;
        Ok((s, u))
    }
}
