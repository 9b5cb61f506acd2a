//! Per-member migration state (spec §4, §5) and the admin command executor
//! (spec §3).
//!
//! A [`Member`] pairs a member device, seen through the small
//! [`MemberDevice`] trait, with its [`MigrationState`]: mode, context read
//! and write streams, pending written context and write recorder.
//! [`AdminState::execute`] runs one parsed [`AdminCommand`] against a
//! [`MemberTable`] and produces status, qualifier, output and result.

use vm_migration::dirty::{RecordError, RecorderState, WriteRecorder};

use super::admin::{
    opcode, qualifier, status, AdminCommand, AdminCompletion, Execution, ALWAYS_USABLE,
    GROUP_TYPE_SRIOV, SUPPORTED_OPCODES,
};
use super::context::{
    encode_supported_fields, ContextDecoder, ContextError, ContextLimits, MemberContext,
};
use super::v14::V14State;

/// Migration mode of a member (spec §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Mode {
    /// Works normally.
    #[default]
    Active = 0,
    /// No notifications, no driver memory access; still takes driver
    /// notifications and configuration writes.
    Stop = 1,
    /// Ignores notifications and configuration writes; context frozen.
    Freeze = 2,
}

impl Mode {
    /// The mode with wire value `v`.
    pub fn from_u8(v: u8) -> Option<Mode> {
        match v {
            0 => Some(Mode::Active),
            1 => Some(Mode::Stop),
            2 => Some(Mode::Freeze),
            _ => None,
        }
    }
}

/// Progress of a member quiescing for Stop or Freeze (R-MODE-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiesce {
    /// Every request taken is completed or listed as device-owned.
    Done,
    /// Requests still in flight; ask again with
    /// [`MemberDevice::poll_quiesce`].
    InProgress,
}

/// Errors a member device reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberDeviceError {
    /// The device could not apply a (validated) context.
    #[error("member device cannot apply the context: {0}")]
    Apply(String),
}

/// What the migration logic needs from a member's virtio device. The real
/// VF implements it over its transport state; unit tests use a fake.
pub trait MemberDevice {
    /// What a written context may contain (R-CTX-4).
    fn context_limits(&self) -> ContextLimits;
    /// The member's current context, including device-owned descriptors.
    fn capture_context(&mut self) -> MemberContext;
    /// Replace the member's state with `ctx` (already validated against
    /// [`MemberDevice::context_limits`]). On error nothing may change.
    fn apply_context(&mut self, ctx: &MemberContext) -> Result<(), MemberDeviceError>;
    /// Enter Stop or Freeze: stop sending interrupts and touching driver
    /// memory once every request taken is completed or recorded as
    /// device-owned (R-MODE-3). In Stop, remember notifications; in Freeze,
    /// ignore notifications and configuration writes.
    fn quiesce(&mut self, mode: Mode) -> Quiesce;
    /// Progress of a quiesce that returned [`Quiesce::InProgress`].
    fn poll_quiesce(&mut self) -> Quiesce {
        Quiesce::Done
    }
    /// Become Active: act on notifications remembered in Stop and examine
    /// every enabled queue once, as if notified (R-MODE-4).
    fn resume(&mut self);
    /// Virtio device reset / function level reset of the member's virtio
    /// state (R-MODE-7). Mode, streams and recording are not the device's.
    fn reset(&mut self);
    /// Whether the device went back to Active through an FLR since the
    /// last call (virtio 1.4 dialect); clears the flag.
    fn take_reset(&mut self) -> bool {
        false
    }
}

