//! A 4 KiB PCI Express configuration space with a type 0 header.
//!
//! Every byte has a write mask (bits the guest may change) and a
//! write-1-to-clear mask (bits a guest write of 1 clears). Base address
//! registers are sized the usual way: their low address bits are read-only
//! zero, so writing all-ones and reading back yields the size mask.
//! Capabilities are appended to the standard chain (pointer at 0x34) and to
//! the extended chain (first one at exactly 0x100).
//!
//! Guest accesses ([`PciConfiguration::read`], [`PciConfiguration::write`])
//! never panic: accesses outside the 4 KiB space or with a length other than
//! 1, 2 or 4 read as all-ones and are dropped on write. Owner accesses
//! (`read_u*`, `set_u*`) bypass the masks and are how a device model updates
//! read-only state.

use thiserror::Error;

use crate::device::{BarKind, BarRange};

/// Size of the whole configuration space.
pub const PCI_CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the part reachable through port 0xCF8/0xCFC.
pub const PCI_LEGACY_CONFIG_SIZE: usize = 256;
/// Number of BAR registers in a type 0 header.
pub const NUM_BARS: usize = 6;

pub const VENDOR_ID: u16 = 0x00;
pub const DEVICE_ID: u16 = 0x02;
pub const COMMAND: u16 = 0x04;
pub const STATUS: u16 = 0x06;
pub const REVISION_ID: u16 = 0x08;
pub const PROG_IF: u16 = 0x09;
pub const SUBCLASS: u16 = 0x0a;
pub const CLASS_CODE: u16 = 0x0b;
pub const CACHE_LINE_SIZE: u16 = 0x0c;
pub const LATENCY_TIMER: u16 = 0x0d;
pub const HEADER_TYPE: u16 = 0x0e;
pub const BAR0: u16 = 0x10;
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
pub const SUBSYSTEM_ID: u16 = 0x2e;
pub const EXPANSION_ROM: u16 = 0x30;
pub const CAPABILITIES_POINTER: u16 = 0x34;
pub const INTERRUPT_LINE: u16 = 0x3c;
pub const INTERRUPT_PIN: u16 = 0x3d;

/// Where the first standard capability goes.
pub const FIRST_CAPABILITY_OFFSET: u16 = 0x40;
/// Where the extended capability chain starts.
pub const EXTENDED_CAPABILITY_OFFSET: u16 = 0x100;

/// Command register: I/O Space Enable.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register: Memory Space Enable.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register: Bus Master Enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: Parity Error Response.
pub const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
/// Command register: SERR# Enable.
pub const COMMAND_SERR: u16 = 1 << 8;
/// Command register: Interrupt Disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Bits of the command register the guest may change.
pub const COMMAND_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;

/// Status register: Interrupt Status (INTx asserted).
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Status register: Capabilities List.
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Status register bits that are write-1-to-clear: Master Data Parity
/// Error, Signaled Target Abort, Received Target Abort, Received Master
/// Abort, Signaled System Error, Detected Parity Error.
pub const STATUS_W1C: u16 = (1 << 8) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15);

/// Memory BAR bit 3: prefetchable.
const BAR_MEM_PREFETCHABLE: u32 = 1 << 3;
/// Memory BAR bits 2:1 = 10b: 64-bit.
const BAR_MEM_64: u32 = 0b10 << 1;
/// I/O BAR bit 0.
const BAR_IO: u32 = 1;
const BAR_MEM_ADDR_MASK: u32 = !0xf;
const BAR_IO_ADDR_MASK: u32 = !0x3;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR index {0} is out of range")]
    BarIndexOutOfRange(usize),
    #[error("BAR {0} is already in use")]
    BarInUse(usize),
    #[error("BAR size {size:#x} is invalid for a {kind:?} BAR")]
    BarSize { kind: BarKind, size: u64 },
    #[error("BAR {0} is not in use")]
    BarNotInUse(usize),
    #[error("address {address:#x} is not aligned to BAR {index}'s size or does not fit it")]
    BarAddress { index: usize, address: u64 },
    #[error("no room for a capability of {0} bytes")]
    CapabilitySpaceFull(usize),
    #[error("capability write mask is longer than its body")]
    MaskTooLong,
    #[error("extended capability version {0} does not fit 4 bits")]
    CapabilityVersion(u8),
    #[error("register access at {offset:#x} of {len} bytes is out of range")]
    OutOfRange { offset: usize, len: usize },
    #[error("configuration state has {0} bytes, expected 4096")]
    StateSize(usize),
}

/// The identity fields of a type 0 header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PciHeaderParams {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    pub class_code: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// 0 = no INTx pin, 1..=4 = INTA#..INTD#.
    pub interrupt_pin: u8,
    /// Sets bit 7 of the header type register.
    pub multifunction: bool,
}

/// How a BAR was registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    pub kind: BarKind,
    pub size: u64,
    pub prefetchable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    Unused,
    Bar(BarSpec),
    /// Upper half of the 64-bit BAR in the previous slot.
    Upper,
}

