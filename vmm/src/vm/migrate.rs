//! Live migration of a VM between two VMM processes, over a Unix socket or
//! TCP, with the protocol of [`vm_migration::protocol`]: the sender behind
//! `vm.send-migration`, the receiver behind `vm.receive-migration`.
//!
//! Pre-copy: the sender turns on KVM's dirty log for every memory slot,
//! sends all of memory while the guest runs, then, round after round, the
//! pages written since the last round: KVM's log (what vCPUs wrote) OR'd
//! with the VMM's own dirty bitmap (what devices wrote, the same bitmap
//! that serves the virtio-pf members' write records). When the pages left
//! would take less than the downtime target to send at the measured rate
//! (or after [`MAX_ROUNDS`]), it pauses the VM, sends the last pages and
//! the device and vCPU state, and completes.
//!
//! The sender keeps the CRC-32 of every page as it last sent it; once the
//! VM is paused and the last dirty pages are sent, it checks every page of
//! memory against its CRC and sends any the dirty log did not report
//! (logged, and counted in the `migrated` event). Nested under QEMU TCG,
//! KVM's dirty log misses a few hundred pages of a busy guest per
//! migration; on hardware the check should find none, and one it finds is
//! a bug to report. It costs one read of guest memory during downtime. The receiver builds the VM
//! from the configuration, fills its memory, puts the state in and
//! resumes it; the sender's VMM then ends. Any failure before completion
//! leaves the sender's VM running (resumed if it was paused for the last
//! round) and says why.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vm_migration::protocol::{self, Command, ProtocolError};
use vm_migration::{take_dirty_log, GuestMemoryMmap};

use super::{Payload, Vm, VmError, VmState};
use crate::api::{ApiError, ApiReply, ApiResult};
use crate::snapshot;

/// Most pre-copy rounds after the first full pass.
pub const MAX_ROUNDS: u32 = 8;
/// Default downtime target.
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(300);
/// Most bytes of guest memory in one Memory message.
const MESSAGE_BYTES: u64 = 16 << 20;
/// How long either side waits for the other before giving up.
const PEER_TIMEOUT: Duration = Duration::from_secs(120);
const PAGE: u64 = 4096;

#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("{0:?} is not a migration URL: expected unix:/path or tcp:host:port")]
    Url(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("{0}")]
    Refused(String),
}

/// Where the other VMM listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationUrl {
    Unix(PathBuf),
    Tcp(String),
}

impl MigrationUrl {
    pub fn parse(s: &str) -> Result<Self, MigrationError> {
        if let Some(p) = s.strip_prefix("unix:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            if !p.is_empty() {
                return Ok(MigrationUrl::Unix(PathBuf::from(p)));
            }
        } else if let Some(a) = s.strip_prefix("tcp:") {
            let a = a.strip_prefix("//").unwrap_or(a);
            if a.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                return Ok(MigrationUrl::Tcp(a.to_string()));
            }
        }
        Err(MigrationError::Url(s.to_string()))
    }
}

/// A connection to the other VMM.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

impl Stream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Stream::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrationError {
    let what = what.into();
    move |source| MigrationError::Io { what, source }
}

/// Connects to the receiver.
pub fn connect(url: &MigrationUrl) -> Result<Stream, MigrationError> {
    let s = match url {
        MigrationUrl::Unix(p) => Stream::Unix(
            UnixStream::connect(p).map_err(io(format!("cannot connect to {}", p.display())))?,
        ),
        MigrationUrl::Tcp(a) => {
            Stream::Tcp(TcpStream::connect(a).map_err(io(format!("cannot connect to {a}")))?)
        }
    };
    s.set_timeouts(PEER_TIMEOUT)
        .map_err(io("cannot set socket timeouts"))?;
    Ok(s)
}

