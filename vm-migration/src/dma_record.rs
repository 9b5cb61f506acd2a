//! A member's write records keyed by DMA address (R-WR-3 when an IOMMU
//! translates the member's DMA: the records are I/O virtual addresses, the
//! VMM's dirty log stays guest physical).
//!
//! The member's [`crate::DmaMemory`] carries its [`DmaRecords`]; each
//! slice it hands out knows the DMA address of its first byte, so a write
//! marks the guest physical pages in the shared dirty log (as every write
//! does) and, while recording, the DMA pages in the started ranges that
//! contain them. Each started range has a bitmap of its 4 KiB pages; the
//! set of ranges is replaced as a whole by START and STOP (an
//! [`arc_swap::ArcSwap`]), so a write takes no lock: one relaxed load when
//! recording is off, a lock-free load, a binary search among the ranges and
//! one `fetch_or` per record word touched when it is on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::dirty::{PageBitmap, RecordError, RecordRange, DIRTY_PAGE_SHIFT, DIRTY_PAGE_SIZE};

/// The most 4 KiB pages all started ranges of one member may cover (2^26:
/// 256 GiB of DMA address space, 8 MiB of record bits); a START beyond is
/// refused, so a guest cannot make the VMM allocate without bound.
pub const MAX_DMA_RECORD_PAGES: u64 = 1 << 26;

#[derive(Debug)]
struct DmaRange {
    start: u64,
    /// One past the last byte.
    end: u64,
    bits: Arc<PageBitmap>,
}

/// The records of one member, by DMA address.
#[derive(Debug)]
pub struct DmaRecords {
    on: AtomicBool,
    ranges: ArcSwap<Vec<DmaRange>>,
}

impl Default for DmaRecords {
    fn default() -> Self {
        DmaRecords {
            on: AtomicBool::new(false),
            ranges: ArcSwap::from_pointee(Vec::new()),
        }
    }
}

impl DmaRecords {
    /// A write of `len` bytes at DMA address `addr` (the shared dirty log
    /// has been marked already).
    #[inline]
    pub fn mark(&self, addr: u64, len: usize) {
        if len == 0 || !self.on.load(Ordering::Relaxed) {
            return;
        }
        let end = addr.saturating_add(len as u64);
        let ranges = self.ranges.load();
        // First range whose end lies past `addr`.
        let i = ranges.partition_point(|r| r.end <= addr);
        for r in ranges[i..].iter().take_while(|r| r.start < end) {
            let lo = addr.max(r.start) - r.start;
            let hi = end.min(r.end) - r.start;
            r.bits.set_pages(
                (lo >> DIRTY_PAGE_SHIFT) as usize,
                ((hi - 1) >> DIRTY_PAGE_SHIFT) as usize,
            );
        }
    }

    /// Adds `new` (validated: aligned, non-overlapping with each other and
    /// with the started ranges) to the started ranges; nothing changes on
    /// error.
    pub(crate) fn start(&self, new: &[RecordRange]) -> Result<(), RecordError> {
        let cur = self.ranges.load();
        let pages = |s: u64, e: u64| (e - s).div_ceil(DIRTY_PAGE_SIZE);
        let total: u64 = cur
            .iter()
            .map(|r| pages(r.start, r.end))
            .chain(new.iter().map(|r| pages(r.addr, r.end())))
            .fold(0u64, u64::saturating_add);
        if total > MAX_DMA_RECORD_PAGES {
            return Err(RecordError::TooLarge {
                pages: total,
                max: MAX_DMA_RECORD_PAGES,
            });
        }
        let mut next: Vec<DmaRange> = cur
            .iter()
            .map(|r| DmaRange {
                start: r.start,
                end: r.end,
                bits: r.bits.clone(),
            })
            .collect();
        for r in new {
            let n = pages(r.addr, r.end());
            next.push(DmaRange {
                start: r.addr,
                end: r.end(),
                bits: Arc::new(PageBitmap::new(n as usize)),
            });
        }
        next.sort_unstable_by_key(|r| r.start);
        self.ranges.store(Arc::new(next));
        self.on.store(true, Ordering::Release);
        Ok(())
    }

    /// Drops every range and record.
    pub(crate) fn stop(&self) {
        self.on.store(false, Ordering::Release);
        self.ranges.store(Arc::new(Vec::new()));
    }

    /// Appends to `out` the pages of size `p` anchored at `s` (a started
    /// range's start) with a record among DMA addresses `lo..hi`, clearing
    /// the bits of what it returns; true when `out` reached `limit`.
    pub(crate) fn scan(
        &self,
        lo: u64,
        hi: u64,
        s: u64,
        p: u64,
        limit: usize,
        out: &mut Vec<u64>,
    ) -> bool {
        let ranges = self.ranges.load();
        let mut last: Option<u64> = None;
        for r in ranges.iter().filter(|r| r.end > lo && r.start < hi) {
            let first = ((lo.max(r.start) - r.start) >> DIRTY_PAGE_SHIFT) as usize;
            let stop = ((hi.min(r.end) - r.start).div_ceil(DIRTY_PAGE_SIZE)) as usize;
            if r.bits
                .take_grouped(first, stop, r.start, s, p, limit, &mut last, out)
            {
                return true;
            }
        }
        false
    }

    /// DMA addresses of the recorded 4 KiB pages, ascending.
    pub(crate) fn pages(&self) -> Vec<u64> {
        self.ranges
            .load()
            .iter()
            .flat_map(|r| r.bits.set_addresses(r.start))
            .collect()
    }
}
