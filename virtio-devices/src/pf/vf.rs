//! A virtual function (member) of the virtio-pf, as a PCI function and as
//! a [`MemberDevice`].
//!
//! [`VfFunction`] wraps a [`VirtioPciDevice`] built with
//! [`FunctionKind::Virtual`] (Vendor/Device ID 0xFFFF, BAR registers read 0,
//! BAR0 placed by the PF's SR-IOV capability) and Function Level Reset
//! advertised (R-PCI-4). Its queues are served from the member's own *view*
//! of guest memory ([`vm_migration::WriteRecorder::member_view`]): every
//! write the member device makes marks the VMM's dirty log and, while the
//! member records, the member's write records (R-WR-3, R-WR-7).
//!
//! The function sits on the bus as `Arc<Mutex<VfFunction>>`; the PF's
//! member table holds a [`SharedVf`] clone of the same `Arc`, whose
//! [`MemberDevice`] methods lock it. The VF never locks the PF: lock order
//! is PF mutex → VF mutex (see `docs/virtio-pf-device.md`).
//!
//! # Mapping to the device context (spec §4.3)
//!
//! The transport state maps to and from a [`MemberContext`] through
//! [`super::transport_map`] (common configuration, features, per-queue
//! configuration and available index; the used index is read back from the
//! used ring on apply). Device-owned descriptors (VQ_SPLIT_DEV_OWN_DESC)
//! are the heads adopted from a written context and not yet served: block
//! requests complete synchronously inside `process_queue`, so a member's
//! own requests are never left device-owned (R-MODE-3). On the way to
//! Active, adopted heads are run through the device model on a private
//! scratch ring and then completed on the real used ring. DEV_CFG is
//! read-only for block: applying a different one fails.