/// Listens at `url` and takes one sender (a Unix socket file is removed
/// once the sender is connected).
pub fn accept(url: &MigrationUrl) -> Result<Stream, MigrationError> {
    let s = match url {
        MigrationUrl::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let l =
                UnixListener::bind(p).map_err(io(format!("cannot listen on {}", p.display())))?;
            let (s, _) = l.accept().map_err(io("accepting the sender"))?;
            let _ = std::fs::remove_file(p);
            Stream::Unix(s)
        }
        MigrationUrl::Tcp(a) => {
            let l = TcpListener::bind(a).map_err(io(format!("cannot listen on {a}")))?;
            let (s, _) = l.accept().map_err(io("accepting the sender"))?;
            Stream::Tcp(s)
        }
    };
    s.set_timeouts(PEER_TIMEOUT)
        .map_err(io("cannot set socket timeouts"))?;
    Ok(s)
}

/// Turns KVM's dirty log on or off for every memory slot (slot `i` is
/// region `i`, as the VM registered them).
fn set_dirty_logging(vm: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmError::Restore(format!("memory slot {slot}: {e}")))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the same slot, addresses and host mapping as registered
        // when the VM was built (only the flags change); `mem` keeps the
        // mapping alive.
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| VmError::KvmSetup {
            what: "memory slot dirty logging",
            source,
        })?;
    }
    Ok(())
}

/// Turns runs of set bits of a page bitmap into (address, length) ranges.
fn bits_to_ranges(start: u64, bits: &[u64], out: &mut Vec<(u64, u64)>) {
    let mut run: Option<u64> = None;
    let total = bits.len() as u64 * 64;
    for page in 0..=total {
        let set = page < total && bits[(page / 64) as usize] & (1 << (page % 64)) != 0;
        match (set, run) {
            (true, None) => run = Some(page),
            (false, Some(first)) => {
                out.push((start + first * PAGE, (page - first) * PAGE));
                run = None;
            }
            _ => {}
        }
    }
}

/// The pages written since the last call: KVM's log OR the VMM's bitmap,
/// region by region, as ranges (both logs are reset).
fn dirty_ranges(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<(u64, u64)>, VmError> {
    let device = take_dirty_log(mem);
    let mut out = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let mut bits = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|source| VmError::KvmSetup {
                what: "the dirty log",
                source,
            })?;
        if let Some(d) = device.iter().find(|d| d.start == region.start_addr()) {
            for (w, b) in bits.iter_mut().zip(&d.bits) {
                *w |= *b;
            }
        }
        bits_to_ranges(region.start_addr().0, &bits, &mut out);
    }
    Ok(out)
}

/// The CRC-32 of every page as last sent (a check of the dirty log).
struct SentPages {
    regions: Vec<(u64, Vec<u32>)>,
}

impl SentPages {
    fn new(mem: &GuestMemoryMmap) -> Self {
        SentPages {
            regions: mem
                .iter()
                .map(|r| (r.start_addr().0, vec![0; (r.len() / PAGE) as usize]))
                .collect(),
        }
    }

    fn slot(&mut self, addr: u64) -> Option<&mut u32> {
        self.regions.iter_mut().find_map(|(start, crcs)| {
            let i = addr.checked_sub(*start)? / PAGE;
            crcs.get_mut(i as usize)
        })
    }

    fn record(&mut self, addr: u64, bytes: &[u8]) {
        for (i, page) in bytes.chunks(PAGE as usize).enumerate() {
            if let Some(c) = self.slot(addr + i as u64 * PAGE) {
                *c = crc32fast::hash(page);
            }
        }
    }

    /// Pages whose content differs from what was last sent.
    fn changed(&self, mem: &GuestMemoryMmap) -> Result<Vec<(u64, u64)>, VmError> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; PAGE as usize];
        for (start, crcs) in &self.regions {
            for (i, c) in crcs.iter().enumerate() {
                let addr = start + i as u64 * PAGE;
                mem.read_slice(&mut buf, GuestAddress(addr))
                    .map_err(|e| VmError::Restore(format!("reading guest memory: {e}")))?;
                if crc32fast::hash(&buf) != *c {
                    out.push((addr, PAGE));
                }
            }
        }
        Ok(out)
    }
}

