//! A minimal writer for the "newc" cpio format that Linux unpacks as an
//! initramfs. The runner appends one such archive (uncompressed) after a
//! prebuilt compressed one; Linux unpacks concatenated archives in order, a
//! later file replacing an earlier one of the same name.

use std::collections::BTreeSet;

/// Builds an uncompressed newc archive in memory.
#[derive(Default)]
pub struct CpioWriter {
    buf: Vec<u8>,
    dirs: BTreeSet<String>,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        CpioWriter {
            next_ino: 1000,
            ..Default::default()
        }
    }

    fn header(&mut self, name: &str, mode: u32, size: usize) {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
        // devminor, rdevmajor, rdevminor, namesize, check
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            u32::try_from(size).expect("cpio member larger than 4 GiB"),
            0,
            0,
            0,
            0,
            u32::try_from(name.len() + 1).expect("name too long"),
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
    }

    fn pad4(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Adds a directory and its parents (each once). `path` has no leading '/'.
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_string());
        self.header(path, S_IFDIR | 0o755, 0);
    }

    /// Adds a regular file, creating its parent directories.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.header(path, S_IFREG | (mode & 0o7777), data.len());
        self.buf.extend_from_slice(data);
        self.pad4();
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0);
        // Block-align, as cpio(1) does.
        while !self.buf.len().is_multiple_of(512) {
            self.buf.push(0);
        }
        self.buf
    }
}

/// `base` (a compressed or plain archive) followed by `extra`, with the zero
/// padding that Linux requires between concatenated archives (each must start
/// at a 4-byte aligned offset; zero bytes between archives are skipped).
pub fn concat(base: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(base.len() + extra.len() + 512);
    out.extend_from_slice(base);
    while !out.len().is_multiple_of(512) {
        out.push(0);
    }
    out.extend_from_slice(extra);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut w = CpioWriter::new();
        w.file("a/b/c.sh", 0o755, b"echo hi\n");
        let bytes = w.finish();
        assert_eq!(bytes.len() % 512, 0);
        // Parent directories come first.
        let text = String::from_utf8_lossy(&bytes);
        let a = text.find("a\0").unwrap();
        let ab = text.find("a/b\0").unwrap();
        let c = text.find("a/b/c.sh\0").unwrap();
        assert!(a < ab && ab < c);
        assert!(text.contains("TRAILER!!!"));
        // Every header starts at a 4-byte boundary.
        for (i, _) in text.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
        // The file's mode field.
        let hdr = &text[text.rfind("070701").unwrap()..];
        assert!(hdr.starts_with("070701"));
        let file_hdr_start = c - 110;
        assert_eq!(&text[file_hdr_start + 14..file_hdr_start + 22], "000081ed");
        assert_eq!(&text[file_hdr_start + 54..file_hdr_start + 62], "00000008");
    }

    #[test]
    fn concat_aligns() {
        let out = concat(&[1, 2, 3], &[9; 4]);
        assert_eq!(out.len(), 516);
        assert_eq!(&out[512..], &[9; 4]);
    }
}
