//! A VF reached through VFIO instead of sysfs: the function is bound to
//! `vfio-pci` or a variant driver (`virtio_vfio_pci`), its group joins one
//! type1 container, DMA memory is mapped at chosen I/O virtual addresses
//! through the guest's IOMMU, configuration space and BARs come from the
//! VFIO device's regions, and VFIO's migration interface (v2) moves the
//! device's state from one VF to another: RUNNING → PRE_COPY (pre-copy data
//! read) → STOP_COPY (the rest read) on the source; RESUMING (all of it
//! written) → STOP → RUNNING on the destination. The kernel's variant driver
//! turns those into the device's admin commands; this tool sends none.
//!
//! The ioctl numbers and structures are those of Linux's `linux/vfio.h`
//! (VFIO API version 0).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dma::{DmaMem, PAGE};
use crate::error::{Error, Result};
use crate::mmio::Bar;
use crate::pci::{self, CMD_BUS_MASTER, CMD_MEMORY, PCI_COMMAND};
use crate::virtio::VirtioPci;

const VFIO_TYPE: u64 = b';' as u64;
const fn vfio_io(nr: u64) -> u64 {
    (VFIO_TYPE << 8) | (100 + nr)
}
/// `VFIO_GET_API_VERSION`.
pub const GET_API_VERSION: u64 = vfio_io(0);
/// `VFIO_CHECK_EXTENSION`.
pub const CHECK_EXTENSION: u64 = vfio_io(1);
/// `VFIO_SET_IOMMU`.
pub const SET_IOMMU: u64 = vfio_io(2);
/// `VFIO_GROUP_GET_STATUS`.
pub const GROUP_GET_STATUS: u64 = vfio_io(3);
/// `VFIO_GROUP_SET_CONTAINER`.
pub const GROUP_SET_CONTAINER: u64 = vfio_io(4);
/// `VFIO_GROUP_GET_DEVICE_FD`.
pub const GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
/// `VFIO_DEVICE_GET_REGION_INFO`.
pub const DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
/// `VFIO_DEVICE_RESET`.
pub const DEVICE_RESET: u64 = vfio_io(11);
/// `VFIO_IOMMU_MAP_DMA`.
pub const IOMMU_MAP_DMA: u64 = vfio_io(13);
/// `VFIO_DEVICE_FEATURE`.
pub const DEVICE_FEATURE: u64 = vfio_io(17);
/// `VFIO_MIG_GET_PRECOPY_INFO` (on a migration data descriptor).
pub const MIG_GET_PRECOPY_INFO: u64 = vfio_io(21);

/// `VFIO_TYPE1v2_IOMMU`.
pub const TYPE1V2_IOMMU: u64 = 3;
/// `VFIO_GROUP_FLAGS_VIABLE`.
const GROUP_FLAGS_VIABLE: u32 = 1;
/// `VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE`.
const DMA_MAP_READ_WRITE: u32 = 3;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// `VFIO_PCI_CONFIG_REGION_INDEX`.
pub const CONFIG_REGION: u32 = 7;

/// `VFIO_DEVICE_FEATURE_GET` / `_SET` / `_PROBE`.
const FEATURE_GET: u32 = 1 << 16;
const FEATURE_SET: u32 = 1 << 17;
/// `VFIO_DEVICE_FEATURE_MIGRATION`.
const FEATURE_MIGRATION: u32 = 1;
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`.
const FEATURE_MIG_DEVICE_STATE: u32 = 2;
/// `VFIO_MIGRATION_STOP_COPY`, `_P2P`, `_PRE_COPY`.
pub const MIGRATION_STOP_COPY: u64 = 1 << 0;
/// See [`MIGRATION_STOP_COPY`].
pub const MIGRATION_P2P: u64 = 1 << 1;
/// See [`MIGRATION_STOP_COPY`].
pub const MIGRATION_PRE_COPY: u64 = 1 << 2;

/// `enum vfio_device_mig_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MigState {
    /// ERROR
    Error = 0,
    /// STOP
    Stop = 1,
    /// RUNNING
    Running = 2,
    /// STOP_COPY
    StopCopy = 3,
    /// RESUMING
    Resuming = 4,
    /// RUNNING_P2P
    RunningP2p = 5,
    /// PRE_COPY
    PreCopy = 6,
    /// PRE_COPY_P2P
    PreCopyP2p = 7,
}

