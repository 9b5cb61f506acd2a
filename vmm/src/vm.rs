//! Building a VM from its configuration and running it to the end.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vm_migration::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::api::{self, AfterResponse, ApiError, ApiReply, ApiRequest, ApiResult, ControlChannel};
use crate::arch::kvm_state::{msr_index_list, IrqchipState};
use crate::arch::{acpi, boot, layout};
use crate::config::{
    ApiSocketConfig, CpusConfig, DeviceConfig, DiskConfig, MemoryConfig, OutputConfig,
};
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::devices::ged::{Ged, EVENT_POWER_BUTTON};
use crate::devices::serial::{BufferedOutput, SerialPort};
use crate::dump::{self, DumpSources, SignalFd, VcpuThread};
use crate::firmware::{BarAllocator, FirmwareError};
use crate::interrupts::{InterruptError, KvmInterruptManager, MsiManager};
use crate::pause::PauseGate;
use crate::platform::{ExitReason, Platform};
use crate::snapshot;

mod migrate;
mod standby;

use crate::vcpu::{self, Vcpu, VcpuError};
pub use migrate::{MigrationError, MigrationStats, MigrationUrl};
pub use standby::serve_standby;

/// Everything needed to build a VM (saved in a snapshot as `config.json`;
/// the API socket belongs to the VMM process, not to the VM, and is not).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub disks: Vec<DiskConfig>,
    pub devices: Vec<DeviceConfig>,
    pub serial: OutputConfig,
    #[serde(skip)]
    pub api_socket: Option<ApiSocketConfig>,
}

impl VmConfig {
    /// The configuration as `vm.info` reports it (the shape of Cloud
    /// Hypervisor's `VmConfig` for the parts this VMM has).
    pub fn to_json(&self) -> serde_json::Value {
        let devices: Vec<serde_json::Value> = self
            .devices
            .iter()
            .map(|DeviceConfig::VirtioPf(p)| {
                serde_json::json!({
                    "type": "virtio-pf",
                    "id": p.id,
                    "member": "blk",
                    "total_vfs": p.total_vfs,
                    "disk": p.disk,
                    "vf_disk": p.vf_disk,
                    "readonly": p.readonly,
                    "admin": p.admin,
                })
            })
            .collect();
        serde_json::json!({
            "cpus": {"boot_vcpus": self.cpus.boot, "max_vcpus": self.cpus.boot},
            "memory": {"size": self.memory.size},
            "payload": {
                "kernel": self.kernel,
                "initramfs": self.initramfs,
                "cmdline": self.cmdline,
            },
            "disks": self.disks.iter().map(|d| serde_json::json!({
                "path": d.path,
                "readonly": d.readonly,
                "id": d.id,
            })).collect::<Vec<_>>(),
            "devices": devices,
            "serial": {"mode": match &self.serial {
                OutputConfig::Off => "Off",
                OutputConfig::Tty => "Tty",
                OutputConfig::File(_) => "File",
            }},
        })
    }
}

