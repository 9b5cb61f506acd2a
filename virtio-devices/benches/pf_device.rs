//! Benchmarks of the virtio-pf PF/VF device (prints figures; `harness =
//! false`). Run with
//! `cargo bench -p virtio-devices --features test-support --bench pf_device`.
//!
//! * block request throughput through a VF (4 KiB reads, which write guest
//!   memory, and 4 KiB writes), write recording off vs on;
//! * device context read + write + apply between two VFs, directly on the
//!   member devices and through the admin command executor. A virtio-blk
//!   member has exactly one queue, so the 16- and 256-queue cases do not
//!   exist for this member type (the core's `pf` bench measures the codec
//!   for them with a synthetic member).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pci::bus::ecam_offset;
use pci::{BarRange, Bdf, FunctionChange, PciBus, PciDevice};
use virtio_devices::pf::admin::{opcode, GROUP_TYPE_SRIOV, SUPPORTED_OPCODES};
use virtio_devices::pf::device::{PfConfig, VirtioPf, VF_BAR0_SIZE};
use virtio_devices::pf::{AdminCommand, Execution, MemberDevice};
use virtio_devices::test_driver::{Layout, NoInterrupts, Seg, TestDriver};

const PF_BDF: Bdf = Bdf::new(0, 4, 0);
const PF_BAR0: u64 = 0xe000_0000;
const VF_BAR0: u64 = 0xe100_0000;
const MEM_LEN: usize = 64 << 20;
const DISK_LEN: usize = 16 << 20;

struct OnBus<'a>(&'a PciBus, Bdf);

impl PciDevice for OnBus<'_> {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.0.ecam_read(ecam_offset(self.1, offset), data)
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<FunctionChange> {
        self.0.ecam_write(ecam_offset(self.1, offset), data);
        None
    }
    fn decoded_bars(&self) -> Vec<BarRange> {
        self.0.decoded_bars_of(self.1)
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        let base = self
            .0
            .decoded_bars_of(self.1)
            .into_iter()
            .find(|b| b.index == bar);
        if !base.is_some_and(|b| self.0.mmio_read(b.base + offset, data)) {
            data.fill(0xff);
        }
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if let Some(b) = self
            .0
            .decoded_bars_of(self.1)
            .into_iter()
            .find(|b| b.index == bar)
        {
            self.0.mmio_write(b.base + offset, data);
        }
    }
    fn doorbell(&mut self, index: u16) {
        if let Some(d) = self.0.function(self.1) {
            d.lock().unwrap().doorbell(index);
        }
    }
}

