//! The dirty-tracking bitmap used by all guest memory of the VMM, and the
//! per-member write recorder of the virtio-pf device (spec §5, R-WR-1..7).
//!
//! # One write path
//!
//! Every region of [`GuestMemoryMmap`] carries a [`DirtyBitmap`]. Its
//! `mark_dirty` (called by vm-memory for every write made through the
//! `Bytes` API or a `VolatileSlice` taken from it) sets the written 4 KiB
//! pages in a page bitmap shared by everybody who writes that region: this is
//! the VMM's own dirty log ([`DirtyBitmap::get_and_reset`],
//! [`take_dirty_log`]).
//!
//! A virtio-pf member device gets its own *view* of guest memory
//! ([`WriteRecorder::member_view`]): new `GuestRegionMmap`s over the very
//! same host mappings, whose bitmaps point at the same shared page bitmaps
//! **and** at the member's per-region [`RegionRecord`]. While the member is
//! recording, a write through the view additionally sets the member's record
//! bits for the pages that lie inside its started ranges (a per-region range
//! mask selects them). When recording is off the only extra work is one
//! relaxed load and one well-predicted branch.
//!
//! Both bitmaps are arrays of `AtomicU64`; a write touching pages `a..=b`
//! performs one `fetch_or` per shared bitmap word touched (so at most one per
//! page) and, while recording, one per record word whose bits are not yet
//! set, with no allocation and no lock.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};

use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use crate::dma_record::DmaRecords;

/// Granularity of both the VMM's dirty log and the write records: 4 KiB.
pub const DIRTY_PAGE_SHIFT: u32 = 12;
/// Size in bytes of one tracked page.
pub const DIRTY_PAGE_SIZE: u64 = 1 << DIRTY_PAGE_SHIFT;

/// `supported_page_size_bitmap` of DEV_WRITE_RECORD_CAP_QUERY (R-WR-1):
/// bit n = 4 KiB << n. This device records at 4 KiB, 64 KiB and 2 MiB.
pub const SUPPORTED_PAGE_SIZE_BITMAP: u32 = (1 << 0) | (1 << 4) | (1 << 9);

/// Default number of write-record ranges a member supports (R-WR-1).
pub const DEFAULT_SUPPORTED_RANGES: u32 = 64;

/// Errors of the dirty-tracking layer.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The guest memory given to a recorder does not have the layout the
    /// recorder was created for.
    #[error("guest memory region at {start:#x} (+{len:#x}) is not known to the write recorder")]
    UnknownRegion {
        /// Guest physical start of the region.
        start: u64,
        /// Length of the region.
        len: u64,
    },
    /// A guest memory region does not start on a 4 KiB boundary.
    #[error("guest memory region at {0:#x} is not 4 KiB aligned")]
    UnalignedRegion(u64),
    /// Building the member's view of a region failed.
    #[error("failed to build a member view of guest memory region at {start:#x}: {source}")]
    BuildView {
        /// Guest physical start of the region.
        start: u64,
        /// The vm-memory error.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The view's regions could not be assembled into a guest memory object.
    #[error("failed to assemble the member view of guest memory: {0}")]
    Assemble(vm_memory::GuestRegionCollectionError),
    /// Region arithmetic overflowed.
    #[error("guest memory region at {0:#x} overflows the address space")]
    RegionOverflow(u64),
}

/// Errors of the write-record commands (mapped to admin status codes by the
/// device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// START with a page size that is not in [`SUPPORTED_PAGE_SIZE_BITMAP`].
    #[error("write-record page size {0:#x} is not supported")]
    UnsupportedPageSize(u64),
    /// START with no entries.
    #[error("write-record start carries no ranges")]
    NoRanges,
    /// A range address is not aligned to the page size.
    #[error("write-record range address {addr:#x} is not aligned to page size {page_size:#x}")]
    Unaligned {
        /// The range's start address.
        addr: u64,
        /// The page size in use.
        page_size: u64,
    },
    /// A range has no pages or wraps around the address space.
    #[error("write-record range at {addr:#x} with {count} pages is empty or overflows")]
    BadRange {
        /// The range's start address.
        addr: u64,
        /// Its page count.
        count: u64,
    },
    /// Two ranges overlap.
    #[error("write-record range at {0:#x} overlaps another range")]
    Overlap(u64),
    /// More ranges than `supported_ranges`.
    #[error("write-record ranges would number {total}, more than the {supported} supported")]
    TooManyRanges {
        /// Ranges after this START.
        total: usize,
        /// The supported maximum.
        supported: u32,
    },
    /// The ranges would cover more DMA pages than the records may take
    /// (DMA-keyed records, [`crate::dma_record::MAX_DMA_RECORD_PAGES`]).
    #[error("write-record ranges would cover {pages} pages, more than the {max} recordable")]
    TooLarge {
        /// 4 KiB pages the ranges would cover.
        pages: u64,
        /// The limit.
        max: u64,
    },
    /// READ while recording is not started.
    #[error("write recording is not started")]
    NotStarted,
    /// READ with a window that is not page aligned or wraps around.
    #[error("write-record read window {addr:#x} + {len:#x} is not 4 KiB aligned or overflows")]
    BadWindow {
        /// Window start.
        addr: u64,
        /// Window length.
        len: u64,
    },
}

