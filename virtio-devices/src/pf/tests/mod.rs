//! Conformance tests of the virtio-pf core. Each test names the spec
//! requirement it checks. The helpers here play the guest's driver: they lay
//! out admin commands in a split virtqueue in guest memory, and the device
//! side pops chains with virtio-queue and runs them through
//! [`process_chain`].

mod admin_tests;
mod context_tests;
mod mode_tests;
mod prop_tests;
mod record_tests;
mod v14_tests;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vm_migration::dirty::{WriteRecorder, DEFAULT_SUPPORTED_RANGES};
use vm_migration::GuestMemoryMmap;

use super::admin::{
    opcode, process_chain, AdminBuffers, AdminCommand, AdminCompletion, ChainOutcome,
    DeferredChain, GROUP_TYPE_SRIOV, SUPPORTED_OPCODES,
};
use super::context::{CommonCfg, ContextLimits, MemberContext, QueueContext};
use super::migration::{
    AdminState, Member, MemberDevice, MemberDeviceError, MemberTable, Members, Mode, Quiesce,
};

pub(crate) const F_NEXT: u16 = 1;
pub(crate) const F_WRITE: u16 = 2;
pub(crate) const F_INDIRECT: u16 = 4;

pub(crate) const QSIZE: u16 = 256;
const DESC_TABLE: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Scratch area for command buffers.
pub(crate) const BUF_BASE: u64 = 0x10_0000;

/// Two regions with a hole: 0..8 MiB and 16..24 MiB.
pub(crate) fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 8 << 20),
        (GuestAddress(16 << 20), 8 << 20),
    ])
    .unwrap()
}

/// One descriptor as the driver writes it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub(crate) fn write_desc(mem: &GuestMemoryMmap, table: u64, i: u16, d: Desc) {
    let a = GuestAddress(table + 16 * u64::from(i));
    mem.write_obj(d.addr.to_le(), a).unwrap();
    mem.write_obj(d.len.to_le(), GuestAddress(a.0 + 8)).unwrap();
    mem.write_obj(d.flags.to_le(), GuestAddress(a.0 + 12))
        .unwrap();
    mem.write_obj(d.next.to_le(), GuestAddress(a.0 + 14))
        .unwrap();
}

/// A split virtqueue driven from the driver side.
pub(crate) struct TestQueue {
    pub q: Queue,
    avail_idx: u16,
    next_free: u16,
}

impl TestQueue {
    pub fn new(mem: &GuestMemoryMmap) -> Self {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
        TestQueue {
            q,
            avail_idx: 0,
            next_free: 0,
        }
    }

    /// Write `descs` as a chain (NEXT links set here) and make it available.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_free;
        let n = descs.len() as u16;
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let last = k as u16 + 1 == n;
            let flags = if last {
                flags & !F_NEXT
            } else {
                flags | F_NEXT
            };
            write_desc(
                mem,
                DESC_TABLE,
                i,
                Desc {
                    addr,
                    len,
                    flags,
                    next: (i + 1) % QSIZE,
                },
            );
        }
        self.next_free = (head + n.max(1)) % QSIZE;
        self.publish(mem, head);
        head
    }

    /// Write raw descriptors at table indices and publish `head`.
    pub fn add_raw(&mut self, mem: &GuestMemoryMmap, descs: &[(u16, Desc)], head: u16) {
        for &(i, d) in descs {
            write_desc(mem, DESC_TABLE, i, d);
        }
        self.publish(mem, head);
    }

    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    pub fn pop<'a>(
        &mut self,
        mem: &'a GuestMemoryMmap,
    ) -> Option<DescriptorChain<&'a GuestMemoryMmap>> {
        self.q.pop_descriptor_chain(mem)
    }

    /// Used ring entries `(id, len)` so far.
    pub fn used(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..idx)
            .map(|k| {
                let a = USED + 4 + 8 * u64::from(k % QSIZE);
                (
                    mem.read_obj(GuestAddress(a)).unwrap(),
                    mem.read_obj(GuestAddress(a + 4)).unwrap(),
                )
            })
            .collect()
    }
}

/// Limits of the fake member: a block-like device with 2 queues.
pub(crate) fn fake_limits(num_queues: u16) -> ContextLimits {
    ContextLimits {
        num_queues,
        max_queue_size: 256,
        offered_features: (1 << 32) | (1 << 9) | (1 << 6) | (1 << 28),
        device_cfg_len: 60,
        msix_vectors: num_queues + 1,
    }
}

