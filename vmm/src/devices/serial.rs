//! COM1: a 16550A from vm-superio, its interrupt delivered through an irqfd
//! on GSI 4.

use std::io::Write;

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

/// Output that is flushed after every write so a guest's console output
/// is never held back in a buffer when the VMM exits.
pub struct FlushingWriter<W: Write>(pub W);

impl<W: Write> Write for FlushingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
