//! Transport and block tests driven through [`crate::test_driver`].

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use pci::PciDevice;
use virtio_queue::{Queue, QueueT};
use vm_migration::DmaMemory;

use super::*;
use crate::block::*;
use crate::device::{serve_queue, Served, VirtioDevice, QUEUE_BUDGET, VIRTIO_F_ADMIN_VQ};
use crate::test_driver::*;
use common_offset as co;

const BAR0_ADDR: u64 = 0x1_0000_0000;
const VERSION_1: u64 = 1 << 32;
const RING_RESET: u64 = 1 << 40;

// ---- fixtures ------------------------------------------------------------

/// A temporary disk image, removed on drop.
struct TempDisk {
    path: PathBuf,
}

impl TempDisk {
    fn new(sectors: u64) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "virtio-blk-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = std::fs::File::create(&path).unwrap();
        let data: Vec<u8> = (0..sectors * 512).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        TempDisk { path }
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn block_device(
    disk: &TempDisk,
    read_only: bool,
    drv: &TestDriver,
    options: VirtioPciOptions,
) -> VirtioPciDevice<Block> {
    let mut cfg = BlockConfig::new(&disk.path);
    cfg.read_only = read_only;
    cfg.serial = Some("test-serial-0123".into());
    cfg.queue_size = 16;
    let blk = Block::new(&cfg).unwrap();
    VirtioPciDevice::new(blk, drv.dma_atomic(), drv.interrupt_group(), options).unwrap()
}

/// A probed, negotiated, running block device.
fn running_block(
    sectors: u64,
    read_only: bool,
    wanted: u64,
) -> (TempDisk, TestDriver, VirtioPciDevice<Block>) {
    let disk = TempDisk::new(sectors);
    let mut drv = TestDriver::new(DEFAULT_MEM_SIZE);
    let mut dev = block_device(&disk, read_only, &drv, VirtioPciOptions::default());
    drv.probe(&mut dev, BAR0_ADDR).unwrap();
    drv.bring_up(&mut dev, wanted, 1).unwrap();
    drv.irqs().clear();
    (disk, drv, dev)
}

/// Rings doorbell `index` as the VMM's device thread does, then delivers
/// what the device's worker finished (the device thread would, when the
/// completion eventfd fires).
fn ring<D: VirtioDevice>(dev: &mut VirtioPciDevice<D>, index: u16) {
    PciDevice::doorbell(dev, index);
    dev.drain();
}

fn header(req_type: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&req_type.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn status_of(drv: &TestDriver, s: &Submitted) -> u8 {
    let (a, l) = *s.writable().last().unwrap();
    drv.read_mem(a + u64::from(l) - 1, 1).unwrap()[0]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// A device with two request queues and one admin queue that completes
/// every chain with used length 0 and counts what it served.
#[derive(Default)]
struct MockDevice {
    /// Admin chains are taken but left for the test to complete.
    defer_admin: bool,
    deferred: Vec<u16>,
    served: Vec<(bool, u16)>,
    activated: Option<u64>,
    resets: u32,
    queue_resets: Vec<u16>,
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn admin_queue_max_sizes(&self) -> &[u16] {
        &[32]
    }
    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_ADMIN_VQ) | (1 << 5)
    }
    fn config_len(&self) -> usize {
        4
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&[1, 2, 3, 4], offset, data)
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, features: u64) -> crate::device::Result<()> {
        self.activated = Some(features);
        Ok(())
    }
    fn reset(&mut self) {
        self.activated = None;
        self.resets += 1;
    }
    fn queue_reset(&mut self, index: u16) {
        self.queue_resets.push(index);
    }
    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &DmaMemory,
    ) -> crate::device::Result<Served> {
        let served = serve_queue(index, queue, mem, QUEUE_BUDGET, |_| Some(0))?;
        if served.used {
            self.served.push((false, index));
        }
        Ok(served)
    }
    fn process_admin_queue(
        &mut self,
        admin_index: u16,
        queue: &mut Queue,
        mem: &DmaMemory,
    ) -> crate::device::Result<Served> {
        if self.defer_admin {
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                self.deferred.push(chain.head_index());
            }
            return Ok(Served::default());
        }
        let served = serve_queue(admin_index, queue, mem, QUEUE_BUDGET, |_| Some(0))?;
        if served.used {
            self.served.push((true, admin_index));
        }
        Ok(served)
    }
}

fn mock_device(drv: &mut TestDriver) -> VirtioPciDevice<MockDevice> {
    let mut dev = VirtioPciDevice::new(
        MockDevice::default(),
        drv.dma_atomic(),
        drv.interrupt_group(),
        VirtioPciOptions::default(),
    )
    .unwrap();
    drv.probe(&mut dev, BAR0_ADDR).unwrap();
    dev
}

// ---- PCI presentation ------------------------------------------------------

#[test]
fn pci_identity_caps_and_bar0() {
    let disk = TempDisk::new(8);
    let mut drv = TestDriver::new(DEFAULT_MEM_SIZE);
    let mut dev = block_device(&disk, false, &drv, VirtioPciOptions::default());
    let d: &mut dyn PciDevice = &mut dev;
    assert_eq!(TestDriver::cfg_read16(d, 0x00), 0x1af4);
    assert_eq!(TestDriver::cfg_read16(d, 0x02), 0x1042);
    assert_eq!(TestDriver::cfg_read8(d, 0x08), 1);
    assert_eq!(TestDriver::cfg_read8(d, 0x0b), 0x01);
    assert_eq!(TestDriver::cfg_read16(d, 0x2c), 0x1af4);
    assert_eq!(TestDriver::size_bar0(d).unwrap(), BAR0_SIZE);
    // Extended configuration space exists (4 KiB): no all-ones there.
    assert_ne!(TestDriver::cfg_read32(d, 0xffc), 0xffff_ffff);
    assert!(dev.decoded_bars().is_empty());
    assert!(dev.doorbells().is_empty());

    let caps = drv.probe(&mut dev, BAR0_ADDR).unwrap();
    assert_eq!(caps.common.bar, 0);
    assert_eq!(caps.common.offset as u64, COMMON_CFG_BAR_OFFSET);
    assert_eq!(caps.notify.offset as u64, NOTIFY_BAR_OFFSET);
    assert_eq!(caps.notify_off_multiplier, NOTIFY_OFF_MULTIPLIER);
    assert_eq!(caps.isr.offset as u64, ISR_BAR_OFFSET);
    assert_eq!(caps.device.offset as u64, DEVICE_CFG_BAR_OFFSET);
    assert!(caps.pci_cfg.is_some());
    assert!(caps.pcie.is_some());
    let msix = caps.msix.unwrap();
    let d: &mut dyn PciDevice = &mut dev;
    // Table size field = vectors - 1 = 1 queue + config - 1.
    assert_eq!(TestDriver::cfg_read16(d, msix + 2) & 0x7ff, 1);
    assert_eq!(
        TestDriver::cfg_read32(d, msix + 4),
        MSIX_TABLE_BAR_OFFSET as u32
    );
    assert_eq!(
        TestDriver::cfg_read32(d, msix + 8),
        MSIX_PBA_BAR_OFFSET as u32
    );
    // PCIe capability advertises FLR (Device Capabilities bit 28).
    let pcie = caps.pcie.unwrap();
    assert_ne!(TestDriver::cfg_read32(d, pcie + 4) & (1 << 28), 0);

    let bars = dev.decoded_bars();
    assert_eq!(bars.len(), 1);
    assert_eq!(bars[0].base, BAR0_ADDR);
    assert_eq!(bars[0].size, BAR0_SIZE);
    let dbs = dev.doorbells();
    assert_eq!(dbs.len(), 1);
    assert_eq!(dbs[0].address, BAR0_ADDR + NOTIFY_BAR_OFFSET);
    assert_eq!(dbs[0].len, 2);
    assert_eq!(dbs[0].index, 0);
}

