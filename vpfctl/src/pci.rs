//! PCI configuration space parsing (virtio vendor capabilities, SR-IOV)
//! and the sysfs operations the tool needs: reading/writing the config
//! file, the command register, driver binding, `sriov_numvfs`, VF lookup.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Root of the PCI devices in sysfs.
pub const SYSFS_PCI: &str = "/sys/bus/pci/devices";
/// Root of the PCI drivers in sysfs.
pub const SYSFS_DRIVERS: &str = "/sys/bus/pci/drivers";
/// The stub driver the tool binds PFs and VFs to.
pub const PF_STUB: &str = "pci-pf-stub";

/// virtio vendor ID.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Command register offset.
pub const PCI_COMMAND: usize = 0x04;
/// Command register: memory space enable.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable.
pub const CMD_BUS_MASTER: u16 = 1 << 2;

const PCI_STATUS: usize = 0x06;
const STATUS_CAP_LIST: u16 = 1 << 4;
const PCI_CAP_PTR: usize = 0x34;
const CAP_ID_VNDR: u8 = 0x09;
const CAP_ID_MSIX: u8 = 0x11;
const CAP_ID_EXP: u8 = 0x10;
const EXT_CAP_ID_SRIOV: u16 = 0x0010;

/// `cfg_type` of the common configuration capability.
pub const CFG_COMMON: u8 = 1;
/// `cfg_type` of the notification capability.
pub const CFG_NOTIFY: u8 = 2;
/// `cfg_type` of the ISR capability.
pub const CFG_ISR: u8 = 3;
/// `cfg_type` of the device configuration capability.
pub const CFG_DEVICE: u8 = 4;

/// Where one virtio structure lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapRegion {
    /// Config-space offset of the capability.
    pub cap_offset: u16,
    /// BAR number.
    pub bar: u8,
    /// Offset inside the BAR.
    pub offset: u32,
    /// Length of the structure.
    pub length: u32,
}

/// The virtio capabilities of a function (the first of each type, as the
/// virtio specification tells drivers to use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioCaps {
    /// Common configuration.
    pub common: CapRegion,
    /// Notification area.
    pub notify: CapRegion,
    /// `notify_off_multiplier`.
    pub notify_multiplier: u32,
    /// ISR status.
    pub isr: Option<CapRegion>,
    /// Device-specific configuration.
    pub device: Option<CapRegion>,
    /// Config-space offset of the MSI-X capability.
    pub msix: Option<u16>,
    /// Config-space offset of the PCI Express capability.
    pub pcie: Option<u16>,
}

/// The SR-IOV extended capability's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SriovCap {
    /// Config-space offset.
    pub offset: u16,
    /// SR-IOV Control.
    pub control: u16,
    /// InitialVFs.
    pub initial_vfs: u16,
    /// TotalVFs.
    pub total_vfs: u16,
    /// NumVFs.
    pub num_vfs: u16,
    /// First VF Offset.
    pub first_vf_offset: u16,
    /// VF Stride.
    pub vf_stride: u16,
    /// VF Device ID.
    pub vf_device_id: u16,
}

