//! The virtio-iommu device (virtio 1.4 §5.13): translates the DMA of the
//! functions placed behind it (`iommu=on`), so that a guest can give a
//! function, a VF above all, to a userspace driver or a nested VM through
//! VFIO.
//!
//! * [`tables`] holds the state the requests change and the translation
//!   every DMA access of a managed endpoint goes through.
//! * [`IommuShared`] is that state shared between the device (the request
//!   queue writes it) and the endpoints' translators ([`Endpoint`], which a
//!   device's [`DmaMemory`] calls from whatever thread runs its I/O). A
//!   refused access is queued as a fault; the device writes faults into the
//!   event queue's buffers from the device thread.
//! * [`VirtioIommu`] is the device model behind the virtio-pci transport:
//!   configuration, the request queue, the event queue.
//!
//! Endpoint IDs are PCI routing IDs (bus << 8 | device << 3 | function),
//! the numbering the ACPI VIOT table gives the guest. The device manages
//! the endpoints of the ranges it is built with (each `iommu=on` function
//! and, for a PF, every VF it may create).
//!
//! The requirement IDs (`R-IOMMU-…`) tests name are in
//! `docs/virtio-iommu-contract.md`.

pub mod tables;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Permissions};
use vm_migration::dma::{MSI_WINDOW_LEN, MSI_WINDOW_START};
use vm_migration::{DmaFault, DmaIommu, DmaMemory, DmaRun, DmaTranslate};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::chain::{ChainBuffers, Segment};
use crate::device::{
    read_config_bytes, serve_queue, Completion, DeviceError, Served, VirtioDevice, QUEUE_BUDGET,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use tables::{status, Tables, DOMAIN_RANGE, INPUT_RANGE, PAGE_SIZE_MASK};

/// virtio device type of an IOMMU.
pub const VIRTIO_ID_IOMMU: u32 = 23;

/// Feature bits (§5.13.3).
pub const VIRTIO_IOMMU_F_INPUT_RANGE: u32 = 0;
pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u32 = 1;
pub const VIRTIO_IOMMU_F_MAP_UNMAP: u32 = 2;
pub const VIRTIO_IOMMU_F_BYPASS: u32 = 3;
pub const VIRTIO_IOMMU_F_PROBE: u32 = 4;
pub const VIRTIO_IOMMU_F_MMIO: u32 = 5;
pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u32 = 6;

/// Request types.
pub const T_ATTACH: u8 = 1;
pub const T_DETACH: u8 = 2;
pub const T_MAP: u8 = 3;
pub const T_UNMAP: u8 = 4;
pub const T_PROBE: u8 = 5;

/// `probe_size`: bytes of properties a PROBE request carries.
pub const PROBE_SIZE: u32 = 512;
/// `VIRTIO_IOMMU_PROBE_T_RESV_MEM`.
pub const PROBE_T_RESV_MEM: u16 = 1;
/// `VIRTIO_IOMMU_RESV_MEM_T_MSI`.
pub const RESV_MEM_T_MSI: u8 = 1;

/// Fault reasons and flags (§5.13.6.8).
pub const FAULT_R_DOMAIN: u8 = 1;
pub const FAULT_R_MAPPING: u8 = 2;
pub const FAULT_F_READ: u32 = 1 << 0;
pub const FAULT_F_WRITE: u32 = 1 << 1;
pub const FAULT_F_ADDRESS: u32 = 1 << 8;
/// Size of `struct virtio_iommu_fault`.
pub const FAULT_LEN: usize = 24;

/// Length of `struct virtio_iommu_config`.
pub const CONFIG_LEN: usize = 40;
/// Offset of the `bypass` byte in the configuration.
pub const CONFIG_BYPASS: u64 = 36;

/// Queue sizes: request queue, event queue.
const QUEUE_SIZES: [u16; 2] = [256, 64];
const REQUEST_QUEUE: u16 = 0;
const EVENT_QUEUE: u16 = 1;
/// Faults waiting for an event buffer beyond this many are dropped (and
/// counted).
const MAX_PENDING_FAULTS: usize = 64;

/// `struct virtio_iommu_fault`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(C)]
pub struct FaultRecord {
    pub reason: u8,
    pub reserved: [u8; 3],
    pub flags: u32,
    pub endpoint: u32,
    pub reserved1: u32,
    pub address: u64,
}

// SAFETY: plain integers laid out without padding (1 + 3 + 4 + 4 + 4 + 8
// bytes, each field at its natural alignment); any bit pattern is valid.
unsafe impl ByteValued for FaultRecord {}

#[derive(Debug, Default)]
struct Faults {
    pending: VecDeque<FaultRecord>,
}

/// What the device and the endpoints' translators share.
pub struct IommuShared {
    tables: RwLock<Tables>,
    /// Endpoint IDs this IOMMU manages (fixed at build).
    ranges: Vec<RangeInclusive<u32>>,
    faults: Mutex<Faults>,
    fault_event: Arc<EventFd>,
    faults_reported: AtomicU64,
    faults_dropped: AtomicU64,
}

impl std::fmt::Debug for IommuShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuShared")
            .field("ranges", &self.ranges)
            .finish()
    }
}

