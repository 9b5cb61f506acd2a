//! Test data: deterministic byte patterns and the POSIX `cksum` CRC, which
//! busybox in the guest computes too, so that the host can check what the
//! guest read without shipping the bytes back over the serial console.

/// `len` pseudo-random bytes from `seed` (xorshift64*), the same on every run.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The CRC printed by POSIX `cksum` (polynomial 0x04C11DB7, MSB first, the
/// length appended in as few bytes as needed, result inverted).
pub fn posix_cksum(data: &[u8]) -> u32 {
    fn update(mut crc: u32, byte: u8) -> u32 {
        crc ^= u32::from(byte) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
        }
        crc
    }
    let mut crc = data.iter().fold(0u32, |c, &b| update(c, b));
    let mut len = data.len() as u64;
    while len != 0 {
        crc = update(crc, (len & 0xff) as u8);
        len >>= 8;
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cksum_matches_known_values() {
        // Values printed by coreutils `cksum`.
        assert_eq!(posix_cksum(b""), 4294967295);
        assert_eq!(posix_cksum(b"hello\n"), 3015617425);
        assert_eq!(posix_cksum(b"123456789"), 930766865);
    }

    #[test]
    fn pattern_is_deterministic_and_seeded() {
        assert_eq!(pattern(1, 100), pattern(1, 100));
        assert_ne!(pattern(1, 100), pattern(2, 100));
        assert_eq!(pattern(3, 13).len(), 13);
        let p = pattern(4, 4096);
        assert!(p.iter().filter(|&&b| b == 0).count() < 64);
    }
}
