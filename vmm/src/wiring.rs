//! Creating the machine's PCI functions from the configuration.

use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use pci::{Bdf, InterruptManager};
use virtio_devices::block::{Block, BlockConfig};
use virtio_devices::iommu::{IommuHandle, VirtioIommu};
use virtio_devices::pf::device::{vf_layout, PfConfig, VirtioPf};
use virtio_devices::pf::Dialect;
use virtio_devices::transport::{required_msix_vectors, VirtioPciDevice, VirtioPciOptions};
use vm_memory::GuestAddressSpace;
use vm_memory::GuestMemoryAtomic;
use vm_migration::{DmaIommu, DmaMemory, GuestMemoryMmap};

use crate::config::{AdminDialect, DiskConfig, VirtioPfConfig};
use crate::device_manager::DeviceManager;
use crate::interrupts::MsiManager;
use crate::snapshot::Persistent;
use crate::vm::VmError;

/// The first device number used for the configured functions (00:00.0 is
/// left free, as a host bridge would have it; 00:01.0 is the virtio-iommu's
/// when a function is placed behind it).
pub const FIRST_DEVICE: u8 = 2;

/// Where the virtio-iommu sits (only when some function has `iommu=on`).
pub const IOMMU_BDF: Bdf = Bdf::new(0, 1, 0);

/// The routing IDs the virtio-iommu manages, as `(first, last)` ranges:
/// each `iommu=on` disk, and for each `iommu=on` PF the PF and every VF it
/// may create. `pf_slots` is [`plan_pf_slots`]'s answer. Empty when no
/// function is behind the IOMMU.
pub fn iommu_ranges(
    disks: &[DiskConfig],
    pfs: &[VirtioPfConfig],
    pf_slots: &[u8],
) -> Result<Vec<(Bdf, Bdf)>, String> {
    let mut out = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        if d.iommu {
            let bdf = Bdf::new(0, FIRST_DEVICE + i as u8, 0);
            out.push((bdf, bdf));
        }
    }
    for (p, &slot) in pfs.iter().zip(pf_slots) {
        if p.iommu {
            let bdf = Bdf::new(0, slot, 0);
            let layout = vf_layout(bdf, p.total_vfs).map_err(|e| e.to_string())?;
            let last = layout.vf_bdfs.last().copied().unwrap_or(bdf);
            out.push((bdf, last));
        }
    }
    Ok(out)
}

/// Adds the virtio-iommu at [`IOMMU_BDF`] managing `ranges` (also to
/// `persistent`) and returns the handle the functions behind it take their
/// translators from; `None` (and nothing added) when `ranges` is empty.
pub fn add_iommu(
    devices: &DeviceManager,
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    msi: &Arc<MsiManager>,
    ranges: &[(Bdf, Bdf)],
    persistent: &mut Vec<Persistent>,
) -> Result<Option<IommuHandle>, VmError> {
    if ranges.is_empty() {
        return Ok(None);
    }
    let err = |reason: String| VmError::Iommu(reason);
    let ids: Vec<RangeInclusive<u32>> = ranges
        .iter()
        .map(|(a, b)| u32::from(a.rid())..=u32::from(b.rid()))
        .collect();
    let own = DmaMemory::direct((*mem.memory()).clone());
    let iommu = VirtioIommu::new(ids, own.clone()).map_err(|e| err(e.to_string()))?;
    let handle = iommu.handle();
    let irq = msi
        .create_group(IOMMU_BDF, required_msix_vectors(&iommu))
        .map_err(|e| err(format!("interrupts: {e}")))?;
    let mut dev = VirtioPciDevice::new(
        iommu,
        GuestMemoryAtomic::new(own),
        irq,
        VirtioPciOptions::default(),
    )
    .map_err(|e| err(e.to_string()))?;
    dev.set_label(IOMMU_BDF.to_string());
    let dev = Arc::new(Mutex::new(dev));
    devices.add_function(IOMMU_BDF, dev.clone())?;
    persistent.push(Persistent::Iommu(IOMMU_BDF, dev));
    log::info!("virtio-iommu at {IOMMU_BDF} managing {ranges:?}");
    Ok(Some(handle))
}

/// The memory function `bdf` reaches by DMA: through `iommu` when given.
fn dma_for(
    iommu: Option<&IommuHandle>,
    bdf: Bdf,
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
) -> Result<DmaMemory, String> {
    let phys = (*mem.memory()).clone();
    match iommu {
        None => Ok(DmaMemory::direct(phys)),
        Some(i) => i
            .endpoint(u32::from(bdf.rid()))
            .map(|t| DmaMemory::translated(phys, t))
            .ok_or_else(|| format!("the virtio-iommu does not manage {bdf}")),
    }
}

