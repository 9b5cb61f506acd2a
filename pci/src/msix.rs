//! MSI-X: the vector table, the pending bit array and the capability.
//!
//! [`MsixConfig`] holds the table and PBA a device exposes in one of its
//! BARs and the two bits of the capability's Message Control the guest
//! writes (MSI-X Enable, Function Mask). It pushes every change of a
//! vector's message or effective mask to an [`InterruptSourceGroup`] and
//! delivers interrupts through it.
//!
//! A vector is *effectively masked* when MSI-X is disabled, the function is
//! masked, or its own mask bit is set. Triggering an effectively masked
//! vector sets its pending bit; the transition to unmasked delivers a
//! pending vector once and clears the bit.

use std::sync::Arc;

use thiserror::Error;

use crate::configuration::{ConfigError, PciConfiguration, NUM_BARS};
use crate::{InterruptSourceGroup, MsiMessage};

/// Capability ID of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Bytes of the MSI-X capability, header included.
pub const MSIX_CAPABILITY_SIZE: usize = 12;
/// Offset of Message Control inside the capability.
pub const MSIX_MESSAGE_CONTROL_OFFSET: u16 = 2;
/// Message Control: MSI-X Enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message Control: Function Mask.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Message Control: Table Size (N - 1).
pub const MSIX_TABLE_SIZE_MASK: u16 = 0x7ff;
/// Vector Control: Mask Bit.
pub const MSIX_VECTOR_MASKED: u32 = 1;
/// Bytes per table entry.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Most vectors a function can have.
pub const MAX_MSIX_VECTORS: u16 = 2048;

#[derive(Debug, Error)]
pub enum MsixError {
    #[error("{0} MSI-X vectors requested, must be 1..=2048")]
    VectorCount(u16),
    #[error("MSI-X vector {0} out of range")]
    VectorOutOfRange(u16),
    #[error("BAR indicator {0} is invalid")]
    Bir(u8),
    #[error("MSI-X structure offset {0:#x} is not 8-byte aligned")]
    Alignment(u32),
    #[error("MSI-X state does not match {0} vectors")]
    StateMismatch(u16),
    #[error("interrupt delivery failed: {0}")]
    Interrupt(#[source] std::io::Error),
    #[error("configuration space: {0}")]
    Config(#[from] ConfigError),
}

/// One MSI-X table entry as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixTableEntry {
    pub msg_addr_lo: u32,
    pub msg_addr_hi: u32,
    pub msg_data: u32,
    pub vector_control: u32,
}

impl Default for MsixTableEntry {
    /// The reset value: zero message, masked.
    fn default() -> Self {
        MsixTableEntry {
            msg_addr_lo: 0,
            msg_addr_hi: 0,
            msg_data: 0,
            vector_control: MSIX_VECTOR_MASKED,
        }
    }
}

impl MsixTableEntry {
    pub fn masked(&self) -> bool {
        self.vector_control & MSIX_VECTOR_MASKED != 0
    }

    pub fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.msg_addr_lo) | (u64::from(self.msg_addr_hi) << 32),
            data: self.msg_data,
        }
    }

    fn reg(&self, i: usize) -> u32 {
        match i {
            0 => self.msg_addr_lo,
            1 => self.msg_addr_hi,
            2 => self.msg_data,
            _ => self.vector_control,
        }
    }

    fn set_reg(&mut self, i: usize, v: u32) {
        match i {
            // Address bits 1:0 are DWORD alignment, hardwired to zero.
            0 => self.msg_addr_lo = v & !0x3,
            1 => self.msg_addr_hi = v,
            2 => self.msg_data = v,
            // Only the mask bit is implemented; the rest is reserved.
            _ => self.vector_control = v & MSIX_VECTOR_MASKED,
        }
    }
}

/// Snapshot of MSI-X state: plain data.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixConfigState {
    pub table: Vec<MsixTableEntry>,
    /// Pending bits, 64 vectors per word, vector 0 in bit 0 of word 0.
    pub pba: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// Where the table and PBA live, as written into the capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

