//! `vpfctl blk-workload`: a userspace virtio-blk driver for one VF, the
//! stand-in for an L2 guest's driver. It keeps several write-then-verify
//! requests in flight with its rings and buffers in its own DMA memory,
//! logs every request and completion, and when told its member moved it
//! carries on with the destination VF using the same rings: the context
//! written to the destination already holds the queue addresses and
//! indices, so only the BAR mapping and the doorbell change.
//!
//! Coordination (state directory `D`):
//! * the workload writes `D/pid`, `D/ranges` (its DMA memory, `ADDR:PAGES`
//!   in 4 KiB pages, for `migrate --range-file`), then `D/ready` once
//!   requests are in flight;
//! * the member moved: `D/moved` holds the destination BDF, and SIGUSR1
//!   (optional: the file is also polled every 10 ms). The file is renamed
//!   to `D/moved.N` once acted on, so further moves work the same way;
//! * SIGTERM / SIGINT: stop submitting, drain, verify, exit;
//! * at exit `D/done` holds the END line of the log.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::dma::{DmaMem, Mem, PAGE};
use crate::error::Result as VResult;
use crate::error::{Error, Result};
use crate::migrate::mono_ns;
use crate::pci;
use crate::virtio::{st, VirtioPci, F_VERSION_1};
use crate::virtq::{Buf, SplitQueue, RING_PAGES};

/// virtio-blk request types.
pub const BLK_T_IN: u32 = 0;
/// Write.
pub const BLK_T_OUT: u32 = 1;
/// Status OK.
pub const BLK_S_OK: u8 = 0;
/// Sector size.
pub const SECTOR: u64 = 512;
const STATUS_UNWRITTEN: u8 = 0xff;

static MOVE_FLAG: AtomicBool = AtomicBool::new(false);
static STOP_FLAG: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    MOVE_FLAG.store(true, Ordering::SeqCst);
}

extern "C" fn on_term(_: libc::c_int) {
    STOP_FLAG.store(true, Ordering::SeqCst);
}

/// `len` pseudo-random bytes from `seed` (xorshift64*): the same generator
/// as the host tests' `tests::pattern::pattern`, so the host can rebuild
/// every written block from the `dseed` in the log.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The data seed of write request `id` of a run seeded `seed`.
pub fn data_seed(seed: u64, id: u64) -> u64 {
    (seed << 40) ^ id
}

/// The 16-byte virtio-blk request header.
pub fn blk_header(ty: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Options.
#[derive(Debug, Clone)]
pub struct WorkloadOpts {
    /// The VF to start on.
    pub vf: String,
    /// Log file.
    pub log: PathBuf,
    /// State directory for coordination.
    pub state_dir: Option<PathBuf>,
    /// First sector used.
    pub start_sector: u64,
    /// Blocks used (each `block_bytes`).
    pub blocks: u64,
    /// Bytes per request.
    pub block_bytes: usize,
    /// Requests in flight.
    pub inflight: usize,
    /// Queue size.
    pub queue_size: u16,
    /// Total requests to submit (0 = until stopped).
    pub requests: u64,
    /// Requests to complete after the (first) move before finishing (0 =
    /// ignore).
    pub after_move: u64,
    /// Most requests submitted per second (0 = no limit).
    pub rate: u64,
    /// Pattern seed.
    pub seed: u64,
    /// Longest wait without any completion.
    pub stall_timeout: Duration,
    /// Bind VFs to pci-pf-stub (with `vfio`: vfio-pci) if another kernel
    /// driver owns them.
    pub bind: bool,
    /// Reach the VFs through VFIO ([`VfioPlatform`]); a move is then a
    /// VFIO migration this process makes.
    pub vfio: bool,
}

/// Final counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Requests submitted.
    pub submitted: u64,
    /// Requests completed.
    pub completed: u64,
    /// Writes completed.
    pub writes: u64,
    /// Reads completed.
    pub reads: u64,
    /// Reads whose data did not match.
    pub verify_failures: u64,
    /// Requests completed with a non-OK status.
    pub status_errors: u64,
    /// Moves done.
    pub moves: u64,
    /// Device the workload ended on.
    pub device: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Read,
}

