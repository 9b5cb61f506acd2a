//! Host tests of vpfctl's driver code against the project's own device
//! model, in process: the `virtio_devices::pf::device::VirtioPf` PF with
//! its VFs, reached through [`Regs`] adapters over `PciDevice::bar_read` /
//! `bar_write` (a doorbell write also runs the device's doorbell, as the
//! VMM's device thread would) and a [`Mem`] adapter over the same guest
//! memory the device uses (physical address = guest address). What these
//! do not cover — sysfs, BAR mmap, pagemap, the real VMM and guest kernel —
//! is left to the real-guest integration tests.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::pci::{Bdf, InterruptManager, InterruptSourceGroup, PciDevice};
use virtio_devices::pf::device::{PfConfig, VirtioPf, SRIOV_CAP_OFFSET};
use virtio_devices::test_driver::RecordingInterrupts;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vm_migration::GuestMemoryMmap;

use crate::admin::{AdminDev, OpenOpts, Request, ADMIN_MEM_BYTES};
use crate::dma::{Mem, PAGE};
use crate::error::Error;
use crate::migrate::{self, MigrateOpts};
use crate::mmio::Regs;
use crate::pci;
use crate::virtio::{st, VirtioPci, F_VERSION_1};
use crate::virtq::{Buf, SplitQueue};
use crate::wire::{self, opcode, qualifier, status, Mode};
use crate::workload::{blk_header, pattern, BLK_T_OUT};

struct Irqs;

impl InterruptManager for Irqs {
    fn create_group(&self, _: Bdf, _: u16) -> std::io::Result<Arc<dyn InterruptSourceGroup>> {
        Ok(RecordingInterrupts::new())
    }
}

/// Guest memory window `[base, base + len)` as driver DMA memory.
#[derive(Clone)]
struct GmMem {
    gm: GuestMemoryMmap,
    base: u64,
    len: usize,
}

impl fmt::Debug for GmMem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GmMem({:#x}+{:#x})", self.base, self.len)
    }
}

impl GmMem {
    fn at(&self, off: usize, n: usize) -> GuestAddress {
        assert!(off + n <= self.len);
        GuestAddress(self.base + off as u64)
    }
}

impl Mem for GmMem {
    fn r16(&self, off: usize) -> u16 {
        u16::from_le(self.gm.read_obj(self.at(off, 2)).unwrap())
    }
    fn r32(&self, off: usize) -> u32 {
        u32::from_le(self.gm.read_obj(self.at(off, 4)).unwrap())
    }
    fn w16(&self, off: usize, v: u16) {
        self.gm.write_obj(v.to_le(), self.at(off, 2)).unwrap()
    }
    fn w32(&self, off: usize, v: u32) {
        self.gm.write_obj(v.to_le(), self.at(off, 4)).unwrap()
    }
    fn w64(&self, off: usize, v: u64) {
        self.gm.write_obj(v.to_le(), self.at(off, 8)).unwrap()
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        self.gm.read_slice(buf, self.at(off, buf.len())).unwrap()
    }
    fn write(&self, off: usize, buf: &[u8]) {
        self.gm.write_slice(buf, self.at(off, buf.len())).unwrap()
    }
    fn phys(&self, off: usize) -> u64 {
        self.base + off as u64
    }
    fn segments(&self, off: usize, len: usize) -> Vec<(u64, u32)> {
        if len == 0 {
            return vec![];
        }
        vec![(self.phys(off), len as u32)]
    }
}

/// One virtio structure of a model function's BAR0.
struct DevRegs {
    dev: Arc<Mutex<dyn PciDevice>>,
    base: u64,
    len: usize,
    doorbell: bool,
}

impl fmt::Debug for DevRegs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevRegs({:#x}+{:#x})", self.base, self.len)
    }
}

impl DevRegs {
    fn read(&self, off: usize, b: &mut [u8]) {
        self.dev
            .lock()
            .unwrap()
            .bar_read(0, self.base + off as u64, b)
    }
    fn write(&self, off: usize, b: &[u8]) {
        self.dev
            .lock()
            .unwrap()
            .bar_write(0, self.base + off as u64, b)
    }
}

impl Regs for DevRegs {
    fn len(&self) -> usize {
        self.len
    }
    fn r8(&self, off: usize) -> u8 {
        let mut b = [0u8; 1];
        self.read(off, &mut b);
        b[0]
    }
    fn r16(&self, off: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(off, &mut b);
        u16::from_le_bytes(b)
    }
    fn r32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w8(&self, off: usize, v: u8) {
        self.write(off, &[v])
    }
    fn w16(&self, off: usize, v: u16) {
        self.write(off, &v.to_le_bytes());
        if self.doorbell {
            // The VMM's device thread serves the doorbell, then delivers
            // what the device's I/O worker finished.
            let mut d = self.dev.lock().unwrap();
            d.doorbell(v);
            d.drain();
        }
    }
    fn w32(&self, off: usize, v: u32) {
        self.write(off, &v.to_le_bytes())
    }
}

