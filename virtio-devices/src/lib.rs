//! virtio devices.

pub mod block;
pub mod chain;
pub mod device;
pub mod pf;
pub mod transport;