impl IommuShared {
    fn read(&self) -> RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether endpoint `id` is one this IOMMU manages.
    pub fn manages(&self, id: u32) -> bool {
        self.ranges.iter().any(|r| r.contains(&id))
    }

    /// A copy of the translation state.
    pub fn tables(&self) -> Tables {
        self.read().clone()
    }

    fn record_fault(&self, endpoint: u32, addr: u64, access: Permissions, fault: DmaFault) {
        let reason = match fault {
            DmaFault::Blocked => FAULT_R_DOMAIN,
            DmaFault::Unmapped | DmaFault::Denied => FAULT_R_MAPPING,
        };
        let mut flags = FAULT_F_ADDRESS;
        if access.allow(Permissions::Read) {
            flags |= FAULT_F_READ;
        }
        if access.allow(Permissions::Write) {
            flags |= FAULT_F_WRITE;
        }
        debug!("virtio-iommu: fault of endpoint {endpoint:#06x} at {addr:#x} ({fault:?})");
        let mut f = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        if f.pending.len() >= MAX_PENDING_FAULTS {
            self.faults_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        f.pending.push_back(FaultRecord {
            reason,
            flags: flags.to_le(),
            endpoint: endpoint.to_le(),
            address: addr.to_le(),
            ..Default::default()
        });
        drop(f);
        if let Err(e) = self.fault_event.write(1) {
            warn!("virtio-iommu: cannot signal a fault: {e}");
        }
    }
}

/// The translator of one endpoint.
#[derive(Debug)]
pub struct Endpoint {
    shared: Arc<IommuShared>,
    id: u32,
}

impl DmaTranslate for Endpoint {
    fn translate(&self, addr: u64, access: Permissions) -> Result<Option<DmaRun>, DmaFault> {
        self.shared.read().translate(self.id, addr, access)
    }

    fn fault(&self, addr: u64, access: Permissions, fault: DmaFault) {
        self.shared.record_fault(self.id, addr, access, fault)
    }
}

/// The IOMMU as the functions behind it see it: hands out translators.
#[derive(Clone, Debug)]
pub struct IommuHandle(Arc<IommuShared>);

impl IommuHandle {
    /// The shared state (for tests and the state dump).
    pub fn shared(&self) -> &Arc<IommuShared> {
        &self.0
    }
}

impl DmaIommu for IommuHandle {
    fn endpoint(&self, id: u32) -> Option<Arc<dyn DmaTranslate>> {
        self.0.manages(id).then(|| {
            Arc::new(Endpoint {
                shared: self.0.clone(),
                id,
            }) as Arc<dyn DmaTranslate>
        })
    }
}

/// An event queue buffer the device holds until it has a fault to report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldBuffer {
    pub head: u16,
    /// Device-writable segments `(address, length)`.
    pub writable: Vec<(u64, u32)>,
}

/// The device's own state beyond its transport (saved with the VM).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IommuState {
    pub tables: Tables,
    pub held: Vec<HeldBuffer>,
    pub pending_faults: Vec<FaultRecord>,
}

