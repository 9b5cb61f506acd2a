//! Device wiring: the PCI bus and its functions, BAR placement, doorbell
//! ioeventfds and the device thread that serves them.
//!
//! Device logic lives in `virtio-devices`; this module only connects it to
//! KVM and threads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::{Bdf, ConfigWriteResult, PciBus, SharedPciDevice};
use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::firmware::{self, BarAllocator};
use crate::pause::PauseGate;

#[derive(Debug, Error)]
pub enum DeviceManagerError {
    #[error("cannot add PCI function {bdf}: {reason}")]
    AddFunction { bdf: Bdf, reason: String },
    #[error("epoll: {0}")]
    Epoll(std::io::Error),
    #[error("cannot create eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot spawn the device thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot place BARs of {bdf}: {reason}")]
    Bars { bdf: Bdf, reason: String },
}

/// Where the guest's doorbell writes become eventfd signals without an
/// exit to the VMM: KVM's ioeventfds in the VMM, a recorder in tests.
pub trait IoEvents: Send + Sync {
    /// Signal `event` on every write to the MMIO `address`.
    fn register(&self, event: &EventFd, address: u64) -> std::io::Result<()>;
    /// Stop signalling `event` for `address`.
    fn unregister(&self, event: &EventFd, address: u64) -> std::io::Result<()>;
}

