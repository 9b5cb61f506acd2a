//! The virtio-iommu's translation state: domains, their mappings and which
//! endpoint is attached where, with the request semantics of virtio 1.4
//! §5.13.6 and the translation the endpoints' DMA goes through.
//!
//! A plain state machine: [`Tables`] is changed only by the request queue
//! (ATTACH, DETACH, MAP, UNMAP) and by device reset, and read by
//! [`Tables::translate`] on every DMA access of a managed endpoint.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use vm_memory::Permissions;
use vm_migration::dma::{MSI_WINDOW_LEN, MSI_WINDOW_START};
use vm_migration::{DmaFault, DmaRun};

/// Request status codes (`struct virtio_iommu_req_tail.status`).
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
    pub const DEVERR: u8 = 3;
    pub const INVAL: u8 = 4;
    pub const RANGE: u8 = 5;
    pub const NOENT: u8 = 6;
    pub const FAULT: u8 = 7;
    pub const NOMEM: u8 = 8;
}

/// `VIRTIO_IOMMU_ATTACH_F_BYPASS`.
pub const ATTACH_F_BYPASS: u32 = 1 << 0;
/// `VIRTIO_IOMMU_MAP_F_READ`.
pub const MAP_F_READ: u32 = 1 << 0;
/// `VIRTIO_IOMMU_MAP_F_WRITE`.
pub const MAP_F_WRITE: u32 = 1 << 1;

/// Page granularity of mappings: 4 KiB.
pub const PAGE_SIZE: u64 = 0x1000;
/// `page_size_mask`: every power of two from 4 KiB on.
pub const PAGE_SIZE_MASK: u64 = !(PAGE_SIZE - 1);
/// `input_range`: the DMA addresses a mapping may use (48 bits).
pub const INPUT_RANGE: RangeInclusive<u64> = 0..=(1 << 48) - 1;
/// `domain_range`: the domain IDs the driver may use.
pub const DOMAIN_RANGE: RangeInclusive<u32> = 0..=u32::MAX;
/// At most this many mappings in all domains together (a request beyond
/// gets `NOMEM`): the guest cannot make the VMM allocate without bound.
pub const MAX_MAPPINGS: usize = 1 << 20;

/// One mapping made by one MAP request: DMA `start..=end` to guest physical
/// `phys..`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mapping {
    pub end: u64,
    pub phys: u64,
    pub flags: u32,
}

/// A domain: an address space shared by the endpoints attached to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Domain {
    /// Created by an ATTACH with `VIRTIO_IOMMU_ATTACH_F_BYPASS`: identity,
    /// no mappings.
    pub bypass: bool,
    /// Mappings by first DMA address; they never overlap.
    pub mappings: BTreeMap<u64, Mapping>,
    /// Endpoints attached to it (the domain goes away with the last).
    pub endpoints: u32,
}

/// The translation state (plain data: it is also the saved state).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tables {
    /// The `bypass` configuration field: unattached endpoints are in bypass
    /// mode while it is 1.
    pub bypass: bool,
    pub domains: BTreeMap<u32, Domain>,
    /// Endpoint ID -> the domain it is attached to.
    pub attached: BTreeMap<u32, u32>,
    /// Mappings in all domains.
    pub mapping_count: usize,
}

impl Tables {
    /// Nothing attached, global bypass as given.
    pub fn new(bypass: bool) -> Self {
        Tables {
            bypass,
            domains: BTreeMap::new(),
            attached: BTreeMap::new(),
            mapping_count: 0,
        }
    }

    /// Device reset: no endpoint is attached to any domain (§5.13.5);
    /// `bypass` is kept (it changes on system reset only).
    pub fn reset(&mut self) {
        self.domains.clear();
        self.attached.clear();
        self.mapping_count = 0;
    }