impl Op {
    fn letter(self) -> &'static str {
        match self {
            Op::Write => "W",
            Op::Read => "R",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum SlotState {
    Idle,
    Busy {
        id: u64,
        op: Op,
        block: u64,
        head: u16,
    },
    NeedRead {
        block: u64,
        write_id: u64,
    },
}

/// The scheduling core, independent of the device: which request each
/// slot issues next and what data a read must return. Every slot owns one
/// block at a time (write it, then read it back), so no two requests in
/// flight touch the same sectors.
#[derive(Debug)]
pub struct Scheduler {
    seed: u64,
    blocks: u64,
    slots: Vec<SlotState>,
    owned: Vec<bool>,
    next_block: u64,
    next_id: u64,
    /// Last completed write per block: `block → (id, data seed)`.
    pub last_write: BTreeMap<u64, (u64, u64)>,
}

/// One request to issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Issue {
    /// Slot index.
    pub slot: usize,
    /// Request id.
    pub id: u64,
    /// Write or read.
    pub write: bool,
    /// Block number.
    pub block: u64,
    /// For a write, its data seed; for a read, the data seed expected.
    pub dseed: u64,
}

impl Scheduler {
    /// `slots` parallel slots over `blocks` blocks (`blocks ≥ slots`).
    pub fn new(seed: u64, blocks: u64, slots: usize) -> Scheduler {
        assert!(blocks >= slots as u64 && slots > 0);
        Scheduler {
            seed,
            blocks,
            slots: vec![SlotState::Idle; slots],
            owned: vec![false; blocks as usize],
            next_block: 0,
            next_id: 1,
            last_write: BTreeMap::new(),
        }
    }

    /// Next request for an idle slot; `new_writes` false lets only pending
    /// verification reads through.
    pub fn next(&mut self, new_writes: bool) -> Option<Issue> {
        let slot = self
            .slots
            .iter()
            .position(|s| matches!(s, SlotState::NeedRead { .. }))
            .or_else(|| {
                new_writes
                    .then(|| self.slots.iter().position(|s| matches!(s, SlotState::Idle)))
                    .flatten()
            })?;
        let id = self.next_id;
        let issue = match self.slots[slot] {
            SlotState::NeedRead { block, write_id } => Issue {
                slot,
                id,
                write: false,
                block,
                dseed: data_seed(self.seed, write_id),
            },
            SlotState::Idle => {
                let mut b = self.next_block;
                while self.owned[b as usize] {
                    b = (b + 1) % self.blocks;
                }
                self.owned[b as usize] = true;
                self.next_block = (b + 1) % self.blocks;
                Issue {
                    slot,
                    id,
                    write: true,
                    block: b,
                    dseed: data_seed(self.seed, id),
                }
            }
            SlotState::Busy { .. } => unreachable!("chosen slots are not busy"),
        };
        self.next_id += 1;
        Some(issue)
    }

    /// Mark `issue` as submitted with descriptor `head`.
    pub fn submitted(&mut self, issue: &Issue, head: u16) {
        self.slots[issue.slot] = SlotState::Busy {
            id: issue.id,
            op: if issue.write { Op::Write } else { Op::Read },
            block: issue.block,
            head,
        };
    }

    /// The slot whose request uses head `head`, with `(id, write, block)`.
    pub fn by_head(&self, head: u16) -> Option<(usize, u64, bool, u64)> {
        self.slots.iter().enumerate().find_map(|(i, s)| match *s {
            SlotState::Busy {
                id,
                op,
                block,
                head: h,
            } if h == head => Some((i, id, op == Op::Write, block)),
            _ => None,
        })
    }

    /// Record completion of the request in `slot`.
    pub fn completed(&mut self, slot: usize) {
        if let SlotState::Busy { id, op, block, .. } = self.slots[slot] {
            self.slots[slot] = match op {
                Op::Write => {
                    self.last_write
                        .insert(block, (id, data_seed(self.seed, id)));
                    SlotState::NeedRead {
                        block,
                        write_id: id,
                    }
                }
                Op::Read => {
                    self.owned[block as usize] = false;
                    SlotState::Idle
                }
            };
        }
    }

