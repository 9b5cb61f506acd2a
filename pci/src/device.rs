//! The interface between a PCI function and the bus.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::Bdf;

/// A PCI function shared between the bus, the VMM's vCPU threads and its
/// device thread.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Whether a BAR decodes memory or I/O space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Memory32,
    Memory64,
    Io,
}

/// A BAR as currently decoded: programmed and enabled by the command
/// register (or, for a VF, by the PF's VF MSE bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRange {
    /// BAR index 0..6.
    pub index: u8,
    pub kind: BarKind,
    /// Guest physical (or I/O port) base address.
    pub base: u64,
    pub size: u64,
}

/// A doorbell inside a BAR that the VMM may turn into an ioeventfd: a write
/// of any value at `address` is the same as signalling `event`.
#[derive(Clone, Debug)]
pub struct Doorbell {
    /// Guest physical address (inside one of the function's decoded BARs).
    pub address: u64,
    /// Access length in bytes the driver uses (virtio: 2).
    pub len: u8,
    /// Device-local doorbell number, passed back to [`PciDevice::doorbell`].
    pub index: u16,
    /// Signalled by KVM (or by the device itself on an MMIO write that
    /// reached it because no ioeventfd was registered yet).
    pub event: Arc<EventFd>,
}

/// An eventfd of the function's own (not a guest doorbell) that the VMM
/// watches: when it is signalled, the VMM's device thread calls
/// [`PciDevice::doorbell`] with `index` (for example, a device whose disk
/// requests finished on its worker thread). Indices are chosen by the
/// function and do not collide with its doorbells'.
#[derive(Clone, Debug)]
pub struct WorkEvent {
    pub index: u16,
    pub event: Arc<EventFd>,
}

/// Functions that appeared or vanished as a side effect of a configuration
/// write (an SR-IOV PF setting or clearing VF Enable).
#[derive(Default)]
pub struct FunctionChange {
    pub added: Vec<(Bdf, SharedPciDevice)>,
    pub removed: Vec<Bdf>,
}

impl std::fmt::Debug for FunctionChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionChange")
            .field(
                "added",
                &self.added.iter().map(|(b, _)| *b).collect::<Vec<_>>(),
            )
            .field("removed", &self.removed)
            .finish()
    }
}

/// One PCI function as the bus sees it. Every method takes guest-controlled
/// input and must never panic: out-of-range offsets read as all-ones (or
/// zero where the PCI specification says so) and writes to them are dropped.
pub trait PciDevice: Send {
    /// Reads 1, 2 or 4 bytes of configuration space at `offset` (0..4096).
    fn config_read(&mut self, offset: u16, data: &mut [u8]);

    /// Writes 1, 2 or 4 bytes of configuration space at `offset`.
    /// Returns the functions this write created or removed, if any.
    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<FunctionChange>;

    /// The BARs currently decoded by this function.
    fn decoded_bars(&self) -> Vec<BarRange>;

    /// Reads from BAR `bar` at `offset` from its base.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);

    /// Writes to BAR `bar` at `offset` from its base.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);

    /// Doorbells the VMM may register as ioeventfds, at their current
    /// addresses. Called again whenever decoded BARs change.
    fn doorbells(&self) -> Vec<Doorbell> {
        Vec::new()
    }

    /// Doorbell `index` was rung (its event was signalled), or the work
    /// event with that index was. Runs on the VMM's device thread.
    fn doorbell(&mut self, _index: u16) {}

    /// The function's own events (see [`WorkEvent`]); they are watched
    /// whether or not its BARs decode. Called again whenever the VMM
    /// re-registers doorbells.
    fn work_events(&self) -> Vec<WorkEvent> {
        Vec::new()
    }

    /// Finishes every request the function has taken from the guest and
    /// delivers its completion, waiting for the function's workers if
    /// needed: afterwards nothing the function accepted is in flight. For
    /// a quiescent point (pause) and for tests that drive a device without
    /// the VMM's device thread.
    fn drain(&mut self) {}

    /// A human-readable account of the function's run-time state (queues,
    /// interrupts, modes) for the VMM's state dump, one item per line.
    /// Empty when the function has nothing worth reporting.
    fn debug_state(&self) -> String {
        String::new()
    }

    /// Counters for the VMM's `vm.counters` (`(name, value)`); none by
    /// default.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Creates interrupt routes for functions, including ones that appear at
/// run time (VFs).
pub trait InterruptManager: Send + Sync {
    /// A group of `vectors` MSI-X vectors for function `bdf`.
    fn create_group(
        &self,
        bdf: Bdf,
        vectors: u16,
    ) -> std::io::Result<Arc<dyn crate::InterruptSourceGroup>>;
}
