//! virtio-blk request execution and the I/O worker that runs it off the
//! device's lock.
//!
//! * [`DiskBackend`]: where the data lives (a file; a test may plug in a
//!   backend that fails or blocks).
//! * [`RequestContext`]: runs one request (a [`ChainBuffers`]) against the
//!   backend and guest memory: header, data, status byte. Every guest-memory
//!   write goes through vm-memory's `Bytes` API, so it marks the dirty
//!   bitmap (and the member's write records) like any other device write.
//! * [`IoWorker`]: one thread per block device that takes submitted
//!   requests in order, runs them, and hands back [`Completion`]s, signalling
//!   an eventfd. The device model only takes chains off the ring and puts
//!   completions on it, so the function's lock is never held across disk
//!   I/O: a vCPU touching the function, the admin queue or another VF never
//!   waits behind this device's disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, warn};
use vm_migration::DmaMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::block::{
    SECTOR_SIZE, SERIAL_LEN, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use crate::chain::ChainBuffers;

/// Length of the request header (type, reserved, sector).
const HEADER_LEN: u64 = 16;
/// Bounce buffer size for disk I/O.
const BOUNCE_LEN: usize = 64 * 1024;
/// How often a wait for in-flight requests says it is still waiting.
const WAIT_REPORT: Duration = Duration::from_secs(5);

/// Where a block device's data lives.
pub trait DiskBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> std::io::Result<u64>;
    /// Fills `buf` from `offset` (a short read is an error).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Makes written data durable.
    fn flush(&self) -> std::io::Result<()>;
}

impl DiskBackend for File {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.write_all_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.sync_data()
    }
}

/// A finished request: put `head` with used length `len` on queue `queue`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub queue: u16,
    pub head: u16,
    pub len: u32,
}

/// What running a request needs, shared by the device and its worker.
pub struct RequestContext {
    pub disk: Arc<dyn DiskBackend>,
    pub read_only: bool,
    pub capacity_sectors: u64,
    pub serial: [u8; SERIAL_LEN],
    pub counters: BlockCounters,
}

/// What a block device has done (`vm.counters`): requests that completed
/// with VIRTIO_BLK_S_OK and their bytes.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub read_ops: std::sync::atomic::AtomicU64,
    pub read_bytes: std::sync::atomic::AtomicU64,
    pub write_ops: std::sync::atomic::AtomicU64,
    pub write_bytes: std::sync::atomic::AtomicU64,
}

impl BlockCounters {
    /// `(name, value)` pairs, Cloud Hypervisor's names.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        vec![
            ("read_bytes", self.read_bytes.load(Relaxed)),
            ("read_ops", self.read_ops.load(Relaxed)),
            ("write_bytes", self.write_bytes.load(Relaxed)),
            ("write_ops", self.write_ops.load(Relaxed)),
        ]
    }
}