#[test]
fn mmio_notify_signals_the_doorbell_event() {
    let (_disk, drv, mut dev) = running_block(8, false, VERSION_1);
    let ev = Arc::clone(dev.queue_event(0).unwrap());
    assert!(ev.read().is_err(), "event must start unsignalled");
    let caps = *drv.caps().unwrap();
    TestDriver::region_write(&mut dev, &caps.notify, 0, 2, 0);
    assert_eq!(ev.read().unwrap(), 1);
    // A notify write for a missing queue or unaligned offset does nothing.
    TestDriver::region_write(&mut dev, &caps.notify, 4, 2, 1);
    TestDriver::region_write(&mut dev, &caps.notify, 1, 2, 0);
    assert!(ev.read().is_err());
}

// ---- common configuration -------------------------------------------------

#[test]
fn common_cfg_registers() {
    let disk = TempDisk::new(8);
    let mut drv = TestDriver::new(DEFAULT_MEM_SIZE);
    let mut dev = block_device(&disk, false, &drv, VirtioPciOptions::default());
    drv.probe(&mut dev, BAR0_ADDR).unwrap();
    let d: &mut dyn PciDevice = &mut dev;

    let c = drv.read_common_cfg(d);
    assert_eq!(c.num_queues, 1);
    assert_eq!(c.device_status, 0);
    assert_eq!(c.config_msix_vector, VIRTIO_MSI_NO_VECTOR);
    assert_eq!(c.queue_select, 0);
    assert_eq!(c.queue_size, 16);
    assert_eq!(c.queue_msix_vector, VIRTIO_MSI_NO_VECTOR);
    assert_eq!(c.queue_enable, 0);
    assert_eq!(c.queue_notify_off, 0);
    assert_eq!(c.queue_reset, 0);
    assert_eq!((c.admin_queue_index, c.admin_queue_num), (0, 0));

    // Device features: word 0 has block bits, word 1 VERSION_1 and
    // RING_RESET, word 2 is zero.
    let f = drv.device_features(d);
    assert_ne!(f & VERSION_1, 0);
    assert_ne!(f & RING_RESET, 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << 34), 0, "packed rings are not offered");
    drv.common_write(d, co::DEVICE_FEATURE_SELECT, 4, 2);
    assert_eq!(drv.common_read(d, co::DEVICE_FEATURE, 4), 0);

    // Driver features read back per word; words >= 2 are ignored.
    drv.write_driver_features(d, 0x1234_5678_9abc_def0);
    drv.common_write(d, co::DRIVER_FEATURE_SELECT, 4, 0);
    assert_eq!(drv.common_read(d, co::DRIVER_FEATURE, 4), 0x9abc_def0);
    drv.common_write(d, co::DRIVER_FEATURE_SELECT, 4, 1);
    assert_eq!(drv.common_read(d, co::DRIVER_FEATURE, 4), 0x1234_5678);
    drv.common_write(d, co::DRIVER_FEATURE_SELECT, 4, 5);
    drv.common_write(d, co::DRIVER_FEATURE, 4, 0xffff_ffff);
    assert_eq!(drv.common_read(d, co::DRIVER_FEATURE, 4), 0);

    // queue_select out of range: queue fields read 0, writes ignored.
    drv.common_write(d, co::QUEUE_SELECT, 2, 7);
    assert_eq!(drv.common_read(d, co::QUEUE_SIZE, 2), 0);
    drv.common_write(d, co::QUEUE_SIZE, 2, 4);
    drv.common_write(d, co::QUEUE_DESC, 8, 0x1000);
    drv.common_write(d, co::QUEUE_ENABLE, 2, 1);
    assert_eq!(drv.common_read(d, co::QUEUE_SIZE, 2), 0);
    assert_eq!(drv.common_read(d, co::QUEUE_DESC, 8), 0);
    assert_eq!(drv.common_read(d, co::QUEUE_SELECT, 2), 7);

    // Queue fields: size, vector validation, 32/64-bit address writes.
    drv.common_write(d, co::QUEUE_SELECT, 2, 0);
    drv.common_write(d, co::QUEUE_SIZE, 2, 8);
    assert_eq!(drv.common_read(d, co::QUEUE_SIZE, 2), 8);
    drv.common_write(d, co::QUEUE_MSIX_VECTOR, 2, 1);
    assert_eq!(drv.common_read(d, co::QUEUE_MSIX_VECTOR, 2), 1);
    drv.common_write(d, co::QUEUE_MSIX_VECTOR, 2, 2);
    assert_eq!(
        drv.common_read(d, co::QUEUE_MSIX_VECTOR, 2) as u16,
        VIRTIO_MSI_NO_VECTOR,
        "vector beyond the table"
    );
    drv.common_write(d, co::CONFIG_MSIX_VECTOR, 2, 9);
    assert_eq!(
        drv.common_read(d, co::CONFIG_MSIX_VECTOR, 2) as u16,
        VIRTIO_MSI_NO_VECTOR
    );
    drv.common_write(d, co::QUEUE_DESC, 4, 0x1234_5000);
    drv.common_write(d, co::QUEUE_DESC + 4, 4, 0x1);
    assert_eq!(drv.common_read(d, co::QUEUE_DESC, 8), 0x1_1234_5000);
    drv.common_write(d, co::QUEUE_DRIVER, 8, 0x2_0000_0002);
    assert_eq!(drv.common_read(d, co::QUEUE_DRIVER, 4), 2);
    assert_eq!(drv.common_read(d, co::QUEUE_DRIVER + 4, 4), 2);
    // Read-only fields ignore writes.
    drv.common_write(d, co::NUM_QUEUES, 2, 9);
    drv.common_write(d, co::QUEUE_NOTIFY_OFF, 2, 9);
    drv.common_write(d, co::CONFIG_GENERATION, 1, 9);
    drv.common_write(d, co::ADMIN_QUEUE_INDEX, 2, 9);
    let c = drv.read_common_cfg(d);
    assert_eq!((c.num_queues, c.queue_notify_off), (1, 0));
    assert_eq!((c.config_generation, c.admin_queue_index), (0, 0));
    // Odd sizes and offsets are ignored and never panic.
    d.bar_write(0, co::QUEUE_SIZE, &[1, 2, 3]);
    d.bar_write(0, co::QUEUE_SIZE + 1, &[1]);
    d.bar_write(0, 0x3c, &[0; 8]);
    d.bar_write(0, 0xff0, &[0; 4]);
    assert_eq!(drv.common_read(d, co::QUEUE_SIZE, 2), 8);
    let mut b = [0u8; 3];
    d.bar_read(0, 0, &mut b);
    assert_eq!(b, [0xff; 3]);
    // Byte reads of a 16-bit field.
    assert_eq!(drv.common_read(d, co::QUEUE_SIZE, 1), 8);
    assert_eq!(drv.common_read(d, co::QUEUE_SIZE + 1, 1), 0);
}

