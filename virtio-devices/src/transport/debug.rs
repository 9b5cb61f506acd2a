//! The transport's part of the VMM's state dump: what a person chasing a
//! stalled guest needs to see of a function at a glance.

use std::fmt::Write;
use std::os::fd::AsRawFd;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioPciDevice, STATUS_DEVICE_NEEDS_RESET, VIRTIO_MSI_NO_VECTOR};
use crate::device::VirtioDevice;

/// Whether `ev` has a count waiting (without consuming it).
pub(crate) fn event_pending(ev: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: ev.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd that lives across the call; a zero
    // timeout makes poll return at once.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

fn read_u16<M: Bytes<GuestAddress>>(mem: &M, addr: u64) -> String {
    match mem.read_obj::<u16>(GuestAddress(addr)) {
        Ok(v) => u16::from_le(v).to_string(),
        Err(_) => "unreadable".into(),
    }
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// One line for the function and one per enabled queue: device status,
    /// mode, MSI-X state; for each queue the device's ring positions, the
    /// driver's indices and flags as they are in guest memory now, the
    /// suppression fields, a held interrupt and an unserved doorbell.
    pub fn debug_state(&self) -> String {
        let mut out = String::new();
        let st = &self.st;
        let _ = write!(
            out,
            "status={:#04x}{} activated={} mode={:?} features={:#x} bus_master={} msix: enabled={} function_mask={}",
            st.device_status,
            if st.device_status & STATUS_DEVICE_NEEDS_RESET != 0 {
                " (NEEDS_RESET)"
            } else {
                ""
            },
            self.activated,
            self.mode,
            st.negotiated_features(),
            self.config.bus_master_enabled(),
            self.msix.enabled(),
            self.msix.function_masked(),
        );
        let pending: Vec<u16> = (0..self.msix.num_vectors())
            .filter(|&v| self.msix.pending(v))
            .collect();
        if !pending.is_empty() {
            let _ = write!(out, " pending_vectors={pending:?}");
        }
        if self.held_config_irq {
            let _ = write!(out, " held_config_irq");
        }
        let mem = self.mem.memory();
        for (i, (q, rq)) in st.queues.iter().zip(&self.queues).enumerate() {
            let doorbell = self.events.get(i).is_some_and(|e| event_pending(e));
            if !q.enabled {
                if doorbell {
                    let _ = write!(out, "\nqueue {i}: disabled, doorbell pending");
                }
                continue;
            }
            let size = u64::from(q.size);
            let vector = if q.msix_vector == VIRTIO_MSI_NO_VECTOR {
                "none".to_string()
            } else {
                format!(
                    "{}{}",
                    q.msix_vector,
                    if self.msix.effectively_masked(q.msix_vector) {
                        " (masked)"
                    } else {
                        ""
                    }
                )
            };
            let _ = write!(
                out,
                "\nqueue {i}: size={} next_avail={} next_used={} avail.idx={} avail.flags={} used.idx={} used.flags={} event_idx={} used_event={} avail_event={} vector={vector}{}{}",
                q.size,
                rq.next_avail(),
                rq.next_used(),
                read_u16(&*mem, q.avail_ring.wrapping_add(2)),
                read_u16(&*mem, q.avail_ring),
                read_u16(&*mem, q.used_ring.wrapping_add(2)),
                read_u16(&*mem, q.used_ring),
                rq.event_idx_enabled(),
                read_u16(&*mem, q.avail_ring.wrapping_add(4 + 2 * size)),
                read_u16(&*mem, q.used_ring.wrapping_add(4 + 8 * size)),
                if self.held_queue_irqs.get(i).copied().unwrap_or(false) {
                    " held_irq"
                } else {
                    ""
                },
                if doorbell { " doorbell_pending" } else { "" },
            );
        }
        out
    }
}
