//! The memory a device reaches by DMA: guest physical memory, seen either
//! directly or through an IOMMU that translates the device's DMA addresses.
//!
//! A device model never holds [`GuestMemoryMmap`] itself; it holds a
//! [`DmaMemory`], which implements vm-memory's [`GuestMemory`] (the trait
//! virtio-queue and the `Bytes` API work on). Without a translator every
//! access goes straight to the physical memory, as before. With one
//! ([`DmaTranslate`], implemented by the virtio-iommu's endpoint handles),
//! every access first asks the translator where each piece of the DMA range
//! lands, then reaches those guest physical pages through the same regions,
//! so writes still mark the VMM's dirty log (and a member's write records)
//! exactly as untranslated ones do: there is one write path either way.
//!
//! A translation fault (the endpoint is blocked, the address is not mapped,
//! or the mapping does not allow the access) fails the access with
//! `InvalidGuestAddress(dma address)` and is reported to the translator
//! ([`DmaTranslate::fault`]), which tells the guest's IOMMU driver.

use std::fmt;
use std::iter::FusedIterator;
use std::sync::Arc;

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{
    GuestMemoryBackendSliceIterator, GuestMemorySliceIterator, Result as MemResult,
};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, Permissions, VolatileSlice,
};

use crate::dirty::{DirtyBitmap, GuestMemoryMmap};
use crate::dma_record::DmaRecords;

/// Why a DMA access was refused by the IOMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaFault {
    /// The endpoint is attached to no domain and not in bypass mode.
    Blocked,
    /// No mapping of the endpoint's domain covers the address.
    Unmapped,
    /// A mapping covers the address but does not allow this access.
    Denied,
}

/// Where a piece of DMA address space lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaRun {
    /// Guest physical address of the DMA address asked for.
    pub gpa: u64,
    /// Bytes from there on that are contiguous in guest physical memory
    /// and allowed for the access (at least 1).
    pub len: u64,
}

/// An IOMMU's view of one endpoint: translates its DMA addresses.
///
/// Called from any thread that runs device I/O; must not block for long.
pub trait DmaTranslate: Send + Sync {
    /// Translates `addr` for `access`. `Ok(None)`: the endpoint is in
    /// bypass mode (identity, no limit).
    fn translate(&self, addr: u64, access: Permissions) -> Result<Option<DmaRun>, DmaFault>;

    /// A refused access at `addr` (for the IOMMU's fault reporting).
    fn fault(&self, addr: u64, access: Permissions, fault: DmaFault);
}

/// An IOMMU as the devices behind it see it: one translator per endpoint
/// (the endpoint ID is the function's PCI routing ID).
pub trait DmaIommu: Send + Sync {
    /// The translator of endpoint `id`, or `None` if this IOMMU does not
    /// manage it.
    fn endpoint(&self, id: u32) -> Option<Arc<dyn DmaTranslate>>;
}

/// The x86 MSI doorbell window, `0xfee0_0000..=0xfeef_ffff`. DMA into it is
/// never translated (an IOMMU reports it reserved); the VMM delivers
/// device MSIs without memory writes, so nothing of the guest lives there.
pub const MSI_WINDOW_START: u64 = 0xfee0_0000;
/// Length of [`MSI_WINDOW_START`]'s window.
pub const MSI_WINDOW_LEN: u64 = 0x10_0000;

/// Guest memory as one device reaches it (see the module documentation).
/// Cloning is cheap: the regions and the translator are shared.
#[derive(Clone)]
pub struct DmaMemory {
    phys: GuestMemoryMmap,
    xlate: Option<Arc<dyn DmaTranslate>>,
    /// A recording member's DMA-keyed write records (translated memory).
    records: Option<Arc<DmaRecords>>,
}

impl fmt::Debug for DmaMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaMemory")
            .field("regions", &self.phys.num_regions())
            .field("translated", &self.xlate.is_some())
            .finish()
    }
}

impl From<GuestMemoryMmap> for DmaMemory {
    fn from(phys: GuestMemoryMmap) -> Self {
        DmaMemory::direct(phys)
    }
}

