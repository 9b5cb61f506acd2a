//! `disk-pattern`: checksummed writes and read-backs on a block device
//! through the kernel's own driver, one block at a time — the workload of
//! a guest whose disk is a VF passed through to it (the nested migration
//! scenario's L2, docs/nested-migration.md), where starting a process per
//! I/O would cost seconds.
//!
//! Write `seq` goes to block `seq % blocks` and fills it with the line
//! `seq=SEQ blk=BLK\n` repeated. Each write is read back and compared.
//! One line per step on the output, flushed as it happens:
//!
//! ```text
//! W SEQ BLK SUM        before the write (SUM: FNV-1a 64 of the block)
//! OK SEQ               the block read back equals what was written
//! BAD SEQ BLK SUM      it does not (SUM of what was read)
//! ERR SEQ write|read MESSAGE
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// Alignment of the I/O buffer (O_DIRECT needs the logical block size;
/// a page covers every device).
const ALIGN: usize = 4096;

/// The contents of block `blk` after write `seq`.
pub fn block_pattern(seq: u64, blk: u64, size: usize) -> Vec<u8> {
    let line = format!("seq={seq} blk={blk}\n");
    line.bytes().cycle().take(size).collect()
}

/// FNV-1a, 64 bits.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What to run.
#[derive(Clone, Debug)]
pub struct PatternOpts {
    pub blocks: u64,
    pub block_size: usize,
    /// Writes to do (0: until the process is killed).
    pub writes: u64,
    /// Open with O_DIRECT (the page cache would answer the read-back).
    pub direct: bool,
}

/// A buffer of `len` bytes aligned to [`ALIGN`], inside a larger vector.
struct Aligned {
    buf: Vec<u8>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let buf = vec![0u8; len + ALIGN];
        let at = buf.as_ptr().align_offset(ALIGN);
        Aligned { buf, at, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.buf[self.at..self.at + self.len]
    }
}

fn open(dev: &Path, direct: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(dev).map_err(|source| Error::Io {
        what: "open",
        path: dev.to_path_buf(),
        source,
    })
}

/// Runs the workload on `dev`, logging to `out`; returns the number of
/// writes read back intact. An I/O error or a mismatch is logged and the
/// run goes on (the log is what the caller checks); only a failure to
/// open the device or to write the log ends it.
pub fn run(dev: &Path, o: &PatternOpts, out: &mut dyn Write) -> Result<u64> {
    if o.blocks == 0 || o.block_size == 0 || !o.block_size.is_multiple_of(512) {
        return Err(Error::Usage(format!(
            "disk-pattern: --blocks must be > 0 and --block-size a multiple of 512 (got {} and {})",
            o.blocks, o.block_size
        )));
    }
    let f = open(dev, o.direct)?;
    let mut buf = Aligned::new(o.block_size);
    let log = |out: &mut dyn Write, line: String| -> Result<()> {
        writeln!(out, "{line}")
            .and_then(|_| out.flush())
            .map_err(|source| Error::Sys {
                call: "writing the disk-pattern log".into(),
                source,
            })
    };
    let mut ok = 0;
    let mut seq = 0u64;
    while o.writes == 0 || seq < o.writes {
        let blk = seq % o.blocks;
        let at = blk * o.block_size as u64;
        let want = block_pattern(seq, blk, o.block_size);
        log(out, format!("W {seq} {blk} {:016x}", fnv1a(&want)))?;
        buf.get().copy_from_slice(&want);
        if let Err(e) = f.write_all_at(buf.get(), at) {
            log(out, format!("ERR {seq} write {e}"))?;
        } else {
            buf.get().fill(0);
            match f.read_exact_at(buf.get(), at) {
                Err(e) => log(out, format!("ERR {seq} read {e}"))?,
                Ok(()) if buf.get() == want.as_slice() => {
                    ok += 1;
                    log(out, format!("OK {seq}"))?;
                }
                Ok(()) => {
                    let got = fnv1a(buf.get());
                    log(out, format!("BAD {seq} {blk} {got:016x}"))?;
                }
            }
        }
        seq += 1;
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_lines_repeat_to_the_block_size() {
        let b = block_pattern(7, 3, 40);
        assert_eq!(b.len(), 40);
        assert!(b.starts_with(b"seq=7 blk=3\nseq=7 blk=3\n"));
        assert_ne!(fnv1a(&b), fnv1a(&block_pattern(8, 3, 40)));
    }

    #[test]
    fn writes_read_back_and_leave_each_blocks_last_write() {
        let path = std::env::temp_dir().join(format!("vpfctl-disk-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4 * 1024]).unwrap();
        let mut out = Vec::new();
        let o = PatternOpts {
            blocks: 2,
            block_size: 1024,
            writes: 5,
            direct: false,
        };
        let ok = run(&path, &o, &mut out).unwrap();
        assert_eq!(ok, 5);
        let log = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 10);
        assert!(lines[0].starts_with("W 0 0 "), "{log}");
        assert_eq!(lines[9], "OK 4");
        let disk = std::fs::read(&path).unwrap();
        assert_eq!(&disk[..1024], block_pattern(4, 0, 1024).as_slice());
        assert_eq!(&disk[1024..2048], block_pattern(3, 1, 1024).as_slice());
        assert!(disk[2048..].iter().all(|&b| b == 0));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_bad_geometry_is_a_usage_error() {
        let o = PatternOpts {
            blocks: 4,
            block_size: 1000,
            writes: 1,
            direct: false,
        };
        let err = run(Path::new("/nonexistent"), &o, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("multiple of 512"), "{err}");
    }
}