/// Adds one virtio-blk function per disk at 00:02.0, 00:03.0, ... (each
/// also to `persistent`) and returns the next free device number.
pub fn add_disks(
    devices: &DeviceManager,
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    msi: &Arc<MsiManager>,
    disks: &[DiskConfig],
    iommu: Option<&IommuHandle>,
    persistent: &mut Vec<Persistent>,
) -> Result<u8, VmError> {
    let mut slot = FIRST_DEVICE;
    for d in disks {
        let disk_err = |reason: String| VmError::Disk {
            path: d.path.display().to_string(),
            reason,
        };
        let mut cfg = BlockConfig::new(&d.path);
        cfg.read_only = d.readonly;
        cfg.serial = d.id.clone();
        let block = Block::new(&cfg).map_err(|e| disk_err(e.to_string()))?;
        let bdf = Bdf::new(0, slot, 0);
        let irq = msi
            .create_group(bdf, required_msix_vectors(&block))
            .map_err(|e| disk_err(format!("interrupts: {e}")))?;
        let behind = if d.iommu { iommu } else { None };
        let dma = GuestMemoryAtomic::new(dma_for(behind, bdf, mem).map_err(disk_err)?);
        let mut dev = VirtioPciDevice::new(block, dma, irq, VirtioPciOptions::default())
            .map_err(|e| disk_err(e.to_string()))?;
        dev.set_label(bdf.to_string());
        let dev = Arc::new(Mutex::new(dev));
        devices.add_function(bdf, dev.clone())?;
        persistent.push(Persistent::Disk(bdf, dev));
        slot += 1;
    }
    Ok(slot)
}

/// The device numbers on bus 0 of each virtio-pf, after `disks` disk
/// functions from [`FIRST_DEVICE`] on: each PF is followed by
/// ceil(total_vfs / 8) device numbers kept free for its VFs (First VF
/// Offset 8, stride 1). Fails when they do not fit in the 32 device numbers.
pub fn plan_pf_slots(disks: usize, total_vfs: &[u16]) -> Result<Vec<u8>, String> {
    let mut slot = FIRST_DEVICE as usize + disks;
    let mut out = Vec::new();
    for (i, &n) in total_vfs.iter().enumerate() {
        let need = 1 + (n as usize).div_ceil(8);
        if slot + need > 32 {
            return Err(format!(
                "virtio-pf #{} with total_vfs={n} needs {need} free device numbers on bus 0 from 00:{slot:02x}.0; only {} are left",
                i + 1,
                32usize.saturating_sub(slot)
            ));
        }
        out.push(slot as u8);
        slot += need;
    }
    Ok(out)
}

/// Adds one virtio-pf per `--device virtio-pf` from device number `slot`
/// on, leaving free the device numbers its VFs will take when the guest
/// enables them (each PF also to `persistent`). Returns the next free
/// device number.
pub fn add_virtio_pfs(
    devices: &DeviceManager,
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    msi: &Arc<MsiManager>,
    pfs: &[VirtioPfConfig],
    mut slot: u8,
    iommu: Option<&IommuHandle>,
    persistent: &mut Vec<Persistent>,
) -> Result<u8, VmError> {
    for c in pfs {
        let name = c.id.clone().unwrap_or_else(|| c.disk.display().to_string());
        let err = |reason: String| VmError::VirtioPf {
            name: name.clone(),
            reason,
        };
        // The PF, then ceil(total_vfs / 8) device numbers for its VFs.
        let vf_slots = c.total_vfs.div_ceil(8) as u8;
        if slot as u16 + vf_slots as u16 > 31 {
            return Err(err(format!(
                "total_vfs={} does not fit on bus 0 after 00:{slot:02x}.0",
                c.total_vfs
            )));
        }
        let bdf = Bdf::new(0, slot, 0);
        let pattern = c.clone();
        let mut cfg = PfConfig::new(
            &c.disk,
            Box::new(move |n: u16| pattern.vf_disk_path(n)),
            c.total_vfs,
            bdf,
            c.readonly,
        )
        .map_err(|e| err(e.to_string()))?;
        cfg.dialect = match c.admin {
            AdminDialect::Draft => Dialect::Draft,
            AdminDialect::V14 => Dialect::V14,
        };
        if c.iommu {
            let handle =
                iommu.ok_or_else(|| err("iommu=on, but the VM has no virtio-iommu".into()))?;
            cfg.iommu = Some(Arc::new(handle.clone()) as Arc<dyn DmaIommu>);
        }
        let manager: Arc<dyn InterruptManager> = msi.clone();
        let pf = VirtioPf::new(cfg, mem.clone(), manager).map_err(|e| err(e.to_string()))?;
        devices.add_function(bdf, pf.clone())?;
        persistent.push(Persistent::Pf(bdf, pf));
        log::info!("virtio-pf {name} at {bdf}, {} VFs", c.total_vfs);
        slot += 1 + vf_slots;
    }
    Ok(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pf_slots_leave_room_for_vfs() {
        assert_eq!(plan_pf_slots(0, &[4]).unwrap(), vec![2]);
        // 2 disks, a PF with 9 VFs (2 device numbers), then the next PF.
        assert_eq!(plan_pf_slots(2, &[9, 64]).unwrap(), vec![4, 7]);
        // 64 VFs fill 8 device numbers: 3 PFs of 64 VFs need 27.
        assert!(plan_pf_slots(0, &[64, 64, 64]).is_ok());
        let e = plan_pf_slots(0, &[64, 64, 64, 17]).unwrap_err();
        assert!(e.contains("virtio-pf #4"), "{e}");
        assert!(plan_pf_slots(25, &[64]).is_err());
    }
}
