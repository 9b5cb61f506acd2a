//! The Single Root I/O Virtualization Extended Capability (ID 0x0010,
//! version 1, 0x40 bytes).
//!
//! The register block lives in the PF's [`PciConfiguration`] (so it is
//! snapshotted and reset with it); [`SriovCapability`] knows where it is and
//! its fixed parameters, applies guest writes with the rules the masks
//! cannot express, and says what a write changed.
//!
//! Rules:
//! * Writable: Control bits VF Enable (0), VF MSE (3), ARI Capable
//!   Hierarchy (4); NumVFs; System Page Size (supported sizes only); VF BAR0
//!   and BAR1 (one 64-bit memory BAR, sized like a normal BAR: its low
//!   address bits are read-only zero so all-ones reads back the per-VF size
//!   mask). Everything else is read-only; VF BAR2..5 read zero.
//! * NumVFs changes only while VF Enable is clear. A write of a value above
//!   TotalVFs is **ignored** (NumVFs keeps its previous value), as is any
//!   NumVFs write while VF Enable is set.
//! * First VF Offset and VF Stride are fixed by the owner and do not depend
//!   on NumVFs or ARI.
//! * VFs decode memory only while both VF Enable and VF MSE are set (the
//!   PF's own Memory Space Enable does not gate them).

use thiserror::Error;

use crate::configuration::{bar_address_usable, ConfigError, PciConfiguration};
use crate::device::{BarKind, BarRange};
use crate::Bdf;

/// Extended capability ID of SR-IOV.
pub const SRIOV_CAPABILITY_ID: u16 = 0x0010;
/// Version of the SR-IOV capability.
pub const SRIOV_CAPABILITY_VERSION: u8 = 1;
/// Bytes of the capability, header included.
pub const SRIOV_CAPABILITY_SIZE: usize = 0x40;

pub const SRIOV_CAPABILITIES: u16 = 0x04;
pub const SRIOV_CONTROL: u16 = 0x08;
pub const SRIOV_STATUS: u16 = 0x0a;
pub const SRIOV_INITIAL_VFS: u16 = 0x0c;
pub const SRIOV_TOTAL_VFS: u16 = 0x0e;
pub const SRIOV_NUM_VFS: u16 = 0x10;
pub const SRIOV_FUNCTION_DEPENDENCY_LINK: u16 = 0x12;
pub const SRIOV_FIRST_VF_OFFSET: u16 = 0x14;
pub const SRIOV_VF_STRIDE: u16 = 0x16;
pub const SRIOV_VF_DEVICE_ID: u16 = 0x1a;
pub const SRIOV_SUPPORTED_PAGE_SIZES: u16 = 0x1c;
pub const SRIOV_SYSTEM_PAGE_SIZE: u16 = 0x20;
pub const SRIOV_VF_BAR0: u16 = 0x24;
pub const SRIOV_VF_MIGRATION_STATE: u16 = 0x3c;

/// Control: VF Enable.
pub const SRIOV_CTRL_VF_ENABLE: u16 = 1 << 0;
/// Control: VF Memory Space Enable.
pub const SRIOV_CTRL_VF_MSE: u16 = 1 << 3;
/// Control: ARI Capable Hierarchy.
pub const SRIOV_CTRL_ARI: u16 = 1 << 4;
/// Supported Page Sizes: 4 KiB only.
pub const SRIOV_SUPPORTED_PAGE_SIZES_4K: u32 = 1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SriovError {
    #[error("TotalVFs must be at least 1 and InitialVFs equal to TotalVFs")]
    VfCount,
    #[error("First VF Offset must be at least 1 and VF Stride at least 1 with several VFs")]
    OffsetStride,
    #[error("per-VF BAR0 size {0:#x} must be a power of two of at least 4 KiB")]
    BarSize(u64),
    #[error("configuration space: {0}")]
    Config(#[from] ConfigError),
}

/// The fixed parameters the owner chooses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SriovParams {
    pub initial_vfs: u16,
    pub total_vfs: u16,
    pub first_vf_offset: u16,
    pub vf_stride: u16,
    pub vf_device_id: u16,
    /// Size of each VF's BAR0.
    pub vf_bar0_size: u64,
    pub vf_bar0_prefetchable: bool,
    pub function_dependency_link: u8,
}

