//! The virtio-pf physical function: a virtio-blk PCI Express function with
//! an admin virtqueue and the SR-IOV Extended Capability, whose VFs are
//! the members the admin commands address.
//!
//! * [`VirtioPf`] is the PF's [`PciDevice`]: a [`VirtioPciDevice`] around
//!   [`PfDevice`] (the PF's own disk plus the admin queue) with the SR-IOV
//!   capability at 0x100 (R-PCI-1, R-PCI-2, R-PCI-5). Configuration writes
//!   to the capability create the VFs on VF Enable and remove them when it
//!   clears (returned to the bus as a [`FunctionChange`], R-PCI-3), and
//!   place each VF's BAR0 at VF BAR0 + (n − 1) × 32 KiB while VF MSE is
//!   set.
//! * [`PfDevice`] is the PF's virtio device model: block requests on queue
//!   0 go to the PF's disk; the admin queue (queue 1) runs every chain
//!   through [`process_chain`] and [`AdminState::execute`] against the
//!   member table [`VfTable`].
//! * Each VF is a [`VfFunction`] (see [`super::vf`]), shared between the
//!   bus and the member table as `Arc<Mutex<VfFunction<Block>>>`.
//!
//! # Lock order
//!
//! PF mutex → VF mutex. A PF method (configuration write, admin doorbell)
//! runs with the PF's mutex held (the bus took it) and locks VFs one at a
//! time; a VF never locks the PF or another VF. Neither calls the bus.
//! The bus's decode-map rebuild holds one device mutex at a time, so it
//! cannot deadlock with a PF method holding PF then VF.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use pci::sriov::{SriovParams, SriovWriteEffect, VfEnableChange};
use pci::{
    BarRange, Bdf, Doorbell, FunctionChange, InterruptManager, PciDevice, SharedPciDevice,
    SriovCapability, SriovError, WorkEvent,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vm_migration::dirty::{WriteRecorder, DEFAULT_SUPPORTED_RANGES};
use vm_migration::{DmaIommu, DmaMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::admin::{
    opcode, qualifier, status, AdminCommand, AdminCompletion, DeferredChain, Execution,
};
use super::migration::{
    AdminState, Dialect, Member, MemberTable, MigrationError, MigrationSnapshot, Mode,
};
use super::v14::{self, V14State};
use super::vf::{
    restore_function, snapshot_function, FunctionSnapshot, RestoreError, SharedVf, VfFunction,
};
use super::{process_chain, AdminBuffers, ChainOutcome};
use crate::block::{Block, BlockConfig, BlockError, DiskBackend, DEFAULT_QUEUE_SIZE};
use crate::device::{
    Completion, DeviceError, Served, VirtioDevice, VIRTIO_F_ADMIN_VQ, VIRTIO_F_SR_IOV,
    VIRTIO_ID_BLOCK,
};
use crate::transport::{
    required_msix_vectors, FunctionKind, TransportError, VirtioPciDevice, VirtioPciOptions,
    BAR0_SIZE, VIRTIO_PCI_DEVICE_ID_BASE,
};

/// Most VFs one PF may have.
pub const MAX_TOTAL_VFS: u16 = 64;
/// Offset of the SR-IOV Extended Capability (R-PCI-2).
pub const SRIOV_CAP_OFFSET: u16 = 0x100;
/// Default admin queue size.
pub const DEFAULT_ADMIN_QUEUE_SIZE: u16 = 64;
/// Size of each VF's BAR0 (the virtio-pci transport's BAR0).
pub const VF_BAR0_SIZE: u64 = BAR0_SIZE;
/// Most admin commands run per turn of the admin queue (each may read or
/// write up to the result size of context or records): past it the queue
/// is served again after everything else.
pub(crate) const ADMIN_BUDGET: usize = 16;
/// The [`pci::WorkEvent`] index of the PF's member progress event: a member
/// finished the requests a deferred mode change waits for.
pub const MEMBER_PROGRESS_EVENT: u16 = 0xfffe;

/// Errors building a [`VirtioPf`].
#[derive(Debug, thiserror::Error)]
pub enum PfError {
    #[error("total_vfs {0} is not in 1..={MAX_TOTAL_VFS}")]
    TotalVfs(u16),
    #[error("the {total_vfs} VFs of PF {pf} (First VF Offset {offset}, Stride {stride}) do not fit on bus {bus:02x}", bus = pf.bus())]
    VfLayout {
        pf: Bdf,
        total_vfs: u16,
        offset: u16,
        stride: u16,
    },
    #[error("PF disk: {0}")]
    PfDisk(#[source] BlockError),
    #[error("backing file of VF {vf} ({path}): {source}")]
    VfDisk {
        vf: u16,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("queue size {0} is not a power of two in 2..=32768")]
    QueueSize(u16),
    #[error("MSI-X interrupts of {bdf}: {source}")]
    Interrupts {
        bdf: Bdf,
        #[source]
        source: std::io::Error,
    },
    #[error("PF transport: {0}")]
    Transport(#[from] TransportError),
    #[error("SR-IOV capability: {0}")]
    Sriov(#[from] SriovError),
    #[error("admin commands are in progress; snapshot after they complete")]
    Busy,
    #[error("restoring {what}: {source}")]
    Restore {
        what: String,
        #[source]
        source: RestoreError,
    },
    #[error("restoring the migration state of VF {vf}: {source}")]
    RestoreMember {
        vf: u16,
        #[source]
        source: MigrationError,
    },
    #[error("the snapshot has VF {0}, which the restored SR-IOV registers do not enable")]
    RestoreMissingVf(u16),
    #[error("cannot create the member progress eventfd: {0}")]
    Event(#[source] std::io::Error),
    #[error("the IOMMU does not manage {0} (its VIOT range does not cover it)")]
    NotBehindIommu(Bdf),
    #[error("SR-IOV capability landed at {0:#x}, not at 0x100 (another extended capability precedes it)")]
    SriovOffset(u16),
}

/// First VF Offset, VF Stride and the VFs' routing IDs of a PF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfLayout {
    pub first_vf_offset: u16,
    pub vf_stride: u16,
    /// Routing ID of VF n at index n − 1.
    pub vf_bdfs: Vec<Bdf>,
}

/// The VF layout of a PF at `pf` with `total_vfs` VFs: VFs on the
/// functions of the next devices, VF 1 at `bus:(DD+1).0`, stride 1, so
/// VFs 1..8 are `DD+1.0..7`, VFs 9..16 `DD+2.0..7`, and so on (64 VFs take
/// 8 devices). The VMM keeps devices `DD+1 ..= DD + ceil(total_vfs / 8)`
/// free. Fails if a VF would fall off the PF's bus.
pub fn vf_layout(pf: Bdf, total_vfs: u16) -> Result<VfLayout, PfError> {
    if total_vfs == 0 || total_vfs > MAX_TOTAL_VFS {
        return Err(PfError::TotalVfs(total_vfs));
    }
    let first_vf_offset = 8 - u16::from(pf.function());
    let vf_stride = 1;
    let bad = PfError::VfLayout {
        pf,
        total_vfs,
        offset: first_vf_offset,
        stride: vf_stride,
    };
    let mut vf_bdfs = Vec::with_capacity(usize::from(total_vfs));
    for n in 0..total_vfs {
        let rid = u32::from(pf.rid()) + u32::from(first_vf_offset) + u32::from(n * vf_stride);
        let Ok(rid) = u16::try_from(rid) else {
            return Err(bad);
        };
        let bdf = Bdf::from_rid(rid);
        if bdf.bus() != pf.bus() {
            return Err(bad);
        }
        vf_bdfs.push(bdf);
    }
    Ok(VfLayout {
        first_vf_offset,
        vf_stride,
        vf_bdfs,
    })
}

/// Backing file of VF n (1-based). Several VFs may share one file.
pub type VfDiskFn = Box<dyn Fn(u16) -> PathBuf + Send>;

/// A VF's disk as something other than a file (see
/// [`PfConfig::vf_backend`]).
pub type VfBackendFn = Box<dyn Fn(u16) -> std::io::Result<Arc<dyn DiskBackend>> + Send>;

/// What a [`VirtioPf`] is made of.
pub struct PfConfig {
    /// The PF's own disk.
    pub pf_disk: PathBuf,
    /// The backing file of each VF.
    pub vf_disk: VfDiskFn,
    /// TotalVFs = InitialVFs.
    pub total_vfs: u16,
    /// Routing ID of the PF.
    pub bdf: Bdf,
    /// First VF Offset (see [`vf_layout`]).
    pub first_vf_offset: u16,
    /// VF Stride.
    pub vf_stride: u16,
    /// PF and VF disks read-only.
    pub readonly: bool,
    /// Request queue size of the PF and the VFs.
    pub queue_size: u16,
    /// Admin queue size.
    pub admin_queue_size: u16,
    /// When set, VF n's disk is this backend instead of the file
    /// `vf_disk(n)` (for tests that need a disk that fails or stalls).
    pub vf_backend: Option<VfBackendFn>,
    /// The admin command set.
    pub dialect: Dialect,
    /// The IOMMU that translates the DMA of the PF and its VFs
    /// (`iommu=on`); `None`: they reach guest physical memory directly.
    pub iommu: Option<Arc<dyn DmaIommu>>,
}

/// The memory function `bdf` reaches by DMA over `phys`: through `iommu`'s
/// translator for its routing ID, or directly without an IOMMU.
pub fn dma_memory(
    iommu: Option<&Arc<dyn DmaIommu>>,
    bdf: Bdf,
    phys: GuestMemoryMmap,
) -> Result<DmaMemory, PfError> {
    match iommu {
        None => Ok(DmaMemory::direct(phys)),
        Some(i) => i
            .endpoint(u32::from(bdf.rid()))
            .map(|t| DmaMemory::translated(phys, t))
            .ok_or(PfError::NotBehindIommu(bdf)),
    }
}

impl PfConfig {
    /// A configuration with the layout of [`vf_layout`] and default queue
    /// sizes.
    pub fn new(
        pf_disk: impl Into<PathBuf>,
        vf_disk: VfDiskFn,
        total_vfs: u16,
        bdf: Bdf,
        readonly: bool,
    ) -> Result<Self, PfError> {
        let layout = vf_layout(bdf, total_vfs)?;
        Ok(PfConfig {
            pf_disk: pf_disk.into(),
            vf_disk,
            total_vfs,
            bdf,
            first_vf_offset: layout.first_vf_offset,
            vf_stride: layout.vf_stride,
            readonly,
            queue_size: DEFAULT_QUEUE_SIZE,
            admin_queue_size: DEFAULT_ADMIN_QUEUE_SIZE,
            vf_backend: None,
            dialect: Dialect::Draft,
            iommu: None,
        })
    }
}

impl std::fmt::Debug for PfConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PfConfig")
            .field("pf_disk", &self.pf_disk)
            .field("total_vfs", &self.total_vfs)
            .field("bdf", &self.bdf)
            .field("first_vf_offset", &self.first_vf_offset)
            .field("vf_stride", &self.vf_stride)
            .field("readonly", &self.readonly)
            .field("dialect", &self.dialect)
            .finish()
    }
}

/// The member table: VF n is `members[n - 1]` (`None` if it could not be
/// instantiated).
pub struct VfTable {
    vf_enable: bool,
    num_vfs: u16,
    members: Vec<Option<Member<SharedVf<Block>>>>,
}

impl VfTable {
    fn new() -> Self {
        VfTable {
            vf_enable: false,
            num_vfs: 0,
            members: Vec::new(),
        }
    }

    /// Member `n` (1-based).
    pub fn member(&self, n: u16) -> Option<&Member<SharedVf<Block>>> {
        self.members
            .get(usize::from(n).checked_sub(1)?)
            .and_then(Option::as_ref)
    }

    /// The instantiated members with their VF numbers.
    pub fn members(&self) -> impl Iterator<Item = (u16, &Member<SharedVf<Block>>)> {
        self.members
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.as_ref().map(|m| (i as u16 + 1, m)))
    }
}

impl MemberTable for VfTable {
    type Device = SharedVf<Block>;
    fn vf_enabled(&self) -> bool {
        self.vf_enable
    }
    fn num_vfs(&self) -> u16 {
        self.num_vfs
    }
    fn member_mut(&mut self, id: u16) -> Option<&mut Member<SharedVf<Block>>> {
        self.members
            .get_mut(usize::from(id).checked_sub(1)?)
            .and_then(Option::as_mut)
    }
}

/// The PF's virtio device model: its own virtio-blk queue plus the admin
/// queue over the member table.
pub struct PfDevice {
    block: Block,
    admin_sizes: [u16; 1],
    admin: AdminState,
    table: VfTable,
    bufs: AdminBuffers,
    deferred: Vec<DeferredChain>,
    /// Members whose deferred mode change outlived a reset of the admin
    /// queue: polled until it finishes, the completion discarded.
    orphans: Vec<u16>,
    /// The PF's BDF, as events name it.
    label: String,
}

/// Reports a member command that succeeded to the event monitor (the
/// migration flow a host operator follows).
fn report_admin(
    pf: &str,
    dialect: Dialect,
    cmd: &AdminCommand<'_>,
    table: &VfTable,
    result_len: usize,
) {
    if !event_monitor::enabled() {
        return;
    }
    let member = cmd.member_id.to_string();
    let mode_of = |m: u64| {
        u16::try_from(m)
            .ok()
            .and_then(|n| table.member(n))
            .map(|m| format!("{:?}", m.mode()))
            .unwrap_or_default()
    };
    let (event, extra): (&str, Option<(&str, String)>) = match (dialect, cmd.opcode) {
        (Dialect::V14, v14::opcode::DEV_MODE_SET) => {
            ("member-mode", Some(("mode", mode_of(cmd.member_id))))
        }
        (Dialect::V14, v14::opcode::RESOURCE_OBJ_CREATE) => (
            "parts-object-create",
            Some(("id", cmd.data_u32(4).to_string())),
        ),
        (Dialect::V14, v14::opcode::RESOURCE_OBJ_DESTROY) => (
            "parts-object-destroy",
            Some(("id", cmd.data_u32(4).to_string())),
        ),
        (Dialect::V14, v14::opcode::DEV_PARTS_GET) => {
            ("parts-get", Some(("bytes", result_len.to_string())))
        }
        (Dialect::V14, v14::opcode::DEV_PARTS_SET) => (
            "parts-set",
            Some(("bytes", cmd.data.len().saturating_sub(8).to_string())),
        ),
        (Dialect::V14, _) => return,
        (Dialect::Draft, op) => match op {
            opcode::DEV_MODE_SET => ("member-mode", Some(("mode", mode_of(cmd.member_id)))),
            opcode::DEV_CTX_READ => ("context-read", Some(("bytes", result_len.to_string()))),
            opcode::DEV_CTX_WRITE => ("context-write", Some(("bytes", cmd.data.len().to_string()))),
            opcode::DEV_CTX_DISCARD => ("context-discard", None),
            opcode::DEV_WRITE_RECORDS_START => ("write-records-start", None),
            opcode::DEV_WRITE_RECORDS_STOP => ("write-records-stop", None),
            _ => return,
        },
    };
    let mut props = vec![("pf", pf.to_string()), ("member", member)];
    props.extend(extra);
    event_monitor::event("virtio-pf", event, &props);
}

impl PfDevice {
    fn new(block: Block, admin_queue_size: u16, label: String, dialect: Dialect) -> Self {
        PfDevice {
            block,
            admin_sizes: [admin_queue_size],
            admin: AdminState::with_dialect(dialect),
            table: VfTable::new(),
            bufs: AdminBuffers::new(),
            deferred: Vec::new(),
            orphans: Vec::new(),
            label,
        }
    }

    /// The admin executor's state (list in use).
    pub fn admin(&self) -> &AdminState {
        &self.admin
    }

    /// The member table.
    pub fn table(&self) -> &VfTable {
        &self.table
    }

    /// Admin commands waiting on their member.
    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }

    /// The admin queue went away with commands still deferred: their
    /// members' mode changes must still finish.
    fn orphan_deferred(&mut self) {
        for d in self.deferred.drain(..) {
            self.orphans.push(d.member);
        }
        self.poll_orphans();
    }

    fn poll_orphans(&mut self) {
        let (admin, table) = (&mut self.admin, &mut self.table);
        self.orphans
            .retain(|&id| table.member_mut(id).is_some() && admin.poll(table, id).is_none());
    }

    /// Completes deferred commands whose member is ready (R-ADM-4): they
    /// go on the used ring in the order they become ready, whatever order
    /// they arrived in.
    fn complete_ready(&mut self, queue: &mut Queue, mem: &DmaMemory) -> Result<bool, DeviceError> {
        self.poll_orphans();
        let mut used = false;
        let mut i = 0;
        while i < self.deferred.len() {
            let id = self.deferred[i].member;
            let completion = if self.table.member_mut(id).is_none() {
                // The member vanished (VF Enable cleared) meanwhile.
                Some(AdminCompletion::err(
                    status::EINVAL,
                    qualifier::INVALID_GROUP,
                ))
            } else {
                self.admin.poll(&mut self.table, id)
            };
            match completion {
                Some(c) => {
                    let d = self.deferred.swap_remove(i);
                    let len = d.complete(mem, &c, &[]);
                    queue.add_used(mem, d.head_index, len).map_err(|source| {
                        DeviceError::UsedRing {
                            queue: self.block.queue_max_sizes().len() as u16,
                            source,
                        }
                    })?;
                    used = true;
                }
                None => i += 1,
            }
        }
        Ok(used)
    }
}

impl VirtioDevice for PfDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.block.queue_max_sizes()
    }
    fn admin_queue_max_sizes(&self) -> &[u16] {
        &self.admin_sizes
    }
    fn features(&self) -> u64 {
        self.block.features() | (1u64 << VIRTIO_F_SR_IOV) | (1u64 << VIRTIO_F_ADMIN_VQ)
    }
    fn config_len(&self) -> usize {
        self.block.config_len()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.block.read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.block.write_config(offset, data)
    }
    fn activate(&mut self, features: u64) -> crate::device::Result<()> {
        self.block.activate(features)
    }
    fn reset(&mut self) {
        // R-ADM-3: after reset only LIST_QUERY and LIST_USE are usable.
        // Members (their modes, streams, records) are not the PF's virtio
        // state and stay as they are.
        self.block.reset();
        self.admin.reset();
        self.orphan_deferred();
    }
    fn queue_reset(&mut self, index: u16) {
        if usize::from(index) == self.block.queue_max_sizes().len() {
            self.orphan_deferred();
        } else {
            self.block.queue_reset(index);
        }
    }
    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &DmaMemory,
    ) -> crate::device::Result<Served> {
        self.block.process_queue(index, queue, mem)
    }

    fn completion_event(&self) -> Option<Arc<EventFd>> {
        self.block.completion_event()
    }

    fn take_completions(&mut self, out: &mut Vec<Completion>) {
        self.block.take_completions(out)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.block.counters()
    }

    fn in_flight(&self) -> usize {
        self.block.in_flight()
    }

    fn wait_idle(&mut self) {
        self.block.wait_idle()
    }

    fn process_admin_queue(
        &mut self,
        admin_index: u16,
        queue: &mut Queue,
        mem: &DmaMemory,
    ) -> crate::device::Result<Served> {
        if admin_index != 0 {
            return Err(DeviceError::NoSuchQueue(admin_index));
        }
        let qi = self.block.queue_max_sizes().len() as u16;
        let mut served = Served {
            used: self.complete_ready(queue, mem)?,
            more: false,
        };
        let mut taken = 0usize;
        'rounds: loop {
            queue
                .disable_notification(mem)
                .map_err(|source| DeviceError::UsedRing { queue: qi, source })?;
            loop {
                if taken >= ADMIN_BUDGET {
                    served.more = true;
                    break 'rounds;
                }
                let chain = {
                    let mut iter = queue
                        .iter(mem)
                        .map_err(|source| DeviceError::AvailRing { queue: qi, source })?;
                    iter.next()
                };
                let Some(chain) = chain else { break };
                taken += 1;
                if chain.head_index() >= queue.size() {
                    // A head outside the ring: the driver's queue is broken
                    // (DEVICE_NEEDS_RESET), and the command is not run.
                    return Err(DeviceError::AvailRing {
                        queue: qi,
                        source: virtio_queue::Error::InvalidDescriptorIndex,
                    });
                }
                let admin = &mut self.admin;
                let table = &mut self.table;
                let label = &self.label;
                let outcome = process_chain(chain, &mut self.bufs, |cmd, result, cap| {
                    let e = admin.execute(table, cmd, result, cap);
                    if matches!(&e, Execution::Done(c) if c.status == status::OK) {
                        report_admin(label, admin.dialect(), cmd, table, result.len());
                    }
                    e
                });
                match outcome {
                    ChainOutcome::Complete {
                        head_index,
                        used_len,
                    } => {
                        queue
                            .add_used(mem, head_index, used_len)
                            .map_err(|source| DeviceError::UsedRing { queue: qi, source })?;
                        served.used = true;
                    }
                    ChainOutcome::Deferred(d) => {
                        debug!("virtio-pf: admin command of member {} deferred", d.member);
                        self.deferred.push(d);
                    }
                }
            }
            let more = queue
                .enable_notification(mem)
                .map_err(|source| DeviceError::UsedRing { queue: qi, source })?;
            if !more {
                break;
            }
        }
        served.used |= self.complete_ready(queue, mem)?;
        Ok(served)
    }
}

