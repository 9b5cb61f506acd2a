//! What the host offers: which way to run the VMM, the guest images, the VMM
//! binary. Each is worked out once per test process.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// How the runner starts the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Hardware KVM on the host: the VMM runs directly on the host.
    Direct,
    /// No hardware KVM: the VMM runs inside a QEMU TCG host VM (`-cpu max`,
    /// nested SVM), with the guest kernel's own kvm + kvm_amd.
    Nested,
    /// Not the VMM at all: QEMU TCG on the host runs the inner guest with an
    /// equivalent QEMU configuration. Only for checking the scenarios and the
    /// guest image against a known-good VMM (`CH_TEST_MODE=qemu-reference`).
    QemuReference,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Direct => "direct (hardware KVM on the host)",
            Mode::Nested => "nested (VMM inside a QEMU TCG host VM with nested SVM)",
            Mode::QemuReference => "qemu-reference (QEMU TCG stands in for the VMM)",
        })
    }
}

/// The mode with the reason it was chosen.
#[derive(Clone, Debug)]
pub struct Detected {
    pub mode: Mode,
    pub reason: String,
}

/// Facts read from the host that decide the mode.
#[derive(Clone, Debug, Default)]
pub struct HostFacts {
    pub dev_kvm: bool,
    /// Modules under /sys/module whose name starts with "kvm".
    pub kvm_modules: Vec<String>,
    /// /proc/cpuinfo lists vmx or svm.
    pub cpu_virt_flag: bool,
}

impl HostFacts {
    /// Reads /dev/kvm, /sys/module and /proc/cpuinfo.
    pub fn read() -> Self {
        let kvm_modules = std::fs::read_dir("/sys/module")
            .map(|rd| {
                let mut v: Vec<String> = rd
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("kvm"))
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_virt_flag = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        HostFacts {
            dev_kvm: Path::new("/dev/kvm").exists(),
            kvm_modules,
            cpu_virt_flag,
        }
    }

    /// Hardware KVM: kvm_intel or kvm_amd loaded and the CPU has VMX/SVM.
    pub fn hardware_kvm(&self) -> bool {
        self.dev_kvm
            && self.cpu_virt_flag
            && self
                .kvm_modules
                .iter()
                .any(|m| m == "kvm_intel" || m == "kvm_amd")
    }
}

/// Chooses the mode from `CH_TEST_MODE` (auto when unset) and the host facts.
pub fn choose_mode(requested: Option<&str>, facts: &HostFacts) -> Result<Detected> {
    let describe = || {
        format!(
            "/dev/kvm {}, kvm modules [{}], cpu vmx/svm flag {}",
            if facts.dev_kvm { "present" } else { "absent" },
            facts.kvm_modules.join(" "),
            if facts.cpu_virt_flag { "yes" } else { "no" }
        )
    };
    match requested.unwrap_or("auto") {
        "" | "auto" => {
            if !facts.dev_kvm {
                Err(Error::NoKvm)
            } else if facts.hardware_kvm() {
                Ok(Detected {
                    mode: Mode::Direct,
                    reason: format!("hardware KVM: {}", describe()),
                })
            } else {
                Ok(Detected {
                    mode: Mode::Nested,
                    reason: format!("no hardware KVM ({})", describe()),
                })
            }
        }
        "direct" => Ok(Detected {
            mode: Mode::Direct,
            reason: format!("CH_TEST_MODE=direct ({})", describe()),
        }),
        "nested" => Ok(Detected {
            mode: Mode::Nested,
            reason: format!("CH_TEST_MODE=nested ({})", describe()),
        }),
        "qemu-reference" => Ok(Detected {
            mode: Mode::QemuReference,
            reason: "CH_TEST_MODE=qemu-reference".to_string(),
        }),
        other => Err(Error::BadMode(other.to_string())),
    }
}

/// The workspace root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Where runs keep their scenario directories: `$CH_TEST_RUN_DIR` or build/runs.
pub fn runs_dir() -> PathBuf {
    std::env::var_os("CH_TEST_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("build").join("runs"))
}

/// The files made by scripts/build-guest-image.sh.
#[derive(Clone, Debug)]
pub struct GuestImages {
    pub dir: PathBuf,
    pub bzimage: PathBuf,
    /// Debian's Linux 7.x, for the inner guest only (see
    /// [`crate::Scenario::guest_kernel`]).
    pub bzimage7: PathBuf,
    pub inner_base: PathBuf,
    pub outer_base: PathBuf,
    /// The nested scenario's L2 initramfs base (busybox, virtio_blk, the
    /// inner /init).
    pub l2_base: PathBuf,
}

impl GuestImages {
    fn at(dir: PathBuf) -> Result<Self> {
        let images = GuestImages {
            bzimage: dir.join("bzImage"),
            bzimage7: dir.join("bzImage-7"),
            inner_base: dir.join("inner-base.cpio.gz"),
            outer_base: dir.join("outer-base.cpio.gz"),
            l2_base: dir.join("l2-base.cpio.gz"),
            dir,
        };
        for f in [
            &images.bzimage,
            &images.bzimage7,
            &images.inner_base,
            &images.outer_base,
            &images.l2_base,
        ] {
            if !f.is_file() {
                return Err(Error::MissingImage(f.clone()));
            }
        }
        Ok(images)
    }
}

fn tail_of(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn run_captured(cmd: &mut Command) -> std::io::Result<(std::process::ExitStatus, String)> {
    let out = cmd.output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status, text))
}

/// The guest images: `$CH_GUEST_DIR` if set (used as is), else
/// scripts/build-guest-image.sh is run once per process (it returns at once
/// when its cache in build/guest is up to date).
pub fn guest_images() -> Result<GuestImages> {
    static IMAGES: OnceLock<std::result::Result<GuestImages, String>> = OnceLock::new();
    IMAGES
        .get_or_init(|| build_guest_images().map_err(|e| e.to_string()))
        .clone()
        .map_err(|why| Error::ImageBuild {
            script: repo_root().join("scripts/build-guest-image.sh"),
            status: "see below".into(),
            output: why,
        })
}

fn build_guest_images() -> Result<GuestImages> {
    if let Some(dir) = std::env::var_os("CH_GUEST_DIR") {
        return GuestImages::at(PathBuf::from(dir));
    }
    let script = repo_root().join("scripts/build-guest-image.sh");
    let dir = run_script(&script, &[])?
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("build/guest"));
    GuestImages::at(dir)
}