/// A bitmap of 4 KiB pages made of atomic words.
#[derive(Debug)]
pub struct PageBitmap {
    words: Box<[AtomicU64]>,
    pages: usize,
}

#[inline]
fn word_mask(first_bit: usize, last_bit: usize) -> u64 {
    // Bits first_bit..=last_bit of a word, both < 64.
    (u64::MAX << first_bit) & (u64::MAX >> (63 - last_bit))
}

impl PageBitmap {
    /// A bitmap for `pages` pages, all clear.
    pub fn new(pages: usize) -> Self {
        let n = pages.div_ceil(64);
        PageBitmap {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Number of pages tracked.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The words, for scanning.
    pub fn words(&self) -> &[AtomicU64] {
        &self.words
    }

    /// Set pages `first..=last` (clamped to the bitmap). Sequentially
    /// consistent: the caller's preceding data write is visible before the
    /// bits (a reader that resets the bits and then copies the page sees it).
    #[inline]
    pub fn set_pages(&self, first: usize, last: usize) {
        if self.pages == 0 || first >= self.pages {
            return;
        }
        let last = last.min(self.pages - 1);
        let (fw, lw) = (first >> 6, last >> 6);
        if fw == lw {
            self.words[fw].fetch_or(word_mask(first & 63, last & 63), Ordering::SeqCst);
            return;
        }
        self.words[fw].fetch_or(word_mask(first & 63, 63), Ordering::SeqCst);
        for w in &self.words[fw + 1..lw] {
            w.fetch_or(u64::MAX, Ordering::SeqCst);
        }
        self.words[lw].fetch_or(word_mask(0, last & 63), Ordering::SeqCst);
    }

    /// Clear pages `first..end` (clamped).
    pub fn clear_pages(&self, first: usize, end: usize) {
        let end = end.min(self.pages);
        if first >= end {
            return;
        }
        let last = end - 1;
        for w in (first >> 6)..=(last >> 6) {
            let lo = if w == first >> 6 { first & 63 } else { 0 };
            let hi = if w == last >> 6 { last & 63 } else { 63 };
            self.words[w].fetch_and(!word_mask(lo, hi), Ordering::AcqRel);
        }
    }

    /// Whether `page` is set.
    pub fn is_set(&self, page: usize) -> bool {
        page < self.pages && self.words[page >> 6].load(Ordering::Acquire) & (1 << (page & 63)) != 0
    }

    /// Atomically read and clear every word.
    pub fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect()
    }

    /// Clear every word.
    pub fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }

    /// Addresses of the set pages, page `i` being at `base + i * 4 KiB`,
    /// ascending.
    pub fn set_addresses(&self, base: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for (wi, word) in self.words.iter().enumerate() {
            let mut v = word.load(Ordering::Acquire);
            while v != 0 {
                let bit = v.trailing_zeros() as usize;
                v &= v - 1;
                out.push(base + (((wi << 6) + bit) as u64) * DIRTY_PAGE_SIZE);
            }
        }
        out
    }

    /// Takes the set pages among `first..stop` (page `i` at `base + i *
    /// 4 KiB`): appends to `out`, ascending and once each, the page of size
    /// `p` anchored at `s` each falls in, until `out` holds `limit`, and
    /// clears exactly the bits of the pages returned. `last` is the last
    /// page appended (carried between calls of one READ). True when `out`
    /// is full.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn take_grouped(
        &self,
        first: usize,
        stop: usize,
        base: u64,
        s: u64,
        p: u64,
        limit: usize,
        last: &mut Option<u64>,
        out: &mut Vec<u64>,
    ) -> bool {
        let stop = stop.min(self.pages);
        if first >= stop {
            return false;
        }
        let lastp = stop - 1;
        let (fw, lw) = (first >> 6, lastp >> 6);
        for wi in fw..=lw {
            let word = &self.words[wi];
            let lob = if wi == fw { first & 63 } else { 0 };
            let hib = if wi == lw { lastp & 63 } else { 63 };
            let mut v = word.load(Ordering::Acquire) & word_mask(lob, hib);
            let mut take = 0u64;
            let mut full = false;
            while v != 0 {
                let bit = v.trailing_zeros() as usize;
                let addr = base + (((wi << 6) + bit) as u64) * DIRTY_PAGE_SIZE;
                let rp = s + (addr - s) / p * p;
                if *last != Some(rp) {
                    if out.len() >= limit {
                        full = true;
                        break;
                    }
                    out.push(rp);
                    *last = Some(rp);
                }
                take |= 1 << bit;
                v &= v - 1;
            }
            if take != 0 {
                word.fetch_and(!take, Ordering::SeqCst);
            }
            if full {
                return true;
            }
        }
        false
    }
}

/// The record bits of one member for one guest memory region.
#[derive(Debug)]
struct RecordWords {
    /// Pages inside a started range.
    mask: PageBitmap,
    /// Pages written while inside a started range and not yet read.
    rec: PageBitmap,
}

