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
    vm: Arc<VmFd>,
    bus: PciBus,
    epoll: Epoll,
    doorbells: Mutex<Doorbells>,
    stop_evt: EventFd,
    allocator: Mutex<BarAllocator>,
    activity: ThreadActivity,
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

/// epoll token of the stop event.
const STOP_TOKEN: u64 = u64::MAX;

impl DeviceManager {
    pub fn new(vm: Arc<VmFd>, allocator: BarAllocator) -> Result<Self, DeviceManagerError> {
        let epoll = Epoll::new().map_err(DeviceManagerError::Epoll)?;
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        epoll
            .ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(&stop_evt),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
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

    /// Re-registers every function's doorbells at their current addresses.
    /// Called after any configuration write that changed BAR decoding or
    /// the set of functions.
    pub fn refresh_doorbells(&self) {
        let mut db = lock(&self.doorbells);
        // Drop every registration, then register what the functions report.
        for (token, r) in db.by_token.drain() {
            if let Some(address) = r.address {
                let _ = self.vm.unregister_ioevent(
                    &r.event,
                    &IoEventAddress::Mmio(address),
                    NoDatamatch,
                );
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
                    if let Err(e) =
                        self.vm
                            .register_ioevent(&event, &IoEventAddress::Mmio(a), NoDatamatch)
                    {
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
                        let _ = self.vm.unregister_ioevent(
                            &event,
                            &IoEventAddress::Mmio(a),
                            NoDatamatch,
                        );
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

    /// The device thread's activity and every function's run-time state,
    /// for the state dump. A function whose lock stays taken for
    /// [`DUMP_LOCK_WAIT`] is reported as busy rather than waited for.
    pub fn describe(&self) -> String {
        let mut out = format!("device thread: {}", self.activity.describe());
        let registered = lock(&self.doorbells).by_token.len();
        out.push_str(&format!("\ndoorbells registered: {registered}"));
        for (bdf, dev) in self.bus.functions() {
            let deadline = Instant::now() + DUMP_LOCK_WAIT;
            let text = loop {
                match dev.try_lock() {
                    Ok(d) => break d.debug_state(),
                    Err(std::sync::TryLockError::Poisoned(p)) => {
                        break p.into_inner().debug_state()
                    }
                    Err(std::sync::TryLockError::WouldBlock) => {
                        if Instant::now() >= deadline {
                            break format!(
                                "BUSY: its lock has been held for over {} ms",
                                DUMP_LOCK_WAIT.as_millis()
                            );
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            };
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
            .spawn(move || me.run(&stop))
            .map_err(DeviceManagerError::Spawn)
    }

    /// Ends the device thread.
    pub fn stop_thread(&self) {
        let _ = self.stop_evt.write(1);
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
