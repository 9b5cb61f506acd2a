//! The interface between a virtio device model and its transport.
//!
//! A device model (block, the PF, ...) knows its device type, its queues,
//! its feature bits and its device-specific configuration structure. It does
//! not know PCI, MSI-X or threads: the transport
//! ([`crate::transport::VirtioPciDevice`]) owns the virtqueues, negotiates
//! features with the driver, and calls [`VirtioDevice::process_queue`] when a
//! queue was notified. The call is a plain method call, so a unit test can
//! drive a device with no threads at all.
//!
//! # Queue numbering
//!
//! Queues `0..queue_max_sizes().len()` are the device-type queues. A device
//! with administration virtqueues (virtio 1.3 §2.12, `VIRTIO_F_ADMIN_VQ`)
//! declares them with [`VirtioDevice::admin_queue_max_sizes`]; they are
//! placed right after the device-type queues, so the first admin queue has
//! index `queue_max_sizes().len()` (reported to the driver as
//! `admin_queue_index`), and their count is reported as `admin_queue_num`.
//! Notifications of admin queues reach [`VirtioDevice::process_admin_queue`]
//! with the admin queue's number (0 for the first admin queue).

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use crate::block_io::Completion;
use crate::chain::ChainBuffers;

use vm_migration::DmaMemory;

/// virtio device type of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// virtio device type of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Feature bit: the device complies with virtio 1.0 or later.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: the device's DMA goes through the platform's IOMMU (its
/// addresses are bus addresses, which the driver maps), offered by the
/// transport of a function behind the virtio-iommu.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
/// Feature bit: the device supports the packed virtqueue layout.
pub const VIRTIO_F_RING_PACKED: u32 = 34;
/// Feature bit: the device is an SR-IOV physical function.
pub const VIRTIO_F_SR_IOV: u32 = 37;
/// Feature bit: the driver may reset queues individually (`queue_reset`).
pub const VIRTIO_F_RING_RESET: u32 = 40;
/// Feature bit: the device has administration virtqueues.
pub const VIRTIO_F_ADMIN_VQ: u32 = 41;
/// Feature bit: descriptors may refer to indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: `used_event` / `avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Errors a device model reports to its transport.
///
/// A device returns an error only when it cannot go on serving a queue (for
/// example, the rings are not in guest memory). A malformed request is not
/// an error: the device completes it with an error status, or with used
/// length 0, and keeps serving the queue. On an error the transport sets
/// `DEVICE_NEEDS_RESET` in the device status and raises a configuration
/// change interrupt.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("failed to read the available ring of queue {queue}: {source}")]
    AvailRing {
        queue: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("failed to write the used ring of queue {queue}: {source}")]
    UsedRing {
        queue: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {0} does not exist on this device")]
    NoSuchQueue(u16),
    #[error("failed to activate the device: {0}")]
    Activate(String),
    #[error("device backend failed: {0}")]
    Backend(String),
}

/// Result of device operations.
pub type Result<T> = std::result::Result<T, DeviceError>;

/// Most chains a device takes from one queue in one turn. A driver that
/// keeps its queue full cannot hold the device thread: past the budget the
/// device returns with [`Served::more`] and the transport notifies the queue
/// again, so the device thread serves everything else first.
pub const QUEUE_BUDGET: usize = 64;

/// What one turn of serving a queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// At least one used element was written.
    pub used: bool,
    /// The turn's budget ran out with chains possibly still available:
    /// serve the queue again (the transport re-signals its doorbell).
    pub more: bool,
}

/// A virtio device model, independent of its transport.
///
/// Every method may be reached by guest-controlled input (through the
/// transport) and must never panic.
pub trait VirtioDevice: Send {
    /// The virtio device type (1 = net, 2 = block, ...).
    fn device_type(&self) -> u32;

    /// The maximum size of each device-type queue, in queue order. Sizes
    /// are powers of two no larger than 32768. Admin queues are not listed
    /// here.
    fn queue_max_sizes(&self) -> &[u16];

    /// The maximum size of each administration virtqueue; empty (the
    /// default) when the device has none. Admin queues follow the
    /// device-type queues.
    fn admin_queue_max_sizes(&self) -> &[u16] {
        &[]
    }

    /// The feature bits the device offers. The transport adds the bits it
    /// implements itself (`VIRTIO_F_VERSION_1`, and `VIRTIO_F_RING_RESET`
    /// when enabled); a device must not offer transport bits it does not
    /// know the transport supports.
    fn features(&self) -> u64;

    /// Length in bytes of the device-specific configuration structure.
    fn config_len(&self) -> usize;

    /// Reads `data.len()` bytes of device configuration at `offset`. Bytes
    /// beyond [`VirtioDevice::config_len`] read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device configuration at `offset`. Read-only fields and
    /// out-of-range writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set DRIVER_OK after negotiating `features`. The queues
    /// the driver enabled are passed to `process_queue` from now on.
    fn activate(&mut self, features: u64) -> Result<()>;

    /// The driver reset the device (wrote 0 to `device_status`) or the
    /// function was reset. The device forgets its negotiated state; the
    /// transport resets the queues itself.
    fn reset(&mut self);

    /// Queue `index` (a device-type queue) was reset on its own through
    /// `queue_reset`. The device drops whatever it holds of that queue.
    fn queue_reset(&mut self, _index: u16) {}

    /// Queue `index` (a device-type queue) was notified: take the available
    /// descriptor chains from `queue` (at most [`QUEUE_BUDGET`] per call),
    /// serve them and put them on the used ring, or hand them to the
    /// device's own worker, which completes them later (see
    /// [`VirtioDevice::take_completions`]). Reports whether a used element
    /// was written (the transport then decides, from the queue's
    /// suppression state, whether to interrupt the driver) and whether the
    /// budget ran out.
    fn process_queue(&mut self, index: u16, queue: &mut Queue, mem: &DmaMemory) -> Result<Served>;