/// A context a fake member might have.
pub(crate) fn sample_context(num_queues: u16, seed: u64) -> MemberContext {
    MemberContext {
        common: Some(CommonCfg {
            num_queues,
            device_status: 0x0f,
            queue_select: 1,
            queue_size: 128,
            config_msix_vector: 0,
            queue_desc: 0x1000 + seed,
            ..Default::default()
        }),
        features: Some((1 << 32) | (1 << 9)),
        queues: (0..num_queues)
            .map(|i| QueueContext {
                index: i,
                size: 128,
                msix_vector: i + 1,
                desc: 0x10_0000 * u64::from(i) + seed,
                driver: 0x10_1000 * u64::from(i) + seed,
                device: 0x10_2000 * u64::from(i) + seed,
                avail_idx: (seed as u16).wrapping_add(i),
                enabled: true,
                device_owned: if i == 0 { vec![3, 7] } else { vec![] },
                avail_follows_used: false,
            })
            .collect(),
        device_config: Some((0..60).map(|b| b as u8 ^ seed as u8).collect()),
    }
}

/// A fake member device recording what the migration logic asked of it.
#[derive(Debug)]
pub(crate) struct FakeDevice {
    pub limits: ContextLimits,
    pub ctx: MemberContext,
    /// Requests taken from queue 0 and not completed.
    pub in_flight: Vec<u16>,
    /// Polls a quiesce needs before it is done.
    pub slow: u32,
    pub log: Vec<String>,
    pub resumes: u32,
    pub resets: u32,
    pub quiesced: Option<Mode>,
    pub fail_apply: bool,
    /// An FLR returned the device to running (virtio 1.4 dialect).
    pub flr: bool,
}

impl FakeDevice {
    pub fn new(num_queues: u16, seed: u64) -> Self {
        let mut ctx = sample_context(num_queues, seed);
        for q in &mut ctx.queues {
            q.device_owned.clear();
        }
        FakeDevice {
            limits: fake_limits(num_queues),
            ctx,
            in_flight: Vec::new(),
            slow: 0,
            log: Vec::new(),
            resumes: 0,
            resets: 0,
            quiesced: None,
            fail_apply: false,
            flr: false,
        }
    }

    fn finish_quiesce(&mut self) {
        // Requests still in flight become device-owned (R-MODE-3).
        if let Some(q) = self.ctx.queues.first_mut() {
            q.device_owned.append(&mut self.in_flight);
        }
        self.log.push("quiesced".into());
    }
}

impl MemberDevice for FakeDevice {
    fn context_limits(&self) -> ContextLimits {
        self.limits.clone()
    }
    fn capture_context(&mut self) -> MemberContext {
        self.log.push("capture".into());
        let mut c = self.ctx.clone();
        if let Some(q) = c.queues.first_mut() {
            q.device_owned.extend_from_slice(&self.in_flight);
        }
        c
    }
    fn apply_context(&mut self, ctx: &MemberContext) -> Result<(), MemberDeviceError> {
        if self.fail_apply {
            return Err(MemberDeviceError::Apply("fake refuses".into()));
        }
        self.log.push("apply".into());
        self.ctx = ctx.clone();
        Ok(())
    }
    fn quiesce(&mut self, mode: Mode) -> Quiesce {
        self.log.push(format!("quiesce {mode:?}"));
        self.quiesced = Some(mode);
        if self.slow > 0 {
            return Quiesce::InProgress;
        }
        self.finish_quiesce();
        Quiesce::Done
    }
    fn poll_quiesce(&mut self) -> Quiesce {
        if self.slow > 0 {
            self.slow -= 1;
        }
        if self.slow > 0 {
            return Quiesce::InProgress;
        }
        self.finish_quiesce();
        Quiesce::Done
    }
    fn resume(&mut self) {
        self.log.push("resume".into());
        self.quiesced = None;
        self.resumes += 1;
    }
    fn take_reset(&mut self) -> bool {
        std::mem::take(&mut self.flr)
    }
    fn reset(&mut self) {
        self.log.push("reset".into());
        self.resets += 1;
        self.in_flight.clear();
        for q in &mut self.ctx.queues {
            q.enabled = false;
            q.avail_idx = 0;
            q.device_owned.clear();
        }
        if let Some(c) = &mut self.ctx.common {
            c.device_status = 0;
        }
        self.ctx.features = Some(0);
    }
}

/// How the driver lays out a command's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// One readable and one writable descriptor.
    Two,
    /// Header, data, status and result each in their own descriptor.
    Split,
    /// Every byte in its own descriptor (sizes not multiples of 8).
    Bytes,
    /// Readable 5-byte pieces, writable 3-byte pieces.
    Odd,
    /// `Split`, but through an indirect table.
    Indirect,
}

#[derive(Debug)]
pub(crate) struct Response {
    pub used: u32,
    pub status: u16,
    pub qualifier: u16,
    pub output: [u8; 4],
    pub result: Vec<u8>,
}

