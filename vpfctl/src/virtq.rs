//! Driver side of a split virtqueue in [`Mem`]: descriptor allocation,
//! publishing chains on the available ring, and consuming the used ring by
//! polling. Layout: descriptor table, available ring and used ring each on
//! their own 4 KiB page (queue size at most 256), so each is physically
//! contiguous and the used ring is exactly one page (which makes the
//! device's ring writes easy to spot in write records).

use crate::dma::{mb, Mem, PAGE};
use crate::error::{Error, Result};

/// Pages one queue's rings take.
pub const RING_PAGES: usize = 3;
/// Largest queue size this layout supports.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Descriptor flag: chain continues.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Available ring flag: no interrupts wanted (we poll).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// A buffer of a chain: a byte range of the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Offset in the memory.
    pub off: usize,
    /// Length in bytes.
    pub len: usize,
    /// Device-writable.
    pub write: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn r(off: usize, len: usize) -> Buf {
        Buf {
            off,
            len,
            write: false,
        }
    }
    /// A device-writable buffer.
    pub fn w(off: usize, len: usize) -> Buf {
        Buf {
            off,
            len,
            write: true,
        }
    }
}

/// One used ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor of the completed chain.
    pub id: u16,
    /// Bytes the device wrote.
    pub len: u32,
}

/// A split virtqueue's driver-side state.
#[derive(Debug)]
pub struct SplitQueue {
    size: u16,
    base: usize,
    free: Vec<u16>,
    chains: Vec<Vec<u16>>,
    next_avail: u16,
    last_used: u16,
    in_flight: usize,
}