/// The virtio-iommu device model.
pub struct VirtioIommu {
    shared: Arc<IommuShared>,
    /// Its own DMA (the rings and requests): never translated.
    mem: DmaMemory,
    held: Vec<ChainBuffers>,
    acked_features: u64,
    requests: u64,
}

impl VirtioIommu {
    /// A virtio-iommu managing the endpoint IDs in `ranges`; its own queues
    /// are in `mem` (guest physical, untranslated).
    pub fn new(ranges: Vec<RangeInclusive<u32>>, mem: DmaMemory) -> std::io::Result<Self> {
        let shared = Arc::new(IommuShared {
            tables: RwLock::new(Tables::new(false)),
            ranges,
            faults: Mutex::new(Faults::default()),
            fault_event: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            faults_reported: AtomicU64::new(0),
            faults_dropped: AtomicU64::new(0),
        });
        Ok(VirtioIommu {
            shared,
            mem,
            held: Vec::new(),
            acked_features: 0,
            requests: 0,
        })
    }

    /// The handle the functions behind this IOMMU get their translators
    /// from.
    pub fn handle(&self) -> IommuHandle {
        IommuHandle(self.shared.clone())
    }

    /// The device's state beyond its transport.
    pub fn state(&self) -> IommuState {
        let faults = self.shared.faults.lock().unwrap_or_else(|e| e.into_inner());
        IommuState {
            tables: self.shared.tables(),
            held: self
                .held
                .iter()
                .map(|b| HeldBuffer {
                    head: b.head_index(),
                    writable: b.writable().iter().map(|s| (s.addr.0, s.len)).collect(),
                })
                .collect(),
            pending_faults: faults.pending.iter().copied().collect(),
        }
    }