#[test]
fn status_state_machine_and_reset() {
    let disk = TempDisk::new(8);
    let mut drv = TestDriver::new(DEFAULT_MEM_SIZE);
    let mut dev = block_device(&disk, false, &drv, VirtioPciOptions::default());
    drv.probe(&mut dev, BAR0_ADDR).unwrap();

    // FEATURES_OK refused: without VERSION_1 ...
    assert!(matches!(
        drv.negotiate(&mut dev, 1 << VIRTIO_BLK_F_FLUSH),
        Err(DriverError::FeaturesRefused(3))
    ));
    // ... or with a feature that was not offered.
    drv.reset(&mut dev).unwrap();
    drv.set_status(&mut dev, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    drv.write_driver_features(&mut dev, VERSION_1 | (1 << VIRTIO_BLK_F_RO));
    drv.set_status(
        &mut dev,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(drv.status(&mut dev), 3);

    // DRIVER_OK without FEATURES_OK is not accepted.
    drv.set_status(&mut dev, 3 | STATUS_DRIVER_OK);
    assert_eq!(drv.status(&mut dev), 3);
    assert!(!dev.is_activated());

    // Linux order succeeds; after FEATURES_OK, driver_feature is frozen.
    let wanted = VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_BLK_SIZE);
    let f = drv.negotiate(&mut dev, wanted).unwrap();
    assert_eq!(f, wanted);
    drv.write_driver_features(&mut dev, VERSION_1);
    assert_eq!(dev.state().driver_features, wanted);
    assert_eq!(dev.negotiated_features(), wanted);

    // Clearing a bit (other than by writing 0) is ignored.
    drv.set_status(&mut dev, STATUS_ACKNOWLEDGE);
    assert_eq!(drv.status(&mut dev), 0xb);

    drv.enable_msix(&mut dev, 2).unwrap();
    drv.setup_queue(&mut dev, 0, Some(8), 1).unwrap();
    drv.driver_ok(&mut dev);
    assert_eq!(drv.status(&mut dev), 0xf);
    assert!(dev.is_activated());
    assert_eq!(dev.device().acked_features(), wanted);

    // Writes to an enabled queue are ignored.
    drv.common_write(&mut dev, co::QUEUE_SELECT, 2, 0);
    drv.common_write(&mut dev, co::QUEUE_SIZE, 2, 4);
    drv.common_write(&mut dev, co::QUEUE_DESC, 8, 0x8000);
    let c = drv.read_common_cfg(&mut dev);
    assert_eq!(c.queue_size, 8);
    assert_eq!(c.queue_enable, 1);
    assert_ne!(c.queue_desc, 0x8000);

    // Reset by writing 0: everything back to reset values, reads 0.
    drv.set_status(&mut dev, 0);
    assert_eq!(drv.status(&mut dev), 0);
    assert!(!dev.is_activated());
    assert_eq!(dev.device().acked_features(), 0);
    let c = drv.read_common_cfg(&mut dev);
    assert_eq!(c.queue_enable, 0);
    assert_eq!(c.queue_size, 16);
    assert_eq!(c.queue_desc, 0);
    assert_eq!(c.queue_msix_vector, VIRTIO_MSI_NO_VECTOR);
    assert_eq!(c.config_msix_vector, VIRTIO_MSI_NO_VECTOR);
    assert_eq!(dev.state(), VirtioPciState::reset_value(&[16]));
    // The MSI-X table survives a virtio reset.
    assert!(dev.msix().enabled());
}

#[test]
fn invalid_queue_enable_sets_needs_reset() {
    let disk = TempDisk::new(8);
    let mut drv = TestDriver::new(DEFAULT_MEM_SIZE);
    let mut dev = block_device(&disk, false, &drv, VirtioPciOptions::default());
    drv.probe(&mut dev, BAR0_ADDR).unwrap();
    drv.negotiate(&mut dev, VERSION_1).unwrap();
    drv.enable_msix(&mut dev, 2).unwrap();
    assert_eq!(drv.set_config_vector(&mut dev, 0), 0);
    drv.irqs().clear();

    // Size not a power of two.
    drv.common_write(&mut dev, co::QUEUE_SELECT, 2, 0);
    drv.common_write(&mut dev, co::QUEUE_SIZE, 2, 3);
    drv.common_write(&mut dev, co::QUEUE_ENABLE, 2, 1);
    assert_eq!(drv.common_read(&mut dev, co::QUEUE_ENABLE, 2), 0);
    assert_ne!(drv.status(&mut dev) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(drv.irqs().take_triggered(), vec![0]);

    // Rings outside guest memory.
    drv.negotiate(&mut dev, VERSION_1).unwrap();
    drv.common_write(&mut dev, co::QUEUE_SELECT, 2, 0);
    drv.common_write(&mut dev, co::QUEUE_DESC, 8, 0x40_0000_0000);
    drv.common_write(&mut dev, co::QUEUE_DRIVER, 8, 0x2000);
    drv.common_write(&mut dev, co::QUEUE_DEVICE, 8, 0x3000);
    drv.common_write(&mut dev, co::QUEUE_ENABLE, 2, 1);
    assert_eq!(drv.common_read(&mut dev, co::QUEUE_ENABLE, 2), 0);
    assert_ne!(drv.status(&mut dev) & STATUS_DEVICE_NEEDS_RESET, 0);
    // The driver echoing NEEDS_RESET or writing more bits keeps it set.
    let s = drv.status(&mut dev);
    drv.set_status(&mut dev, s | STATUS_DRIVER_OK);
    assert_ne!(drv.status(&mut dev) & STATUS_DEVICE_NEEDS_RESET, 0);
    // Reset clears it.
    drv.reset(&mut dev).unwrap();
}

#[test]
fn queue_reset_and_reenable() {
    let (disk, mut drv, mut dev) = running_block(8, false, VERSION_1 | RING_RESET);
    assert_ne!(drv.features() & RING_RESET, 0);
    let data = pattern(512, 3);
    let (_, u) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_OUT, 1)),
                Seg::Readable(data.clone()),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 1);

    drv.common_write(&mut dev, co::QUEUE_SELECT, 2, 0);
    drv.common_write(&mut dev, co::QUEUE_RESET, 2, 1);
    let c = drv.read_common_cfg(&mut dev);
    assert_eq!(c.queue_reset, 1);
    assert_eq!(c.queue_enable, 0);
    assert_eq!(c.queue_size, 16);
    assert_eq!(c.queue_desc, 0);
    assert_eq!(c.queue_msix_vector, VIRTIO_MSI_NO_VECTOR);
    assert_eq!(c.device_status, 0xf, "the device keeps running");
    // A doorbell of the reset queue does nothing.
    ring(&mut dev, 0);

    // Re-enable with fresh rings: queue_reset reads 0 again and the queue
    // serves requests from index 0.
    drv.setup_queue(&mut dev, 0, Some(8), 1).unwrap();
    assert_eq!(drv.common_read(&mut dev, co::QUEUE_RESET, 2), 0);
    let (s, u) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_IN, 1)),
                Seg::Writable(512),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 513);
    assert_eq!(drv.read_mem(s.writable()[0].0, 512).unwrap(), data);
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_OK);
    assert_eq!(&disk.contents()[512..1024], &data[..]);
}

#[test]
fn queue_reset_ignored_without_ring_reset() {
    let (_disk, drv, mut dev) = running_block(8, false, VERSION_1);
    drv.common_write(&mut dev, co::QUEUE_SELECT, 2, 0);
    drv.common_write(&mut dev, co::QUEUE_RESET, 2, 1);
    let c = drv.read_common_cfg(&mut dev);
    assert_eq!((c.queue_reset, c.queue_enable), (0, 1));
}