impl DmaMemory {
    /// DMA addresses are guest physical addresses (no IOMMU).
    pub fn direct(phys: GuestMemoryMmap) -> Self {
        DmaMemory {
            phys,
            xlate: None,
            records: None,
        }
    }

    /// DMA addresses are translated by `xlate` into `phys`.
    pub fn translated(phys: GuestMemoryMmap, xlate: Arc<dyn DmaTranslate>) -> Self {
        DmaMemory {
            phys,
            xlate: Some(xlate),
            records: None,
        }
    }

    /// The same memory, whose writes also go to a member's DMA-keyed
    /// write records (R-WR-3 with an IOMMU: records are DMA addresses).
    pub fn with_records(mut self, records: Arc<DmaRecords>) -> Self {
        self.records = Some(records);
        self
    }

    /// The same translation over other physical regions (a member's view
    /// of the same memory).
    pub fn with_physical(&self, phys: GuestMemoryMmap) -> Self {
        DmaMemory {
            phys,
            xlate: self.xlate.clone(),
            records: self.records.clone(),
        }
    }

    /// The guest physical memory behind the translation.
    pub fn physical(&self) -> &GuestMemoryMmap {
        &self.phys
    }

    /// The translator, if an IOMMU translates this device's DMA.
    pub fn translator(&self) -> Option<&Arc<dyn DmaTranslate>> {
        self.xlate.as_ref()
    }

    /// Whether an IOMMU translates this device's DMA.
    pub fn is_translated(&self) -> bool {
        self.xlate.is_some()
    }
}

impl GuestMemory for DmaMemory {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = DirtyBitmap;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        match self.get_slices(addr, count, access) {
            Ok(mut it) => it.all(|s| s.is_ok()),
            Err(_) => false,
        }
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> MemResult<impl GuestMemorySliceIterator<'a, BS<'a, DirtyBitmap>>> {
        Ok(DmaSlices {
            mem: self,
            addr: addr.0,
            count,
            access,
            run: None,
            run_addr: addr.0,
        })
    }

    fn physical_memory(&self) -> Option<&GuestMemoryMmap> {
        match self.xlate {
            None => Some(&self.phys),
            Some(_) => None,
        }
    }
}

/// The slices of one DMA access, translated piece by piece.
struct DmaSlices<'a> {
    mem: &'a DmaMemory,
    /// Next DMA address not yet translated.
    addr: u64,
    /// Bytes left to translate from `addr`.
    count: usize,
    access: Permissions,
    /// Slices of the guest physical run being walked.
    run: Option<GuestMemoryBackendSliceIterator<'a, GuestMemoryMmap>>,
    /// DMA address of the run's next slice.
    run_addr: u64,
}

impl<'a> DmaSlices<'a> {
    fn stop(&mut self) {
        self.count = 0;
        self.run = None;
    }

    /// Translates the next piece into `self.run`, or fails.
    fn next_run(&mut self) -> Result<(), GuestMemoryError> {
        let at = self.addr;
        self.run_addr = at;
        let Some(xlate) = &self.mem.xlate else {
            self.run = Some(GuestMemoryBackend::get_slices(
                &self.mem.phys,
                GuestAddress(at),
                self.count,
            ));
            self.count = 0;
            return Ok(());
        };
        let in_msi_window = at.wrapping_sub(MSI_WINDOW_START) < MSI_WINDOW_LEN;
        if in_msi_window {
            // Identity up to the end of the window (the VMM's own scratch
            // rings live there; see the PF's adopted-head runs).
            let len = usize::try_from(MSI_WINDOW_START + MSI_WINDOW_LEN - at)
                .unwrap_or(usize::MAX)
                .min(self.count);
            self.run = Some(GuestMemoryBackend::get_slices(
                &self.mem.phys,
                GuestAddress(at),
                len,
            ));
            self.count -= len;
            self.addr = at + len as u64;
            return Ok(());
        }
        match xlate.translate(at, self.access) {
            Ok(None) => {
                self.run = Some(GuestMemoryBackend::get_slices(
                    &self.mem.phys,
                    GuestAddress(at),
                    self.count,
                ));
                self.count = 0;
                Ok(())
            }
            Ok(Some(run)) if run.len > 0 => {
                let len = usize::try_from(run.len)
                    .unwrap_or(usize::MAX)
                    .min(self.count);
                self.run = Some(GuestMemoryBackend::get_slices(
                    &self.mem.phys,
                    GuestAddress(run.gpa),
                    len,
                ));
                self.count -= len;
                // A run that reaches the end of the address space ends the
                // access there (the next piece would wrap).
                match at.checked_add(len as u64) {
                    Some(next) => self.addr = next,
                    None if self.count == 0 => {}
                    None => return Err(GuestMemoryError::GuestAddressOverflow),
                }
                Ok(())
            }
            Ok(Some(_)) => {
                xlate.fault(at, self.access, DmaFault::Unmapped);
                Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(at)))
            }
            Err(fault) => {
                xlate.fault(at, self.access, fault);
                Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(at)))
            }
        }
    }
}