impl MigState {
    fn from_u32(v: u32) -> Option<MigState> {
        use MigState::*;
        [
            Error, Stop, Running, StopCopy, Resuming, RunningP2p, PreCopy, PreCopyP2p,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }
}

/// Where the workload's DMA memory goes in the I/O virtual address space
/// (below 4 GiB, clear of the MSI window the IOMMU reserves).
pub const DMA_IOVA: u64 = 0x4000_0000;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RegionInfo {
    argsz: u32,
    /// READ, WRITE, MMAP, CAPS.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    cap_offset: u32,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in the device descriptor.
    pub offset: u64,
}

/// `struct vfio_device_feature` followed by up to 16 bytes of data.
#[repr(C)]
#[derive(Default)]
struct Feature {
    argsz: u32,
    flags: u32,
    data: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct PrecopyInfo {
    argsz: u32,
    flags: u32,
    initial_bytes: u64,
    dirty_bytes: u64,
}

fn ioctl_ptr<T>(fd: RawFd, req: u64, arg: &mut T, what: &str) -> Result<i32> {
    // SAFETY: `arg` is a live, writable value of the layout the request
    // expects (the structures above mirror linux/vfio.h).
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        return Err(Error::last_os(what.to_string()));
    }
    Ok(r)
}

fn ioctl_val(fd: RawFd, req: u64, arg: libc::c_ulong, what: &str) -> Result<i32> {
    // SAFETY: the request takes a plain integer argument.
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg) };
    if r < 0 {
        return Err(Error::last_os(what.to_string()));
    }
    Ok(r)
}

fn open_rw(path: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))
}

/// The IOMMU group number of `bdf`.
pub fn group_of(bdf: &str) -> Result<u32> {
    let link = pci::dev_dir(bdf).join("iommu_group");
    let target = std::fs::read_link(&link).map_err(|e| {
        Error::io(
            "read (is the function behind an IOMMU? iommu=on in the VMM)",
            &link,
            e,
        )
    })?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::device(bdf, format!("odd iommu_group link {}", target.display())))
}

/// One VFIO device (a VF).
#[derive(Debug)]
pub struct Device {
    /// Function address.
    pub bdf: String,
    fd: File,
}

impl Device {
    /// Information on region `index`.
    pub fn region(&self, index: u32) -> Result<RegionInfo> {
        let mut info = RegionInfo {
            argsz: std::mem::size_of::<RegionInfo>() as u32,
            index,
            ..Default::default()
        };
        ioctl_ptr(
            self.fd.as_raw_fd(),
            DEVICE_GET_REGION_INFO,
            &mut info,
            &format!("VFIO_DEVICE_GET_REGION_INFO({index}) of {}", self.bdf),
        )?;
        Ok(info)
    }

    /// `len` bytes of configuration space at `off`.
    pub fn config_read(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let r = self.region(CONFIG_REGION)?;
        let mut b = vec![0u8; len];
        self.fd
            .read_exact_at(&mut b, r.offset + off)
            .map_err(|e| Error::io("read config space of", &self.bdf, e))?;
        Ok(b)
    }

    /// Write configuration space at `off`.
    pub fn config_write(&self, off: u64, data: &[u8]) -> Result<()> {
        let r = self.region(CONFIG_REGION)?;
        self.fd
            .write_all_at(data, r.offset + off)
            .map_err(|e| Error::io("write config space of", &self.bdf, e))
    }