struct Setup {
    bus: PciBus,
    pf: Arc<Mutex<VirtioPf>>,
    t: TestDriver,
    dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn vf_bdf(n: u16) -> Bdf {
    Bdf::from_rid(PF_BDF.rid() + 8 + n - 1)
}

fn setup(vfs: u16) -> Setup {
    let dir = std::env::temp_dir().join(format!("vpf-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pf.img"), vec![0u8; 4096]).unwrap();
    std::fs::write(dir.join("vf.img"), vec![0x5au8; DISK_LEN]).unwrap();
    let t = TestDriver::new(MEM_LEN);
    let d = dir.clone();
    let cfg = PfConfig::new(
        dir.join("pf.img"),
        Box::new(move |_| d.join("vf.img")),
        vfs,
        PF_BDF,
        false,
    )
    .unwrap();
    let pf = VirtioPf::new(cfg, t.mem_atomic(), Arc::new(NoInterrupts)).unwrap();
    let bus = PciBus::new();
    bus.add_function(PF_BDF, pf.clone()).unwrap();
    let mut p = OnBus(&bus, PF_BDF);
    TestDriver::cfg_write32(&mut p, 0x10, PF_BAR0 as u32);
    TestDriver::cfg_write32(&mut p, 0x14, 0);
    TestDriver::cfg_write16(&mut p, 0x04, 0x6);
    TestDriver::cfg_write32(&mut p, 0x124, VF_BAR0 as u32);
    TestDriver::cfg_write32(&mut p, 0x128, 0);
    TestDriver::cfg_write16(&mut p, 0x110, vfs);
    TestDriver::cfg_write16(&mut p, 0x108, 0x9);
    Setup { bus, pf, t, dir }
}

fn admin(pf: &Arc<Mutex<VirtioPf>>, op: u16, member: u64, data: &[u8], out: &mut Vec<u8>) -> u16 {
    let mut bytes = Vec::with_capacity(24 + data.len());
    bytes.extend_from_slice(&op.to_le_bytes());
    bytes.extend_from_slice(&GROUP_TYPE_SRIOV.to_le_bytes());
    bytes.extend_from_slice(&[0; 12]);
    bytes.extend_from_slice(&member.to_le_bytes());
    bytes.extend_from_slice(data);
    let cmd = AdminCommand::parse(&bytes).unwrap();
    match pf.lock().unwrap().execute_admin(&cmd, out, 1 << 20) {
        Execution::Done(c) => c.status,
        Execution::Deferred { .. } => u16::MAX,
    }
}

fn header(ty: u32, sector: u64) -> Vec<u8> {
    let mut h = ty.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// Requests per second through VF 1: batches of `batch` 4 KiB requests at
/// fixed buffers, one kick per batch, every used element popped.
fn block_throughput(s: &mut Setup, write: bool, batch: u16, rounds: u32) -> f64 {
    let hdr = s.t.alloc_pages(1).unwrap();
    let bufs = s.t.alloc_pages(u64::from(batch)).unwrap();
    let st = s.t.alloc_pages(1).unwrap();
    let payload = vec![0xa5u8; 4096];
    let bus = &s.bus;
    let t = &mut s.t;
    let mut vf = OnBus(bus, vf_bdf(1));
    let round = |t: &mut TestDriver, vf: &mut OnBus, r: u32| {
        for i in 0..batch {
            let k = u64::from(r) * u64::from(batch) + u64::from(i);
            let sector = (k * 8) % (DISK_LEN as u64 / 512 - 8);
            let data = bufs + 4096 * u64::from(i);
            let h = hdr + 16 * u64::from(i);
            let segs = if write {
                [
                    Seg::ReadableAt(h, header(1, sector)),
                    Seg::ReadableAt(data, payload.clone()),
                    Seg::WritableAt(st + u64::from(i), 1),
                ]
            } else {
                [
                    Seg::ReadableAt(h, header(0, sector)),
                    Seg::WritableAt(data, 4096),
                    Seg::WritableAt(st + u64::from(i), 1),
                ]
            };
            t.submit(0, &segs, Layout::Direct).unwrap();
        }
        t.kick(vf, 0).unwrap();
        let mut n = 0;
        while t.pop_used(0).unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, batch);
    };
    for r in 0..4 {
        round(t, &mut vf, r);
    }
    let t0 = Instant::now();
    for r in 0..rounds {
        round(t, &mut vf, r);
    }
    f64::from(rounds) * f64::from(batch) / t0.elapsed().as_secs_f64()
}

fn start_records(pf: &Arc<Mutex<VirtioPf>>, member: u64) {
    let mut d = 4096u64.to_le_bytes().to_vec();
    d.extend_from_slice(&1u32.to_le_bytes());
    d.extend_from_slice(&[0; 4]);
    d.extend_from_slice(&0u64.to_le_bytes());
    d.extend_from_slice(&(MEM_LEN as u64 / 4096).to_le_bytes());
    let mut out = Vec::new();
    assert_eq!(
        admin(pf, opcode::DEV_WRITE_RECORDS_START, member, &d, &mut out),
        0
    );
}

fn drain_records(pf: &Arc<Mutex<VirtioPf>>, member: u64) -> usize {
    let mut d = 0u64.to_le_bytes().to_vec();
    d.extend_from_slice(&(MEM_LEN as u64).to_le_bytes());
    let mut out = Vec::new();
    assert_eq!(
        admin(pf, opcode::DEV_WRITE_RECORDS_READ, member, &d, &mut out),
        0
    );
    out.len() / 8
}

fn bench_block() {
    println!("== block requests through a VF (4 KiB, batches of 64) ==");
    for write in [false, true] {
        let kind = if write { "write" } else { "read " };
        let mut best_off: f64 = 0.0;
        let mut best_on: f64 = 0.0;
        let mut s = setup(2);
        let mut vf = OnBus(&s.bus, vf_bdf(1));
        s.t.probe_placed(&mut vf, VF_BAR0).unwrap();
        s.t.bring_up(&mut vf, u64::MAX, 1).unwrap();
        let mut out = Vec::new();
        admin(
            &s.pf,
            opcode::LIST_USE,
            0,
            &SUPPORTED_OPCODES.to_le_bytes(),
            &mut out,
        );
        // Interleaved trials, best of each, so drift hits both alike.
        for _ in 0..7 {
            admin(&s.pf, opcode::DEV_WRITE_RECORDS_STOP, 1, &[], &mut out);
            best_off = best_off.max(block_throughput(&mut s, write, 64, 200));
            start_records(&s.pf, 1);
            best_on = best_on.max(block_throughput(&mut s, write, 64, 200));
            black_box(drain_records(&s.pf, 1));
        }
        println!(
            "  {kind}: recording off {:>9.0} req/s, on {:>9.0} req/s, overhead {:+.1}%",
            best_off,
            best_on,
            (best_off / best_on - 1.0) * 100.0
        );
    }
}

fn bench_context() {
    println!("== device context read + write + apply between two VFs (1 queue: virtio-blk) ==");
    let mut s = setup(2);
    let mut vf = OnBus(&s.bus, vf_bdf(1));
    s.t.probe_placed(&mut vf, VF_BAR0).unwrap();
    s.t.bring_up(&mut vf, u64::MAX, 1).unwrap();
    let mut vf2 = OnBus(&s.bus, vf_bdf(2));
    s.t.probe_placed(&mut vf2, VF_BAR0 + VF_BAR0_SIZE).unwrap();
    let (a, b) = {
        let pf = s.pf.lock().unwrap();
        (pf.vf(1).unwrap(), pf.vf(2).unwrap())
    };
    let limits = a.lock().unwrap().context_limits();
    // Directly on the member devices: capture + encode, decode, apply.
    let n = 20_000u32;
    let t0 = Instant::now();
    let mut len = 0;
    for _ in 0..n {
        let bytes = a.lock().unwrap().capture_context().to_bytes();
        len = bytes.len();
        let ctx = virtio_devices::pf::MemberContext::decode(&bytes, &limits).unwrap();
        b.lock().unwrap().apply_context(&ctx).unwrap();
    }
    let per = t0.elapsed().as_secs_f64() / f64::from(n);
    println!(
        "  member devices : {:>7.2} us per round trip ({len}-byte stream)",
        per * 1e6
    );

    // Through the admin executor: A Freeze, read, B Freeze, write, B
    // Active (apply), A and B back to Active.
    let mut out = Vec::new();
    admin(
        &s.pf,
        opcode::LIST_USE,
        0,
        &SUPPORTED_OPCODES.to_le_bytes(),
        &mut out,
    );
    let n = 5_000u32;
    let t0 = Instant::now();
    for _ in 0..n {
        assert_eq!(admin(&s.pf, opcode::DEV_MODE_SET, 1, &[2], &mut out), 0);
        let mut ctx = Vec::new();
        loop {
            assert_eq!(admin(&s.pf, opcode::DEV_CTX_READ, 1, &[], &mut out), 0);
            if out.is_empty() {
                break;
            }
            ctx.extend_from_slice(&out);
        }
        assert_eq!(admin(&s.pf, opcode::DEV_MODE_SET, 2, &[2], &mut out), 0);
        assert_eq!(admin(&s.pf, opcode::DEV_CTX_WRITE, 2, &ctx, &mut out), 0);
        assert_eq!(admin(&s.pf, opcode::DEV_MODE_SET, 2, &[0], &mut out), 0);
        assert_eq!(admin(&s.pf, opcode::DEV_MODE_SET, 1, &[0], &mut out), 0);
    }
    let per = t0.elapsed().as_secs_f64() / f64::from(n);
    println!(
        "  admin commands : {:>7.2} us per round trip (4 mode changes, read, write, apply)",
        per * 1e6
    );
    println!("  16 / 256 queues: not applicable (a virtio-blk member has 1 queue)");
    drop(s);
}

fn main() {
    bench_block();
    bench_context();
}