/// Snapshot of a configuration space: its bytes. Masks and layout come from
/// how the device built the space, so they are not part of the state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciConfigurationState {
    pub bytes: Vec<u8>,
}

/// Checks that a BAR of `kind` may have `size`: a power of two, at least 16
/// bytes for memory (4 for I/O), at most 4 GiB for 32-bit memory and 256
/// bytes for I/O.
pub fn validate_bar_size(kind: BarKind, size: u64) -> Result<(), ConfigError> {
    let (min, max) = match kind {
        BarKind::Memory32 => (16, 1 << 31),
        BarKind::Memory64 => (16, 1 << 63),
        BarKind::Io => (4, 256),
    };
    if !size.is_power_of_two() || size < min || size > max {
        return Err(ConfigError::BarSize { kind, size });
    }
    Ok(())
}

/// The low register value and write mask of a BAR of `spec`, and for a
/// 64-bit BAR the upper register's write mask.
fn bar_type_bits_and_masks(spec: &BarSpec) -> (u32, u32, u32) {
    let addr_mask = !(spec.size - 1);
    match spec.kind {
        BarKind::Memory32 => {
            let pf = if spec.prefetchable {
                BAR_MEM_PREFETCHABLE
            } else {
                0
            };
            (pf, (addr_mask as u32) & BAR_MEM_ADDR_MASK, 0)
        }
        BarKind::Memory64 => {
            let pf = if spec.prefetchable {
                BAR_MEM_PREFETCHABLE
            } else {
                0
            };
            (
                pf | BAR_MEM_64,
                (addr_mask as u32) & BAR_MEM_ADDR_MASK,
                (addr_mask >> 32) as u32,
            )
        }
        BarKind::Io => (BAR_IO, (addr_mask as u32) & BAR_IO_ADDR_MASK, 0),
    }
}

/// A type 0 configuration space of 4 KiB.
#[derive(Clone)]
pub struct PciConfiguration {
    data: Box<[u8; PCI_CONFIG_SPACE_SIZE]>,
    write_mask: Box<[u8; PCI_CONFIG_SPACE_SIZE]>,
    w1c_mask: Box<[u8; PCI_CONFIG_SPACE_SIZE]>,
    /// Values of the writable and W1C bits after a reset.
    defaults: Box<[u8; PCI_CONFIG_SPACE_SIZE]>,
    bars: [BarSlot; NUM_BARS],
    last_capability: Option<u16>,
    next_capability: u16,
    last_extended_capability: Option<u16>,
    next_extended_capability: u16,
}

impl std::fmt::Debug for PciConfiguration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfiguration")
            .field("vendor_id", &self.read_u16(VENDOR_ID))
            .field("device_id", &self.read_u16(DEVICE_ID))
            .field("command", &self.command())
            .field("bars", &self.bars)
            .finish()
    }
}