    /// BAR `n` mapped into this process.
    pub fn map_bar(&self, n: u8) -> Result<Arc<Bar>> {
        let r = self.region(u32::from(n))?;
        if r.size == 0 || r.flags & REGION_INFO_FLAG_MMAP == 0 {
            return Err(Error::device(
                &self.bdf,
                format!(
                    "VFIO region of BAR{n} cannot be mapped (size {:#x}, flags {:#x})",
                    r.size, r.flags
                ),
            ));
        }
        Bar::map_fd(
            self.fd.as_raw_fd(),
            r.offset,
            r.size as usize,
            &format!("BAR{n} of {} (VFIO)", self.bdf),
        )
    }

    /// The function's virtio structures, with memory decoding and bus
    /// mastering enabled.
    pub fn open_virtio(&self) -> Result<VirtioPci> {
        let cfg = self.config_read(0, pci::CONFIG_STD_LEN)?;
        let caps = pci::parse_virtio_caps(&cfg).map_err(|m| Error::device(&self.bdf, m))?;
        let cmd = u16::from_le_bytes([cfg[PCI_COMMAND], cfg[PCI_COMMAND + 1]]);
        let want = cmd | CMD_MEMORY | CMD_BUS_MASTER;
        if want != cmd {
            self.config_write(PCI_COMMAND as u64, &want.to_le_bytes())?;
        }
        VirtioPci::from_bars(&self.bdf, caps, |n| self.map_bar(n))
    }

    fn feature(&self, flags: u32, data: &[u8], what: &str) -> Result<[u8; 16]> {
        let mut f = Feature {
            argsz: (8 + data.len()) as u32,
            flags,
            ..Default::default()
        };
        f.data[..data.len()].copy_from_slice(data);
        ioctl_ptr(self.fd.as_raw_fd(), DEVICE_FEATURE, &mut f, what)?;
        Ok(f.data)
    }

    /// The migration flags (`VFIO_MIGRATION_*`), or an error saying the
    /// device does not support migration.
    pub fn migration_flags(&self) -> Result<u64> {
        let d = self
            .feature(
                FEATURE_GET | FEATURE_MIGRATION,
                &[0; 8],
                &format!("VFIO_DEVICE_FEATURE_MIGRATION (GET) of {}", self.bdf),
            )
            .map_err(|e| {
                Error::device(
                    &self.bdf,
                    format!("its VFIO driver offers no migration ({e})"),
                )
            })?;
        Ok(u64::from_le_bytes(d[..8].try_into().unwrap_or([0; 8])))
    }

    /// The device's migration state.
    pub fn state(&self) -> Result<MigState> {
        let d = self.feature(
            FEATURE_GET | FEATURE_MIG_DEVICE_STATE,
            &[0; 8],
            &format!("VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE (GET) of {}", self.bdf),
        )?;
        let v = u32::from_le_bytes(d[..4].try_into().unwrap_or([0; 4]));
        MigState::from_u32(v)
            .ok_or_else(|| Error::Protocol(format!("{}: unknown migration state {v}", self.bdf)))
    }

    /// Moves the device to `state`; returns the migration data descriptor
    /// the new state has (PRE_COPY, STOP_COPY: to read; RESUMING: to
    /// write).
    pub fn set_state(&self, state: MigState) -> Result<Option<File>> {
        let mut data = [0u8; 8];
        data[..4].copy_from_slice(&(state as u32).to_le_bytes());
        data[4..8].copy_from_slice(&(-1i32).to_le_bytes());
        let d = self.feature(
            FEATURE_SET | FEATURE_MIG_DEVICE_STATE,
            &data,
            &format!(
                "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE (SET {state:?}) of {}",
                self.bdf
            ),
        )?;
        let fd = i32::from_le_bytes(d[4..8].try_into().unwrap_or([0xff; 4]));
        if fd < 0 {
            return Ok(None);
        }
        // SAFETY: the kernel just created this descriptor for us; nothing
        // else owns it.
        Ok(Some(unsafe { File::from_raw_fd(fd) }))
    }

    /// `VFIO_DEVICE_RESET`.
    pub fn reset(&self) -> Result<()> {
        ioctl_val(
            self.fd.as_raw_fd(),
            DEVICE_RESET,
            0,
            &format!("VFIO_DEVICE_RESET of {}", self.bdf),
        )
        .map(|_| ())
    }
}