fn u16_at(cfg: &[u8], off: usize) -> Option<u16> {
    cfg.get(off..off + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(cfg: &[u8], off: usize) -> Option<u32> {
    cfg.get(off..off + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Walk the standard capability list: `(offset, id)` of each capability.
/// Stops at a loop, a pointer into the header, or the end of the bytes.
pub fn capabilities(cfg: &[u8]) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    if u16_at(cfg, PCI_STATUS).unwrap_or(0) & STATUS_CAP_LIST == 0 {
        return out;
    }
    let mut ptr = usize::from(cfg.get(PCI_CAP_PTR).copied().unwrap_or(0) & !3);
    // 48 capabilities of 4 bytes fill the 192 bytes after the header.
    for _ in 0..48 {
        if !(0x40..0x100).contains(&ptr) || ptr + 2 > cfg.len() {
            break;
        }
        out.push((ptr as u16, cfg[ptr]));
        ptr = usize::from(cfg[ptr + 1] & !3);
    }
    out
}

/// Parse the virtio vendor capabilities (and note MSI-X and PCIe).
pub fn parse_virtio_caps(cfg: &[u8]) -> std::result::Result<VirtioCaps, String> {
    let mut common = None;
    let mut notify = None;
    let mut isr = None;
    let mut device = None;
    let mut msix = None;
    let mut pcie = None;
    for (off, id) in capabilities(cfg) {
        let o = usize::from(off);
        match id {
            CAP_ID_MSIX => msix = msix.or(Some(off)),
            CAP_ID_EXP => pcie = pcie.or(Some(off)),
            CAP_ID_VNDR => {
                let cap_len = usize::from(cfg.get(o + 2).copied().unwrap_or(0));
                if cap_len < 16 || o + 16 > cfg.len() {
                    continue;
                }
                let region = CapRegion {
                    cap_offset: off,
                    bar: cfg[o + 4],
                    offset: u32_at(cfg, o + 8).unwrap_or(0),
                    length: u32_at(cfg, o + 12).unwrap_or(0),
                };
                if region.bar > 5 {
                    continue;
                }
                match cfg[o + 3] {
                    CFG_COMMON => common = common.or(Some(region)),
                    CFG_NOTIFY if cap_len >= 20 && notify.is_none() => {
                        if let Some(m) = u32_at(cfg, o + 16) {
                            notify = Some((region, m));
                        }
                    }
                    CFG_ISR => isr = isr.or(Some(region)),
                    CFG_DEVICE => device = device.or(Some(region)),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let common = common.ok_or("no virtio common configuration capability")?;
    let (notify, notify_multiplier) = notify.ok_or("no virtio notification capability")?;
    Ok(VirtioCaps {
        common,
        notify,
        notify_multiplier,
        isr,
        device,
        msix,
        pcie,
    })
}

/// Find and parse the SR-IOV extended capability (needs the 4 KiB space).
pub fn parse_sriov(cfg: &[u8]) -> Option<SriovCap> {
    let mut off = 0x100usize;
    for _ in 0..(4096 - 0x100) / 4 {
        let hdr = u32_at(cfg, off)?;
        if hdr == 0 || hdr == 0xffff_ffff {
            return None;
        }
        if (hdr & 0xffff) as u16 == EXT_CAP_ID_SRIOV {
            let g = |x: usize| u16_at(cfg, off + x);
            return Some(SriovCap {
                offset: off as u16,
                control: g(0x08)?,
                initial_vfs: g(0x0c)?,
                total_vfs: g(0x0e)?,
                num_vfs: g(0x10)?,
                first_vf_offset: g(0x14)?,
                vf_stride: g(0x16)?,
                vf_device_id: g(0x1a)?,
            });
        }
        let next = (hdr >> 20) as usize & !3;
        if next < 0x100 || next <= off {
            return None;
        }
        off = next;
    }
    None
}

/// Canonical `DDDD:BB:DD.F` form of a function address (`BB:DD.F` gets
/// domain 0000).
pub fn normalize_bdf(s: &str) -> std::result::Result<String, String> {
    let s = s.trim();
    let full = if s.matches(':').count() == 1 {
        format!("0000:{s}")
    } else {
        s.to_string()
    };
    let ok = {
        let b = full.as_bytes();
        full.len() == 12
            && b[4] == b':'
            && b[7] == b':'
            && b[10] == b'.'
            && full
                .chars()
                .enumerate()
                .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
    };
    if ok {
        Ok(full.to_ascii_lowercase())
    } else {
        Err(format!(
            "{s:?} is not a PCI address (DDDD:BB:DD.F or BB:DD.F)"
        ))
    }
}

/// sysfs directory of a function.
pub fn dev_dir(bdf: &str) -> PathBuf {
    Path::new(SYSFS_PCI).join(bdf)
}

fn read_trim(path: &Path) -> Result<String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| Error::io("read", path, e))
}

fn write_str(path: &Path, s: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open for writing", path, e))?;
    f.write_all(s.as_bytes())
        .map_err(|e| Error::io("write to", path, e))
}

/// Read a sysfs hex attribute such as `vendor` (`0x1af4`).
pub fn read_hex_attr(bdf: &str, attr: &str) -> Result<u64> {
    let path = dev_dir(bdf).join(attr);
    let s = read_trim(&path)?;
    crate::wire::parse_u64(&s).map_err(|e| Error::device(bdf, format!("{attr}: {e}")))
}

/// The whole configuration space the kernel lets us read (4 KiB as root).
pub fn read_config(bdf: &str) -> Result<Vec<u8>> {
    let path = dev_dir(bdf).join("config");
    fs::read(&path).map_err(|e| Error::io("read", path, e))
}

/// Bytes of the standard configuration space: the header and the
/// capability list, where the virtio vendor capabilities live.
pub const CONFIG_STD_LEN: usize = 256;

/// `len` bytes of configuration space from `off` (fewer if the file ends).
/// Every aligned dword the kernel reads for a sysfs `config` read is one
/// configuration access, a VM exit under a VMM: reading the whole 4 KiB
/// costs 1024 of them (hundreds of ms in a nested guest), so callers read
/// only what they parse.
pub fn read_config_at(bdf: &str, off: usize, len: usize) -> Result<Vec<u8>> {
    let path = dev_dir(bdf).join("config");
    let f = fs::File::open(&path).map_err(|e| Error::io("open", &path, e))?;
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f
            .read_at(&mut buf[got..], (off + got) as u64)
            .map_err(|e| Error::io("read", &path, e))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}

/// The standard configuration space (header and capability list).
pub fn read_config_std(bdf: &str) -> Result<Vec<u8>> {
    read_config_at(bdf, 0, CONFIG_STD_LEN)
}

/// One 16-bit configuration register (one configuration access).
pub fn read_config_u16(bdf: &str, off: usize) -> Result<u16> {
    let b = read_config_at(bdf, off, 2)?;
    u16_at(&b, 0)
        .ok_or_else(|| Error::device(bdf, format!("config space ends before offset {off:#x} + 2")))
}

/// Write a 16-bit config register (an aligned 2-byte write of the config
/// file reaches the device as one word write).
pub fn write_config_u16(bdf: &str, off: usize, v: u16) -> Result<()> {
    let path = dev_dir(bdf).join("config");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("open for writing", &path, e))?;
    let n = f
        .write_at(&v.to_le_bytes(), off as u64)
        .map_err(|e| Error::io("write to", &path, e))?;
    if n != 2 {
        return Err(Error::device(
            bdf,
            format!("short write of config offset {off:#x} ({n} of 2 bytes)"),
        ));
    }
    Ok(())
}

/// Set memory space and bus master enable in the command register
/// (bus mastering is what lets the device DMA into our rings).
pub fn enable_mem_and_bus_master(bdf: &str) -> Result<()> {
    let cmd = read_config_u16(bdf, PCI_COMMAND)?;
    let want = cmd | CMD_MEMORY | CMD_BUS_MASTER;
    if want != cmd {
        write_config_u16(bdf, PCI_COMMAND, want)?;
    }
    Ok(())
}

/// The driver a function is bound to.
pub fn current_driver(bdf: &str) -> Option<String> {
    fs::read_link(dev_dir(bdf).join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Bind `bdf` to `driver` through `driver_override` (unbinding it from its
/// current driver first). No-op if already bound to it.
pub fn bind(bdf: &str, driver: &str) -> Result<()> {
    if !dev_dir(bdf).exists() {
        return Err(Error::device(bdf, "no such device in sysfs"));
    }
    if current_driver(bdf).as_deref() == Some(driver) {
        return Ok(());
    }
    let drv_dir = Path::new(SYSFS_DRIVERS).join(driver);
    if !drv_dir.exists() {
        return Err(Error::device(
            bdf,
            format!("driver {driver} is not loaded (no {})", drv_dir.display()),
        ));
    }
    write_str(&dev_dir(bdf).join("driver_override"), driver)?;
    unbind(bdf)?;
    write_str(&drv_dir.join("bind"), bdf)?;
    match current_driver(bdf) {
        Some(d) if d == driver => Ok(()),
        other => Err(Error::device(
            bdf,
            format!("after binding to {driver} the device is bound to {other:?}"),
        )),
    }
}

/// Unbind `bdf` from its driver, if any.
pub fn unbind(bdf: &str) -> Result<()> {
    if current_driver(bdf).is_some() {
        write_str(&dev_dir(bdf).join("driver/unbind"), bdf)?;
    }
    Ok(())
}

/// Check the device may be driven from userspace: bound to pci-pf-stub or
/// to nothing; binds it to pci-pf-stub first when `bind_stub`.
pub fn prepare_for_userspace(bdf: &str, bind_stub: bool) -> Result<()> {
    if !dev_dir(bdf).exists() {
        return Err(Error::device(bdf, "no such device in sysfs"));
    }
    match current_driver(bdf) {
        None => Ok(()),
        Some(d) if d == PF_STUB => Ok(()),
        Some(_) if bind_stub => bind(bdf, PF_STUB),
        Some(d) => Err(Error::device(
            bdf,
            format!(
                "bound to {d}; a kernel driver owns it. Run `vpfctl bind --dev {bdf}` \
                 (or pass --bind) to move it to {PF_STUB}"
            ),
        )),
    }
}

/// The sysfs `resourceN` file of a BAR.
pub fn resource_path(bdf: &str, bar: u8) -> PathBuf {
    dev_dir(bdf).join(format!("resource{bar}"))
}

/// BDF of VF `n` (1-based, = member id) of `pf`.
pub fn vf_bdf(pf: &str, n: u64) -> Result<String> {
    if n == 0 {
        return Err(Error::Usage("VF numbers start at 1".into()));
    }
    let link = dev_dir(pf).join(format!("virtfn{}", n - 1));
    let target = fs::read_link(&link).map_err(|e| Error::io("read link", &link, e))?;
    target
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .ok_or_else(|| Error::device(pf, format!("{} has no file name", link.display())))
}

/// Member id (VF number) of `vf` under `pf`, by its virtfn links.
pub fn vf_number(pf: &str, vf: &str) -> Option<u64> {
    let numvfs = read_hex_attr(pf, "sriov_numvfs").ok()?;
    (1..=numvfs).find(|&n| vf_bdf(pf, n).ok().as_deref() == Some(vf))
}

/// Set `sriov_numvfs` (writing 0 first when changing a non-zero count, as
/// the kernel requires).
pub fn set_numvfs(pf: &str, n: u64) -> Result<()> {
    let path = dev_dir(pf).join("sriov_numvfs");
    let cur = read_trim(&path)?
        .parse::<u64>()
        .map_err(|e| Error::device(pf, format!("sriov_numvfs: {e}")))?;
    if cur == n {
        return Ok(());
    }
    if cur != 0 && n != 0 {
        write_str(&path, "0")?;
    }
    write_str(&path, &n.to_string())
}

/// Set `sriov_drivers_autoprobe`.
pub fn set_autoprobe(pf: &str, on: bool) -> Result<()> {
    write_str(
        &dev_dir(pf).join("sriov_drivers_autoprobe"),
        if on { "1" } else { "0" },
    )
}

/// Find the virtio PF: the one virtio function with SR-IOV (a
/// `sriov_totalvfs` attribute above 0). Errors when none or several.
pub fn find_pf() -> Result<String> {
    let rd = fs::read_dir(SYSFS_PCI).map_err(|e| Error::io("list", SYSFS_PCI, e))?;
    let mut found = Vec::new();
    for e in rd.flatten() {
        let bdf = e.file_name().to_string_lossy().into_owned();
        if read_hex_attr(&bdf, "vendor").ok() != Some(u64::from(VIRTIO_VENDOR)) {
            continue;
        }
        let total = read_trim(&dev_dir(&bdf).join("sriov_totalvfs"))
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        if total > 0 {
            found.push(bdf);
        }
    }
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::Usage(
            "no virtio function with SR-IOV found in /sys/bus/pci/devices; give --pf".into(),
        )),
        _ => Err(Error::Usage(format!(
            "several virtio PFs ({}); give --pf",
            found.join(", ")
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A captured-style config space: virtio-blk PF with PCIe cap at 0x40,
    /// MSI-X at 0x80, virtio caps at 0x90.., SR-IOV at 0x100. Built the way
    /// the project's transport lays it out (all regions in BAR0).
    pub(crate) fn sample_config() -> Vec<u8> {
        let mut c = vec![0u8; 4096];
        c[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        c[2..4].copy_from_slice(&0x1042u16.to_le_bytes());
        c[PCI_STATUS..PCI_STATUS + 2].copy_from_slice(&STATUS_CAP_LIST.to_le_bytes());
        c[PCI_CAP_PTR] = 0x40;
        // PCIe
        c[0x40] = CAP_ID_EXP;
        c[0x41] = 0x80;
        // MSI-X
        c[0x80] = CAP_ID_MSIX;
        c[0x81] = 0x90;
        let vcap = |c: &mut Vec<u8>, at: usize, next: u8, ty: u8, off: u32, len: u32, cl: u8| {
            c[at] = CAP_ID_VNDR;
            c[at + 1] = next;
            c[at + 2] = cl;
            c[at + 3] = ty;
            c[at + 4] = 0;
            c[at + 8..at + 12].copy_from_slice(&off.to_le_bytes());
            c[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
        };
        vcap(&mut c, 0x90, 0xa0, CFG_COMMON, 0, 0x1000, 16);
        vcap(&mut c, 0xa0, 0xb0, CFG_ISR, 0x1000, 0x1000, 16);
        vcap(&mut c, 0xb0, 0xc0, CFG_DEVICE, 0x2000, 0x1000, 16);
        vcap(&mut c, 0xc0, 0xd8, CFG_NOTIFY, 0x3000, 0x1000, 20);
        c[0xd0..0xd4].copy_from_slice(&4u32.to_le_bytes());
        // pci_cfg capability, then a second common cap that must be ignored.
        vcap(&mut c, 0xd8, 0xf0, 5, 0, 0, 20);
        vcap(&mut c, 0xf0, 0x00, CFG_COMMON, 0x7000, 0x100, 16);
        // SR-IOV extended capability at 0x100, last in the list.
        let hdr: u32 = u32::from(EXT_CAP_ID_SRIOV) | (1 << 16);
        c[0x100..0x104].copy_from_slice(&hdr.to_le_bytes());
        let put = |c: &mut Vec<u8>, x: usize, v: u16| {
            c[0x100 + x..0x102 + x].copy_from_slice(&v.to_le_bytes())
        };
        put(&mut c, 0x08, 0x9); // VF Enable | VF MSE
        put(&mut c, 0x0c, 8);
        put(&mut c, 0x0e, 8);
        put(&mut c, 0x10, 4);
        put(&mut c, 0x14, 1);
        put(&mut c, 0x16, 1);
        put(&mut c, 0x1a, 0x1042);
        c
    }

    #[test]
    fn parses_virtio_caps() {
        let c = sample_config();
        let caps = parse_virtio_caps(&c).unwrap();
        assert_eq!(
            caps.common,
            CapRegion {
                cap_offset: 0x90,
                bar: 0,
                offset: 0,
                length: 0x1000
            }
        );
        assert_eq!(caps.notify.offset, 0x3000);
        assert_eq!(caps.notify_multiplier, 4);
        assert_eq!(caps.isr.unwrap().offset, 0x1000);
        assert_eq!(caps.device.unwrap().offset, 0x2000);
        assert_eq!(caps.msix, Some(0x80));
        assert_eq!(caps.pcie, Some(0x40));
    }

    #[test]
    fn parses_sriov() {
        let s = parse_sriov(&sample_config()).unwrap();
        assert_eq!(s.offset, 0x100);
        assert_eq!((s.total_vfs, s.num_vfs, s.initial_vfs), (8, 4, 8));
        assert_eq!((s.first_vf_offset, s.vf_stride), (1, 1));
        assert_eq!(s.vf_device_id, 0x1042);
        assert_eq!(s.control, 9);
        // 256-byte config space (no extended caps visible).
        assert_eq!(parse_sriov(&sample_config()[..256]), None);
    }

    #[test]
    fn survives_hostile_lists() {
        let mut c = sample_config();
        // Loop: the last capability points back at the first.
        c[0xf1] = 0x40;
        let caps = capabilities(&c);
        assert_eq!(caps.len(), 48);
        assert!(parse_virtio_caps(&c).is_ok());
        // Pointer into the header ends the walk.
        c[PCI_CAP_PTR] = 0x10;
        assert!(capabilities(&c).is_empty());
        assert!(parse_virtio_caps(&c).is_err());
        // No capability list bit.
        let mut d = sample_config();
        d[PCI_STATUS] = 0;
        assert!(parse_virtio_caps(&d).is_err());
        // Truncated notify cap (cap_len 16) is skipped.
        let mut e = sample_config();
        e[0xc2] = 16;
        assert_eq!(
            parse_virtio_caps(&e).unwrap_err(),
            "no virtio notification capability"
        );
        // Extended list that loops.
        let mut f = sample_config();
        let hdr: u32 = 0x0001 | (1 << 16) | (0x100 << 20);
        f[0x100..0x104].copy_from_slice(&hdr.to_le_bytes());
        assert_eq!(parse_sriov(&f), None);
        // Short buffer.
        assert!(parse_virtio_caps(&sample_config()[..0x50]).is_err());
    }

    #[test]
    fn bdf_forms() {
        assert_eq!(normalize_bdf("00:04.0").unwrap(), "0000:00:04.0");
        assert_eq!(normalize_bdf("0000:0A:1f.7").unwrap(), "0000:0a:1f.7");
        assert!(normalize_bdf("0000:00:04").is_err());
        assert!(normalize_bdf("zz:04.0").is_err());
    }
}
