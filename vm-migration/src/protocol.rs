//! The live-migration wire protocol between two VMM processes.
//!
//! The sender drives; every request gets one response before the next is
//! sent. A frame is a 16-byte header (magic `CHMG`, command or status,
//! payload length) and the payload:
//!
//! ```text
//! sender                                   receiver
//!   Start ------------------------------->   (ready for a VM?)
//!   <------------------------------------- Ok
//!   Config (the VM's configuration, JSON) ->  builds the VM, not started
//!   <------------------------------------- Ok
//!   Memory (ranges + bytes) ------------->   copies into guest RAM
//!   <------------------------------------- Ok      (repeated: pre-copy)
//!   ... the sender pauses the VM, sends the last dirty pages ...
//!   State (framed device and vCPU state) ->  puts it in
//!   <------------------------------------- Ok
//!   Complete ---------------------------->   starts the VM
//!   <------------------------------------- Ok      (the sender's VMM ends)
//! ```
//!
//! `Abandon` (or a closed connection) at any point before `Complete` makes
//! the receiver drop what it built; the sender's VM goes on. An `Error`
//! response carries one line of text saying why.

use std::io::{Read, Write};

use thiserror::Error;

/// Magic of every frame.
pub const MAGIC: [u8; 4] = *b"CHMG";
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted (a memory chunk or the state).
pub const MAX_PAYLOAD: u64 = 1 << 30;

/// What the sender asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    Start = 1,
    Config = 2,
    Memory = 3,
    State = 4,
    Complete = 5,
    Abandon = 6,
}

impl Command {
    fn from_u16(v: u16) -> Option<Command> {
        Some(match v {
            1 => Command::Start,
            2 => Command::Config,
            3 => Command::Memory,
            4 => Command::State,
            5 => Command::Complete,
            6 => Command::Abandon,
            _ => return None,
        })
    }
}

/// Status of a response.
const STATUS_OK: u16 = 0;
const STATUS_ERROR: u16 = 1;

#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the other side closed the connection")]
    Closed,
    #[error("not a migration frame (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("unknown response status {0}")]
    UnknownStatus(u16),
    #[error("a payload of {0} bytes is over the limit of {MAX_PAYLOAD}")]
    TooLarge(u64),
    #[error("the receiver refused: {0}")]
    Refused(String),
    #[error("bad memory payload: {0}")]
    BadMemory(String),
}

fn header(code: u16, len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&code.to_le_bytes());
    h[8..16].copy_from_slice(&len.to_le_bytes());
    h
}

/// `read_exact`, with an end of stream told apart from other failures.
fn read_all(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ProtocolError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            ProtocolError::Closed
        }
        _ => ProtocolError::Io(e),
    })
}

fn read_header(r: &mut impl Read) -> Result<(u16, u64), ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    read_all(r, &mut h)?;
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&h[0..4]);
    if magic != MAGIC {
        return Err(ProtocolError::Magic(magic));
    }
    let code = u16::from_le_bytes([h[4], h[5]]);
    let mut l = [0u8; 8];
    l.copy_from_slice(&h[8..16]);
    let len = u64::from_le_bytes(l);
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len));
    }
    Ok((code, len))
}

fn read_payload(r: &mut impl Read, len: u64) -> Result<Vec<u8>, ProtocolError> {
    let mut v = vec![0u8; len as usize];
    read_all(r, &mut v)?;
    Ok(v)
}

/// Sends `cmd` with `payload`.
pub fn send_request(w: &mut impl Write, cmd: Command, payload: &[u8]) -> Result<(), ProtocolError> {
    w.write_all(&header(cmd as u16, payload.len() as u64))?;
    w.write_all(payload)?;
    w.flush()?;
    Ok(())
}

/// Reads the next request: its command and payload.
pub fn read_request(r: &mut impl Read) -> Result<(Command, Vec<u8>), ProtocolError> {
    let (code, len) = read_header(r)?;
    let cmd = Command::from_u16(code).ok_or(ProtocolError::UnknownCommand(code))?;
    Ok((cmd, read_payload(r, len)?))
}

/// Answers a request: `Ok(())`, or an error with its reason.
pub fn send_response(w: &mut impl Write, result: Result<(), &str>) -> Result<(), ProtocolError> {
    match result {
        Ok(()) => w.write_all(&header(STATUS_OK, 0))?,
        Err(why) => {
            w.write_all(&header(STATUS_ERROR, why.len() as u64))?;
            w.write_all(why.as_bytes())?;
        }
    }
    w.flush()?;
    Ok(())
}

/// Reads the response to a request: `Ok(())` or [`ProtocolError::Refused`].
pub fn read_response(r: &mut impl Read) -> Result<(), ProtocolError> {
    let (code, len) = read_header(r)?;
    let payload = read_payload(r, len)?;
    match code {
        STATUS_OK => Ok(()),
        STATUS_ERROR => Err(ProtocolError::Refused(
            String::from_utf8_lossy(&payload).into_owned(),
        )),
        other => Err(ProtocolError::UnknownStatus(other)),
    }
}

