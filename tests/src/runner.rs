//! Runs a [`Scenario`] with the VMM, directly on hardware KVM or nested in a
//! QEMU TCG host VM, and collects its output.
//!
//! # Nested mode protocol (see also scripts/build-guest-image.sh)
//! The outer initramfs is `outer-base.cpio.gz` followed by an uncompressed
//! cpio archive written here, holding:
//! * `/vmm/cloud-hypervisor` and the shared libraries `ldd` lists, at their
//!   host paths;
//! * `/scenario/guest-bzImage`, `/scenario/guest-initrd`;
//! * `/scenario.args`: the VMM arguments, one per line;
//! * `/scenario.files`: `SERIAL NAME SIZE` per scenario file.
//!
//! Each scenario file travels on its own raw virtio-blk disk of the outer VM
//! (`-drive file=...,format=raw` with `serial=SERIAL`): the scenario file
//! itself when its size is a multiple of 512, else a zero-padded copy. The
//! outer /init copies each disk's first SIZE bytes to `/scenario/NAME` (a
//! tmpfs file, so the VMM sees an ordinary file of the same size), runs the
//! VMM in `/scenario` with the same arguments as on the host, prints
//! `@@CH-TEST:VMM-EXIT=<status>@@`, copies every file back onto its disk
//! (fsync), prints `@@CH-TEST:OUTER-DONE@@` and powers off. Padded copies
//! are copied back into the scenario file afterwards.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cpio::{concat, CpioWriter};
use crate::error::{Error, Result};
use crate::host::{self, Detected, GuestImages, Mode};
use crate::scenario::{
    Line, RunOutput, Scenario, GUEST_INITRD, GUEST_KERNEL, KEY_OUTER_ERROR, KEY_SCENARIO_EXIT,
    KEY_VMM_EXIT, MARK_INIT, MARK_VMM_START,
};
use crate::steps::{Overdue, Step, StepTracker};

/// First line of the VMM's state dump (see vmm/src/dump.rs).
pub const DUMP_BEGIN: &str = "@@CH-DUMP:BEGIN=";
/// Last line of the VMM's state dump.
pub const DUMP_END: &str = "@@CH-DUMP:END=";
/// Limit of the outer VM's boot (QEMU start to VMM start). Measured: 4 to
/// 5 s on an idle machine.
pub const OUTER_BOOT_LIMIT: Duration = Duration::from_secs(60);
/// Limit from the end of the guest's script to the VMM's exit (measured:
/// under 0.2 s), and from there to the end of the process.
pub const POWER_OFF_LIMIT: Duration = Duration::from_secs(30);
/// Limit of the outer VM copying scenario files back and powering off
/// (measured: under 1 s for the 30 MiB of the largest scenario).
pub const OUTER_COPY_LIMIT: Duration = Duration::from_secs(60);

/// The outer QEMU TCG host VM's command line (before -kernel/-initrd/drives).
///
/// One outer vCPU: with two, multi-threaded TCG occasionally runs a stale
/// translation of kernel text the outer kernel has just patched (KVM's
/// static keys flip while the inner guest boots), and the outer kernel dies
/// with "Oops: int3" in kvm_arch_vcpu_ioctl_run. The inner guest's vCPUs are
/// threads of the VMM and run fine on one outer vCPU.
pub const OUTER_QEMU_ARGS: &[&str] = &[
    "-machine",
    "q35,accel=tcg",
    "-cpu",
    "max",
    "-m",
    "2048",
    "-smp",
    "1",
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-serial",
    "stdio",
    "-no-reboot",
];
/// The outer VM's kernel command line.
pub const OUTER_CMDLINE: &str = "console=ttyS0 quiet loglevel=5 panic=-1";
/// Every run writes its output, with host timestamps, to this file of the
/// scenario directory.
pub const OUTPUT_LOG: &str = "output.log";
const MARK_OUTER_DONE: &str = "@@CH-TEST:OUTER-DONE@@";

/// One VM at a time per test process: the machine has 2 cores, and a nested
/// run already uses both.
static RUN_LOCK: Mutex<()> = Mutex::new(());

/// Runs scenarios in the mode detected for this host.
#[derive(Clone, Debug)]
pub struct Runner {
    pub detected: Detected,
    pub images: GuestImages,
    /// The VMM binary (in qemu-reference mode: unused).
    pub vmm: PathBuf,
    /// Print each output line to stdout as it arrives (for interactive use).
    pub echo: bool,
}

fn qemu_program() -> &'static str {
    "qemu-system-x86_64"
}

impl Runner {
    /// Detects the mode (`CH_TEST_MODE`, default auto), builds or finds the
    /// guest images and the VMM (`CH_BINARY`, else `cargo build --release -p
    /// vmm`).
    pub fn from_env() -> Result<Self> {
        let detected = Self::detect()?;
        let images = host::guest_images()?;
        let vmm = if detected.mode == Mode::QemuReference {
            PathBuf::from(qemu_program())
        } else {
            host::vmm_binary()?
        };
        Ok(Runner {
            detected,
            images,
            vmm,
            echo: false,
        })
    }