use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, warn};
use pci::{BarRange, Doorbell, FunctionChange, InterruptSourceGroup, PciDevice, WorkEvent};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vm_migration::dma::MSI_WINDOW_START;
use vm_migration::{DmaMemory, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use super::context::{ContextLimits, MemberContext};
use super::migration::{MemberDevice, MemberDeviceError, Mode, Quiesce};
use super::transport_map::{context_from_transport, transport_from_context};
use crate::device::VirtioDevice;
use crate::transport::state::common_offset;
use crate::transport::{
    FunctionKind, TransportError, TransportMode, VirtioPciDevice, VirtioPciOptions,
    COMMON_CFG_BAR_OFFSET,
};

/// Bytes of the scratch ring used to serve adopted device-owned heads.
const SCRATCH_RING_LEN: usize = 0x4_0000;
const _: () = assert!(SCRATCH_RING_LEN as u64 <= vm_migration::dma::MSI_WINDOW_LEN);

/// One VF of the PF: its virtio-pci function and what it adopted from a
/// written device context.
pub struct VfFunction<D: VirtioDevice> {
    number: u16,
    bdf: pci::Bdf,
    dev: VirtioPciDevice<D>,
    /// Per device queue: heads that a written context listed as
    /// device-owned, to serve when the member becomes Active.
    adopted: Vec<Vec<u16>>,
    /// A Stop or Freeze waiting for the requests in flight (R-MODE-3).
    quiescing: Option<Mode>,
    /// Signalled when a quiesce can finish, so that the PF completes the
    /// admin command waiting on it.
    progress: Option<Arc<EventFd>>,
    /// FLR makes the member Active again (the virtio 1.4 dialect: Linux
    /// takes a reset VF as running); the draft keeps the mode (R-MODE-7).
    active_after_flr: bool,
    /// An FLR happened that the owner's migration state has not seen yet
    /// ([`MemberDevice::take_reset`]).
    flr_seen: bool,
}

impl<D: VirtioDevice> VfFunction<D> {
    /// VF `number` at `bdf` around `device`, serving its queues from
    /// `view` (the member's view of guest memory) and interrupting through
    /// `interrupts` (at least [`crate::transport::required_msix_vectors`]
    /// vectors).
    pub fn new(
        number: u16,
        bdf: pci::Bdf,
        device: D,
        view: DmaMemory,
        interrupts: Arc<dyn InterruptSourceGroup>,
    ) -> Result<Self, TransportError> {
        let options = VirtioPciOptions {
            function: FunctionKind::Virtual,
            flr: true,
            ring_reset: true,
            pci_cfg_cap: true,
        };
        let mut dev =
            VirtioPciDevice::new(device, GuestMemoryAtomic::new(view), interrupts, options)?;
        dev.set_label(bdf.to_string());
        let nq = usize::from(dev.num_device_queues());
        Ok(VfFunction {
            number,
            bdf,
            dev,
            adopted: vec![Vec::new(); nq],
            quiescing: None,
            progress: None,
            active_after_flr: false,
            flr_seen: false,
        })
    }

    /// Make an FLR return the member to Active (virtio 1.4 dialect).
    pub fn set_active_after_flr(&mut self, on: bool) {
        self.active_after_flr = on;
    }

    /// The VF number (1-based, the admin commands' member id).
    pub fn number(&self) -> u16 {
        self.number
    }

    /// The VF's routing ID.
    pub fn bdf(&self) -> pci::Bdf {
        self.bdf
    }

    /// The virtio-pci function.
    pub fn transport(&self) -> &VirtioPciDevice<D> {
        &self.dev
    }

    /// The virtio-pci function, mutably.
    pub fn transport_mut(&mut self) -> &mut VirtioPciDevice<D> {
        &mut self.dev
    }

    /// Where BAR0 decodes (`None` while VF MSE or VF Enable is clear).
    pub fn set_bar0(&mut self, base: Option<u64>) {
        self.dev.set_vf_bar0(base);
    }

    /// The event to signal when a quiesce waiting for requests in flight
    /// can finish (the PF's member progress event).
    pub fn set_progress_event(&mut self, event: Arc<EventFd>) {
        self.progress = Some(event);
    }

    /// The mode a quiesce is waiting to enter, if any.
    pub fn quiescing(&self) -> Option<Mode> {
        self.quiescing
    }

    /// After completions were delivered: tell the PF if a quiesce can now
    /// finish.
    fn report_progress(&self) {
        if self.quiescing.is_some() && self.dev.device().in_flight() == 0 {
            if let Some(p) = &self.progress {
                if let Err(e) = p.write(1) {
                    warn!("virtio-pf: VF {}: cannot signal progress: {e}", self.number);
                }
            }
        }
    }

    /// Heads adopted from a written context, not yet served, per queue.
    pub fn adopted_heads(&self) -> &[Vec<u16>] {
        &self.adopted
    }

    fn forget_adopted(&mut self) {
        for a in &mut self.adopted {
            a.clear();
        }
    }

    fn device_config(&self) -> Vec<u8> {
        let mut cfg = vec![0u8; self.dev.device().config_len()];
        self.dev.device().read_config(0, &mut cfg);
        cfg
    }

    /// Serves the heads adopted from a written context: the device model
    /// runs them through a private scratch ring (so nothing but the chains'
    /// own buffers is touched in guest memory) and each is then completed
    /// on the real used ring.
    fn serve_adopted(&mut self) {
        let mut any = false;
        for index in 0..self.dev.num_device_queues() {
            let heads = std::mem::take(&mut self.adopted[usize::from(index)]);
            if heads.is_empty() {
                continue;
            }
            any = true;
            let done = self.run_heads(index, &heads);
            for (head, len) in done {
                if !self.dev.complete_chain(index, head, len) {
                    warn!(
                        "virtio-pf: VF {}: adopted chain {head} of queue {index} could not be completed",
                        self.number
                    );
                }
            }
        }
        if any {
            // Chains the device handed to its worker complete on the real
            // used ring.
            self.dev.drain();
        }
    }

    /// Runs `heads` of queue `index` through the device model; returns the
    /// `(head, used length)` of each chain it completed at once (a device
    /// with a worker completes them later, through the transport).
    fn run_heads(&mut self, index: u16, heads: &[u16]) -> Vec<(u16, u32)> {
        let st = self.dev.state();
        let Some(q) = st.queues.get(usize::from(index)).copied() else {
            return Vec::new();
        };
        if !q.enabled || !self.dev.is_activated() {
            debug!("virtio-pf: adopted heads of disabled queue {index} dropped");
            return Vec::new();
        }
        let mem = self.dev.memory().memory();
        // Scratch ring in a private mapping: above guest memory, or, when
        // an IOMMU translates the member's DMA (any address may be an
        // IOVA), in the MSI window, which is never translated and holds no
        // guest memory.
        let base = if mem.is_translated() {
            Some(MSI_WINDOW_START)
        } else {
            mem.physical()
                .last_addr()
                .0
                .checked_add(1)
                .and_then(|a| a.checked_next_multiple_of(1 << 21))
        };
        let Some(base) = base else {
            return Vec::new();
        };
        let region = match GuestRegionMmap::from_range(GuestAddress(base), SCRATCH_RING_LEN, None) {
            Ok(r) => r,
            Err(e) => {
                warn!("virtio-pf: scratch ring for adopted heads: {e}");
                return Vec::new();
            }
        };
        let combined = match mem.physical().insert_region(Arc::new(region)) {
            Ok(m) => mem.with_physical(m),
            Err(e) => {
                warn!("virtio-pf: scratch ring for adopted heads: {e}");
                return Vec::new();
            }
        };
        drop(mem);
        let n = heads.len().min(usize::from(q.size));
        let avail = base;
        let used = base + (SCRATCH_RING_LEN as u64) / 2;
        let mut ok = combined.write_obj(0u16, GuestAddress(avail)).is_ok()
            && combined
                .write_obj((n as u16).to_le(), GuestAddress(avail + 2))
                .is_ok();
        for (k, h) in heads.iter().take(n).enumerate() {
            ok &= combined
                .write_obj(h.to_le(), GuestAddress(avail + 4 + 2 * k as u64))
                .is_ok();
        }
        let Ok(mut fake) = Queue::new(q.size) else {
            return Vec::new();
        };
        fake.set_size(q.size);
        ok &= fake
            .try_set_desc_table_address(GuestAddress(q.desc_table))
            .is_ok()
            && fake.try_set_avail_ring_address(GuestAddress(avail)).is_ok()
            && fake.try_set_used_ring_address(GuestAddress(used)).is_ok();
        if !ok {
            warn!("virtio-pf: could not build the scratch ring for adopted heads");
            return Vec::new();
        }
        fake.set_ready(true);
        if let Err(e) = self
            .dev
            .device_mut()
            .process_queue(index, &mut fake, &combined)
        {
            warn!("virtio-pf: serving adopted heads of queue {index}: {e}");
        }
        let produced = combined
            .read_obj::<u16>(GuestAddress(used + 2))
            .map(u16::from_le)
            .unwrap_or(0);
        let mut out = Vec::with_capacity(usize::from(produced));
        for k in 0..u64::from(produced) {
            let e = used + 4 + 8 * k;
            let id = combined.read_obj::<u32>(GuestAddress(e)).map(u32::from_le);
            let len = combined
                .read_obj::<u32>(GuestAddress(e + 4))
                .map(u32::from_le);
            if let (Ok(id), Ok(len)) = (id, len) {
                out.push((id as u16, len));
            }
        }
        out
    }
}

/// Everything of one virtio-pci function the VMM carries across a
/// snapshot or migration of the VM that owns the PF (spec §6): its PCI
/// configuration space (BAR placement included), MSI-X table and PBA,
/// virtio state (registers, features, queues and ring positions) and mode.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FunctionSnapshot {
    pub config: pci::PciConfigurationState,
    pub msix: pci::MsixConfigState,
    pub virtio: crate::transport::VirtioPciState,
    pub mode: TransportMode,
}