/// A request and its response.
pub fn request(
    s: &mut (impl Read + Write),
    cmd: Command,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    send_request(s, cmd, payload)?;
    read_response(s)
}

/// Encodes a memory payload: the number of ranges, each (guest address,
/// length), then the bytes of every range in order.
pub fn encode_memory(ranges: &[(u64, u64)], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + ranges.len() * 16 + data.len());
    out.extend_from_slice(&(ranges.len() as u64).to_le_bytes());
    for (a, l) in ranges {
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&l.to_le_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Decodes a memory payload into (guest address, bytes) pieces, checking
/// that the lengths add up exactly.
pub fn decode_memory(payload: &[u8]) -> Result<Vec<(u64, &[u8])>, ProtocolError> {
    let bad = |why: &str| ProtocolError::BadMemory(why.to_string());
    let word = |at: usize| -> Option<u64> {
        let b = payload.get(at..at + 8)?;
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        Some(u64::from_le_bytes(w))
    };
    let count = word(0).ok_or_else(|| bad("no range count"))?;
    let table_end = count
        .checked_mul(16)
        .and_then(|t| t.checked_add(8))
        .filter(|&t| t <= payload.len() as u64)
        .ok_or_else(|| bad("the range table runs past the payload"))? as usize;
    let mut at = table_end;
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let addr = word(8 + i * 16).ok_or_else(|| bad("short range table"))?;
        let len = word(16 + i * 16).ok_or_else(|| bad("short range table"))?;
        if addr.checked_add(len).is_none() {
            return Err(bad("a range wraps around the address space"));
        }
        let end = (at as u64)
            .checked_add(len)
            .filter(|&e| e <= payload.len() as u64)
            .ok_or_else(|| bad("a range's bytes run past the payload"))? as usize;
        out.push((addr, &payload[at..end]));
        at = end;
    }
    if at != payload.len() {
        return Err(bad("bytes left after the last range"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        let mut wire = Vec::new();
        send_request(&mut wire, Command::Config, b"{}").unwrap();
        send_request(&mut wire, Command::Complete, b"").unwrap();
        let mut r = &wire[..];
        assert_eq!(
            read_request(&mut r).unwrap(),
            (Command::Config, b"{}".to_vec())
        );
        assert_eq!(read_request(&mut r).unwrap(), (Command::Complete, vec![]));
        let mut wire = Vec::new();
        send_response(&mut wire, Ok(())).unwrap();
        send_response(&mut wire, Err("no room")).unwrap();
        let mut r = &wire[..];
        read_response(&mut r).unwrap();
        match read_response(&mut r) {
            Err(ProtocolError::Refused(why)) => assert_eq!(why, "no room"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut wire = Vec::new();
        send_request(&mut wire, Command::Start, b"").unwrap();
        wire[0] = b'X';
        assert!(matches!(
            read_request(&mut &wire[..]),
            Err(ProtocolError::Magic(_))
        ));
        let mut wire = header(99, 0).to_vec();
        assert!(matches!(
            read_request(&mut &wire[..]),
            Err(ProtocolError::UnknownCommand(99))
        ));
        wire = header(Command::Memory as u16, MAX_PAYLOAD + 1).to_vec();
        assert!(matches!(
            read_request(&mut &wire[..]),
            Err(ProtocolError::TooLarge(_))
        ));
        // A frame cut short: the connection closed, never a panic.
        let mut wire = Vec::new();
        send_request(&mut wire, Command::State, &[1, 2, 3, 4]).unwrap();
        for n in 0..wire.len() {
            assert!(matches!(
                read_request(&mut &wire[..n]),
                Err(ProtocolError::Closed)
            ));
        }
    }

    #[test]
    fn memory_payloads_round_trip_and_lies_are_refused() {
        let data: Vec<u8> = (0..48u8).collect();
        let p = encode_memory(&[(0x1000, 16), (0x9000, 32)], &data);
        let pieces = decode_memory(&p).unwrap();
        assert_eq!(pieces, vec![(0x1000, &data[..16]), (0x9000, &data[16..])]);
        // Lengths that do not add up, a count that lies, garbage.
        assert!(decode_memory(&encode_memory(&[(0, 49)], &data)).is_err());
        assert!(decode_memory(&encode_memory(&[(0, 47)], &data)).is_err());
        let mut lie = p.clone();
        lie[0] = 200;
        assert!(decode_memory(&lie).is_err());
        let mut huge = p.clone();
        huge[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_memory(&huge).is_err());
        // An address range that wraps, a length past the payload.
        let mut wrap = encode_memory(&[(0, 16), (0, 32)], &data);
        wrap[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_memory(&wrap).is_err());
        let mut long = encode_memory(&[(0, 16), (0, 32)], &data);
        long[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_memory(&long).is_err());
        assert!(decode_memory(&[1, 2, 3]).is_err());
    }
}