#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmVersion(i32),
    #[error("cannot create the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot set up KVM ({what}): {source}")]
    KvmSetup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {size} bytes of guest memory: {reason}")]
    Memory { size: u64, reason: String },
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Interrupts(#[from] InterruptError),
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
    #[error("cannot open serial output file {path}: {source}")]
    SerialFile {
        path: String,
        source: std::io::Error,
    },
    #[error("--device virtio-pf {name}: {reason}")]
    VirtioPf { name: String, reason: String },
    #[error("disk {path}: {reason}")]
    Disk { path: String, reason: String },
    #[error("virtio-iommu: {0}")]
    Iommu(String),
    #[error("cannot create eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot register the irqfd of {what}: {source}")]
    Irqfd {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the guest stopped with an error: {0}")]
    Guest(String),
    #[error("cannot restore: {0}")]
    Restore(String),
    #[error("snapshot: {0}")]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("vCPU/VM state: {0}")]
    KvmState(crate::arch::kvm_state::KvmStateError),
    #[error("cannot start a thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("--api-socket {what}: {source}")]
    ApiSocket {
        what: String,
        source: std::io::Error,
    },
    #[error("vCPU threads {0:?} did not stop within {limit} s (blocked in an exit handler; see the state dump above)", limit = STOP_LIMIT.as_secs())]
    StuckVcpus(Vec<usize>),
}

/// How long the VMM waits, at exit, for the console output to be written.
const SERIAL_FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// How long the VMM waits for the vCPU threads to stop before it gives up
/// on them and exits anyway.
pub const STOP_LIMIT: Duration = Duration::from_secs(5);

/// Stops threads that loop until their stop flag is set: kicks each with
/// [`vcpu::kick_signal`] (out of KVM_RUN) every few milliseconds until it
/// has ended or `limit` has passed. Returns the indices of the threads
/// still running then (blocked somewhere a kick cannot reach, such as a
/// lock).
pub fn stop_threads(handles: &[&JoinHandle<()>], limit: Duration) -> Vec<usize> {
    let deadline = Instant::now() + limit;
    loop {
        let running: Vec<usize> = handles
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_finished())
            .map(|(i, _)| i)
            .collect();
        if running.is_empty() || Instant::now() >= deadline {
            return running;
        }
        for &i in &running {
            let _ = handles[i].kill(vcpu::kick_signal());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until at least one of `fds` is readable; returns which are.
fn wait_readable(fds: &[RawFd]) -> std::io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `p` is a valid array of `p.len()` pollfds for the call.
        let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(p.iter().map(|x| x.revents & libc::POLLIN != 0).collect());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Creates the guest memory and registers it with KVM.
fn create_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap, VmError> {
    let ranges: Vec<_> = layout::ram_ranges(size)
        .into_iter()
        .map(|(a, s)| (a, s as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory {
        size,
        reason: e.to_string(),
    })?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmError::Memory {
                size,
                reason: e.to_string(),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region's host mapping is owned by `mem`, which the
        // VM keeps alive until after every vCPU has stopped; the range
        // does not overlap any other slot.
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| VmError::KvmSetup {
            what: "memory region",
            source,
        })?;
    }
    Ok(mem)
}

fn output(cfg: &OutputConfig) -> Result<Option<Box<dyn Write + Send>>, VmError> {
    Ok(match cfg {
        OutputConfig::Off => None,
        OutputConfig::Tty => Some(Box::new(std::io::stdout())),
        OutputConfig::File(p) => Some(Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| VmError::SerialFile {
                    path: p.display().to_string(),
                    source,
                })?,
        )),
    })
}

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Built: memory, devices, boot payload and vCPUs exist; nothing runs.
    Created,
    Running,
    Paused,
    /// Stopped: every thread ended.
    Shutdown,
}

impl VmState {
    /// The name `vm.info` gives it.
    pub fn name(self) -> &'static str {
        match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Shutdown => "Shutdown",
        }
    }
}

/// One VM for the life of the VMM: built by [`Vm::new`], started by
/// [`Vm::boot`], then driven by [`Vm::run`] on the main thread (the control
/// loop: API requests, the state dump, the guest's exit) until it stops.
pub struct Vm {
    cfg: VmConfig,
    started: Instant,
    state: VmState,
    signals: SignalFd,
    _kvm: Kvm,
    vm: Arc<VmFd>,
    mem: Option<GuestMemoryMmap>,
    platform: Arc<Platform>,
    devices: Arc<DeviceManager>,
    exit_wait: EventFd,
    serial_thread: Option<crate::devices::serial::OutputThread>,
    /// Created, not yet started (until [`Vm::boot`]).
    vcpus: Vec<Vcpu>,
    threads: Vec<VcpuThread>,
    dev_thread: Option<JoinHandle<()>>,
    watch: Arc<crate::watchdog::ExitWatch>,
    stop: Arc<AtomicBool>,
    vcpu_gate: Arc<PauseGate>,
    api: Option<ApiEnd>,
    /// The guest's kvmclock when it was paused, given back on resume so
    /// that the guest's clock does not count the pause.
    clock: Option<kvm_bindings::kvm_clock_data>,
    /// A power-button press made while paused, delivered at resume.
    button_held: bool,
    /// The PCI functions a snapshot saves, in configuration order.
    persistent: Vec<snapshot::Persistent>,
    /// Built from a snapshot or a migration: [`Vm::boot`] starts it
    /// paused.
    restored: bool,
    /// Received by migration: resumed as soon as it has booted.
    incoming: bool,
    dumps: u64,
}

/// Builds the VM described by `cfg`, runs it until the guest powers off,
/// resets or fails (or the API ends it), and returns why it stopped.
pub fn run(cfg: &VmConfig) -> Result<ExitReason, VmError> {
    let mut vm = Vm::new(cfg)?;
    vm.boot()?;
    vm.run()
}

/// What guest memory starts with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// ACPI tables and the kernel: the VM boots.
    Boot,
    /// Nothing: memory and state come from a snapshot or a migration.
    Empty,
}

