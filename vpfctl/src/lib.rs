//! vpfctl's pieces: a userspace driver for the virtio-pf PF's admin
//! virtqueue and for a virtio-blk VF, built on sysfs (config space,
//! `resourceN` mmap, driver binding) and pinned DMA memory translated
//! through `/proc/self/pagemap`. The binary (`main.rs`) is the command line.
//!
//! Host-side unit tests cover everything that needs no device: wire
//! encoding, ring bookkeeping on a fake memory, pagemap and capability
//! parsing, JSON shapes, range coalescing, the workload scheduler. Only the
//! real-guest integration tests exercise MMIO, DMA and the device itself.

pub mod admin;
pub mod cmd;
pub mod disk;
pub mod dma;
pub mod error;
pub mod garbage;
pub mod json;
pub mod migrate;
pub mod mmio;
pub mod pci;
pub mod vfio;
pub mod virtio;
pub mod virtq;
pub mod wire;
pub mod workload;

#[cfg(test)]
mod model_tests;
