//! The VMM's own snapshot: what it holds, and the directory it lives in.
//!
//! A snapshot of a paused VM is a directory:
//!
//! * `config.json`: the VM's configuration (JSON, for people to read);
//! * `state.bin`: a [`VmSnapshot`] framed by [`vm_migration::state`]
//!   (magic, format version, length, CRC-32, binary encoding): every vCPU,
//!   the irqchip and clock, COM1, the GED, every PCI function (the PF with
//!   its VFs and member migration state included) and the memory layout
//!   with the memory's own CRC-32;
//! * `memory.bin`: guest RAM, region after region.
//!
//! Restore builds the VM from `config.json` as it was configured, then puts
//! each state in; anything that does not match (a truncated or corrupted
//! file, another format version, a device list or memory size that differs
//! from the configuration) is one error and no VM.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_clock_data;
use pci::Bdf;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_devices::block::Block;
use virtio_devices::iommu::{IommuSnapshot, VirtioIommu};
use virtio_devices::pf::device::{PfSnapshot, VirtioPf};
use virtio_devices::pf::vf::FunctionSnapshot;
use virtio_devices::transport::VirtioPciDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vm_migration::{GuestMemoryMmap, MigratableError, Snapshottable, StateError};

use crate::arch::kvm_state::{IrqchipState, VcpuState};
use crate::devices::serial::SerialSnapshot;
use crate::vm::VmConfig;

/// The files of a snapshot directory.
pub const CONFIG_FILE: &str = "config.json";
pub const STATE_FILE: &str = "state.bin";
pub const MEMORY_FILE: &str = "memory.bin";

/// Chunk of memory copied at a time.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("{0:?} is not a snapshot URL: expected file:///absolute/directory")]
    Url(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    State { path: PathBuf, source: StateError },
    #[error("{path}: not a configuration of this VMM: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: {have} bytes, the snapshot's memory is {want} bytes")]
    MemorySize { path: PathBuf, have: u64, want: u64 },
    #[error("{path}: checksum mismatch: the memory is corrupted")]
    MemoryChecksum { path: PathBuf },
    #[error("the snapshot does not match its configuration: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Device(#[from] MigratableError),
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// The directory of a `file://` URL (`file:///dir` or `file://dir`).
pub fn url_to_dir(url: &str) -> Result<PathBuf, SnapshotError> {
    match url.strip_prefix("file://") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(SnapshotError::Url(url.to_string())),
    }
}

/// One top-level PCI function with state, by kind. The PF carries its VFs.
#[derive(Clone)]
pub enum Persistent {
    Disk(Bdf, Arc<Mutex<VirtioPciDevice<Block>>>),
    Pf(Bdf, Arc<Mutex<VirtioPf>>),
    Iommu(Bdf, Arc<Mutex<VirtioPciDevice<VirtioIommu>>>),
}

impl Persistent {
    pub fn bdf(&self) -> Bdf {
        match self {
            Persistent::Disk(b, _) | Persistent::Pf(b, _) | Persistent::Iommu(b, _) => *b,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Persistent::Disk(..) => "disk",
            Persistent::Pf(..) => "virtio-pf",
            Persistent::Iommu(..) => "virtio-iommu",
        }
    }
}

/// The state of one top-level function.
#[derive(Clone, Serialize, Deserialize)]
pub enum DeviceState {
    Disk {
        bdf: String,
        state: FunctionSnapshot,
    },
    Pf {
        bdf: String,
        state: PfSnapshot,
    },
    Iommu {
        bdf: String,
        state: IommuSnapshot,
    },
}

