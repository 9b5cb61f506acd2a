//! The modern (virtio 1.x) virtio-pci transport.
//!
//! [`VirtioPciDevice`] wraps a [`VirtioDevice`] into a PCI Express endpoint
//! implementing [`pci::PciDevice`]: a type-0 header (vendor 0x1AF4, device
//! 0x1040 + device type, revision 1), a PCI Express Capability (optionally
//! advertising FLR) so the function has a 4 KiB configuration space, MSI-X,
//! and the virtio vendor-specific capabilities, all pointing into one 64-bit
//! memory BAR0.
//!
//! # BAR0 layout (32 KiB)
//!
//! | offset | length | contents |
//! |---|---|---|
//! | 0x0000 | 0x1000 | common configuration (64 bytes used, rest reads 0) |
//! | 0x1000 | 0x1000 | ISR status (1 byte, read-to-clear) |
//! | 0x2000 | 0x1000 | device-specific configuration |
//! | 0x3000 | 0x1000 | notifications: queue *n* at 0x3000 + 4 × n (`queue_notify_off` = n, multiplier 4) |
//! | 0x4000 | 0x2000 | MSI-X table (16 bytes per vector, up to 512 vectors) |
//! | 0x6000 | 0x1000 | MSI-X PBA |
//! | 0x7000 | 0x1000 | reserved (reads 0) |
//!
//! # Queues and vectors
//!
//! Device-type queues come first, then admin queues (if the device has
//! any): `admin_queue_index` = number of device-type queues,
//! `admin_queue_num` = number of admin queues. `num_queues` counts the
//! device-type queues only, so the admin queues sit at indices
//! `num_queues..num_queues + admin_queue_num` (Linux's virtio_pci accepts
//! the admin queue index at or beyond `num_queues`); `queue_select`
//! reaches all of them. The function has one MSI-X vector per queue plus one, so the
//! driver can give every queue and the configuration change its own vector
//! ([`required_msix_vectors`]).
//!
//! # Driving it
//!
//! Everything is a plain method call: configuration-space and BAR accesses
//! from the bus, [`PciDevice::doorbell`] (or
//! [`VirtioPciDevice::process_queue`]) from the VMM's device thread once a
//! doorbell's eventfd fired. An MMIO write to a doorbell that reaches the
//! device (no ioeventfd registered) only signals that doorbell's eventfd.
//!
//! Guest input never panics the device: bad offsets and sizes are ignored,
//! `queue_select` out of range reads zeros and ignores writes, and rings
//! outside guest memory set `DEVICE_NEEDS_RESET` and raise a configuration
//! interrupt.

