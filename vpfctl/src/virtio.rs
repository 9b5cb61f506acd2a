//! A modern virtio-pci function driven from userspace: capabilities from
//! the sysfs config file, BARs through `resourceN` mmap, the common
//! configuration registers, queue setup and doorbells.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dma::Mem;
use crate::error::{Error, Result};
use crate::mmio::{Bar, Region, Regs};
use crate::pci::{self, VirtioCaps};
use crate::virtq::SplitQueue;

/// Common configuration register offsets (virtio 1.3 §4.1.4.3).
pub mod cc {
    /// le32 device_feature_select
    pub const DEVICE_FEATURE_SELECT: usize = 0x00;
    /// le32 device_feature
    pub const DEVICE_FEATURE: usize = 0x04;
    /// le32 driver_feature_select
    pub const DRIVER_FEATURE_SELECT: usize = 0x08;
    /// le32 driver_feature
    pub const DRIVER_FEATURE: usize = 0x0c;
    /// le16 config_msix_vector
    pub const CONFIG_MSIX_VECTOR: usize = 0x10;
    /// le16 num_queues
    pub const NUM_QUEUES: usize = 0x12;
    /// u8 device_status
    pub const DEVICE_STATUS: usize = 0x14;
    /// u8 config_generation
    pub const CONFIG_GENERATION: usize = 0x15;
    /// le16 queue_select
    pub const QUEUE_SELECT: usize = 0x16;
    /// le16 queue_size
    pub const QUEUE_SIZE: usize = 0x18;
    /// le16 queue_msix_vector
    pub const QUEUE_MSIX_VECTOR: usize = 0x1a;
    /// le16 queue_enable
    pub const QUEUE_ENABLE: usize = 0x1c;
    /// le16 queue_notify_off
    pub const QUEUE_NOTIFY_OFF: usize = 0x1e;
    /// le64 queue_desc
    pub const QUEUE_DESC: usize = 0x20;
    /// le64 queue_driver
    pub const QUEUE_DRIVER: usize = 0x28;
    /// le64 queue_device
    pub const QUEUE_DEVICE: usize = 0x30;
    /// le16 admin_queue_index
    pub const ADMIN_QUEUE_INDEX: usize = 0x3c;
    /// le16 admin_queue_num
    pub const ADMIN_QUEUE_NUM: usize = 0x3e;
}

/// Device status bits.
pub mod st {
    /// ACKNOWLEDGE
    pub const ACKNOWLEDGE: u8 = 1;
    /// DRIVER
    pub const DRIVER: u8 = 2;
    /// DRIVER_OK
    pub const DRIVER_OK: u8 = 4;
    /// FEATURES_OK
    pub const FEATURES_OK: u8 = 8;
    /// DEVICE_NEEDS_RESET
    pub const NEEDS_RESET: u8 = 0x40;
    /// FAILED
    pub const FAILED: u8 = 0x80;
}

/// VIRTIO_F_VERSION_1
pub const F_VERSION_1: u32 = 32;
/// VIRTIO_F_SR_IOV
pub const F_SR_IOV: u32 = 37;
/// VIRTIO_F_ADMIN_VQ
pub const F_ADMIN_VQ: u32 = 41;
/// MSI-X "no vector".
pub const NO_VECTOR: u16 = 0xffff;

/// A modern virtio-pci function mapped into this process.
#[derive(Debug)]
pub struct VirtioPci {
    /// Function address.
    pub bdf: String,
    /// Parsed capabilities.
    pub caps: VirtioCaps,
    common: Box<dyn Regs>,
    notify: Box<dyn Regs>,
    isr: Option<Box<dyn Regs>>,
    device: Option<Box<dyn Regs>>,
}

impl VirtioPci {
    /// Map a function's virtio structures. `prepare` has been done by the
    /// caller (driver binding); this enables memory decoding and bus
    /// mastering in the command register.
    pub fn open(bdf: &str) -> Result<VirtioPci> {
        // Virtio capabilities are in the standard space: 64 configuration
        // accesses instead of 1024 for the whole 4 KiB.
        let cfg = pci::read_config_std(bdf)?;
        let caps = pci::parse_virtio_caps(&cfg).map_err(|m| Error::device(bdf, m))?;
        pci::enable_mem_and_bus_master(bdf)?;
        Self::from_bars(bdf, caps, |n| Bar::map(&pci::resource_path(bdf, n)))
    }