    /// Like [`Runner::from_env`] but with the given program standing in for
    /// the VMM (used to check the runner itself).
    pub fn with_vmm(vmm: &Path) -> Result<Self> {
        let detected = Self::detect()?;
        let images = host::guest_images()?;
        Ok(Runner {
            detected,
            images,
            vmm: vmm.to_path_buf(),
            echo: false,
        })
    }

    fn detect() -> Result<Detected> {
        let requested = std::env::var("CH_TEST_MODE").ok();
        let detected = host::choose_mode(requested.as_deref(), &host::HostFacts::read())?;
        if detected.mode != Mode::Direct && !host::in_path(qemu_program()) {
            return Err(Error::MissingTool {
                tool: qemu_program().into(),
                why: format!("mode {}: {}", detected.mode, detected.reason),
            });
        }
        Ok(detected)
    }

    /// The mode in use.
    pub fn mode(&self) -> Mode {
        self.detected.mode
    }

    /// The steps of a run of `scenario` in this mode, each with its limit.
    pub fn steps(&self, scenario: &Scenario) -> Vec<Step> {
        let mut v = Vec::new();
        if self.mode() == Mode::Nested {
            v.push(Step::new("outer VM boot", MARK_VMM_START, OUTER_BOOT_LIMIT));
        }
        let boot = match self.mode() {
            // The guest runs under QEMU TCG itself: several times slower.
            Mode::QemuReference => scenario.boot_limit * 3,
            _ => scenario.boot_limit,
        };
        v.push(Step::new("guest boot", MARK_INIT, boot));
        v.extend(scenario.steps.iter().cloned());
        v.push(Step::new(
            "script end",
            &format!("@@{KEY_SCENARIO_EXIT}="),
            scenario.script_limit,
        ));
        if self.mode() == Mode::Nested {
            v.push(Step::new(
                "power off",
                &format!("@@{KEY_VMM_EXIT}="),
                POWER_OFF_LIMIT,
            ));
            v.push(Step::new(
                "outer VM copies files back",
                MARK_OUTER_DONE,
                OUTER_COPY_LIMIT,
            ));
        }
        v.push(Step::new("exit", "", POWER_OFF_LIMIT));
        v
    }

    /// The cap on a whole run: the scenario's own, else
    /// `CH_TEST_TIMEOUT_SECS`, else the sum of the step limits.
    fn time_limit(&self, scenario: &Scenario, steps: &[Step]) -> Duration {
        if let Some(t) = scenario.timeout {
            return t;
        }
        if let Some(secs) = std::env::var("CH_TEST_TIMEOUT_SECS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            return Duration::from_secs(secs);
        }
        steps.iter().map(|s| s.limit).sum()
    }