/// Errors restoring migration state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrationError {
    /// A saved context (pending or partial) does not decode.
    #[error("saved member context is invalid: {0}")]
    Context(#[from] ContextError),
    /// Saved write-record state is invalid.
    #[error("saved write-record state is invalid: {0}")]
    Records(#[from] RecordError),
    /// Saved mode value is invalid.
    #[error("saved member mode {0} is invalid")]
    Mode(u8),
    /// Saved read offset beyond the saved snapshot.
    #[error("saved context read offset {offset} is beyond the snapshot's {len} bytes")]
    ReadOffset {
        /// Offset.
        offset: usize,
        /// Snapshot length.
        len: usize,
    },
}

/// Everything of a member's migration state the VMM must carry (spec §6).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct MigrationSnapshot {
    /// Mode wire value.
    pub mode: u8,
    /// Context read snapshot of the current mode, if a read began.
    pub read_snapshot: Option<Vec<u8>>,
    /// Bytes of it already read.
    pub read_offset: usize,
    /// Bytes of a partially written context stream.
    pub write_partial: Vec<u8>,
    /// Complete written context awaiting Freeze→Stop/Active, encoded.
    pub pending_context: Option<Vec<u8>>,
    /// Queues of the pending context that continue from the used index
    /// (staged by virtio 1.4 device parts; the TLV encoding has no room
    /// for it).
    pub pending_follows_used: Vec<u16>,
    /// Write recording.
    pub records: RecorderState,
}

/// Migration state of one member.
#[derive(Debug)]
pub struct MigrationState {
    mode: Mode,
    /// Stream snapshot of this mode, taken at its first read.
    read_snapshot: Option<Vec<u8>>,
    read_offset: usize,
    write: ContextDecoder,
    /// Raw bytes of the partial write stream (for snapshot, §6).
    write_raw: Vec<u8>,
    pending_ctx: Option<MemberContext>,
    /// A mode change waiting for the device to quiesce.
    pending_mode: Option<Mode>,
    /// The member's write recorder (R-WR-*).
    pub recorder: WriteRecorder,
}

impl MigrationState {
    /// Fresh state: Active, no streams, not recording.
    pub fn new(limits: ContextLimits, recorder: WriteRecorder) -> Self {
        MigrationState {
            mode: Mode::Active,
            read_snapshot: None,
            read_offset: 0,
            write: ContextDecoder::new(limits),
            write_raw: Vec::new(),
            pending_ctx: None,
            pending_mode: None,
            recorder,
        }
    }

    /// Current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A context read has begun and is not finished.
    pub fn read_partial(&self) -> bool {
        self.read_snapshot
            .as_ref()
            .is_some_and(|s| self.read_offset > 0 && self.read_offset < s.len())
    }

    /// A context write has begun and is not complete.
    pub fn write_partial(&self) -> bool {
        self.write.is_partial()
    }

    /// A complete written context awaiting Freeze→Stop/Active.
    pub fn pending_context(&self) -> Option<&MemberContext> {
        self.pending_ctx.as_ref()
    }

    /// A mode change waiting on the device.
    pub fn pending_mode(&self) -> Option<Mode> {
        self.pending_mode
    }

    /// Stage a validated context, applied when the member next becomes
    /// Active (or leaves Freeze): what a complete DEV_CTX_WRITE stream or a
    /// virtio 1.4 DEV_PARTS_SET leaves.
    pub fn stage_context(&mut self, ctx: MemberContext) {
        self.pending_ctx = Some(ctx);
    }

    fn enter(&mut self, mode: Mode) {
        if self.mode != mode {
            self.read_snapshot = None;
            self.read_offset = 0;
        }
        self.mode = mode;
        self.pending_mode = None;
    }

    /// The member was reset back to running (virtio 1.4: FLR): Active,
    /// nothing staged, no mode change waiting. Write recording stays.
    pub fn member_reset(&mut self) {
        self.enter(Mode::Active);
        self.pending_ctx = None;
    }

    /// Snapshot for the VMM's own migration (spec §6).
    pub fn snapshot(&self) -> MigrationSnapshot {
        MigrationSnapshot {
            mode: self.mode as u8,
            read_snapshot: self.read_snapshot.clone(),
            read_offset: self.read_offset,
            write_partial: if self.write.is_partial() {
                self.write_raw.clone()
            } else {
                Vec::new()
            },
            pending_context: self.pending_ctx.as_ref().map(|c| c.to_bytes()),
            pending_follows_used: self
                .pending_ctx
                .iter()
                .flat_map(|c| c.queues.iter())
                .filter(|q| q.avail_follows_used)
                .map(|q| q.index)
                .collect(),
            records: self.recorder.state(),
        }
    }

