//! DMA memory: pinned anonymous memory whose physical (= bus, there is no
//! IOMMU in the guest) addresses come from `/proc/self/pagemap`, and the
//! [`Mem`] trait through which rings and buffers are accessed (so the ring
//! code can run on a fake memory in unit tests).

#[cfg(test)]
use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};

use crate::error::{Error, Result};

/// Page size of the translation (the kernel's base page).
pub const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;

/// Byte-addressed memory shared with a device. All accesses are volatile
/// (the device writes it concurrently); ordering is the caller's job
/// through [`fence`].
pub trait Mem {
    /// Read a `u16` at `off`.
    fn r16(&self, off: usize) -> u16;
    /// Read a `u32` at `off`.
    fn r32(&self, off: usize) -> u32;
    /// Write a `u16` at `off`.
    fn w16(&self, off: usize, v: u16);
    /// Write a `u32` at `off`.
    fn w32(&self, off: usize, v: u32);
    /// Write a `u64` at `off`.
    fn w64(&self, off: usize, v: u64);
    /// Copy out `buf.len()` bytes from `off`.
    fn read(&self, off: usize, buf: &mut [u8]);
    /// Copy `buf` in at `off`.
    fn write(&self, off: usize, buf: &[u8]);
    /// Device (bus) address of byte `off`.
    fn phys(&self, off: usize) -> u64;
    /// Physically contiguous pieces `(address, length)` of `[off, off+len)`.
    fn segments(&self, off: usize, len: usize) -> Vec<(u64, u32)>;
}

/// Interpret one pagemap entry: the page frame number of a present page.
pub fn pfn_from_entry(entry: u64) -> std::result::Result<u64, String> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const PFN_MASK: u64 = (1 << 55) - 1;
    if entry & SWAPPED != 0 {
        return Err("page is swapped out".into());
    }
    if entry & PRESENT == 0 {
        return Err("page is not present".into());
    }
    match entry & PFN_MASK {
        0 => Err("pagemap hides the PFN (not root / no CAP_SYS_ADMIN?)".into()),
        pfn => Ok(pfn),
    }
}

/// Physically contiguous pieces of `[off, off+len)` given per-page
/// physical addresses of 4 KiB pages.
pub fn segments_of(phys: &[u64], off: usize, len: usize) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut at = off;
    let end = off + len;
    while at < end {
        let page = at / PAGE;
        let in_page = at % PAGE;
        let n = (PAGE - in_page).min(end - at);
        let addr = phys[page] + in_page as u64;
        match out.last_mut() {
            Some((a, l))
                if *a + u64::from(*l) == addr && u64::from(*l) + (n as u64) <= u32::MAX as u64 =>
            {
                *l += n as u32
            }
            _ => out.push((addr, n as u32)),
        }
        at += n;
    }
    out
}

/// Merge per-page physical addresses into `(address, pages)` ranges of
/// contiguous 4 KiB pages, sorted by address.
pub fn merge_ranges(phys: &[u64]) -> Vec<(u64, u64)> {
    let mut p: Vec<u64> = phys.to_vec();
    p.sort_unstable();
    p.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for a in p {
        match out.last_mut() {
            Some((s, n)) if *s + *n * PAGE as u64 == a => *n += 1,
            _ => out.push((a, 1)),
        }
    }
    out
}

/// Pinned memory with known bus addresses: physical addresses (no IOMMU,
/// [`DmaMem::alloc`]) or I/O virtual addresses an IOMMU maps
/// ([`DmaMem::alloc_iova`], for VFIO).
#[derive(Debug)]
pub struct DmaMem {
    base: NonNull<u8>,
    len: usize,
    map_len: usize,
    phys: Vec<u64>,
    huge: bool,
    /// Bus addresses are `iova + offset` (an IOMMU mapping the caller
    /// makes), not physical addresses.
    iova: Option<u64>,
}

// SAFETY: the memory is owned by this value; all accesses go through
// volatile operations on `&self` (like MMIO), so sharing across threads
// is no different from the device touching it.
unsafe impl Send for DmaMem {}

