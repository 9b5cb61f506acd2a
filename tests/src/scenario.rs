//! A scenario (what to run) and its output (what came out).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::host::Mode;
use crate::steps::Step;

/// Marker printed by the inner /init once userspace runs.
pub const MARK_INIT: &str = "@@CH-TEST:INIT@@";
/// Key of the marker the inner /init prints when a module fails to load.
pub const KEY_MODULE_FAILED: &str = "CH-TEST:MODULE-FAILED";
/// Key of the marker the inner /init prints with the scenario script's status.
pub const KEY_SCENARIO_EXIT: &str = "CH-TEST:SCENARIO-EXIT";
/// Marker printed by the outer /init right before it starts the VMM.
pub const MARK_VMM_START: &str = "@@CH-TEST:VMM-START@@";
/// Key of the marker the outer /init prints with the VMM's exit status.
pub const KEY_VMM_EXIT: &str = "CH-TEST:VMM-EXIT";
/// Key of the marker the outer /init prints when it cannot go on.
pub const KEY_OUTER_ERROR: &str = "CH-TEST:OUTER-ERROR";

/// The file names under which the runner places the inner guest's kernel and
/// initramfs in the scenario directory.
pub const GUEST_KERNEL: &str = "guest-bzImage";
pub const GUEST_INITRD: &str = "guest-initrd";

/// The default guest kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// What to run: VMM arguments (with paths relative to the scenario directory),
/// a script the inner guest's /init runs, and files placed in the scenario
/// directory (disk images) that the test can read back after the run.
///
/// The runner adds `--kernel guest-bzImage --initramfs guest-initrd
/// --cmdline ... --serial tty --console off`, and `--cpus boot=1` and
/// `--memory size=512M` unless the scenario gives `--cpus` / `--memory`.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub vmm_args: Vec<String>,
    pub script: String,
    pub files: Vec<(String, Vec<u8>)>,
    pub guest_files: Vec<(String, Vec<u8>)>,
    pub cmdline: String,
    pub timeout: Option<Duration>,
    pub outer_script: Option<String>,
    /// Steps of the script, in order (see [`Scenario::step`]).
    pub steps: Vec<Step>,
    /// Limit of the script's last stretch: from its last step (or from
    /// /init) to its end.
    pub script_limit: Duration,
    /// Limit of the guest's boot, from VMM start to /init.
    pub boot_limit: Duration,
    /// Disk files on a filesystem that is nearly full (see
    /// [`Scenario::full_disk`]).
    pub full_disks: Vec<FullDisk>,
    /// A script run beside the VMM (see [`Scenario::during`]).
    pub during: Option<String>,
    /// Host programs on that script's PATH: (name, binary).
    pub tools: Vec<(String, PathBuf)>,
    /// The run ends when the script beside the VMM ends, not the VMM (see
    /// [`Scenario::during_outlives_vmm`]).
    pub during_outlives_vmm: bool,
    /// The outer VM's RAM in MiB (nested mode), when not the default.
    pub outer_memory_mib: Option<u32>,
    /// A tool the VMM is started through, and its arguments (see
    /// [`Scenario::launcher`]).
    pub launcher: Option<(String, Vec<String>)>,
    /// The guest's kernel, when not the image's (see
    /// [`Scenario::guest_kernel`]).
    pub guest_kernel: Option<PathBuf>,
    /// Archives appended to the guest's initramfs after the image's (see
    /// [`Scenario::initramfs_part`]).
    pub initramfs_parts: Vec<Vec<u8>>,
}

/// A sparse disk file of `capacity` bytes alone on a tmpfs of `room` bytes,
/// in its own directory of the scenario: writes past the room fail with
/// ENOSPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FullDisk {
    /// `DIR/FILE`, relative to the scenario directory.
    pub name: String,
    pub capacity: u64,
    pub room: u64,
}

impl FullDisk {
    /// The directory the tmpfs is mounted on.
    pub fn dir(&self) -> &str {
        self.name.split('/').next().unwrap_or("")
    }

