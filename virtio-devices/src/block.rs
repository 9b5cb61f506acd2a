//! virtio-blk backed by a file.
//!
//! One request queue. Requests are read through [`ChainBuffers`], so any
//! descriptor layout works: the 16-byte header is the first 16 readable
//! bytes, OUT data the rest of the readable bytes, IN / GET_ID data the
//! writable bytes before the last one, and the status is the last writable
//! byte. Requests run on the device's I/O worker ([`crate::block_io`]), off
//! the function's lock: `process_queue` only takes chains off the ring (at
//! most [`QUEUE_BUDGET`] per turn) and the transport puts the worker's
//! completions on the used ring when its eventfd fires. Disk I/O is
//! positional through a bounded bounce buffer; every guest-memory write
//! goes through vm-memory's `Bytes` API.
//!
//! Malformed requests never stop the queue: a chain without a writable byte
//! is completed with used length 0; a short header, an unaligned length or a
//! sector range past the end of the disk completes with `VIRTIO_BLK_S_IOERR`.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::debug;
use virtio_queue::Queue;
use vm_migration::DmaMemory;
use vmm_sys_util::eventfd::EventFd;

pub use crate::block_io::{Completion, DiskBackend};
use crate::block_io::{IoWorker, RequestContext};
use crate::device::{
    read_config_bytes, serve_queue, DeviceError, Served, VirtioDevice, QUEUE_BUDGET,
    VIRTIO_ID_BLOCK, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID serial.
pub const SERIAL_LEN: usize = 20;
/// Default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Request status values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Feature bits.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;

/// Length of the exposed part of `struct virtio_blk_config` (up to and
/// including `write_zeroes_may_unmap` and its padding).
pub const CONFIG_LEN: usize = 60;

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("failed to open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read the size of the disk image: {0}")]
    Metadata(#[source] std::io::Error),
    #[error("queue size {0} is not a power of two in 2..=32768")]
    QueueSize(u16),
    #[error("cannot start the I/O worker thread: {0}")]
    Worker(#[source] std::io::Error),
}

/// What a block device is made of.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    /// Disk image path.
    pub path: PathBuf,
    /// Open the image read-only and offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// GET_ID serial; when `None`, the image's file name (up to 20 bytes).
    pub serial: Option<String>,
    /// Size of the request queue.
    pub queue_size: u16,
}

impl BlockConfig {
    /// A writable disk with the default queue size and a serial taken from
    /// the path.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        BlockConfig {
            path: path.into(),
            read_only: false,
            serial: None,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

/// A virtio-blk device model.
pub struct Block {
    ctx: Arc<RequestContext>,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    acked_features: u64,
    worker: IoWorker,
}

impl Block {
    /// Opens the disk image described by `cfg`.
    pub fn new(cfg: &BlockConfig) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(&cfg.path)
            .map_err(|source| BlockError::Open {
                path: cfg.path.clone(),
                source,
            })?;
        let serial = match &cfg.serial {
            Some(s) => s.clone(),
            None => serial_from_path(&cfg.path),
        };
        Self::from_file(file, cfg.read_only, &serial, cfg.queue_size)
    }

    /// Builds a device around an open file. `serial` is truncated to 20
    /// bytes.
    pub fn from_file(
        file: File,
        read_only: bool,
        serial: &str,
        queue_size: u16,
    ) -> Result<Self, BlockError> {
        Self::from_backend(Arc::new(file), read_only, serial, queue_size)
    }

