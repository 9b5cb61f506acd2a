//! COM1: a 16550A from vm-superio, its interrupt delivered through an irqfd
//! on GSI 4.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vm_migration::{MigratableError, Snapshottable};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the serial IRQ by signalling an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The serial port at 0x3F8.
pub struct SerialPort {
    inner: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

/// The registers and pending input of the 16550A, as a snapshot saves them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl SerialPort {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialPort {
            inner: Serial::new(EventFdTrigger(irq), out),
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.inner.write(offset, value) {
            log::warn!("serial write at offset {offset}: {e:?}");
        }
    }

    /// Feeds host input to the guest.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        if let Err(e) = self.inner.enqueue_raw_bytes(bytes) {
            log::debug!("serial input dropped: {e:?}");
        }
    }
}

/// COM1 saves its registers and unread input; a restore keeps the port's
/// interrupt and output.
impl Snapshottable for SerialPort {
    type State = SerialSnapshot;

    /// The registers and pending input.
    fn snapshot(&self) -> Result<SerialSnapshot, MigratableError> {
        Ok(self.inner.state().into())
    }

    /// Puts the port in a saved state (restore), keeping its interrupt and
    /// output. The state is checked by vm-superio (an input buffer longer
    /// than its FIFO is refused; the port then writes nowhere).
    fn restore(&mut self, state: &SerialSnapshot) -> Result<(), MigratableError> {
        let irq = || {
            self.inner.interrupt_evt().0.try_clone().map_err(|e| {
                MigratableError::restore("COM1", format!("cannot clone its eventfd: {e}"))
            })
        };
        let (a, b) = (irq()?, irq()?);
        let sink: Box<dyn Write + Send> = Box::new(std::io::sink());
        let old = std::mem::replace(&mut self.inner, Serial::new(EventFdTrigger(a), sink));
        self.inner = Serial::from_state(
            &SerialState::from(state),
            EventFdTrigger(b),
            vm_superio::serial::NoEvents,
            old.into_writer(),
        )
        .map_err(|e| MigratableError::restore("COM1", format!("{e:?}")))?;
        Ok(())
    }
}

/// Most bytes of guest console output held while the host side is slow.
pub const OUTPUT_BUFFER: usize = 4 << 20;

struct OutputQueue {
    bytes: std::collections::VecDeque<u8>,
    dropped: u64,
    closed: bool,
}

struct OutputShared {
    queue: Mutex<OutputQueue>,
    ready: Condvar,
    /// Signalled whenever the writer thread empties the queue.
    drained: Condvar,
}

fn lock_queue(s: &OutputShared) -> MutexGuard<'_, OutputQueue> {
    s.queue.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long the end of a partial console line is waited for before the
/// part goes out on its own.
const LINE_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
/// A partial line this long goes out without waiting for its end.
const LINE_MAX: usize = 64 * 1024;

/// Guest console output that never blocks the vCPU writing it: bytes go
/// into a queue (at most [`OUTPUT_BUFFER`] of them; beyond that they are
/// counted and dropped, and the count is written to the output as soon as
/// there is room) and a writer thread writes and flushes them to the real
/// output. A slow or stuck host terminal then delays only that thread, not
/// the vCPU nor the other vCPUs waiting for the serial port's lock. The
/// thread writes whole lines where it can (see [`LINE_WAIT`]).
#[derive(Clone)]
pub struct BufferedOutput {
    shared: Arc<OutputShared>,
}

/// The writer thread of a [`BufferedOutput`].
pub struct OutputThread {
    shared: Arc<OutputShared>,
    handle: Option<JoinHandle<()>>,
}