/// One member's write-record state for one guest memory region, shared
/// between the member's [`WriteRecorder`] and the bitmap of the member's view
/// of that region.
#[derive(Debug)]
pub struct RegionRecord {
    /// Recording is on and some started range touches this region.
    on: AtomicBool,
    pages: usize,
    /// Allocated at the first START touching the region.
    words: OnceLock<RecordWords>,
}

impl RegionRecord {
    fn new(pages: usize) -> Self {
        RegionRecord {
            on: AtomicBool::new(false),
            pages,
            words: OnceLock::new(),
        }
    }

    fn words(&self) -> &RecordWords {
        self.words.get_or_init(|| RecordWords {
            mask: PageBitmap::new(self.pages),
            rec: PageBitmap::new(self.pages),
        })
    }

    #[inline]
    fn mark(&self, first: usize, last: usize) {
        let Some(w) = self.words.get() else {
            return;
        };
        if first >= self.pages {
            return;
        }
        let last = last.min(self.pages - 1);
        let (fw, lw) = (first >> 6, last >> 6);
        for i in fw..=lw {
            let lo = if i == fw { first & 63 } else { 0 };
            let hi = if i == lw { last & 63 } else { 63 };
            let m = word_mask(lo, hi) & w.mask.words[i].load(Ordering::Relaxed);
            // The shared bitmap's `fetch_or` (SeqCst) just before orders
            // the data write ahead of this load. Bits already set mean the
            // READ that will clear them comes later and returns this page,
            // with the data visible: the read-modify-write (a second locked
            // operation, ~100 ns after a cache-missing store) is skipped.
            // Bits found clear are set with an RMW, ordered with the READ's
            // `fetch_and` on the word: a page written after being returned
            // is recorded again.
            if m != 0 && w.rec.words[i].load(Ordering::SeqCst) & m != m {
                w.rec.words[i].fetch_or(m, Ordering::SeqCst);
            }
        }
    }
}

static NO_RECORD: LazyLock<Arc<RegionRecord>> = LazyLock::new(|| Arc::new(RegionRecord::new(0)));

/// The bitmap behind every guest-memory region: a shared per-region page
/// bitmap (the VMM's dirty log) plus, for a member's view, that member's
/// record bits.
pub struct DirtyBitmap {
    shared: Arc<PageBitmap>,
    record: Arc<RegionRecord>,
    /// For a member view: keeps the VMM's mapping (which owns the host
    /// memory) alive for as long as the view region exists.
    owner: Option<Arc<MmapRegion<DirtyBitmap>>>,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("pages", &self.shared.pages)
            .field("member_view", &self.owner.is_some())
            .finish()
    }
}

impl DirtyBitmap {
    /// A bitmap for a region of `len` bytes with no recorder.
    pub fn new(len: usize) -> Self {
        DirtyBitmap {
            shared: Arc::new(PageBitmap::new(len.div_ceil(DIRTY_PAGE_SIZE as usize))),
            record: NO_RECORD.clone(),
            owner: None,
        }
    }

    /// Number of 4 KiB pages tracked.
    pub fn page_count(&self) -> usize {
        self.shared.pages
    }

    /// Whether the page at region offset `offset` is dirty in the shared
    /// (VMM) log.
    pub fn is_addr_set(&self, offset: usize) -> bool {
        self.shared.is_set(offset >> DIRTY_PAGE_SHIFT)
    }

    /// Read and reset the shared (VMM) dirty log of this region: bit `i` of
    /// word `w` is page `w * 64 + i`.
    pub fn get_and_reset(&self) -> Vec<u64> {
        self.shared.take()
    }

    /// Reset the shared (VMM) dirty log of this region.
    pub fn reset(&self) {
        self.shared.clear()
    }

    /// Whether this is a member view's bitmap.
    pub fn is_member_view(&self) -> bool {
        self.owner.is_some()
    }

    #[inline]
    fn mark(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset >> DIRTY_PAGE_SHIFT;
        let last = offset.saturating_add(len - 1) >> DIRTY_PAGE_SHIFT;
        self.shared.set_pages(first, last);
        if self.record.on.load(Ordering::Relaxed) {
            self.record.mark(first, last);
        }
    }
}

impl Default for DirtyBitmap {
    fn default() -> Self {
        DirtyBitmap::new(0)
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = DirtySlice<'a>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.mark(offset, len)
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.is_addr_set(offset)
    }

    fn slice_at(&self, offset: usize) -> DirtySlice<'_> {
        DirtySlice {
            bitmap: self,
            base: offset,
            dma: None,
        }
    }
}

impl NewBitmap for DirtyBitmap {
    fn with_len(len: usize) -> Self {
        DirtyBitmap::new(len)
    }
}

/// A view into a [`DirtyBitmap`] starting at a region offset; for memory
/// reached through an IOMMU by a recording member, also the member's
/// DMA-keyed records and the DMA address of the view's first byte.
#[derive(Clone, Copy)]
pub struct DirtySlice<'a> {
    bitmap: &'a DirtyBitmap,
    base: usize,
    dma: Option<(&'a DmaRecords, u64)>,
}