    /// Restore a [`MigrationSnapshot`]. A mode change in progress at
    /// snapshot time cannot be saved (the VMM pauses devices first).
    pub fn restore(&mut self, s: &MigrationSnapshot) -> Result<(), MigrationError> {
        let mode = Mode::from_u8(s.mode).ok_or(MigrationError::Mode(s.mode))?;
        let limits = self.write.limits().clone();
        if let Some(r) = &s.read_snapshot {
            if s.read_offset > r.len() {
                return Err(MigrationError::ReadOffset {
                    offset: s.read_offset,
                    len: r.len(),
                });
            }
        }
        let pending = match &s.pending_context {
            Some(b) => {
                let mut c = MemberContext::decode(b, &limits)?;
                for q in &mut c.queues {
                    q.avail_follows_used = s.pending_follows_used.contains(&q.index);
                }
                Some(c)
            }
            None => None,
        };
        let mut write = ContextDecoder::new(limits);
        if write.feed(&s.write_partial)?.is_some() {
            return Err(MigrationError::Context(ContextError::TrailingBytes(0)));
        }
        self.recorder.restore(&s.records)?;
        self.mode = mode;
        self.read_snapshot = s.read_snapshot.clone();
        self.read_offset = s.read_offset;
        self.write = write;
        self.write_raw = s.write_partial.clone();
        self.pending_ctx = pending;
        self.pending_mode = None;
        Ok(())
    }
}

/// A member: its device and its migration state.
#[derive(Debug)]
pub struct Member<D> {
    /// The member's virtio device.
    pub device: D,
    /// Its migration state.
    pub migration: MigrationState,
}

impl<D: MemberDevice> Member<D> {
    /// A member in Active mode, not recording.
    pub fn new(device: D, recorder: WriteRecorder) -> Self {
        let limits = device.context_limits();
        Member {
            device,
            migration: MigrationState::new(limits, recorder),
        }
    }

    /// Current mode.
    pub fn mode(&self) -> Mode {
        self.migration.mode
    }

    /// VF FLR or virtio reset of the member (R-MODE-7, R-WR-6): the device's
    /// virtio state resets; mode, streams and write recording stay.
    pub fn function_reset(&mut self) {
        self.device.reset();
    }
}

/// The members a PF owns, as the executor sees them.
pub trait MemberTable {
    /// The member device type.
    type Device: MemberDevice;
    /// SR-IOV VF Enable.
    fn vf_enabled(&self) -> bool;
    /// SR-IOV NumVFs.
    fn num_vfs(&self) -> u16;
    /// Member `id` (1-based VF number).
    fn member_mut(&mut self, id: u16) -> Option<&mut Member<Self::Device>>;
}

/// A plain member table: `members[n - 1]` is VF n.
#[derive(Debug)]
pub struct Members<D> {
    /// VF Enable.
    pub vf_enable: bool,
    /// NumVFs.
    pub num_vfs: u16,
    /// The instantiated members.
    pub members: Vec<Member<D>>,
}

impl<D: MemberDevice> MemberTable for Members<D> {
    type Device = D;
    fn vf_enabled(&self) -> bool {
        self.vf_enable
    }
    fn num_vfs(&self) -> u16 {
        self.num_vfs
    }
    fn member_mut(&mut self, id: u16) -> Option<&mut Member<D>> {
        self.members.get_mut(usize::from(id).checked_sub(1)?)
    }
}

fn einval(q: u16) -> Execution {
    Execution::Done(AdminCompletion::err(status::EINVAL, q))
}

fn ok() -> Execution {
    Execution::Done(AdminCompletion::ok())
}