/// VF Enable changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfEnableChange {
    /// VF Enable was set; VFs 1..=num_vfs now exist.
    Enabled { num_vfs: u16 },
    /// VF Enable was cleared; VFs 1..=num_vfs are gone.
    Disabled { num_vfs: u16 },
}

/// What a write (or reset) did to the SR-IOV registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SriovWriteEffect {
    /// The write overlapped the capability.
    pub touched: bool,
    pub vf_enable: Option<VfEnableChange>,
    /// VF MSE changed to this value.
    pub vf_mse: Option<bool>,
    /// VF BAR0/BAR1 now hold a different address.
    pub vf_bar_moved: bool,
    /// NumVFs changed to this value.
    pub num_vfs: Option<u16>,
}

impl SriovWriteEffect {
    /// Whether any VF's decoded BAR may have changed.
    pub fn vf_decode_changed(&self) -> bool {
        self.vf_enable.is_some() || self.vf_mse.is_some() || self.vf_bar_moved
    }
}

/// The registers whose changes matter to the owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SriovRegs {
    pub control: u16,
    pub num_vfs: u16,
    pub vf_bar0: u64,
}

impl SriovRegs {
    pub fn vf_enabled(&self) -> bool {
        self.control & SRIOV_CTRL_VF_ENABLE != 0
    }

    pub fn vf_mse(&self) -> bool {
        self.control & SRIOV_CTRL_VF_MSE != 0
    }

    /// What changed from `self` to `new`.
    pub fn diff(&self, new: &SriovRegs) -> SriovWriteEffect {
        let vf_enable = match (self.vf_enabled(), new.vf_enabled()) {
            (false, true) => Some(VfEnableChange::Enabled {
                num_vfs: new.num_vfs,
            }),
            (true, false) => Some(VfEnableChange::Disabled {
                num_vfs: self.num_vfs,
            }),
            _ => None,
        };
        SriovWriteEffect {
            touched: false,
            vf_enable,
            vf_mse: (self.vf_mse() != new.vf_mse()).then_some(new.vf_mse()),
            vf_bar_moved: self.vf_bar0 != new.vf_bar0,
            num_vfs: (self.num_vfs != new.num_vfs).then_some(new.num_vfs),
        }
    }
}

/// An SR-IOV capability placed in a PF's configuration space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SriovCapability {
    offset: u16,
    params: SriovParams,
}

impl SriovCapability {
    /// Validates `params` and appends the capability to `config` (at 0x100
    /// if it is the first extended capability).
    pub fn add_to(config: &mut PciConfiguration, params: SriovParams) -> Result<Self, SriovError> {
        // Without VF Migration Capable, InitialVFs must equal TotalVFs
        // (Linux refuses to enable VFs otherwise).
        if params.total_vfs == 0 || params.initial_vfs != params.total_vfs {
            return Err(SriovError::VfCount);
        }
        if params.first_vf_offset == 0 || (params.total_vfs > 1 && params.vf_stride == 0) {
            return Err(SriovError::OffsetStride);
        }
        let size = params.vf_bar0_size;
        if !size.is_power_of_two() || !(4096..=(1 << 62)).contains(&size) {
            return Err(SriovError::BarSize(size));
        }
        let (body, mask) = Self::body_and_mask(&params);
        let offset = config.add_extended_capability(
            SRIOV_CAPABILITY_ID,
            SRIOV_CAPABILITY_VERSION,
            &body,
            &mask,
        )?;
        Ok(SriovCapability { offset, params })
    }