impl Response {
    pub fn ok(&self) -> bool {
        self.status == 0
    }
    pub fn out_u32(&self) -> u32 {
        u32::from_le_bytes(self.output)
    }
    pub fn result_u64(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.result[8 * i..8 * i + 8].try_into().unwrap())
    }
}

/// The guest driver plus the device under test.
pub(crate) struct Harness {
    pub mem: GuestMemoryMmap,
    pub tq: TestQueue,
    pub admin: AdminState,
    pub table: Members<FakeDevice>,
    pub bufs: AdminBuffers,
    pub deferred: Vec<DeferredChain>,
    /// Where each head's writable buffer lives: (head, addr, len).
    pub layout: Layout,
    cursor: u64,
    writable_of: std::collections::HashMap<u16, (u64, usize)>,
}

impl Harness {
    /// `n` members, VF Enable set, NumVFs = n, LIST_USE done for all.
    pub fn new(n: u16) -> Self {
        let mut h = Self::bare(n);
        let r = h.cmd(opcode::LIST_USE, 0, &SUPPORTED_OPCODES.to_le_bytes(), 0);
        assert!(r.ok());
        h
    }

    /// `n` members speaking the virtio 1.4 dialect, VF Enable set, no
    /// command sent yet.
    pub fn v14(n: u16) -> Self {
        let mut h = Self::bare(n);
        h.admin = AdminState::with_dialect(super::migration::Dialect::V14);
        h
    }

    /// Like `new` but without LIST_USE.
    pub fn bare(n: u16) -> Self {
        let mem = guest_memory();
        let tq = TestQueue::new(&mem);
        let members = (1..=n)
            .map(|i| {
                Member::new(
                    FakeDevice::new(2, u64::from(i)),
                    WriteRecorder::new(&mem, DEFAULT_SUPPORTED_RANGES).unwrap(),
                )
            })
            .collect();
        Harness {
            mem,
            tq,
            admin: AdminState::new(),
            table: Members {
                vf_enable: true,
                num_vfs: n,
                members,
            },
            bufs: AdminBuffers::new(),
            deferred: Vec::new(),
            layout: Layout::Two,
            cursor: BUF_BASE,
            writable_of: Default::default(),
        }
    }

    /// Member `id`'s view of guest memory (its device writes through it).
    pub fn view(&self, id: u16) -> GuestMemoryMmap {
        self.table.members[usize::from(id) - 1]
            .migration
            .recorder
            .member_view(&self.mem)
            .unwrap()
    }

    pub fn member(&mut self, id: u16) -> &mut Member<FakeDevice> {
        self.table.member_mut(id).unwrap()
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let a = self.cursor;
        self.cursor += (len as u64 + 64) & !63;
        if self.cursor > 6 << 20 {
            self.cursor = BUF_BASE;
            return self.alloc(len);
        }
        a
    }

    /// Submit a command laid out per `self.layout`; returns the head.
    pub fn submit_raw(&mut self, readable: &[u8], result_cap: usize) -> u16 {
        let rd = self.alloc(readable.len());
        self.mem.write_slice(readable, GuestAddress(rd)).unwrap();
        let wlen = 8 + result_cap;
        let wr = self.alloc(wlen);
        self.mem
            .write_slice(&vec![0xAAu8; wlen], GuestAddress(wr))
            .unwrap();
        let mut descs: Vec<(u64, u32, u16)> = Vec::new();
        let pieces =
            |base: u64, len: usize, step: usize, flags: u16, v: &mut Vec<(u64, u32, u16)>| {
                let mut o = 0;
                while o < len {
                    let n = step.min(len - o);
                    v.push((base + o as u64, n as u32, flags));
                    o += n;
                }
            };
        match self.layout {
            Layout::Two => {
                descs.push((rd, readable.len() as u32, 0));
                descs.push((wr, wlen as u32, F_WRITE));
            }
            Layout::Split | Layout::Indirect => {
                let h = readable.len().min(24);
                descs.push((rd, h as u32, 0));
                if readable.len() > 24 {
                    descs.push((rd + 24, (readable.len() - 24) as u32, 0));
                }
                descs.push((wr, 8, F_WRITE));
                if result_cap > 0 {
                    descs.push((wr + 8, result_cap as u32, F_WRITE));
                }
            }
            Layout::Bytes => {
                pieces(rd, readable.len(), 1, 0, &mut descs);
                pieces(wr, wlen, 1, F_WRITE, &mut descs);
            }
            Layout::Odd => {
                pieces(rd, readable.len(), 5, 0, &mut descs);
                pieces(wr, wlen, 3, F_WRITE, &mut descs);
            }
        }
        let head = if self.layout == Layout::Indirect {
            let table = self.alloc(16 * descs.len());
            let n = descs.len() as u16;
            for (k, &(addr, len, flags)) in descs.iter().enumerate() {
                let k = k as u16;
                let flags = if k + 1 < n { flags | F_NEXT } else { flags };
                write_desc(
                    &self.mem,
                    table,
                    k,
                    Desc {
                        addr,
                        len,
                        flags,
                        next: k + 1,
                    },
                );
            }
            self.tq
                .add_chain(&self.mem, &[(table, 16 * u32::from(n), F_INDIRECT)])
        } else {
            self.tq.add_chain(&self.mem, &descs)
        };
        self.writable_of.insert(head, (wr, wlen));
        head
    }

