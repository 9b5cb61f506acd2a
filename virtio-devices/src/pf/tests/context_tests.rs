//! The context codec: R-CTX-4 (strict validation), R-CTX-5 (fields
//! query), stream format of §4.3, chunked decoding.

use super::*;
use crate::pf::admin::{qualifier, status};
use crate::pf::context::*;

fn field(ty: u16, value: &[u8]) -> Vec<u8> {
    let mut v = ty.to_le_bytes().to_vec();
    v.extend_from_slice(&[0; 6]);
    v.extend_from_slice(&(value.len() as u64).to_le_bytes());
    v.extend_from_slice(value);
    v
}

fn stream(fields: &[Vec<u8>]) -> Vec<u8> {
    let mut v = (fields.len() as u32).to_le_bytes().to_vec();
    for f in fields {
        v.extend_from_slice(f);
    }
    v
}

#[test]
fn ctx_stream_layout_matches_section_4_3() {
    let c = sample_context(2, 1);
    let b = c.to_bytes();
    assert_eq!(b.len(), c.encoded_len());
    assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 3 + 3 * 2);
    // First field: PCI_COMMON_CFG, 64 bytes.
    assert_eq!(u16::from_le_bytes([b[4], b[5]]), FIELD_PCI_COMMON_CFG);
    assert_eq!(b[6..12], [0; 6]);
    assert_eq!(u64::from_le_bytes(b[12..20].try_into().unwrap()), 64);
    // num_queues at common cfg offset 0x12.
    assert_eq!(u16::from_le_bytes([b[20 + 0x12], b[20 + 0x13]]), 2);
    // DEV_FEATURES: 8 bytes, negotiated bits.
    let f = 20 + 64;
    assert_eq!(u16::from_le_bytes([b[f], b[f + 1]]), FIELD_DEV_FEATURES);
    assert_eq!(
        u64::from_le_bytes(b[f + 16..f + 24].try_into().unwrap()),
        (1 << 32) | (1 << 9)
    );
    // Queue 0: PCI_VQ_CFG (30), RUNTIME (5), DEV_OWN_DESC (4 + 2 x 2).
    let q = f + 24;
    assert_eq!(u16::from_le_bytes([b[q], b[q + 1]]), FIELD_PCI_VQ_CFG);
    assert_eq!(u64::from_le_bytes(b[q + 8..q + 16].try_into().unwrap()), 30);
    let r = q + 16 + 30;
    assert_eq!(
        u16::from_le_bytes([b[r], b[r + 1]]),
        FIELD_VQ_SPLIT_RUNTIME_CFG
    );
    assert_eq!(u64::from_le_bytes(b[r + 8..r + 16].try_into().unwrap()), 5);
    assert_eq!(b[r + 16 + 4], 1, "enabled");
    let o = r + 16 + 5;
    assert_eq!(
        u16::from_le_bytes([b[o], b[o + 1]]),
        FIELD_VQ_SPLIT_DEV_OWN_DESC
    );
    assert_eq!(u64::from_le_bytes(b[o + 8..o + 16].try_into().unwrap()), 8);
    assert_eq!(b[o + 16..o + 24], [0, 0, 2, 0, 3, 0, 7, 0]);
    // Last: DEV_CFG type 0x1000.
    let last = b.len() - 16 - 60;
    assert_eq!(u16::from_le_bytes([b[last], b[last + 1]]), FIELD_DEV_CFG);
}

#[test]
fn ctx_round_trip_whole_and_in_every_chunk_size() {
    let limits = fake_limits(2);
    let c = sample_context(2, 77);
    let b = c.to_bytes();
    assert_eq!(MemberContext::decode(&b, &limits).unwrap(), c);
    for chunk in 1..=b.len() {
        let mut d = ContextDecoder::new(limits.clone());
        let mut got = None;
        for (k, piece) in b.chunks(chunk).enumerate() {
            let r = d.feed(piece).unwrap();
            if r.is_some() {
                assert_eq!(k, b.len().div_ceil(chunk) - 1, "completed early");
                got = r;
            } else {
                assert!(d.is_partial());
            }
        }
        assert_eq!(got.as_ref(), Some(&c), "chunk {chunk}");
        assert!(!d.is_partial());
    }
}