#[test]
fn admin_queue_fields_and_processing() {
    let mut drv = TestDriver::new(DEFAULT_MEM_SIZE);
    let mut dev = mock_device(&mut drv);
    let c = drv.read_common_cfg(&mut dev);
    assert_eq!(c.num_queues, 2, "num_queues counts device-type queues");
    assert_eq!(c.admin_queue_index, 2);
    assert_eq!(c.admin_queue_num, 1);
    drv.common_write(&mut dev, co::QUEUE_SELECT, 2, 2);
    assert_eq!(drv.common_read(&mut dev, co::QUEUE_SIZE, 2), 32);
    assert_eq!(drv.common_read(&mut dev, co::QUEUE_NOTIFY_OFF, 2), 2);
    assert_eq!(dev.doorbells().len(), 3);
    assert_eq!(required_msix_vectors(dev.device()), 4);

    let wanted = VERSION_1 | (1 << VIRTIO_F_ADMIN_VQ) | RING_RESET;
    drv.negotiate(&mut dev, wanted).unwrap();
    drv.enable_msix(&mut dev, 4).unwrap();
    drv.set_config_vector(&mut dev, 0);
    drv.setup_queue(&mut dev, 2, None, 3).unwrap();
    drv.driver_ok(&mut dev);
    assert_eq!(dev.device().activated, Some(wanted));
    drv.irqs().clear();

    let (_, u) = drv
        .request(
            &mut dev,
            2,
            &[Seg::Readable(vec![0; 24]), Seg::Writable(8)],
            Layout::Indirect,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 0);
    assert_eq!(dev.device().served, vec![(true, 0)]);
    assert_eq!(drv.irqs().take_triggered(), vec![3]);
    // Queue 0 is not enabled: its doorbell does nothing.
    ring(&mut dev, 0);
    ring(&mut dev, 7);
    assert_eq!(dev.device().served.len(), 1);

    // Resetting the admin queue reaches the device with its index.
    drv.common_write(&mut dev, co::QUEUE_SELECT, 2, 2);
    drv.common_write(&mut dev, co::QUEUE_RESET, 2, 1);
    assert_eq!(dev.device().queue_resets, vec![2]);
}

#[test]
fn out_of_order_completion_outside_process_queue() {
    let mut drv = TestDriver::new(DEFAULT_MEM_SIZE);
    let mut dev = mock_device(&mut drv);
    dev.device_mut().defer_admin = true;
    // Nothing can be completed before activation.
    assert!(!dev.complete_chain(2, 0, 0));
    let wanted = VERSION_1 | (1 << VIRTIO_F_ADMIN_VQ);
    drv.negotiate(&mut dev, wanted).unwrap();
    drv.enable_msix(&mut dev, 4).unwrap();
    drv.set_config_vector(&mut dev, 0);
    drv.setup_queue(&mut dev, 2, None, 3).unwrap();
    drv.driver_ok(&mut dev);
    drv.irqs().clear();

    let a = drv
        .submit(
            2,
            &[Seg::Readable(vec![1; 24]), Seg::Writable(8)],
            Layout::Direct,
        )
        .unwrap();
    let b = drv
        .submit(
            2,
            &[Seg::Readable(vec![2; 24]), Seg::Writable(8)],
            Layout::Direct,
        )
        .unwrap();
    drv.kick(&mut dev, 2).unwrap();
    assert_eq!(dev.device().deferred, vec![a.head, b.head]);
    assert!(drv.pop_used(2).unwrap().is_none());
    assert!(drv.irqs().triggered().is_empty());

    // Complete b first, then a; a head out of range is refused.
    assert!(!dev.complete_chain(2, 999, 0));
    assert!(dev.complete_chain(2, b.head, 8));
    assert!(dev.complete_chain(2, a.head, 4));
    assert_eq!(
        drv.pop_used(2).unwrap().unwrap(),
        UsedElem { id: b.head, len: 8 }
    );
    assert_eq!(
        drv.pop_used(2).unwrap().unwrap(),
        UsedElem { id: a.head, len: 4 }
    );
    assert_eq!(drv.irqs().take_triggered(), vec![3, 3]);
    // Not in Stop: no driver memory is touched.
    dev.set_mode(TransportMode::Stop);
    assert!(!dev.complete_chain(2, a.head, 4));
    dev.set_mode(TransportMode::Active);
    assert_eq!(dev.device_status() & STATUS_DEVICE_NEEDS_RESET, 0);
}

// ---- block through the transport ------------------------------------------

#[test]
fn block_round_trip_in_many_layouts() {
    let (disk, mut drv, mut dev) = running_block(64, false, !0);
    // Write 4 sectors at sector 2: header alone, data split in 3 uneven
    // descriptors, status alone.
    let data = pattern(2048, 11);
    let (_s, u) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_OUT, 2)),
                Seg::Readable(data[..100].to_vec()),
                Seg::Readable(data[100..1500].to_vec()),
                Seg::Readable(data[1500..].to_vec()),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 1);
    let file = disk.contents();
    assert_eq!(&file[1024..1024 + 2048], &data[..]);
    assert_eq!(file[1023], (1023 % 251) as u8, "bytes before untouched");
    assert_eq!(file[3072], (3072 % 251) as u8, "bytes after untouched");

    // Header and data in one readable descriptor, indirect.
    let data2 = pattern(512, 77);
    let mut hd = header(VIRTIO_BLK_T_OUT, 10);
    hd.extend_from_slice(&data2);
    let (s, u) = drv
        .request(
            &mut dev,
            0,
            &[Seg::Readable(hd), Seg::Writable(1)],
            Layout::Indirect,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 1);
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_OK);
    assert_eq!(&disk.contents()[5120..5632], &data2[..]);

    // Read back sectors 2..6, header split in two, data and status in one
    // writable descriptor.
    let mut h = header(VIRTIO_BLK_T_IN, 2);
    let h2 = h.split_off(5);
    let (s, u) = drv
        .request(
            &mut dev,
            0,
            &[Seg::Readable(h), Seg::Readable(h2), Seg::Writable(2049)],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 2049);
    let (a, _) = s.writable()[0];
    assert_eq!(drv.read_mem(a, 2048).unwrap(), data);
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_OK);

    // Read split across many writable descriptors with the status in the
    // last data descriptor, indirect.
    let (s, u) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_IN, 10)),
                Seg::Writable(7),
                Seg::Writable(300),
                Seg::Writable(206),
            ],
            Layout::Indirect,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 513);
    let mut got = Vec::new();
    for (a, l) in s.writable() {
        got.extend(drv.read_mem(a, l as usize).unwrap());
    }
    assert_eq!(&got[..512], &data2[..]);
    assert_eq!(got[512], VIRTIO_BLK_S_OK);

    // Flush.
    let (s, u) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_FLUSH, 0)),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 1);
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_OK);

    // GET_ID: 20 bytes, zero padded.
    let (s, u) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_GET_ID, 0)),
                Seg::Writable(20),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 21);
    let id = drv.read_mem(s.writable()[0].0, 20).unwrap();
    let mut want = b"test-serial-0123".to_vec();
    want.resize(20, 0);
    assert_eq!(id, want);
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_OK);

    // Unsupported request type.
    let (s, u) = drv
        .request(
            &mut dev,
            0,
            &[Seg::Readable(header(11, 0)), Seg::Writable(1)],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 1);
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_UNSUPP);

    // Device config: capacity and block size through the BAR.
    assert_eq!(drv.device_cfg_read(&mut dev, 0, 8), 64);
    assert_eq!(drv.device_cfg_read(&mut dev, 20, 4), 512);
    assert_eq!(drv.device_cfg_read(&mut dev, 12, 4), 14);
}

#[test]
fn many_requests_wrap_the_rings() {
    let (disk, mut drv, mut dev) = running_block(8, false, VERSION_1);
    // 40 requests on a 16-entry queue, in batches of 3.
    for round in 0..14u8 {
        let mut subs = Vec::new();
        for k in 0..3u8 {
            let sector = u64::from((round * 3 + k) % 8);
            let data = pattern(512, round.wrapping_mul(3).wrapping_add(k));
            let s = drv
                .submit(
                    0,
                    &[
                        Seg::Readable(header(VIRTIO_BLK_T_OUT, sector)),
                        Seg::Readable(data.clone()),
                        Seg::Writable(1),
                    ],
                    Layout::Direct,
                )
                .unwrap();
            subs.push((s, sector, data));
        }
        drv.kick(&mut dev, 0).unwrap();
        for (s, sector, data) in subs {
            let u = drv.pop_used(0).unwrap().unwrap();
            assert_eq!(u.id, s.head);
            assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_OK);
            let f = disk.contents();
            let o = sector as usize * 512;
            assert_eq!(&f[o..o + 512], &data[..]);
        }
    }
    assert_eq!(dev.state().queues[0].next_avail, 42);
    assert_eq!(dev.state().queues[0].next_used, 42);
}