    /// Builds a device around any [`DiskBackend`].
    pub fn from_backend(
        disk: Arc<dyn DiskBackend>,
        read_only: bool,
        serial: &str,
        queue_size: u16,
    ) -> Result<Self, BlockError> {
        if !(2..=32768).contains(&queue_size) || !queue_size.is_power_of_two() {
            return Err(BlockError::QueueSize(queue_size));
        }
        let len = disk.size().map_err(BlockError::Metadata)?;
        let capacity_sectors = len / SECTOR_SIZE;
        let mut id = [0u8; SERIAL_LEN];
        let bytes = serial.as_bytes();
        let n = bytes.len().min(SERIAL_LEN);
        id[..n].copy_from_slice(&bytes[..n]);

        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        // size_max (8..12) stays 0: VIRTIO_BLK_F_SIZE_MAX is not offered.
        let seg_max = u32::from(queue_size) - 2;
        config[12..16].copy_from_slice(&seg_max.to_le_bytes());
        // geometry (16..20) not offered.
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // topology, writeback not offered; num_queues (34..36) = 1.
        config[34..36].copy_from_slice(&1u16.to_le_bytes());

        let ctx = Arc::new(RequestContext {
            disk,
            read_only,
            capacity_sectors,
            serial: id,
            counters: Default::default(),
        });
        let worker = IoWorker::spawn(ctx.clone()).map_err(BlockError::Worker)?;
        Ok(Block {
            ctx,
            config,
            queue_sizes: [queue_size],
            acked_features: 0,
            worker,
        })
    }

    /// Disk capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.ctx.capacity_sectors
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.ctx.read_only
    }

    /// The 20-byte GET_ID serial.
    pub fn serial(&self) -> &[u8; SERIAL_LEN] {
        &self.ctx.serial
    }

    /// The features the driver acknowledged at activation (0 before).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }
}

/// The GET_ID serial derived from a path: its file name, up to 20 bytes.
pub fn serial_from_path(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string_lossy().into_owned());
    let mut end = name.len().min(SERIAL_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC);
        if self.ctx.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // VIRTIO_BLK_F_CONFIG_WCE is not offered: every field is read-only.
        debug!(
            "virtio-blk: ignored write of {} bytes to config offset {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, features: u64) -> crate::device::Result<()> {
        self.acked_features = features;
        Ok(())
    }

    fn reset(&mut self) {
        // Requests in flight finish (their buffers are written) before the
        // reset completes; their completions are dropped.
        self.worker.discard(None);
        self.acked_features = 0;
    }

    fn queue_reset(&mut self, index: u16) {
        self.worker.discard(Some(index));
    }

    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &DmaMemory,
    ) -> crate::device::Result<Served> {
        if index != 0 {
            return Err(DeviceError::NoSuchQueue(index));
        }
        let worker = &mut self.worker;
        serve_queue(index, queue, mem, QUEUE_BUDGET, |bufs| {
            worker.submit(index, bufs, mem);
            None
        })
    }

    fn completion_event(&self) -> Option<Arc<EventFd>> {
        Some(self.worker.event().clone())
    }

    fn take_completions(&mut self, out: &mut Vec<Completion>) {
        self.worker.take(out);
    }

    fn in_flight(&self) -> usize {
        self.worker.in_flight()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.ctx.counters.snapshot()
    }

    fn wait_idle(&mut self) {
        self.worker.wait_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_is_truncated_file_name() {
        assert_eq!(serial_from_path(Path::new("/a/b/disk.img")), "disk.img");
        assert_eq!(
            serial_from_path(Path::new("/x/abcdefghijklmnopqrstuvwxyz.raw")),
            "abcdefghijklmnopqrst"
        );
    }

    #[test]
    fn config_space_layout() {
        let dir = std::env::temp_dir().join(format!("vblk-cfg-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 8 * 512 + 100]).unwrap();
        let mut cfg = BlockConfig::new(&dir);
        cfg.read_only = true;
        let blk = Block::new(&cfg).unwrap();
        std::fs::remove_file(&dir).unwrap();
        let mut b8 = [0u8; 8];
        blk.read_config(0, &mut b8);
        assert_eq!(u64::from_le_bytes(b8), 8);
        let mut b4 = [0u8; 4];
        blk.read_config(12, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), u32::from(DEFAULT_QUEUE_SIZE) - 2);
        blk.read_config(20, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 512);
        blk.read_config(1000, &mut b4);
        assert_eq!(b4, [0; 4]);
        assert_ne!(blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
    }
}
