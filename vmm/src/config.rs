//! Parsing of the Cloud Hypervisor style `key=value,key=value` option strings.

use std::path::PathBuf;

use thiserror::Error;

/// Errors in command-line option values.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{option}: unknown parameter '{key}' (accepted: {accepted})")]
    UnknownKey {
        option: &'static str,
        key: String,
        accepted: &'static str,
    },
    #[error("{option}: parameter '{key}' given twice")]
    DuplicateKey { option: &'static str, key: String },
    #[error("{option}: '{item}' is not of the form key=value")]
    NotKeyValue { option: &'static str, item: String },
    #[error("{option}: missing required parameter '{key}'")]
    MissingKey {
        option: &'static str,
        key: &'static str,
    },
    #[error("{option}: invalid value '{value}' for '{key}': {reason}")]
    InvalidValue {
        option: &'static str,
        key: &'static str,
        value: String,
        reason: String,
    },
}

/// The parameters of one option string, checked against the accepted keys.
pub struct OptionParser {
    option: &'static str,
    pairs: Vec<(String, String)>,
}

impl OptionParser {
    /// Splits `input` (e.g. `path=a.img,readonly=on`) and rejects keys not in
    /// `accepted`. A bare item without `=` is taken as the value of
    /// `bare_key` when one is given (`--serial tty` means `mode=tty`).
    pub fn parse(
        option: &'static str,
        input: &str,
        accepted: &'static [&'static str],
        bare_key: Option<&'static str>,
    ) -> Result<Self, ConfigError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for item in input.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => match bare_key {
                    Some(k) => (k.to_string(), item.to_string()),
                    None => {
                        return Err(ConfigError::NotKeyValue {
                            option,
                            item: item.to_string(),
                        })
                    }
                },
            };
            if !accepted.contains(&key.as_str()) {
                return Err(ConfigError::UnknownKey {
                    option,
                    key,
                    accepted: leak_join(accepted),
                });
            }
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(ConfigError::DuplicateKey { option, key });
            }
            pairs.push((key, value));
        }
        Ok(OptionParser { option, pairs })
    }

    /// The raw value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of a required key.
    pub fn required(&self, key: &'static str) -> Result<&str, ConfigError> {
        self.get(key).ok_or(ConfigError::MissingKey {
            option: self.option,
            key,
        })
    }

    fn invalid(&self, key: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            option: self.option,
            key,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// `on`/`off` (also `true`/`false`), `default` when absent.
    pub fn toggle(&self, key: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some("on") | Some("true") => Ok(true),
            Some("off") | Some("false") => Ok(false),
            Some(v) => Err(self.invalid(key, v, "expected on or off")),
        }
    }

    /// An unsigned integer (decimal or 0x hex), `default` when absent.
    pub fn number(&self, key: &'static str, default: u64) -> Result<u64, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => parse_number(v).ok_or_else(|| self.invalid(key, v, "expected a number")),
        }
    }

    /// A size with an optional K/M/G/T suffix (powers of 1024).
    pub fn size(&self, key: &'static str) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_size(v)
                .map(Some)
                .ok_or_else(|| self.invalid(key, v, "expected a size such as 512M or 2G")),
        }
    }
}

fn leak_join(keys: &'static [&'static str]) -> &'static str {
    // The accepted-key list is static and an error ends the program, so a
    // small leak for a readable message is acceptable.
    Box::leak(keys.join(", ").into_boxed_str())
}

/// Parses `123`, `0x7b`.
pub fn parse_number(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// Parses `4096`, `4K`, `512M`, `2G`, `1T`.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 10),
        'M' | 'm' => (&s[..s.len() - 1], 20),
        'G' | 'g' => (&s[..s.len() - 1], 30),
        'T' | 't' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// `--cpus boot=N`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpusConfig {
    pub boot: u8,
}

/// The largest vCPU count this VMM supports (one IOAPIC, xAPIC IDs).
pub const MAX_VCPUS: u64 = 64;

impl CpusConfig {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("--cpus", s, &["boot"], None)?;
        let boot = p.number("boot", 1)?;
        if boot == 0 || boot > MAX_VCPUS {
            return Err(p.invalid("boot", p.get("boot").unwrap_or(""), "must be 1..64"));
        }
        Ok(CpusConfig { boot: boot as u8 })
    }
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig { boot: 1 }
    }
}

/// `--memory size=S`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryConfig {
    pub size: u64,
}