impl DmaMem {
    /// Allocate at least `len` bytes (rounded up to pages), zeroed, locked,
    /// and translated. Tries one 2 MiB hugetlb page first (physically
    /// contiguous, never migrated) when `len` fits, else 4 KiB pages with
    /// transparent huge pages disabled for the mapping.
    pub fn alloc(len: usize) -> Result<DmaMem> {
        let len = len.div_ceil(PAGE).max(1) * PAGE;
        // Keep compaction from migrating mlocked pages (best effort; the
        // file may not exist or be writable).
        let _ = std::fs::write("/proc/sys/vm/compact_unevictable_allowed", "0");
        if len <= HUGE {
            if let Some(m) = Self::try_map(HUGE, true)? {
                return Self::finish(m, len, HUGE, true);
            }
        }
        let m = Self::try_map(len, false)?
            .ok_or_else(|| Error::last_os(format!("mmap of {len} bytes of DMA memory")))?;
        Self::finish(m, len, len, false)
    }

    fn try_map(len: usize, huge: bool) -> Result<Option<NonNull<u8>>> {
        let flags =
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if huge { libc::MAP_HUGETLB } else { 0 };
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            if huge {
                return Ok(None);
            }
            return Err(Error::last_os(format!("mmap of {len} bytes of DMA memory")));
        }
        if !huge {
            // SAFETY: advice on the mapping just created; it only keeps
            // THP (whose pages khugepaged may move) away from it.
            unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        }
        Ok(NonNull::new(p.cast()))
    }

    /// Allocate at least `len` bytes (rounded up to pages), zeroed and
    /// touched, whose bus address is `iova + offset`: the caller maps
    /// [`DmaMem::host_range`] at `iova` in an IOMMU (VFIO pins the pages).
    pub fn alloc_iova(len: usize, iova: u64) -> Result<DmaMem> {
        let len = len.div_ceil(PAGE).max(1) * PAGE;
        if !iova.is_multiple_of(PAGE as u64) {
            return Err(Error::Usage(format!("IOVA {iova:#x} is not page aligned")));
        }
        let base = Self::try_map(len, false)?
            .ok_or_else(|| Error::last_os(format!("mmap of {len} bytes of DMA memory")))?;
        let m = DmaMem {
            base,
            len,
            map_len: len,
            phys: (0..len / PAGE).map(|i| iova + (i * PAGE) as u64).collect(),
            huge: false,
            iova: Some(iova),
        };
        for off in (0..len).step_by(PAGE) {
            m.write(off, &[0]);
        }
        Ok(m)
    }

    /// Host virtual address and length of the memory (what an IOMMU
    /// mapping of [`DmaMem::alloc_iova`]'s memory covers).
    pub fn host_range(&self) -> (u64, usize) {
        (self.base.as_ptr() as u64, self.len)
    }

    fn finish(base: NonNull<u8>, len: usize, map_len: usize, huge: bool) -> Result<DmaMem> {
        let mut m = DmaMem {
            base,
            len,
            map_len,
            phys: Vec::new(),
            huge,
            iova: None,
        };
        // SAFETY: locking the mapping we own, so its pages stay resident.
        if unsafe { libc::mlock(base.as_ptr().cast(), map_len) } != 0 {
            return Err(Error::last_os(format!(
                "mlock of {map_len} bytes of DMA memory (RLIMIT_MEMLOCK? run as root)"
            )));
        }
        // Touch every page so each has its own frame (no shared zero page).
        for off in (0..len).step_by(PAGE) {
            m.write(off, &[0]);
        }
        m.phys = m.translate()?;
        Ok(m)
    }

    fn translate(&self) -> Result<Vec<u64>> {
        let path = "/proc/self/pagemap";
        let f = File::open(path).map_err(|e| Error::io("open", path, e))?;
        (0..self.len / PAGE)
            .map(|i| {
                let vaddr = self.base.as_ptr() as u64 + (i * PAGE) as u64;
                let mut e = [0u8; 8];
                f.read_exact_at(&mut e, vaddr / PAGE as u64 * 8)
                    .map_err(|e| Error::io("read", path, e))?;
                pfn_from_entry(u64::from_le_bytes(e))
                    .map(|pfn| pfn * PAGE as u64)
                    .map_err(|msg| Error::Pagemap { vaddr, msg })
            })
            .collect()
    }

    /// Whether the physical addresses are still those found at allocation
    /// (a diagnostic: pinned pages should never move).
    pub fn check_stable(&self) -> Result<()> {
        if self.iova.is_some() {
            // The IOMMU mapping pins the pages; bus addresses never move.
            return Ok(());
        }
        let now = self.translate()?;
        match now.iter().zip(&self.phys).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(i) => Err(Error::Verify(format!(
                "DMA page {i} moved from {:#x} to {:#x} while in use",
                self.phys[i], now[i]
            ))),
        }
    }

    /// Usable length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the memory is empty (never, after `alloc`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether it is one hugetlb page.
    pub fn is_huge(&self) -> bool {
        self.huge
    }

    /// Physical address of each 4 KiB page.
    pub fn page_phys(&self) -> &[u64] {
        &self.phys
    }

    /// The memory as `(address, pages)` ranges of 4 KiB pages.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        merge_ranges(&self.phys)
    }

    fn ptr(&self, off: usize, size: usize) -> *mut u8 {
        assert!(
            off.checked_add(size).is_some_and(|e| e <= self.len),
            "DMA access {off:#x}+{size} outside {:#x} bytes",
            self.len
        );
        // SAFETY: in bounds, checked above.
        unsafe { self.base.as_ptr().add(off) }
    }
}