    /// Runs `scenario` and returns its output. A run that times out, or
    /// whose outer VM fails, is an error; a VMM that exits non-zero is not
    /// (see [`RunOutput::vmm_exit`]).
    pub fn run(&self, scenario: &Scenario) -> Result<RunOutput> {
        scenario.validate()?;
        let _guard = RUN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // And one VM at a time per machine: other test processes in this
        // work tree share build/runs (and the 2 cores).
        let runs = host::runs_dir();
        std::fs::create_dir_all(&runs).map_err(|e| Error::io("creating", &runs, e))?;
        let lock_path = runs.join(".lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("opening", &lock_path, e))?;
        lock.lock()
            .map_err(|e| Error::io("locking", &lock_path, e))?;
        let dir = runs.join(&scenario.name);
        self.prepare_dir(scenario, &dir)?;
        let steps = self.steps(scenario);
        let watch = Watch {
            limit: self.time_limit(scenario, &steps),
            steps: StepTracker::new(steps),
        };
        match self.mode() {
            Mode::Direct => self.run_direct(scenario, &dir, watch),
            Mode::Nested => self.run_nested(scenario, &dir, watch),
            Mode::QemuReference => self.run_reference(scenario, &dir, watch),
        }
    }

    fn prepare_dir(&self, scenario: &Scenario, dir: &Path) -> Result<()> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io("removing old run", dir, e))?;
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating run dir", dir, e))?;
        for (name, data) in &scenario.files {
            let path = dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Error::io("creating dir", parent, e))?;
            }
            std::fs::write(&path, data)
                .map_err(|e| Error::io("writing scenario file", &path, e))?;
        }
        let kernel = dir.join(GUEST_KERNEL);
        let source = scenario
            .guest_kernel
            .as_ref()
            .unwrap_or(&self.images.bzimage);
        std::fs::copy(source, &kernel)
            .map_err(|e| Error::io("copying guest kernel", &kernel, e))?;
        let mut base = read(&self.images.inner_base)?;
        for part in &scenario.initramfs_parts {
            base = concat(&base, part);
        }
        let mut extra = CpioWriter::new();
        extra.file("scenario.sh", 0o755, scenario.script.as_bytes());
        for (path, data) in &scenario.guest_files {
            extra.file(path, 0o755, data);
        }
        let initrd = dir.join(GUEST_INITRD);
        std::fs::write(&initrd, concat(&base, &extra.finish()))
            .map_err(|e| Error::io("writing guest initramfs", &initrd, e))
    }

    fn run_direct(&self, scenario: &Scenario, dir: &Path, watch: Watch) -> Result<RunOutput> {
        let _mounts = FullDiskMounts::setup(scenario, dir)?;
        let tools = dir.join(".tools");
        if !scenario.tools.is_empty() {
            std::fs::create_dir_all(&tools).map_err(|e| Error::io("creating", &tools, e))?;
            for (name, bin) in &scenario.tools {
                let to = tools.join(name);
                std::fs::copy(bin, &to).map_err(|e| Error::io("copying tool", &to, e))?;
            }
        }
        let mut cmd = match &scenario.launcher {
            Some((l, args)) => {
                let mut c = Command::new(tools.join(l));
                c.args(args).arg(&self.vmm);
                c
            }
            None => Command::new(&self.vmm),
        };
        cmd.args(scenario.full_args()).current_dir(dir);
        let companion = match &scenario.during {
            Some(script) => {
                let remote = host::ch_remote_binary(&self.vmm)?;
                let bin_dir = remote.parent().unwrap_or(Path::new(".")).to_path_buf();
                let path = std::env::var_os("PATH").unwrap_or_default();
                let mut paths = vec![bin_dir, tools];
                paths.extend(std::env::split_paths(&path));
                let mut c = Command::new("sh");
                c.arg("-c").arg(script).current_dir(dir).env(
                    "PATH",
                    std::env::join_paths(paths).unwrap_or_else(|_| path.clone()),
                );
                Some(Companion {
                    cmd: c,
                    outlives: scenario.during_outlives_vmm,
                })
            }
            None => None,
        };
        let what = format!("VMM {} (scenario {})", self.vmm.display(), scenario.name);
        let log = dir.join(OUTPUT_LOG);
        let cap = capture_with(
            cmd,
            companion,
            &what,
            watch,
            DumpVia::Signal,
            Some(&log),
            self.echo,
        )?;
        Ok(RunOutput {
            mode: Mode::Direct,
            dir: dir.to_path_buf(),
            vmm_exit: cap.status,
            vmm_started: Duration::ZERO,
            vmm_exited: cap.exited_at,
            lines: cap.lines,
            step_times: cap.step_times,
        })
    }

    fn run_reference(&self, scenario: &Scenario, dir: &Path, watch: Watch) -> Result<RunOutput> {
        if !scenario.full_disks.is_empty() || scenario.during.is_some() {
            // QEMU stops the guest on ENOSPC by default (werror=enospc),
            // and has no Cloud Hypervisor API: not what the scenario checks.
            return Err(Error::BadScenario {
                scenario: scenario.name.clone(),
                why: "full disks and scripts beside the VMM (API) are not supported in qemu-reference mode".into(),
            });
        }
        let args = reference_qemu_args(scenario)?;
        let mut cmd = Command::new(qemu_program());
        cmd.args(&args).current_dir(dir);
        let what = format!("reference QEMU (scenario {})", scenario.name);
        let log = dir.join(OUTPUT_LOG);
        let cap = capture(cmd, &what, watch, DumpVia::None, Some(&log), self.echo)?;
        Ok(RunOutput {
            mode: Mode::QemuReference,
            dir: dir.to_path_buf(),
            vmm_exit: cap.status,
            vmm_started: Duration::ZERO,
            vmm_exited: cap.exited_at,
            lines: cap.lines,
            step_times: cap.step_times,
        })
    }

    fn run_nested(&self, scenario: &Scenario, dir: &Path, watch: Watch) -> Result<RunOutput> {
        let xfer = dir.join(".outer");
        std::fs::create_dir_all(&xfer).map_err(|e| Error::io("creating dir", &xfer, e))?;

        // The payload archive.
        let mut cpio = CpioWriter::new();
        cpio.file("vmm/cloud-hypervisor", 0o755, &vmm_bytes(&self.vmm, &xfer)?);
        for lib in host::shared_libraries(&self.vmm) {
            let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
            cpio.file(&rel, 0o755, &read(&lib)?);
        }
        cpio.file(
            &format!("scenario/{GUEST_KERNEL}"),
            0o644,
            &read(&dir.join(GUEST_KERNEL))?,
        );
        cpio.file(
            &format!("scenario/{GUEST_INITRD}"),
            0o644,
            &read(&dir.join(GUEST_INITRD))?,
        );
        let mut args_file = String::new();
        for a in scenario.full_args() {
            args_file.push_str(&a);
            args_file.push('\n');
        }
        cpio.file("scenario.args", 0o644, args_file.as_bytes());
        // Run by the outer /init before the VMM (as `sh`, cwd /): the full
        // disks' tmpfs mounts, then the scenario's own outer script.
        let mut selfcheck = String::new();
        for d in &scenario.full_disks {
            selfcheck.push_str(&format!(
                "( cd /scenario && {} ) || echo '@@{KEY_OUTER_ERROR}=cannot make the full disk {}@@'\n",
                d.setup_script().trim_end(),
                d.name
            ));
        }
        if let Some(script) = &scenario.outer_script {
            selfcheck.push_str(script);
        }
        if !selfcheck.is_empty() {
            cpio.file("scenario.selfcheck", 0o755, selfcheck.as_bytes());
        }
        if let Some(during) = &scenario.during {
            let remote = host::ch_remote_binary(&self.vmm)?;
            cpio.file("vmm/ch-remote", 0o755, &vmm_bytes(&remote, &xfer)?);
            for lib in host::shared_libraries(&remote) {
                let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
                cpio.file(&rel, 0o755, &read(&lib)?);
            }
            cpio.file("scenario.during", 0o755, during.as_bytes());
            if scenario.during_outlives_vmm {
                cpio.file("scenario.during-waits", 0o644, b"");
            }
        }
        for (name, bin) in &scenario.tools {
            cpio.file(&format!("vmm/{name}"), 0o755, &vmm_bytes(bin, &xfer)?);
            for lib in host::shared_libraries(bin) {
                let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
                cpio.file(&rel, 0o755, &read(&lib)?);
            }
        }
        if let Some((l, args)) = &scenario.launcher {
            let mut lines = format!("/vmm/{l}\n");
            for a in args {
                lines.push_str(a);
                lines.push('\n');
            }
            cpio.file("scenario.launcher", 0o644, lines.as_bytes());
        }

        // One outer disk per scenario file.
        let mut files_list = String::new();
        let mut drives: Vec<String> = Vec::new();
        let mut padded: Vec<(PathBuf, PathBuf, usize)> = Vec::new();
        for (i, (name, data)) in scenario.files.iter().enumerate() {
            let serial = format!("chtest{i}");
            let path = dir.join(name);
            let disk = if data.len().is_multiple_of(512) && !data.is_empty() {
                path.clone()
            } else {
                let copy = xfer.join(format!("{serial}.img"));
                let mut bytes = data.clone();
                bytes.resize(data.len().div_ceil(512).max(1) * 512, 0);
                std::fs::write(&copy, &bytes).map_err(|e| Error::io("writing", &copy, e))?;
                padded.push((copy.clone(), path.clone(), data.len()));
                copy
            };
            files_list.push_str(&format!("{serial} {name} {}\n", data.len()));
            drives.push("-drive".into());
            drives.push(format!(
                "file={},if=none,id={serial},format=raw,cache=writeback",
                qemu_escape(&disk)
            ));
            drives.push("-device".into());
            drives.push(format!("virtio-blk-pci,drive={serial},serial={serial}"));
        }
        cpio.file("scenario.files", 0o644, files_list.as_bytes());

        let outer_initrd = xfer.join("outer-initrd");
        let base = read(&self.images.outer_base)?;
        std::fs::write(&outer_initrd, concat(&base, &cpio.finish()))
            .map_err(|e| Error::io("writing outer initramfs", &outer_initrd, e))?;

        let mut cmd = Command::new(qemu_program());
        let mut outer_args: Vec<String> = OUTER_QEMU_ARGS.iter().map(|a| a.to_string()).collect();
        if let Some(mib) = scenario.outer_memory_mib {
            if let Some(i) = outer_args.iter().position(|a| a == "-m") {
                outer_args[i + 1] = mib.to_string();
            }
        }
        cmd.args(&outer_args)
            .arg("-kernel")
            .arg(&self.images.bzimage)
            .arg("-initrd")
            .arg(&outer_initrd)
            .arg("-append")
            .arg(OUTER_CMDLINE)
            .args(&drives)
            .current_dir(dir);
        let what = format!("outer QEMU host VM (scenario {})", scenario.name);
        let log = dir.join(OUTPUT_LOG);
        let cap = capture(
            cmd,
            &what,
            watch,
            DumpVia::OuterConsole,
            Some(&log),
            self.echo,
        )?;
        let tail = tail_lines(&cap.lines, 60);

        let find = |text: &str| cap.lines.iter().find(|l| l.text.contains(text));
        if let Some(why) = cap
            .lines
            .iter()
            .find_map(|l| crate::scenario::marker_in(&l.text, KEY_OUTER_ERROR))
        {
            return Err(Error::Outer {
                why: why.to_string(),
                tail,
            });
        }
        let exit_line = cap
            .lines
            .iter()
            .find_map(|l| crate::scenario::marker_in(&l.text, KEY_VMM_EXIT).map(|v| (l.at, v)));
        let Some((exited_at, status)) = exit_line else {
            return Err(Error::MissingMarker {
                what: format!(
                    "the outer VM ended without reporting the VMM's exit status (QEMU status {})",
                    cap.status
                ),
                marker: format!("@@{KEY_VMM_EXIT}=...@@"),
                tail,
            });
        };
        let vmm_exit: i32 = status.parse().map_err(|_| Error::Outer {
            why: format!("bad VMM exit status {status:?}"),
            tail: tail.clone(),
        })?;
        if find(MARK_OUTER_DONE).is_none() {
            return Err(Error::MissingMarker {
                what: "the outer VM did not finish copying the scenario files back".into(),
                marker: MARK_OUTER_DONE.into(),
                tail,
            });
        }
        let vmm_started = find(MARK_VMM_START).map(|l| l.at).unwrap_or(Duration::ZERO);
        for (copy, path, len) in padded {
            let mut bytes = read(&copy)?;
            bytes.truncate(len);
            std::fs::write(&path, bytes).map_err(|e| Error::io("copying back", &path, e))?;
        }
        Ok(RunOutput {
            mode: Mode::Nested,
            dir: dir.to_path_buf(),
            vmm_exit,
            vmm_started,
            vmm_exited: exited_at,
            lines: cap.lines,
            step_times: cap.step_times,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io("reading", path, e))
}

/// The VMM's bytes, with debug information stripped when `strip` can (the
/// outer VM unpacks its initramfs under TCG: smaller is faster).
fn vmm_bytes(vmm: &Path, scratch: &Path) -> Result<Vec<u8>> {
    let stripped = scratch.join("cloud-hypervisor.stripped");
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&stripped)
        .arg(vmm)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        read(&stripped)
    } else {
        read(vmm)
    }
}