/// MSI-X table, PBA and control bits of one function.
pub struct MsixConfig {
    table: Vec<MsixTableEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    interrupts: Arc<dyn InterruptSourceGroup>,
}

impl std::fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixConfig")
            .field("vectors", &self.table.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .field("pba", &self.pba)
            .finish()
    }
}

fn access_ok(offset: u64, len: usize) -> bool {
    (len == 4 && offset.is_multiple_of(4)) || (len == 8 && offset.is_multiple_of(8))
}

impl MsixConfig {
    /// `num_vectors` (1..=2048) vectors, all masked, MSI-X disabled.
    pub fn new(
        num_vectors: u16,
        interrupts: Arc<dyn InterruptSourceGroup>,
    ) -> Result<Self, MsixError> {
        if num_vectors == 0 || num_vectors > MAX_MSIX_VECTORS {
            return Err(MsixError::VectorCount(num_vectors));
        }
        Ok(MsixConfig {
            table: vec![MsixTableEntry::default(); num_vectors as usize],
            pba: vec![0; (num_vectors as usize).div_ceil(64)],
            enabled: false,
            function_masked: false,
            interrupts,
        })
    }

    pub fn num_vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Bytes of the table: 16 per vector.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Bytes of the PBA: whole QWORDs.
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    pub fn interrupt_group(&self) -> &Arc<dyn InterruptSourceGroup> {
        &self.interrupts
    }

    /// Replaces the interrupt group (e.g. after restore into a new VM) and
    /// pushes every vector's message and mask to it.
    pub fn set_interrupt_group(&mut self, interrupts: Arc<dyn InterruptSourceGroup>) {
        self.interrupts = interrupts;
        self.sync_all();
    }

    /// The table entry of `vector`.
    pub fn entry(&self, vector: u16) -> Option<MsixTableEntry> {
        self.table.get(vector as usize).copied()
    }