    /// ATTACH `endpoint` (one that `exists`) to `domain`, creating it if
    /// needed; an endpoint attached elsewhere is detached first.
    pub fn attach(&mut self, domain: u32, endpoint: u32, flags: u32, exists: bool) -> u8 {
        if flags & !ATTACH_F_BYPASS != 0 {
            return status::INVAL;
        }
        if !exists {
            return status::NOENT;
        }
        let bypass = flags & ATTACH_F_BYPASS != 0;
        if let Some(d) = self.domains.get(&domain) {
            if d.bypass != bypass {
                return status::INVAL;
            }
        }
        match self.attached.get(&endpoint) {
            Some(&d) if d == domain => return status::OK,
            Some(&d) => self.detach_from(d, endpoint),
            None => {}
        }
        let d = self.domains.entry(domain).or_insert_with(|| Domain {
            bypass,
            ..Default::default()
        });
        d.endpoints += 1;
        self.attached.insert(endpoint, domain);
        status::OK
    }

    /// DETACH `endpoint` (one that `exists`) from `domain`.
    pub fn detach(&mut self, domain: u32, endpoint: u32, exists: bool) -> u8 {
        if !exists {
            return status::NOENT;
        }
        if self.attached.get(&endpoint) != Some(&domain) {
            return status::INVAL;
        }
        self.detach_from(domain, endpoint);
        status::OK
    }

    fn detach_from(&mut self, domain: u32, endpoint: u32) {
        self.attached.remove(&endpoint);
        let gone = match self.domains.get_mut(&domain) {
            Some(d) => {
                d.endpoints = d.endpoints.saturating_sub(1);
                d.endpoints == 0
            }
            None => false,
        };
        if gone {
            if let Some(d) = self.domains.remove(&domain) {
                self.mapping_count -= d.mappings.len();
            }
        }
    }