impl Vm {
    /// Builds the VM: KVM, guest memory, devices, ACPI tables, the kernel
    /// and the vCPUs. Nothing runs yet.
    pub fn new(cfg: &VmConfig) -> Result<Vm, VmError> {
        Self::build(cfg, Payload::Boot)
    }

    /// Builds the VM of a snapshot directory (its `config.json`, with the
    /// API socket of `api_socket`) and puts the saved state in: memory,
    /// devices (VFs included), irqchip, vCPUs. [`Vm::boot`] then starts it
    /// paused; `vm.resume` lets it go on.
    pub fn restore(dir: &Path, api_socket: Option<ApiSocketConfig>) -> Result<Vm, VmError> {
        let (mut cfg, state) = snapshot::load_state(dir)?;
        cfg.api_socket = api_socket;
        let mut vm = Self::build(&cfg, Payload::Empty)?;
        let t = Instant::now();
        let mem = vm
            .mem
            .as_ref()
            .ok_or_else(|| VmError::Restore("no guest memory".into()))?;
        snapshot::restore_memory(mem, &state.memory, &dir.join(snapshot::MEMORY_FILE))?;
        log::info!("restore: guest memory in {} ms", t.elapsed().as_millis());
        vm.apply_state(&state)?;
        Ok(vm)
    }

    /// Puts a saved state (all but memory) into a VM built with
    /// [`Payload::Empty`] that has not started: COM1, the GED, the PCI
    /// functions (a PF creates the VFs its saved SR-IOV registers enable,
    /// and they go on the bus), then the interrupt controllers and the
    /// vCPUs. [`Vm::boot`] then starts it paused.
    fn apply_state(&mut self, st: &snapshot::VmSnapshot) -> Result<(), VmError> {
        if self.state != VmState::Created || self.vcpus.len() != st.vcpus.len() {
            return Err(VmError::Restore(format!(
                "the state has {} vCPUs, the VM {}",
                st.vcpus.len(),
                self.vcpus.len()
            )));
        }
        if let Some(serial) = &st.serial {
            self.platform
                .restore_serial(serial)
                .map_err(|e| VmError::Restore(e.to_string()))?;
        }
        if let Some(ged) = self.platform.ged() {
            ged.set_pending(st.ged_pending);
        }
        log::info!("restore: {} PCI devices", self.persistent.len());
        snapshot::restore_devices(&self.persistent, &st.devices)?;
        for p in &self.persistent {
            if let snapshot::Persistent::Pf(_, pf) = p {
                // Taken out of the PF's lock first: the bus locks
                // functions (the PF among them) when one is added.
                let vfs: Vec<_> = {
                    let pf = pf.lock().unwrap_or_else(|e| e.into_inner());
                    pf.vfs()
                        .into_iter()
                        .filter_map(|(n, bdf)| Some((bdf, pf.vf(n)?)))
                        .collect()
                };
                for (bdf, vf) in vfs {
                    self.devices.add_restored_function(bdf, vf)?;
                }
            }
        }
        self.devices.refresh_doorbells();
        st.irqchip.restore(&self.vm).map_err(VmError::KvmState)?;
        for (v, s) in self.vcpus.iter().zip(&st.vcpus) {
            v.restore(s).map_err(VmError::KvmState)?;
        }
        self.clock = Some(st.clock);
        self.button_held = st.button_held;
        self.restored = true;
        log::info!(
            "restore: devices, irqchip and {} vCPUs restored",
            self.vcpus.len()
        );
        Ok(())
    }