    /// The function whose capabilities are `caps`, its BARs mapped by
    /// `map_bar` (each BAR once): sysfs `resourceN` or a VFIO region.
    pub fn from_bars(
        bdf: &str,
        caps: VirtioCaps,
        mut map_bar: impl FnMut(u8) -> Result<Arc<Bar>>,
    ) -> Result<VirtioPci> {
        let mut bars: HashMap<u8, Arc<Bar>> = HashMap::new();
        let mut bar = |n: u8| -> Result<Arc<Bar>> {
            if let Some(b) = bars.get(&n) {
                return Ok(b.clone());
            }
            let b = map_bar(n)?;
            bars.insert(n, b.clone());
            Ok(b)
        };
        let c = caps.common;
        let common = Region::new(
            bar(c.bar)?,
            c.offset,
            c.length,
            0x40,
            "common configuration",
        )?;
        let n = caps.notify;
        let notify = Region::new(bar(n.bar)?, n.offset, n.length, 2, "notification")?;
        let isr: Option<Box<dyn Regs>> = match caps.isr {
            Some(r) => Some(Box::new(Region::new(
                bar(r.bar)?,
                r.offset,
                r.length,
                1,
                "ISR",
            )?)),
            None => None,
        };
        let device: Option<Box<dyn Regs>> = match caps.device {
            Some(r) => Some(Box::new(Region::new(
                bar(r.bar)?,
                r.offset,
                r.length,
                0,
                "device configuration",
            )?)),
            None => None,
        };
        Ok(VirtioPci::from_regs(
            bdf,
            caps,
            Box::new(common),
            Box::new(notify),
            isr,
            device,
        ))
    }

    /// A function whose structures are reached through `regs` (used by
    /// [`VirtioPci::open`], and by host tests with an in-process device).
    pub fn from_regs(
        bdf: &str,
        caps: VirtioCaps,
        common: Box<dyn Regs>,
        notify: Box<dyn Regs>,
        isr: Option<Box<dyn Regs>>,
        device: Option<Box<dyn Regs>>,
    ) -> VirtioPci {
        VirtioPci {
            bdf: bdf.to_string(),
            caps,
            common,
            notify,
            isr,
            device,
        }
    }

    /// `device_status`.
    pub fn status(&self) -> u8 {
        self.common.r8(cc::DEVICE_STATUS)
    }

    /// Write `device_status`.
    pub fn set_status(&self, s: u8) {
        self.common.w8(cc::DEVICE_STATUS, s)
    }

