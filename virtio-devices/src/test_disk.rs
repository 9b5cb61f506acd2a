//! A disk for tests: in memory, with a gate that stalls every request
//! until opened, and faults (read and write errors, a full disk).

use std::io::{Error, ErrorKind};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::block::DiskBackend;

/// What the disk does wrong.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Nothing.
    #[default]
    None,
    /// Every read and write fails with EIO.
    Io,
    /// Writes fail with ENOSPC (a backing file that ran out of space);
    /// reads work.
    NoSpace,
}

struct State {
    data: Vec<u8>,
    open: bool,
    fault: Fault,
    /// Requests that are waiting at the gate now.
    waiting: usize,
    /// Reads and writes that reached the disk.
    ops: u64,
}

/// An in-memory [`DiskBackend`].
pub struct TestDisk {
    state: Mutex<State>,
    changed: Condvar,
}

impl TestDisk {
    /// A disk of `len` zero bytes, gate open, no fault.
    pub fn new(len: usize) -> Self {
        TestDisk {
            state: Mutex::new(State {
                data: vec![0; len],
                open: true,
                fault: Fault::None,
                waiting: 0,
                ops: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens or closes the gate: while closed, every read, write and flush
    /// waits.
    pub fn set_open(&self, open: bool) {
        self.lock().open = open;
        self.changed.notify_all();
    }

    /// Sets the fault.
    pub fn set_fault(&self, fault: Fault) {
        self.lock().fault = fault;
    }

    /// Requests waiting at the closed gate.
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// Waits (up to 10 s) until `n` requests wait at the gate.
    pub fn wait_for_waiting(&self, n: usize) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut st = self.lock();
        while st.waiting < n {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            st = match self.changed.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }

    /// Reads and writes that reached the disk.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    fn pass_gate(&self) -> MutexGuard<'_, State> {
        let mut st = self.lock();
        if !st.open {
            st.waiting += 1;
            self.changed.notify_all();
            while !st.open {
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.waiting -= 1;
        }
        st.ops += 1;
        st
    }
}

fn range(len: usize, offset: u64, n: usize) -> std::io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| Error::from(ErrorKind::InvalidInput))?;
    let end = start
        .checked_add(n)
        .filter(|&e| e <= len)
        .ok_or_else(|| Error::from(ErrorKind::UnexpectedEof))?;
    Ok(start..end)
}

impl DiskBackend for TestDisk {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.lock().data.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let st = self.pass_gate();
        if st.fault == Fault::Io {
            return Err(Error::from_raw_os_error(libc::EIO));
        }
        let r = range(st.data.len(), offset, buf.len())?;
        buf.copy_from_slice(&st.data[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut st = self.pass_gate();
        match st.fault {
            Fault::Io => return Err(Error::from_raw_os_error(libc::EIO)),
            Fault::NoSpace => return Err(Error::from_raw_os_error(libc::ENOSPC)),
            Fault::None => {}
        }
        let r = range(st.data.len(), offset, buf.len())?;
        st.data[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        let st = self.pass_gate();
        match st.fault {
            Fault::None => Ok(()),
            _ => Err(Error::from_raw_os_error(libc::EIO)),
        }
    }
}