pub mod caps;
mod common;
mod debug;
pub mod state;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use log::{debug, warn};
use pci::configuration::{PciHeaderParams, BAR0};
use pci::msix::MsixLayout;
use pci::pcie::{PcieCapability, PcieCapabilityBuilder};
use pci::{
    BarKind, BarRange, Doorbell, FunctionChange, InterruptSourceGroup, MsixConfig,
    PciConfiguration, PciDevice, WorkEvent,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vm_migration::DmaMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{
    VirtioDevice, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET,
    VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, VIRTIO_ID_NET, VIRTIO_RING_F_EVENT_IDX,
};
use caps::*;
pub use state::*;

/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x8000;
/// BAR0 offset of the common configuration.
pub const COMMON_CFG_BAR_OFFSET: u64 = 0x0000;
/// BAR0 offset of the ISR status byte.
pub const ISR_BAR_OFFSET: u64 = 0x1000;
/// BAR0 offset of the device-specific configuration.
pub const DEVICE_CFG_BAR_OFFSET: u64 = 0x2000;
/// BAR0 offset of the notification area.
pub const NOTIFY_BAR_OFFSET: u64 = 0x3000;
/// BAR0 offset of the MSI-X table.
pub const MSIX_TABLE_BAR_OFFSET: u64 = 0x4000;
/// BAR0 offset of the MSI-X PBA.
pub const MSIX_PBA_BAR_OFFSET: u64 = 0x6000;
/// Length of the common, ISR, device and notify regions.
pub const REGION_LEN: u64 = 0x1000;
/// Length of the MSI-X table region.
pub const MSIX_TABLE_REGION_LEN: u64 = 0x2000;
/// `notify_off_multiplier`.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Most queues (device-type plus admin) one function may have: one MSI-X
/// vector each plus the configuration vector must fit the table region.
pub const MAX_QUEUES: usize = (MSIX_TABLE_REGION_LEN / 16) as usize - 1;

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Device ID of a modern virtio device of type 0.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem ID given to every function.
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;

/// Available ring flag: the driver wants no used-buffer interrupts.
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// ISR bit: a queue was used.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: the device configuration changed.
pub const ISR_CONFIG: u8 = 2;

/// Feature bits the transport never offers, whatever the device says
/// (packed rings, notification data and in-order are not implemented).
const TRANSPORT_UNSUPPORTED_FEATURES: u64 =
    (1u64 << VIRTIO_F_RING_PACKED) | (1u64 << 35) | (1u64 << 38) | (1u64 << 39);

/// Errors of building a transport or applying state to it.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("the device declares {0} queues; a virtio-pci function supports 1..={MAX_QUEUES}")]
    QueueCount(usize),
    #[error("queue {index} has maximum size {size}, not a power of two in 1..=32768")]
    QueueMaxSize { index: usize, size: u16 },
    #[error("failed to build the configuration space: {0}")]
    Config(#[from] pci::ConfigError),
    #[error("failed to set up MSI-X: {0}")]
    Msix(#[from] pci::MsixError),
    #[error("failed to create the doorbell eventfd of queue {index}: {source}")]
    EventFd {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Whether the function is a physical function or an SR-IOV virtual
/// function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FunctionKind {
    /// An ordinary function: its own BAR0 register, real vendor and device
    /// IDs.
    Physical,
    /// An SR-IOV VF: Vendor ID and Device ID read 0xFFFF, BAR registers
    /// read 0, and BAR0's address is given by the PF
    /// ([`VirtioPciDevice::set_vf_bar0`]).
    Virtual,
}

/// Options of a [`VirtioPciDevice`].
#[derive(Clone, Debug)]
pub struct VirtioPciOptions {
    pub function: FunctionKind,
    /// Advertise Function Level Reset in the PCI Express Capability.
    pub flr: bool,
    /// Offer `VIRTIO_F_RING_RESET` (per-queue reset through `queue_reset`).
    pub ring_reset: bool,
    /// Add the `VIRTIO_PCI_CAP_PCI_CFG` access window capability.
    pub pci_cfg_cap: bool,
}

impl Default for VirtioPciOptions {
    fn default() -> Self {
        VirtioPciOptions {
            function: FunctionKind::Physical,
            flr: true,
            ring_reset: true,
            pci_cfg_cap: true,
        }
    }
}

/// How the function treats its driver (spec §4.1, the modes a member
/// device of a PF may be in).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TransportMode {
    /// Normal operation.
    #[default]
    Active,
    /// No interrupts are sent and no driver memory is touched; doorbells
    /// and configuration writes are accepted. Leaving Stop (or Freeze) for
    /// Active serves every enabled queue once and delivers the
    /// interrupts held back meanwhile.
    Stop,
    /// As Stop, and doorbells and virtio configuration writes (common and
    /// device configuration) are ignored. PCI configuration space, MSI-X
    /// and FLR work as always.
    Freeze,
}

/// Number of MSI-X vectors a [`VirtioPciDevice`] around `device` has: one
/// per queue (device-type and admin) plus one for configuration changes.
pub fn required_msix_vectors<D: VirtioDevice + ?Sized>(device: &D) -> u16 {
    let n = device.queue_max_sizes().len() + device.admin_queue_max_sizes().len() + 1;
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// PCI class code, subclass for a virtio device type.
fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        VIRTIO_ID_NET => (0x02, 0x00),
        VIRTIO_ID_BLOCK => (0x01, 0x00),
        3 => (0x07, 0x80),
        _ => (0xff, 0x00),
    }
}

/// A virtio device behind the modern virtio-pci transport.
pub struct VirtioPciDevice<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryAtomic<DmaMemory>,
    options: VirtioPciOptions,
    config: PciConfiguration,
    pcie: PcieCapability,
    msix: MsixConfig,
    msix_cap: u16,
    pci_cfg_cap: Option<u16>,
    /// Common configuration registers and per-queue configuration. While
    /// a queue is enabled its ring positions live in `queues`.
    st: VirtioPciState,
    /// Maximum size of every queue (device-type, then admin).
    max_sizes: Vec<u16>,
    num_device_queues: u16,
    /// The queues as virtio-queue runs them.
    queues: Vec<Queue>,
    events: Vec<Arc<EventFd>>,
    activated: bool,
    mode: TransportMode,
    vf_bar0: Option<u64>,
    /// Queue interrupts held back while not Active.
    held_queue_irqs: Vec<bool>,
    /// A configuration interrupt held back while not Active.
    held_config_irq: bool,
    /// New requests are held (see [`VirtioPciDevice::hold_requests`]).
    holding: bool,
    /// Reused buffer of completions.
    completions: Vec<crate::device::Completion>,
    /// How the event monitor names this function (its BDF once wired).
    label: String,
}