    /// Device side: serve every available chain. Returns the outcomes.
    pub fn serve(&mut self) -> Vec<(u16, u32)> {
        let mut done = Vec::new();
        while let Some(chain) = self.tq.pop(&self.mem) {
            let admin = &mut self.admin;
            let table = &mut self.table;
            match process_chain(chain, &mut self.bufs, |cmd, res, cap| {
                admin.execute(table, cmd, res, cap)
            }) {
                ChainOutcome::Complete {
                    head_index,
                    used_len,
                } => {
                    self.tq.q.add_used(&self.mem, head_index, used_len).unwrap();
                    done.push((head_index, used_len));
                }
                ChainOutcome::Deferred(d) => self.deferred.push(d),
            }
        }
        done
    }

    /// Device side: finish deferred commands whose member is ready.
    pub fn poll(&mut self) -> Vec<(u16, u32)> {
        let mut done = Vec::new();
        let mut keep = Vec::new();
        for d in std::mem::take(&mut self.deferred) {
            match self.admin.poll(&mut self.table, d.member) {
                Some(c) => {
                    let used = d.complete(&self.mem, &c, &[]);
                    self.tq.q.add_used(&self.mem, d.head_index, used).unwrap();
                    done.push((d.head_index, used));
                }
                None => keep.push(d),
            }
        }
        self.deferred = keep;
        done
    }

    /// Read back what the device wrote for `head`.
    pub fn response(&self, head: u16, used: u32) -> Response {
        let (wr, wlen) = self.writable_of[&head];
        let mut b = vec![0u8; wlen];
        self.mem.read_slice(&mut b, GuestAddress(wr)).unwrap();
        let c = AdminCompletion::from_bytes(b[..8].try_into().unwrap());
        let used_res = (used as usize).saturating_sub(8);
        Response {
            used,
            status: c.status,
            qualifier: c.qualifier,
            output: c.output,
            result: b[8..8 + used_res].to_vec(),
        }
    }

    /// Send one command and serve it; it must complete now.
    pub fn cmd_group(
        &mut self,
        group: u16,
        op: u16,
        member: u64,
        data: &[u8],
        result_cap: usize,
    ) -> Response {
        let bytes = AdminCommand {
            opcode: op,
            group_type: group,
            member_id: member,
            data,
            truncated: false,
        }
        .to_bytes();
        let head = self.submit_raw(&bytes, result_cap);
        let done = self.serve();
        let &(h, used) = done
            .iter()
            .find(|(h, _)| *h == head)
            .expect("command did not complete");
        self.response(h, used)
    }

    pub fn cmd(&mut self, op: u16, member: u64, data: &[u8], result_cap: usize) -> Response {
        self.cmd_group(GROUP_TYPE_SRIOV, op, member, data, result_cap)
    }

    pub fn mode(&mut self, member: u64) -> u8 {
        let r = self.cmd(opcode::DEV_MODE_GET, member, &[], 1);
        assert!(r.ok());
        r.result[0]
    }

    pub fn set_mode(&mut self, member: u64, mode: u8) -> Response {
        self.cmd(opcode::DEV_MODE_SET, member, &[mode], 0)
    }

    /// Read the whole context stream in chunks of `chunk` bytes.
    pub fn read_context(&mut self, member: u64, chunk: usize) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let r = self.cmd(opcode::DEV_CTX_READ, member, &[], chunk);
            assert!(r.ok());
            let n = r.out_u32() as usize;
            assert_eq!(n, r.result.len());
            all.extend_from_slice(&r.result);
            if n < chunk {
                return all;
            }
        }
    }

    /// Write a context stream in chunks of `chunk` bytes.
    pub fn write_context(&mut self, member: u64, stream: &[u8], chunk: usize) -> Vec<Response> {
        stream
            .chunks(chunk.max(1))
            .map(|c| self.cmd(opcode::DEV_CTX_WRITE, member, c, 0))
            .collect()
    }
}