    /// The message of `vector`.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        self.entry(vector).map(|e| e.message())
    }

    /// Whether `vector` cannot be delivered now (disabled, function masked
    /// or vector masked). Out-of-range vectors are masked.
    pub fn effectively_masked(&self, vector: u16) -> bool {
        match self.table.get(vector as usize) {
            Some(e) => !self.enabled || self.function_masked || e.masked(),
            None => true,
        }
    }

    pub fn pending(&self, vector: u16) -> bool {
        let v = vector as usize;
        self.pba
            .get(v / 64)
            .is_some_and(|w| w & (1u64 << (v % 64)) != 0)
    }

    fn set_pending(&mut self, vector: u16, pending: bool) {
        let v = vector as usize;
        if let Some(w) = self.pba.get_mut(v / 64) {
            if pending {
                *w |= 1u64 << (v % 64);
            } else {
                *w &= !(1u64 << (v % 64));
            }
        }
    }

    /// Delivers `vector`, or sets its pending bit if it is effectively
    /// masked.
    pub fn trigger(&mut self, vector: u16) -> Result<(), MsixError> {
        if vector as usize >= self.table.len() {
            return Err(MsixError::VectorOutOfRange(vector));
        }
        if self.effectively_masked(vector) {
            self.set_pending(vector, true);
            return Ok(());
        }
        self.interrupts
            .trigger(vector)
            .map_err(MsixError::Interrupt)
    }

    fn notify_update(&self, vector: u16) {
        let Some(e) = self.table.get(vector as usize) else {
            return;
        };
        if let Err(err) =
            self.interrupts
                .update(vector, e.message(), self.effectively_masked(vector))
        {
            log::warn!("MSI-X vector {vector} route update failed: {err}");
        }
    }

    /// Delivers `vector` if it is pending and now deliverable.
    fn deliver_pending(&mut self, vector: u16) {
        if self.pending(vector) && !self.effectively_masked(vector) {
            self.set_pending(vector, false);
            if let Err(err) = self.interrupts.trigger(vector) {
                log::warn!("MSI-X vector {vector} delivery failed: {err}");
            }
        }
    }

    fn sync_all(&mut self) {
        for v in 0..self.num_vectors() {
            self.notify_update(v);
        }
    }

    // ---- message control -------------------------------------------------

    /// Message Control as the capability holds it: table size, function
    /// mask, enable.
    pub fn message_control(&self) -> u16 {
        let mut v = (self.num_vectors() - 1) & MSIX_TABLE_SIZE_MASK;
        if self.function_masked {
            v |= MSIX_FUNCTION_MASK;
        }
        if self.enabled {
            v |= MSIX_ENABLE;
        }
        v
    }

    /// Applies a new Message Control value (only Enable and Function Mask
    /// are taken from it). Vectors whose effective mask changes are
    /// updated; those that become deliverable with their pending bit set
    /// are delivered.
    pub fn set_message_control(&mut self, value: u16) {
        let enabled = value & MSIX_ENABLE != 0;
        let function_masked = value & MSIX_FUNCTION_MASK != 0;
        if enabled == self.enabled && function_masked == self.function_masked {
            return;
        }
        let before: Vec<bool> = (0..self.num_vectors())
            .map(|v| self.effectively_masked(v))
            .collect();
        self.enabled = enabled;
        self.function_masked = function_masked;
        for (v, was_masked) in (0..self.num_vectors()).zip(before) {
            if was_masked != self.effectively_masked(v) {
                self.notify_update(v);
                self.deliver_pending(v);
            }
        }
    }

    // ---- capability --------------------------------------------------------

    /// The capability body (the 10 bytes after ID and next pointer) for the
    /// table and PBA at `layout`.
    pub fn capability_body(&self, layout: &MsixLayout) -> Result<[u8; 10], MsixError> {
        for bir in [layout.table_bar, layout.pba_bar] {
            if bir as usize >= NUM_BARS {
                return Err(MsixError::Bir(bir));
            }
        }
        for off in [layout.table_offset, layout.pba_offset] {
            if off % 8 != 0 {
                return Err(MsixError::Alignment(off));
            }
        }
        let mut b = [0u8; 10];
        b[0..2].copy_from_slice(&self.message_control().to_le_bytes());
        b[2..6].copy_from_slice(&(layout.table_offset | u32::from(layout.table_bar)).to_le_bytes());
        b[6..10].copy_from_slice(&(layout.pba_offset | u32::from(layout.pba_bar)).to_le_bytes());
        Ok(b)
    }

    /// Guest write mask of the capability body: Enable and Function Mask.
    pub fn capability_write_mask() -> [u8; 2] {
        (MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes()
    }

    /// Appends the MSI-X capability to `config`; returns its offset.
    pub fn add_capability(
        &self,
        config: &mut PciConfiguration,
        layout: &MsixLayout,
    ) -> Result<u16, MsixError> {
        let body = self.capability_body(layout)?;
        Ok(config.add_capability(MSIX_CAPABILITY_ID, &body, &Self::capability_write_mask())?)
    }

    /// Call after `config.write(offset, data)` with the capability at
    /// `cap_offset`: if the write touched Message Control, applies its new
    /// value. Returns whether it did.
    pub fn config_write(
        &mut self,
        config: &PciConfiguration,
        cap_offset: u16,
        offset: u16,
        len: usize,
    ) -> bool {
        let mc = u32::from(cap_offset) + u32::from(MSIX_MESSAGE_CONTROL_OFFSET);
        let start = u32::from(offset);
        let end = start.saturating_add(u32::try_from(len).unwrap_or(u32::MAX));
        if start < mc + 2 && end > mc {
            self.set_message_control(config.read_u16(mc as u16));
            true
        } else {
            false
        }
    }

    // ---- table and PBA -----------------------------------------------------

    /// Guest read of the table at `offset` from its start: 4 or 8 bytes,
    /// naturally aligned; anything else reads all-ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let idx = (offset / MSIX_TABLE_ENTRY_SIZE) as usize;
        let (Some(e), true) = (self.table.get(idx), access_ok(offset, data.len())) else {
            data.fill(0xff);
            return;
        };
        let reg = ((offset % MSIX_TABLE_ENTRY_SIZE) / 4) as usize;
        if data.len() == 4 {
            data.copy_from_slice(&e.reg(reg).to_le_bytes());
        } else {
            let v = u64::from(e.reg(reg)) | (u64::from(e.reg(reg + 1)) << 32);
            data.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Guest write of the table at `offset`: 4 or 8 bytes, naturally
    /// aligned; anything else is dropped.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let idx = (offset / MSIX_TABLE_ENTRY_SIZE) as usize;
        if idx >= self.table.len() || !access_ok(offset, data.len()) {
            log::debug!(
                "dropped MSI-X table write at {offset:#x} len {}",
                data.len()
            );
            return;
        }
        let vector = idx as u16;
        let reg = ((offset % MSIX_TABLE_ENTRY_SIZE) / 4) as usize;
        let old = self.table[idx];
        let was_masked = self.effectively_masked(vector);
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let e = &mut self.table[idx];
        e.set_reg(reg, v as u32);
        if data.len() == 8 {
            e.set_reg(reg + 1, (v >> 32) as u32);
        }
        let new = *e;
        let now_masked = self.effectively_masked(vector);
        if old.message() != new.message() || was_masked != now_masked {
            self.notify_update(vector);
        }
        if was_masked && !now_masked {
            self.deliver_pending(vector);
        }
    }

    /// Guest read of the PBA: 4 or 8 bytes, naturally aligned.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let word = (offset / 8) as usize;
        let (Some(w), true) = (self.pba.get(word), access_ok(offset, data.len())) else {
            data.fill(0xff);
            return;
        };
        if data.len() == 8 {
            data.copy_from_slice(&w.to_le_bytes());
        } else {
            let shift = (offset % 8) * 8;
            data.copy_from_slice(&((w >> shift) as u32).to_le_bytes());
        }
    }

    /// Guest write of the PBA: read-only, dropped.
    pub fn write_pba(&mut self, offset: u64, data: &[u8]) {
        log::debug!("dropped MSI-X PBA write at {offset:#x} len {}", data.len());
    }

    // ---- reset and state ---------------------------------------------------

    /// Function reset: every vector masked with a zero message, no pending
    /// bits, MSI-X disabled and the function unmasked.
    pub fn reset(&mut self) {
        self.table.fill(MsixTableEntry::default());
        self.pba.fill(0);
        self.enabled = false;
        self.function_masked = false;
        self.sync_all();
    }

    pub fn state(&self) -> MsixConfigState {
        MsixConfigState {
            table: self.table.clone(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Restores `state` (of the same number of vectors) and pushes every
    /// vector's message and mask to the interrupt group. Pending bits stay
    /// pending until their vector is next unmasked.
    pub fn set_state(&mut self, state: &MsixConfigState) -> Result<(), MsixError> {
        let n = self.num_vectors();
        if state.table.len() != self.table.len() || state.pba.len() != self.pba.len() {
            return Err(MsixError::StateMismatch(n));
        }
        self.table.copy_from_slice(&state.table);
        self.pba.copy_from_slice(&state.pba);
        // Bits past the last vector are reserved zero.
        let tail = n as usize % 64;
        if tail != 0 {
            if let Some(last) = self.pba.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
        for e in self.table.iter_mut() {
            e.vector_control &= MSIX_VECTOR_MASKED;
        }
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        self.sync_all();
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::configuration::PciHeaderParams;
    use std::sync::Mutex;

    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Event {
        Trigger(u16),
        Update(u16, MsiMessage, bool),
    }

    /// Records every call.
    #[derive(Default)]
    pub struct Recorder {
        pub events: Mutex<Vec<Event>>,
    }

    impl Recorder {
        pub fn take(&self) -> Vec<Event> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }
    }

    impl InterruptSourceGroup for Recorder {
        fn trigger(&self, vector: u16) -> std::io::Result<()> {
            self.events.lock().unwrap().push(Event::Trigger(vector));
            Ok(())
        }
        fn update(&self, vector: u16, msg: MsiMessage, masked: bool) -> std::io::Result<()> {
            self.events
                .lock()
                .unwrap()
                .push(Event::Update(vector, msg, masked));
            Ok(())
        }
    }

    fn setup(n: u16) -> (MsixConfig, Arc<Recorder>) {
        let r = Arc::new(Recorder::default());
        (MsixConfig::new(n, r.clone()).unwrap(), r)
    }

    fn w32(m: &mut MsixConfig, off: u64, v: u32) {
        m.write_table(off, &v.to_le_bytes());
    }

    fn r32(m: &MsixConfig, off: u64) -> u32 {
        let mut b = [0; 4];
        m.read_table(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn program(m: &mut MsixConfig, v: u16, addr: u64, data: u32) {
        let base = u64::from(v) * 16;
        m.write_table(base, &addr.to_le_bytes());
        w32(m, base + 8, data);
    }

    const MSG: MsiMessage = MsiMessage {
        address: 0xfee0_1000,
        data: 0x41,
    };

    #[test]
    fn vector_count_limits() {
        let r: Arc<dyn InterruptSourceGroup> = Arc::new(Recorder::default());
        assert!(MsixConfig::new(0, r.clone()).is_err());
        assert!(MsixConfig::new(2049, r.clone()).is_err());
        let m = MsixConfig::new(2048, r.clone()).unwrap();
        assert_eq!(m.message_control(), 0x7ff);
        assert_eq!(m.pba_size(), 256);
        let m = MsixConfig::new(65, r).unwrap();
        assert_eq!(m.table_size(), 65 * 16);
        assert_eq!(m.pba_size(), 16);
    }

    #[test]
    fn table_reset_state_and_access() {
        let (mut m, r) = setup(3);
        // Every vector starts masked.
        assert_eq!(r32(&m, 12), 1);
        assert_eq!(r32(&m, 2 * 16 + 12), 1);
        program(&mut m, 1, 0x1_fee0_1003, 0x55);
        assert_eq!(r32(&m, 16), 0xfee0_1000);
        assert_eq!(r32(&m, 20), 1);
        assert_eq!(r32(&m, 24), 0x55);
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1000);
        m.read_table(24, &mut q);
        assert_eq!(u64::from_le_bytes(q), (1u64 << 32) | 0x55);
        // Message change while masked is still reported, as masked.
        let ev = r.take();
        assert_eq!(
            ev.last(),
            Some(&Event::Update(
                1,
                MsiMessage {
                    address: 0x1_fee0_1000,
                    data: 0x55
                },
                true
            ))
        );
        // Reserved vector-control bits read as zero.
        w32(&mut m, 12, 0xffff_fffe);
        assert_eq!(r32(&m, 12), 0);
        // Bad accesses: misaligned, wrong size, out of range.
        let mut b = [0u8; 4];
        m.read_table(2, &mut b);
        assert_eq!(b, [0xff; 4]);
        m.read_table(48, &mut b);
        assert_eq!(b, [0xff; 4]);
        let mut b2 = [0u8; 2];
        m.read_table(0, &mut b2);
        assert_eq!(b2, [0xff; 2]);
        m.read_table(4, &mut q);
        assert_eq!(q, [0xff; 8]);
        r.take();
        m.write_table(48, &[1, 2, 3, 4]);
        m.write_table(2, &[1, 2, 3, 4]);
        m.write_table(u64::MAX - 3, &[1, 2, 3, 4]);
        m.write_table(0, &[1, 2]);
        assert!(r.take().is_empty());
        assert_eq!(r32(&m, 0), 0);
    }

    #[test]
    fn vector_mask_pending_and_unmask_delivery() {
        let (mut m, r) = setup(4);
        m.set_message_control(MSIX_ENABLE);
        program(&mut m, 2, MSG.address, MSG.data);
        r.take();
        // Masked vector: pending, not delivered.
        m.trigger(2).unwrap();
        assert!(m.pending(2));
        assert!(r.take().is_empty());
        let mut q = [0u8; 8];
        m.read_pba(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0b100);
        // PBA is read-only.
        m.write_pba(0, &[0; 8]);
        assert!(m.pending(2));
        // Unmask: update then deliver, pending cleared.
        w32(&mut m, 2 * 16 + 12, 0);
        assert_eq!(
            r.take(),
            vec![Event::Update(2, MSG, false), Event::Trigger(2)]
        );
        assert!(!m.pending(2));
        // Now delivered directly.
        m.trigger(2).unwrap();
        assert_eq!(r.take(), vec![Event::Trigger(2)]);
        // Unmasking a vector with nothing pending delivers nothing.
        w32(&mut m, 2 * 16 + 12, 1);
        assert_eq!(r.take(), vec![Event::Update(2, MSG, true)]);
        w32(&mut m, 2 * 16 + 12, 0);
        assert_eq!(r.take(), vec![Event::Update(2, MSG, false)]);
        // Rewriting the same value reports nothing.
        w32(&mut m, 2 * 16 + 12, 0);
        assert!(r.take().is_empty());
        assert!(matches!(m.trigger(4), Err(MsixError::VectorOutOfRange(4))));
    }

    #[test]
    fn message_updates_while_unmasked() {
        let (mut m, r) = setup(2);
        m.set_message_control(MSIX_ENABLE);
        w32(&mut m, 16 + 12, 0);
        assert_eq!(
            r.take(),
            vec![Event::Update(1, MsiMessage::default(), false)]
        );
        // One 8-byte write of the address: one update.
        m.write_table(16, &0x2_fee0_0000u64.to_le_bytes());
        let msg = MsiMessage {
            address: 0x2_fee0_0000,
            data: 0,
        };
        assert_eq!(r.take(), vec![Event::Update(1, msg, false)]);
        // 8-byte write of data + control: new data and masked at once.
        m.write_table(24, &((1u64 << 32) | 7).to_le_bytes());
        assert_eq!(
            r.take(),
            vec![Event::Update(1, MsiMessage { data: 7, ..msg }, true)]
        );
        // Vector 0 was never touched.
        assert_eq!(m.entry(0), Some(MsixTableEntry::default()));
    }

    #[test]
    fn function_mask_and_enable() {
        let (mut m, r) = setup(70);
        program(&mut m, 0, MSG.address, MSG.data);
        program(&mut m, 65, MSG.address, 0x99);
        w32(&mut m, 12, 0);
        w32(&mut m, 65 * 16 + 12, 0);
        r.take();
        // Disabled: pending.
        m.trigger(0).unwrap();
        m.trigger(65).unwrap();
        assert!(r.take().is_empty());
        let mut d = [0u8; 4];
        m.read_pba(8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0b10);
        m.read_pba(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        m.read_pba(16, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Enable with function mask: still masked, nothing reported.
        m.set_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert!(r.take().is_empty());
        m.trigger(1).unwrap();
        assert!(m.pending(1));
        // Clear function mask: vectors 0 and 65 unmask and fire; vector 1
        // is still masked by its own bit and stays pending.
        m.set_message_control(MSIX_ENABLE);
        let ev = r.take();
        assert_eq!(
            ev,
            vec![
                Event::Update(0, MSG, false),
                Event::Trigger(0),
                Event::Update(
                    65,
                    MsiMessage {
                        address: MSG.address,
                        data: 0x99
                    },
                    false
                ),
                Event::Trigger(65),
            ]
        );
        assert!(!m.pending(0) && !m.pending(65) && m.pending(1));
        assert_eq!(m.message_control(), MSIX_ENABLE | 69);
        // Function mask again: masked updates, triggers go pending.
        m.set_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert_eq!(r.take().len(), 2);
        m.trigger(0).unwrap();
        assert!(m.pending(0));
        assert!(r.take().is_empty());
        // Disable entirely while masked: effective mask unchanged.
        m.set_message_control(0);
        assert!(r.take().is_empty());
    }

    #[test]
    fn capability_in_config_space() {
        let (mut m, r) = setup(8);
        let mut c = PciConfiguration::new(&PciHeaderParams::default());
        let layout = MsixLayout {
            table_bar: 0,
            table_offset: 0x2000,
            pba_bar: 0,
            pba_offset: 0x3000,
        };
        let off = m.add_capability(&mut c, &layout).unwrap();
        assert_eq!(c.find_capability(MSIX_CAPABILITY_ID), Some(off));
        assert_eq!(c.read_u16(off + 2), 7);
        assert_eq!(c.read_u32(off + 4), 0x2000);
        assert_eq!(c.read_u32(off + 8), 0x3000);
        // Guest sets enable + function mask with a 32-bit write of the
        // header dword; table size is read-only.
        let v: u32 = (0xffffu32 << 16) | 0xffff;
        c.write(off, &v.to_le_bytes());
        assert!(m.config_write(&c, off, off, 4));
        assert_eq!(c.read_u16(off + 2), 0xc007);
        assert!(m.enabled() && m.function_masked());
        assert_eq!(c.read_u8(off), MSIX_CAPABILITY_ID);
        // A write elsewhere does not touch MSI-X.
        assert!(!m.config_write(&c, off, off + 4, 4));
        // Byte write to the high byte of message control.
        c.write(off + 3, &[0x80]);
        assert!(m.config_write(&c, off, off + 3, 1));
        assert!(m.enabled() && !m.function_masked());
        r.take();
        assert!(m
            .capability_body(&MsixLayout {
                table_offset: 4,
                ..layout
            })
            .is_err());
        assert!(m
            .capability_body(&MsixLayout {
                pba_bar: 6,
                ..layout
            })
            .is_err());
    }

    #[test]
    fn reset_and_state_round_trip() {
        let (mut m, r) = setup(4);
        m.set_message_control(MSIX_ENABLE);
        program(&mut m, 3, MSG.address, MSG.data);
        w32(&mut m, 3 * 16 + 12, 0);
        m.set_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        m.trigger(3).unwrap();
        let st = m.state();
        assert_eq!(st.pba, vec![0b1000]);
        m.reset();
        assert!(!m.enabled() && !m.pending(3));
        assert_eq!(m.entry(3), Some(MsixTableEntry::default()));

        let (mut m2, r2) = setup(4);
        m2.set_state(&st).unwrap();
        assert_eq!(m2.state(), st);
        // Restore pushes every vector's route.
        assert_eq!(r2.take().len(), 4);
        m2.set_message_control(MSIX_ENABLE);
        assert_eq!(
            r2.take(),
            vec![Event::Update(3, MSG, false), Event::Trigger(3)]
        );
        let (mut m3, _) = setup(5);
        assert!(m3.set_state(&st).is_err());
        r.take();
    }

    /// Random guest and device operations: never panics, and a pending
    /// vector is always effectively masked (unmasking delivers it).
    #[test]
    fn random_operations_keep_pending_invariant() {
        let (mut m, r) = setup(67);
        let mut x: u64 = 0x0123_4567_89ab_cdef;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut delivered = 0;
        for _ in 0..20_000 {
            let len = [4usize, 8, 2, 1, 4][(next() % 5) as usize];
            let off = next() % (67 * 16 + 32);
            let v = if next() % 2 == 0 { next() % 2 } else { next() };
            let mut buf = [0u8; 8];
            match next() % 6 {
                0 | 1 => m.write_table(off, &v.to_le_bytes()[..len]),
                2 => m.read_table(off, &mut buf[..len]),
                3 => m.set_message_control(next() as u16),
                4 => {
                    m.read_pba(off % 24, &mut buf[..len]);
                    m.write_pba(off % 24, &buf[..len]);
                }
                _ => {
                    let _ = m.trigger((next() % 70) as u16);
                }
            }
            for v in 0..67 {
                assert!(!m.pending(v) || m.effectively_masked(v), "vector {v}");
            }
            delivered += r
                .take()
                .iter()
                .filter(|e| matches!(e, Event::Trigger(_)))
                .count();
        }
        assert!(delivered > 100, "only {delivered} deliveries");
    }
}