fn record_error(e: RecordError) -> Execution {
    match e {
        RecordError::NotStarted => einval(qualifier::INVALID_COMMAND),
        _ => einval(qualifier::INVALID_FIELD),
    }
}

/// The admin command set a PF speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Dialect {
    /// The v2 draft the seeds describe (`shared/spec/virtio-pf.md`).
    #[default]
    Draft,
    /// The published virtio 1.4 device parts commands ([`super::v14`]).
    V14,
}

/// The admin command executor's own state: the dialect, the list of
/// commands in use, and the virtio 1.4 dialect's capability and objects.
#[derive(Debug, Default)]
pub struct AdminState {
    dialect: Dialect,
    in_use: u64,
    /// State of the virtio 1.4 dialect (unused by the draft).
    pub v14: V14State,
    scratch: Vec<u64>,
}

impl AdminState {
    /// State after reset, draft dialect: only LIST_QUERY and LIST_USE
    /// usable.
    pub fn new() -> Self {
        Self::default()
    }

    /// State after reset, speaking `dialect`.
    pub fn with_dialect(dialect: Dialect) -> Self {
        AdminState {
            dialect,
            ..Self::default()
        }
    }

    /// The dialect.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// PF reset (R-ADM-3, R14-GRP-8, R14-CAP-8, R14-OBJ-11).
    pub fn reset(&mut self) {
        self.in_use = 0;
        self.v14.reset();
    }

    /// The list in use (LIST_USE), for the VMM's snapshot (§6).
    pub fn in_use(&self) -> u64 {
        self.in_use
    }

    /// Restore the list in use.
    pub fn set_in_use(&mut self, v: u64) {
        self.in_use = v & SUPPORTED_OPCODES;
    }

    /// Whether `op` may be executed now.
    pub fn usable(&self, op: u16) -> bool {
        op < 64 && SUPPORTED_OPCODES & (self.in_use | ALWAYS_USABLE) & (1 << op) != 0
    }

    /// Execute `cmd`; result bytes go to `result` (cleared first), at most
    /// `cap` of them are meaningful (the rest would be truncated).
    pub fn execute<T: MemberTable>(
        &mut self,
        table: &mut T,
        cmd: &AdminCommand<'_>,
        result: &mut Vec<u8>,
        cap: usize,
    ) -> Execution {
        if self.dialect == Dialect::V14 {
            return self.v14.execute(table, cmd, result, cap);
        }
        result.clear();
        // R-ADM-1 validation order.
        if cmd.group_type != GROUP_TYPE_SRIOV {
            return einval(qualifier::INVALID_GROUP);
        }
        if !self.usable(cmd.opcode) {
            return einval(qualifier::INVALID_OPCODE);
        }
        match cmd.opcode {
            opcode::LIST_QUERY => {
                result.extend_from_slice(&SUPPORTED_OPCODES.to_le_bytes());
                return ok();
            }
            opcode::LIST_USE => {
                let first = cmd.data_u64(0);
                let rest_nonzero = cmd.data.iter().skip(8).any(|b| *b != 0);
                if rest_nonzero || first & !SUPPORTED_OPCODES != 0 {
                    return einval(qualifier::INVALID_FIELD);
                }
                self.in_use = first;
                return ok();
            }
            _ => {}
        }
        let (id, m) = match addressed_member(table, cmd) {
            Ok(x) => x,
            Err(e) => return e,
        };
        member_command(m, id, cmd, result, cap, &mut self.scratch)
    }

    /// Finish a deferred mode change of member `id` if its device has
    /// quiesced; returns the completion to write then.
    pub fn poll<T: MemberTable>(&mut self, table: &mut T, id: u16) -> Option<AdminCompletion> {
        let m = table.member_mut(id)?;
        let mode = m.migration.pending_mode?;
        match m.device.poll_quiesce() {
            Quiesce::Done => {
                m.migration.enter(mode);
                Some(AdminCompletion::ok())
            }
            Quiesce::InProgress => None,
        }
    }
}

