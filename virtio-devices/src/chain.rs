//! A descriptor chain seen as two byte streams: the device-readable bytes
//! and the device-writable bytes, in chain order.
//!
//! Drivers may lay a request out in any arrangement of descriptors (header
//! separate or not, data split over many descriptors, a status byte in its
//! own descriptor or at the end of the last one, direct or indirect). A
//! device that reads and writes through [`ChainBuffers`] by stream offset
//! does not care. All guest-memory access goes through vm-memory's `Bytes`
//! API, so every byte the device writes marks its page dirty in the guest
//! memory's bitmap.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// Errors of chain buffer access.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor buffer at {addr:#x} (+{len} bytes) is not in guest memory: {source}")]
    Memory {
        addr: u64,
        len: usize,
        #[source]
        source: GuestMemoryError,
    },
}

/// One descriptor's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The buffers of one descriptor chain, split into device-readable and
/// device-writable streams.
#[derive(Clone, Debug, Default)]
pub struct ChainBuffers {
    head_index: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
    order_violation: bool,
}

impl ChainBuffers {
    /// Walks `chain` (following indirect tables) and records its buffers.
    /// A descriptor the walk cannot read ends the chain there, as
    /// virtio-queue's iterator does; zero-length descriptors are skipped.
    pub fn from_chain<M>(chain: DescriptorChain<M>) -> Self
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut bufs = ChainBuffers {
            head_index: chain.head_index(),
            ..Default::default()
        };
        for desc in chain {
            if desc.len() == 0 {
                continue;
            }
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                bufs.writable_len += u64::from(desc.len());
                bufs.writable.push(seg);
            } else {
                if !bufs.writable.is_empty() {
                    bufs.order_violation = true;
                }
                bufs.readable_len += u64::from(desc.len());
                bufs.readable.push(seg);
            }
        }
        bufs
    }

    /// Buffers recorded earlier (a device that holds chains across a
    /// snapshot keeps their segments and rebuilds them here).
    pub fn from_segments(head_index: u16, readable: Vec<Segment>, writable: Vec<Segment>) -> Self {
        ChainBuffers {
            head_index,
            readable_len: readable.iter().map(|s| u64::from(s.len)).sum(),
            writable_len: writable.iter().map(|s| u64::from(s.len)).sum(),
            readable,
            writable,
            order_violation: false,
        }
    }

    /// Index of the chain's head descriptor (the id of its used element).
    pub fn head_index(&self) -> u16 {
        self.head_index
    }

    /// Total device-readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    /// Total device-writable bytes.
    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    /// The device-readable buffers in chain order.
    pub fn readable(&self) -> &[Segment] {
        &self.readable
    }

    /// The device-writable buffers in chain order.
    pub fn writable(&self) -> &[Segment] {
        &self.writable
    }

    /// Whether a readable descriptor came after a writable one (which the
    /// virtio specification forbids; the streams are still served).
    pub fn order_violation(&self) -> bool {
        self.order_violation
    }

    /// Reads readable-stream bytes starting at `offset` into `buf`. Returns
    /// how many bytes were read: fewer than `buf.len()` at the end of the
    /// stream.
    pub fn read_at<M: Bytes<GuestAddress, E = GuestMemoryError> + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, ChainError> {
        let mut done = 0usize;
        for_each_piece(&self.readable, offset, buf.len(), |addr, pos, len| {
            mem.read_slice(&mut buf[pos..pos + len], addr)
                .map_err(|source| ChainError::Memory {
                    addr: addr.0,
                    len,
                    source,
                })?;
            done = pos + len;
            Ok(())
        })?;
        Ok(done)
    }

    /// Writes `buf` into the writable stream starting at `offset`. Returns
    /// how many bytes were written: fewer than `buf.len()` at the end of
    /// the stream.
    pub fn write_at<M: Bytes<GuestAddress, E = GuestMemoryError> + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &[u8],
    ) -> Result<usize, ChainError> {
        let mut done = 0usize;
        for_each_piece(&self.writable, offset, buf.len(), |addr, pos, len| {
            mem.write_slice(&buf[pos..pos + len], addr)
                .map_err(|source| ChainError::Memory {
                    addr: addr.0,
                    len,
                    source,
                })?;
            done = pos + len;
            Ok(())
        })?;
        Ok(done)
    }
}

/// Calls `f(guest_address, position_in_caller_buffer, length)` for each
/// contiguous piece of `segments` covering stream bytes
/// `offset..offset + len` (clipped to the end of the stream).
fn for_each_piece<F>(
    segments: &[Segment],
    offset: u64,
    len: usize,
    mut f: F,
) -> Result<(), ChainError>
where
    F: FnMut(GuestAddress, usize, usize) -> Result<(), ChainError>,
{
    let mut seg_start = 0u64;
    let mut pos = 0usize;
    for seg in segments {
        if pos >= len {
            break;
        }
        let seg_len = u64::from(seg.len);
        let seg_end = seg_start + seg_len;
        let want = offset.saturating_add(pos as u64);
        if want < seg_end {
            let skip = want.saturating_sub(seg_start);
            let avail = seg_len - skip;
            let n = usize::try_from(avail).unwrap_or(usize::MAX).min(len - pos);
            let Some(addr) = seg.addr.0.checked_add(skip) else {
                return Err(ChainError::Memory {
                    addr: seg.addr.0,
                    len: n,
                    source: GuestMemoryError::InvalidGuestAddress(seg.addr),
                });
            };
            f(GuestAddress(addr), pos, n)?;
            pos += n;
        }
        seg_start = seg_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(segments: &[Segment], offset: u64, len: usize) -> Vec<(u64, usize, usize)> {
        let mut out = Vec::new();
        for_each_piece(segments, offset, len, |a, p, n| {
            out.push((a.0, p, n));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn pieces_cross_segments() {
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 4,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 1,
            },
            Segment {
                addr: GuestAddress(0x3000),
                len: 10,
            },
        ];
        assert_eq!(
            pieces(&segs, 0, 15),
            vec![(0x1000, 0, 4), (0x2000, 4, 1), (0x3000, 5, 10)]
        );
        assert_eq!(
            pieces(&segs, 3, 3),
            vec![(0x1003, 0, 1), (0x2000, 1, 1), (0x3000, 2, 1)]
        );
        assert_eq!(pieces(&segs, 14, 10), vec![(0x3009, 0, 1)]);
        assert!(pieces(&segs, 15, 10).is_empty());
        assert!(pieces(&segs, u64::MAX, 10).is_empty());
        assert!(pieces(&segs, 0, 0).is_empty());
    }
}
