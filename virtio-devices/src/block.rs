//! virtio-blk backed by a file.
//!
//! One request queue. Requests are read through [`ChainBuffers`], so any
//! descriptor layout works: the 16-byte header is the first 16 readable
//! bytes, OUT data the rest of the readable bytes, IN / GET_ID data the
//! writable bytes before the last one, and the status is the last writable
//! byte. Disk I/O is positional (`pread`/`pwrite` through
//! [`std::os::unix::fs::FileExt`]) through a bounded bounce buffer; every
//! guest-memory write goes through vm-memory's `Bytes` API.
//!
//! Malformed requests never stop the queue: a chain without a writable byte
//! is completed with used length 0; a short header, an unaligned length or a
//! sector range past the end of the disk completes with `VIRTIO_BLK_S_IOERR`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use log::{debug, warn};
use virtio_queue::Queue;
use vm_migration::GuestMemoryMmap;

use crate::chain::ChainBuffers;
use crate::device::{
    read_config_bytes, serve_queue, DeviceError, VirtioDevice, VIRTIO_ID_BLOCK,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
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

/// Length of the request header (type, reserved, sector).
const HEADER_LEN: u64 = 16;
/// Length of the exposed part of `struct virtio_blk_config` (up to and
/// including `write_zeroes_may_unmap` and its padding).
pub const CONFIG_LEN: usize = 60;
/// Bounce buffer size for disk I/O.
const BOUNCE_LEN: usize = 64 * 1024;

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
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    serial: [u8; SERIAL_LEN],
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    acked_features: u64,
    bounce: Vec<u8>,
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
        if !(2..=32768).contains(&queue_size) || !queue_size.is_power_of_two() {
            return Err(BlockError::QueueSize(queue_size));
        }
        let len = file.metadata().map_err(BlockError::Metadata)?.len();
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

        Ok(Block {
            file,
            read_only,
            capacity_sectors,
            serial: id,
            config,
            queue_sizes: [queue_size],
            acked_features: 0,
            bounce: vec![0u8; BOUNCE_LEN],
        })
    }

    /// Disk capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The 20-byte GET_ID serial.
    pub fn serial(&self) -> &[u8; SERIAL_LEN] {
        &self.serial
    }

    /// The features the driver acknowledged at activation (0 before).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Serves one chain and returns the used length to report.
    fn execute(&mut self, bufs: &ChainBuffers, mem: &GuestMemoryMmap) -> u32 {
        let writable = bufs.writable_len();
        if writable == 0 {
            warn!(
                "virtio-blk: chain {} has no writable status byte; completing with length 0",
                bufs.head_index()
            );
            return 0;
        }
        let status_off = writable - 1;
        let (status, data_written) = self.run_request(bufs, mem, status_off);
        match bufs.write_at(mem, status_off, &[status]) {
            Ok(1) => u32::try_from(data_written + 1).unwrap_or(u32::MAX),
            Ok(_) | Err(_) => {
                warn!(
                    "virtio-blk: could not write the status byte of chain {}",
                    bufs.head_index()
                );
                u32::try_from(data_written).unwrap_or(u32::MAX)
            }
        }
    }

    /// Runs the request; returns (status, bytes of data written into the
    /// writable stream before the status byte).
    fn run_request(
        &mut self,
        bufs: &ChainBuffers,
        mem: &GuestMemoryMmap,
        data_cap: u64,
    ) -> (u8, u64) {
        let mut hdr = [0u8; HEADER_LEN as usize];
        match bufs.read_at(mem, 0, &mut hdr) {
            Ok(n) if n == hdr.len() => {}
            Ok(n) => {
                warn!("virtio-blk: request header is {n} bytes, need 16");
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            Err(e) => {
                warn!("virtio-blk: failed to read request header: {e}");
                return (VIRTIO_BLK_S_IOERR, 0);
            }
        }
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        match req_type {
            VIRTIO_BLK_T_IN => self.read_request(bufs, mem, sector, data_cap),
            VIRTIO_BLK_T_OUT => (self.write_request(bufs, mem, sector), 0),
            VIRTIO_BLK_T_FLUSH => {
                if self.read_only {
                    return (VIRTIO_BLK_S_OK, 0);
                }
                match self.file.sync_data() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        warn!("virtio-blk: flush failed: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = usize::try_from(data_cap)
                    .unwrap_or(usize::MAX)
                    .min(SERIAL_LEN);
                match bufs.write_at(mem, 0, &self.serial[..n]) {
                    Ok(w) => (VIRTIO_BLK_S_OK, w as u64),
                    Err(e) => {
                        warn!("virtio-blk: failed to write the serial: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            other => {
                debug!("virtio-blk: unsupported request type {other}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }

    /// Byte offset of `sector` if `len` bytes from it fit on the disk and
    /// `len` is a whole number of sectors.
    fn disk_range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            warn!("virtio-blk: data length {len} is not a multiple of 512");
            return None;
        }
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(len)?;
        if end > self.capacity_sectors * SECTOR_SIZE {
            warn!(
                "virtio-blk: sectors {sector}+{} past the end of the disk ({} sectors)",
                len / SECTOR_SIZE,
                self.capacity_sectors
            );
            return None;
        }
        Some(start)
    }

    fn read_request(
        &mut self,
        bufs: &ChainBuffers,
        mem: &GuestMemoryMmap,
        sector: u64,
        len: u64,
    ) -> (u8, u64) {
        let Some(disk_off) = self.disk_range(sector, len) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(self.bounce.len());
            let chunk = &mut self.bounce[..n];
            if let Err(e) = self.file.read_exact_at(chunk, disk_off + done) {
                warn!("virtio-blk: read at byte {} failed: {e}", disk_off + done);
                return (VIRTIO_BLK_S_IOERR, done);
            }
            match bufs.write_at(mem, done, chunk) {
                Ok(w) if w == n => done += n as u64,
                Ok(w) => return (VIRTIO_BLK_S_IOERR, done + w as u64),
                Err(e) => {
                    warn!("virtio-blk: failed to write read data to guest memory: {e}");
                    return (VIRTIO_BLK_S_IOERR, done);
                }
            }
        }
        (VIRTIO_BLK_S_OK, done)
    }

    fn write_request(&mut self, bufs: &ChainBuffers, mem: &GuestMemoryMmap, sector: u64) -> u8 {
        if self.read_only {
            warn!("virtio-blk: write to a read-only disk refused");
            return VIRTIO_BLK_S_IOERR;
        }
        let len = bufs.readable_len().saturating_sub(HEADER_LEN);
        let Some(disk_off) = self.disk_range(sector, len) else {
            return VIRTIO_BLK_S_IOERR;
        };
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(self.bounce.len());
            let chunk = &mut self.bounce[..n];
            match bufs.read_at(mem, HEADER_LEN + done, chunk) {
                Ok(r) if r == n => {}
                Ok(_) => return VIRTIO_BLK_S_IOERR,
                Err(e) => {
                    warn!("virtio-blk: failed to read write data from guest memory: {e}");
                    return VIRTIO_BLK_S_IOERR;
                }
            }
            if let Err(e) = self.file.write_all_at(chunk, disk_off + done) {
                warn!("virtio-blk: write at byte {} failed: {e}", disk_off + done);
                return VIRTIO_BLK_S_IOERR;
            }
            done += n as u64;
        }
        VIRTIO_BLK_S_OK
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
        if self.read_only {
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
        self.acked_features = 0;
    }

    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> crate::device::Result<bool> {
        if index != 0 {
            return Err(DeviceError::NoSuchQueue(index));
        }
        serve_queue(index, queue, mem, |bufs| self.execute(bufs, mem))
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