impl DeviceState {
    fn describe(&self) -> String {
        match self {
            DeviceState::Disk { bdf, .. } => format!("disk at {bdf}"),
            DeviceState::Pf { bdf, .. } => format!("virtio-pf at {bdf}"),
            DeviceState::Iommu { bdf, .. } => format!("virtio-iommu at {bdf}"),
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Saves every function's state (the VM is paused).
pub fn snapshot_devices(devices: &[Persistent]) -> Result<Vec<DeviceState>, MigratableError> {
    devices
        .iter()
        .map(|d| {
            Ok(match d {
                Persistent::Disk(bdf, dev) => DeviceState::Disk {
                    bdf: bdf.to_string(),
                    state: Snapshottable::snapshot(&*lock(dev))?,
                },
                Persistent::Pf(bdf, pf) => DeviceState::Pf {
                    bdf: bdf.to_string(),
                    state: Snapshottable::snapshot(&*lock(pf))?,
                },
                Persistent::Iommu(bdf, dev) => DeviceState::Iommu {
                    bdf: bdf.to_string(),
                    state: virtio_devices::iommu::snapshot(&lock(dev)),
                },
            })
        })
        .collect()
}

/// Puts each saved state into the function built for it (same kind, same
/// place), after checking that the lists match one to one.
pub fn restore_devices(
    devices: &[Persistent],
    states: &[DeviceState],
) -> Result<(), SnapshotError> {
    if devices.len() != states.len() {
        return Err(SnapshotError::Mismatch(format!(
            "the configuration has {} PCI devices, the state {}",
            devices.len(),
            states.len()
        )));
    }
    for (d, s) in devices.iter().zip(states) {
        let here = d.bdf().to_string();
        match (d, s) {
            (Persistent::Disk(_, dev), DeviceState::Disk { bdf, state }) if *bdf == here => {
                Snapshottable::restore(&mut *lock(dev), state)?;
            }
            (Persistent::Pf(_, pf), DeviceState::Pf { bdf, state }) if *bdf == here => {
                Snapshottable::restore(&mut *lock(pf), state)?;
            }
            (Persistent::Iommu(_, dev), DeviceState::Iommu { bdf, state }) if *bdf == here => {
                virtio_devices::iommu::restore(&mut lock(dev), state)
                    .map_err(|e| MigratableError::restore("the virtio-iommu", e))?;
            }
            _ => {
                return Err(SnapshotError::Mismatch(format!(
                    "the configuration has a {} at {here}, the state a {}",
                    d.kind(),
                    s.describe()
                )))
            }
        }
    }
    Ok(())
}

/// Where guest RAM is and its checksum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// (guest address, length) of each region, in file order.
    pub regions: Vec<(u64, u64)>,
    /// CRC-32 of `memory.bin`.
    pub crc32: u32,
}

impl MemoryLayout {
    fn total(&self) -> u64 {
        self.regions.iter().map(|r| r.1).sum()
    }
}

/// Everything of a paused VM but its memory and configuration.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    pub vcpus: Vec<VcpuState>,
    pub irqchip: IrqchipState,
    pub clock: kvm_clock_data,
    pub serial: Option<SerialSnapshot>,
    /// Events latched in the GED and not yet read by the guest.
    pub ged_pending: u8,
    /// A power-button press held for resume.
    pub button_held: bool,
    pub devices: Vec<DeviceState>,
    pub memory: MemoryLayout,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes guest RAM into `path`, region after region; returns the layout
/// with the checksum.
pub fn save_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<MemoryLayout, SnapshotError> {
    let file = File::create(path).map_err(io("cannot create", path))?;
    let mut out = BufWriter::with_capacity(CHUNK, file);
    let mut crc = crc32fast::Hasher::new();
    let mut regions = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    for r in mem.iter() {
        let (start, len) = (r.start_addr().0, r.len());
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(CHUNK as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(start + off))?;
            crc.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io("cannot write", path))?;
            off += n as u64;
        }
        regions.push((start, len));
    }
    let file = out.into_inner().map_err(|e| SnapshotError::Io {
        what: "cannot write",
        path: path.to_path_buf(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io("cannot sync", path))?;
    Ok(MemoryLayout {
        regions,
        crc32: crc.finalize(),
    })
}

/// Checks `path` against `layout` (size, then checksum) and copies it into
/// guest RAM, which must have the same regions.
pub fn restore_memory(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    path: &Path,
) -> Result<(), SnapshotError> {
    let ours: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    if ours != layout.regions {
        return Err(SnapshotError::Mismatch(format!(
            "guest memory regions {ours:x?}, the snapshot's {:x?}",
            layout.regions
        )));
    }
    let file = File::open(path).map_err(io("cannot open", path))?;
    let have = file.metadata().map_err(io("cannot stat", path))?.len();
    if have != layout.total() {
        return Err(SnapshotError::MemorySize {
            path: path.to_path_buf(),
            have,
            want: layout.total(),
        });
    }
    let mut input = BufReader::with_capacity(CHUNK, file);
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    for &(start, len) in &layout.regions {
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(CHUNK as u64) as usize;
            input
                .read_exact(&mut buf[..n])
                .map_err(io("cannot read", path))?;
            crc.update(&buf[..n]);
            mem.write_slice(&buf[..n], GuestAddress(start + off))?;
            off += n as u64;
        }
    }
    if crc.finalize() != layout.crc32 {
        return Err(SnapshotError::MemoryChecksum {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Writes `config.json` and `state.bin` into `dir` (after the memory).
pub fn save_state(dir: &Path, cfg: &VmConfig, snap: &VmSnapshot) -> Result<(), SnapshotError> {
    let path = dir.join(CONFIG_FILE);
    let json = serde_json::to_vec_pretty(cfg).map_err(|e| SnapshotError::Config {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    write_synced(&path, &json)?;
    let path = dir.join(STATE_FILE);
    let bytes = vm_migration::state::encode(snap).map_err(|source| SnapshotError::State {
        path: path.clone(),
        source,
    })?;
    write_synced(&path, &bytes)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut f = File::create(path).map_err(io("cannot create", path))?;
    f.write_all(bytes).map_err(io("cannot write", path))?;
    f.sync_all().map_err(io("cannot sync", path))
}

/// Reads and checks `config.json` and `state.bin` of `dir`.
pub fn load_state(dir: &Path) -> Result<(VmConfig, VmSnapshot), SnapshotError> {
    let path = dir.join(CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(io("cannot read", &path))?;
    let cfg: VmConfig = serde_json::from_slice(&bytes).map_err(|e| SnapshotError::Config {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io("cannot read", &path))?;
    let snap: VmSnapshot =
        vm_migration::state::decode(&bytes).map_err(|source| SnapshotError::State {
            path: path.clone(),
            source,
        })?;
    if snap.vcpus.len() != usize::from(cfg.cpus.boot) {
        return Err(SnapshotError::Mismatch(format!(
            "the configuration has {} vCPUs, the state {}",
            cfg.cpus.boot,
            snap.vcpus.len()
        )));
    }
    if snap.memory.total() != cfg.memory.size {
        return Err(SnapshotError::Mismatch(format!(
            "the configuration has {} bytes of memory, the state {}",
            cfg.memory.size,
            snap.memory.total()
        )));
    }
    Ok((cfg, snap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_file_urls_name_a_directory() {
        assert_eq!(
            url_to_dir("file:///tmp/snap").unwrap(),
            PathBuf::from("/tmp/snap")
        );
        assert_eq!(url_to_dir("file://snap").unwrap(), PathBuf::from("snap"));
        for bad in ["", "file://", "/tmp/snap", "tcp://1.2.3.4:5", "unix:/x"] {
            assert!(url_to_dir(bad).is_err(), "{bad}");
        }
    }

    fn config(cpus: u8, size: u64) -> VmConfig {
        use crate::config::{CpusConfig, DeviceConfig, MemoryConfig, OutputConfig};
        VmConfig {
            kernel: PathBuf::from("/k"),
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            cpus: CpusConfig::parse(&format!("boot={cpus}")).unwrap(),
            memory: MemoryConfig::parse(&format!("size={size}")).unwrap(),
            disks: Vec::new(),
            devices: vec![DeviceConfig::parse(
                "virtio-pf,id=pf0,member=blk,total_vfs=2,disk=pf.img,vf_disk=vf%n.img",
            )
            .unwrap()],
            serial: OutputConfig::Tty,
            api_socket: None,
        }
    }

    fn state(vcpus: u8, size: u64) -> VmSnapshot {
        VmSnapshot {
            vcpus: (0..vcpus)
                .map(|id| VcpuState {
                    id,
                    regs: Default::default(),
                    sregs: Default::default(),
                    xsave: Default::default(),
                    xcrs: Default::default(),
                    debugregs: Default::default(),
                    lapic: Default::default(),
                    msrs: vec![Default::default(); 3],
                    events: Default::default(),
                    mp_state: Default::default(),
                })
                .collect(),
            irqchip: IrqchipState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
            },
            clock: Default::default(),
            serial: None,
            ged_pending: 1,
            button_held: true,
            devices: Vec::new(),
            memory: MemoryLayout {
                regions: vec![(0, size)],
                crc32: 7,
            },
        }
    }

    #[test]
    fn the_state_and_configuration_round_trip_and_mismatches_are_refused() {
        let dir = std::env::temp_dir().join(format!("ch-snap-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        save_state(&dir, &config(2, 1 << 30), &state(2, 1 << 30)).unwrap();
        let (cfg, st) = load_state(&dir).unwrap();
        assert_eq!(cfg.devices, config(2, 1 << 30).devices);
        assert_eq!(cfg.cpus, config(2, 1 << 30).cpus);
        assert_eq!(
            (st.vcpus.len(), st.vcpus[1].id, st.vcpus[0].msrs.len()),
            (2, 1, 3)
        );
        assert_eq!((st.ged_pending, st.button_held), (1, true));
        assert_eq!(st.memory.regions, vec![(0, 1 << 30)]);

        save_state(&dir, &config(2, 1 << 30), &state(1, 1 << 30)).unwrap();
        let e = load_state(&dir).err().unwrap().to_string();
        assert!(e.contains("2 vCPUs, the state 1"), "{e}");
        save_state(&dir, &config(1, 1 << 30), &state(1, 1 << 29)).unwrap();
        let e = load_state(&dir).err().unwrap().to_string();
        assert!(e.contains("bytes of memory"), "{e}");

        std::fs::write(dir.join(CONFIG_FILE), b"{\"kernel\": 1}").unwrap();
        assert!(matches!(
            load_state(&dir),
            Err(SnapshotError::Config { .. })
        ));
        std::fs::remove_file(dir.join(CONFIG_FILE)).unwrap();
        assert!(matches!(load_state(&dir), Err(SnapshotError::Io { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(4 << 20), 2 << 20),
        ])
        .unwrap()
    }

    #[test]
    fn memory_round_trips_and_damage_is_refused() {
        let dir = std::env::temp_dir().join(format!("ch-snap-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(MEMORY_FILE);
        let src = memory();
        for (i, addr) in [0x10u64, 0xf_fff0, 0x40_0000, 0x5f_fff8].iter().enumerate() {
            src.write_obj(0x1122_3344_5566_7700u64 + i as u64, GuestAddress(*addr))
                .unwrap();
        }
        let layout = save_memory(&src, &path).unwrap();
        assert_eq!(layout.regions, vec![(0, 1 << 20), (4 << 20, 2 << 20)]);
        let dst = memory();
        restore_memory(&dst, &layout, &path).unwrap();
        for addr in [0x10u64, 0xf_fff0, 0x40_0000, 0x5f_fff8, 0x1234] {
            let (a, b): (u64, u64) = (
                src.read_obj(GuestAddress(addr)).unwrap(),
                dst.read_obj(GuestAddress(addr)).unwrap(),
            );
            assert_eq!(a, b, "{addr:#x}");
        }

        // One flipped byte: checksum.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0x40_0000 - (3 << 20)] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            restore_memory(&memory(), &layout, &path),
            Err(SnapshotError::MemoryChecksum { .. })
        ));
        // Truncated: size.
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(
            restore_memory(&memory(), &layout, &path),
            Err(SnapshotError::MemorySize { .. })
        ));
        // Another layout.
        let other = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 3 << 20)]).unwrap();
        assert!(matches!(
            restore_memory(&other, &layout, &path),
            Err(SnapshotError::Mismatch(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