    fn build(cfg: &VmConfig, payload: Payload) -> Result<Vm, VmError> {
        let started = Instant::now();
        // Before any thread exists, so that every thread blocks SIGUSR1.
        let signals = SignalFd::new(&[libc::SIGUSR1]).map_err(VmError::Signals)?;
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::KvmVersion(version));
        }
        let vm = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);
        let setup = |what: &'static str| move |source| VmError::KvmSetup { what, source };
        vm.set_tss_address(0xfffb_d000)
            .map_err(setup("TSS address"))?;
        vm.set_identity_map_address(0xfffb_c000)
            .map_err(setup("identity map address"))?;
        vm.create_irq_chip().map_err(setup("in-kernel irqchip"))?;

        let mem_size = cfg.memory.size;
        let mem = create_memory(&vm, mem_size)?;
        let mem_atomic = vm_memory::GuestMemoryAtomic::new(mem.clone());
        let mmio64 = layout::pci_mmio64_window(mem_size);

        let max_gsi = kvm.get_nr_memslots().max(1024) as u32;
        let irq = KvmInterruptManager::new(vm.clone(), max_gsi.min(4096))?;
        let msi = Arc::new(MsiManager(irq.clone()));

        // Serial port on GSI 4.
        let mut serial_thread = None;
        let serial = match output(&cfg.serial)? {
            Some(out) => {
                let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
                vm.register_irqfd(&evt, layout::SERIAL_IRQ)
                    .map_err(|source| VmError::Irqfd {
                        what: "the serial port",
                        source,
                    })?;
                let (buffered, thread) = BufferedOutput::spawn(out).map_err(VmError::Spawn)?;
                serial_thread = Some(thread);
                Some(SerialPort::new(evt, Box::new(buffered)))
            }
            None => None,
        };

        let allocator = BarAllocator::new(
            (layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE),
            (mmio64.0, mmio64.1 - mmio64.0),
        )?;
        let devices = DeviceManager::new(vm.clone(), allocator)?;
        let mut persistent = Vec::new();
        let pfs: Vec<_> = cfg
            .devices
            .iter()
            .map(|d| match d {
                DeviceConfig::VirtioPf(p) => p.clone(),
            })
            .collect();
        let totals: Vec<u16> = pfs.iter().map(|p| p.total_vfs).collect();
        let pf_slots =
            crate::wiring::plan_pf_slots(cfg.disks.len(), &totals).map_err(VmError::Iommu)?;
        let iommu_ranges =
            crate::wiring::iommu_ranges(&cfg.disks, &pfs, &pf_slots).map_err(VmError::Iommu)?;
        let iommu =
            crate::wiring::add_iommu(&devices, &mem_atomic, &msi, &iommu_ranges, &mut persistent)?;
        let next = crate::wiring::add_disks(
            &devices,
            &mem_atomic,
            &msi,
            &cfg.disks,
            iommu.as_ref(),
            &mut persistent,
        )?;
        crate::wiring::add_virtio_pfs(
            &devices,
            &mem_atomic,
            &msi,
            &pfs,
            next,
            iommu.as_ref(),
            &mut persistent,
        )?;

        let entry = match payload {
            Payload::Boot => {
                acpi::create_acpi_tables(
                    &mem,
                    &acpi::AcpiConfig {
                        cpus: cfg.cpus.boot,
                        mmio64,
                        viot: (!iommu_ranges.is_empty())
                            .then(|| (crate::wiring::IOMMU_BDF, iommu_ranges.clone())),
                    },
                )?;
                Some(boot::load_linux(
                    &mem,
                    mem_size,
                    &cfg.kernel,
                    cfg.initramfs.as_deref(),
                    &cfg.cmdline,
                )?)
            }
            Payload::Empty => None,
        };

        let exit_evt = EventFd::new(0).map_err(VmError::EventFd)?;
        let exit_wait = exit_evt.try_clone().map_err(VmError::EventFd)?;
        // The power button, behind the ACPI Generic Event Device.
        let ged_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm.register_irqfd(&ged_evt, layout::GED_IRQ)
            .map_err(|source| VmError::Irqfd {
                what: "the ACPI GED",
                source,
            })?;
        let ged = Ged::new(ged_evt);
        let platform = Arc::new(Platform::new(serial, Some(ged), devices, exit_evt));

        vcpu::install_kick_handler()?;
        let stop = Arc::new(AtomicBool::new(false));
        let msr_indices = Arc::new(msr_index_list(&kvm).map_err(VmError::KvmState)?);
        let mut vcpus = Vec::new();
        for id in 0..cfg.cpus.boot {
            let mut v = Vcpu::new(&kvm, &vm, id, cfg.cpus.boot, entry.filter(|_| id == 0))?;
            v.set_msr_indices(msr_indices.clone());
            vcpus.push(v);
        }
        let watch = crate::watchdog::ExitWatch::new(vcpus.len());
        let devices_arc = platform.devices_arc();
        Ok(Vm {
            cfg: cfg.clone(),
            started,
            state: VmState::Created,
            signals,
            _kvm: kvm,
            vm,
            mem: Some(mem),
            platform,
            devices: devices_arc,
            exit_wait,
            serial_thread,
            vcpus,
            threads: Vec::new(),
            dev_thread: None,
            watch,
            stop,
            vcpu_gate: Arc::new(PauseGate::new()),
            api: None,
            clock: None,
            button_held: false,
            persistent,
            restored: false,
            incoming: false,
            dumps: 0,
        })
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    /// Serves an API socket that was opened before the VM existed (the
    /// VMM started without a VM and received or restored this one).
    fn attach_api(&mut self, api: ApiEnd) {
        self.api = Some(api);
    }

    /// Starts the device thread, the watchdog, the vCPUs, the serial input
    /// and the API server: the VM runs.
    pub fn boot(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Created {
            return Ok(());
        }
        self.dev_thread = Some(self.devices.start_thread(self.stop.clone())?);
        self.watch.spawn(self.stop.clone());
        if self.restored {
            // The vCPUs park before they first run; the device thread
            // parks with nothing in flight.
            self.vcpu_gate.close();
        }
        for v in std::mem::take(&mut self.vcpus) {
            let report = Arc::new(vcpu::VcpuReport::default());
            let handle = v.spawn(
                self.platform.clone(),
                self.watch.clone(),
                report.clone(),
                self.stop.clone(),
                self.vcpu_gate.clone(),
            )?;
            self.threads.push(VcpuThread { handle, report });
        }
        crate::stdin::spawn_serial_input(self.platform.clone(), &self.cfg.serial);
        if self.restored {
            let n = self.threads.len();
            if !self.vcpu_gate.wait_parked(n, STOP_LIMIT, || {}) || !self.devices.pause(STOP_LIMIT)
            {
                return Err(VmError::Restore(
                    "the restored VM's threads did not park".into(),
                ));
            }
            self.state = VmState::Paused;
            event_monitor::event("vm", "restored", &[]);
            log::info!("VM restored, paused: resume it through the API");
        } else {
            self.state = VmState::Running;
            event_monitor::event("vm", "booted", &[]);
        }
        if let (None, Some(sock)) = (&self.api, &self.cfg.api_socket) {
            self.api = Some(start_api(sock)?);
        }
        Ok(())
    }

    fn dump(&mut self) {
        self.dumps += 1;
        let sources = DumpSources {
            vcpus: &self.threads,
            watch: &self.watch,
            devices: &self.devices,
            started: self.started,
        };
        eprint!("{}", dump::collect(self.dumps, &sources));
    }

    /// The control loop, on the main thread: API requests, the state dump
    /// on SIGUSR1, until the guest (or a request) stops the VM; then stops
    /// every thread and returns why the VM stopped.
    pub fn run(&mut self) -> Result<ExitReason, VmError> {
        // From here the main thread only serves the control loop and stops
        // the VM.
        crate::seccomp::apply(crate::seccomp::ThreadKind::Main).map_err(VmError::Seccomp)?;
        let mut fds = vec![self.exit_wait.as_raw_fd(), self.signals.as_raw_fd()];
        if let Some(a) = &self.api {
            fds.push(a.wake.as_raw_fd());
        }
        loop {
            match wait_readable(&fds) {
                Ok(ready) => {
                    if ready.get(2) == Some(&true) {
                        self.serve_api();
                    }
                    if ready[1] {
                        while let Some(sig) = self.signals.read() {
                            if sig == libc::SIGUSR1 {
                                self.dump();
                            }
                        }
                    }
                    if ready[0] {
                        break;
                    }
                }
                Err(e) => {
                    log::error!("waiting for the VM to stop: {e}");
                    break;
                }
            }
        }
        self.shutdown()
    }

    fn serve_api(&mut self) {
        let Some(api) = self.api.take() else { return };
        let _ = api.wake.read();
        while let Ok(m) = api.requests.try_recv() {
            let answer = self.handle(&m.request);
            let _ = m.reply.send(answer);
        }
        self.api = Some(api);
    }

    /// Stops every thread (a paused VM's threads see the stop flag where
    /// they are parked) and returns why the VM stopped.
    fn shutdown(&mut self) -> Result<ExitReason, VmError> {
        self.stop.store(true, Ordering::Release);
        let handles: Vec<&JoinHandle<()>> = self.threads.iter().map(|t| &t.handle).collect();
        let stuck = stop_threads(&handles, STOP_LIMIT);
        if !stuck.is_empty() {
            self.dump();
            return Err(VmError::StuckVcpus(stuck));
        }
        for t in std::mem::take(&mut self.threads) {
            let _ = t.handle.join();
        }
        self.devices.stop_thread();
        if let Some(t) = self.dev_thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.serial_thread.take() {
            if !t.finish(SERIAL_FLUSH_LIMIT) {
                log::warn!("the serial output did not take the last console output");
            }
        }
        self.mem = None;
        if let Some(ApiSocketConfig::Path(p)) = &self.cfg.api_socket {
            let _ = std::fs::remove_file(p);
        }
        self.state = VmState::Shutdown;
        let reason = self.platform.exit_reason();
        match &reason {
            Some(ExitReason::Reset) => event_monitor::event("vm", "reboot", &[]),
            Some(ExitReason::Error(e)) => {
                event_monitor::event("vm", "error", &[("reason", e.clone())])
            }
            _ => event_monitor::event("vm", "shutdown", &[]),
        }
        match reason {
            Some(ExitReason::Error(e)) => Err(VmError::Guest(e)),
            Some(r) => Ok(r),
            None => Ok(ExitReason::PowerOff),
        }
    }
}