impl fmt::Debug for DirtySlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dma {
            None => write!(f, "DirtySlice(+{:#x})", self.base),
            Some((_, a)) => write!(f, "DirtySlice(+{:#x}, dma {a:#x})", self.base),
        }
    }
}

impl<'a> DirtySlice<'a> {
    /// The same view, whose writes also go to `records` at DMA address
    /// `addr` (of the view's first byte).
    pub fn with_dma(self, records: &'a DmaRecords, addr: u64) -> Self {
        DirtySlice {
            dma: Some((records, addr)),
            ..self
        }
    }
}

impl<'a> WithBitmapSlice<'_> for DirtySlice<'a> {
    type S = Self;
}

impl BitmapSlice for DirtySlice<'_> {}

impl Bitmap for DirtySlice<'_> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        // Offsets come with an access vm-memory has range-checked; wrapping
        // can at worst mark a wrong page (a false positive), never skip one.
        self.bitmap.mark(self.base.wrapping_add(offset), len);
        if let Some((records, addr)) = self.dma {
            records.mark(addr.wrapping_add(offset as u64), len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.bitmap.is_addr_set(self.base.wrapping_add(offset))
    }

    fn slice_at(&self, offset: usize) -> Self {
        DirtySlice {
            bitmap: self.bitmap,
            base: self.base.wrapping_add(offset),
            dma: self.dma.map(|(r, a)| (r, a.wrapping_add(offset as u64))),
        }
    }
}

/// Guest memory as seen by the VMM and its devices: every write through the
/// `Bytes` API marks the written pages in the region's [`DirtyBitmap`].
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;

/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyBitmap>;

/// The dirty log of one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDirtyLog {
    /// Guest physical address of the region.
    pub start: GuestAddress,
    /// Bit `i` of word `w` set = page `start + (w * 64 + i) * 4 KiB` dirty.
    pub bits: Vec<u64>,
}

/// Read and reset the VMM's dirty log of every region of `mem`.
pub fn take_dirty_log(mem: &GuestMemoryMmap) -> Vec<RegionDirtyLog> {
    mem.iter()
        .map(|r| {
            let mapping: &MmapRegion<DirtyBitmap> = r;
            RegionDirtyLog {
                start: r.start_addr(),
                bits: mapping.bitmap().get_and_reset(),
            }
        })
        .collect()
}

/// One started write-record range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordRange {
    /// First byte (guest physical address), aligned to `page_size`.
    pub addr: u64,
    /// Number of pages.
    pub count: u64,
    /// Page size of this range.
    pub page_size: u64,
}

impl RecordRange {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.addr + self.count * self.page_size
    }
}

#[derive(Debug)]
struct RecordedRegion {
    start: u64,
    len: u64,
    rec: Arc<RegionRecord>,
}

/// A member's write recorder (spec §5): its started ranges and its record
/// bits: per guest memory region, marked by its memory view
/// ([`WriteRecorder::new`], DMA addresses are guest physical), or per
/// started range by DMA address, marked by its translated
/// [`crate::DmaMemory`] ([`WriteRecorder::for_dma`], an IOMMU translates
/// the member's DMA).
#[derive(Debug)]
pub struct WriteRecorder {
    regions: Vec<RecordedRegion>,
    dma: Option<Arc<DmaRecords>>,
    ranges: Vec<RecordRange>,
    supported_ranges: u32,
}

/// Snapshot of a recorder (spec §6): ranges and the 4 KiB pages recorded and
/// not yet read.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecorderState {
    /// Started ranges.
    pub ranges: Vec<RecordRange>,
    /// Guest physical addresses of recorded 4 KiB pages, ascending.
    pub pages: Vec<u64>,
}

impl WriteRecorder {
    /// A recorder (not recording) for the region layout of `mem`.
    pub fn new(mem: &GuestMemoryMmap, supported_ranges: u32) -> Result<Self, DirtyError> {
        let mut regions = Vec::new();
        for r in mem.iter() {
            let start = r.start_addr().0;
            let len = r.len();
            if !start.is_multiple_of(DIRTY_PAGE_SIZE) {
                return Err(DirtyError::UnalignedRegion(start));
            }
            start
                .checked_add(len)
                .ok_or(DirtyError::RegionOverflow(start))?;
            let pages = usize::try_from(len.div_ceil(DIRTY_PAGE_SIZE))
                .map_err(|_| DirtyError::RegionOverflow(start))?;
            regions.push(RecordedRegion {
                start,
                len,
                rec: Arc::new(RegionRecord::new(pages)),
            });
        }
        regions.sort_by_key(|r| r.start);
        Ok(WriteRecorder {
            regions,
            dma: None,
            ranges: Vec::new(),
            supported_ranges: supported_ranges.max(1),
        })
    }

