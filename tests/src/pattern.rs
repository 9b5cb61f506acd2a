//! Test data: deterministic byte patterns. A guest checks what it read by
//! comparing (busybox `cmp`) with a copy shipped in its initramfs, so no bytes
//! need to come back over the serial console.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_seeded() {
        assert_eq!(pattern(1, 100), pattern(1, 100));
        assert_ne!(pattern(1, 100), pattern(2, 100));
        assert_eq!(pattern(3, 13).len(), 13);
        let p = pattern(4, 4096);
        assert!(p.iter().filter(|&&b| b == 0).count() < 64);
    }
}
