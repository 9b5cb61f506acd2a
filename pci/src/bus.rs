//! A PCI segment: functions keyed by bus/device/function, reached through
//! ECAM or ports 0xCF8/0xCFC, and a decode map routing MMIO and port I/O to
//! the BARs functions currently decode.
//!
//! # Concurrency
//!
//! [`PciBus`] is internally synchronized: every method takes `&self`, so
//! the VMM shares it as `Arc<PciBus>` between vCPU threads without an outer
//! lock. Inside:
//!
//! * an `RwLock` guards the function table and the decode map. Accesses
//!   take it for reading just long enough to clone the target function's
//!   `Arc`, then release it, so a device's method always runs with **only
//!   that device's mutex held** and vCPUs hitting different functions run
//!   in parallel;
//! * a `Mutex` serializes decode-map rebuilds. A rebuild snapshots the
//!   function table, asks each function for its decoded BARs (one device
//!   mutex at a time, no bus lock held), then installs the new map under a
//!   short write lock. Lock order is rebuild mutex → device mutex, and no
//!   device mutex is held while taking a bus lock, so a device that is
//!   busy (its mutex held by the device thread) only delays the rebuild;
//! * the 0xCF8 address register is an atomic.
//!
//! Devices hold no reference to the bus; a configuration write that creates
//! or removes functions returns a [`FunctionChange`] which the bus applies.
//! Callers must not call into the bus while holding a device's mutex (a
//! rebuild would wait for that mutex). A device model whose functions share
//! state (a PF and its VFs) must keep one lock order: if a VF's
//! `decoded_bars` locks the PF's shared state, the PF must not lock a VF's
//! mutex while holding that state, since a rebuild may be holding the VF's
//! mutex and waiting for it.
//!
//! ECAM offsets are relative to the window's base, which decodes bus 0; a
//! VMM whose MCFG starts at another bus adds `start_bus << 20`.
//!
//! The decode map is rebuilt after every configuration write and every
//! function added or removed. Overlapping BARs: the one with the lowest
//! base (then lowest routing ID and BAR index) wins; the other is not
//! reachable until the overlap goes away.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use thiserror::Error;

use crate::configuration::PCI_CONFIG_SPACE_SIZE;
use crate::device::{BarKind, BarRange, FunctionChange, PciDevice, SharedPciDevice};
use crate::Bdf;

/// Port of the configuration address register.
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// First port of the configuration data register (0xCFC..=0xCFF).
pub const PCI_CONFIG_DATA_PORT: u16 = 0xcfc;
/// Configuration address register: enable bit.
pub const PCI_CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Bytes of ECAM window per bus.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// Bytes of an ECAM window covering all 256 buses.
pub const ECAM_SIZE: u64 = 256 * ECAM_BUS_SIZE;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("function {0} is already on the bus")]
    FunctionExists(Bdf),
}

/// What a configuration write did beyond the function's own registers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigWriteResult {
    /// A function was present at the target and received the write.
    pub delivered: bool,
    /// The set of decoded BARs (any function's) changed: the VMM should
    /// re-register its MMIO/PIO ranges and ioeventfds.
    pub decode_changed: bool,
    /// Functions the write added to the bus.
    pub added: Vec<Bdf>,
    /// Functions the write removed from the bus.
    pub removed: Vec<Bdf>,
}

/// A BAR as decoded by the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedBar {
    pub bdf: Bdf,
    pub bar: BarRange,
}

#[derive(Clone)]
struct DecodeEntry {
    /// Inclusive end.
    last: u64,
    decoded: DecodedBar,
    device: SharedPciDevice,
}

impl DecodeEntry {
    fn start(&self) -> u64 {
        self.decoded.bar.base
    }
}

#[derive(Default)]
struct Inner {
    functions: BTreeMap<Bdf, SharedPciDevice>,
    /// Sorted by base, non-overlapping.
    mmio: Vec<DecodeEntry>,
    io: Vec<DecodeEntry>,
}

/// A PCI segment of up to 256 buses.
#[derive(Default)]
pub struct PciBus {
    inner: RwLock<Inner>,
    rebuild: Mutex<()>,
    config_address: AtomicU32,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field("functions", &self.function_ids())
            .field("decoded", &self.decoded_bars())
            .finish()
    }
}

fn lock_device(d: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    // A device that panicked keeps serving; its state is whatever it was.
    d.lock().unwrap_or_else(|e| e.into_inner())
}

fn config_access_ok(reg: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && reg as usize + len <= PCI_CONFIG_SPACE_SIZE
}

/// Splits an ECAM offset into routing ID and register.
pub fn decode_ecam(offset: u64) -> Option<(Bdf, u16)> {
    if offset >= ECAM_SIZE {
        return None;
    }
    let bus = (offset >> 20) as u8;
    let dev = ((offset >> 15) & 0x1f) as u8;
    let func = ((offset >> 12) & 0x7) as u8;
    Some((Bdf::new(bus, dev, func), (offset & 0xfff) as u16))
}