/// QEMU option values separate with ',': a comma in a path is doubled.
fn qemu_escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

fn parse_kv(value: &str) -> Vec<(String, String)> {
    value
        .split(',')
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect()
}

/// The QEMU command line equivalent to a scenario's VMM arguments, for the
/// qemu-reference mode (virtio-blk as modern-only virtio-pci, 1af4:1042).
pub fn reference_qemu_args(scenario: &Scenario) -> Result<Vec<String>> {
    let bad = |why: String| Error::BadScenario {
        scenario: scenario.name.clone(),
        why,
    };
    let mut out: Vec<String> = vec![
        "-machine".into(),
        "q35,accel=tcg".into(),
        "-cpu".into(),
        "max".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-no-reboot".into(),
    ];
    let args = scenario.full_args();
    let mut it = args.iter();
    let mut disks = 0;
    while let Some(opt) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| bad(format!("{opt} without a value")))?;
        match opt.as_str() {
            "--kernel" => out.extend(["-kernel".into(), value.clone()]),
            "--initramfs" => out.extend(["-initrd".into(), value.clone()]),
            "--cmdline" => out.extend(["-append".into(), value.clone()]),
            "--serial" | "--console" => {}
            "--cpus" => {
                let n = parse_kv(value)
                    .into_iter()
                    .find(|(k, _)| k == "boot")
                    .map(|(_, v)| v)
                    .ok_or_else(|| bad(format!("--cpus {value}: no boot=")))?;
                out.extend(["-smp".into(), n]);
            }
            "--memory" => {
                let size = parse_kv(value)
                    .into_iter()
                    .find(|(k, _)| k == "size")
                    .map(|(_, v)| v)
                    .ok_or_else(|| bad(format!("--memory {value}: no size=")))?;
                out.extend(["-m".into(), size]);
            }
            "--disk" => {
                let kv = parse_kv(value);
                let path = kv
                    .iter()
                    .find(|(k, _)| k == "path")
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| bad(format!("--disk {value}: no path=")))?;
                let ro = kv.iter().any(|(k, v)| k == "readonly" && v == "on");
                let id = format!("disk{disks}");
                disks += 1;
                out.push("-drive".into());
                out.push(format!(
                    "file={},if=none,id={id},format=raw{}",
                    qemu_escape(Path::new(&path)),
                    if ro { ",readonly=on" } else { "" }
                ));
                // Behind a PCIe root port, so that QEMU gives the function a
                // PCI Express capability (4 KiB configuration space).
                out.push("-device".into());
                out.push(format!("pcie-root-port,id=rp{id},chassis={disks}"));
                out.push("-device".into());
                out.push(format!(
                    "virtio-blk-pci,drive={id},bus=rp{id},disable-legacy=on"
                ));
            }
            other => return Err(bad(format!("qemu-reference mode does not know {other}"))),
        }
    }
    Ok(out)
}