/// The [`pci::WorkEvent`] index of a device's completion eventfd.
pub const COMPLETION_EVENT: u16 = 0xffff;

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Builds the function around `device`. `interrupts` must have at least
    /// [`required_msix_vectors`] vectors. Queue processing reads and writes
    /// guest memory through `mem`.
    pub fn new(
        device: D,
        mem: GuestMemoryAtomic<DmaMemory>,
        interrupts: Arc<dyn InterruptSourceGroup>,
        options: VirtioPciOptions,
    ) -> Result<Self, TransportError> {
        let mut max_sizes: Vec<u16> = device.queue_max_sizes().to_vec();
        let num_device_queues = max_sizes.len();
        max_sizes.extend_from_slice(device.admin_queue_max_sizes());
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(TransportError::QueueCount(max_sizes.len()));
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut events = Vec::with_capacity(max_sizes.len());
        for (index, &size) in max_sizes.iter().enumerate() {
            let q = Queue::new(size).map_err(|_| TransportError::QueueMaxSize { index, size })?;
            queues.push(q);
            let ev = EventFd::new(EFD_NONBLOCK)
                .map_err(|source| TransportError::EventFd { index, source })?;
            events.push(Arc::new(ev));
        }

        let device_type = device.device_type();
        let (class_code, subclass) = class_of(device_type);
        let (vendor_id, device_id) = match options.function {
            FunctionKind::Physical => (
                VIRTIO_PCI_VENDOR_ID,
                VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device_type as u16),
            ),
            FunctionKind::Virtual => (0xffff, 0xffff),
        };
        let mut config = PciConfiguration::new(&PciHeaderParams {
            vendor_id,
            device_id,
            revision_id: 1,
            class_code,
            subclass,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
            interrupt_pin: 0,
            multifunction: false,
        });
        if options.function == FunctionKind::Physical {
            config.add_bar(0, BarKind::Memory64, BAR0_SIZE, false)?;
        }
        let pcie = PcieCapabilityBuilder::endpoint()
            .flr(options.flr)
            .add_to(&mut config)?;

        let num_vectors = required_msix_vectors(&device);
        let msix = MsixConfig::new(num_vectors, interrupts)?;
        let msix_cap = msix.add_capability(
            &mut config,
            &MsixLayout {
                table_bar: 0,
                table_offset: MSIX_TABLE_BAR_OFFSET as u32,
                pba_bar: 0,
                pba_offset: MSIX_PBA_BAR_OFFSET as u32,
            },
        )?;

        let region = |cfg_type, offset: u64, notify| VirtioPciCap {
            cfg_type,
            bar: 0,
            id: 0,
            offset: offset as u32,
            length: REGION_LEN as u32,
            notify_off_multiplier: notify,
        };
        for cap in [
            region(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_BAR_OFFSET, None),
            region(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_BAR_OFFSET,
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
            region(VIRTIO_PCI_CAP_ISR_CFG, ISR_BAR_OFFSET, None),
            region(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_BAR_OFFSET, None),
        ] {
            let (body, mask) = cap.body_and_mask();
            config.add_capability(PCI_CAP_ID_VNDR, &body, &mask)?;
        }
        let pci_cfg_cap = if options.pci_cfg_cap {
            let cap = VirtioPciCap {
                cfg_type: VIRTIO_PCI_CAP_PCI_CFG,
                bar: 0,
                id: 0,
                offset: 0,
                length: 0,
                notify_off_multiplier: None,
            };
            let (body, mask) = cap.body_and_mask();
            Some(config.add_capability(PCI_CAP_ID_VNDR, &body, &mask)?)
        } else {
            None
        };

        let n = max_sizes.len();
        Ok(VirtioPciDevice {
            device,
            mem,
            options,
            config,
            pcie,
            msix,
            msix_cap,
            pci_cfg_cap,
            st: VirtioPciState::reset_value(&max_sizes),
            max_sizes,
            num_device_queues: num_device_queues as u16,
            queues,
            events,
            activated: false,
            mode: TransportMode::Active,
            vf_bar0: None,
            held_queue_irqs: vec![false; n],
            held_config_irq: false,
            holding: false,
            completions: Vec::new(),
            label: String::new(),
        })
    }

    // ---- accessors ---------------------------------------------------------

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The options the function was built with.
    pub fn options(&self) -> &VirtioPciOptions {
        &self.options
    }

    /// The configuration space.
    pub fn pci_config(&self) -> &PciConfiguration {
        &self.config
    }

    /// The configuration space, mutably (e.g. for a PF to add its SR-IOV
    /// extended capability).
    pub fn pci_config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    /// The PCI Express Capability.
    pub fn pcie_capability(&self) -> &PcieCapability {
        &self.pcie
    }

    /// MSI-X state.
    pub fn msix(&self) -> &MsixConfig {
        &self.msix
    }

    /// MSI-X state, mutably (e.g. to restore it or replace its interrupt
    /// group).
    pub fn msix_mut(&mut self) -> &mut MsixConfig {
        &mut self.msix
    }

    /// Offset of the MSI-X capability.
    pub fn msix_capability_offset(&self) -> u16 {
        self.msix_cap
    }

    /// Replaces the guest memory the queues are served from.
    pub fn set_memory(&mut self, mem: GuestMemoryAtomic<DmaMemory>) {
        self.mem = mem;
    }

    /// The guest memory the queues are served from.
    pub fn memory(&self) -> &GuestMemoryAtomic<DmaMemory> {
        &self.mem
    }

    /// Number of device-type queues.
    pub fn num_device_queues(&self) -> u16 {
        self.num_device_queues
    }

    /// Number of queues, device-type and admin.
    pub fn num_queues(&self) -> u16 {
        self.max_sizes.len() as u16
    }

    /// Number of admin queues.
    pub fn num_admin_queues(&self) -> u16 {
        self.num_queues() - self.num_device_queues
    }

    /// The feature bits offered to the driver.
    pub fn offered_features(&self) -> u64 {
        let mut f = (self.device.features() & !TRANSPORT_UNSUPPORTED_FEATURES)
            | (1u64 << VIRTIO_F_VERSION_1);
        if self.options.ring_reset {
            f |= 1u64 << VIRTIO_F_RING_RESET;
        } else {
            f &= !(1u64 << VIRTIO_F_RING_RESET);
        }
        // Behind an IOMMU the driver must hand the device bus addresses it
        // mapped (Linux's virtio core uses the DMA API only then).
        if self.mem.memory().is_translated() {
            f |= 1u64 << VIRTIO_F_ACCESS_PLATFORM;
        } else {
            f &= !(1u64 << VIRTIO_F_ACCESS_PLATFORM);
        }
        f
    }

    /// The negotiated features (0 before `FEATURES_OK`).
    pub fn negotiated_features(&self) -> u64 {
        self.st.negotiated_features()
    }

    /// `device_status`.
    pub fn device_status(&self) -> u8 {
        self.st.device_status
    }

    /// Whether the device model was activated (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The current mode.
    pub fn mode(&self) -> TransportMode {
        self.mode
    }

    /// The virtqueue `index` as virtio-queue runs it.
    pub fn queue(&self, index: u16) -> Option<&Queue> {
        self.queues.get(usize::from(index))
    }

    /// The doorbell eventfd of queue `index`.
    pub fn queue_event(&self, index: u16) -> Option<&Arc<EventFd>> {
        self.events.get(usize::from(index))
    }

    /// BAR0's base address if BAR0 is decoded.
    pub fn bar0_base(&self) -> Option<u64> {
        self.decoded_bars()
            .into_iter()
            .find(|b| b.index == 0)
            .map(|b| b.base)
    }

    /// For a VF: where the PF decodes this VF's BAR0 (`None` while VF MSE
    /// is clear or VF Enable is off).
    pub fn set_vf_bar0(&mut self, base: Option<u64>) {
        self.vf_bar0 = base;
    }

    // ---- state ---------------------------------------------------------------

    /// The used index queue `index`'s used ring holds in guest memory (what
    /// the device last published), if the queue is enabled and the ring
    /// is readable. A context that carries only the available-ring position
    /// can take the used position from here.
    pub fn used_index_in_memory(&self, index: u16) -> Option<u16> {
        let q = self.st.queues.get(usize::from(index))?;
        if !q.enabled {
            return None;
        }
        let mem = self.mem.memory();
        let addr = GuestAddress(q.used_ring.checked_add(2)?);
        mem.read_obj::<u16>(addr).ok().map(u16::from_le)
    }

    /// The whole virtio state: registers, negotiated features, queues with
    /// their ring positions.
    pub fn state(&self) -> VirtioPciState {
        let mut st = self.st.clone();
        for (q, rq) in st.queues.iter_mut().zip(&self.queues) {
            if q.enabled {
                q.next_avail = rq.next_avail();
                q.next_used = rq.next_used();
            }
        }
        st
    }

    /// The common configuration structure as the driver reads it now.
    pub fn common_cfg(&self) -> CommonCfg {
        let offered = self.offered_features();
        let half = |v: u64, sel: u32| match sel {
            0 => v as u32,
            1 => (v >> 32) as u32,
            _ => 0,
        };
        let sel = self.st.queue_select;
        let mut c = CommonCfg {
            device_feature_select: self.st.device_feature_select,
            device_feature: half(offered, self.st.device_feature_select),
            driver_feature_select: self.st.driver_feature_select,
            driver_feature: half(self.st.driver_features, self.st.driver_feature_select),
            config_msix_vector: self.st.config_msix_vector,
            num_queues: self.num_device_queues,
            device_status: self.st.device_status,
            config_generation: self.st.config_generation,
            queue_select: sel,
            admin_queue_index: if self.num_admin_queues() > 0 {
                self.num_device_queues
            } else {
                0
            },
            admin_queue_num: self.num_admin_queues(),
            ..Default::default()
        };
        if let Some(q) = self.st.queues.get(usize::from(sel)) {
            c.queue_size = q.size;
            c.queue_msix_vector = q.msix_vector;
            c.queue_enable = u16::from(q.enabled);
            c.queue_notify_off = sel;
            c.queue_desc = q.desc_table;
            c.queue_driver = q.avail_ring;
            c.queue_device = q.used_ring;
            c.queue_notify_data = sel;
            c.queue_reset = u16::from(q.reset);
        }
        c
    }

    /// Applies a whole virtio state (as taken by [`Self::state`] from a
    /// device of the same type and configuration). Validated first: on
    /// error nothing changes. The device model is reset, then activated
    /// with the state's features if the state has `DRIVER_OK` (and not
    /// `DEVICE_NEEDS_RESET`). Enabled queues resume at their ring
    /// positions. Nothing is served and no interrupt is sent by this call.
    pub fn set_state(&mut self, st: &VirtioPciState) -> Result<(), StateError> {
        if st.queues.len() != self.max_sizes.len() {
            return Err(StateError::QueueCount {
                expected: self.max_sizes.len(),
                got: st.queues.len(),
            });
        }
        let unsupported = st.driver_features & !self.offered_features();
        if unsupported != 0 {
            return Err(StateError::Features(unsupported));
        }
        let nvec = self.msix.num_vectors();
        let check_vector = |v: u16| {
            if v != VIRTIO_MSI_NO_VECTOR && v >= nvec {
                Err(StateError::Vector {
                    vector: v,
                    count: nvec,
                })
            } else {
                Ok(())
            }
        };
        check_vector(st.config_msix_vector)?;
        let mut new_queues = Vec::with_capacity(st.queues.len());
        for (index, (q, &max)) in st.queues.iter().zip(&self.max_sizes).enumerate() {
            if q.size == 0 || q.size > max || !q.size.is_power_of_two() {
                return Err(StateError::QueueSize {
                    index,
                    size: q.size,
                    max,
                });
            }
            check_vector(q.msix_vector)?;
            let mut rq = Queue::new(max).map_err(|_| StateError::QueueSize {
                index,
                size: q.size,
                max,
            })?;
            if q.enabled {
                configure_queue(&mut rq, q, st.negotiated_features())
                    .map_err(|addr| StateError::RingAlignment { index, addr })?;
            }
            new_queues.push(rq);
        }

        self.device.reset();
        self.activated = false;
        self.st = st.clone();
        self.queues = new_queues;
        for q in self.st.queues.iter_mut().filter(|q| !q.enabled) {
            q.next_avail = 0;
            q.next_used = 0;
        }
        self.held_queue_irqs.fill(false);
        self.held_config_irq = false;
        // Rings a state puts outside guest memory cannot be served: as for
        // a driver enabling such a queue, the device needs a reset (and
        // says so) instead of leaving the queue silently wedged.
        let bad_rings: Vec<usize> = {
            let mem = self.mem.memory();
            self.st
                .queues
                .iter()
                .zip(&self.queues)
                .enumerate()
                .filter(|(_, (q, rq))| q.enabled && !rq.is_valid(&*mem))
                .map(|(i, _)| i)
                .collect()
        };
        if !bad_rings.is_empty() {
            warn!("virtio-pci: applied state has queues {bad_rings:?} with rings outside guest memory; device needs reset");
            self.set_needs_reset();
        }
        if self.st.driver_ok() && self.st.device_status & STATUS_DEVICE_NEEDS_RESET == 0 {
            self.activate_device();
        }
        Ok(())
    }

    // ---- mode ----------------------------------------------------------------

    /// Changes the mode. Entering Active from Stop or Freeze delivers the
    /// interrupts held back and serves every enabled queue once, as if
    /// notified.
    pub fn set_mode(&mut self, mode: TransportMode) {
        let old = self.mode;
        self.mode = mode;
        if mode == TransportMode::Active && old != TransportMode::Active {
            if std::mem::take(&mut self.held_config_irq) {
                self.send_config_interrupt();
            }
            for i in 0..self.num_queues() {
                let held = self
                    .held_queue_irqs
                    .get_mut(usize::from(i))
                    .map(std::mem::take)
                    .unwrap_or(false);
                if held {
                    self.send_queue_interrupt(i);
                }
            }
            for i in 0..self.num_queues() {
                self.process_queue(i);
            }
        }
    }

    // ---- queues and interrupts ---------------------------------------------

    /// Serves queue `index` as if its doorbell rang: the device takes the
    /// available chains, and the queue's MSI-X vector is triggered if the
    /// used ring was written and the driver did not suppress the
    /// notification. Returns whether the used ring was written.
    ///
    /// Does nothing unless the driver set DRIVER_OK, the device does not
    /// need a reset, bus mastering is enabled, the queue is enabled and the
    /// function is Active (in Stop the queue is served on the return to
    /// Active).
    pub fn process_queue(&mut self, index: u16) -> bool {
        if self.mode != TransportMode::Active || self.holding {
            return false;
        }
        let i = usize::from(index);
        if i >= self.queues.len()
            || !self.activated
            || self.st.device_status & STATUS_DEVICE_NEEDS_RESET != 0
            || !self.st.queues[i].enabled
        {
            return false;
        }
        if !self.config.bus_master_enabled() {
            debug!("virtio-pci: queue {index} notified while bus mastering is off");
            return false;
        }
        let mem = self.mem.memory();
        let queue = &mut self.queues[i];
        let res = if index < self.num_device_queues {
            self.device.process_queue(index, queue, &mem)
        } else {
            self.device
                .process_admin_queue(index - self.num_device_queues, queue, &mem)
        };
        match res {
            Ok(served) => {
                let notify = served.used && driver_wants_interrupt(queue, &mem);
                drop(mem);
                if served.more {
                    // Budget used up: come back after everything else the
                    // device thread has to serve.
                    if let Err(e) = self.events[i].write(1) {
                        warn!("virtio-pci: cannot re-signal queue {index}: {e}");
                    }
                }
                if notify {
                    self.send_queue_interrupt(index);
                }
                served.used
            }
            Err(e) => {
                drop(mem);
                warn!("virtio-pci: queue {index} failed, device needs reset: {e}");
                self.set_needs_reset();
                false
            }
        }
    }

    /// Puts the requests the device finished on its worker on their used
    /// rings, one interrupt per queue (unless suppressed). Returns whether
    /// any was completed.
    pub fn complete_requests(&mut self) -> bool {
        let mut done = std::mem::take(&mut self.completions);
        self.device.take_completions(&mut done);
        let mut touched: Vec<u16> = Vec::new();
        for c in done.drain(..) {
            if self.put_used(c.queue, c.head, c.len) && !touched.contains(&c.queue) {
                touched.push(c.queue);
            }
        }
        self.completions = done;
        for &q in &touched {
            self.notify_used(q);
        }
        !touched.is_empty()
    }

    /// Holds (or releases) new requests: while held, notified queues are
    /// not served, but requests already taken still complete. A member
    /// quiescing for Stop or Freeze holds until its requests in flight
    /// are done (R-MODE-3); the queues are examined again on the way back
    /// to Active (R-MODE-4).
    pub fn hold_requests(&mut self, hold: bool) {
        self.holding = hold;
    }

    /// Whether new requests are held.
    pub fn holding_requests(&self) -> bool {
        self.holding
    }

    /// Waits for the device's requests in flight and completes them.
    pub fn drain(&mut self) {
        self.device.wait_idle();
        self.complete_requests();
    }

    /// Sends queue `index`'s interrupt (for a device that completed
    /// requests outside [`Self::process_queue`]); held back while not
    /// Active.
    pub fn signal_used_queue(&mut self, index: u16) {
        self.send_queue_interrupt(index);
    }

    /// Completes a chain outside [`Self::process_queue`] (a device that
    /// finishes requests later, out of order): puts `head` with `len` on
    /// queue `index`'s used ring and interrupts the driver unless it
    /// suppressed the notification. Refused (returns `false`, nothing
    /// written) when the queue is not enabled, the device is not activated,
    /// bus mastering is off, or the function is not Active.
    pub fn complete_chain(&mut self, index: u16, head: u16, len: u32) -> bool {
        if !self.put_used(index, head, len) {
            return false;
        }
        self.notify_used(index);
        true
    }

    /// Writes one used element (see [`Self::complete_chain`]) without
    /// interrupting.
    fn put_used(&mut self, index: u16, head: u16, len: u32) -> bool {
        let i = usize::from(index);
        if self.mode != TransportMode::Active
            || !self.activated
            || !self.config.bus_master_enabled()
            || !self.st.queues.get(i).is_some_and(|q| q.enabled)
        {
            warn!("virtio-pci: completion of chain {head} on queue {index} dropped: the queue cannot take it now");
            return false;
        }
        if head >= self.st.queues[i].size {
            warn!("virtio-pci: completion of chain {head} on queue {index} is out of range");
            return false;
        }
        let mem = self.mem.memory();
        let queue = &mut self.queues[i];
        if let Err(e) = queue.add_used(&*mem, head, len) {
            drop(mem);
            warn!("virtio-pci: completing chain {head} on queue {index} failed: {e}");
            self.set_needs_reset();
            return false;
        }
        true
    }

    /// Interrupts the driver of queue `index` for what was put on its used
    /// ring, unless it suppressed the notification.
    fn notify_used(&mut self, index: u16) {
        let Some(queue) = self.queues.get_mut(usize::from(index)) else {
            return;
        };
        let mem = self.mem.memory();
        let notify = driver_wants_interrupt(queue, &mem);
        drop(mem);
        if notify {
            self.send_queue_interrupt(index);
        }
    }

    /// The virtqueue `index` as virtio-queue runs it, mutably (for a device
    /// serving it outside [`Self::process_queue`]).
    pub fn queue_mut(&mut self, index: u16) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(index))
    }

    /// The device configuration changed: bumps `config_generation` and
    /// sends the configuration interrupt.
    pub fn config_changed(&mut self) {
        self.st.config_generation = self.st.config_generation.wrapping_add(1);
        self.send_config_interrupt();
    }

    /// Sets `DEVICE_NEEDS_RESET` and sends the configuration interrupt.
    pub fn set_needs_reset(&mut self) {
        if self.st.device_status & STATUS_DEVICE_NEEDS_RESET == 0 {
            self.st.device_status |= STATUS_DEVICE_NEEDS_RESET;
            self.send_config_interrupt();
        }
    }

    fn send_queue_interrupt(&mut self, index: u16) {
        let Some(q) = self.st.queues.get(usize::from(index)) else {
            return;
        };
        if self.mode != TransportMode::Active {
            if let Some(h) = self.held_queue_irqs.get_mut(usize::from(index)) {
                *h = true;
            }
            return;
        }
        let vector = q.msix_vector;
        self.st.isr |= ISR_QUEUE;
        if self.msix.enabled() && vector != VIRTIO_MSI_NO_VECTOR {
            if let Err(e) = self.msix.trigger(vector) {
                warn!("virtio-pci: interrupt of queue {index} (vector {vector}) failed: {e}");
            }
        }
    }

    fn send_config_interrupt(&mut self) {
        if self.mode != TransportMode::Active {
            self.held_config_irq = true;
            return;
        }
        self.st.isr |= ISR_CONFIG;
        let vector = self.st.config_msix_vector;
        if self.msix.enabled() && vector != VIRTIO_MSI_NO_VECTOR {
            if let Err(e) = self.msix.trigger(vector) {
                warn!("virtio-pci: configuration interrupt (vector {vector}) failed: {e}");
            }
        }
    }

    // ---- resets --------------------------------------------------------------

    /// Virtio device reset (the driver wrote 0 to `device_status`): the
    /// device model is reset, every queue and register returns to its
    /// reset value. `config_generation`, the MSI-X table and the mode are
    /// kept.
    pub fn reset(&mut self) {
        if self.activated {
            event_monitor::event("virtio-device", "reset", &[("id", self.label.clone())]);
        }
        self.device.reset();
        self.activated = false;
        let generation = self.st.config_generation;
        self.st = VirtioPciState::reset_value(&self.max_sizes);
        self.st.config_generation = generation;
        for q in &mut self.queues {
            q.reset();
        }
        self.held_queue_irqs.fill(false);
        self.held_config_irq = false;
    }

    /// Names the function in events (its BDF).
    pub fn set_label(&mut self, label: impl Into<String>) {
        self.label = label.into();
    }

    /// The name given by [`VirtioPciDevice::set_label`].
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Function Level Reset: virtio reset, MSI-X reset and configuration
    /// space back to its defaults. The mode is kept.
    pub fn function_level_reset(&mut self) {
        self.reset();
        self.msix.reset();
        self.config.reset();
    }

    fn activate_device(&mut self) {
        let features = self.st.negotiated_features();
        let event_idx = features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        match self.device.activate(features) {
            Ok(()) => {
                self.activated = true;
                event_monitor::event("virtio-device", "activated", &[("id", self.label.clone())]);
            }
            Err(e) => {
                warn!("virtio-pci: activation failed: {e}");
                self.set_needs_reset();
            }
        }
    }

    // ---- BAR0 ----------------------------------------------------------------

    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < ISR_BAR_OFFSET => self.read_common(o, data),
            ISR_BAR_OFFSET => {
                // Read-to-clear, except in Freeze where the state is frozen.
                data[0] = self.st.isr;
                if self.mode != TransportMode::Freeze {
                    self.st.isr = 0;
                }
            }
            o if o < DEVICE_CFG_BAR_OFFSET => {}
            o if o < NOTIFY_BAR_OFFSET => {
                if let Some(end) = (o - DEVICE_CFG_BAR_OFFSET).checked_add(data.len() as u64) {
                    if end <= REGION_LEN {
                        self.device.read_config(o - DEVICE_CFG_BAR_OFFSET, data);
                    }
                }
            }
            o if o < MSIX_TABLE_BAR_OFFSET => {}
            o if o < MSIX_PBA_BAR_OFFSET => self.msix.read_table(o - MSIX_TABLE_BAR_OFFSET, data),
            o if o < MSIX_PBA_BAR_OFFSET + REGION_LEN => {
                self.msix.read_pba(o - MSIX_PBA_BAR_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < ISR_BAR_OFFSET => {
                if self.mode != TransportMode::Freeze {
                    self.write_common(o, data);
                } else if o == common_offset::DEVICE_STATUS && data == [0] {
                    // R-MODE-7: a virtio reset in Freeze still resets the
                    // member's virtio state (the mode stays).
                    debug!("virtio-pci: device reset in Freeze");
                    self.reset();
                } else {
                    debug!("virtio-pci: common config write at {o:#x} ignored in Freeze");
                }
            }
            o if o < DEVICE_CFG_BAR_OFFSET => debug!("virtio-pci: ISR write ignored"),
            o if o < NOTIFY_BAR_OFFSET => {
                if self.mode == TransportMode::Freeze {
                    debug!("virtio-pci: device config write ignored in Freeze");
                    return;
                }
                let off = o - DEVICE_CFG_BAR_OFFSET;
                if off
                    .checked_add(data.len() as u64)
                    .is_some_and(|e| e <= REGION_LEN)
                {
                    self.device.write_config(off, data);
                }
            }
            o if o < MSIX_TABLE_BAR_OFFSET => {
                let off = o - NOTIFY_BAR_OFFSET;
                let index = off / u64::from(NOTIFY_OFF_MULTIPLIER);
                if !off.is_multiple_of(u64::from(NOTIFY_OFF_MULTIPLIER)) {
                    debug!("virtio-pci: unaligned notify write at {off:#x} ignored");
                    return;
                }
                match self.events.get(index as usize) {
                    Some(ev) => {
                        if let Err(e) = ev.write(1) {
                            warn!("virtio-pci: failed to signal doorbell {index}: {e}");
                        }
                    }
                    None => debug!("virtio-pci: notify write for missing queue {index}"),
                }
            }
            o if o < MSIX_PBA_BAR_OFFSET => self.msix.write_table(o - MSIX_TABLE_BAR_OFFSET, data),
            o if o < MSIX_PBA_BAR_OFFSET + REGION_LEN => {
                self.msix.write_pba(o - MSIX_PBA_BAR_OFFSET, data)
            }
            _ => debug!("virtio-pci: write to reserved BAR0 offset {offset:#x} ignored"),
        }
    }

    // ---- the pci_cfg access window -----------------------------------------

    /// If `offset..offset+len` is the pci_cfg capability's data field,
    /// returns the BAR and offset it designates.
    fn pci_cfg_window(&self, offset: u16, len: usize) -> Option<(u8, u64, usize)> {
        let cap = self.pci_cfg_cap?;
        if offset != cap + CAP_PCI_CFG_DATA {
            return None;
        }
        let bar = self.config.read_u8(cap + CAP_BAR);
        let bar_off = u64::from(self.config.read_u32(cap + CAP_OFFSET));
        let length = self.config.read_u32(cap + CAP_LENGTH) as usize;
        let n = length.min(len);
        Some((bar, bar_off, n))
    }
}