/// The VM as a [`vm_migration::Pausable`]: the same quiescent point as
/// `vm.pause` (vCPUs parked, devices drained and parked).
impl vm_migration::Pausable for Vm {
    fn pause(&mut self) -> Result<(), vm_migration::MigratableError> {
        Vm::pause(self)
            .map(|_| ())
            .map_err(|e| vm_migration::MigratableError::Pause {
                what: "the VM".into(),
                reason: e.message,
            })
    }

    fn resume(&mut self) -> Result<(), vm_migration::MigratableError> {
        Vm::resume(self)
            .map(|_| ())
            .map_err(|e| vm_migration::MigratableError::Resume {
                what: "the VM".into(),
                reason: e.message,
            })
    }
}

/// The API server's end in the main thread.
struct ApiEnd {
    requests: std::sync::mpsc::Receiver<api::ControlMessage>,
    wake: EventFd,
}

/// Binds (or takes) the API socket and starts the API thread.
fn start_api(sock: &ApiSocketConfig) -> Result<ApiEnd, VmError> {
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixListener;
    let listener = match sock {
        ApiSocketConfig::Path(p) => UnixListener::bind(p).map_err(|source| VmError::ApiSocket {
            what: format!("cannot listen on {}", p.display()),
            source,
        })?,
        ApiSocketConfig::Fd(fd) => {
            // SAFETY: the user passed this descriptor to the VMM for the
            // API socket; nothing else in the process owns it.
            let l = unsafe { UnixListener::from_raw_fd(*fd) };
            l.local_addr().map_err(|source| VmError::ApiSocket {
                what: format!("fd={fd} is not a listening Unix socket"),
                source,
            })?;
            l
        }
    };
    let (channel, requests, wake) = ControlChannel::new().map_err(VmError::EventFd)?;
    api::spawn(listener, Arc::new(channel)).map_err(VmError::Spawn)?;
    Ok(ApiEnd { requests, wake })
}