/// The ECAM offset of register `reg` of `bdf`.
pub fn ecam_offset(bdf: Bdf, reg: u16) -> u64 {
    (u64::from(bdf.rid()) << 12) | u64::from(reg & 0xfff)
}

impl PciBus {
    pub fn new() -> Self {
        Self::default()
    }

    fn read_inner(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_inner(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    // ---- functions ---------------------------------------------------------

    /// Adds a function and rebuilds the decode map.
    pub fn add_function(&self, bdf: Bdf, device: SharedPciDevice) -> Result<(), BusError> {
        {
            let mut inner = self.write_inner();
            if inner.functions.contains_key(&bdf) {
                return Err(BusError::FunctionExists(bdf));
            }
            inner.functions.insert(bdf, device);
        }
        self.rebuild_decode_map();
        Ok(())
    }

    /// Removes a function and rebuilds the decode map.
    pub fn remove_function(&self, bdf: Bdf) -> Option<SharedPciDevice> {
        let d = self.write_inner().functions.remove(&bdf);
        if d.is_some() {
            self.rebuild_decode_map();
        }
        d
    }

    /// The function at `bdf`.
    pub fn function(&self, bdf: Bdf) -> Option<SharedPciDevice> {
        self.read_inner().functions.get(&bdf).cloned()
    }

    /// Routing IDs of all functions, ascending.
    pub fn function_ids(&self) -> Vec<Bdf> {
        self.read_inner().functions.keys().copied().collect()
    }

    /// All functions, ascending by routing ID.
    pub fn functions(&self) -> Vec<(Bdf, SharedPciDevice)> {
        self.read_inner()
            .functions
            .iter()
            .map(|(b, d)| (*b, d.clone()))
            .collect()
    }

    /// Applies a device's function change; returns what was actually
    /// added and removed (an add at an occupied routing ID is refused).
    fn apply_change(&self, change: FunctionChange) -> (Vec<Bdf>, Vec<Bdf>) {
        let mut inner = self.write_inner();
        let mut removed = Vec::new();
        for bdf in change.removed {
            if inner.functions.remove(&bdf).is_some() {
                removed.push(bdf);
            }
        }
        let mut added = Vec::new();
        for (bdf, dev) in change.added {
            if inner.functions.contains_key(&bdf) {
                log::warn!("function {bdf} already present; not adding it again");
                continue;
            }
            inner.functions.insert(bdf, dev);
            added.push(bdf);
        }
        (added, removed)
    }

    // ---- configuration space -----------------------------------------------

    /// Reads configuration space of `bdf`; absent functions and bad
    /// accesses read all-ones.
    pub fn config_read(&self, bdf: Bdf, reg: u16, data: &mut [u8]) {
        if !config_access_ok(reg, data.len()) {
            data.fill(0xff);
            return;
        }
        match self.function(bdf) {
            Some(d) => lock_device(&d).config_read(reg, data),
            None => data.fill(0xff),
        }
    }

    /// Writes configuration space of `bdf`, applies any function change and
    /// rebuilds the decode map.
    pub fn config_write(&self, bdf: Bdf, reg: u16, data: &[u8]) -> ConfigWriteResult {
        if !config_access_ok(reg, data.len()) {
            return ConfigWriteResult::default();
        }
        let Some(dev) = self.function(bdf) else {
            return ConfigWriteResult::default();
        };
        let change = lock_device(&dev).config_write(reg, data);
        let (added, removed) = match change {
            Some(c) => self.apply_change(c),
            None => (Vec::new(), Vec::new()),
        };
        let decode_changed = self.rebuild_decode_map();
        ConfigWriteResult {
            delivered: true,
            decode_changed,
            added,
            removed,
        }
    }

    /// ECAM read at `offset` into the window (bus 0 at offset 0).
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        match decode_ecam(offset) {
            Some((bdf, reg)) => self.config_read(bdf, reg, data),
            None => data.fill(0xff),
        }
    }

    /// ECAM write at `offset` into the window.
    pub fn ecam_write(&self, offset: u64, data: &[u8]) -> ConfigWriteResult {
        match decode_ecam(offset) {
            Some((bdf, reg)) => self.config_write(bdf, reg, data),
            None => ConfigWriteResult::default(),
        }
    }

    /// The target of a data-port access at 0xCFC + `byte`, if the address
    /// register is enabled and the access stays inside the data register.
    fn port_target(&self, byte: u16, len: usize) -> Option<(Bdf, u16)> {
        if byte as usize + len > 4 {
            return None;
        }
        let a = self.config_address.load(Ordering::Acquire);
        if a & PCI_CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let bdf = Bdf::from_rid((a >> 8) as u16);
        Some((bdf, (a & 0xfc) as u16 + byte))
    }

    /// Port read in 0xCF8..=0xCFF (configuration mechanism #1): a 32-bit
    /// read of 0xCF8 returns the address register; reads of 0xCFC..=0xCFF
    /// reach the first 256 bytes of the addressed function. Anything else
    /// reads all-ones.
    pub fn config_port_read(&self, port: u16, data: &mut [u8]) {
        match port {
            PCI_CONFIG_ADDRESS_PORT if data.len() == 4 => {
                data.copy_from_slice(&self.config_address.load(Ordering::Acquire).to_le_bytes())
            }
            PCI_CONFIG_DATA_PORT..=0xcff => {
                match self.port_target(port - PCI_CONFIG_DATA_PORT, data.len()) {
                    Some((bdf, reg)) => self.config_read(bdf, reg, data),
                    None => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    /// Port write in 0xCF8..=0xCFF. Only 32-bit writes to 0xCF8 set the
    /// address register (narrower ones are dropped: on x86 0xCF9 is the
    /// reset control register, which the VMM handles elsewhere).
    pub fn config_port_write(&self, port: u16, data: &[u8]) -> ConfigWriteResult {
        match port {
            PCI_CONFIG_ADDRESS_PORT => {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    // Bits 1:0 are reserved zero.
                    self.config_address
                        .store(u32::from_le_bytes(b) & !0x3, Ordering::Release);
                }
                ConfigWriteResult::default()
            }
            PCI_CONFIG_DATA_PORT..=0xcff => {
                match self.port_target(port - PCI_CONFIG_DATA_PORT, data.len()) {
                    Some((bdf, reg)) => self.config_write(bdf, reg, data),
                    None => ConfigWriteResult::default(),
                }
            }
            _ => ConfigWriteResult::default(),
        }
    }

    // ---- BAR dispatch -------------------------------------------------------

    fn lookup(map: &[DecodeEntry], addr: u64, len: usize) -> Option<(SharedPciDevice, u8, u64)> {
        if len == 0 {
            return None;
        }
        let last = addr.checked_add(len as u64 - 1)?;
        let i = map.partition_point(|e| e.start() <= addr).checked_sub(1)?;
        let e = map.get(i)?;
        if last > e.last {
            return None;
        }
        Some((e.device.clone(), e.decoded.bar.index, addr - e.start()))
    }

    fn find_mmio(&self, addr: u64, len: usize) -> Option<(SharedPciDevice, u8, u64)> {
        Self::lookup(&self.read_inner().mmio, addr, len)
    }

    fn find_io(&self, port: u16, len: usize) -> Option<(SharedPciDevice, u8, u64)> {
        Self::lookup(&self.read_inner().io, u64::from(port), len)
    }

    /// MMIO read; `false` if no decoded memory BAR holds the whole access.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find_mmio(addr, data.len()) {
            Some((dev, bar, off)) => {
                lock_device(&dev).bar_read(bar, off, data);
                true
            }
            None => false,
        }
    }

    /// MMIO write; `false` if no decoded memory BAR holds the whole access.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find_mmio(addr, data.len()) {
            Some((dev, bar, off)) => {
                lock_device(&dev).bar_write(bar, off, data);
                true
            }
            None => false,
        }
    }

