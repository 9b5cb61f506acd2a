//! The device thread under a flood (prints figures; `harness = false`):
//! `cargo bench -p vmm --bench device_thread`.
//!
//! A virtio-pf with two VFs sits on the VMM's own `DeviceManager`, served
//! by its real device thread and the functions' I/O workers; guest drivers
//! (the test driver, one per function, over one guest memory) reach it only
//! through configuration and MMIO accesses, as vCPUs do. VF 1 floods its
//! queue with 64 KiB writes, always keeping it full; meanwhile the
//! benchmark measures, idle and under the flood:
//!
//! * an admin command round trip (DEV_MODE_GET of member 2 on the PF's
//!   admin queue),
//! * a 4 KiB read round trip on VF 2,
//! * a vCPU's configuration read and BAR0 register read of VF 1 itself.
//!
//! `CH_BENCH_SAMPLES` sets the samples per figure (default 400).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pci::bus::ecam_offset;
use pci::{BarRange, Bdf, FunctionChange, PciDevice};
use virtio_devices::pf::admin::{opcode, GROUP_TYPE_SRIOV, SUPPORTED_OPCODES};
use virtio_devices::pf::device::{PfConfig, VirtioPf, SRIOV_CAP_OFFSET};
use virtio_devices::test_driver::{Layout, NoInterrupts, Seg, TestDriver};
use vmm::device_manager::{DeviceManager, IoEvents};
use vmm::firmware::BarAllocator;
use vmm_sys_util::eventfd::EventFd;

const PF_BDF: Bdf = Bdf::new(0, 4, 0);
const MEM_LEN: usize = 256 << 20;
const VF_DISK_LEN: u64 = 256 << 20;
const FLOOD_BYTES: u32 = 64 << 10;
const ADMIN_Q: u16 = 1;