/// `(initial_bytes, dirty_bytes)` of a PRE_COPY data descriptor.
pub fn precopy_info(data: &File) -> Result<(u64, u64)> {
    let mut i = PrecopyInfo {
        argsz: std::mem::size_of::<PrecopyInfo>() as u32,
        ..Default::default()
    };
    ioctl_ptr(
        data.as_raw_fd(),
        MIG_GET_PRECOPY_INFO,
        &mut i,
        "VFIO_MIG_GET_PRECOPY_INFO",
    )?;
    Ok((i.initial_bytes, i.dirty_bytes))
}

/// Reads a migration data descriptor until the end of its stream (or, in
/// PRE_COPY, its temporary end) into `out`; returns the bytes read.
pub fn read_stream(data: &mut File, out: &mut Vec<u8>) -> Result<usize> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    loop {
        match data.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => {
                out.extend_from_slice(&buf[..k]);
                n += k;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The temporary end of a pre-copy stream.
            Err(e) if e.raw_os_error() == Some(libc::ENOMSG) => return Ok(n),
            Err(e) => {
                return Err(Error::Sys {
                    call: "read of the VFIO migration data".into(),
                    source: e,
                })
            }
        }
    }
}

/// A type1 container with the groups of the devices this process opened.
#[derive(Debug)]
pub struct Vfio {
    container: File,
    groups: RefCell<HashMap<u32, File>>,
    devices: RefCell<HashMap<String, Rc<Device>>>,
    iommu_set: RefCell<bool>,
    next_iova: RefCell<u64>,
}

impl Vfio {
    /// Opens `/dev/vfio/vfio` (API version 0, type1v2 IOMMU supported).
    pub fn open() -> Result<Vfio> {
        let container = open_rw("/dev/vfio/vfio")?;
        let v = ioctl_val(
            container.as_raw_fd(),
            GET_API_VERSION,
            0,
            "VFIO_GET_API_VERSION",
        )?;
        if v != 0 {
            return Err(Error::Protocol(format!("VFIO API version {v}, expected 0")));
        }
        let ok = ioctl_val(
            container.as_raw_fd(),
            CHECK_EXTENSION,
            TYPE1V2_IOMMU as libc::c_ulong,
            "VFIO_CHECK_EXTENSION(TYPE1v2)",
        )?;
        if ok == 0 {
            return Err(Error::Protocol(
                "the VFIO container has no type1v2 IOMMU (vfio_iommu_type1 not loaded?)".into(),
            ));
        }
        Ok(Vfio {
            container,
            groups: RefCell::new(HashMap::new()),
            devices: RefCell::new(HashMap::new()),
            iommu_set: RefCell::new(false),
            next_iova: RefCell::new(DMA_IOVA),
        })
    }

