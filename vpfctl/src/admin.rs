//! The PF's admin virtqueue driven from userspace: device bring-up
//! (reset, features, admin queue only, DRIVER_OK), and synchronous command
//! execution completed by polling the used ring.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::dma::{DmaMem, Mem, PAGE};
use crate::error::{Error, Result};
use crate::pci;
use crate::virtio::{VirtioPci, F_ADMIN_VQ, F_SR_IOV, F_VERSION_1};
use crate::virtq::{Buf, SplitQueue, RING_PAGES};
use crate::wire::{self, opcode, Completion, GROUP_SRIOV, HEADER_LEN, STATUS_LEN};

/// Admin queue size used (or the device's maximum if smaller).
pub const ADMIN_QUEUE_SIZE: u16 = 64;
const RD_PAGES: usize = 16;
const WR_PAGES: usize = 17;
const RD_OFF: usize = RING_PAGES * PAGE;
const WR_OFF: usize = RD_OFF + RD_PAGES * PAGE;
/// Most readable bytes (header + data) of one command.
pub const MAX_READABLE: usize = RD_PAGES * PAGE;
/// Most writable bytes (status + result) of one command.
pub const MAX_WRITABLE: usize = WR_PAGES * PAGE;
/// Most result bytes of one command.
pub const MAX_RESULT: usize = MAX_WRITABLE - STATUS_LEN;

/// How to open the PF.
#[derive(Debug, Clone)]
pub struct OpenOpts {
    /// Completion timeout per command (and for reset).
    pub timeout: Duration,
    /// Bind the PF to pci-pf-stub if a kernel driver owns it.
    pub bind: bool,
    /// Send LIST_QUERY + LIST_USE (all supported) after DRIVER_OK.
    pub list_use: bool,
}

/// One command to send.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Opcode.
    pub opcode: u16,
    /// Group type (1 = SR-IOV).
    pub group: u16,
    /// Member id.
    pub member: u64,
    /// Command-specific data.
    pub data: Vec<u8>,
    /// Room for the result.
    pub result_len: usize,
    /// Raw override of the whole readable part (may be shorter than a
    /// header, to test malformed commands).
    pub readable: Option<Vec<u8>>,
    /// Raw override of the whole writable length (status + result; may be
    /// under 8).
    pub writable_len: Option<usize>,
}

impl Request {
    /// A command of the SR-IOV group.
    pub fn new(opcode: u16, member: u64, data: Vec<u8>, result_len: usize) -> Request {
        Request {
            opcode,
            group: GROUP_SRIOV,
            member,
            data,
            result_len,
            ..Default::default()
        }
    }
}

/// What the device answered.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Opcode sent.
    pub opcode: u16,
    /// Member addressed.
    pub member: u64,
    /// Status bytes, when the device wrote all 8 (used length ≥ 8).
    pub completion: Option<Completion>,
    /// Used length reported.
    pub used_len: u32,
    /// Result bytes written (used length − 8).
    pub result: Vec<u8>,
    /// Submit-to-completion time.
    pub elapsed: Duration,
}

impl Reply {
    /// Whether the command succeeded.
    pub fn is_ok(&self) -> bool {
        self.completion
            .is_some_and(|c| c.status == wire::status::OK)
    }

    /// Error unless OK.
    pub fn check(self) -> Result<Reply> {
        if self.is_ok() {
            return Ok(self);
        }
        Err(self.error())
    }

    /// The error describing a failed reply.
    pub fn error(&self) -> Error {
        match self.completion {
            Some(c) => Error::AdminStatus {
                opcode: opcode::name(self.opcode),
                status: c.status,
                status_name: wire::status::name(c.status),
                qualifier: c.qualifier,
                qualifier_name: wire::qualifier::name(c.qualifier),
            },
            None => Error::Protocol(format!(
                "{} completed with used length {} (< {STATUS_LEN}): no status written (malformed command?)",
                opcode::name(self.opcode),
                self.used_len
            )),
        }
    }
}

/// Called while waiting for a completion (host tests run the in-process
/// device's deferred work here; `None` on a real device).
pub type PollHook = Box<dyn FnMut() + Send>;

/// Bytes of DMA memory [`AdminDev::bring_up`] needs.
pub const ADMIN_MEM_BYTES: usize = WR_OFF + WR_PAGES * PAGE;

/// The PF with its admin queue ready.
pub struct AdminDev {
    /// The function.
    pub dev: VirtioPci,
    mem: Box<dyn Mem + Send>,
    q: SplitQueue,
    qidx: u16,
    notify_off: u16,
    timeout: Duration,
    /// Negotiated features.
    pub features: u64,
    /// LIST_QUERY result, when sent.
    pub supported: Option<u64>,
    poll_hook: Option<PollHook>,
    _lock: Option<File>,
}