impl RequestContext {
    /// Serves one chain and returns the used length to report. Malformed
    /// requests never fail the queue: a chain without a writable byte
    /// completes with length 0, anything else wrong with `IOERR` or
    /// `UNSUPP` in its status byte.
    pub fn execute(&self, bufs: &ChainBuffers, mem: &DmaMemory, bounce: &mut [u8]) -> u32 {
        let writable = bufs.writable_len();
        if writable == 0 {
            warn!(
                "virtio-blk: chain {} has no writable status byte; completing with length 0",
                bufs.head_index()
            );
            return 0;
        }
        let status_off = writable - 1;
        let (status, data_written) = self.run_request(bufs, mem, status_off, bounce);
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
        &self,
        bufs: &ChainBuffers,
        mem: &DmaMemory,
        data_cap: u64,
        bounce: &mut [u8],
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

        use std::sync::atomic::Ordering::Relaxed;
        match req_type {
            VIRTIO_BLK_T_IN => {
                let (st, n) = self.read_request(bufs, mem, sector, data_cap, bounce);
                if st == VIRTIO_BLK_S_OK {
                    self.counters.read_ops.fetch_add(1, Relaxed);
                    self.counters.read_bytes.fetch_add(n, Relaxed);
                }
                (st, n)
            }
            VIRTIO_BLK_T_OUT => {
                let st = self.write_request(bufs, mem, sector, bounce);
                if st == VIRTIO_BLK_S_OK {
                    let n = bufs.readable_len().saturating_sub(HEADER_LEN);
                    self.counters.write_ops.fetch_add(1, Relaxed);
                    self.counters.write_bytes.fetch_add(n, Relaxed);
                }
                (st, 0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.read_only {
                    return (VIRTIO_BLK_S_OK, 0);
                }
                match self.disk.flush() {
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
        &self,
        bufs: &ChainBuffers,
        mem: &DmaMemory,
        sector: u64,
        len: u64,
        bounce: &mut [u8],
    ) -> (u8, u64) {
        let Some(disk_off) = self.disk_range(sector, len) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(bounce.len());
            let chunk = &mut bounce[..n];
            if let Err(e) = self.disk.read_at(chunk, disk_off + done) {
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

    fn write_request(
        &self,
        bufs: &ChainBuffers,
        mem: &DmaMemory,
        sector: u64,
        bounce: &mut [u8],
    ) -> u8 {
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
                .min(bounce.len());
            let chunk = &mut bounce[..n];
            match bufs.read_at(mem, HEADER_LEN + done, chunk) {
                Ok(r) if r == n => {}
                Ok(_) => return VIRTIO_BLK_S_IOERR,
                Err(e) => {
                    warn!("virtio-blk: failed to read write data from guest memory: {e}");
                    return VIRTIO_BLK_S_IOERR;
                }
            }
            if let Err(e) = self.disk.write_at(chunk, disk_off + done) {
                warn!("virtio-blk: write at byte {} failed: {e}", disk_off + done);
                return VIRTIO_BLK_S_IOERR;
            }
            done += n as u64;
        }
        VIRTIO_BLK_S_OK
    }
}

/// A request handed to the worker.
struct Job {
    queue: u16,
    bufs: ChainBuffers,
    mem: DmaMemory,
}

/// What the worker hands back.
struct Finished {
    done: Mutex<Vec<Completion>>,
    changed: Condvar,
    event: Arc<EventFd>,
}

fn lock_done(f: &Finished) -> MutexGuard<'_, Vec<Completion>> {
    f.done.lock().unwrap_or_else(|e| e.into_inner())
}

impl Finished {
    fn push(&self, c: Completion) {
        lock_done(self).push(c);
        self.changed.notify_all();
        if let Err(e) = self.event.write(1) {
            warn!("virtio-blk: cannot signal a completion: {e}");
        }
    }
}

/// The I/O thread of one block device, and the requests it holds.
pub struct IoWorker {
    ctx: Arc<RequestContext>,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    finished: Arc<Finished>,
    /// Submitted and not yet taken back with [`IoWorker::take`].
    in_flight: usize,
    /// Bounce buffer for requests run inline (when the worker is gone).
    bounce: Vec<u8>,
}

/// Run first by every I/O worker thread (the VMM installs its seccomp
/// filter there); set once.
static WORKER_START: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what every I/O worker thread runs first (see [`WORKER_START`]).
pub fn on_worker_start(f: fn()) {
    let _ = WORKER_START.set(f);
}

impl IoWorker {
    /// Starts the worker thread for `ctx`.
    pub fn spawn(ctx: Arc<RequestContext>) -> std::io::Result<Self> {
        let event = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let finished = Arc::new(Finished {
            done: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            event,
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let (c, f) = (ctx.clone(), finished.clone());
        let thread = std::thread::Builder::new()
            .name("blk-io".into())
            .spawn(move || {
                if let Some(start) = WORKER_START.get() {
                    start();
                }
                let mut bounce = vec![0u8; BOUNCE_LEN];
                for job in rx {
                    let len = c.execute(&job.bufs, &job.mem, &mut bounce);
                    f.push(Completion {
                        queue: job.queue,
                        head: job.bufs.head_index(),
                        len,
                    });
                }
            })?;
        Ok(IoWorker {
            ctx,
            jobs: Some(tx),
            thread: Some(thread),
            finished,
            in_flight: 0,
            bounce: Vec::new(),
        })
    }

    /// The eventfd signalled when a request finishes.
    pub fn event(&self) -> &Arc<EventFd> {
        &self.finished.event
    }

    /// Requests submitted and not yet taken back.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Hands a request to the worker (in submission order). If the worker
    /// is gone (it cannot be, short of a bug), the request runs here so it
    /// still completes.
    pub fn submit(&mut self, queue: u16, bufs: ChainBuffers, mem: &DmaMemory) {
        self.in_flight += 1;
        let job = Job {
            queue,
            bufs,
            mem: mem.clone(),
        };
        let job = match &self.jobs {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        warn!("virtio-blk: the I/O worker is gone; running the request inline");
        self.jobs = None;
        if self.bounce.is_empty() {
            self.bounce = vec![0u8; BOUNCE_LEN];
        }
        let len = self.ctx.execute(&job.bufs, &job.mem, &mut self.bounce);
        self.finished.push(Completion {
            queue: job.queue,
            head: job.bufs.head_index(),
            len,
        });
    }

    /// Moves the finished requests into `out`, in the order they finished.
    pub fn take(&mut self, out: &mut Vec<Completion>) {
        let mut done = lock_done(&self.finished);
        self.in_flight = self.in_flight.saturating_sub(done.len());
        out.append(&mut done);
    }

    /// Waits until every submitted request has finished (they stay to be
    /// taken). Disk I/O is bounded, so this ends; a backend that never
    /// returns is reported every few seconds.
    pub fn wait_idle(&self) {
        let mut done = lock_done(&self.finished);
        while done.len() < self.in_flight {
            let (g, timeout) = match self.finished.changed.wait_timeout(done, WAIT_REPORT) {
                Ok(r) => r,
                Err(e) => e.into_inner(),
            };
            done = g;
            if timeout.timed_out() && done.len() < self.in_flight {
                warn!(
                    "virtio-blk: still waiting for {} of {} requests in flight (the disk is not answering)",
                    self.in_flight - done.len(),
                    self.in_flight
                );
            }
        }
    }

    /// Waits for every request in flight and drops the completions of
    /// queue `queue` (all queues if `None`): the queue was reset, its
    /// driver no longer expects them.
    pub fn discard(&mut self, queue: Option<u16>) {
        self.wait_idle();
        let mut done = lock_done(&self.finished);
        let before = done.len();
        done.retain(|c| queue.is_some_and(|q| c.queue != q));
        self.in_flight -= before - done.len();
    }
}

impl Drop for IoWorker {
    fn drop(&mut self) {
        // The worker ends once it has run what was queued.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