    /// Shell commands, run in the VMM's working directory, that mount the
    /// tmpfs and create the file; on failure they print why and exit 1.
    pub fn setup_script(&self) -> String {
        format!(
            "mkdir -p '{d}' && mount -t tmpfs -o size={room} tmpfs '{d}' \
             && dd if=/dev/zero of='{n}' bs=1 count=0 seek={cap} 2>/dev/null \
             || {{ echo \"cannot make the full disk {n} (tmpfs of {room} bytes)\"; exit 1; }}\n",
            d = self.dir(),
            n = self.name,
            room = self.room,
            cap = self.capacity,
        )
    }
}

/// Default limit of the guest's boot (VMM start to /init). Measured: 5 to
/// 10 s nested with 1 or 2 vCPUs on an idle 2-core machine, under 2 s on
/// hardware KVM; the margin covers a machine busy with builds.
pub const DEFAULT_BOOT_LIMIT: Duration = Duration::from_secs(60);
/// Default limit of a script's last stretch (most scripts take well under
/// a second).
pub const DEFAULT_SCRIPT_LIMIT: Duration = Duration::from_secs(60);

impl Scenario {
    /// A scenario whose guest boots, runs nothing and powers off.
    pub fn new(name: &str) -> Self {
        Scenario {
            name: name.to_string(),
            vmm_args: Vec::new(),
            script: String::new(),
            files: Vec::new(),
            guest_files: Vec::new(),
            cmdline: DEFAULT_CMDLINE.to_string(),
            timeout: None,
            outer_script: None,
            steps: Vec::new(),
            script_limit: DEFAULT_SCRIPT_LIMIT,
            boot_limit: DEFAULT_BOOT_LIMIT,
            full_disks: Vec::new(),
            during: None,
            tools: Vec::new(),
            during_outlives_vmm: false,
            outer_memory_mib: None,
            launcher: None,
            guest_kernel: None,
            initramfs_parts: Vec::new(),
        }
    }

    /// Appends VMM arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.vmm_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The shell script (busybox sh) the inner guest runs after booting. The
    /// guest powers off when it returns.
    pub fn script(mut self, script: &str) -> Self {
        self.script = script.to_string();
        self
    }

    /// A file in the scenario directory (e.g. a disk image), readable after
    /// the run with [`RunOutput::read_file`].
    pub fn file(mut self, name: &str, contents: Vec<u8>) -> Self {
        self.files.push((name.to_string(), contents));
        self
    }

    /// A file placed in the inner guest's initramfs at `/path`.
    pub fn guest_file(mut self, path: &str, contents: Vec<u8>) -> Self {
        self.guest_files.push((path.to_string(), contents));
        self
    }