impl Vm {
    /// Carries out one API request.
    fn handle(&mut self, req: &ApiRequest) -> (ApiResult, AfterResponse) {
        let platform = self.platform.clone();
        let exit_after = move |reason: ExitReason| -> AfterResponse {
            let p = platform.clone();
            Some(Box::new(move || p.request_exit(reason)))
        };
        match req {
            ApiRequest::VmmPing => (
                Ok(ApiReply::Json(serde_json::json!({
                    "build_version": env!("CARGO_PKG_VERSION"),
                    "version": env!("CARGO_PKG_VERSION"),
                    "pid": std::process::id(),
                    "features": [],
                }))),
                None,
            ),
            ApiRequest::VmInfo => (
                Ok(ApiReply::Json(serde_json::json!({
                    "config": self.cfg.to_json(),
                    "state": self.state.name(),
                    "memory_actual_size": self.cfg.memory.size,
                }))),
                None,
            ),
            ApiRequest::VmmShutdown | ApiRequest::VmShutdown => {
                (Ok(ApiReply::Done), exit_after(ExitReason::PowerOff))
            }
            ApiRequest::VmReboot => (Ok(ApiReply::Done), exit_after(ExitReason::Reset)),
            ApiRequest::VmPause => (self.pause(), None),
            ApiRequest::VmResume => (self.resume(), None),
            ApiRequest::VmCounters => {
                let map: serde_json::Map<String, serde_json::Value> = self
                    .devices
                    .counters()
                    .into_iter()
                    .map(|(bdf, c)| {
                        let inner: serde_json::Map<String, serde_json::Value> = c
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v.into()))
                            .collect();
                        (bdf, serde_json::Value::Object(inner))
                    })
                    .collect();
                (Ok(ApiReply::Json(serde_json::Value::Object(map))), None)
            }
            ApiRequest::VmPowerButton => (self.power_button(), None),
            ApiRequest::VmSnapshot(body) => (self.snapshot(body), None),
            ApiRequest::VmRestore(_) => (
                Err(ApiError::new(
                    405,
                    "this VMM runs a VM already: restore into a new VMM with `cloud-hypervisor --restore source_url=file:///DIR`".to_string(),
                )),
                None,
            ),
            ApiRequest::VmSendMigration(body) => {
                let (r, done) = self.send_migration(body);
                (r, if done { exit_after(ExitReason::PowerOff) } else { None })
            }
            ApiRequest::VmReceiveMigration(_) => (
                Err(ApiError::new(
                    405,
                    "this VMM runs a VM already: receive into a VMM started with only --api-socket",
                )),
                None,
            ),
        }
    }

    /// vCPUs out of KVM_RUN and parked, then the devices: requests in
    /// flight completed, the device thread parked. From then on nothing
    /// writes guest memory or sends an interrupt until resume.
    fn pause(&mut self) -> ApiResult {
        if self.state != VmState::Running {
            return Err(ApiError::new(
                405,
                format!("the VM is {}, not running", self.state.name()),
            ));
        }
        self.vcpu_gate.close();
        let handles: Vec<&JoinHandle<()>> = self.threads.iter().map(|t| &t.handle).collect();
        let parked = self
            .vcpu_gate
            .wait_parked(self.threads.len(), STOP_LIMIT, || {
                for h in &handles {
                    let _ = h.kill(vcpu::kick_signal());
                }
            });
        if !parked {
            self.vcpu_gate.open();
            return Err(ApiError::new(
                500,
                format!(
                    "{} of {} vCPUs parked within {} s (one is blocked in an exit handler: see SIGUSR1's dump); the VM goes on",
                    self.vcpu_gate.parked(),
                    self.threads.len(),
                    STOP_LIMIT.as_secs()
                ),
            ));
        }
        if !self.devices.pause(STOP_LIMIT) {
            self.vcpu_gate.open();
            return Err(ApiError::new(
                500,
                format!(
                    "the device thread did not finish its requests within {} s; the VM goes on",
                    STOP_LIMIT.as_secs()
                ),
            ));
        }
        self.clock = match self.vm.get_clock() {
            Ok(c) => Some(c),
            Err(e) => {
                log::warn!("pause: cannot read the guest clock: {e}");
                None
            }
        };
        self.state = VmState::Paused;
        event_monitor::event("vm", "paused", &[]);
        log::info!("VM paused");
        Ok(ApiReply::Done)
    }

    /// Devices first (they serve what waited), then the vCPUs.
    /// `vm.snapshot`: saves the paused VM into the directory of
    /// `destination_url` (see [`crate::snapshot`]). The VM stays paused.
    fn snapshot(&mut self, body: &serde_json::Value) -> ApiResult {
        if self.state != VmState::Paused {
            return Err(ApiError::new(
                405,
                format!(
                    "the VM is {}: pause it before a snapshot",
                    self.state.name()
                ),
            ));
        }
        let url = body
            .get("destination_url")
            .and_then(|u| u.as_str())
            .ok_or_else(|| ApiError::new(400, "the body needs \"destination_url\"".to_string()))?;
        let dir = snapshot::url_to_dir(url).map_err(|e| ApiError::new(400, e.to_string()))?;
        let started = Instant::now();
        self.save_snapshot(&dir)
            .map_err(|e| ApiError::new(500, e.to_string()))?;
        log::info!(
            "snapshot saved to {} in {} ms",
            dir.display(),
            started.elapsed().as_millis()
        );
        event_monitor::event("vm", "snapshotted", &[("url", url.to_string())]);
        Ok(ApiReply::Done)
    }

    fn save_snapshot(&mut self, dir: &Path) -> Result<(), VmError> {
        std::fs::create_dir_all(dir).map_err(|source| {
            VmError::Snapshot(snapshot::SnapshotError::Io {
                what: "cannot create",
                path: dir.to_path_buf(),
                source,
            })
        })?;
        let mem = self
            .mem
            .clone()
            .ok_or_else(|| VmError::Restore("no guest memory".into()))?;
        let memory = snapshot::save_memory(&mem, &dir.join(snapshot::MEMORY_FILE))?;
        let state = self.collect_state(memory)?;
        snapshot::save_state(dir, &self.cfg, &state)?;
        Ok(())
    }

    /// Everything of the paused VM but its memory: each parked vCPU reads
    /// its own state (only its thread may), then the irqchip, the clock the
    /// pause froze, COM1, the GED and every PCI function.
    fn collect_state(
        &mut self,
        memory: snapshot::MemoryLayout,
    ) -> Result<snapshot::VmSnapshot, VmError> {
        let asked: Vec<u64> = self
            .threads
            .iter()
            .map(|t| t.report.request_save())
            .collect();
        let deadline = Instant::now() + STOP_LIMIT;
        let mut vcpus = Vec::with_capacity(asked.len());
        for (i, (t, n)) in self.threads.iter().zip(asked).enumerate() {
            loop {
                if let Some(s) = t.report.take_saved(n) {
                    vcpus.push(s.map_err(|e| VmError::Restore(format!("vCPU {i}: {e}")))?);
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(VmError::Restore(format!(
                        "vCPU {i} did not give its state within {} s",
                        STOP_LIMIT.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let irqchip = IrqchipState::save(&self.vm).map_err(VmError::KvmState)?;
        let clock = match self.clock {
            Some(c) => c,
            None => self.vm.get_clock().map_err(|source| VmError::KvmSetup {
                what: "the guest clock",
                source,
            })?,
        };
        let devices =
            snapshot::snapshot_devices(&self.persistent).map_err(snapshot::SnapshotError::from)?;
        Ok(snapshot::VmSnapshot {
            vcpus,
            irqchip,
            clock,
            serial: self
                .platform
                .serial_snapshot()
                .map_err(|e| VmError::Restore(e.to_string()))?,
            ged_pending: self.platform.ged().map_or(0, Ged::pending),
            button_held: self.button_held,
            devices,
            memory,
        })
    }

    /// Presses the power button: the GED latches the event and interrupts
    /// the guest, which decides what to do (Linux reports KEY_POWER). On a
    /// paused VM the press is held and delivered at resume, so that nothing
    /// reaches the guest while it is paused.
    fn power_button(&mut self) -> ApiResult {
        match self.state {
            VmState::Running => {
                self.press_power_button();
                Ok(ApiReply::Done)
            }
            VmState::Paused => {
                self.button_held = true;
                log::info!("power button pressed while paused: delivered at resume");
                Ok(ApiReply::Done)
            }
            s => Err(ApiError::new(
                500,
                format!(
                    "the VM is {}: no guest to press the power button of",
                    s.name()
                ),
            )),
        }
    }

    fn press_power_button(&self) {
        if let Some(ged) = self.platform.ged() {
            match ged.notify(EVENT_POWER_BUTTON) {
                Ok(()) => {
                    event_monitor::event("vm", "power-button", &[]);
                    log::info!("power button pressed");
                }
                Err(e) => log::warn!("power button: cannot interrupt the guest: {e}"),
            }
        }
    }

    fn resume(&mut self) -> ApiResult {
        if self.state != VmState::Paused {
            return Err(ApiError::new(
                405,
                format!("the VM is {}, not paused", self.state.name()),
            ));
        }
        if let Some(mut c) = self.clock.take() {
            // Only the clock value: KVM refuses flags it did not set.
            c.flags = 0;
            if let Err(e) = self.vm.set_clock(&c) {
                log::warn!("resume: cannot restore the guest clock: {e}");
            }
        }
        self.devices.resume();
        self.vcpu_gate.open();
        self.state = VmState::Running;
        if std::mem::take(&mut self.button_held) {
            self.press_power_button();
        }
        event_monitor::event("vm", "resumed", &[]);
        log::info!("VM resumed");
        Ok(ApiReply::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn stop_threads_gives_up_on_a_blocked_thread() {
        vcpu::install_kick_handler().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        // A vCPU-like thread that polls its stop flag, and one blocked on a
        // lock the test holds (a handler waiting on a device mutex).
        let s = stop.clone();
        let polling = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let lock = Arc::new(Mutex::new(()));
        let held = lock.lock().unwrap();
        let l = lock.clone();
        let blocked = std::thread::spawn(move || {
            let _g = l.lock();
        });
        stop.store(true, Ordering::Release);
        let t0 = Instant::now();
        let stuck = stop_threads(&[&polling, &blocked], Duration::from_millis(300));
        assert_eq!(stuck, vec![1], "only the blocked thread is reported");
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "stop_threads returned after {:?}",
            t0.elapsed()
        );
        drop(held);
        blocked.join().unwrap();
        polling.join().unwrap();
        assert!(stop_threads(&[], Duration::ZERO).is_empty());
    }

    #[test]
    fn signalfd_receives_a_blocked_signal() {
        let sfd = SignalFd::new(&[libc::SIGUSR1]).unwrap();
        assert_eq!(sfd.read(), None, "nothing pending yet");
        // SAFETY: SIGUSR1 is blocked in this thread, so raising it only
        // queues it for the signalfd.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR1) }, 0);
        assert_eq!(wait_readable(&[sfd.as_raw_fd()]).unwrap(), vec![true]);
        assert_eq!(sfd.read(), Some(libc::SIGUSR1));
        assert_eq!(sfd.read(), None);
    }
}
