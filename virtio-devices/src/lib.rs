//! virtio devices.

pub mod pf;