/// Runs `bash SCRIPT --quiet` with `env` added; its last output line
/// (trimmed), which the image scripts make the path of what they built.
fn run_script(script: &Path, env: &[(&str, &Path)]) -> Result<Option<String>> {
    let mut cmd = Command::new("bash");
    cmd.arg(script).arg("--quiet");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (status, output) = run_captured(&mut cmd).map_err(|source| Error::Spawn {
        program: script.display().to_string(),
        source,
    })?;
    if !status.success() {
        return Err(Error::ImageBuild {
            script: script.to_path_buf(),
            status: status.to_string(),
            output: tail_of(&output, 40),
        });
    }
    Ok(output.lines().last().map(|l| l.trim().to_string()))
}

/// The L1 QEMU archive of scripts/build-l1-qemu.sh (Debian's QEMU, its
/// libraries and firmware, to append to an L1 guest's initramfs).
pub fn l1_qemu_archive() -> Result<PathBuf> {
    static ARCHIVE: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    archive_of(&ARCHIVE, "build-l1-qemu.sh", "l1-qemu/l1-qemu.cpio.gz", &[])
}

/// The archive of scripts/build-l2-state.sh: the nested scenario's L2,
/// booted once on the host and saved (kernel, initramfs, QEMU machine
/// arguments and the saved VM), to append to L1's initramfs; L2 runs
/// `vpfctl`, the static one at `vpfctl`.
pub fn l2_state_archive(vpfctl: &Path) -> Result<PathBuf> {
    static ARCHIVE: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    archive_of(
        &ARCHIVE,
        "build-l2-state.sh",
        "l2-state/l2-state.cpio.gz",
        &[("VPFCTL", vpfctl)],
    )
}

/// The archive a script of scripts/ builds: `$CH_GUEST_DIR/REL` if
/// `$CH_GUEST_DIR` is set (used as is), else the script is run once per
/// process (it returns at once when its cache is up to date) and prints
/// the archive's path last.
fn archive_of(
    cell: &OnceLock<std::result::Result<PathBuf, String>>,
    script: &str,
    rel: &str,
    env: &[(&str, &Path)],
) -> Result<PathBuf> {
    let script = repo_root().join("scripts").join(script);
    cell.get_or_init(|| run_archive_script(&script, rel, env).map_err(|e| e.to_string()))
        .clone()
        .map_err(|why| Error::ImageBuild {
            script,
            status: "see below".into(),
            output: why,
        })
}

