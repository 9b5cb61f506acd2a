//! Register semantics of the common configuration structure.
//!
//! Reads of any size at any offset return the bytes of
//! [`CommonCfg::to_bytes`] (zero past 64 bytes). Writes take effect only
//! when they hit a writable field with its natural size (or, for the 64-bit
//! ring addresses, one aligned 32-bit half); every other write is ignored.

use log::{debug, warn};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use super::state::common_offset::*;
use super::state::*;
use super::{configure_queue, VirtioPciDevice};
use crate::device::{VirtioDevice, VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1};

impl<D: VirtioDevice> VirtioPciDevice<D> {
    pub(super) fn read_common(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let img = self.common_cfg().to_bytes();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= img.len() {
            return;
        }
        let n = data.len().min(img.len() - start);
        data[..n].copy_from_slice(&img[start..start + n]);
    }

    pub(super) fn write_common(&mut self, offset: u64, data: &[u8]) {
        let v = match *data {
            [a] => u64::from(a),
            [a, b] => u64::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            _ => {
                debug!(
                    "virtio-pci: common config write of {} bytes ignored",
                    data.len()
                );
                return;
            }
        };
        let len = data.len();
        match (offset, len) {
            (DEVICE_FEATURE_SELECT, 4) => self.st.device_feature_select = v as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.st.driver_feature_select = v as u32,
            (DRIVER_FEATURE, 4) => self.write_driver_feature(v as u32),
            (CONFIG_MSIX_VECTOR, 2) => self.st.config_msix_vector = self.checked_vector(v as u16),
            (DEVICE_STATUS, 1) => self.write_device_status(v as u8),
            (QUEUE_SELECT, 2) => self.st.queue_select = v as u16,
            (QUEUE_SIZE, 2) => {
                if let Some(q) = self.configurable_queue() {
                    q.size = v as u16;
                }
            }
            (QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.checked_vector(v as u16);
                if let Some(q) = self.st.queues.get_mut(usize::from(self.st.queue_select)) {
                    q.msix_vector = vector;
                }
            }
            (QUEUE_ENABLE, 2) => {
                if v == 1 {
                    self.enable_selected_queue();
                } else {
                    debug!("virtio-pci: queue_enable write of {v} ignored");
                }
            }
            (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE, 8)
            | (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE, 4) => {
                self.write_ring_address(offset, 0, v, len)
            }
            (o, 4) if matches!(o, 0x24 | 0x2c | 0x34) => self.write_ring_address(o - 4, 32, v, 4),
            (QUEUE_RESET, 2) => {
                if v == 1 {
                    self.reset_selected_queue();
                }
            }
            _ => debug!("virtio-pci: common config write at {offset:#x} of {len} bytes ignored"),
        }
    }

    /// A vector the driver may use: in the table, else NO_VECTOR (which
    /// tells the driver the assignment failed).
    fn checked_vector(&self, v: u16) -> u16 {
        if v < self.msix.num_vectors() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn write_driver_feature(&mut self, v: u32) {
        if self.st.device_status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) != 0 {
            debug!("virtio-pci: driver_feature write after FEATURES_OK ignored");
            return;
        }
        let f = &mut self.st.driver_features;
        match self.st.driver_feature_select {
            0 => *f = (*f & !0xffff_ffff) | u64::from(v),
            1 => *f = (*f & 0xffff_ffff) | (u64::from(v) << 32),
            sel => {
                if v != 0 {
                    debug!("virtio-pci: driver features {v:#x} in word {sel} ignored");
                }
            }
        }
    }

    /// The selected queue's registers if they may be changed now: the
    /// queue exists and is not enabled.
    fn configurable_queue(&mut self) -> Option<&mut QueueConfigState> {
        let sel = self.st.queue_select;
        match self.st.queues.get_mut(usize::from(sel)) {
            Some(q) if !q.enabled => Some(q),
            Some(_) => {
                debug!("virtio-pci: write to enabled queue {sel} ignored");
                None
            }
            None => {
                debug!("virtio-pci: write to missing queue {sel} ignored");
                None
            }
        }
    }