/// Everything of a PF and its VFs the VMM carries across a snapshot or a
/// migration of the VM that owns them (spec §6).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PfSnapshot {
    /// The PF's function (its configuration space holds the SR-IOV
    /// registers: VF Enable, NumVFs, VF MSE, VF BAR0).
    pub pf: FunctionSnapshot,
    /// The admin commands in use (LIST_USE), draft dialect.
    pub admin_in_use: u64,
    /// Lists in use, driver capability and device parts objects, virtio
    /// 1.4 dialect.
    pub v14: V14State,
    /// Every existing VF.
    pub vfs: Vec<VfSnapshot>,
}

/// One VF in a [`PfSnapshot`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VfSnapshot {
    /// VF number (1-based).
    pub number: u16,
    /// Its function.
    pub function: FunctionSnapshot,
    /// Device-owned heads adopted from a written context, per queue.
    pub adopted: Vec<Vec<u16>>,
    /// Mode, context streams, write-record ranges and unread records.
    pub migration: MigrationSnapshot,
}

/// The virtio-pf PF as a PCI function.
pub struct VirtioPf {
    dev: VirtioPciDevice<PfDevice>,
    sriov: SriovCapability,
    bdf: Bdf,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    iommu: Option<Arc<dyn DmaIommu>>,
    interrupts: Arc<dyn InterruptManager>,
    vf_disk: VfDiskFn,
    vf_backend: Option<VfBackendFn>,
    readonly: bool,
    queue_size: u16,
    /// Signalled by a VF that finished what a deferred admin command of
    /// its member waits for.
    progress: Arc<EventFd>,
}