fn config_space(dev: &Arc<Mutex<dyn PciDevice>>) -> Vec<u8> {
    let mut cfg = vec![0u8; 4096];
    let mut d = dev.lock().unwrap();
    for off in (0..4096).step_by(4) {
        d.config_read(off as u16, &mut cfg[off..off + 4]);
    }
    cfg
}

/// Map a model function the way `VirtioPci::open` maps a real one: parse
/// its configuration space, then one register window per capability.
fn virtio_of(dev: Arc<Mutex<dyn PciDevice>>, name: &str) -> VirtioPci {
    virtio_of_with(dev, name, true)
}

/// [`virtio_of`]; with `doorbells` false, notify writes reach the register
/// but the device is never told (a doorbell that goes nowhere).
fn virtio_of_with(dev: Arc<Mutex<dyn PciDevice>>, name: &str, doorbells: bool) -> VirtioPci {
    let cfg = config_space(&dev);
    let caps = pci::parse_virtio_caps(&cfg).unwrap();
    // Memory space + bus master, as `enable_mem_and_bus_master` does.
    dev.lock().unwrap().config_write(4, &[0x06, 0]);
    let regs = |r: pci::CapRegion, doorbell: bool| -> Box<dyn Regs> {
        assert_eq!(r.bar, 0);
        Box::new(DevRegs {
            dev: dev.clone(),
            base: u64::from(r.offset),
            len: r.length as usize,
            doorbell,
        })
    };
    VirtioPci::from_regs(
        name,
        caps.clone(),
        regs(caps.common, false),
        regs(caps.notify, doorbells),
        caps.isr.map(|r| regs(r, false)),
        caps.device.map(|r| regs(r, false)),
    )
}

struct Rig {
    _dir: std::path::PathBuf,
    gm: GuestMemoryMmap,
    pf: Arc<Mutex<VirtioPf>>,
    vf_disk: std::path::PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    device_thread: Option<std::thread::JoinHandle<()>>,
}

/// Stands in for the VMM's device thread: delivers what the functions'
/// I/O workers finished, and completes deferred admin commands.
fn device_thread(
    pf: Arc<Mutex<VirtioPf>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            let n = pf.lock().unwrap().vfs().len() as u16;
            for i in 1..=n {
                let vf = pf.lock().unwrap().vf(i);
                if let Some(vf) = vf {
                    vf.lock().unwrap().drain();
                }
            }
            pf.lock().unwrap().drain();
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}

const ADMIN_BASE: u64 = 0x10_0000;
const DRIVER_BASE: u64 = 0x40_0000;
const DRIVER_PAGES: usize = 16;