struct Captured {
    lines: Vec<Line>,
    status: i32,
    exited_at: Duration,
    step_times: Vec<(String, Duration)>,
}

/// The deadlines a run is held to: each step's, and a cap on the whole.
pub struct Watch {
    pub steps: StepTracker,
    pub limit: Duration,
}

/// How the runner asks the VMM for its state dump when a step is overdue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpVia {
    /// SIGUSR1 to the process (the VMM runs on this host).
    Signal,
    /// A `dump` line on the outer VM's console, which its /init turns into
    /// SIGUSR1 to the VMM.
    OuterConsole,
    /// No way (the reference QEMU has no dump).
    None,
}

/// How long the runner waits for a requested state dump to end.
const DUMP_WAIT: Duration = Duration::from_secs(20);

fn tail_lines(lines: &[Line], n: usize) -> String {
    let start = lines.len().saturating_sub(n);
    lines[start..]
        .iter()
        .map(|l| l.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The lines of the last state dump in `lines` (from its BEGIN line to its
/// END line, or to the end of the output if it never ended), and the
/// output before it.
pub fn split_dump(lines: &[Line]) -> (Vec<Line>, Vec<Line>) {
    match lines.iter().rposition(|l| l.text.contains(DUMP_BEGIN)) {
        Some(b) => {
            let end = lines[b..]
                .iter()
                .position(|l| l.text.contains(DUMP_END))
                .map_or(lines.len(), |e| b + e + 1);
            let mut rest = lines[..b].to_vec();
            rest.extend_from_slice(&lines[end..]);
            (lines[b..end].to_vec(), rest)
        }
        None => (Vec::new(), lines.to_vec()),
    }
}

fn request_dump(child: &mut Child, via: DumpVia) -> &'static str {
    match via {
        DumpVia::Signal => {
            let ok = Command::new("kill")
                .args(["-USR1", &child.id().to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                "sent SIGUSR1 to the VMM"
            } else {
                "could not send SIGUSR1 to the VMM"
            }
        }
        DumpVia::OuterConsole => match child.stdin.as_mut() {
            Some(stdin) => {
                if stdin
                    .write_all(b"dump\n")
                    .and_then(|_| stdin.flush())
                    .is_ok()
                {
                    "asked the outer VM to send SIGUSR1 to the VMM"
                } else {
                    "could not write to the outer VM's console"
                }
            }
            None => "the outer VM's console is not connected",
        },
        DumpVia::None => "this mode has no state dump",
    }
}

/// Runs `cmd` with stdout and stderr captured line by line with host
/// timestamps (when each line reached this process), holding it to
/// `watch`: when a step is overdue, asks for the VMM's state dump (`via`),
/// waits for it, kills the process and returns [`Error::Stalled`]; past the
/// overall limit it kills the process and returns [`Error::Timeout`].
/// Writes the lines to `log`, and echoes them if `echo`.
/// How long a companion process may take to end after the main one.
const COMPANION_GRACE: Duration = Duration::from_secs(2);

fn capture(
    cmd: Command,
    what: &str,
    watch: Watch,
    via: DumpVia,
    log: Option<&Path>,
    echo: bool,
) -> Result<Captured> {
    capture_with(cmd, None, what, watch, via, log, echo)
}

/// A process run beside the VMM (the scenario's `during` script).
struct Companion {
    cmd: Command,
    /// The run ends when it ends, not when the VMM does.
    outlives: bool,
}

/// [`capture`], with a `companion` process started right after `cmd`
/// whose output joins `cmd`'s; it is killed when `cmd` has ended.
fn capture_with(
    mut cmd: Command,
    companion: Option<Companion>,
    what: &str,
    mut watch: Watch,
    via: DumpVia,
    log: Option<&Path>,
    echo: bool,
) -> Result<Captured> {
    let write_log = |lines: &[Line], steps: &StepTracker| {
        if let Some(log) = log {
            let mut text: String = lines
                .iter()
                .map(|l| format!("[{:9.3}] {}\n", l.at.as_secs_f64(), l.text))
                .collect();
            text.push_str("--- step times:");
            for (name, d) in steps.timings() {
                text.push_str(&format!(" {name}={:.3}s", d.as_secs_f64()));
            }
            text.push('\n');
            let _ = std::fs::write(log, text);
        }
    };
    let stdin = if via == DumpVia::OuterConsole {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        program: format!("{:?}", cmd.get_program()),
        source,
    })?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let mut readers = Vec::new();
    let stdout = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    let stderr = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    for stream in [stdout, stderr].into_iter().flatten() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || read_lines(stream, tx)));
    }
    let wait_companion = companion.as_ref().is_some_and(|c| c.outlives);
    let mut companion = match companion.map(|c| c.cmd) {
        Some(mut c) => {
            c.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            match c.spawn() {
                Ok(mut p) => {
                    let out = p.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
                    let err = p.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
                    for stream in [out, err].into_iter().flatten() {
                        let tx = tx.clone();
                        readers.push(std::thread::spawn(move || read_lines(stream, tx)));
                    }
                    Some(p)
                }
                Err(source) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Spawn {
                        program: format!("{:?}", c.get_program()),
                        source,
                    });
                }
            }
        }
        None => None,
    };
    // The companion gets a moment to finish on its own (its last lines
    // often report what the VMM's end looked like), then is killed.
    let end_companion = |companion: &mut Option<Child>| {
        if let Some(p) = companion.as_mut() {
            let t = Instant::now();
            while t.elapsed() < COMPANION_GRACE && matches!(p.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = p.kill();
            let _ = p.wait();
        }
    };
    drop(tx);

    let deadline = start + watch.limit;
    let mut lines: Vec<Line> = Vec::new();
    let mut stall: Option<(Overdue, Instant, &'static str)> = None;
    // With `wait_companion`, the VMM's status once it ended while the
    // companion goes on.
    let mut vmm_status: Option<std::process::ExitStatus> = None;
    let mut kill_and_collect = |child: &mut Child,
                                companion: &mut Option<Child>,
                                lines: &mut Vec<Line>,
                                steps: &StepTracker| {
        let _ = child.kill();
        let _ = child.wait();
        if let Some(p) = companion.as_mut() {
            let _ = p.kill();
            let _ = p.wait();
        }
        for r in readers.drain(..) {
            let _ = r.join();
        }
        while let Ok((at, text)) = rx.try_recv() {
            lines.push(Line {
                at: at.duration_since(start),
                text,
            });
        }
        write_log(lines, steps);
    };
    // The log as it grows (a long run can be followed with `tail -f`);
    // rewritten whole, with the step times, at the end.
    let mut live = log.and_then(|p| std::fs::File::create(p).ok());
    let status = loop {
        while let Ok((at, text)) = rx.try_recv() {
            if echo {
                println!("{text}");
            }
            let at = at.duration_since(start);
            if let Some(f) = live.as_mut() {
                let _ = writeln!(f, "[{:9.3}] {text}", at.as_secs_f64());
            }
            watch.steps.line(at, &text);
            lines.push(Line { at, text });
        }
        match child.try_wait() {
            Ok(Some(status)) if stall.is_none() => {
                let companion_runs = companion
                    .as_mut()
                    .is_some_and(|p| matches!(p.try_wait(), Ok(None)));
                if !(wait_companion && companion_runs) {
                    break vmm_status.unwrap_or(status);
                }
                vmm_status.get_or_insert(status);
            }
            Ok(_) => {}
            Err(e) => return Err(Error::io("waiting for", what.to_string(), e)),
        }
        let now = Instant::now();
        match &stall {
            None => {
                if let Some(o) = watch.steps.overdue(now.duration_since(start)) {
                    let how = request_dump(&mut child, via);
                    stall = Some((o, now, how));
                } else if now >= deadline {
                    kill_and_collect(&mut child, &mut companion, &mut lines, &watch.steps);
                    return Err(Error::Timeout {
                        what: what.to_string(),
                        limit: watch.limit,
                        tail: tail_lines(&lines, 60),
                    });
                }
            }
            Some((o, asked, how)) => {
                let (dump, _) = split_dump(&lines);
                let ended = dump.last().is_some_and(|l| l.text.contains(DUMP_END));
                let exited = matches!(child.try_wait(), Ok(Some(_)));
                if ended || exited || via == DumpVia::None || now >= *asked + DUMP_WAIT {
                    kill_and_collect(&mut child, &mut companion, &mut lines, &watch.steps);
                    let (dump, rest) = split_dump(&lines);
                    let dump = if dump.is_empty() {
                        format!(
                            "(no state dump: {how}; none arrived within {} s)",
                            DUMP_WAIT.as_secs()
                        )
                    } else {
                        dump.iter()
                            .map(|l| l.text.as_str())
                            .collect::<Vec<_>>()
                            .join("\n")
                    };
                    return Err(Error::Stalled {
                        what: what.to_string(),
                        overdue: o.to_string(),
                        dump,
                        tail: tail_lines(&rest, 40),
                    });
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let exited_at = start.elapsed();
    end_companion(&mut companion);
    for r in readers {
        let _ = r.join();
    }
    while let Ok((at, text)) = rx.try_recv() {
        if echo {
            println!("{text}");
        }
        let at = at.duration_since(start);
        watch.steps.line(at, &text);
        lines.push(Line { at, text });
    }
    write_log(&lines, &watch.steps);
    use std::os::unix::process::ExitStatusExt;
    let status = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(Captured {
        lines,
        status,
        exited_at,
        step_times: watch.steps.timings(),
    })
}

fn read_lines(mut stream: Box<dyn Read + Send>, tx: mpsc::Sender<(Instant, String)>) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    let emit = |bytes: &[u8], tx: &mpsc::Sender<(Instant, String)>| {
        let text = String::from_utf8_lossy(bytes);
        let _ = tx.send((Instant::now(), text.trim_end_matches('\r').to_string()));
    };
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    emit(&pending[..i], &tx);
                    pending.drain(..=i);
                }
            }
        }
    }
    if !pending.is_empty() {
        emit(&pending, &tx);
    }
}