impl BufferedOutput {
    /// Starts the writer thread over `out`.
    pub fn spawn(mut out: Box<dyn Write + Send>) -> std::io::Result<(Self, OutputThread)> {
        let shared = Arc::new(OutputShared {
            queue: Mutex::new(OutputQueue {
                bytes: std::collections::VecDeque::new(),
                dropped: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            drained: Condvar::new(),
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("serial-output".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::SerialOutput);
                loop {
                let (chunk, dropped, closed) = {
                    let mut q = lock_queue(&s);
                    while q.bytes.is_empty() && q.dropped == 0 && !q.closed {
                        q = s.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                    }
                    // Whole lines: one write of complete lines cannot be
                    // interleaved with another writer of the same terminal
                    // in mid-line. A partial line waits a moment for its
                    // end, then goes out as it is.
                    let deadline = std::time::Instant::now() + LINE_WAIT;
                    while !q.closed
                        && q.dropped == 0
                        && q.bytes.len() < LINE_MAX
                        && !q.bytes.contains(&b'\n')
                    {
                        let now = std::time::Instant::now();
                        if now >= deadline {
                            break;
                        }
                        q = match s.ready.wait_timeout(q, deadline - now) {
                            Ok((g, _)) => g,
                            Err(e) => e.into_inner().0,
                        };
                    }
                    let take = if q.closed || q.dropped > 0 {
                        q.bytes.len()
                    } else {
                        q.bytes
                            .iter()
                            .rposition(|&b| b == b'\n')
                            .map_or(q.bytes.len(), |i| i + 1)
                    };
                    let chunk: Vec<u8> = q.bytes.drain(..take).collect();
                    (chunk, std::mem::take(&mut q.dropped), q.closed)
                };
                let mut ok = out.write_all(&chunk).is_ok();
                if dropped > 0 {
                    let note = format!("\n[cloud-hypervisor: {dropped} bytes of console output dropped: the output was too slow]\n");
                    ok &= out.write_all(note.as_bytes()).is_ok();
                }
                ok &= out.flush().is_ok();
                if !ok {
                    log::debug!("serial output: write failed");
                }
                let q = lock_queue(&s);
                if q.bytes.is_empty() {
                    s.drained.notify_all();
                    if closed || q.closed {
                        return;
                    }
                }
                }
            })?;
        Ok((
            BufferedOutput {
                shared: shared.clone(),
            },
            OutputThread {
                shared,
                handle: Some(handle),
            },
        ))
    }
}

impl Write for BufferedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut q = lock_queue(&self.shared);
        let room = OUTPUT_BUFFER.saturating_sub(q.bytes.len());
        let n = buf.len().min(room);
        q.bytes.extend(&buf[..n]);
        q.dropped += (buf.len() - n) as u64;
        drop(q);
        self.shared.ready.notify_one();
        // Dropped bytes are accounted for, not an error to the guest.
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl OutputThread {
    /// Writes out what is queued and ends the thread, waiting at most
    /// `limit` for the output to take it. Returns whether everything was
    /// written.
    pub fn finish(mut self, limit: std::time::Duration) -> bool {
        self.close(limit)
    }

    fn close(&mut self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut q = lock_queue(&self.shared);
        q.closed = true;
        self.shared.ready.notify_one();
        while !q.bytes.is_empty() {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            q = match self.shared.drained.wait_timeout(q, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        drop(q);
        // The thread returns once it sees the queue empty and closed; if
        // it is blocked in a write, do not wait for it.
        if let Some(h) = self.handle.take() {
            let until = std::time::Instant::now() + std::time::Duration::from_millis(200);
            while !h.is_finished() && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        true
    }
}

impl Drop for OutputThread {
    /// An early return (an error while building the VM) still writes out
    /// what the guest printed.
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.close(std::time::Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Registers and unread input survive a snapshot into a fresh port,
    /// which keeps writing to its own output.
    #[test]
    fn a_port_restores_its_registers_and_unread_input() {
        let irq = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut a = SerialPort::new(irq(), Box::new(std::io::sink()));
        a.write(7, 0x5a); // scratch
        a.write(3, 0x03); // 8N1
        a.write(1, 0x01); // receive interrupt enabled
        a.enqueue_input(b"hi");
        let st = Snapshottable::snapshot(&a).unwrap();
        let (tx, rx) = mpsc::channel();
        struct Out(mpsc::Sender<u8>);
        impl Write for Out {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                for b in buf {
                    let _ = self.0.send(*b);
                }
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut b = SerialPort::new(irq(), Box::new(Out(tx)));
        Snapshottable::restore(&mut b, &st).unwrap();
        assert_eq!(b.read(7), 0x5a);
        assert_eq!(b.read(3), 0x03);
        assert_eq!(b.read(1), 0x01);
        assert_eq!((b.read(0), b.read(0)), (b'h', b'i'));
        b.write(0, b'!');
        assert_eq!(rx.try_recv(), Ok(b'!'));
        assert_eq!(Snapshottable::snapshot(&a).unwrap(), st);
    }

    /// An output that blocks every write until the test lets it go.
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        got: mpsc::Sender<Vec<u8>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (m, c) = &*self.open;
            let mut open = m.lock().unwrap();
            while !*open {
                open = c.wait(open).unwrap();
            }
            let _ = self.got.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_output_does_not_block_the_writer() {
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let gate = Gate {
            open: open.clone(),
            got: tx,
        };
        let (mut w, thread) = BufferedOutput::spawn(Box::new(gate)).unwrap();
        let t0 = Instant::now();
        for i in 0..1000u32 {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        // More than the buffer holds: the excess is dropped, not waited for.
        w.write_all(&vec![b'x'; OUTPUT_BUFFER + 10]).unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "writes waited for the output: {:?}",
            t0.elapsed()
        );
        *open.0.lock().unwrap() = true;
        open.1.notify_all();
        assert!(thread.finish(Duration::from_secs(10)));
        let all: Vec<u8> = rx.try_iter().flatten().collect();
        let text = String::from_utf8_lossy(&all);
        assert!(text.starts_with("line 0\nline 1\n"), "{}", &text[..40]);
        assert!(text.contains("line 999\n"));
        assert!(
            text.contains("bytes of console output dropped"),
            "no drop note"
        );
    }

    #[test]
    fn finish_gives_up_on_an_output_that_never_takes_bytes() {
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, _rx) = mpsc::channel();
        let (mut w, thread) = BufferedOutput::spawn(Box::new(Gate { open, got: tx })).unwrap();
        w.write_all(b"stuck\n").unwrap();
        // Wait until the thread has taken the bytes and is blocked.
        std::thread::sleep(Duration::from_millis(50));
        w.write_all(b"more\n").unwrap();
        let t0 = Instant::now();
        assert!(!thread.finish(Duration::from_millis(200)));
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    /// A line the guest writes in pieces goes out in one write once its
    /// end arrives; a partial line goes out on its own after LINE_WAIT.
    #[test]
    fn whole_lines_go_out_in_one_write() {
        let open = Arc::new((Mutex::new(true), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let (mut w, thread) = BufferedOutput::spawn(Box::new(Gate { open, got: tx })).unwrap();
        w.write_all(b"@@T:BE").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        w.write_all(b"AT=10 24.68@@\npar").unwrap();
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(first, b"@@T:BEAT=10 24.68@@\n");
        let t0 = Instant::now();
        let rest = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(rest, b"par");
        assert!(t0.elapsed() >= LINE_WAIT / 2, "{:?}", t0.elapsed());
        assert!(thread.finish(Duration::from_secs(5)));
    }
}