#[test]
fn read_only_disk_refuses_writes() {
    let (disk, mut drv, mut dev) = running_block(8, true, !0);
    assert_ne!(drv.features() & (1 << VIRTIO_BLK_F_RO), 0);
    let before = disk.contents();
    let (s, u) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_OUT, 0)),
                Seg::Readable(vec![0x55; 512]),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 1);
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_IOERR);
    assert_eq!(disk.contents(), before);
    // Reads and flushes still work.
    let (s, _) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_IN, 0)),
                Seg::Writable(512),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_OK);
    assert_eq!(
        drv.read_mem(s.writable()[0].0, 512).unwrap(),
        &before[..512]
    );
    let (s, _) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_FLUSH, 0)),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_OK);
}

#[test]
fn malformed_chains_do_not_stop_the_queue() {
    let (disk, mut drv, mut dev) = running_block(8, false, VERSION_1);
    let ok_read = |drv: &mut TestDriver, dev: &mut VirtioPciDevice<Block>| {
        let (s, u) = drv
            .request(
                dev,
                0,
                &[
                    Seg::Readable(header(VIRTIO_BLK_T_IN, 1)),
                    Seg::Writable(512),
                    Seg::Writable(1),
                ],
                Layout::Direct,
            )
            .unwrap();
        assert_eq!(u.unwrap().len, 513);
        assert_eq!(status_of(drv, &s), VIRTIO_BLK_S_OK);
    };

    // No status byte (no writable descriptor at all).
    let (_, u) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_OUT, 0)),
                Seg::Readable(vec![9; 512]),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 0);
    ok_read(&mut drv, &mut dev);

    // Short header.
    let (s, u) = drv
        .request(
            &mut dev,
            0,
            &[Seg::Readable(vec![0; 8]), Seg::Writable(1)],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 1);
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_IOERR);

    // Only a writable byte: the header is missing.
    let (s, u) = drv
        .request(&mut dev, 0, &[Seg::Writable(1)], Layout::Indirect)
        .unwrap();
    assert_eq!(u.unwrap().len, 1);
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_IOERR);

    // Past the end of the disk, and a sector number that overflows.
    for sector in [7, 8, u64::MAX / 256] {
        let (s, u) = drv
            .request(
                &mut dev,
                0,
                &[
                    Seg::Readable(header(VIRTIO_BLK_T_IN, sector)),
                    Seg::Writable(1024),
                    Seg::Writable(1),
                ],
                Layout::Direct,
            )
            .unwrap();
        assert_eq!(u.unwrap().len, 1);
        assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_IOERR);
    }

    // Unaligned data length.
    let (s, _) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_OUT, 0)),
                Seg::Readable(vec![1; 100]),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_IOERR);

    // Data buffer outside guest memory.
    let (s, u) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_IN, 0)),
                Seg::WritableAt(0x7000_0000_0000, 512),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_IOERR);
    assert!(u.is_some());

    // A status byte outside guest memory: completed with what was written.
    let (_, u) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_FLUSH, 0)),
                Seg::WritableAt(0x7000_0000_0000, 1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(u.unwrap().len, 0);
    ok_read(&mut drv, &mut dev);

    // An indirect descriptor whose table is not in memory, and a chain
    // whose next pointer is out of range: both end the chain early.
    let q = drv.queue(0).unwrap().clone();
    let head = 0u16;
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&0x7000_0000_0000u64.to_le_bytes());
    d[8..12].copy_from_slice(&32u32.to_le_bytes());
    d[12..14].copy_from_slice(&4u16.to_le_bytes());
    drv.write_mem(q.desc + u64::from(head) * 16, &d).unwrap();
    // Publish head 0 by hand (it is free: nothing is in flight).
    let slot = q.avail + 4 + u64::from(q.avail_idx % q.size) * 2;
    drv.write_mem(slot, &head.to_le_bytes()).unwrap();
    drv.write_mem(q.avail + 2, &q.avail_idx.wrapping_add(1).to_le_bytes())
        .unwrap();
    ring(&mut dev, 0);
    assert_eq!(drv.used_idx(0).unwrap(), q.last_used.wrapping_add(1));
    assert_eq!(dev.device_status() & STATUS_DEVICE_NEEDS_RESET, 0);
    let _ = disk;
}

#[test]
fn bogus_avail_index_flags_needs_reset_without_hanging() {
    let (_disk, mut drv, mut dev) = running_block(8, false, VERSION_1);
    let q = drv.queue(0).unwrap().clone();
    // avail.idx jumps 1000 entries ahead of a 16-entry queue.
    drv.write_mem(q.avail + 2, &1000u16.to_le_bytes()).unwrap();
    drv.irqs().clear();
    ring(&mut dev, 0);
    assert_ne!(dev.device_status() & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(drv.irqs().take_triggered(), vec![0], "config interrupt");
    // Further doorbells are ignored until reset.
    ring(&mut dev, 0);
    assert_eq!(drv.used_idx(0).unwrap(), 0);
    // After a reset and a new bring-up, everything works again.
    drv.bring_up(&mut dev, VERSION_1, 1).unwrap();
    let (_, u) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_FLUSH, 0)),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert!(u.is_some());
}

// ---- interrupts --------------------------------------------------------------

fn flush(drv: &mut TestDriver, dev: &mut VirtioPciDevice<Block>) -> Option<UsedElem> {
    drv.request(
        dev,
        0,
        &[
            Seg::Readable(header(VIRTIO_BLK_T_FLUSH, 0)),
            Seg::Writable(1),
        ],
        Layout::Direct,
    )
    .unwrap()
    .1
}

#[test]
fn msix_vector_delivered_only_when_unmasked() {
    let (_disk, mut drv, mut dev) = running_block(8, false, VERSION_1);
    assert!(flush(&mut drv, &mut dev).is_some());
    assert_eq!(drv.irqs().take_triggered(), vec![1]);

    // Vector masked: nothing delivered, pending bit set.
    drv.mask_vector(&mut dev, 1, true).unwrap();
    drv.irqs().clear();
    assert!(flush(&mut drv, &mut dev).is_some());
    assert!(drv.irqs().triggered().is_empty());
    assert!(drv.vector_pending(&mut dev, 1).unwrap());
    // Unmasking delivers it once and clears the pending bit.
    drv.mask_vector(&mut dev, 1, false).unwrap();
    assert_eq!(drv.irqs().take_triggered(), vec![1]);
    assert!(!drv.vector_pending(&mut dev, 1).unwrap());

    // Function mask behaves the same.
    let cap = drv.caps().unwrap().msix.unwrap();
    let mc = TestDriver::cfg_read16(&mut dev, cap + 2);
    TestDriver::cfg_write16(&mut dev, cap + 2, mc | 0x4000);
    assert!(flush(&mut drv, &mut dev).is_some());
    assert!(drv.irqs().triggered().is_empty());
    assert!(drv.vector_pending(&mut dev, 1).unwrap());
    TestDriver::cfg_write16(&mut dev, cap + 2, mc);
    assert_eq!(drv.irqs().take_triggered(), vec![1]);

    // The driver suppressing interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT).
    drv.set_no_interrupt(0, true).unwrap();
    assert!(flush(&mut drv, &mut dev).is_some());
    assert!(drv.irqs().triggered().is_empty());
    assert!(!drv.vector_pending(&mut dev, 1).unwrap());
    drv.set_no_interrupt(0, false).unwrap();

    // No vector assigned: no MSI-X, but the ISR bit is set and
    // read-to-clear.
    let _ = drv.read_isr(&mut dev);
    drv.common_write(&mut dev, co::QUEUE_SELECT, 2, 0);
    // The vector of an enabled queue may still be changed.
    drv.common_write(
        &mut dev,
        co::QUEUE_MSIX_VECTOR,
        2,
        u64::from(VIRTIO_MSI_NO_VECTOR),
    );
    assert!(flush(&mut drv, &mut dev).is_some());
    assert!(drv.irqs().triggered().is_empty());
    assert_eq!(drv.read_isr(&mut dev), ISR_QUEUE);
    assert_eq!(drv.read_isr(&mut dev), 0);
}