impl Mem for DmaMem {
    fn r16(&self, off: usize) -> u16 {
        assert!(off.is_multiple_of(2), "unaligned u16 at {off:#x}");
        // SAFETY: in bounds and aligned; volatile because the device
        // writes this memory behind the compiler's back.
        u16::from_le(unsafe { self.ptr(off, 2).cast::<u16>().read_volatile() })
    }
    fn r32(&self, off: usize) -> u32 {
        assert!(off.is_multiple_of(4), "unaligned u32 at {off:#x}");
        // SAFETY: as in `r16`.
        u32::from_le(unsafe { self.ptr(off, 4).cast::<u32>().read_volatile() })
    }
    fn w16(&self, off: usize, v: u16) {
        assert!(off.is_multiple_of(2), "unaligned u16 at {off:#x}");
        // SAFETY: as in `r16`.
        unsafe { self.ptr(off, 2).cast::<u16>().write_volatile(v.to_le()) }
    }
    fn w32(&self, off: usize, v: u32) {
        assert!(off.is_multiple_of(4), "unaligned u32 at {off:#x}");
        // SAFETY: as in `r16`.
        unsafe { self.ptr(off, 4).cast::<u32>().write_volatile(v.to_le()) }
    }
    fn w64(&self, off: usize, v: u64) {
        assert!(off.is_multiple_of(8), "unaligned u64 at {off:#x}");
        // SAFETY: as in `r16`.
        unsafe { self.ptr(off, 8).cast::<u64>().write_volatile(v.to_le()) }
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        let p = self.ptr(off, buf.len());
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `p..p+len` is in bounds (checked by `ptr`).
            *b = unsafe { p.add(i).read_volatile() };
        }
    }
    fn write(&self, off: usize, buf: &[u8]) {
        let p = self.ptr(off, buf.len());
        for (i, b) in buf.iter().enumerate() {
            // SAFETY: `p..p+len` is in bounds (checked by `ptr`).
            unsafe { p.add(i).write_volatile(*b) };
        }
    }
    fn phys(&self, off: usize) -> u64 {
        assert!(off < self.len);
        self.phys[off / PAGE] + (off % PAGE) as u64
    }
    fn segments(&self, off: usize, len: usize) -> Vec<(u64, u32)> {
        assert!(off + len <= self.len);
        segments_of(&self.phys, off, len)
    }
}

impl Drop for DmaMem {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value created and owns.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.map_len);
        }
    }
}

/// Full barrier between our ring writes and the doorbell / between the
/// used index read and the entries (the device is another agent).
pub fn mb() {
    fence(Ordering::SeqCst);
}

#[cfg(test)]
/// A fake [`Mem`] for unit tests: plain bytes with made-up, deliberately
/// non-contiguous physical pages.
#[derive(Debug)]
pub struct FakeMem {
    /// The bytes.
    pub bytes: RefCell<Vec<u8>>,
    /// Physical address of each page.
    pub phys: Vec<u64>,
}