impl IoEvents for VmFd {
    fn register(&self, event: &EventFd, address: u64) -> std::io::Result<()> {
        self.register_ioevent(event, &IoEventAddress::Mmio(address), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
    fn unregister(&self, event: &EventFd, address: u64) -> std::io::Result<()> {
        self.unregister_ioevent(event, &IoEventAddress::Mmio(address), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A doorbell as registered with KVM and epoll (or, without an address,
/// a function's work event, registered with epoll only).
struct Registered {
    bdf: Bdf,
    address: Option<u64>,
    event: Arc<EventFd>,
    device: SharedPciDevice,
    index: u16,
}

/// Doorbells keyed by epoll token.
#[derive(Default)]
struct Doorbells {
    next_token: u64,
    by_token: HashMap<u64, Registered>,
}

/// The PCI side of the machine.
pub struct DeviceManager {
    vm: Arc<dyn IoEvents>,
    bus: PciBus,
    epoll: Epoll,
    doorbells: Mutex<Doorbells>,
    stop_evt: EventFd,
    allocator: Mutex<BarAllocator>,
    activity: ThreadActivity,
    /// Pausing: the device thread finishes what is in flight and parks.
    pause_evt: EventFd,
    gate: PauseGate,
}

/// What the device thread is doing, for the state dump.
struct ThreadActivity {
    epoch: Instant,
    /// (function, doorbell index) being served, or `None` when waiting.
    serving: Mutex<Option<(Bdf, u16)>>,
    /// Milliseconds since `epoch` plus one when the current state began.
    since: AtomicU64,
    turns: AtomicU64,
}

impl ThreadActivity {
    fn new() -> Self {
        ThreadActivity {
            epoch: Instant::now(),
            serving: Mutex::new(None),
            since: AtomicU64::new(1),
            turns: AtomicU64::new(0),
        }
    }

    fn set(&self, what: Option<(Bdf, u16)>) {
        *lock(&self.serving) = what;
        self.since.store(
            self.epoch.elapsed().as_millis() as u64 + 1,
            Ordering::Release,
        );
        if what.is_some() {
            self.turns.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn describe(&self) -> String {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let for_ = now.saturating_sub(self.since.load(Ordering::Acquire)) as f64 / 1000.0;
        let turns = self.turns.load(Ordering::Relaxed);
        match *lock(&self.serving) {
            Some((bdf, index)) => {
                format!(
                    "serving doorbell {index} of {bdf} for {for_:.3} s ({turns} doorbells served)"
                )
            }
            None => format!("waiting for doorbells for {for_:.3} s ({turns} doorbells served)"),
        }
    }
}

/// How long the dump waits for a function's lock before it reports the
/// function as busy.
const DUMP_LOCK_WAIT: Duration = Duration::from_millis(300);

/// `f` on the function, unless its lock stays taken for [`DUMP_LOCK_WAIT`]
/// (the dump and `vm.counters` must not wait on a function stuck in a
/// handler).
fn with_lock_or_busy<R>(dev: &SharedPciDevice, f: impl Fn(&dyn pci::PciDevice) -> R) -> Option<R> {
    let deadline = Instant::now() + DUMP_LOCK_WAIT;
    loop {
        match dev.try_lock() {
            Ok(d) => return Some(f(&*d)),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(f(&*p.into_inner())),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

/// epoll token of the stop event.
const STOP_TOKEN: u64 = u64::MAX;
/// epoll token of the pause event.
const PAUSE_TOKEN: u64 = u64::MAX - 1;

impl DeviceManager {
    pub fn new(vm: Arc<dyn IoEvents>, allocator: BarAllocator) -> Result<Self, DeviceManagerError> {
        let epoll = Epoll::new().map_err(DeviceManagerError::Epoll)?;
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        epoll
            .ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(&stop_evt),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(DeviceManagerError::Epoll)?;
        let pause_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        epoll
            .ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(&pause_evt),
                EpollEvent::new(EventSet::IN, PAUSE_TOKEN),
            )
            .map_err(DeviceManagerError::Epoll)?;
        Ok(DeviceManager {
            vm,
            bus: PciBus::new(),
            epoll,
            doorbells: Mutex::new(Doorbells::default()),
            stop_evt,
            allocator: Mutex::new(allocator),
            activity: ThreadActivity::new(),
            pause_evt,
            gate: PauseGate::new(),
        })
    }

    /// Adds a function at `bdf`, places its BARs as firmware would and
    /// enables memory decoding.
    pub fn add_function(&self, bdf: Bdf, dev: SharedPciDevice) -> Result<(), DeviceManagerError> {
        {
            let mut d = lock(&dev);
            firmware::assign_bars(&mut *d, &mut lock(&self.allocator)).map_err(|reason| {
                DeviceManagerError::Bars {
                    bdf,
                    reason: reason.to_string(),
                }
            })?;
        }
        self.bus
            .add_function(bdf, dev)
            .map_err(|e| DeviceManagerError::AddFunction {
                bdf,
                reason: e.to_string(),
            })?;
        self.refresh_doorbells();
        Ok(())
    }

    /// Adds a function whose BARs are already placed (a VF restored with
    /// its PF). The caller refreshes the doorbells once all are added.
    pub fn add_restored_function(
        &self,
        bdf: Bdf,
        dev: SharedPciDevice,
    ) -> Result<(), DeviceManagerError> {
        self.bus
            .add_function(bdf, dev)
            .map_err(|e| DeviceManagerError::AddFunction {
                bdf,
                reason: e.to_string(),
            })
    }

    /// Re-registers every function's doorbells at their current addresses.
    /// Called after any configuration write that changed BAR decoding or
    /// the set of functions.
    pub fn refresh_doorbells(&self) {
        let mut db = lock(&self.doorbells);
        // Drop every registration, then register what the functions report.
        for (token, r) in db.by_token.drain() {
            if let Some(address) = r.address {
                let _ = self.vm.unregister(&r.event, address);
            }
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                std::os::fd::AsRawFd::as_raw_fd(&*r.event),
                EpollEvent::new(EventSet::IN, token),
            );
        }
        for (bdf, dev) in self.bus.functions() {
            let (doorbells, work) = {
                let d = lock(&dev);
                (d.doorbells(), d.work_events())
            };
            let entries = doorbells
                .into_iter()
                .map(|d| (Some(d.address), d.index, d.event))
                .chain(work.into_iter().map(|w| (None, w.index, w.event)));
            for (address, index, event) in entries {
                let token = db.next_token;
                db.next_token += 1;
                if let Some(a) = address {
                    if let Err(e) = self.vm.register(&event, a) {
                        log::warn!("{bdf}: ioeventfd at {a:#x}: {e}");
                    }
                }
                if let Err(e) = self.epoll.ctl(
                    ControlOperation::Add,
                    std::os::fd::AsRawFd::as_raw_fd(&*event),
                    EpollEvent::new(EventSet::IN, token),
                ) {
                    log::warn!("{bdf}: epoll add of event {index}: {e}");
                    if let Some(a) = address {
                        let _ = self.vm.unregister(&event, a);
                    }
                    continue;
                }
                db.by_token.insert(
                    token,
                    Registered {
                        bdf,
                        address,
                        event,
                        device: dev.clone(),
                        index,
                    },
                );
            }
        }
    }

    fn after_config_write(&self, r: ConfigWriteResult) {
        if !r.added.is_empty() || !r.removed.is_empty() {
            log::info!("PCI functions added {:?}, removed {:?}", r.added, r.removed);
        }
        if r.decode_changed || !r.added.is_empty() || !r.removed.is_empty() {
            self.refresh_doorbells();
        }
    }

    /// Ports 0xCF8..0xCFF (configuration mechanism #1) or a BAR in I/O
    /// space.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if (0xcf8..0xd00).contains(&port) {
            self.bus.config_port_read(port, data);
        } else if !self.bus.pio_read(port, data) {
            data.fill(0xff);
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if (0xcf8..0xd00).contains(&port) {
            let r = self.bus.config_port_write(port, data);
            self.after_config_write(r);
        } else {
            self.bus.pio_write(port, data);
        }
    }

    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        self.bus.ecam_read(offset, data);
    }

    pub fn ecam_write(&self, offset: u64, data: &[u8]) {
        let r = self.bus.ecam_write(offset, data);
        self.after_config_write(r);
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.bus.mmio_read(addr, data)
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.bus.mmio_write(addr, data)
    }

    /// Every function's counters, by bus:device.function (functions that
    /// keep none are left out). A function whose lock stays taken for
    /// [`DUMP_LOCK_WAIT`] is left out too.
    pub fn counters(&self) -> std::collections::BTreeMap<String, Vec<(&'static str, u64)>> {
        let mut out = std::collections::BTreeMap::new();
        for (bdf, dev) in self.bus.functions() {
            let c = with_lock_or_busy(&dev, |d| d.counters());
            if let Some(c) = c.filter(|c| !c.is_empty()) {
                out.insert(bdf.to_string(), c);
            }
        }
        out
    }

    /// The device thread's activity and every function's run-time state,
    /// for the state dump. A function whose lock stays taken for
    /// [`DUMP_LOCK_WAIT`] is reported as busy rather than waited for.
    pub fn describe(&self) -> String {
        let mut out = format!("device thread: {}", self.activity.describe());
        let registered = lock(&self.doorbells).by_token.len();
        out.push_str(&format!("\ndoorbells registered: {registered}"));
        for (bdf, dev) in self.bus.functions() {
            let text = with_lock_or_busy(&dev, |d| d.debug_state()).unwrap_or_else(|| {
                format!(
                    "BUSY: its lock has been held for over {} ms",
                    DUMP_LOCK_WAIT.as_millis()
                )
            });
            for (i, line) in text.lines().enumerate() {
                if i == 0 {
                    out.push_str(&format!("\n{bdf}: {line}"));
                } else {
                    out.push_str(&format!("\n{bdf}   {line}"));
                }
            }
            if text.is_empty() {
                out.push_str(&format!("\n{bdf}: (no state to report)"));
            }
        }
        out
    }

    /// Starts the device thread: it waits on every doorbell and runs the
    /// owning function's `doorbell()`.
    pub fn start_thread(
        self: &Arc<Self>,
        stop: Arc<AtomicBool>,
    ) -> Result<JoinHandle<()>, DeviceManagerError> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Devices);
                me.run(&stop)
            })
            .map_err(DeviceManagerError::Spawn)
    }

    /// Ends the device thread.
    pub fn stop_thread(&self) {
        let _ = self.stop_evt.write(1);
    }

    /// Pauses the devices (the vCPUs are paused already): the device
    /// thread completes every request in flight (used rings written,
    /// interrupts sent, deferred admin commands finished), then parks and
    /// serves nothing until [`DeviceManager::resume`]. Doorbells and
    /// completion events arriving meanwhile wait in their eventfds. Returns
    /// false if the thread did not park within `limit` (it is then resumed).
    pub fn pause(&self, limit: Duration) -> bool {
        self.gate.close();
        let _ = self.pause_evt.write(1);
        if self.gate.wait_parked(1, limit, || {}) {
            return true;
        }
        self.gate.open();
        false
    }

    /// Lets the device thread go on; it serves what arrived while paused.
    pub fn resume(&self) {
        self.gate.open();
    }

    /// Completes what every function has in flight: twice over the bus,
    /// so that a PF sees the progress its VFs made in the first pass.
    fn drain_all(&self) {
        for _ in 0..2 {
            for (bdf, dev) in self.bus.functions() {
                self.activity.set(Some((bdf, u16::MAX)));
                lock(&dev).drain();
            }
        }
        self.activity.set(None);
    }

    fn run(&self, stop: &AtomicBool) {
        let mut events = vec![EpollEvent::default(); 64];
        while !stop.load(Ordering::Acquire) {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    log::error!("device thread: epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == STOP_TOKEN {
                    return;
                }
                if token == PAUSE_TOKEN {
                    let _ = self.pause_evt.read();
                    if self.gate.is_closed() {
                        self.drain_all();
                        self.gate.park(stop, || {});
                    }
                    continue;
                }
                let target = {
                    let db = lock(&self.doorbells);
                    db.by_token.get(&token).map(|r| {
                        let _ = r.event.read();
                        (r.device.clone(), r.bdf, r.index)
                    })
                };
                if let Some((dev, bdf, index)) = target {
                    self.activity.set(Some((bdf, index)));
                    lock(&dev).doorbell(index);
                    self.activity.set(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;

    use pci::bus::ecam_offset;
    use pci::{BarRange, Doorbell, FunctionChange, PciDevice};
    use virtio_devices::block::{Block, BlockConfig};
    use virtio_devices::pf::device::{PfConfig, VirtioPf, SRIOV_CAP_OFFSET};
    use virtio_devices::test_driver::NoInterrupts;
    use virtio_devices::transport::{VirtioPciDevice, VirtioPciOptions};
    use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
    use vm_migration::{DmaMemory, GuestMemoryMmap};

    use super::*;

    /// Records registrations by address, as KVM would hold them.
    #[derive(Default)]
    struct Recorder {
        live: Mutex<HashMap<u64, i32>>,
        fail_at: Mutex<Option<u64>>,
    }

    impl IoEvents for Recorder {
        fn register(&self, event: &EventFd, address: u64) -> std::io::Result<()> {
            if *lock(&self.fail_at) == Some(address) {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let old = lock(&self.live).insert(address, event.as_raw_fd());
            assert!(old.is_none(), "{address:#x} registered twice");
            Ok(())
        }
        fn unregister(&self, event: &EventFd, address: u64) -> std::io::Result<()> {
            match lock(&self.live).remove(&address) {
                Some(fd) if fd == event.as_raw_fd() => Ok(()),
                _ => Err(std::io::Error::from_raw_os_error(libc::ENOENT)),
            }
        }
    }

    impl Recorder {
        fn addresses(&self) -> Vec<u64> {
            let mut v: Vec<u64> = lock(&self.live).keys().copied().collect();
            v.sort_unstable();
            v
        }
    }

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("ch-dm-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn file(&self, name: &str, len: usize) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, vec![0u8; len]).unwrap();
            p
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const W32: (u64, u64) = (0xc000_0000, 0x1000_0000);
    const W64: (u64, u64) = (0x1_0000_0000, 0x1_0000_0000);

    fn manager() -> (Arc<DeviceManager>, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let dm = DeviceManager::new(rec.clone(), BarAllocator::new(W32, W64).unwrap()).unwrap();
        (Arc::new(dm), rec)
    }

    fn mem() -> GuestMemoryAtomic<GuestMemoryMmap> {
        GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
    }

    fn block_fn(dir: &Dir, name: &str) -> SharedPciDevice {
        let block = Block::new(&BlockConfig::new(dir.file(name, 1 << 16))).unwrap();
        let dev = VirtioPciDevice::new(
            block,
            GuestMemoryAtomic::new(DmaMemory::direct((*mem().memory()).clone())),
            Arc::new(NoInterrupts),
            VirtioPciOptions::default(),
        )
        .unwrap();
        Arc::new(Mutex::new(dev))
    }

    fn cfg_write(dm: &DeviceManager, bdf: Bdf, reg: u16, v: &[u8]) {
        dm.ecam_write(ecam_offset(bdf, reg), v);
    }

    fn bar0(dm: &DeviceManager, bdf: Bdf) -> u64 {
        let f = dm.bus.function(bdf).unwrap();
        let bars = lock(&f).decoded_bars();
        bars.iter().find(|b| b.index == 0).unwrap().base
    }

    #[test]
    fn doorbells_are_registered_inside_bar0_and_follow_it_when_it_moves() {
        let dir = Dir::new("move");
        let (dm, rec) = manager();
        let bdf = Bdf::new(0, 2, 0);
        dm.add_function(bdf, block_fn(&dir, "a.img")).unwrap();
        let base = bar0(&dm, bdf);
        assert!((W32.0..W32.0 + W32.1).contains(&base) || base >= W64.0);
        let before = rec.addresses();
        assert!(!before.is_empty(), "no doorbell registered");
        assert!(before.iter().all(|a| (base..base + 0x1_0000).contains(a)));
        // The completion work event is with epoll only: more registered
        // entries than ioeventfds.
        let registered = lock(&dm.doorbells).by_token.len();
        assert!(registered > before.len(), "{registered} vs {before:?}");

        // The guest moves BAR0 (decoding off, new address, decoding on).
        let new_base: u64 = 0xd000_0000;
        cfg_write(&dm, bdf, 0x04, &0u16.to_le_bytes());
        assert!(
            rec.addresses().is_empty(),
            "doorbells kept with decoding off"
        );
        cfg_write(&dm, bdf, 0x10, &(new_base as u32).to_le_bytes());
        cfg_write(&dm, bdf, 0x14, &((new_base >> 32) as u32).to_le_bytes());
        cfg_write(&dm, bdf, 0x04, &0x6u16.to_le_bytes());
        let after = rec.addresses();
        assert_eq!(after.len(), before.len());
        let moved: Vec<u64> = before.iter().map(|a| a - base + new_base).collect();
        assert_eq!(after, moved);
        assert_eq!(lock(&dm.doorbells).by_token.len(), registered);
    }

    #[test]
    fn vf_enable_registers_each_vfs_doorbells_and_clearing_it_removes_them() {
        let dir = Dir::new("vfs");
        let (dm, rec) = manager();
        let bdf = Bdf::new(0, 4, 0);
        let pf = pf_with_vfs_on_disk(&dir, bdf, 16);
        dm.add_function(bdf, pf).unwrap();
        let pf_only = rec.addresses().len();
        let entries_pf = lock(&dm.doorbells).by_token.len();
        assert!(pf_only > 0);
        for round in 0..3 {
            cfg_write(&dm, bdf, SRIOV_CAP_OFFSET + 0x10, &16u16.to_le_bytes());
            cfg_write(&dm, bdf, SRIOV_CAP_OFFSET + 0x08, &0x9u16.to_le_bytes());
            let with_vfs = rec.addresses().len();
            assert!(
                with_vfs >= pf_only + 16,
                "round {round}: {with_vfs} ioeventfds for the PF and 16 VFs"
            );
            assert_eq!(dm.bus.functions().len(), 17);
            cfg_write(&dm, bdf, SRIOV_CAP_OFFSET + 0x08, &0u16.to_le_bytes());
            assert_eq!(
                rec.addresses().len(),
                pf_only,
                "round {round}: VF ioeventfds left"
            );
            assert_eq!(lock(&dm.doorbells).by_token.len(), entries_pf);
        }
    }

    /// A PF at `bdf` with `total_vfs` VFs, each backed by its own file.
    fn pf_with_vfs_on_disk(dir: &Dir, bdf: Bdf, total_vfs: u16) -> Arc<Mutex<VirtioPf>> {
        let pf_disk = dir.file("pf.img", 4096);
        let d = dir.0.clone();
        let cfg = PfConfig::new(
            pf_disk,
            Box::new(move |n| {
                let p = d.join(format!("vf{n}.img"));
                if !p.exists() {
                    let _ = std::fs::write(&p, vec![0u8; 4096]);
                }
                p
            }),
            total_vfs,
            bdf,
            false,
        )
        .unwrap();
        VirtioPf::new(cfg, mem(), Arc::new(NoInterrupts)).unwrap()
    }

    /// A snapshot of a PF with VFs enabled, restored into a fresh PF on a
    /// fresh bus: the same functions at the same places, the same
    /// doorbells registered, with nothing of the guest's driving needed.
    #[test]
    fn a_restored_pf_brings_back_its_vfs_and_their_doorbells() {
        use vm_migration::Snapshottable;
        let dir = Dir::new("restore");
        let bdf = Bdf::new(0, 4, 0);
        let (dm, rec) = manager();
        let pf = pf_with_vfs_on_disk(&dir, bdf, 4);
        dm.add_function(bdf, pf.clone()).unwrap();
        cfg_write(&dm, bdf, SRIOV_CAP_OFFSET + 0x10, &3u16.to_le_bytes());
        cfg_write(&dm, bdf, SRIOV_CAP_OFFSET + 0x08, &0x9u16.to_le_bytes());
        assert_eq!(dm.bus.functions().len(), 4);
        let state = Snapshottable::snapshot(&*lock(&pf)).unwrap();
        assert_eq!(state.vfs.len(), 3);

        let (dm2, rec2) = manager();
        let pf2 = pf_with_vfs_on_disk(&dir, bdf, 4);
        dm2.add_function(bdf, pf2.clone()).unwrap();
        Snapshottable::restore(&mut *lock(&pf2), &state).unwrap();
        let vfs = lock(&pf2).vfs();
        assert_eq!(vfs.len(), 3);
        for (n, vf_bdf) in vfs {
            let vf = lock(&pf2).vf(n).unwrap();
            dm2.add_restored_function(vf_bdf, vf).unwrap();
        }
        dm2.refresh_doorbells();
        let bdfs = |d: &DeviceManager| -> Vec<Bdf> {
            d.bus.functions().into_iter().map(|f| f.0).collect()
        };
        assert_eq!(bdfs(&dm2), bdfs(&dm));
        assert_eq!(rec2.addresses(), rec.addresses());
        assert_eq!(Snapshottable::snapshot(&*lock(&pf2)).unwrap(), state);
        // A second restore into the same PF is refused: it has VFs.
        assert!(Snapshottable::restore(&mut *lock(&pf2), &state).is_err());
    }

    #[test]
    fn a_failed_ioeventfd_keeps_the_doorbell_in_epoll() {
        let dir = Dir::new("fail");
        let (dm, rec) = manager();
        // The first doorbell of the function at 00:02.0 will fail.
        let probe = block_fn(&dir, "p.img");
        let (dm2, rec2) = manager();
        dm2.add_function(Bdf::new(0, 2, 0), probe).unwrap();
        let first = rec2.addresses()[0];
        drop(dm2);
        *lock(&rec.fail_at) = Some(first);
        dm.add_function(Bdf::new(0, 2, 0), block_fn(&dir, "a.img"))
            .unwrap();
        assert!(!rec.addresses().contains(&first));
        // The doorbell is still in epoll: an MMIO write that reaches the
        // device signals the same eventfd.
        let n = rec.addresses().len();
        assert_eq!(lock(&dm.doorbells).by_token.len(), n + 1 + 1);
    }

    /// A function with one doorbell that counts its calls (and drains).
    struct Counter {
        event: Arc<EventFd>,
        calls: Arc<AtomicU64>,
        hold: Arc<Mutex<()>>,
        drains: Arc<AtomicU64>,
    }

    impl PciDevice for Counter {
        fn config_read(&mut self, _: u16, data: &mut [u8]) {
            data.fill(0);
        }
        fn config_write(&mut self, _: u16, _: &[u8]) -> Option<FunctionChange> {
            None
        }
        fn decoded_bars(&self) -> Vec<BarRange> {
            vec![]
        }
        fn bar_read(&mut self, _: u8, _: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
        fn doorbells(&self) -> Vec<Doorbell> {
            vec![Doorbell {
                address: 0xe000_0000,
                len: 2,
                index: 7,
                event: self.event.clone(),
            }]
        }
        fn doorbell(&mut self, index: u16) {
            assert_eq!(index, 7);
            let _g = lock(&self.hold);
            self.calls.fetch_add(1, Ordering::AcqRel);
        }
        fn drain(&mut self) {
            self.drains.fetch_add(1, Ordering::AcqRel);
        }
        fn debug_state(&self) -> String {
            format!("calls={}", self.calls.load(Ordering::Acquire))
        }
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_device_thread_serves_doorbells_and_the_dump_sees_a_busy_function() {
        let (dm, rec) = manager();
        let event = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let calls = Arc::new(AtomicU64::new(0));
        let hold = Arc::new(Mutex::new(()));
        let f: SharedPciDevice = Arc::new(Mutex::new(Counter {
            event: event.clone(),
            calls: calls.clone(),
            hold: hold.clone(),
            drains: Arc::new(AtomicU64::new(0)),
        }));
        let bdf = Bdf::new(0, 3, 0);
        dm.add_function(bdf, f).unwrap();
        assert_eq!(rec.addresses(), vec![0xe000_0000]);
        let stop = Arc::new(AtomicBool::new(false));
        let t = dm.start_thread(stop.clone()).unwrap();
        assert!(dm.describe().contains("waiting for doorbells"));

        event.write(1).unwrap();
        wait_for("the first doorbell", || calls.load(Ordering::Acquire) == 1);
        assert!(dm.describe().contains(&format!("{bdf}: calls=1")));

        // The doorbell handler is stuck (on its disk, say): the dump names
        // the doorbell being served and reports the function busy rather
        // than waiting for it.
        let g = lock(&hold);
        event.write(1).unwrap();
        wait_for("the thread to enter the doorbell", || {
            dm.describe().contains("serving doorbell 7 of")
        });
        let d = dm.describe();
        assert!(d.contains(&format!("{bdf}: BUSY")), "{d}");
        drop(g);
        wait_for("the second doorbell", || calls.load(Ordering::Acquire) == 2);

        dm.stop_thread();
        let t0 = Instant::now();
        t.join().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    /// Pause: the thread drains every function, parks, and serves no
    /// doorbell until resume; then it serves what arrived meanwhile. Stop
    /// ends a paused thread.
    #[test]
    fn a_paused_device_thread_drains_parks_and_serves_nothing_until_resumed() {
        let (dm, _) = manager();
        let event = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let calls = Arc::new(AtomicU64::new(0));
        let drains = Arc::new(AtomicU64::new(0));
        let f: SharedPciDevice = Arc::new(Mutex::new(Counter {
            event: event.clone(),
            calls: calls.clone(),
            hold: Arc::new(Mutex::new(())),
            drains: drains.clone(),
        }));
        dm.add_function(Bdf::new(0, 3, 0), f).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let t = dm.start_thread(stop.clone()).unwrap();
        for round in 1..=3u64 {
            assert!(dm.pause(Duration::from_secs(10)), "round {round}");
            assert!(
                drains.load(Ordering::Acquire) >= 2 * round,
                "drained before parking"
            );
            event.write(1).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(
                calls.load(Ordering::Acquire),
                round - 1,
                "a doorbell was served while paused"
            );
            dm.resume();
            wait_for("the doorbell after resume", || {
                calls.load(Ordering::Acquire) == round
            });
        }
        // Stopped while paused.
        assert!(dm.pause(Duration::from_secs(10)));
        stop.store(true, Ordering::Release);
        dm.stop_thread();
        t.join().unwrap();
    }

    /// A function as a vCPU reaches it: ECAM and MMIO through the manager
    /// (doorbells become eventfd signals, served by the device thread).
    struct Via<'a>(&'a DeviceManager, Bdf);

    impl PciDevice for Via<'_> {
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
        fn bar_read(&mut self, _: u8, offset: u64, data: &mut [u8]) {
            let base = bar0(self.0, self.1);
            if !self.0.mmio_read(base + offset, data) {
                data.fill(0xff);
            }
        }
        fn bar_write(&mut self, _: u8, offset: u64, data: &[u8]) {
            let base = bar0(self.0, self.1);
            self.0.mmio_write(base + offset, data);
        }
    }

    /// While paused, a device writes no byte of guest memory (the dirty
    /// bitmap stays clean) even when the driver rings its doorbell; on
    /// resume the waiting requests complete.
    #[test]
    fn a_paused_device_writes_no_guest_memory() {
        use virtio_devices::test_driver::{Layout, Seg, TestDriver};
        let dir = Dir::new("pause-dirty");
        let (dm, _) = manager();
        let mut t = TestDriver::new(16 << 20);
        let block = Block::new(&BlockConfig::new(dir.file("d.img", 1 << 20))).unwrap();
        let dev = VirtioPciDevice::new(
            block,
            t.dma_atomic(),
            Arc::new(NoInterrupts),
            VirtioPciOptions::default(),
        )
        .unwrap();
        let bdf = Bdf::new(0, 2, 0);
        dm.add_function(bdf, Arc::new(Mutex::new(dev))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = dm.start_thread(stop.clone()).unwrap();
        t.probe_placed(&mut Via(&dm, bdf), bar0(&dm, bdf)).unwrap();
        t.bring_up(&mut Via(&dm, bdf), u64::MAX, 1).unwrap();
        let read = |t: &mut TestDriver, sector: u64| {
            let mut h = 0u32.to_le_bytes().to_vec();
            h.extend_from_slice(&[0; 4]);
            h.extend_from_slice(&sector.to_le_bytes());
            t.submit(
                0,
                &[Seg::Readable(h), Seg::Writable(4096), Seg::Writable(1)],
                Layout::Direct,
            )
            .unwrap();
        };
        let used = |t: &TestDriver| t.used_idx(0).unwrap();
        read(&mut t, 0);
        t.kick(&mut Via(&dm, bdf), 0).unwrap();
        wait_for("the first request", || used(&t) == 1);

        assert!(dm.pause(Duration::from_secs(10)));
        for k in 1..=4 {
            read(&mut t, 8 * k);
        }
        t.kick(&mut Via(&dm, bdf), 0).unwrap();
        // The driver's own writes (requests, used_event) are behind us.
        t.clear_dirty();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(used(&t), 1, "a request completed while paused");
        assert!(
            t.dirty_pages().is_empty(),
            "guest memory written while paused: {:x?}",
            t.dirty_pages()
        );
        dm.resume();
        wait_for("the requests after resume", || used(&t) == 5);
        assert!(
            !t.dirty_pages().is_empty(),
            "the device wrote nothing at all"
        );
        stop.store(true, Ordering::Release);
        dm.stop_thread();
        thread.join().unwrap();
    }

    /// Member modes the guest set (Stop, Freeze) are the guest's: a pause
    /// and resume of the VM leave them as they were.
    #[test]
    fn pause_and_resume_leave_member_modes_alone() {
        use virtio_devices::pf::admin::{opcode, GROUP_TYPE_SRIOV, SUPPORTED_OPCODES};
        use virtio_devices::pf::migration::Mode;
        use virtio_devices::pf::{AdminCommand, Execution};
        let dir = Dir::new("pause-modes");
        let (dm, _) = manager();
        let bdf = Bdf::new(0, 4, 0);
        let d = dir.0.clone();
        let cfg = PfConfig::new(
            dir.file("pf.img", 4096),
            Box::new(move |n| {
                let p = d.join(format!("vf{n}.img"));
                let _ = std::fs::write(&p, vec![0u8; 4096]);
                p
            }),
            3,
            bdf,
            false,
        )
        .unwrap();
        let pf = VirtioPf::new(cfg, mem(), Arc::new(NoInterrupts)).unwrap();
        dm.add_function(bdf, pf.clone()).unwrap();
        cfg_write(&dm, bdf, SRIOV_CAP_OFFSET + 0x10, &3u16.to_le_bytes());
        cfg_write(&dm, bdf, SRIOV_CAP_OFFSET + 0x08, &0x9u16.to_le_bytes());
        let admin = |op: u16, member: u64, data: &[u8]| {
            let mut b = op.to_le_bytes().to_vec();
            b.extend_from_slice(&GROUP_TYPE_SRIOV.to_le_bytes());
            b.extend_from_slice(&[0; 12]);
            b.extend_from_slice(&member.to_le_bytes());
            b.extend_from_slice(data);
            let cmd = AdminCommand::parse(&b).unwrap();
            let mut out = Vec::new();
            match lock(&pf).execute_admin(&cmd, &mut out, 64) {
                Execution::Done(c) => assert_eq!(c.status, 0, "opcode {op:#x}"),
                Execution::Deferred { .. } => panic!("deferred"),
            }
        };
        admin(opcode::LIST_USE, 0, &SUPPORTED_OPCODES.to_le_bytes());
        admin(opcode::DEV_MODE_SET, 1, &[Mode::Stop as u8]);
        admin(opcode::DEV_MODE_SET, 2, &[Mode::Stop as u8]);
        admin(opcode::DEV_MODE_SET, 2, &[Mode::Freeze as u8]);
        let stop = Arc::new(AtomicBool::new(false));
        let t = dm.start_thread(stop.clone()).unwrap();
        for _ in 0..2 {
            assert!(dm.pause(Duration::from_secs(10)));
            dm.resume();
        }
        let p = lock(&pf);
        assert_eq!(p.member_mode(1), Some(Mode::Stop));
        assert_eq!(p.member_mode(2), Some(Mode::Freeze));
        assert_eq!(p.member_mode(3), Some(Mode::Active));
        drop(p);
        stop.store(true, Ordering::Release);
        dm.stop_thread();
        t.join().unwrap();
    }
}