/// Finding: a driver that keeps its queue full must not hold the device
/// thread, and work left over when a turn's budget runs out must not be
/// forgotten (with EVENT_IDX nothing else would notify again). One
/// doorbell serves at most QUEUE_BUDGET chains and re-signals the queue's
/// own doorbell event; the next turn serves the rest.
#[test]
fn a_full_queue_is_served_in_budgeted_turns_with_a_rekick() {
    let disk = TempDisk::new(8);
    let mut drv = TestDriver::new(DEFAULT_MEM_SIZE);
    let mut cfg = BlockConfig::new(&disk.path);
    cfg.queue_size = 256;
    let blk = Block::new(&cfg).unwrap();
    let mut dev = VirtioPciDevice::new(
        blk,
        drv.dma_atomic(),
        drv.interrupt_group(),
        VirtioPciOptions::default(),
    )
    .unwrap();
    drv.probe(&mut dev, BAR0_ADDR).unwrap();
    drv.bring_up(&mut dev, VERSION_1 | (1 << VIRTIO_RING_F_EVENT_IDX), 1)
        .unwrap();
    let n = QUEUE_BUDGET + 36;
    for _ in 0..n {
        drv.submit(
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_FLUSH, 0)),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    }
    let ev = dev.queue_event(0).unwrap().clone();
    assert!(ev.read().is_err(), "no doorbell pending yet");
    ring(&mut dev, 0);
    assert_eq!(usize::from(drv.used_idx(0).unwrap()), QUEUE_BUDGET);
    assert_eq!(ev.read().unwrap(), 1, "the queue was re-signalled");
    ring(&mut dev, 0);
    assert_eq!(usize::from(drv.used_idx(0).unwrap()), n);
    assert!(ev.read().is_err(), "nothing left: no re-signal");
}

#[test]
fn event_idx_suppression() {
    let (_disk, mut drv, mut dev) = running_block(8, false, VERSION_1 | (1 << 29));
    assert_ne!(drv.features() & (1 << 29), 0);
    // The driver's kick sets used_event to the next entry: interrupt sent.
    assert!(flush(&mut drv, &mut dev).is_some());
    assert_eq!(drv.irqs().take_triggered(), vec![1]);
    // used_event far behind: the device does not interrupt.
    let q = drv.queue(0).unwrap().clone();
    drv.submit(
        0,
        &[
            Seg::Readable(header(VIRTIO_BLK_T_FLUSH, 0)),
            Seg::Writable(1),
        ],
        Layout::Direct,
    )
    .unwrap();
    let used_event = q.avail + 4 + u64::from(q.size) * 2;
    drv.write_mem(used_event, &100u16.to_le_bytes()).unwrap();
    ring(&mut dev, 0);
    assert!(drv.pop_used(0).unwrap().is_some());
    assert!(drv.irqs().triggered().is_empty());
}

// ---- dirty tracking --------------------------------------------------------

#[test]
fn read_request_dirties_exactly_buffer_status_and_used_pages() {
    let (_disk, mut drv, mut dev) = running_block(8, false, VERSION_1);
    let q = drv.queue(0).unwrap().clone();
    // Data buffer spans two pages (starts 0x800 into a page), status byte
    // on a page of its own; header on yet another page.
    let data_page = drv.alloc_pages(3).unwrap();
    let status_page = drv.alloc_pages(1).unwrap();
    let header_page = drv.alloc_pages(1).unwrap();
    let data_addr = data_page + 0x800;
    drv.submit(
        0,
        &[
            Seg::ReadableAt(header_page, header(VIRTIO_BLK_T_IN, 0)),
            Seg::WritableAt(data_addr, 4096),
            Seg::WritableAt(status_page + 0x10, 1),
        ],
        Layout::Direct,
    )
    .unwrap();
    // Forget everything the driver wrote while setting up.
    drv.clear_dirty();
    assert!(drv.dirty_pages().is_empty());
    ring(&mut dev, 0);
    let u = drv.pop_used(0).unwrap().unwrap();
    assert_eq!(u.len, 4097);
    assert_eq!(drv.dirty_pages(), {
        let mut want = vec![data_page, data_page + 4096, status_page, q.used];
        want.sort_unstable();
        want
    });
    // The bytes the disk holds arrived.
    let want: Vec<u8> = (0..4096u64).map(|i| (i % 251) as u8).collect();
    assert_eq!(drv.read_mem(data_addr, 4096).unwrap(), want);
}

// ---- state, modes, resets ------------------------------------------------------

#[test]
fn state_moves_to_another_device() {
    let (disk, mut drv, mut a) = running_block(8, false, VERSION_1 | RING_RESET);
    for i in 0..5u8 {
        let data = pattern(512, i);
        drv.request(
            &mut a,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_OUT, u64::from(i))),
                Seg::Readable(data),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    }
    // One request is submitted but not yet notified when A stops.
    let pending = drv
        .submit(
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_IN, 3)),
                Seg::Writable(512),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    a.set_mode(TransportMode::Freeze);
    let st = a.state();
    assert_eq!(st.queues[0].next_avail, 5);
    assert_eq!(st.queues[0].next_used, 5);
    assert!(st.queues[0].enabled);
    assert_eq!(st.device_status, 0xf);
    assert_eq!(st.negotiated_features(), VERSION_1 | RING_RESET);
    assert_eq!(a.used_index_in_memory(0), Some(5));
    assert_eq!(a.used_index_in_memory(1), None);
    // The 64-byte common configuration image carries the device-wide
    // registers.
    let mut rebuilt = VirtioPciState::reset_value(&[16]);
    rebuilt.set_common(&a.common_cfg());
    rebuilt.driver_features = st.driver_features;
    rebuilt.queues = st.queues.clone();
    rebuilt.isr = st.isr;
    assert_eq!(rebuilt, st);

    // B: same disk, same memory; frozen, state applied, then Active.
    let mut b = block_device(&disk, false, &drv, VirtioPciOptions::default());
    drv.probe(&mut b, BAR0_ADDR).unwrap();
    drv.enable_msix(&mut b, 2).unwrap();
    b.set_mode(TransportMode::Freeze);
    b.set_state(&st).unwrap();
    assert_eq!(b.state(), st);
    assert!(b.is_activated());
    assert_eq!(b.device().acked_features(), VERSION_1 | RING_RESET);
    drv.irqs().clear();
    b.set_mode(TransportMode::Active);
    b.drain();
    // B picked up the pending request on becoming Active.
    let u = drv.pop_used(0).unwrap().unwrap();
    assert_eq!(u.id, pending.head);
    assert_eq!(
        drv.read_mem(pending.writable()[0].0, 512).unwrap(),
        pattern(512, 3)
    );
    assert_eq!(drv.irqs().take_triggered(), vec![1]);
    assert_eq!(b.state().queues[0].next_used, 6);

    // Invalid states are refused and change nothing.
    let before = b.state();
    let mut bad = st.clone();
    bad.queues[0].size = 12;
    assert!(matches!(
        b.set_state(&bad),
        Err(StateError::QueueSize { .. })
    ));
    let mut bad = st.clone();
    bad.driver_features |= 1 << 50;
    assert!(matches!(b.set_state(&bad), Err(StateError::Features(_))));
    let mut bad = st.clone();
    bad.queues.push(QueueConfigState::reset_value(16));
    assert!(matches!(
        b.set_state(&bad),
        Err(StateError::QueueCount { .. })
    ));
    let mut bad = st.clone();
    bad.queues[0].desc_table |= 1;
    assert!(matches!(
        b.set_state(&bad),
        Err(StateError::RingAlignment { .. })
    ));
    let mut bad = st;
    bad.queues[0].msix_vector = 7;
    assert!(matches!(b.set_state(&bad), Err(StateError::Vector { .. })));
    assert_eq!(b.state(), before);
}