/// The member a command addresses, as both dialects check it (R-ADM-1,
/// R14-GRP-13/14): VF Enable set, id in 1..NumVFs, no mode change of that
/// member waiting (EAGAIN/Q_TRYAGAIN meanwhile).
pub(super) fn addressed_member<'t, T: MemberTable>(
    table: &'t mut T,
    cmd: &AdminCommand<'_>,
) -> Result<(u16, &'t mut Member<T::Device>), Execution> {
    if !table.vf_enabled() {
        return Err(einval(qualifier::INVALID_GROUP));
    }
    let num_vfs = table.num_vfs();
    let id = match u16::try_from(cmd.member_id) {
        Ok(id) if id >= 1 && id <= num_vfs => id,
        _ => return Err(einval(qualifier::INVALID_MEMBER)),
    };
    let Some(m) = table.member_mut(id) else {
        return Err(einval(qualifier::INVALID_MEMBER));
    };
    if m.device.take_reset() {
        m.migration.member_reset();
    }
    if m.migration.pending_mode.is_some() {
        return Err(Execution::Done(AdminCompletion::err(
            status::EAGAIN,
            qualifier::TRYAGAIN,
        )));
    }
    Ok((id, m))
}

fn member_command<D: MemberDevice>(
    m: &mut Member<D>,
    id: u16,
    cmd: &AdminCommand<'_>,
    result: &mut Vec<u8>,
    cap: usize,
    scratch: &mut Vec<u64>,
) -> Execution {
    let st = &mut m.migration;
    match cmd.opcode {
        opcode::DEV_MODE_GET => {
            result.push(st.mode as u8);
            ok()
        }
        opcode::DEV_MODE_SET => {
            let Some(new) = Mode::from_u8(cmd.data_u8(0)) else {
                return einval(qualifier::INVALID_FIELD);
            };
            set_mode(m, id, new)
        }
        opcode::DEV_CTX_SIZE_GET => {
            let freeze = match cmd.data_u8(0) {
                0 => false,
                1 => true,
                _ => return einval(qualifier::INVALID_FIELD),
            };
            let size = match (&st.read_snapshot, freeze && st.mode != Mode::Freeze) {
                (Some(s), false) => (s.len() - st.read_offset) as u64,
                _ => m.device.capture_context().encoded_len() as u64,
            };
            result.extend_from_slice(&size.to_le_bytes());
            ok()
        }
        opcode::DEV_CTX_READ => {
            if st.read_snapshot.is_none() {
                st.read_snapshot = Some(m.device.capture_context().to_bytes());
                st.read_offset = 0;
            }
            let snap = st.read_snapshot.as_deref().unwrap_or(&[]);
            let n = cap.min(snap.len() - st.read_offset);
            result.extend_from_slice(&snap[st.read_offset..st.read_offset + n]);
            st.read_offset += n;
            Execution::Done(AdminCompletion::ok_u32(n as u32))
        }
        opcode::DEV_CTX_WRITE => {
            if st.mode != Mode::Freeze {
                return einval(qualifier::INVALID_COMMAND);
            }
            if cmd.data.is_empty() {
                return ok();
            }
            if cmd.truncated {
                // More data than one command may carry: refuse, no effect.
                return Execution::Done(AdminCompletion::err(
                    status::ENOMEM,
                    qualifier::NORESOURCE,
                ));
            }
            let was_partial = st.write.is_partial();
            if !was_partial {
                st.write_raw.clear();
            }
            match st.write.feed(cmd.data) {
                Err(e) => {
                    log::debug!("member {id}: context write refused: {e}");
                    // No trace of the failed write (R-ADM-2): rebuild the
                    // decoder from the accepted bytes of the stream. Only
                    // this error path pays for it.
                    let mut d = ContextDecoder::new(st.write.limits().clone());
                    if was_partial && d.feed(&st.write_raw).is_err() {
                        // The same bytes were accepted before; cannot fail.
                        d = ContextDecoder::new(st.write.limits().clone());
                        st.write_raw.clear();
                    }
                    st.write = d;
                    einval(qualifier::INVALID_FIELD)
                }
                Ok(Some(ctx)) => {
                    st.write_raw.clear();
                    st.pending_ctx = Some(ctx);
                    ok()
                }
                Ok(None) => {
                    st.write_raw.extend_from_slice(cmd.data);
                    ok()
                }
            }
        }
        opcode::DEV_CTX_FIELDS_QUERY => {
            encode_supported_fields(st.write.limits(), result);
            ok()
        }
        opcode::DEV_CTX_DISCARD => {
            if st.read_partial() {
                st.read_snapshot = None;
                st.read_offset = 0;
            }
            st.write.reset();
            st.write_raw.clear();
            ok()
        }
        opcode::DEV_WRITE_RECORD_CAP_QUERY => {
            let (sizes, ranges) = st.recorder.capabilities();
            result.extend_from_slice(&sizes.to_le_bytes());
            result.extend_from_slice(&ranges.to_le_bytes());
            ok()
        }
        opcode::DEV_WRITE_RECORDS_START => {
            let page_size = cmd.data_u64(0);
            let count = cmd.data_u32(8) as usize;
            let (_, supported) = st.recorder.capabilities();
            if count > supported as usize {
                return einval(qualifier::INVALID_FIELD);
            }
            let entries: Vec<(u64, u64)> = (0..count)
                .map(|i| (cmd.data_u64(16 + 16 * i), cmd.data_u64(24 + 16 * i)))
                .collect();
            match st.recorder.start(page_size, &entries) {
                Ok(()) => ok(),
                Err(e) => record_error(e),
            }
        }
        opcode::DEV_WRITE_RECORDS_STOP => {
            st.recorder.stop();
            ok()
        }
        opcode::DEV_WRITE_RECORDS_READ => {
            scratch.clear();
            let addr = cmd.data_u64(0);
            let len = cmd.data_u64(8);
            if let Err(e) = st.recorder.read(addr, len, cap / 8, scratch) {
                return record_error(e);
            }
            result.reserve(scratch.len() * 8);
            for a in scratch.iter() {
                result.extend_from_slice(&a.to_le_bytes());
            }
            Execution::Done(AdminCompletion::ok_u32(scratch.len() as u32))
        }
        // usable() admits only implemented opcodes.
        _ => einval(qualifier::INVALID_OPCODE),
    }
}