fn rig(name: &str) -> Rig {
    let dir = std::env::temp_dir().join(format!("vpfctl-model-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pf_disk = dir.join("pf.img");
    let vf_disk = dir.join("vf.img");
    std::fs::write(&pf_disk, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&vf_disk, vec![0u8; 1 << 20]).unwrap();
    let shared = vf_disk.clone();
    let bdf = Bdf::new(0, 4, 0);
    let cfg = PfConfig::new(pf_disk, Box::new(move |_| shared.clone()), 2, bdf, false).unwrap();
    let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let pf = VirtioPf::new(cfg, GuestMemoryAtomic::new(gm.clone()), Arc::new(Irqs)).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t = device_thread(pf.clone(), stop.clone());
    Rig {
        _dir: dir,
        gm,
        pf,
        vf_disk,
        stop,
        device_thread: Some(t),
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.device_thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

impl Rig {
    fn admin(&self, list_use: bool) -> crate::error::Result<AdminDev> {
        let dev: Arc<Mutex<dyn PciDevice>> = self.pf.clone();
        let v = virtio_of(dev, "pf");
        let mem = GmMem {
            gm: self.gm.clone(),
            base: ADMIN_BASE,
            len: ADMIN_MEM_BYTES,
        };
        let pf = self.pf.clone();
        AdminDev::bring_up(
            v,
            Box::new(mem),
            &OpenOpts {
                timeout: Duration::from_secs(5),
                bind: false,
                list_use,
            },
            None,
            Some(Box::new(move || {
                pf.lock().unwrap().poll_admin();
            })),
        )
    }

    fn enable_vfs(&self, n: u16) {
        let mut pf = self.pf.lock().unwrap();
        pf.config_write(SRIOV_CAP_OFFSET + 0x10, &n.to_le_bytes());
        pf.config_write(SRIOV_CAP_OFFSET + 0x08, &0x9u16.to_le_bytes());
    }

    fn vf(&self, n: u16) -> VirtioPci {
        let vf = self.pf.lock().unwrap().vf(n).expect("VF exists");
        let dev: Arc<Mutex<dyn PciDevice>> = vf;
        virtio_of(dev, &format!("vf{n}"))
    }

    fn driver_mem(&self) -> GmMem {
        GmMem {
            gm: self.gm.clone(),
            base: DRIVER_BASE,
            len: DRIVER_PAGES * PAGE,
        }
    }
}

fn status_of(e: &Error) -> (u16, u16) {
    match e {
        Error::AdminStatus {
            status, qualifier, ..
        } => (*status, *qualifier),
        other => panic!("expected an admin status error, got {other}"),
    }
}

#[test]
fn admin_commands_and_error_cases_against_the_model() {
    let r = rig("admin");
    let mut a = r.admin(true).unwrap();
    assert_eq!(
        a.supported,
        Some(virtio_devices::pf::admin::SUPPORTED_OPCODES)
    );
    assert_eq!(a.features & (1 << 41), 1 << 41);
    // VF Enable clear: member commands fail with Q_INVALID_GROUP.
    let e = a.mode_get(1).unwrap_err();
    assert_eq!(status_of(&e), (status::EINVAL, qualifier::INVALID_GROUP));
    // LIST_QUERY works without VFs.
    assert_eq!(a.list_query().unwrap(), a.supported.unwrap());

    r.enable_vfs(2);
    assert_eq!(a.mode_get(1).unwrap().0, Mode::Active as u8);
    for bad in [0u64, 3, 1 << 40] {
        let e = a.mode_get(bad).unwrap_err();
        assert_eq!(
            status_of(&e),
            (status::EINVAL, qualifier::INVALID_MEMBER),
            "member {bad}"
        );
    }
    // Bad group, unknown opcode.
    let mut req = Request::new(opcode::DEV_MODE_GET, 1, vec![], 1);
    req.group = 2;
    let rep = a.exec(&req).unwrap();
    assert_eq!(rep.completion.unwrap().qualifier, qualifier::INVALID_GROUP);
    let rep = a.exec(&Request::new(0x0e, 1, vec![], 1)).unwrap();
    assert_eq!(rep.completion.unwrap().qualifier, qualifier::INVALID_OPCODE);
    // Malformed: a 10-byte readable part; the queue keeps working.
    let mut req = Request::new(opcode::DEV_MODE_GET, 1, vec![], 1);
    req.readable = Some(vec![7, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    let rep = a.exec(&req).unwrap();
    assert_eq!(rep.used_len, 0);
    assert!(rep.completion.is_none());
    // Short writable part.
    let mut req = Request::new(opcode::DEV_MODE_GET, 1, vec![], 0);
    req.writable_len = Some(4);
    assert!(a.exec(&req).unwrap().completion.is_none());
    assert_eq!(a.mode_get(2).unwrap().0, Mode::Active as u8);
    // Mode 3 is rejected and the mode unchanged.
    let e = a.mode_set(1, 3).unwrap().check().unwrap_err();
    assert_eq!(status_of(&e), (status::EINVAL, qualifier::INVALID_FIELD));
    // Context write outside Freeze.
    let e = a.ctx_write_all(1, &[1, 0, 0, 0], 4).unwrap_err();
    assert_eq!(status_of(&e), (status::EINVAL, qualifier::INVALID_COMMAND));
    // Fields query, sizes, reads.
    let f = wire::parse_fields(
        &a.exec_ok(&Request::new(opcode::DEV_CTX_FIELDS_QUERY, 1, vec![], 4096))
            .unwrap()
            .result,
    );
    assert!(f.iter().any(|x| x.ty == 0x1000));
    let size = a.ctx_size(1, false).unwrap();
    let (ctx, reads) = a.ctx_read_all(1, 64).unwrap();
    assert_eq!(ctx.len() as u64, size);
    assert!(reads as usize >= ctx.len() / 64);
    let parsed = wire::parse_context(&ctx).unwrap();
    assert_eq!(parsed.fields.len(), parsed.field_count as usize);
    // Stream fully read: further reads return nothing until the mode changes.
    assert!(a.ctx_read_all(1, 64).unwrap().0.is_empty());
    // Freeze, read again, discard, write back to itself, Active.
    a.mode_set(1, Mode::Freeze as u8).unwrap().check().unwrap();
    let (frozen, _) = a.ctx_read_all(1, 4096).unwrap();
    assert!(!frozen.is_empty());
    a.exec_ok(&Request::new(opcode::DEV_CTX_DISCARD, 1, vec![], 0))
        .unwrap();
    a.ctx_write_all(1, &frozen, 7).unwrap();
    a.mode_set(1, Mode::Active as u8).unwrap().check().unwrap();
    // Write recording capability and an unsupported page size.
    let cap = a.wr_cap(1).unwrap();
    assert!(cap.supports(4096));
    let rep = a
        .exec(&Request::new(
            opcode::DEV_WRITE_RECORDS_START,
            1,
            wire::wr_start_data(3000, &[(0, 1)]),
            0,
        ))
        .unwrap();
    assert_eq!(rep.completion.unwrap().qualifier, qualifier::INVALID_FIELD);
    // READ before START fails; STOP always succeeds.
    let e = a.wr_read(1, 0, 4096, 8).unwrap_err();
    assert_eq!(status_of(&e), (status::EINVAL, qualifier::INVALID_COMMAND));
    a.exec_ok(&Request::new(opcode::DEV_WRITE_RECORDS_STOP, 1, vec![], 0))
        .unwrap();
}

#[test]
fn list_use_gates_commands() {
    let r = rig("listuse");
    r.enable_vfs(1);
    let mut a = r.admin(false).unwrap();
    let rep = a
        .exec(&Request::new(opcode::DEV_MODE_GET, 1, vec![], 1))
        .unwrap();
    assert_eq!(rep.completion.unwrap().qualifier, qualifier::INVALID_OPCODE);
    let bits = a.list_query().unwrap();
    a.list_use(bits).unwrap().check().unwrap();
    assert_eq!(a.mode_get(1).unwrap().0, 0);
    // A second bring-up (what every vpfctl invocation does) resets the PF
    // but not the members.
    a.mode_set(1, Mode::Stop as u8).unwrap().check().unwrap();
    drop(a);
    let mut b = r.admin(true).unwrap();
    assert_eq!(b.mode_get(1).unwrap().0, Mode::Stop as u8);
}

/// A virtio-blk driver on one model VF, like `blk-workload`'s.
struct Driver {
    mem: GmMem,
    q: SplitQueue,
    dev: VirtioPci,
    notify_off: u16,
    slot: usize,
}

const HDRS: usize = 3 * PAGE;
const DATA: usize = 4 * PAGE;

impl Driver {
    fn start(dev: VirtioPci, mem: GmMem) -> Driver {
        dev.init(1 << F_VERSION_1, 1 << F_VERSION_1, Duration::from_secs(1))
            .unwrap();
        let q = SplitQueue::new(&mem, 0, 16).unwrap();
        let notify_off = dev.setup_queue(0, &q, &mem).unwrap();
        dev.driver_ok().unwrap();
        Driver {
            mem,
            q,
            dev,
            notify_off,
            slot: 0,
        }
    }

    /// Queue a 4 KiB write of `pattern(seed)` to `sector`; kick if asked.
    fn write(&mut self, sector: u64, seed: u64, kick: bool) -> u16 {
        let s = self.slot;
        self.slot += 1;
        let hdr = HDRS + s * 32;
        let data = DATA + s * PAGE;
        self.mem.write(hdr, &blk_header(BLK_T_OUT, sector));
        self.mem.write(hdr + 16, &[0xff]);
        self.mem.write(data, &pattern(seed, 4096));
        let head = self
            .q
            .submit(
                &self.mem,
                &[Buf::r(hdr, 16), Buf::r(data, 4096), Buf::w(hdr + 16, 1)],
            )
            .unwrap();
        if kick {
            self.dev.notify(0, self.notify_off);
        }
        head
    }

    /// The used entries, waiting (up to 5 s) until every request in
    /// flight has come back: the device completes on its I/O worker.
    fn drain(&mut self) -> Vec<u16> {
        let mut v = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            while let Some(u) = self.q.poll(&self.mem).unwrap() {
                v.push(u.id);
            }
            if self.q.in_flight() == 0 || std::time::Instant::now() >= deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn write_records_cover_device_writes() {
    let r = rig("records");
    r.enable_vfs(1);
    let mut a = r.admin(true).unwrap();
    let mut d = Driver::start(r.vf(1), r.driver_mem());
    let ranges = migrate::coalesce(&[(DRIVER_BASE, (DRIVER_PAGES * PAGE) as u64)], 4096, 8);
    a.exec_ok(&Request::new(
        opcode::DEV_WRITE_RECORDS_START,
        1,
        wire::wr_start_data(4096, &ranges),
        0,
    ))
    .unwrap();
    d.write(0, 1, true);
    assert_eq!(d.drain().len(), 1);
    let (pages, _) = a
        .wr_drain(1, DRIVER_BASE, (DRIVER_PAGES * PAGE) as u64)
        .unwrap();
    let used_page = d.mem.phys(d.q.used_off());
    let status_page = d.mem.phys(HDRS);
    assert!(pages.contains(&used_page), "{pages:x?}");
    assert!(pages.contains(&status_page), "{pages:x?}");
    // Records were cleared by the read.
    assert!(a.wr_read(1, DRIVER_BASE, 0x10000, 64).unwrap().is_empty());
}

/// The whole pre-copy flow through `migrate::migrate` with requests in
/// flight: the destination picks them up from the same rings, the driver
/// carries on by only switching its doorbell, every request completes
/// exactly once and the shared backing file has the data.
#[test]
fn migrate_moves_a_member_under_load() {
    let r = rig("migrate");
    r.enable_vfs(2);
    let mut a = r.admin(true).unwrap();
    let mut d = Driver::start(r.vf(1), r.driver_mem());
    d.write(0, 10, true);
    assert_eq!(d.drain().len(), 1);
    // Two requests published but not yet seen by the device.
    let h2 = d.write(8, 11, false);
    let h3 = d.write(16, 12, false);
    assert_eq!(d.q.in_flight(), 2);

    // PCI configuration is not in the context: the owner carries it (as
    // `migrate` does through sysfs); mapping VF2 enables its bus mastering.
    let dest = r.vf(2);
    let o = MigrateOpts {
        from: 1,
        to: 2,
        rounds: 2,
        min_precopy_ms: 0,
        precopy_until: None,
        precopy_until_limit: Duration::from_secs(10),
        page_size: 4096,
        // Two ranges with a one-page gap: still one READ window per drain.
        ranges: vec![
            (DRIVER_BASE, (8 * PAGE) as u64),
            (
                DRIVER_BASE + (9 * PAGE) as u64,
                ((DRIVER_PAGES - 9) * PAGE) as u64,
            ),
        ],
        read_chunk: 64,
        write_chunk: Some(50),
        workload_dir: None,
        no_rollback: false,
        exit_after: None,
    };
    let out = migrate::migrate(&mut a, "pf", &o).unwrap();
    assert!(out.err.is_none(), "{:?}", out.err);
    let j = &out.json;
    assert_eq!(j.get("ok"), Some(&crate::json::Json::Bool(true)));
    use crate::json::Json;
    let Some(Json::A(rounds)) = j.get("rounds") else {
        panic!("no rounds in {j:?}")
    };
    assert_eq!(rounds.len(), 2);
    for round in rounds {
        assert_eq!(
            round.get("record_reads"),
            Some(&Json::from(1u32)),
            "{round:?}"
        );
    }
    for k in [
        "downtime_us",
        "recorded_pages",
        "phases_us",
        "t_stop_issued_ns",
    ] {
        assert!(j.get(k).is_some(), "{k}");
    }
    assert_eq!(a.mode_get(1).unwrap().0, Mode::Freeze as u8);
    assert_eq!(a.mode_get(2).unwrap().0, Mode::Active as u8);

    // The destination runs our queue: same rings, DRIVER_OK.
    assert_ne!(dest.status() & st::DRIVER_OK, 0);
    assert_eq!(dest.queue_desc(0), d.mem.phys(d.q.desc_off()));
    d.notify_off = dest.queue_notify_off(0);
    d.dev = dest;
    // Entries published before the move, never notified to the source,
    // were served when the destination became Active (R-MODE-4).
    let mut done = d.drain();
    done.sort_unstable();
    let mut want = vec![h2, h3];
    want.sort_unstable();
    assert_eq!(done, want);
    // The kick a moved driver gives finds nothing more to do.
    d.dev.notify(0, d.notify_off);
    assert!(d.drain().is_empty());
    d.write(24, 13, true);
    assert_eq!(d.drain().len(), 1);
    assert_eq!(d.q.in_flight(), 0);
    for s in 0..4 {
        let mut st = [0u8];
        d.mem.read(HDRS + s * 32 + 16, &mut st);
        assert_eq!(st[0], 0, "request {s} status");
    }
    let disk = std::fs::read(&r.vf_disk).unwrap();
    for (i, seed) in [10u64, 11, 12, 13].iter().enumerate() {
        let off = i * 4096;
        assert_eq!(
            &disk[off..off + 4096],
            &pattern(*seed, 4096)[..],
            "block {i}"
        );
    }

    // Migration errors: same member; a source that is not Active.
    assert!(matches!(
        migrate::migrate(&mut a, "pf", &MigrateOpts { to: 1, ..o.clone() }),
        Err(Error::Usage(_))
    ));
    assert!(matches!(
        migrate::migrate(&mut a, "pf", &o),
        Err(Error::Usage(_))
    ));
}

/// Bad destinations and page sizes are refused before the source is
/// touched.
#[test]
fn migrate_refuses_bad_requests_without_touching_the_source() {
    let r = rig("rollback");
    r.enable_vfs(2);
    let mut a = r.admin(true).unwrap();
    let _d = Driver::start(r.vf(1), r.driver_mem());
    let o = MigrateOpts {
        from: 1,
        to: 7, // no such member: its Freeze fails in prepare, before Stop
        rounds: 1,
        min_precopy_ms: 0,
        precopy_until: None,
        precopy_until_limit: Duration::from_secs(10),
        page_size: 4096,
        ranges: vec![(DRIVER_BASE, 4096)],
        read_chunk: 4096,
        write_chunk: None,
        workload_dir: None,
        no_rollback: false,
        exit_after: None,
    };
    let e = migrate::migrate(&mut a, "pf", &o).unwrap_err();
    assert_eq!(status_of(&e).1, qualifier::INVALID_MEMBER);
    assert_eq!(a.mode_get(1).unwrap().0, Mode::Active as u8);
    // Write-record page size not supported: refused before anything.
    let e = migrate::migrate(
        &mut a,
        "pf",
        &MigrateOpts {
            to: 2,
            page_size: 3000,
            ..o
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::Usage(_)), "{e}");
    assert_eq!(a.mode_get(1).unwrap().0, Mode::Active as u8);
}

const WORKLOAD_BASE: u64 = 0x80_0000;

/// `blk-workload`'s platform on the model: VF n is `0000:00:04.n`.
struct ModelPlatform {
    pf: Arc<Mutex<VirtioPf>>,
    gm: GuestMemoryMmap,
}

impl crate::workload::DmaBuf for GmMem {
    fn ranges(&self) -> Vec<(u64, u64)> {
        vec![(self.base, (self.len / PAGE) as u64)]
    }
    fn check_stable(&self) -> crate::error::Result<()> {
        Ok(())
    }
}

impl crate::workload::Platform for ModelPlatform {
    fn prepare(&self, _: &str, _: bool) -> crate::error::Result<()> {
        Ok(())
    }
    fn open(&self, bdf: &str) -> crate::error::Result<VirtioPci> {
        let n: u16 = bdf.rsplit('.').next().unwrap().parse().unwrap();
        let vf = self
            .pf
            .lock()
            .unwrap()
            .vf(n)
            .ok_or_else(|| Error::device(bdf, "no such VF"))?;
        let dev: Arc<Mutex<dyn PciDevice>> = vf;
        Ok(virtio_of(dev, bdf))
    }
    fn alloc(&self, len: usize) -> crate::error::Result<Box<dyn crate::workload::DmaBuf>> {
        Ok(Box::new(GmMem {
            gm: self.gm.clone(),
            base: WORKLOAD_BASE,
            len: len.div_ceil(PAGE) * PAGE,
        }))
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// A workload on VF1 (4 in flight, 16 blocks), logging to `log`.
fn workload_opts(log: &std::path::Path) -> crate::workload::WorkloadOpts {
    crate::workload::WorkloadOpts {
        vf: "0000:00:04.1".into(),
        log: log.to_path_buf(),
        state_dir: None,
        start_sector: 8,
        blocks: 16,
        block_bytes: 4096,
        inflight: 4,
        queue_size: 16,
        requests: 0,
        after_move: 0,
        rate: 0,
        seed: 5,
        stall_timeout: Duration::from_secs(20),
        bind: false,
        vfio: false,
    }
}

/// `--rate`: 30 requests at 300 per second take at least 29 intervals,
/// and every one completes and verifies.
#[test]
fn the_workload_keeps_to_its_rate() {
    let r = rig("rate");
    r.enable_vfs(1);
    let log = r._dir.join("rate.log");
    let opts = crate::workload::WorkloadOpts {
        requests: 30,
        rate: 300,
        ..workload_opts(&log)
    };
    let t = std::time::Instant::now();
    let sum = crate::workload::run_on(
        &ModelPlatform {
            pf: r.pf.clone(),
            gm: r.gm.clone(),
        },
        &opts,
    )
    .unwrap();
    let took = t.elapsed();
    assert_eq!((sum.submitted, sum.completed), (30, 30));
    assert_eq!((sum.verify_failures, sum.status_errors), (0, 0));
    assert!(took >= Duration::from_millis(29 * 1000 / 300), "{took:?}");
}

/// The real workload loop (`workload::run_on`) on VF1 in a thread while
/// `migrate` moves its member to VF2 and the test script's part is played
/// by hand: wait for `ready`, migrate with the published ranges, write
/// `moved`. Then the checks an integration test makes from the log.
#[test]
fn workload_follows_its_member_through_migrate() {
    use crate::json::Json;
    use std::collections::{BTreeSet, HashMap};

    let r = rig("workload");
    r.enable_vfs(2);
    let dir = r._dir.join("wl");
    let log = r._dir.join("wl.log");
    let opts = crate::workload::WorkloadOpts {
        state_dir: Some(dir.clone()),
        after_move: 40,
        ..workload_opts(&log)
    };
    let (pf, gm) = (r.pf.clone(), r.gm.clone());
    let h = std::thread::spawn(move || crate::workload::run_on(&ModelPlatform { pf, gm }, &opts));
    let t = std::time::Instant::now();
    while !dir.join("ready").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "workload never got ready"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(20));
    let mut a = r.admin(true).unwrap();
    let _dest = r.vf(2); // bus mastering, as migrate carries it through sysfs
    let o = MigrateOpts {
        from: 1,
        to: 2,
        // Long enough a pre-copy that the workload gets requests through
        // while VF1 records: two rounds, then the rest of 100 ms waited
        // out, then until the `go` file appears (300 ms in), and a third
        // round.
        rounds: 2,
        min_precopy_ms: 100,
        precopy_until: Some(dir.join("go")),
        precopy_until_limit: Duration::from_secs(10),
        page_size: 4096,
        ranges: migrate::read_ranges_file(&dir.join("ranges")).unwrap(),
        read_chunk: 4096,
        write_chunk: None,
        workload_dir: None,
        no_rollback: false,
        exit_after: None,
    };
    let go = dir.join("go");
    let go_at = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(&go, "").unwrap();
        std::time::Instant::now()
    });
    let out = migrate::migrate(&mut a, "pf", &o).unwrap();
    let done = std::time::Instant::now();
    assert!(out.err.is_none(), "{:?}", out.err);
    assert!(
        go_at.join().unwrap() < done,
        "the pre-copy ended before `go`"
    );
    let Some(crate::json::Json::A(rounds)) = out.json.get("rounds") else {
        panic!("no rounds in {:?}", out.json)
    };
    assert_eq!(rounds.len(), 3, "two rounds, one more after the wait");
    // A `moved` file seen before its content was written (as with `echo
    // BDF > moved` from a shell) is looked at again, not an error.
    std::fs::write(dir.join("moved"), "").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !h.is_finished(),
        "the workload gave up on an empty moved file"
    );
    std::fs::write(dir.join("moved.tmp"), "0000:00:04.2\n").unwrap();
    std::fs::rename(dir.join("moved.tmp"), dir.join("moved")).unwrap();
    let sum = h.join().unwrap().unwrap();
    assert_eq!(sum.moves, 1);
    assert_eq!(sum.device, "0000:00:04.2");
    assert_eq!((sum.verify_failures, sum.status_errors), (0, 0));
    assert!(dir.join("moved.1").exists());
    assert!(std::fs::read_to_string(dir.join("done"))
        .unwrap()
        .contains("result=ok"));

    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().filter(|l| l.starts_with("MOVED ")).count(), 1);
    // Exactly once.
    let mut submits: HashMap<u64, u64> = HashMap::new();
    let mut dones: HashMap<u64, (u64, Vec<u64>, String)> = HashMap::new();
    for l in text.lines() {
        let id = || field(l, "id").unwrap().parse::<u64>().unwrap();
        let t = || field(l, "t").unwrap().parse::<u64>().unwrap();
        if l.starts_with("SUBMIT ") {
            assert!(submits.insert(id(), t()).is_none());
        } else if l.starts_with("DONE ") {
            let pages = field(l, "wpages")
                .unwrap()
                .split(',')
                .map(|p| wire::parse_u64(p).unwrap())
                .collect();
            let dev = field(l, "dev").unwrap().to_string();
            assert!(
                dones.insert(id(), (t(), pages, dev)).is_none(),
                "two DONE for {}",
                id()
            );
        }
    }
    assert_eq!(submits.len(), dones.len());
    assert!(submits.keys().all(|k| dones.contains_key(k)));
    assert!(dones.values().any(|d| d.2 == "0000:00:04.2"));
    // Write-record coverage: requests submitted after recording started
    // and completed before Stop was sent were written by VF1 while it
    // recorded; their pages must be among the recorded ones.
    let num = |k: &str| match out.json.get(k) {
        Some(Json::U(v)) => *v,
        other => panic!("{k}: {other:?}"),
    };
    let (t0, t1) = (num("t_wr_started_ns"), num("t_stop_issued_ns"));
    let recorded: BTreeSet<u64> = match out.json.get("recorded_pages") {
        Some(Json::A(v)) => v
            .iter()
            .map(|x| match x {
                Json::S(s) => wire::parse_u64(s).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect(),
        other => panic!("{other:?}"),
    };
    let mut checked = 0;
    for (id, ts) in &submits {
        let (td, pages, _) = &dones[id];
        if *ts > t0 && *td < t1 {
            checked += 1;
            for p in pages {
                assert!(
                    recorded.contains(p),
                    "request {id}: page {p:#x} not recorded"
                );
            }
        }
    }
    eprintln!(
        "{} requests, {checked} checked against {} recorded pages",
        submits.len(),
        recorded.len()
    );
    assert!(checked > 0, "no request ran while VF1 recorded");
    // The backing file holds what the log's FINAL lines say.
    let disk = std::fs::read(&r.vf_disk).unwrap();
    let mut finals = 0;
    for l in text.lines().filter(|l| l.starts_with("FINAL ")) {
        let sector: usize = field(l, "sector").unwrap().parse().unwrap();
        let bytes: usize = field(l, "bytes").unwrap().parse().unwrap();
        let dseed = wire::parse_u64(field(l, "dseed").unwrap()).unwrap();
        assert_eq!(
            &disk[sector * 512..sector * 512 + bytes],
            &pattern(dseed, bytes)[..]
        );
        finals += 1;
    }
    assert!(finals > 0);
}

#[test]
fn bench_reports_round_trips() {
    let r = rig("bench");
    r.enable_vfs(1);
    let mut a = r.admin(true).unwrap();
    let o = crate::cmd::bench(
        &mut a,
        &Request::new(opcode::DEV_MODE_GET, 1, vec![], 1),
        20,
    )
    .unwrap();
    assert!(o.err.is_none());
    assert_eq!(o.json.get("count"), Some(&crate::json::Json::U(20)));
    let o = crate::cmd::bench(
        &mut a,
        &Request::new(opcode::DEV_MODE_GET, 9, vec![], 1),
        20,
    )
    .unwrap();
    assert!(o.err.is_some());
}

/// Garbage on the admin queue and in the SR-IOV capability does not break
/// the PF, and VF1 keeps serving I/O throughout.
#[test]
fn garbage_leaves_the_pf_and_other_vfs_working() {
    let r = rig("garbage");
    r.enable_vfs(2);
    let mut d = Driver::start(r.vf(1), r.driver_mem());
    d.write(0, 1, true);
    assert_eq!(d.drain().len(), 1);
    let mut rng = crate::garbage::Rng::new(3);
    let pf_cfg = r.pf.clone();
    let pf_w = r.pf.clone();
    let s = crate::garbage::sriov_garbage(
        &mut rng,
        500,
        &mut || {
            let dev: Arc<Mutex<dyn PciDevice>> = pf_cfg.clone();
            Ok(config_space(&dev))
        },
        &mut |off, v| {
            pf_w.lock().unwrap().config_write(off, &v.to_le_bytes());
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(
        s.get("read_only_intact"),
        Some(&crate::json::Json::Bool(true))
    );
    // Every round but the first finds the PF already reset: the previous
    // round's DMA memory was freed only after the device let go of it.
    let mut rounds = 0;
    let mut not_reset = 0;
    let mut reopen = || {
        let dev: Arc<Mutex<dyn PciDevice>> = r.pf.clone();
        if rounds > 0 && virtio_of(dev, "pf").status() != 0 {
            not_reset += 1;
        }
        rounds += 1;
        r.admin(true)
    };
    let mut check = |a: &mut AdminDev| -> crate::error::Result<()> {
        a.mode_get(1)?;
        a.mode_get(2)?;
        Ok(())
    };
    let o = crate::garbage::run(
        &mut reopen,
        &mut check,
        &crate::garbage::GarbageOpts {
            rounds: 250,
            seed: 11,
            wait: Duration::from_millis(1),
            reset_timeout: Duration::from_secs(5),
        },
    )
    .unwrap();
    eprintln!("{}", o.human);
    assert!(o.err.is_none());
    assert_eq!(rounds, 251);
    assert_eq!(not_reset, 0, "rounds that left the PF running");
    assert_eq!(o.json.get("healthy"), Some(&crate::json::Json::Bool(true)));
    assert!(
        matches!(o.json.get("rounds_reached_device"), Some(crate::json::Json::U(n)) if *n > 100)
    );
    // VF1 still serves the same rings.
    d.write(8, 2, true);
    assert_eq!(d.drain().len(), 1);
    let disk = std::fs::read(&r.vf_disk).unwrap();
    assert_eq!(&disk[4096..8192], &pattern(2, 4096)[..]);
}

/// A device that never sees the garbage (its doorbell goes nowhere) is not
/// reported healthy: the run fails and says why.
#[test]
fn garbage_that_never_reaches_the_device_is_not_healthy() {
    let r = rig("garbage-deaf");
    // The 20 rounds get the deaf doorbell; the final bring-up (LIST_QUERY)
    // the real one.
    let mut opened = 0;
    let mut reopen = || {
        let mut a = r.admin(true)?;
        opened += 1;
        if opened <= 20 {
            let dev: Arc<Mutex<dyn PciDevice>> = r.pf.clone();
            a.dev = virtio_of_with(dev, "pf", false);
        }
        Ok(a)
    };
    let mut check = |_: &mut AdminDev| -> crate::error::Result<()> { Ok(()) };
    let o = crate::garbage::run(
        &mut reopen,
        &mut check,
        &crate::garbage::GarbageOpts {
            rounds: 20,
            seed: 5,
            wait: Duration::from_millis(1),
            reset_timeout: Duration::from_secs(5),
        },
    )
    .unwrap();
    eprintln!("{}", o.human);
    assert!(matches!(o.err, Some(Error::Verify(_))), "{:?}", o.err);
    assert_eq!(o.json.get("healthy"), Some(&crate::json::Json::Bool(false)));
}