impl MemoryConfig {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("--memory", s, &["size"], None)?;
        let size = p.size("size")?.unwrap_or(512 << 20);
        if size < (64 << 20) || size % 4096 != 0 {
            return Err(p.invalid(
                "size",
                p.get("size").unwrap_or(""),
                "must be a multiple of 4K and at least 64M",
            ));
        }
        if size > (1 << 40) {
            return Err(p.invalid("size", p.get("size").unwrap_or(""), "at most 1T"));
        }
        Ok(MemoryConfig { size })
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { size: 512 << 20 }
    }
}

/// `--disk path=P[,readonly=on][,id=NAME]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    pub id: Option<String>,
    /// Behind the virtio-iommu (older snapshots: off).
    #[serde(default)]
    pub iommu: bool,
}

impl DiskConfig {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("--disk", s, &["path", "readonly", "id", "iommu"], None)?;
        Ok(DiskConfig {
            path: PathBuf::from(p.required("path")?),
            readonly: p.toggle("readonly", false)?,
            id: p.get("id").map(str::to_string),
            iommu: p.toggle("iommu", false)?,
        })
    }
}

/// An option naming a file or a descriptor the VMM inherits:
/// `path=<file>` (or just the path) or `fd=<n>` (`--api-socket`,
/// `--event-monitor`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PathOrFd {
    Path(PathBuf),
    Fd(i32),
}

/// `--api-socket`: a socket path, or a listening Unix socket inherited.
pub type ApiSocketConfig = PathOrFd;
/// `--event-monitor`: a file, or a descriptor inherited.
pub type EventMonitorConfig = PathOrFd;

impl PathOrFd {
    pub fn parse(option: &'static str, s: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(option, s, &["path", "fd"], Some("path"))?;
        match (p.get("path"), p.get("fd")) {
            (Some(path), None) if !path.is_empty() => Ok(PathOrFd::Path(PathBuf::from(path))),
            (None, Some(_)) => {
                let fd = p.number("fd", 0)?;
                i32::try_from(fd)
                    .map(PathOrFd::Fd)
                    .map_err(|_| ConfigError::InvalidValue {
                        option,
                        key: "fd",
                        value: fd.to_string(),
                        reason: "not a file descriptor".into(),
                    })
            }
            (Some(_), Some(_)) => Err(ConfigError::InvalidValue {
                option,
                key: "path",
                value: s.to_string(),
                reason: "give path or fd, not both".into(),
            }),
            _ => Err(ConfigError::MissingKey {
                option,
                key: "path",
            }),
        }
    }
}

/// Where the serial port (or console) goes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OutputConfig {
    Off,
    Tty,
    File(PathBuf),
}