/// Sends `ranges` of guest memory in messages of at most
/// [`MESSAGE_BYTES`]; returns the bytes of memory sent.
fn send_ranges(
    s: &mut Stream,
    mem: &GuestMemoryMmap,
    ranges: &[(u64, u64)],
    sent_pages: &mut SentPages,
) -> Result<u64, MigrationError> {
    let mut table = Vec::new();
    let mut data = Vec::with_capacity(MESSAGE_BYTES as usize);
    let mut sent = 0u64;
    let mut flush =
        |table: &mut Vec<(u64, u64)>, data: &mut Vec<u8>| -> Result<(), MigrationError> {
            if !table.is_empty() {
                protocol::request(s, Command::Memory, &protocol::encode_memory(table, data))?;
                table.clear();
                data.clear();
            }
            Ok(())
        };
    for &(addr, len) in ranges {
        let mut off = 0;
        while off < len {
            let room = MESSAGE_BYTES - data.len() as u64;
            let n = (len - off).min(room);
            let at = data.len();
            data.resize(at + n as usize, 0);
            mem.read_slice(&mut data[at..], GuestAddress(addr + off))
                .map_err(|e| VmError::Restore(format!("reading guest memory: {e}")))?;
            sent_pages.record(addr + off, &data[at..]);
            table.push((addr + off, n));
            off += n;
            sent += n;
            if data.len() as u64 >= MESSAGE_BYTES {
                flush(&mut table, &mut data)?;
            }
        }
    }
    flush(&mut table, &mut data)?;
    Ok(sent)
}

/// What a migration measured.
#[derive(Clone, Debug, Default)]
pub struct MigrationStats {
    pub rounds: u32,
    pub bytes: u64,
    pub total: Duration,
    /// From the pause to the receiver's answer to Complete.
    pub downtime: Duration,
    /// Pages found changed at the end that the dirty log did not report.
    pub missed_pages: u64,
}