impl<'a> DmaSlices<'a> {
    /// `s` (the next slice of the run), whose writes also go to the
    /// member's DMA-keyed records at the slice's DMA address.
    fn record(
        &mut self,
        s: VolatileSlice<'a, BS<'a, DirtyBitmap>>,
    ) -> VolatileSlice<'a, BS<'a, DirtyBitmap>> {
        let at = self.run_addr;
        self.run_addr = at.wrapping_add(s.len() as u64);
        let Some(records) = &self.mem.records else {
            return s;
        };
        let bitmap = s.bitmap().with_dma(records, at);
        // SAFETY: the same bytes as `s` (pointer and length taken from it),
        // valid for the same lifetime `'a` (they belong to a region of
        // `self.mem`, borrowed for `'a`); only the dirty-tracking handle
        // differs. Non-Xen mappings carry no mmap information.
        unsafe { VolatileSlice::with_bitmap(s.ptr_guard_mut().as_ptr(), s.len(), bitmap, None) }
    }
}

impl<'a> Iterator for DmaSlices<'a> {
    type Item = MemResult<VolatileSlice<'a, BS<'a, DirtyBitmap>>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(run) = &mut self.run {
                match run.next() {
                    Some(Ok(s)) => return Some(Ok(self.record(s))),
                    Some(Err(e)) => {
                        self.stop();
                        return Some(Err(e));
                    }
                    None => self.run = None,
                }
            }
            if self.count == 0 {
                return None;
            }
            if let Err(e) = self.next_run() {
                self.stop();
                return Some(Err(e));
            }
        }
    }
}

