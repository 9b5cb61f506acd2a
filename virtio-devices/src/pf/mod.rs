//! The virtio-pf device core: the administration command set of the v2
//! device-migration draft as resolved by `shared/spec/virtio-pf.md`.
//!
//! Transport-independent and driven by plain calls:
//! * [`admin`]: the command wire format, status codes, and
//!   [`admin::process_chain`], which gathers a descriptor chain of any
//!   layout, runs a command and scatters its completion (R-ADM-1b).
//! * [`context`]: the device-context TLV stream (§4.3), [`MemberContext`],
//!   encoder and streaming validating decoder (R-CTX-4, R-CTX-5).
//! * [`migration`]: per-member mode state machine, context streams, write
//!   recording, behind the [`MemberDevice`] trait, and the executor
//!   [`AdminState`] (R-ADM-*, R-MODE-*, R-CTX-*, R-WR-*).
//!
//! Write recording itself lives in `vm_migration::dirty`, in the guest
//! memory write path shared with the VMM's dirty tracking (R-WR-7).

pub mod admin;
pub mod context;
pub mod device;
pub mod migration;
pub mod parts;
pub mod reference;
pub mod transport_map;
pub mod v14;
pub mod vf;

#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod tests;

pub use admin::{
    process_chain, AdminBuffers, AdminCommand, AdminCompletion, ChainOutcome, DeferredChain,
    Execution,
};
pub use context::{
    CommonCfg, ContextDecoder, ContextError, ContextLimits, MemberContext, QueueContext,
};
pub use migration::{
    AdminState, Dialect, Member, MemberDevice, MemberDeviceError, MemberTable, Members,
    MigrationSnapshot, MigrationState, Mode, Quiesce,
};