impl Vm {
    /// `vm.send-migration`: migrates the VM to the receiver at
    /// `destination_url`; on success the VMM ends. `downtime` (ms, optional)
    /// is the target for the last round.
    pub(super) fn send_migration(&mut self, body: &serde_json::Value) -> (ApiResult, bool) {
        if !matches!(self.state, VmState::Running | VmState::Paused) {
            return (
                Err(ApiError::new(
                    405,
                    format!("the VM is {}: nothing to migrate", self.state.name()),
                )),
                false,
            );
        }
        let url = match body
            .get("destination_url")
            .and_then(|u| u.as_str())
            .map(MigrationUrl::parse)
        {
            Some(Ok(u)) => u,
            Some(Err(e)) => return (Err(ApiError::new(400, e.to_string())), false),
            None => {
                return (
                    Err(ApiError::new(400, "the body needs \"destination_url\"")),
                    false,
                )
            }
        };
        if body.get("local").and_then(|l| l.as_bool()) == Some(true) {
            return (
                Err(ApiError::new(
                    400,
                    "local migration (guest memory shared with the destination) is not supported: migrate without --local",
                )),
                false,
            );
        }
        let downtime = body
            .get("downtime")
            .and_then(|d| d.as_u64())
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_DOWNTIME);
        let was_paused = self.state == VmState::Paused;
        let started = Instant::now();
        match self.migrate_to(&url, downtime) {
            Ok(stats) => {
                log::info!(
                    "migrated: {} rounds, {} MiB, {} ms in all, {} ms down",
                    stats.rounds,
                    stats.bytes >> 20,
                    stats.total.as_millis(),
                    stats.downtime.as_millis()
                );
                event_monitor::event(
                    "vm",
                    "migrated",
                    &[
                        ("rounds", stats.rounds.to_string()),
                        ("bytes", stats.bytes.to_string()),
                        ("total_ms", stats.total.as_millis().to_string()),
                        ("downtime_ms", stats.downtime.as_millis().to_string()),
                        ("missed_pages", stats.missed_pages.to_string()),
                    ],
                );
                (Ok(ApiReply::Done), true)
            }
            Err((e, completed_unknown)) => {
                if completed_unknown {
                    log::error!("migration: {e}; the destination may be running the VM: this one stays paused");
                } else if !was_paused && self.state == VmState::Paused {
                    if let Err(r) = self.resume() {
                        log::error!(
                            "migration failed and the VM could not resume: {}",
                            r.message
                        );
                    }
                }
                log::warn!(
                    "migration failed after {} ms: {e}",
                    started.elapsed().as_millis()
                );
                event_monitor::event("vm", "migration-failed", &[("reason", e.to_string())]);
                let why = if completed_unknown {
                    format!("{e} (sent Complete, no answer: the VM stays paused here)")
                } else {
                    format!("{e} (the VM goes on here)")
                };
                (Err(ApiError::new(500, why)), false)
            }
        }
    }

    /// The sender's side. An error says whether Complete was sent without
    /// an answer (then the VM must not run here again).
    fn migrate_to(
        &mut self,
        url: &MigrationUrl,
        downtime: Duration,
    ) -> Result<MigrationStats, (MigrationError, bool)> {
        let started = Instant::now();
        let early = |e: MigrationError| (e, false);
        let mut s = connect(url).map_err(early)?;
        let mem = self
            .mem
            .clone()
            .ok_or_else(|| early(VmError::Restore("no guest memory".into()).into()))?;
        let result = self.precopy(&mut s, &mem, downtime, started);
        let _ = set_dirty_logging(&self.vm, &mem, false);
        if result.as_ref().is_err_and(|e| !e.1) {
            // Best effort: the receiver drops what it built.
            let _ = protocol::send_request(&mut s, Command::Abandon, &[]);
        }
        result
    }

    fn precopy(
        &mut self,
        s: &mut Stream,
        mem: &GuestMemoryMmap,
        downtime: Duration,
        started: Instant,
    ) -> Result<MigrationStats, (MigrationError, bool)> {
        let early = |e: MigrationError| (e, false);
        protocol::request(s, Command::Start, &[]).map_err(|e| early(e.into()))?;
        let config = serde_json::to_vec(&self.cfg)
            .map_err(|e| early(MigrationError::Refused(format!("configuration: {e}"))))?;
        protocol::request(s, Command::Config, &config).map_err(|e| early(e.into()))?;

        set_dirty_logging(&self.vm, mem, true).map_err(|e| early(e.into()))?;
        let _ = dirty_ranges(&self.vm, mem).map_err(|e| early(e.into()))?;
        let mut stats = MigrationStats::default();
        let mut sent_pages = SentPages::new(mem);
        let mut ranges: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let running = self.state == VmState::Running;
        if running {
            loop {
                let t = Instant::now();
                let n = send_ranges(s, mem, &ranges, &mut sent_pages).map_err(early)?;
                stats.bytes += n;
                let rate = n as f64 / t.elapsed().as_secs_f64().max(1e-6);
                ranges = dirty_ranges(&self.vm, mem).map_err(|e| early(e.into()))?;
                let left: u64 = ranges.iter().map(|r| r.1).sum();
                log::info!(
                    "migration round {}: {} KiB sent at {:.0} MiB/s, {} KiB dirty",
                    stats.rounds,
                    n >> 10,
                    rate / (1 << 20) as f64,
                    left >> 10
                );
                stats.rounds += 1;
                if left as f64 / rate <= downtime.as_secs_f64() || stats.rounds > MAX_ROUNDS {
                    break;
                }
            }
        }
        let paused_at = Instant::now();
        if running {
            self.pause()
                .map_err(|e| early(MigrationError::Refused(format!("pause: {}", e.message))))?;
            ranges = dirty_ranges(&self.vm, mem).map_err(|e| early(e.into()))?;
            stats.bytes += send_ranges(s, mem, &ranges, &mut sent_pages).map_err(early)?;
            let missed = sent_pages.changed(mem).map_err(|e| early(e.into()))?;
            stats.missed_pages = missed.len() as u64;
            if !missed.is_empty() {
                log::warn!(
                    "migration: the dirty log missed {} pages (first {:#x}); sending them",
                    missed.len(),
                    missed[0].0
                );
                ranges = missed;
            } else {
                ranges.clear();
            }
        }
        stats.bytes += send_ranges(s, mem, &ranges, &mut sent_pages).map_err(early)?;
        stats.rounds += 1;
        let layout = snapshot::MemoryLayout {
            regions: mem.iter().map(|r| (r.start_addr().0, r.len())).collect(),
            crc32: 0,
        };
        let state = self.collect_state(layout).map_err(|e| early(e.into()))?;
        let bytes = vm_migration::state::encode(&state)
            .map_err(|e| early(MigrationError::Refused(e.to_string())))?;
        protocol::request(s, Command::State, &bytes).map_err(|e| early(e.into()))?;
        // From here an unanswered Complete leaves it unknown whether the
        // destination runs the VM.
        protocol::request(s, Command::Complete, &[]).map_err(|e| {
            let unknown = matches!(e, ProtocolError::Io(_) | ProtocolError::Closed);
            (e.into(), unknown)
        })?;
        stats.downtime = paused_at.elapsed();
        stats.total = started.elapsed();
        Ok(stats)
    }
}