fn run_archive_script(script: &Path, rel: &str, env: &[(&str, &Path)]) -> Result<PathBuf> {
    let path = if let Some(dir) = std::env::var_os("CH_GUEST_DIR") {
        PathBuf::from(dir).join(rel)
    } else {
        let path = run_script(script, env)?
            .map(PathBuf::from)
            .unwrap_or_default();
        if !path.is_file() {
            return Err(Error::ImageBuild {
                script: script.to_path_buf(),
                status: format!("exit status 0, but its last line {path:?} names no file"),
                output: String::new(),
            });
        }
        path
    };
    if !path.is_file() {
        return Err(Error::MissingImage(path));
    }
    Ok(path)
}

/// The VMM binary: `$CH_BINARY` if set, else `cargo build --release -p vmm`
/// in the workspace's own target/ (or `$CH_VMM_TARGET_DIR`), once per process.
pub fn vmm_binary() -> Result<PathBuf> {
    static BINARY: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| build_vmm().map_err(|e| e.to_string()))
        .clone()
        .map_err(|why| Error::VmmBuild {
            command: "cargo build --release -p vmm".into(),
            status: "see below".into(),
            output: why,
        })
}

/// `ch-remote`, next to the VMM binary (`cargo build -p vmm --bins` puts
/// both there), or `$CH_REMOTE`.
pub fn ch_remote_binary(vmm: &Path) -> Result<PathBuf> {
    let bin = std::env::var_os("CH_REMOTE")
        .map(PathBuf::from)
        .unwrap_or_else(|| vmm.with_file_name("ch-remote"));
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(Error::MissingBinary(bin))
    }
}

fn build_vmm() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("CH_BINARY") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(Error::MissingBinary(bin))
        };
    }
    let root = repo_root();
    let target = std::env::var_os("CH_VMM_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .args(["build", "--release", "-p", "vmm", "--bins"]);
    let (status, output) = run_captured(&mut cmd).map_err(|source| Error::Spawn {
        program: "cargo".into(),
        source,
    })?;
    if !status.success() {
        return Err(Error::VmmBuild {
            command: format!(
                "CARGO_TARGET_DIR={} cargo build --release -p vmm",
                target.display()
            ),
            status: status.to_string(),
            output: tail_of(&output, 40),
        });
    }
    Ok(target.join("release").join("cloud-hypervisor"))
}

/// Whether `program` is found in PATH.
pub fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// Absolute paths of the shared libraries (and the ELF interpreter) that
/// `ldd` lists for `binary`; empty for a static binary or a script.
pub fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd").arg(binary).output() else {
        return Vec::new();
    };
    parse_ldd(&String::from_utf8_lossy(&out.stdout))
}

/// Parses `ldd` output: "name => /path (addr)" and "/path (addr)" lines.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let candidate = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        if let Some(path) = candidate.split_whitespace().next() {
            if path.starts_with('/') && !libs.iter().any(|l: &PathBuf| l == Path::new(path)) {
                libs.push(PathBuf::from(path));
            }
        }
    }
    libs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(dev: bool, modules: &[&str], flag: bool) -> HostFacts {
        HostFacts {
            dev_kvm: dev,
            kvm_modules: modules.iter().map(|s| s.to_string()).collect(),
            cpu_virt_flag: flag,
        }
    }

    #[test]
    fn mode_detection() {
        let pvm = facts(true, &["kvm", "kvm_pvm"], false);
        assert_eq!(choose_mode(None, &pvm).unwrap().mode, Mode::Nested);
        let amd = facts(true, &["kvm", "kvm_amd"], true);
        assert_eq!(choose_mode(None, &amd).unwrap().mode, Mode::Direct);
        let intel = facts(true, &["kvm", "kvm_intel"], true);
        assert_eq!(
            choose_mode(Some("auto"), &intel).unwrap().mode,
            Mode::Direct
        );
        // A module without the CPU flag (or the reverse) is not hardware KVM.
        assert_eq!(
            choose_mode(None, &facts(true, &["kvm_amd"], false))
                .unwrap()
                .mode,
            Mode::Nested
        );
        assert!(matches!(
            choose_mode(None, &facts(false, &[], true)),
            Err(Error::NoKvm)
        ));
        assert_eq!(
            choose_mode(Some("nested"), &amd).unwrap().mode,
            Mode::Nested
        );
        assert!(matches!(
            choose_mode(Some("bogus"), &amd),
            Err(Error::BadMode(_))
        ));
    }

    #[test]
    fn ldd_parsing() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }
}