impl VirtioPf {
    /// Builds the PF described by `cfg`. Its queues (and, through per-VF
    /// views, its VFs' queues) are served from `mem`; its MSI-X group and
    /// every VF's come from `interrupts` (a VF's when VF Enable creates
    /// it). Every VF backing file must exist now (it is opened when its VF
    /// is created).
    pub fn new(
        cfg: PfConfig,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupts: Arc<dyn InterruptManager>,
    ) -> Result<Arc<Mutex<VirtioPf>>, PfError> {
        Self::build(cfg, mem, interrupts).map(|pf| Arc::new(Mutex::new(pf)))
    }

    /// As [`VirtioPf::new`], unshared.
    pub fn build(
        cfg: PfConfig,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupts: Arc<dyn InterruptManager>,
    ) -> Result<VirtioPf, PfError> {
        if cfg.total_vfs == 0 || cfg.total_vfs > MAX_TOTAL_VFS {
            return Err(PfError::TotalVfs(cfg.total_vfs));
        }
        for q in [cfg.queue_size, cfg.admin_queue_size] {
            if !(2..=32768).contains(&q) || !q.is_power_of_two() {
                return Err(PfError::QueueSize(q));
            }
        }
        for n in (1..=cfg.total_vfs).filter(|_| cfg.vf_backend.is_none()) {
            let path = (cfg.vf_disk)(n);
            if let Err(source) = std::fs::metadata(&path) {
                return Err(PfError::VfDisk {
                    vf: n,
                    path,
                    source,
                });
            }
        }
        let mut bcfg = BlockConfig::new(&cfg.pf_disk);
        bcfg.read_only = cfg.readonly;
        bcfg.queue_size = cfg.queue_size;
        let block = Block::new(&bcfg).map_err(PfError::PfDisk)?;
        let pfdev = PfDevice::new(
            block,
            cfg.admin_queue_size,
            cfg.bdf.to_string(),
            cfg.dialect,
        );
        let irq = interrupts
            .create_group(cfg.bdf, required_msix_vectors(&pfdev))
            .map_err(|source| PfError::Interrupts {
                bdf: cfg.bdf,
                source,
            })?;
        let pf_mem = dma_memory(cfg.iommu.as_ref(), cfg.bdf, (*mem.memory()).clone())?;
        let mut dev = VirtioPciDevice::new(
            pfdev,
            GuestMemoryAtomic::new(pf_mem),
            irq,
            VirtioPciOptions {
                function: FunctionKind::Physical,
                flr: true,
                ring_reset: true,
                pci_cfg_cap: true,
            },
        )?;
        dev.set_label(cfg.bdf.to_string());
        let sriov = SriovCapability::add_to(
            dev.pci_config_mut(),
            SriovParams {
                initial_vfs: cfg.total_vfs,
                total_vfs: cfg.total_vfs,
                first_vf_offset: cfg.first_vf_offset,
                vf_stride: cfg.vf_stride,
                vf_device_id: VIRTIO_PCI_DEVICE_ID_BASE + VIRTIO_ID_BLOCK as u16,
                vf_bar0_size: VF_BAR0_SIZE,
                vf_bar0_prefetchable: false,
                // The PF depends on no other function: the link names the
                // PF itself. Linux compares it with the PF's whole devfn
                // (device and function) and refuses VF Enable with ENODEV
                // when they differ.
                function_dependency_link: (cfg.bdf.rid() & 0xff) as u8,
            },
        )?;
        if sriov.offset() != SRIOV_CAP_OFFSET {
            return Err(PfError::SriovOffset(sriov.offset()));
        }
        if sriov.all_vf_rids_on_pf_bus(cfg.bdf).is_none() {
            return Err(PfError::VfLayout {
                pf: cfg.bdf,
                total_vfs: cfg.total_vfs,
                offset: cfg.first_vf_offset,
                stride: cfg.vf_stride,
            });
        }
        let progress = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(PfError::Event)?);
        Ok(VirtioPf {
            dev,
            sriov,
            bdf: cfg.bdf,
            mem,
            iommu: cfg.iommu,
            interrupts,
            vf_disk: cfg.vf_disk,
            vf_backend: cfg.vf_backend,
            readonly: cfg.readonly,
            queue_size: cfg.queue_size,
            progress,
        })
    }

    /// The PF's routing ID.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The PF's virtio-pci function.
    pub fn transport(&self) -> &VirtioPciDevice<PfDevice> {
        &self.dev
    }

    /// The PF's virtio-pci function, mutably.
    pub fn transport_mut(&mut self) -> &mut VirtioPciDevice<PfDevice> {
        &mut self.dev
    }

    /// The SR-IOV capability.
    pub fn sriov(&self) -> &SriovCapability {
        &self.sriov
    }

    /// Routing IDs of all TotalVFs VFs (whether enabled or not).
    pub fn all_vf_bdfs(&self) -> Vec<Bdf> {
        (1..=self.sriov.params().total_vfs)
            .filter_map(|n| self.sriov.vf_rid(self.bdf, n))
            .collect()
    }

    /// VF `n` (1-based), if it exists now.
    pub fn vf(&self, n: u16) -> Option<Arc<Mutex<VfFunction<Block>>>> {
        self.dev
            .device()
            .table
            .member(n)
            .map(|m| Arc::clone(&m.device.0))
    }

    /// The existing VFs: (VF number, routing ID).
    pub fn vfs(&self) -> Vec<(u16, Bdf)> {
        self.dev
            .device()
            .table
            .members()
            .map(|(n, m)| (n, m.device.lock().bdf()))
            .collect()
    }

    /// Member `n`'s migration mode.
    pub fn member_mode(&self, n: u16) -> Option<Mode> {
        self.dev.device().table.member(n).map(|m| m.mode())
    }

    /// Captures the PF and every VF (spec §6). Refused while an admin
    /// command waits on its member (never the case with block members).
    /// Call with the VM paused.
    pub fn snapshot(&self) -> Result<PfSnapshot, PfError> {
        let pf = self.dev.device();
        if !pf.deferred.is_empty() || !pf.orphans.is_empty() {
            return Err(PfError::Busy);
        }
        let vfs = pf
            .table
            .members()
            .map(|(number, m)| {
                let (function, adopted) = m.device.lock().snapshot();
                VfSnapshot {
                    number,
                    function,
                    adopted,
                    migration: m.migration.snapshot(),
                }
            })
            .collect();
        Ok(PfSnapshot {
            pf: snapshot_function(&self.dev),
            admin_in_use: pf.admin.in_use(),
            v14: pf.admin.v14.clone(),
            vfs,
        })
    }

    /// Restores a [`PfSnapshot`] into a freshly built PF of the same
    /// configuration (same TotalVFs, layout and backing files; guest
    /// memory already restored). The VFs the restored SR-IOV registers
    /// enable are created and restored; the returned change lists them for
    /// the bus (and any VF this PF had before, as removed). Nothing is
    /// served and no interrupt is sent.
    pub fn restore(&mut self, snap: &PfSnapshot) -> Result<FunctionChange, PfError> {
        restore_function(&mut self.dev, &snap.pf).map_err(|source| PfError::Restore {
            what: "the PF".into(),
            source,
        })?;
        self.dev.device_mut().admin.set_in_use(snap.admin_in_use);
        self.dev.device_mut().admin.v14 = snap.v14.clone();
        let mut change = FunctionChange::default();
        let old = std::mem::take(&mut self.dev.device_mut().table.members);
        for m in old.into_iter().flatten() {
            change.removed.push(m.device.lock().bdf());
        }
        let regs = self.sriov.regs(self.dev.pci_config());
        if regs.vf_enabled() {
            let src = self.mem.memory();
            let mut members = Vec::with_capacity(usize::from(regs.num_vfs));
            for n in 1..=regs.num_vfs {
                match self.create_vf(n, &src) {
                    Some((bdf, m)) => {
                        change
                            .added
                            .push((bdf, m.device.0.clone() as SharedPciDevice));
                        members.push(Some(m));
                    }
                    None => members.push(None),
                }
            }
            self.dev.device_mut().table.members = members;
        }
        self.sync_table();
        for v in &snap.vfs {
            let table = &mut self.dev.device_mut().table;
            let m = table
                .member_mut(v.number)
                .ok_or(PfError::RestoreMissingVf(v.number))?;
            m.device
                .lock()
                .restore(&v.function, &v.adopted)
                .map_err(|source| PfError::Restore {
                    what: format!("VF {}", v.number),
                    source,
                })?;
            m.migration
                .restore(&v.migration)
                .map_err(|source| PfError::RestoreMember {
                    vf: v.number,
                    source,
                })?;
        }
        Ok(change)
    }

    /// Runs one admin command directly against the executor and the member
    /// table, as the admin queue would (for host-side tools, tests and
    /// benchmarks; the guest's commands come through the queue). Result
    /// bytes go to `result`, at most `cap` of them meaningful. VFs of this
    /// PF quiesce synchronously, so no command is ever
    /// [`Execution::Deferred`] here.
    pub fn execute_admin(
        &mut self,
        cmd: &AdminCommand<'_>,
        result: &mut Vec<u8>,
        cap: usize,
    ) -> Execution {
        let pf = self.dev.device_mut();
        pf.admin.execute(&mut pf.table, cmd, result, cap)
    }

    /// Completes admin commands that were waiting on their member and are
    /// now ready (the VMM calls it after a member made progress). Returns
    /// whether any completed.
    pub fn poll_admin(&mut self) -> bool {
        let dev = &mut self.dev;
        let qi = dev.num_device_queues();
        let mem = dev.memory().memory();
        let pf = dev.device_mut();
        pf.poll_orphans();
        if pf.deferred.is_empty() {
            return false;
        }
        let mut ready = Vec::new();
        let mut i = 0;
        while i < pf.deferred.len() {
            let id = pf.deferred[i].member;
            let completion = if pf.table.member_mut(id).is_none() {
                Some(AdminCompletion::err(
                    status::EINVAL,
                    qualifier::INVALID_GROUP,
                ))
            } else {
                pf.admin.poll(&mut pf.table, id)
            };
            match completion {
                Some(c) => {
                    if c.status == status::OK {
                        let mode = pf.table.member(id).map(|m| format!("{:?}", m.mode()));
                        event_monitor::event(
                            "virtio-pf",
                            "member-mode",
                            &[
                                ("pf", pf.label.clone()),
                                ("member", id.to_string()),
                                ("mode", mode.unwrap_or_default()),
                            ],
                        );
                    }
                    let d = pf.deferred.swap_remove(i);
                    let len = d.complete(&*mem, &c, &[]);
                    ready.push((d.head_index, len));
                }
                None => i += 1,
            }
        }
        drop(mem);
        let any = !ready.is_empty();
        for (head, len) in ready {
            if !dev.complete_chain(qi, head, len) {
                warn!("virtio-pf: deferred admin command {head} could not be completed");
            }
        }
        any
    }

    fn sync_table(&mut self) {
        let regs = self.sriov.regs(self.dev.pci_config());
        let t = &mut self.dev.device_mut().table;
        t.vf_enable = regs.vf_enabled();
        t.num_vfs = regs.num_vfs;
    }

    fn create_vf(
        &self,
        n: u16,
        view_src: &GuestMemoryMmap,
    ) -> Option<(Bdf, Member<SharedVf<Block>>)> {
        let bdf = self.sriov.vf_rid(self.bdf, n)?;
        let block = match &self.vf_backend {
            Some(f) => f(n).map_err(BlockError::Metadata).and_then(|disk| {
                Block::from_backend(disk, self.readonly, &format!("vf{n}"), self.queue_size)
            }),
            None => {
                let mut bcfg = BlockConfig::new((self.vf_disk)(n));
                bcfg.read_only = self.readonly;
                bcfg.queue_size = self.queue_size;
                Block::new(&bcfg)
            }
        };
        let block = match block {
            Ok(b) => b,
            Err(e) => {
                warn!("virtio-pf: VF {n} not created: {e}");
                return None;
            }
        };
        let irq = match self
            .interrupts
            .create_group(bdf, required_msix_vectors(&block))
        {
            Ok(g) => g,
            Err(e) => {
                warn!("virtio-pf: VF {n} not created: interrupts of {bdf}: {e}");
                return None;
            }
        };
        // Behind an IOMMU the member's DMA addresses are I/O virtual
        // addresses, and so are its write records (R-WR-3): its translated
        // memory marks them. Without one they are guest physical, marked by
        // the member's view of the regions.
        let (recorder, view) = if self.iommu.is_some() {
            (
                WriteRecorder::for_dma(DEFAULT_SUPPORTED_RANGES),
                view_src.clone(),
            )
        } else {
            let built = WriteRecorder::new(view_src, DEFAULT_SUPPORTED_RANGES)
                .and_then(|r| r.member_view(view_src).map(|v| (r, v)));
            match built {
                Ok(rv) => rv,
                Err(e) => {
                    warn!("virtio-pf: VF {n} not created: {e}");
                    return None;
                }
            }
        };
        let view = match dma_memory(self.iommu.as_ref(), bdf, view) {
            Ok(v) => match recorder.dma_records() {
                Some(r) => v.with_records(r.clone()),
                None => v,
            },
            Err(e) => {
                warn!("virtio-pf: VF {n} not created: {e}");
                return None;
            }
        };
        let mut vf = match VfFunction::new(n, bdf, block, view, irq) {
            Ok(v) => v,
            Err(e) => {
                warn!("virtio-pf: VF {n} not created: {e}");
                return None;
            }
        };
        vf.set_bar0(self.sriov.vf_bar0_address(self.dev.pci_config(), n));
        vf.set_progress_event(self.progress.clone());
        vf.set_active_after_flr(self.dev.device().admin.dialect() == Dialect::V14);
        let shared = SharedVf(Arc::new(Mutex::new(vf)));
        Some((bdf, Member::new(shared, recorder)))
    }

    fn apply_sriov(&mut self, effect: SriovWriteEffect) -> Option<FunctionChange> {
        let mut change = FunctionChange::default();
        let pf = self.bdf().to_string();
        match effect.vf_enable {
            Some(VfEnableChange::Enabled { num_vfs }) => {
                event_monitor::event(
                    "virtio-pf",
                    "vf-enable",
                    &[("pf", pf.clone()), ("num_vfs", num_vfs.to_string())],
                );
                let src = self.mem.memory();
                let mut members = Vec::with_capacity(usize::from(num_vfs));
                for n in 1..=num_vfs {
                    match self.create_vf(n, &src) {
                        Some((bdf, m)) => {
                            let handle: SharedPciDevice = m.device.0.clone();
                            change.added.push((bdf, handle));
                            members.push(Some(m));
                        }
                        None => members.push(None),
                    }
                }
                self.dev.device_mut().table.members = members;
            }
            Some(VfEnableChange::Disabled { .. }) => {
                event_monitor::event("virtio-pf", "vf-disable", &[("pf", pf.clone())]);
                self.dev.device_mut().admin.v14.forget_members_above(0);
                let members = std::mem::take(&mut self.dev.device_mut().table.members);
                for m in members.into_iter().flatten() {
                    let vf = m.device.lock();
                    change.removed.push(vf.bdf());
                }
            }
            None => {}
        }
        self.sync_table();
        if effect.vf_decode_changed() {
            let cfg = self.dev.pci_config();
            let sriov = &self.sriov;
            for (n, m) in self.dev.device().table.members() {
                m.device.lock().set_bar0(sriov.vf_bar0_address(cfg, n));
            }
        }
        if change.added.is_empty() && change.removed.is_empty() {
            None
        } else {
            Some(change)
        }
    }
}

