//! The dirty-tracking bitmap used by all guest memory of the VMM.

/// The bitmap type behind every guest-memory region. One bit per 4 KiB page.
pub type DirtyBitmap = vm_memory::bitmap::AtomicBitmap;

/// Guest memory as seen by the VMM and its devices: every write through the
/// `Bytes` API marks the written pages in the region's [`DirtyBitmap`].
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;

/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyBitmap>;
