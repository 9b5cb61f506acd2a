//! `cloud-hypervisor`: boots a Linux guest on KVM, with virtio-blk disks and
//! the virtio-pf SR-IOV physical function.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use vmm::{vm, wiring};

use vmm::config::{
    ConfigError, CpusConfig, DeviceConfig, DiskConfig, EventMonitorConfig, MemoryConfig,
    OptionParser, OutputConfig, PathOrFd,
};

/// Command line, in Cloud Hypervisor's syntax.
#[derive(Parser, Debug)]
#[command(
    name = "cloud-hypervisor",
    version,
    about = "A KVM virtual machine monitor with an emulated virtio SR-IOV physical function",
    long_about = None
)]
struct Cli {
    /// Kernel to boot: a bzImage (64-bit boot protocol). Without it (and
    /// without --restore) the VMM starts with no VM and serves
    /// --api-socket until vm.receive-migration or vm.restore brings one.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["restore", "api_socket"])]
    kernel: Option<PathBuf>,

    /// Restore a snapshot instead of booting: "source_url=file:///<dir>"
    /// (a directory `ch-remote snapshot` wrote). The VM is built from the
    /// snapshot's configuration and comes up paused: resume it through the
    /// API (--api-socket). See docs/snapshot-restore.md.
    #[arg(
        long,
        value_name = "source_url=file:///DIR",
        conflicts_with_all = ["kernel", "initramfs", "disk", "device"]
    )]
    restore: Option<String>,

    /// Initial ramdisk to load with the kernel.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = "")]
    cmdline: String,

    /// vCPUs: "boot=<count>" (1..64).
    #[arg(long, value_name = "boot=N", default_value = "boot=1")]
    cpus: String,

    /// Guest RAM: "size=<size>" with K, M, G or T suffix.
    #[arg(long, value_name = "size=SIZE", default_value = "size=512M")]
    memory: String,

    /// virtio-blk disk: "path=<file>[,readonly=on|off][,id=<name>]
    /// [,iommu=on|off]". With iommu=on its DMA goes through the machine's
    /// virtio-iommu (00:01.0, described by ACPI VIOT). Repeatable; one
    /// option may also list several disks.
    #[arg(long, value_name = "path=FILE[,readonly=on][,id=NAME][,iommu=on]", num_args = 1.., action = clap::ArgAction::Append)]
    disk: Vec<String>,

    /// Extra device. "virtio-pf,id=<name>,member=blk,total_vfs=<1..64>,
    /// disk=<PF backing file>,vf_disk=<VF backing file; %n is the VF number>
    /// [,readonly=on][,admin=draft|virtio-1.4][,iommu=on|off]": a
    /// virtio-blk SR-IOV physical function with an admin virtqueue speaking
    /// the v2 draft's commands (default) or virtio 1.4's device parts
    /// commands. With iommu=on the DMA of the PF and of every VF goes
    /// through the virtio-iommu (so a VF can be bound to vfio-pci in the
    /// guest). Repeatable.
    #[arg(long, value_name = "virtio-pf,...", num_args = 1.., action = clap::ArgAction::Append)]
    device: Vec<String>,

    /// Serial port (COM1): "tty", "off" or "file=<path>".
    #[arg(long, value_name = "tty|off|file=PATH", default_value = "tty")]
    serial: String,

    /// virtio-console: only "off" is supported.
    #[arg(long, value_name = "off", default_value = "off")]
    console: String,

    /// HTTP API on a Unix socket: "path=<socket>" (or just the path), or
    /// "fd=<n>" for a listening socket the VMM inherits. Given alone (no
    /// --kernel), the VMM starts with no VM and waits for
    /// vm.receive-migration or vm.restore. See docs/api.md.
    #[arg(long, value_name = "path=SOCKET|fd=N")]
    api_socket: Option<String>,

    /// Events (VM booted, paused, resumed, shut down; devices activated
    /// and reset; virtio-pf VF Enable, member modes, context and write
    /// recording commands, FLR), one JSON object per line:
    /// "path=<file>" (or just the path) or "fd=<n>".
    #[arg(long, value_name = "path=FILE|fd=N")]
    event_monitor: Option<String>,

    /// Seccomp filters on every thread: "true" (a forbidden system call
    /// ends the VMM naming it), "false", or "log" (allowed and logged by
    /// the kernel).
    #[arg(long, value_name = "true|false|log", default_value = "true")]
    seccomp: String,

    /// Write the log to this file instead of standard error.
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,

    /// More logging to standard error (-v info, -vv debug, -vvv trace).
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--kernel {0}: no such file")]
    NoKernel(String),
    #[error("--kernel is required for a VM's devices (without a VM, give only --api-socket)")]
    KernelRequired,
    #[error("--initramfs {0}: no such file")]
    NoInitramfs(String),
    #[error("--device: {0}")]
    Bus(String),
    #[error("{option}: {path}: no such file")]
    NoFile { option: &'static str, path: String },
    #[error("--event-monitor {what}: {source}")]
    EventMonitor {
        what: String,
        source: std::io::Error,
    },
    #[error("--log-file {path}: {source}")]
    LogFile {
        path: String,
        source: std::io::Error,
    },
    #[error("--seccomp: '{0}' is not one of true, false, log")]
    Seccomp(String),
    #[error("--console: only 'off' is supported (got '{0}')")]
    Console(String),
    #[error("--restore: {0}")]
    Restore(String),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
}