    fn body_and_mask(p: &SriovParams) -> (Vec<u8>, Vec<u8>) {
        let mut body = vec![0u8; SRIOV_CAPABILITY_SIZE - 4];
        let mut mask = vec![0u8; SRIOV_CAPABILITY_SIZE - 4];
        let put = |b: &mut Vec<u8>, off: u16, v: &[u8]| {
            let i = off as usize - 4;
            b[i..i + v.len()].copy_from_slice(v);
        };
        put(&mut body, SRIOV_INITIAL_VFS, &p.initial_vfs.to_le_bytes());
        put(&mut body, SRIOV_TOTAL_VFS, &p.total_vfs.to_le_bytes());
        put(
            &mut body,
            SRIOV_FUNCTION_DEPENDENCY_LINK,
            &[p.function_dependency_link],
        );
        put(
            &mut body,
            SRIOV_FIRST_VF_OFFSET,
            &p.first_vf_offset.to_le_bytes(),
        );
        put(&mut body, SRIOV_VF_STRIDE, &p.vf_stride.to_le_bytes());
        put(&mut body, SRIOV_VF_DEVICE_ID, &p.vf_device_id.to_le_bytes());
        put(
            &mut body,
            SRIOV_SUPPORTED_PAGE_SIZES,
            &SRIOV_SUPPORTED_PAGE_SIZES_4K.to_le_bytes(),
        );
        put(&mut body, SRIOV_SYSTEM_PAGE_SIZE, &1u32.to_le_bytes());
        let pf = if p.vf_bar0_prefetchable { 1 << 3 } else { 0 };
        put(
            &mut body,
            SRIOV_VF_BAR0,
            &(pf | (0b10u32 << 1)).to_le_bytes(),
        );

        let ctrl = SRIOV_CTRL_VF_ENABLE | SRIOV_CTRL_VF_MSE | SRIOV_CTRL_ARI;
        put(&mut mask, SRIOV_CONTROL, &ctrl.to_le_bytes());
        put(&mut mask, SRIOV_NUM_VFS, &0xffffu16.to_le_bytes());
        put(
            &mut mask,
            SRIOV_SYSTEM_PAGE_SIZE,
            &SRIOV_SUPPORTED_PAGE_SIZES_4K.to_le_bytes(),
        );
        let addr_mask = !(p.vf_bar0_size - 1);
        put(
            &mut mask,
            SRIOV_VF_BAR0,
            &((addr_mask as u32) & !0xf).to_le_bytes(),
        );
        put(
            &mut mask,
            SRIOV_VF_BAR0 + 4,
            &((addr_mask >> 32) as u32).to_le_bytes(),
        );
        (body, mask)
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> u16 {
        self.offset
    }

    pub fn params(&self) -> &SriovParams {
        &self.params
    }

    /// Whether an access of `len` bytes at `offset` overlaps the capability.
    pub fn overlaps(&self, offset: u16, len: usize) -> bool {
        let start = u32::from(offset);
        let end = start.saturating_add(u32::try_from(len).unwrap_or(u32::MAX));
        let cap = u32::from(self.offset);
        start < cap + SRIOV_CAPABILITY_SIZE as u32 && end > cap
    }

    /// The registers that matter for VFs, as currently in `config`.
    pub fn regs(&self, config: &PciConfiguration) -> SriovRegs {
        let o = self.offset;
        SriovRegs {
            control: config.read_u16(o + SRIOV_CONTROL),
            num_vfs: config.read_u16(o + SRIOV_NUM_VFS),
            vf_bar0: self.vf_bar0_base(config),
        }
    }

    /// Applies a guest configuration write of `data` at `offset` to
    /// `config` (whether or not it touches the capability) and reports what
    /// changed in SR-IOV terms.
    pub fn config_write(
        &self,
        config: &mut PciConfiguration,
        offset: u16,
        data: &[u8],
    ) -> SriovWriteEffect {
        if !self.overlaps(offset, data.len()) {
            config.write(offset, data);
            return SriovWriteEffect::default();
        }
        let before = self.regs(config);
        config.write(offset, data);
        let num = config.read_u16(self.offset + SRIOV_NUM_VFS);
        if num != before.num_vfs && (before.vf_enabled() || num > self.params.total_vfs) {
            log::debug!(
                "ignored NumVFs write of {num} (VF Enable {}, TotalVFs {})",
                before.vf_enabled(),
                self.params.total_vfs
            );
            config.set_u16(self.offset + SRIOV_NUM_VFS, before.num_vfs);
        }
        let mut effect = before.diff(&self.regs(config));
        effect.touched = true;
        effect
    }

    pub fn control(&self, config: &PciConfiguration) -> u16 {
        config.read_u16(self.offset + SRIOV_CONTROL)
    }

    pub fn vf_enabled(&self, config: &PciConfiguration) -> bool {
        self.control(config) & SRIOV_CTRL_VF_ENABLE != 0
    }

    pub fn vf_mse(&self, config: &PciConfiguration) -> bool {
        self.control(config) & SRIOV_CTRL_VF_MSE != 0
    }

    pub fn ari_capable_hierarchy(&self, config: &PciConfiguration) -> bool {
        self.control(config) & SRIOV_CTRL_ARI != 0
    }

    pub fn num_vfs(&self, config: &PciConfiguration) -> u16 {
        config.read_u16(self.offset + SRIOV_NUM_VFS)
    }

    /// System Page Size register (bit n = 4 KiB << n).
    pub fn system_page_size(&self, config: &PciConfiguration) -> u32 {
        config.read_u32(self.offset + SRIOV_SYSTEM_PAGE_SIZE)
    }

    /// The address programmed in VF BAR0/BAR1 (0 if never programmed).
    pub fn vf_bar0_base(&self, config: &PciConfiguration) -> u64 {
        let lo = config.read_u32(self.offset + SRIOV_VF_BAR0) & !0xf;
        let hi = config.read_u32(self.offset + SRIOV_VF_BAR0 + 4);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Routing ID of VF `n` (1..=TotalVFs) of the PF at `pf`: PF RID +
    /// First VF Offset + (n - 1) × VF Stride. `None` if `n` is out of range
    /// or the RID would exceed 0xFFFF.
    pub fn vf_rid(&self, pf: Bdf, n: u16) -> Option<Bdf> {
        if n == 0 || n > self.params.total_vfs {
            return None;
        }
        let rid = u32::from(pf.rid())
            + u32::from(self.params.first_vf_offset)
            + u32::from(n - 1) * u32::from(self.params.vf_stride);
        u16::try_from(rid).ok().map(Bdf::from_rid)
    }

    /// Routing IDs of all TotalVFs VFs, or `None` if one does not fit or
    /// lands on another bus than the PF's.
    pub fn all_vf_rids_on_pf_bus(&self, pf: Bdf) -> Option<Vec<Bdf>> {
        (1..=self.params.total_vfs)
            .map(|n| self.vf_rid(pf, n).filter(|b| b.bus() == pf.bus()))
            .collect()
    }

    /// VF `n`'s BAR0 as decoded now: VF Enable and VF MSE set, `n` in
    /// 1..=NumVFs, VF BAR0 programmed at a usable address.
    pub fn vf_bar0_range(&self, config: &PciConfiguration, n: u16) -> Option<BarRange> {
        let regs = self.regs(config);
        if !regs.vf_enabled() || !regs.vf_mse() || n == 0 || n > regs.num_vfs {
            return None;
        }
        let size = self.params.vf_bar0_size;
        if !bar_address_usable(BarKind::Memory64, size, regs.vf_bar0) {
            return None;
        }
        // The whole NumVFs region must fit the address space.
        let total = size.checked_mul(u64::from(regs.num_vfs))?;
        regs.vf_bar0.checked_add(total - 1)?;
        Some(BarRange {
            index: 0,
            kind: BarKind::Memory64,
            base: regs.vf_bar0 + size * u64::from(n - 1),
            size,
        })
    }

    /// VF `n`'s BAR0 address when decoded.
    pub fn vf_bar0_address(&self, config: &PciConfiguration, n: u16) -> Option<u64> {
        self.vf_bar0_range(config, n).map(|r| r.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::PciHeaderParams;

    fn params() -> SriovParams {
        SriovParams {
            initial_vfs: 4,
            total_vfs: 4,
            first_vf_offset: 8,
            vf_stride: 1,
            vf_device_id: 0x1042,
            vf_bar0_size: 0x4000,
            vf_bar0_prefetchable: false,
            function_dependency_link: 0,
        }
    }

    fn setup() -> (PciConfiguration, SriovCapability) {
        let mut c = PciConfiguration::new(&PciHeaderParams {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            ..Default::default()
        });
        let s = SriovCapability::add_to(&mut c, params()).unwrap();
        (c, s)
    }

    fn w16(s: &SriovCapability, c: &mut PciConfiguration, reg: u16, v: u16) -> SriovWriteEffect {
        s.config_write(c, s.offset() + reg, &v.to_le_bytes())
    }

    fn w32(s: &SriovCapability, c: &mut PciConfiguration, reg: u16, v: u32) -> SriovWriteEffect {
        s.config_write(c, s.offset() + reg, &v.to_le_bytes())
    }

    #[test]
    fn layout() {
        let (c, s) = setup();
        assert_eq!(s.offset(), 0x100);
        assert_eq!(c.read_u32(0x100), 0x0001_0010);
        assert_eq!(
            c.extended_capabilities(),
            vec![(SRIOV_CAPABILITY_ID, 1, 0x100)]
        );
        assert_eq!(c.read_u16(0x100 + SRIOV_INITIAL_VFS), 4);
        assert_eq!(c.read_u16(0x100 + SRIOV_TOTAL_VFS), 4);
        assert_eq!(c.read_u16(0x100 + SRIOV_NUM_VFS), 0);
        assert_eq!(c.read_u16(0x100 + SRIOV_FIRST_VF_OFFSET), 8);
        assert_eq!(c.read_u16(0x100 + SRIOV_VF_STRIDE), 1);
        assert_eq!(c.read_u16(0x100 + SRIOV_VF_DEVICE_ID), 0x1042);
        assert_eq!(c.read_u32(0x100 + SRIOV_SUPPORTED_PAGE_SIZES), 1);
        assert_eq!(c.read_u32(0x100 + SRIOV_SYSTEM_PAGE_SIZE), 1);
        assert_eq!(c.read_u32(0x100 + SRIOV_VF_BAR0), 0b100);
        assert_eq!(c.read_u32(0x100 + SRIOV_VF_MIGRATION_STATE), 0);
        let mut c2 = PciConfiguration::new(&PciHeaderParams::default());
        let bad = SriovParams {
            vf_bar0_size: 0x800,
            ..params()
        };
        assert!(matches!(
            SriovCapability::add_to(&mut c2, bad),
            Err(SriovError::BarSize(0x800))
        ));
        let bad = SriovParams {
            initial_vfs: 5,
            ..params()
        };
        assert_eq!(
            SriovCapability::add_to(&mut c2, bad),
            Err(SriovError::VfCount)
        );
        let bad = SriovParams {
            initial_vfs: 3,
            ..params()
        };
        assert_eq!(
            SriovCapability::add_to(&mut c2, bad),
            Err(SriovError::VfCount)
        );
        let bad = SriovParams {
            vf_stride: 0,
            ..params()
        };
        assert_eq!(
            SriovCapability::add_to(&mut c2, bad),
            Err(SriovError::OffsetStride)
        );
    }

    #[test]
    fn read_only_registers() {
        let (mut c, s) = setup();
        for reg in [
            SRIOV_CAPABILITIES,
            SRIOV_INITIAL_VFS,
            SRIOV_FIRST_VF_OFFSET,
            SRIOV_VF_DEVICE_ID,
            SRIOV_SUPPORTED_PAGE_SIZES,
            SRIOV_VF_BAR0 + 8,
            SRIOV_VF_MIGRATION_STATE,
        ] {
            let before = c.read_u32(0x100 + reg);
            w32(&s, &mut c, reg, 0xffff_ffff);
            assert_eq!(c.read_u32(0x100 + reg), before, "reg {reg:#x}");
        }
        // Control: only VF Enable, VF MSE, ARI.
        w16(&s, &mut c, SRIOV_CONTROL, 0xffff);
        assert_eq!(s.control(&c), 0x19);
        // System page size: only supported bits.
        w32(&s, &mut c, SRIOV_SYSTEM_PAGE_SIZE, 0x10);
        assert_eq!(s.system_page_size(&c), 0);
        w32(&s, &mut c, SRIOV_SYSTEM_PAGE_SIZE, 0x1);
        assert_eq!(s.system_page_size(&c), 1);
    }

    #[test]
    fn num_vfs_write_rules() {
        let (mut c, s) = setup();
        let e = w16(&s, &mut c, SRIOV_NUM_VFS, 3);
        assert_eq!(e.num_vfs, Some(3));
        assert!(e.touched && !e.vf_decode_changed());
        assert_eq!(s.num_vfs(&c), 3);
        // Above TotalVFs: ignored.
        let e = w16(&s, &mut c, SRIOV_NUM_VFS, 5);
        assert_eq!(e.num_vfs, None);
        assert_eq!(s.num_vfs(&c), 3);
        // TotalVFs itself and zero are fine.
        w16(&s, &mut c, SRIOV_NUM_VFS, 4);
        assert_eq!(s.num_vfs(&c), 4);
        w16(&s, &mut c, SRIOV_NUM_VFS, 0);
        assert_eq!(s.num_vfs(&c), 0);
        w16(&s, &mut c, SRIOV_NUM_VFS, 2);
        // VF Enable: reported with NumVFs.
        let e = w16(&s, &mut c, SRIOV_CONTROL, SRIOV_CTRL_VF_ENABLE);
        assert_eq!(e.vf_enable, Some(VfEnableChange::Enabled { num_vfs: 2 }));
        assert_eq!(e.vf_mse, None);
        // NumVFs locked while enabled, also via a byte write.
        let e = w16(&s, &mut c, SRIOV_NUM_VFS, 1);
        assert_eq!(
            e,
            SriovWriteEffect {
                touched: true,
                ..Default::default()
            }
        );
        s.config_write(&mut c, 0x100 + SRIOV_NUM_VFS, &[4]);
        assert_eq!(s.num_vfs(&c), 2);
        // Writing the control register again with the same value: nothing.
        let e = w16(&s, &mut c, SRIOV_CONTROL, SRIOV_CTRL_VF_ENABLE);
        assert!(e.vf_enable.is_none());
        // Clearing VF Enable reports how many VFs go away.
        let e = w16(&s, &mut c, SRIOV_CONTROL, 0);
        assert_eq!(e.vf_enable, Some(VfEnableChange::Disabled { num_vfs: 2 }));
        w16(&s, &mut c, SRIOV_NUM_VFS, 1);
        assert_eq!(s.num_vfs(&c), 1);
        // A 32-bit write at TotalVFs covering NumVFs.
        let e = w32(&s, &mut c, SRIOV_TOTAL_VFS, 0x0003_ffff);
        assert_eq!(e.num_vfs, Some(3));
        assert_eq!(c.read_u16(0x100 + SRIOV_TOTAL_VFS), 4);
        // Writes outside the capability pass through untouched.
        let e = s.config_write(&mut c, 0x04, &[2]);
        assert!(!e.touched);
        assert!(c.memory_enabled());
    }

    #[test]
    fn vf_bar_sizing_and_addresses() {
        let (mut c, s) = setup();
        // Sizing: per-VF size mask.
        w32(&s, &mut c, SRIOV_VF_BAR0, 0xffff_ffff);
        w32(&s, &mut c, SRIOV_VF_BAR0 + 4, 0xffff_ffff);
        assert_eq!(c.read_u32(0x100 + SRIOV_VF_BAR0), 0xffff_c004);
        assert_eq!(c.read_u32(0x100 + SRIOV_VF_BAR0 + 4), 0xffff_ffff);
        w16(&s, &mut c, SRIOV_NUM_VFS, 3);
        w16(
            &s,
            &mut c,
            SRIOV_CONTROL,
            SRIOV_CTRL_VF_ENABLE | SRIOV_CTRL_VF_MSE,
        );
        // All-ones is not decoded.
        assert_eq!(s.vf_bar0_address(&c, 1), None);
        let e = w32(&s, &mut c, SRIOV_VF_BAR0, 0x0000_8000);
        assert!(e.vf_bar_moved);
        let e = w32(&s, &mut c, SRIOV_VF_BAR0 + 4, 0x1);
        assert!(e.vf_bar_moved && e.vf_decode_changed());
        assert_eq!(s.vf_bar0_base(&c), 0x1_0000_8000);
        assert_eq!(s.vf_bar0_address(&c, 1), Some(0x1_0000_8000));
        assert_eq!(s.vf_bar0_address(&c, 3), Some(0x1_0001_0000));
        assert_eq!(
            s.vf_bar0_range(&c, 2),
            Some(BarRange {
                index: 0,
                kind: BarKind::Memory64,
                base: 0x1_0000_c000,
                size: 0x4000
            })
        );
        // Beyond NumVFs, or VF 0: none.
        assert_eq!(s.vf_bar0_address(&c, 4), None);
        assert_eq!(s.vf_bar0_address(&c, 0), None);
        // VF MSE clear: not decoded.
        let e = w16(&s, &mut c, SRIOV_CONTROL, SRIOV_CTRL_VF_ENABLE);
        assert_eq!(e.vf_mse, Some(false));
        assert_eq!(s.vf_bar0_address(&c, 1), None);
        // VF Enable clear: not decoded even with VF MSE.
        w16(&s, &mut c, SRIOV_CONTROL, SRIOV_CTRL_VF_MSE);
        assert_eq!(s.vf_bar0_address(&c, 1), None);
        // Low bits of the address are read-only.
        w32(&s, &mut c, SRIOV_VF_BAR0, 0x1234_5678);
        assert_eq!(c.read_u32(0x100 + SRIOV_VF_BAR0), 0x1234_4004);
    }

    #[test]
    fn vf_routing_ids() {
        let (_, s) = setup();
        let pf = Bdf::new(0, 3, 0);
        assert_eq!(s.vf_rid(pf, 1), Some(Bdf::new(0, 4, 0)));
        assert_eq!(s.vf_rid(pf, 4), Some(Bdf::new(0, 4, 3)));
        assert_eq!(s.vf_rid(pf, 0), None);
        assert_eq!(s.vf_rid(pf, 5), None);
        assert_eq!(s.all_vf_rids_on_pf_bus(pf).map(|v| v.len()), Some(4));

        let mut c = PciConfiguration::new(&PciHeaderParams::default());
        let s = SriovCapability::add_to(
            &mut c,
            SriovParams {
                total_vfs: 8,
                initial_vfs: 8,
                first_vf_offset: 1,
                vf_stride: 2,
                ..params()
            },
        )
        .unwrap();
        let pf = Bdf::new(1, 31, 0);
        assert_eq!(s.vf_rid(pf, 1), Some(Bdf::new(1, 31, 1)));
        assert_eq!(s.vf_rid(pf, 3), Some(Bdf::new(1, 31, 5)));
        assert_eq!(s.vf_rid(pf, 4), Some(Bdf::new(1, 31, 7)));
        // VF 5 spills onto bus 2.
        assert_eq!(s.vf_rid(pf, 5), Some(Bdf::new(2, 0, 1)));
        assert_eq!(s.all_vf_rids_on_pf_bus(pf), None);
        // RID overflow.
        assert_eq!(s.vf_rid(Bdf::new(0xff, 31, 7), 1), None);
    }

    #[test]
    fn reset_clears_vf_state() {
        let (mut c, s) = setup();
        w16(&s, &mut c, SRIOV_NUM_VFS, 2);
        w32(&s, &mut c, SRIOV_VF_BAR0, 0x8000_0000);
        w16(
            &s,
            &mut c,
            SRIOV_CONTROL,
            SRIOV_CTRL_VF_ENABLE | SRIOV_CTRL_VF_MSE,
        );
        let before = s.regs(&c);
        c.reset();
        let e = before.diff(&s.regs(&c));
        assert_eq!(e.vf_enable, Some(VfEnableChange::Disabled { num_vfs: 2 }));
        assert_eq!(e.vf_mse, Some(false));
        assert!(e.vf_bar_moved);
        assert_eq!(s.num_vfs(&c), 0);
        assert_eq!(s.system_page_size(&c), 1);
        assert_eq!(c.read_u16(0x100 + SRIOV_TOTAL_VFS), 4);
    }
}