/// Errors restoring a [`FunctionSnapshot`].
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("configuration space: {0}")]
    Config(#[from] pci::ConfigError),
    #[error("MSI-X: {0}")]
    Msix(#[from] pci::MsixError),
    #[error("virtio state: {0}")]
    Virtio(#[from] crate::transport::StateError),
}

/// Captures `dev`'s [`FunctionSnapshot`].
pub fn snapshot_function<D: VirtioDevice>(dev: &VirtioPciDevice<D>) -> FunctionSnapshot {
    FunctionSnapshot {
        config: dev.pci_config().state(),
        msix: dev.msix().state(),
        virtio: dev.state(),
        mode: dev.mode(),
    }
}

/// Restores `snap` into `dev`, a freshly built function of the same
/// configuration (a failure part-way leaves it to be discarded). Nothing is
/// served and no interrupt is sent: the mode is set before the virtio
/// state, so a function saved in Stop or Freeze stays quiet, and one saved
/// Active serves its queues at the next notification.
pub fn restore_function<D: VirtioDevice>(
    dev: &mut VirtioPciDevice<D>,
    snap: &FunctionSnapshot,
) -> Result<(), RestoreError> {
    let mut config = dev.pci_config().clone();
    config.set_state(&snap.config)?;
    dev.msix_mut().set_state(&snap.msix)?;
    if snap.mode != TransportMode::Active {
        dev.set_mode(snap.mode);
    }
    dev.set_state(&snap.virtio)?;
    *dev.pci_config_mut() = config;
    Ok(())
}

/// A virtio PCI function (a `--disk`, or any function of the same shape)
/// saves and restores its [`FunctionSnapshot`].
impl<D: VirtioDevice> vm_migration::Snapshottable for VirtioPciDevice<D> {
    type State = FunctionSnapshot;

    fn snapshot(&self) -> Result<FunctionSnapshot, vm_migration::MigratableError> {
        Ok(snapshot_function(self))
    }

    fn restore(&mut self, state: &FunctionSnapshot) -> Result<(), vm_migration::MigratableError> {
        restore_function(self, state).map_err(|e| {
            vm_migration::MigratableError::restore(format!("virtio function {}", self.label()), e)
        })
    }
}

impl<D: VirtioDevice> VfFunction<D> {
    /// The VF's [`FunctionSnapshot`] and adopted heads.
    pub fn snapshot(&self) -> (FunctionSnapshot, Vec<Vec<u16>>) {
        (snapshot_function(&self.dev), self.adopted.clone())
    }

    /// Restores what [`VfFunction::snapshot`] captured (BAR0's address
    /// comes from the PF).
    pub fn restore(
        &mut self,
        snap: &FunctionSnapshot,
        adopted: &[Vec<u16>],
    ) -> Result<(), RestoreError> {
        restore_function(&mut self.dev, snap)?;
        let nq = usize::from(self.dev.num_device_queues());
        self.adopted = adopted.to_vec();
        self.adopted.resize(nq, Vec::new());
        self.adopted.truncate(nq);
        Ok(())
    }
}

impl<D: VirtioDevice> PciDevice for VfFunction<D> {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.dev.config_read(offset, data)
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<FunctionChange> {
        if self.dev.pcie_capability().flr_requested(offset, data) {
            // FLR resets the virtio state (the transport keeps the mode);
            // what was adopted belongs to the old driver (R-MODE-7).
            event_monitor::event(
                "virtio-pf",
                "flr",
                &[
                    ("vf", self.bdf.to_string()),
                    ("member", self.number.to_string()),
                ],
            );
            self.forget_adopted();
            if self.active_after_flr {
                self.quiescing = None;
                self.dev.hold_requests(false);
                self.dev.set_mode(TransportMode::Active);
                self.flr_seen = true;
            }
        }
        self.dev.config_write(offset, data)
    }

    fn decoded_bars(&self) -> Vec<BarRange> {
        self.dev.decoded_bars()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        self.dev.bar_read(bar, offset, data)
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == 0 && offset == COMMON_CFG_BAR_OFFSET + common_offset::DEVICE_STATUS && data == [0]
        {
            self.forget_adopted();
        }
        self.dev.bar_write(bar, offset, data)
    }

    fn doorbells(&self) -> Vec<Doorbell> {
        self.dev.doorbells()
    }

    fn doorbell(&mut self, index: u16) {
        self.dev.doorbell(index);
        self.report_progress();
    }

    fn work_events(&self) -> Vec<WorkEvent> {
        self.dev.work_events()
    }

    fn drain(&mut self) {
        self.dev.drain();
        self.report_progress();
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.dev.counters()
    }

    fn debug_state(&self) -> String {
        let adopted: usize = self.adopted.iter().map(Vec::len).sum();
        let mut s = format!("VF {}: ", self.number);
        if adopted > 0 {
            s.push_str(&format!("adopted_heads={adopted} "));
        }
        s.push_str(&self.dev.debug_state());
        s
    }
}

impl<D: VirtioDevice> MemberDevice for VfFunction<D> {
    fn context_limits(&self) -> ContextLimits {
        let dev = self.dev.device();
        ContextLimits {
            num_queues: self.dev.num_device_queues(),
            max_queue_size: dev.queue_max_sizes().iter().copied().max().unwrap_or(0),
            offered_features: self.dev.offered_features(),
            device_cfg_len: dev.config_len(),
            msix_vectors: self.dev.msix().num_vectors(),
        }
    }

    fn capture_context(&mut self) -> MemberContext {
        context_from_transport(
            &self.dev.state(),
            &self.dev.common_cfg(),
            self.dev.num_device_queues(),
            &self.adopted,
            self.device_config(),
        )
    }

    fn apply_context(&mut self, ctx: &MemberContext) -> Result<(), MemberDeviceError> {
        if let Some(cfg) = &ctx.device_config {
            if *cfg != self.device_config() {
                return Err(MemberDeviceError::Apply(
                    "the device configuration differs from this member's (it is read-only)".into(),
                ));
            }
        }
        let mut max_sizes = self.dev.device().queue_max_sizes().to_vec();
        max_sizes.extend_from_slice(self.dev.device().admin_queue_max_sizes());
        let applied = {
            let mem = self.dev.memory().memory();
            transport_from_context(ctx, &max_sizes, |used_ring| {
                let at = used_ring.checked_add(2)?;
                mem.read_obj::<u16>(GuestAddress(at)).ok().map(u16::from_le)
            })
            .map_err(|e| MemberDeviceError::Apply(e.to_string()))?
        };
        self.dev
            .set_state(&applied.state)
            .map_err(|e| MemberDeviceError::Apply(e.to_string()))?;
        let nq = usize::from(self.dev.num_device_queues());
        let mut owned = applied.device_owned;
        owned.resize(nq, Vec::new());
        owned.truncate(nq);
        self.adopted = owned;
        Ok(())
    }

    fn quiesce(&mut self, mode: Mode) -> Quiesce {
        match mode {
            Mode::Active => {
                self.resume();
                Quiesce::Done
            }
            Mode::Stop | Mode::Freeze => {
                // Take no new request; the ones in flight complete as
                // usual, then the mode changes (R-MODE-3).
                self.dev.hold_requests(true);
                self.quiescing = Some(mode);
                self.poll_quiesce()
            }
        }
    }

    fn poll_quiesce(&mut self) -> Quiesce {
        let Some(mode) = self.quiescing else {
            return Quiesce::Done;
        };
        self.dev.complete_requests();
        if self.dev.device().in_flight() > 0 {
            return Quiesce::InProgress;
        }
        self.quiescing = None;
        self.dev.hold_requests(false);
        self.dev.set_mode(match mode {
            Mode::Freeze => TransportMode::Freeze,
            _ => TransportMode::Stop,
        });
        Quiesce::Done
    }

    fn resume(&mut self) {
        // Serves every enabled queue once and delivers held interrupts
        // (R-MODE-4), then the adopted device-owned heads.
        self.quiescing = None;
        self.dev.hold_requests(false);
        self.dev.set_mode(TransportMode::Active);
        self.serve_adopted();
    }

    fn reset(&mut self) {
        self.dev.reset();
        self.forget_adopted();
    }

    fn take_reset(&mut self) -> bool {
        std::mem::take(&mut self.flr_seen)
    }
}

/// The member table's handle on a VF: the same `Arc` the bus holds.
pub struct SharedVf<D: VirtioDevice>(pub Arc<Mutex<VfFunction<D>>>);

impl<D: VirtioDevice> SharedVf<D> {
    /// Locks the VF (a poisoned lock is taken over: the device state is
    /// whatever it was).
    pub fn lock(&self) -> MutexGuard<'_, VfFunction<D>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<D: VirtioDevice> std::fmt::Debug for SharedVf<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedVf")
    }
}

impl<D: VirtioDevice> MemberDevice for SharedVf<D> {
    fn context_limits(&self) -> ContextLimits {
        self.lock().context_limits()
    }
    fn capture_context(&mut self) -> MemberContext {
        self.lock().capture_context()
    }
    fn apply_context(&mut self, ctx: &MemberContext) -> Result<(), MemberDeviceError> {
        self.lock().apply_context(ctx)
    }
    fn quiesce(&mut self, mode: Mode) -> Quiesce {
        self.lock().quiesce(mode)
    }
    fn poll_quiesce(&mut self) -> Quiesce {
        self.lock().poll_quiesce()
    }
    fn resume(&mut self) {
        self.lock().resume()
    }
    fn reset(&mut self) {
        self.lock().reset()
    }
    fn take_reset(&mut self) -> bool {
        self.lock().take_reset()
    }
}