fn build_config(cli: &Cli) -> Result<vm::VmConfig, MainError> {
    let kernel = cli.kernel.clone().unwrap_or_default();
    if !kernel.is_file() {
        return Err(MainError::NoKernel(kernel.display().to_string()));
    }
    if let Some(i) = &cli.initramfs {
        if !i.is_file() {
            return Err(MainError::NoInitramfs(i.display().to_string()));
        }
    }
    let console = OutputConfig::parse("--console", &cli.console)?;
    if console != OutputConfig::Off {
        return Err(MainError::Console(cli.console.clone()));
    }
    let disks: Vec<DiskConfig> = cli
        .disk
        .iter()
        .map(|d| DiskConfig::parse(d))
        .collect::<Result<_, _>>()?;
    let devices: Vec<DeviceConfig> = cli
        .device
        .iter()
        .map(|d| DeviceConfig::parse(d))
        .collect::<Result<_, _>>()?;
    let must_exist = |option: &'static str, p: &std::path::Path| {
        if p.is_file() {
            Ok(())
        } else {
            Err(MainError::NoFile {
                option,
                path: p.display().to_string(),
            })
        }
    };
    for d in &disks {
        must_exist("--disk", &d.path)?;
    }
    let total: Vec<u16> = devices
        .iter()
        .map(|DeviceConfig::VirtioPf(p)| p.total_vfs)
        .collect();
    wiring::plan_pf_slots(disks.len(), &total).map_err(MainError::Bus)?;
    for DeviceConfig::VirtioPf(p) in &devices {
        must_exist("--device virtio-pf disk", &p.disk)?;
        for n in 1..=p.total_vfs {
            must_exist("--device virtio-pf vf_disk", &p.vf_disk_path(n))?;
        }
    }
    Ok(vm::VmConfig {
        kernel,
        initramfs: cli.initramfs.clone(),
        cmdline: cli.cmdline.clone(),
        cpus: CpusConfig::parse(&cli.cpus)?,
        memory: MemoryConfig::parse(&cli.memory)?,
        disks,
        devices,
        serial: OutputConfig::parse("--serial", &cli.serial)?,
        api_socket: cli
            .api_socket
            .as_deref()
            .map(|s| PathOrFd::parse("--api-socket", s))
            .transpose()?,
    })
}