    /// Makes `bdf` usable: bound to a VFIO driver (with `bind`, one bound
    /// elsewhere moves to `vfio-pci`), its group in the container.
    pub fn prepare(&self, bdf: &str, bind: bool) -> Result<()> {
        let driver = pci::current_driver(bdf);
        let vfio_driver = |d: &str| d == "vfio-pci" || d.ends_with("_vfio_pci");
        match driver.as_deref() {
            Some(d) if vfio_driver(d) => {}
            other if bind => {
                if other.is_some() {
                    pci::unbind(bdf)?;
                }
                let ov = pci::dev_dir(bdf).join("driver_override");
                std::fs::write(&ov, "vfio-pci").map_err(|e| Error::io("write", &ov, e))?;
                let probe = "/sys/bus/pci/drivers_probe";
                std::fs::write(probe, bdf).map_err(|e| Error::io("write", probe, e))?;
                match pci::current_driver(bdf) {
                    Some(d) if vfio_driver(&d) => {}
                    d => {
                        return Err(Error::device(
                            bdf,
                            format!("not bound to vfio-pci after probing (driver {d:?})"),
                        ))
                    }
                }
            }
            other => {
                return Err(Error::device(
                    bdf,
                    format!(
                        "bound to {} instead of vfio-pci or a vfio-pci variant driver (use --bind)",
                        other.unwrap_or("no driver")
                    ),
                ))
            }
        }
        let g = group_of(bdf)?;
        if self.groups.borrow().contains_key(&g) {
            return Ok(());
        }
        let path = format!("/dev/vfio/{g}");
        let group = open_rw(&path)?;
        let mut st = GroupStatus {
            argsz: 8,
            ..Default::default()
        };
        ioctl_ptr(
            group.as_raw_fd(),
            GROUP_GET_STATUS,
            &mut st,
            "VFIO_GROUP_GET_STATUS",
        )?;
        if st.flags & GROUP_FLAGS_VIABLE == 0 {
            return Err(Error::device(
                bdf,
                format!("IOMMU group {g} is not viable (another device of the group is not bound to VFIO)"),
            ));
        }
        let mut cfd: i32 = self.container.as_raw_fd();
        ioctl_ptr(
            group.as_raw_fd(),
            GROUP_SET_CONTAINER,
            &mut cfd,
            &format!("VFIO_GROUP_SET_CONTAINER of group {g}"),
        )?;
        if !*self.iommu_set.borrow() {
            ioctl_val(
                self.container.as_raw_fd(),
                SET_IOMMU,
                TYPE1V2_IOMMU as libc::c_ulong,
                "VFIO_SET_IOMMU(TYPE1v2) (vfio_iommu_type1 allow_unsafe_interrupts=1 without interrupt remapping?)",
            )?;
            *self.iommu_set.borrow_mut() = true;
        }
        self.groups.borrow_mut().insert(g, group);
        Ok(())
    }

    /// The VFIO device of `bdf` (opened once; [`Vfio::prepare`] first).
    pub fn device(&self, bdf: &str) -> Result<Rc<Device>> {
        if let Some(d) = self.devices.borrow().get(bdf) {
            return Ok(d.clone());
        }
        let g = group_of(bdf)?;
        let groups = self.groups.borrow();
        let group = groups.get(&g).ok_or_else(|| {
            Error::device(bdf, "its group is not in the container (prepare first)")
        })?;
        let name = CString::new(bdf).map_err(|_| Error::Usage(format!("bad BDF {bdf:?}")))?;
        // SAFETY: the request reads the NUL-terminated device name.
        let fd = unsafe {
            libc::ioctl(
                group.as_raw_fd(),
                GROUP_GET_DEVICE_FD as libc::c_ulong,
                name.as_ptr(),
            )
        };
        if fd < 0 {
            return Err(Error::last_os(format!("VFIO_GROUP_GET_DEVICE_FD({bdf})")));
        }
        // SAFETY: a new descriptor the kernel created for us.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let d = Rc::new(Device {
            bdf: bdf.to_string(),
            fd: File::from(owned),
        });
        self.devices.borrow_mut().insert(bdf.to_string(), d.clone());
        Ok(d)
    }

    /// DMA memory of at least `len` bytes mapped at the next free I/O
    /// virtual addresses of the container.
    pub fn alloc(&self, len: usize) -> Result<DmaMem> {
        if !*self.iommu_set.borrow() {
            return Err(Error::Usage(
                "DMA memory needs a device in the container first".into(),
            ));
        }
        let iova = *self.next_iova.borrow();
        let m = DmaMem::alloc_iova(len, iova)?;
        let (vaddr, size) = m.host_range();
        let mut map = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: DMA_MAP_READ_WRITE,
            vaddr,
            iova,
            size: size as u64,
        };
        ioctl_ptr(
            self.container.as_raw_fd(),
            IOMMU_MAP_DMA,
            &mut map,
            &format!("VFIO_IOMMU_MAP_DMA of {size:#x} bytes at IOVA {iova:#x}"),
        )?;
        *self.next_iova.borrow_mut() =
            iova + (size as u64).div_ceil(PAGE as u64) * PAGE as u64 + PAGE as u64;
        Ok(m)
    }
}