/// The PF saves itself, its VFs and every member's migration state
/// (spec §6). Restore goes into a freshly built PF (no VFs yet): the VFs
/// the saved SR-IOV registers enable are created, and the caller puts them
/// on the bus ([`VirtioPf::vfs`], [`VirtioPf::vf`]).
impl vm_migration::Snapshottable for VirtioPf {
    type State = PfSnapshot;

    fn snapshot(&self) -> Result<PfSnapshot, vm_migration::MigratableError> {
        VirtioPf::snapshot(self).map_err(|e| {
            vm_migration::MigratableError::snapshot(format!("virtio-pf {}", self.bdf), e)
        })
    }

    fn restore(&mut self, state: &PfSnapshot) -> Result<(), vm_migration::MigratableError> {
        let bdf = self.bdf;
        let what = move || format!("virtio-pf {bdf}");
        if !self.vfs().is_empty() {
            return Err(vm_migration::MigratableError::restore(
                what(),
                "it has VFs already: a restore goes into a freshly built PF",
            ));
        }
        VirtioPf::restore(self, state)
            .map(|_| ())
            .map_err(|e| vm_migration::MigratableError::restore(what(), e))
    }
}

impl PciDevice for VirtioPf {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.dev.config_read(offset, data)
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<FunctionChange> {
        if !matches!(data.len(), 1 | 2 | 4)
            || usize::from(offset) + data.len() > pci::PCI_CONFIG_SPACE_SIZE
        {
            return None;
        }
        let effect = if self.sriov.overlaps(offset, data.len()) {
            self.sriov
                .config_write(self.dev.pci_config_mut(), offset, data)
        } else {
            // Anything else, including an FLR, which clears VF Enable.
            let before = self.sriov.regs(self.dev.pci_config());
            self.dev.config_write(offset, data);
            before.diff(&self.sriov.regs(self.dev.pci_config()))
        };
        self.apply_sriov(effect)
    }

