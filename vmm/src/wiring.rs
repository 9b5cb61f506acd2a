//! Creating the machine's PCI functions from the configuration.

use std::sync::Arc;

use vm_migration::GuestMemoryMmap;

use crate::config::DiskConfig;
use crate::device_manager::DeviceManager;
use crate::interrupts::MsiManager;
use crate::vm::VmError;

/// Adds one virtio-blk function per disk at 00:02.0, 00:03.0, ...
pub fn add_disks(
    _devices: &DeviceManager,
    _mem: &GuestMemoryMmap,
    _msi: &Arc<MsiManager>,
    disks: &[DiskConfig],
) -> Result<(), VmError> {
    if let Some(d) = disks.first() {
        return Err(VmError::Disk {
            path: d.path.display().to_string(),
            reason: "virtio-blk is not wired yet".into(),
        });
    }
    Ok(())
}