/// Opens the event monitor's file or takes its descriptor.
fn start_event_monitor(cfg: &EventMonitorConfig) -> Result<(), MainError> {
    let sink: Box<dyn std::io::Write + Send> = match cfg {
        EventMonitorConfig::Path(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(p)
                .map_err(|source| MainError::EventMonitor {
                    what: format!("cannot open {}", p.display()),
                    source,
                })?,
        ),
        EventMonitorConfig::Fd(fd) => {
            use std::os::fd::FromRawFd;
            // SAFETY: checked open just below; the user handed this
            // descriptor to the VMM for its events and nothing else owns it.
            if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                return Err(MainError::EventMonitor {
                    what: format!("fd={fd}"),
                    source: std::io::Error::last_os_error(),
                });
            }
            // SAFETY: `fd` is open (checked above) and owned by nobody else.
            Box::new(unsafe { std::fs::File::from_raw_fd(*fd) })
        }
    };
    event_monitor::set_monitor(sink);
    event_monitor::event("vmm", "starting", &[]);
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line names the problem.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid command line");
            eprintln!("{first} (see --help)");
            return ExitCode::from(2);
        }
    };
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    logger.format_timestamp_millis();
    if let Some(path) = &cli.log_file {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => {
                logger.target(env_logger::Target::Pipe(Box::new(f)));
            }
            Err(source) => {
                eprintln!(
                    "Error: {}",
                    MainError::LogFile {
                        path: path.display().to_string(),
                        source
                    }
                );
                return ExitCode::from(1);
            }
        }
    }
    logger.init();

    let result = setup(&cli).and_then(|()| match (&cli.restore, &cli.kernel) {
        (Some(r), _) => restore(&cli, r),
        (None, None) => standby(&cli),
        (None, Some(_)) => Ok(vm::run(&build_config(&cli)?)?),
    });
    match result {
        Ok(reason) => {
            log::info!("VM stopped: {reason:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `--restore source_url=...`: the snapshot's VM, paused, with this
/// command line's API socket.
fn restore(cli: &Cli, option: &str) -> Result<vmm::platform::ExitReason, MainError> {
    let p = OptionParser::parse("--restore", option, &["source_url"], Some("source_url"))?;
    let url = p.required("source_url")?;
    let dir = vmm::snapshot::url_to_dir(url).map_err(|e| MainError::Restore(e.to_string()))?;
    let api = cli
        .api_socket
        .as_deref()
        .map(|s| PathOrFd::parse("--api-socket", s))
        .transpose()?;
    if api.is_none() {
        return Err(MainError::Restore(
            "--restore needs --api-socket: the VM comes up paused and is resumed through the API"
                .into(),
        ));
    }
    let mut vm = vm::Vm::restore(&dir, api)?;
    vm.boot()?;
    Ok(vm.run()?)
}

/// No VM yet: serve the API until a migration or a restore brings one.
fn standby(cli: &Cli) -> Result<vmm::platform::ExitReason, MainError> {
    if cli.initramfs.is_some() || !cli.disk.is_empty() || !cli.device.is_empty() {
        return Err(MainError::KernelRequired);
    }
    let api = cli
        .api_socket
        .as_deref()
        .map(|s| PathOrFd::parse("--api-socket", s))
        .transpose()?
        .ok_or(MainError::KernelRequired)?;
    Ok(vm::serve_standby(&api)?)
}

/// Seccomp mode and the event monitor, before any VM.
fn setup(cli: &Cli) -> Result<(), MainError> {
    let mode = vmm::seccomp::SeccompMode::parse(&cli.seccomp)
        .ok_or_else(|| MainError::Seccomp(cli.seccomp.clone()))?;
    vmm::seccomp::set_mode(mode);
    if mode != vmm::seccomp::SeccompMode::Off {
        virtio_devices::block_io::on_worker_start(|| {
            vmm::seccomp::apply_or_exit(vmm::seccomp::ThreadKind::BlkIo)
        });
    }
    if let Some(m) = &cli.event_monitor {
        start_event_monitor(&PathOrFd::parse("--event-monitor", m)?)?;
    }
    Ok(())
}
