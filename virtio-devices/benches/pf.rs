//! Benchmarks of the virtio-pf core (prints figures; `harness = false`).
//!
//! * admin commands per second: executor alone, and through the admin
//!   queue (pop chain, gather, execute, scatter, used ring);
//! * device context encode + decode, and a full read / write / apply round
//!   trip through admin commands, for 1, 16 and 256 queues.

use std::hint::black_box;
use std::time::Instant;

use virtio_devices::pf::admin::{opcode, GROUP_TYPE_SRIOV, SUPPORTED_OPCODES};
use virtio_devices::pf::{
    process_chain, AdminBuffers, AdminCommand, AdminState, ChainOutcome, CommonCfg, ContextDecoder,
    ContextLimits, Execution, Member, MemberContext, MemberDevice, MemberDeviceError, Members,
    Mode, QueueContext, Quiesce,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vm_migration::dirty::WriteRecorder;
use vm_migration::GuestMemoryMmap;

struct Dev {
    limits: ContextLimits,
    ctx: MemberContext,
}

impl Dev {
    fn new(nq: u16) -> Self {
        Dev {
            limits: ContextLimits {
                num_queues: nq,
                max_queue_size: 1024,
                offered_features: u64::MAX,
                device_cfg_len: 60,
                msix_vectors: nq + 1,
            },
            ctx: context(nq),
        }
    }
}

impl MemberDevice for Dev {
    fn context_limits(&self) -> ContextLimits {
        self.limits.clone()
    }
    fn capture_context(&mut self) -> MemberContext {
        self.ctx.clone()
    }
    fn apply_context(&mut self, ctx: &MemberContext) -> Result<(), MemberDeviceError> {
        self.ctx = ctx.clone();
        Ok(())
    }
    fn quiesce(&mut self, _mode: Mode) -> Quiesce {
        Quiesce::Done
    }
    fn resume(&mut self) {}
    fn reset(&mut self) {}
}

fn context(nq: u16) -> MemberContext {
    MemberContext {
        common: Some(CommonCfg {
            num_queues: nq,
            device_status: 0xf,
            ..Default::default()
        }),
        features: Some(1 << 32),
        queues: (0..nq)
            .map(|i| QueueContext {
                index: i,
                size: 256,
                msix_vector: i,
                desc: 0x100_0000 + u64::from(i) * 0x10000,
                driver: 0x100_4000 + u64::from(i) * 0x10000,
                device: 0x100_8000 + u64::from(i) * 0x10000,
                avail_idx: i * 3,
                enabled: true,
                device_owned: (0..4).map(|k| k * 7 + i % 5).collect(),
                avail_follows_used: false,
            })
            .collect(),
        device_config: Some(vec![0x11; 60]),
    }
}

fn members(mem: &GuestMemoryMmap, n: u16, nq: u16) -> Members<Dev> {
    Members {
        vf_enable: true,
        num_vfs: n,
        members: (0..n)
            .map(|_| Member::new(Dev::new(nq), WriteRecorder::new(mem, 64).unwrap()))
            .collect(),
    }
}

fn bench_executor(mem: &GuestMemoryMmap) {
    let mut table = members(mem, 8, 2);
    let mut admin = AdminState::new();
    admin.set_in_use(SUPPORTED_OPCODES);
    let mut result = Vec::with_capacity(64);
    let cmds: Vec<Vec<u8>> = (0..8u64)
        .map(|i| {
            AdminCommand {
                opcode: opcode::DEV_MODE_GET,
                group_type: GROUP_TYPE_SRIOV,
                member_id: 1 + i,
                data: &[],
                truncated: false,
            }
            .to_bytes()
        })
        .collect();
    let n = 10_000_000u64;
    let t = Instant::now();
    for i in 0..n {
        let bytes = &cmds[(i % 8) as usize];
        let cmd = AdminCommand::parse(bytes).unwrap();
        let e = admin.execute(&mut table, &cmd, &mut result, 64);
        black_box((&e, &result));
    }
    let el = t.elapsed();
    println!(
        "admin executor (parse + DEV_MODE_GET): {:>6.1} M commands/s ({:.1} ns each)",
        n as f64 / el.as_secs_f64() / 1e6,
        el.as_nanos() as f64 / n as f64
    );
}

const QSIZE: u16 = 256;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

fn write_desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let a = DESC + 16 * u64::from(i);
    mem.write_obj(addr, GuestAddress(a)).unwrap();
    mem.write_obj(len, GuestAddress(a + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
    mem.write_obj(next, GuestAddress(a + 14)).unwrap();
}

/// Commands through the admin queue: the driver keeps 128 chains of
/// 4 descriptors (header, data, status, result) in flight, the device pops,
/// processes and completes them.
fn bench_queue(mem: &GuestMemoryMmap, op: u16, data: &[u8], result: u32, label: &str) {
    let mut table = members(mem, 8, 2);
    let mut admin = AdminState::new();
    admin.set_in_use(SUPPORTED_OPCODES);
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let chains = 64u16;
    for c in 0..chains {
        let base = 0x10_0000 + u64::from(c) * 0x1000;
        let hdr = AdminCommand {
            opcode: op,
            group_type: GROUP_TYPE_SRIOV,
            member_id: 1 + u64::from(c % 8),
            data,
            truncated: false,
        }
        .to_bytes();
        mem.write_slice(&hdr, GuestAddress(base)).unwrap();
        let d = 4 * c;
        write_desc(mem, d, base, 24, 1, d + 1);
        write_desc(mem, d + 1, base + 24, data.len().max(1) as u32, 1, d + 2);
        write_desc(mem, d + 2, base + 0x800, 8, 3, d + 3);
        write_desc(mem, d + 3, base + 0x808, result.max(1), 2, 0);
    }
    let mut bufs = AdminBuffers::new();
    let mut avail_idx: u16 = 0;
    let rounds = 40_000u64;
    let t = Instant::now();
    for _ in 0..rounds {
        // Driver: make all chains available again.
        for c in 0..chains {
            let slot = u64::from(avail_idx % QSIZE);
            mem.write_obj(4 * c, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            avail_idx = avail_idx.wrapping_add(1);
        }
        mem.write_obj(avail_idx, GuestAddress(AVAIL + 2)).unwrap();
        // Device.
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let out = process_chain(chain, &mut bufs, |cmd, res, cap| {
                admin.execute(&mut table, cmd, res, cap)
            });
            match out {
                ChainOutcome::Complete {
                    head_index,
                    used_len,
                } => q.add_used(mem, head_index, used_len).unwrap(),
                ChainOutcome::Deferred(_) => unreachable!(),
            }
        }
    }
    let el = t.elapsed();
    let n = rounds * u64::from(chains);
    println!(
        "admin queue ({label}): {:>6.2} M commands/s ({:.0} ns each, incl. driver side)",
        n as f64 / el.as_secs_f64() / 1e6,
        el.as_nanos() as f64 / n as f64
    );
    let _ = Execution::Deferred { member: 0 };
}

fn bench_context(nq: u16) {
    let ctx = context(nq);
    let limits = Dev::new(nq).limits;
    let mut buf = Vec::with_capacity(ctx.encoded_len());
    let iters = (200_000 / u32::from(nq)).max(200);
    let t = Instant::now();
    for _ in 0..iters {
        buf.clear();
        ctx.encode(&mut buf);
        black_box(&buf);
    }
    let enc = t.elapsed() / iters;
    let t = Instant::now();
    for _ in 0..iters {
        let mut d = ContextDecoder::new(limits.clone());
        black_box(d.feed(&buf).unwrap().unwrap());
    }
    let dec = t.elapsed() / iters;
    // Chunked decode: 4 KiB writes.
    let t = Instant::now();
    for _ in 0..iters {
        let mut d = ContextDecoder::new(limits.clone());
        let mut got = None;
        for c in buf.chunks(4096) {
            got = d.feed(c).unwrap();
        }
        black_box(got.unwrap());
    }
    let dec4k = t.elapsed() / iters;
    println!(
        "context {nq:>3} queues ({:>6} bytes): encode {:>9.2?}, decode {:>9.2?}, \
         decode in 4 KiB pieces {:>9.2?}",
        buf.len(),
        enc,
        dec,
        dec4k
    );
}

/// Read (capture + encode) from member 1 in Freeze, write to member 2 in
/// Freeze, apply on Freeze -> Active: all through the executor, 64 KiB
/// reads and writes.
fn bench_round_trip(mem: &GuestMemoryMmap, nq: u16) {
    let mut table = members(mem, 2, nq);
    let mut admin = AdminState::new();
    admin.set_in_use(SUPPORTED_OPCODES);
    let mut res = Vec::with_capacity(1 << 16);
    let mut run = |admin: &mut AdminState, op, id, data: &[u8], cap| {
        let cmd = AdminCommand {
            opcode: op,
            group_type: GROUP_TYPE_SRIOV,
            member_id: id,
            data,
            truncated: false,
        };
        match admin.execute(&mut table, &cmd, &mut res, cap) {
            Execution::Done(c) => {
                assert_eq!(c.status, 0);
                res.clone()
            }
            Execution::Deferred { .. } => unreachable!(),
        }
    };
    run(&mut admin, opcode::DEV_MODE_SET, 1, &[2], 0);
    let iters = 2000u32;
    let t = Instant::now();
    for _ in 0..iters {
        run(&mut admin, opcode::DEV_MODE_SET, 2, &[2], 0);
        let mut stream = Vec::new();
        loop {
            let chunk = run(&mut admin, opcode::DEV_CTX_READ, 1, &[], 1 << 16);
            stream.extend_from_slice(&chunk);
            if chunk.len() < 1 << 16 {
                break;
            }
        }
        for c in stream.chunks(1 << 16) {
            run(&mut admin, opcode::DEV_CTX_WRITE, 2, c, 0);
        }
        run(&mut admin, opcode::DEV_MODE_SET, 2, &[0], 0);
        // A new mode of member 1 re-arms its read stream.
        run(&mut admin, opcode::DEV_MODE_SET, 1, &[1], 0);
        run(&mut admin, opcode::DEV_MODE_SET, 1, &[2], 0);
    }
    println!(
        "context round trip {nq:>3} queues (read + write + apply via admin commands): {:>9.2?}",
        t.elapsed() / iters
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        println!("pf benchmarks: run with `cargo bench -p virtio-devices --bench pf` for figures");
        return;
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    bench_executor(&mem);
    bench_queue(
        &mem,
        opcode::DEV_MODE_GET,
        &[],
        1,
        "DEV_MODE_GET, 4 descriptors",
    );
    bench_queue(
        &mem,
        opcode::DEV_MODE_SET,
        &[0],
        0,
        "DEV_MODE_SET same mode, 1-byte data",
    );
    bench_queue(&mem, opcode::LIST_QUERY, &[], 8, "LIST_QUERY");
    for nq in [1u16, 16, 256] {
        bench_context(nq);
    }
    for nq in [1u16, 16, 256] {
        bench_round_trip(&mem, nq);
    }
}