impl SplitQueue {
    /// Set up a queue of `size` entries whose rings start at page-aligned
    /// offset `base` of `mem` (zeroes the rings; asks for no interrupts).
    pub fn new<M: Mem + ?Sized>(mem: &M, base: usize, size: u16) -> Result<SplitQueue> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(Error::Queue(format!(
                "queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}"
            )));
        }
        if !base.is_multiple_of(PAGE) {
            return Err(Error::Queue(format!(
                "ring base {base:#x} is not page aligned"
            )));
        }
        mem.write(base, &vec![0u8; RING_PAGES * PAGE]);
        mem.w16(base + PAGE, AVAIL_F_NO_INTERRUPT);
        Ok(SplitQueue {
            size,
            base,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            next_avail: 0,
            last_used: 0,
            in_flight: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }
    /// Memory offset of the descriptor table.
    pub fn desc_off(&self) -> usize {
        self.base
    }
    /// Memory offset of the available ring.
    pub fn avail_off(&self) -> usize {
        self.base + PAGE
    }
    /// Memory offset of the used ring.
    pub fn used_off(&self) -> usize {
        self.base + 2 * PAGE
    }
    /// Chains submitted and not yet used.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }
    /// The next available index the driver will publish.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }
    /// The used index consumed so far.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Build a chain from `bufs` (readable buffers first) and publish it.
    /// Returns the head descriptor index. Buffers crossing physically
    /// discontiguous pages become several descriptors.
    pub fn submit<M: Mem + ?Sized>(&mut self, mem: &M, bufs: &[Buf]) -> Result<u16> {
        if let Some(w) = bufs.iter().position(|b| b.write) {
            if bufs[w..].iter().any(|b| !b.write) {
                return Err(Error::Queue(
                    "a device-readable buffer follows a writable one".into(),
                ));
            }
        }
        let mut segs: Vec<(u64, u32, bool)> = Vec::new();
        for b in bufs {
            for (addr, len) in mem.segments(b.off, b.len) {
                segs.push((addr, len, b.write));
            }
        }
        if segs.is_empty() {
            return Err(Error::Queue(
                "a chain needs at least one non-empty buffer".into(),
            ));
        }
        if segs.len() > self.free.len() {
            return Err(Error::Queue(format!(
                "chain needs {} descriptors, {} free",
                segs.len(),
                self.free.len()
            )));
        }
        let idx: Vec<u16> = (0..segs.len())
            .map(|_| self.free.pop().expect("checked above"))
            .collect();
        for (i, &(addr, len, write)) in segs.iter().enumerate() {
            let d = self.base + 16 * usize::from(idx[i]);
            let mut flags = if write { DESC_F_WRITE } else { 0 };
            let next = if i + 1 < idx.len() {
                flags |= DESC_F_NEXT;
                idx[i + 1]
            } else {
                0
            };
            mem.w64(d, addr);
            mem.w32(d + 8, len);
            mem.w16(d + 12, flags);
            mem.w16(d + 14, next);
        }
        let head = idx[0];
        self.chains[usize::from(head)] = idx;
        let slot = usize::from(self.next_avail % self.size);
        mem.w16(self.avail_off() + 4 + 2 * slot, head);
        // Descriptors and ring entry visible before the index moves.
        mb();
        self.next_avail = self.next_avail.wrapping_add(1);
        mem.w16(self.avail_off() + 2, self.next_avail);
        mb();
        self.in_flight += 1;
        Ok(head)
    }

    /// Take one used entry, if the device published one. Errors when the
    /// device publishes more entries than are in flight or names a head
    /// that is not in flight (an exactly-once violation).
    pub fn poll<M: Mem + ?Sized>(&mut self, mem: &M) -> Result<Option<Used>> {
        let used_idx = mem.r16(self.used_off() + 2);
        if used_idx == self.last_used {
            return Ok(None);
        }
        let pending = used_idx.wrapping_sub(self.last_used);
        if usize::from(pending) > self.in_flight {
            return Err(Error::Verify(format!(
                "used index {used_idx} is {pending} ahead of the {} consumed, but only {} chains are in flight",
                self.last_used, self.in_flight
            )));
        }
        // The entry is read only after the index that published it.
        mb();
        let e = self.used_off() + 4 + 8 * usize::from(self.last_used % self.size);
        let id = mem.r32(e);
        let len = mem.r32(e + 4);
        let chain = match u16::try_from(id) {
            Ok(h) if h < self.size && !self.chains[usize::from(h)].is_empty() => {
                std::mem::take(&mut self.chains[usize::from(h)])
            }
            _ => {
                return Err(Error::Verify(format!(
                    "used ring entry {} names descriptor {id}, which is not the head of a chain in flight",
                    self.last_used
                )))
            }
        };
        self.free.extend(chain.iter().rev());
        self.last_used = self.last_used.wrapping_add(1);
        self.in_flight -= 1;
        Ok(Some(Used { id: id as u16, len }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dma::FakeMem;

    /// A chain as the fake device sees it: head, readable bytes, writable
    /// segments.
    pub(crate) type TakenChain = (u16, Vec<u8>, Vec<(u64, u32)>);

    /// A fake device on [`FakeMem`]: takes available chains, writes
    /// `fill` into every writable byte and completes them, in order or
    /// reversed.
    pub(crate) struct FakeDevice {
        pub size: u16,
        pub base: usize,
        pub avail_seen: u16,
        pub used_idx: u16,
    }

    impl FakeDevice {
        pub(crate) fn new(q: &SplitQueue) -> Self {
            FakeDevice {
                size: q.size(),
                base: q.desc_off(),
                avail_seen: 0,
                used_idx: 0,
            }
        }

        /// Take every new chain: (head, readable bytes, writable segments).
        pub(crate) fn take(&mut self, mem: &FakeMem) -> Vec<TakenChain> {
            let mut out = Vec::new();
            let avail_idx = mem.r16(self.base + PAGE + 2);
            while self.avail_seen != avail_idx {
                let slot = usize::from(self.avail_seen % self.size);
                let head = mem.r16(self.base + PAGE + 4 + 2 * slot);
                let mut d = head;
                let mut readable = Vec::new();
                let mut writable = Vec::new();
                loop {
                    let o = self.base + 16 * usize::from(d);
                    let mut a = [0u8; 8];
                    mem.read(o, &mut a);
                    let addr = u64::from_le_bytes(a);
                    let len = mem.r32(o + 8);
                    let flags = mem.r16(o + 12);
                    if flags & DESC_F_WRITE != 0 {
                        writable.push((addr, len));
                    } else {
                        let off = mem.off_of(addr).unwrap();
                        let mut b = vec![0u8; len as usize];
                        mem.read(off, &mut b);
                        readable.extend_from_slice(&b);
                    }
                    if flags & DESC_F_NEXT == 0 {
                        break;
                    }
                    d = mem.r16(o + 14);
                }
                out.push((head, readable, writable));
                self.avail_seen = self.avail_seen.wrapping_add(1);
            }
            out
        }

        /// Write `data` across `writable`, then publish `head` with the
        /// bytes written.
        pub(crate) fn complete(
            &mut self,
            mem: &FakeMem,
            head: u16,
            writable: &[(u64, u32)],
            data: &[u8],
        ) {
            let mut rest = data;
            let mut n = 0u32;
            for &(addr, len) in writable {
                let k = rest.len().min(len as usize);
                mem.write(mem.off_of(addr).unwrap(), &rest[..k]);
                rest = &rest[k..];
                n += k as u32;
            }
            self.publish(mem, u32::from(head), n);
        }

        pub(crate) fn publish(&mut self, mem: &FakeMem, id: u32, len: u32) {
            let used = self.base + 2 * PAGE;
            let slot = usize::from(self.used_idx % self.size);
            mem.w32(used + 4 + 8 * slot, id);
            mem.w32(used + 8 + 8 * slot, len);
            self.used_idx = self.used_idx.wrapping_add(1);
            mem.w16(used + 2, self.used_idx);
        }
    }

    #[test]
    fn submit_and_poll_with_discontiguous_buffers() {
        let mem = FakeMem::new(8, false);
        let mut q = SplitQueue::new(&mem, 0, 8).unwrap();
        assert_eq!(mem.r16(PAGE), AVAIL_F_NO_INTERRUPT);
        let mut dev = FakeDevice::new(&q);
        mem.write(3 * PAGE + 4090, b"abcdefghij");
        // Readable crosses a page boundary: 2 descriptors; writable 1.
        let head = q
            .submit(&mem, &[Buf::r(3 * PAGE + 4090, 10), Buf::w(5 * PAGE, 16)])
            .unwrap();
        assert_eq!(q.in_flight(), 1);
        assert_eq!(q.free_descriptors(), 5);
        assert_eq!(q.poll(&mem).unwrap(), None);
        let chains = dev.take(&mem);
        assert_eq!(chains.len(), 1);
        assert_eq!(chains[0].0, head);
        assert_eq!(chains[0].1, b"abcdefghij");
        assert_eq!(chains[0].2, vec![(mem.phys(5 * PAGE), 16)]);
        dev.complete(&mem, head, &chains[0].2, b"OK!");
        assert_eq!(q.poll(&mem).unwrap(), Some(Used { id: head, len: 3 }));
        let mut b = [0u8; 3];
        mem.read(5 * PAGE, &mut b);
        assert_eq!(&b, b"OK!");
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.free_descriptors(), 8);
    }

    #[test]
    fn out_of_order_completion_and_wraparound() {
        let mem = FakeMem::new(6, true);
        let mut q = SplitQueue::new(&mem, 0, 8).unwrap();
        let mut dev = FakeDevice::new(&q);
        let mut done = 0u64;
        // Past 65536 to cover the 16-bit index wrap.
        for round in 0..17_000u32 {
            let a = q
                .submit(&mem, &[Buf::r(3 * PAGE, 4), Buf::w(4 * PAGE, 1)])
                .unwrap();
            let b = q
                .submit(&mem, &[Buf::r(3 * PAGE + 8, 4), Buf::w(4 * PAGE + 8, 1)])
                .unwrap();
            let c = q
                .submit(&mem, &[Buf::r(3 * PAGE + 16, 4), Buf::w(4 * PAGE + 16, 1)])
                .unwrap();
            let d = q
                .submit(&mem, &[Buf::r(3 * PAGE + 24, 4), Buf::w(4 * PAGE + 24, 1)])
                .unwrap();
            assert!(
                q.submit(&mem, &[Buf::w(4 * PAGE, 1)]).is_err(),
                "queue full"
            );
            let mut taken = dev.take(&mem);
            assert_eq!(taken.len(), 4);
            if round % 2 == 1 {
                taken.reverse();
            }
            for (h, _, w) in &taken {
                dev.complete(&mem, *h, w, &[0]);
            }
            let mut got = Vec::new();
            while let Some(u) = q.poll(&mem).unwrap() {
                got.push(u.id);
                done += 1;
            }
            let mut want = vec![a, b, c, d];
            if round % 2 == 1 {
                want.reverse();
            }
            assert_eq!(got, want);
        }
        assert_eq!(done, 68_000);
        assert_eq!(q.next_avail(), (68_000u32 % 65536) as u16);
        assert_eq!(q.last_used(), q.next_avail());
    }

    #[test]
    fn detects_duplicate_and_bogus_completions() {
        let mem = FakeMem::new(6, true);
        let mut q = SplitQueue::new(&mem, 0, 4).unwrap();
        let mut dev = FakeDevice::new(&q);
        let h = q.submit(&mem, &[Buf::w(4 * PAGE, 8)]).unwrap();
        dev.take(&mem);
        dev.publish(&mem, u32::from(h), 8);
        dev.publish(&mem, u32::from(h), 8);
        // Two entries published for one chain in flight.
        assert!(matches!(q.poll(&mem), Err(Error::Verify(_))));

        let mut q = SplitQueue::new(&mem, 0, 4).unwrap();
        let mut dev = FakeDevice::new(&q);
        let h = q.submit(&mem, &[Buf::w(4 * PAGE, 8)]).unwrap();
        let _h2 = q.submit(&mem, &[Buf::w(4 * PAGE + 8, 8)]).unwrap();
        dev.take(&mem);
        dev.publish(&mem, u32::from(h), 8);
        dev.publish(&mem, u32::from(h), 8);
        assert!(q.poll(&mem).unwrap().is_some());
        // Second completion of the same head: not in flight any more.
        assert!(matches!(q.poll(&mem), Err(Error::Verify(_))));

        let mut q = SplitQueue::new(&mem, 0, 4).unwrap();
        let mut dev = FakeDevice::new(&q);
        q.submit(&mem, &[Buf::w(4 * PAGE, 8)]).unwrap();
        dev.publish(&mem, 77, 0);
        assert!(matches!(q.poll(&mem), Err(Error::Verify(_))));
    }

    #[test]
    fn rejects_bad_layouts() {
        let mem = FakeMem::new(6, true);
        assert!(SplitQueue::new(&mem, 0, 3).is_err());
        assert!(SplitQueue::new(&mem, 0, 512).is_err());
        assert!(SplitQueue::new(&mem, 8, 4).is_err());
        let mut q = SplitQueue::new(&mem, 0, 4).unwrap();
        assert!(q
            .submit(&mem, &[Buf::w(4 * PAGE, 1), Buf::r(4 * PAGE, 1)])
            .is_err());
        assert!(q.submit(&mem, &[Buf::r(4 * PAGE, 0)]).is_err());
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.free_descriptors(), 4);
    }
}