#[test]
fn ctx_empty_and_partial_contexts_decode() {
    let limits = fake_limits(2);
    let empty = MemberContext::default();
    assert_eq!(empty.to_bytes(), vec![0, 0, 0, 0]);
    assert_eq!(
        MemberContext::decode(&empty.to_bytes(), &limits).unwrap(),
        empty
    );
    // Only the runtime field of queue 1: size defaults to the maximum.
    let s = stream(&[field(FIELD_VQ_SPLIT_RUNTIME_CFG, &[1, 0, 5, 0, 1])]);
    let c = MemberContext::decode(&s, &limits).unwrap();
    assert_eq!(c.queues.len(), 1);
    assert_eq!(c.queues[0].index, 1);
    assert_eq!(c.queues[0].avail_idx, 5);
    assert_eq!(c.queues[0].size, 256);
    assert!(c.common.is_none());
}

fn err_of(s: &[u8]) -> ContextError {
    MemberContext::decode(s, &fake_limits(2)).unwrap_err()
}

#[test]
fn r_ctx_4_unknown_field_type() {
    for ty in [0x5u16, 0xfff, 0x1001, 0x1fff, 0x2000, 0xffff] {
        let s = stream(&[field(ty, &[0; 8])]);
        assert_eq!(err_of(&s), ContextError::UnknownType(ty));
    }
}