impl OutputConfig {
    pub fn parse(option: &'static str, s: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(option, s, &["mode", "file"], Some("mode"))?;
        match (p.get("mode"), p.get("file")) {
            (None, Some(f)) | (Some("file"), Some(f)) => Ok(OutputConfig::File(PathBuf::from(f))),
            (Some("off"), None) | (Some("null"), None) => Ok(OutputConfig::Off),
            (Some("tty"), None) => Ok(OutputConfig::Tty),
            (Some(m), _) => Err(p.invalid("mode", m, "expected tty, off or file=PATH")),
            (None, None) => Err(ConfigError::MissingKey {
                option,
                key: "mode",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12X"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn disk_options() {
        let d = DiskConfig::parse("path=/a.img,readonly=on,id=d0").unwrap();
        assert_eq!(d.path, PathBuf::from("/a.img"));
        assert!(d.readonly);
        assert_eq!(d.id.as_deref(), Some("d0"));
        assert!(!d.iommu);
        assert!(DiskConfig::parse("path=/a,iommu=on").unwrap().iommu);
        assert!(DiskConfig::parse("path=/a,iommu=yes").is_err());
        assert!(matches!(
            DiskConfig::parse("path=/a,bogus=1"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            DiskConfig::parse("readonly=on"),
            Err(ConfigError::MissingKey { key: "path", .. })
        ));
        assert!(matches!(
            DiskConfig::parse("path=/a,readonly=maybe"),
            Err(ConfigError::InvalidValue { .. })
        ));
        assert!(matches!(
            DiskConfig::parse("path=/a,path=/b"),
            Err(ConfigError::DuplicateKey { .. })
        ));
    }

    #[test]
    fn cpus_and_memory() {
        assert_eq!(CpusConfig::parse("boot=2").unwrap().boot, 2);
        assert!(CpusConfig::parse("boot=0").is_err());
        assert!(CpusConfig::parse("boot=x").is_err());
        assert_eq!(MemoryConfig::parse("size=1G").unwrap().size, 1 << 30);
        assert!(MemoryConfig::parse("size=1X").is_err());
        assert!(MemoryConfig::parse("size=1M").is_err());
    }

    #[test]
    fn serial_modes() {
        assert_eq!(
            OutputConfig::parse("--serial", "tty").unwrap(),
            OutputConfig::Tty
        );
        assert_eq!(
            OutputConfig::parse("--serial", "off").unwrap(),
            OutputConfig::Off
        );
        assert_eq!(
            OutputConfig::parse("--serial", "file=/tmp/x").unwrap(),
            OutputConfig::File(PathBuf::from("/tmp/x"))
        );
        assert!(OutputConfig::parse("--serial", "pty").is_err());
    }
}

/// The member device type of a virtio-pf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MemberType {
    Block,
}

/// The most VFs one virtio-pf may have.
pub const MAX_TOTAL_VFS: u64 = 64;

/// The admin command set of a virtio-pf (`admin=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AdminDialect {
    /// The v2 draft (docs/admin-commands.md, "draft").
    #[default]
    #[serde(rename = "draft")]
    Draft,
    /// The published virtio 1.4 device parts commands, as Linux's
    /// virtio_vfio_pci sends them.
    #[serde(rename = "virtio-1.4")]
    V14,
}

/// `--device virtio-pf,id=NAME,member=blk,total_vfs=N,disk=PF.img,vf_disk=PATTERN[,admin=draft|virtio-1.4]`.
///
/// `vf_disk` names each VF's backing file; `%n` in it is replaced by the VF
/// number (1..N). Without `%n` every VF shares the one file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioPfConfig {
    pub id: Option<String>,
    pub member: MemberType,
    pub total_vfs: u16,
    pub disk: PathBuf,
    pub vf_disk: String,
    pub readonly: bool,
    /// Older snapshots have no `admin` and spoke the draft.
    #[serde(default)]
    pub admin: AdminDialect,
    /// The PF and its VFs behind the virtio-iommu (older snapshots: off).
    #[serde(default)]
    pub iommu: bool,
}

impl VirtioPfConfig {
    /// The backing file of VF `n` (1-based).
    pub fn vf_disk_path(&self, n: u16) -> PathBuf {
        PathBuf::from(self.vf_disk.replace("%n", &n.to_string()))
    }
}

/// A `--device` option.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceConfig {
    VirtioPf(VirtioPfConfig),
}