    fn decoded_bars(&self) -> Vec<BarRange> {
        self.dev.decoded_bars()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        self.dev.bar_read(bar, offset, data)
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.dev.bar_write(bar, offset, data)
    }

    fn doorbells(&self) -> Vec<Doorbell> {
        self.dev.doorbells()
    }

    fn doorbell(&mut self, index: u16) {
        if index != MEMBER_PROGRESS_EVENT {
            self.dev.doorbell(index);
        }
        self.poll_admin();
    }

    fn work_events(&self) -> Vec<WorkEvent> {
        let mut v = self.dev.work_events();
        v.push(WorkEvent {
            index: MEMBER_PROGRESS_EVENT,
            event: self.progress.clone(),
        });
        v
    }

    fn drain(&mut self) {
        self.dev.drain();
        self.poll_admin();
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.dev.device().counters()
    }

    fn debug_state(&self) -> String {
        let pf = self.dev.device();
        let regs = self.sriov.regs(self.dev.pci_config());
        let mut s = format!(
            "PF: vf_enable={} num_vfs={} vf_mse={} admin: deferred={} orphans={}",
            regs.vf_enabled(),
            regs.num_vfs,
            regs.vf_mse(),
            pf.deferred.len(),
            pf.orphans.len()
        );
        for (n, m) in pf.table.members() {
            s.push_str(&format!(
                " vf{n}={:?}{}",
                m.mode(),
                if m.migration.recorder.is_started() {
                    "+recording"
                } else {
                    ""
                }
            ));
        }
        s.push(' ');
        s.push_str(&self.dev.debug_state());
        s
    }
}