    /// Replaces the guest kernel command line.
    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = cmdline.to_string();
        self
    }

    /// Caps the whole run at `limit` (besides the per-step limits).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// A step of the script: it ends when the guest prints a line
    /// containing `marker`, at most `limit` after the previous step ended
    /// (or after /init for the first one). On expiry the run fails with the
    /// VMM's state dump and the last lines of output.
    pub fn step(mut self, name: &str, marker: &str, limit: Duration) -> Self {
        self.steps.push(Step::new(name, marker, limit));
        self
    }

    /// Limit of the script's last stretch (after its last step).
    pub fn script_limit(mut self, limit: Duration) -> Self {
        self.script_limit = limit;
        self
    }

    /// Limit of the guest's boot (VMM start to /init).
    pub fn boot_limit(mut self, limit: Duration) -> Self {
        self.boot_limit = limit;
        self
    }

    /// A disk file `name` (`DIR/FILE`) of `capacity` bytes, sparse, alone
    /// on a tmpfs of `room` bytes mounted on `DIR` of the scenario, so that
    /// the guest's writes past `room` bytes fail on the host with ENOSPC.
    /// The runner mounts it in the outer VM (nested mode) or on the host
    /// (direct mode, as root; unmounted after the run). The file is not
    /// read back.
    pub fn full_disk(mut self, name: &str, capacity: u64, room: u64) -> Self {
        self.full_disks.push(FullDisk {
            name: name.to_string(),
            capacity,
            room,
        });
        self
    }

    /// A shell script run beside the VMM while it runs, in its working
    /// directory, with `ch-remote` on PATH: in the outer VM (nested mode)
    /// or on the host (direct mode). Its output joins the run's output
    /// (print `@@T:KEY=VALUE@@` markers to report).
    pub fn during(mut self, script: &str) -> Self {
        self.during = Some(script.to_string());
        self
    }

    /// The script beside the VMM goes on after the VMM ends, and the run
    /// ends with it: for a script that runs more VMMs itself (a restore
    /// from a snapshot, the destination of a migration), with
    /// `cloud-hypervisor` on its PATH. Its own steps keep their deadlines.
    pub fn during_outlives_vmm(mut self) -> Self {
        self.during_outlives_vmm = true;
        self
    }

    /// A host program, under `name`, on the PATH of the script beside the
    /// VMM ([`Scenario::during`]), with the shared libraries it needs.
    pub fn tool(mut self, name: &str, binary: impl Into<PathBuf>) -> Self {
        self.tools.push((name.to_string(), binary.into()));
        self
    }

    /// Starts the VMM through the tool `name` ([`Scenario::tool`]): it runs
    /// as `name ARGS... VMM VMM-ARGS...` in the VMM's working directory,
    /// and is to end by executing the VMM (so that the VMM keeps its
    /// process), e.g. after opening descriptors the VMM inherits (`fd=`
    /// options).
    pub fn launcher(mut self, name: &str, args: &[&str]) -> Self {
        let args = args.iter().map(|a| a.to_string()).collect();
        self.launcher = Some((name.to_string(), args));
        self
    }

    /// Boots the guest on `bzimage` instead of the image's kernel (the
    /// initramfs stays the image's: its modules load only on that kernel).
    pub fn guest_kernel(mut self, bzimage: impl Into<PathBuf>) -> Self {
        self.guest_kernel = Some(bzimage.into());
        self
    }

    /// A whole archive (newc cpio, plain or compressed as the guest kernel
    /// can unpack it) appended to the guest's initramfs after the image's
    /// and before the scenario's own files: for a tree too large to go
    /// file by file ([`Scenario::guest_file`]), such as the L1 QEMU of
    /// scripts/build-l1-qemu.sh.
    pub fn initramfs_part(mut self, archive: Vec<u8>) -> Self {
        self.initramfs_parts.push(archive);
        self
    }

    /// The outer VM's RAM (nested mode; default 2048 MiB): for guests
    /// whose memory, and a second copy of it (a snapshot, a migration's
    /// destination), need more.
    pub fn outer_memory_mib(mut self, mib: u32) -> Self {
        self.outer_memory_mib = Some(mib);
        self
    }

    /// A script the OUTER host VM runs (nested mode only) after loading KVM
    /// and before starting the VMM: for checking the runner itself.
    pub fn outer_script(mut self, script: &str) -> Self {
        self.outer_script = Some(script.to_string());
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |why: String| Error::BadScenario {
            scenario: self.name.clone(),
            why,
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad("name must be [A-Za-z0-9_-]+".into()));
        }
        for (name, _) in &self.files {
            let ok = !name.is_empty()
                && !name.starts_with('/')
                && !name
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == "..")
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
            if !ok || name == GUEST_KERNEL || name == GUEST_INITRD {
                return Err(bad(format!("bad file name {name:?}")));
            }
        }
        if !self.tools.is_empty() && self.during.is_none() && self.launcher.is_none() {
            return Err(bad(
                "tools are for the script beside the VMM (Scenario::during) or a launcher".into(),
            ));
        }
        if self.during_outlives_vmm && self.during.is_none() {
            return Err(bad(
                "during_outlives_vmm needs a script beside the VMM (Scenario::during)".into(),
            ));
        }
        if let Some((l, args)) = &self.launcher {
            if !self.tools.iter().any(|(n, _)| n == l) {
                return Err(bad(format!(
                    "the launcher {l:?} is not a tool of the scenario"
                )));
            }
            if args.iter().any(|a| a.contains('\n')) {
                return Err(bad("launcher arguments cannot contain newlines".into()));
            }
        }
        for d in &self.full_disks {
            let parts: Vec<&str> = d.name.split('/').collect();
            let ok = parts.len() == 2
                && parts.iter().all(|c| {
                    !c.is_empty()
                        && *c != "."
                        && *c != ".."
                        && c.chars()
                            .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
                });
            let clash = self
                .files
                .iter()
                .any(|(f, _)| f.split('/').next() == Some(d.dir()))
                || self
                    .full_disks
                    .iter()
                    .filter(|o| o.dir() == d.dir())
                    .count()
                    > 1;
            if !ok || clash || d.room == 0 || d.capacity == 0 {
                return Err(bad(format!(
                    "bad full disk {:?}: needs DIR/FILE with a DIR of its own, and sizes > 0",
                    d.name
                )));
            }
        }
        if ["--kernel", "--initramfs", "--cmdline"]
            .iter()
            .any(|o| self.vmm_args.iter().any(|a| a == o))
        {
            return Err(bad(
                "--kernel, --initramfs and --cmdline come from the runner (use Scenario::cmdline)"
                    .into(),
            ));
        }
        if self.vmm_args.iter().any(|a| a.contains('\n')) {
            return Err(bad("VMM arguments cannot contain newlines".into()));
        }
        Ok(())
    }

    /// The full VMM argument list: the runner's arguments first, then the
    /// scenario's. `--serial tty`, `--console off`, `--cpus boot=1` and
    /// `--memory size=512M` are added only when the scenario gives no such
    /// option; the kernel, initramfs and command line always come from the
    /// runner and the scenario ([`Scenario::cmdline`]).
    pub fn full_args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--kernel".into(),
            GUEST_KERNEL.into(),
            "--initramfs".into(),
            GUEST_INITRD.into(),
            "--cmdline".into(),
            self.cmdline.clone(),
        ];
        for (opt, default) in [
            ("--serial", "tty"),
            ("--console", "off"),
            ("--cpus", "boot=1"),
            ("--memory", "size=512M"),
        ] {
            if !self.vmm_args.iter().any(|a| a == opt) {
                args.extend([opt.to_string(), default.to_string()]);
            }
        }
        args.extend(self.vmm_args.iter().cloned());
        args
    }
}