/// Whether the driver wants an interrupt for what was just put on the used
/// ring: `used_event` with EVENT_IDX (virtio-queue's check), else the
/// available ring's `VIRTQ_AVAIL_F_NO_INTERRUPT` flag. When the rings
/// cannot be read, interrupt.
fn driver_wants_interrupt(queue: &mut Queue, mem: &DmaMemory) -> bool {
    let wanted = queue.needs_notification(mem).unwrap_or(true);
    if !wanted || queue.event_idx_enabled() {
        return wanted;
    }
    match mem.read_obj::<u16>(GuestAddress(queue.avail_ring())) {
        Ok(flags) => u16::from_le(flags) & VIRTQ_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

/// Programs a fresh queue from register state. Returns the offending
/// address if a ring breaks its alignment or the size is invalid.
fn configure_queue(q: &mut Queue, cfg: &QueueConfigState, features: u64) -> Result<(), u64> {
    q.try_set_size(cfg.size).map_err(|_| u64::from(cfg.size))?;
    q.try_set_desc_table_address(GuestAddress(cfg.desc_table))
        .map_err(|_| cfg.desc_table)?;
    q.try_set_avail_ring_address(GuestAddress(cfg.avail_ring))
        .map_err(|_| cfg.avail_ring)?;
    q.try_set_used_ring_address(GuestAddress(cfg.used_ring))
        .map_err(|_| cfg.used_ring)?;
    q.set_next_avail(cfg.next_avail);
    q.set_next_used(cfg.next_used);
    q.set_event_idx(features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0);
    q.set_ready(true);
    Ok(())
}

impl<D: VirtioDevice> PciDevice for VirtioPciDevice<D> {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        if let Some((bar, bar_off, n)) = self.pci_cfg_window(offset, data.len()) {
            data.fill(0);
            if n > 0 {
                self.bar_read(bar, bar_off, &mut data[..n]);
            }
            return;
        }
        self.config.read(offset, data);
        if self.options.function == FunctionKind::Virtual && (BAR0..BAR0 + 24).contains(&offset) {
            // A VF's BARs live in the PF's SR-IOV capability.
            data.fill(0);
        }
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<FunctionChange> {
        if !matches!(data.len(), 1 | 2 | 4) {
            return None;
        }
        if let Some((bar, bar_off, n)) = self.pci_cfg_window(offset, data.len()) {
            if n > 0 {
                self.bar_write(bar, bar_off, &data[..n]);
            }
            return None;
        }
        if self.options.function == FunctionKind::Virtual && (BAR0..BAR0 + 24).contains(&offset) {
            return None;
        }
        self.config.write(offset, data);
        self.msix
            .config_write(&self.config, self.msix_cap, offset, data.len());
        if self.pcie.flr_requested(offset, data) {
            debug!("virtio-pci: function level reset");
            self.function_level_reset();
        }
        None
    }

    fn decoded_bars(&self) -> Vec<BarRange> {
        match self.options.function {
            FunctionKind::Physical => self.config.decoded_bars(),
            FunctionKind::Virtual => self
                .vf_bar0
                .map(|base| BarRange {
                    index: 0,
                    kind: BarKind::Memory64,
                    base,
                    size: BAR0_SIZE,
                })
                .into_iter()
                .collect(),
        }
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != 0 || !matches!(data.len(), 1 | 2 | 4 | 8) || offset >= BAR0_SIZE {
            data.fill(0xff);
            return;
        }
        if offset + data.len() as u64 > BAR0_SIZE {
            data.fill(0xff);
            return;
        }
        self.bar0_read(offset, data);
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != 0
            || !matches!(data.len(), 1 | 2 | 4 | 8)
            || offset
                .checked_add(data.len() as u64)
                .is_none_or(|e| e > BAR0_SIZE)
        {
            debug!(
                "virtio-pci: dropped BAR{bar} write at {offset:#x} of {} bytes",
                data.len()
            );
            return;
        }
        self.bar0_write(offset, data);
    }

    fn doorbells(&self) -> Vec<Doorbell> {
        let Some(base) = self.bar0_base() else {
            return Vec::new();
        };
        self.events
            .iter()
            .enumerate()
            .map(|(i, ev)| Doorbell {
                address: base + NOTIFY_BAR_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                len: 2,
                index: i as u16,
                event: Arc::clone(ev),
            })
            .collect()
    }

    fn doorbell(&mut self, index: u16) {
        if index == COMPLETION_EVENT {
            self.complete_requests();
            return;
        }
        if self.mode == TransportMode::Freeze {
            return;
        }
        self.process_queue(index);
    }

    fn work_events(&self) -> Vec<WorkEvent> {
        self.device
            .completion_event()
            .map(|event| WorkEvent {
                index: COMPLETION_EVENT,
                event,
            })
            .into_iter()
            .collect()
    }

    fn drain(&mut self) {
        VirtioPciDevice::drain(self)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.device.counters()
    }

    fn debug_state(&self) -> String {
        VirtioPciDevice::debug_state(self)
    }
}