    /// A recorder (not recording) whose records are DMA addresses: the
    /// member's memory is a translated [`crate::DmaMemory`] carrying
    /// [`WriteRecorder::dma_records`] (no member view is needed).
    pub fn for_dma(supported_ranges: u32) -> Self {
        WriteRecorder {
            regions: Vec::new(),
            dma: Some(Arc::new(DmaRecords::default())),
            ranges: Vec::new(),
            supported_ranges: supported_ranges.max(1),
        }
    }

    /// The DMA-keyed records ([`WriteRecorder::for_dma`]).
    pub fn dma_records(&self) -> Option<&Arc<DmaRecords>> {
        self.dma.as_ref()
    }

    /// DEV_WRITE_RECORD_CAP_QUERY values (R-WR-1):
    /// `(supported_page_size_bitmap, supported_ranges)`.
    pub fn capabilities(&self) -> (u32, u32) {
        (SUPPORTED_PAGE_SIZE_BITMAP, self.supported_ranges)
    }

    /// Build the member's view of `mem` (which must have the layout this
    /// recorder was created for): same host mappings and shared dirty log,
    /// plus this recorder's record bits. Every write the member device makes
    /// must go through the returned memory (R-WR-3, R-WR-7).
    pub fn member_view(&self, mem: &GuestMemoryMmap) -> Result<GuestMemoryMmap, DirtyError> {
        let mut out = Vec::with_capacity(self.regions.len());
        for r in mem.iter() {
            let start = r.start_addr().0;
            let len = r.len();
            let rr = self
                .regions
                .iter()
                .find(|x| x.start == start && x.len == len)
                .ok_or(DirtyError::UnknownRegion { start, len })?;
            let owner = r.get_mmap();
            let ptr = owner.as_ptr();
            let size = owner.size();
            let prot = owner.prot();
            let flags = owner.flags();
            let bitmap = DirtyBitmap {
                shared: owner.bitmap().shared.clone(),
                record: rr.rec.clone(),
                owner: Some(owner),
            };
            // SAFETY: `ptr` and `size` describe the mapping of `owner`, which
            // is live (we hold an `Arc` to it). The `Arc` is moved into the
            // view's bitmap, a field of the view's `MmapRegion`, so the owning
            // region (and with it the mapping, which it unmaps only when
            // dropped) outlives every access made through the view. The view
            // is built with a raw pointer, so it is not `owned` and never
            // unmaps the memory itself.
            let builder = unsafe {
                MmapRegionBuilder::new_with_bitmap(size, bitmap).with_raw_mmap_pointer(ptr)
            };
            let view = builder
                .with_mmap_prot(prot)
                .with_mmap_flags(flags)
                .build()
                .map_err(|source| DirtyError::BuildView { start, source })?;
            out.push(
                GuestRegionMmap::new(view, r.start_addr())
                    .ok_or(DirtyError::RegionOverflow(start))?,
            );
        }
        GuestMemoryMmap::from_regions(out).map_err(DirtyError::Assemble)
    }

    /// Whether recording is started.
    pub fn is_started(&self) -> bool {
        !self.ranges.is_empty()
    }

    /// The started ranges, ascending.
    pub fn ranges(&self) -> &[RecordRange] {
        &self.ranges
    }

    /// Whether `page_size` is one this recorder supports.
    pub fn page_size_supported(page_size: u64) -> bool {
        page_size.is_power_of_two()
            && page_size >= DIRTY_PAGE_SIZE
            && (page_size >> DIRTY_PAGE_SHIFT).trailing_zeros() < 32
            && SUPPORTED_PAGE_SIZE_BITMAP & (1 << (page_size >> DIRTY_PAGE_SHIFT).trailing_zeros())
                != 0
    }