impl PciConfiguration {
    /// A configuration space with the header of `params`, no BARs and no
    /// capabilities. Writable header bits: command, status (W1C), cache line
    /// size and interrupt line.
    pub fn new(params: &PciHeaderParams) -> Self {
        let mut c = PciConfiguration {
            data: Box::new([0; PCI_CONFIG_SPACE_SIZE]),
            write_mask: Box::new([0; PCI_CONFIG_SPACE_SIZE]),
            w1c_mask: Box::new([0; PCI_CONFIG_SPACE_SIZE]),
            defaults: Box::new([0; PCI_CONFIG_SPACE_SIZE]),
            bars: [BarSlot::Unused; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY_OFFSET,
            last_extended_capability: None,
            next_extended_capability: EXTENDED_CAPABILITY_OFFSET,
        };
        c.put_u16(VENDOR_ID, params.vendor_id);
        c.put_u16(DEVICE_ID, params.device_id);
        c.put_u8(REVISION_ID, params.revision_id);
        c.put_u8(PROG_IF, params.prog_if);
        c.put_u8(SUBCLASS, params.subclass);
        c.put_u8(CLASS_CODE, params.class_code);
        c.put_u8(HEADER_TYPE, if params.multifunction { 0x80 } else { 0x00 });
        c.put_u16(SUBSYSTEM_VENDOR_ID, params.subsystem_vendor_id);
        c.put_u16(SUBSYSTEM_ID, params.subsystem_id);
        c.put_u8(INTERRUPT_PIN, params.interrupt_pin);

        c.put_mask(COMMAND, &COMMAND_WRITABLE.to_le_bytes(), MaskKind::Write);
        c.put_mask(STATUS, &STATUS_W1C.to_le_bytes(), MaskKind::W1c);
        c.put_mask(CACHE_LINE_SIZE, &[0xff], MaskKind::Write);
        c.put_mask(INTERRUPT_LINE, &[0xff], MaskKind::Write);
        c.save_defaults();
        c
    }

    // ---- guest accesses -------------------------------------------------

    /// Guest read of 1, 2 or 4 bytes at `offset`. Anything else reads as
    /// all-ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        match Self::range(offset, data.len()) {
            Some(r) => data.copy_from_slice(&self.data[r]),
            None => data.fill(0xff),
        }
    }

    /// Guest write of 1, 2 or 4 bytes at `offset`, through the write and
    /// write-1-to-clear masks. Anything else is dropped.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(r) = Self::range(offset, data.len()) else {
            log::debug!(
                "dropped config write at {offset:#x} of {} bytes",
                data.len()
            );
            return;
        };
        for (i, &v) in r.zip(data.iter()) {
            let wm = self.write_mask[i];
            let w1c = self.w1c_mask[i];
            let old = self.data[i];
            self.data[i] = ((old & !wm) | (v & wm)) & !(v & w1c);
        }
    }

    fn range(offset: u16, len: usize) -> Option<std::ops::Range<usize>> {
        if !matches!(len, 1 | 2 | 4) {
            return None;
        }
        let start = offset as usize;
        let end = start.checked_add(len)?;
        (end <= PCI_CONFIG_SPACE_SIZE).then_some(start..end)
    }

    // ---- owner accesses (no masks) -------------------------------------

    /// Reads a byte; all-ones outside the space.
    pub fn read_u8(&self, offset: u16) -> u8 {
        let mut b = [0u8; 1];
        self.read(offset, &mut b);
        b[0]
    }

    /// Reads a little-endian u16; all-ones outside the space.
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Reads a little-endian u32; all-ones outside the space.
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Sets a byte regardless of masks. Out-of-range offsets are ignored.
    pub fn set_u8(&mut self, offset: u16, value: u8) {
        self.set_bytes(offset, &[value]);
    }

    /// Sets a u16 regardless of masks.
    pub fn set_u16(&mut self, offset: u16, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Sets a u32 regardless of masks.
    pub fn set_u32(&mut self, offset: u16, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Sets any number of bytes regardless of masks; dropped if any byte
    /// falls outside the space.
    pub fn set_bytes(&mut self, offset: u16, bytes: &[u8]) {
        let start = offset as usize;
        if let Some(dst) = self.data.get_mut(start..start + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }

    /// Sets the guest write mask of `mask.len()` bytes at `offset`. Like
    /// the other building methods (`add_bar`, `add_capability`, ...), it
    /// records the current bytes as reset defaults, so call it while
    /// building the space, not at run time.
    pub fn set_write_mask(&mut self, offset: u16, mask: &[u8]) -> Result<(), ConfigError> {
        self.check_span(offset, mask.len())?;
        self.put_mask(offset, mask, MaskKind::Write);
        self.save_defaults();
        Ok(())
    }

    /// Sets the write-1-to-clear mask of `mask.len()` bytes at `offset`.
    pub fn set_w1c_mask(&mut self, offset: u16, mask: &[u8]) -> Result<(), ConfigError> {
        self.check_span(offset, mask.len())?;
        self.put_mask(offset, mask, MaskKind::W1c);
        self.save_defaults();
        Ok(())
    }

    /// The guest write mask of the byte at `offset` (0 outside the space).
    pub fn write_mask(&self, offset: u16) -> u8 {
        self.write_mask.get(offset as usize).copied().unwrap_or(0)
    }

    /// The write-1-to-clear mask of the byte at `offset`.
    pub fn w1c_mask(&self, offset: u16) -> u8 {
        self.w1c_mask.get(offset as usize).copied().unwrap_or(0)
    }

    fn check_span(&self, offset: u16, len: usize) -> Result<(), ConfigError> {
        let start = offset as usize;
        if start + len > PCI_CONFIG_SPACE_SIZE {
            return Err(ConfigError::OutOfRange { offset: start, len });
        }
        Ok(())
    }

    fn put_u8(&mut self, offset: u16, v: u8) {
        self.set_bytes(offset, &[v]);
    }

    fn put_u16(&mut self, offset: u16, v: u16) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    fn put_mask(&mut self, offset: u16, mask: &[u8], kind: MaskKind) {
        let start = offset as usize;
        let target = match kind {
            MaskKind::Write => &mut self.write_mask,
            MaskKind::W1c => &mut self.w1c_mask,
        };
        if let Some(dst) = target.get_mut(start..start + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// Records the current values of every byte as the reset values of its
    /// writable bits.
    fn save_defaults(&mut self) {
        self.defaults.copy_from_slice(&self.data[..]);
    }

    /// Function reset: every guest-writable and write-1-to-clear bit goes
    /// back to the value it had when the space was built; read-only bits
    /// (which the owner maintains) are kept.
    pub fn reset(&mut self) {
        for i in 0..PCI_CONFIG_SPACE_SIZE {
            let m = self.write_mask[i] | self.w1c_mask[i];
            self.data[i] = (self.data[i] & !m) | (self.defaults[i] & m);
        }
    }

    // ---- header registers ---------------------------------------------

    pub fn vendor_id(&self) -> u16 {
        self.read_u16(VENDOR_ID)
    }

    pub fn device_id(&self) -> u16 {
        self.read_u16(DEVICE_ID)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// The status register.
    pub fn status(&self) -> u16 {
        self.read_u16(STATUS)
    }

    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY_SPACE != 0
    }

    pub fn io_enabled(&self) -> bool {
        self.command() & COMMAND_IO_SPACE != 0
    }

    pub fn bus_master_enabled(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Sets or clears the INTx Interrupt Status bit of the status register.
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        let s = self.status();
        let s = if asserted {
            s | STATUS_INTERRUPT
        } else {
            s & !STATUS_INTERRUPT
        };
        self.set_u16(STATUS, s);
    }

    // ---- BARs ------------------------------------------------------------

    /// Registers BAR `index` of `kind` and `size` bytes. A 64-bit BAR also
    /// takes register `index + 1`. Its address starts at 0 (not decoded).
    pub fn add_bar(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
        prefetchable: bool,
    ) -> Result<(), ConfigError> {
        if index >= NUM_BARS || (kind == BarKind::Memory64 && index + 1 >= NUM_BARS) {
            return Err(ConfigError::BarIndexOutOfRange(index));
        }
        if self.bars[index] != BarSlot::Unused
            || (kind == BarKind::Memory64 && self.bars[index + 1] != BarSlot::Unused)
        {
            return Err(ConfigError::BarInUse(index));
        }
        validate_bar_size(kind, size)?;
        let spec = BarSpec {
            kind,
            size,
            prefetchable: prefetchable && kind != BarKind::Io,
        };
        let (type_bits, lo_mask, hi_mask) = bar_type_bits_and_masks(&spec);
        let reg = BAR0 + 4 * index as u16;
        self.set_u32(reg, type_bits);
        self.put_mask(reg, &lo_mask.to_le_bytes(), MaskKind::Write);
        self.bars[index] = BarSlot::Bar(spec);
        if kind == BarKind::Memory64 {
            self.set_u32(reg + 4, 0);
            self.put_mask(reg + 4, &hi_mask.to_le_bytes(), MaskKind::Write);
            self.bars[index + 1] = BarSlot::Upper;
        }
        self.save_defaults();
        Ok(())
    }

    /// How BAR `index` was registered; `None` for an unused register or the
    /// upper half of a 64-bit BAR.
    pub fn bar_spec(&self, index: usize) -> Option<BarSpec> {
        match self.bars.get(index) {
            Some(BarSlot::Bar(spec)) => Some(*spec),
            _ => None,
        }
    }

    /// The address programmed in BAR `index` (0 if never programmed), or
    /// `None` if the BAR is not registered.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bar_spec(index)?;
        let reg = BAR0 + 4 * index as u16;
        let lo = self.read_u32(reg);
        Some(match spec.kind {
            BarKind::Memory32 => u64::from(lo & BAR_MEM_ADDR_MASK),
            BarKind::Memory64 => {
                let hi = self.read_u32(reg + 4);
                u64::from(lo & BAR_MEM_ADDR_MASK) | (u64::from(hi) << 32)
            }
            BarKind::Io => u64::from(lo & BAR_IO_ADDR_MASK),
        })
    }

    /// Programs BAR `index` to `address` (the VMM's initial placement, or a
    /// restore). The address must be aligned to the BAR's size and fit its
    /// width.
    pub fn set_bar_address(&mut self, index: usize, address: u64) -> Result<(), ConfigError> {
        let spec = self
            .bar_spec(index)
            .ok_or(ConfigError::BarNotInUse(index))?;
        let bad = ConfigError::BarAddress { index, address };
        if address & (spec.size - 1) != 0 {
            return Err(bad);
        }
        if spec.kind != BarKind::Memory64 && address > u64::from(u32::MAX) {
            return Err(bad);
        }
        let (type_bits, _, _) = bar_type_bits_and_masks(&spec);
        let reg = BAR0 + 4 * index as u16;
        self.set_u32(reg, (address as u32) | type_bits);
        if spec.kind == BarKind::Memory64 {
            self.set_u32(reg + 4, (address >> 32) as u32);
        }
        Ok(())
    }

    /// BAR `index`'s range if it holds a usable address (not 0, not the
    /// all-ones sizing pattern, not wrapping), regardless of the command
    /// register.
    pub fn bar_range(&self, index: usize) -> Option<BarRange> {
        let spec = self.bar_spec(index)?;
        let base = self.bar_address(index)?;
        if !bar_address_usable(spec.kind, spec.size, base) {
            return None;
        }
        Some(BarRange {
            index: index as u8,
            kind: spec.kind,
            base,
            size: spec.size,
        })
    }

    /// The BARs currently decoded: memory BARs while Memory Space Enable is
    /// set, I/O BARs while I/O Space Enable is set, each only at a usable
    /// address.
    pub fn decoded_bars(&self) -> Vec<BarRange> {
        let mem = self.memory_enabled();
        let io = self.io_enabled();
        (0..NUM_BARS)
            .filter_map(|i| self.bar_range(i))
            .filter(|b| match b.kind {
                BarKind::Io => io,
                BarKind::Memory32 | BarKind::Memory64 => mem,
            })
            .collect()
    }

    // ---- capabilities --------------------------------------------------

    /// Appends a standard capability with ID `id` whose bytes after the
    /// 2-byte header are `body`. `write_mask` gives the guest-writable bits
    /// of the body (it may be shorter than the body; missing bytes are
    /// read-only). Returns the capability's offset (DWORD-aligned, at or
    /// after 0x40).
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        write_mask: &[u8],
    ) -> Result<u16, ConfigError> {
        if write_mask.len() > body.len() {
            return Err(ConfigError::MaskTooLong);
        }
        let len = 2 + body.len();
        let offset = align4(self.next_capability);
        if offset as usize + len > PCI_LEGACY_CONFIG_SIZE {
            return Err(ConfigError::CapabilitySpaceFull(len));
        }
        self.set_u8(offset, id);
        self.set_u8(offset + 1, 0);
        self.set_bytes(offset + 2, body);
        self.put_mask(offset + 2, write_mask, MaskKind::Write);
        match self.last_capability {
            Some(last) => self.set_u8(last + 1, offset as u8),
            None => {
                self.set_u8(CAPABILITIES_POINTER, offset as u8);
                let s = self.status() | STATUS_CAPABILITIES_LIST;
                self.set_u16(STATUS, s);
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = offset + len as u16;
        self.save_defaults();
        Ok(offset)
    }

    /// Appends an extended capability with ID `id` and `version`; `body` is
    /// the bytes after the 4-byte header (its length is rounded up to a
    /// DWORD). The first extended capability goes at exactly 0x100.
    pub fn add_extended_capability(
        &mut self,
        id: u16,
        version: u8,
        body: &[u8],
        write_mask: &[u8],
    ) -> Result<u16, ConfigError> {
        if write_mask.len() > body.len() {
            return Err(ConfigError::MaskTooLong);
        }
        if version > 0xf {
            return Err(ConfigError::CapabilityVersion(version));
        }
        if body.len() > PCI_CONFIG_SPACE_SIZE {
            return Err(ConfigError::CapabilitySpaceFull(body.len()));
        }
        let len = align4((4 + body.len()) as u16) as usize;
        let offset = self.next_extended_capability;
        if offset as usize + len > PCI_CONFIG_SPACE_SIZE {
            return Err(ConfigError::CapabilitySpaceFull(len));
        }
        self.set_u32(offset, u32::from(id) | (u32::from(version) << 16));
        self.set_bytes(offset + 4, body);
        self.put_mask(offset + 4, write_mask, MaskKind::Write);
        if let Some(last) = self.last_extended_capability {
            let h = self.read_u32(last);
            self.set_u32(last, (h & 0x000f_ffff) | (u32::from(offset) << 20));
        }
        self.last_extended_capability = Some(offset);
        self.next_extended_capability = offset + len as u16;
        self.save_defaults();
        Ok(offset)
    }

    /// Walks the standard capability chain: `(id, offset)` in chain order.
    pub fn capabilities(&self) -> Vec<(u8, u16)> {
        let mut out = Vec::new();
        if self.status() & STATUS_CAPABILITIES_LIST == 0 {
            return out;
        }
        let mut off = u16::from(self.read_u8(CAPABILITIES_POINTER) & !3);
        // A chain longer than the space could hold is a loop.
        while off >= FIRST_CAPABILITY_OFFSET && out.len() < 64 {
            out.push((self.read_u8(off), off));
            off = u16::from(self.read_u8(off + 1) & !3);
        }
        out
    }

    /// Walks the extended capability chain: `(id, version, offset)`.
    pub fn extended_capabilities(&self) -> Vec<(u16, u8, u16)> {
        let mut out = Vec::new();
        let mut off = EXTENDED_CAPABILITY_OFFSET;
        while off >= EXTENDED_CAPABILITY_OFFSET && out.len() < 960 {
            let h = self.read_u32(off);
            if h == 0 {
                break;
            }
            out.push(((h & 0xffff) as u16, ((h >> 16) & 0xf) as u8, off));
            off = ((h >> 20) & 0xffc) as u16;
        }
        out
    }

    /// Offset of the first standard capability with ID `id`.
    pub fn find_capability(&self, id: u8) -> Option<u16> {
        self.capabilities()
            .into_iter()
            .find(|&(i, _)| i == id)
            .map(|(_, o)| o)
    }

    /// Offset of the first extended capability with ID `id`.
    pub fn find_extended_capability(&self, id: u16) -> Option<u16> {
        self.extended_capabilities()
            .into_iter()
            .find(|&(i, _, _)| i == id)
            .map(|(_, _, o)| o)
    }

    // ---- state ---------------------------------------------------------

    pub fn state(&self) -> PciConfigurationState {
        PciConfigurationState {
            bytes: self.data.to_vec(),
        }
    }

    /// Restores the bytes of a space built the same way as the one the
    /// state was taken from.
    pub fn set_state(&mut self, state: &PciConfigurationState) -> Result<(), ConfigError> {
        if state.bytes.len() != PCI_CONFIG_SPACE_SIZE {
            return Err(ConfigError::StateSize(state.bytes.len()));
        }
        self.data.copy_from_slice(&state.bytes);
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum MaskKind {
    Write,
    W1c,
}

fn align4(v: u16) -> u16 {
    (v + 3) & !3
}

/// Whether a BAR of `kind`/`size` programmed at `base` should decode: not
/// 0, not every address bit set (the sizing pattern), and not wrapping.
pub fn bar_address_usable(kind: BarKind, size: u64, base: u64) -> bool {
    let all_ones = match kind {
        BarKind::Memory32 => u64::from(BAR_MEM_ADDR_MASK) & !(size - 1),
        BarKind::Memory64 => !(size - 1) & !0xf,
        BarKind::Io => u64::from(BAR_IO_ADDR_MASK) & !(size - 1),
    };
    let limit = match kind {
        BarKind::Memory64 => u64::MAX,
        _ => u64::from(u32::MAX),
    };
    base != 0 && base != all_ones && base.checked_add(size - 1).is_some_and(|e| e <= limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> PciHeaderParams {
        PciHeaderParams {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class_code: 0x01,
            subclass: 0x00,
            prog_if: 0x00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x0002,
            interrupt_pin: 1,
            multifunction: true,
        }
    }

    fn wr32(c: &mut PciConfiguration, off: u16, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    fn rd32(c: &PciConfiguration, off: u16) -> u32 {
        let mut b = [0; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn header_fields() {
        let c = PciConfiguration::new(&params());
        assert_eq!(rd32(&c, 0), 0x1042_1af4);
        assert_eq!(rd32(&c, 8), 0x0100_0001);
        assert_eq!(c.read_u8(HEADER_TYPE), 0x80);
        assert_eq!(rd32(&c, 0x2c), 0x0002_1af4);
        assert_eq!(c.read_u8(INTERRUPT_PIN), 1);
        // No capabilities yet.
        assert_eq!(c.status() & STATUS_CAPABILITIES_LIST, 0);
        assert!(c.capabilities().is_empty());
        assert!(c.extended_capabilities().is_empty());
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut c = PciConfiguration::new(&params());
        wr32(&mut c, 0, 0xdead_beef);
        wr32(&mut c, 8, 0xffff_ffff);
        assert_eq!(rd32(&c, 0), 0x1042_1af4);
        assert_eq!(rd32(&c, 8), 0x0100_0001);
        // Interrupt line writable, pin not.
        c.write(INTERRUPT_LINE, &[0x0b, 0x07]);
        assert_eq!(c.read_u8(INTERRUPT_LINE), 0x0b);
        assert_eq!(c.read_u8(INTERRUPT_PIN), 1);
    }

    #[test]
    fn command_register_mask() {
        let mut c = PciConfiguration::new(&params());
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), COMMAND_WRITABLE);
        assert!(c.memory_enabled() && c.io_enabled() && c.bus_master_enabled());
        c.write(COMMAND, &[0]);
        assert_eq!(c.command(), COMMAND_WRITABLE & 0xff00);
    }

    #[test]
    fn status_write_one_to_clear() {
        let mut c = PciConfiguration::new(&params());
        c.add_capability(0x09, &[0; 2], &[]).unwrap();
        c.set_u16(STATUS, c.status() | (1 << 13) | (1 << 14));
        c.set_interrupt_status(true);
        // Writing 1 to bit 13 clears it, leaves 14, the capability list and
        // interrupt status.
        c.write(
            STATUS,
            &(1u16 << 13 | STATUS_CAPABILITIES_LIST).to_le_bytes(),
        );
        let s = c.status();
        assert_eq!(s & (1 << 13), 0);
        assert_ne!(s & (1 << 14), 0);
        assert_ne!(s & STATUS_CAPABILITIES_LIST, 0);
        assert_ne!(s & STATUS_INTERRUPT, 0);
        // A 32-bit write to command+status: zero in status changes nothing.
        wr32(&mut c, COMMAND, u32::from(COMMAND_MEMORY_SPACE));
        assert_ne!(c.status() & (1 << 14), 0);
        assert!(c.memory_enabled());
    }

    #[test]
    fn bar_sizing_memory32() {
        let mut c = PciConfiguration::new(&params());
        c.add_bar(0, BarKind::Memory32, 0x1000, false).unwrap();
        wr32(&mut c, BAR0, 0xffff_ffff);
        assert_eq!(rd32(&c, BAR0), 0xffff_f000);
        wr32(&mut c, BAR0, 0xfebf_1234);
        assert_eq!(rd32(&c, BAR0), 0xfebf_1000);
        assert_eq!(c.bar_address(0), Some(0xfebf_1000));
        // Unregistered BAR reads 0 and stays 0.
        wr32(&mut c, BAR0 + 4, 0xffff_ffff);
        assert_eq!(rd32(&c, BAR0 + 4), 0);
    }

    #[test]
    fn bar_sizing_memory64_prefetchable() {
        let mut c = PciConfiguration::new(&params());
        c.add_bar(2, BarKind::Memory64, 0x2_0000_0000, true)
            .unwrap();
        let lo = BAR0 + 8;
        assert_eq!(rd32(&c, lo), 0b1100);
        wr32(&mut c, lo, 0xffff_ffff);
        wr32(&mut c, lo + 4, 0xffff_ffff);
        assert_eq!(rd32(&c, lo), 0x0000_000c);
        assert_eq!(rd32(&c, lo + 4), 0xffff_fffe);
        // All-ones does not decode.
        c.write(COMMAND, &[COMMAND_MEMORY_SPACE as u8]);
        assert!(c.decoded_bars().is_empty());
        wr32(&mut c, lo, 0);
        wr32(&mut c, lo + 4, 0x4);
        assert_eq!(c.bar_address(2), Some(0x4_0000_0000));
        assert_eq!(
            c.decoded_bars(),
            vec![BarRange {
                index: 2,
                kind: BarKind::Memory64,
                base: 0x4_0000_0000,
                size: 0x2_0000_0000
            }]
        );
        // Small 64-bit BAR.
        let mut c = PciConfiguration::new(&params());
        c.add_bar(0, BarKind::Memory64, 0x4000, false).unwrap();
        wr32(&mut c, BAR0, 0xffff_ffff);
        wr32(&mut c, BAR0 + 4, 0xffff_ffff);
        assert_eq!(rd32(&c, BAR0), 0xffff_c004);
        assert_eq!(rd32(&c, BAR0 + 4), 0xffff_ffff);
        assert_eq!(c.bar_range(0), None);
    }

    #[test]
    fn bar_sizing_io() {
        let mut c = PciConfiguration::new(&params());
        c.add_bar(4, BarKind::Io, 0x20, false).unwrap();
        let reg = BAR0 + 16;
        assert_eq!(rd32(&c, reg), 1);
        wr32(&mut c, reg, 0xffff_ffff);
        assert_eq!(rd32(&c, reg), 0xffff_ffe1);
        wr32(&mut c, reg, 0xc040);
        assert_eq!(rd32(&c, reg), 0xc041);
        // I/O decodes only with IOSE.
        c.write(COMMAND, &[COMMAND_MEMORY_SPACE as u8]);
        assert!(c.decoded_bars().is_empty());
        c.write(COMMAND, &[COMMAND_IO_SPACE as u8]);
        assert_eq!(
            c.decoded_bars(),
            vec![BarRange {
                index: 4,
                kind: BarKind::Io,
                base: 0xc040,
                size: 0x20
            }]
        );
    }

    #[test]
    fn bar_registration_errors() {
        let mut c = PciConfiguration::new(&params());
        assert_eq!(
            c.add_bar(5, BarKind::Memory64, 0x1000, false),
            Err(ConfigError::BarIndexOutOfRange(5))
        );
        assert_eq!(
            c.add_bar(6, BarKind::Memory32, 0x1000, false),
            Err(ConfigError::BarIndexOutOfRange(6))
        );
        assert!(c.add_bar(0, BarKind::Memory32, 0x1001, false).is_err());
        assert!(c.add_bar(0, BarKind::Io, 0x1000, false).is_err());
        c.add_bar(0, BarKind::Memory64, 0x1000, false).unwrap();
        assert_eq!(
            c.add_bar(1, BarKind::Memory32, 0x1000, false),
            Err(ConfigError::BarInUse(1))
        );
        assert_eq!(c.bar_spec(1), None);
        assert!(c.set_bar_address(0, 0x1800).is_err());
        c.set_bar_address(0, 0x1_0000_2000).unwrap();
        assert_eq!(c.bar_address(0), Some(0x1_0000_2000));
    }

    #[test]
    fn decode_requires_mse_and_address() {
        let mut c = PciConfiguration::new(&params());
        c.add_bar(0, BarKind::Memory32, 0x1000, false).unwrap();
        c.write(COMMAND, &[COMMAND_MEMORY_SPACE as u8]);
        // Address 0: not decoded.
        assert!(c.decoded_bars().is_empty());
        wr32(&mut c, BAR0, 0xe000_0000);
        assert_eq!(c.decoded_bars().len(), 1);
        c.write(COMMAND, &[0]);
        assert!(c.decoded_bars().is_empty());
    }

    #[test]
    fn standard_capability_chain() {
        let mut c = PciConfiguration::new(&params());
        let a = c.add_capability(0x09, &[1, 2, 3], &[0xff]).unwrap();
        let b = c.add_capability(0x11, &[0; 10], &[]).unwrap();
        let d = c.add_capability(0x10, &[0; 0x3a], &[]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48); // 0x40 + 5 rounded up
        assert_eq!(d, 0x54);
        assert_ne!(c.status() & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(c.read_u8(CAPABILITIES_POINTER), 0x40);
        assert_eq!(c.capabilities(), vec![(0x09, a), (0x11, b), (0x10, d)]);
        assert_eq!(c.find_capability(0x10), Some(d));
        assert_eq!(c.find_capability(0x05), None);
        // Body mask: first body byte writable, the rest not, header not.
        c.write(a, &[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(rd32(&c, a), 0x02cc_4809);
        assert_eq!(c.capabilities().len(), 3);
        // Space runs out before 0x100.
        assert!(matches!(
            c.add_capability(0x09, &[0; 0x80], &[]),
            Err(ConfigError::CapabilitySpaceFull(_))
        ));
        assert!(c.add_capability(0x09, &[0; 2], &[0; 3]).is_err());
    }

    #[test]
    fn extended_capability_chain() {
        let mut c = PciConfiguration::new(&params());
        let s = c.add_extended_capability(0x10, 1, &[0; 0x3c], &[]).unwrap();
        assert_eq!(s, 0x100);
        let a = c.add_extended_capability(0x0b, 1, &[0; 5], &[]).unwrap();
        assert_eq!(a, 0x140);
        let b = c.add_extended_capability(0x1, 2, &[0; 4], &[0xff]).unwrap();
        assert_eq!(b, 0x14c);
        assert_eq!(rd32(&c, 0x100), 0x1401_0010);
        assert_eq!(
            c.extended_capabilities(),
            vec![(0x10, 1, 0x100), (0x0b, 1, 0x140), (0x1, 2, 0x14c)]
        );
        assert_eq!(c.find_extended_capability(0x1), Some(0x14c));
        // Headers are read-only; masked body is writable.
        wr32(&mut c, 0x100, 0);
        wr32(&mut c, b + 4, 0xffff_ffff);
        assert_eq!(rd32(&c, b + 4), 0xff);
        assert_eq!(c.extended_capabilities().len(), 3);
        // Fill up to the end of the 4 KiB space.
        let room = PCI_CONFIG_SPACE_SIZE - 0x154 - 4;
        let last = c
            .add_extended_capability(0x2, 1, &vec![0; room], &[])
            .unwrap();
        assert_eq!(last, 0x154);
        assert!(c.add_extended_capability(0x3, 1, &[], &[]).is_err());
        assert_eq!(c.extended_capabilities().len(), 4);
        assert!(c.add_extended_capability(0x3, 0x10, &[], &[]).is_err());
    }

    #[test]
    fn out_of_range_and_bad_lengths() {
        let mut c = PciConfiguration::new(&params());
        let mut b = [0u8; 4];
        c.read(4094, &mut b);
        assert_eq!(b, [0xff; 4]);
        let mut b3 = [0u8; 3];
        c.read(0, &mut b3);
        assert_eq!(b3, [0xff; 3]);
        let mut b8 = [0u8; 8];
        c.read(0, &mut b8);
        assert_eq!(b8, [0xff; 8]);
        let mut e: [u8; 0] = [];
        c.read(0, &mut e);
        c.read(u16::MAX, &mut b);
        assert_eq!(b, [0xff; 4]);
        c.write(u16::MAX, &[1, 2, 3, 4]);
        c.write(4095, &[1, 2]);
        c.write(INTERRUPT_LINE, &[1, 2, 3]);
        assert_eq!(c.read_u8(INTERRUPT_LINE), 0);
        // Last byte and last dword are fine.
        let mut one = [0u8; 1];
        c.read(4095, &mut one);
        assert_eq!(one, [0]);
        c.read(4092, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn unaligned_multibyte_access() {
        let mut c = PciConfiguration::new(&params());
        let mut b = [0u8; 2];
        c.read(1, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x421a);
        let mut d = [0u8; 4];
        c.read(3, &mut d);
        assert_eq!(d, [0x10, 0, 0, 0]);
        // 4-byte write straddling cache line size (writable) and header
        // type (read-only).
        c.write(0x0b, &[0xff, 0x40, 0xff, 0xff]);
        assert_eq!(c.read_u8(CLASS_CODE), 0x01);
        assert_eq!(c.read_u8(CACHE_LINE_SIZE), 0x40);
        assert_eq!(c.read_u8(HEADER_TYPE), 0x80);
    }

    #[test]
    fn reset_and_state() {
        let mut c = PciConfiguration::new(&params());
        c.add_bar(0, BarKind::Memory32, 0x1000, false).unwrap();
        c.set_u16(STATUS, c.status() | (1 << 15));
        let st_before = c.state();
        wr32(&mut c, BAR0, 0xe000_0000);
        c.write(COMMAND, &[3]);
        c.write(INTERRUPT_LINE, &[9]);
        let st = c.state();
        c.reset();
        assert_eq!(c.command(), 0);
        assert_eq!(c.bar_address(0), Some(0));
        assert_eq!(c.read_u8(INTERRUPT_LINE), 0);
        assert_eq!(c.vendor_id(), 0x1af4);
        c.set_state(&st).unwrap();
        assert_eq!(c.bar_address(0), Some(0xe000_0000));
        assert_eq!(c.command(), 3);
        assert_ne!(st, st_before);
        assert!(c
            .set_state(&PciConfigurationState { bytes: vec![0; 10] })
            .is_err());
    }
}
