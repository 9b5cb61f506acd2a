//! What firmware would do before the kernel runs: size every BAR of a
//! function through its configuration space (write all-ones, read back),
//! place it in the host bridge's 32- or 64-bit window and enable memory
//! decoding. SR-IOV VF BARs are placed too (TotalVFs × per-VF size), so
//! Linux finds them assigned and needs no `pci=realloc`.

use thiserror::Error;
use vm_allocator::{AddressAllocator, AllocPolicy};

use pci::PciDevice;

#[derive(Debug, Error)]
pub enum FirmwareError {
    #[error("no room for a {size:#x}-byte BAR in the {window} window")]
    NoSpace { size: u64, window: &'static str },
    #[error("cannot create the {0} window allocator")]
    Window(&'static str),
}

/// The host bridge windows BARs are placed in.
pub struct BarAllocator {
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
}

impl BarAllocator {
    pub fn new(mmio32: (u64, u64), mmio64: (u64, u64)) -> Result<Self, FirmwareError> {
        Ok(BarAllocator {
            mmio32: AddressAllocator::new(mmio32.0, mmio32.1)
                .map_err(|_| FirmwareError::Window("32-bit"))?,
            mmio64: AddressAllocator::new(mmio64.0, mmio64.1)
                .map_err(|_| FirmwareError::Window("64-bit"))?,
        })
    }

    /// `size` bytes aligned to `align` (a BAR's own size: a power of two;
    /// a VF BAR block is `count` of them, aligned to one).
    fn allocate(&mut self, size: u64, align: u64, is64: bool) -> Result<u64, FirmwareError> {
        let (a, window) = if is64 {
            (&mut self.mmio64, "64-bit")
        } else {
            (&mut self.mmio32, "32-bit")
        };
        a.allocate(size, align.max(4096), AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|_| FirmwareError::NoSpace { size, window })
    }
}

fn read32(d: &mut dyn PciDevice, off: u16) -> u32 {
    let mut b = [0u8; 4];
    d.config_read(off, &mut b);
    u32::from_le_bytes(b)
}

fn write32(d: &mut dyn PciDevice, off: u16, v: u32) {
    let _ = d.config_write(off, &v.to_le_bytes());
}

/// Sizes and places the six BARs at `base` (0x10 for a type-0 header, the
/// VF BAR area of an SR-IOV capability) with `count` copies of each.
/// Returns true when at least one memory BAR was placed.
fn place_bar_block(
    d: &mut dyn PciDevice,
    base: u16,
    count: u64,
    alloc: &mut BarAllocator,
) -> Result<bool, FirmwareError> {
    let mut placed = false;
    let mut i = 0u16;
    while i < 6 {
        let off = base + i * 4;
        let orig = read32(d, off);
        if orig & 1 == 1 {
            // I/O BARs are not used by this machine's devices.
            i += 1;
            continue;
        }
        let is64 = (orig >> 1) & 3 == 2;
        write32(d, off, 0xffff_ffff);
        let lo = read32(d, off) & !0xf;
        let mut mask = lo as u64;
        if is64 && i < 5 {
            write32(d, off + 4, 0xffff_ffff);
            let hi = read32(d, off + 4);
            mask |= (hi as u64) << 32;
        } else {
            mask |= 0xffff_ffff_0000_0000;
        }
        if lo == 0 {
            write32(d, off, orig);
            i += if is64 { 2 } else { 1 };
            continue;
        }
        let size = (!mask).wrapping_add(1);
        let addr = alloc.allocate(size * count, size, is64)?;
        write32(d, off, (addr as u32) | (orig & 0xf));
        if is64 {
            write32(d, off + 4, (addr >> 32) as u32);
        }
        placed = true;
        i += if is64 { 2 } else { 1 };
    }
    Ok(placed)
}

const SRIOV_CAP_ID: u16 = 0x10;
const SRIOV_TOTAL_VFS: u16 = 0x0e;
const SRIOV_VF_BAR0: u16 = 0x24;

fn find_ext_cap(d: &mut dyn PciDevice, id: u16) -> Option<u16> {
    let mut off = 0x100u16;
    for _ in 0..(4096 / 4) {
        let h = read32(d, off);
        if h == 0 || h == 0xffff_ffff {
            return None;
        }
        if (h & 0xffff) as u16 == id {
            return Some(off);
        }
        off = ((h >> 20) & 0xffc) as u16;
        if off < 0x100 {
            return None;
        }
    }
    None
}

/// Places all BARs of `d` (and its VF BARs) and enables memory decoding.
pub fn assign_bars(d: &mut dyn PciDevice, alloc: &mut BarAllocator) -> Result<(), FirmwareError> {
    let placed = place_bar_block(d, 0x10, 1, alloc)?;
    if let Some(cap) = find_ext_cap(d, SRIOV_CAP_ID) {
        let mut b = [0u8; 2];
        d.config_read(cap + SRIOV_TOTAL_VFS, &mut b);
        let total = u16::from_le_bytes(b) as u64;
        if total > 0 {
            place_bar_block(d, cap + SRIOV_VF_BAR0, total, alloc)?;
        }
    }
    if placed {
        let mut c = [0u8; 2];
        d.config_read(0x04, &mut c);
        let cmd = u16::from_le_bytes(c) | 0x2;
        let _ = d.config_write(0x04, &cmd.to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pci::Bdf;
    use virtio_devices::pf::device::{PfConfig, VirtioPf, SRIOV_CAP_OFFSET, VF_BAR0_SIZE};
    use virtio_devices::test_driver::NoInterrupts;
    use vm_memory::{GuestAddress, GuestMemoryAtomic};
    use vm_migration::GuestMemoryMmap;

    use super::*;

    /// A PF whose VF count is not a power of two gets its VF BAR block
    /// (count x per-VF size) aligned to the per-VF size: every VF's BAR0
    /// is then aligned to its own size, as SR-IOV requires.
    #[test]
    fn vf_bar_blocks_of_any_vf_count_are_placed_aligned() {
        let dir = std::env::temp_dir().join(format!("ch-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pf.img"), vec![0u8; 4096]).unwrap();
        std::fs::write(dir.join("vf.img"), vec![0u8; 4096]).unwrap();
        let mut alloc = BarAllocator::new((0xc000_0000, 0x1000_0000), (1 << 36, 1 << 36)).unwrap();
        for total in [1u16, 3, 5, 7, 9, 33, 64] {
            let d = dir.clone();
            let cfg = PfConfig::new(
                dir.join("pf.img"),
                Box::new(move |_| d.join("vf.img")),
                total,
                Bdf::new(0, 4, 0),
                false,
            )
            .unwrap();
            let mem = GuestMemoryAtomic::new(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
            );
            let pf = VirtioPf::new(cfg, mem, Arc::new(NoInterrupts)).unwrap();
            let mut p = pf.lock().unwrap();
            assign_bars(&mut *p, &mut alloc).unwrap_or_else(|e| panic!("total_vfs={total}: {e}"));
            let lo = read32(&mut *p, SRIOV_CAP_OFFSET + 0x24) & !0xf;
            let hi = read32(&mut *p, SRIOV_CAP_OFFSET + 0x28);
            let base = u64::from(lo) | (u64::from(hi) << 32);
            assert_ne!(base, 0, "total_vfs={total}: VF BAR0 not placed");
            assert_eq!(base % VF_BAR0_SIZE, 0, "total_vfs={total}: {base:#x}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