/// One line of output with the time it reached the host, from process start.
#[derive(Clone, Debug)]
pub struct Line {
    pub at: Duration,
    pub text: String,
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct RunOutput {
    pub mode: Mode,
    /// The scenario directory; files given with [`Scenario::file`] are here.
    pub dir: PathBuf,
    /// Every line of stdout and stderr (both guests' serial consoles, the
    /// VMM's own messages, and in nested mode the outer VM's).
    pub lines: Vec<Line>,
    /// The VMM's exit status (128 + signal number when killed by a signal).
    pub vmm_exit: i32,
    /// When the VMM started, from process start (0 unless nested).
    pub vmm_started: Duration,
    /// When the VMM had exited, from process start.
    pub vmm_exited: Duration,
    /// How long each step of the run took.
    pub step_times: Vec<(String, Duration)>,
}

/// The value of the marker `@@KEY=VALUE@@` in `line`.
pub fn marker_in<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = format!("@@{key}=");
    let i = line.find(&start)? + start.len();
    let len = line[i..].find("@@")?;
    Some(&line[i..i + len])
}

impl RunOutput {
    /// All output, one line per line.
    pub fn serial(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            s.push_str(&l.text);
            s.push('\n');
        }
        s
    }

    /// The last `n` lines of output.
    pub fn tail(&self, n: usize) -> String {
        let start = self.lines.len().saturating_sub(n);
        self.lines[start..]
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The value of the first `@@KEY=VALUE@@` marker.
    pub fn marker(&self, key: &str) -> Option<String> {
        self.lines
            .iter()
            .find_map(|l| marker_in(&l.text, key).map(str::to_string))
    }

    /// The values of every `@@KEY=VALUE@@` marker, in order.
    pub fn markers(&self, key: &str) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|l| marker_in(&l.text, key).map(str::to_string))
            .collect()
    }

    /// When the first line containing `text` arrived.
    pub fn time_of(&self, text: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|l| l.text.contains(text))
            .map(|l| l.at)
    }

    /// Whether the inner guest's /init ran.
    pub fn reached_init(&self) -> bool {
        self.time_of(MARK_INIT).is_some()
    }

    /// The exit status of the scenario script in the guest.
    pub fn scenario_exit(&self) -> Option<i32> {
        self.marker(KEY_SCENARIO_EXIT).and_then(|v| v.parse().ok())
    }

    /// Time from VMM start to the inner guest's /init.
    pub fn time_to_init(&self) -> Option<Duration> {
        self.time_of(MARK_INIT)
            .map(|t| t.saturating_sub(self.vmm_started))
    }

    /// Time from VMM start to VMM exit.
    pub fn time_to_exit(&self) -> Duration {
        self.vmm_exited.saturating_sub(self.vmm_started)
    }

    /// Reads back a file of the scenario directory.
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.dir.join(name);
        std::fs::read(&path).map_err(|e| Error::io("reading scenario file", path, e))
    }

    /// A short report for assertion messages: mode, status, last lines.
    pub fn summary(&self) -> String {
        format!(
            "mode: {}\nVMM exit status: {}\nscenario dir: {} (full output in output.log)\nlast output:\n{}",
            self.mode,
            self.vmm_exit,
            self.dir.display(),
            self.tail(60)
        )
    }

    /// The scenario directory's path for `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        Path::new(&self.dir).join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_parse() {
        assert_eq!(marker_in("x @@A=1@@ y", "A"), Some("1"));
        assert_eq!(marker_in("@@A=@@", "A"), Some(""));
        assert_eq!(marker_in("@@A=1", "A"), None);
        assert_eq!(marker_in("@@AB=1@@", "A"), None);
        assert_eq!(
            marker_in("[  1.0] foo @@CH-TEST:VMM-EXIT=0@@", KEY_VMM_EXIT),
            Some("0")
        );
    }

    #[test]
    fn default_args_added_once() {
        let s = Scenario::new("t").args(["--cpus", "boot=2", "--disk", "path=d.img"]);
        let a = s.full_args();
        assert_eq!(a.iter().filter(|x| *x == "--cpus").count(), 1);
        assert_eq!(a.iter().filter(|x| *x == "--memory").count(), 1);
        assert!(a
            .windows(2)
            .any(|w| w[0] == "--kernel" && w[1] == GUEST_KERNEL));
        assert!(a.windows(2).any(|w| w[0] == "--cpus" && w[1] == "boot=2"));
        let s = Scenario::new("t").args(["--serial", "off"]);
        let a = s.full_args();
        assert_eq!(a.iter().filter(|x| *x == "--serial").count(), 1);
        assert!(a.windows(2).any(|w| w[0] == "--serial" && w[1] == "off"));
    }

    #[test]
    fn scenario_validation() {
        assert!(Scenario::new("ok-1")
            .file("d/x.img", vec![])
            .validate()
            .is_ok());
        assert!(Scenario::new("bad name").validate().is_err());
        assert!(Scenario::new("t").file("../x", vec![]).validate().is_err());
        assert!(Scenario::new("t").file("/x", vec![]).validate().is_err());
        assert!(Scenario::new("t")
            .file(GUEST_KERNEL, vec![])
            .validate()
            .is_err());
        assert!(Scenario::new("t").args(["a\nb"]).validate().is_err());
        assert!(Scenario::new("t")
            .args(["--kernel", "x"])
            .validate()
            .is_err());
    }
}