/// A state whose rings lie outside guest memory is applied, but the device
/// says it needs a reset (with a configuration interrupt once Active)
/// instead of leaving the queue silently wedged.
#[test]
fn state_with_rings_outside_memory_needs_reset() {
    let (disk, mut drv, a) = running_block(8, false, VERSION_1);
    let mut st = a.state();
    let past_end = DEFAULT_MEM_SIZE as u64 + 0x10_0000;
    st.queues[0].desc_table = past_end;
    st.queues[0].avail_ring = past_end + 0x1000;
    st.queues[0].used_ring = past_end + 0x2000;
    let mut b = block_device(&disk, false, &drv, VirtioPciOptions::default());
    drv.probe(&mut b, BAR0_ADDR).unwrap();
    drv.enable_msix(&mut b, 2).unwrap();
    b.set_mode(TransportMode::Freeze);
    b.set_state(&st).unwrap();
    assert_ne!(
        b.device_status() & STATUS_DEVICE_NEEDS_RESET,
        0,
        "rings past the end of RAM must set DEVICE_NEEDS_RESET"
    );
    assert!(!b.is_activated());
    drv.irqs().clear();
    b.set_mode(TransportMode::Active);
    assert_eq!(
        drv.irqs().take_triggered(),
        vec![0],
        "the held configuration interrupt is sent on Active"
    );
    // The same state with valid rings activates normally.
    let mut c = block_device(&disk, false, &drv, VirtioPciOptions::default());
    drv.probe(&mut c, BAR0_ADDR).unwrap();
    c.set_state(&a.state()).unwrap();
    assert_eq!(c.device_status() & STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(c.is_activated());
}

#[test]
fn stop_holds_work_and_freeze_ignores_config_writes() {
    let (_disk, mut drv, mut dev) = running_block(8, false, VERSION_1);
    dev.set_mode(TransportMode::Stop);
    drv.submit(
        0,
        &[
            Seg::Readable(header(VIRTIO_BLK_T_FLUSH, 0)),
            Seg::Writable(1),
        ],
        Layout::Direct,
    )
    .unwrap();
    drv.kick(&mut dev, 0).unwrap();
    assert_eq!(
        drv.used_idx(0).unwrap(),
        0,
        "Stop: no driver memory touched"
    );
    assert!(drv.irqs().triggered().is_empty());
    // Configuration writes are accepted in Stop: values that change.
    assert_eq!(dev.state().queue_select, 0);
    drv.common_write(&mut dev, co::QUEUE_SELECT, 2, 3);
    assert_eq!(dev.state().queue_select, 3);
    assert_eq!(drv.common_read(&mut dev, co::QUEUE_SELECT, 2), 3);
    let vector = drv.common_read(&mut dev, co::CONFIG_MSIX_VECTOR, 2);
    assert_eq!(vector, 0);
    drv.common_write(&mut dev, co::CONFIG_MSIX_VECTOR, 2, 1);
    assert_eq!(drv.common_read(&mut dev, co::CONFIG_MSIX_VECTOR, 2), 1);
    drv.common_write(&mut dev, co::CONFIG_MSIX_VECTOR, 2, vector);
    drv.common_write(&mut dev, co::QUEUE_SELECT, 2, 0);
    assert_eq!(dev.state().queue_select, 0);
    dev.set_mode(TransportMode::Active);
    dev.drain();
    assert_eq!(drv.used_idx(0).unwrap(), 1);
    assert_eq!(drv.irqs().take_triggered(), vec![1]);

    dev.set_mode(TransportMode::Freeze);
    let before = dev.state();
    assert_eq!(before.isr, ISR_QUEUE);
    assert_eq!(drv.read_isr(&mut dev), ISR_QUEUE, "ISR reads, ...");
    assert_eq!(
        dev.state().isr,
        ISR_QUEUE,
        "... but is not cleared in Freeze"
    );
    drv.common_write(&mut dev, co::QUEUE_SELECT, 2, 5);
    drv.common_write(&mut dev, co::DEVICE_STATUS, 1, 0x4f);
    assert_eq!(dev.state(), before, "Freeze: virtio config writes ignored");
    assert_eq!(drv.status(&mut dev), 0xf, "reads return the frozen values");
    // PCI configuration and MSI-X still work in Freeze.
    drv.mask_vector(&mut dev, 1, true).unwrap();
    assert!(dev.msix().entry(1).unwrap().masked());
    dev.set_mode(TransportMode::Active);
    assert_eq!(drv.read_isr(&mut dev), ISR_QUEUE);
    assert_eq!(drv.read_isr(&mut dev), 0);
}

/// R-MODE-7 at the transport: a virtio reset (device_status 0) in Freeze
/// resets the virtio state, unlike every other common configuration write,
/// and the mode stays Freeze.
#[test]
fn virtio_reset_in_freeze_resets() {
    let (_disk, drv, mut dev) = running_block(8, false, VERSION_1);
    dev.set_mode(TransportMode::Freeze);
    assert_eq!(drv.status(&mut dev), 0xf);
    drv.set_status(&mut dev, 0);
    assert_eq!(drv.status(&mut dev), 0, "the reset took effect in Freeze");
    assert!(!dev.is_activated());
    assert!(!dev.state().queues[0].enabled);
    assert_eq!(dev.mode(), TransportMode::Freeze);
}

#[test]
fn function_level_reset() {
    let (_disk, drv, mut dev) = running_block(8, false, VERSION_1);
    let pcie = drv.caps().unwrap().pcie.unwrap();
    dev.set_mode(TransportMode::Stop);
    let devctl = TestDriver::cfg_read16(&mut dev, pcie + 8);
    TestDriver::cfg_write16(&mut dev, pcie + 8, devctl | 0x8000);
    assert_eq!(dev.device_status(), 0);
    assert!(!dev.is_activated());
    assert!(!dev.msix().enabled());
    assert!(
        dev.decoded_bars().is_empty(),
        "BAR and command register reset"
    );
    assert_eq!(TestDriver::cfg_read16(&mut dev, pcie + 8) & 0x8000, 0);
    assert_eq!(dev.mode(), TransportMode::Stop, "FLR keeps the mode");
}

#[test]
fn pci_cfg_window_reaches_bar0() {
    let (_disk, drv, mut dev) = running_block(8, false, VERSION_1);
    let cap = drv.caps().unwrap().pci_cfg.unwrap();
    TestDriver::cfg_write8(&mut dev, cap + CAP_BAR, 0);
    TestDriver::cfg_write32(&mut dev, cap + CAP_OFFSET, co::DEVICE_STATUS as u32);
    TestDriver::cfg_write32(&mut dev, cap + CAP_LENGTH, 1);
    assert_eq!(TestDriver::cfg_read8(&mut dev, cap + CAP_PCI_CFG_DATA), 0xf);
    // Device config through the window.
    TestDriver::cfg_write32(
        &mut dev,
        cap + CAP_OFFSET,
        DEVICE_CFG_BAR_OFFSET as u32 + 20,
    );
    TestDriver::cfg_write32(&mut dev, cap + CAP_LENGTH, 4);
    assert_eq!(
        TestDriver::cfg_read32(&mut dev, cap + CAP_PCI_CFG_DATA),
        512
    );
    // A write through the window: queue_select.
    TestDriver::cfg_write32(&mut dev, cap + CAP_OFFSET, co::QUEUE_SELECT as u32);
    TestDriver::cfg_write32(&mut dev, cap + CAP_LENGTH, 2);
    TestDriver::cfg_write16(&mut dev, cap + CAP_PCI_CFG_DATA, 3);
    assert_eq!(dev.state().queue_select, 3);
    // A window beyond BAR0 or on another BAR reads all-ones and never panics.
    TestDriver::cfg_write32(&mut dev, cap + CAP_OFFSET, 0xffff_fff0);
    assert_eq!(
        TestDriver::cfg_read16(&mut dev, cap + CAP_PCI_CFG_DATA),
        0xffff
    );
    TestDriver::cfg_write8(&mut dev, cap + CAP_BAR, 3);
    assert_eq!(
        TestDriver::cfg_read16(&mut dev, cap + CAP_PCI_CFG_DATA),
        0xffff
    );
}

#[test]
fn virtual_function_presentation() {
    let disk = TempDisk::new(8);
    let mut drv = TestDriver::new(DEFAULT_MEM_SIZE);
    let options = VirtioPciOptions {
        function: FunctionKind::Virtual,
        ..Default::default()
    };
    let mut dev = block_device(&disk, false, &drv, options);
    assert_eq!(TestDriver::cfg_read16(&mut dev, 0), 0xffff);
    assert_eq!(TestDriver::cfg_read16(&mut dev, 2), 0xffff);
    assert_eq!(TestDriver::cfg_read32(&mut dev, 0x10), 0);
    TestDriver::cfg_write32(&mut dev, 0x10, 0xffff_ffff);
    assert_eq!(TestDriver::cfg_read32(&mut dev, 0x10), 0);
    assert!(dev.decoded_bars().is_empty());
    dev.set_vf_bar0(Some(0x2_0000_0000));
    assert_eq!(dev.decoded_bars()[0].base, 0x2_0000_0000);
    drv.probe_placed(&mut dev, 0x2_0000_0000).unwrap();
    drv.bring_up(&mut dev, VERSION_1, 1).unwrap();
    assert!(flush(&mut drv, &mut dev).is_some());
    assert_eq!(
        dev.doorbells()[0].address,
        0x2_0000_0000 + NOTIFY_BAR_OFFSET
    );
}

#[test]
fn guest_garbage_never_panics() {
    let (_disk, mut drv, mut dev) = running_block(8, false, VERSION_1);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let r = next();
        let len = [1usize, 2, 3, 4, 8, 0, 16][(r % 7) as usize];
        let data = next().to_le_bytes();
        let mut buf = vec![0u8; len];
        let bytes: Vec<u8> = data.iter().cycle().take(len).copied().collect();
        match (r >> 8) % 6 {
            0 => dev.bar_write(0, (r >> 16) % 0x9000, &bytes),
            1 => dev.bar_read(((r >> 16) % 7) as u8, (r >> 20) % 0x9000, &mut buf),
            2 => {
                // Mostly common config.
                dev.bar_write(0, (r >> 16) % 0x40, &bytes)
            }
            3 => {
                // Never trigger FLR-driven reset storms or BAR moves too
                // often: configuration writes above the header only.
                let off = 0x40 + ((r >> 16) % 0xfc0) as u16;
                dev.config_write(off, &bytes);
            }
            4 => dev.config_read(((r >> 16) % 0x1100) as u16, &mut buf),
            _ => ring(&mut dev, ((r >> 16) % 4) as u16),
        }
    }
    // Whatever state it is in, a reset and bring-up makes it work again.
    drv.probe(&mut dev, BAR0_ADDR).unwrap();
    drv.bring_up(&mut dev, VERSION_1, 1).unwrap();
    assert!(flush(&mut drv, &mut dev).is_some());
}