    /// Admin queue `admin_index` (0 for the first admin queue) was
    /// notified. Same contract as [`VirtioDevice::process_queue`]. Devices
    /// without admin queues never see this call.
    fn process_admin_queue(
        &mut self,
        admin_index: u16,
        _queue: &mut Queue,
        _mem: &DmaMemory,
    ) -> Result<Served> {
        Err(DeviceError::NoSuchQueue(admin_index))
    }

    /// For a device that completes requests on its own worker: the eventfd
    /// signalled when requests finish. The transport then calls
    /// [`VirtioDevice::take_completions`] and puts them on the used rings.
    fn completion_event(&self) -> Option<Arc<EventFd>> {
        None
    }

    /// Moves finished requests (queue, head, used length) into `out`.
    fn take_completions(&mut self, _out: &mut Vec<Completion>) {}

    /// Requests taken from the queues and not yet handed back by
    /// [`VirtioDevice::take_completions`].
    fn in_flight(&self) -> usize {
        0
    }

    /// Waits until every request taken has finished (their completions
    /// stay to be taken). `reset` and `queue_reset` do this themselves
    /// and drop the completions of what they reset.
    fn wait_idle(&mut self) {}

    /// Counters for `vm.counters` (`(name, value)`); none by default.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

impl<T: VirtioDevice + ?Sized> VirtioDevice for Box<T> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        (**self).queue_max_sizes()
    }
    fn admin_queue_max_sizes(&self) -> &[u16] {
        (**self).admin_queue_max_sizes()
    }
    fn features(&self) -> u64 {
        (**self).features()
    }
    fn config_len(&self) -> usize {
        (**self).config_len()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        (**self).write_config(offset, data)
    }
    fn activate(&mut self, features: u64) -> Result<()> {
        (**self).activate(features)
    }
    fn reset(&mut self) {
        (**self).reset()
    }
    fn queue_reset(&mut self, index: u16) {
        (**self).queue_reset(index)
    }
    fn process_queue(&mut self, index: u16, queue: &mut Queue, mem: &DmaMemory) -> Result<Served> {
        (**self).process_queue(index, queue, mem)
    }
    fn process_admin_queue(
        &mut self,
        admin_index: u16,
        queue: &mut Queue,
        mem: &DmaMemory,
    ) -> Result<Served> {
        (**self).process_admin_queue(admin_index, queue, mem)
    }
    fn completion_event(&self) -> Option<Arc<EventFd>> {
        (**self).completion_event()
    }
    fn take_completions(&mut self, out: &mut Vec<Completion>) {
        (**self).take_completions(out)
    }
    fn in_flight(&self) -> usize {
        (**self).in_flight()
    }
    fn wait_idle(&mut self) {
        (**self).wait_idle()
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        (**self).counters()
    }
}

/// Copies `src` (a device's configuration structure) into `data` starting
/// at `offset`; bytes past the end of `src` read as zero. Never panics.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= src.len() {
        return;
    }
    let n = data.len().min(src.len() - start);
    data[..n].copy_from_slice(&src[start..start + n]);
}

/// Serves the available chains of `queue` with `serve`, at most `budget` of
/// them. `serve` returns the used length of a chain it completed, or
/// `None` for a chain it keeps to complete later. Handles notification
/// suppression (both the `VRING_USED_F_NO_NOTIFY` flag and `avail_event`)
/// around the loop: notifications are re-enabled only once the queue is
/// seen empty, so a driver that adds buffers meanwhile is never missed.
/// When the budget runs out first the result says [`Served::more`].
pub fn serve_queue<F>(
    index: u16,
    queue: &mut Queue,
    mem: &DmaMemory,
    budget: usize,
    mut serve: F,
) -> Result<Served>
where
    F: FnMut(ChainBuffers) -> Option<u32>,
{
    let mut served = Served::default();
    let mut taken = 0usize;
    loop {
        queue
            .disable_notification(mem)
            .map_err(|source| DeviceError::UsedRing {
                queue: index,
                source,
            })?;
        loop {
            if taken >= budget {
                served.more = true;
                return Ok(served);
            }
            let chain = {
                let mut iter = queue.iter(mem).map_err(|source| DeviceError::AvailRing {
                    queue: index,
                    source,
                })?;
                iter.next()
            };
            let Some(chain) = chain else { break };
            taken += 1;
            let bufs = ChainBuffers::from_chain(chain);
            let head = bufs.head_index();
            if head >= queue.size() {
                // The driver published a head outside the ring: its
                // queue is broken (the device needs a reset).
                return Err(DeviceError::AvailRing {
                    queue: index,
                    source: virtio_queue::Error::InvalidDescriptorIndex,
                });
            }
            if let Some(len) = serve(bufs) {
                queue
                    .add_used(mem, head, len)
                    .map_err(|source| DeviceError::UsedRing {
                        queue: index,
                        source,
                    })?;
                served.used = true;
            }
        }
        let more = queue
            .enable_notification(mem)
            .map_err(|source| DeviceError::UsedRing {
                queue: index,
                source,
            })?;
        if !more {
            return Ok(served);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bytes_are_bounds_checked() {
        let src = [1u8, 2, 3, 4];
        let mut out = [0xffu8; 4];
        read_config_bytes(&src, 2, &mut out);
        assert_eq!(out, [3, 4, 0, 0]);
        read_config_bytes(&src, 4, &mut out);
        assert_eq!(out, [0; 4]);
        read_config_bytes(&src, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }
}