    /// Port read from a decoded I/O BAR (not the 0xCF8 mechanism: see
    /// [`PciBus::config_port_read`]).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find_io(port, data.len()) {
            Some((dev, bar, off)) => {
                lock_device(&dev).bar_read(bar, off, data);
                true
            }
            None => false,
        }
    }

    /// Port write to a decoded I/O BAR.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match self.find_io(port, data.len()) {
            Some((dev, bar, off)) => {
                lock_device(&dev).bar_write(bar, off, data);
                true
            }
            None => false,
        }
    }

    // ---- decode map ---------------------------------------------------------

    /// Every BAR the bus currently routes, memory first, ascending by base.
    pub fn decoded_bars(&self) -> Vec<DecodedBar> {
        let inner = self.read_inner();
        inner
            .mmio
            .iter()
            .chain(inner.io.iter())
            .map(|e| e.decoded)
            .collect()
    }

    /// The BARs of `bdf` the bus currently routes.
    pub fn decoded_bars_of(&self, bdf: Bdf) -> Vec<BarRange> {
        let inner = self.read_inner();
        inner
            .mmio
            .iter()
            .chain(inner.io.iter())
            .filter(|e| e.decoded.bdf == bdf)
            .map(|e| e.decoded.bar)
            .collect()
    }

    /// The 0xCF8 address register (for snapshots).
    pub fn config_address(&self) -> u32 {
        self.config_address.load(Ordering::Acquire)
    }

    /// Restores the 0xCF8 address register.
    pub fn set_config_address(&self, value: u32) {
        self.config_address.store(value & !0x3, Ordering::Release);
    }

    /// Asks every function for its decoded BARs and installs the result.
    /// Returns whether the routed set changed. Called by the bus itself
    /// after configuration writes and function changes; the VMM calls it
    /// after restoring devices' state behind the bus's back.
    pub fn rebuild_decode_map(&self) -> bool {
        let _serial = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let functions = self.functions();
        let mut mmio = Vec::new();
        let mut io = Vec::new();
        for (bdf, dev) in &functions {
            let bars = lock_device(dev).decoded_bars();
            for bar in bars {
                let Some(last) = bar
                    .size
                    .checked_sub(1)
                    .and_then(|s| bar.base.checked_add(s))
                else {
                    log::warn!("function {bdf} BAR {} has an unusable range", bar.index);
                    continue;
                };
                let entry = DecodeEntry {
                    last,
                    decoded: DecodedBar { bdf: *bdf, bar },
                    device: dev.clone(),
                };
                match bar.kind {
                    BarKind::Io => {
                        if last <= u64::from(u16::MAX) {
                            io.push(entry);
                        } else {
                            log::debug!("function {bdf} I/O BAR {} beyond 64 KiB", bar.index);
                        }
                    }
                    BarKind::Memory32 | BarKind::Memory64 => mmio.push(entry),
                }
            }
        }
        let mmio = Self::sorted_without_overlaps(mmio);
        let io = Self::sorted_without_overlaps(io);

        let mut inner = self.write_inner();
        // A function removed while we were asking around must not stay
        // routed (a later rebuild would fix it, but do not wait for it).
        let present = |e: &DecodeEntry| {
            inner
                .functions
                .get(&e.decoded.bdf)
                .is_some_and(|d| std::sync::Arc::ptr_eq(d, &e.device))
        };
        let mmio: Vec<_> = mmio.into_iter().filter(present).collect();
        let io: Vec<_> = io.into_iter().filter(present).collect();
        let same = |a: &[DecodeEntry], b: &[DecodeEntry]| {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| {
                    x.decoded == y.decoded && std::sync::Arc::ptr_eq(&x.device, &y.device)
                })
        };
        let changed = !same(&inner.mmio, &mmio) || !same(&inner.io, &io);
        inner.mmio = mmio;
        inner.io = io;
        changed
    }

    fn sorted_without_overlaps(mut v: Vec<DecodeEntry>) -> Vec<DecodeEntry> {
        v.sort_by_key(|e| (e.start(), e.decoded.bdf, e.decoded.bar.index));
        let mut out: Vec<DecodeEntry> = Vec::with_capacity(v.len());
        for e in v {
            if let Some(prev) = out.last() {
                if e.start() <= prev.last {
                    log::warn!(
                        "{} BAR {} at {:#x} overlaps {} BAR {}; not routed",
                        e.decoded.bdf,
                        e.decoded.bar.index,
                        e.start(),
                        prev.decoded.bdf,
                        prev.decoded.bar.index
                    );
                    continue;
                }
            }
            out.push(e);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::{PciConfiguration, PciHeaderParams, BAR0, COMMAND};
    use crate::sriov::{SriovCapability, SriovParams, SRIOV_CONTROL, SRIOV_NUM_VFS, SRIOV_VF_BAR0};
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<(Bdf, u8, u64, Vec<u8>)>>>;

    /// A function with a 32-bit memory BAR0 of 4 KiB and an I/O BAR1 of 32
    /// bytes, recording BAR writes and answering BAR reads with the offset.
    struct TestDev {
        bdf: Bdf,
        config: PciConfiguration,
        log: Log,
    }

    impl TestDev {
        fn new(bdf: Bdf, log: &Log) -> Arc<Mutex<TestDev>> {
            let mut config = PciConfiguration::new(&PciHeaderParams {
                vendor_id: 0x1af4,
                device_id: 0x1000 + u16::from(bdf.function()),
                ..Default::default()
            });
            config.add_bar(0, BarKind::Memory32, 0x1000, false).unwrap();
            config.add_bar(1, BarKind::Io, 0x20, false).unwrap();
            Arc::new(Mutex::new(TestDev {
                bdf,
                config,
                log: log.clone(),
            }))
        }
    }

    impl PciDevice for TestDev {
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            self.config.read(offset, data)
        }
        fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<FunctionChange> {
            self.config.write(offset, data);
            None
        }
        fn decoded_bars(&self) -> Vec<BarRange> {
            self.config.decoded_bars()
        }
        fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .push((self.bdf, bar, offset, data.to_vec()));
        }
    }

    fn ecam_w32(bus: &PciBus, bdf: Bdf, reg: u16, v: u32) -> ConfigWriteResult {
        bus.ecam_write(ecam_offset(bdf, reg), &v.to_le_bytes())
    }

    fn ecam_r32(bus: &PciBus, bdf: Bdf, reg: u16) -> u32 {
        let mut b = [0; 4];
        bus.ecam_read(ecam_offset(bdf, reg), &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn ecam_decoding_and_absent_functions() {
        let bus = PciBus::new();
        let log = Log::default();
        let a = Bdf::new(0, 0, 0);
        let b = Bdf::new(2, 5, 3);
        bus.add_function(a, TestDev::new(a, &log)).unwrap();
        bus.add_function(b, TestDev::new(b, &log)).unwrap();
        assert!(matches!(
            bus.add_function(b, TestDev::new(b, &log)),
            Err(BusError::FunctionExists(_))
        ));
        // bus 2, dev 5, fn 3 at 2<<20 | 5<<15 | 3<<12.
        assert_eq!(ecam_offset(b, 0), 0x22_b000);
        assert_eq!(decode_ecam(0x22_b004), Some((b, 4)));
        assert_eq!(ecam_r32(&bus, b, 0), 0x1003_1af4);
        let mut w = [0u8; 2];
        bus.ecam_read(0x22_b002, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1003);
        assert_eq!(ecam_r32(&bus, a, 0), 0x1000_1af4);
        // Neighbours are absent: all-ones.
        assert_eq!(ecam_r32(&bus, Bdf::new(2, 5, 2), 0), 0xffff_ffff);
        assert_eq!(ecam_r32(&bus, Bdf::new(0, 0, 1), 0), 0xffff_ffff);
        assert_eq!(ecam_r32(&bus, Bdf::new(1, 0, 0), 0), 0xffff_ffff);
        // Extended config space (offset 0x100+) reaches the function.
        assert_eq!(ecam_r32(&bus, b, 0x100), 0);
        // Beyond the window, crossing 4 KiB, bad length.
        let mut d = [0u8; 4];
        bus.ecam_read(ECAM_SIZE, &mut d);
        assert_eq!(d, [0xff; 4]);
        bus.ecam_read(ecam_offset(b, 0xffe), &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut d3 = [0u8; 3];
        bus.ecam_read(ecam_offset(b, 0), &mut d3);
        assert_eq!(d3, [0xff; 3]);
        // Writes to absent functions are not delivered.
        assert!(!ecam_w32(&bus, Bdf::new(3, 0, 0), 4, 2).delivered);
        assert!(ecam_w32(&bus, b, 4, 0).delivered);
        assert!(bus.remove_function(b).is_some());
        assert_eq!(ecam_r32(&bus, b, 0), 0xffff_ffff);
        assert_eq!(bus.function_ids(), vec![a]);
    }

    #[test]
    fn cf8_cfc_decoding() {
        let bus = PciBus::new();
        let log = Log::default();
        let f = Bdf::new(1, 3, 6);
        bus.add_function(f, TestDev::new(f, &log)).unwrap();
        let addr = |bdf: Bdf, reg: u32| 0x8000_0000 | (u32::from(bdf.rid()) << 8) | reg;
        bus.config_port_write(0xcf8, &addr(f, 0).to_le_bytes());
        let mut d = [0u8; 4];
        bus.config_port_read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), addr(f, 0));
        bus.config_port_read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1006_1af4);
        // Byte offsets within the data register.
        let mut w = [0u8; 2];
        bus.config_port_read(0xcfe, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1006);
        let mut b = [0u8; 1];
        bus.config_port_read(0xcfd, &mut b);
        assert_eq!(b, [0x1a]);
        // Crossing the end of the data register.
        bus.config_port_read(0xcfe, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Register bits 7:2, byte write to the interrupt line (0x3c).
        bus.config_port_write(0xcf8, &addr(f, 0x3c).to_le_bytes());
        bus.config_port_write(0xcfc, &[0x0a]);
        bus.config_port_read(0xcfc, &mut b);
        assert_eq!(b, [0x0a]);
        let mut e = [0u8; 1];
        bus.ecam_read(ecam_offset(f, 0x3c), &mut e);
        assert_eq!(e, [0x0a]);
        // Enable bit clear: all-ones, writes dropped.
        bus.config_port_write(0xcf8, &(addr(f, 0x3c) & !0x8000_0000).to_le_bytes());
        bus.config_port_read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(!bus.config_port_write(0xcfc, &[0x0b]).delivered);
        // Absent function.
        bus.config_port_write(0xcf8, &addr(Bdf::new(1, 3, 5), 0).to_le_bytes());
        bus.config_port_read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Narrow writes to 0xCF8 do not change the address register.
        bus.config_port_write(0xcf8, &[0]);
        bus.config_port_read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), addr(Bdf::new(1, 3, 5), 0));
    }

    #[test]
    fn bar_dispatch_and_rebuild_after_reprogramming() {
        let bus = PciBus::new();
        let log = Log::default();
        let f = Bdf::new(0, 2, 1);
        bus.add_function(f, TestDev::new(f, &log)).unwrap();
        // Program BARs: nothing decoded yet (command clear).
        let r = ecam_w32(&bus, f, BAR0, 0xe000_0000);
        assert!(!r.decode_changed);
        ecam_w32(&bus, f, BAR0 + 4, 0xc000);
        assert!(!bus.mmio_write(0xe000_0000, &[1]));
        // Enable memory and I/O.
        let r = ecam_w32(&bus, f, COMMAND, 3);
        assert!(r.decode_changed);
        assert_eq!(bus.decoded_bars().len(), 2);
        assert_eq!(
            bus.decoded_bars_of(f),
            vec![
                BarRange {
                    index: 0,
                    kind: BarKind::Memory32,
                    base: 0xe000_0000,
                    size: 0x1000
                },
                BarRange {
                    index: 1,
                    kind: BarKind::Io,
                    base: 0xc000,
                    size: 0x20
                }
            ]
        );
        assert!(bus.decoded_bars_of(Bdf::new(0, 2, 0)).is_empty());
        assert!(bus.mmio_write(0xe000_0010, &[1, 2, 3, 4]));
        let mut d = [0u8; 4];
        assert!(bus.mmio_read(0xe000_0ffc, &mut d));
        assert_eq!(d, [0xfc, 0xfd, 0xfe, 0xff]);
        // Straddling the end, or outside.
        assert!(!bus.mmio_read(0xe000_0ffe, &mut d));
        assert!(!bus.mmio_read(0xe000_1000, &mut d));
        assert!(!bus.mmio_read(0xdfff_fffc, &mut d));
        assert!(bus.pio_write(0xc01f, &[7]));
        assert!(!bus.pio_write(0xc020, &[7]));
        // Writing a config register that changes nothing keeps the map.
        let r = bus.config_write(f, 0x3c, &[5]);
        assert!(r.delivered && !r.decode_changed);
        // Move BAR0: the old address is gone, the new one routes.
        let r = ecam_w32(&bus, f, BAR0, 0xe010_0000);
        assert!(r.decode_changed);
        assert!(!bus.mmio_write(0xe000_0010, &[9]));
        assert!(bus.mmio_write(0xe010_0020, &[9]));
        // Sizing (all-ones) stops decoding even with MSE set.
        let r = ecam_w32(&bus, f, BAR0, 0xffff_ffff);
        assert!(r.decode_changed);
        assert!(!bus.mmio_write(0xe010_0020, &[9]));
        assert_eq!(ecam_r32(&bus, f, BAR0), 0xffff_f000);
        let writes = log.lock().unwrap().clone();
        assert_eq!(
            writes,
            vec![
                (f, 0, 0x10, vec![1, 2, 3, 4]),
                (f, 1, 0x1f, vec![7]),
                (f, 0, 0x20, vec![9]),
            ]
        );
        // Removing the function removes its ranges.
        bus.remove_function(f);
        assert!(bus.decoded_bars().is_empty());
        assert!(!bus.pio_write(0xc000, &[1]));
    }

    #[test]
    fn overlapping_bars_first_wins() {
        let bus = PciBus::new();
        let log = Log::default();
        let a = Bdf::new(0, 1, 0);
        let b = Bdf::new(0, 2, 0);
        bus.add_function(a, TestDev::new(a, &log)).unwrap();
        bus.add_function(b, TestDev::new(b, &log)).unwrap();
        for f in [a, b] {
            ecam_w32(&bus, f, BAR0, 0xe000_0000);
            ecam_w32(&bus, f, COMMAND, 2);
        }
        assert_eq!(bus.decoded_bars().len(), 1);
        assert!(bus.mmio_write(0xe000_0000, &[1]));
        assert_eq!(log.lock().unwrap()[0].0, a);
        // Moving a away lets b route.
        ecam_w32(&bus, a, BAR0, 0xe100_0000);
        assert_eq!(bus.decoded_bars().len(), 2);
        assert!(bus.mmio_write(0xe000_0000, &[2]));
        assert_eq!(log.lock().unwrap()[1].0, b);
    }

    // ---- a PF with SR-IOV whose VFs appear on the bus ---------------------

    struct PfShared {
        config: PciConfiguration,
        sriov: SriovCapability,
    }

    struct Pf {
        bdf: Bdf,
        shared: Arc<Mutex<PfShared>>,
        log: Log,
    }

    struct Vf {
        n: u16,
        pf: Arc<Mutex<PfShared>>,
        log: Log,
        bdf: Bdf,
    }

    impl PciDevice for Pf {
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            self.shared.lock().unwrap().config.read(offset, data)
        }
        fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<FunctionChange> {
            let mut s = self.shared.lock().unwrap();
            let s = &mut *s;
            let e = s.sriov.config_write(&mut s.config, offset, data);
            let mut change = FunctionChange::default();
            match e.vf_enable? {
                crate::sriov::VfEnableChange::Enabled { num_vfs } => {
                    for n in 1..=num_vfs {
                        let bdf = s.sriov.vf_rid(self.bdf, n)?;
                        let vf: SharedPciDevice = Arc::new(Mutex::new(Vf {
                            n,
                            pf: self.shared.clone(),
                            log: self.log.clone(),
                            bdf,
                        }));
                        change.added.push((bdf, vf));
                    }
                }
                crate::sriov::VfEnableChange::Disabled { num_vfs } => {
                    for n in 1..=num_vfs {
                        change.removed.push(s.sriov.vf_rid(self.bdf, n)?);
                    }
                }
            }
            Some(change)
        }
        fn decoded_bars(&self) -> Vec<BarRange> {
            self.shared.lock().unwrap().config.decoded_bars()
        }
        fn bar_read(&mut self, _: u8, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
    }

    impl PciDevice for Vf {
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            // VFs read 0xFFFF as vendor/device ID.
            if offset < 4 {
                data.fill(0xff);
            } else {
                data.fill(0);
            }
        }
        fn config_write(&mut self, _: u16, _: &[u8]) -> Option<FunctionChange> {
            None
        }
        fn decoded_bars(&self) -> Vec<BarRange> {
            let s = self.pf.lock().unwrap();
            s.sriov
                .vf_bar0_range(&s.config, self.n)
                .into_iter()
                .collect()
        }
        fn bar_read(&mut self, _: u8, _: u64, data: &mut [u8]) {
            data.fill(self.n as u8);
        }
        fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .push((self.bdf, bar, offset, data.to_vec()));
        }
    }

    /// Puts a PF with 3 VFs (offset 1, stride 1, 16 KiB VF BAR0) and a 4 KiB
    /// BAR0 of its own at `pf_bdf`; returns the SR-IOV capability offset.
    fn add_pf(bus: &PciBus, log: &Log, pf_bdf: Bdf) -> u16 {
        let mut config = PciConfiguration::new(&PciHeaderParams {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            multifunction: true,
            ..Default::default()
        });
        config.add_bar(0, BarKind::Memory64, 0x1000, false).unwrap();
        let sriov = SriovCapability::add_to(
            &mut config,
            SriovParams {
                initial_vfs: 3,
                total_vfs: 3,
                first_vf_offset: 1,
                vf_stride: 1,
                vf_device_id: 0x1042,
                vf_bar0_size: 0x4000,
                vf_bar0_prefetchable: false,
                function_dependency_link: 0,
            },
        )
        .unwrap();
        let off = sriov.offset();
        let pf = Arc::new(Mutex::new(Pf {
            bdf: pf_bdf,
            shared: Arc::new(Mutex::new(PfShared { config, sriov })),
            log: log.clone(),
        }));
        bus.add_function(pf_bdf, pf).unwrap();
        off
    }

    #[test]
    fn sriov_vfs_appear_and_decode_through_the_bus() {
        let bus = PciBus::new();
        let log = Log::default();
        let pf_bdf = Bdf::new(0, 3, 0);
        let off = add_pf(&bus, &log, pf_bdf);

        // Linux: NumVFs, VF BAR, then VF Enable | VF MSE.
        bus.ecam_write(
            ecam_offset(pf_bdf, off + SRIOV_NUM_VFS),
            &2u16.to_le_bytes(),
        );
        ecam_w32(&bus, pf_bdf, off + SRIOV_VF_BAR0, 0x8000_0000);
        ecam_w32(&bus, pf_bdf, off + SRIOV_VF_BAR0 + 4, 0);
        let r = bus.ecam_write(
            ecam_offset(pf_bdf, off + SRIOV_CONTROL),
            &(1u16 | 1 << 3).to_le_bytes(),
        );
        let vf1 = Bdf::new(0, 3, 1);
        let vf2 = Bdf::new(0, 3, 2);
        assert_eq!(r.added, vec![vf1, vf2]);
        assert!(r.decode_changed);
        assert_eq!(bus.function_ids(), vec![pf_bdf, vf1, vf2]);
        // VF IDs read all-ones, other registers reach the VF.
        assert_eq!(ecam_r32(&bus, vf2, 0), 0xffff_ffff);
        assert_eq!(ecam_r32(&bus, vf2, 8), 0);
        // VF2's BAR0 is at VF BAR0 + 1 × 16 KiB.
        let mut d = [0u8; 4];
        assert!(bus.mmio_read(0x8000_4000, &mut d));
        assert_eq!(d, [2; 4]);
        assert!(bus.mmio_write(0x8000_0008, &[1, 0]));
        assert_eq!(log.lock().unwrap()[0], (vf1, 0, 8, vec![1, 0]));
        assert!(!bus.mmio_read(0x8000_8000, &mut d));
        // Clearing VF MSE alone (PF write) un-decodes the VFs' BARs.
        let r = bus.ecam_write(
            ecam_offset(pf_bdf, off + SRIOV_CONTROL),
            &1u16.to_le_bytes(),
        );
        assert!(r.decode_changed && r.added.is_empty() && r.removed.is_empty());
        assert!(!bus.mmio_read(0x8000_4000, &mut d));
        // Clearing VF Enable removes them.
        let r = bus.ecam_write(
            ecam_offset(pf_bdf, off + SRIOV_CONTROL),
            &0u16.to_le_bytes(),
        );
        assert_eq!(r.removed, vec![vf1, vf2]);
        assert!(!r.decode_changed);
        assert_eq!(ecam_r32(&bus, vf1, 0), 0xffff_ffff);
        assert_eq!(bus.function_ids(), vec![pf_bdf]);
    }

    #[test]
    fn concurrent_access_from_many_threads() {
        let bus = Arc::new(PciBus::new());
        let log = Log::default();
        let f = Bdf::new(0, 1, 0);
        bus.add_function(f, TestDev::new(f, &log)).unwrap();
        ecam_w32(&bus, f, BAR0, 0xe000_0000);
        ecam_w32(&bus, f, COMMAND, 2);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for i in 0..200u32 {
                        if t == 0 {
                            let base = if i % 2 == 0 { 0xe000_0000 } else { 0xe100_0000 };
                            ecam_w32(&bus, f, BAR0, base);
                        } else {
                            let mut d = [0u8; 4];
                            let _ = bus.mmio_read(0xe000_0000, &mut d);
                            let _ = ecam_r32(&bus, f, 0);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Last write by thread 0 was i = 199: 0xe100_0000.
        let mut d = [0u8; 4];
        assert!(bus.mmio_read(0xe100_0000, &mut d));
        assert!(!bus.mmio_read(0xe000_0000, &mut d));
    }

    /// Deterministic pseudo-random guest accesses of every kind: nothing
    /// panics, the function set stays consistent with the PF's SR-IOV
    /// registers.
    #[test]
    fn random_guest_accesses_do_not_panic() {
        let bus = PciBus::new();
        let log = Log::default();
        let pf_bdf = Bdf::new(0, 3, 0);
        let off = add_pf(&bus, &log, pf_bdf);
        let t = Bdf::new(1, 0, 7);
        bus.add_function(t, TestDev::new(t, &log)).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut saw_vfs = 0;
        for _ in 0..20_000 {
            let r = next();
            let len = [1usize, 2, 4, 2, 4, 3, 8, 0][(next() % 8) as usize];
            // Half the values small, so NumVFs and VF Enable writes land.
            let v = if next() % 2 == 0 {
                (next() % 4).to_le_bytes()
            } else {
                next().to_le_bytes()
            };
            let mut buf = [0u8; 8];
            let target = [pf_bdf, t, Bdf::new(0, 3, 1), Bdf::new(0, 3, 2)][(next() % 4) as usize];
            // Mostly header, BARs and SR-IOV, sometimes anywhere.
            let reg = match next() % 4 {
                0 => (r >> 16) as u16 % 0x40,
                1 => {
                    off + [
                        SRIOV_CONTROL,
                        SRIOV_NUM_VFS,
                        SRIOV_VF_BAR0,
                        SRIOV_VF_BAR0 + 4,
                    ][((r >> 16) % 4) as usize]
                }
                2 => (r >> 16) as u16 % 0x1100,
                _ => (r >> 16) as u16,
            };
            match next() % 6 {
                0 => {
                    bus.ecam_write(ecam_offset(target, reg & 0xfff), &v[..len]);
                }
                1 => bus.ecam_read((r >> 16) % (ECAM_SIZE + 0x1000), &mut buf[..len]),
                2 => {
                    bus.config_port_write(0xcf8 + (r >> 48) as u16 % 9, &v[..len]);
                }
                3 => bus.config_port_read(0xcf8 + (r >> 48) as u16 % 9, &mut buf[..len]),
                4 => {
                    let addr = (next() & 0x3_ffff) | 0x8000_0000;
                    bus.mmio_write(addr, &v[..len]);
                    bus.pio_write(addr as u16, &v[..len]);
                }
                _ => {
                    let addr = next();
                    bus.mmio_read(addr, &mut buf[..len]);
                    bus.pio_read(addr as u16, &mut buf[..len]);
                }
            }
            // VFs on the bus are exactly those the PF's registers say.
            let mut b = [0u8; 2];
            bus.config_read(pf_bdf, off + SRIOV_CONTROL, &mut b);
            let enabled = u16::from_le_bytes(b) & 1 != 0;
            bus.config_read(pf_bdf, off + SRIOV_NUM_VFS, &mut b);
            let num = if enabled { u16::from_le_bytes(b) } else { 0 };
            let vfs = bus
                .function_ids()
                .into_iter()
                .filter(|b| b.bus() == 0 && b.device() == 3 && b.function() > 0)
                .count();
            assert_eq!(vfs, usize::from(num));
            assert!(num <= 3);
            saw_vfs += usize::from(num > 0);
        }
        assert!(saw_vfs > 1000, "VFs appeared in {saw_vfs} steps");
    }
}