#[test]
fn random_rings_never_panic_or_hang() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut healthy_rounds = 0;
    for round in 0..60 {
        let mut published = 0u16;
        let (_disk, mut drv, mut dev) = running_block(8, false, VERSION_1 | (1 << 28));
        let q = drv.queue(0).unwrap().clone();
        // A scratch page for random indirect tables and buffers.
        let scratch = drv.alloc_pages(4).unwrap();
        for _ in 0..8 {
            // Random descriptors: addresses mostly inside the scratch area
            // (sometimes anywhere), random lengths, flags and next.
            for i in 0..q.size {
                let r = next();
                let addr = if r % 5 == 0 {
                    next()
                } else {
                    scratch + (next() % (4 * PAGE_SIZE))
                };
                let len = if r % 7 == 0 {
                    next() as u32
                } else {
                    (next() % 600) as u32
                };
                let flags = (next() % 8) as u16;
                let nxt = (next() % u64::from(q.size + 2)) as u16;
                let mut d = [0u8; 16];
                d[0..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..16].copy_from_slice(&nxt.to_le_bytes());
                drv.write_mem(q.desc + u64::from(i) * 16, &d).unwrap();
            }
            let junk: Vec<u8> = (0..4 * PAGE_SIZE).map(|_| next() as u8).collect();
            drv.write_mem(scratch, &junk).unwrap();
            // Publish a few random heads (sometimes out of range).
            let avail_idx = drv.read_mem(q.avail + 2, 2).unwrap();
            let mut idx = u16::from_le_bytes([avail_idx[0], avail_idx[1]]);
            for _ in 0..(next() % 5) {
                let head = (next() % u64::from(q.size + 1)) as u16;
                let slot = q.avail + 4 + u64::from(idx % q.size) * 2;
                drv.write_mem(slot, &head.to_le_bytes()).unwrap();
                idx = idx.wrapping_add(1);
                published = published.wrapping_add(1);
            }
            if round % 10 == 9 {
                idx = idx.wrapping_add(next() as u16);
            }
            drv.write_mem(q.avail + 2, &idx.to_le_bytes()).unwrap();
            ring(&mut dev, 0);
        }
        // Every published chain was completed, or the device flagged that
        // it needs a reset (a bogus head index or avail index).
        let used = drv.used_idx(0).unwrap();
        let needs_reset = dev.device_status() & STATUS_DEVICE_NEEDS_RESET != 0;
        if round % 10 == 9 {
            continue;
        }
        if needs_reset {
            assert!(used <= published);
        } else {
            assert_eq!(used, published, "round {round}");
            healthy_rounds += 1;
        }
    }
    assert!(healthy_rounds > 0, "no round ran without a reset");
}

/// `vm.counters` of a block device: requests that completed OK and their
/// bytes; a failed one is not counted.
#[test]
fn block_counters_count_completed_reads_and_writes() {
    let (_disk, mut drv, mut dev) = running_block(8, false, VERSION_1);
    let get = |dev: &VirtioPciDevice<Block>| -> Vec<(&'static str, u64)> {
        pci::PciDevice::counters(dev)
    };
    assert_eq!(
        get(&dev),
        vec![
            ("read_bytes", 0),
            ("read_ops", 0),
            ("write_bytes", 0),
            ("write_ops", 0)
        ]
    );
    let (s, _) = drv
        .request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_OUT, 0)),
                Seg::Readable(vec![7; 2048]),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    assert_eq!(status_of(&drv, &s), VIRTIO_BLK_S_OK);
    for sector in [0u64, 100] {
        // The second read is past the end of the 8-sector disk: IOERR.
        drv.request(
            &mut dev,
            0,
            &[
                Seg::Readable(header(VIRTIO_BLK_T_IN, sector)),
                Seg::Writable(1024),
                Seg::Writable(1),
            ],
            Layout::Direct,
        )
        .unwrap();
    }
    assert_eq!(
        get(&dev),
        vec![
            ("read_bytes", 1024),
            ("read_ops", 1),
            ("write_bytes", 2048),
            ("write_ops", 1)
        ]
    );
}