impl FusedIterator for DmaSlices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, BS<'a, DirtyBitmap>> for DmaSlices<'a> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::Bytes;

    /// A translator with fixed runs: DMA `base..base+len` -> GPA `gpa..`,
    /// with the permissions given; everything else unmapped.
    struct Fixed {
        runs: Vec<(u64, u64, u64, Permissions)>,
        bypass: bool,
        faults: Mutex<Vec<(u64, DmaFault)>>,
    }

    impl DmaTranslate for Fixed {
        fn translate(&self, addr: u64, access: Permissions) -> Result<Option<DmaRun>, DmaFault> {
            if self.bypass {
                return Ok(None);
            }
            for &(base, len, gpa, perm) in &self.runs {
                if addr >= base && addr - base < len {
                    if !perm.allow(access) {
                        return Err(DmaFault::Denied);
                    }
                    return Ok(Some(DmaRun {
                        gpa: gpa + (addr - base),
                        len: len - (addr - base),
                    }));
                }
            }
            Err(DmaFault::Unmapped)
        }

        fn fault(&self, addr: u64, _access: Permissions, fault: DmaFault) {
            self.faults.lock().unwrap().push((addr, fault));
        }
    }

    fn phys() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x20000), 0x10000),
        ])
        .unwrap()
    }

    fn fixed(runs: Vec<(u64, u64, u64, Permissions)>) -> Arc<Fixed> {
        Arc::new(Fixed {
            runs,
            bypass: false,
            faults: Mutex::new(Vec::new()),
        })
    }

    #[test]
    fn direct_memory_is_the_physical_memory() {
        let m = DmaMemory::direct(phys());
        m.write_obj(0x1234_5678u32, GuestAddress(0x100)).unwrap();
        assert_eq!(
            m.physical().read_obj::<u32>(GuestAddress(0x100)).unwrap(),
            0x1234_5678
        );
        assert!(m.physical_memory().is_some());
        assert!(!m.is_translated());
        // A hole between regions is an error, as for the physical memory.
        assert!(m.read_obj::<u32>(GuestAddress(0x18000)).is_err());
    }

    #[test]
    fn translated_access_is_split_over_runs_and_regions() {
        // DMA 0x1000_0000.. -> GPA 0xf000 (one page at the end of region
        // 0), then DMA 0x1000_1000.. -> GPA 0x20000 (region 1).
        let t = fixed(vec![
            (0x1000_0000, 0x1000, 0xf000, Permissions::ReadWrite),
            (0x1000_1000, 0x1000, 0x20000, Permissions::ReadWrite),
        ]);
        let m = DmaMemory::translated(phys(), t.clone());
        assert!(m.physical_memory().is_none());
        let data: Vec<u8> = (0..32u8).collect();
        m.write_slice(&data, GuestAddress(0x1000_0ff0)).unwrap();
        let p = m.physical();
        let mut a = [0u8; 16];
        p.read_slice(&mut a, GuestAddress(0xfff0)).unwrap();
        assert_eq!(&a[..], &data[..16]);
        p.read_slice(&mut a, GuestAddress(0x20000)).unwrap();
        assert_eq!(&a[..], &data[16..]);
        let mut back = [0u8; 32];
        m.read_slice(&mut back, GuestAddress(0x1000_0ff0)).unwrap();
        assert_eq!(&back[..], &data[..]);
        // Both physical pages are dirty in the VMM's log.
        assert!(p.find_region(GuestAddress(0xf000)).is_some());
        let log = crate::take_dirty_log(p);
        assert_eq!(log[0].bits[0] >> 15 & 1, 1, "GPA 0xf000 dirty");
        assert_eq!(log[1].bits[0] & 1, 1, "GPA 0x20000 dirty");
        assert!(t.faults.lock().unwrap().is_empty());
    }

    #[test]
    fn faults_fail_the_access_and_are_reported() {
        let t = fixed(vec![(0x4000, 0x1000, 0x1000, Permissions::Read)]);
        let m = DmaMemory::translated(phys(), t.clone());
        // Reading a read-only mapping works; writing it faults.
        assert!(m.read_obj::<u64>(GuestAddress(0x4008)).is_ok());
        assert!(m.write_obj(7u64, GuestAddress(0x4008)).is_err());
        // An access running off the end of its mapping faults at the
        // first unmapped byte, and nothing is written past the fault.
        assert!(m.read_obj::<u64>(GuestAddress(0x4ffc)).is_err());
        assert!(m.read_obj::<u32>(GuestAddress(0x9000)).is_err());
        assert_eq!(
            *t.faults.lock().unwrap(),
            vec![
                (0x4008, DmaFault::Denied),
                (0x5000, DmaFault::Unmapped),
                (0x9000, DmaFault::Unmapped),
            ]
        );
        // Atomic accesses (virtio-queue's ring indices) fault the same
        // way instead of panicking on an empty iterator.
        use std::sync::atomic::Ordering;
        assert!(m
            .load::<u16>(GuestAddress(0x9000), Ordering::Acquire)
            .is_err());
        assert!(m
            .store(1u16, GuestAddress(0x9000), Ordering::Release)
            .is_err());
        // A mapping onto a GPA outside guest memory fails too.
        let t2 = fixed(vec![(0, 0x1000, 0x18000, Permissions::ReadWrite)]);
        let m2 = DmaMemory::translated(phys(), t2);
        assert!(m2.read_obj::<u32>(GuestAddress(0)).is_err());
        assert!(!m2.check_range(GuestAddress(0), 4, Permissions::Read));
    }

    #[test]
    fn bypass_is_identity_and_the_top_of_the_address_space_is_safe() {
        let t = Arc::new(Fixed {
            runs: vec![],
            bypass: true,
            faults: Mutex::new(Vec::new()),
        });
        let m = DmaMemory::translated(phys(), t);
        m.write_obj(9u32, GuestAddress(0x20010)).unwrap();
        assert_eq!(
            m.physical().read_obj::<u32>(GuestAddress(0x20010)).unwrap(),
            9
        );
        // A run ending at the top of the DMA address space.
        let t = fixed(vec![(
            u64::MAX - 0xfff,
            0x1000,
            0x3000,
            Permissions::ReadWrite,
        )]);
        let m = DmaMemory::translated(phys(), t);
        assert!(m.write_obj(5u32, GuestAddress(u64::MAX - 3)).is_ok());
        assert!(m.write_obj(5u64, GuestAddress(u64::MAX - 3)).is_err());
        assert!(m.read_obj::<u32>(GuestAddress(0)).is_err());
        // Zero-length accesses touch nothing.
        assert!(m.write_slice(&[], GuestAddress(0x77)).is_ok());
    }

    #[test]
    fn r_wr_3_records_are_dma_addresses_when_translated() {
        use crate::dirty::{RecordError, WriteRecorder};
        // DMA 0x1000_0000.. (two pages) -> GPA 0xe000 and 0x20000.
        let t = fixed(vec![
            (0x1000_0000, 0x1000, 0xe000, Permissions::ReadWrite),
            (0x1000_1000, 0x1000, 0x20000, Permissions::ReadWrite),
        ]);
        let mut rec = WriteRecorder::for_dma(8);
        let m = DmaMemory::translated(phys(), t).with_records(rec.dma_records().unwrap().clone());
        // Not recording: the shared log only.
        m.write_obj(1u8, GuestAddress(0x1000_0010)).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            rec.read(0, 1 << 40, 100, &mut out),
            Err(RecordError::NotStarted)
        );
        crate::take_dirty_log(m.physical());
        rec.start(0x1000, &[(0x1000_0000, 4)]).unwrap();
        m.write_slice(&[7; 0x1000], GuestAddress(0x1000_0800))
            .unwrap();
        // The VMM's log: guest physical pages.
        let log = crate::take_dirty_log(m.physical());
        assert_eq!(log[0].bits[0], 1 << 14, "GPA 0xe000");
        assert_eq!(log[1].bits[0], 1, "GPA 0x20000");
        // The member's records: DMA pages, read back and cleared.
        rec.read(0x1000_0000, 0x4000, 100, &mut out).unwrap();
        assert_eq!(out, vec![0x1000_0000, 0x1000_1000]);
        out.clear();
        rec.read(0x1000_0000, 0x4000, 100, &mut out).unwrap();
        assert!(out.is_empty());
        // A page written again is recorded again; state round trip.
        m.write_obj(2u32, GuestAddress(0x1000_1004)).unwrap();
        let st = rec.state();
        assert_eq!(st.pages, vec![0x1000_1000]);
        let mut again = WriteRecorder::for_dma(8);
        again.restore(&st).unwrap();
        assert_eq!(again.state(), st);
        // Outside the started range: no record.
        let t2 = fixed(vec![(0x5000_0000, 0x1000, 0x1000, Permissions::ReadWrite)]);
        let m2 = DmaMemory::translated(phys(), t2).with_records(rec.dma_records().unwrap().clone());
        m2.write_obj(3u8, GuestAddress(0x5000_0000)).unwrap();
        out.clear();
        rec.read(0, 1 << 40, 100, &mut out).unwrap();
        assert_eq!(out, vec![0x1000_1000]);
        // STOP drops everything; huge ranges are refused.
        rec.stop();
        assert!(rec.state().pages.is_empty());
        assert!(matches!(
            rec.start(1 << 21, &[(0, 1 << 20)]),
            Err(RecordError::TooLarge { .. })
        ));
        assert!(!rec.is_started(), "a refused START changes nothing");
    }
}