/// Change the mode of member `id` (both dialects): a staged context is
/// applied on leaving Freeze or on becoming Active; Stop and Freeze wait for
/// the device to quiesce.
pub(super) fn set_mode<D: MemberDevice>(m: &mut Member<D>, id: u16, new: Mode) -> Execution {
    let st = &mut m.migration;
    let cur = st.mode;
    if new == cur {
        return ok();
    }
    if new != Mode::Freeze && (st.read_partial() || st.write_partial()) {
        return Execution::Done(AdminCompletion::err(
            status::EBUSY,
            qualifier::INVALID_COMMAND,
        ));
    }
    if cur == Mode::Freeze || new == Mode::Active {
        if let Some(ctx) = st.pending_ctx.take() {
            if let Err(e) = m.device.apply_context(&ctx) {
                log::warn!("member {id}: {e}");
                m.migration.pending_ctx = Some(ctx);
                return einval(qualifier::INVALID_FIELD);
            }
        }
    }
    match new {
        Mode::Active => {
            m.device.resume();
            m.migration.enter(Mode::Active);
            ok()
        }
        Mode::Stop | Mode::Freeze => match m.device.quiesce(new) {
            Quiesce::Done => {
                m.migration.enter(new);
                ok()
            }
            Quiesce::InProgress => {
                m.migration.pending_mode = Some(new);
                Execution::Deferred { member: id }
            }
        },
    }
}