    /// Check a START without changing anything (R-WR-2).
    pub fn validate_start(
        &self,
        page_size: u64,
        entries: &[(u64, u64)],
    ) -> Result<(), RecordError> {
        if !Self::page_size_supported(page_size) {
            return Err(RecordError::UnsupportedPageSize(page_size));
        }
        if entries.is_empty() {
            return Err(RecordError::NoRanges);
        }
        let total = self.ranges.len() + entries.len();
        if total > self.supported_ranges as usize {
            return Err(RecordError::TooManyRanges {
                total,
                supported: self.supported_ranges,
            });
        }
        let mut all: Vec<(u64, u64)> = self.ranges.iter().map(|r| (r.addr, r.end())).collect();
        for &(addr, count) in entries {
            if !addr.is_multiple_of(page_size) {
                return Err(RecordError::Unaligned { addr, page_size });
            }
            let end = count
                .checked_mul(page_size)
                .and_then(|l| addr.checked_add(l))
                .filter(|_| count > 0)
                .ok_or(RecordError::BadRange { addr, count })?;
            all.push((addr, end));
        }
        all.sort_unstable();
        for w in all.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(RecordError::Overlap(w[1].0));
            }
        }
        Ok(())
    }

    /// DEV_WRITE_RECORDS_START (R-WR-2): add ranges `(page_address,
    /// page_count)` of `page_size`. Nothing changes on error.
    pub fn start(&mut self, page_size: u64, entries: &[(u64, u64)]) -> Result<(), RecordError> {
        self.validate_start(page_size, entries)?;
        if let Some(dma) = &self.dma {
            let new: Vec<RecordRange> = entries
                .iter()
                .map(|&(addr, count)| RecordRange {
                    addr,
                    count,
                    page_size,
                })
                .collect();
            dma.start(&new)?;
            self.ranges.extend(new);
            self.ranges.sort_unstable_by_key(|r| r.addr);
            return Ok(());
        }
        for &(addr, count) in entries {
            let range = RecordRange {
                addr,
                count,
                page_size,
            };
            let end = range.end();
            for r in &self.regions {
                let lo = addr.max(r.start);
                let hi = end.min(r.start + r.len);
                if lo >= hi {
                    continue;
                }
                let first = ((lo - r.start) >> DIRTY_PAGE_SHIFT) as usize;
                let stop = ((hi - r.start).div_ceil(DIRTY_PAGE_SIZE)) as usize;
                let words = r.rec.words();
                // Stale bits (from a write racing a STOP) must not count:
                // clear first, then open the range.
                words.rec.clear_pages(first, stop);
                if stop > first {
                    words.mask.set_pages(first, stop - 1);
                }
                r.rec.on.store(true, Ordering::Release);
            }
            self.ranges.push(range);
        }
        self.ranges.sort_unstable_by_key(|r| r.addr);
        Ok(())
    }

    /// DEV_WRITE_RECORDS_STOP (R-WR-5): drop all ranges and records. Always
    /// succeeds.
    pub fn stop(&mut self) {
        if let Some(dma) = &self.dma {
            dma.stop();
        }
        for r in &self.regions {
            r.rec.on.store(false, Ordering::Release);
            if let Some(w) = r.rec.words.get() {
                w.mask.clear();
                w.rec.clear();
            }
        }
        self.ranges.clear();
    }

    /// DEV_WRITE_RECORDS_READ (R-WR-4): append to `out`, ascending, up to
    /// `max` addresses of recorded pages (of each range's page size) whose
    /// start lies in `addr..addr + len`, and clear exactly the bits of the
    /// pages returned. Costs the bitmap words of the window plus the records
    /// returned.
    pub fn read(
        &mut self,
        addr: u64,
        len: u64,
        max: usize,
        out: &mut Vec<u64>,
    ) -> Result<(), RecordError> {
        if self.ranges.is_empty() {
            return Err(RecordError::NotStarted);
        }
        let wend = addr
            .checked_add(len)
            .filter(|_| addr.is_multiple_of(DIRTY_PAGE_SIZE) && len.is_multiple_of(DIRTY_PAGE_SIZE))
            .ok_or(RecordError::BadWindow { addr, len })?;
        let limit = out.len().saturating_add(max);
        for range in &self.ranges {
            let (s, e, p) = (range.addr, range.end(), range.page_size);
            if e <= addr || s >= wend {
                continue;
            }
            // Record pages whose start lies in the window.
            let a = s + (addr.max(s) - s).div_ceil(p) * p;
            let b = if wend >= e {
                e
            } else {
                s + (wend - s).div_ceil(p) * p
            };
            if a >= b {
                continue;
            }
            if self.scan(a, b, s, p, limit, out) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Scan record bits for GPAs `lo..hi` (a range's page-aligned span),
    /// grouping 4 KiB bits into pages of `p` anchored at `s`. Returns true
    /// when `out` is full.
    fn scan(&self, lo: u64, hi: u64, s: u64, p: u64, limit: usize, out: &mut Vec<u64>) -> bool {
        if let Some(dma) = &self.dma {
            return dma.scan(lo, hi, s, p, limit, out);
        }
        let mut last: Option<u64> = None;
        for r in &self.regions {
            let rend = r.start + r.len;
            if rend <= lo || r.start >= hi {
                continue;
            }
            let Some(words) = r.rec.words.get() else {
                continue;
            };
            let first = ((lo.max(r.start) - r.start) >> DIRTY_PAGE_SHIFT) as usize;
            let stop = ((hi.min(rend) - r.start).div_ceil(DIRTY_PAGE_SIZE)) as usize;
            if words
                .rec
                .take_grouped(first, stop, r.start, s, p, limit, &mut last, out)
            {
                return true;
            }
        }
        false
    }

    /// Snapshot (spec §6): ranges plus recorded, unread 4 KiB pages.
    pub fn state(&self) -> RecorderState {
        if let Some(dma) = &self.dma {
            return RecorderState {
                ranges: self.ranges.clone(),
                pages: dma.pages(),
            };
        }
        let mut pages = Vec::new();
        for r in &self.regions {
            if let Some(w) = r.rec.words.get() {
                pages.extend(w.rec.set_addresses(r.start));
            }
        }
        RecorderState {
            ranges: self.ranges.clone(),
            pages,
        }
    }

    /// Restore a snapshot taken with [`WriteRecorder::state`].
    pub fn restore(&mut self, state: &RecorderState) -> Result<(), RecordError> {
        self.stop();
        for r in &state.ranges {
            if let Err(e) = self.start(r.page_size, &[(r.addr, r.count)]) {
                self.stop();
                return Err(e);
            }
        }
        if let Some(dma) = &self.dma {
            for &addr in &state.pages {
                dma.mark(addr, 1);
            }
            return Ok(());
        }
        for &gpa in &state.pages {
            for r in &self.regions {
                if gpa >= r.start && gpa < r.start + r.len {
                    let page = ((gpa - r.start) >> DIRTY_PAGE_SHIFT) as usize;
                    r.rec.mark(page, page);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestMemoryRegion, VolatileMemory};

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(4 << 20), 1 << 20),
        ])
        .unwrap()
    }

    fn all_records(rec: &mut WriteRecorder) -> Vec<u64> {
        let mut out = Vec::new();
        rec.read(0, !0xfff, usize::MAX, &mut out).unwrap();
        out
    }

    #[test]
    fn bitmap_traits_mark_pages_through_slices() {
        let b = DirtyBitmap::with_len(64 * 4096);
        assert_eq!(b.page_count(), 64);
        let s = b.slice_at(0x3000);
        s.mark_dirty(0xfff, 2); // pages 3 + 0 and 3 + 1
        assert!(b.dirty_at(0x3fff) && b.dirty_at(0x4000));
        assert!(!b.dirty_at(0x2fff) && !b.dirty_at(0x5000));
        let s2 = s.slice_at(0x10_000);
        s2.mark_dirty(0, 1);
        assert!(s2.dirty_at(0) && b.dirty_at(0x13000));
        s.mark_dirty(0, 0); // zero length marks nothing
        let words = b.get_and_reset();
        assert_eq!(words, vec![(1 << 3) | (1 << 4) | (1 << 0x13)]);
        assert!(b.get_and_reset().iter().all(|w| *w == 0));
        // Past the end: ignored.
        b.mark_dirty(64 * 4096, 10);
        b.mark_dirty(usize::MAX - 3, 10);
        assert!(b.get_and_reset().iter().all(|w| *w == 0));
    }

    #[test]
    fn vmm_dirty_log_sees_bytes_and_volatile_writes() {
        let m = mem();
        m.write_obj(1u64, GuestAddress((4 << 20) + 0x2000)).unwrap();
        m.write_slice(&[1; 8192], GuestAddress(0x1800)).unwrap();
        let r = m.iter().next().unwrap();
        let mapping: &MmapRegion<DirtyBitmap> = r;
        let vs = mapping.get_slice(0x9000, 16).unwrap();
        vs.write_obj(5u32, 0).unwrap();
        let log = take_dirty_log(&m);
        assert_eq!(log[0].bits[0], (1 << 1) | (1 << 2) | (1 << 3) | (1 << 9));
        assert_eq!(log[1].bits[0], 1 << 2);
        assert!(take_dirty_log(&m)
            .iter()
            .all(|l| l.bits.iter().all(|w| *w == 0)));
    }

    #[test]
    fn member_view_shares_memory_and_outlives_the_vmm_handle() {
        let m = mem();
        let mut rec = WriteRecorder::new(&m, 8).unwrap();
        let view = rec.member_view(&m).unwrap();
        for (a, b) in m.iter().zip(view.iter()) {
            assert_eq!(a.as_ptr(), b.as_ptr());
            assert_eq!(a.start_addr(), b.start_addr());
            assert!(b.bitmap().bitmap.is_member_view());
        }
        rec.start(4096, &[(0, 256)]).unwrap();
        drop(m);
        // The mapping is still alive through the view.
        view.write_obj(9u32, GuestAddress(0x7000)).unwrap();
        assert_eq!(view.read_obj::<u32>(GuestAddress(0x7000)).unwrap(), 9);
        assert_eq!(all_records(&mut rec), vec![0x7000]);
    }

    #[test]
    fn view_of_other_layout_is_refused() {
        let m = mem();
        let rec = WriteRecorder::new(&m, 8).unwrap();
        let other = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        assert!(matches!(
            rec.member_view(&other),
            Err(DirtyError::UnknownRegion { .. })
        ));
    }

    #[test]
    fn concurrent_writes_are_never_lost_by_reads() {
        let m = mem();
        let mut rec = WriteRecorder::new(&m, 8).unwrap();
        rec.start(4096, &[(0, 256)]).unwrap();
        let view = rec.member_view(&m).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut written = BTreeSet::new();
            let mut i = 0u64;
            while !stop2.load(Ordering::Relaxed) || i < 20_000 {
                let page = (i * 7919) % 256;
                view.write_obj(i, GuestAddress(page * 4096 + 8)).unwrap();
                written.insert(page * 4096);
                i += 1;
            }
            written
        });
        let mut seen = BTreeSet::new();
        for _ in 0..2000 {
            let mut out = Vec::new();
            rec.read(0, 1 << 20, 16, &mut out).unwrap();
            seen.extend(out);
        }
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().unwrap();
        seen.extend(all_records(&mut rec));
        assert_eq!(seen, written);
    }

    #[test]
    fn recorder_state_round_trips() {
        let m = mem();
        let mut a = WriteRecorder::new(&m, 8).unwrap();
        a.start(4096, &[(0, 16), (4 << 20, 4)]).unwrap();
        a.start(64 << 10, &[(1 << 19, 2)]).unwrap();
        let v = a.member_view(&m).unwrap();
        for addr in [0x1000u64, 0x5000, (4 << 20) + 0x3000, (1 << 19) + 0x11000] {
            v.write_obj(1u8, GuestAddress(addr)).unwrap();
        }
        let st = a.state();
        let mut b = WriteRecorder::new(&m, 8).unwrap();
        b.restore(&st).unwrap();
        assert_eq!(b.state(), st);
        assert_eq!(all_records(&mut b), all_records(&mut a));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, usize),
        Start(u64, Vec<(u64, u64)>),
        Read(u64, u64, usize),
        Stop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..(6 << 20), 1usize..20_000).prop_map(|(a, l)| Op::Write(a, l)),
            1 => (prop::sample::select(vec![4096u64, 8192, 64 << 10, 2 << 20]),
                  prop::collection::vec((0u64..96, 1u64..40), 1..4))
                .prop_map(|(ps, v)| {
                    let unit = if ps == 2 << 20 { 2 << 20 } else { 64 << 10 };
                    Op::Start(ps, v.into_iter().map(|(a, c)| (a * unit, c)).collect())
                }),
            2 => (0u64..1536, 0u64..1536, 0usize..50)
                .prop_map(|(a, l, m)| Op::Read(a * 4096, l * 4096, m)),
            1 => Just(Op::Stop),
        ]
    }

    /// A plain model of R-WR-2..5: ranges and a set of recorded pages.
    #[derive(Default)]
    struct Model {
        ranges: Vec<RecordRange>,
        pages: BTreeSet<u64>,
    }

    impl Model {
        fn start(&mut self, ps: u64, v: &[(u64, u64)]) -> bool {
            if !WriteRecorder::page_size_supported(ps) || self.ranges.len() + v.len() > 8 {
                return false;
            }
            let mut all: Vec<(u64, u64)> = self.ranges.iter().map(|r| (r.addr, r.end())).collect();
            for &(a, c) in v {
                if a % ps != 0 {
                    return false;
                }
                all.push((a, a + c * ps));
            }
            all.sort();
            if all.windows(2).any(|w| w[1].0 < w[0].1) {
                return false;
            }
            for &(a, c) in v {
                self.ranges.push(RecordRange {
                    addr: a,
                    count: c,
                    page_size: ps,
                });
            }
            self.ranges.sort_by_key(|r| r.addr);
            true
        }

        fn write(&mut self, addr: u64, len: u64, mapped: impl Fn(u64) -> bool) {
            for p in (addr >> 12)..=((addr + len - 1) >> 12) {
                let g = p << 12;
                if !mapped(g) {
                    continue;
                }
                for r in &self.ranges {
                    if g >= r.addr && g < r.end() {
                        self.pages
                            .insert(r.addr + (g - r.addr) / r.page_size * r.page_size);
                    }
                }
            }
        }

        fn read(&mut self, a: u64, l: u64, max: usize) -> Vec<u64> {
            let out: Vec<u64> = self
                .pages
                .iter()
                .copied()
                .filter(|p| *p >= a && *p < a + l)
                .take(max)
                .collect();
            for p in &out {
                self.pages.remove(p);
            }
            out
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// R-WR-2..5 against a model: records equal the pages written inside
        /// started ranges, READ returns them ascending and clears exactly
        /// those, STOP drops everything.
        #[test]
        fn r_wr_recorder_matches_model(ops in prop::collection::vec(op(), 1..60)) {
            let m = GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 2 << 20),
                (GuestAddress(4 << 20), 2 << 20),
            ]).unwrap();
            let mapped = |g: u64| g < (2 << 20) || ((4 << 20)..(6 << 20)).contains(&g);
            let mut rec = WriteRecorder::new(&m, 8).unwrap();
            let view = rec.member_view(&m).unwrap();
            let mut model = Model::default();
            let buf = vec![0x5au8; 20_000];
            for op in ops {
                match op {
                    Op::Write(a, l) => {
                        // Only fully mapped writes are made.
                        let end = a + l as u64 - 1;
                        if mapped(a) && mapped(end) && (a < (2 << 20)) == (end < (2 << 20)) {
                            view.write_slice(&buf[..l], GuestAddress(a)).unwrap();
                            model.write(a, l as u64, mapped);
                        }
                    }
                    Op::Start(ps, v) => {
                        let ok = rec.start(ps, &v).is_ok();
                        prop_assert_eq!(ok, model.start(ps, &v));
                    }
                    Op::Read(a, l, max) => {
                        let mut out = Vec::new();
                        let r = rec.read(a, l, max, &mut out);
                        if model.ranges.is_empty() {
                            prop_assert_eq!(r, Err(RecordError::NotStarted));
                        } else {
                            prop_assert!(r.is_ok());
                            prop_assert_eq!(out, model.read(a, l, max));
                        }
                    }
                    Op::Stop => {
                        rec.stop();
                        model = Model::default();
                    }
                }
            }
        }
    }
}