    /// Whether every slot is idle.
    pub fn all_idle(&self) -> bool {
        self.slots.iter().all(|s| matches!(s, SlotState::Idle))
    }
}

/// DMA memory the workload can publish and re-check.
pub trait DmaBuf: Mem + Send {
    /// `(address, 4 KiB pages)` ranges of the memory.
    fn ranges(&self) -> Vec<(u64, u64)>;
    /// Error if the memory moved since allocation.
    fn check_stable(&self) -> VResult<()>;
}

impl DmaBuf for DmaMem {
    fn ranges(&self) -> Vec<(u64, u64)> {
        DmaMem::ranges(self)
    }
    fn check_stable(&self) -> VResult<()> {
        DmaMem::check_stable(self)
    }
}

/// How the workload reaches functions and memory: sysfs and pagemap in
/// the guest ([`Sysfs`]), an in-process device model in host tests.
pub trait Platform {
    /// Make `bdf` drivable from userspace (binding it if `bind`).
    fn prepare(&self, bdf: &str, bind: bool) -> VResult<()>;
    /// Map the function's virtio structures.
    fn open(&self, bdf: &str) -> VResult<VirtioPci>;
    /// Allocate DMA memory.
    fn alloc(&self, len: usize) -> VResult<Box<dyn DmaBuf>>;
    /// The member moved from `from` to `to`: with [`Sysfs`] the owner has
    /// migrated it already (nothing to do); with [`VfioPlatform`] this
    /// process migrates it now through VFIO. Returns what to log.
    fn take_over(&self, _from: &str, _to: &str) -> VResult<Option<String>> {
        Ok(None)
    }
}

/// The real platform: sysfs, `resourceN` mmap, pagemap.
#[derive(Debug, Clone, Copy)]
pub struct Sysfs;

impl Platform for Sysfs {
    fn prepare(&self, bdf: &str, bind: bool) -> VResult<()> {
        pci::prepare_for_userspace(bdf, bind)
    }
    fn open(&self, bdf: &str) -> VResult<VirtioPci> {
        VirtioPci::open(bdf)
    }
    fn alloc(&self, len: usize) -> VResult<Box<dyn DmaBuf>> {
        Ok(Box::new(DmaMem::alloc(len)?))
    }
}

/// VFIO: the VF bound to `vfio-pci` or a variant driver, DMA through the
/// IOMMU, and a move is a VFIO migration this process drives
/// ([`crate::vfio::migrate`]).
#[derive(Debug)]
pub struct VfioPlatform {
    vfio: crate::vfio::Vfio,
}

impl VfioPlatform {
    /// Opens the VFIO container.
    pub fn open() -> VResult<VfioPlatform> {
        Ok(VfioPlatform {
            vfio: crate::vfio::Vfio::open()?,
        })
    }
}

impl Platform for VfioPlatform {
    fn prepare(&self, bdf: &str, bind: bool) -> VResult<()> {
        self.vfio.prepare(bdf, bind)
    }
    fn open(&self, bdf: &str) -> VResult<VirtioPci> {
        self.vfio.device(bdf)?.open_virtio()
    }
    fn alloc(&self, len: usize) -> VResult<Box<dyn DmaBuf>> {
        Ok(Box::new(self.vfio.alloc(len)?))
    }
    fn take_over(&self, from: &str, to: &str) -> VResult<Option<String>> {
        let src = self.vfio.device(from)?;
        let dst = self.vfio.device(to)?;
        let m = crate::vfio::migrate(&src, &dst)?;
        Ok(Some(format!(
            "vfio_flags={:#x} precopy_bytes={} stop_copy_bytes={} downtime_us={} total_us={}",
            m.flags,
            m.precopy_bytes,
            m.stop_copy_bytes,
            m.downtime.as_micros(),
            m.total.as_micros()
        )))
    }
}

struct Attached {
    dev: VirtioPci,
    notify_off: u16,
}

fn attach_fresh(
    p: &dyn Platform,
    bdf: &str,
    mem: &dyn DmaBuf,
    q: &SplitQueue,
    timeout: Duration,
) -> Result<(Attached, u64)> {
    let dev = p.open(bdf)?;
    let required = 1u64 << F_VERSION_1;
    dev.init(required, required, timeout)?;
    if dev.num_queues() == 0 {
        return Err(Error::device(bdf, "device has no queues"));
    }
    let notify_off = dev.setup_queue(0, q, mem)?;
    dev.check_notify(notify_off)?;
    dev.driver_ok()?;
    let cap = u64::from(dev.device_cfg_r32(0).unwrap_or(0))
        | (u64::from(dev.device_cfg_r32(4).unwrap_or(0)) << 32);
    Ok((Attached { dev, notify_off }, cap))
}

/// Take over `bdf` after a migration: no reset, no queue programming; the
/// device must already run our queue 0 (its context came from the source).
fn attach_moved(
    p: &dyn Platform,
    bdf: &str,
    mem: &dyn DmaBuf,
    q: &SplitQueue,
) -> Result<(Attached, u64)> {
    let dev = p.open(bdf)?;
    let status = dev.status();
    if status & st::DRIVER_OK == 0 {
        return Err(Error::device(
            bdf,
            format!(
                "destination device status {status:#x} lacks DRIVER_OK: was the context written?"
            ),
        ));
    }
    let desc = dev.queue_desc(0);
    if desc != mem.phys(q.desc_off()) {
        return Err(Error::Verify(format!(
            "destination {bdf} queue 0 descriptor table is at {desc:#x}, ours at {:#x}",
            mem.phys(q.desc_off())
        )));
    }
    let notify_off = dev.queue_notify_off(0);
    dev.check_notify(notify_off)?;
    Ok((Attached { dev, notify_off }, desc))
}

struct Log {
    w: BufWriter<File>,
    path: PathBuf,
}

impl Log {
    fn line(&mut self, s: &str) -> Result<()> {
        writeln!(self.w, "{s}").map_err(|e| Error::io("write to", &self.path, e))
    }
    fn flush(&mut self) -> Result<()> {
        self.w
            .flush()
            .map_err(|e| Error::io("write to", &self.path, e))
    }
}

fn write_file(path: &Path, s: &str) -> Result<()> {
    std::fs::write(path, s).map_err(|e| Error::io("write", path, e))
}

fn install_signals() {
    let usr1: extern "C" fn(libc::c_int) = on_usr1;
    let term: extern "C" fn(libc::c_int) = on_term;
    // SAFETY: the handlers only store to atomics (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGUSR1, usr1 as libc::sighandler_t);
        libc::signal(libc::SIGTERM, term as libc::sighandler_t);
        libc::signal(libc::SIGINT, term as libc::sighandler_t);
    }
}