/// The receiver: takes one sender at `url`, builds the VM it describes,
/// fills it and returns it paused-and-restored, ready for [`Vm::boot`]
/// and resume. Any failure drops what was built and tells the sender.
pub fn receive(url: &MigrationUrl) -> Result<Vm, MigrationError> {
    let mut s = accept(url)?;
    let mut vm: Option<Vm> = None;
    loop {
        let (cmd, payload) = protocol::read_request(&mut s)?;
        let step = match cmd {
            Command::Start => Ok(()),
            Command::Config => build_from(&payload).map(|v| vm = Some(v)),
            Command::Memory => match &vm {
                Some(v) => write_memory(v, &payload),
                None => Err("memory before the configuration".to_string()),
            },
            Command::State => match vm.as_mut() {
                Some(v) => vm_migration::state::decode::<snapshot::VmSnapshot>(&payload)
                    .map_err(|e| format!("state: {e}"))
                    .and_then(|st| v.apply_state(&st).map_err(|e| e.to_string())),
                None => Err("state before the configuration".to_string()),
            },
            Command::Complete => match vm.take() {
                Some(v) if v.restored => {
                    protocol::send_response(&mut s, Ok(()))?;
                    return Ok(v);
                }
                _ => Err("complete before the state".to_string()),
            },
            Command::Abandon => {
                let _ = protocol::send_response(&mut s, Ok(()));
                return Err(MigrationError::Refused(
                    "the sender abandoned the migration".into(),
                ));
            }
        };
        if let Err(why) = step {
            let _ = protocol::send_response(&mut s, Err(&why));
            return Err(MigrationError::Refused(why));
        }
        protocol::send_response(&mut s, Ok(()))?;
    }
}

fn build_from(config: &[u8]) -> Result<Vm, String> {
    let cfg: super::VmConfig =
        serde_json::from_slice(config).map_err(|e| format!("configuration: {e}"))?;
    Vm::build(&cfg, Payload::Empty).map_err(|e| e.to_string())
}

fn write_memory(vm: &Vm, payload: &[u8]) -> Result<(), String> {
    let mem = vm.mem.as_ref().ok_or("no guest memory")?;
    for (addr, bytes) in protocol::decode_memory(payload).map_err(|e| e.to_string())? {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| format!("memory at {addr:#x} (+{:#x}): {e}", bytes.len()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            MigrationUrl::parse("unix:/tmp/m.sock").unwrap(),
            MigrationUrl::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            MigrationUrl::parse("unix:///tmp/m.sock").unwrap(),
            MigrationUrl::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            MigrationUrl::parse("tcp:127.0.0.1:6000").unwrap(),
            MigrationUrl::Tcp("127.0.0.1:6000".into())
        );
        for bad in [
            "",
            "unix:",
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "file:///x",
            "/tmp/s",
        ] {
            assert!(MigrationUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dirty_bits_become_ranges() {
        let mut out = Vec::new();
        // Pages 0-1, 5, 63-65 of a region at 1 MiB.
        bits_to_ranges(1 << 20, &[0b11 | 1 << 5 | 1 << 63, 0b11], &mut out);
        assert_eq!(
            out,
            vec![
                (1 << 20, 2 * PAGE),
                ((1 << 20) + 5 * PAGE, PAGE),
                ((1 << 20) + 63 * PAGE, 3 * PAGE)
            ]
        );
        out.clear();
        bits_to_ranges(0, &[u64::MAX, u64::MAX], &mut out);
        assert_eq!(out, vec![(0, 128 * PAGE)]);
        out.clear();
        bits_to_ranges(0, &[0, 0], &mut out);
        assert!(out.is_empty());
    }
}