impl std::fmt::Debug for AdminDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminDev")
            .field("dev", &self.dev.bdf)
            .field("queue", &self.qidx)
            .field("features", &self.features)
            .finish()
    }
}

impl AdminDev {
    /// Bring the PF up with only its admin queue, serialized against other
    /// vpfctl processes on the same PF by an exclusive `flock` on its
    /// sysfs config file. Resetting the PF clears the list of commands in
    /// use, so unless told otherwise this sends LIST_QUERY and LIST_USE.
    pub fn open(bdf: &str, opts: &OpenOpts) -> Result<AdminDev> {
        pci::prepare_for_userspace(bdf, opts.bind)?;
        let cfg_path = pci::dev_dir(bdf).join("config");
        let lock = File::open(&cfg_path).map_err(|e| Error::io("open", &cfg_path, e))?;
        // SAFETY: flock on a descriptor we own; no memory involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::last_os(format!("flock of {}", cfg_path.display())));
        }
        let dev = VirtioPci::open(bdf)?;
        let mem = DmaMem::alloc(ADMIN_MEM_BYTES)?;
        Self::bring_up(dev, Box::new(mem), opts, Some(lock), None)
    }

    /// Reset `dev`, negotiate, set up the admin queue in `mem` (at least
    /// [`ADMIN_MEM_BYTES`]), DRIVER_OK, and LIST_QUERY + LIST_USE unless
    /// `opts.list_use` is false.
    pub fn bring_up(
        dev: VirtioPci,
        mem: Box<dyn Mem + Send>,
        opts: &OpenOpts,
        lock: Option<File>,
        poll_hook: Option<PollHook>,
    ) -> Result<AdminDev> {
        let bdf = dev.bdf.clone();
        let wanted = (1u64 << F_VERSION_1) | (1u64 << F_SR_IOV) | (1u64 << F_ADMIN_VQ);
        let required = (1u64 << F_VERSION_1) | (1u64 << F_ADMIN_VQ);
        let features = dev.init(wanted, required, opts.timeout)?;
        let (qidx, qnum) = dev.admin_queue();
        if qnum == 0 {
            return Err(Error::device(&bdf, "admin_queue_num is 0: no admin queue"));
        }
        let max = dev.queue_max_size(qidx);
        if max == 0 {
            return Err(Error::device(
                &bdf,
                format!("admin queue {qidx} has queue_size 0"),
            ));
        }
        let size = prev_pow2(max.min(ADMIN_QUEUE_SIZE));
        let q = SplitQueue::new(&*mem, 0, size)?;
        let notify_off = dev.setup_queue(qidx, &q, &*mem)?;
        dev.check_notify(notify_off)?;
        dev.driver_ok()?;
        let mut a = AdminDev {
            dev,
            mem,
            q,
            qidx,
            notify_off,
            timeout: opts.timeout,
            features,
            supported: None,
            poll_hook,
            _lock: lock,
        };
        if opts.list_use {
            let bits = a.list_query()?;
            a.supported = Some(bits);
            a.list_use(bits)?.check()?;
        }
        Ok(a)
    }

    /// Admin queue index.
    pub fn queue_index(&self) -> u16 {
        self.qidx
    }

    /// Admin queue size.
    pub fn queue_size(&self) -> u16 {
        self.q.size()
    }

    /// The admin queue's memory and ring offsets, for writing garbage
    /// into it on purpose (`garbage`): `(memory, desc, avail, used, size,
    /// scratch offset, scratch length)`. The queue's bookkeeping is void
    /// afterwards; bring the PF up again.
    pub fn raw_ring(&self) -> (&dyn Mem, usize, usize, usize, u16, usize, usize) {
        (
            &*self.mem,
            self.q.desc_off(),
            self.q.avail_off(),
            self.q.used_off(),
            self.q.size(),
            RD_OFF,
            (RD_PAGES + WR_PAGES) * PAGE,
        )
    }

    /// Ring the admin queue's doorbell.
    pub fn kick(&self) {
        self.dev.notify(self.qidx, self.notify_off);
    }

    /// Run the poll hook once (host tests' deferred device work).
    pub fn run_poll_hook(&mut self) {
        if let Some(h) = self.poll_hook.as_mut() {
            h();
        }
    }

    /// Send one command and poll for its completion.
    pub fn exec(&mut self, req: &Request) -> Result<Reply> {
        let readable = req
            .readable
            .clone()
            .unwrap_or_else(|| wire::encode_command(req.opcode, req.group, req.member, &req.data));
        let wlen = req.writable_len.unwrap_or(STATUS_LEN + req.result_len);
        if readable.len() > MAX_READABLE {
            return Err(Error::Usage(format!(
                "command of {} readable bytes exceeds the tool's {MAX_READABLE}",
                readable.len()
            )));
        }
        if wlen > MAX_WRITABLE {
            return Err(Error::Usage(format!(
                "writable part of {wlen} bytes exceeds the tool's {MAX_WRITABLE}"
            )));
        }
        self.mem.write(RD_OFF, &readable);
        let mut w = vec![0u8; wlen];
        // Status bytes the device never wrote stay visibly 0xff.
        for b in w.iter_mut().take(STATUS_LEN) {
            *b = 0xff;
        }
        self.mem.write(WR_OFF, &w);
        let mut bufs = Vec::new();
        if !readable.is_empty() {
            bufs.push(Buf::r(RD_OFF, readable.len()));
        }
        if wlen > 0 {
            bufs.push(Buf::w(WR_OFF, wlen));
        }
        let start = Instant::now();
        let head = self.q.submit(&*self.mem, &bufs)?;
        self.dev.notify(self.qidx, self.notify_off);
        let used = loop {
            if let Some(u) = self.q.poll(&*self.mem)? {
                break u;
            }
            if let Some(h) = self.poll_hook.as_mut() {
                h();
            }
            let el = start.elapsed();
            if el > self.timeout {
                return Err(Error::Timeout {
                    ms: self.timeout.as_millis() as u64,
                    what: format!(
                        "{} (member {}) on the admin queue of {}",
                        opcode::name(req.opcode),
                        req.member,
                        self.dev.bdf
                    ),
                });
            }
            if el > Duration::from_millis(2) {
                std::thread::sleep(Duration::from_micros(20));
            } else {
                std::hint::spin_loop();
            }
        };
        let elapsed = start.elapsed();
        let _ = self.dev.read_isr();
        if used.id != head {
            return Err(Error::Verify(format!(
                "admin queue completed descriptor {} while only {head} was in flight",
                used.id
            )));
        }
        let used_len = used.len;
        let wrote = (used_len as usize).min(wlen);
        let completion = if wrote >= STATUS_LEN {
            let mut s = [0u8; STATUS_LEN];
            self.mem.read(WR_OFF, &mut s);
            Some(Completion::parse(&s))
        } else {
            None
        };
        let mut result = vec![0u8; wrote.saturating_sub(STATUS_LEN)];
        self.mem.read(WR_OFF + STATUS_LEN, &mut result);
        Ok(Reply {
            opcode: req.opcode,
            member: req.member,
            completion,
            used_len,
            result,
            elapsed,
        })
    }

    /// Execute and require OK.
    pub fn exec_ok(&mut self, req: &Request) -> Result<Reply> {
        self.exec(req)?.check()
    }

    /// LIST_QUERY: the supported opcode bitmap.
    pub fn list_query(&mut self) -> Result<u64> {
        let r = self.exec_ok(&Request::new(opcode::LIST_QUERY, 0, vec![], 8))?;
        wire::le64(&r.result, 0).ok_or_else(|| {
            Error::Protocol(format!(
                "LIST_QUERY returned {} result bytes, expected 8",
                r.result.len()
            ))
        })
    }

    /// LIST_USE with `bits`.
    pub fn list_use(&mut self, bits: u64) -> Result<Reply> {
        self.exec(&Request::new(
            opcode::LIST_USE,
            0,
            bits.to_le_bytes().to_vec(),
            0,
        ))
    }

    /// DEV_MODE_GET.
    pub fn mode_get(&mut self, member: u64) -> Result<(u8, Reply)> {
        let r = self.exec_ok(&Request::new(opcode::DEV_MODE_GET, member, vec![], 1))?;
        let m = *r
            .result
            .first()
            .ok_or_else(|| Error::Protocol("DEV_MODE_GET returned no result byte".into()))?;
        Ok((m, r))
    }

    /// DEV_MODE_SET.
    pub fn mode_set(&mut self, member: u64, mode: u8) -> Result<Reply> {
        self.exec(&Request::new(
            opcode::DEV_MODE_SET,
            member,
            wire::mode_set_data(mode),
            0,
        ))
    }

    /// DEV_CTX_SIZE_GET.
    pub fn ctx_size(&mut self, member: u64, freeze: bool) -> Result<u64> {
        let r = self.exec_ok(&Request::new(
            opcode::DEV_CTX_SIZE_GET,
            member,
            wire::ctx_size_data(freeze),
            8,
        ))?;
        wire::le64(&r.result, 0).ok_or_else(|| {
            Error::Protocol(format!(
                "DEV_CTX_SIZE_GET returned {} result bytes, expected 8",
                r.result.len()
            ))
        })
    }

    /// Read the context stream until a short read; returns the bytes and
    /// the number of DEV_CTX_READ commands sent.
    pub fn ctx_read_all(&mut self, member: u64, chunk: usize) -> Result<(Vec<u8>, u32)> {
        let chunk = chunk.clamp(1, MAX_RESULT);
        let mut out = Vec::new();
        let mut reads = 0u32;
        loop {
            let r = self.exec_ok(&Request::new(opcode::DEV_CTX_READ, member, vec![], chunk))?;
            reads += 1;
            let n = r
                .completion
                .map(|c| c.output_u32() as usize)
                .unwrap_or(0)
                .min(r.result.len());
            out.extend_from_slice(&r.result[..n]);
            if n < chunk {
                return Ok((out, reads));
            }
            if out.len() > 256 << 20 {
                return Err(Error::Protocol(
                    "context stream exceeds 256 MiB; giving up".into(),
                ));
            }
        }
    }

    /// Write a context stream in chunks; returns the commands sent.
    pub fn ctx_write_all(&mut self, member: u64, data: &[u8], chunk: usize) -> Result<u32> {
        let chunk = chunk.clamp(1, MAX_READABLE - HEADER_LEN);
        let mut n = 0;
        for piece in data.chunks(chunk) {
            self.exec_ok(&Request::new(
                opcode::DEV_CTX_WRITE,
                member,
                piece.to_vec(),
                0,
            ))?;
            n += 1;
        }
        Ok(n)
    }

    /// DEV_WRITE_RECORD_CAP_QUERY.
    pub fn wr_cap(&mut self, member: u64) -> Result<wire::WrCap> {
        let r = self.exec_ok(&Request::new(
            opcode::DEV_WRITE_RECORD_CAP_QUERY,
            member,
            vec![],
            8,
        ))?;
        wire::WrCap::parse(&r.result)
    }

    /// DEV_WRITE_RECORDS_READ of one window: the addresses returned.
    pub fn wr_read(&mut self, member: u64, addr: u64, len: u64, max: usize) -> Result<Vec<u64>> {
        let max = max.clamp(1, MAX_RESULT / 8);
        let r = self.exec_ok(&Request::new(
            opcode::DEV_WRITE_RECORDS_READ,
            member,
            wire::wr_read_data(addr, len),
            8 * max,
        ))?;
        let count = r.completion.map(|c| c.output_u32()).unwrap_or(0);
        Ok(wire::parse_addresses(&r.result, count))
    }

    /// Drain all records of a window (repeat while a read comes back full).
    pub fn wr_drain(&mut self, member: u64, addr: u64, len: u64) -> Result<(Vec<u64>, u32)> {
        let max = MAX_RESULT / 8;
        let mut all = Vec::new();
        let mut cmds = 0;
        loop {
            let got = self.wr_read(member, addr, len, max)?;
            cmds += 1;
            let full = got.len() >= max;
            all.extend(got);
            if !full {
                return Ok((all, cmds));
            }
        }
    }
}

/// Largest power of two ≤ `v` (v ≥ 1).
fn prev_pow2(v: u16) -> u16 {
    1 << (15 - v.leading_zeros() as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow2() {
        assert_eq!(prev_pow2(1), 1);
        assert_eq!(prev_pow2(64), 64);
        assert_eq!(prev_pow2(100), 64);
        assert_eq!(prev_pow2(0xffff), 0x8000);
    }

    #[test]
    fn reply_errors_name_status() {
        let r = Reply {
            opcode: opcode::DEV_MODE_SET,
            member: 3,
            completion: Some(Completion {
                status: 22,
                qualifier: 5,
                output: [0; 4],
            }),
            used_len: 8,
            result: vec![],
            elapsed: Duration::ZERO,
        };
        assert!(!r.is_ok());
        let e = r.clone().check().unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_STATUS);
        assert_eq!(
            e.to_string(),
            "DEV_MODE_SET failed: status 22 (EINVAL), qualifier 5 (Q_INVALID_MEMBER)"
        );
        let m = Reply {
            completion: None,
            used_len: 0,
            ..r
        };
        assert!(m.error().to_string().contains("used length 0"));
    }
}