    /// Reset the device and wait until it reads back 0.
    pub fn reset(&self, timeout: Duration) -> Result<()> {
        self.set_status(0);
        let t = Instant::now();
        while self.status() != 0 {
            if t.elapsed() > timeout {
                return Err(Error::Timeout {
                    ms: timeout.as_millis() as u64,
                    what: format!("{} to finish reset (status {:#x})", self.bdf, self.status()),
                });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    /// Features the device offers (words 0 and 1).
    pub fn device_features(&self) -> u64 {
        self.common.w32(cc::DEVICE_FEATURE_SELECT, 0);
        let lo = self.common.r32(cc::DEVICE_FEATURE);
        self.common.w32(cc::DEVICE_FEATURE_SELECT, 1);
        let hi = self.common.r32(cc::DEVICE_FEATURE);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, negotiate `wanted ∩ offered` (failing if
    /// any of `required` is missing), FEATURES_OK. Returns the features.
    pub fn init(&self, wanted: u64, required: u64, timeout: Duration) -> Result<u64> {
        self.reset(timeout)?;
        self.set_status(st::ACKNOWLEDGE);
        self.set_status(st::ACKNOWLEDGE | st::DRIVER);
        let offered = self.device_features();
        if offered & required != required {
            self.set_status(st::FAILED);
            return Err(Error::device(
                &self.bdf,
                format!(
                    "device offers features {offered:#x}, missing required {:#x}",
                    required & !offered
                ),
            ));
        }
        let f = offered & wanted;
        self.common.w32(cc::DRIVER_FEATURE_SELECT, 0);
        self.common.w32(cc::DRIVER_FEATURE, f as u32);
        self.common.w32(cc::DRIVER_FEATURE_SELECT, 1);
        self.common.w32(cc::DRIVER_FEATURE, (f >> 32) as u32);
        self.set_status(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK);
        if self.status() & st::FEATURES_OK == 0 {
            self.set_status(st::FAILED);
            return Err(Error::device(
                &self.bdf,
                format!("device refused features {f:#x} (FEATURES_OK not set)"),
            ));
        }
        self.common.w16(cc::CONFIG_MSIX_VECTOR, NO_VECTOR);
        Ok(f)
    }

    /// `num_queues`.
    pub fn num_queues(&self) -> u16 {
        self.common.r16(cc::NUM_QUEUES)
    }

    /// `(admin_queue_index, admin_queue_num)`.
    pub fn admin_queue(&self) -> (u16, u16) {
        (
            self.common.r16(cc::ADMIN_QUEUE_INDEX),
            self.common.r16(cc::ADMIN_QUEUE_NUM),
        )
    }

    /// Maximum size of queue `index` (0 = queue unavailable).
    pub fn queue_max_size(&self, index: u16) -> u16 {
        self.common.w16(cc::QUEUE_SELECT, index);
        self.common.r16(cc::QUEUE_SIZE)
    }

    /// Program queue `index` with `q`'s rings in `mem` and enable it; no
    /// MSI-X vector (we poll). Returns the queue's notify offset.
    pub fn setup_queue<M: Mem + ?Sized>(&self, index: u16, q: &SplitQueue, mem: &M) -> Result<u16> {
        let c = &self.common;
        c.w16(cc::QUEUE_SELECT, index);
        let max = c.r16(cc::QUEUE_SIZE);
        if max == 0 || q.size() > max {
            return Err(Error::device(
                &self.bdf,
                format!("queue {index}: maximum size {max}, wanted {}", q.size()),
            ));
        }
        c.w16(cc::QUEUE_SIZE, q.size());
        c.w16(cc::QUEUE_MSIX_VECTOR, NO_VECTOR);
        c.w64_halves(cc::QUEUE_DESC, mem.phys(q.desc_off()));
        c.w64_halves(cc::QUEUE_DRIVER, mem.phys(q.avail_off()));
        c.w64_halves(cc::QUEUE_DEVICE, mem.phys(q.used_off()));
        c.w16(cc::QUEUE_ENABLE, 1);
        if c.r16(cc::QUEUE_ENABLE) != 1 {
            return Err(Error::device(
                &self.bdf,
                format!("queue {index} did not enable"),
            ));
        }
        Ok(c.r16(cc::QUEUE_NOTIFY_OFF))
    }

    /// `queue_desc` of queue `index` (read as two 32-bit halves).
    pub fn queue_desc(&self, index: u16) -> u64 {
        self.common.w16(cc::QUEUE_SELECT, index);
        u64::from(self.common.r32(cc::QUEUE_DESC))
            | (u64::from(self.common.r32(cc::QUEUE_DESC + 4)) << 32)
    }

    /// `queue_notify_off` of queue `index`.
    pub fn queue_notify_off(&self, index: u16) -> u16 {
        self.common.w16(cc::QUEUE_SELECT, index);
        self.common.r16(cc::QUEUE_NOTIFY_OFF)
    }

    /// Set DRIVER_OK and check the device did not fail.
    pub fn driver_ok(&self) -> Result<()> {
        let s = self.status();
        self.set_status(s | st::DRIVER_OK);
        let now = self.status();
        if now & (st::NEEDS_RESET | st::FAILED) != 0 || now & st::DRIVER_OK == 0 {
            return Err(Error::device(
                &self.bdf,
                format!("device status {now:#x} after DRIVER_OK"),
            ));
        }
        Ok(())
    }

    /// Ring the doorbell of queue `index` (notify offset `notify_off`).
    pub fn notify(&self, index: u16, notify_off: u16) {
        let off = usize::from(notify_off) * self.caps.notify_multiplier as usize;
        self.notify.w16(off, index);
    }

    /// Check a queue's doorbell lies inside the notify structure.
    pub fn check_notify(&self, notify_off: u16) -> Result<()> {
        let off = usize::from(notify_off) * self.caps.notify_multiplier as usize;
        if off + 2 > self.notify.len() {
            return Err(Error::device(
                &self.bdf,
                format!(
                    "queue_notify_off {notify_off} × {} is outside the {:#x}-byte notify area",
                    self.caps.notify_multiplier,
                    self.notify.len()
                ),
            ));
        }
        Ok(())
    }

    /// Read (and so clear) the ISR status byte.
    pub fn read_isr(&self) -> u8 {
        self.isr.as_ref().map(|r| r.r8(0)).unwrap_or(0)
    }

    /// A `u32` of the device configuration.
    pub fn device_cfg_r32(&self, off: usize) -> Option<u32> {
        let d = self.device.as_ref()?;
        (off + 4 <= d.len()).then(|| d.r32(off))
    }
}