    /// MAP DMA `start..=end` of `domain` to guest physical `phys`.
    pub fn map(&mut self, domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> u8 {
        if flags & !(MAP_F_READ | MAP_F_WRITE) != 0 || end < start {
            return status::INVAL;
        }
        let Some(d) = self.domains.get_mut(&domain) else {
            return status::NOENT;
        };
        if d.bypass {
            return status::INVAL;
        }
        let aligned = |a: u64| a.is_multiple_of(PAGE_SIZE);
        if !aligned(start) || !aligned(phys) || !end.checked_add(1).is_none_or(aligned) {
            return status::RANGE;
        }
        if !INPUT_RANGE.contains(&start) || !INPUT_RANGE.contains(&end) {
            return status::RANGE;
        }
        if phys.checked_add(end - start).is_none() {
            return status::RANGE;
        }
        // The MSI window is reserved (the PROBE's RESV_MEM property).
        let msi_last = MSI_WINDOW_START + MSI_WINDOW_LEN - 1;
        if start <= msi_last && end >= MSI_WINDOW_START {
            return status::INVAL;
        }
        let overlaps = d
            .mappings
            .range(..=end)
            .next_back()
            .is_some_and(|(_, m)| m.end >= start);
        if overlaps {
            return status::INVAL;
        }
        if self.mapping_count >= MAX_MAPPINGS {
            return status::NOMEM;
        }
        d.mappings.insert(start, Mapping { end, phys, flags });
        self.mapping_count += 1;
        status::OK
    }

    /// UNMAP every mapping of `domain` inside `start..=end`; refuses
    /// (RANGE, nothing removed) one that would split a mapping.
    pub fn unmap(&mut self, domain: u32, start: u64, end: u64) -> u8 {
        let Some(d) = self.domains.get_mut(&domain) else {
            return status::NOENT;
        };
        if d.bypass {
            return status::INVAL;
        }
        if end < start {
            return status::INVAL;
        }
        // A mapping starting before the range and reaching into it, or one
        // starting inside and ending after it, would be split.
        let split_low = d
            .mappings
            .range(..start)
            .next_back()
            .is_some_and(|(_, m)| m.end >= start);
        let split_high = d
            .mappings
            .range(start..=end)
            .next_back()
            .is_some_and(|(_, m)| m.end > end);
        if split_low || split_high {
            return status::RANGE;
        }
        let keys: Vec<u64> = d.mappings.range(start..=end).map(|(&k, _)| k).collect();
        for k in &keys {
            d.mappings.remove(k);
        }
        self.mapping_count -= keys.len();
        status::OK
    }

    /// Where `endpoint`'s DMA at `addr` goes for `access` (`Ok(None)`:
    /// bypass, identity).
    pub fn translate(
        &self,
        endpoint: u32,
        addr: u64,
        access: Permissions,
    ) -> Result<Option<DmaRun>, DmaFault> {
        let Some(domain) = self.attached.get(&endpoint) else {
            return if self.bypass {
                Ok(None)
            } else {
                Err(DmaFault::Blocked)
            };
        };
        let Some(d) = self.domains.get(domain) else {
            return Err(DmaFault::Blocked);
        };
        if d.bypass {
            return Ok(None);
        }
        let Some((&start, m)) = d.mappings.range(..=addr).next_back() else {
            return Err(DmaFault::Unmapped);
        };
        if addr > m.end {
            return Err(DmaFault::Unmapped);
        }
        let mut allowed = Permissions::No;
        if m.flags & MAP_F_READ != 0 {
            allowed = allowed | Permissions::Read;
        }
        if m.flags & MAP_F_WRITE != 0 {
            allowed = allowed | Permissions::Write;
        }
        if !allowed.allow(access) {
            return Err(DmaFault::Denied);
        }
        let off = addr - start;
        Ok(Some(DmaRun {
            gpa: m.phys + off,
            len: (m.end - addr).saturating_add(1),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attached(domain: u32, ep: u32) -> Tables {
        let mut t = Tables::new(false);
        assert_eq!(t.attach(domain, ep, 0, true), status::OK);
        t
    }

    #[test]
    fn translation_follows_mappings_and_permissions() {
        let mut t = attached(1, 8);
        assert_eq!(t.map(1, 0x1000, 0x2fff, 0xa000, MAP_F_READ), status::OK);
        let r = t.translate(8, 0x1800, Permissions::Read).unwrap().unwrap();
        assert_eq!((r.gpa, r.len), (0xa800, 0x1800));
        assert_eq!(
            t.translate(8, 0x1800, Permissions::Write),
            Err(DmaFault::Denied)
        );
        assert_eq!(
            t.translate(8, 0x3000, Permissions::Read),
            Err(DmaFault::Unmapped)
        );
        assert_eq!(
            t.translate(8, 0xfff, Permissions::Read),
            Err(DmaFault::Unmapped)
        );
        // Another endpoint, unattached, global bypass off: blocked.
        assert_eq!(
            t.translate(9, 0x1800, Permissions::Read),
            Err(DmaFault::Blocked)
        );
        t.bypass = true;
        assert_eq!(t.translate(9, 0x1800, Permissions::Read), Ok(None));
    }

    #[test]
    fn a_mapping_up_to_the_top_of_the_input_range() {
        let mut t = attached(1, 8);
        let top = *INPUT_RANGE.end();
        assert_eq!(
            t.map(1, top - 0xfff, top, 0, MAP_F_READ | MAP_F_WRITE),
            status::OK
        );
        let r = t.translate(8, top, Permissions::Write).unwrap().unwrap();
        assert_eq!((r.gpa, r.len), (0xfff, 1));
        assert_eq!(
            t.map(1, top + 1, top + 0x1000, 0, MAP_F_READ),
            status::RANGE
        );
        assert_eq!(t.map(1, 0, u64::MAX, 0, MAP_F_READ), status::RANGE);
        // The physical end may not wrap.
        assert_eq!(
            t.map(1, 0, 0x1fff, u64::MAX - 0xfff, MAP_F_READ),
            status::RANGE
        );
    }
}