impl DeviceConfig {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let (kind, rest) = s.split_once(',').unwrap_or((s, ""));
        match kind {
            "virtio-pf" => Ok(DeviceConfig::VirtioPf(Self::parse_pf(rest)?)),
            other => Err(ConfigError::InvalidValue {
                option: "--device",
                key: "type",
                value: other.to_string(),
                reason: "the only device type is virtio-pf (e.g. --device virtio-pf,total_vfs=4,disk=pf.img,vf_disk=vf%n.img)".into(),
            }),
        }
    }

    fn parse_pf(s: &str) -> Result<VirtioPfConfig, ConfigError> {
        let p = OptionParser::parse(
            "--device virtio-pf",
            s,
            &[
                "id",
                "member",
                "total_vfs",
                "disk",
                "vf_disk",
                "readonly",
                "admin",
                "iommu",
            ],
            None,
        )?;
        let member = match p.get("member").unwrap_or("blk") {
            "blk" | "block" => MemberType::Block,
            m => return Err(p.invalid("member", m, "the only member type is blk")),
        };
        let total = p.number("total_vfs", 4)?;
        if total == 0 || total > MAX_TOTAL_VFS {
            return Err(p.invalid(
                "total_vfs",
                p.get("total_vfs").unwrap_or(""),
                format!("must be 1..{MAX_TOTAL_VFS}"),
            ));
        }
        let disk = PathBuf::from(p.required("disk")?);
        let vf_disk = p.required("vf_disk")?.to_string();
        let admin = match p.get("admin").unwrap_or("draft") {
            "draft" => AdminDialect::Draft,
            "virtio-1.4" | "1.4" => AdminDialect::V14,
            a => {
                return Err(p.invalid(
                    "admin",
                    a,
                    "the admin command sets are draft and virtio-1.4",
                ))
            }
        };
        Ok(VirtioPfConfig {
            id: p.get("id").map(str::to_string),
            member,
            total_vfs: total as u16,
            disk,
            vf_disk,
            readonly: p.toggle("readonly", false)?,
            admin,
            iommu: p.toggle("iommu", false)?,
        })
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;

    #[test]
    fn virtio_pf_options() {
        let DeviceConfig::VirtioPf(c) = DeviceConfig::parse(
            "virtio-pf,id=pf0,member=blk,total_vfs=8,disk=pf.img,vf_disk=d/vf%n.img",
        )
        .unwrap();
        assert_eq!(c.total_vfs, 8);
        assert_eq!(c.id.as_deref(), Some("pf0"));
        assert_eq!(c.vf_disk_path(3), PathBuf::from("d/vf3.img"));
        let DeviceConfig::VirtioPf(shared) =
            DeviceConfig::parse("virtio-pf,disk=a,vf_disk=shared.img").unwrap();
        assert_eq!(shared.vf_disk_path(1), shared.vf_disk_path(2));
        assert!(!shared.iommu);
        let DeviceConfig::VirtioPf(behind) =
            DeviceConfig::parse("virtio-pf,disk=a,vf_disk=b,iommu=on").unwrap();
        assert!(behind.iommu);
        assert!(DeviceConfig::parse("virtio-pf,disk=a,vf_disk=b,total_vfs=0").is_err());
        assert!(DeviceConfig::parse("virtio-pf,disk=a,vf_disk=b,total_vfs=65").is_err());
        assert!(DeviceConfig::parse("virtio-pf,disk=a,vf_disk=b,colour=red").is_err());
        assert!(DeviceConfig::parse("virtio-pf,disk=a,vf_disk=b,member=net").is_err());
        assert!(DeviceConfig::parse("vfio,path=/x").is_err());
        assert!(DeviceConfig::parse("virtio-pf,vf_disk=b").is_err());
    }

    #[test]
    fn virtio_pf_admin_dialect() {
        let parse = |s: &str| match DeviceConfig::parse(s) {
            Ok(DeviceConfig::VirtioPf(c)) => Ok(c.admin),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(parse("virtio-pf,disk=a,vf_disk=b"), Ok(AdminDialect::Draft));
        assert_eq!(
            parse("virtio-pf,disk=a,vf_disk=b,admin=virtio-1.4"),
            Ok(AdminDialect::V14)
        );
        assert_eq!(
            parse("virtio-pf,disk=a,vf_disk=b,admin=draft"),
            Ok(AdminDialect::Draft)
        );
        let e = parse("virtio-pf,disk=a,vf_disk=b,admin=1.5").unwrap_err();
        assert!(e.contains("admin") && e.contains("virtio-1.4"), "{e}");
        // A config saved before the key existed (snapshot config.json).
        let old: VirtioPfConfig = serde_json::from_str(
            r#"{"id":null,"member":"Block","total_vfs":2,"disk":"a","vf_disk":"b","readonly":false}"#,
        )
        .unwrap();
        assert_eq!(old.admin, AdminDialect::Draft);
        let json = serde_json::to_string(&VirtioPfConfig {
            admin: AdminDialect::V14,
            ..old
        })
        .unwrap();
        assert!(json.contains(r#""admin":"virtio-1.4""#), "{json}");
    }
}

#[cfg(test)]
mod api_socket_tests {
    use super::*;

    #[test]
    fn api_socket_takes_a_path_or_an_fd() {
        assert_eq!(
            PathOrFd::parse("--api-socket", "/run/ch.sock").unwrap(),
            PathOrFd::Path("/run/ch.sock".into())
        );
        assert_eq!(
            PathOrFd::parse("--api-socket", "path=/run/ch.sock").unwrap(),
            PathOrFd::Path("/run/ch.sock".into())
        );
        assert_eq!(
            PathOrFd::parse("--api-socket", "fd=3").unwrap(),
            PathOrFd::Fd(3)
        );
        for bad in ["", "fd=x", "path=/a,fd=3", "fd=99999999999", "port=1"] {
            assert!(PathOrFd::parse("--api-socket", bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            PathOrFd::parse("--event-monitor", "path=/tmp/ev").unwrap(),
            PathOrFd::Path("/tmp/ev".into())
        );
        assert_eq!(
            PathOrFd::parse("--event-monitor", "fd=4").unwrap(),
            PathOrFd::Fd(4)
        );
    }
}
