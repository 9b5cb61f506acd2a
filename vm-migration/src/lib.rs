//! Snapshot and migration traits, the framing of saved state, and the
//! guest-memory dirty log.
//!
//! Every write a device makes into guest memory goes through
//! [`GuestMemoryMmap`], whose bitmap records the pages touched. The VMM reads
//! that bitmap for its own live migration; the virtio-pf members read their
//! write records from the same path (see [`dirty`]). Devices reach that
//! memory as [`DmaMemory`]: directly, or through an IOMMU's translation
//! (see [`dma`]).

pub mod dirty;
pub mod dma;
pub mod dma_record;
pub mod protocol;
pub mod state;

pub use dirty::{
    take_dirty_log, DirtyBitmap, DirtyError, GuestMemoryMmap, GuestRegionMmap, PageBitmap,
    RecordError, RecordRange, RecorderState, RegionDirtyLog, WriteRecorder,
};
pub use dma::{DmaFault, DmaIommu, DmaMemory, DmaRun, DmaTranslate};
pub use state::{MigratableError, Pausable, Snapshottable, StateError};
