//! Tools built on the host for the inner guest: `vpfctl`, the userspace
//! owner of the virtio-pf PF, as a static, stripped x86_64 binary.
//!
//! Built once per test process with
//! `cargo build --release -p vpfctl --target x86_64-unknown-linux-gnu`,
//! `RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols"`, into its own
//! target directory (`target/guest`, or `$CH_GUEST_TOOLS_TARGET_DIR`) so that
//! it neither fights over the lock of the VMM's target/ nor rebuilds the
//! host's artifacts with other flags. Cargo's own freshness check is the
//! cache: a second run costs a second. `$CH_VPFCTL` names a prebuilt binary
//! instead (it must be static: the inner guest has no glibc).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::host::repo_root;

/// The Rust target the guest binaries are built for.
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Flags of the guest build: static (the guest has no C library) and
/// without symbols (the initramfs is unpacked under TCG: smaller is faster).
pub const GUEST_RUSTFLAGS: &str = "-C target-feature=+crt-static -C strip=symbols";

/// The target directory of guest builds.
pub fn guest_target_dir() -> PathBuf {
    std::env::var_os("CH_GUEST_TOOLS_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target").join("guest"))
}

/// The bytes of the static `vpfctl` for the guest; built once per process.
/// Panics with the build's output when the build fails or the result is not
/// a static executable (a test cannot go on without it).
pub fn vpfctl() -> Vec<u8> {
    let p = vpfctl_path();
    std::fs::read(&p)
        .unwrap_or_else(|e| panic!("cannot read the guest vpfctl {}: {e}", p.display()))
}

/// The path of the static `vpfctl` for the guest (built as [`vpfctl`]).
pub fn vpfctl_path() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(build_vpfctl).clone() {
        Ok(p) => p,
        Err(why) => panic!("cannot build vpfctl for the guest: {why}"),
    }
}

fn build_vpfctl() -> Result<PathBuf, String> {
    let bin = if let Some(bin) = std::env::var_os("CH_VPFCTL") {
        PathBuf::from(bin)
    } else {
        let target = guest_target_dir();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo_root())
            .env("CARGO_TARGET_DIR", &target)
            .env("RUSTFLAGS", GUEST_RUSTFLAGS)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .args([
                "build",
                "--release",
                "-p",
                "vpfctl",
                "--bin",
                "vpfctl",
                "--target",
                GUEST_TARGET,
            ]);
        let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
        if !out.status.success() {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let lines: Vec<&str> = text.lines().collect();
            return Err(format!(
                "CARGO_TARGET_DIR={} RUSTFLAGS='{GUEST_RUSTFLAGS}' cargo build --release -p vpfctl --target {GUEST_TARGET} exited with {}:\n{}",
                target.display(),
                out.status,
                lines[lines.len().saturating_sub(40)..].join("\n")
            ));
        }
        target.join(GUEST_TARGET).join("release").join("vpfctl")
    };
    let bytes = std::fs::read(&bin).map_err(|e| format!("reading {}: {e}", bin.display()))?;
    check_static_elf(&bytes).map_err(|why| format!("{}: {why}", bin.display()))?;
    Ok(bin)
}

/// Checks that `bytes` is an x86_64 ELF executable without an interpreter
/// (PT_INTERP): a dynamically linked binary would not run in the guest.
pub fn check_static_elf(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(b)
    };
    if u16_at(18) != 62 {
        return Err("not an x86_64 ELF file".into());
    }
    let phoff = u64_at(32) as usize;
    let phentsize = u16_at(54) as usize;
    let phnum = u16_at(56) as usize;
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > bytes.len() {
            return Err("truncated program headers".into());
        }
        if u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) == 3 {
            return Err("dynamically linked (has PT_INTERP); the guest has no C library".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_elf_check() {
        assert!(check_static_elf(b"#!/bin/sh\n").is_err());
        // This test binary is linked dynamically (host target, no crt-static).
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(check_static_elf(&me).unwrap_err().contains("PT_INTERP"));
        // A minimal static header: no program headers.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18] = 62;
        assert!(check_static_elf(&elf).is_ok());
        elf[18] = 3;
        assert!(check_static_elf(&elf).is_err());
    }
}