/// No ioeventfds: every doorbell write reaches the function over MMIO,
/// which signals the same eventfd the device thread waits on.
struct NoIoEvents;
impl IoEvents for NoIoEvents {
    fn register(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn unregister(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// A function as a vCPU sees it: ECAM and MMIO through the device manager.
/// Doorbells are MMIO writes only; the device thread does the rest.
struct Vcpu<'a>(&'a DeviceManager, Bdf);

impl PciDevice for Vcpu<'_> {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.0.ecam_read(ecam_offset(self.1, offset), data)
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<FunctionChange> {
        self.0.ecam_write(ecam_offset(self.1, offset), data);
        None
    }
    fn decoded_bars(&self) -> Vec<BarRange> {
        vec![]
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        let base = bar_base(self.0, self.1, bar);
        if !self.0.mmio_read(base + offset, data) {
            data.fill(0xff);
        }
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        let base = bar_base(self.0, self.1, bar);
        self.0.mmio_write(base + offset, data);
    }
}

fn cfg32(dm: &DeviceManager, bdf: Bdf, reg: u16) -> u32 {
    let mut b = [0u8; 4];
    dm.ecam_read(ecam_offset(bdf, reg), &mut b);
    u32::from_le_bytes(b)
}

/// BAR `bar` of `bdf` as its configuration space says (64-bit BAR0 for
/// the PF; VF BAR0 from the PF's SR-IOV capability, VF n at n - 1 strides).
fn bar_base(dm: &DeviceManager, bdf: Bdf, bar: u8) -> u64 {
    assert_eq!(bar, 0);
    if bdf == PF_BDF {
        let lo = u64::from(cfg32(dm, bdf, 0x10) & !0xf);
        lo | (u64::from(cfg32(dm, bdf, 0x14)) << 32)
    } else {
        let s = SRIOV_CAP_OFFSET;
        let lo = u64::from(cfg32(dm, PF_BDF, s + 0x24) & !0xf);
        let base = lo | (u64::from(cfg32(dm, PF_BDF, s + 0x28)) << 32);
        let n = u64::from(bdf.rid() - PF_BDF.rid() - 8);
        base + n * virtio_devices::pf::device::VF_BAR0_SIZE
    }
}

fn vf_bdf(n: u16) -> Bdf {
    Bdf::from_rid(PF_BDF.rid() + 8 + n - 1)
}

fn header(ty: u32, sector: u64) -> Vec<u8> {
    let mut h = ty.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// Waits for the next used element of `q`, spinning politely; panics after
/// 30 s (the device thread is then stuck, which this benchmark would hide).
fn wait_used(t: &mut TestDriver, q: u16) -> u32 {
    let t0 = Instant::now();
    loop {
        if let Some(u) = t.pop_used(q).unwrap() {
            return u.len;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "queue {q}: no completion in 30 s"
        );
        std::thread::yield_now();
    }
}

struct Machine {
    dm: Arc<DeviceManager>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.dm.stop_thread();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The PF's driver: queue 0 unused, the admin queue at index 1, command
/// and result buffers of its own.
struct PfDriver {
    t: TestDriver,
    cmd: u64,
    res: u64,
}

impl PfDriver {
    fn admin(&mut self, dm: &DeviceManager, op: u16, member: u64, data: &[u8]) -> u16 {
        let mut c = op.to_le_bytes().to_vec();
        c.extend_from_slice(&GROUP_TYPE_SRIOV.to_le_bytes());
        c.extend_from_slice(&[0; 12]);
        c.extend_from_slice(&member.to_le_bytes());
        c.extend_from_slice(data);
        self.t
            .submit(
                ADMIN_Q,
                &[Seg::ReadableAt(self.cmd, c), Seg::WritableAt(self.res, 16)],
                Layout::Direct,
            )
            .unwrap();
        self.t.kick(&mut Vcpu(dm, PF_BDF), ADMIN_Q).unwrap();
        wait_used(&mut self.t, ADMIN_Q);
        let r = self.t.read_mem(self.res, 2).unwrap();
        u16::from_le_bytes([r[0], r[1]])
    }
}

/// A VF's driver with fixed buffers for `slots` requests of `bytes`.
struct VfDriver {
    t: TestDriver,
    bdf: Bdf,
    hdr: u64,
    data: u64,
    status: u64,
    bytes: u32,
}

impl VfDriver {
    fn new(dm: &DeviceManager, mut t: TestDriver, n: u16, slots: u64, bytes: u32) -> VfDriver {
        let bdf = vf_bdf(n);
        let mut f = Vcpu(dm, bdf);
        t.probe_placed(&mut f, bar_base(dm, bdf, 0)).unwrap();
        t.bring_up(&mut f, u64::MAX, 1).unwrap();
        let hdr = t.alloc_pages(slots.div_ceil(256)).unwrap();
        let data = t.alloc(slots * u64::from(bytes), 4096).unwrap();
        let status = t.alloc_pages(1).unwrap();
        VfDriver {
            t,
            bdf,
            hdr,
            data,
            status,
            bytes,
        }
    }

    fn submit(&mut self, slot: u64, write: bool, sector: u64) {
        let ty = u32::from(write);
        let d = self.data + slot * u64::from(self.bytes);
        let body = if write {
            Seg::ReadableAt(d, vec![slot as u8; self.bytes as usize])
        } else {
            Seg::WritableAt(d, self.bytes)
        };
        self.t
            .submit(
                0,
                &[
                    Seg::ReadableAt(self.hdr + 16 * slot, header(ty, sector)),
                    body,
                    Seg::WritableAt(self.status + slot, 1),
                ],
                Layout::Direct,
            )
            .unwrap();
    }

    fn kick(&mut self, dm: &DeviceManager) {
        self.t.kick(&mut Vcpu(dm, self.bdf), 0).unwrap();
    }
}

fn machine() -> (Machine, PfDriver, VfDriver, VfDriver) {
    let dir = std::env::temp_dir().join(format!("ch-bench-devthread-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pf.img"), vec![0u8; 1 << 20]).unwrap();
    for n in 1..=2 {
        let f = std::fs::File::create(dir.join(format!("vf{n}.img"))).unwrap();
        f.set_len(VF_DISK_LEN).unwrap();
    }
    let mut root = TestDriver::new(MEM_LEN);
    let pf_t = root.split(8 << 20).unwrap();
    let vf1_t = root.split(64 << 20).unwrap();
    let vf2_t = root.split(8 << 20).unwrap();
    let d = dir.clone();
    let cfg = PfConfig::new(
        dir.join("pf.img"),
        Box::new(move |n| d.join(format!("vf{n}.img"))),
        2,
        PF_BDF,
        false,
    )
    .unwrap();
    let pf = VirtioPf::new(cfg, root.mem_atomic(), Arc::new(NoInterrupts)).unwrap();
    let alloc = BarAllocator::new((0xc000_0000, 0x1000_0000), (1 << 40, 1 << 36)).unwrap();
    let dm = Arc::new(DeviceManager::new(Arc::new(NoIoEvents), alloc).unwrap());
    dm.add_function(PF_BDF, pf).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let thread = Some(dm.start_thread(stop.clone()).unwrap());
    let m = Machine {
        dm: dm.clone(),
        stop,
        thread,
        dir,
    };

    // The PF: Linux's bring-up, then LIST_USE.
    let mut pfd = PfDriver {
        t: pf_t,
        cmd: 0,
        res: 0,
    };
    {
        let mut f = Vcpu(&dm, PF_BDF);
        pfd.t
            .probe_placed(&mut f, bar_base(&dm, PF_BDF, 0))
            .unwrap();
        pfd.t.bring_up(&mut f, u64::MAX, 2).unwrap();
    }
    pfd.cmd = pfd.t.alloc_pages(1).unwrap();
    pfd.res = pfd.t.alloc_pages(1).unwrap();
    assert_eq!(
        pfd.admin(&dm, opcode::LIST_USE, 0, &SUPPORTED_OPCODES.to_le_bytes()),
        0
    );
    // sriov_numvfs = 2 (the firmware placed the VF BARs).
    let s = SRIOV_CAP_OFFSET;
    dm.ecam_write(ecam_offset(PF_BDF, s + 0x10), &2u16.to_le_bytes());
    dm.ecam_write(ecam_offset(PF_BDF, s + 0x08), &0x9u16.to_le_bytes());
    let vf1 = VfDriver::new(&dm, vf1_t, 1, 256, FLOOD_BYTES);
    let vf2 = VfDriver::new(&dm, vf2_t, 2, 1, 4096);
    (m, pfd, vf1, vf2)
}

/// Latencies of `n` runs of `f`, sorted.
fn sample(n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort_unstable();
    v
}

fn summary(v: &[Duration]) -> String {
    let at = |p: f64| v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    format!(
        "p50 {:>8.1} us  p99 {:>9.1} us  max {:>9.1} us",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

struct Figures {
    admin: Vec<Duration>,
    vf2: Vec<Duration>,
    cfg: Vec<Duration>,
    bar: Vec<Duration>,
}

fn measure(dm: &DeviceManager, pfd: &mut PfDriver, vf2: &mut VfDriver, n: usize) -> Figures {
    let admin = sample(n, || {
        assert_eq!(pfd.admin(dm, opcode::DEV_MODE_GET, 2, &[]), 0);
    });
    let mut k = 0u64;
    let vf2_lat = sample(n, || {
        vf2.submit(0, false, (k * 8) % (VF_DISK_LEN / 512 - 8));
        vf2.kick(dm);
        wait_used(&mut vf2.t, 0);
        k += 1;
    });
    let cfg = sample(n, || {
        assert_eq!(cfg32(dm, vf_bdf(1), 0x2c) & 0xffff, 0x1af4);
    });
    let bar = sample(n, || {
        let mut b = [0u8; 1];
        let base = bar_base(dm, vf_bdf(1), 0);
        // device_status of VF 1's common configuration.
        assert!(dm.mmio_read(base + 0x14, &mut b));
    });
    Figures {
        admin,
        vf2: vf2_lat,
        cfg,
        bar,
    }
}

fn print(label: &str, f: &Figures) {
    println!("  {label}");
    println!("    admin DEV_MODE_GET (PF)  {}", summary(&f.admin));
    println!("    VF 2 4 KiB read          {}", summary(&f.vf2));
    println!("    VF 1 config read (vCPU)  {}", summary(&f.cfg));
    println!("    VF 1 BAR0 read (vCPU)    {}", summary(&f.bar));
}

fn main() {
    let n: usize = std::env::var("CH_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    println!(
        "== device thread: latency while VF 1 floods its queue ({n} samples each; 85 x {} KiB writes in flight) ==",
        FLOOD_BYTES >> 10
    );
    let (m, mut pfd, mut vf1, mut vf2) = machine();
    let idle = measure(&m.dm, &mut pfd, &mut vf2, n);
    print("idle", &idle);

    // VF 1 floods: its whole ring in flight, refilled as it completes.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let dm = m.dm.clone();
    let (s2, d2) = (stop.clone(), done.clone());
    let ready = Arc::new(Mutex::new(false));
    let r2 = ready.clone();
    let flood = std::thread::spawn(move || {
        // Three descriptors per request: as many as the ring holds.
        let size = (vf1.t.queue(0).unwrap().size / 3).min(256);
        let mut next = 0u64;
        let sectors = VF_DISK_LEN / 512 - u64::from(FLOOD_BYTES / 512);
        for slot in 0..u64::from(size) {
            vf1.submit(slot, true, (slot * 128) % sectors);
        }
        vf1.kick(&dm);
        *r2.lock().unwrap() = true;
        while !s2.load(Ordering::Acquire) {
            let mut got = 0;
            while vf1.t.pop_used(0).unwrap().is_some() {
                got += 1;
            }
            if got == 0 {
                std::thread::yield_now();
                continue;
            }
            d2.fetch_add(got, Ordering::AcqRel);
            for _ in 0..got {
                let slot = next % u64::from(size);
                vf1.submit(slot, true, (next * 128) % sectors);
                next += 1;
            }
            vf1.kick(&dm);
        }
        // Let the ring drain before the machine goes.
        let t0 = Instant::now();
        while vf1.t.pop_used(0).unwrap().is_some() || t0.elapsed() < Duration::from_millis(200) {
            std::thread::yield_now();
        }
    });
    while !*ready.lock().unwrap() {
        std::thread::yield_now();
    }
    let t0 = Instant::now();
    let d0 = done.load(Ordering::Acquire);
    let busy = measure(&m.dm, &mut pfd, &mut vf2, n);
    let secs = t0.elapsed().as_secs_f64();
    let flooded = done.load(Ordering::Acquire) - d0;
    stop.store(true, Ordering::Release);
    flood.join().unwrap();
    print(
        &format!(
            "VF 1 flooding ({:.0} requests/s, {:.0} MiB/s written meanwhile)",
            flooded as f64 / secs,
            flooded as f64 * f64::from(FLOOD_BYTES) / secs / f64::from(1u32 << 20)
        ),
        &busy,
    );
    assert!(flooded > 0, "VF 1 completed nothing while it flooded");
    let ratio = |a: &[Duration], b: &[Duration]| {
        b[b.len() / 2].as_secs_f64() / a[a.len() / 2].as_secs_f64().max(1e-9)
    };
    println!(
        "  median under flood / idle: admin x{:.1}, VF 2 x{:.1}, VF 1 config x{:.1}, VF 1 BAR0 x{:.1}",
        ratio(&idle.admin, &busy.admin),
        ratio(&idle.vf2, &busy.vf2),
        ratio(&idle.cfg, &busy.cfg),
        ratio(&idle.bar, &busy.bar)
    );
    drop(m);
}