/// The tmpfs mounts of a scenario's full disks on the host (direct mode),
/// unmounted when dropped.
struct FullDiskMounts(Vec<PathBuf>);

impl FullDiskMounts {
    fn setup(scenario: &Scenario, dir: &Path) -> Result<FullDiskMounts> {
        let mut mounts = FullDiskMounts(Vec::new());
        for d in &scenario.full_disks {
            let out = Command::new("sh")
                .arg("-c")
                .arg(d.setup_script())
                .current_dir(dir)
                .output()
                .map_err(|source| Error::Spawn {
                    program: "sh".into(),
                    source,
                })?;
            if dir.join(d.dir()).exists() && out.status.success() {
                mounts.0.push(dir.join(d.dir()));
            }
            if !out.status.success() {
                return Err(Error::BadScenario {
                    scenario: scenario.name.clone(),
                    why: format!(
                        "{} (direct mode mounts a tmpfs on the host: run as root): {}{}",
                        d.name,
                        String::from_utf8_lossy(&out.stdout).trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
        }
        Ok(mounts)
    }
}

impl Drop for FullDiskMounts {
    fn drop(&mut self) {
        for m in &self.0 {
            let _ = Command::new("umount").arg(m).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_args_translate() {
        let s = Scenario::new("t").args(["--cpus", "boot=2", "--disk", "path=a,b.img,readonly=on"]);
        // "a,b.img" cannot be expressed in CH syntax either; use a plain one.
        let s2 = Scenario::new("t").args(["--cpus", "boot=2", "--disk", "path=d.img,readonly=on"]);
        assert!(reference_qemu_args(&s).is_ok());
        let a = reference_qemu_args(&s2).unwrap();
        assert!(a.windows(2).any(|w| w[0] == "-smp" && w[1] == "2"));
        assert!(a.windows(2).any(|w| w[0] == "-m" && w[1] == "512M"));
        assert!(a
            .iter()
            .any(|x| x == "file=d.img,if=none,id=disk0,format=raw,readonly=on"));
        let bad = Scenario::new("t").args(["--device", "x"]);
        assert!(reference_qemu_args(&bad).is_err());
    }

    fn watch(limit: Duration, steps: Vec<Step>) -> Watch {
        Watch {
            steps: StepTracker::new(steps),
            limit,
        }
    }

    #[test]
    fn capture_reports_status_and_timeout() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one; echo two >&2; printf 'three\\r\\n'; exit 3"]);
        let w = watch(Duration::from_secs(20), vec![]);
        let cap = capture(cmd, "sh", w, DumpVia::None, None, false).unwrap();
        assert_eq!(cap.status, 3);
        let texts: Vec<&str> = cap.lines.iter().map(|l| l.text.as_str()).collect();
        assert!(texts.contains(&"one") && texts.contains(&"two") && texts.contains(&"three"));

        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; exec sleep 30"]);
        let t0 = Instant::now();
        let w = watch(Duration::from_millis(500), vec![]);
        match capture(cmd, "sleeper", w, DumpVia::None, None, false) {
            Err(Error::Timeout { tail, .. }) => assert!(tail.contains("started")),
            other => panic!("expected a timeout, got {:?}", other.map(|c| c.status)),
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    /// A process that stops making progress is caught by its step's
    /// deadline, asked for a dump by SIGUSR1, and the dump it prints is in
    /// the error, apart from the output before it.
    #[test]
    fn an_overdue_step_collects_the_dump() {
        let script = r#"trap 'echo "@@CH-DUMP:BEGIN=1@@"; echo "vCPU 0: stuck here"; echo "@@CH-DUMP:END=1@@"' USR1
echo "@@STEP-ONE@@"
echo "working"
i=0; while [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done"#;
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        let steps = vec![
            Step::new("one", "@@STEP-ONE@@", Duration::from_secs(20)),
            Step::new("two", "@@STEP-TWO@@", Duration::from_millis(700)),
        ];
        let t0 = Instant::now();
        let w = watch(Duration::from_secs(60), steps);
        match capture(cmd, "stepper", w, DumpVia::Signal, None, false) {
            Err(Error::Stalled {
                overdue,
                dump,
                tail,
                ..
            }) => {
                assert!(
                    overdue.contains("'two'") && overdue.contains("'one'"),
                    "{overdue}"
                );
                assert!(dump.contains("vCPU 0: stuck here"), "dump: {dump}");
                assert!(dump.starts_with(DUMP_BEGIN) && dump.contains(DUMP_END));
                assert!(
                    tail.contains("working") && !tail.contains("stuck"),
                    "{tail}"
                );
            }
            other => panic!("expected a stall, got {:?}", other.map(|c| c.status)),
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    }

    #[test]
    fn split_dump_takes_the_last_dump() {
        let l = |t: &str| Line {
            at: Duration::ZERO,
            text: t.into(),
        };
        let lines = vec![
            l("a"),
            l("@@CH-DUMP:BEGIN=1@@"),
            l("x"),
            l("@@CH-DUMP:END=1@@"),
            l("b"),
            l("@@CH-DUMP:BEGIN=2@@"),
            l("y"),
        ];
        let (dump, rest) = split_dump(&lines);
        let t: Vec<&str> = dump.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(t, ["@@CH-DUMP:BEGIN=2@@", "y"]);
        assert_eq!(rest.len(), 5);
        assert!(split_dump(&[l("z")]).0.is_empty());
    }
}
