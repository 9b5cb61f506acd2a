//! `cloud-hypervisor`: boots a Linux guest on KVM, with virtio-blk disks and
//! the virtio-pf SR-IOV physical function.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use vmm::{vm, wiring};

use vmm::config::{
    ApiSocketConfig, ConfigError, CpusConfig, DeviceConfig, DiskConfig, MemoryConfig, OutputConfig,
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
    /// Kernel to boot: a bzImage (64-bit boot protocol).
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,

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

    /// virtio-blk disk: "path=<file>[,readonly=on|off][,id=<name>]".
    /// Repeatable; one option may also list several disks.
    #[arg(long, value_name = "path=FILE[,readonly=on][,id=NAME]", num_args = 1.., action = clap::ArgAction::Append)]
    disk: Vec<String>,

    /// Extra device. "virtio-pf,id=<name>,member=blk,total_vfs=<1..64>,
    /// disk=<PF backing file>,vf_disk=<VF backing file; %n is the VF number>
    /// [,readonly=on]": a virtio-blk SR-IOV physical function with an admin
    /// virtqueue. Repeatable.
    #[arg(long, value_name = "virtio-pf,...", num_args = 1.., action = clap::ArgAction::Append)]
    device: Vec<String>,

    /// Serial port (COM1): "tty", "off" or "file=<path>".
    #[arg(long, value_name = "tty|off|file=PATH", default_value = "tty")]
    serial: String,

    /// virtio-console: only "off" is supported.
    #[arg(long, value_name = "off", default_value = "off")]
    console: String,

    /// HTTP API on a Unix socket: "path=<socket>" (or just the path), or
    /// "fd=<n>" for a listening socket the VMM inherits. See docs/api.md.
    #[arg(long, value_name = "path=SOCKET|fd=N")]
    api_socket: Option<String>,

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
    #[error("--initramfs {0}: no such file")]
    NoInitramfs(String),
    #[error("--device: {0}")]
    Bus(String),
    #[error("{option}: {path}: no such file")]
    NoFile { option: &'static str, path: String },
    #[error("--console: only 'off' is supported (got '{0}')")]
    Console(String),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
}

fn build_config(cli: &Cli) -> Result<vm::VmConfig, MainError> {
    if !cli.kernel.is_file() {
        return Err(MainError::NoKernel(cli.kernel.display().to_string()));
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
        kernel: cli.kernel.clone(),
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
            .map(ApiSocketConfig::parse)
            .transpose()?,
    })
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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();

    let result = build_config(&cli).and_then(|cfg| Ok(vm::run(&cfg)?));
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