/// Run the workload on the real platform. Returns the summary; a
/// verification failure or an exactly-once violation is an
/// `Err(Verify)` after the log is complete.
pub fn run(o: &WorkloadOpts) -> Result<Summary> {
    if o.vfio {
        return run_on(&VfioPlatform::open()?, o);
    }
    run_on(&Sysfs, o)
}

/// [`run`] on any platform.
pub fn run_on(p: &dyn Platform, o: &WorkloadOpts) -> Result<Summary> {
    if o.block_bytes == 0
        || !o.block_bytes.is_multiple_of(SECTOR as usize)
        || o.block_bytes > 1 << 20
    {
        return Err(Error::Usage(format!(
            "--block-size {} must be a multiple of 512 up to 1 MiB",
            o.block_bytes
        )));
    }
    if o.inflight == 0 || o.inflight > 128 || o.blocks < o.inflight as u64 {
        return Err(Error::Usage(format!(
            "--inflight {} must be 1..=128 and no more than --blocks {}",
            o.inflight, o.blocks
        )));
    }
    let block_pages = o.block_bytes.div_ceil(PAGE);
    // Worst case (every data page discontiguous): header, pages, status.
    let descs = o.inflight * (2 + block_pages);
    if descs > usize::from(o.queue_size) {
        return Err(Error::Usage(format!(
            "--inflight {} requests of {} bytes may need {descs} descriptors; --queue-size is {}",
            o.inflight, o.block_bytes, o.queue_size
        )));
    }
    install_signals();
    p.prepare(&o.vf, o.bind)?;
    let hdr_off = RING_PAGES * PAGE;
    let data_off = hdr_off + PAGE;
    let mem_box = p.alloc(data_off + o.inflight * block_pages * PAGE)?;
    let mem: &dyn DmaBuf = &*mem_box;
    let mut q = SplitQueue::new(mem, 0, o.queue_size)?;
    let (mut cur, capacity) = attach_fresh(p, &o.vf, mem, &q, o.stall_timeout)?;
    let sectors_needed = o.start_sector + o.blocks * o.block_bytes as u64 / SECTOR;
    if sectors_needed > capacity {
        return Err(Error::Usage(format!(
            "workload needs sectors up to {sectors_needed}, {} has {capacity}",
            o.vf
        )));
    }
    let file = File::create(&o.log).map_err(|e| Error::io("create", &o.log, e))?;
    let mut log = Log {
        w: BufWriter::new(file),
        path: o.log.clone(),
    };
    let status_page = mem.phys(hdr_off) & !(PAGE as u64 - 1);
    let used_page = mem.phys(q.used_off());
    log.line("# vpfctl blk-workload log v1")?;
    log.line(&format!(
        "START t={} dev={} capacity={capacity} start_sector={} blocks={} block_bytes={} inflight={} queue_size={} seed={} desc={:#x} avail={:#x} used={:#x}",
        mono_ns(), o.vf, o.start_sector, o.blocks, o.block_bytes, o.inflight, q.size(), o.seed,
        mem.phys(q.desc_off()), mem.phys(q.avail_off()), used_page
    ))?;
    if let Some(d) = &o.state_dir {
        std::fs::create_dir_all(d).map_err(|e| Error::io("create", d, e))?;
        let _ = std::fs::remove_file(d.join("moved"));
        let _ = std::fs::remove_file(d.join("ready"));
        let _ = std::fs::remove_file(d.join("done"));
        write_file(&d.join("pid"), &format!("{}\n", std::process::id()))?;
        let mut r = String::from("# DMA ranges of the workload: ADDR:PAGES (4 KiB pages)\n");
        for (a, n) in mem.ranges() {
            r.push_str(&format!("{a:#x}:{n}\n"));
        }
        write_file(&d.join("ranges"), &r)?;
    }

    let mut sched = Scheduler::new(o.seed, o.blocks, o.inflight);
    let mut sum = Summary {
        device: o.vf.clone(),
        ..Default::default()
    };
    let mut problems: Vec<String> = Vec::new();
    let mut ready_written = false;
    let mut moved_at: Option<u64> = None;
    let mut last_progress = Instant::now();
    let mut last_poll_file = Instant::now();
    let mut next_submit = Instant::now();

    loop {
        let finishing = STOP_FLAG.load(Ordering::SeqCst)
            || (o.requests > 0 && sum.submitted >= o.requests)
            || (o.after_move > 0 && moved_at.is_some_and(|m| sum.completed >= m + o.after_move));

        // Submit (no sooner than the rate allows).
        let mut kicked = false;
        while q.in_flight() < o.inflight && (o.rate == 0 || Instant::now() >= next_submit) {
            let Some(issue) = sched.next(!finishing) else {
                break;
            };
            let slot_hdr = hdr_off + issue.slot * 32;
            let slot_data = data_off + issue.slot * block_pages * PAGE;
            let sector = o.start_sector + issue.block * o.block_bytes as u64 / SECTOR;
            if issue.write {
                mem.write(slot_data, &pattern(issue.dseed, o.block_bytes));
                mem.write(slot_hdr, &blk_header(BLK_T_OUT, sector));
            } else {
                mem.write(slot_data, &vec![0u8; o.block_bytes]);
                mem.write(slot_hdr, &blk_header(BLK_T_IN, sector));
            }
            mem.write(slot_hdr + 16, &[STATUS_UNWRITTEN]);
            let bufs = [
                Buf::r(slot_hdr, 16),
                Buf {
                    off: slot_data,
                    len: o.block_bytes,
                    write: !issue.write,
                },
                Buf::w(slot_hdr + 16, 1),
            ];
            let head = q.submit(mem, &bufs)?;
            sched.submitted(&issue, head);
            sum.submitted += 1;
            if let Some(gap) = 1_000_000_000u64.checked_div(o.rate) {
                // At most a second of credit after an idle stretch.
                let now = Instant::now();
                let floor = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
                next_submit = next_submit.max(floor) + Duration::from_nanos(gap);
            }
            log.line(&format!(
                "SUBMIT t={} id={} op={} slot={} head={head} sector={sector} bytes={} dseed={:#x} dev={}",
                mono_ns(),
                issue.id,
                if issue.write { "W" } else { "R" },
                issue.slot,
                o.block_bytes,
                issue.dseed,
                sum.device
            ))?;
            kicked = true;
        }
        if kicked {
            cur.dev.notify(0, cur.notify_off);
            if !ready_written {
                if let Some(d) = &o.state_dir {
                    write_file(&d.join("ready"), &format!("{}\n", o.vf))?;
                }
                ready_written = true;
            }
        }

        // A move requested (signal or file)? Taken after this turn's
        // submissions, before their completions are polled: requests are
        // in flight when the member moves.
        let mut check_move = MOVE_FLAG.swap(false, Ordering::SeqCst);
        if last_poll_file.elapsed() > Duration::from_millis(10) {
            last_poll_file = Instant::now();
            check_move |= o
                .state_dir
                .as_ref()
                .is_some_and(|d| d.join("moved").exists());
        }
        if check_move {
            if let Some(d) = &o.state_dir {
                let mf = d.join("moved");
                // An empty file is one being written (`echo BDF > moved`
                // creates it before it writes): look again at the next poll.
                if let Some(s) = std::fs::read_to_string(&mf)
                    .ok()
                    .filter(|s| !s.trim().is_empty())
                {
                    let dest = pci::normalize_bdf(&s)
                        .map_err(|m| Error::Usage(format!("{}: {m}", mf.display())))?;
                    p.prepare(&dest, o.bind)?;
                    let migration = match p.take_over(&sum.device, &dest) {
                        Ok(m) => m,
                        Err(e) => {
                            log.line(&format!(
                                "ERROR t={} msg=\"migration to {dest}: {e}\"",
                                mono_ns()
                            ))?;
                            log.flush()?;
                            return Err(e);
                        }
                    };
                    let (next, desc) = attach_moved(p, &dest, mem, &q)?;
                    sum.moves += 1;
                    let done = d.join(format!("moved.{}", sum.moves));
                    std::fs::rename(&mf, &done).map_err(|e| Error::io("rename", &mf, e))?;
                    log.line(&format!(
                        "MOVED t={} from={} to={dest} inflight={} completed={} dest_desc={desc:#x} avail_idx={} used_idx={}{}",
                        mono_ns(), sum.device, q.in_flight(), sum.completed, q.next_avail(), q.last_used(),
                        migration.map(|m| format!(" {m}")).unwrap_or_default()
                    ))?;
                    cur = next;
                    sum.device = dest;
                    moved_at.get_or_insert(sum.completed);
                    // Entries published after the destination went Active
                    // were only notified to the source: kick once.
                    cur.dev.notify(0, cur.notify_off);
                    last_progress = Instant::now();
                }
            }
        }

        // Complete.
        let mut progressed = false;
        loop {
            let used = match q.poll(mem) {
                Ok(Some(u)) => u,
                Ok(None) => break,
                Err(e) => {
                    log.line(&format!("ERROR t={} msg=\"{e}\"", mono_ns()))?;
                    log.flush()?;
                    return Err(e);
                }
            };
            progressed = true;
            let Some((slot, id, write, block)) = sched.by_head(used.id) else {
                let e = Error::Verify(format!("completion of head {} matches no request", used.id));
                log.line(&format!("ERROR t={} msg=\"{e}\"", mono_ns()))?;
                log.flush()?;
                return Err(e);
            };
            let slot_hdr = hdr_off + slot * 32;
            let slot_data = data_off + slot * block_pages * PAGE;
            let mut st_byte = [0u8];
            mem.read(slot_hdr + 16, &mut st_byte);
            let status = st_byte[0];
            let mut verify = "-";
            let mut wpages = vec![used_page, status_page];
            if status != BLK_S_OK {
                sum.status_errors += 1;
                problems.push(format!("request {id} completed with status {status}"));
            }
            if write {
                sum.writes += 1;
            } else {
                sum.reads += 1;
                for p in 0..block_pages {
                    wpages.push(mem.phys(slot_data + p * PAGE));
                }
                let (_, dseed) = sched.last_write.get(&block).copied().unwrap_or((0, 0));
                let mut got = vec![0u8; o.block_bytes];
                mem.read(slot_data, &mut got);
                if status == BLK_S_OK && got == pattern(dseed, o.block_bytes) {
                    verify = "ok";
                } else {
                    verify = "bad";
                    sum.verify_failures += 1;
                    problems.push(format!("request {id} read block {block} with wrong data"));
                }
            }
            sum.completed += 1;
            let wp: Vec<String> = wpages.iter().map(|p| format!("{p:#x}")).collect();
            log.line(&format!(
                "DONE t={} id={id} op={} head={} status={status} used_len={} verify={verify} dev={} wpages={}",
                mono_ns(),
                if write { Op::Write.letter() } else { Op::Read.letter() },
                used.id,
                used.len,
                sum.device,
                wp.join(",")
            ))?;
            sched.completed(slot);
        }
        if progressed {
            last_progress = Instant::now();
            log.flush()?;
        }
        if finishing && q.in_flight() == 0 && sched.next_pending_reads_done() {
            break;
        }
        if q.in_flight() > 0 && last_progress.elapsed() > o.stall_timeout {
            let e = Error::Timeout {
                ms: o.stall_timeout.as_millis() as u64,
                what: format!(
                    "any of {} requests in flight on {} to complete",
                    q.in_flight(),
                    sum.device
                ),
            };
            log.line(&format!("ERROR t={} msg=\"{e}\"", mono_ns()))?;
            log.flush()?;
            return Err(e);
        }
        if !progressed {
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    for (block, (id, dseed)) in &sched.last_write {
        log.line(&format!(
            "FINAL sector={} bytes={} id={id} dseed={dseed:#x}",
            o.start_sector + block * o.block_bytes as u64 / SECTOR,
            o.block_bytes
        ))?;
    }
    let stable = mem.check_stable();
    if let Err(e) = &stable {
        problems.push(e.to_string());
    }
    let result = if problems.is_empty() { "ok" } else { "fail" };
    let end = format!(
        "END t={} submitted={} completed={} writes={} reads={} verify_failures={} status_errors={} moves={} dev={} result={result}",
        mono_ns(),
        sum.submitted,
        sum.completed,
        sum.writes,
        sum.reads,
        sum.verify_failures,
        sum.status_errors,
        sum.moves,
        sum.device
    );
    log.line(&end)?;
    log.flush()?;
    // Stop the device from using memory we are about to free.
    let _ = cur.dev.reset(Duration::from_secs(1));
    if let Some(d) = &o.state_dir {
        write_file(&d.join("done"), &format!("{end}\n"))?;
    }
    if problems.is_empty() {
        Ok(sum)
    } else {
        Err(Error::Verify(problems.join("; ")))
    }
}

impl Scheduler {
    /// No slot waits for a verification read.
    pub fn next_pending_reads_done(&self) -> bool {
        self.all_idle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::FakeMem;
    use crate::virtq::tests::FakeDevice;

    #[test]
    fn pattern_matches_host_test_generator() {
        // Same values as tests::pattern::pattern (xorshift64*).
        assert_eq!(pattern(1, 100), pattern(1, 100));
        assert_ne!(pattern(1, 100), pattern(2, 100));
        assert_eq!(pattern(3, 13).len(), 13);
        let mut state = 7u64.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let first = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        assert_eq!(&pattern(7, 8)[..], &first[..]);
        assert_ne!(data_seed(1, 5), data_seed(2, 5));
        assert_ne!(data_seed(1, 5), data_seed(1, 6));
    }

    #[test]
    fn header_layout() {
        let h = blk_header(BLK_T_OUT, 0x1122);
        assert_eq!(&h[0..4], &[1, 0, 0, 0]);
        assert_eq!(&h[4..8], &[0; 4]);
        assert_eq!(&h[8..16], &0x1122u64.to_le_bytes());
    }

    #[test]
    fn scheduler_write_then_verify_and_exclusive_blocks() {
        let mut s = Scheduler::new(9, 4, 3);
        let mut issued = Vec::new();
        for head in 0..3u16 {
            let i = s.next(true).unwrap();
            assert!(i.write);
            s.submitted(&i, head);
            issued.push(i);
        }
        assert_eq!(s.next(true), None, "all slots busy");
        let blocks: Vec<u64> = issued.iter().map(|i| i.block).collect();
        assert_eq!(blocks, vec![0, 1, 2]);
        // Complete the second write: its slot reads the block back.
        let (slot, id, write, block) = s.by_head(1).unwrap();
        assert_eq!((id, write, block), (2, true, 1));
        s.completed(slot);
        let r = s.next(false).unwrap();
        assert!(!r.write);
        assert_eq!(r.block, 1);
        assert_eq!(r.dseed, data_seed(9, 2));
        s.submitted(&r, 7);
        let (slot, _, write, _) = s.by_head(7).unwrap();
        assert!(!write);
        s.completed(slot);
        // Block 1 is free again; block 3 is next in turn, then 1.
        let w = s.next(true).unwrap();
        assert_eq!(w.block, 3);
        s.submitted(&w, 8);
        assert_eq!(s.last_write.get(&1), Some(&(2, data_seed(9, 2))));
        assert!(!s.all_idle());
        assert_eq!(s.next(false), None, "no writes when finishing");
    }

    /// The workload's request layout against a fake disk behind the fake
    /// device: write, read back, verify.
    #[test]
    fn request_round_trip_on_fake_device() {
        let mem = FakeMem::new(8, false);
        let mut q = SplitQueue::new(&mem, 0, 8).unwrap();
        let mut dev = FakeDevice::new(&q);
        let mut disk = vec![0u8; 16 * 512];
        let hdr = 3 * PAGE;
        let data = 4 * PAGE;
        let payload = pattern(data_seed(1, 1), 1024);
        mem.write(data, &payload);
        mem.write(hdr, &blk_header(BLK_T_OUT, 4));
        mem.write(hdr + 16, &[STATUS_UNWRITTEN]);
        q.submit(
            &mem,
            &[Buf::r(hdr, 16), Buf::r(data, 1024), Buf::w(hdr + 16, 1)],
        )
        .unwrap();
        for (head, readable, writable) in dev.take(&mem) {
            let ty = u32::from_le_bytes(readable[0..4].try_into().unwrap());
            let sector = u64::from_le_bytes(readable[8..16].try_into().unwrap()) as usize;
            assert_eq!(ty, BLK_T_OUT);
            disk[sector * 512..sector * 512 + 1024].copy_from_slice(&readable[16..]);
            dev.complete(&mem, head, &writable, &[BLK_S_OK]);
        }
        assert!(q.poll(&mem).unwrap().is_some());
        mem.write(hdr, &blk_header(BLK_T_IN, 4));
        mem.write(data, &[0u8; 1024]);
        q.submit(
            &mem,
            &[Buf::r(hdr, 16), Buf::w(data, 1024), Buf::w(hdr + 16, 1)],
        )
        .unwrap();
        for (head, readable, writable) in dev.take(&mem) {
            let sector = u64::from_le_bytes(readable[8..16].try_into().unwrap()) as usize;
            let mut out = disk[sector * 512..sector * 512 + 1024].to_vec();
            out.push(BLK_S_OK);
            dev.complete(&mem, head, &writable, &out);
        }
        let u = q.poll(&mem).unwrap().unwrap();
        assert_eq!(u.len, 1025);
        let mut got = vec![0u8; 1024];
        mem.read(data, &mut got);
        assert_eq!(got, payload);
    }
}
