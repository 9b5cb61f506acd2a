//! What a VM and its parts save and restore, and how a saved state is
//! framed on disk or on the wire.
//!
//! A part of the VM that has state implements [`Snapshottable`] with a typed
//! [`Snapshottable::State`] (plain data, `serde`); the VMM gathers the parts'
//! states into one value and frames it with [`encode`]: a header with a
//! magic, a format version, the payload's length and its CRC-32, then the
//! payload in a compact binary encoding (`postcard`). [`decode`] checks all
//! of it before it decodes, so a truncated, corrupted or foreign state is
//! one clear error and never a half-applied restore.
//!
//! There are no default methods: a part that cannot save itself does not
//! compile as one that can.

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// Errors of pausing, saving or restoring a part of the VM.
#[derive(Debug, Error)]
pub enum MigratableError {
    #[error("cannot pause {what}: {reason}")]
    Pause { what: String, reason: String },
    #[error("cannot resume {what}: {reason}")]
    Resume { what: String, reason: String },
    #[error("cannot save the state of {what}: {reason}")]
    Snapshot { what: String, reason: String },
    #[error("cannot restore the state of {what}: {reason}")]
    Restore { what: String, reason: String },
}

impl MigratableError {
    /// A [`MigratableError::Snapshot`] of `what`.
    pub fn snapshot(what: impl Into<String>, reason: impl ToString) -> Self {
        MigratableError::Snapshot {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    /// A [`MigratableError::Restore`] of `what`.
    pub fn restore(what: impl Into<String>, reason: impl ToString) -> Self {
        MigratableError::Restore {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// A part of the VM that can stop touching guest memory and sending
/// interrupts, and start again where it stopped.
pub trait Pausable {
    /// Completes what is in flight and parks; from its return until
    /// [`Pausable::resume`] nothing of guest state changes.
    fn pause(&mut self) -> Result<(), MigratableError>;
    /// Carries on from where [`Pausable::pause`] left.
    fn resume(&mut self) -> Result<(), MigratableError>;
}

/// A part of the VM whose state can be saved and put back.
///
/// Restore follows "build as configured, then set the state": the object is
/// made from the same configuration as the one saved, then
/// [`Snapshottable::restore`] puts the state in. It validates before it
/// applies what it can; a failure leaves the object to be discarded.
pub trait Snapshottable {
    /// The saved state: plain data.
    type State: Serialize + DeserializeOwned;
    /// Captures the state. Called with the VM paused.
    fn snapshot(&self) -> Result<Self::State, MigratableError>;
    /// Puts `state` into a freshly built object of the same configuration.
    fn restore(&mut self, state: &Self::State) -> Result<(), MigratableError>;
}

/// Errors of reading a framed state.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    #[error("truncated: {have} bytes, the header needs {need}")]
    TruncatedHeader { have: usize, need: usize },
    #[error("not a saved state of this VMM (magic {0:02x?})")]
    Magic([u8; 8]),
    #[error("format version {found}, this VMM reads version {expected}")]
    Version { found: u32, expected: u32 },
    #[error("truncated: the header announces {announced} bytes of state, {have} follow")]
    Truncated { announced: u64, have: u64 },
    #[error("{0} bytes follow the state")]
    Trailing(u64),
    #[error("checksum mismatch: the state is corrupted (CRC-32 {found:08x}, header says {expected:08x})")]
    Checksum { found: u32, expected: u32 },
    #[error("cannot decode the state: {0}")]
    Decode(String),
    #[error("cannot encode the state: {0}")]
    Encode(String),
}

/// Magic of a framed state.
pub const STATE_MAGIC: [u8; 8] = *b"CHVPFST\0";
/// Version of the framing and of the state types it carries. Bump it when
/// a saved type changes shape.
pub const STATE_VERSION: u32 = 2;
/// Header: magic, version (le32), payload length (le64), CRC-32 (le32).
pub const HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// Frames `value`: header, then its binary encoding.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StateError> {
    let payload = postcard::to_allocvec(value).map_err(|e| StateError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks the frame of `bytes` (magic, version, length, checksum) and
/// decodes the value.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    if bytes.len() < HEADER_LEN {
        return Err(StateError::TruncatedHeader {
            have: bytes.len(),
            need: HEADER_LEN,
        });
    }
    let (head, payload) = bytes.split_at(HEADER_LEN);
    let field = |r: std::ops::Range<usize>| &head[r];
    let mut magic = [0u8; 8];
    magic.copy_from_slice(field(0..8));
    if magic != STATE_MAGIC {
        return Err(StateError::Magic(magic));
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(field(8..12));
    let version = u32::from_le_bytes(v);
    if version != STATE_VERSION {
        return Err(StateError::Version {
            found: version,
            expected: STATE_VERSION,
        });
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(field(12..20));
    let announced = u64::from_le_bytes(l);
    let have = payload.len() as u64;
    if have < announced {
        return Err(StateError::Truncated { announced, have });
    }
    if have > announced {
        return Err(StateError::Trailing(have - announced));
    }
    v.copy_from_slice(field(20..24));
    let expected = u32::from_le_bytes(v);
    let found = crc32fast::hash(payload);
    if found != expected {
        return Err(StateError::Checksum { found, expected });
    }
    postcard::from_bytes(payload).map_err(|e| StateError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Part {
        name: String,
        regs: Vec<u64>,
        mode: Option<u8>,
    }

    fn sample() -> Part {
        Part {
            name: "vcpu0".into(),
            regs: vec![1, u64::MAX, 0x1234],
            mode: Some(2),
        }
    }

    #[test]
    fn a_framed_state_round_trips() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(&bytes[..8], &STATE_MAGIC);
        assert_eq!(decode::<Part>(&bytes).unwrap(), sample());
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encode(&sample()).unwrap();
        for n in 0..bytes.len() {
            let e = decode::<Part>(&bytes[..n]).unwrap_err();
            assert!(
                matches!(
                    e,
                    StateError::TruncatedHeader { .. } | StateError::Truncated { .. }
                ),
                "{n}: {e}"
            );
        }
    }

    #[test]
    fn every_flipped_payload_bit_is_refused() {
        let bytes = encode(&sample()).unwrap();
        for i in HEADER_LEN..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    matches!(decode::<Part>(&b).unwrap_err(), StateError::Checksum { .. }),
                    "byte {i} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn wrong_magic_version_trailing_bytes_and_shape_are_refused() {
        let bytes = encode(&sample()).unwrap();
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(matches!(decode::<Part>(&b), Err(StateError::Magic(_))));
        let mut b = bytes.clone();
        b[8] = 9;
        assert_eq!(
            decode::<Part>(&b).unwrap_err(),
            StateError::Version {
                found: 9,
                expected: STATE_VERSION
            }
        );
        let mut b = bytes.clone();
        b.push(0);
        assert_eq!(decode::<Part>(&b).unwrap_err(), StateError::Trailing(1));
        // A valid frame of another type.
        let other = encode(&vec![7u8; 3]).unwrap();
        assert!(matches!(decode::<Part>(&other), Err(StateError::Decode(_))));
    }
}