    /// Puts back a state taken with [`VirtioIommu::state`].
    pub fn set_state(&mut self, st: &IommuState) {
        *self.shared.write() = st.tables.clone();
        self.held = st
            .held
            .iter()
            .map(|b| {
                let segs = b
                    .writable
                    .iter()
                    .map(|&(a, l)| Segment {
                        addr: vm_memory::GuestAddress(a),
                        len: l,
                    })
                    .collect();
                ChainBuffers::from_segments(b.head, Vec::new(), segs)
            })
            .collect();
        let mut f = self.shared.faults.lock().unwrap_or_else(|e| e.into_inner());
        f.pending = st.pending_faults.iter().copied().collect();
        if !f.pending.is_empty() {
            let _ = self.shared.fault_event.write(1);
        }
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&PAGE_SIZE_MASK.to_le_bytes());
        c[8..16].copy_from_slice(&INPUT_RANGE.start().to_le_bytes());
        c[16..24].copy_from_slice(&INPUT_RANGE.end().to_le_bytes());
        c[24..28].copy_from_slice(&DOMAIN_RANGE.start().to_le_bytes());
        c[28..32].copy_from_slice(&DOMAIN_RANGE.end().to_le_bytes());
        c[32..36].copy_from_slice(&PROBE_SIZE.to_le_bytes());
        c[36] = u8::from(self.shared.read().bypass);
        c
    }

    /// Serves one request chain; returns the used length (0: the request
    /// could not be parsed or its type is unknown, nothing written).
    fn request(&mut self, bufs: &ChainBuffers, mem: &DmaMemory) -> u32 {
        self.requests += 1;
        let wlen = bufs.writable_len();
        if wlen < 4 || wlen > u64::from(u32::MAX) {
            return 0;
        }
        let mut req = [0u8; 72];
        let n = match bufs.read_at(mem, 0, &mut req) {
            Ok(n) => n,
            Err(e) => {
                debug!("virtio-iommu: unreadable request: {e}");
                return 0;
            }
        };
        if n < 4 {
            return 0;
        }
        let u32_at = |o: usize| u32::from_le_bytes([req[o], req[o + 1], req[o + 2], req[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        let need = match req[0] {
            T_ATTACH | T_DETACH => 20,
            T_MAP => 36,
            T_UNMAP => 28,
            T_PROBE => 72,
            t => {
                debug!("virtio-iommu: unknown request type {t}");
                return 0;
            }
        };
        let tail_at = wlen - 4;
        let mut body_len = 0u64;
        let st = if n < need {
            status::INVAL
        } else {
            match req[0] {
                T_ATTACH => {
                    let (domain, ep, flags) = (u32_at(4), u32_at(8), u32_at(12));
                    if u32_at(16) != 0 {
                        status::INVAL
                    } else {
                        let exists = self.shared.manages(ep);
                        self.shared.write().attach(domain, ep, flags, exists)
                    }
                }
                T_DETACH => {
                    let (domain, ep) = (u32_at(4), u32_at(8));
                    let exists = self.shared.manages(ep);
                    self.shared.write().detach(domain, ep, exists)
                }
                T_MAP => self.shared.write().map(
                    u32_at(4),
                    u64_at(8),
                    u64_at(16),
                    u64_at(24),
                    u32_at(32),
                ),
                T_UNMAP => self.shared.write().unmap(u32_at(4), u64_at(8), u64_at(16)),
                _ => {
                    let ep = u32_at(4);
                    if tail_at < u64::from(PROBE_SIZE) {
                        status::INVAL
                    } else if !self.shared.manages(ep) {
                        status::NOENT
                    } else {
                        body_len = tail_at;
                        if write_probe_properties(bufs, mem, tail_at).is_err() {
                            return 0;
                        }
                        status::OK
                    }
                }
            }
        };
        // Bytes between the body and the tail (a larger buffer than the
        // request needs) read as zero; a refused PROBE writes no property.
        if req[0] != T_PROBE
            && tail_at > body_len
            && zero_fill(bufs, mem, body_len, tail_at).is_err()
        {
            return 0;
        }
        if bufs.write_at(mem, tail_at, &[st, 0, 0, 0]).is_err() {
            return 0;
        }
        wlen as u32
    }

    /// Writes pending faults into held event buffers; returns the
    /// completions.
    fn deliver_faults(&mut self, out: &mut Vec<Completion>) {
        let mut f = self.shared.faults.lock().unwrap_or_else(|e| e.into_inner());
        while !f.pending.is_empty() && !self.held.is_empty() {
            let buf = self.held.remove(0);
            let Some(rec) = f.pending.pop_front() else {
                break;
            };
            let len = match buf.write_at(&self.mem, 0, rec.as_slice()) {
                Ok(n) if n == FAULT_LEN => n as u32,
                Ok(_) | Err(_) => 0,
            };
            self.shared.faults_reported.fetch_add(1, Ordering::Relaxed);
            out.push(Completion {
                queue: EVENT_QUEUE,
                head: buf.head_index(),
                len,
            });
        }
    }
}

/// The PROBE properties of every endpoint: the MSI doorbell as a reserved
/// region (RESV_MEM, subtype MSI), then zeroes up to `len` bytes.
fn write_probe_properties(
    bufs: &ChainBuffers,
    mem: &DmaMemory,
    len: u64,
) -> Result<(), crate::chain::ChainError> {
    let mut prop = [0u8; 24];
    prop[0..2].copy_from_slice(&PROBE_T_RESV_MEM.to_le_bytes());
    prop[2..4].copy_from_slice(&20u16.to_le_bytes());
    prop[4] = RESV_MEM_T_MSI;
    prop[8..16].copy_from_slice(&MSI_WINDOW_START.to_le_bytes());
    prop[16..24].copy_from_slice(&(MSI_WINDOW_START + MSI_WINDOW_LEN - 1).to_le_bytes());
    bufs.write_at(mem, 0, &prop)?;
    zero_fill(bufs, mem, prop.len() as u64, len)
}

/// Writes zeroes to writable-stream bytes `from..to`.
fn zero_fill(
    bufs: &ChainBuffers,
    mem: &DmaMemory,
    from: u64,
    to: u64,
) -> Result<(), crate::chain::ChainError> {
    let zeros = [0u8; 4096];
    let mut at = from;
    while at < to {
        let k = (to - at).min(zeros.len() as u64) as usize;
        bufs.write_at(mem, at, &zeros[..k])?;
        at += k as u64;
    }
    Ok(())
}

impl VirtioDevice for VirtioIommu {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_IOMMU
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_IOMMU_F_INPUT_RANGE)
            | (1u64 << VIRTIO_IOMMU_F_DOMAIN_RANGE)
            | (1u64 << VIRTIO_IOMMU_F_MAP_UNMAP)
            | (1u64 << VIRTIO_IOMMU_F_PROBE)
            | (1u64 << VIRTIO_IOMMU_F_BYPASS_CONFIG)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `bypass` is writable; bits 1-7 are ignored.
        if offset == CONFIG_BYPASS && data.len() == 1 {
            self.shared.write().bypass = data[0] & 1 != 0;
        } else {
            debug!(
                "virtio-iommu: ignored write of {} bytes at config offset {offset:#x}",
                data.len()
            );
        }
    }

    fn activate(&mut self, features: u64) -> crate::device::Result<()> {
        if features & (1 << VIRTIO_IOMMU_F_MAP_UNMAP) == 0 {
            debug!("virtio-iommu: the driver did not accept MAP_UNMAP");
        }
        self.acked_features = features;
        Ok(())
    }

    fn reset(&mut self) {
        self.shared.write().reset();
        self.held.clear();
        self.shared
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .clear();
        self.acked_features = 0;
    }

    fn queue_reset(&mut self, index: u16) {
        if index == EVENT_QUEUE {
            self.held.clear();
        }
    }

    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &DmaMemory,
    ) -> crate::device::Result<Served> {
        match index {
            REQUEST_QUEUE => serve_queue(index, queue, mem, QUEUE_BUDGET, |bufs| {
                Some(self.request(&bufs, mem))
            }),
            EVENT_QUEUE => {
                let mut small = Vec::new();
                let held = &mut self.held;
                let served = serve_queue(index, queue, mem, QUEUE_BUDGET, |bufs| {
                    if bufs.writable_len() < FAULT_LEN as u64 {
                        // Too small for a fault report: given back unused.
                        small.push(bufs.head_index());
                    } else {
                        held.push(bufs);
                    }
                    None
                })?;
                for head in &small {
                    queue
                        .add_used(mem, *head, 0)
                        .map_err(|source| DeviceError::UsedRing {
                            queue: index,
                            source,
                        })?;
                }
                let pending = !self
                    .shared
                    .faults
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pending
                    .is_empty();
                if pending {
                    let _ = self.shared.fault_event.write(1);
                }
                Ok(Served {
                    used: served.used || !small.is_empty(),
                    more: served.more,
                })
            }
            _ => Err(DeviceError::NoSuchQueue(index)),
        }
    }

    fn completion_event(&self) -> Option<Arc<EventFd>> {
        Some(self.shared.fault_event.clone())
    }

    fn take_completions(&mut self, out: &mut Vec<Completion>) {
        let _ = self.shared.fault_event.read();
        self.deliver_faults(out);
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let t = self.shared.read();
        vec![
            ("requests", self.requests),
            ("domains", t.domains.len() as u64),
            ("mappings", t.mapping_count as u64),
            ("attached", t.attached.len() as u64),
            (
                "faults_reported",
                self.shared.faults_reported.load(Ordering::Relaxed),
            ),
            (
                "faults_dropped",
                self.shared.faults_dropped.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// Everything of the virtio-iommu function the VMM carries across a
/// snapshot or a migration: its transport and its translation state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IommuSnapshot {
    pub function: crate::pf::vf::FunctionSnapshot,
    pub state: IommuState,
}

/// Captures the virtio-iommu function's [`IommuSnapshot`].
pub fn snapshot(dev: &crate::transport::VirtioPciDevice<VirtioIommu>) -> IommuSnapshot {
    IommuSnapshot {
        function: crate::pf::vf::snapshot_function(dev),
        state: dev.device().state(),
    }
}

/// Restores `snap` into a freshly built virtio-iommu function of the same
/// configuration. The translators handed out before keep working: they
/// share the state that is replaced.
pub fn restore(
    dev: &mut crate::transport::VirtioPciDevice<VirtioIommu>,
    snap: &IommuSnapshot,
) -> Result<(), crate::pf::vf::RestoreError> {
    crate::pf::vf::restore_function(dev, &snap.function)?;
    dev.device_mut().set_state(&snap.state);
    Ok(())
}
