//! PCI Express emulation: configuration space with standard and extended
//! capability chains, BAR sizing, MSI-X, and a bus keyed by full
//! bus/device/function with ECAM and port 0xCF8/0xCFC decoding.
//!
//! This crate knows nothing about virtio or KVM. Devices implement
//! [`PciDevice`]; interrupts leave a device through an
//! [`InterruptSourceGroup`], which the VMM backs with KVM irqfds and a unit
//! test backs with a recorder.
//!
//! Modules, each with its tests beside the code:
//! * [`configuration`]: [`PciConfiguration`], a 4 KiB type 0 space with
//!   per-byte write and write-1-to-clear masks, BAR registration and sizing,
//!   the decoded-BAR list, and the standard and extended capability chains.
//! * [`pcie`]: the PCI Express Capability (v2 endpoint, optional FLR) and
//!   FLR-request detection on configuration writes.
//! * [`msix`]: [`MsixConfig`], the MSI-X table, PBA and capability, with
//!   per-vector and function masking and pending-bit delivery on unmask.
//! * [`sriov`]: the SR-IOV Extended Capability register block, its write
//!   rules, and VF routing ID / VF BAR0 computation.
//! * [`bus`]: [`PciBus`], functions keyed by [`Bdf`], ECAM and 0xCF8/0xCFC
//!   configuration access, and MMIO/port dispatch to decoded BARs. It is
//!   internally synchronized (share it as `Arc<PciBus>`); see the module
//!   documentation for the locking rules.
//!
//! Guest-reachable paths never panic: bad offsets and lengths read as
//! all-ones and writes to them are dropped.

use std::fmt;

/// A PCI routing ID: bus, device and function.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bdf(u16);

impl Bdf {
    /// Builds a routing ID. `device` is 0..32, `function` is 0..8.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Bdf(((bus as u16) << 8) | (((device & 0x1f) as u16) << 3) | ((function & 0x7) as u16))
    }
    /// Builds a routing ID from its 16-bit encoding.
    pub const fn from_rid(rid: u16) -> Self {
        Bdf(rid)
    }
    /// The 16-bit routing ID.
    pub const fn rid(self) -> u16 {
        self.0
    }
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub const fn device(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }
    pub const fn function(self) -> u8 {
        (self.0 & 0x7) as u8
    }
}

impl fmt::Debug for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{}",
            self.bus(),
            self.device(),
            self.function()
        )
    }
}

/// An MSI message as programmed into an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Where a device's interrupts go. The device (through its MSI-X state)
/// calls `update` whenever a vector's message or mask changes and `trigger`
/// to deliver an unmasked vector.
pub trait InterruptSourceGroup: Send + Sync {
    /// Delivers vector `vector` now.
    fn trigger(&self, vector: u16) -> std::io::Result<()>;
    /// The message of `vector` changed, or its effective mask did.
    fn update(&self, vector: u16, msg: MsiMessage, masked: bool) -> std::io::Result<()>;
}

pub mod bus;
pub mod configuration;
pub mod device;
pub mod msix;
pub mod pcie;
pub mod sriov;

pub use bus::{BusError, ConfigWriteResult, DecodedBar, PciBus};
pub use configuration::{
    ConfigError, PciConfiguration, PciConfigurationState, PciHeaderParams, NUM_BARS,
    PCI_CONFIG_SPACE_SIZE,
};
pub use device::{
    BarKind, BarRange, Doorbell, FunctionChange, InterruptManager, PciDevice, SharedPciDevice,
    WorkEvent,
};
pub use msix::{MsixConfig, MsixConfigState, MsixError, MsixLayout, MsixTableEntry};
pub use pcie::{PcieCapability, PcieCapabilityBuilder, PcieDeviceType};
pub use sriov::{
    SriovCapability, SriovError, SriovParams, SriovRegs, SriovWriteEffect, VfEnableChange,
};
