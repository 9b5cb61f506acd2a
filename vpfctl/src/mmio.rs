//! A PCI BAR mapped from sysfs `resourceN` (or from a VFIO device's BAR
//! region), accessed only with volatile loads and stores of the register's
//! own width.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{Error, Result};

/// A mapped BAR.
#[derive(Debug)]
pub struct Bar {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain device memory; every access is a volatile
// load/store through `&self`, and the registers tolerate accesses from any
// thread. Unmapping happens only in `drop`, with exclusive ownership.
unsafe impl Send for Bar {}
// SAFETY: as above; no interior state besides the mapping itself.
unsafe impl Sync for Bar {}

impl Bar {
    /// Map the whole `resourceN` file read/write, shared.
    pub fn map(path: &Path) -> Result<Arc<Bar>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        let len = f.metadata().map_err(|e| Error::io("stat", path, e))?.len() as usize;
        if len == 0 {
            return Err(Error::Protocol(format!(
                "{} is empty (BAR not assigned?)",
                path.display()
            )));
        }
        Self::map_fd(f.as_raw_fd(), 0, len, &path.display().to_string())
    }

    /// Map `len` bytes of `fd` from `offset` read/write, shared (a VFIO
    /// device's BAR region). The mapping outlives `fd`.
    pub fn map_fd(fd: RawFd, offset: u64, len: usize, what: &str) -> Result<Arc<Bar>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| Error::Protocol(format!("{what}: offset {offset:#x} too large")))?;
        // SAFETY: a fresh shared mapping of a descriptor the caller holds
        // open; the kernel picks the address, so no existing memory is
        // affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os(format!("mmap of {what}")));
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::last_os("mmap"))?;
        Ok(Arc::new(Bar { base, len }))
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (never true for a successful map).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn ptr<T>(&self, off: usize) -> *mut T {
        let size = std::mem::size_of::<T>();
        assert!(
            off.is_multiple_of(size) && off.checked_add(size).is_some_and(|e| e <= self.len),
            "BAR access of {size} bytes at {off:#x} outside the {:#x}-byte mapping or misaligned",
            self.len
        );
        // SAFETY: in bounds of the mapping, checked just above.
        unsafe { self.base.as_ptr().add(off).cast::<T>() }
    }

    /// 8-bit register read.
    pub fn read8(&self, off: usize) -> u8 {
        // SAFETY: `ptr` checked bounds and alignment; MMIO needs a
        // volatile access of exactly this width.
        unsafe { self.ptr::<u8>(off).read_volatile() }
    }

    /// 16-bit register read.
    pub fn read16(&self, off: usize) -> u16 {
        // SAFETY: as in `read8`.
        u16::from_le(unsafe { self.ptr::<u16>(off).read_volatile() })
    }

    /// 32-bit register read.
    pub fn read32(&self, off: usize) -> u32 {
        // SAFETY: as in `read8`.
        u32::from_le(unsafe { self.ptr::<u32>(off).read_volatile() })
    }

    /// 8-bit register write.
    pub fn write8(&self, off: usize, v: u8) {
        // SAFETY: as in `read8`.
        unsafe { self.ptr::<u8>(off).write_volatile(v) }
    }

    /// 16-bit register write.
    pub fn write16(&self, off: usize, v: u16) {
        // SAFETY: as in `read8`.
        unsafe { self.ptr::<u16>(off).write_volatile(v.to_le()) }
    }

    /// 32-bit register write.
    pub fn write32(&self, off: usize, v: u32) {
        // SAFETY: as in `read8`.
        unsafe { self.ptr::<u32>(off).write_volatile(v.to_le()) }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region `map` created; nothing
        // borrows it any more (we own the last reference).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// Register access to one virtio structure (offsets relative to it): a
/// [`Region`] of a mapped BAR in the guest, or an in-process device model
/// in host tests.
pub trait Regs: Send + std::fmt::Debug {
    /// Length of the structure.
    fn len(&self) -> usize;
    /// Whether the structure is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// 8-bit read.
    fn r8(&self, off: usize) -> u8;
    /// 16-bit read.
    fn r16(&self, off: usize) -> u16;
    /// 32-bit read.
    fn r32(&self, off: usize) -> u32;
    /// 8-bit write.
    fn w8(&self, off: usize, v: u8);
    /// 16-bit write.
    fn w16(&self, off: usize, v: u16);
    /// 32-bit write.
    fn w32(&self, off: usize, v: u32);
    /// 64-bit field written as two 32-bit halves, low first (what virtio
    /// allows for the ring address registers).
    fn w64_halves(&self, off: usize, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }
}

/// A window of a BAR (one virtio structure); offsets are relative to it.
#[derive(Debug, Clone)]
pub struct Region {
    bar: Arc<Bar>,
    base: usize,
    len: usize,
}

impl Region {
    /// The window `[offset, offset + len)` of `bar`; errors if it does not
    /// fit the mapping or is shorter than `min_len`.
    pub fn new(bar: Arc<Bar>, offset: u32, len: u32, min_len: usize, what: &str) -> Result<Self> {
        let (base, len) = (offset as usize, len as usize);
        if len < min_len || base.checked_add(len).is_none_or(|e| e > bar.len()) {
            return Err(Error::Protocol(format!(
                "{what} structure at BAR offset {base:#x}, length {len:#x}: needs at least {min_len:#x} \
                 bytes inside the {:#x}-byte BAR",
                bar.len()
            )));
        }
        Ok(Region { bar, base, len })
    }

    fn at(&self, off: usize, size: usize) -> usize {
        assert!(
            off + size <= self.len,
            "register {off:#x}+{size} outside a {:#x}-byte region",
            self.len
        );
        self.base + off
    }
}

impl Regs for Region {
    /// Length of the window.
    fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// 8-bit read.
    fn r8(&self, off: usize) -> u8 {
        self.bar.read8(self.at(off, 1))
    }
    /// 16-bit read.
    fn r16(&self, off: usize) -> u16 {
        self.bar.read16(self.at(off, 2))
    }
    /// 32-bit read.
    fn r32(&self, off: usize) -> u32 {
        self.bar.read32(self.at(off, 4))
    }
    /// 8-bit write.
    fn w8(&self, off: usize, v: u8) {
        self.bar.write8(self.at(off, 1), v)
    }
    /// 16-bit write.
    fn w16(&self, off: usize, v: u16) {
        self.bar.write16(self.at(off, 2), v)
    }
    /// 32-bit write.
    fn w32(&self, off: usize, v: u32) {
        self.bar.write32(self.at(off, 4), v)
    }
}