/// What one VFIO migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migration {
    /// The device's migration flags.
    pub flags: u64,
    /// Pre-copy bytes read (and written to the destination).
    pub precopy_bytes: u64,
    /// Stop-copy bytes read (and written).
    pub stop_copy_bytes: u64,
    /// From the source's STOP_COPY request to the destination RUNNING.
    pub downtime: Duration,
    /// The whole migration.
    pub total: Duration,
}

/// Moves the device state of `src` to `dst` (both opened in `vfio`):
/// destination to RESUMING; source to PRE_COPY (when supported: its data
/// read and written to the destination), then STOP_COPY (its data read and
/// written), then STOP; destination to STOP, then RUNNING.
pub fn migrate(src: &Device, dst: &Device) -> Result<Migration> {
    let t0 = Instant::now();
    let flags = src.migration_flags()?;
    dst.migration_flags()?;
    if flags & MIGRATION_STOP_COPY == 0 {
        return Err(Error::device(
            &src.bdf,
            format!("migration flags {flags:#x} lack STOP_COPY"),
        ));
    }
    let mut m = Migration {
        flags,
        ..Default::default()
    };
    let mut resume = dst
        .set_state(MigState::Resuming)?
        .ok_or_else(|| Error::device(&dst.bdf, "RESUMING gave no data descriptor"))?;
    let mut chunk = Vec::new();
    // PRE_COPY and STOP_COPY share one data transfer session: the
    // descriptor PRE_COPY gives goes on streaming in STOP_COPY.
    let mut session = None;
    if flags & MIGRATION_PRE_COPY != 0 {
        let mut pre = src
            .set_state(MigState::PreCopy)?
            .ok_or_else(|| Error::device(&src.bdf, "PRE_COPY gave no data descriptor"))?;
        let _ = precopy_info(&pre)?;
        read_stream(&mut pre, &mut chunk)?;
        m.precopy_bytes = chunk.len() as u64;
        write_stream(&mut resume, &chunk, &dst.bdf)?;
        chunk.clear();
        session = Some(pre);
    }
    let t_stop = Instant::now();
    let mut stop = match (src.set_state(MigState::StopCopy)?, session) {
        (Some(fd), _) | (None, Some(fd)) => fd,
        (None, None) => return Err(Error::device(&src.bdf, "STOP_COPY gave no data descriptor")),
    };
    read_stream(&mut stop, &mut chunk)?;
    m.stop_copy_bytes = chunk.len() as u64;
    write_stream(&mut resume, &chunk, &dst.bdf)?;
    drop(stop);
    src.set_state(MigState::Stop)?;
    drop(resume);
    dst.set_state(MigState::Stop)?;
    dst.set_state(MigState::Running)?;
    m.downtime = t_stop.elapsed();
    m.total = t0.elapsed();
    Ok(m)
}

fn write_stream(data: &mut File, bytes: &[u8], bdf: &str) -> Result<()> {
    data.write_all(bytes).map_err(|e| Error::Sys {
        call: format!("write of {} bytes of migration data to {bdf}", bytes.len()),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_vfio_h() {
        // _IO(';', 100 + n): ';' is 0x3b.
        assert_eq!(GET_API_VERSION, 0x3b64);
        assert_eq!(GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(DEVICE_FEATURE, 0x3b75);
        assert_eq!(MIG_GET_PRECOPY_INFO, 0x3b79);
    }

    #[test]
    fn structure_sizes_match_linux_vfio_h() {
        assert_eq!(std::mem::size_of::<GroupStatus>(), 8);
        assert_eq!(std::mem::size_of::<DmaMap>(), 32);
        assert_eq!(std::mem::size_of::<RegionInfo>(), 32);
        assert_eq!(std::mem::size_of::<PrecopyInfo>(), 24);
        assert_eq!(std::mem::size_of::<Feature>(), 24);
    }

    #[test]
    fn migration_states() {
        assert_eq!(MigState::from_u32(3), Some(MigState::StopCopy));
        assert_eq!(MigState::from_u32(6), Some(MigState::PreCopy));
        assert_eq!(MigState::from_u32(8), None);
    }
}