#[test]
fn r_ctx_4_wrong_field_length() {
    let cases: Vec<(u16, usize)> = vec![
        (FIELD_PCI_COMMON_CFG, 63),
        (FIELD_PCI_COMMON_CFG, 65),
        (FIELD_DEV_FEATURES, 0),
        (FIELD_DEV_FEATURES, 7),
        (FIELD_DEV_FEATURES, 8 * MAX_FEATURE_WORDS + 8),
        (FIELD_PCI_VQ_CFG, 29),
        (FIELD_PCI_VQ_CFG, 32),
        (FIELD_VQ_SPLIT_RUNTIME_CFG, 4),
        (FIELD_VQ_SPLIT_RUNTIME_CFG, 6),
        (FIELD_VQ_SPLIT_DEV_OWN_DESC, 3),
        (FIELD_VQ_SPLIT_DEV_OWN_DESC, 5),
        (FIELD_VQ_SPLIT_DEV_OWN_DESC, 4 + 2 * 257),
        (FIELD_DEV_CFG, 59),
        (FIELD_DEV_CFG, 61),
    ];
    for (ty, len) in cases {
        let s = stream(&[field(ty, &vec![0; len])]);
        assert!(
            matches!(err_of(&s), ContextError::BadLength { .. }),
            "type {ty:#x} len {len}"
        );
    }
    // desc_count disagreeing with the field length.
    let s = stream(&[field(
        FIELD_VQ_SPLIT_DEV_OWN_DESC,
        &[0, 0, 3, 0, 1, 0, 2, 0],
    )]);
    assert!(matches!(err_of(&s), ContextError::BadLength { .. }));
    // A huge length is refused at the header, before any allocation.
    let mut hdr = field(FIELD_DEV_CFG, &[]);
    hdr[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut d = ContextDecoder::new(fake_limits(2));
    let mut s = 1u32.to_le_bytes().to_vec();
    s.extend_from_slice(&hdr);
    assert!(matches!(d.feed(&s), Err(ContextError::BadLength { .. })));
}

fn vq_cfg(index: u16, size: u16, vector: u16) -> Vec<u8> {
    let mut v = index.to_le_bytes().to_vec();
    v.extend_from_slice(&size.to_le_bytes());
    v.extend_from_slice(&vector.to_le_bytes());
    v.extend_from_slice(&[0; 24]);
    field(FIELD_PCI_VQ_CFG, &v)
}

#[test]
fn r_ctx_4_inapplicable_values() {
    // Queue index >= num_queues, in each per-queue type.
    assert!(matches!(
        err_of(&stream(&[vq_cfg(2, 64, 0)])),
        ContextError::BadQueueIndex { index: 2, .. }
    ));
    assert!(matches!(
        err_of(&stream(&[field(
            FIELD_VQ_SPLIT_RUNTIME_CFG,
            &[9, 0, 0, 0, 0]
        )])),
        ContextError::BadQueueIndex { index: 9, .. }
    ));
    assert!(matches!(
        err_of(&stream(&[field(
            FIELD_VQ_SPLIT_DEV_OWN_DESC,
            &[2, 0, 0, 0]
        )])),
        ContextError::BadQueueIndex { .. }
    ));
    // Queue size not a power of two, zero, above the maximum.
    for size in [0u16, 3, 100, 512, 0x8000] {
        assert!(
            matches!(
                err_of(&stream(&[vq_cfg(0, size, 0)])),
                ContextError::BadQueueSize { .. }
            ),
            "size {size}"
        );
    }
    // MSI-X vector beyond the member's table; NO_VECTOR is fine.
    assert!(matches!(
        err_of(&stream(&[vq_cfg(0, 64, 3)])),
        ContextError::BadVector { .. }
    ));
    assert!(MemberContext::decode(&stream(&[vq_cfg(0, 64, NO_VECTOR)]), &fake_limits(2)).is_ok());
    // Features not offered; features in a second word.
    let f = field(FIELD_DEV_FEATURES, &(1u64 << 33).to_le_bytes());
    assert!(matches!(
        err_of(&stream(&[f])),
        ContextError::FeaturesNotOffered { .. }
    ));
    let mut two = (1u64 << 32).to_le_bytes().to_vec();
    two.extend_from_slice(&1u64.to_le_bytes());
    let f = field(FIELD_DEV_FEATURES, &two);
    assert_eq!(err_of(&stream(&[f])), ContextError::HighFeatures(1));
    // A second, all-zero word is accepted.
    let mut two = (1u64 << 32).to_le_bytes().to_vec();
    two.extend_from_slice(&0u64.to_le_bytes());
    let f = field(FIELD_DEV_FEATURES, &two);
    assert!(MemberContext::decode(&stream(&[f]), &fake_limits(2)).is_ok());
    // num_queues of the common configuration must be the device's.
    let mut cc = sample_context(2, 0).common.unwrap();
    cc.num_queues = 3;
    let f = field(FIELD_PCI_COMMON_CFG, &cc.to_bytes());
    assert!(matches!(
        err_of(&stream(&[f])),
        ContextError::NumQueuesMismatch { .. }
    ));
    // Device-owned descriptor index beyond the queue size, or repeated.
    let s = stream(&[
        vq_cfg(0, 4, 0),
        field(FIELD_VQ_SPLIT_DEV_OWN_DESC, &[0, 0, 1, 0, 4, 0]),
    ]);
    assert!(matches!(
        err_of(&s),
        ContextError::BadDeviceOwned { desc: 4, .. }
    ));
    let s = stream(&[
        vq_cfg(0, 4, 0),
        field(FIELD_VQ_SPLIT_DEV_OWN_DESC, &[0, 0, 2, 0, 1, 0, 1, 0]),
    ]);
    assert!(matches!(
        err_of(&s),
        ContextError::BadDeviceOwned { desc: 1, .. }
    ));
    // enabled must be 0 or 1.
    let s = stream(&[field(FIELD_VQ_SPLIT_RUNTIME_CFG, &[0, 0, 0, 0, 2])]);
    assert!(matches!(err_of(&s), ContextError::BadLength { .. }));
}

#[test]
fn r_ctx_4_field_count_duplicates_and_trailing_bytes() {
    // field_count beyond any valid context.
    let s = (1000u32).to_le_bytes();
    assert!(matches!(err_of(&s), ContextError::TooManyFields { .. }));
    // Duplicates.
    let s = stream(&[vq_cfg(0, 64, 0), vq_cfg(0, 64, 0)]);
    assert!(matches!(err_of(&s), ContextError::Duplicate { .. }));
    let cc = field(
        FIELD_PCI_COMMON_CFG,
        &sample_context(2, 0).common.unwrap().to_bytes(),
    );
    assert!(matches!(
        err_of(&stream(&[cc.clone(), cc])),
        ContextError::Duplicate { .. }
    ));
    // Bytes after the last field.
    let mut s = stream(&[vq_cfg(0, 64, 0)]);
    s.push(0);
    assert_eq!(err_of(&s), ContextError::TrailingBytes(1));
    // field_count larger than the fields present: truncated.
    let mut s = stream(&[vq_cfg(0, 64, 0)]);
    s[0] = 2;
    assert_eq!(err_of(&s), ContextError::Truncated);
}

#[test]
fn r_ctx_5_fields_query_lists_every_type_with_length() {
    let limits = fake_limits(2);
    let mut out = Vec::new();
    encode_supported_fields(&limits, &mut out);
    assert_eq!(out.len(), 6 * 16);
    let entries: Vec<(u16, u64)> = out
        .chunks(16)
        .map(|e| {
            assert_eq!(e[2..8], [0; 6]);
            (
                u16::from_le_bytes([e[0], e[1]]),
                u64::from_le_bytes(e[8..16].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            (0x0, 64),
            (0x1, 8 * MAX_FEATURE_WORDS as u64),
            (0x2, 30),
            (0x3, 5),
            (0x4, 4 + 2 * 256),
            (0x1000, 60),
        ]
    );
    // Through the admin queue.
    let mut h = Harness::new(1);
    let r = h.cmd(opcode::DEV_CTX_FIELDS_QUERY, 1, &[], 200);
    assert!(r.ok());
    assert_eq!(r.result, out);
}

#[test]
fn r_ctx_4_admin_write_of_bad_field_is_einval_invalid_field() {
    let mut h = Harness::new(1);
    assert!(h.set_mode(1, 2).ok());
    for s in [
        stream(&[field(0x77, &[0; 4])]),
        stream(&[vq_cfg(0, 3, 0)]),
        stream(&[field(FIELD_DEV_CFG, &[0; 10])]),
    ] {
        let r = h.cmd(opcode::DEV_CTX_WRITE, 1, &s, 0);
        assert_eq!(
            (r.status, r.qualifier),
            (status::EINVAL, qualifier::INVALID_FIELD)
        );
        assert!(!h.member(1).migration.write_partial());
        assert!(h.member(1).migration.pending_context().is_none());
    }
}

#[test]
fn r_ctx_4_failed_chunk_leaves_partial_stream_intact() {
    let mut h = Harness::new(1);
    assert!(h.set_mode(1, 2).ok());
    let good = sample_context(2, 21);
    let b = good.to_bytes();
    // First 90 bytes: count, common cfg, part of the features header.
    assert!(h.cmd(opcode::DEV_CTX_WRITE, 1, &b[..90], 0).ok());
    // A chunk that completes the features header with an unknown type.
    let mut bad = b[90..130].to_vec();
    // Offsets 84..100 are the DEV_FEATURES header, 100..108 its value,
    // 108 starts queue 0's PCI_VQ_CFG header: make its type unknown.
    bad[108 - 90] = 0x66;
    let r = h.cmd(opcode::DEV_CTX_WRITE, 1, &bad, 0);
    assert_eq!(
        (r.status, r.qualifier),
        (status::EINVAL, qualifier::INVALID_FIELD)
    );
    assert!(h.member(1).migration.write_partial());
    assert_eq!(
        h.member(1).migration.snapshot().write_partial,
        b[..90].to_vec()
    );
    // The correct rest completes the stream.
    assert!(h.cmd(opcode::DEV_CTX_WRITE, 1, &b[90..], 0).ok());
    assert_eq!(h.member(1).migration.pending_context(), Some(&good));
}

#[test]
fn r_ctx_3_write_larger_than_one_command_takes_is_refused() {
    let mut h = Harness::new(1);
    assert!(h.set_mode(1, 2).ok());
    let big = vec![0u8; (1 << 20) + 1];
    let r = h.cmd(opcode::DEV_CTX_WRITE, 1, &big, 0);
    assert_eq!(
        (r.status, r.qualifier),
        (status::ENOMEM, qualifier::NORESOURCE)
    );
    assert!(!h.member(1).migration.write_partial());
}