#[cfg(test)]
impl FakeMem {
    /// `pages` pages; page i at physical `0x100000 + i * 0x3000` (so no
    /// two pages are adjacent), or contiguous when `contiguous`.
    pub fn new(pages: usize, contiguous: bool) -> FakeMem {
        let stride = if contiguous { PAGE } else { 3 * PAGE } as u64;
        FakeMem {
            bytes: RefCell::new(vec![0; pages * PAGE]),
            phys: (0..pages as u64).map(|i| 0x10_0000 + i * stride).collect(),
        }
    }

    /// Offset of a physical address, if it is in this memory.
    pub fn off_of(&self, addr: u64) -> Option<usize> {
        self.phys
            .iter()
            .position(|&p| (p..p + PAGE as u64).contains(&addr))
            .map(|i| i * PAGE + (addr % PAGE as u64) as usize)
    }
}

#[cfg(test)]
impl Mem for FakeMem {
    fn r16(&self, off: usize) -> u16 {
        let b = self.bytes.borrow();
        u16::from_le_bytes([b[off], b[off + 1]])
    }
    fn r32(&self, off: usize) -> u32 {
        let b = self.bytes.borrow();
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn w16(&self, off: usize, v: u16) {
        self.write(off, &v.to_le_bytes())
    }
    fn w32(&self, off: usize, v: u32) {
        self.write(off, &v.to_le_bytes())
    }
    fn w64(&self, off: usize, v: u64) {
        self.write(off, &v.to_le_bytes())
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self.bytes.borrow()[off..off + buf.len()])
    }
    fn write(&self, off: usize, buf: &[u8]) {
        self.bytes.borrow_mut()[off..off + buf.len()].copy_from_slice(buf)
    }
    fn phys(&self, off: usize) -> u64 {
        self.phys[off / PAGE] + (off % PAGE) as u64
    }
    fn segments(&self, off: usize, len: usize) -> Vec<(u64, u32)> {
        segments_of(&self.phys, off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_entries() {
        assert_eq!(pfn_from_entry((1 << 63) | 0x1234), Ok(0x1234));
        // Soft-dirty / exclusive bits above the PFN do not leak into it.
        assert_eq!(pfn_from_entry((1 << 63) | (1 << 55) | (1 << 56) | 7), Ok(7));
        assert!(pfn_from_entry(1 << 63)
            .unwrap_err()
            .contains("hides the PFN"));
        assert!(pfn_from_entry(0x1234).unwrap_err().contains("not present"));
        assert!(pfn_from_entry((1 << 62) | 5)
            .unwrap_err()
            .contains("swapped"));
    }

    #[test]
    fn segments_split_at_discontiguous_pages() {
        let phys = [0x5000, 0x6000, 0x9000];
        assert_eq!(segments_of(&phys, 0x10, 0x20), vec![(0x5010, 0x20)]);
        assert_eq!(segments_of(&phys, 0xff0, 0x1010), vec![(0x5ff0, 0x1010)]);
        assert_eq!(
            segments_of(&phys, 0xff0, 0x1020),
            vec![(0x5ff0, 0x1010), (0x9000, 0x10)]
        );
        assert_eq!(
            segments_of(&phys, 0x1ff0, 0x20),
            vec![(0x6ff0, 0x10), (0x9000, 0x10)]
        );
        assert_eq!(segments_of(&phys, 0, 0), vec![]);
        assert_eq!(merge_ranges(&phys), vec![(0x5000, 2), (0x9000, 1)]);
        assert_eq!(merge_ranges(&[0x9000, 0x8000, 0x8000]), vec![(0x8000, 2)]);
    }

    #[test]
    fn real_allocation_when_privileged() {
        // Runs everywhere; only checks translation when pagemap shows PFNs
        // (root). Unprivileged it must fail with a Pagemap error.
        match DmaMem::alloc(3 * PAGE) {
            Ok(m) => {
                assert!(m.len() >= 3 * PAGE);
                assert!(m
                    .page_phys()
                    .iter()
                    .all(|p| p % PAGE as u64 == 0 && *p != 0));
                m.w32(8, 0xdead_beef);
                assert_eq!(m.r32(8), 0xdead_beef);
                assert_eq!(m.phys(PAGE + 4), m.page_phys()[1] + 4);
                m.check_stable().unwrap();
            }
            Err(Error::Pagemap { .. }) | Err(Error::Sys { .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}
