//! virtio devices.

pub mod block;
pub mod block_io;
pub mod chain;
pub mod device;
pub mod iommu;
pub mod pf;
#[cfg(any(test, feature = "test-support"))]
pub mod test_disk;
#[cfg(any(test, feature = "test-support"))]
pub mod test_driver;
pub mod transport;