    fn write_ring_address(&mut self, field: u64, shift: u32, v: u64, len: usize) {
        let Some(q) = self.configurable_queue() else {
            return;
        };
        let reg = match field {
            QUEUE_DESC => &mut q.desc_table,
            QUEUE_DRIVER => &mut q.avail_ring,
            _ => &mut q.used_ring,
        };
        if len == 8 {
            *reg = v;
        } else {
            let mask = 0xffff_ffffu64 << shift;
            *reg = (*reg & !mask) | ((v & 0xffff_ffff) << shift);
        }
    }

    fn features_acceptable(&self) -> bool {
        let f = self.st.driver_features;
        let extra = f & !self.offered_features();
        if extra != 0 {
            warn!("virtio-pci: driver accepted features {extra:#x} that were not offered");
            return false;
        }
        if f & (1u64 << VIRTIO_F_VERSION_1) == 0 {
            warn!("virtio-pci: driver did not accept VIRTIO_F_VERSION_1");
            return false;
        }
        true
    }

    fn write_device_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.st.device_status;
        // DEVICE_NEEDS_RESET belongs to the device.
        let mut new = (value & !STATUS_DEVICE_NEEDS_RESET) | (old & STATUS_DEVICE_NEEDS_RESET);
        if new & old != old {
            warn!(
                "virtio-pci: driver tried to clear status bits ({old:#x} -> {value:#x}); ignored"
            );
            return;
        }
        let added = new & !old;
        if added & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            new &= !STATUS_FEATURES_OK;
        }
        if added & STATUS_DRIVER_OK != 0 && new & STATUS_FEATURES_OK == 0 {
            warn!("virtio-pci: DRIVER_OK without FEATURES_OK ignored");
            new &= !STATUS_DRIVER_OK;
        }
        self.st.device_status = new;
        if new & !old & STATUS_DRIVER_OK != 0 && !self.activated {
            self.activate_device();
        }
    }

    fn enable_selected_queue(&mut self) {
        let i = usize::from(self.st.queue_select);
        let (Some(cfg), Some(&max)) = (self.st.queues.get(i), self.max_sizes.get(i)) else {
            debug!("virtio-pci: enable of missing queue {i} ignored");
            return;
        };
        if cfg.enabled {
            return;
        }
        let mut cfg = *cfg;
        cfg.next_avail = 0;
        cfg.next_used = 0;
        let features = self.st.negotiated_features();
        let valid = cfg.size != 0 && cfg.size <= max && cfg.size.is_power_of_two();
        let queue = &mut self.queues[i];
        queue.reset();
        let ok = valid && configure_queue(queue, &cfg, features).is_ok() && {
            let mem = self.mem.memory();
            queue.is_valid(&*mem)
        };
        if !ok {
            warn!(
                "virtio-pci: queue {i} enabled with invalid size {} or rings (desc {:#x}, avail {:#x}, used {:#x})",
                cfg.size, cfg.desc_table, cfg.avail_ring, cfg.used_ring
            );
            queue.reset();
            self.set_needs_reset();
            return;
        }
        let q = &mut self.st.queues[i];
        q.enabled = true;
        q.reset = false;
        q.next_avail = 0;
        q.next_used = 0;
    }

    fn reset_selected_queue(&mut self) {
        if self.st.negotiated_features() & (1u64 << VIRTIO_F_RING_RESET) == 0 {
            debug!("virtio-pci: queue_reset without VIRTIO_F_RING_RESET ignored");
            return;
        }
        let i = usize::from(self.st.queue_select);
        let (Some(q), Some(&max)) = (self.st.queues.get_mut(i), self.max_sizes.get(i)) else {
            debug!("virtio-pci: reset of missing queue {i} ignored");
            return;
        };
        *q = QueueConfigState::reset_value(max);
        q.reset = true;
        if let Some(rq) = self.queues.get_mut(i) {
            rq.reset();
        }
        if let Some(h) = self.held_queue_irqs.get_mut(i) {
            *h = false;
        }
        self.device.queue_reset(i as u16);
    }
}
